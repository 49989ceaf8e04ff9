//! Workload identity for the mesh: SPIFFE IDs, workload keys and CSRs, the
//! certificate authority, certificate inspection and verification, and rustls
//! verifiers that check a peer against the identity expected (DESIGN §3).
//!
//! Who uses what:
//! - the controller: [`ca::CertificateAuthority`] (`load_or_generate`, `sign_csr`);
//! - the daemon and the waypoint: [`WorkloadKey`] (generate, CSR), then
//!   [`WorkloadCertificate`] from the CA's answer, [`TrustBundle`], and
//!   [`tls::client_config`] / [`tls::server_config`] (or the verifiers, with their
//!   own certificate resolvers) for HBONE; [`cert::peer_spiffe_id`] after a handshake.
//!
//! Private keys live in memory (zeroed on drop) and never appear in `Debug` output.
#![forbid(unsafe_code)]

use std::time::Duration;

pub mod ca;
pub mod cert;
pub mod key;
pub mod spiffe;
pub mod tls;

pub use ca::{CertificateAuthority, IssuedCert};
pub use cert::{
    LeafInfo, Purpose, TrustBundle, WorkloadCertificate, verify_chain, verify_chain_for,
};
pub use key::WorkloadKey;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Default lifetime of a workload certificate (DESIGN §3); renewal is at half life.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Default validity of a generated root: 10 years.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How far `not_before` is backdated, so that peers whose clocks lag a little
/// accept a certificate as soon as it is issued.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
