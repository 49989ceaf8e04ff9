//! The bottom of the L7 stack: choose an endpoint of the routed destination, reach it,
//! and send the request on a reused HTTP connection.
//!
//! - **Endpoint choice**: the router's [`Destination`] names a service, port and
//!   subset; the snapshot's [`EndpointSet`] balances
//!   over that subset's healthy endpoints. A retry avoids the endpoints earlier tries
//!   of the same request used when another one is available (Envoy's
//!   `previous_hosts` predicate, which Istio enables): with one of two endpoints
//!   failing, one retry always lands on the healthy one. A tunnel addressed to a pod
//!   goes to that pod only. Endpoints the cluster's outlier detector ejected are
//!   skipped, and every outcome is reported to it.
//! - **Transport** ([`Connector`]): HBONE to `podIP:15008` with the CONNECT authority
//!   `podIP:targetPort`, presenting the waypoint's certificate and requiring the
//!   endpoint workload's identity, `Forwarded: for=<client>` so the destination sees
//!   who the client was; plain TCP to workloads outside the mesh.
//! - **HTTP connections** are HTTP/1.1 or HTTP/2 as the service port's protocol says
//!   (else as the downstream spoke), kept per (endpoint, identity, client IP,
//!   protocol): HTTP/2 connections multiplex, idle HTTP/1.1 connections are reused,
//!   both closed after an idle timeout or after `maxRequestsPerConnection`
//!   requests; `connectTimeout` bounds establishing one. A connection is per client
//!   IP because the tunnel's `Forwarded` header names one client.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_api::config::v1::{self as pb, AppProtocol};
use ambit_hbone::{
    ConnectError, ConnectRequest, Credentials, Dialer, HboneStream, Pool, PoolConfig,
};
use ambit_identity::SpiffeId;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::Service;

use crate::balance::{ClusterKey, PickContext, Picked};
use crate::body::{BoxError, ProxyBody, local_response};
use crate::context::RequestContext;
use crate::pool::PoolLimits;
use crate::retry::{DoNotRetry, FailureKind, TryOutcome, UpstreamError};
use crate::router::Destination;
use crate::snapshot::{EndpointSet, ObjectName, Target, hbone_identity};
use crate::telemetry::{ServiceLabels, UpstreamInfo, WorkloadLabels};

/// Body of the 503 when no endpoint can take the request (Envoy's words).
pub const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";

/// Reaches workloads: HBONE for meshed ones, plain TCP otherwise. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    identity: SpiffeId,
    hbone: Pool,
    dialer: Arc<dyn Dialer>,
}

/// A connection to an endpoint.
#[derive(Debug)]
pub enum UpstreamIo {
    /// An HBONE tunnel to the endpoint's pod.
    Hbone(HboneStream),
    /// A plain TCP connection (destination outside the mesh).
    Tcp(TcpStream),
}

/// Reaching an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// The HBONE tunnel could not be opened (connection, TLS, identity, or the
    /// destination refused the CONNECT).
    #[error("HBONE to {target}")]
    Hbone {
        /// The CONNECT authority.
        target: SocketAddr,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// The TCP connection could not be established.
    #[error("TCP connect to {target}")]
    Tcp {
        /// The endpoint.
        target: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not connected within the cluster's `connectTimeout`.
    #[error("connecting to {target}: no connection within {timeout:?}")]
    Timeout {
        /// The endpoint.
        target: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The HTTP handshake on the new connection failed.
    #[error("HTTP handshake with {target}")]
    Handshake {
        /// The endpoint.
        target: SocketAddr,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

/// Response extension: the endpoint that answered (for telemetry and logs).
#[derive(Clone, Debug)]
pub struct UpstreamHost {
    /// `ip:targetPort`.
    pub addr: SocketAddr,
    /// Its workload.
    pub workload: Arc<pb::Workload>,
}

/// Response extension: no endpoint could take the request (response flag `UH`;
/// `NC` when the destination service itself is unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoHealthyUpstream;

/// The HTTP upstream: a `tower::Service` for the bottom of the router's stack.
/// Requests must carry an `Arc<RequestContext>`; forwarded ones also the router's
/// [`Destination`]. Cheap to clone (shared connections).
#[derive(Clone)]
pub struct HttpUpstream {
    inner: Arc<HttpInner>,
}

/// Settings of [`HttpUpstream`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpUpstreamConfig {
    /// An upstream HTTP connection unused for this long is closed.
    pub idle_timeout: Duration,
}

struct HttpInner {
    connector: Connector,
    config: HttpUpstreamConfig,
    conns: Mutex<HashMap<ConnKey, KeyConns>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    addr: SocketAddr,
    identity: Option<SpiffeId>,
    client_ip: IpAddr,
    h2: bool,
}

struct KeyConns {
    /// The HTTP/2 connection and the requests it carried.
    h2: Option<(http2::SendRequest<ProxyBody>, u32)>,
    h1_idle: Vec<IdleH1>,
    /// Serialises establishing the HTTP/2 connection of this key.
    h2_connecting: Arc<tokio::sync::Mutex<()>>,
    last_used: Instant,
}

struct IdleH1 {
    sender: http1::SendRequest<ProxyBody>,
    /// Requests it carried.
    uses: u32,
    since: Instant,
}

/// Where a request goes, before the endpoint is picked.
enum Plan {
    /// One of a service's endpoints.
    Balanced {
        service: Arc<pb::Service>,
        set: Arc<EndpointSet>,
        h2: bool,
    },
    /// The pod the tunnel was addressed to.
    Pinned {
        addr: SocketAddr,
        workload: Arc<pb::Workload>,
        h2: bool,
    },
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Connector {
    /// Opens tunnels as `identity` with `credentials`' certificates; TCP connections
    /// (also under HBONE) are made by `dialer`.
    pub fn new(
        identity: SpiffeId,
        credentials: Arc<dyn Credentials>,
        dialer: Arc<dyn Dialer>,
        pool: PoolConfig,
    ) -> Self {
        Self {
            identity,
            hbone: Pool::with_dialer(pool, credentials, Arc::clone(&dialer)),
            dialer,
        }
    }

    /// The identity presented upstream.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Connects to `addr` (`ip:targetPort`) of `workload` on behalf of `client_ip`.
    pub async fn connect(
        &self,
        workload: &pb::Workload,
        addr: SocketAddr,
        client_ip: IpAddr,
    ) -> Result<UpstreamIo, ConnectFailure> {
        match hbone_identity(workload) {
            Some(id) => {
                let hbone_addr = SocketAddr::new(addr.ip(), ambit_api::DEFAULT_HBONE_PORT);
                let mut request = ConnectRequest::new(self.identity.clone(), id, hbone_addr, addr);
                request.forwarded_for = Some(client_ip);
                self.hbone
                    .connect(request)
                    .await
                    .map(UpstreamIo::Hbone)
                    .map_err(|source| ConnectFailure::Hbone {
                        target: addr,
                        source,
                    })
            }
            None => {
                let tcp = self
                    .dialer
                    .dial(addr)
                    .await
                    .map_err(|source| ConnectFailure::Tcp {
                        target: addr,
                        source,
                    })?;
                // Bytes are proxied as they come (HBONE connections set it too):
                // Nagle's algorithm would hold small writes for the peer's delayed ACK.
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%addr, %error, "setting TCP_NODELAY");
                }
                Ok(UpstreamIo::Tcp(tcp))
            }
        }
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Default for HttpUpstreamConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl HttpUpstream {
    /// An upstream reaching endpoints with `connector`. Starts the idle sweeper (must
    /// be called inside a tokio runtime); it stops when the last clone is dropped.
    pub fn new(connector: Connector, config: HttpUpstreamConfig) -> Self {
        let inner = Arc::new(HttpInner {
            connector,
            config,
            conns: Mutex::new(HashMap::new()),
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&inner), config.idle_timeout));
        Self { inner }
    }

    /// HTTP connections held (idle HTTP/1.1 ones and HTTP/2 ones), over all endpoints.
    pub fn connections(&self) -> usize {
        let conns = self.inner.lock();
        conns
            .values()
            .map(|k| k.h1_idle.len() + usize::from(k.h2.is_some()))
            .sum()
    }
}

impl fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUpstream")
            .field("connector", &self.inner.connector)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Service<Request<ProxyBody>> for HttpUpstream {
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.forward(request).await })
    }
}

/// How connections to one endpoint are used (from the cluster's `connectionPool`).
#[derive(Clone, Copy, Debug, Default)]
struct ConnLimits {
    connect_timeout: Option<Duration>,
    /// Requests per connection before it is retired; `None`: unlimited.
    max_requests: Option<u32>,
}

impl HttpInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnKey, KeyConns>> {
        // Every critical section only moves entries in and out: nothing half-done.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn forward(
        self: Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let Some(ctx) = request.extensions().get::<Arc<RequestContext>>().cloned() else {
            return Err("request without a waypoint request context".into());
        };
        let Some(plan) = plan(&ctx, &request) else {
            return Ok(no_healthy_upstream());
        };
        let routed = match &plan {
            Plan::Balanced { service, .. } => Some(ServiceLabels::from_service(service)),
            Plan::Pinned { .. } => None,
        };
        // The pick counts as an outstanding request (least-request) until dropped.
        let (addr, workload, h2, limits, outlier, _picked): (_, _, _, _, _, Option<Picked<'_>>) =
            match &plan {
                Plan::Pinned { addr, workload, h2 } => (
                    *addr,
                    Arc::clone(workload),
                    *h2,
                    ConnLimits::default(),
                    None,
                    None,
                ),
                Plan::Balanced { set, h2, .. } => {
                    let pick = PickContext::from_request(&request, Some(ctx.client.client_ip));
                    let Some(picked) = pick_endpoint(set, &ctx, &pick) else {
                        tracing::debug!(cluster = ?set.cluster, "every endpoint ejected or none healthy");
                        return Ok(no_healthy_upstream());
                    };
                    let Some(workload) = set.workloads.get(picked.index).cloned() else {
                        return Ok(no_healthy_upstream());
                    };
                    let limits = ConnLimits {
                        connect_timeout: set.pool.as_ref().and_then(|p| p.connect_timeout),
                        max_requests: set
                            .pool
                            .as_ref()
                            .and_then(|p| p.max_requests_per_connection),
                    };
                    (
                        picked.endpoint.addr,
                        workload,
                        *h2,
                        limits,
                        set.outlier.clone(),
                        Some(picked),
                    )
                }
            };
        ctx.record_attempt(addr);
        let grpc_request = crate::retry::is_grpc(request.headers());
        prepare_request(&mut request, h2, addr);
        let key = ConnKey {
            addr,
            identity: hbone_identity(&workload),
            client_ip: ctx.client.client_ip,
            h2,
        };
        let sent = if h2 {
            self.send_h2(&key, &workload, limits, request).await
        } else {
            self.send_h1(&key, &workload, limits, request).await
        };
        if let Some(detector) = &outlier {
            let outcome = match &sent {
                // A trailers-only gRPC answer carries its status in the headers;
                // outlier detection reads it there, as Envoy's router does.
                Ok(r) => TryOutcome::Response {
                    status: r.status(),
                    grpc: grpc_request
                        .then(|| crate::retry::header_grpc_status(r.headers()))
                        .flatten(),
                },
                Err(e) => TryOutcome::Failed(
                    e.downcast_ref::<UpstreamError>()
                        .map_or(FailureKind::Reset, |u| u.kind),
                ),
            };
            detector.record(addr, outcome);
        }
        let mut response = sent?.map(ProxyBody::new);
        strip_hop_by_hop(response.headers_mut(), false);
        let ext = response.extensions_mut();
        ext.insert(UpstreamInfo {
            addr,
            workload: WorkloadLabels::from_workload(&workload),
            service: routed,
        });
        ext.insert(UpstreamHost { addr, workload });
        Ok(response)
    }

    async fn send_h1(
        self: &Arc<Self>,
        key: &ConnKey,
        workload: &pb::Workload,
        limits: ConnLimits,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<hyper::body::Incoming>, BoxError> {
        loop {
            let (mut sender, uses, reused) = match self.take_idle_h1(key) {
                Some((s, uses)) => (s, uses, true),
                None => (self.connect_h1(key, workload, limits).await?, 0, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let uses = uses + 1;
                    if limits.max_requests.is_none_or(|max| uses < max) {
                        // Back to the pool once the response is read and the
                        // connection can take another request; a connection that
                        // fails meanwhile is dropped.
                        let this = Arc::clone(self);
                        let key = key.clone();
                        tokio::spawn(async move {
                            if sender.ready().await.is_ok() {
                                this.put_idle_h1(key, sender, uses);
                            }
                        });
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // A reused connection closed before the request was written:
                    // nothing reached the endpoint; use a new connection.
                    Some(r) if reused => {
                        tracing::debug!(addr = %key.addr, error = %e.error(), "idle HTTP/1.1 connection unusable; reconnecting");
                        request = r;
                    }
                    _ => return Err(send_error(key.addr, e.into_error())),
                },
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        key: &ConnKey,
        workload: &pb::Workload,
        limits: ConnLimits,
        request: Request<ProxyBody>,
    ) -> Result<Response<hyper::body::Incoming>, BoxError> {
        let mut sender = self.h2_sender(key, workload, limits).await?;
        sender.ready().await.map_err(|e| send_error(key.addr, e))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| send_error(key.addr, e))
    }

    fn take_idle_h1(&self, key: &ConnKey) -> Option<(http1::SendRequest<ProxyBody>, u32)> {
        let mut conns = self.lock();
        let entry = conns.get_mut(key)?;
        entry.last_used = Instant::now();
        while let Some(idle) = entry.h1_idle.pop() {
            if idle.sender.is_ready() && !idle.sender.is_closed() {
                return Some((idle.sender, idle.uses));
            }
        }
        None
    }

    fn put_idle_h1(&self, key: ConnKey, sender: http1::SendRequest<ProxyBody>, uses: u32) {
        let now = Instant::now();
        let mut conns = self.lock();
        let entry = conns.entry(key).or_insert_with(|| KeyConns::new(now));
        entry.h1_idle.push(IdleH1 {
            sender,
            uses,
            since: now,
        });
    }

    async fn connect_h1(
        &self,
        key: &ConnKey,
        workload: &pb::Workload,
        limits: ConnLimits,
    ) -> Result<http1::SendRequest<ProxyBody>, BoxError> {
        let io = self.connect_io(key, workload, limits).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(|source| {
            connect_failure(ConnectFailure::Handshake {
                target: key.addr,
                source,
            })
        })?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The key's HTTP/2 connection (established if need be), counting one more
    /// request on it; a connection that reached the per-connection limit is retired.
    async fn h2_sender(
        &self,
        key: &ConnKey,
        workload: &pb::Workload,
        limits: ConnLimits,
    ) -> Result<http2::SendRequest<ProxyBody>, BoxError> {
        let connecting = {
            let mut conns = self.lock();
            let entry = conns
                .entry(key.clone())
                .or_insert_with(|| KeyConns::new(Instant::now()));
            entry.last_used = Instant::now();
            if let Some(s) = entry.take_h2_use(limits) {
                return Ok(s);
            }
            Arc::clone(&entry.h2_connecting)
        };
        let _guard = connecting.lock().await;
        // Another request may have connected meanwhile.
        if let Some(s) = self.lock().get_mut(key).and_then(|e| e.take_h2_use(limits)) {
            return Ok(s);
        }
        let io = self.connect_io(key, workload, limits).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.adaptive_window(true);
        let (sender, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| {
                connect_failure(ConnectFailure::Handshake {
                    target: key.addr,
                    source,
                })
            })?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
        });
        let mut conns = self.lock();
        let entry = conns
            .entry(key.clone())
            .or_insert_with(|| KeyConns::new(Instant::now()));
        entry.h2 = Some((sender.clone(), 0));
        Ok(entry.take_h2_use(limits).unwrap_or(sender))
    }

    async fn connect_io(
        &self,
        key: &ConnKey,
        workload: &pb::Workload,
        limits: ConnLimits,
    ) -> Result<UpstreamIo, BoxError> {
        let connect = self.connector.connect(workload, key.addr, key.client_ip);
        let connected =
            match limits.connect_timeout {
                None => connect.await,
                Some(limit) => tokio::time::timeout(limit, connect).await.unwrap_or(Err(
                    ConnectFailure::Timeout {
                        target: key.addr,
                        timeout: limit,
                    },
                )),
            };
        connected.map_err(|e| {
            tracing::debug!(error = %crate::snapshot::error_chain(&e), "upstream connect failed");
            connect_failure(e)
        })
    }

    fn sweep(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut conns = self.lock();
        conns.retain(|_, k| {
            k.h1_idle.retain(|idle| {
                !idle.sender.is_closed() && now.saturating_duration_since(idle.since) < idle_timeout
            });
            let h2_idle = now.saturating_duration_since(k.last_used) >= idle_timeout;
            if k.h2.as_ref().is_some_and(|(s, _)| s.is_closed()) || h2_idle {
                k.h2 = None;
            }
            !k.h1_idle.is_empty() || k.h2.is_some() || Arc::strong_count(&k.h2_connecting) > 1
        });
    }
}

impl KeyConns {
    fn new(now: Instant) -> Self {
        Self {
            h2: None,
            h1_idle: Vec::new(),
            h2_connecting: Arc::default(),
            last_used: now,
        }
    }

    /// The open HTTP/2 connection for one more request, if it has room under the
    /// per-connection limit (it is retired when this request is its last).
    fn take_h2_use(&mut self, limits: ConnLimits) -> Option<http2::SendRequest<ProxyBody>> {
        let (sender, uses) = self.h2.as_mut()?;
        if sender.is_closed() {
            self.h2 = None;
            return None;
        }
        *uses += 1;
        let sender = sender.clone();
        if limits.max_requests.is_some_and(|max| *uses >= max) {
            self.h2 = None;
        }
        Some(sender)
    }
}

async fn sweep_idle(inner: Weak<HttpInner>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.sweep(idle_timeout);
    }
}

/// Where a request goes: the tunnel's pod, or the routed destination's endpoints.
/// `None` when nothing can take it (the reason is logged).
fn plan(ctx: &RequestContext, request: &Request<ProxyBody>) -> Option<Plan> {
    let downstream_h2 = request.version() == Version::HTTP_2;
    if let Target::Workload { workload, port } = &ctx.target {
        return Some(Plan::Pinned {
            addr: SocketAddr::new(ctx.client.target.ip(), *port),
            workload: Arc::clone(workload),
            h2: downstream_h2,
        });
    }
    let Some(dest) = request.extensions().get::<Destination>() else {
        tracing::debug!("request without a routed destination");
        return None;
    };
    let name = ObjectName::from_proto(&dest.service);
    let Some(entry) = ctx.snapshot.service(&name) else {
        tracing::debug!(service = %name, "route to a service the waypoint does not know");
        return None;
    };
    let wanted = dest.port.or_else(|| ctx.target.service_port());
    let ports = &entry.service.ports;
    let port = wanted
        .and_then(|w| ports.iter().find(|p| p.port == u32::from(w)))
        .or_else(|| (ports.len() == 1).then(|| &ports[0]));
    let Some(port) = port else {
        tracing::debug!(service = %name, ?wanted, "route to a port the service does not have");
        return None;
    };
    let set = match ctx
        .snapshot
        .endpoint_set(entry, port, dest.subset.as_deref())
    {
        Ok(set) => set,
        Err(error) => {
            tracing::debug!(service = %name, %error, "route to an undefined subset");
            return None;
        }
    };
    let h2 = match AppProtocol::try_from(port.protocol) {
        Ok(AppProtocol::Http2 | AppProtocol::Grpc) => true,
        Ok(AppProtocol::Http1) => false,
        _ => downstream_h2,
    };
    Some(Plan::Balanced {
        service: Arc::clone(&entry.service),
        set,
        h2,
    })
}

/// The cluster and connection-pool limits of a routed request, for
/// [`crate::pool::PoolLayer`] above the upstream; `None`: no limits (or nowhere to go,
/// which the upstream answers).
pub fn pool_cluster(request: &Request<ProxyBody>) -> Option<(ClusterKey, PoolLimits)> {
    let ctx = request.extensions().get::<Arc<RequestContext>>()?;
    match plan(ctx, request)? {
        Plan::Balanced { set, .. } => set.pool.clone().map(|p| (set.cluster.clone(), p)),
        Plan::Pinned { .. } => None,
    }
}

/// Picks among the endpoints the outlier detector has not ejected, avoiding those
/// earlier tries of this request used while another one is eligible (Envoy's
/// `previous_hosts`). `None`: every endpoint is ejected (or there are none).
fn pick_endpoint<'a>(
    set: &'a EndpointSet,
    ctx: &RequestContext,
    pick: &PickContext<'_>,
) -> Option<Picked<'a>> {
    let endpoints = set.balancer.endpoints();
    let healthy = match &set.outlier {
        Some(detector) => detector.eligible(endpoints),
        None => vec![true; endpoints.len()],
    };
    let tried = ctx.attempts();
    if !tried.is_empty() {
        let fresh: Vec<bool> = healthy
            .iter()
            .zip(endpoints)
            .map(|(ok, e)| *ok && !tried.contains(&e.addr))
            .collect();
        if fresh.contains(&true) {
            return set.balancer.pick_eligible(pick, &fresh);
        }
    }
    set.balancer.pick_eligible(pick, &healthy)
}

/// Envoy's answer when no endpoint can take a request; final (never retried).
fn no_healthy_upstream() -> Response<ProxyBody> {
    let mut r = local_response(StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM);
    r.extensions_mut().insert(NoHealthyUpstream);
    r.extensions_mut().insert(DoNotRetry);
    r
}

fn connect_failure(e: ConnectFailure) -> BoxError {
    Box::new(UpstreamError {
        kind: FailureKind::ConnectFailure,
        source: Box::new(e),
    })
}

fn send_error(addr: SocketAddr, e: hyper::Error) -> BoxError {
    let refused = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .filter_map(|e| e.downcast_ref::<h2::Error>())
    .any(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM));
    tracing::debug!(%addr, error = %e, refused, "upstream request failed");
    Box::new(UpstreamError {
        kind: if refused {
            FailureKind::RefusedStream
        } else {
            FailureKind::Reset
        },
        source: Box::new(e),
    })
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including those `Connection` lists. `te` survives only
/// as `te: trailers` on requests (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let keep_te = request
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Makes a downstream request fit the upstream connection: hop-by-hop headers
/// removed; HTTP/1.1 in origin form with `Host`, or HTTP/2 with an absolute URI
/// (`:scheme`, `:authority`).
fn prepare_request(request: &mut Request<ProxyBody>, h2: bool, endpoint: SocketAddr) {
    strip_hop_by_hop(request.headers_mut(), true);
    let authority = request
        .uri()
        .authority()
        .cloned()
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        })
        .or_else(|| Authority::try_from(endpoint.to_string()).ok());
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(path);
    if h2 {
        parts.scheme = Some(request.uri().scheme().cloned().unwrap_or(Scheme::HTTP));
        parts.authority = authority;
        request.headers_mut().remove(header::HOST);
        *request.version_mut() = Version::HTTP_2;
    } else {
        if !request.headers().contains_key(header::HOST)
            && let Some(a) = &authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            request.headers_mut().insert(header::HOST, v);
        }
        *request.version_mut() = Version::HTTP_11;
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-kept").is_some());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(header::TE).is_none());
    }

    #[test]
    fn requests_are_shaped_for_each_protocol() {
        let endpoint: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let mut r = Request::get("/a?b=1")
            .header(header::HOST, "payment.shop:80")
            .body(ProxyBody::default())
            .unwrap();
        prepare_request(&mut r, true, endpoint);
        assert_eq!(r.uri().to_string(), "http://payment.shop:80/a?b=1");
        assert!(r.headers().get(header::HOST).is_none());
        assert_eq!(r.version(), Version::HTTP_2);

        let mut r = Request::get("http://payment.shop/x")
            .version(Version::HTTP_2)
            .body(ProxyBody::default())
            .unwrap();
        prepare_request(&mut r, false, endpoint);
        assert_eq!(r.uri().to_string(), "/x");
        assert_eq!(r.headers().get(header::HOST).unwrap(), "payment.shop");
        assert_eq!(r.version(), Version::HTTP_11);
    }
}
