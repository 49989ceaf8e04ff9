//! The on-disk certificate cache, so a proxy restarted while the controller is away
//! still has its certificates (issue 4: "a daemon restarted while the controller is
//! down still serves").
//!
//! Layout of the cache directory (mode 0700, tightened if it exists):
//! - `<namespace>_<service-account>.pem` (mode 0600), one per identity: the PKCS#8
//!   `PRIVATE KEY` block, then the `CERTIFICATE` chain, leaf first. Namespaces never
//!   contain `_` (DNS-1123 label), so the name is unambiguous; the identity itself
//!   is read back from the leaf, the name is only a place.
//! - `trust-bundle.pem` (mode 0600): the roots from the last CA answer.
//!
//! Every write is atomic (temporary file, fsync, rename, directory fsync), so a crash
//! never leaves a key next to another key's certificate. On start, expired or
//! unreadable entries are deleted and leftovers of interrupted writes removed.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ambit_identity::cert::{self, Purpose};
use ambit_identity::{SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate, WorkloadKey};

use crate::fsutil;

/// Name of the trust bundle file in the cache directory.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

const KEY_END: &str = "-----END PRIVATE KEY-----";

/// The certificate cache directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("preparing the certificate cache directory {}", path.display())]
pub struct CertCacheError {
    /// The directory.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// A cache entry that cannot be used.
#[derive(Debug, thiserror::Error)]
enum EntryError {
    #[error("reading")]
    Read(#[source] std::io::Error),
    #[error("no PRIVATE KEY block")]
    NoKey,
    #[error("loading the private key")]
    Key(#[source] ambit_identity::key::KeyError),
    #[error("reading the certificate")]
    Cert(#[source] ambit_identity::cert::CertError),
    #[error("the key and the certificate do not belong together")]
    Mismatch(#[source] ambit_identity::cert::WorkloadCertError),
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("the chain does not verify (expired, or from an older root)")]
    Verify(#[source] ambit_identity::cert::VerifyError),
    #[error("expired")]
    Expired,
}

/// The cache directory.
#[derive(Clone, Debug)]
pub(crate) struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Creates the directory (0700) if needed.
    pub(crate) fn open(dir: PathBuf) -> Result<Self, CertCacheError> {
        fsutil::ensure_private_dir(&dir, 0o700).map_err(|source| CertCacheError {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    pub(crate) fn cert_path(&self, id: &SpiffeId) -> PathBuf {
        self.dir
            .join(format!("{}_{}.pem", id.namespace(), id.service_account()))
    }

    /// Writes one identity's key and chain.
    pub(crate) fn write_cert(&self, cert: &WorkloadCertificate) -> std::io::Result<()> {
        let mut text = String::from(&**cert.key().to_pkcs8_pem());
        if !text.ends_with('\n') {
            text.push('\n');
        }
        for pem in cert.chain_pem() {
            text.push_str(pem);
        }
        let text = zeroize::Zeroizing::new(text);
        fsutil::write_atomic(&self.cert_path(cert.id()), text.as_bytes(), 0o600)
    }

    /// Writes the trust bundle.
    pub(crate) fn write_bundle(&self, bundle: &TrustBundle) -> std::io::Result<()> {
        let text: String = bundle.roots_pem().concat();
        fsutil::write_atomic(&self.dir.join(TRUST_BUNDLE_FILE), text.as_bytes(), 0o600)
    }

    /// Deletes one identity's entry (absent is fine).
    pub(crate) fn remove_cert(&self, id: &SpiffeId) -> std::io::Result<()> {
        match std::fs::remove_file(self.cert_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => fsutil::sync_dir(&self.dir),
        }
    }

    /// Loads the bundle and every still-valid certificate of `trust_domain`;
    /// deletes what is expired or unreadable (logging why).
    pub(crate) fn load(
        &self,
        trust_domain: &TrustDomain,
    ) -> (Option<TrustBundle>, Vec<WorkloadCertificate>) {
        let bundle = self.load_bundle(trust_domain);
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list the certificate cache");
                return (bundle, Vec::new());
            }
        };
        let mut certs = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(fsutil::TMP_MARKER) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if name == TRUST_BUNDLE_FILE || !name.ends_with(".pem") {
                continue;
            }
            match load_entry(&path, trust_domain, bundle.as_ref()) {
                Ok(cert) => certs.push(cert),
                Err(EntryError::ForeignTrustDomain { id, trust_domain }) => {
                    tracing::info!(path = %path.display(), %id, %trust_domain, "ignoring a cached certificate of another trust domain");
                }
                Err(e) => {
                    tracing::info!(
                        path = %path.display(),
                        reason = %crate::error_chain(&e),
                        "dropping an unusable cached certificate"
                    );
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        (bundle, certs)
    }

    fn load_bundle(&self, trust_domain: &TrustDomain) -> Option<TrustBundle> {
        let path = self.dir.join(TRUST_BUNDLE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the cached trust bundle");
                return None;
            }
        };
        match TrustBundle::from_pem(trust_domain.clone(), &[text]) {
            Ok(bundle) => Some(bundle),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %crate::error_chain(&e),
                    "ignoring the cached trust bundle"
                );
                None
            }
        }
    }
}

fn load_entry(
    path: &Path,
    trust_domain: &TrustDomain,
    bundle: Option<&TrustBundle>,
) -> Result<WorkloadCertificate, EntryError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(EntryError::Read)?);
    let split = text.find(KEY_END).ok_or(EntryError::NoKey)? + KEY_END.len();
    let (key_pem, chain_pem) = text.split_at(split);
    let key = WorkloadKey::from_pkcs8_pem(key_pem).map_err(EntryError::Key)?;
    let id = cert::inspect_pem(chain_pem)
        .map_err(EntryError::Cert)?
        .spiffe_id;
    if id.trust_domain() != trust_domain {
        return Err(EntryError::ForeignTrustDomain {
            id,
            trust_domain: trust_domain.clone(),
        });
    }
    let cert = WorkloadCertificate::new(key, &[chain_pem], &id).map_err(EntryError::Mismatch)?;
    if cert.is_expired_at(SystemTime::now()) {
        return Err(EntryError::Expired);
    }
    if let (Some(bundle), Some((leaf, intermediates))) = (bundle, cert.chain_der().split_first()) {
        cert::verify_chain_for(leaf, intermediates, bundle, Purpose::ClientAuth, &id)
            .map_err(EntryError::Verify)?;
    }
    Ok(cert)
}
