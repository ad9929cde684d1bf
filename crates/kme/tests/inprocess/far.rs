//! A far link: the peer acknowledges 40 ms after each message, as a site across an ocean
//! would. Once the link is known to be far, a large batch is still served from the ready
//! pool with one `bind`, instead of being made on demand as on a near link.

use std::time::Duration;

use axum::http::StatusCode;
use dqkd_store::KeyStore as _;

use crate::harness::{eventually, Answer, Call, Cluster, Fault};

/// One way of the far link; each acknowledgement comes a round trip after its message.
const ONE_WAY: Duration = Duration::from_millis(40);

/// A cluster whose requests may ask for 100 keys, once A's pool toward B is full.
async fn filled() -> Cluster {
    let pools = "target = 400\nlow_water = 200\nbatch = 200";
    let cluster = Cluster::with_pools_and_max_keys(pools, 100).await;
    let b = cluster.site("B");
    eventually(
        "A's pool toward B filled",
        Duration::from_secs(30),
        || async { b.store.pool_list("A>B").await.map(|l| l.len()).unwrap_or(0) == 400 },
    )
    .await;
    cluster
}

/// Single-key requests, enough for A to learn the link's round trip from their binds.
async fn learn(cluster: &Cluster) {
    for _ in 0..16 {
        let answer = cluster.enc("A", "alice", "bob", "{}").await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
}

/// Alice asks A for 100 keys for bob: the answer (200, checked) and how many (bind, deliver)
/// messages it took toward B.
async fn hundred_keys(cluster: &Cluster) -> (Answer, (usize, usize)) {
    let link = cluster.link("A", "B");
    let (binds, delivers) = (link.calls(Call::Bind), link.calls(Call::Deliver));
    let answer = cluster.enc("A", "alice", "bob", r#"{"number":100}"#).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let messages = (
        link.calls(Call::Bind) - binds,
        link.calls(Call::Deliver) - delivers,
    );
    (answer, messages)
}

/// A request for 100 keys is more than a near link serves from its pool: on a far link it
/// goes out as a single bind, and bob gets every key alice got.
#[tokio::test(start_paused = true)]
async fn a_far_link_serves_a_large_batch_from_the_pool_with_one_bind() {
    let cluster = filled().await;
    cluster
        .link("A", "B")
        .set(Call::Bind, Fault::DelayAck(2 * ONE_WAY));
    learn(&cluster).await;
    let (answer, messages) = hundred_keys(&cluster).await;
    assert_eq!(
        messages,
        (1, 0),
        "100 keys toward a far site: one bind from the pool, nothing made on demand"
    );
    let sent = answer.keys();
    assert_eq!(sent.len(), 100);
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.keys(), sent);
}

/// The same request toward a near site (acknowledgements at once) is made on demand: the
/// pool is kept for small batches there, where it saves the most.
#[tokio::test(start_paused = true)]
async fn a_near_link_makes_a_large_batch_on_demand() {
    let cluster = filled().await;
    learn(&cluster).await;
    let (_, messages) = hundred_keys(&cluster).await;
    assert_eq!(
        messages,
        (0, 1),
        "100 keys toward a near site: made on demand"
    );
}
