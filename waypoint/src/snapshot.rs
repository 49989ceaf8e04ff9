//! The waypoint's configuration, indexed for the data path.
//!
//! [`Snapshot::build`] turns the controller's resources into lookup tables and
//! compiled routing state; the app publishes a new `Arc<Snapshot>` on a `watch`
//! channel whenever the configuration changes. A connection or request takes the
//! current snapshot once and sees one consistent configuration, while requests that
//! started earlier finish on the one they took: swapping never drops connections.
//!
//! Building checks everything the data path could otherwise only discover per request
//! (route regexes, load-balancer settings, addresses, identities, policies), so
//! [`validate`] can refuse (NACK) an update as a whole and keep the previous one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use ambit_api::config::v1::{
    self as pb, AppProtocol, HealthStatus, TunnelProtocol, resource::Kind,
};
use ambit_control_client::discovery::{ProposedState, Rejection};
use ambit_identity::SpiffeId;
use ambit_policy::wire::ProxyPolicies;

use crate::balance::{Balancer, ClusterKey, DestinationRules, Endpoint, UnknownSubset};
use crate::outlier::{OutlierDetector, OutlierRegistry};
use crate::pool::PoolLimits;
use crate::rng::SharedRng;
use crate::routes::RouteTable;

/// A namespaced object's name: a service, or the waypoint's Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// How the waypoint treats the bytes of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (gRPC included), told apart on the first bytes.
    Http,
    /// Opaque TCP, proxied at L4.
    Tcp,
    /// Unknown: detect HTTP on the first bytes, else TCP.
    Detect,
}

/// The configuration, indexed. Cheap to share (`Arc`), immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    gateway: ObjectName,
    generation: u64,
    services: BTreeMap<ObjectName, Arc<ServiceEntry>>,
    vips: HashMap<SocketAddr, (Arc<ServiceEntry>, pb::ServicePort)>,
    workloads_by_ip: HashMap<IpAddr, Arc<pb::Workload>>,
    workloads_by_uid: HashMap<String, Arc<pb::Workload>>,
    authorizations: Vec<Arc<pb::Authorization>>,
    policies: ProxyPolicies,
    shared: SnapshotShared,
}

/// What outlives one snapshot: the balancers' random source, and the outlier
/// detectors, so that ejections survive configuration updates. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SnapshotShared {
    /// Random source of the load balancers.
    pub rng: SharedRng,
    /// Outlier detectors by cluster.
    pub outliers: OutlierRegistry,
}

/// One service known to the waypoint, with its compiled routes and destination rules.
#[derive(Debug)]
pub struct ServiceEntry {
    /// The service's name.
    pub name: ObjectName,
    /// The service as sent by the controller.
    pub service: Arc<pb::Service>,
    /// Whether this waypoint fronts it (`Service.waypoint` names our Gateway): only
    /// then does it accept tunnels addressed to the service's VIPs.
    pub fronted: bool,
    /// Its routes: the compiled `RouteSet`, or the default route to itself.
    pub routes: Arc<RouteTable>,
    /// Whether `routes` came from a `RouteSet` (false: the default route).
    pub has_route_set: bool,
    /// Subsets and load balancing from its `DestinationPolicy` (defaults without one).
    pub rules: DestinationRules,
    /// The `DestinationPolicy` it came from, if any (`namespace/name` of the rule).
    pub policy_origin: Option<String>,
    /// Endpoint sets built on first use, per (service port, subset): the balancers
    /// keep their state (round-robin position, outstanding requests) for as long as
    /// this snapshot is current.
    endpoint_sets: Mutex<EndpointSets>,
}

/// Endpoint sets by (service port, subset).
type EndpointSets = HashMap<(u16, Option<String>), Arc<EndpointSet>>;

/// The endpoints of one (service, port, subset) — a cluster in Envoy's terms — with
/// the balancer over them and the cluster's outlier detector and pool limits.
#[derive(Debug)]
pub struct EndpointSet {
    /// Which cluster.
    pub cluster: ClusterKey,
    /// Balances over the endpoints; [`Balancer::endpoints`] are `ip:targetPort`.
    pub balancer: Balancer,
    /// The workload behind each endpoint, by the balancer's index.
    pub workloads: Vec<Arc<pb::Workload>>,
    /// Passive health checking (`outlierDetection`), if configured.
    pub outlier: Option<Arc<OutlierDetector>>,
    /// Connection-pool limits (`connectionPool`), if configured.
    pub pool: Option<PoolLimits>,
}

/// Where a tunnel was addressed, once the waypoint accepted it.
#[derive(Clone, Debug)]
pub enum Target {
    /// A VIP and port of a service this waypoint fronts.
    Service {
        /// The service.
        entry: Arc<ServiceEntry>,
        /// The port addressed.
        port: pb::ServicePort,
    },
    /// A pod address of a workload bound to this waypoint.
    Workload {
        /// The workload.
        workload: Arc<pb::Workload>,
        /// The port addressed.
        port: u16,
    },
}

/// A CONNECT target this waypoint does not front (refused: fail closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a destination of this waypoint")]
pub struct NotServed(pub SocketAddr);

/// Resources the waypoint cannot use, by resource key.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{} unusable resource(s): {}", errors.len(), summary(errors))]
pub struct BuildError {
    /// Resource key → reason.
    pub errors: BTreeMap<String, String>,
}

fn summary(errors: &BTreeMap<String, String>) -> String {
    errors
        .iter()
        .map(|(k, e)| format!("{k}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ObjectName {
    /// A name from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// From the wire type.
    pub fn from_proto(n: &pb::NamespacedName) -> Self {
        Self::new(&n.namespace, &n.name)
    }

    /// To the wire type.
    pub fn to_proto(&self) -> pb::NamespacedName {
        pb::NamespacedName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Protocol {
    /// How to treat a service port.
    pub fn of_port(port: &pb::ServicePort) -> Self {
        match AppProtocol::try_from(port.protocol) {
            Ok(AppProtocol::Http1 | AppProtocol::Http2 | AppProtocol::Grpc) => Self::Http,
            Ok(AppProtocol::Tcp) => Self::Tcp,
            Ok(AppProtocol::Unspecified) | Err(_) => Self::Detect,
        }
    }
}

impl Snapshot {
    /// An empty configuration for the waypoint of `gateway` (nothing is served).
    pub fn empty(gateway: ObjectName, shared: SnapshotShared) -> Self {
        Self {
            gateway,
            generation: 0,
            services: BTreeMap::new(),
            vips: HashMap::new(),
            workloads_by_ip: HashMap::new(),
            workloads_by_uid: HashMap::new(),
            authorizations: Vec::new(),
            policies: ProxyPolicies::default(),
            shared,
        }
    }

    /// Indexes `resources` for the waypoint of `gateway`. `generation` is shown in the
    /// admin dump; `shared` holds what outlives snapshots. Every resource that does
    /// not convert is reported, by key.
    pub fn build<'a>(
        gateway: ObjectName,
        resources: impl IntoIterator<Item = &'a pb::Resource>,
        generation: u64,
        shared: &SnapshotShared,
    ) -> Result<Self, BuildError> {
        let mut out = Self::empty(gateway, shared.clone());
        out.generation = generation;
        let mut errors = BTreeMap::new();
        let mut services = Vec::new();
        let mut route_sets = HashMap::new();
        let mut policies = HashMap::new();
        for r in resources {
            match &r.kind {
                Some(Kind::Workload(w)) => match check_workload(w) {
                    Ok(()) => {
                        let w = Arc::new(w.clone());
                        for a in &w.addresses {
                            if let Ok(ip) = a.parse::<IpAddr>() {
                                out.workloads_by_ip.insert(ip, Arc::clone(&w));
                            }
                        }
                        out.workloads_by_uid.insert(w.uid.clone(), w);
                    }
                    Err(e) => {
                        errors.insert(r.key.clone(), e);
                    }
                },
                Some(Kind::Service(s)) => match check_service(s) {
                    Ok(()) => services.push(s),
                    Err(e) => {
                        errors.insert(r.key.clone(), e);
                    }
                },
                Some(Kind::RouteSet(rs)) => {
                    let name = rs.service.as_ref().map(ObjectName::from_proto);
                    match (name, RouteTable::try_from_proto(rs)) {
                        (Some(name), Ok(table)) => {
                            route_sets.insert(name, table);
                        }
                        (None, _) => {
                            errors.insert(r.key.clone(), "no service".to_owned());
                        }
                        (_, Err(e)) => {
                            errors.insert(r.key.clone(), error_chain(&e));
                        }
                    }
                }
                Some(Kind::DestinationPolicy(dp)) => {
                    let name = dp.service.as_ref().map(ObjectName::from_proto);
                    match (name, DestinationRules::try_from_proto(dp)) {
                        (Some(name), Ok(rules)) => {
                            policies.insert(name, (rules, dp.origin.clone()));
                        }
                        (None, _) => {
                            errors.insert(r.key.clone(), "no service".to_owned());
                        }
                        (_, Err(e)) => {
                            errors.insert(r.key.clone(), error_chain(&e));
                        }
                    }
                }
                Some(Kind::Authorization(a)) => match ambit_policy::wire::authorization(a) {
                    Ok(_) => out.authorizations.push(Arc::new(a.clone())),
                    Err(e) => {
                        errors.insert(r.key.clone(), error_chain(&e));
                    }
                },
                // The trust bundle reaches TLS through the certificate manager; peer
                // authentication is the daemons' business.
                Some(Kind::TrustBundle(_) | Kind::PeerAuthentication(_)) => {}
                None => {
                    errors.insert(r.key.clone(), "resource of an unknown kind".to_owned());
                }
            }
        }
        if !errors.is_empty() {
            return Err(BuildError { errors });
        }
        let policy_resources: Vec<pb::Resource> = out
            .authorizations
            .iter()
            .map(|a| pb::Resource::new(Kind::Authorization((**a).clone())))
            .collect();
        out.policies = ProxyPolicies::from_resources(&policy_resources).map_err(|e| {
            let mut errors = BTreeMap::new();
            errors.insert(e.resource.clone(), error_chain(&e));
            BuildError { errors }
        })?;
        for s in services {
            let name = ObjectName::new(&s.namespace, &s.name);
            let (routes, has_route_set) = match route_sets.remove(&name) {
                Some(mut table) => {
                    let ports = s.ports.iter().filter_map(|p| u16::try_from(p.port).ok());
                    if let Err(e) =
                        table.add_default_for_unrouted_ports(&default_route(&name), ports)
                    {
                        // Nothing in the default route can fail to convert.
                        tracing::error!(service = %name, error = %e, "default route not added");
                    }
                    (table, true)
                }
                None => (default_routes(&name), false),
            };
            let (rules, policy_origin) = match policies.remove(&name) {
                Some((rules, origin)) => (rules, Some(origin)),
                None => (DestinationRules::default(), None),
            };
            let fronted = s
                .waypoint
                .as_ref()
                .and_then(|w| w.gateway.as_ref())
                .is_some_and(|g| ObjectName::from_proto(g) == out.gateway);
            let entry = Arc::new(ServiceEntry {
                name: name.clone(),
                service: Arc::new(s.clone()),
                fronted,
                routes: Arc::new(routes),
                has_route_set,
                rules,
                policy_origin,
                endpoint_sets: Mutex::default(),
            });
            if fronted {
                for vip in &s.vips {
                    let Ok(ip) = vip.parse::<IpAddr>() else {
                        continue;
                    };
                    for port in &s.ports {
                        if let Ok(p) = u16::try_from(port.port) {
                            out.vips
                                .insert(SocketAddr::new(ip, p), (Arc::clone(&entry), port.clone()));
                        }
                    }
                }
            }
            out.services.insert(name, entry);
        }
        for name in route_sets.keys() {
            tracing::debug!(service = %name, "RouteSet for a service the waypoint does not know; ignored");
        }
        Ok(out)
    }

    /// Forgets the outlier state of services this snapshot no longer has.
    pub fn prune_shared_state(&self) {
        self.shared.outliers.retain(|k| {
            self.services
                .contains_key(&ObjectName::new(&k.namespace, &k.service))
        });
    }

    /// The Gateway this waypoint serves.
    pub fn gateway(&self) -> &ObjectName {
        &self.gateway
    }

    /// The generation it was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Where a CONNECT to `target` goes: a fronted service's VIP and port, or a pod
    /// of a workload bound to this waypoint. Anything else is refused.
    pub fn resolve(&self, target: SocketAddr) -> Result<Target, NotServed> {
        if let Some((entry, port)) = self.vips.get(&target) {
            return Ok(Target::Service {
                entry: Arc::clone(entry),
                port: port.clone(),
            });
        }
        if let Some(w) = self.workloads_by_ip.get(&target.ip())
            && self.bound_here(w)
        {
            return Ok(Target::Workload {
                workload: Arc::clone(w),
                port: target.port(),
            });
        }
        Err(NotServed(target))
    }

    fn bound_here(&self, w: &pb::Workload) -> bool {
        w.waypoint
            .as_ref()
            .and_then(|r| r.gateway.as_ref())
            .is_some_and(|g| ObjectName::from_proto(g) == self.gateway)
    }

    /// A service by name.
    pub fn service(&self, name: &ObjectName) -> Option<&Arc<ServiceEntry>> {
        self.services.get(name)
    }

    /// Every service, by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    /// The workload with address `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<pb::Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// The `targetRefs` authorization policies sent to this waypoint, as sent.
    pub fn authorizations(&self) -> &[Arc<pb::Authorization>] {
        &self.authorizations
    }

    /// The same policies, converted for evaluation.
    pub fn policies(&self) -> &ProxyPolicies {
        &self.policies
    }

    /// The healthy endpoints of `entry`'s `port` in `subset` (all for `None`), with
    /// their balancer per the destination rules. Built once per snapshot.
    pub fn endpoint_set(
        &self,
        entry: &ServiceEntry,
        port: &pb::ServicePort,
        subset: Option<&str>,
    ) -> Result<Arc<EndpointSet>, UnknownSubset> {
        let service_port = u16::try_from(port.port).unwrap_or_default();
        let key = (service_port, subset.map(str::to_owned));
        let mut sets = entry
            .endpoint_sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = sets.get(&key) {
            return Ok(Arc::clone(set));
        }
        let mut all = Vec::new();
        let mut workloads = Vec::new();
        for e in &entry.service.endpoints {
            let Some(w) = self.workloads_by_uid.get(&e.workload_uid) else {
                continue;
            };
            // Unspecified counts as ready: local-mode workloads carry no status.
            if w.status == HealthStatus::Unhealthy as i32 {
                continue;
            }
            let Some(ip) = w.addresses.iter().find_map(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let Ok(target_port) = u16::try_from(e.target_port(port)) else {
                continue;
            };
            all.push(Endpoint {
                addr: SocketAddr::new(ip, target_port),
                labels: w
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            });
            workloads.push(Arc::clone(w));
        }
        let chosen = entry.rules.endpoints(subset, &all)?;
        let cluster = ClusterKey::new(
            &entry.name.namespace,
            &entry.name.name,
            subset,
            Some(service_port),
        );
        let outlier = self.shared.outliers.detector(
            &cluster,
            entry
                .rules
                .outlier_detection(subset, Some(service_port))?
                .as_ref(),
            &chosen,
        );
        let pool = entry.rules.connection_pool(subset, Some(service_port))?;
        let workloads = chosen
            .iter()
            .filter_map(|c| {
                all.iter()
                    .position(|e| e.addr == c.addr)
                    .and_then(|i| workloads.get(i).cloned())
            })
            .collect();
        let policy = entry.rules.load_balancer(subset, Some(service_port))?;
        let set = Arc::new(EndpointSet {
            cluster,
            balancer: Balancer::new(policy, chosen, self.shared.rng.clone()),
            workloads,
            outlier,
            pool,
        });
        sets.insert(key, Arc::clone(&set));
        Ok(set)
    }

    /// What `/config_dump` shows of it.
    pub fn dump(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .services
            .values()
            .map(|e| {
                serde_json::json!({
                    "name": e.name.to_string(),
                    "fronted": e.fronted,
                    "vips": e.service.vips,
                    "ports": e.service.ports.iter().map(|p| serde_json::json!({
                        "port": p.port,
                        "name": p.name,
                        "protocol": Protocol::of_port(p),
                    })).collect::<Vec<_>>(),
                    "endpoints": e.service.endpoints.len(),
                    "routes": if e.has_route_set {
                        e.routes.routes().iter().map(|r| r.name.clone()).collect::<Vec<_>>()
                    } else {
                        vec!["(default: to the service itself)".to_owned()]
                    },
                    "destinationPolicy": e.policy_origin,
                })
            })
            .collect();
        let bound: Vec<String> = self
            .workloads_by_uid
            .values()
            .filter(|w| self.bound_here(w))
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect();
        let policies: Vec<String> = self
            .authorizations
            .iter()
            .map(|a| format!("{}/{}", a.namespace, a.name))
            .collect();
        serde_json::json!({
            "gateway": self.gateway.to_string(),
            "generation": self.generation,
            "services": services,
            "boundWorkloads": bound,
            "workloads": self.workloads_by_uid.len(),
            "authorizationPolicies": policies,
        })
    }
}

impl SnapshotShared {
    /// Fresh state with `rng` for the balancers.
    pub fn new(rng: SharedRng) -> Self {
        Self {
            rng,
            outliers: OutlierRegistry::new(),
        }
    }
}

impl Target {
    /// How the tunnel's bytes are treated.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Service { port, .. } => Protocol::of_port(port),
            Self::Workload { .. } => Protocol::Detect,
        }
    }

    /// The service port (for routes' `ports` and the telemetry), for a service.
    pub fn service_port(&self) -> Option<u16> {
        match self {
            Self::Service { port, .. } => u16::try_from(port.port).ok(),
            Self::Workload { .. } => None,
        }
    }
}

/// How the waypoint reaches a workload: HBONE to its pod when it is in the mesh
/// (with the identity it must prove), else plain TCP.
pub fn hbone_identity(w: &pb::Workload) -> Option<SpiffeId> {
    if w.captured || w.protocol == TunnelProtocol::Hbone as i32 {
        SpiffeId::parse(&w.spiffe_id).ok()
    } else {
        None
    }
}

/// The subscription validator: NACK any update the waypoint of `gateway` could not
/// build a snapshot from, naming the resources at fault.
pub fn validate(gateway: &ObjectName, proposed: &ProposedState) -> Result<(), Rejection> {
    let shared = SnapshotShared {
        rng: SharedRng::seeded(0),
        // A scratch registry: validation must not touch the live detectors.
        outliers: OutlierRegistry::new(),
    };
    Snapshot::build(
        gateway.clone(),
        proposed.resources.values().map(|r| &**r),
        0,
        &shared,
    )
    .map(drop)
    .map_err(|e| Rejection::from_resource_errors(e.errors))
}

fn check_workload(w: &pb::Workload) -> Result<(), String> {
    if let Some(a) = w.addresses.iter().find(|a| a.parse::<IpAddr>().is_err()) {
        return Err(format!("invalid address {a:?}"));
    }
    let meshed = w.captured || w.protocol == TunnelProtocol::Hbone as i32;
    if meshed && let Err(e) = SpiffeId::parse(&w.spiffe_id) {
        return Err(format!("invalid identity {:?}: {e}", w.spiffe_id));
    }
    Ok(())
}

fn check_service(s: &pb::Service) -> Result<(), String> {
    if let Some(v) = s.vips.iter().find(|v| v.parse::<IpAddr>().is_err()) {
        return Err(format!("invalid VIP {v:?}"));
    }
    if let Some(p) = s.ports.iter().find(|p| u16::try_from(p.port).is_err()) {
        return Err(format!("port {} out of range", p.port));
    }
    Ok(())
}

/// The route of a service without routes: every request to the service itself.
fn default_route(name: &ObjectName) -> pb::Route {
    pb::Route {
        name: format!("default/{name}"),
        action: Some(pb::route::Action::Forward(pb::Forward {
            destinations: vec![pb::RouteDestination {
                service: Some(name.to_proto()),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The routes of a service without a `RouteSet`: everything to the service itself.
fn default_routes(name: &ObjectName) -> RouteTable {
    let set = pb::RouteSet {
        service: Some(name.to_proto()),
        routes: vec![default_route(name)],
    };
    // Nothing in it can fail to convert (no regex, header or duration).
    RouteTable::try_from_proto(&set).unwrap_or_else(|_| RouteTable::empty())
}

/// An error and its sources on one line (`a: b: c`).
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
