//! Many idle connections (`ambit-echo hold`): open `connections` TCP connections to an
//! echo server, prove each one end to end with a one-byte round trip, report, and keep
//! them open until told to stop. Used to measure the memory of whatever sits on the
//! path per open connection.
//!
//! The binary prints one JSON [`HoldReport`] line once every connection is open (or
//! failed), then holds them until its stdin reaches EOF or it gets SIGTERM/SIGINT.

use std::{collections::BTreeMap, io, num::NonZeroUsize, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Semaphore,
    task::JoinSet,
    time::Instant,
};

/// What to open.
#[derive(Clone, Debug)]
pub struct HoldConfig {
    /// `host:port` of a TCP echo server.
    pub addr: String,
    pub connections: NonZeroUsize,
    /// Connections being opened at the same time.
    pub parallel: NonZeroUsize,
    /// Deadline for connecting plus the round trip, per connection.
    pub timeout: Duration,
}

/// The open connections; dropping this closes them.
#[derive(Debug)]
pub struct Held {
    pub report: HoldReport,
    streams: Vec<TcpStream>,
}

/// What `ambit-echo hold` prints once the connections are open (a contract: the
/// benchmark parses it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Connections open and proven by a round trip.
    pub open: u64,
    /// Connections that failed.
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Time to open them all.
    pub open_s: f64,
}

/// Why the run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("timeout must be longer than zero")]
    ZeroTimeout,
    #[error("a connection task failed")]
    Worker(#[source] tokio::task::JoinError),
}

#[derive(Debug, thiserror::Error)]
enum OneError {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("round trip: {0}")]
    Io(#[source] io::Error),
    #[error("the server echoed a different byte")]
    Mismatch,
    #[error("timeout")]
    Timeout,
}

/// Opens the connections; failures are counted in the report.
pub async fn open(config: HoldConfig) -> Result<Held, HoldError> {
    if config.timeout.is_zero() {
        return Err(HoldError::ZeroTimeout);
    }
    let start = Instant::now();
    let permits = Arc::new(Semaphore::new(config.parallel.get()));
    let mut tasks = JoinSet::new();
    for _ in 0..config.connections.get() {
        let permits = permits.clone();
        let addr = config.addr.clone();
        let timeout = config.timeout;
        tasks.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await;
            tokio::time::timeout(timeout, one(&addr))
                .await
                .unwrap_or(Err(OneError::Timeout))
        });
    }
    let mut streams = Vec::with_capacity(config.connections.get());
    let mut error_kinds = BTreeMap::new();
    while let Some(res) = tasks.join_next().await {
        match res.map_err(HoldError::Worker)? {
            Ok(s) => streams.push(s),
            Err(e) => *error_kinds.entry(e.to_string()).or_default() += 1,
        }
    }
    Ok(Held {
        report: HoldReport {
            open: streams.len() as u64,
            errors: error_kinds.values().sum(),
            error_kinds,
            open_s: start.elapsed().as_secs_f64(),
        },
        streams,
    })
}

impl Held {
    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

async fn one(addr: &str) -> Result<TcpStream, OneError> {
    let mut s = TcpStream::connect(addr).await.map_err(OneError::Connect)?;
    s.set_nodelay(true).map_err(OneError::Connect)?;
    s.write_all(b"h").await.map_err(OneError::Io)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.map_err(OneError::Io)?;
    if &b != b"h" {
        return Err(OneError::Mismatch);
    }
    Ok(s)
}
