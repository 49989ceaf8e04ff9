//! The HBONE server: accepts TLS connections on a listener, presents the certificate
//! of the local address each arrived on, and hands every CONNECT to a [`Handler`]
//! that applies policy and connects the upstream before the `200` goes out.

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambit_identity::SpiffeId;
use ambit_identity::cert::{VerifyError, peer_spiffe_id};
use ambit_identity::tls::TlsConfigError;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument as _, debug, debug_span, warn};

use crate::config::ServerConfig;
use crate::credentials::ServerCredentials;
use crate::headers::{
    Baggage, Traceparent, baggage_from_header, parse_forwarded_for, traceparent_from_header,
};
use crate::keepalive;
use crate::stream::{HboneStream, copy_bidirectional};
use crate::tls::ServerConfigCache;

/// Pause after a failed `accept()` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A CONNECT that passed the server's own checks, for the [`Handler`] to judge.
#[derive(Clone, Debug)]
pub struct InboundRequest {
    /// The client's identity, from its verified certificate.
    pub peer: SpiffeId,
    /// The client's leaf certificate (DER).
    pub peer_certificate: CertificateDer<'static>,
    /// The client's TCP address (the HBONE connection's source).
    pub peer_addr: SocketAddr,
    /// The address the connection arrived on.
    pub local_addr: SocketAddr,
    /// The identity this server presented on the connection.
    pub local_identity: SpiffeId,
    /// `:authority`: where the client wants to go.
    pub target: SocketAddr,
    /// The original client from `forwarded: for=…`, when present and an address.
    pub forwarded_for: Option<IpAddr>,
    /// W3C trace context, when present and valid.
    pub traceparent: Option<Traceparent>,
    /// W3C baggage, when present and valid.
    pub baggage: Option<Baggage>,
    /// Every request header, for anything else.
    pub headers: HeaderMap,
}

/// Why a CONNECT is refused; each maps to the status HBONE clients expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `400`: malformed, or a target this server does not serve.
    BadRequest,
    /// `401`: authorization policy denied the client.
    PolicyDenied,
    /// `503`: the upstream could not be reached.
    UpstreamUnavailable,
}

/// Decides each CONNECT: applies policy and connects the upstream, so that `200`
/// goes out only when both succeeded.
///
/// Closures `Fn(InboundRequest) -> impl Future<Output = Result<U, Refusal>>`
/// implement it.
pub trait Handler: Send + Sync + 'static {
    /// What an accepted tunnel is relayed to.
    type Upstream: Upstream;

    /// Judges one CONNECT; `Err` answers with the refusal's status.
    fn handle(
        &self,
        request: InboundRequest,
    ) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send;
}

/// The far side of an accepted tunnel: takes the stream after the `200` went out.
///
/// A connected [`TcpStream`] relays with [`copy_bidirectional`]; the waypoint
/// implements it to serve HTTP on the stream itself.
pub trait Upstream: Send + 'static {
    /// Serves the tunnel until it ends.
    fn serve(self, stream: HboneStream) -> impl Future<Output = ()> + Send;
}

/// A bound, not yet serving, HBONE server (bind first: the address is known, e.g.
/// for port 0, before anything is accepted).
pub struct Server<H> {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared<H>>,
}

/// A serving HBONE server. Dropping it stops the server abruptly; use
/// [`ServerHandle::drain`] to stop gracefully.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    drain: watch::Sender<Option<Instant>>,
    task: JoinHandle<DrainReport>,
}

/// Counters since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// Connections whose TLS and HTTP/2 handshakes completed (client certificate
    /// verified).
    pub tls_connections: u64,
    /// Connections that failed before that (no or bad client certificate, no
    /// certificate for the local address, timeouts, …).
    pub handshake_failures: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// CONNECT streams received.
    pub streams: u64,
    /// CONNECT streams answered with something other than `200`.
    pub refused_streams: u64,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still busy at the deadline, closed abruptly.
    pub forced_connections: usize,
}

/// The server could not get its listener.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Binding failed.
    #[error("binding the HBONE listener on {addr}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// A pre-made listener could not be adopted.
    #[error("adopting a pre-made HBONE listener")]
    Adopt(#[source] io::Error),
}

/// Why an accepted connection did not become an HBONE connection (logged).
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error("reading the local address")]
    LocalAddr(#[source] io::Error),
    #[error("no certificate for local address {0}")]
    NoCertificate(SocketAddr),
    #[error("building the TLS server config")]
    TlsConfig(#[source] TlsConfigError),
    #[error("TLS handshake")]
    Tls(#[source] io::Error),
    #[error("client certificate identity")]
    PeerIdentity(#[source] VerifyError),
    #[error("HTTP/2 handshake")]
    Http2(#[source] h2::Error),
    #[error("handshakes not done within {0:?}")]
    Timeout(Duration),
}

struct Shared<H> {
    config: ServerConfig,
    credentials: Arc<dyn ServerCredentials>,
    handler: H,
    tls_configs: ServerConfigCache,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    tcp_accepted: AtomicU64,
    tls_connections: AtomicU64,
    handshake_failures: AtomicU64,
    open_connections: AtomicU64,
    streams: AtomicU64,
    refused_streams: AtomicU64,
}

/// What every stream of one connection knows about it.
#[derive(Debug)]
struct ConnInfo {
    peer: SpiffeId,
    peer_certificate: CertificateDer<'static>,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    local_identity: SpiffeId,
}

type H2Connection = h2::server::Connection<TlsStream<TcpStream>, Bytes>;

impl Refusal {
    /// The HTTP status sent for it.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::PolicyDenied => StatusCode::UNAUTHORIZED,
            Self::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The refusal a status stands for, if it is one of HBONE's.
    pub fn from_status(status: StatusCode) -> Option<Self> {
        match status {
            StatusCode::BAD_REQUEST => Some(Self::BadRequest),
            StatusCode::UNAUTHORIZED => Some(Self::PolicyDenied),
            StatusCode::SERVICE_UNAVAILABLE => Some(Self::UpstreamUnavailable),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Self::BadRequest => "bad request",
            Self::PolicyDenied => "policy denied",
            Self::UpstreamUnavailable => "upstream unavailable",
        };
        write!(f, "{what} ({})", self.status())
    }
}

impl<F, Fut, U> Handler for F
where
    F: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, Refusal>> + Send,
    U: Upstream,
{
    type Upstream = U;

    fn handle(&self, request: InboundRequest) -> impl Future<Output = Result<U, Refusal>> + Send {
        self(request)
    }
}

impl Upstream for TcpStream {
    async fn serve(mut self, stream: HboneStream) {
        let id = stream.stream_id();
        match copy_bidirectional(stream, &mut self).await {
            Ok(t) => debug!(
                stream = id,
                sent = t.sent,
                received = t.received,
                "tunnel closed"
            ),
            Err(e) => debug!(stream = id, error = %e, "tunnel failed"),
        }
    }
}

impl<H: Handler> Server<H> {
    /// Binds `addr` (port 0 picks one; see [`Server::local_addr`]).
    pub async fn bind(
        addr: SocketAddr,
        credentials: Arc<dyn ServerCredentials>,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError::Bind { addr, source })?;
        Self::from_listener(listener, credentials, handler, config)
    }

    /// Serves on a listener made elsewhere, e.g. inside a pod's network namespace.
    /// Must be called within a Tokio runtime.
    pub fn from_std(
        listener: std::net::TcpListener,
        credentials: Arc<dyn ServerCredentials>,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, BindError> {
        listener.set_nonblocking(true).map_err(BindError::Adopt)?;
        let listener = TcpListener::from_std(listener).map_err(BindError::Adopt)?;
        Self::from_listener(listener, credentials, handler, config)
    }

    fn from_listener(
        listener: TcpListener,
        credentials: Arc<dyn ServerCredentials>,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, BindError> {
        let local_addr = listener.local_addr().map_err(BindError::Adopt)?;
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(Shared {
                config,
                credentials,
                handler,
                tls_configs: ServerConfigCache::default(),
                counters: Arc::default(),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts accepting on a new task.
    pub fn serve(self) -> ServerHandle {
        let (drain, drain_rx) = watch::channel(None);
        let counters = self.shared.counters.clone();
        let local_addr = self.local_addr;
        let task = tokio::spawn(
            accept_loop(self.listener, self.shared, drain_rx)
                .instrument(debug_span!("hbone_server", addr = %local_addr)),
        );
        ServerHandle {
            local_addr,
            counters,
            drain,
            task,
        }
    }
}

impl<H> fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// Stops accepting, sends GOAWAY on every connection and waits up to `grace` for
    /// their streams to finish; connections still busy then are closed abruptly.
    pub async fn drain(mut self, grace: Duration) -> DrainReport {
        // A send error means the server task already ended.
        let _ = self.drain.send(Some(Instant::now() + grace));
        (&mut self.task).await.unwrap_or_default()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counters {
    fn snapshot(&self) -> ServerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStats {
            tcp_accepted: get(&self.tcp_accepted),
            tls_connections: get(&self.tls_connections),
            handshake_failures: get(&self.handshake_failures),
            open_connections: get(&self.open_connections),
            streams: get(&self.streams),
            refused_streams: get(&self.refused_streams),
        }
    }
}

/// Counts a connection as open until dropped (also when its task is aborted).
struct OpenConnection(Arc<Counters>);

impl OpenConnection {
    fn new(counters: Arc<Counters>) -> Self {
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    shared: Arc<Shared<H>>,
    mut drain: watch::Receiver<Option<Instant>>,
) -> DrainReport {
    let mut conns = JoinSet::new();
    let (conn_drain_tx, conn_drain_rx) = watch::channel(false);
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer_addr)) => {
                    bump(&shared.counters.tcp_accepted);
                    conns.spawn(
                        serve_connection(tcp, peer_addr, shared.clone(), conn_drain_rx.clone())
                            .instrument(debug_span!("hbone_inbound", peer = %peer_addr)),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "accepting an HBONE connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next() => {}
            changed = drain.changed() => {
                match (changed, *drain.borrow()) {
                    (Ok(()), Some(deadline)) => break deadline,
                    (Ok(()), None) => {}
                    // The handle is gone (its Drop aborts us anyway).
                    (Err(_), _) => break Instant::now(),
                }
            }
        }
    };
    drop(listener);
    debug!(connections = conns.len(), "draining");
    // Receivers only go away with their connections.
    let _ = conn_drain_tx.send(true);
    let finished = timeout_at(deadline, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    let forced_connections = if finished.is_ok() {
        0
    } else {
        let n = conns.len();
        conns.shutdown().await;
        n
    };
    debug!(forced_connections, "drained");
    DrainReport { forced_connections }
}

async fn serve_connection<H: Handler>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared<H>>,
    mut drain: watch::Receiver<bool>,
) {
    let counters = &shared.counters;
    let limit = shared.config.handshake_timeout;
    let accepted = match timeout(limit, handshake(tcp, peer_addr, &shared)).await {
        Ok(res) => res,
        Err(_) => Err(AcceptError::Timeout(limit)),
    };
    let (mut conn, info) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => {
            bump(&counters.handshake_failures);
            debug!(error = %e, "HBONE connection refused");
            return;
        }
    };
    bump(&counters.tls_connections);
    let _open = OpenConnection::new(counters.clone());
    debug!(peer = %info.peer, local = %info.local_addr, "HBONE connection accepted");
    let info = Arc::new(info);

    let mut streams = JoinSet::new();
    let keepalive = match conn.ping_pong() {
        Some(ping_pong) => keepalive::run(ping_pong, shared.config.keepalive),
        // Only None once taken; this connection is brand new.
        None => return,
    };
    tokio::pin!(keepalive);
    let mut draining = false;
    if *drain.borrow_and_update() {
        conn.graceful_shutdown();
        draining = true;
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    bump(&counters.streams);
                    streams.spawn(serve_stream(shared.clone(), info.clone(), request, respond));
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE connection failed");
                    break;
                }
                None => break,
            },
            _ = drain.changed(), if !draining => {
                debug!("sending GOAWAY");
                conn.graceful_shutdown();
                draining = true;
            }
            e = &mut keepalive => {
                debug!(error = %e, "HBONE client unresponsive; closing");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                break;
            }
            Some(_) = streams.join_next() => {}
        }
    }
    // Streams of a dead connection fail promptly; those of a finished one are done.
    drop(conn);
    while streams.join_next().await.is_some() {}
}

async fn handshake<H>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    shared: &Shared<H>,
) -> Result<(H2Connection, ConnInfo), AcceptError> {
    // Best effort: latency matters more than segment count for tunnels.
    let _ = tcp.set_nodelay(true);
    let local_addr = tcp.local_addr().map_err(AcceptError::LocalAddr)?;
    let cert = shared
        .credentials
        .certificate_for(local_addr)
        .ok_or(AcceptError::NoCertificate(local_addr))?;
    let local_identity = cert.id().clone();
    let tls_config = shared
        .tls_configs
        .get(local_addr, cert, shared.credentials.trust_bundle())
        .map_err(AcceptError::TlsConfig)?;
    let tls = TlsAcceptor::from(tls_config)
        .accept(tcp)
        .await
        .map_err(AcceptError::Tls)?;
    let certs = tls.get_ref().1.peer_certificates();
    let peer = peer_spiffe_id(certs).map_err(AcceptError::PeerIdentity)?;
    let peer_certificate = certs
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or(AcceptError::PeerIdentity(VerifyError::NoCertificate))?;
    let conn = shared
        .config
        .http2
        .server_builder(shared.config.max_concurrent_streams)
        .handshake(tls)
        .await
        .map_err(AcceptError::Http2)?;
    Ok((
        conn,
        ConnInfo {
            peer,
            peer_certificate,
            peer_addr,
            local_addr,
            local_identity,
        },
    ))
}

async fn serve_stream<H: Handler>(
    shared: Arc<Shared<H>>,
    info: Arc<ConnInfo>,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, body) = request.into_parts();
    let target = match connect_target(&head) {
        Ok(target) => target,
        Err(why) => {
            debug!(method = %head.method, uri = %head.uri, why, "malformed CONNECT");
            refuse(&shared, &mut respond, Refusal::BadRequest);
            return;
        }
    };
    let headers = head.headers;
    let request = InboundRequest {
        peer: info.peer.clone(),
        peer_certificate: info.peer_certificate.clone(),
        peer_addr: info.peer_addr,
        local_addr: info.local_addr,
        local_identity: info.local_identity.clone(),
        target,
        forwarded_for: headers
            .get(http::header::FORWARDED)
            .and_then(parse_forwarded_for),
        traceparent: headers.get("traceparent").and_then(traceparent_from_header),
        baggage: headers.get("baggage").and_then(baggage_from_header),
        headers,
    };
    let span = debug_span!("connect", %target, peer = %info.peer);
    let decision = tokio::select! {
        decision = shared.handler.handle(request).instrument(span.clone()) => decision,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(parent: &span, "client cancelled the CONNECT");
            return;
        }
    };
    let upstream = match decision {
        Ok(upstream) => upstream,
        Err(refusal) => {
            debug!(parent: &span, %refusal, "CONNECT refused");
            refuse(&shared, &mut respond, refusal);
            return;
        }
    };
    let ok = http::Response::builder().status(StatusCode::OK).body(());
    let send = match ok.map(|ok| respond.send_response(ok, false)) {
        Ok(Ok(send)) => send,
        Ok(Err(e)) => {
            debug!(parent: &span, error = %e, "sending 200 failed");
            return;
        }
        Err(e) => {
            debug!(parent: &span, error = %e, "building 200 failed");
            return;
        }
    };
    upstream
        .serve(HboneStream::new(send, body, None))
        .instrument(span)
        .await;
}

/// The `ip:port` a CONNECT asks for, or why it is malformed.
fn connect_target(head: &http::request::Parts) -> Result<SocketAddr, &'static str> {
    if head.method != Method::CONNECT {
        return Err("method is not CONNECT");
    }
    let authority = head.uri.authority().ok_or("no :authority")?;
    authority
        .as_str()
        .parse()
        .map_err(|_| ":authority is not ip:port")
}

fn refuse<H>(shared: &Shared<H>, respond: &mut SendResponse<Bytes>, refusal: Refusal) {
    bump(&shared.counters.refused_streams);
    let response = http::Response::builder().status(refusal.status()).body(());
    if let Ok(response) = response
        && let Err(e) = respond.send_response(response, true)
    {
        debug!(error = %e, "sending the refusal failed");
    }
}
