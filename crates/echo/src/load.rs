//! The load client (`ambit-echo load`): `concurrency` workers send requests until a
//! request count or a duration is reached, then one [`Summary`] is returned.
//!
//! - HTTP: each worker keeps one connection (HTTP/1.1 keep-alive, or one h2c
//!   connection) and replaces it after an error or when the server closes it.
//! - TCP: each worker keeps one connection and does round trips of `size` bytes (write
//!   them, read exactly that many back); each round trip counts as a request.
//! - With `new_connection`, every request opens its own connection and closes it
//!   afterwards (connection-rate measurements); connecting is then part of the request.
//!
//! Pacing (`rate`): request `k` (counted across all workers from 0) is scheduled at
//! `start + k / rate`, and the next free worker takes the next slot. If the workers
//! cannot keep up they fall behind the schedule and send back-to-back until they catch
//! up, so the achieved rate is at most `rate` and at most what `concurrency` allows.
//! A paced run is open-loop: latency is measured from a request's *scheduled* slot, so
//! time a request waited for a free worker counts (no coordinated omission). Unpaced,
//! latency is measured from when the request is sent.
//!
//! Latency ends when the last byte of the response (or of the echoed payload) is read;
//! connecting is included only when the request opened its connection under
//! `new_connection`. Only requests that got a response are in the latency figures.

use std::{
    collections::BTreeMap,
    io,
    num::{NonZeroU64, NonZeroUsize},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use http_body_util::BodyExt as _;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
    time::Instant,
};

use crate::{
    POD_HEADER, VERSION_HEADER,
    client::{ClientError, Connection, RequestSpec},
};

/// Highest latency the histogram can hold, in microseconds (one hour); longer values
/// are clamped to it.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// What the load is sent to.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "built once per run; boxing would only add noise"
)]
pub enum LoadTarget {
    Http(RequestSpec),
    Tcp {
        /// `host:port`.
        addr: String,
        /// Bytes per round trip.
        size: NonZeroUsize,
    },
}

/// When the run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this many requests in total.
    Requests(NonZeroU64),
    /// When this much time has passed; requests in flight then are still completed.
    After(Duration),
}

/// A load run; see the module docs for the semantics.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: LoadTarget,
    pub stop: Stop,
    pub concurrency: NonZeroUsize,
    /// Requests per second across all workers; `None` sends as fast as possible.
    pub rate: Option<f64>,
    /// Per request, including connecting when the worker needs a new connection.
    pub timeout: Duration,
    /// Open a fresh connection for every request and close it afterwards.
    pub new_connection: bool,
}

/// Why a load run could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("rate {0} is not a positive number of requests per second")]
    Rate(f64),
    #[error("duration must be longer than zero")]
    ZeroDuration,
    #[error("timeout must be longer than zero")]
    ZeroTimeout,
    #[error("creating the latency histogram")]
    Histogram(#[source] hdrhistogram::CreationError),
    #[error("merging latency histograms")]
    MergeHistogram(#[source] hdrhistogram::AdditionError),
    #[error("a load worker failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// The result of a run, printed as JSON by `ambit-echo load` (a contract: scripts and
/// tests parse it).
///
/// For HTTP, `requests = errors + sum(status)`; for TCP, `requests = ok + errors` (a
/// round trip whose echo differs counts as an error of kind `mismatch: ...`).
/// `by_pod` and `by_version` count responses carrying `x-echo-pod` / `x-echo-version`
/// (so they are empty in TCP mode and miss answers not produced by an echo server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    /// HTTP status < 400, or TCP round trips that echoed the payload exactly.
    pub ok: u64,
    /// Requests that got no response: connect, timeout or I/O failures.
    pub errors: u64,
    /// Responses by HTTP status code (keys are strings in JSON: `"200"`).
    pub status: BTreeMap<u16, u64>,
    pub by_pod: BTreeMap<String, u64>,
    pub by_version: BTreeMap<String, u64>,
    /// Errors by cause, e.g. `"connect: Connection refused (os error 111)"`, `"timeout"`.
    pub error_kinds: BTreeMap<String, u64>,
    pub latency_ms: Latency,
    /// Wall time of the whole run.
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub rps: f64,
    /// Connections opened (successful connects).
    #[serde(default)]
    pub connections: u64,
    /// Whether latency was measured from each request's scheduled slot (paced runs)
    /// rather than from when it was sent.
    #[serde(default)]
    pub latency_from_schedule: bool,
}

/// Latency of requests that got a response, in milliseconds (microsecond resolution);
/// all zero when none did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Counts kept by one worker, merged at the end so workers never contend.
#[derive(Debug)]
struct Tally {
    requests: u64,
    connections: u64,
    ok: u64,
    errors: u64,
    status: BTreeMap<u16, u64>,
    by_pod: BTreeMap<String, u64>,
    by_version: BTreeMap<String, u64>,
    error_kinds: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

/// The schedule the workers share.
#[derive(Debug)]
struct Schedule {
    start: Instant,
    next: AtomicU64,
    limit: Option<u64>,
    deadline: Option<Instant>,
    rate: Option<f64>,
}

/// One HTTP response as the load client records it.
#[derive(Debug)]
struct HttpOutcome {
    status: u16,
    pod: Option<String>,
    version: Option<String>,
    latency: Duration,
}

/// How a worker handles its connection.
#[derive(Clone, Copy, Debug)]
struct WorkerOpts {
    timeout: Duration,
    new_connection: bool,
}

/// Why a TCP round trip failed.
#[derive(Debug, thiserror::Error)]
enum TcpError {
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("echo round trip")]
    Io(#[source] io::Error),
}

/// Runs the load and summarizes it. Failed requests are counted, not returned as errors.
pub async fn run(config: LoadConfig) -> Result<Summary, LoadError> {
    if let Some(rate) = config.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(LoadError::Rate(rate));
    }
    if config.stop == Stop::After(Duration::ZERO) {
        return Err(LoadError::ZeroDuration);
    }
    if config.timeout.is_zero() {
        return Err(LoadError::ZeroTimeout);
    }

    let start = Instant::now();
    let schedule = Arc::new(Schedule {
        start,
        next: AtomicU64::new(0),
        limit: match config.stop {
            Stop::Requests(n) => Some(n.get()),
            Stop::After(_) => None,
        },
        deadline: match config.stop {
            Stop::Requests(_) => None,
            Stop::After(d) => Some(start + d),
        },
        rate: config.rate,
    });

    let opts = WorkerOpts {
        timeout: config.timeout,
        new_connection: config.new_connection,
    };
    let mut workers = JoinSet::new();
    for _ in 0..config.concurrency.get() {
        let tally = Tally::new()?;
        let schedule = schedule.clone();
        match &config.target {
            LoadTarget::Http(spec) => {
                workers.spawn(http_worker(spec.clone(), schedule, opts, tally));
            }
            LoadTarget::Tcp { addr, size } => {
                workers.spawn(tcp_worker(addr.clone(), *size, schedule, opts, tally));
            }
        }
    }
    let mut total = Tally::new()?;
    while let Some(res) = workers.join_next().await {
        total.merge(res.map_err(LoadError::Worker)?)?;
    }
    let mut summary = total.summary(start.elapsed());
    summary.latency_from_schedule = config.rate.is_some();
    Ok(summary)
}

/// A claimed request slot.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// When the request was scheduled (pacing), else `None`.
    scheduled: Option<Instant>,
}

impl Schedule {
    /// Claims the next request slot and waits for its time when pacing; `None` once
    /// the run is over.
    async fn next_slot(&self) -> Option<Slot> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|n| k >= n) {
            return None;
        }
        let mut scheduled = None;
        if let Some(rate) = self.rate {
            let at = self.start + Duration::from_secs_f64(k as f64 / rate);
            if self.deadline.is_some_and(|d| at >= d) {
                return None;
            }
            tokio::time::sleep_until(at).await;
            scheduled = Some(at);
        }
        self.deadline
            .is_none_or(|d| Instant::now() < d)
            .then_some(Slot { scheduled })
    }
}

impl Slot {
    /// The latency to record for a request that took `measured` from being sent to
    /// its last byte at `done`: when pacing, from the scheduled slot instead (the
    /// open-loop view, which counts time spent waiting for a free worker).
    fn latency(self, measured: Duration, done: Instant) -> Duration {
        match self.scheduled {
            Some(at) => done.saturating_duration_since(at).max(measured),
            None => measured,
        }
    }
}

impl Tally {
    fn new() -> Result<Self, LoadError> {
        Ok(Self {
            requests: 0,
            connections: 0,
            ok: 0,
            errors: 0,
            status: BTreeMap::new(),
            by_pod: BTreeMap::new(),
            by_version: BTreeMap::new(),
            error_kinds: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .map_err(LoadError::Histogram)?,
        })
    }

    fn record_latency(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // The histogram's lowest value is 1 µs; faster answers count as 1 µs.
        self.latency.saturating_record(us.max(1));
    }

    fn http(&mut self, outcome: HttpOutcome) {
        self.requests += 1;
        if outcome.status < 400 {
            self.ok += 1;
        }
        *self.status.entry(outcome.status).or_default() += 1;
        if let Some(pod) = outcome.pod {
            *self.by_pod.entry(pod).or_default() += 1;
        }
        if let Some(version) = outcome.version {
            *self.by_version.entry(version).or_default() += 1;
        }
        self.record_latency(outcome.latency);
    }

    fn tcp_ok(&mut self, latency: Duration) {
        self.requests += 1;
        self.ok += 1;
        self.record_latency(latency);
    }

    fn error(&mut self, kind: String) {
        self.requests += 1;
        self.errors += 1;
        *self.error_kinds.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) -> Result<(), LoadError> {
        fn add<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
            for (k, n) in from {
                *into.entry(k).or_default() += n;
            }
        }
        self.requests += other.requests;
        self.connections += other.connections;
        self.ok += other.ok;
        self.errors += other.errors;
        add(&mut self.status, other.status);
        add(&mut self.by_pod, other.by_pod);
        add(&mut self.by_version, other.by_version);
        add(&mut self.error_kinds, other.error_kinds);
        self.latency
            .add(&other.latency)
            .map_err(LoadError::MergeHistogram)
    }

    fn summary(self, elapsed: Duration) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &self.latency;
        let latency_ms = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.50)),
                p90: ms(h.value_at_quantile(0.90)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
                mean: h.mean() / 1000.0,
            }
        };
        let duration_s = elapsed.as_secs_f64();
        Summary {
            requests: self.requests,
            ok: self.ok,
            errors: self.errors,
            status: self.status,
            by_pod: self.by_pod,
            by_version: self.by_version,
            error_kinds: self.error_kinds,
            latency_ms,
            duration_s,
            rps: if duration_s > 0.0 {
                self.requests as f64 / duration_s
            } else {
                0.0
            },
            connections: self.connections,
            latency_from_schedule: false,
        }
    }
}

async fn http_worker(
    spec: RequestSpec,
    schedule: Arc<Schedule>,
    opts: WorkerOpts,
    mut tally: Tally,
) -> Tally {
    let mut conn = None;
    while let Some(slot) = schedule.next_slot().await {
        let result = tokio::time::timeout(
            opts.timeout,
            http_once(
                &spec,
                &mut conn,
                opts.new_connection,
                &mut tally.connections,
            ),
        )
        .await;
        match result {
            Ok(Ok(mut outcome)) => {
                outcome.latency = slot.latency(outcome.latency, Instant::now());
                tally.http(outcome);
            }
            Ok(Err(e)) => {
                conn = None;
                tally.error(e.kind());
            }
            Err(_) => {
                // The connection may still carry the late response; start afresh.
                conn = None;
                tally.error(ClientError::Timeout(opts.timeout).kind());
            }
        }
        if opts.new_connection {
            conn = None;
        }
    }
    tally
}

async fn http_once(
    spec: &RequestSpec,
    conn: &mut Option<Connection>,
    new_connection: bool,
    connections: &mut u64,
) -> Result<HttpOutcome, ClientError> {
    // A kept-alive connection the server has closed is replaced without counting an
    // error: that is connection management, not a failed request.
    if let Some(c) = conn.as_mut()
        && c.ready().await.is_err()
    {
        *conn = None;
    }
    // Under new_connection, connecting is part of the request.
    let started = Instant::now();
    let c = match conn {
        Some(c) => c,
        None => {
            let c = Connection::connect(spec.connect_addr(), spec.protocol()).await?;
            *connections += 1;
            conn.insert(c)
        }
    };
    let started = if new_connection {
        started
    } else {
        Instant::now()
    };
    let resp = c.send(spec.request()).await?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let pod = header(POD_HEADER);
    let version = header(VERSION_HEADER);
    let status = resp.status().as_u16();
    // Read the body to the end so the connection can carry the next request.
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(ClientError::Body)?;
    }
    Ok(HttpOutcome {
        status,
        pod,
        version,
        latency: started.elapsed(),
    })
}

async fn tcp_worker(
    addr: String,
    size: NonZeroUsize,
    schedule: Arc<Schedule>,
    opts: WorkerOpts,
    mut tally: Tally,
) -> Tally {
    let payload = random_payload(size.get());
    let mut echoed = vec![0u8; size.get()];
    let mut conn = None;
    while let Some(slot) = schedule.next_slot().await {
        let result = tokio::time::timeout(
            opts.timeout,
            tcp_once(
                &addr,
                &payload,
                &mut echoed,
                &mut conn,
                opts.new_connection,
                &mut tally.connections,
            ),
        )
        .await;
        let done = Instant::now();
        if opts.new_connection {
            // Dropping the stream closes it; the echo server closes its side on EOF.
            conn = None;
        }
        match result {
            Ok(Ok(latency)) if echoed == payload => {
                tally.tcp_ok(slot.latency(latency, done));
            }
            Ok(Ok(_)) => {
                // The stream is out of step with our payloads now; start afresh.
                conn = None;
                tally.error("mismatch: echoed bytes differ from those sent".to_owned());
            }
            Ok(Err(e)) => {
                conn = None;
                tally.error(e.kind());
            }
            Err(_) => {
                conn = None;
                tally.error(ClientError::Timeout(opts.timeout).kind());
            }
        }
    }
    tally
}

async fn tcp_once(
    addr: &str,
    payload: &[u8],
    echoed: &mut [u8],
    conn: &mut Option<TcpStream>,
    new_connection: bool,
    connections: &mut u64,
) -> Result<Duration, TcpError> {
    // Under new_connection, connecting is part of the request.
    let connect_started = Instant::now();
    let stream = match conn {
        Some(s) => s,
        None => {
            let connect_err = |source| TcpError::Connect {
                addr: addr.to_owned(),
                source,
            };
            let s = TcpStream::connect(addr).await.map_err(connect_err)?;
            s.set_nodelay(true).map_err(connect_err)?;
            *connections += 1;
            conn.insert(s)
        }
    };
    let started = if new_connection {
        connect_started
    } else {
        Instant::now()
    };
    let (mut rd, mut wr) = stream.split();
    // Write and read at once: a payload larger than the socket buffers would otherwise
    // deadlock against a server that echoes as it reads.
    tokio::try_join!(wr.write_all(payload), rd.read_exact(echoed)).map_err(TcpError::Io)?;
    Ok(started.elapsed())
}

fn random_payload(size: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size];
    rand::rng().fill(&mut payload[..]);
    payload
}

impl TcpError {
    fn kind(&self) -> String {
        match self {
            Self::Connect { source, .. } => format!("connect: {source}"),
            Self::Io(source) => format!("io: {source}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_and_summarize() {
        let mut a = Tally::new().unwrap();
        a.http(HttpOutcome {
            status: 200,
            pod: Some("p-0".into()),
            version: Some("v1".into()),
            latency: Duration::from_millis(2),
        });
        a.error("timeout".into());
        let mut b = Tally::new().unwrap();
        b.http(HttpOutcome {
            status: 503,
            pod: Some("p-0".into()),
            version: None,
            latency: Duration::from_millis(4),
        });
        a.merge(b).unwrap();
        let s = a.summary(Duration::from_secs(2));
        assert_eq!((s.requests, s.ok, s.errors), (3, 1, 1));
        assert_eq!(s.status, BTreeMap::from([(200, 1), (503, 1)]));
        assert_eq!(s.by_pod, BTreeMap::from([("p-0".to_owned(), 2)]));
        assert_eq!(s.by_version, BTreeMap::from([("v1".to_owned(), 1)]));
        assert_eq!(s.error_kinds, BTreeMap::from([("timeout".to_owned(), 1)]));
        assert!((s.latency_ms.max - 4.0).abs() < 0.01, "{:?}", s.latency_ms);
        assert!((s.latency_ms.mean - 3.0).abs() < 0.01, "{:?}", s.latency_ms);
        assert!((s.rps - 1.5).abs() < f64::EPSILON);
    }

    #[test]
    fn summary_json_has_the_documented_shape() {
        let mut t = Tally::new().unwrap();
        t.http(HttpOutcome {
            status: 200,
            pod: Some("payment-v1-0".into()),
            version: Some("v1".into()),
            latency: Duration::from_micros(1500),
        });
        let json = serde_json::to_value(t.summary(Duration::from_secs(1))).unwrap();
        assert_eq!(json["status"]["200"], 1);
        assert_eq!(json["by_pod"]["payment-v1-0"], 1);
        for key in [
            "requests",
            "ok",
            "errors",
            "error_kinds",
            "duration_s",
            "rps",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        for key in ["p50", "p90", "p99", "max", "mean"] {
            assert!(
                json["latency_ms"][key].is_f64(),
                "latency_ms.{key} in {json}"
            );
        }
    }

    #[test]
    fn paced_latency_counts_from_the_scheduled_slot() {
        let at = Instant::now();
        let done = at + Duration::from_millis(10);
        let measured = Duration::from_millis(1);
        let paced = Slot {
            scheduled: Some(at),
        };
        assert_eq!(paced.latency(measured, done), Duration::from_millis(10));
        // Never below what was measured (a slot in the future cannot shorten it).
        let early = Slot {
            scheduled: Some(done),
        };
        assert_eq!(early.latency(measured, done), measured);
        let unpaced = Slot { scheduled: None };
        assert_eq!(unpaced.latency(measured, done), measured);
    }

    #[tokio::test]
    async fn invalid_configs_are_rejected() {
        let config = |rate, stop, timeout| LoadConfig {
            target: LoadTarget::Tcp {
                addr: "127.0.0.1:9".into(),
                size: NonZeroUsize::MIN,
            },
            stop,
            concurrency: NonZeroUsize::MIN,
            rate,
            timeout,
            new_connection: false,
        };
        let one = Stop::Requests(NonZeroU64::MIN);
        let sec = Duration::from_secs(1);
        assert!(matches!(
            run(config(Some(0.0), one, sec)).await,
            Err(LoadError::Rate(_))
        ));
        assert!(matches!(
            run(config(Some(f64::NAN), one, sec)).await,
            Err(LoadError::Rate(_))
        ));
        assert!(matches!(
            run(config(None, Stop::After(Duration::ZERO), sec)).await,
            Err(LoadError::ZeroDuration)
        ));
        assert!(matches!(
            run(config(None, one, Duration::ZERO)).await,
            Err(LoadError::ZeroTimeout)
        ));
    }
}
