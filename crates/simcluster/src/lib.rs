//! The simulated cluster: Kubernetes nodes and pods as Linux network namespaces,
//! veth pairs, bridges, routes, cgroups and processes, plus the cluster's objects as
//! Kubernetes YAML for a controller's local mode (DESIGN §7).
//!
//! # Use
//!
//! ```no_run
//! use ambit_simcluster::{Cluster, Options, Topology};
//! # fn main() -> Result<(), ambit_simcluster::Error> {
//! let cluster = Cluster::up(Options::for_test("target/debug"), &Topology::default_shop())?;
//! let out = cluster.exec("production/checkout-0", &["ambit-echo", "call", "http://10.244.2.2:8080/"])?;
//! let payment = cluster.pod("production/payment-v1-1")?;
//! cluster.down()?; // or just drop the handle
//! # Ok(()) }
//! ```
//!
//! `cargo xtask cluster up|status|exec|apply|delete|down` is the command-line face.
//!
//! # Naming
//!
//! Everything carries the cluster name (`[a-z0-9-]`, at most 24 characters, no `--`),
//! so clusters run side by side and leftovers of a crashed run are found by name:
//!
//! | object | name |
//! |---|---|
//! | underlay netns (holds bridge `br0`) | `ambit-<name>.underlay` |
//! | control-plane netns | `ambit-<name>.control` |
//! | node netns | `ambit-<name>.<node>` |
//! | pod netns | `ambit-<name>.<namespace>.<pod>` |
//! | cgroup root | `<cgroup2 mount>/ambit-<name>` |
//! | state directory | `/run/ambit/clusters/<name>` |
//! | environment of every process started | `AMBIT_CLUSTER=<name>` |
//!
//! The dot after the cluster name cannot occur in a name, so the prefix
//! `ambit-a.` never matches a namespace of cluster `a-b`. Nothing is created in the
//! host's root network namespace: veth pairs are created directly inside their
//! namespaces, and interface names are per namespace — `eth0` in pods, nodes and the
//! control namespace; `br0` and `veth<host number>` in the underlay; `cni0` and
//! `veth<host number of the pod>` in a node.
//!
//! Pods are named `<workload>-<index>`: a workload gets one pod per entry of its
//! `nodes` list (payment-v1-0 on node-1, payment-v1-1 on node-2).
//!
//! # Addressing (defaults; the topology may override them)
//!
//! - Underlay `172.30.0.0/24`: the control namespace is `.2`, nodes `.11`, `.12`, ….
//! - Node `i` (from 1) has the pod prefix `10.244.i.0/24`; its bridge `cni0` holds
//!   `.1`, the pods' default gateway; pods get `.2`, `.3`, … in topology order.
//!   Each node routes the other nodes' pod prefixes via their underlay addresses and
//!   has `net.ipv4.ip_forward=1`; the control namespace routes every pod prefix via
//!   its node, so pods and the control plane reach each other.
//! - Service VIPs from `10.96.0.10` up, in topology order. There is no kube-proxy:
//!   without the mesh nothing answers on a VIP (the mesh daemon resolves VIPs).
//!
//! # Cgroups
//!
//! ```text
//! ambit-<name>/
//!   control/<process>        processes started with spawn_control (controller)
//!   control/exec             short-lived commands in the control netns
//!   <node>/pods/<ns>_<pod>   one per pod: its workload and everything exec'd in it
//!   <node>/system/<process>  processes started with spawn_in_node (node daemon)
//!   <node>/system/exec       short-lived commands in the node netns
//! ```
//!
//! `<node>/pods` holds only pod cgroups, so a node daemon can attach its cgroup eBPF
//! programs there. `down` kills with `cgroup.kill` and removes the tree bottom-up.
//!
//! # State directory
//!
//! ```text
//! /run/ambit/clusters/<name>/
//!   state.json               the Status (what `status --json` prints) plus pids
//!   config/00-cluster.yaml   generated Kubernetes objects (see `manifests`)
//!   config/<group>_<kind>_<ns>_<name>.yaml   objects added with apply
//!   controller/              the mesh controller's state (root CA), with `--mesh`
//!   tokens/                  node and waypoint bootstrap tokens (0600), with `--mesh`
//!                            (module mesh)
//!   nodes/<node>/            a node daemon's state dir (its bpffs mount `bpf/`) and
//!                            enrolment socket `cni.sock`, with the mesh data plane
//!   waypoints/<ns>_<pod>/    a waypoint's state dir, with `--mesh`
//!   logs/pod_<ns>_<pod>.log  workload stdout+stderr
//!   logs/node_<node>_<process>.log, logs/control_<process>.log,
//!   logs/pod_<ns>_<pod>_<process>.log       processes started with spawn_*
//! ```
//!
//! # Processes
//!
//! A process joins its netns with `setns` and its cgroup by writing `0` to
//! `cgroup.procs`, both in `pre_exec` on descriptors opened before the fork; it runs
//! in its own session with its output in a log file, so `up` may return while the
//! workloads keep running. Each pod runs `ambit-echo serve --pod <pod> --namespace
//! <ns> [--version <version label>]` from the binaries directory unless its workload
//! names a `command`, with `POD_NAME`, `POD_NAMESPACE`, `POD_IP`, `NODE_NAME` and
//! `SERVICE_ACCOUNT` in its environment. `up` returns once every workload listens on
//! its ready ports (read from `/proc/<pid>/net/tcp`, i.e. inside the pod's netns).
//!
//! # Mesh
//!
//! With [`Options::mesh`], `up` also starts the controller ([`Cluster::start_mesh_control`]);
//! with [`MeshOptions::daemons`] on, it starts the controller and one `ambit-node` per
//! node ([`Cluster::start_mesh_daemons`]) *before* the workloads, and hands each pod to
//! the real `ambit-cni` plugin with CNI ADD after creating its network namespace and
//! before starting its workload, as a kubelet would (module [`cni`]); an ADD that fails
//! fails `up` with the plugin's error JSON. Teardown calls CNI DEL (best effort) for
//! those pods before it kills anything, and unmounts what the daemons mounted under the
//! state directory. With [`MeshOptions::mode`] set to [`DataPlaneMode::Sidecar`] no
//! node daemon runs and no CNI call is made: every meshed pod gets `ambit-node --mode
//! sidecar` in its own namespace and cgroup, ready before its workload starts
//! ([`Cluster::start_mesh_sidecars`]). [`DataPlaneMode::SidecarL7`] also runs the
//! waypoint's L7 engine inside the pods a waypoint's Service selects
//! ([`Cluster::start_mesh_l7_engines`], module [`mesh`]).
//!
//! # Waypoints
//!
//! A namespace's `waypoints` (see [`topology::WaypointSpec`]) become a Gateway of
//! class `ambit-waypoint` in `00-cluster.yaml` and pods `<name>-<index>` (addresses
//! after every workload pod's, so adding a waypoint moves nothing) labelled
//! `gateway.networking.k8s.io/gateway-name: <name>`, with service account `<name>`
//! and no workload process. With the mesh, the controller gets a bootstrap token per
//! waypoint and `up` starts `ambit-waypoint` in each waypoint pod once the control
//! plane (and the node daemons) are up, waiting for its readiness
//! ([`Cluster::start_mesh_waypoints`]). Traffic goes through a waypoint once a Service
//! or Namespace carries `ambit.dev/use-waypoint: <name>`: in the topology
//! (`services[].labels`) or at run time with [`Cluster::label_service`] /
//! [`Cluster::label_namespace`], which rewrite the generated objects.
//!
//! # Teardown
//!
//! [`Cluster::down`], dropping an owning [`Cluster`], [`down`], [`down_all`] and
//! [`down_stale_test_clusters`] all: kill the cgroup tree, kill whatever else is in
//! the cluster's namespaces or carries its `AMBIT_CLUSTER` mark, delete the
//! namespaces (their links, routes and `/run/netns` mounts go with them), remove the
//! cgroups, and remove the state directory last. They work from the state file and,
//! when it is missing or corrupt, by name alone.

pub mod addr;
mod cgroup;
mod cluster;
mod cmd;
pub mod cni;
pub mod manifests;
pub mod mesh;
mod names;
mod netns;
mod process;
pub mod status;
mod teardown;
pub mod topology;

use std::path::PathBuf;

pub use crate::{
    addr::Ipv4Cidr,
    cgroup::cgroup2_mount,
    cluster::{
        CLUSTER_ENV, Cluster, DEFAULT_READY_TIMEOUT, DEFAULT_STATE_ROOT, ECHO_BINARY, Options,
        Process, STATE_FILE,
    },
    cni::{CniCommand, PodCni},
    manifests::{CLUSTER_FILE, Deleted, ManifestError, ObjectRef},
    mesh::{
        ControllerInfo, DaemonInfo, DataPlaneMode, L7_ENGINE_PROCESS, L7EnginePlacement, MeshInfo,
        MeshOptions, SidecarInfo, WaypointProcessInfo,
    },
    names::{
        ClusterName, DEFAULT_CLUSTER_NAME, MAX_CLUSTER_NAME_LEN, PodRef, RESOURCE_PREFIX,
        TEST_NAME_PREFIX,
    },
    netns::NETNS_DIR,
    process::log_tail,
    status::{NodeInfo, Place, PodInfo, ProcessInfo, ServiceInfo, Status, WaypointInfo},
    teardown::{
        TeardownReport, down, down_all, down_all_in, down_stale_test_clusters, list_clusters,
    },
    topology::{DEFAULT_TOPOLOGY_YAML, Topology, TopologyError, WaypointSpec},
};

/// What went wrong in the simulated cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cluster name is not acceptable.
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A pod reference is not `NAMESPACE/POD`.
    #[error("invalid pod reference {0:?}: expected NAMESPACE/POD")]
    InvalidPodRef(String),
    /// A process name given to `spawn_*` is not acceptable.
    #[error("invalid process name {name:?}: {reason}")]
    InvalidProcessName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The topology was rejected.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A manifest was rejected.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A helper program (`ip`, `sysctl`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// A helper program could not be started.
    #[error("starting `{command}`")]
    CommandStart {
        /// The command line.
        command: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file-system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Serialising the state failed.
    #[error("serialising the cluster state")]
    Json(#[source] serde_json::Error),
    /// Serialising YAML failed.
    #[error("serialising {what} as YAML")]
    Yaml {
        /// What.
        what: String,
        /// The error.
        #[source]
        source: serde_yaml::Error,
    },
    /// Something named like the cluster exists already.
    #[error(
        "cluster {name} already exists ({found}); remove it with `cargo xtask cluster down --name {name}`"
    )]
    AlreadyExists {
        /// The cluster.
        name: String,
        /// What was found.
        found: String,
    },
    /// There is no state file for the cluster.
    #[error("cluster {name} is not running (no state file at {})", path.display())]
    NotFound {
        /// The cluster.
        name: String,
        /// Where the state file would be.
        path: PathBuf,
    },
    /// The state file cannot be read as a state.
    #[error("state file {} is corrupt", path.display())]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },
    /// No such pod.
    #[error("no pod {0} in the cluster")]
    UnknownPod(String),
    /// The topology cannot run in the asked mesh mode.
    #[error("{what}: {reason}")]
    MeshTopology {
        /// The object at fault.
        what: String,
        /// Why.
        reason: String,
    },
    /// No such node.
    #[error("no node {0:?} in the cluster")]
    UnknownNode(String),
    /// No such Namespace.
    #[error("no namespace {0:?} in the cluster")]
    UnknownNamespace(String),
    /// No such Service.
    #[error("no service {0} in the cluster (expected NAMESPACE/NAME)")]
    UnknownService(String),
    /// The default workload needs the binaries directory.
    #[error("no binaries directory configured (Options::binaries_dir), needed for ambit-echo")]
    NoBinariesDir,
    /// A binary is missing.
    #[error("binary {} not found (build the workspace binaries: cargo build --bins)", path.display())]
    MissingBinary {
        /// Where it was expected.
        path: PathBuf,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup2 file system mounted (see /proc/mounts)")]
    NoCgroup2,
    /// A command line without a program.
    #[error("empty command")]
    EmptyCommand,
    /// A process could not be started.
    #[error("starting {what}")]
    Spawn {
        /// What.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A process with that name already runs at that place.
    #[error("a process named {name} already runs in {place} (pid {pid})")]
    ProcessRunning {
        /// The name.
        name: String,
        /// Where.
        place: String,
        /// Its pid.
        pid: u32,
    },
    /// A process died while it was awaited.
    #[error("{what} exited ({status}); last lines of {}:\n{tail}", log.display())]
    Exited {
        /// Which process.
        what: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A process did not listen in time.
    #[error("{what} is not listening on {ports:?} after {timeout:?}; last lines of {}:\n{tail}", log.display())]
    NotListening {
        /// Which process.
        what: String,
        /// The ports awaited.
        ports: Vec<u16>,
        /// How long was waited.
        timeout: std::time::Duration,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A process did not become ready in time.
    #[error("{what} is not ready after {timeout:?} (last answer: {last}); last lines of {}:\n{tail}", log.display())]
    NotReady {
        /// Which process.
        what: String,
        /// How long was waited.
        timeout: std::time::Duration,
        /// The last readiness answer or error.
        last: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The mesh part needed is not running: the daemons need the control plane
    /// ([`Cluster::start_mesh_control`]), CNI calls need the node's daemon
    /// ([`Cluster::start_mesh_daemons`]).
    #[error("the mesh is not started far enough (control plane, then node daemons)")]
    MeshNotStarted,
    /// The CNI plugin failed (for ADD: the pod cannot start, as under a kubelet).
    #[error("{what} failed ({status}): {stdout}{}", if stderr.is_empty() { String::new() } else { format!("\nplugin stderr: {stderr}") })]
    CniFailed {
        /// Which call.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed: the CNI error JSON.
        stdout: String,
        /// Its notes.
        stderr: String,
    },
    /// Processes stayed in a cgroup after it was killed.
    #[error("cgroup {} still has processes {pids:?} after cgroup.kill", path.display())]
    StillPopulated {
        /// The cgroup.
        path: PathBuf,
        /// Its members.
        pids: Vec<i32>,
    },
    /// A process survived SIGKILL (e.g. stuck in the kernel).
    #[error("process {pid} survived SIGKILL")]
    ProcessSurvived {
        /// Its pid.
        pid: u32,
    },
    /// Parts of a teardown failed (the rest was still done).
    #[error("tearing down cluster {name}: {}", problems.iter().map(|e| error_chain(e)).collect::<Vec<_>>().join("; "))]
    Teardown {
        /// The cluster.
        name: String,
        /// Everything that failed.
        problems: Vec<Error>,
    },
}

/// An error with its causes, `outer: inner: innermost`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
