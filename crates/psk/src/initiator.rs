//! The initiating end: asks its KME for a key shared with the responder's SAE, offers the
//! key ID for the next epoch, and puts the key in use when the epoch starts, provided the
//! responder acknowledged holding it.
//!
//! Each [`Initiator::step`] looks at the clock and does the next thing due; it returns when
//! it wants to run again. Failures (a KME or the link down) leave the key in use as it is
//! and are retried; an epoch that starts without an agreed key keeps the old key, and the
//! agreement continues late: both ends then apply it as soon as it is agreed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::applied::Applied;
use crate::key::{Psk, Slot};
use crate::metrics::{self, Role, Stage};
use crate::ports::{Apply, KeySource, Link, Request};
use crate::schedule::{Epoch, Schedule};
use crate::PskError;

/// A key agreed (or being agreed) for an epoch not yet in use here.
struct Pending {
    slot: Slot,
    key: Psk,
    acked: bool,
}

/// The initiating end's state.
pub struct Initiator {
    schedule: Schedule,
    kme: Arc<dyn KeySource>,
    link: Arc<dyn Link>,
    apply: Arc<dyn Apply>,
    applied: Applied,
    pending: Option<Pending>,
    /// The responder reported a key other than ours in use: agree a new one now.
    out_of_step: bool,
    retry: Duration,
}

impl Initiator {
    /// An initiator with nothing in use yet: its first step agrees a key for the current
    /// epoch and applies it at once.
    pub fn new(
        schedule: Schedule,
        kme: Arc<dyn KeySource>,
        link: Arc<dyn Link>,
        apply: Arc<dyn Apply>,
    ) -> Self {
        let retry =
            (schedule.interval() / 20).clamp(Duration::from_millis(50), Duration::from_secs(5));
        Self {
            schedule,
            kme,
            link,
            apply,
            applied: Applied::new(Role::Initiator),
            pending: None,
            out_of_step: false,
            retry,
        }
    }

    /// The key in use here.
    pub fn current(&self) -> Option<&Slot> {
        self.applied.current()
    }

    /// Does what is due at `now`; returns when to step again.
    pub async fn step(&mut self, now: SystemTime) -> SystemTime {
        let epoch = self.schedule.epoch_at(now);
        let mut wake = self.schedule.start_of(Epoch(epoch.0 + 1));
        if let Some(at) = self.apply_agreed(now).await {
            wake = wake.min(at);
        }
        if !self.applied.confirmed() && !self.sync(now).await {
            wake = wake.min(now + self.retry);
        }
        if let Some(at) = self
            .applied
            .revert_if_stale(&*self.apply, now, self.schedule.interval())
            .await
        {
            wake = wake.min(at);
        }
        match self.target(epoch, now) {
            Some(target) => {
                if !self.agree(target, now).await {
                    wake = wake.min(now + self.retry);
                } else if self.pending.is_some() {
                    // Agreed: apply at the epoch's start (at once if it has begun).
                    wake = wake.min(self.schedule.start_of(target));
                }
            }
            None => wake = wake.min(self.schedule.prepare_from(Epoch(epoch.0 + 1))),
        }
        wake.max(now)
    }

    /// Applies an acknowledged key whose epoch has started; returns a retry time when
    /// applying failed.
    async fn apply_agreed(&mut self, now: SystemTime) -> Option<SystemTime> {
        let due = self
            .pending
            .as_ref()
            .is_some_and(|p| p.acked && self.schedule.start_of(p.slot.epoch) <= now);
        if !due {
            return None;
        }
        let pending = self.pending.take()?;
        let (slot, key) = (pending.slot.clone(), pending.key.clone());
        match self
            .applied
            .switch(&*self.apply, slot, key, now, false)
            .await
        {
            Ok(()) => {
                // Tell the responder at once: it follows, and confirms.
                self.sync(now).await;
                None
            }
            Err(_) => {
                self.pending = Some(pending);
                Some(now + self.retry)
            }
        }
    }

    /// Reports the key in use and learns the responder's; true when the link answered.
    async fn sync(&mut self, now: SystemTime) -> bool {
        let request = Request {
            current: self.applied.current().cloned(),
            offer: None,
        };
        match self.link.exchange(&request).await {
            Ok(reply) => {
                if !self.applied.confirm(reply.current.as_ref()) {
                    tracing::warn!(ours = ?request.current, theirs = ?reply.current,
                        "the responder does not have our key in use; agreeing a new one now");
                    self.out_of_step = true;
                    self.pending = None;
                }
                true
            }
            Err(e) => {
                self.link_failed(&e, now);
                false
            }
        }
    }

    /// The epoch a key must be agreed for now, if any.
    fn target(&self, epoch: Epoch, now: SystemTime) -> Option<Epoch> {
        let current = self.applied.current().map(|s| s.epoch);
        match current {
            // Nothing in use, the responder lost ours, or an epoch began without agreement.
            None => Some(epoch),
            Some(_) if self.out_of_step => Some(epoch),
            Some(c) if c < epoch => Some(epoch),
            Some(_) if now >= self.schedule.prepare_from(Epoch(epoch.0 + 1)) => {
                Some(Epoch(epoch.0 + 1))
            }
            Some(_) => None,
        }
    }

    /// Makes sure a key for `target` is agreed; true when it is.
    async fn agree(&mut self, target: Epoch, now: SystemTime) -> bool {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.slot.epoch != target)
        {
            // Too late for that epoch; its key is dropped (and zeroised), never used.
            self.pending = None;
        }
        if self.pending.is_none() {
            match self.kme.new_key().await {
                Ok((key_id, key)) => {
                    let slot = Slot {
                        epoch: target,
                        key_ID: key_id,
                    };
                    tracing::debug!(%slot, "new key from the KME");
                    self.pending = Some(Pending {
                        slot,
                        key,
                        acked: false,
                    });
                }
                Err(e) => {
                    metrics::failed(Role::Initiator, Stage::Kme);
                    tracing::warn!(epoch = %target, error = %e, "the KME gave no key; keeping the current one and retrying");
                    return false;
                }
            }
        }
        let Some(pending) = self.pending.as_mut() else {
            return false;
        };
        if pending.acked {
            return true;
        }
        let request = Request {
            current: self.applied.current().cloned(),
            offer: Some(pending.slot.clone()),
        };
        match self.link.exchange(&request).await {
            Ok(reply) => {
                pending.acked = true;
                self.out_of_step = false;
                tracing::info!(slot = %pending.slot, "the responder holds the key");
                // A late agreement: the responder applied it on receipt; so do we, now.
                let started = self.schedule.start_of(pending.slot.epoch) <= now;
                if started {
                    if self.apply_agreed(now).await.is_some() {
                        return false;
                    }
                } else {
                    self.applied.confirm(reply.current.as_ref());
                }
                true
            }
            Err(e) => {
                self.link_failed(&e, now);
                false
            }
        }
    }

    fn link_failed(&self, error: &PskError, _now: SystemTime) {
        let stage = match error {
            PskError::Skew { .. } => Stage::Skew,
            PskError::Kme(_) => Stage::Kme,
            _ => Stage::Link,
        };
        metrics::failed(Role::Initiator, stage);
        tracing::warn!(error = %error, "the responder did not take the request; retrying");
    }
}
