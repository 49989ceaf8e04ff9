//! The certificate authority over real gRPC on 127.0.0.1:0: node authorization against
//! an in-test identity authority, waypoints limited to their own identity, refusals
//! with the documented codes, and certificates that are SPIFFE SVIDs chaining to the
//! returned bundle.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ambit_api::{
    BearerToken,
    ca::v1::{
        CreateCertificateRequest, CreateCertificateResponse,
        certificate_service_client::CertificateServiceClient,
    },
};
use ambit_controller::{
    auth::{BootstrapTokens, TokensFile},
    ca::CaServer,
    metrics::Metrics,
    view::IdentityAuthority,
};
use ambit_identity::{
    CertificateAuthority, Purpose, SpiffeId, TrustBundle, TrustDomain, WorkloadKey, cert,
    verify_chain,
};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, transport::Channel};

/// Node → identities of its pods; waypoint → its identity.
#[derive(Debug, Default)]
struct Authority {
    pods: BTreeSet<(String, String)>,
    waypoints: Vec<((String, String), String)>,
}

impl IdentityAuthority for Authority {
    fn node_may_hold(&self, node: &str, id: &SpiffeId) -> bool {
        self.pods
            .contains(&(node.to_owned(), id.as_str().to_owned()))
    }

    fn waypoint_identity(&self, namespace: &str, name: &str) -> Option<SpiffeId> {
        self.waypoints
            .iter()
            .find(|((ns, n), _)| ns == namespace && n == name)
            .map(|(_, id)| SpiffeId::parse(id).unwrap())
    }
}

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/wp";
const TTL: Duration = Duration::from_secs(3600);

struct Harness {
    addr: SocketAddr,
    bundle_pem: Vec<String>,
    worlds: watch::Sender<Option<Arc<Authority>>>,
    _server: tokio::task::JoinHandle<()>,
}

async fn start(synced: bool) -> Harness {
    let authority = Authority {
        pods: [("node-1".to_owned(), CHECKOUT.to_owned())].into(),
        waypoints: vec![(("shop".into(), "wp".into()), WAYPOINT.into())],
    };
    let (tx, rx) = watch::channel(synced.then(|| Arc::new(authority)));
    let ca = CertificateAuthority::generate(
        TrustDomain::new("cluster.local").unwrap(),
        Duration::from_secs(86_400 * 30),
    )
    .unwrap();
    let bundle_pem = ca.trust_bundle().roots_pem().to_vec();
    let tokens: TokensFile = serde_yaml::from_str(
        "tokens: [{token: node-1-token, node: node-1}, {token: wp-token, waypoint: shop/wp}]",
    )
    .unwrap();
    let auth = Arc::new(BootstrapTokens::from_entries(&tokens).unwrap());
    let server = CaServer::new(rx, Arc::new(ca), auth, TTL, Metrics::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Harness {
        addr,
        bundle_pem,
        worlds: tx,
        _server: task,
    }
}

async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    identity: &str,
    csr_for: &str,
    ttl: Option<Duration>,
) -> Result<(WorkloadKey, CreateCertificateResponse), tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr_pem = key.csr_pem(&SpiffeId::parse(csr_for).unwrap()).unwrap();
    let req = CreateCertificateRequest {
        csr_pem,
        identity: identity.into(),
        requested_ttl: ttl.map(ambit_api::time::duration_to_proto),
    };
    let resp = match token {
        Some(t) => {
            CertificateServiceClient::with_interceptor(channel, BearerToken::new(t).unwrap())
                .create_certificate(req)
                .await
        }
        None => {
            CertificateServiceClient::new(channel)
                .create_certificate(req)
                .await
        }
    }?;
    Ok((key, resp.into_inner()))
}

#[tokio::test]
async fn signs_for_an_identity_with_a_pod_on_the_callers_node() {
    let h = start(true).await;
    let (key, resp) = request(h.addr, Some("node-1-token"), CHECKOUT, CHECKOUT, None)
        .await
        .unwrap();
    assert_eq!(resp.trust_domain, "cluster.local");
    assert_eq!(resp.trust_bundle_pem, h.bundle_pem);
    assert_eq!(resp.cert_chain_pem.len(), 1, "the root signs directly");

    // Exactly one URI SAN, the requested SPIFFE ID (inspect_pem fails on more than
    // one), and not a CA.
    let leaf = cert::inspect_pem(&resp.cert_chain_pem[0]).unwrap();
    assert_eq!(leaf.spiffe_id.as_str(), CHECKOUT);
    assert!(!leaf.is_ca);
    // Default TTL, with not_before backdated.
    let not_after =
        ambit_api::time::timestamp_from_proto(resp.not_after.as_ref().unwrap()).unwrap();
    let not_before =
        ambit_api::time::timestamp_from_proto(resp.not_before.as_ref().unwrap()).unwrap();
    assert_eq!(not_after, leaf.not_after);
    let lifetime = not_after.duration_since(not_before).unwrap();
    assert!(
        lifetime > TTL && lifetime <= TTL + Duration::from_secs(120),
        "{lifetime:?}"
    );
    assert!(not_before <= SystemTime::now());

    // Chains to the returned bundle, for both TLS roles, and pairs with our key.
    let bundle = TrustBundle::from_pem(
        TrustDomain::new(&resp.trust_domain).unwrap(),
        &resp.trust_bundle_pem,
    )
    .unwrap();
    let der = cert::certs_from_pem(&resp.cert_chain_pem[0]).unwrap();
    for purpose in [Purpose::ServerAuth, Purpose::ClientAuth] {
        let id = verify_chain(&der[0], &der[1..], &bundle, purpose).unwrap();
        assert_eq!(id.as_str(), CHECKOUT);
    }
    ambit_identity::WorkloadCertificate::new(
        key,
        &resp.cert_chain_pem,
        &SpiffeId::parse(CHECKOUT).unwrap(),
    )
    .unwrap();

    // A shorter TTL is honoured, a longer one capped.
    let (_, short) = request(
        h.addr,
        Some("node-1-token"),
        CHECKOUT,
        CHECKOUT,
        Some(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    let life = |r: &CreateCertificateResponse| {
        let nb = ambit_api::time::timestamp_from_proto(r.not_before.as_ref().unwrap()).unwrap();
        let na = ambit_api::time::timestamp_from_proto(r.not_after.as_ref().unwrap()).unwrap();
        na.duration_since(nb).unwrap()
    };
    assert!(
        life(&short) <= Duration::from_secs(600 + 120),
        "{:?}",
        life(&short)
    );
    let (_, long) = request(
        h.addr,
        Some("node-1-token"),
        CHECKOUT,
        CHECKOUT,
        Some(TTL * 10),
    )
    .await
    .unwrap();
    assert!(
        life(&long) <= TTL + Duration::from_secs(120),
        "{:?}",
        life(&long)
    );
}

#[tokio::test]
async fn refuses_an_identity_without_a_pod_on_the_callers_node() {
    let h = start(true).await;
    let err = request(h.addr, Some("node-1-token"), PAYMENT, PAYMENT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node-1"), "{err:?}");
    assert!(err.message().contains(PAYMENT), "{err:?}");
}

#[tokio::test]
async fn refuses_unauthenticated_callers() {
    let h = start(true).await;
    let err = request(h.addr, None, CHECKOUT, CHECKOUT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = request(h.addr, Some("forged"), CHECKOUT, CHECKOUT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn a_waypoint_gets_only_its_own_identity() {
    let h = start(true).await;
    let (_, resp) = request(h.addr, Some("wp-token"), WAYPOINT, WAYPOINT, None)
        .await
        .unwrap();
    assert_eq!(
        cert::inspect_pem(&resp.cert_chain_pem[0])
            .unwrap()
            .spiffe_id
            .as_str(),
        WAYPOINT
    );
    let err = request(h.addr, Some("wp-token"), CHECKOUT, CHECKOUT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments() {
    let h = start(true).await;
    // The CSR names another identity than the one requested.
    let err = request(h.addr, Some("node-1-token"), CHECKOUT, PAYMENT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("SAN"), "{err:?}");
    // Not a SPIFFE ID; another trust domain.
    let err = request(h.addr, Some("node-1-token"), "checkout", CHECKOUT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let foreign = "spiffe://other.domain/ns/shop/sa/checkout";
    let err = request(h.addr, Some("node-1-token"), foreign, foreign, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn unavailable_until_the_config_has_synced() {
    let h = start(false).await;
    let err = request(h.addr, Some("node-1-token"), CHECKOUT, CHECKOUT, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    h.worlds.send_replace(Some(Arc::new(Authority {
        pods: [("node-1".to_owned(), CHECKOUT.to_owned())].into(),
        waypoints: Vec::new(),
    })));
    request(h.addr, Some("node-1-token"), CHECKOUT, CHECKOUT, None)
        .await
        .unwrap();
}
