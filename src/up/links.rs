//! The links of a local cluster, optionally slowed down: a delay relay in front of each
//! peer API and entropy server, so that WAN figures can be reproduced on one machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;

use super::Plan;
use crate::delay_proxy::DelayProxy;

/// One-way delays a local cluster puts on its internal links, each direction, through
/// [`DelayProxy`] relays on loopback; zero connects directly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkDelays {
    /// Between the sites' KMEs (the peer API).
    pub peer: Duration,
    /// Between each KME and the entropy servers.
    pub entropy: Duration,
}

/// The addresses the manifest names: each server's own listener, or the relay in front of
/// it. Relays sit in front of the listener, so every caller of a server crosses the same
/// delay, and identities are still checked end to end (a peer is pinned by the name the
/// manifest gives it, not by its address).
pub(super) struct Advertised {
    pub(super) peer: Vec<SocketAddr>,
    pub(super) entropy: Vec<SocketAddr>,
    pub(super) relays: Vec<DelayProxy>,
}

impl Advertised {
    pub(super) async fn start(plan: &Plan, delays: LinkDelays) -> anyhow::Result<Self> {
        let mut relays = Vec::new();
        let mut peer = Vec::new();
        for i in 0..plan.sites.len() {
            peer.push(front(plan.peer_port(i), delays.peer, &mut relays).await?);
        }
        let mut entropy = Vec::new();
        for j in 0..plan.entropy.len() {
            entropy.push(front(plan.entropy_port(j), delays.entropy, &mut relays).await?);
        }
        Ok(Self {
            peer,
            entropy,
            relays,
        })
    }
}

/// The address callers should use for the listener on `port`: a relay adding `delay` in
/// front of it (kept in `relays`), or the listener itself when `delay` is zero.
async fn front(
    port: u16,
    delay: Duration,
    relays: &mut Vec<DelayProxy>,
) -> anyhow::Result<SocketAddr> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if delay.is_zero() {
        return Ok(target);
    }
    let relay = DelayProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), target, delay)
        .await
        .with_context(|| format!("starting a delay relay to {target}"))?;
    let addr = relay.local_addr();
    relays.push(relay);
    Ok(addr)
}
