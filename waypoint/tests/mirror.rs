//! Mirroring end to end, in process on loopback: a real HBONE client → the waypoint's
//! data path → real HBONE servers standing in for the pods, each relaying to a
//! local HTTP app that records what it received (as `tests/proxy.rs` does).
//!
//! `payment` is fronted by the waypoint and served by `payment-v1`; mirrors go to
//! `payment-shadow` (pod `shadow-1`, whose app can be held and answers 503) or to
//! `audit`, whose pod nobody serves (every connection refused).
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test with its location"
)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_api::config::v1::{self as pb, AppProtocol, Resource, TunnelProtocol, resource::Kind};
use ambit_hbone::{
    CertStore, ConnectRequest, Dialer, InboundRequest, Pool, PoolConfig, Refusal, Server,
    ServerConfig, ServerHandle, SingleIdentity,
};
use ambit_identity::{
    CertificateAuthority, SpiffeId, TrustDomain, WorkloadCertificate, WorkloadKey,
};
use ambit_test_support::eventually_async;
use ambit_waypoint::inbound::{DataPlane, DataPlaneOptions};
use ambit_waypoint::mirror::{MirrorLimiter, MirrorMetrics, MirrorOptions, MirrorOutcome};
use ambit_waypoint::rng::SharedRng;
use ambit_waypoint::router::RouterOptions;
use ambit_waypoint::snapshot::{ObjectName, Snapshot, SnapshotShared};
use ambit_waypoint::telemetry::{RequestMetrics, TelemetryLayer};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const NS: &str = "shop";
const PAYMENT_VIP: &str = "10.96.0.10";
const CLIENT_IP: &str = "10.244.2.9";
const HOST: &str = "payment.shop.svc.cluster.local";
const APP_HTTP: u16 = 8080;
/// Request bodies up to this size are mirrored in these tests.
const BODY_LIMIT: usize = 1024;
/// Mirrors outstanding at once in these tests.
const MAX_IN_FLIGHT: usize = 4;
/// Deadline for anything the test waits for (a deadline, not a timing assertion).
const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

// ------------------------------------------------------------------ identities

struct Ca(CertificateAuthority);

impl Ca {
    fn new() -> Self {
        let td = TrustDomain::new("cluster.local").unwrap();
        Self(CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap())
    }

    fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::new(self.0.trust_domain(), NS, sa).unwrap()
    }

    fn store(&self, sa: &str) -> Arc<CertStore> {
        let id = self.id(sa);
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .0
            .sign_csr(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(600))
            .unwrap();
        let store = Arc::new(CertStore::new(Arc::new(self.0.trust_bundle().clone())));
        store.insert(Arc::new(
            WorkloadCertificate::new(key, &issued.chain_pem, &id).unwrap(),
        ));
        store
    }
}

// ------------------------------------------------------------------ backends

/// A request as an app received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    host: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

/// One pod: an HBONE server relaying `APP_HTTP` to an app that records each request
/// (once its body has ended), waits while held, then answers `status`.
struct Backend {
    ip: IpAddr,
    hbone: ServerHandle,
    seen: Arc<Mutex<Vec<Seen>>>,
    connects: Arc<Mutex<Vec<InboundRequest>>>,
    /// `false` holds every answer until set to `true`.
    open: watch::Sender<bool>,
}

impl Backend {
    async fn start(ca: &Ca, name: &'static str, ip: &str, sa: &str, status: StatusCode) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (open, gate) = watch::channel(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        let mut gate = gate.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            record.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                host: parts
                                    .headers
                                    .get("host")
                                    .map(|h| h.to_str().unwrap().to_owned()),
                                headers: parts.headers,
                                body,
                            });
                            let _ = gate.wait_for(|open| *open).await;
                            let mut r = Response::new(Full::new(Bytes::from(name)));
                            *r.status_mut() = status;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        let connects = Arc::new(Mutex::new(Vec::new()));
        let seen_connects = connects.clone();
        let handler = move |req: InboundRequest| {
            let seen_connects = seen_connects.clone();
            async move {
                if req.target.port() != APP_HTTP {
                    return Err(Refusal::BadRequest);
                }
                seen_connects.lock().unwrap().push(req);
                TcpStream::connect(app)
                    .await
                    .map_err(|_| Refusal::UpstreamUnavailable)
            }
        };
        let hbone = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(SingleIdentity::new(ca.store(sa), ca.id(sa))),
            handler,
            ServerConfig::default(),
        )
        .await
        .unwrap()
        .serve();
        Self {
            ip: ip.parse().unwrap(),
            hbone,
            seen,
            connects,
            open,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Dials each pod's `ip:15008` at its stand-in server; other pods refuse.
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

fn workload(name: &str, ip: &str, sa: &str) -> Resource {
    Resource::new(Kind::Workload(pb::Workload {
        uid: name.into(),
        name: name.into(),
        namespace: NS.into(),
        addresses: vec![ip.into()],
        service_account: sa.into(),
        spiffe_id: format!("spiffe://cluster.local/ns/{NS}/sa/{sa}"),
        captured: true,
        protocol: TunnelProtocol::Hbone as i32,
        ..Default::default()
    }))
}

fn service(name: &str, vip: &str, endpoint: &str, fronted: bool) -> Resource {
    Resource::new(Kind::Service(pb::Service {
        name: name.into(),
        namespace: NS.into(),
        hostname: format!("{name}.{NS}.svc.cluster.local"),
        vips: vec![vip.into()],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: APP_HTTP.into(),
            app_protocol: String::new(),
            protocol: AppProtocol::Http1 as i32,
        }],
        endpoints: vec![pb::Endpoint {
            workload_uid: endpoint.into(),
            ports: Default::default(),
        }],
        waypoint: fronted.then(|| pb::WaypointRef {
            gateway: Some(nn("waypoint")),
            service: Some(nn("waypoint")),
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/waypoint".into(),
            hbone_port: 15008,
        }),
        labels: Default::default(),
    }))
}

fn cluster() -> Vec<Resource> {
    vec![
        workload("payment-v1", "10.244.1.2", "payment"),
        workload("shadow-1", "10.244.1.5", "shadow"),
        workload("audit-1", "10.244.1.6", "audit"),
        service("payment", PAYMENT_VIP, "payment-v1", true),
        service("payment-shadow", "10.96.0.30", "shadow-1", false),
        service("audit", "10.96.0.40", "audit-1", false),
    ]
}

fn mirror(service: &str, percent: f64) -> pb::Mirror {
    pb::Mirror {
        destination: Some(pb::RouteDestination {
            service: Some(nn(service)),
            weight: 1,
            ..Default::default()
        }),
        percent,
    }
}

/// payment's routes: everything to payment, copied to `mirrors`.
fn routes(mirrors: Vec<pb::Mirror>, fault: Option<pb::FaultInjection>) -> Resource {
    Resource::new(Kind::RouteSet(pb::RouteSet {
        service: Some(nn("payment")),
        routes: vec![pb::Route {
            name: "mirrored".into(),
            action: Some(pb::route::Action::Forward(pb::Forward {
                destinations: vec![pb::RouteDestination {
                    service: Some(nn("payment")),
                    weight: 1,
                    ..Default::default()
                }],
                mirrors,
                fault,
                ..Default::default()
            })),
            ..Default::default()
        }],
    }))
}

fn snapshot(routes: Resource, generation: u64) -> Snapshot {
    let mut resources = cluster();
    resources.push(routes);
    Snapshot::build(
        ObjectName::new(NS, "waypoint"),
        &resources,
        generation,
        &SnapshotShared::new(SharedRng::seeded(generation)),
    )
    .unwrap()
}

// ------------------------------------------------------------------ the setup

struct Setup {
    ca: Ca,
    waypoint: SocketAddr,
    config: watch::Sender<Arc<Snapshot>>,
    plane: Arc<DataPlane>,
    _server: ServerHandle,
    payment: Backend,
    shadow: Backend,
    client: Pool,
    registry: Registry,
    mirrors: MirrorMetrics,
}

type ClientBody = BoxBody<Bytes, Infallible>;

impl Setup {
    async fn start(routes: Resource) -> Self {
        let _ = rustls::crypto::CryptoProvider::install_default(
            ambit_identity::tls::crypto_provider().as_ref().clone(),
        );
        let ca = Ca::new();
        let payment =
            Backend::start(&ca, "payment-v1", "10.244.1.2", "payment", StatusCode::OK).await;
        let shadow = Backend::start(
            &ca,
            "shadow-1",
            "10.244.1.5",
            "shadow",
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
        let dialer = PodDialer(
            [&payment, &shadow]
                .iter()
                .map(|b| (SocketAddr::new(b.ip, 15008), b.hbone.local_addr()))
                .collect(),
        );
        let (config, rx) = watch::channel(Arc::new(snapshot(routes, 1)));
        let mut registry = Registry::default();
        let telemetry = TelemetryLayer::new(RequestMetrics::register(&mut registry));
        let mirrors = MirrorMetrics::register(&mut registry);
        let options = DataPlaneOptions {
            telemetry,
            router: RouterOptions {
                rng: SharedRng::seeded(7),
                mirror: MirrorOptions {
                    body_limit: BODY_LIMIT,
                    limiter: MirrorLimiter::new(MAX_IN_FLIGHT),
                    metrics: mirrors.clone(),
                    ..MirrorOptions::default()
                },
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
        let server = plane
            .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let client = Pool::new(PoolConfig::default(), ca.store("checkout"));
        Self {
            waypoint: server.local_addr(),
            ca,
            config,
            plane,
            _server: server,
            payment,
            shadow,
            client,
            registry,
            mirrors,
        }
    }

    fn reconfigure(&self, routes: Resource, generation: u64) {
        self.config
            .send_replace(Arc::new(snapshot(routes, generation)));
    }

    /// An HTTP/1.1 client on a tunnel to payment's VIP, as checkout.
    async fn client(&self) -> hyper::client::conn::http1::SendRequest<ClientBody> {
        let mut request = ConnectRequest::new(
            self.ca.id("checkout"),
            self.ca.id("waypoint"),
            self.waypoint,
            SocketAddr::new(PAYMENT_VIP.parse().unwrap(), 80),
        );
        request.forwarded_for = Some(CLIENT_IP.parse().unwrap());
        let stream = self.client.connect(request).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn count(&self, service: &str, outcome: MirrorOutcome) -> u64 {
        self.mirrors.count(&nn(service), outcome)
    }

    /// Waits until no mirror is outstanding.
    async fn mirrors_settled(&self) {
        until("no mirror outstanding", || {
            self.plane.mirrors_in_flight() == 0
        })
        .await;
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    eventually_async(what, DEADLINE, POLL, || {
        let ok = check();
        async move {
            anyhow::ensure!(ok, "not yet");
            Ok(())
        }
    })
    .await
    .unwrap();
}

/// Sends `request`, within the deadline; the status and body.
async fn send(
    client: &mut hyper::client::conn::http1::SendRequest<ClientBody>,
    request: Request<ClientBody>,
) -> (StatusCode, String) {
    tokio::time::timeout(DEADLINE, async {
        client.ready().await.unwrap();
        let response = client.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .expect("the client's response within the deadline")
}

fn post(path: &str, body: ClientBody) -> Request<ClientBody> {
    Request::post(path).header("host", HOST).body(body).unwrap()
}

fn full(text: impl Into<Bytes>) -> ClientBody {
    Full::new(text.into()).boxed()
}

/// A body sent in chunks, of unknown length until it ends (chunked encoding).
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

fn chunked(chunks: &[&'static str]) -> ClientBody {
    Chunks(
        chunks
            .iter()
            .map(|c| Bytes::from_static(c.as_bytes()))
            .collect(),
    )
    .boxed()
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn the_mirror_gets_a_copy_with_the_shadow_host() {
    let mut copy = mirror("payment-shadow", 100.0);
    if let Some(d) = &mut copy.destination {
        d.request_headers = Some(pb::HeaderModifier {
            set: vec![pb::HeaderValue {
                name: "x-mirror".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        });
    }
    let setup = Setup::start(routes(vec![copy], None)).await;
    let mut client = setup.client().await;

    // With a known length, and chunked (mirrored once it has ended within the bound).
    let a = send(&mut client, post("/orders", full("order=42"))).await;
    assert_eq!(a, (StatusCode::OK, "payment-v1".to_owned()));
    let a = send(&mut client, post("/chunked", chunked(&["par", "tial"]))).await;
    assert_eq!(a, (StatusCode::OK, "payment-v1".to_owned()));
    let get = Request::get("/status?x=1")
        .header("host", HOST)
        .body(full(""))
        .unwrap();
    let a = send(&mut client, get).await;
    assert_eq!(a.0, StatusCode::OK);
    until("three copies at the mirror", || {
        setup.shadow.seen().len() == 3
    })
    .await;
    setup.mirrors_settled().await;

    let mut seen = setup.shadow.seen();
    seen.sort_by(|a, b| a.path.cmp(&b.path));
    let got: Vec<(&str, &str, &[u8])> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str(), s.body.as_ref()))
        .collect();
    assert_eq!(
        got,
        [
            ("POST", "/chunked", b"partial".as_slice()),
            ("POST", "/orders", b"order=42".as_slice()),
            ("GET", "/status", b"".as_slice()),
        ]
    );
    for s in &seen {
        assert_eq!(
            s.host.as_deref(),
            Some("payment.shop.svc.cluster.local-shadow")
        );
        assert_eq!(s.headers.get("x-mirror").unwrap(), "yes");
    }
    // The original is unchanged: its own host, no mirror header, the whole body.
    let original = setup.payment.seen();
    assert_eq!(original.len(), 3);
    for s in &original {
        assert_eq!(s.host.as_deref(), Some(HOST));
        assert!(s.headers.get("x-mirror").is_none());
    }
    assert!(original.iter().any(|s| s.body.as_ref() == b"order=42"));
    // The copy went over HBONE as the waypoint, naming the original client.
    let connect = setup.shadow.connects.lock().unwrap()[0].clone();
    assert_eq!(connect.peer, setup.ca.id("waypoint"));
    assert_eq!(connect.target, "10.244.1.5:8080".parse().unwrap());
    assert_eq!(connect.forwarded_for, Some(CLIENT_IP.parse().unwrap()));
    // The mirror answered 503: counted as sent, invisible to the client.
    assert_eq!(setup.count("payment-shadow", MirrorOutcome::Sent), 3);

    // Bodies over the bound, announced or found while streaming, are not copied; the
    // original still gets all of it.
    let big = "x".repeat(BODY_LIMIT + 1);
    let a = send(&mut client, post("/big", full(big.clone()))).await;
    assert_eq!(a.0, StatusCode::OK);
    let half = "y".repeat(BODY_LIMIT / 2 + 1);
    let half: &'static str = Box::leak(half.into_boxed_str());
    let a = send(&mut client, post("/big-chunked", chunked(&[half, half]))).await;
    assert_eq!(a.0, StatusCode::OK);
    setup.mirrors_settled().await;
    assert_eq!(
        setup.count("payment-shadow", MirrorOutcome::BodyTooLarge),
        2
    );
    assert_eq!(setup.shadow.seen().len(), 3);
    let bodies: Vec<usize> = setup.payment.seen().iter().map(|s| s.body.len()).collect();
    assert_eq!(bodies[3..], [BODY_LIMIT + 1, 2 * half.len()]);
    let metrics = setup.metrics();
    assert!(
        metrics.contains(
            r#"ambit_waypoint_mirror_requests_total{destination_service_name="payment-shadow",destination_service_namespace="shop",outcome="body_too_large"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failing_or_slow_mirror_does_not_change_the_clients_response() {
    // A mirror nobody serves: every copy fails to connect.
    let setup = Setup::start(routes(vec![mirror("audit", 100.0)], None)).await;
    let mut client = setup.client().await;
    for i in 0..10 {
        let a = send(&mut client, post("/orders", full(format!("order={i}")))).await;
        assert_eq!(a, (StatusCode::OK, "payment-v1".to_owned()), "request {i}");
    }
    setup.mirrors_settled().await;
    assert_eq!(setup.count("audit", MirrorOutcome::Failed), 10);

    // A mirror that does not answer until released (then with 503): the client's
    // requests complete while it hangs; copies beyond the in-flight bound are
    // dropped, not queued.
    setup.shadow.open.send_replace(false);
    setup.reconfigure(routes(vec![mirror("payment-shadow", 100.0)], None), 2);
    let mut client = setup.client().await;
    for i in 0..10 {
        let a = send(&mut client, post("/orders", full(format!("order={i}")))).await;
        assert_eq!(a, (StatusCode::OK, "payment-v1".to_owned()), "request {i}");
    }
    until("the held copies at the mirror", || {
        setup.shadow.seen().len() == MAX_IN_FLIGHT
    })
    .await;
    assert_eq!(setup.plane.mirrors_in_flight(), MAX_IN_FLIGHT);
    assert_eq!(
        setup.count("payment-shadow", MirrorOutcome::Overloaded),
        (10 - MAX_IN_FLIGHT) as u64
    );
    let held: Vec<Bytes> = setup.shadow.seen().into_iter().map(|s| s.body).collect();
    assert_eq!(held, ["order=0", "order=1", "order=2", "order=3"]);
    setup.shadow.open.send_replace(true);
    setup.mirrors_settled().await;
    assert_eq!(
        setup.count("payment-shadow", MirrorOutcome::Sent),
        MAX_IN_FLIGHT as u64
    );
    // Room again once they finished.
    let a = send(&mut client, post("/orders", full("order=after"))).await;
    assert_eq!(a.0, StatusCode::OK);
    until("the copy after release", || {
        setup.shadow.seen().len() == MAX_IN_FLIGHT + 1
    })
    .await;
    assert_eq!(setup.payment.seen().len(), 21);
}

#[tokio::test]
async fn the_mirror_percentage_is_roughly_honoured() {
    let setup = Setup::start(routes(vec![mirror("payment-shadow", 25.0)], None)).await;
    let mut client = setup.client().await;
    let total = 400;
    for _ in 0..total {
        let get = Request::get("/")
            .header("host", HOST)
            .body(full(""))
            .unwrap();
        assert_eq!(send(&mut client, get).await.0, StatusCode::OK);
    }
    setup.mirrors_settled().await;
    let mirrored = setup.shadow.seen().len();
    // 25 % of 400 = 100, standard deviation ≈ 8.7: ±40 is over four deviations.
    assert!(
        (60..=140).contains(&mirrored),
        "mirrored {mirrored} of {total}"
    );
    assert_eq!(
        setup.count("payment-shadow", MirrorOutcome::Sent),
        mirrored as u64
    );
    assert_eq!(setup.payment.seen().len(), total);
}

#[tokio::test]
async fn an_aborted_request_is_not_mirrored() {
    let abort = pb::FaultInjection {
        delay: None,
        abort: Some(pb::FaultAbort {
            error: Some(pb::fault_abort::Error::HttpStatus(418)),
            percent: 100.0,
        }),
    };
    let setup = Setup::start(routes(vec![mirror("payment-shadow", 100.0)], Some(abort))).await;
    let mut client = setup.client().await;
    for _ in 0..5 {
        let a = send(&mut client, post("/orders", full("order=1"))).await;
        assert_eq!(a.0, StatusCode::IM_A_TEAPOT);
    }
    // The decision is taken before the response: nothing was even started.
    assert_eq!(setup.plane.mirrors_in_flight(), 0);
    assert!(setup.shadow.connects.lock().unwrap().is_empty());
    assert!(
        !setup
            .metrics()
            .contains("ambit_waypoint_mirror_requests_total{"),
        "{}",
        setup.metrics()
    );
}
