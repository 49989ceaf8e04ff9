//! The waypoint end to end, in process on loopback: a real HBONE client (the source
//! side) → the waypoint's data path → real HBONE servers standing in for the
//! destination pods, each relaying to a local HTTP app or TCP echo. Certificates come
//! from a test CA; the configuration is fed as controller resources.
//!
//! Pod and service addresses are the cluster's (10.x); a dialer maps each pod's
//! `ip:15008` to its stand-in server on 127.0.0.1, so the waypoint dials exactly what
//! it would dial in a cluster.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test with its location"
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_api::config::v1::{self as pb, AppProtocol, Resource, TunnelProtocol, resource::Kind};
use ambit_hbone::{
    CertStore, ConnectError, ConnectRequest, Dialer, HboneStream, InboundRequest, Pool, PoolConfig,
    Refusal, Server, ServerConfig, ServerHandle, SingleIdentity,
};
use ambit_identity::{
    CertificateAuthority, SpiffeId, TrustDomain, WorkloadCertificate, WorkloadKey,
};
use ambit_test_support::eventually_async;
use ambit_waypoint::inbound::{DataPlane, DataPlaneOptions};
use ambit_waypoint::otlp::{OtlpConfig, OtlpExporter, OtlpMetrics};
use ambit_waypoint::rng::SharedRng;
use ambit_waypoint::router::RouterOptions;
use ambit_waypoint::snapshot::{ObjectName, Snapshot, SnapshotShared};
use ambit_waypoint::telemetry::{AccessLog, RequestMetrics, TelemetryLayer};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const NS: &str = "shop";
const PAYMENT_VIP: &str = "10.96.0.10";
const REVIEWS_VIP: &str = "10.96.0.20";
const CLIENT_IP: &str = "10.244.2.9";
/// Ports of the payment service: (service port, target port, protocol).
const HTTP_PORT: u16 = 80;
const SNIFF_HTTP_PORT: u16 = 8000;
const TCP_PORT: u16 = 9090;
const SNIFF_TCP_PORT: u16 = 7070;
const GRPC_PORT: u16 = 50051;
const APP_HTTP: u16 = 8080;
const APP_TCP: u16 = 9090;
/// Polling interval for conditions.
const POLL: Duration = Duration::from_millis(10);

// ------------------------------------------------------------------ identities

struct Ca {
    ca: CertificateAuthority,
}

impl Ca {
    fn new() -> Self {
        let td = TrustDomain::new("cluster.local").unwrap();
        Self {
            ca: CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap(),
        }
    }

    fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::new(self.ca.trust_domain(), NS, sa).unwrap()
    }

    fn cert(&self, sa: &str) -> Arc<WorkloadCertificate> {
        let id = self.id(sa);
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .ca
            .sign_csr(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(600))
            .unwrap();
        Arc::new(WorkloadCertificate::new(key, &issued.chain_pem, &id).unwrap())
    }

    fn store(&self, sa: &str) -> Arc<CertStore> {
        let store = Arc::new(CertStore::new(Arc::new(self.ca.trust_bundle().clone())));
        store.insert(self.cert(sa));
        store
    }
}

// ------------------------------------------------------------------ backends

/// One destination pod: an HBONE server presenting `presents`' certificate, relaying
/// `APP_HTTP` to an HTTP app and `APP_TCP` to a TCP echo.
struct Backend {
    name: &'static str,
    ip: IpAddr,
    hbone: ServerHandle,
    /// How the app answers (and how often it did).
    app: Behaviour,
    /// CONNECTs the HBONE server accepted.
    connects: Arc<Mutex<Vec<InboundRequest>>>,
}

/// How a backend app answers.
#[derive(Clone, Default)]
struct Behaviour {
    /// HTTP requests answered.
    calls: Arc<AtomicUsize>,
    /// Status of plain HTTP answers (200 unless set).
    status: Arc<AtomicU16>,
    /// Delay before answering, in milliseconds.
    delay_ms: Arc<AtomicUsize>,
    /// gRPC calls still to answer with `unavailable` (14) in the trailers.
    grpc_unavailable: Arc<AtomicUsize>,
}

/// A response body of fixed frames (data, then trailers).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// A gRPC answer: one message, then `grpc-status` in the trailers.
fn grpc_answer(name: &str, grpc_status: u32) -> Response<Frames> {
    let message = Bytes::from(name.to_owned());
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", grpc_status.into());
    let mut r = Response::new(Frames(
        [Frame::data(Bytes::from(framed)), Frame::trailers(trailers)].into(),
    ));
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    r
}

async fn http_app(name: &'static str, behaviour: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let behaviour = behaviour.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let Behaviour {
                        calls,
                        status,
                        delay_ms,
                        grpc_unavailable,
                    } = behaviour.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let delay = delay_ms.load(Ordering::SeqCst) as u64;
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        if grpc {
                            let fail = grpc_unavailable
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            let mut r = grpc_answer(name, if fail { 14 } else { 0 });
                            r.headers_mut().insert("x-backend", name.parse().unwrap());
                            r.headers_mut()
                                .insert("x-path", req.uri().path().parse().unwrap());
                            return Ok::<_, Infallible>(r);
                        }
                        let body = format!(
                            "{name} {} {} {:?}",
                            req.method(),
                            req.uri().path(),
                            req.version()
                        );
                        let mut r = Response::new(Frames([Frame::data(Bytes::from(body))].into()));
                        *r.status_mut() =
                            StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
                        r.headers_mut().insert("x-backend", name.parse().unwrap());
                        if let Some(v) = req.headers().get("x-added") {
                            r.headers_mut().insert("x-saw-added", v.clone());
                        }
                        Ok(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

impl Backend {
    async fn start(ca: &Ca, name: &'static str, ip: &str, presents: &str) -> Self {
        let behaviour = Behaviour {
            status: Arc::new(AtomicU16::new(200)),
            ..Behaviour::default()
        };
        let app = http_app(name, behaviour.clone()).await;
        let echo = tcp_echo().await;
        let connects = Arc::new(Mutex::new(Vec::new()));
        let seen = connects.clone();
        let handler = move |req: InboundRequest| {
            let seen = seen.clone();
            async move {
                let to = match req.target.port() {
                    APP_HTTP => app,
                    APP_TCP => echo,
                    _ => return Err(Refusal::BadRequest),
                };
                seen.lock().unwrap().push(req);
                TcpStream::connect(to)
                    .await
                    .map_err(|_| Refusal::UpstreamUnavailable)
            }
        };
        let store = ca.store(presents);
        let hbone = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(SingleIdentity::new(store, ca.id(presents))),
            handler,
            ServerConfig::default(),
        )
        .await
        .unwrap()
        .serve();
        Self {
            name,
            ip: ip.parse().unwrap(),
            hbone,
            app: behaviour,
            connects,
        }
    }

    fn calls(&self) -> usize {
        self.app.calls.load(Ordering::SeqCst)
    }
}

/// Dials each pod's `ip:15008` at its stand-in server.
struct PodDialer(HashMap<SocketAddr, SocketAddr>);

impl Dialer for PodDialer {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        let to = self.0.get(&addr).copied();
        Box::pin(async move {
            match to {
                Some(to) => TcpStream::connect(to).await,
                None => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("no pod at {addr}"),
                )),
            }
        })
    }
}

// ------------------------------------------------------------------ config

fn nn(name: &str) -> pb::NamespacedName {
    pb::NamespacedName {
        namespace: NS.into(),
        name: name.into(),
    }
}

fn waypoint_ref() -> pb::WaypointRef {
    pb::WaypointRef {
        gateway: Some(nn("waypoint")),
        service: Some(nn("waypoint")),
        spiffe_id: "spiffe://cluster.local/ns/shop/sa/waypoint".into(),
        hbone_port: 15008,
    }
}

fn workload(name: &str, ip: &str, sa: &str, labels: &[(&str, &str)]) -> Resource {
    Resource::new(Kind::Workload(pb::Workload {
        uid: name.into(),
        name: name.into(),
        namespace: NS.into(),
        addresses: vec![ip.into()],
        service_account: sa.into(),
        spiffe_id: format!("spiffe://cluster.local/ns/{NS}/sa/{sa}"),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        captured: true,
        protocol: TunnelProtocol::Hbone as i32,
        ..Default::default()
    }))
}

/// The workload with its traffic bound to the waypoint (pod-level `use-waypoint`).
fn bound(mut r: Resource) -> Resource {
    if let Some(Kind::Workload(w)) = &mut r.kind {
        w.waypoint = Some(waypoint_ref());
        r = Resource::new(Kind::Workload(w.clone()));
    }
    r
}

fn port(port: u16, target: u16, protocol: AppProtocol) -> pb::ServicePort {
    pb::ServicePort {
        name: format!("p{port}"),
        port: port.into(),
        target_port: target.into(),
        app_protocol: String::new(),
        protocol: protocol as i32,
    }
}

fn service(
    name: &str,
    vip: &str,
    ports: Vec<pb::ServicePort>,
    endpoints: &[&str],
    fronted: bool,
) -> Resource {
    Resource::new(Kind::Service(pb::Service {
        name: name.into(),
        namespace: NS.into(),
        hostname: format!("{name}.{NS}.svc.cluster.local"),
        vips: vec![vip.into()],
        ports,
        endpoints: endpoints
            .iter()
            .map(|uid| pb::Endpoint {
                workload_uid: (*uid).into(),
                ports: Default::default(),
            })
            .collect(),
        waypoint: fronted.then(waypoint_ref),
        labels: Default::default(),
    }))
}

/// The cluster: `payment` (v1, v2) fronted by the waypoint, `reviews` not.
fn cluster() -> Vec<Resource> {
    vec![
        workload(
            "payment-v1",
            "10.244.1.2",
            "payment",
            &[("app", "payment"), ("version", "v1")],
        ),
        bound(workload(
            "payment-v2",
            "10.244.1.3",
            "payment",
            &[("app", "payment"), ("version", "v2")],
        )),
        workload("reviews-1", "10.244.1.4", "reviews", &[("app", "reviews")]),
        service(
            "payment",
            PAYMENT_VIP,
            vec![
                port(HTTP_PORT, APP_HTTP, AppProtocol::Http1),
                port(SNIFF_HTTP_PORT, APP_HTTP, AppProtocol::Unspecified),
                port(TCP_PORT, APP_TCP, AppProtocol::Tcp),
                port(SNIFF_TCP_PORT, APP_TCP, AppProtocol::Unspecified),
                port(GRPC_PORT, APP_HTTP, AppProtocol::Grpc),
            ],
            &["payment-v1", "payment-v2"],
            true,
        ),
        service(
            "reviews",
            REVIEWS_VIP,
            vec![port(HTTP_PORT, APP_HTTP, AppProtocol::Http1)],
            &["reviews-1"],
            false,
        ),
    ]
}

fn policy(traffic: pb::TrafficPolicy) -> Resource {
    Resource::new(Kind::DestinationPolicy(pb::DestinationPolicy {
        service: Some(nn("payment")),
        origin: "shop/payment".into(),
        traffic_policy: Some(traffic),
        subsets: Vec::new(),
    }))
}

fn subsets(lb: Option<pb::SimpleLb>) -> Resource {
    let subset = |v: &str| pb::Subset {
        name: v.into(),
        labels: [("version".to_owned(), v.to_owned())].into_iter().collect(),
        traffic_policy: None,
    };
    Resource::new(Kind::DestinationPolicy(pb::DestinationPolicy {
        service: Some(nn("payment")),
        origin: "shop/payment".into(),
        traffic_policy: lb.map(|lb| pb::TrafficPolicy {
            load_balancer: Some(pb::LoadBalancer {
                kind: Some(pb::load_balancer::Kind::Simple(lb as i32)),
            }),
            ..Default::default()
        }),
        subsets: vec![subset("v1"), subset("v2")],
    }))
}

fn dest(service: &str, subset: &str, weight: u32) -> pb::RouteDestination {
    pb::RouteDestination {
        service: Some(nn(service)),
        subset: subset.into(),
        weight,
        ..Default::default()
    }
}

fn route(name: &str, matches: Vec<pb::RouteMatch>, forward: pb::Forward) -> pb::Route {
    pb::Route {
        name: name.into(),
        matches,
        action: Some(pb::route::Action::Forward(forward)),
        ..Default::default()
    }
}

fn routes(routes: Vec<pb::Route>) -> Resource {
    Resource::new(Kind::RouteSet(pb::RouteSet {
        service: Some(nn("payment")),
        routes,
    }))
}

fn forward(destinations: Vec<pb::RouteDestination>) -> pb::Forward {
    pb::Forward {
        destinations,
        ..Default::default()
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    ambit_api::time::duration_to_proto(d)
}

// ------------------------------------------------------------------ the setup

struct Setup {
    ca: Ca,
    waypoint: SocketAddr,
    config: watch::Sender<Arc<Snapshot>>,
    plane: Arc<DataPlane>,
    _server: ServerHandle,
    backends: Vec<Backend>,
    client: Pool,
    registry: Registry,
    logs: Arc<Mutex<Vec<AccessLog>>>,
}

impl Setup {
    /// The waypoint serving `extra` on top of the cluster; backends for the three
    /// pods, `payment-v1`'s presenting `v1_presents`' identity.
    async fn start(extra: Vec<Resource>, v1_presents: &str) -> Self {
        Self::start_with(extra, v1_presents, |_, t| t).await
    }

    /// As [`Setup::start`], `adjust` completing the telemetry layer (with the
    /// registry `/metrics` shows).
    async fn start_with(
        extra: Vec<Resource>,
        v1_presents: &str,
        adjust: impl FnOnce(&mut Registry, TelemetryLayer) -> TelemetryLayer,
    ) -> Self {
        let _ = rustls::crypto::CryptoProvider::install_default(
            ambit_identity::tls::crypto_provider().as_ref().clone(),
        );
        let ca = Ca::new();
        let backends = vec![
            Backend::start(&ca, "payment-v1", "10.244.1.2", v1_presents).await,
            Backend::start(&ca, "payment-v2", "10.244.1.3", "payment").await,
            Backend::start(&ca, "reviews-1", "10.244.1.4", "reviews").await,
        ];
        let dialer = PodDialer(
            backends
                .iter()
                .map(|b| (SocketAddr::new(b.ip, 15008), b.hbone.local_addr()))
                .collect(),
        );
        let snapshot = snapshot(extra, 1);
        let (config, rx) = watch::channel(Arc::new(snapshot));
        let mut registry = Registry::default();
        let logs: Arc<Mutex<Vec<AccessLog>>> = Arc::default();
        let sink = logs.clone();
        let telemetry = TelemetryLayer::new(RequestMetrics::register(&mut registry)).with_sink(
            Arc::new(move |log: &AccessLog| sink.lock().unwrap().push(log.clone())),
        );
        let telemetry = adjust(&mut registry, telemetry);
        let options = DataPlaneOptions {
            telemetry,
            detect_timeout: Duration::from_millis(500),
            router: RouterOptions {
                rng: SharedRng::seeded(7),
                ..RouterOptions::default()
            },
            ..DataPlaneOptions::default()
        };
        let plane = DataPlane::new(
            ca.id("waypoint"),
            ca.store("waypoint"),
            rx,
            Some(Arc::new(dialer)),
            options,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = plane.serve(listener).unwrap();
        let client = Pool::new(PoolConfig::default(), ca.store("checkout"));
        Self {
            waypoint: server.local_addr(),
            ca,
            config,
            plane,
            _server: server,
            backends,
            client,
            registry,
            logs,
        }
    }

    /// The access log once it has `n` lines (a request is logged when its response
    /// body has been sent, which may be just after the client read it).
    async fn logs_eventually(&self, n: usize) -> Vec<AccessLog> {
        eventually_async("access-log lines", Duration::from_secs(10), POLL, || {
            let logs = self.logs.lock().unwrap().clone();
            async move {
                anyhow::ensure!(logs.len() == n, "{} lines, want {n}", logs.len());
                Ok(logs)
            }
        })
        .await
        .unwrap()
    }

    /// The metrics, as `/metrics` shows them.
    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    fn backend(&self, name: &str) -> &Backend {
        self.backends.iter().find(|b| b.name == name).unwrap()
    }

    fn reconfigure(&self, extra: Vec<Resource>, generation: u64) {
        self.config
            .send_replace(Arc::new(snapshot(extra, generation)));
    }

    async fn tunnel(&self, target: SocketAddr) -> Result<HboneStream, ConnectError> {
        let mut request = ConnectRequest::new(
            self.ca.id("checkout"),
            self.ca.id("waypoint"),
            self.waypoint,
            target,
        );
        request.forwarded_for = Some(CLIENT_IP.parse().unwrap());
        self.client.connect(request).await
    }

    /// An HTTP/1.1 client on a tunnel to the payment VIP's `port`.
    async fn http1(&self, port: u16) -> Http1 {
        self.http1_to(vip(PAYMENT_VIP, port)).await
    }

    /// An HTTP/1.1 client on a tunnel to `target`.
    async fn http1_to(&self, target: SocketAddr) -> Http1 {
        let stream = self.tunnel(target).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Http1(sender)
    }
}

fn snapshot(extra: Vec<Resource>, generation: u64) -> Snapshot {
    let mut resources = cluster();
    resources.extend(extra);
    Snapshot::build(
        ObjectName::new(NS, "waypoint"),
        &resources,
        generation,
        &SnapshotShared::new(SharedRng::seeded(generation)),
    )
    .unwrap()
}

fn vip(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

struct Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

struct Answer {
    status: StatusCode,
    backend: Option<String>,
    headers: http::HeaderMap,
    body: String,
}

impl Http1 {
    async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        self.0.ready().await.unwrap();
        let response = self.0.send_request(request).await.unwrap();
        answer(response).await
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut b = Request::get(path).header("host", "payment.shop.svc.cluster.local");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::default()).unwrap()).await
    }
}

async fn answer(response: Response<Incoming>) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let backend = headers
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        backend,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn echo_through(stream: HboneStream) -> String {
    let (mut r, mut w) = tokio::io::split(stream);
    w.write_all(b"hello over tcp\n").await.unwrap();
    w.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_string(&mut out))
        .await
        .expect("echo within 10 s")
        .unwrap();
    out
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn routes_by_header_and_path_to_different_backends() {
    let canary = pb::RouteMatch {
        headers: vec![pb::HeaderMatcher {
            name: "x-canary".into(),
            value: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Exact("true".into())),
                ignore_case: false,
            }),
            invert: false,
        }],
        ..Default::default()
    };
    let reviews = pb::RouteMatch {
        path: Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix("/reviews".into())),
            ignore_case: false,
        }),
        ..Default::default()
    };
    let mut to_v1 = forward(vec![dest("payment", "v1", 1)]);
    to_v1.request_headers = Some(pb::HeaderModifier {
        set: vec![pb::HeaderValue {
            name: "x-added".into(),
            value: "by-route".into(),
        }],
        ..Default::default()
    });
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![
                route(
                    "canary",
                    vec![canary],
                    forward(vec![dest("payment", "v2", 1)]),
                ),
                route(
                    "reviews",
                    vec![reviews],
                    forward(vec![dest("reviews", "", 1)]),
                ),
                route("rest", vec![], to_v1),
            ]),
        ],
        "payment",
    )
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    for _ in 0..5 {
        let a = client.get("/pay", &[("x-canary", "true")]).await;
        assert_eq!(
            (a.status, a.backend.as_deref()),
            (StatusCode::OK, Some("payment-v2"))
        );
        let a = client.get("/reviews/7", &[]).await;
        assert_eq!(
            (a.status, a.backend.as_deref()),
            (StatusCode::OK, Some("reviews-1"))
        );
        assert!(a.body.contains("GET /reviews/7"), "{}", a.body);
        let a = client.get("/pay", &[("x-canary", "false")]).await;
        assert_eq!(
            (a.status, a.backend.as_deref()),
            (StatusCode::OK, Some("payment-v1"))
        );
        assert_eq!(a.headers.get("x-saw-added").unwrap(), "by-route");
    }
    // The destination pods saw the waypoint's identity, the endpoint's target as
    // authority and the original client's address.
    let connects = setup.backend("payment-v2").connects.lock().unwrap().clone();
    let first = connects.first().expect("a CONNECT to payment-v2");
    assert_eq!(first.peer, setup.ca.id("waypoint"));
    assert_eq!(first.target, "10.244.1.3:8080".parse().unwrap());
    assert_eq!(first.forwarded_for, Some(CLIENT_IP.parse().unwrap()));
    // Requests of one client reuse one upstream connection per endpoint.
    assert_eq!(connects.len(), 1, "{connects:?}");
    // One access-log line per request, naming both ends and the routed service.
    let logs = setup.logs_eventually(15).await;
    for log in &logs {
        assert_eq!(log.response_flags, "-", "{log:?}");
        assert_eq!(log.source_principal, "cluster.local/ns/shop/sa/checkout");
        assert_eq!(log.source_namespace, "shop");
        assert_eq!(log.response_code, 200);
        assert_eq!(
            log.destination_principal,
            "cluster.local/ns/shop/sa/{}".replace(
                "{}",
                if log.path.starts_with("/reviews") {
                    "reviews"
                } else {
                    "payment"
                }
            )
        );
    }
    let reviews = logs.iter().find(|l| l.path == "/reviews/7").unwrap();
    assert_eq!(
        reviews.destination_service,
        "reviews.shop.svc.cluster.local"
    );
    assert_eq!(reviews.destination_workload, "reviews-1");
    assert_eq!(reviews.route_name.as_deref(), Some("reviews"));
    let metrics = setup.metrics();
    let canary = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"destination_workload="payment-v2""#)
        })
        .unwrap_or_else(|| panic!("no istio_requests_total for payment-v2 in\n{metrics}"));
    assert!(canary.contains(r#"reporter="waypoint""#), "{canary}");
    assert!(
        canary.contains(r#"source_principal="cluster.local/ns/shop/sa/checkout""#),
        "{canary}"
    );
    assert!(
        canary.contains(r#"destination_service="payment.shop.svc.cluster.local""#),
        "{canary}"
    );
    assert!(canary.contains(r#"response_code="200""#), "{canary}");
    assert!(canary.ends_with(" 5"), "{canary}");
}

#[tokio::test]
async fn weighted_split_is_roughly_honoured() {
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![route(
                "split",
                vec![],
                forward(vec![dest("payment", "v1", 80), dest("payment", "v2", 20)]),
            )]),
        ],
        "payment",
    )
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    let total = 400;
    let mut v2 = 0;
    for _ in 0..total {
        let a = client.get("/", &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        if a.backend.as_deref() == Some("payment-v2") {
            v2 += 1;
        }
    }
    // 20 % of 400 = 80, standard deviation 8: ±40 is five deviations.
    assert!((40..=120).contains(&v2), "v2 got {v2} of {total}");
    assert_eq!(
        setup.backend("payment-v1").calls() + setup.backend("payment-v2").calls(),
        total
    );
}

#[tokio::test]
async fn retry_prefers_another_endpoint_when_one_fails() {
    let mut retrying = forward(vec![dest("payment", "", 1)]);
    retrying.retry = Some(pb::RetryPolicy {
        attempts: 1,
        retry_on: vec![pb::RetryOn::RetryOn5xx as i32],
        ..Default::default()
    });
    // Random balancing: without the preference for another endpoint, a retry would
    // land on the failing one half of the time.
    let setup = Setup::start(
        vec![
            subsets(Some(pb::SimpleLb::Random)),
            routes(vec![route("retry", vec![], retrying)]),
        ],
        "payment",
    )
    .await;
    setup
        .backend("payment-v1")
        .app
        .status
        .store(503, Ordering::SeqCst);
    let mut client = setup.http1(HTTP_PORT).await;
    for i in 0..100 {
        let a = client.get("/", &[]).await;
        assert_eq!(
            (a.status, a.backend.as_deref()),
            (StatusCode::OK, Some("payment-v2")),
            "request {i}"
        );
    }
    let failed = setup.backend("payment-v1").calls();
    assert!(failed > 0, "the failing endpoint was never chosen");
    assert_eq!(setup.plane.retry_stats().retries(), failed as u64);
    let retried: u64 = setup
        .logs_eventually(100)
        .await
        .iter()
        .map(|l| l.retries)
        .sum();
    assert_eq!(retried, failed as u64);
    let metrics = setup.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ambit_waypoint_retries_total{")
                && l.ends_with(&format!(" {failed}"))),
        "{metrics}"
    );
}

#[tokio::test]
async fn timeout_answers_504_within_the_budget() {
    let budget = Duration::from_millis(300);
    let mut bounded = forward(vec![dest("payment", "", 1)]);
    bounded.timeout = Some(duration(budget));
    let setup = Setup::start(
        vec![routes(vec![route("slow", vec![], bounded)])],
        "payment",
    )
    .await;
    for b in &setup.backends {
        b.app.delay_ms.store(10_000, Ordering::SeqCst);
    }
    let mut client = setup.http1(HTTP_PORT).await;
    let start = Instant::now();
    let a = client.get("/", &[]).await;
    let elapsed = start.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.body, "upstream request timeout");
    assert!(elapsed >= budget, "answered after {elapsed:?}");
    assert!(
        elapsed < budget + Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
}

#[tokio::test]
async fn fault_abort_never_reaches_the_backend() {
    let mut aborted = forward(vec![dest("payment", "", 1)]);
    aborted.fault = Some(pb::FaultInjection {
        delay: None,
        abort: Some(pb::FaultAbort {
            error: Some(pb::fault_abort::Error::HttpStatus(418)),
            percent: 100.0,
        }),
    });
    let setup = Setup::start(
        vec![routes(vec![route("fault", vec![], aborted)])],
        "payment",
    )
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    for _ in 0..10 {
        let a = client.get("/", &[]).await;
        assert_eq!(a.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(a.body, "fault filter abort");
    }
    for b in &setup.backends {
        assert_eq!(b.calls(), 0, "{} was reached", b.name);
        assert!(
            b.connects.lock().unwrap().is_empty(),
            "{} was dialled",
            b.name
        );
    }
}

#[tokio::test]
async fn tcp_is_passed_through_for_declared_and_detected_ports() {
    let setup = Setup::start(Vec::new(), "payment").await;
    let declared = setup.tunnel(vip(PAYMENT_VIP, TCP_PORT)).await.unwrap();
    assert_eq!(echo_through(declared).await, "hello over tcp\n");
    let detected = setup
        .tunnel(vip(PAYMENT_VIP, SNIFF_TCP_PORT))
        .await
        .unwrap();
    assert_eq!(echo_through(detected).await, "hello over tcp\n");
    let echoed: usize = setup
        .backends
        .iter()
        .map(|b| {
            b.connects
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.target.port() == APP_TCP)
                .count()
        })
        .sum();
    assert_eq!(echoed, 2);
}

#[tokio::test]
async fn http_is_detected_on_an_unspecified_port_in_both_versions() {
    let setup = Setup::start(Vec::new(), "payment").await;
    let mut h1 = setup.http1(SNIFF_HTTP_PORT).await;
    let a = h1.get("/one", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("GET /one HTTP/1.1"), "{}", a.body);

    // HTTP/2 with prior knowledge; the upstream speaks what the downstream spoke.
    let stream = setup
        .tunnel(vip(PAYMENT_VIP, SNIFF_HTTP_PORT))
        .await
        .unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::post("http://payment.shop.svc.cluster.local/two")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let a = answer(h2.send_request(request).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("POST /two HTTP/2.0"), "{}", a.body);
}

#[tokio::test]
async fn a_target_not_fronted_by_this_waypoint_is_refused() {
    let setup = Setup::start(Vec::new(), "payment").await;
    for target in [
        vip(REVIEWS_VIP, HTTP_PORT),        // a service of another (no) waypoint
        vip(PAYMENT_VIP, 81),               // a port the service does not have
        "10.244.1.2:8080".parse().unwrap(), // a pod not bound to this waypoint
        "10.1.2.3:80".parse().unwrap(),     // unknown
    ] {
        match setup.tunnel(target).await {
            Err(e) => assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST), "{target}: {e}"),
            Ok(_) => panic!("{target} was accepted"),
        }
    }
    for b in &setup.backends {
        assert!(
            b.connects.lock().unwrap().is_empty(),
            "{} was dialled",
            b.name
        );
    }
}

#[tokio::test]
async fn an_endpoint_with_the_wrong_identity_is_not_used() {
    // payment-v1 is configured as `payment` but its server presents `impostor`.
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![route(
                "v1",
                vec![],
                forward(vec![dest("payment", "v1", 1)]),
            )]),
        ],
        "impostor",
    )
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    let a = client.get("/", &[]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.backend, None);
    let v1 = setup.backend("payment-v1");
    assert_eq!(v1.calls(), 0);
    assert!(v1.connects.lock().unwrap().is_empty());
    assert_eq!(v1.hbone.stats().streams, 0);
}

#[tokio::test]
async fn new_routes_apply_to_open_connections() {
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![route(
                "v1",
                vec![],
                forward(vec![dest("payment", "v1", 1)]),
            )]),
        ],
        "payment",
    )
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    assert_eq!(
        client.get("/", &[]).await.backend.as_deref(),
        Some("payment-v1")
    );
    setup.reconfigure(
        vec![
            subsets(None),
            routes(vec![route(
                "v2",
                vec![],
                forward(vec![dest("payment", "v2", 1)]),
            )]),
        ],
        2,
    );
    // The same downstream connection, the new routes.
    assert_eq!(
        client.get("/", &[]).await.backend.as_deref(),
        Some("payment-v2")
    );
    // Without a RouteSet the service gets its default route (both endpoints).
    setup.reconfigure(Vec::new(), 3);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(client.get("/", &[]).await.backend.unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

fn exact(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(v.into())),
        ignore_case: false,
    }
}

#[tokio::test]
async fn authorization_policy_allows_and_denies_per_request() {
    let policy = Resource::new(Kind::Authorization(pb::Authorization {
        name: "payment-get".into(),
        namespace: NS.into(),
        scope: Some(pb::PolicyScope {
            kind: Some(pb::policy_scope::Kind::TargetRefs(pb::TargetRefs {
                services: vec![nn("payment")],
                gateways: Vec::new(),
            })),
        }),
        action: pb::Action::Allow as i32,
        rules: vec![pb::Rule {
            clauses: vec![
                pb::Clause {
                    matches: vec![pb::Match {
                        principals: vec![exact("cluster.local/ns/shop/sa/checkout")],
                        ..Default::default()
                    }],
                },
                pb::Clause {
                    matches: vec![pb::Match {
                        methods: vec![exact("GET")],
                        ..Default::default()
                    }],
                },
            ],
            unenforceable_fields: Vec::new(),
        }],
    }));
    let setup = Setup::start(vec![policy], "payment").await;
    let mut client = setup.http1(HTTP_PORT).await;
    assert_eq!(client.get("/orders", &[]).await.status, StatusCode::OK);
    let denied = client
        .send(
            Request::post("/orders")
                .header("host", "payment")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.body, "RBAC: access denied");
    let calls: usize = setup.backends.iter().map(Backend::calls).sum();
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_others_take_the_traffic() {
    let setup = Setup::start(
        vec![policy(pb::TrafficPolicy {
            outlier_detection: Some(pb::OutlierDetection {
                consecutive_5xx_errors: 2,
                interval: Some(duration(Duration::from_secs(1))),
                base_ejection_time: Some(duration(Duration::from_secs(60))),
                max_ejection_percent: 50,
                ..Default::default()
            }),
            ..Default::default()
        })],
        "payment",
    )
    .await;
    setup
        .backend("payment-v1")
        .app
        .status
        .store(500, Ordering::SeqCst);
    let mut client = setup.http1(HTTP_PORT).await;
    // Round robin: v1 gets every second request until its second 500 ejects it.
    let mut failures = 0;
    for _ in 0..20 {
        if client.get("/", &[]).await.status != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "v1 answered 500 until ejected");
    assert_eq!(setup.backend("payment-v1").calls(), 2);
    assert_eq!(setup.backend("payment-v2").calls(), 18);
}

#[tokio::test]
async fn a_full_connection_pool_answers_503_without_reaching_the_backend() {
    let setup = Setup::start(
        vec![policy(pb::TrafficPolicy {
            connection_pool: Some(pb::ConnectionPool {
                max_requests: 1,
                ..Default::default()
            }),
            ..Default::default()
        })],
        "payment",
    )
    .await;
    for b in &setup.backends {
        b.app.delay_ms.store(10_000, Ordering::SeqCst);
    }
    // One request occupies the only slot…
    let mut slow = setup.http1(HTTP_PORT).await;
    let held = tokio::spawn(async move { slow.get("/slow", &[]).await.status });
    let busy = || setup.backends.iter().map(Backend::calls).sum::<usize>();
    eventually_async(
        "the first request at a backend",
        Duration::from_secs(10),
        POLL,
        || {
            let n = busy();
            async move {
                if n == 1 {
                    Ok(())
                } else {
                    anyhow::bail!("{n} requests")
                }
            }
        },
    )
    .await
    .unwrap();
    // …so the next one overflows at once.
    let mut client = setup.http1(HTTP_PORT).await;
    let a = client.get("/", &[]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers.get("x-envoy-overloaded").unwrap(), "true");
    assert_eq!(busy(), 1);
    held.abort();
}

#[tokio::test]
async fn grpc_is_routed_by_method_and_retried_on_unavailable() {
    let grpc_method = |method: &str| pb::RouteMatch {
        grpc: Some(pb::GrpcMethodMatch {
            service: "shop.Payment".into(),
            method: method.into(),
        }),
        ..Default::default()
    };
    let mut charge = forward(vec![dest("payment", "v2", 1)]);
    charge.retry = Some(pb::RetryPolicy {
        attempts: 2,
        retry_on: vec![pb::RetryOn::GrpcUnavailable as i32],
        ..Default::default()
    });
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![
                route("charge", vec![grpc_method("Charge")], charge),
                route("rest", vec![], forward(vec![dest("payment", "v1", 1)])),
            ]),
        ],
        "payment",
    )
    .await;
    let v2 = setup.backend("payment-v2");
    v2.app.grpc_unavailable.store(1, Ordering::SeqCst);

    let stream = setup.tunnel(vip(PAYMENT_VIP, GRPC_PORT)).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = |method: &str| {
        Request::post(format!(
            "http://payment.shop.svc.cluster.local/shop.Payment/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
    };
    let response = h2.send_request(call("Charge")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-backend"], "payment-v2");
    let body = response.into_body().collect().await.unwrap();
    let trailers = body.trailers().expect("gRPC trailers").clone();
    assert_eq!(trailers["grpc-status"], "0", "the retry's answer");
    assert_eq!(v2.calls(), 2, "one unavailable, one retry");

    let response = h2.send_request(call("Refund")).await.unwrap();
    assert_eq!(response.headers()["x-backend"], "payment-v1");
    assert_eq!(response.headers()["x-path"], "/shop.Payment/Refund");
}

#[tokio::test]
async fn a_tunnel_to_a_bound_pod_reaches_that_pod_only() {
    // The service's routes send everything to v1; a pod address bypasses them.
    let setup = Setup::start(
        vec![
            subsets(None),
            routes(vec![route(
                "v1",
                vec![],
                forward(vec![dest("payment", "v1", 1)]),
            )]),
        ],
        "payment",
    )
    .await;
    let mut client = setup.http1_to("10.244.1.3:8080".parse().unwrap()).await;
    for _ in 0..5 {
        let a = client.get("/", &[]).await;
        assert_eq!(
            (a.status, a.backend.as_deref()),
            (StatusCode::OK, Some("payment-v2"))
        );
    }
    assert_eq!(setup.backend("payment-v1").calls(), 0);
}

#[tokio::test]
async fn metrics_name_the_source_workload_found_by_the_clients_address() {
    // The controller sends every captured workload to waypoints: the client's pod is
    // found by the address its CONNECT's `Forwarded` header carries.
    let checkout = |sa: &str| {
        let mut r = workload(
            "checkout-7f9c-x2",
            CLIENT_IP,
            sa,
            &[("app", "checkout"), ("version", "v3")],
        );
        if let Some(Kind::Workload(w)) = &mut r.kind {
            w.workload_name = "checkout".into();
            w.canonical_name = "checkout".into();
            w.canonical_revision = "v3".into();
            r = Resource::new(Kind::Workload(w.clone()));
        }
        r
    };
    let setup = Setup::start(vec![checkout("checkout")], "payment").await;
    let mut client = setup.http1(HTTP_PORT).await;
    assert_eq!(client.get("/pay", &[]).await.status, StatusCode::OK);
    let log = setup.logs_eventually(1).await.remove(0);
    assert_eq!(
        (log.source_workload.as_str(), log.source_namespace.as_str()),
        ("checkout", NS)
    );
    let metrics = setup.metrics();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .unwrap_or_else(|| panic!("no istio_requests_total in\n{metrics}"));
    for label in [
        r#"source_workload="checkout""#,
        r#"source_workload_namespace="shop""#,
        r#"source_app="checkout""#,
        r#"source_version="v3""#,
        r#"source_canonical_service="checkout""#,
        r#"source_canonical_revision="v3""#,
        r#"source_principal="cluster.local/ns/shop/sa/checkout""#,
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }

    // A pod at that address with another identity is not the caller: the verified
    // identity still names the principal, the workload stays unknown.
    setup.reconfigure(vec![checkout("inventory")], 2);
    let mut client = setup.http1(HTTP_PORT).await;
    assert_eq!(client.get("/pay", &[]).await.status, StatusCode::OK);
    let log = setup.logs_eventually(2).await.remove(1);
    assert_eq!(log.source_workload, "unknown");
    assert_eq!(log.source_principal, "cluster.local/ns/shop/sa/checkout");
}

// ------------------------------------------------------------------ OTLP export

/// A local OTLP/HTTP collector: records each request's path, content type and JSON
/// body, answering 200.
async fn collector() -> (
    SocketAddr,
    Arc<Mutex<Vec<(String, String, serde_json::Value)>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<(String, String, serde_json::Value)>>> = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let store = store.clone();
            let service = hyper::service::service_fn(move |r: Request<Incoming>| {
                let store = store.clone();
                async move {
                    let path = r.uri().path().to_owned();
                    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
                    let body = r.into_body().collect().await.unwrap().to_bytes();
                    let json = serde_json::from_slice(&body).unwrap();
                    store.lock().unwrap().push((path, content_type, json));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, received)
}

/// The exported spans, once there are `n`.
async fn spans_eventually(
    received: &Mutex<Vec<(String, String, serde_json::Value)>>,
    n: usize,
) -> Vec<serde_json::Value> {
    eventually_async("exported spans", Duration::from_secs(10), POLL, || {
        let spans: Vec<serde_json::Value> = received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, json)| {
                json["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        async move {
            anyhow::ensure!(spans.len() == n, "{} spans, want {n}", spans.len());
            Ok(spans)
        }
    })
    .await
    .unwrap()
}

fn attribute<'a>(span: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map_or(&serde_json::Value::Null, |a| &a["value"])
}

fn exporter(
    endpoint: String,
    registry: &mut Registry,
    adjust: impl FnOnce(&mut OtlpConfig),
) -> (OtlpExporter, OtlpMetrics) {
    let metrics = OtlpMetrics::register(registry);
    let mut config = OtlpConfig::new(endpoint, NS.into(), "waypoint".into());
    config.flush_interval = Duration::from_millis(20);
    adjust(&mut config);
    (
        OtlpExporter::spawn(config, metrics.clone()).unwrap(),
        metrics,
    )
}

#[tokio::test]
async fn sampled_requests_are_exported_as_otlp_spans() {
    let (addr, received) = collector().await;
    let setup = Setup::start_with(vec![], "payment", |registry, t| {
        let (e, _) = exporter(format!("http://{addr}/v1/traces"), registry, |_| {});
        t.with_otlp(e)
    })
    .await;
    let mut client = setup.http1(HTTP_PORT).await;
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let failing = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let a = client
        .get("/orders?id=7", &[("traceparent", sampled)])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = client.get("/orders", &[("traceparent", unsampled)]).await;
    assert_eq!(a.status, StatusCode::OK);
    for b in &setup.backends {
        b.app.status.store(503, Ordering::SeqCst);
    }
    let a = client.get("/orders", &[("traceparent", failing)]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);

    // Spans leave in completion order: the unsampled one would come before the last.
    let spans = spans_eventually(&received, 2).await;
    let logs = setup.logs_eventually(3).await;
    for (path, content_type, json) in received.lock().unwrap().iter() {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/json");
        let resource = &json["resourceSpans"][0]["resource"];
        for (key, value) in [
            ("service.name", "ambit-waypoint"),
            ("k8s.namespace.name", NS),
            ("ambit.waypoint.name", "waypoint"),
        ] {
            assert_eq!(attribute(resource, key)["stringValue"], value, "{resource}");
        }
    }

    let ok = &spans[0];
    assert_eq!(ok["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(ok["spanId"], logs[0].span_id.as_str());
    // Named by the route that matched (the service's default one here).
    assert_eq!(logs[0].route_name.as_deref(), Some("default/shop/payment"));
    assert_eq!(ok["name"], "GET default/shop/payment");
    assert_eq!(
        attribute(ok, "ambit.route")["stringValue"],
        "default/shop/payment"
    );
    assert_eq!(ok["kind"], 2);
    let start: u64 = ok["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u64 = ok["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && end >= start, "{ok}");
    assert!(ok.get("status").is_none(), "{ok}");
    for (key, value) in [
        ("http.request.method", "GET"),
        ("url.path", "/orders"),
        ("url.query", "id=7"),
        ("server.address", "payment.shop.svc.cluster.local"),
        (
            "ambit.source.principal",
            "cluster.local/ns/shop/sa/checkout",
        ),
        ("ambit.response_flags", "-"),
    ] {
        assert_eq!(attribute(ok, key)["stringValue"], value, "{key} in {ok}");
    }
    assert_eq!(
        attribute(ok, "http.response.status_code")["intValue"],
        "200"
    );
    let upstream = logs[0].upstream_host.unwrap().to_string();
    assert_eq!(
        attribute(ok, "ambit.upstream.host")["stringValue"],
        upstream.as_str()
    );
    assert!(upstream.starts_with("10.244.1."), "{upstream}");
    assert_eq!(
        attribute(ok, "ambit.destination.principal")["stringValue"],
        logs[0].destination_principal.as_str()
    );
    assert_ne!(logs[0].destination_principal, "unknown");

    let failed = &spans[1];
    assert_eq!(failed["traceId"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(failed["parentSpanId"], "b7ad6b7169203331");
    assert_eq!(
        attribute(failed, "http.response.status_code")["intValue"],
        "503"
    );
    assert_eq!(failed["status"]["code"], 2, "{failed}");
    assert!(
        setup
            .metrics()
            .lines()
            .any(|l| l == "ambit_waypoint_spans_exported_total 2"),
        "{}",
        setup.metrics()
    );
}

#[tokio::test]
async fn a_stuck_or_absent_collector_never_holds_up_requests() {
    // A collector that accepts connections (the backlog) but never answers: the
    // first export hangs, one span waits in the queue, the rest are dropped.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let mut metrics = None;
    let setup = Setup::start_with(vec![], "payment", |registry, t| {
        let (e, m) = exporter(format!("http://{stuck_addr}/v1/traces"), registry, |c| {
            c.queue = 1;
            c.batch_size = 1;
            c.timeout = Duration::from_secs(600);
        });
        metrics = Some(m);
        t.with_otlp(e).with_trace_sampling(100.0)
    })
    .await;
    let metrics = metrics.unwrap();
    let mut client = setup.http1(HTTP_PORT).await;
    for _ in 0..6 {
        assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
    }
    setup.logs_eventually(6).await;
    assert!(
        metrics.dropped.get() >= 4,
        "dropped {}",
        metrics.dropped.get()
    );
    assert_eq!(metrics.exported.get(), 0);
    assert!(
        setup
            .metrics()
            .lines()
            .any(|l| l.starts_with("ambit_waypoint_spans_dropped_total ")),
        "{}",
        setup.metrics()
    );

    // No collector at all: each export fails, is counted, and requests go on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut metrics = None;
    let setup = Setup::start_with(vec![], "payment", |registry, t| {
        let (e, m) = exporter(format!("http://{closed_addr}/v1/traces"), registry, |_| {});
        metrics = Some(m);
        t.with_otlp(e).with_trace_sampling(100.0)
    })
    .await;
    let metrics = metrics.unwrap();
    let mut client = setup.http1(HTTP_PORT).await;
    for _ in 0..3 {
        assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
    }
    eventually_async(
        "export failures counted",
        Duration::from_secs(10),
        POLL,
        || {
            let (failed, dropped, failures) = (
                metrics.failed.get(),
                metrics.dropped.get(),
                metrics.export_failures.get(),
            );
            async move {
                anyhow::ensure!(
                    failed + dropped == 3 && failures >= 1,
                    "failed {failed}, dropped {dropped}, failed requests {failures}"
                );
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(metrics.exported.get(), 0);
    drop(stuck);
}
