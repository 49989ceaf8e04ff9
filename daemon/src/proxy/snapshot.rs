//! What the proxies look up per connection, derived once per configuration change.
//!
//! # Routing (outbound)
//!
//! [`Snapshot::route`] decides where a captured connection goes, from its original
//! destination:
//!
//! - **Waypoint first.** A Service VIP whose Service has `waypoint` set, or a pod IP
//!   whose Workload has `waypoint` set, goes over HBONE to a healthy endpoint of the
//!   waypoint's Service at `<endpoint ip>:<hbone_port>` (15008 by default), expecting
//!   the waypoint's identity, with the CONNECT `:authority` = the ORIGINAL destination
//!   (`VIP:port` or `podIP:port`, never a resolved endpoint): the waypoint does the L7
//!   routing and load balancing itself. A VIP whose Service has no waypoint but whose
//!   chosen endpoint's Workload has one goes to that workload waypoint with the
//!   endpoint's `podIP:targetPort` as authority (the destination daemon would refuse
//!   it directly). With no healthy waypoint endpoint, or a waypoint the configuration
//!   does not describe, the connection is refused: **fail closed**, never direct.
//! - **Direct HBONE** to a meshed destination: `podIP:15008`, `:authority` = the
//!   endpoint's `podIP:targetPort` (for a VIP, the endpoint the source picked), as
//!   Istio's ztunnel does. The destination daemon only serves its local pods and
//!   checks the authority against them (issue 4, item 6), so it needs the pod address,
//!   not the VIP; the Service is known to the source only (its metrics carry it; the
//!   destination derives `destination_service` from the Services selecting the pod).
//! - **Plain TCP** from the pod to an unmeshed or unknown destination.
//!
//! # Inbound
//!
//! [`Snapshot::required_waypoints`] names the waypoints a local pod's traffic on a
//! port must come from (its Workload's, and those of the Services selecting it on
//! that target port); the inbound proxies refuse anything else (DESIGN §4).
//! [`Snapshot::service_for_endpoint`] is the Service reported as
//! `destination_service` by the destination.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ambit_api::ResourceKind;
use ambit_api::config::v1::resource::Kind;
use ambit_api::config::v1::{
    HealthStatus, Service, ServicePort, TunnelProtocol, WaypointRef, Workload,
};
use ambit_control_client::discovery::ConfigState;
use ambit_identity::SpiffeId;
use ambit_policy::wire::ProxyPolicies;

/// A Service by `(namespace, name)`.
type ServiceName = (String, String);

/// The configuration, indexed for the proxies.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads_by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    services: HashMap<SocketAddrV4, (Arc<Service>, ServicePort)>,
    services_by_name: HashMap<ServiceName, Arc<Service>>,
    /// Workload uid → (effective target port, Service) for every port of every
    /// Service listing it as an endpoint, Services in resource-key order.
    services_by_endpoint: HashMap<String, Vec<(u16, Arc<Service>)>>,
    next_endpoint: HashMap<SocketAddrV4, AtomicUsize>,
    next_waypoint: HashMap<ServiceName, AtomicUsize>,
    /// `None` when the policies failed to convert (only possible for a state file
    /// written by another version): inbound then denies everything (fail closed).
    pub policies: Option<ProxyPolicies>,
}

/// Where an outbound connection goes (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Through HBONE to `hbone_addr`, asking for `target`, expecting `identity`.
    Hbone {
        /// The destination pod's `ip:15008`.
        hbone_addr: SocketAddr,
        /// The `:authority`: the pod's `ip:port` (for a VIP, the chosen endpoint's
        /// `ip:targetPort`, not the VIP: the destination daemon serves pods).
        target: SocketAddr,
        /// The identity the destination must prove.
        identity: SpiffeId,
        /// The destination workload.
        workload: Arc<Workload>,
        /// The Service, when the original destination was its VIP.
        service: Option<Arc<Service>>,
    },
    /// Through HBONE to the destination's waypoint.
    Waypoint {
        /// The chosen waypoint instance's `ip:<hbone port>`.
        hbone_addr: SocketAddr,
        /// The `:authority`: the original destination (`VIP:port` or `podIP:port`;
        /// for a workload waypoint reached through a VIP, the chosen endpoint).
        target: SocketAddr,
        /// The waypoint's identity, which it must prove.
        identity: SpiffeId,
        /// The chosen waypoint instance.
        waypoint: Arc<Workload>,
        /// The destination Service, when the original destination was its VIP.
        service: Option<Arc<Service>>,
        /// The destination workload, when known (pod IP, or a VIP's endpoint).
        workload: Option<Arc<Workload>>,
    },
    /// Plain TCP from the pod to `addr` (unmeshed or unknown destination).
    Plain {
        /// Where to connect.
        addr: SocketAddr,
        /// The destination workload, when known.
        workload: Option<Arc<Workload>>,
        /// The Service, when the original destination was its VIP.
        service: Option<Arc<Service>>,
    },
    /// A Service VIP with no healthy endpoint: refuse.
    NoEndpoint {
        /// The Service.
        service: Arc<Service>,
    },
    /// The destination must go through a waypoint that cannot be reached (no
    /// healthy instance, unknown Service, invalid identity): refuse (fail closed).
    NoWaypoint {
        /// The waypoint asked for.
        waypoint: WaypointRef,
        /// Why it cannot be used.
        reason: &'static str,
    },
}

/// The waypoint check of an inbound connection ([`Snapshot::waypoint_admission`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointAdmission {
    /// No waypoint fronts the destination on that port: traffic arrives directly.
    NotFronted,
    /// The peer is one of the destination's waypoints.
    FromWaypoint,
    /// The destination is fronted by a waypoint and the peer is none of them:
    /// refuse (fail closed).
    Bypass,
}

impl Snapshot {
    /// Indexes `state`.
    pub fn new(state: &ConfigState) -> Self {
        let mut out = Self::default();
        for r in state.of_kind(ResourceKind::Workload) {
            if let Some(Kind::Workload(w)) = &r.kind {
                let w = Arc::new(w.clone());
                for a in &w.addresses {
                    if let Ok(ip) = a.parse::<Ipv4Addr>() {
                        out.workloads_by_ip.insert(ip, Arc::clone(&w));
                    }
                }
                out.workloads_by_uid.insert(w.uid.clone(), w);
            }
        }
        // `of_kind` walks the keys in order: the first Service per endpoint and port
        // is deterministic.
        for r in state.of_kind(ResourceKind::Service) {
            if let Some(Kind::Service(s)) = &r.kind {
                let s = Arc::new(s.clone());
                for vip in &s.vips {
                    let Ok(vip) = vip.parse::<Ipv4Addr>() else {
                        continue;
                    };
                    for port in &s.ports {
                        let Ok(p) = u16::try_from(port.port) else {
                            continue;
                        };
                        let key = SocketAddrV4::new(vip, p);
                        out.services.insert(key, (Arc::clone(&s), port.clone()));
                        out.next_endpoint.insert(key, AtomicUsize::new(0));
                    }
                }
                for e in &s.endpoints {
                    let ports = out
                        .services_by_endpoint
                        .entry(e.workload_uid.clone())
                        .or_default();
                    for port in &s.ports {
                        if let Ok(target) = u16::try_from(e.target_port(port)) {
                            ports.push((target, Arc::clone(&s)));
                        }
                    }
                }
                let name = (s.namespace.clone(), s.name.clone());
                out.next_waypoint.insert(name.clone(), AtomicUsize::new(0));
                out.services_by_name.insert(name, s);
            }
        }
        let policies = ProxyPolicies::from_resources(state.resources.values().map(|r| &**r));
        out.policies = match policies {
            Ok(p) => Some(p),
            Err(error) => {
                tracing::error!(%error, "security policies do not convert; inbound denies all");
                None
            }
        };
        out
    }

    /// The workload with address `ip`.
    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// Where a connection to `dst` goes (see the module docs): through the
    /// destination's waypoint when it has one, else a VIP is resolved to a healthy
    /// endpoint (round robin), a meshed destination gets HBONE, anything else plain
    /// TCP.
    pub fn route(&self, dst: SocketAddrV4) -> Route {
        if let Some((service, _)) = self.services.get(&dst)
            && let Some(waypoint) = &service.waypoint
        {
            return self.via_waypoint(waypoint, SocketAddr::V4(dst), Some(service), None);
        }
        let (ip, port, service) = match self.services.get(&dst) {
            Some((service, port)) => match self.pick_endpoint(dst, service, port) {
                Some((ip, target_port)) => (ip, target_port, Some(Arc::clone(service))),
                None => {
                    return Route::NoEndpoint {
                        service: Arc::clone(service),
                    };
                }
            },
            None => (*dst.ip(), dst.port(), None),
        };
        let target = SocketAddr::V4(SocketAddrV4::new(ip, port));
        let workload = self.workloads_by_ip.get(&ip).cloned();
        if let Some(w) = &workload
            && let Some(waypoint) = &w.waypoint
        {
            return self.via_waypoint(waypoint, target, service.as_ref(), Some(w));
        }
        if let Some(w) = &workload
            && (w.captured || w.protocol == TunnelProtocol::Hbone as i32)
            && let Ok(identity) = SpiffeId::parse(&w.spiffe_id)
        {
            return Route::Hbone {
                hbone_addr: SocketAddr::V4(SocketAddrV4::new(ip, ambit_api::DEFAULT_HBONE_PORT)),
                target,
                identity,
                workload: Arc::clone(w),
                service,
            };
        }
        Route::Plain {
            addr: target,
            workload,
            service,
        }
    }

    /// The route through `waypoint` to `target`: a healthy instance of its Service,
    /// round robin.
    fn via_waypoint(
        &self,
        waypoint: &WaypointRef,
        target: SocketAddr,
        service: Option<&Arc<Service>>,
        workload: Option<&Arc<Workload>>,
    ) -> Route {
        let refuse = |reason| Route::NoWaypoint {
            waypoint: waypoint.clone(),
            reason,
        };
        let Ok(identity) = SpiffeId::parse(&waypoint.spiffe_id) else {
            return refuse("the waypoint's identity is not a SPIFFE ID");
        };
        let Some(name) = waypoint
            .service
            .as_ref()
            .map(|s| (s.namespace.clone(), s.name.clone()))
        else {
            return refuse("the waypoint names no Service");
        };
        let Some(waypoint_service) = self.services_by_name.get(&name) else {
            return refuse("the waypoint's Service is not in the configuration");
        };
        // The port to dial: the waypoint Service's HBONE port as the endpoint's target
        // port (a waypoint engine beside a pod's sidecar listens on another port), or
        // the HBONE port itself.
        let hbone_port = waypoint.hbone_port_or_default();
        let mesh_port = waypoint_service
            .ports
            .iter()
            .find(|p| p.port == u32::from(hbone_port));
        let instances: Vec<(&Arc<Workload>, SocketAddrV4)> = waypoint_service
            .endpoints
            .iter()
            .filter_map(|e| {
                let (w, ip) = self.healthy_address(&e.workload_uid)?;
                let port = mesh_port
                    .and_then(|p| u16::try_from(e.target_port(p)).ok())
                    .filter(|p| *p != 0)
                    .unwrap_or(hbone_port);
                Some((w, SocketAddrV4::new(ip, port)))
            })
            .collect();
        if instances.is_empty() {
            return refuse("the waypoint has no healthy instance");
        }
        let n = self
            .next_waypoint
            .get(&name)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        let Some(&(instance, addr)) = instances.get(n % instances.len()) else {
            return refuse("the waypoint has no healthy instance");
        };
        Route::Waypoint {
            hbone_addr: SocketAddr::V4(addr),
            target,
            identity,
            waypoint: Arc::clone(instance),
            service: service.cloned(),
            workload: workload.cloned(),
        }
    }

    /// The workload `uid` and its first IPv4 address, unless it is unhealthy.
    fn healthy_address(&self, uid: &str) -> Option<(&Arc<Workload>, Ipv4Addr)> {
        let w = self.workloads_by_uid.get(uid)?;
        // Unspecified counts as ready: local-mode workloads carry no status.
        if w.status == HealthStatus::Unhealthy as i32 {
            return None;
        }
        let ip = w
            .addresses
            .iter()
            .find_map(|a| a.parse::<Ipv4Addr>().ok())?;
        Some((w, ip))
    }

    fn pick_endpoint(
        &self,
        key: SocketAddrV4,
        service: &Service,
        port: &ServicePort,
    ) -> Option<(Ipv4Addr, u16)> {
        let healthy: Vec<(Ipv4Addr, u16)> = service
            .endpoints
            .iter()
            .filter_map(|e| {
                let (_, ip) = self.healthy_address(&e.workload_uid)?;
                let target = u16::try_from(e.target_port(port)).ok()?;
                Some((ip, target))
            })
            .collect();
        if healthy.is_empty() {
            return None;
        }
        let n = self
            .next_endpoint
            .get(&key)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        healthy.get(n % healthy.len()).copied()
    }

    /// The waypoints that traffic to `workload` on (target) `port` must come
    /// through: the workload's own, and those of every Service selecting it with
    /// `port` as a target port. Empty when traffic may arrive directly.
    pub fn required_waypoints<'a>(
        &'a self,
        workload: &'a Workload,
        port: u16,
    ) -> Vec<&'a WaypointRef> {
        let mut out: Vec<&WaypointRef> = workload.waypoint.iter().collect();
        for (target, service) in self.endpoint_services(workload) {
            if *target == port
                && let Some(w) = &service.waypoint
                && !out.contains(&w)
            {
                out.push(w);
            }
        }
        out
    }

    /// Whether traffic to `workload` on (target) `port` from `peer` (the verified
    /// identity of an HBONE client; `None` for plaintext) may arrive directly, must
    /// be refused because it bypassed the workload's waypoints, or came from one.
    pub fn waypoint_admission(
        &self,
        workload: &Workload,
        port: u16,
        peer: Option<&SpiffeId>,
    ) -> WaypointAdmission {
        let required = self.required_waypoints(workload, port);
        if required.is_empty() {
            return WaypointAdmission::NotFronted;
        }
        match peer {
            Some(peer) if required.iter().any(|w| w.spiffe_id == peer.as_str()) => {
                WaypointAdmission::FromWaypoint
            }
            _ => WaypointAdmission::Bypass,
        }
    }

    /// The Service reported for traffic to `workload` on (target) `port`: the first,
    /// in resource-key order (`Service/<namespace>/<name>`), of those selecting it
    /// with `port` as a target port.
    pub fn service_for_endpoint(&self, workload: &Workload, port: u16) -> Option<&Arc<Service>> {
        self.endpoint_services(workload)
            .iter()
            .find(|(target, _)| *target == port)
            .map(|(_, s)| s)
    }

    fn endpoint_services(&self, workload: &Workload) -> &[(u16, Arc<Service>)] {
        self.services_by_endpoint
            .get(&workload.uid)
            .map_or(&[], Vec::as_slice)
    }
}

/// Whether `ip` is one of `w`'s addresses.
pub fn has_address(w: &Workload, ip: IpAddr) -> bool {
    w.addresses
        .iter()
        .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ambit_api::config::v1::{Endpoint, Resource};
    use ambit_control_client::discovery::StateSource;

    use super::*;

    fn workload(uid: &str, ip: &str, captured: bool, status: HealthStatus) -> Kind {
        Kind::Workload(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "production".into(),
            addresses: vec![ip.into()],
            spiffe_id: format!("spiffe://cluster.local/ns/production/sa/{uid}"),
            captured,
            protocol: if captured {
                TunnelProtocol::Hbone as i32
            } else {
                TunnelProtocol::Tcp as i32
            },
            status: status as i32,
            ..Default::default()
        })
    }

    fn state(kinds: Vec<Kind>) -> ConfigState {
        let mut s = ConfigState::initial();
        s.resources = kinds
            .into_iter()
            .map(|k| {
                let r = Resource::new(k);
                (r.key.clone(), Arc::new(r))
            })
            .collect::<BTreeMap<_, _>>();
        s.synced = true;
        s.source = StateSource::FromController;
        s
    }

    fn service() -> Kind {
        Kind::Service(Service {
            name: "payment".into(),
            namespace: "production".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            endpoints: ["p1", "p2", "p3"]
                .iter()
                .map(|u| Endpoint {
                    workload_uid: (*u).into(),
                    ports: Default::default(),
                })
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn vip_round_robins_over_healthy_endpoints_with_target_port() {
        let snap = Snapshot::new(&state(vec![
            workload("p1", "10.0.1.5", true, HealthStatus::Healthy),
            workload("p2", "10.0.2.5", true, HealthStatus::Unhealthy),
            workload("p3", "10.0.2.6", true, HealthStatus::Healthy),
            service(),
        ]));
        let vip = "10.96.0.10:80".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match snap.route(vip) {
                Route::Hbone {
                    hbone_addr,
                    target,
                    identity,
                    service,
                    ..
                } => {
                    assert_eq!(hbone_addr.port(), 15008);
                    assert_eq!(target.port(), 8080);
                    assert_eq!(hbone_addr.ip(), target.ip());
                    assert!(identity.to_string().ends_with(&format!(
                        "/sa/{}",
                        if target.ip().to_string() == "10.0.1.5" {
                            "p1"
                        } else {
                            "p3"
                        }
                    )));
                    assert_eq!(service.unwrap().name, "payment");
                    seen.push(target.ip().to_string());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, ["10.0.1.5", "10.0.2.6", "10.0.1.5", "10.0.2.6"]);
    }

    #[test]
    fn unmeshed_and_unknown_destinations_go_plain() {
        let snap = Snapshot::new(&state(vec![workload(
            "legacy",
            "10.0.3.7",
            false,
            HealthStatus::Healthy,
        )]));
        match snap.route("10.0.3.7:80".parse().unwrap()) {
            Route::Plain { addr, workload, .. } => {
                assert_eq!(addr.to_string(), "10.0.3.7:80");
                assert_eq!(workload.unwrap().uid, "legacy");
            }
            other => panic!("unexpected {other:?}"),
        }
        match snap.route("1.2.3.4:443".parse().unwrap()) {
            Route::Plain { addr, workload, .. } => {
                assert_eq!(addr.to_string(), "1.2.3.4:443");
                assert!(workload.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn vip_without_healthy_endpoints_is_refused() {
        let snap = Snapshot::new(&state(vec![
            workload("p1", "10.0.1.5", true, HealthStatus::Unhealthy),
            service(),
        ]));
        assert!(matches!(
            snap.route("10.96.0.10:80".parse().unwrap()),
            Route::NoEndpoint { .. }
        ));
        assert!(snap.policies.is_some());
    }

    fn waypoint_ref(name: &str) -> WaypointRef {
        let nn = ambit_api::config::v1::NamespacedName {
            namespace: "production".into(),
            name: name.into(),
        };
        WaypointRef {
            gateway: Some(nn.clone()),
            service: Some(nn),
            spiffe_id: format!("spiffe://cluster.local/ns/production/sa/{name}"),
            hbone_port: 15008,
        }
    }

    /// A waypoint instance (not captured, speaks HBONE) and the headless Service the
    /// controller synthesizes over it.
    fn waypoint(name: &str, instances: &[(&str, &str, HealthStatus)]) -> Vec<Kind> {
        let mut out: Vec<Kind> = instances
            .iter()
            .map(|(uid, ip, status)| {
                Kind::Workload(Workload {
                    uid: (*uid).into(),
                    name: (*uid).into(),
                    namespace: "production".into(),
                    addresses: vec![(*ip).into()],
                    spiffe_id: format!("spiffe://cluster.local/ns/production/sa/{name}"),
                    captured: false,
                    protocol: TunnelProtocol::Hbone as i32,
                    status: *status as i32,
                    ..Default::default()
                })
            })
            .collect();
        out.push(Kind::Service(Service {
            name: name.into(),
            namespace: "production".into(),
            ports: vec![ServicePort {
                name: "mesh".into(),
                port: 15008,
                target_port: 15008,
                ..Default::default()
            }],
            endpoints: instances
                .iter()
                .map(|(uid, ..)| Endpoint {
                    workload_uid: (*uid).into(),
                    ports: Default::default(),
                })
                .collect(),
            ..Default::default()
        }));
        out
    }

    fn fronted_service() -> Kind {
        let Kind::Service(mut s) = service() else {
            unreachable!()
        };
        s.waypoint = Some(waypoint_ref("waypoint"));
        Kind::Service(s)
    }

    fn payment_pods() -> Vec<Kind> {
        vec![
            workload("p1", "10.0.1.5", true, HealthStatus::Healthy),
            workload("p2", "10.0.2.5", true, HealthStatus::Healthy),
            workload("p3", "10.0.2.6", true, HealthStatus::Healthy),
        ]
    }

    #[test]
    fn a_fronted_vip_goes_to_a_healthy_waypoint_instance_asking_for_the_vip() {
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        kinds.extend(waypoint(
            "waypoint",
            &[
                ("wp-0", "10.0.1.9", HealthStatus::Healthy),
                ("wp-1", "10.0.2.9", HealthStatus::Unhealthy),
                ("wp-2", "10.0.2.10", HealthStatus::Healthy),
            ],
        ));
        let snap = Snapshot::new(&state(kinds));
        let mut seen = Vec::new();
        for _ in 0..4 {
            match snap.route("10.96.0.10:80".parse().unwrap()) {
                Route::Waypoint {
                    hbone_addr,
                    target,
                    identity,
                    waypoint,
                    service,
                    workload,
                } => {
                    assert_eq!(target.to_string(), "10.96.0.10:80");
                    assert_eq!(
                        identity.as_str(),
                        "spiffe://cluster.local/ns/production/sa/waypoint"
                    );
                    assert_eq!(service.unwrap().name, "payment");
                    assert!(workload.is_none());
                    assert_eq!(hbone_addr.ip().to_string(), waypoint.addresses[0]);
                    seen.push(hbone_addr.to_string());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                "10.0.1.9:15008",
                "10.0.2.10:15008",
                "10.0.1.9:15008",
                "10.0.2.10:15008"
            ]
        );
    }

    #[test]
    fn a_waypoint_service_mapping_its_hbone_port_elsewhere_is_dialled_on_the_target_port() {
        // Sidecar L7: the waypoint's engine runs inside the workload pods, beside their
        // sidecars (which hold 15008), so its Service maps 15008 to another port.
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        let mut wp = waypoint("waypoint", &[("wp-0", "10.0.1.9", HealthStatus::Healthy)]);
        let Some(Kind::Service(svc)) = wp.last_mut() else {
            unreachable!()
        };
        svc.ports[0].target_port = 15088;
        kinds.extend(wp);
        let snap = Snapshot::new(&state(kinds));
        match snap.route("10.96.0.10:80".parse().unwrap()) {
            Route::Waypoint { hbone_addr, .. } => {
                assert_eq!(hbone_addr.to_string(), "10.0.1.9:15088");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_fronted_vip_without_a_usable_waypoint_is_refused_never_sent_direct() {
        let vip = "10.96.0.10:80".parse().unwrap();
        // Every instance unhealthy.
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        kinds.extend(waypoint(
            "waypoint",
            &[("wp-0", "10.0.1.9", HealthStatus::Unhealthy)],
        ));
        let snap = Snapshot::new(&state(kinds));
        assert!(
            matches!(snap.route(vip), Route::NoWaypoint { reason, .. } if reason.contains("healthy")),
            "{:?}",
            snap.route(vip)
        );
        // No instance at all, and no waypoint Service.
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        kinds.extend(waypoint("waypoint", &[]));
        assert!(matches!(
            Snapshot::new(&state(kinds)).route(vip),
            Route::NoWaypoint { .. }
        ));
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        assert!(matches!(
            Snapshot::new(&state(kinds)).route(vip),
            Route::NoWaypoint { reason, .. } if reason.contains("not in the configuration")
        ));
    }

    #[test]
    fn a_pod_with_its_own_waypoint_is_reached_through_it_by_ip_and_by_vip() {
        let Kind::Workload(mut p1) = workload("p1", "10.0.1.5", true, HealthStatus::Healthy) else {
            unreachable!()
        };
        p1.waypoint = Some(waypoint_ref("pod-waypoint"));
        let mut kinds = vec![Kind::Workload(p1), service()];
        kinds.extend(waypoint(
            "pod-waypoint",
            &[("wp-0", "10.0.1.9", HealthStatus::Healthy)],
        ));
        let snap = Snapshot::new(&state(kinds));
        match snap.route("10.0.1.5:8080".parse().unwrap()) {
            Route::Waypoint {
                hbone_addr,
                target,
                workload,
                service,
                ..
            } => {
                assert_eq!(hbone_addr.to_string(), "10.0.1.9:15008");
                assert_eq!(target.to_string(), "10.0.1.5:8080");
                assert_eq!(workload.unwrap().uid, "p1");
                assert!(service.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        // The Service has no waypoint; its only healthy endpoint has: the workload
        // waypoint gets the endpoint as authority.
        match snap.route("10.96.0.10:80".parse().unwrap()) {
            Route::Waypoint {
                target, service, ..
            } => {
                assert_eq!(target.to_string(), "10.0.1.5:8080");
                assert_eq!(service.unwrap().name, "payment");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_service_waypoint_does_not_reroute_pod_ip_traffic_the_destination_refuses_it() {
        let mut kinds = payment_pods();
        kinds.push(fronted_service());
        kinds.extend(waypoint(
            "waypoint",
            &[("wp-0", "10.0.1.9", HealthStatus::Healthy)],
        ));
        let snap = Snapshot::new(&state(kinds));
        // The source sends pod-IP traffic directly …
        assert!(matches!(
            snap.route("10.0.1.5:8080".parse().unwrap()),
            Route::Hbone { .. }
        ));
        // … and the destination admits it on the Service's target ports from the
        // waypoint only.
        let p1 = snap.workload("10.0.1.5".parse().unwrap()).unwrap();
        let checkout = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/checkout").unwrap();
        let wp = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/waypoint").unwrap();
        assert_eq!(
            snap.waypoint_admission(p1, 8080, Some(&checkout)),
            WaypointAdmission::Bypass
        );
        assert_eq!(
            snap.waypoint_admission(p1, 8080, None),
            WaypointAdmission::Bypass
        );
        assert_eq!(
            snap.waypoint_admission(p1, 8080, Some(&wp)),
            WaypointAdmission::FromWaypoint
        );
        // A port the Service does not target is not fronted.
        assert_eq!(
            snap.waypoint_admission(p1, 9090, Some(&checkout)),
            WaypointAdmission::NotFronted
        );
        assert_eq!(
            snap.required_waypoints(p1, 8080)
                .iter()
                .map(|w| w.spiffe_id.as_str())
                .collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/production/sa/waypoint"]
        );
    }

    #[test]
    fn a_workload_waypoint_fronts_every_port() {
        let Kind::Workload(mut p1) = workload("p1", "10.0.1.5", true, HealthStatus::Healthy) else {
            unreachable!()
        };
        p1.waypoint = Some(waypoint_ref("pod-waypoint"));
        let snap = Snapshot::new(&state(vec![Kind::Workload(p1)]));
        let p1 = snap.workload("10.0.1.5".parse().unwrap()).unwrap();
        let wp = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/pod-waypoint").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/waypoint").unwrap();
        for port in [22, 8080, 9090] {
            assert_eq!(
                snap.waypoint_admission(p1, port, Some(&wp)),
                WaypointAdmission::FromWaypoint
            );
            assert_eq!(
                snap.waypoint_admission(p1, port, Some(&other)),
                WaypointAdmission::Bypass
            );
        }
    }

    #[test]
    fn the_destination_service_is_the_first_selecting_the_pod_on_the_target_port() {
        let mut kinds = payment_pods();
        kinds.push(service());
        // Another Service over p1, sorting after `payment`, on the same target port,
        // and one sorting before it on another target port.
        for (name, target) in [("payment-admin", 8080), ("aaa-metrics", 9100)] {
            kinds.push(Kind::Service(Service {
                name: name.into(),
                namespace: "production".into(),
                hostname: format!("{name}.production.svc.cluster.local"),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: target,
                    ..Default::default()
                }],
                endpoints: vec![Endpoint {
                    workload_uid: "p1".into(),
                    ports: Default::default(),
                }],
                ..Default::default()
            }));
        }
        let snap = Snapshot::new(&state(kinds));
        let p1 = snap.workload("10.0.1.5".parse().unwrap()).unwrap();
        let name = |port| snap.service_for_endpoint(p1, port).map(|s| s.name.clone());
        assert_eq!(name(8080).as_deref(), Some("payment"));
        assert_eq!(name(9100).as_deref(), Some("aaa-metrics"));
        assert_eq!(name(1234), None);
        let p2 = snap.workload("10.0.2.5".parse().unwrap()).unwrap();
        assert_eq!(
            snap.service_for_endpoint(p2, 8080).map(|s| s.name.as_str()),
            Some("payment")
        );
    }
}
