//! The mesh on the simulated cluster: `ambit-controller` in local mode in the control
//! namespace, reading the cluster's config directory, with bootstrap tokens provisioned
//! for every node; and, with [`MeshOptions::daemons`], the data plane: in
//! [`DataPlaneMode::Ambient`] one `ambit-node` per node, in [`DataPlaneMode::Sidecar`]
//! one `ambit-node --mode sidecar` inside every meshed pod.
//!
//! ```text
//! <state dir>/
//!   controller/                  the controller's state (generated root CA)
//!   tokens/                      mode 0700
//!     <node>.token               one random token per node, mode 0600 (node daemons)
//!     waypoint_<ns>_<name>.token one per waypoint (its Gateway), mode 0600
//!     controller-tokens.yaml     the controller's --bootstrap-tokens, mode 0600
//!   nodes/<node>/                mode 0700: the daemon's --state-dir (bpffs at bpf/)
//!     cni.sock                   its --cni-socket, for the ambit-cni plugin
//!   waypoints/<ns>_<pod>/        mode 0700: a waypoint pod's --state-dir
//!   sidecars/<ns>_<pod>/         mode 0700: a sidecar's --state-dir (its own bpffs at bpf/)
//! ```
//!
//! A node daemon runs in its node's namespace, cgroup `<node>/system/ambit-node`:
//!
//! ```text
//! ambit-node --node-name <node> --controller-addr http://<control ip>:15012
//!   --token-file <state>/tokens/<node>.token --state-dir <state>/nodes/<node>
//!   --pods-cgroup <node pods cgroup> --cni-socket <state>/nodes/<node>/cni.sock
//!   --readiness-addr 0.0.0.0:15021 --admin-addr 127.0.0.1:15000
//!   --metrics-addr 0.0.0.0:15020 [MeshOptions::daemon_args…]
//! ```
//!
//! In sidecar mode no node daemon runs and no CNI call is made: before its workload
//! starts, every meshed pod (its own or its namespace's `ambit.dev/dataplane-mode:
//! ambient` label, as the controller decides; never a waypoint pod) gets a sidecar in
//! its namespace and cgroup ([`Cluster::start_mesh_sidecars`]), capturing that pod
//! only, subscribed as its node with the node's token; its readiness (the pod is
//! captured and its certificate issued) is awaited before the workloads start:
//!
//! ```text
//! ambit-node --mode sidecar --node-name <node> --controller-addr http://<control ip>:15012
//!   --token-file <state>/tokens/<node>.token --state-dir <state>/sidecars/<ns>_<pod>
//!   --pod-name <pod> --pod-namespace <ns> --pod-uid <uid> --pod-ip <pod ip>
//!   --pod-netns /run/netns/<pod netns> --pod-cgroup <pod cgroup>
//!   --readiness-addr 0.0.0.0:15021 --admin-addr 127.0.0.1:15000
//!   --metrics-addr 0.0.0.0:15020 [MeshOptions::daemon_args…]
//! ```
//!
//! A pod labelled into the mesh later ([`Cluster::label_namespace`]) gets no sidecar
//! (as with sidecar injection, which happens when a pod is created).
//!
//! [`DataPlaneMode::SidecarL7`] adds the waypoint's L7 engine inside pods: a waypoint
//! whose Service (a topology Service named after the Gateway) selects workload pods
//! and maps the HBONE port 15008 to another target port (15008 is the sidecar's) runs
//! as one `ambit-waypoint` in each meshed pod the Service selects, beside its sidecar
//! ([`Cluster::start_mesh_l7_engines`]): the same binary, identity and configuration
//! as a waypoint pod, only placed in the server's pod. Such a pod's sidecar leaves
//! the engine's port to it (`--exclude-inbound-ports`), and the engine marks its own
//! sockets with the sidecar's bypass mark so that capture leaves its connections to
//! the endpoints and the controller alone:
//!
//! ```text
//! ambit-waypoint --name <gateway> --namespace <ns> --controller-addr http://<control ip>:15012
//!   --token-file <state>/tokens/waypoint_<ns>_<gateway>.token
//!   --state-dir <state>/l7/<ns>_<pod> --hbone-addr 0.0.0.0:<target port>
//!   --socket-mark 1337 --readiness-addr 127.0.0.1:15091 --admin-addr 127.0.0.1:15092
//!   --metrics-addr 127.0.0.1:15090 [MeshOptions::waypoint_args…]
//! ```
//!
//! A waypoint (topology `waypoints`, see [`crate::topology::WaypointSpec`]) runs in
//! each of its pods, in the pod's namespace and cgroup, once the control plane is up
//! ([`Cluster::start_mesh_waypoints`]):
//!
//! ```text
//! ambit-waypoint --name <gateway> --namespace <ns> --controller-addr http://<control ip>:15012
//!   --token-file <state>/tokens/waypoint_<ns>_<gateway>.token
//!   --state-dir <state>/waypoints/<ns>_<pod> --readiness-addr 0.0.0.0:15021
//!   --admin-addr 127.0.0.1:15000 --metrics-addr 0.0.0.0:15020 [MeshOptions::waypoint_args…]
//! ```
//!
//! The controller listens on `<control ip>:15012` (gRPC: config push and CA, reached
//! from the nodes over the underlay), `0.0.0.0:15021` (readiness) and `127.0.0.1:15000`
//! (admin: `/config_dump`, `/metrics`) inside the control namespace; use
//! [`Cluster::http_get`] or `ambitctl` run with [`Cluster::command`] in
//! [`Place::Control`] to read the admin endpoints.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{Cluster, Error, Place, PodRef};

/// The controller's binary, looked up in the binaries directory.
pub const CONTROLLER_BINARY: &str = "ambit-controller";
/// The controller's process name in the cluster (`control_<name>.log`).
pub const CONTROLLER_PROCESS: &str = "ambit-controller";
/// gRPC port of the controller (config push and CA), Istio's xDS port.
pub const CONTROLLER_GRPC_PORT: u16 = 15012;
/// Readiness port of the controller.
pub const CONTROLLER_READINESS_PORT: u16 = 15021;
/// Admin port of the controller (loopback of the control namespace).
pub const CONTROLLER_ADMIN_PORT: u16 = 15000;
/// How long [`Cluster::start_mesh_control`] waits for the controller to be ready.
pub const DEFAULT_CONTROLLER_READY_TIMEOUT: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(50);

/// The node daemon's binary, looked up in the binaries directory.
pub const DAEMON_BINARY: &str = "ambit-node";
/// The node daemon's process name on each node (`node_<node>_<name>.log`).
pub const DAEMON_PROCESS: &str = "ambit-node";
/// Readiness port of the node daemon (`/healthz/ready`).
pub const DAEMON_READINESS_PORT: u16 = 15021;
/// Admin port of the node daemon (loopback of the node namespace).
pub const DAEMON_ADMIN_PORT: u16 = 15000;
/// Metrics port of the node daemon.
pub const DAEMON_METRICS_PORT: u16 = 15020;
/// How long [`Cluster::start_mesh_daemons`] waits for every daemon to be ready.
pub const DEFAULT_DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A sidecar's process name in its pod (`pod_<ns>_<pod>_<name>.log`); the binary is
/// [`DAEMON_BINARY`] with `--mode sidecar`.
pub const SIDECAR_PROCESS: &str = "ambit-sidecar";
/// Labels that put a pod or namespace in the mesh (`ambient`) or a pod out of it
/// (`none`), as the controller reads them.
pub const DATAPLANE_MODE_LABELS: [&str; 2] =
    ["ambit.dev/dataplane-mode", "istio.io/dataplane-mode"];

/// Where the mesh data plane's proxies run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataPlaneMode {
    /// One `ambit-node` per node; pods handed over by the `ambit-cni` plugin.
    #[default]
    Ambient,
    /// One `ambit-node --mode sidecar` inside every meshed pod; no node daemons, no
    /// CNI calls.
    Sidecar,
    /// [`DataPlaneMode::Sidecar`] plus the waypoint's L7 engine inside the pods its
    /// waypoint Service selects (see the module docs).
    SidecarL7,
}

impl DataPlaneMode {
    /// Whether the proxies run inside the pods (no node daemons, no CNI calls).
    pub fn is_sidecar(self) -> bool {
        matches!(self, Self::Sidecar | Self::SidecarL7)
    }
}

impl std::fmt::Display for DataPlaneMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ambient => "ambient",
            Self::Sidecar => "sidecar",
            Self::SidecarL7 => "sidecar-l7",
        })
    }
}

impl std::str::FromStr for DataPlaneMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ambient" => Ok(Self::Ambient),
            "sidecar" => Ok(Self::Sidecar),
            "sidecar-l7" => Ok(Self::SidecarL7),
            other => Err(format!(
                "unknown data plane mode {other:?}: expected ambient, sidecar or sidecar-l7"
            )),
        }
    }
}

/// The waypoint's binary, looked up in the binaries directory.
pub const WAYPOINT_BINARY: &str = "ambit-waypoint";
/// The waypoint's process name in its pod (`pod_<ns>_<pod>_<name>.log`).
pub const WAYPOINT_PROCESS: &str = "ambit-waypoint";
/// Readiness port of a waypoint (`/healthz/ready`), on the pod's address.
pub const WAYPOINT_READINESS_PORT: u16 = 15021;
/// Admin port of a waypoint (loopback of its pod).
pub const WAYPOINT_ADMIN_PORT: u16 = 15000;
/// Metrics port of a waypoint, on the pod's address.
pub const WAYPOINT_METRICS_PORT: u16 = 15020;
/// HBONE port of a waypoint.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;
/// Process name of the waypoint's L7 engine inside a workload pod (sidecar L7).
pub const L7_ENGINE_PROCESS: &str = "ambit-l7-engine";
/// Metrics port of an L7 engine, on its pod's loopback.
pub const L7_ENGINE_METRICS_PORT: u16 = 15090;
/// Readiness port of an L7 engine, on its pod's loopback.
pub const L7_ENGINE_READINESS_PORT: u16 = 15091;
/// Admin port of an L7 engine, on its pod's loopback.
pub const L7_ENGINE_ADMIN_PORT: u16 = 15092;
/// `SO_MARK` that the sidecar's capture lets through (`ambit-node`'s bypass mark).
pub const SIDECAR_BYPASS_MARK: u32 = 0x539;
/// How long [`Cluster::start_mesh_waypoints`] waits for every waypoint to be ready.
pub const DEFAULT_WAYPOINT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start the mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Extra flags for `ambit-controller` (e.g. `["--cert-ttl", "10s"]`).
    pub controller_args: Vec<String>,
    /// How long to wait for the controller's `/healthz/ready`.
    pub ready_timeout: Duration,
    /// Also start the data plane: one `ambit-node` per node, and pods attached
    /// through the `ambit-cni` plugin before their workloads start. Off by default
    /// (control plane only).
    pub daemons: bool,
    /// Where the data plane's proxies run (with [`MeshOptions::daemons`]): node
    /// daemons (default) or one sidecar per meshed pod.
    pub mode: DataPlaneMode,
    /// Extra flags for every `ambit-node`, node daemon or sidecar (e.g.
    /// `["--trust-domain", "cluster.local"]`).
    pub daemon_args: Vec<String>,
    /// How long to wait for every daemon's (or sidecar's) `/healthz/ready`.
    pub daemon_ready_timeout: Duration,
    /// Extra flags for every `ambit-waypoint`.
    pub waypoint_args: Vec<String>,
    /// How long to wait for every waypoint's `/healthz/ready`.
    pub waypoint_ready_timeout: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            controller_args: Vec::new(),
            ready_timeout: DEFAULT_CONTROLLER_READY_TIMEOUT,
            daemons: false,
            mode: DataPlaneMode::Ambient,
            daemon_args: Vec::new(),
            daemon_ready_timeout: DEFAULT_DAEMON_READY_TIMEOUT,
            waypoint_args: Vec::new(),
            waypoint_ready_timeout: DEFAULT_WAYPOINT_READY_TIMEOUT,
        }
    }
}

impl MeshOptions {
    /// The control plane and the data plane in sidecar L7 mode: one sidecar per
    /// meshed pod, and the waypoints' L7 engines inside the pods their Services select.
    pub fn with_l7_sidecars() -> Self {
        Self {
            daemons: true,
            mode: DataPlaneMode::SidecarL7,
            ..Self::default()
        }
    }

    /// The control plane and the data plane ([`MeshOptions::daemons`] on).
    pub fn with_daemons() -> Self {
        Self {
            daemons: true,
            ..Self::default()
        }
    }

    /// The control plane and the data plane in sidecar mode: one sidecar per meshed
    /// pod, no node daemons.
    pub fn with_sidecars() -> Self {
        Self {
            daemons: true,
            mode: DataPlaneMode::Sidecar,
            ..Self::default()
        }
    }
}

/// The mesh control plane of a cluster, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshInfo {
    /// The controller.
    pub controller: ControllerInfo,
    /// Directory of the bootstrap tokens (mode 0700).
    pub tokens_dir: PathBuf,
    /// Node name → the file holding its bootstrap token (mode 0600), for its daemon's
    /// `authorization: Bearer` credential.
    pub node_tokens: BTreeMap<String, PathBuf>,
    /// The node daemons, in node order, once started (empty without the data plane).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemons: Vec<DaemonInfo>,
    /// Waypoint `namespace/name` → the file holding its bootstrap token (mode 0600).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub waypoint_tokens: BTreeMap<String, PathBuf>,
    /// The waypoint processes, one per waypoint pod, once started; in sidecar L7 also
    /// the L7 engines, one per pod hosting one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointProcessInfo>,
    /// Sidecar mode: the sidecars, one per meshed pod, once started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<SidecarInfo>,
}

/// A running sidecar (`ambit-node --mode sidecar`): its pod, where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarInfo {
    /// Its pod.
    pub pod: PodRef,
    /// Its pod's node (whose bootstrap token it uses).
    pub node: String,
    /// Its process name ([`SIDECAR_PROCESS`]), in [`Place::Pod`].
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// Readiness, `<pod ip>:15021` (excluded from capture).
    pub readiness_addr: SocketAddrV4,
    /// Admin endpoints, on the pod namespace's loopback.
    pub admin_addr: SocketAddrV4,
    /// Metrics, `<pod ip>:15020` (excluded from capture).
    pub metrics_addr: SocketAddrV4,
    /// Its state directory, `<cluster state>/sidecars/<ns>_<pod>`.
    pub state_dir: PathBuf,
    /// Its bootstrap token file (its node's).
    pub token_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// Sidecar L7: an L7 engine to run inside a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7EnginePlacement {
    /// Namespace of the waypoint's Gateway.
    pub namespace: String,
    /// The Gateway's name.
    pub name: String,
    /// The pod hosting the engine.
    pub pod: PodRef,
    /// The engine's HBONE port in the pod (its waypoint Service's target port).
    pub port: u16,
}

/// A running waypoint: its pod, where it listens. In sidecar L7 also an L7 engine
/// ([`L7_ENGINE_PROCESS`]) inside a workload pod, listening on loopback but for HBONE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointProcessInfo {
    /// Namespace of its Gateway (and pod).
    pub namespace: String,
    /// Its Gateway's name.
    pub name: String,
    /// Its pod.
    pub pod: PodRef,
    /// Its process name ([`WAYPOINT_PROCESS`]), in [`Place::Pod`].
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// HBONE, `<pod ip>:15008`.
    pub hbone_addr: SocketAddrV4,
    /// Readiness, `<pod ip>:15021` (pod namespace).
    pub readiness_addr: SocketAddrV4,
    /// Admin endpoints, on the pod namespace's loopback.
    pub admin_addr: SocketAddrV4,
    /// Metrics, `<pod ip>:15020`.
    pub metrics_addr: SocketAddrV4,
    /// Its state directory, `<cluster state>/waypoints/<ns>_<pod>`.
    pub state_dir: PathBuf,
    /// Its bootstrap token file.
    pub token_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// A node daemon: where it runs and listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonInfo {
    /// The node.
    pub node: String,
    /// Its process name ([`DAEMON_PROCESS`]), in [`Place::Node`].
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// Readiness, `<node ip>:15021` (node namespace).
    pub readiness_addr: SocketAddrV4,
    /// Admin endpoints, on the node namespace's loopback.
    pub admin_addr: SocketAddrV4,
    /// Metrics, `<node ip>:15020`.
    pub metrics_addr: SocketAddrV4,
    /// Its state directory, `<cluster state>/nodes/<node>`.
    pub state_dir: PathBuf,
    /// Its enrolment socket, for the `ambit-cni` plugin.
    pub cni_socket: PathBuf,
    /// Its bootstrap token file.
    pub token_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// Where the controller runs and listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerInfo {
    /// Its process name ([`CONTROLLER_PROCESS`]), in [`Place::Control`].
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// gRPC (push and CA), reachable from every node: `<control ip>:15012`.
    pub grpc_addr: SocketAddrV4,
    /// Readiness, inside the control namespace.
    pub readiness_addr: SocketAddrV4,
    /// Admin endpoints, on the control namespace's loopback.
    pub admin_addr: SocketAddrV4,
    /// Its state directory (the generated root CA).
    pub state_dir: PathBuf,
    /// Its `--bootstrap-tokens` file.
    pub tokens_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

impl Cluster {
    /// Provisions the node bootstrap tokens and starts `ambit-controller` in local
    /// mode in the control namespace on the cluster's config directory; returns once
    /// its `/healthz/ready` answers 200 (it has read the config directory). Recorded
    /// in the state file (`Status::mesh`) and stopped by `down`.
    pub fn start_mesh_control(&self, opts: &MeshOptions) -> Result<MeshInfo, Error> {
        let binary = self.binary(CONTROLLER_BINARY)?;
        let st = self.status();
        let tokens_dir = st.state_dir.join("tokens");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens_dir)
            .map_err(|source| Error::Io {
                op: "creating",
                path: tokens_dir.clone(),
                source,
            })?;
        let mut node_tokens = BTreeMap::new();
        let mut entries = Vec::new();
        for node in &st.nodes {
            let token = random_token()?;
            let path = tokens_dir.join(format!("{}.token", node.name));
            write_secret(&path, format!("{token}\n").as_bytes())?;
            entries.push(serde_json::json!({"token": token, "node": node.name}));
            node_tokens.insert(node.name.clone(), path);
        }
        let mut waypoint_tokens = BTreeMap::new();
        for wp in &st.waypoints {
            let token = random_token()?;
            let path = tokens_dir.join(format!("waypoint_{}_{}.token", wp.namespace, wp.name));
            write_secret(&path, format!("{token}\n").as_bytes())?;
            let name = format!("{}/{}", wp.namespace, wp.name);
            entries.push(serde_json::json!({"token": token, "waypoint": name}));
            waypoint_tokens.insert(name, path);
        }
        let tokens_file = tokens_dir.join("controller-tokens.yaml");
        let yaml =
            serde_yaml::to_string(&serde_json::json!({ "tokens": entries })).map_err(|source| {
                Error::Yaml {
                    what: "bootstrap tokens".to_owned(),
                    source,
                }
            })?;
        write_secret(&tokens_file, yaml.as_bytes())?;

        let state_dir = st.state_dir.join("controller");
        let grpc_addr = SocketAddrV4::new(st.control.ip, CONTROLLER_GRPC_PORT);
        let readiness_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTROLLER_READINESS_PORT);
        let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, CONTROLLER_ADMIN_PORT);
        let mut cmd = Command::new(&binary);
        cmd.arg("--config-dir")
            .arg(&st.config_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--bootstrap-tokens")
            .arg(&tokens_file)
            .arg("--grpc-addr")
            .arg(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTROLLER_GRPC_PORT).to_string())
            .arg("--readiness-addr")
            .arg(readiness_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string())
            .args(&opts.controller_args);
        let process = self.spawn_control(CONTROLLER_PROCESS, cmd)?;
        let info = MeshInfo {
            controller: ControllerInfo {
                process: CONTROLLER_PROCESS.to_owned(),
                pid: process.pid,
                grpc_addr,
                readiness_addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, CONTROLLER_READINESS_PORT),
                admin_addr,
                state_dir,
                tokens_file,
                log: process.log.clone(),
            },
            tokens_dir,
            node_tokens,
            daemons: Vec::new(),
            waypoint_tokens,
            waypoints: Vec::new(),
            sidecars: Vec::new(),
        };
        self.set_mesh(Some(info.clone()))?;

        let ready = SocketAddr::V4(info.controller.readiness_addr);
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            if !process.is_running() {
                return Err(Error::Exited {
                    what: format!("{CONTROLLER_PROCESS} in {}", Place::Control),
                    status: "gone".to_owned(),
                    log: process.log.clone(),
                    tail: process.log_tail(30),
                });
            }
            let last = match self.http_get(&Place::Control, ready, "/healthz/ready") {
                Ok((200, _)) => break,
                Ok((code, body)) => format!("{code}: {}", body.trim()),
                Err(e) => crate::error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("{CONTROLLER_PROCESS} in {}", Place::Control),
                    timeout: opts.ready_timeout,
                    last,
                    log: process.log.clone(),
                    tail: process.log_tail(30),
                });
            }
            std::thread::sleep(POLL);
        }
        tracing::info!(cluster = %self.name(), grpc = %info.controller.grpc_addr, "mesh control plane ready");
        Ok(info)
    }

    /// Starts one `ambit-node` per node in the node's namespace and cgroup
    /// (`<node>/system/ambit-node`), pointed at the controller with the node's
    /// bootstrap token, and returns once every daemon's `/healthz/ready` answers 200.
    /// Needs [`Cluster::start_mesh_control`] first. Recorded in the state file
    /// (`MeshInfo::daemons`) and stopped by `down`.
    pub fn start_mesh_daemons(&self, opts: &MeshOptions) -> Result<Vec<DaemonInfo>, Error> {
        let binary = self.binary(DAEMON_BINARY)?;
        let st = self.status();
        let Some(mut mesh) = st.mesh.clone() else {
            return Err(Error::MeshNotStarted);
        };
        let mut started = Vec::new();
        for node in &st.nodes {
            let token_file = mesh
                .node_tokens
                .get(&node.name)
                .cloned()
                .ok_or_else(|| Error::UnknownNode(node.name.clone()))?;
            let state_dir = st.state_dir.join("nodes").join(&node.name);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&state_dir)
                .map_err(|source| Error::Io {
                    op: "creating",
                    path: state_dir.clone(),
                    source,
                })?;
            let cni_socket = state_dir.join("cni.sock");
            let readiness_addr = SocketAddrV4::new(node.ip, DAEMON_READINESS_PORT);
            let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, DAEMON_ADMIN_PORT);
            let metrics_addr = SocketAddrV4::new(node.ip, DAEMON_METRICS_PORT);
            let mut cmd = Command::new(&binary);
            cmd.arg("--node-name")
                .arg(&node.name)
                .arg("--controller-addr")
                .arg(format!("http://{}", mesh.controller.grpc_addr))
                .arg("--token-file")
                .arg(&token_file)
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("--pods-cgroup")
                .arg(&node.pods_cgroup)
                .arg("--cni-socket")
                .arg(&cni_socket)
                .arg("--readiness-addr")
                .arg(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DAEMON_READINESS_PORT).to_string())
                .arg("--admin-addr")
                .arg(admin_addr.to_string())
                .arg("--metrics-addr")
                .arg(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DAEMON_METRICS_PORT).to_string())
                .args(&opts.daemon_args);
            let process = self.spawn_in_node(&node.name, DAEMON_PROCESS, cmd)?;
            let info = DaemonInfo {
                node: node.name.clone(),
                process: DAEMON_PROCESS.to_owned(),
                pid: process.pid,
                readiness_addr,
                admin_addr,
                metrics_addr,
                state_dir,
                cni_socket,
                token_file,
                log: process.log.clone(),
            };
            mesh.daemons.retain(|d| d.node != node.name);
            mesh.daemons.push(info.clone());
            self.set_mesh(Some(mesh.clone()))?;
            started.push((info, process));
        }

        // Wait for all of them together: they start in parallel.
        let awaited: Vec<Awaited<'_>> = started
            .iter()
            .map(|(info, process)| Awaited {
                place: Place::Node(info.node.clone()),
                readiness: SocketAddr::V4(info.readiness_addr),
                process,
            })
            .collect();
        self.wait_all_ready(&awaited, opts.daemon_ready_timeout)?;
        tracing::info!(cluster = %self.name(), daemons = started.len(), "mesh data plane ready");
        Ok(started.into_iter().map(|(info, _)| info).collect())
    }

    /// The pods that are meshed by their labels or their namespace's (see
    /// [`DATAPLANE_MODE_LABELS`]), as the controller decides; never waypoint pods.
    pub fn meshed_pods(&self) -> Vec<crate::PodInfo> {
        let st = self.status();
        st.pods
            .iter()
            .filter(|p| {
                let ns = st.namespaces.iter().find(|n| n.name == p.namespace);
                p.waypoint.is_none() && is_meshed(&p.labels, ns.map(|n| &n.labels))
            })
            .cloned()
            .collect()
    }

    /// Sidecar mode: starts `ambit-node --mode sidecar` in every meshed pod (see the
    /// module docs), in the pod's namespace and cgroup, pointed at the controller
    /// with its node's bootstrap token, and returns once every sidecar's
    /// `/healthz/ready` answers 200 (the pod is captured, its certificate issued).
    /// Needs [`Cluster::start_mesh_control`] first. Recorded in the state file
    /// (`MeshInfo::sidecars`) and stopped by `down`.
    pub fn start_mesh_sidecars(&self, opts: &MeshOptions) -> Result<Vec<SidecarInfo>, Error> {
        let binary = self.binary(DAEMON_BINARY)?;
        let st = self.status();
        let Some(mut mesh) = st.mesh.clone() else {
            return Err(Error::MeshNotStarted);
        };
        let engines = if opts.mode == DataPlaneMode::SidecarL7 {
            self.l7_engine_placements()?
        } else {
            Vec::new()
        };
        let mut started = Vec::new();
        for pod in self.meshed_pods() {
            let pod_ref = pod.pod_ref();
            let token_file = mesh
                .node_tokens
                .get(&pod.node)
                .cloned()
                .ok_or_else(|| Error::UnknownNode(pod.node.clone()))?;
            let state_dir = st.state_dir.join("sidecars").join(pod_ref.file_stem());
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&state_dir)
                .map_err(|source| Error::Io {
                    op: "creating",
                    path: state_dir.clone(),
                    source,
                })?;
            let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).to_string();
            let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, DAEMON_ADMIN_PORT);
            let uid = crate::manifests::pod_uid(&st, &pod.namespace, &pod.name);
            let mut cmd = Command::new(&binary);
            cmd.arg("--mode")
                .arg("sidecar")
                .arg("--node-name")
                .arg(&pod.node)
                .arg("--controller-addr")
                .arg(format!("http://{}", mesh.controller.grpc_addr))
                .arg("--token-file")
                .arg(&token_file)
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("--pod-name")
                .arg(&pod.name)
                .arg("--pod-namespace")
                .arg(&pod.namespace)
                .arg("--pod-uid")
                .arg(&uid)
                .arg("--pod-ip")
                .arg(pod.ip.to_string())
                .arg("--pod-netns")
                .arg(pod.netns_path())
                .arg("--pod-cgroup")
                .arg(&pod.cgroup)
                .arg("--readiness-addr")
                .arg(any(DAEMON_READINESS_PORT))
                .arg("--admin-addr")
                .arg(admin_addr.to_string())
                .arg("--metrics-addr")
                .arg(any(DAEMON_METRICS_PORT));
            let engine_ports: Vec<String> = engines
                .iter()
                .filter(|e| e.pod == pod_ref)
                .map(|e| e.port.to_string())
                .collect();
            if !engine_ports.is_empty() {
                cmd.arg("--exclude-inbound-ports")
                    .arg(engine_ports.join(","));
            }
            cmd.args(&opts.daemon_args);
            let process = self.spawn(Place::Pod(pod_ref.clone()), SIDECAR_PROCESS, cmd)?;
            let info = SidecarInfo {
                pod: pod_ref.clone(),
                node: pod.node.clone(),
                process: SIDECAR_PROCESS.to_owned(),
                pid: process.pid,
                readiness_addr: SocketAddrV4::new(pod.ip, DAEMON_READINESS_PORT),
                admin_addr,
                metrics_addr: SocketAddrV4::new(pod.ip, DAEMON_METRICS_PORT),
                state_dir,
                token_file,
                log: process.log.clone(),
            };
            mesh.sidecars.retain(|s| s.pod != pod_ref);
            mesh.sidecars.push(info.clone());
            self.set_mesh(Some(mesh.clone()))?;
            started.push((info, process));
        }
        let awaited: Vec<Awaited<'_>> = started
            .iter()
            .map(|(info, process)| Awaited {
                place: Place::Pod(info.pod.clone()),
                readiness: SocketAddr::V4(info.readiness_addr),
                process,
            })
            .collect();
        self.wait_all_ready(&awaited, opts.daemon_ready_timeout)?;
        tracing::info!(cluster = %self.name(), sidecars = started.len(), "mesh sidecars ready");
        Ok(started.into_iter().map(|(info, _)| info).collect())
    }

    /// Sidecar L7: where the waypoints' L7 engines run (see the module docs): every
    /// meshed pod selected by a Service named after a waypoint, on the target port of
    /// its port 15008. Such a Service must map 15008 elsewhere (15008 is the sidecar's).
    pub fn l7_engine_placements(&self) -> Result<Vec<L7EnginePlacement>, Error> {
        let st = self.status();
        let meshed: Vec<PodRef> = self.meshed_pods().iter().map(|p| p.pod_ref()).collect();
        let mut out = Vec::new();
        for wp in &st.waypoints {
            let Some(svc) = st
                .services
                .iter()
                .find(|s| s.namespace == wp.namespace && s.name == wp.name)
            else {
                continue;
            };
            let port = svc
                .ports
                .iter()
                .find(|p| p.port == WAYPOINT_HBONE_PORT)
                .map(|p| p.target_port)
                .ok_or_else(|| Error::MeshTopology {
                    what: format!("Service {}/{}", svc.namespace, svc.name),
                    reason: format!(
                        "the Service of waypoint {}/{} has no port {WAYPOINT_HBONE_PORT}",
                        wp.namespace, wp.name
                    ),
                })?;
            if port == WAYPOINT_HBONE_PORT {
                return Err(Error::MeshTopology {
                    what: format!("Service {}/{}", svc.namespace, svc.name),
                    reason: format!(
                        "in sidecar L7 the waypoint's port {WAYPOINT_HBONE_PORT} must target \
                         another port: {WAYPOINT_HBONE_PORT} is the sidecar's HBONE port"
                    ),
                });
            }
            for pod in svc.endpoints.iter().filter(|p| meshed.contains(p)) {
                out.push(L7EnginePlacement {
                    namespace: wp.namespace.clone(),
                    name: wp.name.clone(),
                    pod: pod.clone(),
                    port,
                });
            }
        }
        Ok(out)
    }

    /// Sidecar L7: starts the waypoints' L7 engines (`ambit-waypoint`) inside the pods
    /// of [`Cluster::l7_engine_placements`] (see the module docs), and returns once
    /// every engine's `/healthz/ready` answers 200. Needs the sidecars first
    /// ([`Cluster::start_mesh_sidecars`]): the engine's port is excluded from capture
    /// by its pod's sidecar. Recorded in `MeshInfo::waypoints`, stopped by `down`.
    pub fn start_mesh_l7_engines(
        &self,
        opts: &MeshOptions,
    ) -> Result<Vec<WaypointProcessInfo>, Error> {
        let placements = self.l7_engine_placements()?;
        if placements.is_empty() {
            return Ok(Vec::new());
        }
        let binary = self.binary(WAYPOINT_BINARY)?;
        let st = self.status();
        let Some(mut mesh) = st.mesh.clone() else {
            return Err(Error::MeshNotStarted);
        };
        let mut started = Vec::new();
        for e in &placements {
            let key = format!("{}/{}", e.namespace, e.name);
            let token_file = mesh
                .waypoint_tokens
                .get(&key)
                .cloned()
                .ok_or(Error::MeshNotStarted)?;
            let pod = st
                .pod(&e.pod)
                .ok_or_else(|| Error::UnknownPod(e.pod.to_string()))?;
            let state_dir = st.state_dir.join("l7").join(e.pod.file_stem());
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&state_dir)
                .map_err(|source| Error::Io {
                    op: "creating",
                    path: state_dir.clone(),
                    source,
                })?;
            let local = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
            let mut cmd = Command::new(&binary);
            cmd.arg("--name")
                .arg(&e.name)
                .arg("--namespace")
                .arg(&e.namespace)
                .arg("--controller-addr")
                .arg(format!("http://{}", mesh.controller.grpc_addr))
                .arg("--token-file")
                .arg(&token_file)
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("--hbone-addr")
                .arg(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, e.port).to_string())
                .arg("--socket-mark")
                .arg(SIDECAR_BYPASS_MARK.to_string())
                .arg("--readiness-addr")
                .arg(local(L7_ENGINE_READINESS_PORT).to_string())
                .arg("--admin-addr")
                .arg(local(L7_ENGINE_ADMIN_PORT).to_string())
                .arg("--metrics-addr")
                .arg(local(L7_ENGINE_METRICS_PORT).to_string())
                .args(&opts.waypoint_args)
                .env("POD_NAME", &pod.name)
                .env("POD_NAMESPACE", &pod.namespace)
                .env("POD_IP", pod.ip.to_string())
                .env("NODE_NAME", &pod.node);
            let process = self.spawn(Place::Pod(e.pod.clone()), L7_ENGINE_PROCESS, cmd)?;
            let info = WaypointProcessInfo {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                pod: e.pod.clone(),
                process: L7_ENGINE_PROCESS.to_owned(),
                pid: process.pid,
                hbone_addr: SocketAddrV4::new(pod.ip, e.port),
                readiness_addr: local(L7_ENGINE_READINESS_PORT),
                admin_addr: local(L7_ENGINE_ADMIN_PORT),
                metrics_addr: local(L7_ENGINE_METRICS_PORT),
                state_dir,
                token_file,
                log: process.log.clone(),
            };
            mesh.waypoints
                .retain(|w| !(w.pod == e.pod && w.process == L7_ENGINE_PROCESS));
            mesh.waypoints.push(info.clone());
            self.set_mesh(Some(mesh.clone()))?;
            started.push((info, process));
        }
        let awaited: Vec<Awaited<'_>> = started
            .iter()
            .map(|(info, process)| Awaited {
                place: Place::Pod(info.pod.clone()),
                readiness: SocketAddr::V4(info.readiness_addr),
                process,
            })
            .collect();
        self.wait_all_ready(&awaited, opts.waypoint_ready_timeout)?;
        tracing::info!(cluster = %self.name(), engines = started.len(), "mesh L7 engines ready");
        Ok(started.into_iter().map(|(info, _)| info).collect())
    }

    /// Starts `ambit-waypoint` in every waypoint pod (see the module docs), pointed
    /// at the controller with its waypoint's bootstrap token, and returns once every
    /// waypoint's `/healthz/ready` answers 200. Needs [`Cluster::start_mesh_control`]
    /// first (the node daemons are not needed: waypoint pods are never captured).
    /// Recorded in the state file (`MeshInfo::waypoints`) and stopped by `down`.
    pub fn start_mesh_waypoints(
        &self,
        opts: &MeshOptions,
    ) -> Result<Vec<WaypointProcessInfo>, Error> {
        let st = self.status();
        if st.waypoints.is_empty() {
            return Ok(Vec::new());
        }
        let binary = self.binary(WAYPOINT_BINARY)?;
        let Some(mut mesh) = st.mesh.clone() else {
            return Err(Error::MeshNotStarted);
        };
        let mut started = Vec::new();
        for wp in &st.waypoints {
            let key = format!("{}/{}", wp.namespace, wp.name);
            let token_file = mesh
                .waypoint_tokens
                .get(&key)
                .cloned()
                .ok_or(Error::MeshNotStarted)?;
            for pod_ref in &wp.pods {
                let pod = st
                    .pod(pod_ref)
                    .ok_or_else(|| Error::UnknownPod(pod_ref.to_string()))?;
                let state_dir = st.state_dir.join("waypoints").join(pod_ref.file_stem());
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&state_dir)
                    .map_err(|source| Error::Io {
                        op: "creating",
                        path: state_dir.clone(),
                        source,
                    })?;
                let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).to_string();
                let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, WAYPOINT_ADMIN_PORT);
                let mut cmd = Command::new(&binary);
                cmd.arg("--name")
                    .arg(&wp.name)
                    .arg("--namespace")
                    .arg(&wp.namespace)
                    .arg("--controller-addr")
                    .arg(format!("http://{}", mesh.controller.grpc_addr))
                    .arg("--token-file")
                    .arg(&token_file)
                    .arg("--state-dir")
                    .arg(&state_dir)
                    .arg("--readiness-addr")
                    .arg(any(WAYPOINT_READINESS_PORT))
                    .arg("--admin-addr")
                    .arg(admin_addr.to_string())
                    .arg("--metrics-addr")
                    .arg(any(WAYPOINT_METRICS_PORT))
                    .args(&opts.waypoint_args)
                    .env("POD_NAME", &pod.name)
                    .env("POD_NAMESPACE", &pod.namespace)
                    .env("POD_IP", pod.ip.to_string())
                    .env("NODE_NAME", &pod.node)
                    .env("SERVICE_ACCOUNT", &pod.service_account);
                let process = self.spawn(Place::Pod(pod_ref.clone()), WAYPOINT_PROCESS, cmd)?;
                let info = WaypointProcessInfo {
                    namespace: wp.namespace.clone(),
                    name: wp.name.clone(),
                    pod: pod_ref.clone(),
                    process: WAYPOINT_PROCESS.to_owned(),
                    pid: process.pid,
                    hbone_addr: SocketAddrV4::new(pod.ip, WAYPOINT_HBONE_PORT),
                    readiness_addr: SocketAddrV4::new(pod.ip, WAYPOINT_READINESS_PORT),
                    admin_addr,
                    metrics_addr: SocketAddrV4::new(pod.ip, WAYPOINT_METRICS_PORT),
                    state_dir,
                    token_file: token_file.clone(),
                    log: process.log.clone(),
                };
                mesh.waypoints.retain(|w| w.pod != *pod_ref);
                mesh.waypoints.push(info.clone());
                self.set_mesh(Some(mesh.clone()))?;
                started.push((info, process));
            }
        }
        let awaited: Vec<Awaited<'_>> = started
            .iter()
            .map(|(info, process)| Awaited {
                place: Place::Pod(info.pod.clone()),
                readiness: SocketAddr::V4(info.readiness_addr),
                process,
            })
            .collect();
        self.wait_all_ready(&awaited, opts.waypoint_ready_timeout)?;
        tracing::info!(cluster = %self.name(), waypoints = started.len(), "mesh waypoints ready");
        Ok(started.into_iter().map(|(info, _)| info).collect())
    }

    /// Waits until every process's `/healthz/ready` answers 200, failing early (with
    /// the log tail) when one exits, and with the last answer of the first one still
    /// pending at the deadline.
    fn wait_all_ready(&self, awaited: &[Awaited<'_>], timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<&Awaited<'_>> = awaited.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            let mut last_first = None;
            for a in pending {
                let what = format!("{} in {}", a.process.name, a.process.place);
                if !a.process.is_running() {
                    return Err(Error::Exited {
                        what,
                        status: "gone".to_owned(),
                        log: a.process.log.clone(),
                        tail: a.process.log_tail(30),
                    });
                }
                let last = match self.http_get(&a.place, a.readiness, "/healthz/ready") {
                    Ok((200, _)) => continue,
                    Ok((code, body)) => format!("{code}: {}", body.trim()),
                    Err(e) => crate::error_chain(&e),
                };
                last_first.get_or_insert(last);
                still.push(a);
            }
            pending = still;
            if let Some(first) = pending.first()
                && Instant::now() >= deadline
            {
                return Err(Error::NotReady {
                    what: format!("{} in {}", first.process.name, first.process.place),
                    timeout,
                    last: last_first.unwrap_or_default(),
                    log: first.process.log.clone(),
                    tail: first.process.log_tail(30),
                });
            }
            if !pending.is_empty() {
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// The mesh control plane, when started.
    pub fn mesh(&self) -> Option<MeshInfo> {
        self.status().mesh
    }

    /// `GET path` over HTTP/1.1 on `addr` from inside `place`'s network namespace (a
    /// component's admin or readiness endpoint); the status code and body.
    pub fn http_get(
        &self,
        place: &Place,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), Error> {
        let netns = self.netns_path_of(place)?;
        let path = path.to_owned();
        let what = format!("GET http://{addr}{path} in {place}");
        let io = |source| Error::Io {
            op: "HTTP",
            path: PathBuf::from(what.clone()),
            source,
        };
        // A socket belongs to the namespace its thread was in when it was created: do
        // the exchange on a thread of its own that enters the namespace first.
        let result = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<String> {
                let ns = std::fs::File::open(&netns)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let mut stream =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(
                    stream,
                    "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
                )?;
                let mut out = Vec::new();
                stream.read_to_end(&mut out)?;
                Ok(String::from_utf8_lossy(&out).into_owned())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("HTTP thread panicked")))
        })
        .map_err(io)?;
        parse_response(&result).ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an HTTP/1.1 response",
            ))
        })
    }
}

/// Whether a pod with `labels` in a namespace with `ns_labels` is in the mesh: its own
/// dataplane-mode label decides (`ambient` in, `none` out), else its namespace's.
fn is_meshed(
    labels: &BTreeMap<String, String>,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    fn mode(l: &BTreeMap<String, String>) -> Option<&str> {
        DATAPLANE_MODE_LABELS
            .iter()
            .find_map(|k| l.get(*k).map(String::as_str))
    }
    match mode(labels) {
        Some("ambient") => true,
        Some("none") => false,
        _ => ns_labels.and_then(mode) == Some("ambient"),
    }
}

/// A process whose readiness is awaited.
struct Awaited<'a> {
    place: Place,
    readiness: SocketAddr,
    process: &'a crate::Process,
}

/// Status code and body of a `connection: close` HTTP/1.1 response (the admin
/// servers answer with a content length, never chunked).
fn parse_response(raw: &str) -> Option<(u16, String)> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((code, body.to_owned()))
}

/// 32 random bytes from the kernel, hex.
fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| Error::Io {
            op: "reading",
            path: PathBuf::from("/dev/urandom"),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file readable by its owner only.
fn write_secret(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_follows_the_pod_label_then_the_namespace() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let ambient_ns = l(&[("ambit.dev/dataplane-mode", "ambient")]);
        assert!(is_meshed(&l(&[]), Some(&ambient_ns)));
        assert!(!is_meshed(&l(&[]), Some(&l(&[]))));
        assert!(!is_meshed(&l(&[]), None));
        assert!(!is_meshed(
            &l(&[("istio.io/dataplane-mode", "none")]),
            Some(&ambient_ns)
        ));
        assert!(is_meshed(
            &l(&[("istio.io/dataplane-mode", "ambient")]),
            Some(&l(&[]))
        ));
        assert_eq!("sidecar".parse(), Ok(DataPlaneMode::Sidecar));
        assert!("both".parse::<DataPlaneMode>().is_err());
    }

    #[test]
    fn responses_parse() {
        let raw = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nnope\n";
        assert_eq!(parse_response(raw), Some((503, "nope\n".to_owned())));
        assert_eq!(parse_response("garbage"), None);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("simcluster-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t");
        write_secret(&p, b"x").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
