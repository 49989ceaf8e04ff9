//! In-process HBONE tests: real TLS over real sockets on loopback, certificates
//! minted by a test CA.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test with its location"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ambit_hbone::{
    Baggage, CertStore, ConnectError, ConnectRequest, Credentials, Handler, HboneStream,
    IdentityByAddress, InboundRequest, Keepalive, Pool, PoolConfig, Refusal, Server, ServerConfig,
    ServerCredentials, ServerHandle, SingleIdentity, Traceparent,
};
use ambit_identity::tls::{SpiffeServerVerifier, crypto_provider};
use ambit_identity::{
    CertificateAuthority, SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate, WorkloadKey,
};
use ambit_test_support::eventually_async;
use anyhow::{Context as _, bail, ensure};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Bound on anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(20);
/// Polling interval for conditions.
const POLL: Duration = Duration::from_millis(10);

struct Mesh {
    ca: CertificateAuthority,
    bundle: Arc<TrustBundle>,
}

impl Mesh {
    fn new() -> Self {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap();
        let bundle = Arc::new(ca.trust_bundle().clone());
        Self { ca, bundle }
    }

    fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::new(self.ca.trust_domain(), "production", sa).unwrap()
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

    /// A store holding fresh certificates for `sas`.
    fn store(&self, sas: &[&str]) -> Arc<CertStore> {
        let store = Arc::new(CertStore::new(self.bundle.clone()));
        for sa in sas {
            store.insert(self.cert(sa));
        }
        store
    }
}

/// Records every CONNECT, refuses `deny`, connects to the target otherwise.
#[derive(Clone)]
struct Policy {
    deny: Option<SpiffeId>,
    seen: mpsc::UnboundedSender<InboundRequest>,
}

fn forwarding(deny: Option<SpiffeId>) -> (Policy, mpsc::UnboundedReceiver<InboundRequest>) {
    let (seen, rx) = mpsc::unbounded_channel();
    (Policy { deny, seen }, rx)
}

fn handler(policy: Policy) -> impl Handler<Upstream = TcpStream> {
    move |req: InboundRequest| {
        let policy = policy.clone();
        async move {
            let _ = policy.seen.send(req.clone());
            if policy.deny.as_ref() == Some(&req.peer) {
                return Err(Refusal::PolicyDenied);
            }
            TcpStream::connect(req.target)
                .await
                .map_err(|_| Refusal::UpstreamUnavailable)
        }
    }
}

/// A handler that is a type rather than a closure: serves one target only.
struct OnlyTarget(SocketAddr);

impl Handler for OnlyTarget {
    type Upstream = TcpStream;

    async fn handle(&self, request: InboundRequest) -> Result<TcpStream, Refusal> {
        if request.target != self.0 {
            return Err(Refusal::BadRequest);
        }
        TcpStream::connect(request.target)
            .await
            .map_err(|_| Refusal::UpstreamUnavailable)
    }
}

async fn serve<H: Handler>(
    credentials: Arc<dyn ServerCredentials>,
    handler: H,
    config: ServerConfig,
) -> ServerHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Server::bind(addr, credentials, handler, config)
        .await
        .unwrap()
        .serve()
}

/// A TCP echo server: echoes until EOF, then closes its write side.
async fn echo_server() -> SocketAddr {
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

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn request(
    mesh: &Mesh,
    src: &str,
    dst: &str,
    via: SocketAddr,
    target: SocketAddr,
) -> ConnectRequest {
    ConnectRequest::new(mesh.id(src), mesh.id(dst), via, target)
}

async fn echo_once(stream: &mut HboneStream, msg: &[u8]) -> anyhow::Result<()> {
    stream.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .context("echo timed out")??;
    ensure!(buf == msg, "echo mismatch");
    Ok(())
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    eventually_async(what, DEADLINE, POLL, || {
        let ok = cond();
        async move { if ok { Ok(()) } else { bail!("not yet") } }
    })
    .await
    .unwrap();
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_carries_64_mib_each_way_byte_exact() {
    const LEN: usize = 64 * 1024 * 1024;
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);
    let stream = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();

    let data = Arc::new(pattern(LEN, 0x5eed));
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(256 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    });
    let mut back = Vec::with_capacity(LEN);
    timeout(Duration::from_secs(120), rd.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(back.len(), LEN);
    assert!(back == *data, "echoed bytes differ");
    assert_eq!(server.stats().tls_connections, 1);
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);

    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let pool = pool.clone();
        let req = request(&mesh, "checkout", "payment", server.local_addr(), echo);
        tasks.push(tokio::spawn(async move {
            let mut s = pool.connect(req).await?;
            echo_once(&mut s, format!("hello {i}").as_bytes()).await?;
            anyhow::Ok(s)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap().unwrap());
    }
    let stats = server.stats();
    assert_eq!(stats.tls_connections, 1, "{stats:?}");
    assert_eq!(stats.streams, 32, "{stats:?}");
    assert_eq!(pool.connections(), 1);
}

#[tokio::test]
async fn a_saturated_connection_makes_the_pool_open_another() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let config = ServerConfig {
        max_concurrent_streams: 2,
        ..ServerConfig::default()
    };
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        config,
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);

    let mut held = Vec::new();
    for i in 0..5u8 {
        let mut s = pool
            .connect(request(
                &mesh,
                "checkout",
                "payment",
                server.local_addr(),
                echo,
            ))
            .await
            .unwrap();
        echo_once(&mut s, &[i; 10]).await.unwrap();
        held.push(s);
    }
    assert_eq!(server.stats().tls_connections, 3);
    assert_eq!(pool.connections(), 3);

    // Freed slots are reused rather than opening a fourth connection.
    held.truncate(3);
    for _ in 0..2 {
        let mut s = pool
            .connect(request(
                &mesh,
                "checkout",
                "payment",
                server.local_addr(),
                echo,
            ))
            .await
            .unwrap();
        echo_once(&mut s, b"again").await.unwrap();
        held.push(s);
    }
    assert_eq!(server.stats().tls_connections, 3);
}

#[tokio::test]
async fn the_client_refuses_a_server_with_another_identity() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "inventory"]);
    let (policy, mut seen) = forwarding(None);
    // The server is inventory, with a perfectly valid certificate of the mesh.
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("inventory"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo_server().await,
        ))
        .await
        .unwrap_err();
    let ConnectError::Connection { source, .. } = &err else {
        panic!("expected a connection error, got {err:?}");
    };
    let tls = source.tls_error().unwrap_or_else(|| panic!("{source:?}"));
    assert!(
        matches!(tls, rustls::Error::InvalidCertificate(_)),
        "{tls:?}"
    );
    let text = format!("{tls:?}");
    assert!(text.contains("UnexpectedIdentity"), "{text}");
    assert!(seen.try_recv().is_err(), "no CONNECT may reach the handler");
    assert_eq!(pool.connections(), 0);
}

#[tokio::test]
async fn the_client_refuses_a_server_certificate_from_another_ca() {
    let mesh = Mesh::new();
    let rogue = Mesh::new();
    let store = mesh.store(&["checkout"]);
    let rogue_store = rogue.store(&["payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(rogue_store, rogue.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo_server().await,
        ))
        .await
        .unwrap_err();
    let ConnectError::Connection { source, .. } = &err else {
        panic!("expected a connection error, got {err:?}");
    };
    assert!(
        matches!(
            source.tls_error(),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature
            ))
        ),
        "{source:?}"
    );
}

#[tokio::test]
async fn the_server_refuses_a_client_without_certificate() {
    let mesh = Mesh::new();
    let store = mesh.store(&["payment"]);
    let (policy, mut seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store, mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;

    let verifier = SpiffeServerVerifier::new(mesh.bundle.clone(), mesh.id("payment"));
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let outcome = async {
        // TLS 1.3: the client finishes its side first; the server's verdict
        // arrives as an alert on the next read.
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(IpAddr::from([127, 0, 0, 1]).into(), tcp)
            .await?;
        let (mut send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri("127.0.0.1:80")
            .body(())?;
        let (resp, _body) = send.send_request(req, false)?;
        let resp = resp.await?;
        anyhow::Ok(resp.status())
    };
    let res = timeout(DEADLINE, outcome).await.unwrap();
    assert!(res.is_err(), "a client without certificate got {res:?}");
    wait_for("the server counts the failed handshake", || {
        server.stats().handshake_failures == 1
    })
    .await;
    assert_eq!(server.stats().tls_connections, 0);
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn a_policy_denial_is_a_typed_401() {
    let mesh = Mesh::new();
    let store = mesh.store(&["inventory", "checkout", "payment"]);
    let (policy, mut seen) = forwarding(Some(mesh.id("inventory")));
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "inventory",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err:?}");
    assert_eq!(err.refusal(), Some(Refusal::PolicyDenied));
    assert_eq!(seen.recv().await.unwrap().peer, mesh.id("inventory"));

    // The same connection machinery still serves an allowed client.
    let mut ok = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut ok, b"allowed").await.unwrap();
    assert_eq!(server.stats().refused_streams, 1);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_typed_503() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            closed_port().await,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{err:?}"
    );
    assert_eq!(err.refusal(), Some(Refusal::UpstreamUnavailable));
}

#[tokio::test]
async fn a_target_the_handler_does_not_serve_is_400() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let echo = echo_server().await;
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        OnlyTarget(echo),
        ServerConfig::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            closed_port().await,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::BadRequest), "{err:?}");
    let mut ok = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut ok, b"served").await.unwrap();
}

#[tokio::test]
async fn a_malformed_connect_is_400() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, mut seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;

    // A raw HBONE client, to send what the pool never would.
    let tls_config = ambit_hbone::tls::client_config(
        &store.certificate(&mesh.id("checkout")).unwrap(),
        mesh.bundle.clone(),
        mesh.id("payment"),
    )
    .unwrap();
    let tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_config)
        .connect(IpAddr::from([127, 0, 0, 1]).into(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);

    let cases = [
        (Method::CONNECT, "payment.production.svc:8080"),
        (Method::CONNECT, "10.0.0.1"),
        (Method::GET, "http://127.0.0.1:80/"),
    ];
    for (method, uri) in cases {
        let mut send = send.clone().ready().await.unwrap();
        let req = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(())
            .unwrap();
        let (resp, _body) = send.send_request(req, false).unwrap();
        let resp = timeout(DEADLINE, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{method} {uri}");
    }
    assert!(
        seen.try_recv().is_err(),
        "malformed requests never reach the handler"
    );
    assert_eq!(server.stats().refused_streams, 3);
}

#[tokio::test]
async fn half_close_propagates_from_client_to_upstream_and_back() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;

    // Upstream 1 answers only after EOF: the client's FIN must get through while the
    // way back stays open.
    let after_eof = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let after_eof_addr = after_eof.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = after_eof.accept().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        tcp.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
    });
    let pool = Pool::new(PoolConfig::default(), store);
    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            after_eof_addr,
        ))
        .await
        .unwrap();
    s.write_all(&[7; 1000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    timeout(DEADLINE, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 1000 bytes");

    // Upstream 2 closes its write side first and keeps reading: its FIN reaches the
    // client as EOF while the client can still send.
    let first_fin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first_fin_addr = first_fin.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = first_fin.accept().await.unwrap();
        tcp.write_all(b"bye").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        let _ = got_tx.send(got);
    });
    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            first_fin_addr,
        ))
        .await
        .unwrap();
    let mut greeting = Vec::new();
    timeout(DEADLINE, s.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"bye");
    s.write_all(b"still talking").await.unwrap();
    s.shutdown().await.unwrap();
    let got = timeout(DEADLINE, got_rx).await.unwrap().unwrap();
    assert_eq!(got, b"still talking");
}

#[tokio::test]
async fn forwarded_traceparent_and_baggage_reach_the_handler() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, mut seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store.clone());
    let traceparent =
        Traceparent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let client_ip: IpAddr = "10.1.2.3".parse().unwrap();
    let req = ConnectRequest {
        forwarded_for: Some(client_ip),
        traceparent: Some(traceparent.clone()),
        baggage: Some(Baggage::new("k8s.pod.name=checkout-0").unwrap()),
        ..request(&mesh, "checkout", "payment", server.local_addr(), echo)
    };
    let mut s = pool.connect(req).await.unwrap();
    echo_once(&mut s, b"x").await.unwrap();

    let got = seen.recv().await.unwrap();
    assert_eq!(got.forwarded_for, Some(client_ip));
    assert_eq!(got.headers.get("forwarded").unwrap(), "for=10.1.2.3");
    assert_eq!(got.traceparent, Some(traceparent));
    assert_eq!(got.baggage.unwrap().as_str(), "k8s.pod.name=checkout-0");
    assert_eq!(got.target, echo);
    assert_eq!(got.peer, mesh.id("checkout"));
    assert_eq!(
        got.peer_certificate,
        store.certificate(&mesh.id("checkout")).unwrap().chain_der()[0]
    );
    assert_eq!(got.local_identity, mesh.id("payment"));
    assert_eq!(got.local_addr, server.local_addr());
}

#[tokio::test]
async fn the_server_picks_its_certificate_by_local_address() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment", "inventory"]);
    let by_addr = Arc::new(IdentityByAddress::new(store.clone()));
    by_addr.insert([127, 0, 0, 1].into(), mesh.id("payment"));
    by_addr.insert([127, 0, 0, 2].into(), mesh.id("inventory"));
    let (policy, mut seen) = forwarding(None);
    let server = Server::bind(
        "0.0.0.0:0".parse().unwrap(),
        by_addr,
        handler(policy),
        ServerConfig::default(),
    )
    .await
    .unwrap()
    .serve();
    let port = server.local_addr().port();
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));

    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            at([127, 0, 0, 1]),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut s, b"p").await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap().local_identity,
        mesh.id("payment")
    );
    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "inventory",
            at([127, 0, 0, 2]),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut s, b"i").await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap().local_identity,
        mesh.id("inventory")
    );
    // 127.0.0.2 is inventory, whatever the client hoped for.
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            at([127, 0, 0, 2]),
            echo,
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Connection { .. }), "{err:?}");
    // An address without identity gets no TLS at all.
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            at([127, 0, 0, 3]),
            echo,
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Connection { .. }), "{err:?}");
}

#[tokio::test]
async fn drain_sends_goaway_lets_streams_finish_and_the_pool_reconnects() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let echo = echo_server().await;
    // Two handles on one listening socket: the second server takes over the port
    // when the first has drained (as a restarted daemon would).
    let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = first.try_clone().unwrap();
    let addr = first.local_addr().unwrap();
    let credentials: Arc<dyn ServerCredentials> =
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment")));
    let (policy, _seen) = forwarding(None);
    let old = Server::from_std(
        first,
        credentials.clone(),
        handler(policy.clone()),
        ServerConfig::default(),
    )
    .unwrap()
    .serve();
    let pool = Pool::new(PoolConfig::default(), store);

    let mut inflight = pool
        .connect(request(&mesh, "checkout", "payment", addr, echo))
        .await
        .unwrap();
    echo_once(&mut inflight, b"before").await.unwrap();
    assert_eq!(pool.connections(), 1);

    let draining = tokio::spawn(old.drain(DEADLINE));
    wait_for("the client sees GOAWAY", || pool.connections() == 0).await;
    // The stream in flight is not cut.
    echo_once(&mut inflight, b"during drain").await.unwrap();

    let new = Server::from_std(
        second,
        credentials,
        handler(policy),
        ServerConfig::default(),
    )
    .unwrap()
    .serve();
    let mut fresh = pool
        .connect(request(&mesh, "checkout", "payment", addr, echo))
        .await
        .unwrap();
    echo_once(&mut fresh, b"after").await.unwrap();
    assert_eq!(new.stats().tls_connections, 1);
    assert_eq!(pool.connections(), 1);

    inflight.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(DEADLINE, inflight.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    drop(inflight);
    let report = timeout(DEADLINE, draining).await.unwrap().unwrap();
    assert_eq!(report.forced_connections, 0);
}

#[tokio::test]
async fn drain_closes_what_outlives_the_deadline() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store);
    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut s, b"hold").await.unwrap();
    let report = server.drain(Duration::from_millis(200)).await;
    assert_eq!(report.forced_connections, 1);
    // The stream ends (error or EOF) instead of hanging.
    let mut buf = [0; 16];
    let ended = timeout(DEADLINE, s.read(&mut buf)).await.unwrap();
    assert!(matches!(ended, Err(_) | Ok(0)), "{ended:?}");
}

#[tokio::test]
async fn rotation_new_connections_present_the_new_certificate() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, mut seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let pool = Pool::new(PoolConfig::default(), store.clone());
    let old_cert = store.certificate(&mesh.id("checkout")).unwrap();

    let mut old = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut old, b"old").await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap().peer_certificate,
        old_cert.chain_der()[0]
    );

    let new_cert = mesh.cert("checkout");
    store.insert(new_cert.clone());
    let mut new = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut new, b"new").await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap().peer_certificate,
        new_cert.chain_der()[0]
    );
    assert_eq!(server.stats().tls_connections, 2);
    // The old connection left the pool but its stream goes on.
    assert_eq!(pool.connections(), 1);
    echo_once(&mut old, b"old still works").await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;
    let config = PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let pool = Pool::new(config, store);
    let mut s = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            echo,
        ))
        .await
        .unwrap();
    echo_once(&mut s, b"busy").await.unwrap();
    drop(s);
    wait_for("the pool closes the idle connection", || {
        pool.connections() == 0
    })
    .await;
    wait_for("the server sees it closed", || {
        server.stats().open_connections == 0
    })
    .await;
}

#[tokio::test]
async fn keepalive_detects_a_dead_peer() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    let echo = echo_server().await;

    // A relay that can be frozen: sockets stay open, nothing goes through.
    let frozen = Arc::new(AtomicBool::new(false));
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server_addr = server.local_addr();
    let relay_frozen = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = relay.accept().await {
            let upstream = TcpStream::connect(server_addr).await.unwrap();
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::spawn(pump(cr, uw, relay_frozen.clone()));
            tokio::spawn(pump(ur, cw, relay_frozen.clone()));
        }
    });

    let config = PoolConfig {
        keepalive: Keepalive {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
        },
        ..PoolConfig::default()
    };
    let pool = Pool::new(config, store);
    let mut s = pool
        .connect(request(&mesh, "checkout", "payment", relay_addr, echo))
        .await
        .unwrap();
    echo_once(&mut s, b"alive").await.unwrap();
    frozen.store(true, Ordering::SeqCst);
    wait_for("the pool drops the dead connection", || {
        pool.connections() == 0
    })
    .await;
    let mut buf = [0; 16];
    let ended = timeout(DEADLINE, s.read(&mut buf)).await.unwrap();
    assert!(ended.is_err(), "{ended:?}");
}

/// Copies until `frozen`, then holds the data and the sockets forever.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_missing_source_certificate_is_a_typed_error() {
    let mesh = Mesh::new();
    let store = mesh.store(&["payment"]);
    let pool = Pool::new(PoolConfig::default(), store);
    let err = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            closed_port().await,
            closed_port().await,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectError::NoCertificate { identity } if *identity == mesh.id("checkout")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_copy_that_fails_still_reports_what_it_moved() {
    let mesh = Mesh::new();
    let store = mesh.store(&["checkout", "payment"]);
    let (policy, _seen) = forwarding(None);
    let server = serve(
        Arc::new(SingleIdentity::new(store.clone(), mesh.id("payment"))),
        handler(policy),
        ServerConfig::default(),
    )
    .await;
    // The app: reads 1000 bytes, answers 500, then resets once told to.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let (reset_tx, reset_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = app.accept().await.unwrap();
        let mut buf = vec![0; 1000];
        tcp.read_exact(&mut buf).await.unwrap();
        tcp.write_all(&[7; 500]).await.unwrap();
        let _ = reset_rx.await;
        tcp.set_zero_linger().unwrap();
        drop(tcp);
    });
    let pool = Pool::new(PoolConfig::default(), store);
    let tunnel = pool
        .connect(request(
            &mesh,
            "checkout",
            "payment",
            server.local_addr(),
            app_addr,
        ))
        .await
        .unwrap();
    // The client side of the relay: a socket pair, one end copied into the tunnel.
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (mut relayed, _) = local.accept().await.unwrap();
    let copy =
        tokio::spawn(
            async move { ambit_hbone::copy_bidirectional_counted(tunnel, &mut relayed).await },
        );
    client.write_all(&[1; 1000]).await.unwrap();
    let mut answer = vec![0; 500];
    timeout(DEADLINE, client.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    reset_tx.send(()).unwrap();
    let (moved, result) = timeout(DEADLINE, copy).await.unwrap().unwrap();
    assert!(result.is_err(), "the reset must end the copy with an error");
    assert_eq!((moved.sent, moved.received), (1000, 500));
}
