//! The waypoint's data path from the tunnel's side: HBONE in, HTTP or TCP served on
//! each accepted tunnel.
//!
//! ```text
//! HBONE CONNECT (mTLS, peer = source workload identity, :authority = original dst)
//!   └─ Inbound::handle: target must be a VIP:port of a service this waypoint fronts,
//!      or a pod bound to it; anything else 400 (fail closed)
//!       └─ Tunnel::serve: by the port's protocol, or detected on the first bytes
//!           ├─ HTTP/1.1, HTTP/2, gRPC: hyper server; per request the context, then
//!           │    Telemetry → authorization → Router → Fault → Mirror → Timeout → Retry
//!           │      → Pool (connectionPool limits) → HttpUpstream (outlier detection)
//!           └─ TCP: L4 authorization, an endpoint over HBONE, bytes copied both ways
//! ```
//!
//! Every connection and request takes the configuration current when it starts
//! ([`Snapshot`] on a `watch`), so a configuration change swaps routes for new
//! requests without touching connections.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_hbone::{
    Credentials, Dialer, Handler, HboneStream, InboundRequest, PoolConfig, Refusal, Server,
    ServerConfig, ServerHandle, SingleIdentity, TcpDialer, Upstream,
};
use ambit_identity::SpiffeId;
use ambit_policy::authz::DecisionReason;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;
use tower::{Layer as _, ServiceExt as _};

use crate::authz::{self, AuthzDenied, AuthzTargets, PeerInfo};
use crate::balance::PickContext;
use crate::body::{ProxyBody, local_response};
use crate::context::{ClientInfo, RequestContext};
use crate::detect::{Detected, Prefixed, detect};
use crate::mirror::MirrorLimiter;
use crate::pool::{Pool, PoolLayer, PoolLimiter};
use crate::retry::RetryStats;
use crate::router::{RouteHandle, Router, RouterOptions, Stack, UpstreamFailed};
use crate::routes::{RouteTable, ServicePort};
use crate::snapshot::{Protocol, Snapshot, Target, error_chain};
use crate::telemetry::{
    RequestMetrics, ServiceLabels, TelemetryContext, TelemetryLayer, WorkloadLabels,
    principal_label,
};
use crate::upstream::{Connector, HttpUpstream, HttpUpstreamConfig, UpstreamIo};

/// Tuning of the data path.
#[derive(Clone, Debug)]
pub struct DataPlaneOptions {
    /// How long to wait for a client's first bytes on a port of unknown protocol
    /// before treating it as TCP (server-first protocols send nothing).
    pub detect_timeout: Duration,
    /// Random source, retry counter and replay limit of the routing layers.
    pub router: RouterOptions,
    /// Upstream HTTP connections.
    pub upstream: HttpUpstreamConfig,
    /// The HBONE client pool towards endpoints.
    pub pool: PoolConfig,
    /// The HBONE server.
    pub server: ServerConfig,
    /// Request metrics and access log (register its metrics in the process
    /// registry; the default records into a registry nobody reads).
    pub telemetry: TelemetryLayer,
}

/// What the data path shares: identity, configuration, upstream connections and the
/// routing stack. Build with [`DataPlane::new`], serve with [`DataPlane::serve`].
pub struct DataPlane {
    identity: SpiffeId,
    credentials: Arc<dyn Credentials>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    connector: Connector,
    upstream: HttpUpstream,
    /// The layers below the router; cloned with each service's routes per request.
    router: Router<Stack<Pool<HttpUpstream>>>,
    limiter: PoolLimiter,
    retry_stats: RetryStats,
    mirrors: MirrorLimiter,
    detect_timeout: Duration,
    server_config: ServerConfig,
    telemetry: TelemetryLayer,
}

/// The stack below telemetry, as a `tower::Service`.
#[derive(Clone, Debug)]
struct Routing(Arc<DataPlane>);

/// The HBONE handler: decides each CONNECT.
#[derive(Clone, Debug)]
pub struct Inbound(Arc<DataPlane>);

/// An accepted tunnel, served once the `200` went out.
#[derive(Debug)]
pub struct Tunnel {
    plane: Arc<DataPlane>,
    client: Arc<ClientInfo>,
    target: Target,
    snapshot: Arc<Snapshot>,
    /// The upstream of a declared-TCP port, connected before the `200`.
    connected: Option<UpstreamIo>,
}

impl Default for DataPlaneOptions {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_secs(1),
            router: RouterOptions::default(),
            upstream: HttpUpstreamConfig::default(),
            pool: PoolConfig::default(),
            server: ServerConfig::default(),
            telemetry: TelemetryLayer::new(RequestMetrics::register(
                &mut prometheus_client::registry::Registry::default(),
            )),
        }
    }
}

impl DataPlane {
    /// The data path of the waypoint `identity`: certificates and roots from
    /// `credentials`, configuration from `snapshot`, TCP connections made by `dialer`
    /// (`None`: [`TcpDialer`]). Must be called inside a tokio runtime.
    pub fn new(
        identity: SpiffeId,
        credentials: Arc<dyn Credentials>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        dialer: Option<Arc<dyn Dialer>>,
        options: DataPlaneOptions,
    ) -> Arc<Self> {
        let dialer = dialer.unwrap_or_else(|| Arc::new(TcpDialer));
        let connector = Connector::new(
            identity.clone(),
            Arc::clone(&credentials),
            dialer,
            options.pool,
        );
        let upstream = HttpUpstream::new(connector.clone(), options.upstream);
        let retry_stats = options.router.retry_stats.clone();
        let mirrors = options.router.mirror.limiter.clone();
        let limiter = PoolLimiter::new();
        let pooled = PoolLayer::new(limiter.clone(), Arc::new(crate::upstream::pool_cluster))
            .layer(upstream.clone());
        let router = Router::new(
            RouteHandle::new(RouteTable::empty()),
            pooled,
            options.router,
        );
        Arc::new(Self {
            identity,
            credentials,
            snapshot,
            connector,
            upstream,
            router,
            limiter,
            retry_stats,
            mirrors,
            detect_timeout: options.detect_timeout,
            server_config: options.server,
            telemetry: options.telemetry,
        })
    }

    /// The waypoint's identity (presented to clients and endpoints).
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The configuration in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Retries made so far.
    pub fn retry_stats(&self) -> &RetryStats {
        &self.retry_stats
    }

    /// Mirrors outstanding now (copying the body, sending or draining).
    pub fn mirrors_in_flight(&self) -> usize {
        self.mirrors.in_flight()
    }

    /// Connection-pool admission state per cluster.
    pub fn pool_limiter(&self) -> &PoolLimiter {
        &self.limiter
    }

    /// Upstream HTTP connections held.
    pub fn upstream_connections(&self) -> usize {
        self.upstream.connections()
    }

    /// Serves HBONE on `listener` (bound earlier: bind first, then serve), presenting
    /// the waypoint's certificate.
    pub fn serve(
        self: &Arc<Self>,
        listener: std::net::TcpListener,
    ) -> Result<ServerHandle, ambit_hbone::BindError> {
        let credentials = Arc::new(SingleIdentity::new(
            Arc::clone(&self.credentials),
            self.identity.clone(),
        ));
        let server = Server::from_std(
            listener,
            credentials,
            Inbound(Arc::clone(self)),
            self.server_config,
        )?;
        tracing::info!(addr = %server.local_addr(), identity = %self.identity, "HBONE listening");
        Ok(server.serve())
    }

    /// One HTTP request of a tunnel: its context attached, then telemetry around
    /// authorization and the routing stack ([`Routing`]).
    async fn handle_request(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: Arc<ClientInfo>,
    ) -> Response<ProxyBody> {
        let snapshot = self.snapshot();
        let target = match snapshot.resolve(client.target) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(peer = %client.peer, error = %e, "request for a destination no longer served here");
                return local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "destination not served by this waypoint",
                );
            }
        };
        let mut request = request.map(ProxyBody::new);
        let ext = request.extensions_mut();
        ext.insert(telemetry_context(&snapshot, &client, &target));
        ext.insert(peer_info(&client));
        ext.insert(authz_targets(&snapshot, &target));
        if let Some(port) = target.service_port() {
            ext.insert(ServicePort(port));
        }
        ext.insert(Arc::new(RequestContext::new(snapshot, client, target)));
        let service = self.telemetry.layer(Routing(Arc::clone(self)));
        match service.oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// Below telemetry: authorization, then the service's routes (or, for a pod
    /// address, that pod).
    async fn authorize_and_route(&self, mut request: Request<ProxyBody>) -> Response<ProxyBody> {
        let ext = request.extensions();
        let (Some(ctx), Some(peer), Some(targets)) = (
            ext.get::<Arc<RequestContext>>().cloned(),
            ext.get::<PeerInfo>(),
            ext.get::<AuthzTargets>(),
        ) else {
            // Only `handle_request` builds requests for this: a bug, and no access.
            tracing::error!("request without its context: denied");
            return AuthzDenied { policy: None }.response();
        };
        let decision = authz::authorize(ctx.snapshot.policies(), &targets.0, &request, peer);
        if !decision.audited_by.is_empty() {
            tracing::info!(
                target: "authz",
                audited_by = ?decision.audited_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
                allowed = decision.is_allowed(),
                method = %request.method(),
                path = %request.uri().path(),
                principal = peer.principal().as_deref().unwrap_or("-"),
                "audit policy matched"
            );
        }
        if !decision.is_allowed() {
            tracing::debug!(peer = %ctx.client.peer, reason = ?decision.reason, path = %request.uri().path(), "request denied by authorization policy");
            let policy = match &decision.reason {
                DecisionReason::DeniedBy(id) => Some(id.clone()),
                _ => None,
            };
            return AuthzDenied { policy }.response();
        }
        request.extensions_mut().insert(decision);
        match &ctx.target {
            Target::Service { entry, .. } => {
                let router = self
                    .router
                    .with_routes(RouteHandle::from_shared(Arc::clone(&entry.routes)));
                match router.oneshot(request).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
            // Addressed to one pod: no routes apply, the request goes to that pod.
            Target::Workload { .. } => match self.upstream.clone().oneshot(request).await {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(error = %error, "upstream failed");
                    let mut r = local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    );
                    r.extensions_mut().insert(UpstreamFailed);
                    r
                }
            },
        }
    }

    /// Connects the upstream of a TCP tunnel: the addressed pod, or an endpoint of the
    /// service chosen by its load balancer (another one if the first cannot be
    /// reached).
    async fn connect_tcp(
        &self,
        snapshot: &Snapshot,
        client: &ClientInfo,
        target: &Target,
    ) -> Option<UpstreamIo> {
        match target {
            Target::Workload { workload, port } => {
                let addr = SocketAddr::new(client.target.ip(), *port);
                match self
                    .connector
                    .connect(workload, addr, client.client_ip)
                    .await
                {
                    Ok(io) => Some(io),
                    Err(e) => {
                        tracing::info!(error = %error_chain(&e), "TCP upstream unavailable");
                        None
                    }
                }
            }
            Target::Service { entry, port } => {
                let set = snapshot.endpoint_set(entry, port, None).ok()?;
                let headers = http::HeaderMap::new();
                let pick = PickContext {
                    headers: &headers,
                    query: None,
                    source_ip: Some(client.client_ip),
                };
                let mut tried = Vec::new();
                for _ in 0..2 {
                    let Some(picked) = set.balancer.pick(&pick) else {
                        break;
                    };
                    let addr = picked.endpoint.addr;
                    if tried.contains(&addr) {
                        continue;
                    }
                    tried.push(addr);
                    let workload = set.workloads.get(picked.index)?;
                    match self
                        .connector
                        .connect(workload, addr, client.client_ip)
                        .await
                    {
                        Ok(io) => return Some(io),
                        Err(e) => {
                            tracing::info!(error = %error_chain(&e), service = %entry.name, "TCP endpoint unavailable");
                        }
                    }
                }
                None
            }
        }
    }
}

impl fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlane")
            .field("identity", &self.identity)
            .field("generation", &self.snapshot.borrow().generation())
            .finish_non_exhaustive()
    }
}

impl tower::Service<Request<ProxyBody>> for Routing {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let plane = Arc::clone(&self.0);
        // Below telemetry, so that the metrics and the access log show what the
        // client got (Envoy: HTTP 200 with the gRPC status).
        let grpc = crate::retry::is_grpc(request.headers());
        Box::pin(async move {
            let response = plane.authorize_and_route(request).await;
            Ok(if grpc {
                crate::body::grpc_local_reply(response)
            } else {
                response
            })
        })
    }
}

impl Handler for Inbound {
    type Upstream = Tunnel;

    async fn handle(&self, request: InboundRequest) -> Result<Tunnel, Refusal> {
        let plane = &self.0;
        let snapshot = plane.snapshot();
        let target = snapshot.resolve(request.target).map_err(|e| {
            tracing::info!(peer = %request.peer, error = %e, "CONNECT refused");
            Refusal::BadRequest
        })?;
        let client = Arc::new(ClientInfo {
            peer: request.peer.clone(),
            peer_addr: request.peer_addr,
            client_ip: request.forwarded_for.unwrap_or(request.peer_addr.ip()),
            target: request.target,
            traceparent: request.traceparent.clone(),
        });
        let connected = if target.protocol() == Protocol::Tcp {
            if !authorize_tcp(&snapshot, &client, &target) {
                tracing::info!(peer = %client.peer, target = %client.target, "TCP tunnel denied by authorization policy");
                return Err(Refusal::PolicyDenied);
            }
            let io = plane
                .connect_tcp(&snapshot, &client, &target)
                .await
                .ok_or(Refusal::UpstreamUnavailable)?;
            Some(io)
        } else {
            None
        };
        Ok(Tunnel {
            plane: Arc::clone(plane),
            client,
            target,
            snapshot,
            connected,
        })
    }
}

impl Upstream for Tunnel {
    async fn serve(self, mut stream: HboneStream) {
        let Self {
            plane,
            client,
            target,
            snapshot,
            connected,
        } = self;
        if let Some(upstream) = connected {
            relay(stream, Bytes::new(), upstream).await;
            return;
        }
        let (detected, prefix) = match target.protocol() {
            Protocol::Http => (Detected::Http, Bytes::new()),
            Protocol::Tcp | Protocol::Detect => {
                match detect(&mut stream, plane.detect_timeout).await {
                    Ok(d) => d,
                    Err(error) => {
                        tracing::debug!(%error, "tunnel failed before its protocol was known");
                        return;
                    }
                }
            }
        };
        match detected {
            Detected::Http => serve_http(plane, client, Prefixed::new(prefix, stream)).await,
            Detected::Tcp => {
                if !authorize_tcp(&snapshot, &client, &target) {
                    tracing::info!(peer = %client.peer, target = %client.target, "TCP stream denied by authorization policy");
                    return;
                }
                let Some(upstream) = plane.connect_tcp(&snapshot, &client, &target).await else {
                    return;
                };
                relay(stream, prefix, upstream).await;
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 (told apart by hyper on the first bytes) on a tunnel.
async fn serve_http(plane: Arc<DataPlane>, client: Arc<ClientInfo>, io: Prefixed<HboneStream>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let plane = Arc::clone(&plane);
        let client = Arc::clone(&client);
        async move { Ok::<_, Infallible>(plane.handle_request(request, client).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%error, "HTTP on a tunnel ended with an error");
    }
}

/// Copies a TCP tunnel both ways, `prefix` (bytes read for detection) first.
async fn relay(downstream: HboneStream, prefix: Bytes, mut upstream: UpstreamIo) {
    if !prefix.is_empty()
        && let Err(error) = upstream.write_all(&prefix).await
    {
        tracing::debug!(%error, "writing the detected bytes upstream");
        return;
    }
    let mut downstream = downstream;
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((to_upstream, to_downstream)) => {
            tracing::debug!(to_upstream, to_downstream, "TCP tunnel closed");
        }
        Err(error) => tracing::debug!(%error, "TCP tunnel failed"),
    }
}

/// The source and addressed service as the request metrics label them. The source
/// workload is known when the configuration describes the client's pod; its
/// principal and namespace always come from the verified identity.
fn telemetry_context(
    snapshot: &Snapshot,
    client: &ClientInfo,
    target: &Target,
) -> TelemetryContext {
    let mut source = match snapshot.workload_by_ip(client.client_ip) {
        Some(w) if w.spiffe_id == client.peer.as_str() => WorkloadLabels::from_workload(w),
        _ => WorkloadLabels::unknown(),
    };
    source.principal = principal_label(Some(client.peer.as_str()));
    source.namespace = client.peer.namespace().to_owned();
    let service = match target {
        Target::Service { entry, .. } => ServiceLabels::from_service(&entry.service),
        Target::Workload { .. } => ServiceLabels::unknown(),
    };
    TelemetryContext {
        source,
        service,
        mtls: true,
        tunnel_traceparent: client.traceparent.clone(),
    }
}

/// What authorization and telemetry know of a tunnel's caller.
fn peer_info(client: &ClientInfo) -> PeerInfo {
    PeerInfo {
        identity: Some(client.peer.clone()),
        peer_addr: client.peer_addr,
        forwarded_for: Some(client.client_ip),
        target: client.target,
    }
}

/// The policy targets of a tunnel: the addressed Service, if any, and our Gateway.
fn authz_targets(snapshot: &Snapshot, target: &Target) -> AuthzTargets {
    let service = match target {
        Target::Service { entry, .. } => Some(entry.name.to_proto()),
        Target::Workload { .. } => None,
    };
    AuthzTargets::new(service.as_ref(), &snapshot.gateway().to_proto())
}

/// The L4 decision for a tunnel relayed as TCP (HTTP attributes unknown).
fn authorize_tcp(snapshot: &Snapshot, client: &ClientInfo, target: &Target) -> bool {
    let targets = authz_targets(snapshot, target);
    authz::authorize_tcp(snapshot.policies(), &targets.0, &peer_info(client)).is_allowed()
}
