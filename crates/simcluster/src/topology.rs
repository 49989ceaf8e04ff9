//! The topology file: which nodes, namespaces, workloads and services a simulated
//! cluster has, and the address plan derived from it.
//!
//! The format is YAML with camelCase keys; unknown keys are errors, so a typo is
//! reported instead of ignored. `topologies/default.yaml` in this crate is the
//! annotated reference (it is also [`Topology::default_shop`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    addr::Ipv4Cidr,
    names::{RESERVED_NODE_NAMES, check_dns_label},
};

/// The default topology's YAML text ("a small shop", see the crate docs).
pub const DEFAULT_TOPOLOGY_YAML: &str = include_str!("../topologies/default.yaml");

/// First host number (inside the underlay prefix) handed to nodes; lower numbers are
/// kept for the cluster's own namespaces (`.2` is the control namespace).
const FIRST_NODE_HOST: u32 = 11;
/// Host number of the control namespace on the underlay.
const CONTROL_HOST: u32 = 2;
/// Host number of a node's bridge (the pods' gateway) inside its pod prefix.
const GATEWAY_HOST: u32 = 1;
/// First host number handed to pods inside a node's pod prefix.
const FIRST_POD_HOST: u32 = 2;

/// The label naming the Gateway a waypoint pod belongs to.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Values of a waypoint's `istio.io/waypoint-for` label.
pub const WAYPOINT_FOR_VALUES: [&str; 4] = ["service", "workload", "all", "none"];

/// Ports the default workload (`ambit-echo serve`) listens on: HTTP and TCP echo.
pub const ECHO_PORTS: [u16; 2] = [8080, 9090];

/// Why a topology was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The topology file could not be read.
    #[error("reading topology file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a topology (bad YAML, unknown or missing field, wrong type).
    #[error("parsing topology {origin}")]
    Parse {
        /// The file, or `<string>`.
        origin: String,
        /// The parser's error, which names the field and line.
        #[source]
        source: serde_yaml::Error,
    },
    /// A field holds a value that cannot be used.
    #[error("topology field `{field}`: {reason}")]
    Invalid {
        /// Path of the field, e.g. `namespaces[0].workloads[1].nodes[0]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A cluster topology. Build one from YAML ([`Topology::from_file`],
/// [`Topology::from_yaml`]), take [`Topology::default_shop`], or fill the fields in
/// code; [`Topology::validate`] (also run by `Cluster::up`) checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// Address ranges.
    #[serde(default)]
    pub network: Network,
    /// The nodes, in order (the order decides default addresses).
    pub nodes: Vec<NodeSpec>,
    /// Kubernetes namespaces with their workloads and services.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
}

/// Address ranges of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// The shared L2 segment of the nodes (default `172.30.0.0/24`). Node `i` (from 0)
    /// gets host `11 + i` unless it names its own `ip`; host 2 is the control namespace.
    #[serde(default = "default_underlay")]
    pub underlay_cidr: Ipv4Cidr,
    /// First Service VIP (default `10.96.0.10`); Services get consecutive addresses
    /// in topology order unless they name their own `clusterIP`.
    #[serde(default = "default_service_ip_start")]
    pub service_ip_start: Ipv4Addr,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Node name (DNS label; `underlay` and `control` are reserved).
    pub name: String,
    /// Underlay address (default: see [`Network::underlay_cidr`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Pod prefix (default `10.244.<i>.0/24` for the i-th node, counting from 1). The
    /// first host is the node's bridge and the pods' gateway; pods follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Cidr>,
}

/// A Kubernetes namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Namespace name (DNS label).
    pub name: String,
    /// Namespace labels (e.g. `ambit.dev/dataplane-mode: ambient`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Workloads; each becomes one pod per entry of its `nodes`.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Waypoints: each becomes a Gateway of class `ambit-waypoint` and one waypoint
    /// pod per entry of its `nodes`, running `ambit-waypoint` once the mesh is up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointSpec>,
}

/// A waypoint (DESIGN §4): a Gateway API `Gateway` with `gatewayClassName:
/// ambit-waypoint` and its pods `<name>-<index>`, labelled
/// `gateway.networking.k8s.io/gateway-name: <name>` and running as service account
/// `<name>` (the identity the controller expects of the waypoint). Services or
/// namespaces use it with the label `ambit.dev/use-waypoint: <name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointSpec {
    /// Gateway name (DNS label); also its pods' service account.
    pub name: String,
    /// Placement: one waypoint pod per entry, pod `i` on `nodes[i]`. Empty: no pods
    /// of its own (in sidecar L7 its engines run inside the pods its Service selects;
    /// otherwise the waypoint has no instance and its traffic is refused).
    pub nodes: Vec<String>,
    /// What traffic it carries: the Gateway's `istio.io/waypoint-for` label,
    /// `service` (the default when unset), `workload`, `all` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint_for: Option<String>,
}

/// A workload (think Deployment): pods named `<name>-<index>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Workload name (DNS label).
    pub name: String,
    /// Service account of its pods (default `default`).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Placement: one pod per entry, pod `i` on `nodes[i]`.
    pub nodes: Vec<String>,
    /// The pod's process, overriding the default `ambit-echo serve --pod <pod>
    /// --namespace <ns> [--version <version label>]`. A program without `/` is looked
    /// up in the binaries directory first, then in `PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// TCP ports the process must listen on before the pod counts as ready (default:
    /// [`ECHO_PORTS`] for the default command, none for a custom one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ports: Option<Vec<u16>>,
}

/// A ClusterIP Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name (DNS label).
    pub name: String,
    /// Label selector over the namespace's pods.
    pub selector: BTreeMap<String, String>,
    /// Service labels (e.g. `ambit.dev/use-waypoint: waypoint`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Ports.
    pub ports: Vec<ServicePortSpec>,
    /// VIP (default: the next free address from [`Network::service_ip_start`]).
    #[serde(rename = "clusterIP", default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv4Addr>,
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    /// Port name (e.g. `http`, `tcp-echo`; the prefix is the protocol hint as in Istio).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Pod port (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a Service port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// The address plan of a valid topology: what [`Topology::resolve`] computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Underlay address of the control namespace.
    pub control_ip: Ipv4Addr,
    /// Nodes in topology order.
    pub nodes: Vec<ResolvedNode>,
    /// Pods in topology order (namespaces, workloads, placement entries).
    pub pods: Vec<ResolvedPod>,
    /// Services in topology order.
    pub services: Vec<ResolvedService>,
}

/// A node's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNode {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub ip: Ipv4Addr,
    /// Pod prefix.
    pub pod_cidr: Ipv4Cidr,
    /// The node bridge's address, the pods' default gateway.
    pub gateway: Ipv4Addr,
}

/// A pod's placement and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPod {
    /// Namespace.
    pub namespace: String,
    /// Pod name, `<workload>-<index>`.
    pub name: String,
    /// Index of the namespace within `namespaces`.
    pub namespace_index: usize,
    /// What the pod is an instance of.
    pub owner: PodOwner,
    /// Node name.
    pub node: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
}

/// What a pod is an instance of, by index within its namespace's lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOwner {
    /// A workload (`workloads[i]`).
    Workload(usize),
    /// A waypoint (`waypoints[i]`).
    Waypoint(usize),
}

/// A Service's VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// VIP.
    pub cluster_ip: Ipv4Addr,
}

fn default_underlay() -> Ipv4Cidr {
    Ipv4Cidr::new(Ipv4Addr::new(172, 30, 0, 0), 24)
}

fn default_service_ip_start() -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 10)
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Default for Network {
    fn default() -> Self {
        Self {
            underlay_cidr: default_underlay(),
            service_ip_start: default_service_ip_start(),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> TopologyError {
    TopologyError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Topology {
    /// The default topology, a small shop: see `topologies/default.yaml`.
    pub fn default_shop() -> Self {
        #[expect(
            clippy::expect_used,
            reason = "the embedded file is checked by a unit test"
        )]
        Self::from_yaml(DEFAULT_TOPOLOGY_YAML).expect("embedded default topology is valid")
    }

    /// Reads and validates a topology file.
    pub fn from_file(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path.display().to_string())
    }

    /// Parses and validates topology YAML.
    pub fn from_yaml(text: &str) -> Result<Self, TopologyError> {
        Self::parse(text, "<string>".to_owned())
    }

    fn parse(text: &str, origin: String) -> Result<Self, TopologyError> {
        let topology: Topology =
            serde_yaml::from_str(text).map_err(|source| TopologyError::Parse { origin, source })?;
        topology.validate()?;
        Ok(topology)
    }

    /// Checks names, references and addresses; the error names the offending field.
    pub fn validate(&self) -> Result<(), TopologyError> {
        self.resolve().map(drop)
    }

    /// Validates the topology and computes its address plan.
    pub fn resolve(&self) -> Result<Resolved, TopologyError> {
        let underlay = self.network.underlay_cidr;
        if underlay.prefix_len() > 28 {
            return Err(invalid(
                "network.underlayCidr",
                "must be /28 or larger (nodes start at host 11)",
            ));
        }
        let control_ip = underlay
            .host(CONTROL_HOST)
            .ok_or_else(|| invalid("network.underlayCidr", "too small"))?;

        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one node is needed"));
        }
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut node_index = HashMap::new();
        let mut taken_ips = BTreeMap::from([(control_ip, "the control namespace".to_owned())]);
        for (i, spec) in self.nodes.iter().enumerate() {
            let field = format!("nodes[{i}]");
            check_dns_label(&spec.name).map_err(|r| invalid(format!("{field}.name"), r))?;
            if RESERVED_NODE_NAMES.contains(&spec.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is reserved", spec.name),
                ));
            }
            if node_index.insert(spec.name.clone(), i).is_some() {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("duplicate node {:?}", spec.name),
                ));
            }
            let ip = match spec.ip {
                Some(ip) => {
                    if !underlay.contains(ip)
                        || underlay
                            .host(u32::from(ip) - u32::from(underlay.network()))
                            .is_none()
                    {
                        return Err(invalid(
                            format!("{field}.ip"),
                            format!("{ip} is not a host address of {underlay}"),
                        ));
                    }
                    ip
                }
                None => u32::try_from(i)
                    .ok()
                    .and_then(|i| underlay.host(FIRST_NODE_HOST + i))
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}.ip"),
                            format!("{underlay} has no address left"),
                        )
                    })?,
            };
            if let Some(owner) = taken_ips.insert(ip, spec.name.clone()) {
                return Err(invalid(
                    format!("{field}.ip"),
                    format!("{ip} is already used by {owner}"),
                ));
            }
            let pod_cidr = match spec.pod_cidr {
                Some(c) => c,
                None => u8::try_from(i + 1)
                    .map(|n| Ipv4Cidr::new(Ipv4Addr::new(10, 244, n, 0), 24))
                    .map_err(|_| {
                        invalid(
                            format!("{field}.podCidr"),
                            "no default pod prefix beyond 255 nodes",
                        )
                    })?,
            };
            if pod_cidr.prefix_len() > 29 {
                return Err(invalid(format!("{field}.podCidr"), "must be /29 or larger"));
            }
            if pod_cidr.overlaps(&underlay) {
                return Err(invalid(
                    format!("{field}.podCidr"),
                    format!("{pod_cidr} overlaps the underlay {underlay}"),
                ));
            }
            if let Some(other) = nodes
                .iter()
                .find(|n: &&ResolvedNode| n.pod_cidr.overlaps(&pod_cidr))
            {
                return Err(invalid(
                    format!("{field}.podCidr"),
                    format!(
                        "{pod_cidr} overlaps {} of node {}",
                        other.pod_cidr, other.name
                    ),
                ));
            }
            let gateway = pod_cidr
                .host(GATEWAY_HOST)
                .ok_or_else(|| invalid(format!("{field}.podCidr"), "too small"))?;
            nodes.push(ResolvedNode {
                name: spec.name.clone(),
                ip,
                pod_cidr,
                gateway,
            });
        }

        let mut pods = Vec::new();
        let mut next_pod_host: Vec<u32> = vec![FIRST_POD_HOST; nodes.len()];
        let mut namespaces = BTreeSet::new();
        let mut namespace_pod_names: Vec<BTreeSet<String>> = Vec::new();
        for (n, ns) in self.namespaces.iter().enumerate() {
            let field = format!("namespaces[{n}]");
            check_dns_label(&ns.name).map_err(|r| invalid(format!("{field}.name"), r))?;
            if !namespaces.insert(ns.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("duplicate namespace {:?}", ns.name),
                ));
            }
            check_labels(&ns.labels, &format!("{field}.labels"))?;
            let mut workloads = BTreeSet::new();
            let mut pod_names = BTreeSet::new();
            for (w, wl) in ns.workloads.iter().enumerate() {
                let field = format!("{field}.workloads[{w}]");
                check_dns_label(&wl.name).map_err(|r| invalid(format!("{field}.name"), r))?;
                if !workloads.insert(wl.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!("duplicate workload {:?}", wl.name),
                    ));
                }
                check_dns_label(&wl.service_account)
                    .map_err(|r| invalid(format!("{field}.serviceAccount"), r))?;
                check_labels(&wl.labels, &format!("{field}.labels"))?;
                if wl.nodes.is_empty() {
                    return Err(invalid(
                        format!("{field}.nodes"),
                        "must place at least one pod",
                    ));
                }
                if let Some(cmd) = &wl.command
                    && cmd.first().is_none_or(String::is_empty)
                {
                    return Err(invalid(format!("{field}.command"), "must name a program"));
                }
                if let Some(ports) = &wl.ready_ports
                    && let Some(p) = ports.iter().position(|&p| p == 0)
                {
                    return Err(invalid(format!("{field}.readyPorts[{p}]"), "port 0"));
                }
                for (r, node) in wl.nodes.iter().enumerate() {
                    let nfield = format!("{field}.nodes[{r}]");
                    let &ni = node_index
                        .get(node)
                        .ok_or_else(|| invalid(&nfield, format!("unknown node {node:?}")))?;
                    let name = format!("{}-{r}", wl.name);
                    check_dns_label(&name).map_err(|r| {
                        invalid(format!("{field}.name"), format!("pod name {name:?} {r}"))
                    })?;
                    pod_names.insert(name.clone());
                    let host = next_pod_host[ni];
                    next_pod_host[ni] += 1;
                    let ip = nodes[ni].pod_cidr.host(host).ok_or_else(|| {
                        invalid(
                            &nfield,
                            format!("pod prefix {} of node {node} is full", nodes[ni].pod_cidr),
                        )
                    })?;
                    pods.push(ResolvedPod {
                        namespace: ns.name.clone(),
                        name,
                        namespace_index: n,
                        owner: PodOwner::Workload(w),
                        node: node.clone(),
                        ip,
                    });
                }
            }
            namespace_pod_names.push(pod_names);
        }
        // Waypoint pods after every workload pod, so adding a waypoint moves no
        // workload's address.
        for (n, ns) in self.namespaces.iter().enumerate() {
            let field = format!("namespaces[{n}]");
            let mut names = BTreeSet::new();
            for (w, wp) in ns.waypoints.iter().enumerate() {
                let field = format!("{field}.waypoints[{w}]");
                check_dns_label(&wp.name).map_err(|r| invalid(format!("{field}.name"), r))?;
                if !names.insert(wp.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!("duplicate waypoint {:?}", wp.name),
                    ));
                }
                if let Some(v) = &wp.waypoint_for
                    && !WAYPOINT_FOR_VALUES.contains(&v.as_str())
                {
                    return Err(invalid(
                        format!("{field}.waypointFor"),
                        format!("{v:?} is not one of {}", WAYPOINT_FOR_VALUES.join(", ")),
                    ));
                }
                for (r, node) in wp.nodes.iter().enumerate() {
                    let nfield = format!("{field}.nodes[{r}]");
                    let &ni = node_index
                        .get(node)
                        .ok_or_else(|| invalid(&nfield, format!("unknown node {node:?}")))?;
                    let name = format!("{}-{r}", wp.name);
                    check_dns_label(&name).map_err(|r| {
                        invalid(format!("{field}.name"), format!("pod name {name:?} {r}"))
                    })?;
                    if !namespace_pod_names[n].insert(name.clone()) {
                        return Err(invalid(
                            format!("{field}.name"),
                            format!("pod name {name:?} is taken by a workload's pod"),
                        ));
                    }
                    let host = next_pod_host[ni];
                    next_pod_host[ni] += 1;
                    let ip = nodes[ni].pod_cidr.host(host).ok_or_else(|| {
                        invalid(
                            &nfield,
                            format!("pod prefix {} of node {node} is full", nodes[ni].pod_cidr),
                        )
                    })?;
                    pods.push(ResolvedPod {
                        namespace: ns.name.clone(),
                        name,
                        namespace_index: n,
                        owner: PodOwner::Waypoint(w),
                        node: node.clone(),
                        ip,
                    });
                }
            }
        }

        let mut services = Vec::new();
        let mut vips = BTreeSet::new();
        // Explicit VIPs first, so automatic ones step around them.
        for (n, ns) in self.namespaces.iter().enumerate() {
            for (s, svc) in ns.services.iter().enumerate() {
                if let Some(ip) = svc.cluster_ip {
                    let field = format!("namespaces[{n}].services[{s}].clusterIP");
                    self.check_vip(ip, &nodes, &field)?;
                    if !vips.insert(ip) {
                        return Err(invalid(field, format!("{ip} is used by another service")));
                    }
                }
            }
        }
        let mut next_vip = u32::from(self.network.service_ip_start);
        for (n, ns) in self.namespaces.iter().enumerate() {
            let mut names = BTreeSet::new();
            for (s, svc) in ns.services.iter().enumerate() {
                let field = format!("namespaces[{n}].services[{s}]");
                check_dns_label(&svc.name).map_err(|r| invalid(format!("{field}.name"), r))?;
                if !names.insert(svc.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!("duplicate service {:?}", svc.name),
                    ));
                }
                check_labels(&svc.selector, &format!("{field}.selector"))?;
                check_labels(&svc.labels, &format!("{field}.labels"))?;
                if svc.selector.is_empty() {
                    return Err(invalid(
                        format!("{field}.selector"),
                        "must select pods by at least one label",
                    ));
                }
                if svc.ports.is_empty() {
                    return Err(invalid(
                        format!("{field}.ports"),
                        "at least one port is needed",
                    ));
                }
                let mut port_names = BTreeSet::new();
                let mut port_numbers = BTreeSet::new();
                for (p, port) in svc.ports.iter().enumerate() {
                    let pfield = format!("{field}.ports[{p}]");
                    check_dns_label(&port.name)
                        .map_err(|r| invalid(format!("{pfield}.name"), r))?;
                    if !port_names.insert(port.name.as_str()) {
                        return Err(invalid(
                            format!("{pfield}.name"),
                            format!("duplicate port name {:?}", port.name),
                        ));
                    }
                    if port.port == 0 {
                        return Err(invalid(format!("{pfield}.port"), "port 0"));
                    }
                    if port.target_port == Some(0) {
                        return Err(invalid(format!("{pfield}.targetPort"), "port 0"));
                    }
                    if !port_numbers.insert((port.port, port.protocol.as_str())) {
                        return Err(invalid(
                            format!("{pfield}.port"),
                            format!("duplicate port {}", port.port),
                        ));
                    }
                }
                let cluster_ip = match svc.cluster_ip {
                    Some(ip) => ip,
                    None => loop {
                        let ip = Ipv4Addr::from(next_vip);
                        next_vip = next_vip.checked_add(1).ok_or_else(|| {
                            invalid("network.serviceIpStart", "ran out of addresses")
                        })?;
                        if !vips.contains(&ip) {
                            self.check_vip(ip, &nodes, "network.serviceIpStart")?;
                            vips.insert(ip);
                            break ip;
                        }
                    },
                };
                services.push(ResolvedService {
                    namespace: ns.name.clone(),
                    name: svc.name.clone(),
                    cluster_ip,
                });
            }
        }
        Ok(Resolved {
            control_ip,
            nodes,
            pods,
            services,
        })
    }

    fn check_vip(
        &self,
        ip: Ipv4Addr,
        nodes: &[ResolvedNode],
        field: &str,
    ) -> Result<(), TopologyError> {
        if self.network.underlay_cidr.contains(ip) {
            return Err(invalid(
                field,
                format!("{ip} lies in the underlay {}", self.network.underlay_cidr),
            ));
        }
        if let Some(n) = nodes.iter().find(|n| n.pod_cidr.contains(ip)) {
            return Err(invalid(
                field,
                format!("{ip} lies in the pod prefix of node {}", n.name),
            ));
        }
        if ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(invalid(field, format!("{ip} is not a unicast address")));
        }
        Ok(())
    }

    /// The workload a resolved pod belongs to (`None` for a waypoint pod).
    pub(crate) fn workload(&self, pod: &ResolvedPod) -> Option<&WorkloadSpec> {
        match pod.owner {
            PodOwner::Workload(w) => self.namespaces[pod.namespace_index].workloads.get(w),
            PodOwner::Waypoint(_) => None,
        }
    }

    /// The waypoint a resolved pod belongs to (`None` for a workload pod).
    pub(crate) fn waypoint(&self, pod: &ResolvedPod) -> Option<&WaypointSpec> {
        match pod.owner {
            PodOwner::Workload(_) => None,
            PodOwner::Waypoint(w) => self.namespaces[pod.namespace_index].waypoints.get(w),
        }
    }

    /// Adds waypoint `name` in `namespace` with one pod per entry of `nodes` (a
    /// topology change before `Cluster::up`; validated there).
    pub fn with_waypoint(mut self, namespace: &str, name: &str, nodes: &[&str]) -> Self {
        let spec = WaypointSpec {
            name: name.to_owned(),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            waypoint_for: None,
        };
        match self.namespaces.iter_mut().find(|n| n.name == namespace) {
            Some(ns) => ns.waypoints.push(spec),
            None => self.namespaces.push(NamespaceSpec {
                name: namespace.to_owned(),
                labels: BTreeMap::new(),
                workloads: Vec::new(),
                services: Vec::new(),
                waypoints: vec![spec],
            }),
        }
        self
    }
}

pub(crate) fn check_labels(
    labels: &BTreeMap<String, String>,
    field: &str,
) -> Result<(), TopologyError> {
    for (k, v) in labels {
        let name = k.rsplit('/').next().unwrap_or(k);
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty()
            || name.len() > 63
            || !name.chars().all(ok_char)
            || k.matches('/').count() > 1
        {
            return Err(invalid(format!("{field}.{k}"), "invalid label key"));
        }
        if v.len() > 63 || !v.chars().all(ok_char) {
            return Err(invalid(
                format!("{field}.{k}"),
                format!("invalid label value {v:?}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_text(yaml: &str) -> String {
        let e = Topology::from_yaml(yaml).unwrap_err();
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(": ");
            s.push_str(&c.to_string());
            src = c.source();
        }
        s
    }

    #[test]
    fn default_shop_is_the_small_shop() {
        let t = Topology::default_shop();
        let r = t.resolve().unwrap();
        let nodes: Vec<_> = r
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.ip.to_string(), n.pod_cidr.to_string()))
            .collect();
        assert_eq!(
            nodes,
            [
                (
                    "node-1",
                    "172.30.0.11".to_owned(),
                    "10.244.1.0/24".to_owned()
                ),
                (
                    "node-2",
                    "172.30.0.12".to_owned(),
                    "10.244.2.0/24".to_owned()
                )
            ]
        );
        let pods: Vec<_> = r
            .pods
            .iter()
            .map(|p| format!("{}/{}@{}={}", p.namespace, p.name, p.node, p.ip))
            .collect();
        assert_eq!(
            pods,
            [
                "production/checkout-0@node-1=10.244.1.2",
                "production/payment-v1-0@node-1=10.244.1.3",
                "production/payment-v1-1@node-2=10.244.2.2",
                "production/payment-v2-0@node-2=10.244.2.3",
                "production/inventory-0@node-2=10.244.2.4",
                "legacy/legacy-client-0@node-1=10.244.1.4",
            ]
        );
        let vips: Vec<_> = r
            .services
            .iter()
            .map(|s| format!("{}={}", s.name, s.cluster_ip))
            .collect();
        assert_eq!(
            vips,
            [
                "checkout=10.96.0.10",
                "payment=10.96.0.11",
                "inventory=10.96.0.12"
            ]
        );
        assert_eq!(r.control_ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(r.nodes[0].gateway, Ipv4Addr::new(10, 244, 1, 1));

        let prod = &t.namespaces[0];
        assert_eq!(prod.labels["ambit.dev/dataplane-mode"], "ambient");
        assert_eq!(prod.workloads[1].service_account, "payment");
        assert_eq!(t.namespaces[1].name, "legacy");
        assert!(t.namespaces[1].labels.is_empty());
        assert_eq!(t.namespaces[1].workloads[0].service_account, "default");
        let payment = &prod.services[1];
        assert_eq!(
            payment.selector,
            BTreeMap::from([("app".to_owned(), "payment".to_owned())])
        );
        assert_eq!(payment.ports[0].target_port, Some(8080));
        assert_eq!(payment.ports[1].name, "tcp-echo");
    }

    #[test]
    fn overrides_are_honoured_and_automatic_vips_step_around_explicit_ones() {
        let t = Topology::from_yaml(
            r#"
network: { underlayCidr: 192.168.50.0/24, serviceIpStart: 10.100.0.1 }
nodes:
  - { name: a, ip: 192.168.50.99, podCidr: 10.1.0.0/16 }
  - { name: b }
namespaces:
  - name: ns
    workloads: [{ name: w, nodes: [b, a, b], command: [sleep, infinity] }]
    services:
      - { name: s1, selector: { app: w }, ports: [{ name: p, port: 1 }] }
      - { name: s2, selector: { app: w }, ports: [{ name: p, port: 1 }], clusterIP: 10.100.0.1 }
"#,
        )
        .unwrap();
        let r = t.resolve().unwrap();
        assert_eq!(r.nodes[0].ip, Ipv4Addr::new(192, 168, 50, 99));
        assert_eq!(r.nodes[1].ip, Ipv4Addr::new(192, 168, 50, 12));
        assert_eq!(r.nodes[0].gateway, Ipv4Addr::new(10, 1, 0, 1));
        let ips: Vec<_> = r.pods.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.2.2", "10.1.0.2", "10.244.2.3"]);
        assert_eq!(r.services[0].cluster_ip, Ipv4Addr::new(10, 100, 0, 2));
        assert_eq!(r.services[1].cluster_ip, Ipv4Addr::new(10, 100, 0, 1));
    }

    #[test]
    fn bad_topologies_name_the_field() {
        let cases = [
            ("nodes: []", "`nodes`"),
            ("nodes: [{name: Node1}]", "`nodes[0].name`"),
            ("nodes: [{name: a}, {name: a}]", "`nodes[1].name`"),
            ("nodes: [{name: underlay}]", "`nodes[0].name`"),
            ("nodes: [{name: a, ip: 10.0.0.1}]", "`nodes[0].ip`"),
            (
                "nodes: [{name: a, podCidr: 172.30.0.0/16}]",
                "`nodes[0].podCidr`",
            ),
            (
                "nodes: [{name: a, podCidr: 10.0.0.0/16}, {name: b, podCidr: 10.0.5.0/24}]",
                "`nodes[1].podCidr`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, workloads: [{name: w, nodes: [b]}]}]",
                "`namespaces[0].workloads[0].nodes[0]`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, workloads: [{name: w, nodes: []}]}]",
                "`namespaces[0].workloads[0].nodes`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, workloads: [{name: w, nodes: [a], command: []}]}]",
                "`namespaces[0].workloads[0].command`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, labels: {'a/b/c': x}}]",
                "`namespaces[0].labels.a/b/c`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, services: [{name: s, selector: {a: b}, ports: []}]}]",
                "`namespaces[0].services[0].ports`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, services: [{name: s, selector: {a: b}, ports: [{name: p, port: 1}, {name: p, port: 2}]}]}]",
                "`namespaces[0].services[0].ports[1].name`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, services: [{name: s, selector: {a: b}, clusterIP: 10.244.1.7, ports: [{name: p, port: 1}]}]}]",
                "`namespaces[0].services[0].clusterIP`",
            ),
            (
                "nodes: [{name: a, podCidr: 10.0.0.0/29}]\nnamespaces: [{name: x, workloads: [{name: w, nodes: [a, a, a, a, a, a, a]}]}]",
                "`namespaces[0].workloads[0].nodes[5]`: pod prefix",
            ),
        ];
        for (yaml, want) in cases {
            let e = err_text(yaml);
            assert!(e.contains(want), "{yaml}\n  gave: {e}\n  want: {want}");
        }
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = err_text("nodes: [{name: a, nmae: b}]");
        assert!(e.contains("nmae"), "{e}");
        let e = err_text(
            "nodes: [{name: a}]\nnamespaces: [{name: x, services: [{name: s, selector: {a: b}, ports: [{name: p, port: 70000}]}]}]",
        );
        assert!(e.contains("port"), "{e}");
        let e = err_text("nodes: [{name: a}]\nnamespaces: [{name: x, workloads: [{nodes: [a]}]}]");
        assert!(e.contains("missing field `name`"), "{e}");
    }

    #[test]
    fn waypoints_are_placed_after_every_workload_and_checked() {
        let t = Topology::from_yaml(
            r#"
nodes: [{ name: a }, { name: b }]
namespaces:
  - name: ns
    waypoints: [{ name: wp, nodes: [b, a], waypointFor: all }]
    workloads: [{ name: w, nodes: [a, b] }]
  - name: other
    workloads: [{ name: x, nodes: [a] }]
"#,
        )
        .unwrap();
        let r = t.resolve().unwrap();
        let pods: Vec<_> = r
            .pods
            .iter()
            .map(|p| format!("{}/{}@{}={}", p.namespace, p.name, p.node, p.ip))
            .collect();
        assert_eq!(
            pods,
            [
                "ns/w-0@a=10.244.1.2",
                "ns/w-1@b=10.244.2.2",
                "other/x-0@a=10.244.1.3",
                "ns/wp-0@b=10.244.2.3",
                "ns/wp-1@a=10.244.1.4",
            ]
        );
        assert_eq!(r.pods[3].owner, PodOwner::Waypoint(0));
        assert!(t.workload(&r.pods[3]).is_none());
        assert_eq!(t.waypoint(&r.pods[3]).unwrap().name, "wp");

        let cases = [
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, waypoints: [{name: wp, nodes: [b]}]}]",
                "`namespaces[0].waypoints[0].nodes[0]`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, waypoints: [{name: wp, nodes: [a], waypointFor: everything}]}]",
                "`namespaces[0].waypoints[0].waypointFor`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, waypoints: [{name: wp, nodes: [a]}, {name: wp, nodes: [a]}]}]",
                "`namespaces[0].waypoints[1].name`",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, workloads: [{name: wp, nodes: [a]}], waypoints: [{name: wp, nodes: [a]}]}]",
                "taken by a workload",
            ),
            (
                "nodes: [{name: a}]\nnamespaces: [{name: x, services: [{name: s, selector: {a: b}, labels: {'a/b/c': x}, ports: [{name: p, port: 1}]}]}]",
                "`namespaces[0].services[0].labels.a/b/c`",
            ),
        ];
        for (yaml, want) in cases {
            let e = err_text(yaml);
            assert!(e.contains(want), "{yaml}\n  gave: {e}\n  want: {want}");
        }
    }
}
