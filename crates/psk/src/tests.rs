//! Both ends in one process, on a simulated clock: the schedule, the protocol and its
//! recovery from outages, restarts and clock skew.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::{
    Apply, Epoch, Initiator, KeySource, Link, Psk, PskError, Reply, Request, Responder, Schedule,
    Slot,
};

const INTERVAL: Duration = Duration::from_secs(120);

/// The two KMEs of a pair of sites: keys made at one end, fetched once at the other.
#[derive(Default)]
struct Kmes {
    keys: StdMutex<HashMap<String, [u8; 32]>>,
    made: AtomicU8,
    down: AtomicBool,
}

struct Side(Arc<Kmes>);

#[async_trait]
impl KeySource for Side {
    async fn new_key(&self) -> Result<(String, Psk), PskError> {
        if self.0.down.load(Ordering::SeqCst) {
            return Err(PskError::Link("KME down".into()));
        }
        let n = self.0.made.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("key-{n}");
        self.0.keys.lock().unwrap().insert(id.clone(), [n; 32]);
        Ok((id, Psk::new([n; 32])))
    }

    async fn key_by_id(&self, key_id: &str) -> Result<Psk, PskError> {
        if self.0.down.load(Ordering::SeqCst) {
            return Err(PskError::Link("KME down".into()));
        }
        let key = self.0.keys.lock().unwrap().remove(key_id);
        key.map(Psk::new)
            .ok_or_else(|| PskError::BadKey(format!("no key {key_id}")))
    }
}

/// What one end's tunnel has in use (it survives a restart of the process, as WireGuard's does).
#[derive(Default)]
struct Tunnel(StdMutex<Option<(Slot, [u8; 32])>>);

#[async_trait]
impl Apply for Tunnel {
    async fn apply(&self, slot: &Slot, key: &Psk) -> Result<(), PskError> {
        *self.0.lock().unwrap() = Some((slot.clone(), *key.bytes()));
        Ok(())
    }
}

impl Tunnel {
    fn key(&self) -> Option<[u8; 32]> {
        self.0.lock().unwrap().as_ref().map(|(_, k)| *k)
    }
    fn slot(&self) -> Option<Slot> {
        self.0.lock().unwrap().as_ref().map(|(s, _)| s.clone())
    }
}

/// The link, on the responder's clock: down, or losing the replies.
struct Wire {
    responder: StdMutex<Arc<Mutex<Responder>>>,
    now: Arc<StdMutex<SystemTime>>,
    skew: StdMutex<Duration>,
    down: AtomicBool,
    lose_replies: AtomicBool,
}

#[async_trait]
impl Link for Wire {
    async fn exchange(&self, request: &Request) -> Result<Reply, PskError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PskError::Link("connection refused".into()));
        }
        let now = *self.now.lock().unwrap() + *self.skew.lock().unwrap();
        let responder = self.responder.lock().unwrap().clone();
        let reply = responder.lock().await.handle(request.clone(), now).await?;
        if self.lose_replies.load(Ordering::SeqCst) {
            return Err(PskError::Link("timed out".into()));
        }
        Ok(reply)
    }
}

struct Pair {
    schedule: Schedule,
    kmes: Arc<Kmes>,
    left: Arc<Tunnel>,
    right: Arc<Tunnel>,
    wire: Arc<Wire>,
    initiator: Initiator,
    now: Arc<StdMutex<SystemTime>>,
}

impl Pair {
    fn new(start: SystemTime) -> Self {
        let schedule = Schedule::new(INTERVAL, Duration::from_secs(10)).unwrap();
        let kmes = Arc::new(Kmes::default());
        let (left, right) = (Arc::new(Tunnel::default()), Arc::new(Tunnel::default()));
        let now = Arc::new(StdMutex::new(start));
        let responder = Responder::new(schedule, Arc::new(Side(kmes.clone())), right.clone());
        let wire = Arc::new(Wire {
            responder: StdMutex::new(Arc::new(Mutex::new(responder))),
            now: now.clone(),
            skew: StdMutex::new(Duration::ZERO),
            down: AtomicBool::new(false),
            lose_replies: AtomicBool::new(false),
        });
        let initiator = Initiator::new(
            schedule,
            Arc::new(Side(kmes.clone())),
            wire.clone(),
            left.clone(),
        );
        Self {
            schedule,
            kmes,
            left,
            right,
            wire,
            initiator,
            now,
        }
    }

    fn restart_initiator(&mut self) {
        self.initiator = Initiator::new(
            self.schedule,
            Arc::new(Side(self.kmes.clone())),
            self.wire.clone(),
            self.left.clone(),
        );
    }

    fn restart_responder(&mut self) {
        let fresh = Responder::new(
            self.schedule,
            Arc::new(Side(self.kmes.clone())),
            self.right.clone(),
        );
        *self.wire.responder.lock().unwrap() = Arc::new(Mutex::new(fresh));
    }

    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap()
    }

    /// Runs both ends, a tick every second of simulated time, until `until`.
    async fn run_until(&mut self, until: SystemTime) {
        while self.now() < until {
            let now = self.now();
            self.initiator.step(now).await;
            let responder = self.wire.responder.lock().unwrap().clone();
            let skew = *self.wire.skew.lock().unwrap();
            responder.lock().await.tick(now + skew).await;
            *self.now.lock().unwrap() = now + Duration::from_secs(1);
        }
    }

    fn at(&self, epoch: u64, secs: u64) -> SystemTime {
        self.schedule.start_of(Epoch(epoch)) + Duration::from_secs(secs)
    }

    fn assert_same(&self, epoch: u64) {
        let (l, r) = (self.left.slot(), self.right.slot());
        assert_eq!(l, r, "both ends name the same key");
        assert_eq!(
            self.left.key(),
            self.right.key(),
            "both ends have the same bytes"
        );
        assert_eq!(l.map(|s| s.epoch), Some(Epoch(epoch)));
    }
}

const E: u64 = 14_705_000;

fn start() -> SystemTime {
    UNIX_EPOCH + INTERVAL * E as u32 + Duration::from_secs(10)
}

#[tokio::test]
async fn both_ends_apply_the_same_new_key_at_every_epoch() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E, 11)).await;
    pair.assert_same(E);
    let mut seen = vec![pair.left.key()];
    for n in 1..=4 {
        // Just before the boundary both still have the old key; just after, both the new.
        pair.run_until(pair.at(E + n, 0) - Duration::from_secs(1))
            .await;
        pair.assert_same(E + n - 1);
        pair.run_until(pair.at(E + n, 1)).await;
        pair.assert_same(E + n);
        assert!(!seen.contains(&pair.left.key()), "a new key each epoch");
        seen.push(pair.left.key());
    }
}

#[tokio::test]
async fn a_kme_outage_keeps_the_current_key_and_the_agreement_is_retried() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E, 11)).await;
    let before = pair.left.slot();
    pair.kmes.down.store(true, Ordering::SeqCst);
    pair.run_until(pair.at(E + 1, 30)).await;
    assert_eq!(pair.left.slot(), before, "the key in use stays");
    assert_eq!(pair.right.slot(), before);
    pair.kmes.down.store(false, Ordering::SeqCst);
    pair.run_until(pair.at(E + 1, 40)).await;
    pair.assert_same(E + 1);
}

#[tokio::test]
async fn a_responder_restart_after_agreement_is_repaired_at_once() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E + 1, 0) - Duration::from_secs(5))
        .await;
    // The next key is agreed; the responder forgets it (its tunnel keeps the old key).
    pair.restart_responder();
    pair.run_until(pair.at(E + 1, 3)).await;
    pair.assert_same(E + 1);
}

#[tokio::test]
async fn an_initiator_restart_agrees_a_fresh_key_that_both_ends_use() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E, 50)).await;
    let before = pair.left.key();
    pair.restart_initiator();
    pair.run_until(pair.at(E, 52)).await;
    pair.assert_same(E);
    assert_ne!(pair.left.key(), before);
    pair.run_until(pair.at(E + 1, 1)).await;
    pair.assert_same(E + 1);
}

#[tokio::test]
async fn a_lost_acknowledgement_leaves_one_end_alone_for_at_most_an_interval() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E, 20)).await;
    // From the agreement window on, the responder gets the offers but its answers are lost,
    // and then the link goes down for good.
    pair.wire.lose_replies.store(true, Ordering::SeqCst);
    pair.run_until(pair.at(E + 1, 0) - Duration::from_secs(5))
        .await;
    pair.wire.down.store(true, Ordering::SeqCst);
    pair.run_until(pair.at(E + 1, 2)).await;
    assert_ne!(
        pair.left.key(),
        pair.right.key(),
        "the responder applied alone"
    );
    pair.run_until(pair.at(E + 2, 3)).await;
    assert_eq!(
        pair.left.key(),
        pair.right.key(),
        "back in step after one interval"
    );
    // When the link returns, rotation resumes.
    pair.wire.down.store(false, Ordering::SeqCst);
    pair.wire.lose_replies.store(false, Ordering::SeqCst);
    pair.run_until(pair.at(E + 3, 1)).await;
    pair.assert_same(E + 3);
}

#[tokio::test]
async fn clocks_within_the_tolerated_skew_still_rotate_together() {
    let mut pair = Pair::new(start());
    *pair.wire.skew.lock().unwrap() = Duration::from_secs(8);
    // The responder's clock is ahead: it applies at its own epoch start, before it hears
    // from the initiator again; the initiator follows at its own.
    pair.run_until(pair.at(E + 1, 0) - Duration::from_secs(3))
        .await;
    assert_eq!(pair.right.slot().map(|s| s.epoch), Some(Epoch(E + 1)));
    assert_eq!(pair.left.slot().map(|s| s.epoch), Some(Epoch(E)));
    pair.run_until(pair.at(E + 1, 1)).await;
    pair.assert_same(E + 1);
    pair.run_until(pair.at(E + 2, 1)).await;
    pair.assert_same(E + 2);
}

#[tokio::test]
async fn a_clock_beyond_the_skew_is_refused_and_nothing_changes() {
    let mut pair = Pair::new(start());
    pair.run_until(pair.at(E, 11)).await;
    let before = (pair.left.slot(), pair.right.slot());
    // The responder's clock is two intervals ahead: the offer for E + 1 is stale to it.
    *pair.wire.skew.lock().unwrap() = INTERVAL * 2;
    pair.run_until(pair.at(E + 1, 5)).await;
    assert_eq!((pair.left.slot(), pair.right.slot()), before);
    assert!(
        pair.kmes.keys.lock().unwrap().len() == 1,
        "the offered key was not fetched"
    );
}
