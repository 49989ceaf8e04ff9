//! The certificate manager against a real gRPC `CertificateService` on 127.0.0.1:0,
//! backed by ambit-identity's `CertificateAuthority`, with switchable misbehaviour.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ambit_api::BearerToken;
use ambit_api::ca::v1::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_api::ca::v1::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_api::time::{optional_duration, timestamp_to_proto};
use ambit_control_client::{
    Backoff, CaClientConfig, CertManager, CertState, FetchError, TokenSource,
};
use ambit_identity::cert::WorkloadCertError;
use ambit_identity::{CertificateAuthority, SpiffeId, TrustDomain, WorkloadKey};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Server, Uri};
use tonic::{Request, Response, Status};

const STEP: Duration = Duration::from_secs(10);
const NODE_TOKEN: &str = "node-a-bootstrap-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Sign the CSR as asked.
    Sign,
    /// Return a valid certificate for another identity.
    WrongIdentity,
    /// Return a valid certificate for the identity, but for a key of the CA's own.
    WrongKey,
    /// Refuse with UNAVAILABLE.
    Unavailable,
}

/// What the CA saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    identity: String,
    csr_pem: String,
    requested_ttl: Option<Duration>,
}

#[derive(Clone)]
struct FakeCa {
    ca: Arc<CertificateAuthority>,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl CertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let token = BearerToken::from_metadata(request.metadata())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if token.secret() != NODE_TOKEN {
            return Err(Status::unauthenticated("unknown token"));
        }
        let req = request.into_inner();
        let requested_ttl = optional_duration(req.requested_ttl.as_ref()).unwrap();
        self.seen.lock().unwrap().push(Seen {
            identity: req.identity.clone(),
            csr_pem: req.csr_pem.clone(),
            requested_ttl,
        });
        let id =
            SpiffeId::parse(&req.identity).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = requested_ttl.unwrap_or(Duration::from_secs(3600));
        let mode = *self.mode.lock().unwrap();
        let (csr, signed_for) = match mode {
            Mode::Unavailable => return Err(Status::unavailable("CA root not loaded yet")),
            Mode::Sign => (req.csr_pem, id),
            Mode::WrongIdentity => {
                let other = SpiffeId::new(id.trust_domain(), "production", "someone-else").unwrap();
                (
                    WorkloadKey::generate().unwrap().csr_pem(&other).unwrap(),
                    other,
                )
            }
            Mode::WrongKey => (WorkloadKey::generate().unwrap().csr_pem(&id).unwrap(), id),
        };
        let issued = self
            .ca
            .sign_csr(&csr, &signed_for, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            not_before: Some(timestamp_to_proto(issued.not_before)),
            not_after: Some(timestamp_to_proto(issued.not_after)),
            trust_domain: self.ca.trust_domain().to_string(),
        }))
    }
}

struct TestCa {
    uri: Uri,
    fake: FakeCa,
    server: tokio::task::JoinHandle<()>,
}

impl TestCa {
    async fn start() -> Self {
        let ca =
            CertificateAuthority::generate(trust_domain(), Duration::from_secs(86_400)).unwrap();
        let fake = FakeCa {
            ca: Arc::new(ca),
            mode: Arc::new(Mutex::new(Mode::Sign)),
            seen: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = CertificateServiceServer::new(fake.clone());
        let server = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            uri: format!("http://{addr}").parse().unwrap(),
            fake,
            server,
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.fake.mode.lock().unwrap() = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.fake.seen.lock().unwrap().clone()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn trust_domain() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn checkout() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/production/sa/checkout").unwrap()
}

fn config(uri: &Uri) -> CaClientConfig {
    let mut config = CaClientConfig::new(
        uri.clone(),
        TokenSource::Static(BearerToken::new(NODE_TOKEN).unwrap()),
    );
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(5);
    config
}

async fn unreachable_uri() -> Uri {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}").parse().unwrap()
}

fn serial_of(cert: &ambit_identity::WorkloadCertificate) -> String {
    ambit_identity::cert::inspect_der(&cert.chain_der()[0])
        .unwrap()
        .serial
}

#[tokio::test]
async fn fetch_sends_a_csr_for_exactly_the_identity_and_keeps_the_certificate() {
    let ca = TestCa::start().await;
    let manager = CertManager::new(config(&ca.uri), trust_domain()).unwrap();
    let id = checkout();
    assert!(manager.current(&id).is_none());
    assert!(manager.trust_bundle().borrow().is_none());

    let cert = tokio::time::timeout(STEP, manager.fetch(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cert.id(), &id);
    assert!(cert.not_after() > SystemTime::now());

    // The CSR names exactly the identity asked for, and carries our public key.
    let seen = ca.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].identity, id.as_str());
    assert_eq!(seen[0].requested_ttl, None);
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&seen[0].csr_pem).unwrap();
    match csr.params.subject_alt_names.as_slice() {
        [rcgen::SanType::URI(uri)] => assert_eq!(uri.as_str(), id.as_str()),
        other => panic!("CSR SANs: {other:?}"),
    }
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&csr.public_key),
        cert.key().public_key_spki_der()
    );

    // Held: `current` and a second fetch return it without asking the CA again.
    assert!(Arc::ptr_eq(&manager.current(&id).unwrap(), &cert));
    assert!(Arc::ptr_eq(&manager.fetch(&id).await.unwrap(), &cert));
    assert_eq!(ca.seen().len(), 1);
    assert_eq!(manager.identities(), std::slice::from_ref(&id));

    // The trust bundle of the answer is published, and the pair works for TLS.
    let bundle = manager.trust_bundle().borrow().clone().unwrap();
    assert_eq!(
        bundle.roots_pem(),
        ca.fake.ca.trust_bundle().roots_pem(),
        "bundle published"
    );
    ambit_identity::tls::client_config(&cert, bundle.clone(), id.clone()).unwrap();
    ambit_identity::tls::server_config(&cert, bundle).unwrap();

    // `/config_dump` view.
    let snapshot = manager.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].identity, id.as_str());
    assert_eq!(snapshot[0].state, CertState::Ready);
    assert_eq!(
        snapshot[0].serial.as_deref(),
        Some(serial_of(&cert).as_str())
    );
    assert_eq!(snapshot[0].not_after, Some(cert.not_after()));
    let json = serde_json::to_value(&snapshot[0]).unwrap();
    assert_eq!(json["state"], "ready");
    let not_after = json["notAfter"].as_str().unwrap();
    assert!(
        not_after.ends_with('Z') && not_after.contains('T'),
        "{json}"
    );

    // Another trust domain is refused without asking the CA.
    let foreign = SpiffeId::parse("spiffe://other.local/ns/production/sa/checkout").unwrap();
    let err = manager.fetch(&foreign).await.unwrap_err();
    assert!(matches!(err, FetchError::ForeignIdentity { .. }), "{err}");
    assert_eq!(ca.seen().len(), 1);

    manager.remove(&id);
    assert!(manager.current(&id).is_none());
    assert!(manager.identities().is_empty());
    assert!(manager.snapshot().is_empty());
}

#[tokio::test]
async fn certificates_are_renewed_before_expiry_and_never_served_expired() {
    let ca = TestCa::start().await;
    let mut config = config(&ca.uri);
    config.requested_ttl = Some(Duration::from_secs(2));
    let manager = CertManager::new(config, trust_domain()).unwrap();
    let id = checkout();
    let first = manager.fetch(&id).await.unwrap();
    assert_eq!(ca.seen()[0].requested_ttl, Some(Duration::from_secs(2)));

    // Poll (with a deadline) until two renewals happened; every certificate served
    // meanwhile must be valid at the moment it is handed out.
    let mut serials = vec![serial_of(&first)];
    let deadline = Instant::now() + Duration::from_secs(20);
    while serials.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "only {} certificates within the deadline",
            serials.len()
        );
        let now = SystemTime::now();
        let cert = manager
            .current(&id)
            .expect("a certificate is held throughout renewal");
        assert!(
            !cert.is_expired_at(now),
            "current() served an expired certificate"
        );
        let serial = serial_of(&cert);
        if serials.last() != Some(&serial) {
            serials.push(serial);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Renewed at half life, not in a loop: one request per certificate seen (plus
    // possibly one in flight).
    let requests = ca.seen().len();
    assert!((3..=4).contains(&requests), "{requests} requests");
    assert!(matches!(
        manager.snapshot()[0].state,
        CertState::Ready | CertState::Renewing
    ));
}

#[tokio::test]
async fn a_certificate_for_another_identity_or_key_is_rejected() {
    let ca = TestCa::start().await;
    let manager = CertManager::new(config(&ca.uri), trust_domain()).unwrap();
    let id = checkout();

    ca.set_mode(Mode::WrongIdentity);
    let err = manager.fetch(&id).await.unwrap_err();
    match &err {
        FetchError::Certificate {
            source: WorkloadCertError::WrongIdentity { actual, expected },
            ..
        } => {
            assert_eq!(actual.service_account(), "someone-else");
            assert_eq!(expected, &id);
        }
        other => panic!("expected a wrong-identity rejection, got {other:?}"),
    }
    assert!(manager.current(&id).is_none());
    match &manager.snapshot()[0].state {
        CertState::Failed { error } => assert!(error.contains("someone-else"), "{error}"),
        other => panic!("expected Failed, got {other:?}"),
    }

    ca.set_mode(Mode::WrongKey);
    let err = manager.fetch(&id).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Certificate {
                source: WorkloadCertError::WrongKey { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(manager.current(&id).is_none());

    // An unavailable CA: the error is returned, and the manager keeps retrying in
    // the background until it works.
    ca.set_mode(Mode::Unavailable);
    let err = manager.fetch(&id).await.unwrap_err();
    match &err {
        FetchError::Rpc { status, .. } => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => panic!("expected an RPC error, got {other:?}"),
    }
    let failed_requests = ca.seen().len();
    ca.set_mode(Mode::Sign);
    let cert = tokio::time::timeout(STEP, manager.wait_current(&id))
        .await
        .expect("the renewal task retried");
    assert_eq!(cert.id(), &id);
    assert!(ca.seen().len() > failed_requests);
    let snapshot = &manager.snapshot()[0];
    assert_eq!(snapshot.state, CertState::Ready);
    assert_eq!(snapshot.last_error, None);

    // A token the CA does not accept.
    let mut bad_token = config(&ca.uri);
    bad_token.token = TokenSource::Static(BearerToken::new("stolen").unwrap());
    let other = CertManager::new(bad_token, trust_domain()).unwrap();
    match other.fetch(&id).await.unwrap_err() {
        FetchError::Rpc { status, .. } => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[tokio::test]
async fn cached_certificates_survive_a_restart_without_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("certs");
    let ca = TestCa::start().await;
    let id = checkout();

    let mut online = config(&ca.uri);
    online.cache_dir = Some(cache_dir.clone());
    let manager = CertManager::new(online.clone(), trust_domain()).unwrap();
    let cert = manager.fetch(&id).await.unwrap();
    let serial = serial_of(&cert);
    drop(manager);

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache_dir), 0o700);
    let entry = cache_dir.join("production_checkout.pem");
    assert_eq!(mode(&entry), 0o600);
    assert_eq!(mode(&cache_dir.join("trust-bundle.pem")), 0o600);
    let text = std::fs::read_to_string(&entry).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "key first");
    // Junk and leftovers of an interrupted write are cleaned up on load.
    std::fs::write(cache_dir.join("production_broken.pem"), "not a pem").unwrap();
    std::fs::write(cache_dir.join(".production_x.pem.tmp.1.0"), "partial").unwrap();

    // Restart while the controller is unreachable: served from the cache.
    let mut offline = online.clone();
    offline.controller = unreachable_uri().await;
    let manager = CertManager::new(offline, trust_domain()).unwrap();
    let cached = manager.current(&id).expect("the cached certificate");
    assert_eq!(serial_of(&cached), serial);
    assert_eq!(
        cached.key().public_key_spki_der(),
        cert.key().public_key_spki_der()
    );
    assert!(Arc::ptr_eq(&manager.fetch(&id).await.unwrap(), &cached));
    assert!(manager.trust_bundle().borrow().is_some());
    let snapshot = &manager.snapshot()[0];
    assert!(snapshot.from_cache);
    assert_eq!(snapshot.state, CertState::Ready);
    let mut names: Vec<String> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["production_checkout.pem", "trust-bundle.pem"]);

    // Reconciliation drops identities no pod has any more, with their files.
    manager.retain(|kept| kept != &id);
    assert!(manager.current(&id).is_none());
    assert!(!entry.exists());
    assert_eq!(ca.seen().len(), 1, "nothing was requested while offline");
}

#[tokio::test]
async fn a_failing_renewal_keeps_the_old_certificate_until_it_expires() {
    let ca = TestCa::start().await;
    let mut config = config(&ca.uri);
    config.requested_ttl = Some(Duration::from_secs(2));
    let manager = CertManager::new(config, trust_domain()).unwrap();
    let id = checkout();
    let first = manager.fetch(&id).await.unwrap();
    ca.set_mode(Mode::Unavailable);

    // Until expiry: the old certificate is served while renewal fails and retries.
    let mut saw_renewing_with_error = false;
    let deadline = Instant::now() + STEP;
    loop {
        assert!(Instant::now() < deadline, "the certificate never expired");
        let now = SystemTime::now();
        let snapshot = manager.snapshot().remove(0);
        match manager.current(&id) {
            Some(cert) => {
                assert!(
                    Arc::ptr_eq(&cert, &first),
                    "no new certificate can be issued"
                );
                assert!(
                    !cert.is_expired_at(now),
                    "current() served an expired certificate"
                );
                if snapshot.state == CertState::Renewing && snapshot.last_error.is_some() {
                    saw_renewing_with_error = true;
                }
            }
            None => {
                assert!(
                    SystemTime::now() >= first.not_after(),
                    "dropped before expiry"
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_renewing_with_error, "renewal failures were not visible");
    match &manager.snapshot()[0].state {
        CertState::Failed { error } => assert!(error.contains("CA root not loaded"), "{error}"),
        other => panic!("expected Failed after expiry, got {other:?}"),
    }

    // The CA comes back: a new certificate without anyone asking again.
    ca.set_mode(Mode::Sign);
    let renewed = tokio::time::timeout(STEP, manager.wait_current(&id))
        .await
        .unwrap();
    assert_ne!(serial_of(&renewed), serial_of(&first));
}
