//! The controller, assembled: config source → index → push server and CA over gRPC,
//! admin endpoints, graceful drain.
//!
//! "Bind first, then serve": [`build`] reads the configuration, loads (or generates)
//! the CA root, starts the config source and the index, and binds every listener;
//! [`Bound`] reports the addresses (port 0 works in tests); [`Bound::serve`] starts
//! serving and [`Serving::wait_termination`] waits for a signal and drains with the
//! configured deadline. [`bind`] is the same assembly over any config view, for tests
//! with in-test views.
//!
//! Readiness (`/healthz/ready`) has one blocker, the initial sync of the config
//! source; nothing is pushed and no certificate is signed before it clears. The
//! readiness listener (`0.0.0.0:15021` by default) also serves `/metrics`; the admin
//! listener (loopback) serves `/metrics` and `/config_dump`.

use std::{
    any::Any,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ambit_identity::{
    CertificateAuthority, DEFAULT_ROOT_VALIDITY, TrustDomain,
    ca::{CaError, PersistError},
    spiffe::TrustDomainError,
};
use ambit_runtime::{
    AdminArgs, DrainArgs, LogArgs,
    admin::{self, Route},
    readiness::Readiness,
};
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    auth::{Authenticator, BootstrapTokens, TokenReviewAuthenticator, TokensError},
    ca::CaServer,
    index::{IndexConfig, spawn_index},
    metrics::{self, Metrics},
    model::NamespaceName,
    push::{PushServer, Subscribers},
    source::SourceEvent,
    validate::{StatusEntry, ValidationContext},
    view::{ConfigView, IdentityAuthority},
    world::World,
};

/// How often a missing `--config-dir` is looked for again.
const CONFIG_DIR_POLL: Duration = Duration::from_secs(1);

/// Controller configuration; every flag also reads an environment variable.
#[derive(Clone, Debug, clap::Parser, Serialize)]
#[command(name = "ambit-controller", version, about = "Ambit controller")]
pub struct Config {
    /// Local mode: read Kubernetes YAML from this directory instead of an API server.
    #[arg(long, env = "AMBIT_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Address of the gRPC server (config push and certificate authority).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of issued workload certificates; also the most a caller may ask for.
    #[arg(long, env = "CERT_TTL", default_value = "24h", value_parser = ambit_runtime::parse_duration)]
    #[serde(serialize_with = "duration_text")]
    pub cert_ttl: Duration,
    /// Where the generated root CA and other state are persisted (local mode).
    #[arg(
        long,
        env = "AMBIT_STATE_DIR",
        default_value = "/var/lib/ambit/controller"
    )]
    pub state_dir: PathBuf,
    /// Local mode: YAML/JSON file of per-node and per-waypoint bootstrap tokens,
    /// `{tokens: [{token, node} | {token, waypoint: NAMESPACE/NAME}]}` (re-read when it
    /// changes). Without it every proxy is refused.
    #[arg(long, env = "AMBIT_BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Operator-supplied CA certificate chain (PEM: signing certificate first, root
    /// last). With --ca-key; otherwise a root is generated and persisted.
    #[arg(long, env = "AMBIT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, env = "AMBIT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[arg(long, env = "ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Kubernetes mode: the audience projected ServiceAccount tokens must carry.
    #[arg(long, env = "AMBIT_TOKEN_AUDIENCE", default_value = "ambit-ca")]
    pub token_audience: String,
    /// Kubernetes mode: NAMESPACE/NAME of the node daemon's service account.
    #[arg(
        long,
        env = "AMBIT_NODE_SERVICE_ACCOUNT",
        default_value = "ambit-system/ambit-node"
    )]
    pub node_service_account: String,
    /// Kubernetes mode without --ca-cert: NAMESPACE/NAME of the Secret holding the
    /// generated root (created on first start, shared by every replica).
    #[arg(
        long,
        env = "AMBIT_CA_SECRET",
        default_value = "ambit-system/ambit-ca-root"
    )]
    pub ca_secret: String,
    /// Name of this replica in every config update (logs, proxy status) and in the
    /// status-writing Lease.
    #[arg(long, env = "POD_NAME", default_value = "ambit-controller")]
    pub controller_id: String,
    /// Kubernetes mode: the controller's own namespace, where the Lease that elects
    /// the one replica writing status conditions lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambit-system")]
    pub controller_namespace: String,
    /// Kubernetes mode: container image of the `ambit-waypoint` Deployments the
    /// controller creates for waypoint Gateways.
    #[arg(long, env = "AMBIT_WAYPOINT_IMAGE", default_value = crate::waypoint_deploy::DEFAULT_WAYPOINT_IMAGE)]
    pub waypoint_image: String,
    /// Kubernetes mode: the controller's gRPC address as waypoint pods reach it;
    /// default `http://ambit-controller.<--controller-namespace>.svc:<port of
    /// --grpc-addr>` (the chart's Service).
    #[arg(long, env = "AMBIT_WAYPOINT_CONTROLLER_ADDR")]
    pub waypoint_controller_addr: Option<String>,
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

/// What the assembly needs from the config index besides the push and CA views.
pub trait ServedConfig: ConfigView + IdentityAuthority {
    /// Whether every source has delivered its initial state.
    fn synced(&self) -> bool;
    /// One entry per object read, for `/config_dump` and the resources metric.
    fn statuses(&self) -> Vec<StatusEntry>;
}

/// What [`bind`] serves: the index's generations, the CA, the authenticator, and
/// whatever must live as long as the controller (source handles, tasks).
pub struct Parts<W> {
    /// The index's generations.
    pub worlds: watch::Receiver<Arc<W>>,
    /// The signing CA.
    pub ca: Arc<CertificateAuthority>,
    /// Who callers are.
    pub authenticator: Arc<dyn Authenticator>,
    /// Kept alive while serving; tasks among them are aborted on shutdown.
    pub keep_alive: Vec<Box<dyn Any + Send + Sync>>,
    /// Background tasks (sources, index); aborted on shutdown.
    pub tasks: Vec<JoinHandle<()>>,
    /// Shown under `mode` in `/config_dump`.
    pub mode: &'static str,
}

impl<W> std::fmt::Debug for Parts<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("ca", &self.ca)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Building the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `--trust-domain` is not a valid trust domain.
    #[error("--trust-domain {value:?}")]
    TrustDomain {
        /// The value given.
        value: String,
        /// Why it is invalid.
        #[source]
        source: TrustDomainError,
    },
    /// `--cert-ttl` is zero.
    #[error("--cert-ttl must be positive")]
    ZeroTtl,
    /// A flag that must be `NAMESPACE/NAME` is not.
    #[error("{flag} {value:?} must be NAMESPACE/NAME")]
    NamespacedName {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
    },
    /// The CA root could not be read from or stored in its Secret.
    #[error("the CA root Secret (--ca-secret)")]
    CaSecret(#[source] Box<crate::ca::SecretCaError>),
    /// Reading `--ca-cert` or `--ca-key` failed.
    #[error("reading {flag} {}", path.display())]
    CaFile {
        /// Which flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operator-supplied CA is unusable.
    #[error("loading the CA from --ca-cert/--ca-key")]
    CaLoad(#[source] Box<CaError>),
    /// The persisted CA could not be loaded or generated.
    #[error("loading or generating the CA in {}", dir.display())]
    CaState {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<PersistError>,
    },
    /// `--bootstrap-tokens` is unusable.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// A waypoint deployment flag is unusable.
    #[error("{flag} {value:?}: {reason}")]
    Waypoint {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The Kubernetes client could not be built.
    #[error("Kubernetes mode (no --config-dir given)")]
    Kube(#[source] crate::source::kube::ClientFromEnvError),
    /// The config source could not be started.
    #[error("starting the config source")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A listener could not be bound.
    #[error("binding the gRPC server to {addr}")]
    BindGrpc {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An admin listener could not be bound.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
}

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server stopped with an error.
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    /// The gRPC server task panicked.
    #[error("gRPC server task")]
    GrpcTask(#[source] tokio::task::JoinError),
}

/// Every listener bound, nothing served yet.
pub struct Bound {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    readiness: admin::Bound,
    admin: admin::Bound,
    router: tonic::transport::server::Router,
    push_stop: Box<dyn Fn() + Send + Sync>,
    drain_timeout: Duration,
    subscribers: Subscribers,
    ready: Readiness,
    keep_alive: Vec<Box<dyn Any + Send + Sync>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A running controller.
pub struct Serving {
    grpc_addr: SocketAddr,
    readiness_addr: SocketAddr,
    admin_addr: SocketAddr,
    grpc_stop: oneshot::Sender<()>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    readiness: admin::Serving,
    admin: admin::Serving,
    push_stop: Box<dyn Fn() + Send + Sync>,
    drain_timeout: Duration,
    subscribers: Subscribers,
    ready: Readiness,
    _keep_alive: Vec<Box<dyn Any + Send + Sync>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("grpc_addr", &self.grpc_addr)
            .field("readiness_addr", &self.readiness.local_addr())
            .field("admin_addr", &self.admin.local_addr())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("grpc_addr", &self.grpc_addr)
            .field("readiness_addr", &self.readiness_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// The `/config_dump` document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Dump<'a> {
    /// The effective configuration (flags and environment).
    config: &'a Config,
    /// `local` or `kubernetes`.
    mode: &'static str,
    listeners: Listeners,
    /// Whether every source has delivered its initial state.
    synced: bool,
    /// Generation of the config index.
    generation: u64,
    ca: CaDump,
    resources: Vec<StatusEntry>,
    subscribers: Vec<crate::push::SubscriberStatus>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Listeners {
    grpc: SocketAddr,
    readiness: SocketAddr,
    admin: SocketAddr,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CaDump {
    trust_domain: String,
    /// Seconds since the Unix epoch.
    not_after_unix: u64,
    roots: usize,
    source: String,
}

impl ServedConfig for World {
    fn synced(&self) -> bool {
        World::synced(self)
    }

    fn statuses(&self) -> Vec<StatusEntry> {
        World::statuses(self)
    }
}

/// Where the objects come from.
enum SourceMode {
    /// `--config-dir`.
    Local(PathBuf),
    /// The Kubernetes API.
    Kubernetes(kube::Client),
}

/// Builds the controller from its configuration: CA, authenticator, config source
/// (local directory with `--config-dir`, else the Kubernetes API) and index, then
/// [`bind`].
pub async fn build(config: &Config) -> Result<Bound, BuildError> {
    let trust_domain = trust_domain(config)?;
    let source = match &config.config_dir {
        Some(dir) => SourceMode::Local(dir.clone()),
        None => SourceMode::Kubernetes(
            crate::source::kube::client_from_env()
                .await
                .map_err(BuildError::Kube)?,
        ),
    };
    let ca = match (&source, &config.ca_cert) {
        (SourceMode::Kubernetes(client), None) => {
            let (ns, name) = namespaced_name("--ca-secret", &config.ca_secret)?;
            crate::ca::load_or_create_in_secret(
                client.clone(),
                ns,
                name,
                &config.state_dir,
                trust_domain.clone(),
                DEFAULT_ROOT_VALIDITY,
            )
            .await
            .map_err(|e| BuildError::CaSecret(Box::new(e)))?
        }
        _ => load_ca(config)?,
    };
    let ca = Arc::new(ca);
    tracing::info!(
        trust_domain = %ca.trust_domain(),
        source = ca_source(config),
        "certificate authority loaded"
    );
    let (events_tx, events_rx) = tokio::sync::mpsc::channel::<SourceEvent>(1024);
    let worlds = spawn_index(
        IndexConfig {
            validation: ValidationContext {
                root_namespace: NamespaceName::new(config.root_namespace.clone()),
            },
            trust_domain,
            trust_bundle_pem: ca.trust_bundle().roots_pem().to_vec(),
            sources: 1,
        },
        events_rx,
    );
    let mut keep_alive: Vec<Box<dyn Any + Send + Sync>> = Vec::new();
    let mut tasks = Vec::new();
    let (mode, authenticator) = match source {
        SourceMode::Local(dir) => {
            if dir.exists() {
                let source = crate::source::local::spawn_local_source(dir.clone(), events_tx)
                    .map_err(|e| BuildError::Source(Box::new(e)))?;
                keep_alive.push(Box::new(source));
            } else {
                tasks.push(tokio::spawn(wait_for_config_dir(dir.clone(), events_tx)));
            }
            ("local", authenticator(config).await?)
        }
        SourceMode::Kubernetes(client) => {
            tasks.push(tokio::spawn({
                let client = client.clone();
                async move {
                    if let Err(e) = crate::source::kube::run_kube_source(client, events_tx).await {
                        tracing::error!(error = %error_chain(&e), "the Kubernetes source stopped");
                    }
                }
            }));
            // Every replica serves config; only the Lease holder writes status and
            // the waypoints' objects, so replicas never fight over them.
            tasks.push(tokio::spawn(crate::waypoint_deploy::run_elected(
                client.clone(),
                worlds.clone(),
                waypoint_deploy_config(config)?,
                crate::status::StatusWriterConfig::default(),
                crate::status::LeaseConfig::new(
                    config.controller_namespace.clone(),
                    config.controller_id.clone(),
                ),
            )));
            ("kubernetes", kube_authenticator(config, client)?)
        }
    };
    bind(
        config,
        Parts {
            worlds,
            ca,
            authenticator,
            keep_alive,
            tasks,
            mode,
        },
    )
    .await
}

/// Waits for a missing config directory to appear, then starts the local source on
/// it (until then the controller stays not ready).
async fn wait_for_config_dir(dir: PathBuf, events: tokio::sync::mpsc::Sender<SourceEvent>) {
    tracing::warn!(dir = %dir.display(), "config directory does not exist (yet); waiting for it");
    loop {
        tokio::time::sleep(CONFIG_DIR_POLL).await;
        if events.is_closed() {
            return;
        }
        if !dir.exists() {
            continue;
        }
        match crate::source::local::spawn_local_source(dir.clone(), events.clone()) {
            Ok(source) => {
                // The source runs until the index (the receiver) is gone.
                let _source = source;
                events.closed().await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "starting the local source; retrying");
            }
        }
    }
}

/// Reads the configuration's CA: operator-supplied, or generated once and persisted
/// in the state directory (local mode; Kubernetes mode keeps it in a Secret, see
/// [`build`]).
pub fn load_ca(config: &Config) -> Result<CertificateAuthority, BuildError> {
    let trust_domain = trust_domain(config)?;
    match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |flag, path: &PathBuf| {
                std::fs::read_to_string(path).map_err(|source| BuildError::CaFile {
                    flag,
                    path: path.clone(),
                    source,
                })
            };
            let cert_pem = read("--ca-cert", cert)?;
            let key_pem = zeroize::Zeroizing::new(read("--ca-key", key)?);
            CertificateAuthority::from_pem(trust_domain, &cert_pem, &key_pem)
                .map_err(|e| BuildError::CaLoad(Box::new(e)))
        }
        // clap's `requires` rules out one without the other; a Config built in code
        // with only one falls back to the persisted CA like neither.
        _ => CertificateAuthority::load_or_generate(
            &config.state_dir,
            trust_domain,
            DEFAULT_ROOT_VALIDITY,
        )
        .map_err(|source| BuildError::CaState {
            dir: config.state_dir.clone(),
            source: Box::new(source),
        }),
    }
}

/// `NAMESPACE/NAME` of a flag.
fn namespaced_name<'a>(
    flag: &'static str,
    value: &'a str,
) -> Result<(&'a str, &'a str), BuildError> {
    value
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| BuildError::NamespacedName {
            flag,
            value: value.to_owned(),
        })
}

/// Where the CA root comes from, for logs and the dump.
fn ca_source(config: &Config) -> String {
    match (&config.ca_cert, &config.config_dir) {
        (Some(path), _) => format!("operator-supplied ({})", path.display()),
        (None, Some(_)) => format!("persisted in {}", config.state_dir.display()),
        (None, None) => format!("persisted in Secret {}", config.ca_secret),
    }
}

fn trust_domain(config: &Config) -> Result<TrustDomain, BuildError> {
    TrustDomain::new(&config.trust_domain).map_err(|source| BuildError::TrustDomain {
        value: config.trust_domain.clone(),
        source,
    })
}

/// The local-mode authenticator: the bootstrap tokens, or nobody.
pub async fn authenticator(config: &Config) -> Result<Arc<dyn Authenticator>, BuildError> {
    Ok(match &config.bootstrap_tokens {
        Some(path) => {
            let tokens = BootstrapTokens::from_file(path)?;
            tracing::info!(path = %path.display(), tokens = tokens.len(), "bootstrap tokens loaded");
            Arc::new(tokens)
        }
        None => {
            tracing::warn!(
                "no --bootstrap-tokens: every config subscriber and CA caller will be refused"
            );
            Arc::new(BootstrapTokens::none())
        }
    })
}

/// What the waypoint deployer puts in waypoint Deployments (Kubernetes mode).
pub fn waypoint_deploy_config(
    config: &Config,
) -> Result<crate::waypoint_deploy::WaypointDeployConfig, BuildError> {
    let image = config.waypoint_image.trim();
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Err(BuildError::Waypoint {
            flag: "--waypoint-image",
            value: config.waypoint_image.clone(),
            reason: "must be a container image reference",
        });
    }
    let controller_addr = match &config.waypoint_controller_addr {
        Some(addr) => {
            let uri: Option<http::Uri> = addr.parse().ok();
            let usable = uri.is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !usable {
                return Err(BuildError::Waypoint {
                    flag: "--waypoint-controller-addr",
                    value: addr.clone(),
                    reason: "must be an http:// or https:// URL with a host",
                });
            }
            addr.clone()
        }
        None => format!(
            "http://ambit-controller.{}.svc:{}",
            config.controller_namespace,
            config.grpc_addr.port()
        ),
    };
    Ok(crate::waypoint_deploy::WaypointDeployConfig::new(
        image,
        controller_addr,
        config.trust_domain.clone(),
        config.token_audience.clone(),
    ))
}

/// The Kubernetes-mode authenticator: TokenReview of projected tokens.
fn kube_authenticator(
    config: &Config,
    client: kube::Client,
) -> Result<Arc<dyn Authenticator>, BuildError> {
    let (ns, name) = namespaced_name("--node-service-account", &config.node_service_account)?;
    Ok(Arc::new(TokenReviewAuthenticator::new(
        client,
        vec![config.token_audience.clone()],
        (ns.to_owned(), name.to_owned()),
    )))
}

/// Binds every listener and wires push, CA, readiness, metrics and the admin dump
/// over `parts`.
pub async fn bind<W: ServedConfig>(config: &Config, parts: Parts<W>) -> Result<Bound, BuildError> {
    if config.cert_ttl.is_zero() {
        return Err(BuildError::ZeroTtl);
    }
    let Parts {
        worlds,
        ca,
        authenticator,
        keep_alive,
        mut tasks,
        mode,
    } = parts;
    let mut registry = Metrics::registry();
    let metrics = Metrics::new(&mut registry);
    let ready = Readiness::new();

    // The push server and the CA see nothing until the sources have synced.
    let (gated_tx, gated_rx) = watch::channel(None);
    let blocker = ready.register("initial sync of the config source");
    tasks.push(tokio::spawn(follow_index(
        worlds.clone(),
        gated_tx,
        blocker,
        metrics.clone(),
    )));

    let push = PushServer::new(
        gated_rx.clone(),
        authenticator.clone(),
        metrics.clone(),
        config.controller_id.clone(),
    );
    let subscribers = push.subscribers();
    let push_stop = {
        let push = push.clone();
        Box::new(move || push.stop_streams())
    };
    let ca_server = CaServer::new(
        gated_rx,
        ca.clone(),
        authenticator,
        config.cert_ttl,
        metrics,
    );
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(push.into_service())
        .add_service(ca_server.into_service());

    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| BuildError::BindGrpc {
            addr: config.grpc_addr,
            source,
        })?;
    let grpc_addr = grpc.local_addr().map_err(|source| BuildError::BindGrpc {
        addr: config.grpc_addr,
        source,
    })?;
    // The dump shows the bound addresses, known once the admin listener is bound.
    let listeners = Arc::new(std::sync::OnceLock::new());
    let ca_dump = CaDump {
        trust_domain: ca.trust_domain().as_str().to_owned(),
        not_after_unix: ca
            .not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        roots: ca.trust_bundle().roots_pem().len(),
        source: ca_source(config),
    };
    let routes = admin_routes(
        config.clone(),
        mode,
        worlds,
        subscribers.clone(),
        registry,
        listeners.clone(),
        ca_dump,
    );
    // `/metrics` is on the readiness listener too: that one is reachable from outside
    // the pod (the admin listener stays on loopback).
    let metrics_only: Vec<Route> = routes
        .iter()
        .filter(|r| r.path == "/metrics")
        .cloned()
        .collect();
    let readiness = admin::bind(config.admin.readiness_addr, ready.clone(), metrics_only).await?;
    let mut routes = routes;
    routes.push(ambit_runtime::logging::route());
    let admin = admin::bind(config.admin.admin_addr, ready.clone(), routes).await?;
    let _ = listeners.set(Listeners {
        grpc: grpc_addr,
        readiness: readiness.local_addr(),
        admin: admin.local_addr(),
    });
    tracing::info!(
        %grpc_addr,
        readiness_addr = %readiness.local_addr(),
        admin_addr = %admin.local_addr(),
        mode,
        "controller listeners bound"
    );
    Ok(Bound {
        grpc,
        grpc_addr,
        readiness,
        admin,
        router,
        push_stop,
        drain_timeout: config.drain.drain_timeout,
        subscribers,
        ready,
        keep_alive,
        tasks,
    })
}

/// Follows the index: metrics on every generation; readiness and the gated view once
/// synced.
async fn follow_index<W: ServedConfig>(
    mut worlds: watch::Receiver<Arc<W>>,
    gated: watch::Sender<Option<Arc<W>>>,
    blocker: ambit_runtime::readiness::Blocker,
    metrics: Metrics,
) {
    let mut blocker = Some(blocker);
    loop {
        let world = worlds.borrow_and_update().clone();
        metrics
            .generation
            .set(i64::try_from(world.generation()).unwrap_or(i64::MAX));
        let statuses = world.statuses();
        metrics.set_resources(statuses.iter().map(|s| s.status));
        if world.synced() {
            if let Some(b) = blocker.take() {
                let rejected = statuses.iter().filter(|s| s.status == "Rejected").count();
                tracing::info!(
                    generation = world.generation(),
                    objects = statuses.len(),
                    rejected,
                    "config source synced; serving config and certificates"
                );
                b.unblock();
            }
            gated.send_replace(Some(world));
        }
        if worlds.changed().await.is_err() {
            tracing::warn!("the config index stopped");
            return;
        }
    }
}

fn admin_routes<W: ServedConfig>(
    config: Config,
    mode: &'static str,
    worlds: watch::Receiver<Arc<W>>,
    subscribers: Subscribers,
    registry: prometheus_client::registry::Registry,
    listeners: Arc<std::sync::OnceLock<Listeners>>,
    ca: CaDump,
) -> Vec<Route> {
    let metrics_route = Route::new("/metrics", move || {
        admin::respond(
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::encode(&registry),
        )
    });
    let dump_route = Route::new("/config_dump", move || {
        let world = worlds.borrow().clone();
        let dump = Dump {
            config: &config,
            mode,
            listeners: listeners.get().cloned().unwrap_or(Listeners {
                grpc: config.grpc_addr,
                readiness: config.admin.readiness_addr,
                admin: config.admin.admin_addr,
            }),
            synced: world.synced(),
            generation: world.generation(),
            ca: ca.clone(),
            resources: world.statuses(),
            subscribers: subscribers.list(),
        };
        match serde_json::to_vec_pretty(&dump) {
            Ok(body) => admin::respond(http::StatusCode::OK, "application/json", body),
            Err(e) => admin::respond(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("serializing /config_dump: {e}\n"),
            ),
        }
    });
    vec![metrics_route, dump_route]
}

impl Bound {
    /// Address of the gRPC server (push and CA).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Address of `/healthz/ready`.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness.local_addr()
    }

    /// Address of the admin server (`/config_dump`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Starts serving every listener.
    pub fn serve(self) -> Serving {
        let Bound {
            grpc,
            grpc_addr,
            readiness,
            admin,
            router,
            push_stop,
            drain_timeout,
            subscribers,
            ready,
            keep_alive,
            tasks,
        } = self;
        let (readiness_addr, admin_addr) = (readiness.local_addr(), admin.local_addr());
        let (grpc_stop, stopped) = oneshot::channel::<()>();
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(
            TcpListenerStream::new(grpc),
            async move {
                let _ = stopped.await;
            },
        ));
        Serving {
            grpc_addr,
            readiness_addr,
            admin_addr,
            grpc_stop,
            grpc,
            readiness: readiness.serve(),
            admin: admin.serve(),
            push_stop,
            drain_timeout,
            subscribers,
            ready,
            _keep_alive: keep_alive,
            tasks,
        }
    }
}

impl Serving {
    /// Address of the gRPC server (push and CA).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Address of `/healthz/ready`.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    /// Address of the admin server (`/config_dump`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The config streams, as the admin dump shows them.
    pub fn subscribers(&self) -> &Subscribers {
        &self.subscribers
    }

    /// The readiness blockers.
    pub fn readiness(&self) -> &Readiness {
        &self.ready
    }

    /// Serves until `shutdown` resolves (or the gRPC server fails), then drains.
    pub async fn wait_termination<F: Future>(mut self, shutdown: F) -> Result<(), ServeError> {
        let failed = tokio::select! {
            _ = shutdown => None,
            res = &mut self.grpc => Some(match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ServeError::Grpc(e)),
                Err(e) => Err(ServeError::GrpcTask(e)),
            }),
        };
        match failed {
            None => {
                self.shutdown().await;
                Ok(())
            }
            Some(result) => {
                self.stop_rest().await;
                result
            }
        }
    }

    /// Drains: ends the config streams (the proxies reconnect elsewhere and resume),
    /// lets in-flight CA calls finish, stops the listeners; all within the drain
    /// deadline.
    pub async fn shutdown(self) {
        let deadline = self.drain_timeout;
        ambit_runtime::drain_with_deadline(deadline, async move {
            (self.push_stop)();
            let _ = self.grpc_stop.send(());
            let grpc = self.grpc;
            match grpc.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "gRPC server ended with an error")
                }
                Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
            }
            self.readiness.shutdown().await;
            self.admin.shutdown().await;
            for t in self.tasks {
                t.abort();
            }
        })
        .await;
    }

    async fn stop_rest(self) {
        (self.push_stop)();
        self.readiness.shutdown().await;
        self.admin.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

/// An error with its causes, `outer: inner: innermost` (for logs and gRPC messages).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
