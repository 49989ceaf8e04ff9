//! In-process tests: a real server on 127.0.0.1:0 driven by the library's own clients.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    net::SocketAddr,
    num::{NonZeroU64, NonZeroUsize},
    time::{Duration, Instant},
};

use ambit_echo::{
    call::{self, CallConfig, CallResponse},
    client::{HeaderArg, Protocol, RequestSpec, Target},
    hold::{self, HoldConfig},
    load::{self, LoadConfig, LoadTarget, Stop, Summary},
    serve::{self, Faults, Identity, ServeConfig},
    stream::{self, StreamConfig},
};
use ambit_test_support::eventually_async;
use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, StatusCode, Version};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};

const POD: &str = "echo-v2-0";
const NAMESPACE: &str = "shop";
const VERSION: &str = "v2";

/// A running server; stops when dropped (also when a test fails).
struct Server {
    http: SocketAddr,
    tcp: SocketAddr,
    discard: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(faults: Faults) -> Self {
        Self::start_with_drain(faults, Duration::from_secs(5)).await
    }

    async fn start_with_drain(faults: Faults, drain_timeout: Duration) -> Self {
        let bound = serve::bind(ServeConfig {
            identity: Identity {
                pod: POD.into(),
                namespace: NAMESPACE.into(),
                version: VERSION.into(),
            },
            http_addr: "127.0.0.1:0".parse().unwrap(),
            tcp_addr: "127.0.0.1:0".parse().unwrap(),
            discard_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            faults,
            drain_timeout,
        })
        .await
        .unwrap();
        let (http, tcp, discard) = (bound.http_addr, bound.tcp_addr, bound.discard_addr);
        assert_ne!(http.port(), 0);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(stopped));
        Self {
            http,
            tcp,
            discard,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> Target {
        format!("http://{}{path}", self.http).parse().unwrap()
    }

    /// Asks the server to stop and returns its task, which ends once drained.
    fn shutdown(&mut self) -> &mut JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        &mut self.task
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spec(
    target: &Target,
    protocol: Protocol,
    method: Method,
    headers: &[&str],
    body: &str,
) -> RequestSpec {
    let headers = headers.iter().map(|h| h.parse::<HeaderArg>().unwrap());
    RequestSpec::new(
        target,
        protocol,
        method,
        headers,
        Bytes::from(body.to_owned()),
    )
    .unwrap()
}

async fn request(
    target: &Target,
    protocol: Protocol,
    method: Method,
    headers: &[&str],
    body: &str,
) -> CallResponse {
    call::run(CallConfig {
        request: spec(target, protocol, method, headers, body),
        timeout: Duration::from_secs(10),
    })
    .await
    .unwrap()
}

async fn get(target: &Target, headers: &[&str]) -> CallResponse {
    request(target, Protocol::Http1, Method::GET, headers, "").await
}

fn json(resp: &CallResponse) -> Value {
    serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&resp.body)
        )
    })
}

async fn load_run(target: LoadTarget, n: u64, concurrency: usize) -> Summary {
    load::run(LoadConfig {
        target,
        stop: Stop::Requests(NonZeroU64::new(n).unwrap()),
        concurrency: NonZeroUsize::new(concurrency).unwrap(),
        rate: None,
        timeout: Duration::from_secs(10),
        new_connection: false,
    })
    .await
    .unwrap()
}

async fn check_echo(protocol: Protocol, protocol_name: &str) {
    let server = Server::start(Faults::default()).await;
    let target = server.url("/hello/world?x=1&y=2");
    let resp = request(
        &target,
        protocol,
        Method::POST,
        &["x-test: a", "x-multi: 1", "x-multi: 2"],
        "abcdef",
    )
    .await;

    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers["content-type"], "application/json");
    assert_eq!(resp.headers["x-echo-pod"], POD);
    assert_eq!(resp.headers["x-echo-version"], VERSION);
    let body = json(&resp);
    assert_eq!(body["pod"], POD, "{body}");
    assert_eq!(body["namespace"], NAMESPACE, "{body}");
    assert_eq!(body["version"], VERSION, "{body}");
    assert_eq!(body["method"], "POST", "{body}");
    assert_eq!(body["path"], "/hello/world?x=1&y=2", "{body}");
    assert_eq!(body["protocol"], protocol_name, "{body}");
    assert_eq!(body["body_bytes"], 6, "{body}");
    assert_eq!(body["headers"]["x-test"], "a", "{body}");
    assert_eq!(body["headers"]["x-multi"], "1, 2", "{body}");
    assert_eq!(body["authority"], server.http.to_string(), "{body}");
    let peer: SocketAddr = body["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), server.http.ip(), "{body}");
    assert_ne!(
        peer.port(),
        server.http.port(),
        "peer must be the client side: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_answer_describes_the_request() {
    check_echo(Protocol::Http1, "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_answer_describes_the_request() {
    check_echo(Protocol::Http2, "HTTP/2.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_response_is_http2() {
    let server = Server::start(Faults::default()).await;
    let resp = request(&server.url("/"), Protocol::Http2, Method::GET, &[], "").await;
    assert_eq!(resp.version, Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_status_and_delay_are_honoured() {
    let server = Server::start(Faults::default()).await;
    let resp = get(&server.url("/"), &["x-echo-status: 503"]).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&resp)["pod"], POD, "the body is still the echo JSON");

    let delay = Duration::from_millis(200);
    let started = Instant::now();
    let resp = get(
        &server.url("/"),
        &["x-echo-delay-ms: 200", "x-echo-status: 201"],
    )
    .await;
    assert_eq!(resp.status, StatusCode::CREATED);
    // A lower bound only: the server must not answer before the delay.
    assert!(
        started.elapsed() >= delay,
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_control_headers_are_rejected_naming_the_header() {
    let server = Server::start(Faults::default()).await;
    for (header, value) in [
        ("x-echo-status", "abc"),
        ("x-echo-status", "99"),
        ("x-echo-status", "600"),
        ("x-echo-delay-ms", "-5"),
        ("x-echo-delay-ms", "soon"),
    ] {
        let resp = get(&server.url("/"), &[&format!("{header}: {value}")]).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{header}: {value}");
        let body = json(&resp);
        assert_eq!(body["header"], header, "{body}");
        assert!(body["error"].as_str().unwrap().contains(header), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_rate_applies_and_is_changed_at_run_time() {
    let server = Server::start(Faults::new(1.0, 500).unwrap()).await;
    let http = |n| {
        load_run(
            LoadTarget::Http(spec(
                &server.url("/"),
                Protocol::Http1,
                Method::GET,
                &[],
                "",
            )),
            n,
            2,
        )
    };

    let s = http(20).await;
    assert_eq!(s.status.get(&500), Some(&20), "{s:?}");
    assert_eq!((s.ok, s.errors), (0, 0), "{s:?}");

    // Health is never subject to injected failures.
    let health = get(&server.url("/_echo/health"), &[]).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body, "ok");

    let control = server.url("/_echo/control");
    let current = json(&get(&control, &[]).await);
    assert_eq!(
        current,
        serde_json::json!({"fail_rate": 1.0, "fail_status": 500})
    );

    let resp = request(
        &control,
        Protocol::Http1,
        Method::POST,
        &[],
        r#"{"fail_rate": 0.0}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        json(&resp),
        serde_json::json!({"fail_rate": 0.0, "fail_status": 500})
    );
    let s = http(20).await;
    assert_eq!(s.status.get(&200), Some(&20), "{s:?}");
    assert_eq!(s.ok, 20, "{s:?}");

    let resp = request(
        &control,
        Protocol::Http2,
        Method::POST,
        &[],
        r#"{"fail_rate": 1, "fail_status": 502}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    let s = http(10).await;
    assert_eq!(s.status.get(&502), Some(&10), "{s:?}");

    for (body, field) in [
        (r#"{"fail_rate": 1.5}"#, "fail_rate"),
        (r#"{"fail_rate": "half"}"#, "fail_rate"),
        (r#"{"fail_status": 99}"#, "fail_status"),
        (r#"{"fail_status": 500.5}"#, "fail_status"),
        (r#"{"fail_ratio": 0.5}"#, "fail_ratio"),
    ] {
        let resp = request(&control, Protocol::Http1, Method::POST, &[], body).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(json(&resp)["field"], field, "{body}");
    }
    let resp = request(&control, Protocol::Http1, Method::POST, &[], "{not json").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    // Rejected updates change nothing.
    let current = json(&get(&control, &[]).await);
    assert_eq!(
        current,
        serde_json::json!({"fail_rate": 1.0, "fail_status": 502})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_returns_exactly_the_bytes_sent() {
    let server = Server::start(Faults::default()).await;
    let sent: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let stream = TcpStream::connect(server.tcp).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        })
    };
    let mut echoed = Vec::new();
    // read_to_end only returns once the server closed its write half after our EOF.
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut echoed))
        .await
        .expect("echo did not finish")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_counts_by_status_pod_and_version() {
    let server = Server::start(Faults::new(0.5, 503).unwrap()).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let target = LoadTarget::Http(spec(
            &server.url("/load"),
            protocol,
            Method::GET,
            &["x-load: 1"],
            "",
        ));
        let s = load_run(target, 200, 4).await;
        let ok = s.status.get(&200).copied().unwrap_or(0);
        let failed = s.status.get(&503).copied().unwrap_or(0);
        assert!(ok > 0 && failed > 0, "{protocol:?}: {s:?}");
        assert_eq!(ok + failed, 200, "{protocol:?}: {s:?}");
        assert_eq!(
            (s.requests, s.ok, s.errors),
            (200, ok, 0),
            "{protocol:?}: {s:?}"
        );
        assert_eq!(s.by_pod.get(POD), Some(&200), "{protocol:?}: {s:?}");
        assert_eq!(s.by_version.get(VERSION), Some(&200), "{protocol:?}: {s:?}");
        assert!(s.error_kinds.is_empty(), "{protocol:?}: {s:?}");
        let l = s.latency_ms;
        assert!(
            l.p50 > 0.0 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max,
            "{l:?}"
        );
        assert!(s.duration_s > 0.0 && s.rps > 0.0, "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_in_tcp_mode_counts_round_trips() {
    let server = Server::start(Faults::default()).await;
    let target = LoadTarget::Tcp {
        addr: server.tcp.to_string(),
        size: NonZeroUsize::new(100_000).unwrap(),
    };
    let s = load_run(target, 60, 3).await;
    assert_eq!((s.requests, s.ok, s.errors), (60, 60, 0), "{s:?}");
    assert!(
        s.status.is_empty() && s.by_pod.is_empty() && s.by_version.is_empty(),
        "{s:?}"
    );
    assert!(s.latency_ms.max > 0.0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_counts_connection_failures_as_errors() {
    let closed = closed_port();
    let http: Target = format!("http://{closed}/").parse().unwrap();
    let s = load_run(
        LoadTarget::Http(spec(&http, Protocol::Http1, Method::GET, &[], "")),
        5,
        2,
    )
    .await;
    assert_eq!((s.requests, s.ok, s.errors), (5, 0, 5), "{s:?}");
    assert_eq!(s.error_kinds.len(), 1, "{s:?}");
    let (kind, n) = s.error_kinds.iter().next().unwrap();
    assert!(kind.starts_with("connect: "), "{kind}");
    assert_eq!(*n, 5);
    assert_eq!(s.latency_ms, load::Latency::default());

    let tcp = LoadTarget::Tcp {
        addr: closed.to_string(),
        size: NonZeroUsize::MIN,
    };
    let s = load_run(tcp, 3, 1).await;
    assert_eq!((s.requests, s.ok, s.errors), (3, 0, 3), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_timeouts_are_counted() {
    let server = Server::start(Faults::default()).await;
    let target = LoadTarget::Http(spec(
        &server.url("/"),
        Protocol::Http1,
        Method::GET,
        &["x-echo-delay-ms: 5000"],
        "",
    ));
    let s = load::run(LoadConfig {
        target,
        stop: Stop::Requests(NonZeroU64::new(2).unwrap()),
        concurrency: NonZeroUsize::new(2).unwrap(),
        rate: None,
        timeout: Duration::from_millis(100),
        new_connection: false,
    })
    .await
    .unwrap();
    assert_eq!((s.requests, s.errors), (2, 2), "{s:?}");
    assert_eq!(s.error_kinds.get("timeout"), Some(&2), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_bounds_requests_in_a_duration() {
    let server = Server::start(Faults::default()).await;
    let target = LoadTarget::Http(spec(
        &server.url("/"),
        Protocol::Http1,
        Method::GET,
        &[],
        "",
    ));
    let s = load::run(LoadConfig {
        target,
        stop: Stop::After(Duration::from_millis(500)),
        concurrency: NonZeroUsize::new(4).unwrap(),
        rate: Some(40.0),
        timeout: Duration::from_secs(5),
        new_connection: false,
    })
    .await
    .unwrap();
    // Slots are at k/40 s for k = 0, 1, ...; only those before 0.5 s are used.
    assert!((1..=20).contains(&s.requests), "{s:?}");
    assert_eq!(s.ok, s.requests, "{s:?}");
    assert!(s.duration_s >= 0.0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections_and_refuses_new_ones() {
    let mut server = Server::start_with_drain(Faults::default(), Duration::from_secs(60)).await;
    let mut conn = TcpStream::connect(server.tcp).await.unwrap();
    let mut buf = [0u8; 5];
    conn.write_all(b"first").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");

    let tcp_addr = server.tcp;
    let task = server.shutdown();
    eventually_async(
        "the TCP listener is closed",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            match TcpStream::connect(tcp_addr).await {
                Ok(_) => bail!("still accepting"),
                Err(_) => Ok(()),
            }
        },
    )
    .await
    .unwrap();

    // The open connection keeps working while the server drains...
    conn.write_all(b"again").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    // ...and once it ends, the server stops well before the 60 s drain deadline.
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .context("server did not stop once drained")
        .unwrap()
        .unwrap();
}

/// A local port nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bytes_header_sets_the_body_size() {
    let server = Server::start(Faults::default()).await;
    let body = "x".repeat(1024);
    let resp = request(
        &server.url("/"),
        Protocol::Http1,
        Method::POST,
        &["x-echo-response-bytes: 1024"],
        &body,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body.len(), 1024);
    assert_eq!(resp.headers["content-type"], "application/octet-stream");
    assert_eq!(resp.headers[ambit_echo::POD_HEADER], POD);

    let resp = get(&server.url("/"), &["x-echo-response-bytes: 0"]).await;
    assert_eq!((resp.status, resp.body.len()), (StatusCode::OK, 0));

    let resp = get(&server.url("/"), &["x-echo-response-bytes: 99999999999"]).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(json(&resp)["header"], "x-echo-response-bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_counts_what_the_sink_consumed() {
    let server = Server::start(Faults::default()).await;
    let config = |addr: SocketAddr, streams| StreamConfig {
        addr: addr.to_string(),
        streams: NonZeroUsize::new(streams).unwrap(),
        duration: Duration::from_millis(200),
        chunk: NonZeroUsize::new(16 * 1024).unwrap(),
        timeout: Duration::from_secs(10),
    };
    let s = stream::run(config(server.discard, 3)).await.unwrap();
    assert_eq!((s.streams, s.errors), (3, 0), "{s:?}");
    assert!(s.per_stream_bytes.iter().all(|b| *b > 0), "{s:?}");
    assert_eq!(s.bytes, s.per_stream_bytes.iter().sum::<u64>(), "{s:?}");
    assert!(s.duration_s >= 0.2 && s.bits_per_second > 0.0, "{s:?}");

    // An echo server sends the bytes back: not a sink, and never counted as one.
    let s = stream::run(config(server.tcp, 1)).await.unwrap();
    assert_eq!((s.errors, s.bytes), (1, 0), "{s:?}");
    assert!(
        s.error_kinds
            .keys()
            .any(|k| k.contains("not a discard sink")),
        "{s:?}"
    );

    let s = stream::run(config(closed_port(), 2)).await.unwrap();
    assert_eq!((s.errors, s.bytes), (2, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_opens_one_connection_per_request() {
    let server = Server::start(Faults::default()).await;
    let run = |target: LoadTarget, new_connection| {
        load::run(LoadConfig {
            target,
            stop: Stop::Requests(NonZeroU64::new(20).unwrap()),
            concurrency: NonZeroUsize::new(2).unwrap(),
            rate: None,
            timeout: Duration::from_secs(10),
            new_connection,
        })
    };
    let tcp = || LoadTarget::Tcp {
        addr: server.tcp.to_string(),
        size: NonZeroUsize::new(1).unwrap(),
    };
    let s = run(tcp(), true).await.unwrap();
    assert_eq!((s.ok, s.errors, s.connections), (20, 0, 20), "{s:?}");
    // Reused: at most one connection per worker (a worker that finds the request
    // budget spent before it starts never connects).
    let s = run(tcp(), false).await.unwrap();
    assert_eq!((s.ok, s.errors), (20, 0), "{s:?}");
    assert!((1..=2).contains(&s.connections), "{s:?}");
    let http = LoadTarget::Http(spec(
        &server.url("/"),
        Protocol::Http1,
        Method::GET,
        &[],
        "",
    ));
    let s = run(http, true).await.unwrap();
    assert_eq!((s.ok, s.errors, s.connections), (20, 0, 20), "{s:?}");
    assert!(!s.latency_from_schedule, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_runs_report_latency_from_the_schedule() {
    let server = Server::start(Faults::default()).await;
    let s = load::run(LoadConfig {
        target: LoadTarget::Tcp {
            addr: server.tcp.to_string(),
            size: NonZeroUsize::new(8).unwrap(),
        },
        stop: Stop::Requests(NonZeroU64::new(10).unwrap()),
        concurrency: NonZeroUsize::new(1).unwrap(),
        rate: Some(1000.0),
        timeout: Duration::from_secs(10),
        new_connection: false,
    })
    .await
    .unwrap();
    assert_eq!((s.ok, s.connections), (10, 1), "{s:?}");
    assert!(s.latency_from_schedule, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_proven_connections_open() {
    let server = Server::start(Faults::default()).await;
    let config = |addr: SocketAddr| HoldConfig {
        addr: addr.to_string(),
        connections: NonZeroUsize::new(50).unwrap(),
        parallel: NonZeroUsize::new(8).unwrap(),
        timeout: Duration::from_secs(10),
    };
    let held = hold::open(config(server.tcp)).await.unwrap();
    assert_eq!(
        (held.report.open, held.report.errors),
        (50, 0),
        "{:?}",
        held.report
    );
    assert_eq!(held.len(), 50);
    drop(held);

    let failed = hold::open(config(closed_port())).await.unwrap();
    assert_eq!((failed.report.open, failed.report.errors), (0, 50));
    assert!(failed.is_empty());
    let (kind, _) = failed.report.error_kinds.iter().next().unwrap();
    assert!(kind.starts_with("connect: "), "{kind}");
}
