//! The waypoint assembled: [`build`] subscribes to the controller, starts the
//! certificate manager and binds every listener; [`Bound::wait_termination`] serves
//! until shutdown and drains.
//!
//! Readiness blockers: `config` (synced with the controller, or the last-known-good
//! state loaded from disk) and `certificate` (the waypoint's own certificate held).
//! The HBONE server starts accepting once the certificate is there; its listener is
//! bound before, so the address is known and connections wait in the backlog.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_control_client::discovery::{ConfigState, Subscriber, Subscription, SubscriptionConfig};
use ambit_control_client::{CaClientConfig, CertManager, TokenSource};
use ambit_hbone::{Credentials, Dialer, ServerHandle};
use ambit_identity::{SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate};
use ambit_runtime::admin::{self, Route, respond};
use ambit_runtime::readiness::{Blocker, Readiness};
use ambit_runtime::{AdminArgs, AdminServers, DrainArgs, LogArgs};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::inbound::{DataPlane, DataPlaneOptions};
use crate::mirror::{MirrorMetrics, MirrorOptions};
use crate::otlp::{self, OtlpConfig, OtlpExporter, OtlpMetrics};
use crate::rng::SharedRng;
use crate::router::RouterOptions;
use crate::snapshot::{ObjectName, Snapshot, SnapshotShared, error_chain, validate};
use crate::telemetry::{RequestMetrics, TelemetryLayer};

/// Waypoint configuration; every flag also reads an environment variable.
#[derive(Clone, Debug, clap::Parser, serde::Serialize)]
#[command(name = "ambit-waypoint", version, about = "Ambit waypoint (L7 proxy)")]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Name of the waypoint (its Gateway object; also its service account).
    #[arg(long, env = "WAYPOINT_NAME")]
    pub name: String,
    /// Namespace of the waypoint's Gateway.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Controller gRPC address (config stream and certificate authority).
    #[arg(
        long,
        env = "CONTROLLER_ADDR",
        default_value = "http://127.0.0.1:15012"
    )]
    pub controller_addr: String,
    /// File holding the waypoint's bearer token for the controller (read on every use).
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// State directory: the last-known-good config and the certificate cache.
    #[arg(
        long,
        env = "AMBIT_STATE_DIR",
        default_value = "/var/lib/ambit/waypoint"
    )]
    pub state_dir: PathBuf,
    /// The mesh's trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// HBONE listener (mutual TLS, HTTP/2 CONNECT).
    #[arg(long, env = "HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Prometheus metrics address (`/metrics`).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// `SO_MARK` for every connection the waypoint opens (endpoints, controller).
    /// Sidecar L7 runs the engine inside a captured pod: its sockets carry the
    /// sidecar's bypass mark (`0x539`) so that capture leaves them alone.
    #[arg(long, env = "AMBIT_SOCKET_MARK")]
    pub socket_mark: Option<u32>,
    /// How long to wait for a client's first bytes on a port of unknown protocol
    /// before proxying it as TCP.
    #[arg(long, env = "PROTOCOL_DETECT_TIMEOUT", default_value = "1s", value_parser = ambit_runtime::parse_duration)]
    #[serde(serialize_with = "duration_text")]
    pub protocol_detect_timeout: Duration,
    /// OTLP/HTTP (JSON) traces URL, e.g. `http://otel-collector:4318/v1/traces`: export
    /// the span of each request whose trace is sampled. Unset: read
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` and append `/v1/traces`; if that is unset too,
    /// nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces (requests without a `traceparent`) the waypoint starts
    /// sampled; traces it continues keep their caller's decision.
    #[arg(long, env = "AMBIT_TRACE_SAMPLING", default_value_t = 0.0, value_parser = parse_percent)]
    pub trace_sampling: f64,
    #[command(flatten)]
    #[serde(skip)]
    pub admin: AdminArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub drain: DrainArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub log: LogArgs,
}

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `--controller-addr` is not a URI.
    #[error("invalid controller address {addr:?}")]
    ControllerAddr {
        /// The flag's value.
        addr: String,
        /// The parse error.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// `--trust-domain` is invalid.
    #[error("invalid trust domain {domain:?}")]
    TrustDomain {
        /// The flag's value.
        domain: String,
        /// Why.
        #[source]
        source: ambit_identity::spiffe::TrustDomainError,
    },
    /// `--namespace`/`--name` do not make a SPIFFE identity.
    #[error("no valid identity for waypoint {namespace}/{name}")]
    Identity {
        /// The Gateway's namespace.
        namespace: String,
        /// The Gateway's name.
        name: String,
        /// Why.
        #[source]
        source: ambit_identity::SpiffeIdError,
    },
    /// The certificate cache could not be opened.
    #[error("opening the certificate cache")]
    CertCache(#[source] ambit_control_client::certs::CertCacheError),
    /// The HBONE listener could not be bound.
    #[error("binding the HBONE listener on {addr}")]
    Hbone {
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// The OTLP endpoint is unusable.
    #[error("configuring the OTLP exporter")]
    Otlp(#[source] crate::otlp::OtlpError),
    /// The admin, readiness or metrics server could not bind.
    #[error("starting the admin servers")]
    Admin(#[source] ambit_runtime::admin::AdminError),
}

/// The waypoint with every listener bound and every task started.
pub struct Bound {
    admin: AdminServers,
    metrics: admin::Serving,
    metrics_addr: SocketAddr,
    hbone_addr: SocketAddr,
    hbone: Arc<Mutex<Option<ServerHandle>>>,
    subscription: Arc<Subscription>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// [`Credentials`] from the [`CertManager`].
struct WaypointCredentials {
    certs: CertManager,
    initial_bundle: Arc<TrustBundle>,
}

/// Starts the waypoint: config subscription, certificates, HBONE, admin and metrics
/// servers. Returns once everything is bound; readiness follows as the configuration
/// and the certificate come in.
pub async fn build(config: Config) -> Result<Bound, BuildError> {
    // Several components build TLS configs from the process default.
    let _ = rustls::crypto::CryptoProvider::install_default(
        ambit_identity::tls::crypto_provider().as_ref().clone(),
    );
    let controller: http::Uri =
        config
            .controller_addr
            .parse()
            .map_err(|source| BuildError::ControllerAddr {
                addr: config.controller_addr.clone(),
                source,
            })?;
    let trust_domain =
        TrustDomain::new(&config.trust_domain).map_err(|source| BuildError::TrustDomain {
            domain: config.trust_domain.clone(),
            source,
        })?;
    let identity =
        SpiffeId::new(&trust_domain, &config.namespace, &config.name).map_err(|source| {
            BuildError::Identity {
                namespace: config.namespace.clone(),
                name: config.name.clone(),
                source,
            }
        })?;
    let gateway = ObjectName::new(&config.namespace, &config.name);
    let token = TokenSource::File(config.token_file.clone());

    let readiness = Readiness::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let request_metrics = RequestMetrics::register(&mut registry);
    let mirror_metrics = MirrorMetrics::register(&mut registry);
    let mut telemetry =
        TelemetryLayer::new(request_metrics).with_trace_sampling(config.trace_sampling);
    let base_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
    if let Some(endpoint) =
        otlp::traces_endpoint(config.otlp_endpoint.as_deref(), base_endpoint.as_deref())
    {
        let exporter = OtlpExporter::spawn(
            OtlpConfig::new(
                endpoint.clone(),
                config.namespace.clone(),
                config.name.clone(),
            ),
            OtlpMetrics::register(&mut registry),
        )
        .map_err(BuildError::Otlp)?;
        tracing::info!(%endpoint, sampling = config.trace_sampling, "exporting request spans over OTLP");
        telemetry = telemetry.with_otlp(exporter);
    }
    let registry = Arc::new(registry);
    let metrics_route = {
        let registry = Arc::clone(&registry);
        Route::new("/metrics", move || {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => respond(
                    http::StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => respond(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding metrics: {e}\n"),
                ),
            }
        })
    };
    let metrics = admin::bind(config.metrics_addr, readiness.clone(), vec![metrics_route])
        .await
        .map_err(BuildError::Admin)?;
    let config_blocker = readiness.register("config");
    let cert_blocker = readiness.register("certificate");

    let mut sub_config = SubscriptionConfig::new(
        controller.clone(),
        token.clone(),
        Subscriber::Waypoint {
            namespace: config.namespace.clone(),
            name: config.name.clone(),
            spiffe_id: identity.clone(),
        },
    );
    sub_config.state_file = Some(config.state_dir.join("config-state.json"));
    sub_config.socket_mark = config.socket_mark;
    let validator_gateway = gateway.clone();
    let (subscription, state) =
        Subscription::spawn(sub_config, move |p| validate(&validator_gateway, p));
    subscription.unblock_when_ready(config_blocker);

    let mut ca_config = CaClientConfig::new(controller, token);
    ca_config.cache_dir = Some(config.state_dir.join("certs"));
    ca_config.socket_mark = config.socket_mark;
    let certs = CertManager::new(ca_config, trust_domain).map_err(BuildError::CertCache)?;

    let shared = SnapshotShared::new(SharedRng::from_os());
    let initial = snapshot_of(&gateway, &state.borrow(), &shared)
        .unwrap_or_else(|| Snapshot::empty(gateway.clone(), shared.clone()));
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(initial));

    let listener =
        std::net::TcpListener::bind(config.hbone_addr).map_err(|source| BuildError::Hbone {
            addr: config.hbone_addr,
            source,
        })?;
    let hbone_addr = listener.local_addr().map_err(|source| BuildError::Hbone {
        addr: config.hbone_addr,
        source,
    })?;

    let hbone: Arc<Mutex<Option<ServerHandle>>> = Arc::default();
    let options = DataPlaneOptions {
        detect_timeout: config.protocol_detect_timeout,
        telemetry,
        router: RouterOptions {
            mirror: MirrorOptions {
                metrics: mirror_metrics,
                ..MirrorOptions::default()
            },
            ..RouterOptions::default()
        },
        ..DataPlaneOptions::default()
    };
    let tasks = vec![
        tokio::spawn(snapshot_loop(
            gateway.clone(),
            state.clone(),
            snapshot_tx,
            shared,
        )),
        tokio::spawn(start_hbone(
            certs.clone(),
            identity.clone(),
            snapshot.clone(),
            listener,
            options,
            config
                .socket_mark
                .map(|mark| Arc::new(MarkedDialer { mark }) as Arc<dyn Dialer>),
            Arc::clone(&hbone),
            cert_blocker,
        )),
    ];

    let subscription = Arc::new(subscription);
    let metrics_addr = metrics.local_addr();
    let dump = {
        let subscription = Arc::clone(&subscription);
        let flags = config.clone();
        let certs = certs.clone();
        let identity = identity.clone();
        Route::json("/config_dump", move || {
            let state = state.borrow().clone();
            serde_json::json!({
                "config": &flags,
                "listeners": {"hbone": hbone_addr, "metrics": metrics_addr},
                "identity": identity.to_string(),
                "configVersion": state.version,
                "configSource": state.source,
                "snapshot": snapshot.borrow().dump(),
                "certificates": certs.snapshot(),
                "subscription": subscription.status(),
            })
        })
    };
    let admin = AdminServers::start(&config.admin, &readiness, vec![dump])
        .await
        .map_err(BuildError::Admin)?;

    tracing::info!(%metrics_addr, %hbone_addr, %identity, "waypoint bound");
    Ok(Bound {
        admin,
        metrics: metrics.serve(),
        metrics_addr,
        hbone_addr,
        hbone,
        subscription,
        tasks,
        drain_timeout: config.drain.drain_timeout,
    })
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("admin", &self.admin)
            .field("hbone_addr", &self.hbone_addr)
            .finish_non_exhaustive()
    }
}

impl Bound {
    /// The readiness server's address.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.admin.readiness_addr
    }

    /// The admin server's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.admin_addr
    }

    /// The metrics server's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The HBONE listener's address.
    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone_addr
    }

    /// Serves until `shutdown` completes, then drains within the drain timeout: the
    /// HBONE server stops accepting and sends GOAWAY; tunnels get the rest of the
    /// deadline to finish.
    pub async fn wait_termination(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down");
        let Self {
            admin,
            metrics,
            metrics_addr: _,
            hbone_addr: _,
            hbone,
            subscription,
            tasks,
            drain_timeout,
        } = self;
        for task in &tasks {
            task.abort();
        }
        let server = hbone.lock().unwrap_or_else(PoisonError::into_inner).take();
        let drain = async move {
            if let Some(server) = server {
                let report = server.drain(drain_timeout).await;
                tracing::info!(?report, "HBONE drained");
            }
            admin.shutdown().await;
            metrics.shutdown().await;
            if let Ok(subscription) = Arc::try_unwrap(subscription) {
                subscription.shutdown().await;
            }
        };
        ambit_runtime::drain_with_deadline(drain_timeout, drain).await;
    }
}

/// Gets the waypoint's certificate (retried by the certificate manager until the CA
/// answers), then starts the HBONE server and clears the `certificate` blocker.
#[expect(
    clippy::too_many_arguments,
    reason = "the start-up state handed to one task"
)]
async fn start_hbone(
    certs: CertManager,
    identity: SpiffeId,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    listener: std::net::TcpListener,
    options: DataPlaneOptions,
    dialer: Option<Arc<dyn Dialer>>,
    slot: Arc<Mutex<Option<ServerHandle>>>,
    blocker: Blocker,
) {
    if let Err(error) = certs.fetch(&identity).await {
        tracing::warn!(%identity, error = %error_chain(&error), "no certificate yet; retrying");
    }
    let cert = certs.wait_current(&identity).await;
    tracing::info!(%identity, not_after = ?cert.not_after(), "certificate held");
    let mut bundle = certs.trust_bundle();
    let initial_bundle = match bundle.wait_for(Option::is_some).await.as_deref() {
        Ok(Some(b)) => Arc::clone(b),
        _ => return,
    };
    let credentials: Arc<dyn Credentials> = Arc::new(WaypointCredentials {
        certs,
        initial_bundle,
    });
    let plane = DataPlane::new(identity, credentials, snapshot, dialer, options);
    match plane.serve(listener) {
        Ok(handle) => {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
            blocker.unblock();
        }
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "HBONE server could not start");
        }
    }
}

/// Rebuilds the snapshot on every configuration change. The state was validated
/// with the same build, so a failure here means a state file of another version:
/// the previous snapshot stays.
async fn snapshot_loop(
    gateway: ObjectName,
    mut state: watch::Receiver<Arc<ConfigState>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    shared: SnapshotShared,
) {
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        if let Some(s) = snapshot_of(&gateway, &current, &shared) {
            s.prune_shared_state();
            tracing::info!(
                generation = current.generation,
                version = current.version,
                "configuration applied"
            );
            snapshot.send_replace(Arc::new(s));
        }
    }
}

fn snapshot_of(
    gateway: &ObjectName,
    state: &ConfigState,
    shared: &SnapshotShared,
) -> Option<Snapshot> {
    match Snapshot::build(
        gateway.clone(),
        state.resources.values().map(|r| &**r),
        state.generation,
        shared,
    ) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::error!(%error, "configuration does not build; keeping the previous one");
            None
        }
    }
}

/// A percentage, 0 to 100.
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} is not a percentage between 0 and 100"))
    }
}

fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

impl Credentials for WaypointCredentials {
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

/// Dials endpoints from sockets carrying `SO_MARK` `mark` (`--socket-mark`).
#[derive(Clone, Copy, Debug)]
struct MarkedDialer {
    mark: u32,
}

impl Dialer for MarkedDialer {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    > {
        let mark = self.mark;
        Box::pin(async move {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
            socket.connect(addr).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_sampling_is_a_percentage() {
        assert_eq!(parse_percent("1").unwrap(), 1.0);
        assert_eq!(parse_percent("12.5%").unwrap(), 12.5);
        assert_eq!(parse_percent("100").unwrap(), 100.0);
        assert!(parse_percent("101").unwrap_err().contains("\"101\""));
        assert!(parse_percent("-1").is_err());
        assert!(parse_percent("NaN").is_err());
        assert!(parse_percent("lots").unwrap_err().contains("lots"));
    }
}
