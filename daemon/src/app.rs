//! The daemon assembled: [`build`] binds and serves the readiness, admin and metrics
//! listeners first, then starts capture, the config subscription, the certificate
//! manager and the enrolment server; [`Bound::wait_termination`] serves until
//! shutdown and drains.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ambit_api::ResourceKind;
use ambit_api::config::v1::resource::Kind;
use ambit_control_client::discovery::{
    ConfigState, ProposedState, Rejection, Subscriber, Subscription, SubscriptionConfig,
};
use ambit_control_client::{CaClientConfig, CertManager, TokenSource};
use ambit_identity::{SpiffeId, TrustDomain};
use ambit_policy::wire::ProxyPolicies;
use ambit_runtime::admin::{self, Route, respond};
use ambit_runtime::readiness::{Blocker, Readiness};
use ambit_runtime::{AdminArgs, AdminServers, DrainArgs, LogArgs};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::capture::{Capture, CaptureConfig};
use crate::enroll::{EnrollConfig, EnrollServer};
use crate::metrics::TcpMetrics;
use crate::pods::{Pods, error_chain};
use crate::proxy::ProxyShared;
use crate::proxy::snapshot::Snapshot;
use crate::sidecar::{Mode, SidecarArgs, SidecarError, SidecarPod};

/// Node daemon configuration; every flag also reads an environment variable.
#[derive(Clone, Debug, clap::Parser, serde::Serialize)]
#[command(name = "ambit-node", version, about = "Ambit node daemon")]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Where the proxies run: `ambient`, one daemon per node serving the node's
    /// enrolled pods; `sidecar`, this process inside one pod serving only that pod
    /// (see the `sidecar` module).
    #[arg(long, env = "AMBIT_MODE", value_enum, default_value_t = Mode::Ambient)]
    pub mode: Mode,
    /// Name of the node this daemon (or sidecar's pod) runs on (the Kubernetes node
    /// name); the config subscription is the node's.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Controller gRPC address (config stream and certificate authority).
    #[arg(
        long,
        env = "CONTROLLER_ADDR",
        default_value = "http://127.0.0.1:15012"
    )]
    pub controller_addr: String,
    /// File holding the node's bearer token for the controller (read on every use).
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// State directory: the bpffs mount `bpf/`, the config state file, the cert cache
    /// [default: /var/lib/ambit/node; sidecar: /var/lib/ambit/sidecar/<ns>_<pod>].
    #[arg(long, env = "AMBIT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Ambient mode (required there): the node's pods cgroup subtree, where the
    /// connect programs attach.
    #[arg(long, env = "AMBIT_PODS_CGROUP")]
    pub pods_cgroup: Option<PathBuf>,
    /// Ambient mode: the enrolment socket the `ambit-cni` plugin connects to.
    #[arg(
        long,
        env = "AMBIT_CNI_SOCKET",
        default_value = "/var/run/ambit/cni.sock"
    )]
    pub cni_socket: PathBuf,
    /// The mesh's trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Prometheus metrics address (`/metrics`).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Sidecar mode: the pod served.
    #[command(flatten)]
    pub sidecar: SidecarArgs,
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

/// The state directory of ambient mode unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ambit/node";

/// Why the daemon could not start.
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
    /// A flag is missing or conflicts with the mode.
    #[error("{0}")]
    Flags(String),
    /// Sidecar mode: the pod flags are incomplete or the process is not in the pod.
    #[error("sidecar mode")]
    Sidecar(#[source] SidecarError),
    /// Sidecar mode: the pod could not be recorded.
    #[error("sidecar mode: recording the pod")]
    SidecarPod(#[source] Box<crate::enroll::EnrollError>),
    /// Capture could not be installed.
    #[error("starting capture")]
    Capture(#[source] crate::capture::CaptureError),
    /// The capture task panicked.
    #[error("the capture start-up task failed")]
    CaptureTask(#[source] tokio::task::JoinError),
    /// The certificate cache could not be opened.
    #[error("opening the certificate cache")]
    CertCache(#[source] ambit_control_client::certs::CertCacheError),
    /// The enrolment server could not start.
    #[error("starting the enrolment server")]
    Enroll(#[source] crate::enroll::EnrollServerError),
    /// The admin or readiness server could not bind.
    #[error("starting the admin servers")]
    Admin(#[source] ambit_runtime::admin::AdminError),
}

/// The daemon with every listener bound and every task started.
pub struct Bound {
    admin: AdminServers,
    metrics: admin::Serving,
    metrics_addr: SocketAddr,
    enroll: Option<EnrollServer>,
    subscription: Arc<Subscription>,
    pods: Arc<Pods>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// Validates a proposed configuration: every security policy converts, every
/// workload and service parses. An error NACKs the update.
pub fn validate(proposed: &ProposedState) -> Result<(), Rejection> {
    let mut errors = BTreeMap::new();
    for (key, resource) in &proposed.resources {
        if !proposed.is_full_snapshot && !proposed.upserted.contains(key) {
            continue;
        }
        let problem = match &resource.kind {
            Some(Kind::Workload(w)) => {
                let bad = w
                    .addresses
                    .iter()
                    .find(|a| a.parse::<std::net::IpAddr>().is_err());
                if let Some(a) = bad {
                    Some(format!("invalid address {a:?}"))
                } else if w.captured {
                    SpiffeId::parse(&w.spiffe_id)
                        .err()
                        .map(|e| format!("invalid identity {:?}: {e}", w.spiffe_id))
                } else {
                    None
                }
            }
            Some(Kind::Service(s)) => s
                .vips
                .iter()
                .find(|v| v.parse::<std::net::IpAddr>().is_err())
                .map(|v| format!("invalid VIP {v:?}")),
            Some(Kind::Authorization(_) | Kind::PeerAuthentication(_)) => {
                ProxyPolicies::from_resources([&**resource])
                    .err()
                    .map(|e| error_chain(&e))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            errors.insert(key.clone(), problem);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Rejection::from_resource_errors(errors))
    }
}

/// Starts the daemon: admin servers first (readiness lists what is awaited meanwhile),
/// then capture, config subscription, certificates and the enrolment server. Returns
/// once everything is bound; readiness follows as the configuration, certificates and
/// capture come up. On error, the servers started are stopped again.
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

    let placement = Placement::resolve(&config)?;

    let readiness = Readiness::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let tcp_metrics = TcpMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let metrics_route = Route::new("/metrics", move || {
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
    });
    let blockers = Blockers {
        config: readiness.register("config"),
        certs: readiness.register("certificates"),
        capture: readiness.register("capture"),
        pod: match placement {
            Placement::Sidecar(..) => Some(readiness.register("pod")),
            Placement::Ambient { .. } => None,
        },
    };

    // Bind, then serve: readiness answers (listing the blockers) while capture and the
    // rest start; `/config_dump` shows the flags until then.
    let sources: Arc<OnceLock<DumpSources>> = Arc::default();
    let dump = dump_route(config.clone(), Arc::clone(&sources));
    let metrics = admin::bind(config.metrics_addr, readiness.clone(), vec![metrics_route])
        .await
        .map_err(BuildError::Admin)?;
    let admin = AdminServers::start(&config.admin, &readiness, vec![dump])
        .await
        .map_err(BuildError::Admin)?;
    let metrics_addr = metrics.local_addr();
    let metrics = metrics.serve();
    tracing::info!(%metrics_addr, "metrics listening");

    let started = start(
        &config,
        placement,
        controller,
        trust_domain,
        tcp_metrics,
        blockers,
        &sources,
    )
    .await;
    match started {
        Ok(Started {
            enroll,
            subscription,
            pods,
            tasks,
        }) => Ok(Bound {
            admin,
            metrics,
            metrics_addr,
            enroll,
            subscription,
            pods,
            tasks,
            drain_timeout: config.drain.drain_timeout,
        }),
        Err(e) => {
            admin.shutdown().await;
            metrics.shutdown().await;
            Err(e)
        }
    }
}

/// The readiness blockers the daemon clears as it comes up.
struct Blockers {
    config: Blocker,
    certs: Blocker,
    capture: Blocker,
    /// Sidecar mode: the pod is captured and served.
    pod: Option<Blocker>,
}

/// Where the proxies run, resolved from the flags.
#[derive(Debug)]
enum Placement {
    /// The node's pods, handed over by the CNI plugin.
    Ambient {
        pods_cgroup: PathBuf,
        state_dir: PathBuf,
    },
    /// One pod, from inside it.
    Sidecar(SidecarPod, PathBuf),
}

impl Placement {
    /// Checks the flags against the mode.
    fn resolve(config: &Config) -> Result<Self, BuildError> {
        match config.mode {
            Mode::Ambient => {
                let pods_cgroup = config.pods_cgroup.clone().ok_or_else(|| {
                    BuildError::Flags(
                        "--mode ambient needs --pods-cgroup (or $AMBIT_PODS_CGROUP)".to_owned(),
                    )
                })?;
                let state_dir = config
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
                Ok(Self::Ambient {
                    pods_cgroup,
                    state_dir,
                })
            }
            Mode::Sidecar => {
                if config.pods_cgroup.is_some() {
                    return Err(BuildError::Flags(
                        "--pods-cgroup is for --mode ambient; a sidecar attaches to its pod's \
                         cgroup (--pod-cgroup)"
                            .to_owned(),
                    ));
                }
                let pod = crate::sidecar::resolve(&config.sidecar).map_err(BuildError::Sidecar)?;
                let state_dir = config
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| pod.default_state_dir());
                Ok(Self::Sidecar(pod, state_dir))
            }
        }
    }

    fn state_dir(&self) -> &Path {
        match self {
            Self::Ambient { state_dir, .. } | Self::Sidecar(_, state_dir) => state_dir,
        }
    }
}

/// What `/config_dump` reads, once started.
struct DumpSources {
    state: watch::Receiver<Arc<ConfigState>>,
    pods: Arc<Pods>,
    subscription: Arc<Subscription>,
    capture: Arc<Capture>,
    certs: CertManager,
}

/// What [`start`] brings up.
struct Started {
    enroll: Option<EnrollServer>,
    subscription: Arc<Subscription>,
    pods: Arc<Pods>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts capture, the config subscription, the certificates, the pods and the
/// enrolment server.
async fn start(
    config: &Config,
    placement: Placement,
    controller: http::Uri,
    trust_domain: TrustDomain,
    tcp_metrics: TcpMetrics,
    blockers: Blockers,
    sources: &OnceLock<DumpSources>,
) -> Result<Started, BuildError> {
    let token = TokenSource::File(config.token_file.clone());
    let state_dir = placement.state_dir().to_path_buf();
    let capture_config = match &placement {
        Placement::Ambient { pods_cgroup, .. } => CaptureConfig::new(&state_dir, pods_cgroup),
        Placement::Sidecar(pod, _) => {
            let mut c = CaptureConfig::new(&state_dir, &pod.cgroup);
            c.exclusions = crate::sidecar::own_port_exclusions(&[
                config.admin.readiness_addr,
                config.metrics_addr,
            ]);
            c.exclusions
                .inbound_ports
                .extend(config.sidecar.exclude_inbound_ports.iter().copied());
            c
        }
    };
    // A sidecar captures the cgroup it runs in: its own connections to the controller
    // carry the bypass mark like every other socket of its proxies.
    let socket_mark = match &placement {
        Placement::Sidecar(..) => Some(capture_config.bypass_mark.get()),
        Placement::Ambient { .. } => None,
    };
    let capture = tokio::task::spawn_blocking(move || Capture::start(capture_config))
        .await
        .map_err(BuildError::CaptureTask)?
        .map_err(BuildError::Capture)?;
    let capture = Arc::new(capture);

    let mut sub_config = SubscriptionConfig::new(
        controller.clone(),
        token.clone(),
        Subscriber::Node {
            node_name: config.node_name.clone(),
        },
    );
    sub_config.state_file = Some(state_dir.join("config-state.json"));
    sub_config.socket_mark = socket_mark;
    let (subscription, state) = Subscription::spawn(sub_config, validate);
    subscription.unblock_when_ready(blockers.config);
    let subscription = Arc::new(subscription);

    let mut ca_config = CaClientConfig::new(controller, token);
    ca_config.cache_dir = Some(state_dir.join("certs"));
    ca_config.socket_mark = socket_mark;
    let certs = CertManager::new(ca_config, trust_domain).map_err(BuildError::CertCache)?;

    let enroll_config = EnrollConfig::new(&config.cni_socket);
    // Answer before the server's handler timeout, with our own reason.
    let membership_wait = enroll_config
        .handler_timeout
        .saturating_sub(Duration::from_secs(1));
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::new(&state.borrow())));
    let proxy = ProxyShared {
        capture: Arc::clone(&capture),
        certs: certs.clone(),
        snapshot,
        metrics: tcp_metrics,
    };
    let pods = Arc::new(Pods::new(
        Arc::clone(&capture),
        certs.clone(),
        state.clone(),
        proxy,
        membership_wait,
    ));
    let resumed = pods.resume_persisted().await;
    tracing::info!(resumed, "capture started");
    if let Placement::Sidecar(pod, _) = &placement {
        pods.add_own_pod(pod.pod.clone(), pod.netns.clone(), pod.ip)
            .await
            .map_err(|e| BuildError::SidecarPod(Box::new(e)))?;
        tracing::info!(pod = %pod.pod, ip = %pod.ip, cgroup = %pod.cgroup.display(), "sidecar serving one pod");
    }
    blockers.capture.unblock();

    let (reconciled_tx, reconciled) = watch::channel(0u64);
    let mut tasks = vec![
        tokio::spawn(snapshot_loop(state.clone(), snapshot_tx)),
        tokio::spawn(reconcile_loop(
            Arc::clone(&pods),
            state.clone(),
            reconciled_tx,
        )),
        tokio::spawn(certified_blocker(
            Arc::clone(&pods),
            certs.clone(),
            state.clone(),
            blockers.certs,
        )),
    ];
    let enroll = match &placement {
        Placement::Sidecar(pod, _) => {
            if let Some(blocker) = blockers.pod {
                tasks.push(tokio::spawn(crate::sidecar::serving_blocker(
                    Arc::clone(&pods),
                    certs.clone(),
                    reconciled,
                    pod.ip,
                    blocker,
                )));
            }
            None
        }
        Placement::Ambient { .. } => {
            match EnrollServer::bind(enroll_config, Arc::clone(&pods)).await {
                Ok(enroll) => Some(enroll),
                Err(e) => {
                    for task in &tasks {
                        task.abort();
                    }
                    return Err(BuildError::Enroll(e));
                }
            }
        }
    };
    let _ = sources.set(DumpSources {
        state,
        pods: Arc::clone(&pods),
        subscription: Arc::clone(&subscription),
        capture,
        certs,
    });
    Ok(Started {
        enroll,
        subscription,
        pods,
        tasks,
    })
}

/// `/config_dump`: the flags, and once started the configuration, pods, certificates,
/// capture and subscription.
fn dump_route(flags: Config, sources: Arc<OnceLock<DumpSources>>) -> Route {
    Route::json("/config_dump", move || {
        let Some(s) = sources.get() else {
            return serde_json::json!({ "config": &flags, "starting": true });
        };
        let state = s.state.borrow().clone();
        let count = |kind| state.of_kind(kind).count();
        serde_json::json!({
            "config": &flags,
            "workloads": count(ResourceKind::Workload),
            "services": count(ResourceKind::Service),
            "authorizations": count(ResourceKind::Authorization),
            "peerAuthentications": count(ResourceKind::PeerAuthentication),
            "configVersion": state.version,
            "pods": s.pods.dump(),
            "nodePods": s.pods.node_pods_dump(),
            "certificates": s.certs.snapshot(),
            "capture": s.capture.status().map_err(|e| error_chain(&e)),
            "subscription": s.subscription.status(),
        })
    })
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("admin", &self.admin)
            .field("pods", &self.pods)
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

    /// The local pods.
    pub fn pods(&self) -> &Arc<Pods> {
        &self.pods
    }

    /// Serves until `shutdown` completes, then drains within the drain timeout.
    /// Capture stays installed: enrolled pods are refused (never plaintext) until the
    /// next daemon resumes them.
    pub async fn wait_termination(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down");
        let Self {
            admin,
            metrics,
            metrics_addr: _,
            enroll,
            subscription,
            pods,
            tasks,
            drain_timeout,
        } = self;
        for task in &tasks {
            task.abort();
        }
        let drain = async move {
            if let Some(enroll) = enroll {
                enroll.shutdown().await;
            }
            pods.drain(drain_timeout).await;
            admin.shutdown().await;
            metrics.shutdown().await;
            if let Ok(subscription) = Arc::try_unwrap(subscription) {
                subscription.shutdown().await;
            }
            drop(pods);
        };
        ambit_runtime::drain_with_deadline(drain_timeout, drain).await;
    }
}

/// Re-indexes the configuration for the proxies on every change: new connections see
/// policy changes at once.
async fn snapshot_loop(
    mut state: watch::Receiver<Arc<ambit_control_client::discovery::ConfigState>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
) {
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        snapshot.send_replace(Arc::new(Snapshot::new(&current)));
    }
}

/// Applies every configuration to the pods; counts the reconciles on `reconciled`.
async fn reconcile_loop(
    pods: Arc<Pods>,
    mut state: tokio::sync::watch::Receiver<Arc<ambit_control_client::discovery::ConfigState>>,
    reconciled: watch::Sender<u64>,
) {
    loop {
        let current = state.borrow_and_update().clone();
        pods.reconcile(&current).await;
        reconciled.send_modify(|n| *n += 1);
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Clears the "certificates" blocker once the configuration is ready and every local
/// pod's identity has a valid certificate.
async fn certified_blocker(
    pods: Arc<Pods>,
    certs: CertManager,
    mut state: tokio::sync::watch::Receiver<Arc<ambit_control_client::discovery::ConfigState>>,
    blocker: ambit_runtime::readiness::Blocker,
) {
    let mut changes = certs.changes();
    loop {
        if state.borrow().is_ready() && pods.all_certified() {
            blocker.unblock();
            return;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = state.changed() => if r.is_err() { return },
            // Identities are learnt by the reconcile loop after a state change.
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use ambit_api::config::v1::{Resource, Service, Workload};
    use ambit_control_client::discovery::StateSource;

    use super::*;

    fn proposed(kinds: Vec<Kind>) -> ProposedState {
        let resources: BTreeMap<String, Arc<Resource>> = kinds
            .into_iter()
            .map(|k| {
                let r = Resource::new(k);
                (r.key.clone(), Arc::new(r))
            })
            .collect();
        ProposedState {
            upserted: resources.keys().cloned().collect::<BTreeSet<_>>(),
            resources,
            removed: BTreeSet::new(),
            version: 1,
            is_full_snapshot: true,
            source: StateSource::FromController,
        }
    }

    fn flags(args: &[&str]) -> Config {
        use clap::Parser as _;
        let base = ["ambit-node", "--node-name", "node-1", "--token-file", "/t"];
        Config::try_parse_from(base.iter().chain(args)).unwrap()
    }

    #[test]
    fn the_mode_decides_which_flags_are_needed() {
        let ambient = flags(&["--pods-cgroup", "/sys/fs/cgroup/pods"]);
        assert_eq!(ambient.mode, Mode::Ambient);
        let Placement::Ambient { state_dir, .. } = Placement::resolve(&ambient).unwrap() else {
            panic!("not ambient");
        };
        assert_eq!(state_dir, Path::new(DEFAULT_STATE_DIR));

        let err = Placement::resolve(&flags(&[])).unwrap_err().to_string();
        assert!(err.contains("--pods-cgroup"), "{err}");

        let sidecar = flags(&[
            "--mode",
            "sidecar",
            "--pod-name",
            "checkout-0",
            "--pod-namespace",
            "production",
            "--pod-ip",
            "10.244.1.2",
            "--pods-cgroup",
            "/sys/fs/cgroup/pods",
        ]);
        assert_eq!(sidecar.mode, Mode::Sidecar);
        let err = Placement::resolve(&sidecar).unwrap_err().to_string();
        assert!(err.contains("--pods-cgroup is for --mode ambient"), "{err}");
    }

    #[test]
    fn validator_accepts_good_config_and_nacks_unparseable_resources() {
        let good = Kind::Workload(Workload {
            uid: "u1".into(),
            name: "a".into(),
            namespace: "ns".into(),
            addresses: vec!["10.0.0.1".into()],
            spiffe_id: "spiffe://cluster.local/ns/ns/sa/a".into(),
            captured: true,
            ..Default::default()
        });
        assert!(validate(&proposed(vec![good.clone()])).is_ok());

        let bad_ip = Kind::Workload(Workload {
            uid: "u2".into(),
            addresses: vec!["not-an-ip".into()],
            ..Default::default()
        });
        let bad_vip = Kind::Service(Service {
            name: "s".into(),
            namespace: "ns".into(),
            vips: vec!["10.0.0.300".into()],
            ..Default::default()
        });
        let bad_id = Kind::Workload(Workload {
            uid: "u3".into(),
            spiffe_id: "nope".into(),
            captured: true,
            ..Default::default()
        });
        let err = validate(&proposed(vec![good, bad_ip, bad_vip, bad_id])).unwrap_err();
        assert_eq!(
            err.resource_errors.keys().cloned().collect::<Vec<_>>(),
            ["Service/ns/s", "Workload/u2", "Workload/u3"],
            "{err:?}"
        );
    }
}
