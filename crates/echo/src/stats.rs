//! What one server process answered, counted since it started: served as JSON at
//! `GET /_echo/stats`, so tests can tell which pods a proxy sent requests to (and
//! which never reached a backend at all).
//!
//! Counted: every HTTP echo answer, by status, and every gRPC call, by status code.
//! Not counted: the health, control and stats endpoints themselves.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

/// The counters of one process. Cheap to update from every connection.
#[derive(Debug, Default)]
pub struct Stats {
    counts: Mutex<Counts>,
}

/// A copy of the counters: the JSON body of `GET /_echo/stats` (a contract: tests
/// parse it). Map keys are strings in JSON (`{"http": {"200": 3}}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// HTTP echo answers by status.
    pub http: BTreeMap<u16, u64>,
    /// gRPC calls by status code (`0` = OK, `14` = UNAVAILABLE).
    pub grpc: BTreeMap<u32, u64>,
}

impl Stats {
    fn update(&self, f: impl FnOnce(&mut Counts)) {
        // A counter bump cannot leave the maps torn, so a poisoned lock is still usable.
        f(&mut self.counts.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Counts an HTTP echo answer with `status`.
    pub fn record_http(&self, status: u16) {
        self.update(|c| *c.http.entry(status).or_default() += 1);
    }

    /// Counts a gRPC call answered with `code`.
    pub fn record_grpc(&self, code: u32) {
        self.update(|c| *c.grpc.entry(code).or_default() += 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Counts {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Counts {
    /// HTTP echo answers, any status.
    pub fn http_total(&self) -> u64 {
        self.http.values().sum()
    }

    /// gRPC calls, any status.
    pub fn grpc_total(&self) -> u64 {
        self.grpc.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_as_json() {
        let stats = Stats::default();
        stats.record_http(200);
        stats.record_http(200);
        stats.record_http(503);
        stats.record_grpc(14);
        let counts = stats.snapshot();
        assert_eq!((counts.http_total(), counts.grpc_total()), (3, 1));
        let json = serde_json::to_string(&counts).unwrap();
        assert_eq!(json, r#"{"http":{"200":2,"503":1},"grpc":{"14":1}}"#);
        assert_eq!(serde_json::from_str::<Counts>(&json).unwrap(), counts);
    }
}
