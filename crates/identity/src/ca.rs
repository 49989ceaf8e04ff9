//! The mesh certificate authority: a root (generated or operator-supplied) that signs
//! workload CSRs into SPIFFE X.509 SVIDs.
//!
//! The CA checks what a certificate may say (exactly the expected SPIFFE ID, not a
//! CA, the usages mTLS needs); WHO may ask for which identity (node authorization) is
//! the controller's business and happens before [`CertificateAuthority::sign_csr`].

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::CLOCK_SKEW_ALLOWANCE;
use crate::cert::{self, CertError, Purpose, TrustBundle, TrustBundleError, VerifyError};
use crate::key::WorkloadKey;
use crate::spiffe::{SpiffeId, TrustDomain};

/// File name of the CA certificate chain in a state directory: the signing
/// certificate first, then its issuers up to and including the self-signed root.
pub const CERT_FILE: &str = "ca-cert.pem";
/// File name of the CA's private key (PKCS#8 PEM, mode 0600) in a state directory.
pub const KEY_FILE: &str = "ca-key.pem";

/// A certificate authority for one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Signing certificate first, up to but excluding the root.
    chain_pem: Vec<String>,
    bundle: TrustBundle,
    not_after: SystemTime,
}

/// A certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// Leaf first, then intermediates (none when the root signs directly); one PEM
    /// certificate per entry; the root is not included.
    pub chain_pem: Vec<String>,
    /// The trust domain's roots, one PEM certificate per entry.
    pub trust_bundle_pem: Vec<String>,
    /// Backdated by [`CLOCK_SKEW_ALLOWANCE`].
    pub not_before: SystemTime,
    /// `now + ttl`, capped at the CA certificate's own expiry.
    pub not_after: SystemTime,
    /// The leaf's serial number, lower-case hex with `:` separators.
    pub serial: String,
}

/// Creating or loading a CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen could not generate the key or self-sign the root.
    #[error("generating the CA root for {trust_domain}")]
    Generate {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The certificate PEM is unreadable or empty.
    #[error("reading the CA certificate chain")]
    Cert(#[source] CertError),
    /// The private key PEM is unreadable.
    #[error("reading the CA private key")]
    Key(#[source] rcgen::Error),
    /// The certificate is not usable by rcgen as an issuer.
    #[error("using the CA certificate as an issuer")]
    Issuer(#[source] rcgen::Error),
    /// The first certificate is not a CA (basicConstraints CA:true).
    #[error("the CA certificate is not a CA (basicConstraints CA:true is missing)")]
    NotACa,
    /// The chain does not end in a self-signed root.
    #[error(
        "the CA certificate chain must end with the self-signed root (signing certificate first, root last)"
    )]
    NoRoot,
    /// The root is not usable as a trust anchor.
    #[error("building the trust bundle from the CA root")]
    Bundle(#[source] TrustBundleError),
    /// A test certificate signed with the key does not verify against the root: the
    /// key does not belong to the certificate, or the chain is broken.
    #[error("the CA key and certificate chain do not work together")]
    SelfCheck(#[source] Box<SelfCheckError>),
    /// The system random number generator failed.
    #[error("generating a serial number")]
    Random,
    /// The validity is zero or does not fit a certificate.
    #[error("CA validity {validity:?} is not usable")]
    Validity {
        /// The validity requested.
        validity: Duration,
    },
}

/// Signing a CSR was refused or failed. Every refusal says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The expected identity is in another trust domain.
    #[error("{expected} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The identity asked for.
        expected: SpiffeId,
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The CSR does not parse, has a bad signature, or has extensions rcgen refuses.
    #[error("invalid CSR")]
    InvalidCsr(#[source] rcgen::Error),
    /// The CSR's key is not ECDSA P-256.
    #[error("CSR key must be ECDSA P-256, found {algorithm}")]
    UnsupportedKey {
        /// The algorithm found.
        algorithm: String,
    },
    /// The CSR's SANs are not exactly one URI equal to the expected identity.
    #[error(
        "CSR must carry exactly one SAN, the URI {expected}; it carries [{}]",
        .found.join(", ")
    )]
    SanMismatch {
        /// The identity expected.
        expected: SpiffeId,
        /// The SANs in the CSR, as `URI:…`, `DNS:…`, `IP:…`, `email:…`, `other`.
        found: Vec<String>,
    },
    /// The TTL is zero.
    #[error("certificate TTL must be positive")]
    ZeroTtl,
    /// The CA certificate has expired (or expires within the clock-skew allowance).
    #[error("the CA certificate expired")]
    CaExpired,
    /// rcgen failed to build or sign the certificate.
    #[error("signing the certificate for {id}")]
    Sign {
        /// The identity.
        id: SpiffeId,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The system random number generator failed.
    #[error("generating a serial number")]
    Random,
}

/// Why the load-time self-check of an operator-supplied CA failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// The probe identity could not be built (trust domain problem).
    #[error("building the probe identity")]
    Probe(#[source] crate::spiffe::SpiffeIdError),
    /// The probe key could not be generated.
    #[error("generating the probe key")]
    Key(#[source] crate::key::KeyError),
    /// The CA could not sign the probe.
    #[error("signing the probe certificate")]
    Sign(#[source] SignError),
    /// The probe certificate did not parse back.
    #[error("reading the probe certificate")]
    Cert(#[source] CertError),
    /// The probe certificate did not verify against the root.
    #[error("verifying the probe certificate against the root")]
    Verify(#[source] VerifyError),
}

/// Persisting or loading CA state failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Only one of the two files exists: refuse to guess (and never overwrite a key).
    #[error("CA state in {dir} is incomplete: {present} exists but {missing} does not")]
    Incomplete {
        /// The state directory.
        dir: PathBuf,
        /// The file that exists.
        present: &'static str,
        /// The file that is missing.
        missing: &'static str,
    },
    /// The files exist but do not make a CA.
    #[error("loading the CA from {dir}")]
    Load {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: CaError,
    },
    /// Generating a new CA failed.
    #[error("generating a new CA")]
    Generate(#[source] CaError),
}

impl CertificateAuthority {
    /// Generates a self-signed root for `trust_domain`: ECDSA P-256, CA:true,
    /// keyUsage keyCertSign + cRLSign, valid from now (minus the clock-skew
    /// allowance) for `validity`.
    pub fn generate(trust_domain: TrustDomain, validity: Duration) -> Result<Self, CaError> {
        let gen_err = |source| CaError::Generate {
            trust_domain: trust_domain.clone(),
            source,
        };
        let now = SystemTime::now();
        let not_before = now - CLOCK_SKEW_ALLOWANCE;
        let not_after = now
            .checked_add(validity)
            .filter(|_| !validity.is_zero())
            .ok_or(CaError::Validity { validity })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain.as_str());
        dn.push(DnType::CommonName, "Ambit root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(not_before).ok_or(CaError::Validity { validity })?;
        params.not_after = to_offset(not_after).ok_or(CaError::Validity { validity })?;
        params.serial_number = Some(random_serial().map_err(|_| CaError::Random)?);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let root_pem = cert.pem();
        let bundle =
            TrustBundle::from_pem(trust_domain.clone(), &[&root_pem]).map_err(CaError::Bundle)?;
        let issuer = Issuer::new(params, key);
        Ok(Self {
            trust_domain,
            issuer,
            chain_pem: Vec::new(),
            bundle,
            not_after: truncate_to_secs(not_after),
        })
    }

    /// Loads an operator-supplied CA. `cert_pem` holds the signing certificate first,
    /// then its issuers, ending with the self-signed root (a lone self-signed root is
    /// the common case); `key_pem` is the signing certificate's private key (PKCS#8,
    /// or SEC1/PKCS#1 as aws-lc reads them). Checks that the signing certificate is a
    /// CA and that a certificate it signs verifies against the root.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CaError> {
        let certs = cert::certs_from_pem(cert_pem).map_err(CaError::Cert)?;
        let (signing, root) = match (certs.first(), certs.last()) {
            (Some(s), Some(r)) => (s, r),
            _ => return Err(CaError::Cert(CertError::Empty)),
        };
        let signing_info = parse_ca_facts(signing).map_err(CaError::Cert)?;
        if !signing_info.is_ca {
            return Err(CaError::NotACa);
        }
        if !parse_ca_facts(root).map_err(CaError::Cert)?.self_signed {
            return Err(CaError::NoRoot);
        }
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let issuer = Issuer::from_ca_cert_der(signing, key).map_err(CaError::Issuer)?;
        let bundle = TrustBundle::from_pem(trust_domain.clone(), &[cert::der_to_pem(root)])
            .map_err(CaError::Bundle)?;
        let chain_pem = certs[..certs.len() - 1]
            .iter()
            .map(|der| cert::der_to_pem(der))
            .collect();
        let ca = Self {
            trust_domain,
            issuer,
            chain_pem,
            bundle,
            not_after: signing_info.not_after,
        };
        ca.self_check()
            .map_err(|e| CaError::SelfCheck(Box::new(e)))?;
        Ok(ca)
    }

    /// Loads the CA persisted in `dir` ([`CERT_FILE`], [`KEY_FILE`]), or, when neither
    /// file exists, generates one (see [`CertificateAuthority::generate`]) and saves
    /// it there. Exactly one file present is an error, never an overwrite.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: TrustDomain,
        validity: Duration,
    ) -> Result<Self, PersistError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let exists = |p: &Path| {
            p.try_exists().map_err(|source| PersistError::Io {
                action: "checking",
                path: p.to_owned(),
                source,
            })
        };
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let cert_pem = read(&cert_path)?;
                let key_pem = Zeroizing::new(read(&key_path)?);
                Self::from_pem(trust_domain, &cert_pem, &key_pem).map_err(|source| {
                    PersistError::Load {
                        dir: dir.to_owned(),
                        source,
                    }
                })
            }
            (false, false) => {
                let ca = Self::generate(trust_domain, validity).map_err(PersistError::Generate)?;
                ca.save_to_dir(dir)?;
                Ok(ca)
            }
            (true, false) => Err(PersistError::Incomplete {
                dir: dir.to_owned(),
                present: CERT_FILE,
                missing: KEY_FILE,
            }),
            (false, true) => Err(PersistError::Incomplete {
                dir: dir.to_owned(),
                present: KEY_FILE,
                missing: CERT_FILE,
            }),
        }
    }

    /// Writes [`CERT_FILE`] (mode 0644) and [`KEY_FILE`] (mode 0600) into `dir`
    /// (created with mode 0700 if missing), each atomically (temporary file, fsync,
    /// rename, directory fsync). A crash between the two files leaves only the key;
    /// [`CertificateAuthority::load_or_generate`] then reports the incomplete state
    /// rather than replacing a key that may be in use.
    pub fn save_to_dir(&self, dir: &Path) -> Result<(), PersistError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PersistError::Io {
                action: "creating directory",
                path: dir.to_owned(),
                source,
            })?;
        let key_pem = Zeroizing::new(self.issuer.key().serialize_pem());
        write_atomic(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        write_atomic(dir, CERT_FILE, self.cert_chain_pem().as_bytes(), 0o644)?;
        Ok(())
    }

    /// Signs a CSR for `expected`, valid for `ttl` (capped at the CA's own expiry).
    ///
    /// Refuses a CSR whose SANs are not exactly one URI equal to `expected`, whose key
    /// is not ECDSA P-256, or whose signature is bad. Only the CSR's public key is
    /// used: subject, extensions and everything else in it are ignored. The
    /// certificate has an empty subject, exactly one URI SAN (critical),
    /// basicConstraints CA:false, keyUsage digitalSignature, extendedKeyUsage
    /// serverAuth + clientAuth, a random 128-bit serial, and not_before backdated by
    /// [`CLOCK_SKEW_ALLOWANCE`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, SignError> {
        if expected.trust_domain() != &self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                expected: expected.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(SignError::ZeroTtl);
        }
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignError::InvalidCsr)?;
        // rcgen derives the algorithm from the CSR's signature OID; the key length pins
        // the curve (an uncompressed P-256 point is 65 bytes, 0x04 first).
        let raw = rcgen::PublicKeyData::der_bytes(&csr.public_key);
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256
            || raw.len() != 65
            || raw.first() != Some(&0x04)
        {
            return Err(SignError::UnsupportedKey {
                algorithm: format!("{:?}", csr.public_key.algorithm()),
            });
        }
        match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] if uri.as_str() == expected.as_str() => {}
            sans => {
                return Err(SignError::SanMismatch {
                    expected: expected.clone(),
                    found: sans.iter().map(describe_san).collect(),
                });
            }
        }
        self.issue(&csr.public_key, expected, ttl)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots peers verify against (what `IssuedCert::trust_bundle_pem` carries).
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The CA's chain as persisted: signing certificate first, root last.
    pub fn cert_chain_pem(&self) -> String {
        self.chain_pem
            .iter()
            .chain(self.bundle.roots_pem())
            .map(String::as_str)
            .collect()
    }

    /// When the signing certificate expires; no certificate outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, SignError> {
        let sign_err = |source| SignError::Sign {
            id: id.clone(),
            source,
        };
        let now = SystemTime::now();
        let not_before = truncate_to_secs(now - CLOCK_SKEW_ALLOWANCE);
        let not_after =
            truncate_to_secs(now.checked_add(ttl).unwrap_or(self.not_after)).min(self.not_after);
        if not_after <= not_before {
            return Err(SignError::CaExpired);
        }
        let mut params = CertificateParams::default();
        // An empty subject makes rcgen mark the SAN extension critical (RFC 5280
        // §4.1.2.6), as SPIFFE X.509-SVIDs and Istio's certificates are.
        params.distinguished_name = DistinguishedName::new();
        let uri = id.as_str().to_owned().try_into().map_err(sign_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before).ok_or(SignError::CaExpired)?;
        params.not_after = to_offset(not_after).ok_or(SignError::CaExpired)?;
        let serial = random_serial()?;
        let serial_hex = hex_serial(&serial);
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(sign_err)?;
        let mut chain_pem = vec![cert.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedCert {
            chain_pem,
            trust_bundle_pem: self.bundle.roots_pem().to_vec(),
            not_before,
            not_after,
            serial: serial_hex,
        })
    }

    /// Signs a throw-away certificate and verifies it against the bundle.
    fn self_check(&self) -> Result<(), SelfCheckError> {
        let probe = SpiffeId::new(&self.trust_domain, "ambit-system", "ca-self-check")
            .map_err(SelfCheckError::Probe)?;
        let key = WorkloadKey::generate().map_err(SelfCheckError::Key)?;
        let issued = self
            .issue(key.key_pair(), &probe, Duration::from_secs(60))
            .map_err(SelfCheckError::Sign)?;
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        for pem in &issued.chain_pem {
            chain.extend(cert::certs_from_pem(pem).map_err(SelfCheckError::Cert)?);
        }
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(SelfCheckError::Cert(CertError::Empty))?;
        cert::verify_chain(leaf, intermediates, &self.bundle, Purpose::ClientAuth)
            .map_err(SelfCheckError::Verify)?;
        Ok(())
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.chain_pem.len())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

struct CaFacts {
    is_ca: bool,
    self_signed: bool,
    not_after: SystemTime,
}

fn parse_ca_facts(der: &[u8]) -> Result<CaFacts, CertError> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(CertError::Parse)?;
    let not_after = cert.validity().not_after.timestamp();
    Ok(CaFacts {
        is_ca: cert.is_ca(),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        not_after: SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_after).unwrap_or(0)),
    })
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        SanType::OtherName(_) => "otherName".to_owned(),
        // `SanType` is non-exhaustive.
        _ => "unknown SAN type".to_owned(),
    }
}

/// 16 random bytes, top bit cleared so the DER INTEGER stays positive and 16 bytes.
fn random_serial() -> Result<SerialNumber, SignError> {
    let mut bytes = [0u8; 16];
    crate::tls::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| SignError::Random)?;
    bytes[0] &= 0x7f;
    // A leading zero byte would be dropped by DER minimal encoding; keep 16 bytes.
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex_serial(serial: &SerialNumber) -> String {
    serial
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn to_offset(t: SystemTime) -> Option<OffsetDateTime> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()
}

/// Certificates carry whole seconds; report what the certificate says.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn read(path: &Path) -> Result<String, PersistError> {
    fs::read_to_string(path).map_err(|source| PersistError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })
}

fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), PersistError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| PersistError::Io {
            action,
            path,
            source,
        }
    };
    // A stale temporary file from a crashed run: remove it so `create_new` works and
    // its (possibly wider) permissions are not inherited.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing stale", &tmp)(e)),
    }
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        file.write_all(contents).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer as _, X509Certificate};

    use super::*;
    use crate::cert::{WorkloadCertificate, inspect_pem, verify_chain_at};

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(&td(), ns, sa).unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(td(), crate::DEFAULT_ROOT_VALIDITY).unwrap()
    }

    fn ders(pems: &[String]) -> Vec<CertificateDer<'static>> {
        pems.iter()
            .flat_map(|p| cert::certs_from_pem(p).unwrap())
            .collect()
    }

    fn csr_with_sans(key: &WorkloadKey, sans: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .serialize_request(key.key_pair())
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn csr_signed_and_parsed_back_is_a_spiffe_leaf() {
        let ca = ca();
        let key = WorkloadKey::generate().unwrap();
        let want = id("production", "checkout");
        let ttl = Duration::from_secs(3600);
        let before = SystemTime::now();
        let issued = ca
            .sign_csr(&key.csr_pem(&want).unwrap(), &want, ttl)
            .unwrap();

        assert_eq!(issued.chain_pem.len(), 1, "root signs directly: leaf only");
        assert_eq!(issued.trust_bundle_pem, ca.trust_bundle().roots_pem());

        // Identity, CA flag and TTL as reported by the inspection helper.
        let info = inspect_pem(&issued.chain_pem[0]).unwrap();
        assert_eq!(info.spiffe_id, want);
        assert!(!info.is_ca);
        assert_eq!(info.not_after, issued.not_after);
        assert_eq!(info.not_before, issued.not_before);
        let lifetime = info.not_after.duration_since(before).unwrap();
        assert!(
            lifetime <= ttl && lifetime >= ttl - Duration::from_secs(5),
            "{lifetime:?}"
        );
        let backdate = before.duration_since(info.not_before).unwrap();
        assert!(
            backdate >= CLOCK_SKEW_ALLOWANCE - Duration::from_secs(1)
                && backdate <= CLOCK_SKEW_ALLOWANCE + Duration::from_secs(5),
            "{backdate:?}"
        );

        // The raw extensions.
        let chain = ders(&issued.chain_pem);
        let (_, x509) = X509Certificate::from_der(&chain[0]).unwrap();
        assert!(x509.subject().as_raw().len() <= 2, "empty subject");
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical with an empty subject");
        assert!(matches!(
            san.value.general_names.as_slice(),
            [GeneralName::URI(u)] if *u == want.as_str()
        ));
        let bc = x509.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = x509.key_usage().unwrap().unwrap();
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        let eku = x509.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(x509.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )));
        assert_eq!(x509.raw_serial().len(), 16);

        // Chains to the bundle, for both directions of mTLS.
        let bundle = TrustBundle::from_pem(td(), &issued.trust_bundle_pem).unwrap();
        for purpose in [Purpose::ServerAuth, Purpose::ClientAuth] {
            assert_eq!(
                cert::verify_chain(&chain[0], &chain[1..], &bundle, purpose).unwrap(),
                want
            );
        }
        // ...and not once expired.
        let later = UnixTime::since_unix_epoch(
            issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                + Duration::from_secs(1),
        );
        let err = verify_chain_at(&chain[0], &[], &bundle, Purpose::ServerAuth, later).unwrap_err();
        assert!(
            matches!(
                &err,
                VerifyError::Chain {
                    source: webpki::Error::CertExpired { .. },
                    ..
                }
            ),
            "{err:?}"
        );

        // The proxy side pairs it with its key; renewal at half life.
        let wc = WorkloadCertificate::new(key, &issued.chain_pem, &want).unwrap();
        let half = wc.renew_at().duration_since(wc.not_before()).unwrap();
        let full = wc.not_after().duration_since(wc.not_before()).unwrap();
        assert_eq!(half, full / 2);
        // Two certificates never share a serial.
        let key2 = WorkloadKey::generate().unwrap();
        let again = ca
            .sign_csr(&key2.csr_pem(&want).unwrap(), &want, ttl)
            .unwrap();
        assert_ne!(again.serial, issued.serial);
    }

    #[test]
    fn csr_for_another_identity_is_refused_naming_what_it_carried() {
        let ca = ca();
        let key = WorkloadKey::generate().unwrap();
        let asked = id("production", "payment");
        let expected = id("production", "checkout");
        let err = ca
            .sign_csr(
                &key.csr_pem(&asked).unwrap(),
                &expected,
                crate::DEFAULT_CERT_TTL,
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SignError::SanMismatch { .. }), "{err:?}");
        assert!(
            msg.contains("URI:spiffe://cluster.local/ns/production/sa/payment"),
            "{msg}"
        );
        assert!(
            msg.contains("spiffe://cluster.local/ns/production/sa/checkout"),
            "{msg}"
        );
    }

    #[test]
    fn csr_with_two_or_zero_sans_is_refused() {
        let ca = ca();
        let key = WorkloadKey::generate().unwrap();
        let want = id("production", "checkout");
        let two = csr_with_sans(
            &key,
            vec![
                SanType::URI(want.as_str().to_owned().try_into().unwrap()),
                SanType::DnsName("checkout.production.svc".to_owned().try_into().unwrap()),
            ],
        );
        let err = ca
            .sign_csr(&two, &want, crate::DEFAULT_CERT_TTL)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("DNS:checkout.production.svc"), "{msg}");
        assert!(msg.contains(&format!("URI:{want}")), "{msg}");

        let two_uris = csr_with_sans(
            &key,
            vec![
                SanType::URI(want.as_str().to_owned().try_into().unwrap()),
                SanType::URI(want.as_str().to_owned().try_into().unwrap()),
            ],
        );
        assert!(matches!(
            ca.sign_csr(&two_uris, &want, crate::DEFAULT_CERT_TTL),
            Err(SignError::SanMismatch { .. })
        ));

        let none = csr_with_sans(&key, vec![]);
        let err = ca
            .sign_csr(&none, &want, crate::DEFAULT_CERT_TTL)
            .unwrap_err();
        assert!(err.to_string().contains("it carries []"), "{err}");
    }

    #[test]
    fn other_refusals() {
        let ca = ca();
        let key = WorkloadKey::generate().unwrap();
        let want = id("a", "b");
        let csr = key.csr_pem(&want).unwrap();

        let foreign = SpiffeId::parse("spiffe://other.local/ns/a/sa/b").unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &foreign, crate::DEFAULT_CERT_TTL),
            Err(SignError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            ca.sign_csr(&csr, &want, Duration::ZERO),
            Err(SignError::ZeroTtl)
        ));
        assert!(matches!(
            ca.sign_csr("not a csr", &want, crate::DEFAULT_CERT_TTL),
            Err(SignError::InvalidCsr(_))
        ));

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(want.as_str().to_owned().try_into().unwrap())];
        let csr384 = params.serialize_request(&p384).unwrap().pem().unwrap();
        let err = ca
            .sign_csr(&csr384, &want, crate::DEFAULT_CERT_TTL)
            .unwrap_err();
        assert!(matches!(err, SignError::UnsupportedKey { .. }), "{err:?}");
    }

    #[test]
    fn ttl_is_capped_at_the_ca_expiry() {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(600)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let want = id("a", "b");
        let issued = ca
            .sign_csr(&key.csr_pem(&want).unwrap(), &want, crate::DEFAULT_CERT_TTL)
            .unwrap();
        assert!(issued.not_after <= ca.not_after());
    }

    #[test]
    fn root_persists_and_reloads_identically() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("ca");
        let first =
            CertificateAuthority::load_or_generate(&state, td(), crate::DEFAULT_ROOT_VALIDITY)
                .unwrap();
        let second =
            CertificateAuthority::load_or_generate(&state, td(), crate::DEFAULT_ROOT_VALIDITY)
                .unwrap();
        assert_eq!(first.cert_chain_pem(), second.cert_chain_pem());
        assert_eq!(
            first.trust_bundle().roots_pem(),
            second.trust_bundle().roots_pem()
        );

        let mode =
            |name: &str| fs::metadata(state.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // The reloaded CA signs certificates the first one's bundle accepts.
        let key = WorkloadKey::generate().unwrap();
        let want = id("a", "b");
        let issued = second
            .sign_csr(&key.csr_pem(&want).unwrap(), &want, crate::DEFAULT_CERT_TTL)
            .unwrap();
        let chain = ders(&issued.chain_pem);
        cert::verify_chain(
            &chain[0],
            &chain[1..],
            first.trust_bundle(),
            Purpose::ClientAuth,
        )
        .unwrap();

        // Half a state is refused, never overwritten.
        fs::remove_file(state.join(CERT_FILE)).unwrap();
        let err =
            CertificateAuthority::load_or_generate(&state, td(), crate::DEFAULT_ROOT_VALIDITY)
                .unwrap_err();
        assert!(matches!(err, PersistError::Incomplete { .. }), "{err}");
        assert!(state.join(KEY_FILE).exists());
    }

    #[test]
    fn operator_supplied_intermediate_ca_chains_to_its_root() {
        // root → intermediate, as an operator would bring them.
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);

        let int_key = KeyPair::generate().unwrap();
        let mut int_params = CertificateParams::default();
        int_params.distinguished_name = DistinguishedName::new();
        int_params
            .distinguished_name
            .push(DnType::CommonName, "Ambit intermediate");
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();

        let chain_pem = format!("{}{}", int.pem(), root.pem());
        let ca =
            CertificateAuthority::from_pem(td(), &chain_pem, &int_key.serialize_pem()).unwrap();
        assert_eq!(
            ca.trust_bundle().roots_pem(),
            [cert::der_to_pem(root.der())]
        );

        let key = WorkloadKey::generate().unwrap();
        let want = id("a", "b");
        let issued = ca
            .sign_csr(&key.csr_pem(&want).unwrap(), &want, crate::DEFAULT_CERT_TTL)
            .unwrap();
        assert_eq!(issued.chain_pem.len(), 2, "leaf + intermediate");
        let chain = ders(&issued.chain_pem);
        let bundle = TrustBundle::from_pem(td(), &issued.trust_bundle_pem).unwrap();
        assert_eq!(
            cert::verify_chain(&chain[0], &chain[1..], &bundle, Purpose::ServerAuth).unwrap(),
            want
        );
        // Without the intermediate, it does not chain.
        assert!(cert::verify_chain(&chain[0], &[], &bundle, Purpose::ServerAuth).is_err());
        // The chain survives a save / load round trip.
        let dir = tempfile::tempdir().unwrap();
        ca.save_to_dir(dir.path()).unwrap();
        let back = CertificateAuthority::load_or_generate(dir.path(), td(), Duration::from_secs(1))
            .unwrap();
        assert_eq!(back.cert_chain_pem(), ca.cert_chain_pem());
    }

    #[test]
    fn operator_supplied_material_is_checked() {
        let good = ca();
        let root_pem = good.cert_chain_pem();
        // A key that is not the certificate's.
        let other_key = KeyPair::generate().unwrap().serialize_pem();
        let err = CertificateAuthority::from_pem(td(), &root_pem, &other_key).unwrap_err();
        assert!(matches!(err, CaError::SelfCheck(_)), "{err:?}");

        // A leaf is not a CA.
        let key = WorkloadKey::generate().unwrap();
        let want = id("a", "b");
        let issued = good
            .sign_csr(&key.csr_pem(&want).unwrap(), &want, crate::DEFAULT_CERT_TTL)
            .unwrap();
        let err = CertificateAuthority::from_pem(td(), &issued.chain_pem[0], &key.to_pkcs8_pem())
            .unwrap_err();
        assert!(matches!(err, CaError::NotACa), "{err:?}");

        assert!(matches!(
            CertificateAuthority::from_pem(td(), "", &other_key),
            Err(CaError::Cert(CertError::Empty))
        ));
    }

    #[test]
    fn debug_output_has_no_key() {
        let ca = ca();
        let key_pem = ca.issuer.key().serialize_pem();
        let body: String = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let debug = format!("{ca:?}");
        assert!(!debug.contains(&body[..20]), "{debug}");
        assert!(debug.contains("<redacted>"));
    }
}
