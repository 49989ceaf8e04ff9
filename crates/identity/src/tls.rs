//! rustls integration: the crypto provider, verifiers that check a peer's SPIFFE
//! identity (not only its chain), and ready-made TLS 1.3 mutual-auth configs.
//!
//! HBONE (DESIGN §3): TLS 1.3 only, AES-GCM suites, no SNI, ALPN `h2` (the caller
//! sets `alpn_protocols`; these configs leave ALPN empty). The client side dials a
//! KNOWN identity ([`SpiffeServerVerifier`]); the server side accepts any identity of
//! the trust domain ([`SpiffeClientVerifier`]) and reads who it was afterwards with
//! [`crate::cert::peer_spiffe_id`] to apply policy.

use std::sync::{Arc, OnceLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError, SignatureScheme};

use crate::cert::{self, Purpose, TrustBundle, VerifyError, WorkloadCertificate};
use crate::spiffe::SpiffeId;

/// Verifies a TLS server against the identity the client meant to reach.
///
/// The chain must verify against the trust bundle (serverAuth), and the leaf's
/// SPIFFE ID must equal `expected`: a valid certificate for any OTHER workload is
/// refused. The TLS server name is ignored (HBONE sends no SNI; identities are not
/// DNS names).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
}

/// Verifies TLS clients: any identity of the bundle's trust domain whose chain
/// verifies (clientAuth) is accepted; a client certificate is mandatory.
///
/// Which identity connected is read after the handshake
/// (`connection.peer_certificates()` → [`crate::cert::peer_spiffe_id`]) and is then
/// subject to authorization policy.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
}

/// Building a TLS config failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the protocol versions or the certificate/key.
    #[error("building the rustls config for {id}")]
    Rustls {
        /// The local identity.
        id: SpiffeId,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
}

/// The process-wide crypto provider for mesh TLS: aws-lc-rs, TLS 1.3 AES-GCM cipher
/// suites only (as ztunnel offers), default key exchange groups (X25519, P-256,
/// P-384 and the X25519MLKEM768 post-quantum hybrid).
///
/// Configs built here pass it explicitly, so they do not depend on which provider
/// the binary installed as the rustls default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// The signature algorithms certificates and handshakes may use (aws-lc-rs's set).
pub(crate) fn signature_algorithms() -> WebPkiSupportedAlgorithms {
    crypto_provider().signature_verification_algorithms
}

/// A TLS 1.3 client config that presents `local` and accepts only a server proving
/// `expected` (chaining to `bundle`). SNI is off; set `alpn_protocols` as needed.
pub fn client_config(
    local: &WorkloadCertificate,
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let err = |source| TlsConfigError::Rustls {
        id: local.id().clone(),
        source,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, expected)))
        .with_client_auth_cert(local.chain_der().to_vec(), local.key().private_key_der())
        .map_err(err)?;
    config.enable_sni = false;
    Ok(config)
}

/// A TLS 1.3 server config that presents `local` and requires a client certificate
/// of `bundle`'s trust domain. Set `alpn_protocols` as needed; to pick the
/// certificate per connection, build your own config around [`SpiffeClientVerifier`]
/// and [`WorkloadCertificate::certified_key`].
pub fn server_config(
    local: &WorkloadCertificate,
    bundle: Arc<TrustBundle>,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let err = |source| TlsConfigError::Rustls {
        id: local.id().clone(),
        source,
    };
    rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle)))
        .with_single_cert(local.chain_der().to_vec(), local.key().private_key_der())
        .map_err(err)
}

impl SpiffeServerVerifier {
    /// Accept servers chaining to `bundle` that prove `expected`.
    pub fn new(bundle: Arc<TrustBundle>, expected: SpiffeId) -> Self {
        Self { bundle, expected }
    }

    /// The identity this verifier requires.
    pub fn expected(&self) -> &SpiffeId {
        &self.expected
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = cert::verify_chain_at(
            end_entity,
            intermediates,
            &self.bundle,
            Purpose::ServerAuth,
            now,
        )
        .map_err(to_rustls)?;
        if actual != self.expected {
            return Err(to_rustls(VerifyError::UnexpectedIdentity {
                actual,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with the TLS 1.3-only configs here; correct if someone enables 1.2.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &signature_algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algorithms().supported_schemes()
    }
}

impl SpiffeClientVerifier {
    /// Accept clients of `bundle`'s trust domain.
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        Self { bundle }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have exactly one certificate per identity anyway.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        cert::verify_chain_at(
            end_entity,
            intermediates,
            &self.bundle,
            Purpose::ClientAuth,
            now,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with the TLS 1.3-only configs here; correct if someone enables 1.2.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &signature_algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algorithms().supported_schemes()
    }
}

/// Keeps rustls' specific certificate errors (they pick the TLS alert) and wraps
/// everything else, identity mismatches included, with its full message.
fn to_rustls(err: VerifyError) -> rustls::Error {
    if let VerifyError::Chain { source, .. } = &err {
        let specific = match source {
            webpki::Error::UnknownIssuer => Some(CertificateError::UnknownIssuer),
            webpki::Error::CertExpired { time, not_after } => {
                Some(CertificateError::ExpiredContext {
                    time: *time,
                    not_after: *not_after,
                })
            }
            webpki::Error::CertNotValidYet { time, not_before } => {
                Some(CertificateError::NotValidYetContext {
                    time: *time,
                    not_before: *not_before,
                })
            }
            webpki::Error::InvalidSignatureForPublicKey => Some(CertificateError::BadSignature),
            webpki::Error::BadDer | webpki::Error::BadDerTime => {
                Some(CertificateError::BadEncoding)
            }
            _ => None,
        };
        if let Some(e) = specific {
            return rustls::Error::InvalidCertificate(e);
        }
    }
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::key::WorkloadKey;
    use crate::spiffe::TrustDomain;

    const DEADLINE: Duration = Duration::from_secs(10);

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

        fn workload(&self, ns: &str, sa: &str) -> WorkloadCertificate {
            let id = SpiffeId::new(self.ca.trust_domain(), ns, sa).unwrap();
            let key = WorkloadKey::generate().unwrap();
            let issued = self
                .ca
                .sign_csr(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(600))
                .unwrap();
            WorkloadCertificate::new(key, &issued.chain_pem, &id).unwrap()
        }
    }

    /// Runs a TLS 1.3 handshake over an in-memory duplex pipe and exchanges one
    /// message. Returns each side's view of the peer identity, or its error.
    async fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(Arc::new(client));
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let client_side = async move {
            // HBONE dials pod IPs; the name is not checked by the SPIFFE verifier.
            let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 7).into());
            let mut tls = connector
                .connect(name, c)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"pong");
            cert::peer_spiffe_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())
        };
        let server_side = async move {
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let peer = cert::peer_spiffe_id(tls.get_ref().1.peer_certificates())
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(client_side, server_side) })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn mutual_handshake_with_the_expected_identity() {
        let mesh = Mesh::new();
        let checkout = mesh.workload("production", "checkout");
        let payment = mesh.workload("production", "payment");
        let client = client_config(&checkout, mesh.bundle.clone(), payment.id().clone()).unwrap();
        let server = server_config(&payment, mesh.bundle.clone()).unwrap();
        let (client_saw, server_saw) = handshake(client, server).await;
        assert_eq!(client_saw.unwrap(), *payment.id());
        assert_eq!(server_saw.unwrap(), *checkout.id());
    }

    #[tokio::test]
    async fn a_valid_certificate_for_another_identity_is_refused() {
        let mesh = Mesh::new();
        let checkout = mesh.workload("production", "checkout");
        let inventory = mesh.workload("production", "inventory");
        let payment_id =
            SpiffeId::parse("spiffe://cluster.local/ns/production/sa/payment").unwrap();
        // checkout dials "payment", but the server is inventory (same CA, valid chain).
        let client = client_config(&checkout, mesh.bundle.clone(), payment_id).unwrap();
        let server = server_config(&inventory, mesh.bundle.clone()).unwrap();
        let (client_saw, server_saw) = handshake(client, server).await;
        let err = client_saw.unwrap_err();
        // rustls renders the wrapped error with Debug: both identities are named.
        assert!(
            err.contains("UnexpectedIdentity")
                && err.contains("spiffe://cluster.local/ns/production/sa/inventory")
                && err.contains("spiffe://cluster.local/ns/production/sa/payment"),
            "{err}"
        );
        assert!(server_saw.is_err());
    }

    #[tokio::test]
    async fn certificates_from_another_ca_are_refused_both_ways() {
        let mesh = Mesh::new();
        let rogue = Mesh::new(); // same trust domain name, different root
        let checkout = mesh.workload("production", "checkout");
        let payment = mesh.workload("production", "payment");
        let fake_payment = rogue.workload("production", "payment");
        let fake_checkout = rogue.workload("production", "checkout");

        // Server presents a certificate from the other CA.
        let client = client_config(&checkout, mesh.bundle.clone(), payment.id().clone()).unwrap();
        let server = server_config(&fake_payment, rogue.bundle.clone()).unwrap();
        let (client_saw, _) = handshake(client, server).await;
        // Same issuer name, different key: webpki reports a bad signature.
        let err = client_saw.unwrap_err();
        assert!(
            err.contains("invalid peer certificate: BadSignature"),
            "{err}"
        );

        // Client presents a certificate from the other CA (while trusting the real
        // root, so that it is the server that decides).
        let client =
            client_config(&fake_checkout, mesh.bundle.clone(), payment.id().clone()).unwrap();
        let server = server_config(&payment, mesh.bundle.clone()).unwrap();
        let (client_saw, server_saw) = handshake(client, server).await;
        let err = server_saw.unwrap_err();
        assert!(
            err.contains("invalid peer certificate: BadSignature"),
            "{err}"
        );
        assert!(client_saw.is_err());
    }

    #[tokio::test]
    async fn a_client_without_certificate_is_refused() {
        let mesh = Mesh::new();
        let payment = mesh.workload("production", "payment");
        let verifier = SpiffeServerVerifier::new(mesh.bundle.clone(), payment.id().clone());
        let client = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let server = server_config(&payment, mesh.bundle.clone()).unwrap();
        let (client_saw, server_saw) = handshake(client, server).await;
        let err = server_saw.unwrap_err();
        assert!(err.contains("peer sent no certificates"), "{err}");
        assert!(client_saw.is_err());
    }

    #[test]
    fn certified_key_loads() {
        let mesh = Mesh::new();
        let w = mesh.workload("a", "b");
        let ck = w.certified_key().unwrap();
        assert_eq!(ck.cert.len(), 1);
    }
}
