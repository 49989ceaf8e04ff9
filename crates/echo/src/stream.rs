//! Bulk TCP throughput (`ambit-echo stream`): `streams` connections to a discard sink
//! (the server's discard port) send as fast as they can for `duration`, then close
//! their write side and wait for the sink to close: a stream's bytes count once the
//! sink has read them all, so data still sitting in socket buffers along the path is
//! never counted as delivered.
//!
//! Every stream connects first; the clock starts when all are connected and stops when
//! the last one has seen the sink's EOF. `bits_per_second = 8 * bytes / duration_s`.

use std::{io, num::NonZeroUsize, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Barrier,
    task::JoinSet,
    time::Instant,
};

/// A throughput run.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// `host:port` of a discard sink.
    pub addr: String,
    /// Parallel connections.
    pub streams: NonZeroUsize,
    /// How long each stream sends.
    pub duration: Duration,
    /// Bytes per write.
    pub chunk: NonZeroUsize,
    /// Deadline for connecting, and for the sink to close after the last write.
    pub timeout: Duration,
}

/// Why a throughput run could not run.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("duration must be longer than zero")]
    ZeroDuration,
    #[error("timeout must be longer than zero")]
    ZeroTimeout,
    #[error("a stream task failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// The result of a run, printed as JSON by `ambit-echo stream` (a contract: the
/// benchmark parses it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamSummary {
    pub streams: usize,
    /// Bytes the sink consumed, over the streams that completed without error.
    pub bytes: u64,
    /// Bytes per stream, in stream order (0 for a failed stream).
    pub per_stream_bytes: Vec<u64>,
    /// From all streams connected to the last sink EOF.
    pub duration_s: f64,
    pub bits_per_second: f64,
    /// Streams that failed (connect, write, or the sink's EOF did not come).
    pub errors: u64,
    /// Failures by cause.
    pub error_kinds: std::collections::BTreeMap<String, u64>,
}

/// How one stream ended.
#[derive(Debug, thiserror::Error)]
enum OneError {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("write: {0}")]
    Write(#[source] io::Error),
    #[error("waiting for the sink's EOF: {0}")]
    Drain(#[source] io::Error),
    #[error("the sink sent data; it is not a discard sink")]
    NotDiscard,
    #[error("timeout")]
    Timeout,
}

/// Runs the streams and summarizes them; failed streams are counted, not returned.
pub async fn run(config: StreamConfig) -> Result<StreamSummary, StreamError> {
    if config.duration.is_zero() {
        return Err(StreamError::ZeroDuration);
    }
    if config.timeout.is_zero() {
        return Err(StreamError::ZeroTimeout);
    }
    let n = config.streams.get();
    // Every stream waits here once connected (or failed), so sending starts together.
    let ready = std::sync::Arc::new(Barrier::new(n + 1));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let ready = ready.clone();
        let config = config.clone();
        tasks.spawn(async move { (i, one(&config, &ready).await) });
    }
    ready.wait().await;
    let start = Instant::now();
    let mut per_stream_bytes = vec![0; n];
    let mut errors = 0;
    let mut error_kinds = std::collections::BTreeMap::new();
    let mut last = start;
    while let Some(res) = tasks.join_next().await {
        let (i, outcome) = res.map_err(StreamError::Worker)?;
        match outcome {
            Ok((bytes, done)) => {
                per_stream_bytes[i] = bytes;
                last = last.max(done);
            }
            Err(e) => {
                errors += 1;
                *error_kinds.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    let duration_s = last.duration_since(start).as_secs_f64();
    let bytes = per_stream_bytes.iter().sum();
    Ok(StreamSummary {
        streams: n,
        bytes,
        per_stream_bytes,
        duration_s,
        bits_per_second: if duration_s > 0.0 {
            8.0 * bytes as f64 / duration_s
        } else {
            0.0
        },
        errors,
        error_kinds,
    })
}

/// One stream: connect, wait for the others, send for the duration, half-close, wait
/// for the sink's EOF. Returns the bytes sent and when the EOF came.
async fn one(config: &StreamConfig, ready: &Barrier) -> Result<(u64, Instant), OneError> {
    let connected = tokio::time::timeout(config.timeout, TcpStream::connect(&config.addr)).await;
    // Reach the barrier whatever happened, or the others would wait forever.
    ready.wait().await;
    let mut stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(OneError::Connect(e)),
        Err(_) => return Err(OneError::Timeout),
    };
    let chunk = vec![0x5au8; config.chunk.get()];
    let mut sent = 0u64;
    let stop = Instant::now() + config.duration;
    while Instant::now() < stop {
        match tokio::time::timeout_at(stop, stream.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len() as u64,
            Ok(Err(e)) => return Err(OneError::Write(e)),
            // A write cut short at the deadline may have sent part of the chunk;
            // the sink's byte count is not known to us, so count only whole chunks
            // (an undercount of less than one chunk).
            Err(_) => break,
        }
    }
    let drain = async {
        stream.shutdown().await.map_err(OneError::Write)?;
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Ok(0) => Ok(()),
            Ok(_) => Err(OneError::NotDiscard),
            Err(e) => Err(OneError::Drain(e)),
        }
    };
    tokio::time::timeout(config.timeout, drain)
        .await
        .map_err(|_| OneError::Timeout)??;
    Ok((sent, Instant::now()))
}
