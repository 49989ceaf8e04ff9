//! Pods, Services and EndpointSlices into `Workload` and `Service` resources: mesh
//! membership, identities, endpoints and waypoint assignment.
//!
//! Decisions (DESIGN §2, §4; Istio ambient where the design is silent):
//!
//! - **Membership**: a pod is captured when it or its namespace carries
//!   `ambit.dev/dataplane-mode=ambient` (`istio.io/dataplane-mode` accepted); a pod
//!   label `…/dataplane-mode=none` opts out; host-network pods and waypoint instances
//!   are never captured (waypoints speak HBONE themselves).
//! - **Workload uid**: `metadata.uid`; without one (local YAML that sets none) the
//!   stable `<namespace>.<name>` (namespaces contain no dot, so it is unambiguous).
//! - **Endpoints**: from the EndpointSlices labelled `kubernetes.io/service-name`;
//!   when a service has none, from its selector over the pods of its namespace.
//! - **Waypoints**: a Service (or, failing a label on it, its Namespace) labelled
//!   `ambit.dev/use-waypoint=<gateway>` (`istio.io/use-waypoint` accepted; `none` opts
//!   out; `…/use-waypoint-namespace` names another namespace) is assigned that
//!   waypoint when the Gateway is an accepted waypoint carrying service traffic
//!   (`istio.io/waypoint-for` `service` or `all`). When the Gateway is missing or was
//!   rejected, the service is still assigned to it (fail closed: the destination
//!   daemon refuses traffic that did not come through a waypoint that cannot exist).
//!   Pods are assigned by their own label, or their namespace's, for waypoints that
//!   carry workload traffic (`workload` or `all`).
//! - **Waypoint addressing**: as istiod does, a waypoint's Service and ServiceAccount
//!   are named after its Gateway. When no such Service exists (local mode) one is
//!   synthesized: headless, port 15008, over the pods labelled
//!   `gateway.networking.k8s.io/gateway-name=<gateway>` in the Gateway's namespace.
//!   The waypoint's identity is `spiffe://<td>/ns/<gateway-ns>/sa/<gateway-name>`, so
//!   waypoint pods must run as that ServiceAccount.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ambit_api::config::v1::{
    AppProtocol, Endpoint, HealthStatus, NamespacedName, Service as ProtoService, ServicePort,
    TunnelProtocol, WaypointRef, Workload,
};
use ambit_identity::{SpiffeId, TrustDomain};
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;

use super::{CLUSTER_DOMAIN, GatewayKey, NodePods, Notes, ObjectKey, Objects};
use crate::model::{NamespaceName, WorkloadRef, waypoint::WaypointTrafficType};

/// Labels that enrol a pod or namespace (`ambient`) or opt a pod out (`none`).
pub const DATAPLANE_MODE_LABELS: [&str; 2] =
    ["ambit.dev/dataplane-mode", "istio.io/dataplane-mode"];
/// Labels that assign a waypoint to a service, namespace or pod.
pub const USE_WAYPOINT_LABELS: [&str; 2] = ["ambit.dev/use-waypoint", "istio.io/use-waypoint"];
/// Labels naming the namespace of the waypoint named by [`USE_WAYPOINT_LABELS`].
pub const USE_WAYPOINT_NAMESPACE_LABELS: [&str; 2] = [
    "ambit.dev/use-waypoint-namespace",
    "istio.io/use-waypoint-namespace",
];
/// Labels marking a pod as an instance of a waypoint Gateway.
pub const GATEWAY_NAME_LABELS: [&str; 2] = [
    "gateway.networking.k8s.io/gateway-name",
    "istio.io/gateway-name",
];
/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// HBONE port of a waypoint.
const HBONE_PORT: u32 = crate::model::waypoint::HBONE_PORT as u32;

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// A key from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// Which waypoint, if any, traffic to a destination must go through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// None: traffic goes straight to the endpoints.
    Direct,
    /// Through this (accepted) waypoint, which fronts the destination.
    Waypoint(GatewayKey),
    /// Through this waypoint, which does not exist or was rejected: traffic is refused.
    FailClosed(GatewayKey),
}

impl Binding {
    fn gateway(&self) -> Option<&GatewayKey> {
        match self {
            Self::Direct => None,
            Self::Waypoint(g) | Self::FailClosed(g) => Some(g),
        }
    }
}

/// What translation knows about a pod.
#[derive(Debug)]
pub(crate) struct PodInfo<'a> {
    pub pod: &'a Pod,
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: String,
    pub node: Option<&'a str>,
    pub ips: Vec<IpAddr>,
    pub service_account: &'a str,
    pub labels: BTreeMap<String, String>,
    pub captured: bool,
    pub waypoint_instance: bool,
    pub healthy: bool,
    pub binding: Binding,
}

impl PodInfo<'_> {
    fn workload_ref(&self) -> WorkloadRef {
        WorkloadRef {
            namespace: NamespaceName::new(self.namespace),
            labels: self.labels.clone(),
        }
    }
}

/// What translation knows about a service.
#[derive(Debug)]
pub(crate) struct ServiceInfo {
    pub proto: ProtoService,
    pub binding: Binding,
    /// `spec.selector`, when the Service has one.
    pub selector: Option<BTreeMap<String, String>>,
    /// Service port → numeric target port.
    pub target_ports: BTreeMap<u16, u16>,
}

/// The cluster as the mesh sees it.
#[derive(Debug)]
pub(crate) struct Mesh<'a> {
    trust_domain: TrustDomain,
    pods: Vec<PodInfo<'a>>,
    services: BTreeMap<ServiceKey, ServiceInfo>,
}

fn label<'l>(labels: Option<&'l BTreeMap<String, String>>, keys: &[&str]) -> Option<&'l str> {
    let labels = labels?;
    keys.iter().find_map(|k| labels.get(*k).map(String::as_str))
}

/// The mesh label value of a pod or namespace.
fn is_ambient(labels: Option<&BTreeMap<String, String>>) -> bool {
    label(labels, &DATAPLANE_MODE_LABELS) == Some("ambient")
}

/// The waypoint a labelled object asks for: `Some(None)` for an explicit opt-out
/// (`none`), `None` when it does not say.
fn requested_waypoint(
    labels: Option<&BTreeMap<String, String>>,
    own_namespace: &str,
) -> Option<Option<GatewayKey>> {
    let name = label(labels, &USE_WAYPOINT_LABELS)?;
    if name == "none" || name.is_empty() {
        return Some(None);
    }
    let namespace = label(labels, &USE_WAYPOINT_NAMESPACE_LABELS).unwrap_or(own_namespace);
    Some(Some(GatewayKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }))
}

/// The `WaypointRef` for `gateway`.
pub(crate) fn waypoint_ref(gateway: &GatewayKey, trust_domain: &TrustDomain) -> WaypointRef {
    let nn = NamespacedName {
        namespace: gateway.namespace.clone(),
        name: gateway.name.clone(),
    };
    WaypointRef {
        gateway: Some(nn.clone()),
        service: Some(nn),
        spiffe_id: waypoint_identity(gateway, trust_domain)
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        hbone_port: HBONE_PORT,
    }
}

/// The identity of waypoint `gateway`: its ServiceAccount is named after it.
pub fn waypoint_identity(gateway: &GatewayKey, trust_domain: &TrustDomain) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, &gateway.namespace, &gateway.name).ok()
}

/// The `Workload.uid` of a pod.
pub(crate) fn pod_uid(pod: &Pod) -> String {
    match pod.metadata.uid.as_deref() {
        Some(uid) if !uid.is_empty() && !uid.contains('/') => uid.to_owned(),
        _ => format!(
            "{}.{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        ),
    }
}

/// Istio's protocol selection for a service port: `appProtocol`, else the port
/// name's prefix (`http`, `http-…`, `grpc-…`, …).
fn app_protocol(app_protocol: Option<&str>, name: Option<&str>) -> AppProtocol {
    let from = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" | "http1" => Some(AppProtocol::Http1),
        "http2" | "kubernetes.io/h2c" | "h2c" | "grpc-web" => Some(AppProtocol::Http2),
        "grpc" => Some(AppProtocol::Grpc),
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" | "udp" => {
            Some(AppProtocol::Tcp)
        }
        _ => None,
    };
    if let Some(p) = app_protocol.and_then(from) {
        return p;
    }
    name.and_then(|n| from(n.split('-').next().unwrap_or(n)))
        .unwrap_or(AppProtocol::Unspecified)
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|list| list.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
        && let Ok(ip) = ip.parse()
    {
        ips.push(ip);
    }
    // IPv4 first, as the proto asks; otherwise in the order Kubernetes reports.
    ips.sort_by_key(IpAddr::is_ipv6);
    ips.dedup();
    ips
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The owning workload's name (Istio's `*_workload` telemetry label): a Deployment
/// through its ReplicaSet, another controller by name; a pod without owner is taken
/// to be one replica of a workload named by its name minus a trailing `-<index>` (the
/// simulated cluster's `<workload>-<index>` naming, and StatefulSets').
fn workload_name(pod: &Pod, name: &str) -> String {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    if let Some(o) = owner {
        if o.kind == "ReplicaSet" {
            let hash = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            if let Some(h) = hash
                && let Some(base) = o.name.strip_suffix(&format!("-{h}"))
            {
                return base.to_owned();
            }
            return o
                .name
                .rsplit_once('-')
                .map_or(o.name.clone(), |(b, _)| b.to_owned());
        }
        return o.name.clone();
    }
    match name.rsplit_once('-') {
        Some((base, idx))
            if !base.is_empty() && !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) =>
        {
            base.to_owned()
        }
        _ => name.to_owned(),
    }
}

impl<'a> Mesh<'a> {
    /// Builds the mesh view of `objects`.
    pub fn build(objects: &Objects<'a>, trust_domain: &TrustDomain, notes: &mut Notes) -> Self {
        let waypoint_names: BTreeSet<GatewayKey> = objects.waypoints.keys().cloned().collect();
        let mut pods = Vec::new();
        for pod in &objects.pods {
            let (Some(namespace), Some(name)) = (
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref(),
            ) else {
                continue;
            };
            if is_terminal(pod) {
                continue;
            }
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            let ips = pod_ips(pod);
            if node.is_none() && ips.is_empty() {
                continue; // pending: neither placed nor addressable yet
            }
            let spec = pod.spec.as_ref();
            let service_account = spec
                .and_then(|s| {
                    s.service_account_name
                        .as_deref()
                        .or(s.service_account.as_deref())
                })
                .filter(|s| !s.is_empty())
                .unwrap_or("default");
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            let ns_labels = objects
                .namespaces
                .get(namespace)
                .and_then(|n| n.metadata.labels.as_ref());
            let waypoint_instance = label(Some(&labels), &GATEWAY_NAME_LABELS).is_some_and(|g| {
                waypoint_names.contains(&GatewayKey {
                    namespace: namespace.to_owned(),
                    name: g.to_owned(),
                })
            });
            let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
            let captured = !waypoint_instance
                && !host_network
                && match label(Some(&labels), &DATAPLANE_MODE_LABELS) {
                    Some("none") => false,
                    Some("ambient") => true,
                    _ => is_ambient(ns_labels),
                };
            let binding = if waypoint_instance {
                Binding::Direct
            } else {
                Self::workload_binding(objects, namespace, name, Some(&labels), ns_labels, notes)
            };
            pods.push(PodInfo {
                pod,
                namespace,
                name,
                uid: pod_uid(pod),
                node,
                ips,
                service_account,
                labels,
                captured,
                waypoint_instance,
                healthy: is_ready(pod),
                binding,
            });
        }
        pods.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));

        let mut mesh = Mesh {
            trust_domain: trust_domain.clone(),
            pods,
            services: BTreeMap::new(),
        };
        for ((namespace, name), svc) in &objects.services {
            if let Some(info) = mesh.service_info(objects, namespace, name, svc, notes) {
                mesh.services.insert(ServiceKey::new(namespace, name), info);
            }
        }
        for gateway in objects.waypoints.keys() {
            let key = ServiceKey::new(&gateway.namespace, &gateway.name);
            if !mesh.services.contains_key(&key) {
                let info = mesh.synthesized_waypoint_service(gateway);
                mesh.services.insert(key, info);
            }
        }
        mesh
    }

    fn workload_binding(
        objects: &Objects<'_>,
        namespace: &str,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
        ns_labels: Option<&BTreeMap<String, String>>,
        notes: &mut Notes,
    ) -> Binding {
        let (request, explicit) = match requested_waypoint(labels, namespace) {
            Some(r) => (r, true),
            None => (requested_waypoint(ns_labels, namespace).flatten(), false),
        };
        let Some(gateway) = request else {
            return Binding::Direct;
        };
        let me = ObjectKey::new("Pod", Some(namespace), name);
        match objects.waypoints.get(&gateway) {
            Some(w)
                if matches!(
                    w.traffic_type,
                    WaypointTrafficType::Workload | WaypointTrafficType::All
                ) =>
            {
                Binding::Waypoint(gateway)
            }
            Some(_) => {
                if explicit {
                    notes.add(
                        me,
                        format!("waypoint {gateway} does not carry workload traffic (istio.io/waypoint-for is not `workload` or `all`): traffic addressed to this pod does not go through it"),
                    );
                }
                Binding::Direct
            }
            // Only an explicit pod label fails closed: a namespace label names a
            // waypoint whose traffic type is unknown, and the default is services.
            None if explicit => {
                notes.add(
                    me,
                    format!("waypoint {gateway} named by the use-waypoint label does not exist or was rejected: traffic addressed to this pod is refused until it is available (fail closed)"),
                );
                Binding::FailClosed(gateway)
            }
            None => Binding::Direct,
        }
    }

    fn service_binding(
        objects: &Objects<'_>,
        namespace: &str,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
        notes: &mut Notes,
    ) -> Binding {
        let ns_labels = objects
            .namespaces
            .get(namespace)
            .and_then(|n| n.metadata.labels.as_ref());
        let (request, on) = match requested_waypoint(labels, namespace) {
            Some(r) => (r, ObjectKey::new("Service", Some(namespace), name)),
            None => (
                requested_waypoint(ns_labels, namespace).flatten(),
                ObjectKey::new("Namespace", None, namespace),
            ),
        };
        let Some(gateway) = request else {
            return Binding::Direct;
        };
        match objects.waypoints.get(&gateway) {
            Some(w)
                if matches!(
                    w.traffic_type,
                    WaypointTrafficType::Service | WaypointTrafficType::All
                ) =>
            {
                Binding::Waypoint(gateway)
            }
            Some(_) => {
                notes.add(
                    on,
                    format!("waypoint {gateway} does not carry service traffic (istio.io/waypoint-for is `workload` or `none`): service {namespace}/{name} is reached directly"),
                );
                Binding::Direct
            }
            None => {
                notes.add(
                    on,
                    format!("waypoint {gateway} named by the use-waypoint label does not exist or was rejected: traffic to service {namespace}/{name} is refused until it is available (fail closed)"),
                );
                Binding::FailClosed(gateway)
            }
        }
    }

    /// Whether `svc` is a waypoint's own Service (never itself behind a waypoint).
    fn is_waypoint_service(objects: &Objects<'_>, namespace: &str, name: &str) -> bool {
        objects.waypoints.contains_key(&GatewayKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn service_info(
        &self,
        objects: &Objects<'_>,
        namespace: &str,
        name: &str,
        svc: &Service,
        notes: &mut Notes,
    ) -> Option<ServiceInfo> {
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            notes.add(
                ObjectKey::new("Service", Some(namespace), name),
                "ExternalName services are not part of the mesh",
            );
            return None;
        }
        let mut vips: Vec<String> = Vec::new();
        let ips = spec
            .and_then(|s| s.cluster_ips.clone())
            .filter(|v| !v.is_empty())
            .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]))
            .unwrap_or_default();
        for ip in ips {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                let ip = ip.to_string();
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
        }
        let k8s_ports: Vec<_> = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .collect();
        let mut ports = Vec::new();
        let mut target_ports = BTreeMap::new();
        let mut named_targets: Vec<(u32, Option<&str>, &str)> = Vec::new();
        for p in &k8s_ports {
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let target_port = match &p.target_port {
                None => u32::from(port),
                Some(IntOrString::Int(t)) => u32::try_from(*t).unwrap_or(0),
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) => u32::from(n),
                    Err(_) => {
                        named_targets.push((u32::from(port), p.name.as_deref(), s.as_str()));
                        0
                    }
                },
            };
            if let Ok(t) = u16::try_from(target_port)
                && t != 0
            {
                target_ports.insert(port, t);
            }
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::from(port),
                target_port,
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
                protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()) as i32,
            });
        }
        let selector = spec
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty());
        let endpoints = self.endpoints(objects, namespace, name, selector.as_ref(), &named_targets);
        let binding = if Self::is_waypoint_service(objects, namespace, name) {
            Binding::Direct
        } else {
            Self::service_binding(
                objects,
                namespace,
                name,
                svc.metadata.labels.as_ref(),
                notes,
            )
        };
        let proto = ProtoService {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            vips,
            ports,
            endpoints,
            waypoint: binding
                .gateway()
                .map(|g| waypoint_ref(g, &self.trust_domain)),
            labels: svc.metadata.labels.clone().unwrap_or_default(),
        };
        Some(ServiceInfo {
            proto,
            binding,
            selector,
            target_ports,
        })
    }

    /// A pod's container port called `port_name`.
    fn container_port(pod: &Pod, port_name: &str) -> Option<u32> {
        pod.spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| u32::try_from(p.container_port).ok())
    }

    fn endpoints(
        &self,
        objects: &Objects<'_>,
        namespace: &str,
        name: &str,
        selector: Option<&BTreeMap<String, String>>,
        named_targets: &[(u32, Option<&str>, &str)],
    ) -> Vec<Endpoint> {
        let slices: Vec<_> = objects
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .is_some_and(|n| n == name)
            })
            .collect();
        let mut out: BTreeMap<String, Endpoint> = BTreeMap::new();
        let mut add =
            |pod: &PodInfo<'_>,
             slice_ports: Option<&[k8s_openapi::api::discovery::v1::EndpointPort]>| {
                let mut ports = BTreeMap::new();
                for (svc_port, port_name, target_name) in named_targets {
                    let from_slice = slice_ports.and_then(|sp| {
                        sp.iter()
                            .find(|p| {
                                p.name.as_deref() == *port_name
                                    || p.name.as_deref() == Some(*target_name)
                            })
                            .and_then(|p| p.port)
                            .and_then(|p| u32::try_from(p).ok())
                    });
                    if let Some(t) =
                        from_slice.or_else(|| Self::container_port(pod.pod, target_name))
                    {
                        ports.insert(*svc_port, t);
                    }
                }
                out.entry(pod.uid.clone()).or_insert(Endpoint {
                    workload_uid: pod.uid.clone(),
                    ports,
                });
            };
        if slices.is_empty() {
            if let Some(sel) = selector {
                for pod in &self.pods {
                    if pod.namespace == namespace
                        && !pod.ips.is_empty()
                        && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                    {
                        add(pod, None);
                    }
                }
            }
        } else {
            for slice in slices {
                for ep in &slice.endpoints {
                    let by_ref = ep
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| {
                            let ns = r.namespace.as_deref().unwrap_or(namespace);
                            self.pods
                                .iter()
                                .find(|p| p.namespace == ns && Some(p.name) == r.name.as_deref())
                        });
                    let pod = by_ref.or_else(|| {
                        let addrs: Vec<IpAddr> =
                            ep.addresses.iter().filter_map(|a| a.parse().ok()).collect();
                        self.pods
                            .iter()
                            .find(|p| p.ips.iter().any(|ip| addrs.contains(ip)))
                    });
                    if let Some(pod) = pod {
                        add(pod, slice.ports.as_deref());
                    }
                }
            }
        }
        out.into_values().collect()
    }

    fn synthesized_waypoint_service(&self, gateway: &GatewayKey) -> ServiceInfo {
        let endpoints = self
            .pods
            .iter()
            .filter(|p| {
                p.namespace == gateway.namespace
                    && label(Some(&p.labels), &GATEWAY_NAME_LABELS) == Some(gateway.name.as_str())
            })
            .map(|p| Endpoint {
                workload_uid: p.uid.clone(),
                ports: BTreeMap::new(),
            })
            .collect();
        let mut labels = BTreeMap::new();
        labels.insert(GATEWAY_NAME_LABELS[0].to_owned(), gateway.name.clone());
        ServiceInfo {
            proto: ProtoService {
                name: gateway.name.clone(),
                namespace: gateway.namespace.clone(),
                hostname: format!(
                    "{}.{}.svc.{CLUSTER_DOMAIN}",
                    gateway.name, gateway.namespace
                ),
                vips: Vec::new(),
                ports: vec![ServicePort {
                    name: "mesh".to_owned(),
                    port: HBONE_PORT,
                    target_port: HBONE_PORT,
                    app_protocol: String::new(),
                    protocol: AppProtocol::Tcp as i32,
                }],
                endpoints,
                waypoint: None,
                labels,
            },
            binding: Binding::Direct,
            selector: None,
            target_ports: BTreeMap::new(),
        }
    }

    /// The `Workload` resources.
    pub fn workloads(&self) -> Vec<Workload> {
        self.pods
            .iter()
            .map(|p| {
                let workload_name = workload_name(p.pod, p.name);
                let pick = |keys: &[&str]| {
                    keys.iter()
                        .find_map(|k| p.labels.get(*k).filter(|v| !v.is_empty()).cloned())
                };
                let canonical_name = pick(&[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ])
                .unwrap_or_else(|| workload_name.clone());
                let canonical_revision = pick(&[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ])
                .unwrap_or_else(|| "latest".to_owned());
                let hbone = p.captured || p.waypoint_instance;
                Workload {
                    uid: p.uid.clone(),
                    name: p.name.to_owned(),
                    namespace: p.namespace.to_owned(),
                    node: p.node.unwrap_or_default().to_owned(),
                    addresses: p.ips.iter().map(ToString::to_string).collect(),
                    service_account: p.service_account.to_owned(),
                    spiffe_id: SpiffeId::new(&self.trust_domain, p.namespace, p.service_account)
                        .map(|id| id.as_str().to_owned())
                        .unwrap_or_default(),
                    labels: p.labels.clone(),
                    captured: p.captured,
                    protocol: if hbone {
                        TunnelProtocol::Hbone
                    } else {
                        TunnelProtocol::Tcp
                    } as i32,
                    waypoint: p
                        .binding
                        .gateway()
                        .map(|g| waypoint_ref(g, &self.trust_domain)),
                    status: if p.healthy {
                        HealthStatus::Healthy
                    } else {
                        HealthStatus::Unhealthy
                    } as i32,
                    workload_name,
                    canonical_name,
                    canonical_revision,
                }
            })
            .collect()
    }

    /// The `Service` resources.
    pub fn services(&self) -> Vec<ProtoService> {
        self.services.values().map(|s| s.proto.clone()).collect()
    }

    /// Pods per node.
    pub fn node_pods(&self) -> BTreeMap<String, NodePods> {
        let mut out: BTreeMap<String, NodePods> = BTreeMap::new();
        for p in &self.pods {
            let Some(node) = p.node else { continue };
            let entry = out.entry(node.to_owned()).or_default();
            entry.workloads.push(p.workload_ref());
            entry
                .identities
                .insert((p.namespace.to_owned(), p.service_account.to_owned()));
        }
        out
    }

    /// The services waypoint `gateway` fronts.
    pub fn fronted_by(&self, gateway: &GatewayKey) -> Vec<ServiceKey> {
        self.services
            .iter()
            .filter(|(_, s)| matches!(&s.binding, Binding::Waypoint(g) if g == gateway))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Uids of the workloads whose own traffic goes through `gateway`.
    pub fn workloads_bound_to(&self, gateway: &GatewayKey) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| matches!(&p.binding, Binding::Waypoint(g) if g == gateway))
            .map(|p| p.uid.clone())
            .collect()
    }

    /// A service.
    pub fn service(&self, key: &ServiceKey) -> Option<&ServiceInfo> {
        self.services.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_follow_istio_naming() {
        assert_eq!(app_protocol(None, Some("http")), AppProtocol::Http1);
        assert_eq!(app_protocol(None, Some("http-web")), AppProtocol::Http1);
        assert_eq!(app_protocol(None, Some("grpc-api")), AppProtocol::Grpc);
        assert_eq!(app_protocol(None, Some("tcp-echo")), AppProtocol::Tcp);
        assert_eq!(app_protocol(None, Some("web")), AppProtocol::Unspecified);
        assert_eq!(
            app_protocol(Some("kubernetes.io/h2c"), Some("tcp")),
            AppProtocol::Http2
        );
    }

    #[test]
    fn workload_names() {
        let pod = Pod::default();
        assert_eq!(workload_name(&pod, "payment-v1-0"), "payment-v1");
        assert_eq!(workload_name(&pod, "standalone"), "standalone");
    }
}
