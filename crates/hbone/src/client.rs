//! The HBONE client: a pool of mutually authenticated HTTP/2 connections, each
//! carrying many CONNECT streams.
//!
//! Connections are keyed by (source identity, destination identity, destination
//! address). A new stream goes to a connection of its key that is healthy, was made
//! with the source's CURRENT certificate and has a free stream slot (the smaller of
//! our limit and the server's SETTINGS_MAX_CONCURRENT_STREAMS); otherwise one new
//! connection is opened, shared by every caller waiting for that key.
//!
//! A connection leaves the pool when it has been idle for the idle timeout, when the
//! server sent GOAWAY or the connection failed (keepalive PINGs unanswered
//! included), or when the source's certificate rotated. Leaving the pool never cuts
//! streams: the connection closes (GOAWAY) once its last stream ended.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ambit_identity::tls::TlsConfigError;
use ambit_identity::{SpiffeId, WorkloadCertificate};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, StatusCode, Version};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OnceCell, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{Instrument as _, debug, debug_span};

use crate::config::PoolConfig;
use crate::credentials::Credentials;
use crate::headers::{Baggage, Traceparent, forwarded_for};
use crate::keepalive::{self, KeepaliveError};
use crate::server::Refusal;
use crate::stream::HboneStream;
use crate::{ALPN_H2, tls};

/// How often a CONNECT refused by the connection itself (GOAWAY raced with it,
/// REFUSED_STREAM) is retried on another connection. The server did not process
/// such a stream, so a retry is safe.
const MAX_ATTEMPTS: usize = 3;

/// Opens TCP connections to HBONE servers. The daemon dials from inside the source
/// pod's network namespace, so it brings its own; one [`Pool`] serves one dialer.
pub trait Dialer: Send + Sync + 'static {
    /// A TCP connection to `addr`.
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>>;
}

/// Dials from the current network namespace with the OS's choice of source address.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpDialer;

/// One tunnel to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Whose certificate to present (looked up in the pool's [`Credentials`] when a
    /// new connection is made).
    pub source: SpiffeId,
    /// The identity the server must prove, exactly.
    pub destination: SpiffeId,
    /// The HBONE server: the destination pod's (or its waypoint's) `ip:15008`.
    pub hbone_addr: SocketAddr,
    /// The original destination, sent as `:authority`.
    pub target: SocketAddr,
    /// The original client's address, sent as `forwarded: for=…`.
    pub forwarded_for: Option<IpAddr>,
    /// Trace context to pass on.
    pub traceparent: Option<Traceparent>,
    /// Baggage to pass on.
    pub baggage: Option<Baggage>,
}

/// A pool of HBONE connections. Cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Opening a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials hold no certificate for the source identity.
    #[error("no certificate for source identity {identity}")]
    NoCertificate {
        /// The source identity.
        identity: SpiffeId,
    },
    /// No connection to the HBONE server could be established.
    #[error("HBONE connection to {addr} ({destination})")]
    Connection {
        /// The HBONE server.
        addr: SocketAddr,
        /// The identity it had to prove.
        destination: SpiffeId,
        /// Why (shared by every caller that waited for this connection).
        #[source]
        source: Arc<EstablishError>,
    },
    /// The server answered the CONNECT with something other than `200`.
    #[error("CONNECT {target} via {addr} refused with {status}")]
    Refused {
        /// The CONNECT target.
        target: SocketAddr,
        /// The HBONE server.
        addr: SocketAddr,
        /// The server's answer: `400`, `401`, `503`, …
        status: StatusCode,
    },
    /// The stream failed before an answer (reset, connection lost).
    #[error("CONNECT {target} via {addr}")]
    Stream {
        /// The CONNECT target.
        target: SocketAddr,
        /// The HBONE server.
        addr: SocketAddr,
        /// h2's reason.
        #[source]
        source: h2::Error,
    },
    /// The request head could not be built.
    #[error("building the CONNECT request for {target}")]
    Request {
        /// The CONNECT target.
        target: SocketAddr,
        /// http's reason.
        #[source]
        source: http::Error,
    },
    /// Nothing within the pool's connect timeout.
    #[error("CONNECT {target} via {addr}: no answer within {timeout:?}")]
    Timeout {
        /// The CONNECT target.
        target: SocketAddr,
        /// The HBONE server.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
}

/// Establishing an HBONE connection failed.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    /// The TLS config could not be built from the source certificate.
    #[error("building the TLS client config")]
    TlsConfig(#[source] TlsConfigError),
    /// TCP connect failed.
    #[error("TCP connect")]
    Tcp(#[source] io::Error),
    /// The TLS handshake failed; a wrong or untrusted server identity shows here
    /// ([`EstablishError::tls_error`]).
    #[error("TLS handshake")]
    Tls(#[source] io::Error),
    /// The server negotiated another application protocol than `h2`.
    #[error("server negotiated ALPN {protocol:?}, not h2")]
    Alpn {
        /// What it chose.
        protocol: String,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake")]
    Http2(#[source] h2::Error),
    /// The HTTP/2 connection failed before its SETTINGS were acknowledged.
    #[error("HTTP/2 connection closed during set-up")]
    Closed(#[source] Option<h2::Error>),
    /// The server did not answer the set-up PING in time.
    #[error("HTTP/2 set-up PING not answered within {0:?}")]
    SetupTimeout(Duration),
}

struct Inner {
    config: PoolConfig,
    credentials: Arc<dyn Credentials>,
    dialer: Arc<dyn Dialer>,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
    next_id: AtomicU64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    addr: SocketAddr,
}

type Pending = Arc<OnceCell<Result<(), Arc<EstablishError>>>>;

#[derive(Default)]
struct KeyState {
    conns: Vec<PooledConn>,
    /// The connection being established for this key, awaited by every caller that
    /// found no free slot meanwhile.
    pending: Option<Pending>,
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    cert: Arc<WorkloadCertificate>,
    shared: Arc<ConnShared>,
}

/// What a connection's driver and its streams share.
#[derive(Debug)]
struct ConnShared {
    activity: Mutex<Activity>,
    changed: Notify,
}

#[derive(Debug)]
struct Activity {
    streams: usize,
    idle_since: Option<Instant>,
}

/// A stream's slot on a pooled connection, freed on drop.
#[derive(Debug)]
pub(crate) struct SlotGuard {
    shared: Arc<ConnShared>,
}

impl ConnectRequest {
    /// A request without `forwarded`, `traceparent` or `baggage`.
    pub fn new(
        source: SpiffeId,
        destination: SpiffeId,
        hbone_addr: SocketAddr,
        target: SocketAddr,
    ) -> Self {
        Self {
            source,
            destination,
            hbone_addr,
            target,
            forwarded_for: None,
            traceparent: None,
            baggage: None,
        }
    }

    fn key(&self) -> PoolKey {
        PoolKey {
            source: self.source.clone(),
            destination: self.destination.clone(),
            addr: self.hbone_addr,
        }
    }

    fn to_http(&self) -> Result<http::Request<()>, ConnectError> {
        let err = |source| ConnectError::Request {
            target: self.target,
            source,
        };
        // Authority-form: `ip:port`, IPv6 bracketed.
        let uri =
            http::Uri::try_from(self.target.to_string()).map_err(|e| err(http::Error::from(e)))?;
        let mut builder = http::Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(uri);
        if let Some(ip) = self.forwarded_for {
            builder = builder.header(http::header::FORWARDED, forwarded_for(ip));
        }
        if let Some(tp) = &self.traceparent {
            builder = builder.header("traceparent", tp.header_value().clone());
        }
        if let Some(b) = &self.baggage {
            builder = builder.header("baggage", b.header_value().clone());
        }
        builder.body(()).map_err(err)
    }
}

impl ConnectError {
    /// The server's non-`200` answer, if that is what failed.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's answer as a [`Refusal`], when it is one of HBONE's.
    pub fn refusal(&self) -> Option<Refusal> {
        self.status().and_then(Refusal::from_status)
    }
}

impl EstablishError {
    /// The rustls error behind a failed handshake (e.g.
    /// `InvalidCertificate(..)` for a server with the wrong identity or CA).
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Tls(e) => e.get_ref().and_then(|inner| inner.downcast_ref()),
            _ => None,
        }
    }
}

impl Dialer for TcpDialer {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(TcpStream::connect(addr))
    }
}

impl Pool {
    /// A pool dialing from the current network namespace.
    pub fn new(config: PoolConfig, credentials: Arc<dyn Credentials>) -> Self {
        Self::with_dialer(config, credentials, Arc::new(TcpDialer))
    }

    /// A pool opening its TCP connections with `dialer`.
    pub fn with_dialer(
        config: PoolConfig,
        credentials: Arc<dyn Credentials>,
        dialer: Arc<dyn Dialer>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                credentials,
                dialer,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a tunnel to `request.target` through `request.hbone_addr`, reusing a
    /// pooled connection when one has room. Returns once the server answered `200`
    /// (its policy passed and its upstream is connected).
    pub async fn connect(&self, request: ConnectRequest) -> Result<HboneStream, ConnectError> {
        let limit = self.inner.config.connect_timeout;
        let span = debug_span!(
            "hbone_connect",
            target = %request.target,
            via = %request.hbone_addr,
            dst = %request.destination,
        );
        match tokio::time::timeout(limit, self.connect_inner(&request).instrument(span)).await {
            Ok(res) => res,
            Err(_) => Err(ConnectError::Timeout {
                target: request.target,
                addr: request.hbone_addr,
                timeout: limit,
            }),
        }
    }

    /// Connections currently pooled (usable for new streams), over all keys.
    ///
    /// Connections that received GOAWAY or failed are dropped from the pool first.
    pub fn connections(&self) -> usize {
        let mut keys = self.inner.lock_keys();
        keys.values_mut()
            .map(|ks| {
                ks.conns.retain_mut(|c| !c.is_closed());
                ks.conns.len()
            })
            .sum()
    }

    async fn connect_inner(&self, request: &ConnectRequest) -> Result<HboneStream, ConnectError> {
        let mut attempt = 1;
        loop {
            let (send, slot) = self.checkout(request).await?;
            match self.open_stream(send, slot, request).await {
                Ok(stream) => return Ok(stream),
                Err(StreamFailure::Unprocessed(source)) if attempt < MAX_ATTEMPTS => {
                    debug!(error = %source, attempt, "CONNECT not processed by the server; retrying");
                    attempt += 1;
                }
                Err(StreamFailure::Unprocessed(source) | StreamFailure::Failed(source)) => {
                    return Err(ConnectError::Stream {
                        target: request.target,
                        addr: request.hbone_addr,
                        source,
                    });
                }
                Err(StreamFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// A connection with a free stream slot for `request`'s key, established if need be.
    async fn checkout(
        &self,
        request: &ConnectRequest,
    ) -> Result<(SendRequest<Bytes>, SlotGuard), ConnectError> {
        let cert = self
            .inner
            .credentials
            .certificate(&request.source)
            .ok_or_else(|| ConnectError::NoCertificate {
                identity: request.source.clone(),
            })?;
        let key = request.key();
        loop {
            let pending = {
                let mut keys = self.inner.lock_keys();
                let ks = keys.entry(key.clone()).or_default();
                if let Some(found) =
                    ks.checkout(&cert, self.inner.config.max_streams_per_connection)
                {
                    return Ok(found);
                }
                ks.pending.get_or_insert_with(Default::default).clone()
            };
            let established = pending
                .get_or_init(|| {
                    self.inner
                        .clone()
                        .establish(key.clone(), cert.clone(), pending.clone())
                })
                .await;
            if let Err(source) = established {
                return Err(ConnectError::Connection {
                    addr: key.addr,
                    destination: key.destination.clone(),
                    source: source.clone(),
                });
            }
            // Established: loop to take a slot on it (or on another one).
        }
    }

    async fn open_stream(
        &self,
        send: SendRequest<Bytes>,
        slot: SlotGuard,
        request: &ConnectRequest,
    ) -> Result<HboneStream, StreamFailure> {
        let head = request.to_http().map_err(StreamFailure::Other)?;
        // Failures before the request left are safe to retry elsewhere.
        let mut send = send.ready().await.map_err(StreamFailure::Unprocessed)?;
        let (response, body) = send
            .send_request(head, false)
            .map_err(StreamFailure::Unprocessed)?;
        let response = response.await.map_err(|e| {
            if not_processed(&e) {
                StreamFailure::Unprocessed(e)
            } else {
                StreamFailure::Failed(e)
            }
        })?;
        if response.status() != StatusCode::OK {
            return Err(StreamFailure::Other(ConnectError::Refused {
                target: request.target,
                addr: request.hbone_addr,
                status: response.status(),
            }));
        }
        Ok(HboneStream::new(body, response.into_body(), Some(slot)))
    }
}

/// How opening a stream on a connection failed.
enum StreamFailure {
    /// The server did not process the request: another connection may take it.
    Unprocessed(h2::Error),
    /// The stream failed after the server may have acted on it.
    Failed(h2::Error),
    /// Anything else, final.
    Other(ConnectError),
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, KeyState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Establishes a connection for `key` and pools it; clears `pending` either way.
    async fn establish(
        self: Arc<Self>,
        key: PoolKey,
        cert: Arc<WorkloadCertificate>,
        pending: Pending,
    ) -> Result<(), Arc<EstablishError>> {
        let res = self.establish_conn(&key, cert).await;
        let mut keys = self.lock_keys();
        let ks = keys.entry(key).or_default();
        if ks
            .pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &pending))
        {
            ks.pending = None;
        }
        match res {
            Ok(conn) => {
                conn.shared.became_idle();
                ks.conns.push(conn);
                Ok(())
            }
            Err(e) => {
                debug!(error = %e, "HBONE connection failed");
                Err(Arc::new(e))
            }
        }
    }

    async fn establish_conn(
        self: &Arc<Self>,
        key: &PoolKey,
        cert: Arc<WorkloadCertificate>,
    ) -> Result<PooledConn, EstablishError> {
        let config = &self.config;
        let tls_config = tls::client_config(
            &cert,
            self.credentials.trust_bundle(),
            key.destination.clone(),
        )
        .map_err(EstablishError::TlsConfig)?;
        let tcp = self
            .dialer
            .dial(key.addr)
            .await
            .map_err(EstablishError::Tcp)?;
        // Best effort: latency matters more than segment count for tunnels.
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(tls_config)
            .connect(ServerName::from(key.addr.ip()), tcp)
            .await
            .map_err(EstablishError::Tls)?;
        if let Some(protocol) = tls.get_ref().1.alpn_protocol()
            && protocol != ALPN_H2
        {
            return Err(EstablishError::Alpn {
                protocol: String::from_utf8_lossy(protocol).into_owned(),
            });
        }
        let (send, mut conn) = config
            .http2
            .client_builder(config.max_streams_per_connection)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(EstablishError::Http2)?;
        let Some(ping_pong) = conn.ping_pong() else {
            // ping_pong() is only None once taken; this connection is brand new.
            return Err(EstablishError::Closed(None));
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ConnShared::new());
        let (ready_tx, ready_rx) = oneshot::channel();
        let driver = Driver {
            pool: Arc::downgrade(self),
            key: key.clone(),
            id,
            shared: shared.clone(),
            config: *config,
        };
        tokio::spawn(
            driver
                .run(conn, ping_pong, ready_tx)
                .instrument(debug_span!("hbone_client_conn", id, addr = %key.addr)),
        );
        ready_rx
            .await
            .unwrap_or(Err(EstablishError::Closed(None)))?;
        debug!(id, "HBONE connection established");
        Ok(PooledConn {
            id,
            send,
            cert,
            shared,
        })
    }

    /// Takes `id` out of the pool if it still has no streams; whether it is out.
    fn retire_if_idle(&self, key: &PoolKey, id: u64) -> bool {
        let mut keys = self.lock_keys();
        let Some(ks) = keys.get_mut(key) else {
            return true;
        };
        let Some(pos) = ks.conns.iter().position(|c| c.id == id) else {
            return true;
        };
        if !ks.conns[pos].shared.is_idle() {
            return false;
        }
        ks.conns.remove(pos);
        Self::forget_if_empty(&mut keys, key);
        true
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut keys = self.lock_keys();
        if let Some(ks) = keys.get_mut(key) {
            ks.conns.retain(|c| c.id != id);
        }
        Self::forget_if_empty(&mut keys, key);
    }

    fn forget_if_empty(keys: &mut HashMap<PoolKey, KeyState>, key: &PoolKey) {
        if keys
            .get(key)
            .is_some_and(|ks| ks.conns.is_empty() && ks.pending.is_none())
        {
            keys.remove(key);
        }
    }
}

impl KeyState {
    /// Reserves a slot on a usable connection, dropping connections that are closed
    /// or were made with a certificate that has since rotated.
    fn checkout(
        &mut self,
        cert: &Arc<WorkloadCertificate>,
        max_streams: u32,
    ) -> Option<(SendRequest<Bytes>, SlotGuard)> {
        self.conns
            .retain_mut(|c| same_certificate(&c.cert, cert) && !c.is_closed());
        self.conns.iter_mut().find_map(|c| {
            let limit = c.send.current_max_send_streams().min(max_streams as usize);
            if !c.is_ready() {
                return None;
            }
            c.shared
                .try_reserve(limit)
                .map(|slot| (c.send.clone(), slot))
        })
    }
}

impl PooledConn {
    /// GOAWAY received or the connection failed.
    fn is_closed(&mut self) -> bool {
        matches!(self.poll_ready(), Poll::Ready(Err(_)))
    }

    /// Can open a stream right now (Pending means h2 holds a stream waiting for a
    /// slot the server has not granted).
    fn is_ready(&mut self) -> bool {
        matches!(self.poll_ready(), Poll::Ready(Ok(())))
    }

    fn poll_ready(&mut self) -> Poll<Result<(), h2::Error>> {
        // A probe, not a wait: nothing needs waking.
        self.send
            .poll_ready(&mut Context::from_waker(Waker::noop()))
    }
}

impl ConnShared {
    fn new() -> Self {
        Self {
            activity: Mutex::new(Activity {
                streams: 0,
                idle_since: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_reserve(self: &Arc<Self>, limit: usize) -> Option<SlotGuard> {
        let mut a = self.lock();
        if a.streams >= limit {
            return None;
        }
        a.streams += 1;
        if a.idle_since.take().is_some() {
            self.changed.notify_one();
        }
        Some(SlotGuard {
            shared: self.clone(),
        })
    }

    fn became_idle(&self) {
        let mut a = self.lock();
        if a.streams == 0 {
            a.idle_since = Some(Instant::now());
            self.changed.notify_one();
        }
    }

    fn is_idle(&self) -> bool {
        self.lock().streams == 0
    }

    /// Returns once the connection has had no stream for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            let idle_since = self.lock().idle_since;
            match idle_since {
                None => changed.await,
                Some(since) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(since + timeout) => {
                            if self.lock().idle_since == Some(since) {
                                return;
                            }
                        }
                        () = changed => {}
                    }
                }
            }
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut a = self.shared.lock();
        a.streams = a.streams.saturating_sub(1);
        if a.streams == 0 {
            a.idle_since = Some(Instant::now());
            self.shared.changed.notify_one();
        }
    }
}

/// Runs one client connection: reads and writes frames, PINGs, and takes the
/// connection out of the pool when it idles or ends.
struct Driver {
    pool: Weak<Inner>,
    key: PoolKey,
    id: u64,
    shared: Arc<ConnShared>,
    config: PoolConfig,
}

impl Driver {
    async fn run(
        self,
        mut conn: h2::client::Connection<TlsStream<TcpStream>, Bytes>,
        mut ping_pong: h2::PingPong,
        ready: oneshot::Sender<Result<(), EstablishError>>,
    ) {
        // One PING round trip before first use: the server's SETTINGS (max
        // concurrent streams above all) precede its acknowledgement.
        let setup = tokio::select! {
            res = &mut conn => Err(EstablishError::Closed(res.err())),
            res = keepalive::ping_once(&mut ping_pong, self.config.connect_timeout) => {
                res.map_err(|e| match e {
                    KeepaliveError::Timeout(t) => EstablishError::SetupTimeout(t),
                    KeepaliveError::Ping(e) => EstablishError::Closed(Some(e)),
                })
            }
        };
        let failed = setup.is_err();
        if ready.send(setup).is_err() || failed {
            return;
        }

        let keepalive = keepalive::run(ping_pong, self.config.keepalive);
        tokio::pin!(keepalive);
        let mut retired = false;
        loop {
            tokio::select! {
                res = &mut conn => {
                    match res {
                        Ok(()) => debug!("HBONE connection closed"),
                        Err(e) => debug!(error = %e, "HBONE connection failed"),
                    }
                    break;
                }
                e = &mut keepalive => {
                    debug!(error = %e, "HBONE peer unresponsive; closing");
                    break;
                }
                () = self.shared.idle_for(self.config.idle_timeout), if !retired => {
                    retired = self
                        .pool
                        .upgrade()
                        .is_none_or(|pool| pool.retire_if_idle(&self.key, self.id));
                    if retired {
                        debug!("HBONE connection idle; closing");
                    }
                }
            }
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.remove(&self.key, self.id);
        }
    }
}

/// Whether both are the same certificate (a provider may hand out equal copies).
fn same_certificate(a: &Arc<WorkloadCertificate>, b: &Arc<WorkloadCertificate>) -> bool {
    Arc::ptr_eq(a, b) || a.chain_der().first() == b.chain_der().first()
}

/// The server provably did not process the stream (RFC 9113 §8.7): GOAWAY or
/// REFUSED_STREAM.
fn not_processed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}
