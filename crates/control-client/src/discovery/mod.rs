//! The config subscription: one task per proxy that keeps a `ConfigDiscovery.Subscribe`
//! stream open to the controller (`proto/ambit/config/v1/discovery.proto` is the
//! protocol) and publishes the applied state on a `watch`.
//!
//! Life of a [`Subscription`]:
//! 1. On spawn, the state file (if configured) is loaded, checked and validated; a
//!    usable last-known-good state is published at once with
//!    [`StateSource::FromDisk`], so a proxy restarted while the controller is down
//!    serves on it. A missing file is normal; an unusable one is logged (error) and
//!    shown in [`SubscriptionStatus::state_file_load`], and the proxy starts empty —
//!    never a crash.
//! 2. Connect (bearer token re-read each time), send `Hello` with the subscriber and
//!    `resource_versions` of everything held (resume: the controller answers with a
//!    delta against exactly that set, or a full snapshot).
//! 3. Each update is applied to a copy ([`ProposedState`]); the built-in checks (known
//!    kind, well-formed key matching the content, no duplicates) and then the
//!    proxy's validator run on it. Accepted: publish, `Ack`, persist. Refused: `Nack`
//!    with the reasons, keep the previous state.
//! 4. When the stream fails or ends, reconnect with [`Backoff`] (reset once a stream
//!    delivered an update) and resume from the state held.

mod persist;
mod state;
mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_api::config::v1::{NodeSubscriber, WaypointSubscriber, hello};
use ambit_identity::SpiffeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Uri;

use crate::backoff::Backoff;
use crate::token::TokenSource;

pub use persist::{LoadStateError, SaveStateError};
pub use state::{ConfigState, ProposedState, Rejection, StateSource};

/// The proxy's check of a proposed state (e.g. every resource converts into its own
/// model); an `Err` is sent back as the `Nack`.
pub type Validator = dyn Fn(&ProposedState) -> Result<(), Rejection> + Send + Sync;

/// Who subscribes: decides which resources the controller sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscriber {
    /// A node daemon.
    Node {
        /// The Kubernetes Node name.
        node_name: String,
    },
    /// A waypoint.
    Waypoint {
        /// The Gateway's namespace.
        namespace: String,
        /// The Gateway's name.
        name: String,
        /// The waypoint's own identity (informational for the controller).
        spiffe_id: SpiffeId,
    },
}

/// What [`Subscription::spawn`] needs.
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// The controller's gRPC address (`http://ambit-controller.ambit-system:15012`).
    pub controller: Uri,
    /// The bearer credential, read again for every connection.
    pub token: TokenSource,
    /// Who is subscribing.
    pub subscriber: Subscriber,
    /// Where the last-known-good state is persisted (`None`: not persisted).
    pub state_file: Option<PathBuf>,
    /// This proxy's build version (`Hello.proxy_version`, shown by `ambitctl
    /// proxy-status`).
    pub proxy_version: String,
    /// Delays between reconnects.
    pub backoff: Backoff,
    /// Time allowed to connect and open the stream.
    pub connect_timeout: Duration,
    /// `SO_MARK` of the connections to the controller (`None`: unmarked). A proxy
    /// running inside a captured pod (the sidecar) marks them so that its own capture
    /// lets them through.
    pub socket_mark: Option<u32>,
}

/// Counters for the proxy's metrics. Monotonic; read with [`Self::snapshot`].
#[derive(Debug, Default)]
pub struct SubscriptionCounters {
    streams_opened: AtomicU64,
    reconnects: AtomicU64,
    updates_received: AtomicU64,
    updates_applied: AtomicU64,
    nacks: AtomicU64,
    persist_failures: AtomicU64,
}

/// The counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterSnapshot {
    /// Streams successfully opened.
    pub streams_opened: u64,
    /// Connection attempts after a failure or a closed stream.
    pub reconnects: u64,
    /// Updates received.
    pub updates_received: u64,
    /// Updates ACKed.
    pub updates_applied: u64,
    /// Updates NACKed.
    pub nacks: u64,
    /// Failed writes of the state file.
    pub persist_failures: u64,
}

/// What became of the state file at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum StateFileLoad {
    /// No state file configured.
    Disabled,
    /// Configured but absent (first start).
    Missing,
    /// Loaded and published.
    Loaded {
        /// Resources in it.
        resources: usize,
        /// The version it was ACKed at.
        version: u64,
    },
    /// Present but unusable; the proxy started empty.
    Failed {
        /// Why, with its causes.
        error: String,
    },
}

/// A refused update.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NackStatus {
    /// The update's version.
    pub version: u64,
    /// The summary sent.
    pub error: String,
    /// Per-resource reasons sent.
    pub resource_errors: BTreeMap<String, String>,
}

/// The subscription as `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// The controller address.
    pub controller: String,
    /// `node/<name>` or `waypoint/<namespace>/<name>`.
    pub subscriber: String,
    /// Whether a stream is open now.
    pub connected: bool,
    /// The replica that sent the last update.
    pub controller_id: String,
    /// The last connection or stream failure (kept after reconnecting).
    pub last_error: Option<String>,
    /// The last refused update.
    pub last_nack: Option<NackStatus>,
    /// The state file, if any.
    pub state_file: Option<PathBuf>,
    /// What happened to it at start.
    pub state_file_load: StateFileLoad,
    /// `ConfigState::generation` of the last state written to it (0: none).
    pub persisted_generation: u64,
    /// The last failure to write it (cleared by the next success).
    pub last_persist_error: Option<String>,
    /// The counters.
    pub counters: CounterSnapshot,
}

/// The running subscription. Dropping it stops the task; the state receivers keep
/// the last state.
pub struct Subscription {
    shared: Arc<Shared>,
    state: watch::Receiver<Arc<ConfigState>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// State shared between the handle and the task.
struct Shared {
    status: Mutex<SubscriptionStatus>,
    counters: Arc<SubscriptionCounters>,
}

impl Subscriber {
    /// `node/<name>` or `waypoint/<namespace>/<name>` (how the controller names
    /// subscribers too).
    pub fn label(&self) -> String {
        self.to_string()
    }

    pub(crate) fn to_proto(&self) -> hello::Subscriber {
        match self {
            Subscriber::Node { node_name } => hello::Subscriber::Node(NodeSubscriber {
                node_name: node_name.clone(),
            }),
            Subscriber::Waypoint {
                namespace,
                name,
                spiffe_id,
            } => hello::Subscriber::Waypoint(WaypointSubscriber {
                namespace: namespace.clone(),
                name: name.clone(),
                spiffe_id: spiffe_id.to_string(),
            }),
        }
    }
}

impl fmt::Display for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subscriber::Node { node_name } => write!(f, "node/{node_name}"),
            Subscriber::Waypoint {
                namespace, name, ..
            } => write!(f, "waypoint/{namespace}/{name}"),
        }
    }
}

impl SubscriptionConfig {
    /// A config with defaults: no state file, this build's version, [`Backoff`]'s
    /// default, [`crate::DEFAULT_CONNECT_TIMEOUT`].
    pub fn new(controller: Uri, token: impl Into<TokenSource>, subscriber: Subscriber) -> Self {
        Self {
            controller,
            token: token.into(),
            subscriber,
            state_file: None,
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            backoff: Backoff::default(),
            connect_timeout: crate::DEFAULT_CONNECT_TIMEOUT,
            socket_mark: None,
        }
    }
}

impl SubscriptionCounters {
    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            streams_opened: get(&self.streams_opened),
            reconnects: get(&self.reconnects),
            updates_received: get(&self.updates_received),
            updates_applied: get(&self.updates_applied),
            nacks: get(&self.nacks),
            persist_failures: get(&self.persist_failures),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Subscription {
    /// Loads the last-known-good state (if configured), publishes it, and starts the
    /// subscriber task. Must be called inside a tokio runtime. The state file is
    /// read synchronously, so the returned receiver already holds it.
    ///
    /// `validator` sees every proposed state (and the state loaded from disk) after
    /// the built-in checks; its `Err` becomes the `Nack`.
    pub fn spawn<V>(
        config: SubscriptionConfig,
        validator: V,
    ) -> (Self, watch::Receiver<Arc<ConfigState>>)
    where
        V: Fn(&ProposedState) -> Result<(), Rejection> + Send + Sync + 'static,
    {
        let validator: Arc<Validator> = Arc::new(validator);
        let (initial, load) = worker::load_initial(&config, &*validator);
        let shared = Arc::new(Shared {
            status: Mutex::new(SubscriptionStatus {
                controller: config.controller.to_string(),
                subscriber: config.subscriber.label(),
                connected: false,
                controller_id: String::new(),
                last_error: None,
                last_nack: None,
                state_file: config.state_file.clone(),
                state_file_load: load,
                persisted_generation: 0,
                last_persist_error: None,
                counters: CounterSnapshot::default(),
            }),
            counters: Arc::new(SubscriptionCounters::default()),
        });
        let (state_tx, state_rx) = watch::channel(Arc::new(initial));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            worker::Worker::new(config, validator, shared.clone(), state_tx, stop_rx).run(),
        );
        let handle = Self {
            shared,
            state: state_rx.clone(),
            stop: stop_tx,
            task: Some(task),
        };
        (handle, state_rx)
    }

    /// Another receiver of the published state.
    pub fn state(&self) -> watch::Receiver<Arc<ConfigState>> {
        self.state.clone()
    }

    /// The subscription's status (for `/config_dump`).
    pub fn status(&self) -> SubscriptionStatus {
        let mut status = self.shared.lock_status().clone();
        status.counters = self.shared.counters.snapshot();
        status
    }

    /// The counters, to export as metrics.
    pub fn counters(&self) -> Arc<SubscriptionCounters> {
        self.shared.counters.clone()
    }

    /// Waits until the state is usable ([`ConfigState::is_ready`]): synced with the
    /// controller, or loaded from disk.
    pub async fn wait_ready(&self) {
        let mut state = self.state.clone();
        // Err only when the task is gone, which happens only after `shutdown`.
        let _ = state.wait_for(|s| s.is_ready()).await;
    }

    /// Drops `blocker` (the proxy's "config" readiness blocker) once the state is
    /// usable.
    pub fn unblock_when_ready(&self, blocker: ambit_runtime::readiness::Blocker) {
        let mut state = self.state.clone();
        tokio::spawn(async move {
            if state.wait_for(|s| s.is_ready()).await.is_ok() {
                blocker.unblock();
            }
        });
    }

    /// Stops the task and waits for it (an ongoing state-file write completes).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("status", &*self.shared.lock_status())
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Shared {
    fn lock_status(&self) -> std::sync::MutexGuard<'_, SubscriptionStatus> {
        // Plain data updated field by field: consistent even after a panic elsewhere.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_status(&self, f: impl FnOnce(&mut SubscriptionStatus)) {
        f(&mut self.lock_status());
    }
}
