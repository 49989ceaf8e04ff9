//! Where HBONE gets certificates and roots. Both ends read them for EVERY new
//! connection, so a rotated certificate is used from the next connection on, while
//! established connections finish on the one they were made with.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use ambit_identity::{SpiffeId, TrustBundle, WorkloadCertificate};

/// The current certificates (by identity) and trust bundle.
///
/// The daemon implements this on its certificate manager; [`CertStore`] is a
/// ready-made implementation.
pub trait Credentials: Send + Sync + 'static {
    /// The current certificate for `id`, if one is held.
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>>;
    /// The current roots peers must chain to.
    fn trust_bundle(&self) -> Arc<TrustBundle>;
}

/// What a server presents: the certificate for the local address a connection
/// arrived on (HBONE sends no SNI; one pod IP is one workload identity).
pub trait ServerCredentials: Send + Sync + 'static {
    /// The certificate to present on a connection accepted at `local`; `None`
    /// refuses the connection.
    fn certificate_for(&self, local: SocketAddr) -> Option<Arc<WorkloadCertificate>>;
    /// The current roots clients must chain to.
    fn trust_bundle(&self) -> Arc<TrustBundle>;
}

/// An in-memory [`Credentials`]: certificates replaced on rotation with
/// [`CertStore::insert`].
pub struct CertStore {
    certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCertificate>>>,
    bundle: RwLock<Arc<TrustBundle>>,
}

/// One identity for every local address: a listener inside one pod's network
/// namespace, or a waypoint.
pub struct SingleIdentity {
    credentials: Arc<dyn Credentials>,
    id: SpiffeId,
}

/// The identity served at each local IP, for a listener that receives connections
/// for several workloads.
pub struct IdentityByAddress {
    credentials: Arc<dyn Credentials>,
    ids: RwLock<HashMap<IpAddr, SpiffeId>>,
}

impl CertStore {
    /// An empty store trusting `bundle`.
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        Self {
            certs: RwLock::new(HashMap::new()),
            bundle: RwLock::new(bundle),
        }
    }

    /// Adds or replaces (rotates) the certificate for its identity; returns the
    /// previous one.
    pub fn insert(&self, cert: Arc<WorkloadCertificate>) -> Option<Arc<WorkloadCertificate>> {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cert.id().clone(), cert)
    }

    /// Forgets the certificate for `id`.
    pub fn remove(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
    }

    /// Replaces the trust bundle (root rotation).
    pub fn set_trust_bundle(&self, bundle: Arc<TrustBundle>) {
        *self.bundle.write().unwrap_or_else(PoisonError::into_inner) = bundle;
    }
}

impl Credentials for CertStore {
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        self.certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let certs = self.certs.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("CertStore")
            .field("identities", &certs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SingleIdentity {
    /// Presents `credentials`' current certificate for `id` on every connection.
    pub fn new(credentials: Arc<dyn Credentials>, id: SpiffeId) -> Self {
        Self { credentials, id }
    }
}

impl ServerCredentials for SingleIdentity {
    fn certificate_for(&self, _local: SocketAddr) -> Option<Arc<WorkloadCertificate>> {
        self.credentials.certificate(&self.id)
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.credentials.trust_bundle()
    }
}

impl fmt::Debug for SingleIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl IdentityByAddress {
    /// No address served yet.
    pub fn new(credentials: Arc<dyn Credentials>) -> Self {
        Self {
            credentials,
            ids: RwLock::new(HashMap::new()),
        }
    }

    /// Serves `id` for connections to `ip`.
    pub fn insert(&self, ip: IpAddr, id: SpiffeId) -> Option<SpiffeId> {
        self.ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ip, id)
    }

    /// Stops serving `ip` (new connections to it are refused).
    pub fn remove(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip)
    }
}

impl ServerCredentials for IdentityByAddress {
    fn certificate_for(&self, local: SocketAddr) -> Option<Arc<WorkloadCertificate>> {
        let id = self
            .ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&local.ip())
            .cloned()?;
        self.credentials.certificate(&id)
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.credentials.trust_bundle()
    }
}

impl fmt::Debug for IdentityByAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = self.ids.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("IdentityByAddress")
            .field("ids", &*ids)
            .finish_non_exhaustive()
    }
}
