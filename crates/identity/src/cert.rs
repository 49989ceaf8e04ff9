//! Inspecting and verifying SPIFFE X.509 SVIDs.
//!
//! Verification is rustls-webpki's path building (the same code rustls runs), with
//! the SPIFFE rules on top: the leaf carries exactly one URI SAN, which is a valid
//! [`SpiffeId`] in the bundle's trust domain. [`crate::tls`] builds the rustls
//! verifiers on these functions.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::key::WorkloadKey;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// The roots one trust domain's certificates chain to (more than one during a root
/// rotation).
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots_pem: Vec<String>,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// What a certificate is being verified for: the extended key usage it must allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The peer is a TLS server (we dialed it).
    ServerAuth,
    /// The peer is a TLS client (it dialed us).
    ClientAuth,
}

/// The facts about a leaf certificate the proxies care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// The identity in its single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, lower-case hex with `:` separators.
    pub serial: String,
    /// Whether basicConstraints says CA:true (never for a workload certificate).
    pub is_ca: bool,
}

/// A workload's key with the certificate chain the CA issued for it: what a proxy
/// presents in TLS.
///
/// Invariant: the leaf's public key is this key's, its single URI SAN is `id`, and
/// `chain` is leaf first.
pub struct WorkloadCertificate {
    id: SpiffeId,
    key: WorkloadKey,
    chain: Vec<CertificateDer<'static>>,
    chain_pem: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A certificate could not be read or does not carry a usable SPIFFE identity.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The PEM is malformed.
    #[error("reading PEM certificates")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// No certificate where one was required.
    #[error("no certificate found")]
    Empty,
    /// The DER does not parse as an X.509 certificate.
    #[error("parsing an X.509 certificate")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subjectAltName extension is malformed or duplicated.
    #[error("reading the subjectAltName extension")]
    SubjectAltName(#[source] x509_parser::error::X509Error),
    /// No URI SAN.
    #[error("the certificate has no URI SAN (a SPIFFE certificate has exactly one)")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("the certificate has {} URI SANs ({}), a SPIFFE certificate has exactly one", .uris.len(), .uris.join(", "))]
    MultipleUriSans {
        /// The URIs found.
        uris: Vec<String>,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the certificate's URI SAN is not a valid SPIFFE ID")]
    NotSpiffe(#[source] SpiffeIdError),
}

/// A certificate chain did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Path building or validity failed (unknown issuer, expired, not yet valid, bad
    /// signature, CA used as end entity, wrong extended key usage, …).
    #[error("certificate chain does not verify against the {trust_domain} trust bundle")]
    Chain {
        /// The bundle's trust domain.
        trust_domain: TrustDomain,
        /// webpki's reason.
        #[source]
        source: webpki::Error,
    },
    /// The chain verifies but the leaf has no usable SPIFFE identity.
    #[error("peer certificate identity")]
    Identity(#[source] CertError),
    /// The leaf's identity is in another trust domain than the bundle's.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The identity the leaf carries.
        id: SpiffeId,
        /// The bundle's trust domain.
        trust_domain: TrustDomain,
    },
    /// The leaf verifies but is not the identity that was expected.
    #[error("peer is {actual}, expected {expected}")]
    UnexpectedIdentity {
        /// The identity the leaf carries.
        actual: SpiffeId,
        /// The identity that was required.
        expected: SpiffeId,
    },
    /// No certificate was presented.
    #[error("no peer certificate")]
    NoCertificate,
}

/// A trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    /// A root is not readable.
    #[error("reading trust bundle certificates")]
    Cert(#[source] CertError),
    /// A root cannot serve as a trust anchor.
    #[error("root certificate #{index} is not a usable trust anchor")]
    Anchor {
        /// Position in the bundle (0-based, across all PEM entries).
        index: usize,
        /// webpki's reason.
        #[source]
        source: webpki::Error,
    },
}

/// A CA response does not fit the key it was requested for.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadCertError {
    /// The chain is unreadable or the leaf has no SPIFFE identity.
    #[error("issued certificate chain")]
    Cert(#[source] CertError),
    /// The leaf's identity is not the one requested.
    #[error("issued certificate is for {actual}, requested {expected}")]
    WrongIdentity {
        /// What the leaf carries.
        actual: SpiffeId,
        /// What was requested.
        expected: SpiffeId,
    },
    /// The leaf certifies another public key.
    #[error("issued certificate for {id} does not certify this workload key")]
    WrongKey {
        /// The identity.
        id: SpiffeId,
    },
}

impl TrustBundle {
    /// Builds a bundle from PEM entries; each entry may hold one or more certificates.
    pub fn from_pem<S: AsRef<str>>(
        trust_domain: TrustDomain,
        roots_pem: &[S],
    ) -> Result<Self, TrustBundleError> {
        let mut roots = Vec::new();
        for pem in roots_pem {
            roots.extend(certs_from_pem(pem.as_ref()).map_err(TrustBundleError::Cert)?);
        }
        if roots.is_empty() {
            return Err(TrustBundleError::Cert(CertError::Empty));
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|source| TrustBundleError::Anchor { index, source })
            })
            .collect::<Result<_, _>>()?;
        let roots_pem = roots.iter().map(|der| der_to_pem(der)).collect();
        Ok(Self {
            trust_domain,
            roots_pem,
            roots,
            anchors,
        })
    }

    /// The trust domain whose identities this bundle vouches for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots, PEM, one per entry.
    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// The roots, DER.
    pub fn roots_der(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Purpose {
    fn key_usage(self) -> webpki::KeyUsage {
        match self {
            Purpose::ServerAuth => webpki::KeyUsage::server_auth(),
            Purpose::ClientAuth => webpki::KeyUsage::client_auth(),
        }
    }
}

/// Verifies `leaf` (with `intermediates`, leaf's issuer first) against `bundle` at
/// the current time, for `purpose`, and returns the SPIFFE identity it proves.
///
/// Fails unless the chain reaches one of the bundle's roots, every certificate is
/// valid now, the leaf is not a CA, its extended key usage allows `purpose`, and it
/// carries exactly one URI SAN that is a SPIFFE ID in the bundle's trust domain.
/// Checking WHICH identity is acceptable is the caller's business
/// ([`verify_chain_for`] does it for one expected identity).
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    purpose: Purpose,
) -> Result<SpiffeId, VerifyError> {
    verify_chain_at(leaf, intermediates, bundle, purpose, UnixTime::now())
}

/// [`verify_chain`] at a given time.
pub fn verify_chain_at(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    purpose: Purpose,
    now: UnixTime,
) -> Result<SpiffeId, VerifyError> {
    let chain_err = |source| VerifyError::Chain {
        trust_domain: bundle.trust_domain.clone(),
        source,
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(chain_err)?;
    ee.verify_for_usage(
        crate::tls::signature_algorithms().all,
        bundle.anchors(),
        intermediates,
        now,
        purpose.key_usage(),
        None,
        None,
    )
    .map_err(chain_err)?;
    let id = spiffe_id_from_der(leaf).map_err(VerifyError::Identity)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(VerifyError::ForeignTrustDomain {
            id,
            trust_domain: bundle.trust_domain.clone(),
        });
    }
    Ok(id)
}

/// [`verify_chain`], then requires the identity to be `expected` (DESIGN §3: peers
/// are verified against the identity expected for the destination, not only against
/// the trust root).
pub fn verify_chain_for(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    purpose: Purpose,
    expected: &SpiffeId,
) -> Result<SpiffeId, VerifyError> {
    let actual = verify_chain(leaf, intermediates, bundle, purpose)?;
    if &actual != expected {
        return Err(VerifyError::UnexpectedIdentity {
            actual,
            expected: expected.clone(),
        });
    }
    Ok(actual)
}

/// The SPIFFE identity in a DER certificate's single URI SAN (no chain checks).
pub fn spiffe_id_from_der(der: &[u8]) -> Result<SpiffeId, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(CertError::Parse)?;
    spiffe_id_of(&cert)
}

/// Reads a DER leaf: identity, validity, serial.
pub fn inspect_der(der: &[u8]) -> Result<LeafInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(CertError::Parse)?;
    Ok(LeafInfo {
        spiffe_id: spiffe_id_of(&cert)?,
        not_before: asn1_time(cert.validity().not_before.timestamp()),
        not_after: asn1_time(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
        is_ca: cert.is_ca(),
    })
}

/// Reads the FIRST certificate of a PEM text (the leaf of a leaf-first chain).
pub fn inspect_pem(pem: &str) -> Result<LeafInfo, CertError> {
    let der = certs_from_pem(pem)?
        .into_iter()
        .next()
        .ok_or(CertError::Empty)?;
    inspect_der(&der)
}

/// The identity a TLS peer proved, from `peer_certificates()` of a completed
/// handshake whose verifier was one of [`crate::tls`]'s (so the chain is already
/// verified; this only reads the identity).
pub fn peer_spiffe_id(
    peer_certificates: Option<&[CertificateDer<'_>]>,
) -> Result<SpiffeId, VerifyError> {
    let leaf = peer_certificates
        .and_then(|c| c.first())
        .ok_or(VerifyError::NoCertificate)?;
    spiffe_id_from_der(leaf).map_err(VerifyError::Identity)
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::Pem)
}

/// One certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

impl WorkloadCertificate {
    /// Pairs `key` with the chain the CA returned for it (PEM entries, leaf first;
    /// an entry may hold several certificates), checking the leaf is for `expected`
    /// and certifies `key`.
    pub fn new<S: AsRef<str>>(
        key: WorkloadKey,
        chain_pem: &[S],
        expected: &SpiffeId,
    ) -> Result<Self, WorkloadCertError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(certs_from_pem(pem.as_ref()).map_err(WorkloadCertError::Cert)?);
        }
        let leaf = chain
            .first()
            .ok_or(WorkloadCertError::Cert(CertError::Empty))?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| WorkloadCertError::Cert(CertError::Parse(e)))?;
        let id = spiffe_id_of(&cert).map_err(WorkloadCertError::Cert)?;
        if &id != expected {
            return Err(WorkloadCertError::WrongIdentity {
                actual: id,
                expected: expected.clone(),
            });
        }
        if cert.public_key().raw != key.public_key_spki_der().as_slice() {
            return Err(WorkloadCertError::WrongKey { id });
        }
        let not_before = asn1_time(cert.validity().not_before.timestamp());
        let not_after = asn1_time(cert.validity().not_after.timestamp());
        let chain_pem = chain.iter().map(|der| der_to_pem(der)).collect();
        Ok(Self {
            id,
            key,
            chain,
            chain_pem,
            not_before,
            not_after,
        })
    }

    /// The identity.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The private key.
    pub fn key(&self) -> &WorkloadKey {
        &self.key
    }

    /// The chain, leaf first, DER.
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The chain, leaf first, one PEM certificate per entry.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to renew: half way through the validity (DESIGN §3).
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// Whether the leaf has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The rustls form (chain + signing key), for a `ResolvesServerCert` /
    /// `ResolvesClientCert` that picks certificates per connection.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, rustls::Error> {
        let signing_key = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(self.key.private_key_der())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signing_key,
        )))
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, CertError> {
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(CertError::SubjectAltName)?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(CertError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(CertError::NotSpiffe),
        _ => Err(CertError::MultipleUriSans {
            uris: uris.iter().map(|u| (*u).to_owned()).collect(),
        }),
    }
}

/// Seconds since the epoch → `SystemTime` (X.509 times may precede 1970).
fn asn1_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;
    use crate::ca::CertificateAuthority;

    fn self_signed_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_extraction_requires_exactly_one_spiffe_uri() {
        assert!(matches!(
            spiffe_id_from_der(&self_signed_with_uris(&[])),
            Err(CertError::NoUriSan)
        ));
        let two = self_signed_with_uris(&["spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c"]);
        let err = spiffe_id_from_der(&two).unwrap_err();
        assert!(matches!(err, CertError::MultipleUriSans { .. }), "{err}");
        assert!(err.to_string().contains("spiffe://td/ns/a/sa/c"), "{err}");
        assert!(matches!(
            spiffe_id_from_der(&self_signed_with_uris(&["https://example.com/x"])),
            Err(CertError::NotSpiffe(_))
        ));
        assert_eq!(
            spiffe_id_from_der(&self_signed_with_uris(&["spiffe://td/ns/a/sa/b"]))
                .unwrap()
                .as_str(),
            "spiffe://td/ns/a/sa/b"
        );
        assert!(matches!(
            spiffe_id_from_der(b"junk"),
            Err(CertError::Parse(_))
        ));
        assert!(matches!(inspect_pem(""), Err(CertError::Empty)));
    }

    #[test]
    fn identities_of_another_trust_domain_are_refused() {
        let other = TrustDomain::new("other.local").unwrap();
        let ca = CertificateAuthority::generate(other.clone(), Duration::from_secs(600)).unwrap();
        let id = SpiffeId::new(&other, "a", "b").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(60))
            .unwrap();
        let leaf = certs_from_pem(&issued.chain_pem[0]).unwrap().remove(0);
        // A bundle that (wrongly) claims those roots for cluster.local.
        let bundle = TrustBundle::from_pem(
            TrustDomain::new("cluster.local").unwrap(),
            &issued.trust_bundle_pem,
        )
        .unwrap();
        let err = verify_chain(&leaf, &[], &bundle, Purpose::ClientAuth).unwrap_err();
        assert!(
            matches!(err, VerifyError::ForeignTrustDomain { .. }),
            "{err}"
        );
        // verify_chain_for names both identities on a mismatch.
        let right = TrustBundle::from_pem(other.clone(), &issued.trust_bundle_pem).unwrap();
        let want = SpiffeId::new(&other, "a", "c").unwrap();
        let err = verify_chain_for(&leaf, &[], &right, Purpose::ServerAuth, &want).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer is spiffe://other.local/ns/a/sa/b, expected spiffe://other.local/ns/a/sa/c"
        );
    }

    #[test]
    fn workload_certificate_checks_identity_and_key() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = CertificateAuthority::generate(td.clone(), Duration::from_secs(600)).unwrap();
        let id = SpiffeId::new(&td, "a", "b").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(60))
            .unwrap();
        let other_id = SpiffeId::new(&td, "a", "c").unwrap();
        let err =
            WorkloadCertificate::new(WorkloadKey::generate().unwrap(), &issued.chain_pem, &id)
                .unwrap_err();
        assert!(matches!(err, WorkloadCertError::WrongKey { .. }), "{err}");
        let err = WorkloadCertificate::new(key, &issued.chain_pem, &other_id).unwrap_err();
        assert!(
            matches!(err, WorkloadCertError::WrongIdentity { .. }),
            "{err}"
        );
        let empty: [&str; 0] = [];
        assert!(matches!(
            TrustBundle::from_pem(td, &empty),
            Err(TrustBundleError::Cert(CertError::Empty))
        ));
    }
}
