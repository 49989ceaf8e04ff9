//! Workload keys and certificate signing requests.
//!
//! Keys are ECDSA P-256, generated where they are used (the node daemon, the
//! waypoint) and never sent anywhere: only the CSR, which carries the public key,
//! leaves the process.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize as _, Zeroizing};

use crate::spiffe::SpiffeId;

/// An ECDSA P-256 private key for one workload identity.
///
/// Held in memory only (unless the caller persists [`WorkloadKey::to_pkcs8_pem`]); the
/// serialized key is zeroed on drop and never appears in `Debug` output.
pub struct WorkloadKey {
    key: KeyPair,
}

/// Generating or loading a key failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The crypto backend could not generate a key.
    #[error("generating an ECDSA P-256 key")]
    Generate(#[source] rcgen::Error),
    /// The PEM is not a PKCS#8 private key rcgen/aws-lc can load.
    #[error("loading a PKCS#8 private key")]
    Load(#[source] rcgen::Error),
    /// The key loaded fine but is not ECDSA P-256.
    #[error("workload keys must be ECDSA P-256, this one is {algorithm}")]
    WrongAlgorithm {
        /// The algorithm found.
        algorithm: String,
    },
}

/// Building a CSR failed.
#[derive(Debug, thiserror::Error)]
#[error("building a CSR for {id}")]
pub struct CsrError {
    /// The identity requested.
    pub id: SpiffeId,
    /// What rcgen reported.
    #[source]
    pub source: rcgen::Error,
}

impl WorkloadKey {
    /// Generates a fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, KeyError> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map(|key| Self { key })
            .map_err(KeyError::Generate)
    }

    /// Loads a key written by [`WorkloadKey::to_pkcs8_pem`] (e.g. the daemon's
    /// on-disk cache, so a restarted daemon keeps serving with its certificates).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let key = KeyPair::from_pem(pem).map_err(KeyError::Load)?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(KeyError::WrongAlgorithm {
                algorithm: format!("{:?}", key.algorithm()),
            });
        }
        Ok(Self { key })
    }

    /// The private key as PKCS#8 PEM. Secret: write it only to a 0600 file.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// The private key in the form rustls loads (PKCS#8 DER). Secret.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The public key as a DER SubjectPublicKeyInfo (what a certificate for this key
    /// carries).
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }

    /// A PEM PKCS#10 CSR for `id`: empty subject, exactly one SAN, the URI `id`,
    /// signed with this key (proof of possession).
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, CsrError> {
        let err = |source| CsrError {
            id: id.clone(),
            source,
        };
        let uri = id.as_str().to_owned().try_into().map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(err)
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("algorithm", &"ECDSA_P256")
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl Drop for WorkloadKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = WorkloadKey::generate().unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let pem = key.to_pkcs8_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!debug.contains(&body[..16]), "{debug}");
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let key = WorkloadKey::generate().unwrap();
        let back = WorkloadKey::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
        assert_eq!(back.public_key_spki_der(), key.public_key_spki_der());
    }

    #[test]
    fn non_p256_keys_are_refused() {
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let err = WorkloadKey::from_pkcs8_pem(&p384.serialize_pem()).unwrap_err();
        assert!(matches!(err, KeyError::WrongAlgorithm { .. }), "{err}");
    }

    #[test]
    fn csr_carries_exactly_the_spiffe_uri() {
        let key = WorkloadKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let pem = key.csr_pem(&id).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        assert!(matches!(
            &parsed.params.subject_alt_names[0],
            SanType::URI(u) if u.as_str() == id.as_str()
        ));
    }
}
