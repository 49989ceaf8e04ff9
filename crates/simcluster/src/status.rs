//! What a running cluster consists of: the contents of `state.json` and of
//! `Cluster::status()` / `cargo xtask cluster status --json`.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    addr::Ipv4Cidr,
    names::{ClusterName, PodRef},
    netns,
    topology::Protocol,
};

/// Version of the `state.json` layout.
pub const STATE_VERSION: u32 = 1;

/// A cluster: every object it created and where to find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Layout version of this document ([`STATE_VERSION`]).
    pub version: u32,
    /// Cluster name.
    pub name: ClusterName,
    /// Whether `up` finished.
    pub phase: Phase,
    /// The process whose [`crate::Cluster`] handle tears the cluster down when dropped;
    /// `None` once detached (e.g. after `cargo xtask cluster up`).
    pub owner: Option<Owner>,
    /// `<state root>/<name>`: `state.json`, `config/`, `logs/`.
    pub state_dir: PathBuf,
    /// The Kubernetes YAML directory a controller in local mode reads.
    pub config_dir: PathBuf,
    /// The generated cluster objects, `<config dir>/00-cluster.yaml`.
    pub cluster_config: PathBuf,
    /// One log file per started process.
    pub logs_dir: PathBuf,
    /// The cluster's cgroup, `<cgroup2 mount>/ambit-<name>`.
    pub cgroup_root: PathBuf,
    /// Where workload binaries were looked up, if configured.
    pub binaries_dir: Option<PathBuf>,
    /// The namespace holding the nodes' shared bridge.
    pub underlay: UnderlayInfo,
    /// The control-plane namespace on the underlay (for the controller).
    pub control: ControlInfo,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Kubernetes namespaces.
    pub namespaces: Vec<NamespaceInfo>,
    /// Pods.
    pub pods: Vec<PodInfo>,
    /// Services.
    pub services: Vec<ServiceInfo>,
    /// Waypoints (Gateways of class `ambit-waypoint`) and their pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointInfo>,
    /// Processes started with `spawn_*` (daemons, controller, extra pod processes).
    pub processes: Vec<ProcessInfo>,
    /// The mesh control plane, once started (`up --mesh`, `Cluster::start_mesh_control`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::MeshInfo>,
}

/// Life-cycle phase recorded in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// `up` is building the cluster (or crashed while doing so).
    Creating,
    /// `up` finished.
    Running,
}

/// A process identified robustly against pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

/// The underlay namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnderlayInfo {
    /// Network namespace name (`ambit-<name>.underlay`).
    pub netns: String,
    /// The bridge joining the nodes (`br0`).
    pub bridge: String,
    /// The nodes' subnet.
    pub cidr: Ipv4Cidr,
}

/// The control-plane namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlInfo {
    /// Network namespace name (`ambit-<name>.control`).
    pub netns: String,
    /// Its underlay address (routes to every pod prefix go via the nodes).
    pub ip: Ipv4Addr,
    /// Parent cgroup of its processes (`<cgroup root>/control`).
    pub cgroup: PathBuf,
}

/// A node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Network namespace name (`ambit-<name>.<node>`).
    pub netns: String,
    /// Underlay address (on `eth0`).
    pub ip: Ipv4Addr,
    /// Pod prefix.
    pub pod_cidr: Ipv4Cidr,
    /// Address of the pod bridge, the pods' default gateway.
    pub gateway: Ipv4Addr,
    /// Name of the pod bridge (`cni0`).
    pub bridge: String,
    /// The node's pods subtree: holds only pod cgroups (attach per-node cgroup eBPF
    /// programs here).
    pub pods_cgroup: PathBuf,
    /// Parent cgroup of the node's system processes (daemons).
    pub system_cgroup: PathBuf,
}

/// A Kubernetes namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceInfo {
    /// Namespace name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The workload it belongs to.
    pub workload: String,
    /// Node name.
    pub node: String,
    /// Network namespace name (`ambit-<name>.<namespace>.<pod>`).
    pub netns: String,
    /// Pod IP (on `eth0`).
    pub ip: Ipv4Addr,
    /// Its default gateway (the node's bridge).
    pub gateway: Ipv4Addr,
    /// Its cgroup, `<node pods cgroup>/<namespace>_<pod>`.
    pub cgroup: PathBuf,
    /// Service account.
    pub service_account: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The workload's command line.
    pub command: Vec<String>,
    /// Ports the workload listens on once ready.
    pub ready_ports: Vec<u16>,
    /// Workload process id, once started.
    pub pid: Option<u32>,
    /// Workload log file.
    pub log: PathBuf,
    /// Whether the workload process is alive (computed when the status is taken).
    #[serde(default)]
    pub running: bool,
    /// The pod's CNI attachment, with the mesh data plane (`ambit-cni` ADD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<crate::cni::PodCni>,
    /// For a waypoint pod, its Gateway's name. A waypoint pod has no workload
    /// process of its own (`command` is empty): the mesh starts `ambit-waypoint` in
    /// it ([`crate::Cluster::start_mesh_waypoints`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

/// A waypoint: a Gateway of class `ambit-waypoint` in the config directory and its
/// pods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointInfo {
    /// Namespace of the Gateway.
    pub namespace: String,
    /// Gateway name (also its pods' service account).
    pub name: String,
    /// Its `istio.io/waypoint-for` label, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint_for: Option<String>,
    /// Its pods, in placement order.
    pub pods: Vec<PodRef>,
}

/// A ClusterIP Service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// VIP. Nothing routes it without the mesh: there is no kube-proxy.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    /// Label selector.
    pub selector: BTreeMap<String, String>,
    /// Service labels (e.g. `ambit.dev/use-waypoint`); see
    /// [`crate::Cluster::label_service`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// The pods the selector picks, in pod order.
    pub endpoints: Vec<PodRef>,
}

/// A Service port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name.
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Pod port.
    pub target_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// Where a process runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Place {
    /// The control-plane namespace, cgroup `control/<process>`.
    Control,
    /// A node's namespace, cgroup `<node>/system/<process>`.
    Node(String),
    /// A pod's namespace and the pod's own cgroup.
    Pod(PodRef),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Control => f.write_str("control"),
            Place::Node(n) => write!(f, "node {n}"),
            Place::Pod(p) => write!(f, "pod {p}"),
        }
    }
}

/// A process started with `spawn_*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInfo {
    /// Name given at spawn time (unique per place).
    pub name: String,
    /// Where it runs.
    pub place: Place,
    /// Process id.
    pub pid: u32,
    /// Its cgroup.
    pub cgroup: PathBuf,
    /// Its stdout/stderr.
    pub log: PathBuf,
    /// Command line.
    pub command: Vec<String>,
    /// Whether it is alive (computed when the status is taken).
    #[serde(default)]
    pub running: bool,
}

impl Status {
    /// The pod `namespace/name`.
    pub fn pod(&self, pod: &PodRef) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The waypoint `namespace/name`.
    pub fn waypoint(&self, namespace: &str, name: &str) -> Option<&WaypointInfo> {
        self.waypoints
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Every network namespace of the cluster, underlay first, pods last.
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = vec![self.underlay.netns.clone(), self.control.netns.clone()];
        v.extend(self.nodes.iter().map(|n| n.netns.clone()));
        v.extend(self.pods.iter().map(|p| p.netns.clone()));
        v
    }

    /// `state.json` inside the state directory.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(crate::cluster::STATE_FILE)
    }
}

impl PodInfo {
    /// `namespace/name`.
    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(&self.namespace, &self.name)
    }

    /// Path of its network namespace handle (`/run/netns/…`).
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
}

impl NodeInfo {
    /// Path of its network namespace handle (`/run/netns/…`).
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
}

impl ControlInfo {
    /// Path of its network namespace handle (`/run/netns/…`).
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
}

impl Owner {
    /// The calling process.
    pub fn current() -> Option<Self> {
        let pid = std::process::id();
        Some(Self {
            pid,
            start_time: crate::process::start_time(pid)?,
        })
    }

    /// Whether that very process (not a later one with the same pid) is alive.
    pub fn is_alive(&self) -> bool {
        crate::process::start_time(self.pid) == Some(self.start_time)
    }
}
