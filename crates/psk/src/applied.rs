//! The key in use at one end, the one before it, and whether the other end confirmed
//! the current one. Both ends keep the previous key so that a key the other end never
//! confirmed can be taken back: no key stays in use at one end only for longer than one
//! interval while the link is down.

use std::time::{Duration, SystemTime};

use crate::key::{Psk, Slot};
use crate::metrics::{self, Role, Stage};
use crate::ports::Apply;
use crate::PskError;

struct InUse {
    slot: Slot,
    key: Psk,
    since: SystemTime,
    confirmed: bool,
}

/// What one end has in use.
pub(crate) struct Applied {
    role: Role,
    current: Option<InUse>,
    previous: Option<InUse>,
}

impl Applied {
    pub(crate) fn new(role: Role) -> Self {
        Self {
            role,
            current: None,
            previous: None,
        }
    }

    pub(crate) fn current(&self) -> Option<&Slot> {
        self.current.as_ref().map(|c| &c.slot)
    }

    /// Whether the other end is known to have the current key in use too.
    pub(crate) fn confirmed(&self) -> bool {
        self.current.as_ref().is_none_or(|c| c.confirmed)
    }

    /// The other end reported `theirs` in use: the current key is confirmed if it is that.
    pub(crate) fn confirm(&mut self, theirs: Option<&Slot>) -> bool {
        match &mut self.current {
            Some(current) if Some(&current.slot) == theirs => {
                current.confirmed = true;
                true
            }
            _ => false,
        }
    }

    /// The previous key, if it is `slot` (the other end went back to it).
    pub(crate) fn previous_if(&self, slot: &Slot) -> Option<Psk> {
        self.previous
            .as_ref()
            .filter(|p| &p.slot == slot)
            .map(|p| p.key.clone())
    }

    /// Puts `key` in use; the current key becomes the previous one.
    pub(crate) async fn switch(
        &mut self,
        apply: &dyn Apply,
        slot: Slot,
        key: Psk,
        now: SystemTime,
        confirmed: bool,
    ) -> Result<(), PskError> {
        if let Err(e) = apply.apply(&slot, &key).await {
            metrics::failed(self.role, Stage::Apply);
            tracing::warn!(role = self.role.as_str(), %slot, error = %e, "could not put the preshared key in use");
            return Err(e);
        }
        tracing::info!(role = self.role.as_str(), %slot, "preshared key in use");
        metrics::rotated(self.role, slot.epoch.0);
        let next = InUse {
            slot,
            key,
            since: now,
            confirmed,
        };
        self.previous = self.current.replace(next);
        Ok(())
    }

    /// Goes back to the previous key when the other end has not confirmed the current one
    /// within `interval` of applying it. Returns when that will be due otherwise.
    pub(crate) async fn revert_if_stale(
        &mut self,
        apply: &dyn Apply,
        now: SystemTime,
        interval: Duration,
    ) -> Option<SystemTime> {
        let current = self.current.as_ref()?;
        if current.confirmed || self.previous.is_none() {
            return None;
        }
        let due = current.since + interval;
        if now < due {
            return Some(due);
        }
        let previous = self.previous.take()?;
        let stale = current.slot.clone();
        if let Err(e) = apply.apply(&previous.slot, &previous.key).await {
            metrics::failed(self.role, Stage::Apply);
            tracing::warn!(role = self.role.as_str(), slot = %previous.slot, error = %e, "could not go back to the previous preshared key");
            self.previous = Some(previous);
            return Some(now);
        }
        metrics::failed(self.role, Stage::Revert);
        tracing::warn!(role = self.role.as_str(), %stale, back_to = %previous.slot,
            "the other end never confirmed this key within one interval; back to the previous one");
        self.current = Some(InUse {
            since: now,
            ..previous
        });
        None
    }
}
