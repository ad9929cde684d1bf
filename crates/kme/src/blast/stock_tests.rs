//! The stock on a paused clock: a set is handed out once, never stale, never the wrong size.

use zeroize::Zeroizing;

use super::*;

const NOW: u64 = 1_800_000_000;

fn readers() -> Vec<String> {
    vec!["B".to_owned()]
}

/// A set of three ranges of `len` bytes that expire at `expires_at`.
fn set(len: u64, expires_at: u64) -> Set {
    let allocation = |server: &str| Allocation {
        server_id: server.to_owned(),
        pool_id: [1; 16],
        offset: 0,
        len,
        expires_at,
        bytes: Zeroizing::new(vec![0xA5; len as usize]),
    };
    Set::new(vec![allocation("e1"), allocation("e2"), allocation("e3")])
}

/// A stock holding `set` for [`readers`], shelved the way a batch's restock shelves it.
fn stocked(set: Set) -> Stock {
    let stock = Stock::default();
    let need = set.len();
    assert!(stock.take(&readers(), need, NOW, |_| true).is_none());
    assert_eq!(stock.reserve(&readers()), Some(need.next_power_of_two()));
    stock.put(&readers(), Some(set));
    stock
}

#[tokio::test(start_paused = true)]
async fn a_set_is_handed_out_once() {
    let stock = stocked(set(128, NOW + 300));
    let taken = stock.take(&readers(), 100, NOW, |_| true).expect("stocked");
    assert_eq!(taken.allocations.len(), 3);
    assert!(stock.take(&readers(), 100, NOW, |_| true).is_none());
    // Nor to other readers.
    let stock = stocked(set(128, NOW + 300));
    assert!(stock.take(&["C".to_owned()], 100, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_close_to_its_expiry_is_dropped_not_used() {
    let stock = stocked(set(128, NOW + MARGIN_SECS - 1));
    assert!(stock.take(&readers(), 100, NOW, |_| true).is_none());
    let stock = stocked(set(128, NOW + 300));
    assert!(stock.take(&readers(), 100, NOW + 300, |_| true).is_none());
    // Dropped: not there either once the clock would allow it again.
    assert!(stock.take(&readers(), 100, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_held_too_long_is_dropped_not_used() {
    let stock = stocked(set(128, NOW + 300));
    tokio::time::advance(MAX_HOLD).await;
    assert!(stock.take(&readers(), 100, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_from_a_failing_server_is_dropped_not_used() {
    let stock = stocked(set(128, NOW + 300));
    assert!(stock
        .take(&readers(), 100, NOW, |a| a.server_id != "e2")
        .is_none());
    assert!(stock.take(&readers(), 100, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn only_a_set_of_the_right_size_is_used() {
    let stock = stocked(set(128, NOW + 300));
    // Too short for the batch; more than twice what it needs.
    assert!(stock.take(&readers(), 129, NOW, |_| true).is_none());
    assert!(stock.take(&readers(), 63, NOW, |_| true).is_none());
    assert!(stock.take(&readers(), 64, NOW, |_| true).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_stock_stays_small() {
    let stock = stocked(set(128, NOW + 300));
    assert_eq!(stock.reserve(&readers()), Some(128));
    assert_eq!(stock.reserve(&readers()), None, "more than DEPTH sets");
    stock.put(&readers(), None);
    assert_eq!(stock.reserve(&readers()), Some(128));
    // Batches too large to stock allocate for themselves.
    let _ = stock.take(&readers(), MAX_RANGE + 1, NOW, |_| true);
    stock.put(&readers(), None);
    assert_eq!(stock.reserve(&readers()), None);
}
