//! Readiness as a set of named blockers.
//!
//! A component registers a [`Blocker`] for each thing that must happen before it may
//! take traffic (config synced, certificates issued, capture attached, listeners
//! bound). It is ready when no blocker is left. Dropping a blocker, or calling
//! [`Blocker::unblock`], removes it, so a task that fails before finishing its start-up
//! keeps the component not ready only as long as the blocker lives.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

/// Shared readiness state; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// id → what is still awaited.
    pending: BTreeMap<u64, String>,
}

/// One thing the component still waits for. Unblocks when dropped.
#[derive(Debug)]
#[must_use = "a blocker unblocks as soon as it is dropped"]
pub struct Blocker {
    readiness: Readiness,
    id: u64,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers something that must happen before the component is ready.
    pub fn register(&self, what: impl Into<String>) -> Blocker {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.pending.insert(id, what.into());
        Blocker {
            readiness: self.clone(),
            id,
        }
    }

    /// What is still awaited, in registration order; empty means ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock().pending.values().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().pending.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every critical section is
        // a single insert or remove.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Blocker {
    /// Marks this blocker done.
    pub fn unblock(self) {}
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.readiness.lock().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_blocker_is_gone() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let config = r.register("config");
        let certs = r.register("certificates");
        assert_eq!(r.pending(), vec!["config", "certificates"]);
        config.unblock();
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["certificates"]);
        drop(certs);
        assert!(r.is_ready());
    }
}
