//! What the proxies look up per connection, derived once per configuration change.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ambit_api::ResourceKind;
use ambit_api::config::v1::resource::Kind;
use ambit_api::config::v1::{HealthStatus, Service, ServicePort, TunnelProtocol, Workload};
use ambit_control_client::discovery::ConfigState;
use ambit_identity::SpiffeId;
use ambit_policy::wire::ProxyPolicies;

/// The configuration, indexed for the proxies.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads_by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    services: HashMap<SocketAddrV4, (Arc<Service>, ServicePort)>,
    next_endpoint: HashMap<SocketAddrV4, AtomicUsize>,
    /// `None` when the policies failed to convert (only possible for a state file
    /// written by another version): inbound then denies everything (fail closed).
    pub policies: Option<ProxyPolicies>,
}

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Through HBONE to `hbone_addr`, asking for `target`, expecting `identity`.
    Hbone {
        /// The destination pod's `ip:15008`.
        hbone_addr: SocketAddr,
        /// The `:authority`: the pod's `ip:port` (for a VIP, the chosen endpoint's
        /// `ip:targetPort`).
        target: SocketAddr,
        /// The identity the destination must prove.
        identity: SpiffeId,
        /// The destination workload.
        workload: Arc<Workload>,
        /// The Service, when the original destination was its VIP.
        service: Option<Arc<Service>>,
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

    /// Where a connection to `dst` goes: a VIP is resolved to a healthy endpoint
    /// (round robin), a captured destination gets HBONE, anything else plain TCP.
    pub fn route(&self, dst: SocketAddrV4) -> Route {
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
                let w = self.workloads_by_uid.get(&e.workload_uid)?;
                // Unspecified counts as ready: local-mode workloads carry no status.
                if w.status == HealthStatus::Unhealthy as i32 {
                    return None;
                }
                let ip = w
                    .addresses
                    .iter()
                    .find_map(|a| a.parse::<Ipv4Addr>().ok())?;
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
}
