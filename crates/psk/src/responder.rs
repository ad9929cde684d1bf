//! The responding end: fetches each offered key from its own KME by ID, holds it, and puts
//! it in use when its epoch starts on this end's clock, or at once when the offer comes
//! late. It follows the initiator: when a request reports a key in use that this end
//! holds, this end switches to it, so both ends converge on every contact.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::applied::Applied;
use crate::key::{Psk, Slot};
use crate::metrics::{self, Role, Stage};
use crate::ports::{Apply, KeySource, Reply, Request};
use crate::schedule::{Epoch, Schedule};
use crate::PskError;

/// The responding end's state.
pub struct Responder {
    schedule: Schedule,
    kme: Arc<dyn KeySource>,
    apply: Arc<dyn Apply>,
    applied: Applied,
    /// Keys fetched for epochs, not yet in use (one per epoch: a newer offer replaces it).
    held: BTreeMap<Epoch, (Slot, Psk)>,
}

impl Responder {
    /// A responder with nothing in use or held.
    pub fn new(schedule: Schedule, kme: Arc<dyn KeySource>, apply: Arc<dyn Apply>) -> Self {
        Self {
            schedule,
            kme,
            apply,
            applied: Applied::new(Role::Responder),
            held: BTreeMap::new(),
        }
    }

    /// The key in use here.
    pub fn current(&self) -> Option<&Slot> {
        self.applied.current()
    }

    /// Handles one request from the initiator at `now`.
    pub async fn handle(&mut self, request: Request, now: SystemTime) -> Result<Reply, PskError> {
        if let Some(offer) = request.offer {
            self.hold(offer, now).await?;
        }
        if let Some(theirs) = &request.current {
            self.follow(theirs, now).await;
        }
        self.tick(now).await;
        Ok(Reply {
            current: self.applied.current().cloned(),
        })
    }

    /// Applies the key of an epoch that has started, and takes back a key the initiator
    /// never confirmed; returns when to tick again.
    pub async fn tick(&mut self, now: SystemTime) -> SystemTime {
        let epoch = self.schedule.epoch_at(now);
        let mut wake = self.schedule.start_of(Epoch(epoch.0 + 1));
        let newest_due = self.held.range(..=epoch).next_back().map(|(e, _)| *e);
        if let Some(due) = newest_due {
            let newer = self.applied.current().is_none_or(|c| c.epoch <= due);
            if newer {
                if let Some((slot, key)) = self.held.remove(&due) {
                    if self
                        .applied
                        .switch(&*self.apply, slot.clone(), key.clone(), now, false)
                        .await
                        .is_err()
                    {
                        self.held.insert(due, (slot, key));
                        wake = wake.min(now + self.schedule.interval() / 20);
                    }
                }
            }
        }
        if let Some(at) = self
            .applied
            .revert_if_stale(&*self.apply, now, self.schedule.interval())
            .await
        {
            wake = wake.min(at);
        }
        // Keys for epochs that can no longer come are dropped (and zeroised).
        let floor = Epoch(epoch.0.saturating_sub(1));
        self.held.retain(|e, _| *e >= floor);
        wake.max(now)
    }

    async fn hold(&mut self, offer: Slot, now: SystemTime) -> Result<(), PskError> {
        if !self.schedule.plausible(offer.epoch, now) {
            metrics::failed(Role::Responder, Stage::Skew);
            let ours = self.schedule.epoch_at(now);
            tracing::warn!(slot = %offer, ours = %ours, "refused an offer outside the tolerated clock skew");
            return Err(PskError::Skew {
                offered: offer.epoch,
                ours,
            });
        }
        let already = self
            .held
            .get(&offer.epoch)
            .is_some_and(|(s, _)| s == &offer)
            || self.applied.current() == Some(&offer);
        if already {
            return Ok(());
        }
        let key = self.kme.key_by_id(&offer.key_ID).await.inspect_err(|e| {
            metrics::failed(Role::Responder, Stage::Kme);
            tracing::warn!(slot = %offer, error = %e, "the KME did not give the offered key");
        })?;
        tracing::info!(slot = %offer, "holding the offered key");
        self.held.insert(offer.epoch, (offer, key));
        Ok(())
    }

    /// The initiator has `theirs` in use: confirm ours, or switch to theirs if held.
    async fn follow(&mut self, theirs: &Slot, now: SystemTime) {
        if self.applied.confirm(Some(theirs)) {
            return;
        }
        let key = match self.held.get(&theirs.epoch) {
            Some((slot, key)) if slot == theirs => Some(key.clone()),
            _ => self.applied.previous_if(theirs),
        };
        let Some(key) = key else {
            // Not ours to follow (we restarted, or it is older): the reply tells the initiator.
            return;
        };
        if self
            .applied
            .switch(&*self.apply, theirs.clone(), key, now, true)
            .await
            .is_ok()
        {
            self.held.remove(&theirs.epoch);
        }
    }
}
