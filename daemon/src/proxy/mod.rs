//! The per-pod L4 proxies: straight-line async code, accept → resolve/authorize →
//! connect → copy.
//!
//! - outbound (15001): original destination → through the destination's waypoint
//!   when it has one (HBONE to the waypoint, `:authority` = the original destination;
//!   refused when no waypoint instance is healthy), else Service VIP resolved to an
//!   endpoint → HBONE to a meshed destination (presenting the pod's certificate,
//!   expecting the destination's identity), plain TCP from the pod otherwise (see
//!   [`snapshot`] for the rules);
//! - inbound HBONE (15008): the CONNECT target must be this pod; a pod fronted by a
//!   waypoint on that port accepts only that waypoint; L4 policy with the peer's
//!   certificate identity; then the app is connected (from the original client's IP
//!   named in `Forwarded` when the peer is the pod's waypoint, else the peer's);
//! - inbound plaintext (15006): refused for waypoint-fronted ports and under STRICT,
//!   else L4 policy without identity.
//!
//! Metrics (`istio_tcp_*`): for a tunnel from the pod's waypoint the destination
//! reports the original client (by its `Forwarded` address) as `source_workload` and
//! `source_principal` — the waypoint authenticated it on its own inbound, like Istio
//! derives them from the waypoint's headers; `destination_service` is the first
//! Service selecting the pod on the target port. Byte counts include what was moved
//! before a copy ended with an error.
//!
//! The app is connected from the pod's netns with a transparent socket bound to the
//! client's IP (see [`delivery`]); when the pod's delivery routing cannot be set up,
//! with a plain marked socket (the app then sees the pod's own IP as peer).

pub mod delivery;
pub mod snapshot;

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ambit_control_client::CertManager;
use ambit_hbone::{
    ConnectRequest, Credentials, Dialer, Handler, InboundRequest, Pool, PoolConfig, Refusal,
    Server, ServerConfig, ServerHandle, SingleIdentity, Upstream,
};
use ambit_identity::{SpiffeId, TrustBundle, WorkloadCertificate};
use ambit_policy::authz::{ConnectionAttrs, PeerIdentity};
use ambit_policy::peer_authn::MtlsMode;
use ambit_policy::wire::workload_ref;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::capture::{Capture, PodHandle, PodListeners};
use crate::metrics::{self, TcpLabels, TcpMetrics};
use crate::pods::error_chain;
use snapshot::{Route, Snapshot, WaypointAdmission};

/// Read buffer of a plain TCP relay, per direction.
const COPY_BUFFER: usize = 64 * 1024;

/// What every pod proxy shares.
#[derive(Clone, Debug)]
pub struct ProxyShared {
    /// Original destinations.
    pub capture: Arc<Capture>,
    /// Certificates of the local identities.
    pub certs: CertManager,
    /// The indexed configuration.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// TCP metrics.
    pub metrics: TcpMetrics,
}

/// The running proxies of one pod; dropping it stops them abruptly,
/// [`PodProxy::drain`] gracefully.
#[derive(Debug)]
pub struct PodProxy {
    task: Option<JoinHandle<()>>,
    drain: watch::Sender<Option<Duration>>,
}

/// [`Credentials`] from the [`CertManager`].
struct NodeCredentials {
    certs: CertManager,
    initial_bundle: Arc<TrustBundle>,
}

/// Dials HBONE servers from the source pod's netns with the bypass mark.
struct PodDialer(PodHandle);

struct Pod {
    shared: ProxyShared,
    handle: PodHandle,
    identity: SpiffeId,
    pool: Pool,
    /// Whether the delivery routing is in place (client IP preserved).
    preserve_source: bool,
}

/// The inbound HBONE handler of one pod.
struct Inbound(Arc<Pod>);

/// The app connection of an accepted tunnel, with its metric labels.
struct AppUpstream {
    app: TcpStream,
    labels: TcpLabels,
    metrics: TcpMetrics,
}

impl PodProxy {
    /// Starts the proxies of a pod serving `identity` on its `listeners` (once the
    /// trust bundle is known).
    pub fn spawn(
        shared: ProxyShared,
        handle: PodHandle,
        identity: SpiffeId,
        listeners: PodListeners,
    ) -> Self {
        let (drain, mut drain_rx) = watch::channel(None::<Duration>);
        let task = tokio::spawn(async move {
            let mut bundle = shared.certs.trust_bundle();
            let initial_bundle = tokio::select! {
                b = bundle.wait_for(Option::is_some) => match b.as_deref() {
                    Ok(Some(b)) => Arc::clone(b),
                    _ => return,
                },
                _ = drain_rx.wait_for(Option::is_some) => return,
            };
            // The listeners are bound (capture steers to them), so connections wait in
            // their backlogs until the pod's certificate is held: a handshake before
            // that would be reset, and nothing may leave the pod in plaintext instead.
            tokio::select! {
                _ = shared.certs.wait_current(&identity) => {}
                _ = drain_rx.wait_for(Option::is_some) => return,
            }
            let credentials: Arc<NodeCredentials> = Arc::new(NodeCredentials {
                certs: shared.certs.clone(),
                initial_bundle,
            });
            let pool = Pool::with_dialer(
                PoolConfig::default(),
                credentials.clone(),
                Arc::new(PodDialer(handle.clone())),
            );
            let mark = shared.capture.config().delivery_mark.get();
            let routing = {
                let handle = handle.clone();
                tokio::task::spawn_blocking(move || delivery::setup(&handle, mark)).await
            };
            let preserve_source = match routing {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    tracing::warn!(pod = %handle.pod().name, error = %error_chain(&error), "no delivery routing; the app will not see client IPs");
                    false
                }
                Err(error) => {
                    tracing::warn!(pod = %handle.pod().name, %error, "delivery routing task");
                    false
                }
            };
            let pod = Arc::new(Pod {
                shared,
                handle,
                identity,
                pool,
                preserve_source,
            });
            let name = pod.handle.pod().name.clone();
            let server_credentials = Arc::new(SingleIdentity::new(
                credentials.clone(),
                pod.identity.clone(),
            ));
            let hbone = match Server::from_std(
                listeners.hbone,
                server_credentials,
                Inbound(Arc::clone(&pod)),
                ServerConfig::default(),
            ) {
                Ok(server) => server.serve(),
                Err(error) => {
                    tracing::error!(pod = %name, error = %error_chain(&error), "HBONE server");
                    return;
                }
            };
            let (outbound, inbound) = match (adopt(listeners.outbound), adopt(listeners.inbound)) {
                (Ok(o), Ok(i)) => (o, i),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(pod = %name, %error, "adopting the pod listeners");
                    return;
                }
            };
            tracing::info!(pod = %name, identity = %pod.identity, "pod proxies serving");
            let hbone: ServerHandle = hbone;
            tokio::select! {
                ((), ()) = async {
                    tokio::join!(
                        accept_loop(outbound, Arc::clone(&pod), Pod::outbound),
                        accept_loop(inbound, Arc::clone(&pod), Pod::inbound_plain),
                    )
                } => {}
                _ = drain_rx.wait_for(Option::is_some) => {}
            }
            // The outbound and plaintext listeners are closed now: new connections are
            // refused. Tunnels get GOAWAY and the grace period.
            let grace = (*drain_rx.borrow()).unwrap_or_default();
            let report = hbone.drain(grace).await;
            tracing::info!(pod = %name, ?report, "pod proxies drained");
        });
        Self {
            task: Some(task),
            drain,
        }
    }

    /// Stops accepting and drains the HBONE server within `grace`.
    pub async fn drain(mut self, grace: Duration) {
        self.drain.send_replace(Some(grace));
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A proxied connection forwards bytes as they arrive: without TCP_NODELAY, Nagle's
/// algorithm holds a small write back until the previous one is acknowledged, which a
/// peer delaying its ACK makes 40 ms (an HTTP/2 response's HEADERS and DATA frames
/// often come in separate writes).
fn no_delay(stream: TcpStream) -> io::Result<TcpStream> {
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn adopt(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn accept_loop<F, Fut>(listener: TcpListener, pod: Arc<Pod>, serve: F)
where
    F: Fn(Arc<Pod>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // See `no_delay`.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "setting TCP_NODELAY");
                }
                tokio::spawn(serve(Arc::clone(&pod), stream, peer));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Pod {
    fn labels(&self, reporter: &str) -> TcpLabels {
        TcpLabels {
            reporter: reporter.to_owned(),
            source_workload: "unknown".into(),
            source_principal: "unknown".into(),
            destination_workload: "unknown".into(),
            destination_principal: "unknown".into(),
            destination_service: "unknown".into(),
            connection_security_policy: "none".into(),
        }
    }

    /// Connects to `addr` from the pod with the bypass mark.
    async fn connect_from_pod(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let handle = self.handle.clone();
        let socket = tokio::task::spawn_blocking(move || handle.connect_socket())
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        socket.into_tokio().connect(addr).await.and_then(no_delay)
    }

    /// Connects to the app at `target` in the pod, from `client`'s IP when the
    /// delivery routing is in place.
    async fn connect_app(&self, client: SocketAddr, target: SocketAddr) -> io::Result<TcpStream> {
        let IpAddr::V4(client_ip) = client.ip() else {
            return self.connect_from_pod(target).await;
        };
        if !self.preserve_source || client_ip == self.handle.ip() {
            return self.connect_from_pod(target).await;
        }
        let handle = self.handle.clone();
        let source = SocketAddrV4::new(client_ip, 0);
        let socket = tokio::task::spawn_blocking(move || handle.delivery_socket(source))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        socket.into_tokio().connect(target).await.and_then(no_delay)
    }

    async fn outbound(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let dst = match self.shared.capture.original_dst(&client) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::warn!(%peer, error = %error_chain(&error), "no original destination");
                return;
            }
        };
        let snapshot = self.shared.snapshot.borrow().clone();
        let mut labels = self.labels("source");
        let src_workload = snapshot.workload(self.handle.ip());
        labels.source_workload = metrics::workload(src_workload.map(|w| &**w));
        labels.source_principal = metrics::principal(Some(self.identity.as_str()));
        let (hbone_addr, target, identity) = match snapshot.route(dst) {
            Route::NoEndpoint { service } => {
                tracing::debug!(%dst, service = %service.name, "no healthy endpoint");
                return;
            }
            Route::NoWaypoint { waypoint, reason } => {
                let gateway = waypoint
                    .gateway
                    .map(|g| format!("{}/{}", g.namespace, g.name))
                    .unwrap_or_default();
                tracing::info!(%dst, waypoint = %gateway, reason, "refused: the destination's waypoint cannot be reached");
                return;
            }
            Route::Plain {
                addr,
                workload,
                service,
            } => {
                labels.destination_workload = metrics::workload(workload.as_deref());
                labels.destination_service = metrics::service(service.as_deref());
                let mut upstream = match self.connect_from_pod(addr).await {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::debug!(%addr, %error, "plain connect failed");
                        return;
                    }
                };
                self.shared.metrics.opened(&labels);
                let (to_dst, from_dst) = copy_plain(&mut client, &mut upstream).await;
                self.shared.metrics.closed(&labels, to_dst, from_dst);
                return;
            }
            Route::Hbone {
                hbone_addr,
                target,
                identity,
                workload,
                service,
            } => {
                labels.destination_workload = metrics::workload(Some(&workload));
                labels.destination_service = metrics::service(service.as_deref());
                (hbone_addr, target, identity)
            }
            // Istio's `destination_*` on the source side name the peer actually
            // reached (the waypoint); `destination_service` the Service asked for.
            Route::Waypoint {
                hbone_addr,
                target,
                identity,
                waypoint,
                service,
                workload: _,
            } => {
                labels.destination_workload = metrics::workload(Some(&waypoint));
                labels.destination_service = metrics::service(service.as_deref());
                (hbone_addr, target, identity)
            }
        };
        labels.destination_principal = metrics::principal(Some(identity.as_str()));
        labels.connection_security_policy = "mutual_tls".into();
        let mut request = ConnectRequest::new(self.identity.clone(), identity, hbone_addr, target);
        request.forwarded_for = Some(IpAddr::V4(self.handle.ip()));
        let tunnel = match self.pool.connect(request).await {
            Ok(t) => t,
            Err(error) => {
                tracing::info!(%dst, %target, %hbone_addr, error = %error_chain(&error), "HBONE connect failed");
                return;
            }
        };
        self.shared.metrics.opened(&labels);
        let (moved, result) = ambit_hbone::copy_bidirectional_counted(tunnel, &mut client).await;
        if let Err(error) = result {
            tracing::debug!(%target, error = %error_chain(&error), "outbound copy ended");
        }
        // `sent` is from the client socket into the tunnel.
        self.shared
            .metrics
            .closed(&labels, moved.sent, moved.received);
    }

    /// Checks that traffic to this pod on `port` from `peer` (`None`: plaintext)
    /// may arrive here: when the pod is fronted by waypoints, only from one of them
    /// (fail closed, DESIGN §4). `Ok(true)` when `peer` is such a waypoint.
    fn check_waypoint(
        &self,
        snapshot: &Snapshot,
        port: u16,
        peer: Option<&SpiffeId>,
    ) -> Result<bool, Refusal> {
        let Some(workload) = snapshot.workload(self.handle.ip()) else {
            // Fail closed: an enrolled pod the configuration no longer knows.
            return Err(Refusal::PolicyDenied);
        };
        match snapshot.waypoint_admission(workload, port, peer) {
            WaypointAdmission::NotFronted => Ok(false),
            WaypointAdmission::FromWaypoint => Ok(true),
            WaypointAdmission::Bypass => Err(Refusal::PolicyDenied),
        }
    }

    /// Decides an inbound connection to `target` from `source` (`peer`: the verified
    /// client identity, for HBONE).
    fn authorize(
        &self,
        snapshot: &Snapshot,
        source: SocketAddr,
        target: SocketAddr,
        peer: Option<&SpiffeId>,
    ) -> Result<(), Refusal> {
        let Some(policies) = &snapshot.policies else {
            return Err(Refusal::PolicyDenied);
        };
        let Some(workload) = snapshot.workload(self.handle.ip()) else {
            // Fail closed: an enrolled pod the configuration no longer knows.
            return Err(Refusal::PolicyDenied);
        };
        let wref = workload_ref(workload);
        if peer.is_none() && policies.mtls_mode(&wref, target.port()) == MtlsMode::Strict {
            return Err(Refusal::PolicyDenied);
        }
        let conn = ConnectionAttrs {
            source: peer.map(PeerIdentity::from),
            source_ip: source.ip(),
            destination_ip: target.ip(),
            destination_port: target.port(),
            request: None,
        };
        if policies.authorize_l4(&wref, &conn).is_allowed() {
            Ok(())
        } else {
            Err(Refusal::PolicyDenied)
        }
    }

    /// The labels of an inbound connection to `port` from `client` (`peer`: the
    /// verified identity, for HBONE). `via_waypoint`: the tunnel came from this pod's
    /// waypoint and `client` is the original client it vouches for (`Forwarded`).
    fn inbound_labels(
        &self,
        snapshot: &Snapshot,
        client: IpAddr,
        port: u16,
        peer: Option<&SpiffeId>,
        via_waypoint: bool,
    ) -> TcpLabels {
        let mut labels = self.labels("destination");
        let client_workload = match client {
            IpAddr::V4(ip) => snapshot.workload(ip),
            IpAddr::V6(_) => None,
        };
        labels.source_workload = metrics::workload(client_workload.map(|w| &**w));
        labels.source_principal = match (via_waypoint, client_workload) {
            // The waypoint authenticated the original client on its own inbound.
            (true, Some(w)) if w.captured => metrics::principal(Some(&w.spiffe_id)),
            _ => metrics::principal(peer.map(SpiffeId::as_str)),
        };
        let local = snapshot.workload(self.handle.ip());
        labels.destination_workload = metrics::workload(local.map(|w| &**w));
        labels.destination_principal = metrics::principal(Some(self.identity.as_str()));
        labels.destination_service = metrics::service(
            local
                .and_then(|w| snapshot.service_for_endpoint(w, port))
                .map(|s| &**s),
        );
        labels.connection_security_policy =
            if peer.is_some() { "mutual_tls" } else { "none" }.into();
        labels
    }

    async fn inbound_plain(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let Ok(target) = client.local_addr() else {
            return;
        };
        let snapshot = self.shared.snapshot.borrow().clone();
        if let Err(refusal) = self.check_waypoint(&snapshot, target.port(), None) {
            tracing::info!(%peer, %target, ?refusal, "plaintext inbound refused: the destination is behind a waypoint");
            return;
        }
        if let Err(refusal) = self.authorize(&snapshot, peer, target, None) {
            tracing::info!(%peer, %target, ?refusal, "plaintext inbound refused");
            return;
        }
        let labels = self.inbound_labels(&snapshot, peer.ip(), target.port(), None, false);
        let mut app = match self.connect_app(peer, target).await {
            Ok(s) => s,
            Err(error) => {
                tracing::debug!(%target, %error, "app connect failed");
                return;
            }
        };
        self.shared.metrics.opened(&labels);
        let (to_dst, from_dst) = copy_plain(&mut client, &mut app).await;
        self.shared.metrics.closed(&labels, to_dst, from_dst);
    }
}

/// Relays between two sockets until both directions ended, passing half-closes on;
/// the bytes moved each way (`a` → `b`, `b` → `a`), also when the relay ends with
/// an error (for the byte metrics).
async fn copy_plain(a: &mut TcpStream, b: &mut TcpStream) -> (u64, u64) {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let result = tokio::try_join!(
        copy_counted(&mut a_read, &mut b_write, &mut a_to_b),
        copy_counted(&mut b_read, &mut a_write, &mut b_to_a),
    );
    if let Err(error) = result {
        tracing::debug!(%error, "plain copy ended");
    }
    (a_to_b, b_to_a)
}

/// Copies `reader` to `writer` until EOF, then shuts `writer`'s sending side down;
/// adds every byte written to `count`.
async fn copy_counted<R, W>(reader: &mut R, writer: &mut W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            return match writer.shutdown().await {
                // The peer may be gone already; there is nothing left to tell it.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(()),
            };
        };
        writer.write_all(data).await?;
        *count += n as u64;
    }
}

impl Handler for Inbound {
    type Upstream = AppUpstream;

    async fn handle(&self, request: InboundRequest) -> Result<AppUpstream, Refusal> {
        let pod = &self.0;
        if request.target.ip() != IpAddr::V4(pod.handle.ip()) {
            return Err(Refusal::BadRequest);
        }
        let snapshot = pod.shared.snapshot.borrow().clone();
        let port = request.target.port();
        let via_waypoint = match pod.check_waypoint(&snapshot, port, Some(&request.peer)) {
            Ok(v) => v,
            Err(refusal) => {
                tracing::info!(peer = %request.peer, target = %request.target, "HBONE inbound refused: the destination is behind a waypoint and the peer is not it");
                return Err(refusal);
            }
        };
        // Policy sees the tunnel's peer (for traffic from a waypoint, the waypoint:
        // the original client's identity was checked there, as in Istio ambient).
        let source = request.peer_addr;
        if let Err(refusal) = pod.authorize(&snapshot, source, request.target, Some(&request.peer))
        {
            tracing::info!(peer = %request.peer, target = %request.target, "HBONE inbound denied by policy");
            return Err(refusal);
        }
        // Only this pod's waypoint (verified above) is trusted to name the client.
        let client = match request.forwarded_for {
            Some(ip) if via_waypoint => SocketAddr::new(ip, 0),
            _ => source,
        };
        let labels = pod.inbound_labels(
            &snapshot,
            client.ip(),
            port,
            Some(&request.peer),
            via_waypoint,
        );
        let app = pod
            .connect_app(client, request.target)
            .await
            .map_err(|error| {
                tracing::debug!(target = %request.target, %error, "app connect failed");
                Refusal::UpstreamUnavailable
            })?;
        pod.shared.metrics.opened(&labels);
        Ok(AppUpstream {
            app,
            labels,
            metrics: pod.shared.metrics.clone(),
        })
    }
}

impl Upstream for AppUpstream {
    async fn serve(mut self, stream: ambit_hbone::HboneStream) {
        let (moved, result) = ambit_hbone::copy_bidirectional_counted(stream, &mut self.app).await;
        if let Err(error) = result {
            tracing::debug!(error = %error_chain(&error), "inbound copy ended");
        }
        // `sent` is from the app socket into the tunnel: what the client received.
        self.metrics
            .closed(&self.labels, moved.received, moved.sent);
    }
}

impl Credentials for NodeCredentials {
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        self.certs.current(id)
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.certs
            .trust_bundle()
            .borrow()
            .clone()
            .unwrap_or_else(|| Arc::clone(&self.initial_bundle))
    }
}

impl Dialer for PodDialer {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        let handle = self.0.clone();
        Box::pin(async move {
            let socket = tokio::task::spawn_blocking(move || handle.connect_socket())
                .await
                .map_err(io::Error::other)?
                .map_err(io::Error::other)?;
            socket.into_tokio().connect(addr).await
        })
    }
}
