//! How much to measure: the smoke, quick and full plans.

use std::time::Duration;

use serde::Serialize;

/// Which plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Tiny: checks the scenarios and the path, not the figures (the bench test).
    Smoke,
    /// A reduced set, under 5 minutes for the modes available today.
    Quick,
    /// The full set, under 30 minutes.
    Full,
}

/// Every knob of a run. The same scenario code runs for every plan; only sizes differ.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub profile: Profile,
    /// Rounds; every available mode is measured once per round.
    pub rounds: u32,
    /// HTTP requests before any measurement (warm-up: certificates, pools, caches).
    pub warmup_requests: u64,
    /// How long each throughput run sends.
    #[serde(serialize_with = "secs")]
    pub stream_duration: Duration,
    /// Parallel streams of the multi-stream throughput run.
    pub multi_streams: usize,
    /// How long the TCP round-trip run lasts (one connection, closed loop).
    #[serde(serialize_with = "secs")]
    pub rr_duration: Duration,
    /// Bytes per TCP round trip.
    pub rr_size: usize,
    /// Fixed HTTP request rate (open loop), requests per second.
    pub http_rate: f64,
    /// How long the fixed-rate run lasts.
    #[serde(serialize_with = "secs")]
    pub http_duration: Duration,
    /// Connections the fixed-rate run spreads its requests over.
    pub http_connections: usize,
    /// Request and response body size of every HTTP run.
    pub http_body: usize,
    /// How long the maximum-rate run lasts.
    #[serde(serialize_with = "secs")]
    pub max_duration: Duration,
    /// Connections of the maximum-rate run (closed loop).
    pub max_connections: usize,
    /// Connections opened by the connection-rate run (a count, not a duration:
    /// closed client sockets sit in TIME_WAIT, and a count keeps them far below the
    /// pod's ephemeral port range).
    pub new_connections: u64,
    /// Workers of the connection-rate run.
    pub new_connection_workers: usize,
    /// Open connections of the memory measurement.
    pub held_connections: usize,
    /// Pod counts of the memory-against-pods clusters.
    pub pod_counts: Vec<usize>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    /// The plan of `profile`.
    pub fn new(profile: Profile) -> Self {
        let s = Duration::from_secs_f64;
        match profile {
            Profile::Smoke => Self {
                profile,
                rounds: 1,
                warmup_requests: 20,
                stream_duration: s(0.3),
                multi_streams: 4,
                rr_duration: s(0.3),
                rr_size: 64,
                http_rate: 200.0,
                http_duration: s(0.5),
                http_connections: 4,
                http_body: 1024,
                max_duration: s(0.3),
                max_connections: 4,
                new_connections: 50,
                new_connection_workers: 2,
                held_connections: 20,
                pod_counts: vec![2, 4],
            },
            Profile::Quick => Self {
                profile,
                rounds: 3,
                warmup_requests: 200,
                stream_duration: s(2.0),
                multi_streams: 4,
                rr_duration: s(2.0),
                rr_size: 64,
                http_rate: 1000.0,
                http_duration: s(3.0),
                http_connections: 32,
                http_body: 1024,
                max_duration: s(2.0),
                max_connections: 16,
                new_connections: 2000,
                new_connection_workers: 8,
                held_connections: 1000,
                pod_counts: vec![4, 16, 32],
            },
            Profile::Full => Self {
                profile,
                rounds: 5,
                warmup_requests: 1000,
                stream_duration: s(8.0),
                multi_streams: 4,
                rr_duration: s(8.0),
                rr_size: 64,
                http_rate: 1000.0,
                http_duration: s(10.0),
                http_connections: 32,
                http_body: 1024,
                max_duration: s(8.0),
                max_connections: 16,
                new_connections: 10_000,
                new_connection_workers: 8,
                held_connections: 1000,
                pod_counts: vec![4, 16, 32, 64],
            },
        }
    }

    /// Rough seconds one measurement cell takes beyond bringing a cluster up, for the
    /// progress bar's estimate.
    pub fn cell_seconds(&self) -> f64 {
        2.0 * self.stream_duration.as_secs_f64()
            + self.rr_duration.as_secs_f64()
            + self.http_duration.as_secs_f64()
            + self.max_duration.as_secs_f64()
            + self.new_connections as f64 / 2000.0
            + self.held_connections as f64 / 500.0
            + 3.0
    }
}
