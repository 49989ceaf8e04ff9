//! Workload certificates from the controller's CA (`proto/ambit/ca/v1/ca.proto`).
//!
//! [`CertManager`] holds one certificate per SPIFFE identity the proxy serves (the
//! node daemon: every identity with a pod on the node; the waypoint: its own).
//! - [`CertManager::fetch`] returns the held certificate or gets one: a fresh ECDSA
//!   P-256 key generated here (it never leaves the process, except into the optional
//!   cache directory), a CSR for exactly that identity, `CreateCertificate` with the
//!   bearer token, and a check that the answer is for that identity and that key and
//!   verifies against the trust bundle that came with it.
//! - A background task renews every held certificate at half life and retries
//!   failures with [`Backoff`]; the old certificate stays in use until it expires.
//!   [`CertManager::current`] never returns an expired certificate.
//! - The trust bundle of the last answer is published on a `watch`.
//! - With `cache_dir`, keys and chains are persisted (0700 directory, 0600 files,
//!   atomic writes) and reloaded on start while still valid (see [`cache`]).

pub mod cache;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use ambit_api::ca::v1::CreateCertificateRequest;
use ambit_api::ca::v1::certificate_service_client::CertificateServiceClient;
use ambit_api::time::duration_to_proto;
use ambit_identity::cert::{self, Purpose, TrustBundleError, VerifyError, WorkloadCertError};
use ambit_identity::key::{CsrError, KeyError};
use ambit_identity::{SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate, WorkloadKey};
use tokio::sync::{Notify, watch};
use tonic::Request;
use tonic::transport::{Channel, Uri};

use crate::backoff::Backoff;
use crate::token::{TokenError, TokenSource};
use cache::Cache;

pub use cache::CertCacheError;

/// How long the renewal task sleeps at most before looking at the clock again (a
/// wall-clock jump, e.g. after a suspend, is noticed within this).
const MAX_IDLE: Duration = Duration::from_secs(30);

/// What [`CertManager::new`] needs.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// The controller's CA address.
    pub controller: Uri,
    /// The bearer credential, read again for every request.
    pub token: TokenSource,
    /// Lifetime to ask for (`None`: the CA's default, 24 h unless configured).
    pub requested_ttl: Option<Duration>,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for one `CreateCertificate` call.
    pub request_timeout: Duration,
    /// Delays between retries of a failed request (per identity).
    pub backoff: Backoff,
    /// Where keys and certificates are cached across restarts (`None`: memory only).
    pub cache_dir: Option<PathBuf>,
    /// `SO_MARK` of the connections to the CA (`None`: unmarked); see
    /// [`crate::SubscriptionConfig::socket_mark`].
    pub socket_mark: Option<u32>,
}

/// Where a certificate is in its life, for `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum CertState {
    /// Requested, nothing received yet.
    Pending,
    /// Valid, not due for renewal.
    Ready,
    /// Valid and past half life: being renewed (or retrying; see `lastError`).
    Renewing,
    /// No valid certificate, and the last request failed; retrying with backoff.
    Failed {
        /// The last failure.
        error: String,
    },
}

/// One identity's certificate as `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSnapshot {
    /// The SPIFFE ID.
    pub identity: String,
    /// Its state.
    #[serde(flatten)]
    pub state: CertState,
    /// The leaf's serial (hex), when a valid certificate is held.
    pub serial: Option<String>,
    /// Start of validity.
    #[serde(serialize_with = "rfc3339")]
    pub not_before: Option<SystemTime>,
    /// End of validity.
    #[serde(serialize_with = "rfc3339")]
    pub not_after: Option<SystemTime>,
    /// When renewal starts.
    #[serde(serialize_with = "rfc3339")]
    pub renew_at: Option<SystemTime>,
    /// Whether the held certificate was loaded from the cache directory.
    pub from_cache: bool,
    /// The last failure, kept until a request succeeds.
    pub last_error: Option<String>,
}

/// Getting a certificate for an identity failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The identity is not in this manager's trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignIdentity {
        /// The identity asked for.
        id: SpiffeId,
        /// The manager's trust domain.
        trust_domain: TrustDomain,
    },
    /// Key generation failed.
    #[error("generating a key")]
    Key(#[source] KeyError),
    /// The CSR could not be built.
    #[error("building the CSR")]
    Csr(#[source] CsrError),
    /// No usable credential.
    #[error("getting the bearer token to request a certificate for {id}")]
    Token {
        /// The identity.
        id: SpiffeId,
        /// Why.
        #[source]
        source: TokenError,
    },
    /// The CA did not answer in time.
    #[error("requesting a certificate for {id}: no answer within {timeout:?}")]
    Timeout {
        /// The identity.
        id: SpiffeId,
        /// The limit.
        timeout: Duration,
    },
    /// The CA refused or the call failed (`PERMISSION_DENIED`, `UNAVAILABLE`, …).
    #[error("requesting a certificate for {id}")]
    Rpc {
        /// The identity.
        id: SpiffeId,
        /// The gRPC status.
        #[source]
        status: tonic::Status,
    },
    /// The CA answered for another trust domain.
    #[error("the CA issued a certificate for trust domain {found:?}, expected {expected}")]
    WrongTrustDomain {
        /// What the answer says.
        found: String,
        /// Ours.
        expected: TrustDomain,
    },
    /// The trust bundle in the answer is unusable.
    #[error("the CA's trust bundle for {id}")]
    TrustBundle {
        /// The identity.
        id: SpiffeId,
        /// Why.
        #[source]
        source: TrustBundleError,
    },
    /// The chain is unreadable, for another identity, or for another key.
    #[error("the CA's answer for {id} is not a certificate for that identity and key")]
    Certificate {
        /// The identity.
        id: SpiffeId,
        /// Why.
        #[source]
        source: WorkloadCertError,
    },
    /// The chain does not verify against the bundle that came with it.
    #[error("the certificate issued for {id} does not verify")]
    Verify {
        /// The identity.
        id: SpiffeId,
        /// Why.
        #[source]
        source: VerifyError,
    },
}

/// The certificate manager. Cheap to clone; the renewal task stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    config: CaClientConfig,
    trust_domain: TrustDomain,
    client: CertificateServiceClient<Channel>,
    cache: Option<Cache>,
    entries: RwLock<HashMap<SpiffeId, Entry>>,
    bundle: watch::Sender<Option<Arc<TrustBundle>>>,
    changes: watch::Sender<u64>,
    wake: Arc<Notify>,
    /// Dropped with `Inner`, which stops the renewal task.
    _stop: watch::Sender<()>,
}

struct Entry {
    held: Option<Held>,
    last_error: Option<String>,
    failures: u32,
    retry_at: Option<SystemTime>,
    /// Serialises requests for this identity (fetch vs. renewal).
    issue_lock: Arc<tokio::sync::Mutex<()>>,
}

struct Held {
    cert: Arc<WorkloadCertificate>,
    serial: String,
    renew_at: SystemTime,
    from_cache: bool,
}

impl CaClientConfig {
    /// A config with defaults: the CA's default TTL, 5 s connect and 10 s request
    /// timeouts, backoff 200 ms doubling to 30 s, no cache.
    pub fn new(controller: Uri, token: impl Into<TokenSource>) -> Self {
        Self {
            controller,
            token: token.into(),
            requested_ttl: None,
            connect_timeout: crate::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Duration::from_secs(10),
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(30),
            },
            cache_dir: None,
            socket_mark: None,
        }
    }
}

impl CertManager {
    /// Builds the manager for `trust_domain`, loads the cache (if configured) and
    /// starts the renewal task. Must be called inside a tokio runtime. Connects
    /// lazily: an unreachable controller shows up as fetch errors, not here.
    pub fn new(config: CaClientConfig, trust_domain: TrustDomain) -> Result<Self, CertCacheError> {
        let cache = config.cache_dir.clone().map(Cache::open).transpose()?;
        let endpoint = crate::endpoint(&config.controller, config.connect_timeout);
        let channel = match config.socket_mark {
            None => endpoint.connect_lazy(),
            Some(mark) => endpoint.connect_with_connector_lazy(crate::MarkedConnector::new(mark)),
        };
        let client = CertificateServiceClient::new(channel)
            .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE);
        let (stop, stop_rx) = watch::channel(());
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            config,
            trust_domain,
            client,
            cache,
            entries: RwLock::new(HashMap::new()),
            bundle: watch::Sender::new(None),
            changes: watch::Sender::new(0),
            wake: wake.clone(),
            _stop: stop,
        });
        if let Some(cache) = &inner.cache {
            let (bundle, certs) = cache.load(&inner.trust_domain);
            if let Some(bundle) = bundle {
                inner.bundle.send_replace(Some(Arc::new(bundle)));
            }
            for cert in certs {
                tracing::info!(
                    id = %cert.id(),
                    not_after = %fmt_time(cert.not_after()),
                    "loaded a cached certificate"
                );
                inner.store_cached(cert);
            }
        }
        tokio::spawn(renewal_loop(Arc::downgrade(&inner), wake, stop_rx));
        Ok(Self { inner })
    }

    /// The trust domain this manager issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The valid certificate held for `id`, if any. Cheap (a read lock and an `Arc`
    /// clone): meant for every TLS handshake. Never returns an expired certificate.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let now = SystemTime::now();
        self.inner
            .read()
            .get(id)?
            .held
            .as_ref()
            .filter(|h| !h.cert.is_expired_at(now))
            .map(|h| h.cert.clone())
    }

    /// The certificate for `id`: the one held if still valid, else a new one from
    /// the CA. From now on `id` is kept renewed until [`CertManager::remove`]. When
    /// the request fails the error is returned and the renewal task keeps retrying
    /// with backoff (see [`CertManager::wait_current`]).
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, FetchError> {
        if id.trust_domain() != &self.inner.trust_domain {
            return Err(FetchError::ForeignIdentity {
                id: id.clone(),
                trust_domain: self.inner.trust_domain.clone(),
            });
        }
        if let Some(cert) = self.current(id) {
            return Ok(cert);
        }
        let lock = self.inner.register(id);
        let _guard = lock.lock().await;
        // Another fetch, or the renewal task, may have got one meanwhile.
        if let Some(cert) = self.current(id) {
            return Ok(cert);
        }
        self.inner.issue_and_store(id).await
    }

    /// Waits until a valid certificate for `id` is held (after [`CertManager::fetch`]
    /// registered it; the renewal task retries failures).
    pub async fn wait_current(&self, id: &SpiffeId) -> Arc<WorkloadCertificate> {
        let mut changes = self.inner.changes.subscribe();
        loop {
            if let Some(cert) = self.current(id) {
                return cert;
            }
            // The sender lives in `self.inner`, so this cannot fail while we wait.
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops keeping `id` (no pod on the node has it any more): forgets the
    /// certificate and deletes its cache entry.
    pub fn remove(&self, id: &SpiffeId) {
        let removed = self.inner.write().remove(id).is_some();
        if removed {
            tracing::info!(%id, "certificate no longer needed; dropped");
            self.inner.remove_cached(id);
            self.inner.changed();
        }
    }

    /// Keeps only the identities for which `keep` is true (reconciliation after a
    /// restart, when the cache may hold identities that left the node).
    pub fn retain(&self, mut keep: impl FnMut(&SpiffeId) -> bool) {
        let gone: Vec<SpiffeId> = self
            .inner
            .read()
            .keys()
            .filter(|id| !keep(id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// Every identity held or being requested.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.inner.read().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The trust bundle of the last CA answer (or of the cache); `None` before any.
    pub fn trust_bundle(&self) -> watch::Receiver<Option<Arc<TrustBundle>>> {
        self.inner.bundle.subscribe()
    }

    /// Bumped whenever a certificate is issued, fails, or is removed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Every identity's certificate state, sorted by identity, for `/config_dump`.
    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let now = SystemTime::now();
        let mut out: Vec<CertSnapshot> = self
            .inner
            .read()
            .iter()
            .map(|(id, e)| e.snapshot(id, now))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("controller", &self.inner.config.controller)
            .field("trust_domain", &self.inner.trust_domain)
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Entry>> {
        // Entries are replaced field by field under the lock; a panic elsewhere
        // cannot leave one half-written.
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Adds `id` (pending) if not held; returns its request lock.
    fn register(&self, id: &SpiffeId) -> Arc<tokio::sync::Mutex<()>> {
        let mut entries = self.write();
        let entry = entries.entry(id.clone()).or_insert_with(|| Entry {
            held: None,
            last_error: None,
            failures: 0,
            retry_at: None,
            issue_lock: Arc::default(),
        });
        entry.issue_lock.clone()
    }

    /// One CSR round trip for `id`, then store (or record the failure and schedule a
    /// retry). The caller holds `id`'s request lock.
    async fn issue_and_store(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, FetchError> {
        match self.issue(id).await {
            Ok((cert, bundle)) => {
                let changed_bundle = self.bundle.send_if_modified(|held| {
                    let same = held
                        .as_ref()
                        .is_some_and(|b| b.roots_pem() == bundle.roots_pem());
                    if !same {
                        *held = Some(Arc::new(bundle.clone()));
                    }
                    !same
                });
                if changed_bundle {
                    tracing::info!(roots = bundle.roots_pem().len(), "trust bundle updated");
                }
                let cert = Arc::new(cert);
                if let Some(cache) = self.cache.clone() {
                    let to_write = cert.clone();
                    let bundle = changed_bundle.then_some(bundle);
                    let written = tokio::task::spawn_blocking(move || {
                        if let Some(bundle) = bundle {
                            cache.write_bundle(&bundle)?;
                        }
                        cache.write_cert(&to_write)
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    if let Err(e) = written {
                        tracing::warn!(%id, error = %e, "could not cache the certificate; a restart without the controller would lack it");
                    }
                }
                let Some((serial, renew_at)) = self.store_issued(id, cert.clone()) else {
                    // Removed while the request was in flight: the pod is gone.
                    self.remove_cached(id);
                    return Ok(cert);
                };
                tracing::info!(
                    %id,
                    %serial,
                    not_after = %fmt_time(cert.not_after()),
                    renew_at = %fmt_time(renew_at),
                    "certificate issued"
                );
                self.changed();
                self.wake.notify_one();
                Ok(cert)
            }
            Err(e) => {
                let error = crate::error_chain(&e);
                let mut entries = self.write();
                if let Some(entry) = entries.get_mut(id) {
                    let delay = self.config.backoff.delay(entry.failures);
                    entry.failures = entry.failures.saturating_add(1);
                    entry.retry_at = Some(SystemTime::now() + delay);
                    entry.last_error = Some(error.clone());
                    let still_valid = entry
                        .held
                        .as_ref()
                        .is_some_and(|h| !h.cert.is_expired_at(SystemTime::now()));
                    tracing::warn!(
                        %id,
                        %error,
                        retry_in = ?delay,
                        still_valid,
                        "certificate request failed"
                    );
                }
                drop(entries);
                self.changed();
                self.wake.notify_one();
                Err(e)
            }
        }
    }

    async fn issue(&self, id: &SpiffeId) -> Result<(WorkloadCertificate, TrustBundle), FetchError> {
        let key = WorkloadKey::generate().map_err(FetchError::Key)?;
        let csr_pem = key.csr_pem(id).map_err(FetchError::Csr)?;
        let token = self
            .config
            .token
            .token()
            .await
            .map_err(|source| FetchError::Token {
                id: id.clone(),
                source,
            })?;
        let mut request = Request::new(CreateCertificateRequest {
            csr_pem,
            identity: id.to_string(),
            requested_ttl: self.config.requested_ttl.map(duration_to_proto),
        });
        token.apply(request.metadata_mut());
        let timeout = self.config.request_timeout;
        let mut client = self.client.clone();
        let response = tokio::time::timeout(timeout, client.create_certificate(request))
            .await
            .map_err(|_| FetchError::Timeout {
                id: id.clone(),
                timeout,
            })?
            .map_err(|status| FetchError::Rpc {
                id: id.clone(),
                status,
            })?
            .into_inner();
        if !response.trust_domain.is_empty() && response.trust_domain != self.trust_domain.as_str()
        {
            return Err(FetchError::WrongTrustDomain {
                found: response.trust_domain,
                expected: self.trust_domain.clone(),
            });
        }
        let bundle = TrustBundle::from_pem(self.trust_domain.clone(), &response.trust_bundle_pem)
            .map_err(|source| FetchError::TrustBundle {
            id: id.clone(),
            source,
        })?;
        let cert =
            WorkloadCertificate::new(key, &response.cert_chain_pem, id).map_err(|source| {
                FetchError::Certificate {
                    id: id.clone(),
                    source,
                }
            })?;
        // `WorkloadCertificate::new` guarantees a leaf; verify it is usable both ways
        // (HBONE client and server) with the roots that came with it.
        if let Some((leaf, intermediates)) = cert.chain_der().split_first() {
            for purpose in [Purpose::ClientAuth, Purpose::ServerAuth] {
                cert::verify_chain_for(leaf, intermediates, &bundle, purpose, id).map_err(
                    |source| FetchError::Verify {
                        id: id.clone(),
                        source,
                    },
                )?;
            }
        }
        Ok((cert, bundle))
    }

    /// Stores a freshly issued certificate, if `id` is still wanted.
    /// Returns the serial and the renewal time.
    fn store_issued(
        &self,
        id: &SpiffeId,
        cert: Arc<WorkloadCertificate>,
    ) -> Option<(String, SystemTime)> {
        let mut entries = self.write();
        let entry = entries.get_mut(id)?;
        let now = SystemTime::now();
        // Half life, as the proto says — but counted from now when the CA backdated
        // `not_before` (by about a minute): for a short TTL, half of
        // (not_after - not_before) is already past on arrival, which would renew in a
        // tight loop.
        let from_now = now + cert.not_after().duration_since(now).unwrap_or_default() / 2;
        let renew_at = cert.renew_at().max(from_now);
        let held = Held::new(cert, renew_at, false);
        let serial = held.serial.clone();
        entry.held = Some(held);
        entry.failures = 0;
        entry.retry_at = None;
        entry.last_error = None;
        Some((serial, renew_at))
    }

    /// Stores a certificate loaded from the cache (renewed at its plain half life:
    /// when that is past, right away).
    fn store_cached(&self, cert: WorkloadCertificate) {
        let id = cert.id().clone();
        let renew_at = cert.renew_at();
        self.write().insert(
            id,
            Entry {
                held: Some(Held::new(Arc::new(cert), renew_at, true)),
                last_error: None,
                failures: 0,
                retry_at: None,
                issue_lock: Arc::default(),
            },
        );
    }

    fn remove_cached(&self, id: &SpiffeId) {
        if let Some(cache) = &self.cache
            && let Err(e) = cache.remove_cert(id)
        {
            tracing::warn!(%id, error = %e, "could not delete the cached certificate");
        }
    }

    /// Identities whose request is due now, with their locks; drops expired
    /// certificates on the way.
    fn due(&self, now: SystemTime) -> Vec<(SpiffeId, Arc<tokio::sync::Mutex<()>>)> {
        let mut entries = self.write();
        let mut due = Vec::new();
        for (id, entry) in entries.iter_mut() {
            if entry
                .held
                .as_ref()
                .is_some_and(|h| h.cert.is_expired_at(now))
            {
                tracing::warn!(%id, "certificate expired before it could be renewed");
                entry.held = None;
            }
            if entry.due_at().is_some_and(|t| t <= now) {
                due.push((id.clone(), entry.issue_lock.clone()));
            }
        }
        due
    }

    /// How long until the next request is due (capped at [`MAX_IDLE`]).
    fn idle_for(&self, now: SystemTime) -> Duration {
        self.read()
            .values()
            .filter_map(Entry::due_at)
            .map(|t| t.duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or(MAX_IDLE)
            .min(MAX_IDLE)
    }

    /// Renews (or retries) `id` if still due once its lock is held.
    async fn refresh(&self, id: &SpiffeId, lock: Arc<tokio::sync::Mutex<()>>) {
        let _guard = lock.lock().await;
        let still_due = self
            .read()
            .get(id)
            .and_then(Entry::due_at)
            .is_some_and(|t| t <= SystemTime::now());
        if still_due {
            // Failures are recorded and logged inside; the loop retries them.
            let _ = self.issue_and_store(id).await;
        }
    }
}

impl Held {
    fn new(cert: Arc<WorkloadCertificate>, renew_at: SystemTime, from_cache: bool) -> Self {
        let serial = cert
            .chain_der()
            .first()
            .and_then(|leaf| cert::inspect_der(leaf).ok())
            .map(|info| info.serial)
            .unwrap_or_default();
        Self {
            cert,
            serial,
            renew_at,
            from_cache,
        }
    }
}

impl Entry {
    /// When the next request for this identity should go out: the retry time after
    /// a failure, else the renewal time, else now (nothing held yet).
    fn due_at(&self) -> Option<SystemTime> {
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        match &self.held {
            Some(held) => Some(held.renew_at),
            // Nothing held: due now. While `fetch` makes the first request it holds
            // the lock, so the renewal task waits for it and then finds it done; if
            // that `fetch` was cancelled, the renewal task takes over.
            None => Some(SystemTime::UNIX_EPOCH),
        }
    }

    fn snapshot(&self, id: &SpiffeId, now: SystemTime) -> CertSnapshot {
        let valid = self.held.as_ref().filter(|h| !h.cert.is_expired_at(now));
        let state = match (valid, &self.last_error) {
            (Some(h), _) if now >= h.renew_at || self.retry_at.is_some() => CertState::Renewing,
            (Some(_), _) => CertState::Ready,
            (None, Some(error)) => CertState::Failed {
                error: error.clone(),
            },
            (None, None) => CertState::Pending,
        };
        CertSnapshot {
            identity: id.to_string(),
            state,
            serial: valid.map(|h| h.serial.clone()),
            not_before: valid.map(|h| h.cert.not_before()),
            not_after: valid.map(|h| h.cert.not_after()),
            renew_at: valid.map(|h| h.renew_at),
            from_cache: valid.is_some_and(|h| h.from_cache),
            last_error: self.last_error.clone(),
        }
    }
}

/// Renews certificates at half life and retries failures, until the manager is
/// dropped.
async fn renewal_loop(inner: Weak<Inner>, wake: Arc<Notify>, mut stop: watch::Receiver<()>) {
    loop {
        let idle = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            for (id, lock) in inner.due(SystemTime::now()) {
                inner.refresh(&id, lock).await;
            }
            inner.idle_for(SystemTime::now())
        };
        tokio::select! {
            // Err: the manager was dropped.
            _ = stop.changed() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(idle) => {}
        }
    }
}

fn fmt_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&fmt_time(*t)),
        None => s.serialize_none(),
    }
}
