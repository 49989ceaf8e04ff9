//! The modes the benchmark compares, and everything that differs between them: how
//! the cluster is brought up, which processes are "the mesh", and how a scenario's
//! traffic is proven to have taken the mode's path.
//!
//! Adding a mode means filling in its arms here: the rest of the harness only calls
//! these functions.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, Topology};
use anyhow::{Context as _, bail, ensure};
use serde::Serialize;

use super::{metrics, procfs, topology};

/// A way of running the same workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No controller, no daemons, no eBPF: the kernel path between two pods.
    NoMesh,
    /// The controller and one `ambit-node` per node: eBPF capture, HBONE (mTLS HTTP/2
    /// CONNECT) between the nodes' daemons.
    AmbientL4,
    /// Ambient L4 plus a waypoint in front of the server's Service.
    AmbientL7,
    /// `ambit-node --mode sidecar` inside each pod.
    SidecarL4,
    /// The sidecar in each pod plus the waypoint's L7 engine inside the server pod
    /// (the same `ambit-waypoint` as ambient L7, placed in the pod it fronts).
    SidecarL7,
}

/// A process counted as "the mesh" (CPU and memory figures).
#[derive(Debug, Clone, Serialize)]
pub struct MeshProcess {
    /// e.g. `ambit-node@node-1`, `ambit-controller`.
    pub name: String,
    pub pid: u32,
    /// Data plane (daemons, waypoints, sidecars) or control plane (the controller).
    pub data_plane: bool,
}

/// Cumulative path counters at one moment (named sums; empty for the baseline).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters(pub BTreeMap<String, f64>);

/// What a scenario must have carried.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Expect {
    /// Connections the client opened from the client pod to the server.
    pub connections: u64,
    /// Bytes the client sent to the server (at least).
    pub bytes_to_server: u64,
    /// HTTP requests answered (0 for TCP scenarios).
    pub http_requests: u64,
}

/// Where the client sends each kind of traffic.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `http://…/` of the server's HTTP port.
    pub http_url: String,
    /// `host:port` of its TCP echo port.
    pub echo: String,
    /// `host:port` of its discard port.
    pub discard: String,
}

/// Proof that a scenario's traffic took the mode's path.
#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    pub scenario: String,
    /// e.g. `direct (no mesh process, no capture listener in the client pod)` or
    /// `HBONE mutual_tls via both node daemons`.
    pub path: String,
    pub expected: Expect,
    /// Growth of each path counter over the scenario.
    pub deltas: BTreeMap<String, f64>,
}

/// `cluster.local/ns/bench/sa/<sa>`.
fn principal(sa: &str) -> String {
    format!("cluster.local/ns/{}/sa/{sa}", topology::NAMESPACE)
}

/// Labels that select the benchmark's own traffic in a daemon's metrics: from the
/// client to `destination_sa` (the server, or in ambient L7 the waypoint on the
/// client's side), over mutual TLS.
fn bench_labels(reporter: &'static str, destination_sa: &str) -> [(&'static str, String); 4] {
    [
        ("reporter", reporter.to_owned()),
        ("source_principal", principal(topology::CLIENT_SA)),
        ("destination_principal", principal(destination_sa)),
        ("connection_security_policy", "mutual_tls".to_owned()),
    ]
}

/// Capture listeners the daemon opens inside an enrolled pod (DESIGN §2).
const CAPTURE_PORTS: [u16; 3] = [15001, 15006, 15008];

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 5] = [
        Mode::NoMesh,
        Mode::AmbientL4,
        Mode::AmbientL7,
        Mode::SidecarL4,
        Mode::SidecarL7,
    ];

    /// The mode's name on the command line and in the JSON.
    pub fn id(self) -> &'static str {
        match self {
            Mode::NoMesh => "no-mesh",
            Mode::AmbientL4 => "ambient-l4",
            Mode::AmbientL7 => "ambient-l7",
            Mode::SidecarL4 => "sidecar-l4",
            Mode::SidecarL7 => "sidecar-l7",
        }
    }

    /// The mode's name in the report.
    pub fn title(self) -> &'static str {
        match self {
            Mode::NoMesh => "no mesh (baseline)",
            Mode::AmbientL4 => "ambient L4",
            Mode::AmbientL7 => "ambient L7",
            Mode::SidecarL4 => "sidecar L4",
            Mode::SidecarL7 => "sidecar L7",
        }
    }

    /// `Err(why)` for a mode the harness cannot run yet. Such a mode is listed in the
    /// report as not available, never given figures.
    pub fn availability(self) -> Result<(), &'static str> {
        match self {
            Mode::NoMesh
            | Mode::AmbientL4
            | Mode::AmbientL7
            | Mode::SidecarL4
            | Mode::SidecarL7 => Ok(()),
        }
    }

    /// Parses a mode id.
    pub fn from_id(id: &str) -> anyhow::Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.id() == id)
            .with_context(|| {
                let ids: Vec<&str> = Mode::ALL.iter().map(|m| m.id()).collect();
                format!("unknown mode {id:?} (modes: {})", ids.join(", "))
            })
    }

    /// Whether the mode runs any mesh process.
    pub fn is_meshed(self) -> bool {
        self != Mode::NoMesh
    }

    /// Workspace binaries the mode starts.
    pub fn binaries(self) -> &'static [&'static str] {
        match self {
            Mode::NoMesh => &["ambit-echo"],
            Mode::AmbientL4 => &["ambit-echo", "ambit-controller", "ambit-node", "ambit-cni"],
            // `ambit-node --mode sidecar` in each pod: no CNI plugin.
            Mode::SidecarL4 => &["ambit-echo", "ambit-controller", "ambit-node"],
            Mode::AmbientL7 => &[
                "ambit-echo",
                "ambit-controller",
                "ambit-node",
                "ambit-cni",
                "ambit-waypoint",
            ],
            Mode::SidecarL7 => &[
                "ambit-echo",
                "ambit-controller",
                "ambit-node",
                "ambit-waypoint",
            ],
        }
    }

    /// The mode's topology with `pods` workload pods: the same for every mode, plus the
    /// waypoint for the L7 modes (its own pod in ambient L7; in sidecar L7 its Service
    /// selects the server pods, which run its engine).
    pub fn topology(self, pods: usize) -> anyhow::Result<Topology> {
        let waypoint = match self {
            Mode::AmbientL7 => topology::Waypoint::OwnPod,
            Mode::SidecarL7 => topology::Waypoint::InServerPods,
            Mode::NoMesh | Mode::AmbientL4 | Mode::SidecarL4 => topology::Waypoint::None,
        };
        topology::with_pods(pods, waypoint)
    }

    /// Whether the server Service is fronted by the waypoint's L7 engine.
    fn is_l7(self) -> bool {
        matches!(self, Mode::AmbientL7 | Mode::SidecarL7)
    }

    /// Whether the proxies run inside the pods.
    fn is_sidecar(self) -> bool {
        matches!(self, Mode::SidecarL4 | Mode::SidecarL7)
    }

    /// Where the client sends its traffic: the server pod's IP, or in the L7 modes the
    /// server Service's VIP (a waypoint fronts a Service; without the mesh nothing
    /// answers on a VIP, so the other modes use the pod IP).
    pub fn targets(self, cluster: &Cluster) -> anyhow::Result<Targets> {
        let (ip, http_port) = if self.is_l7() {
            let svc = cluster.service(&format!("{}/server", topology::NAMESPACE))?;
            (svc.cluster_ip, 80)
        } else {
            (
                cluster.pod(&topology::server_pod())?.ip,
                topology::HTTP_PORT,
            )
        };
        Ok(Targets {
            http_url: format!("http://{ip}:{http_port}/"),
            echo: format!("{ip}:{}", topology::ECHO_PORT),
            discard: format!("{ip}:{}", topology::DISCARD_PORT),
        })
    }

    /// Brings `topology` up in this mode. Every mode gets the identical topology; the
    /// namespace carries the ambient label in all of them, which does nothing without
    /// daemons (no CNI call, no enrolment).
    pub fn up(
        self,
        opts: Options,
        topology: &Topology,
        mesh: &MeshArgs,
    ) -> anyhow::Result<Cluster> {
        if let Err(why) = self.availability() {
            bail!("mode {} is not available yet: {why}", self.id());
        }
        let opts = match self {
            Mode::NoMesh => opts,
            // With a waypoint in the topology, `up` also starts `ambit-waypoint`.
            Mode::AmbientL4 | Mode::AmbientL7 => opts.mesh(MeshOptions {
                controller_args: mesh.controller_args.clone(),
                daemon_args: mesh.daemon_args.clone(),
                ..MeshOptions::with_daemons()
            }),
            // One `ambit-node --mode sidecar` in every pod, no node daemons.
            Mode::SidecarL4 => opts.mesh(MeshOptions {
                controller_args: mesh.controller_args.clone(),
                daemon_args: mesh.daemon_args.clone(),
                ..MeshOptions::with_sidecars()
            }),
            // The sidecars, and the waypoint's engine in the server pod.
            Mode::SidecarL7 => opts.mesh(MeshOptions {
                controller_args: mesh.controller_args.clone(),
                daemon_args: mesh.daemon_args.clone(),
                ..MeshOptions::with_l7_sidecars()
            }),
        };
        let name = opts.name.clone();
        Cluster::up(opts, topology)
            .with_context(|| format!("bringing cluster {name} up in mode {}", self.id()))
    }

    /// Waits until the mesh can carry every pod's traffic: `Cluster::up` returns once
    /// the workloads listen, but a daemon fetches its pods' certificates afterwards,
    /// and until it has them its HBONE handshakes fail. Ambient: every pod's identity
    /// has a certificate in its node daemon's `/config_dump`.
    pub fn wait_ready(self, cluster: &Cluster, timeout: Duration) -> anyhow::Result<()> {
        match self {
            Mode::NoMesh => Ok(()),
            // A waypoint holds its own certificate and `up` waits for its readiness;
            // the daemons serve the workload pods.
            Mode::AmbientL4 | Mode::AmbientL7 => {
                let mesh = cluster.mesh().context("the cluster has no mesh")?;
                let deadline = Instant::now() + timeout;
                for pod in cluster.pods().into_iter().filter(|p| p.waypoint.is_none()) {
                    let daemon = mesh
                        .daemons
                        .iter()
                        .find(|d| d.node == pod.node)
                        .with_context(|| format!("no daemon on {}", pod.node))?;
                    let suffix = format!("/ns/{}/sa/{}", pod.namespace, pod.service_account);
                    loop {
                        let (code, body) = cluster
                            .http_get(
                                &Place::Node(pod.node.clone()),
                                SocketAddr::V4(daemon.admin_addr),
                                "/config_dump",
                            )
                            .with_context(|| {
                                format!("config dump of the daemon on {}", pod.node)
                            })?;
                        let has_cert = code == 200
                            && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|dump| {
                                dump["certificates"].as_array().is_some_and(|certs| {
                                    certs.iter().any(|c| {
                                        c["identity"].as_str().is_some_and(|i| i.ends_with(&suffix))
                                            && c["notAfter"].is_string()
                                    })
                                })
                            });
                        if has_cert {
                            break;
                        }
                        ensure!(
                            Instant::now() < deadline,
                            "the daemon on {} has no certificate for {suffix} after {timeout:?}",
                            pod.node
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                Ok(())
            }
            // A sidecar's readiness includes its pod's certificate (blocker `pod`),
            // and `up` waits for every sidecar's readiness (and every L7 engine's, which
            // includes its certificate): check that every pod got one.
            Mode::SidecarL4 | Mode::SidecarL7 => {
                let mesh = cluster.mesh().context("the cluster has no mesh")?;
                for pod in cluster.pods().into_iter().filter(|p| p.waypoint.is_none()) {
                    ensure!(
                        mesh.sidecars.iter().any(|s| s.pod == pod.pod_ref()),
                        "pod {} has no sidecar",
                        pod.pod_ref()
                    );
                }
                if self == Mode::SidecarL7 {
                    ensure!(
                        mesh.waypoints
                            .iter()
                            .any(|w| w.pod.to_string() == topology::server_pod()),
                        "the server pod runs no L7 engine"
                    );
                }
                Ok(())
            }
        }
    }

    /// The mesh processes of a cluster brought up in this mode.
    pub fn mesh_processes(self, cluster: &Cluster) -> anyhow::Result<Vec<MeshProcess>> {
        let status = cluster.status();
        match (self, status.mesh) {
            (Mode::NoMesh, None) => Ok(Vec::new()),
            (Mode::NoMesh, Some(_)) => bail!("a no-mesh cluster has a mesh control plane"),
            (_, None) => bail!("mode {}: the cluster has no mesh", self.id()),
            (_, Some(mesh)) => {
                let mut procs = vec![MeshProcess {
                    name: mesh.controller.process.clone(),
                    pid: mesh.controller.pid,
                    data_plane: false,
                }];
                if self.is_sidecar() {
                    let pods = status.pods.iter().filter(|p| p.waypoint.is_none()).count();
                    ensure!(
                        mesh.daemons.is_empty() && mesh.sidecars.len() == pods,
                        "sidecar mode runs {} node daemons and {} sidecars for {pods} pods",
                        mesh.daemons.len(),
                        mesh.sidecars.len()
                    );
                } else {
                    ensure!(
                        mesh.daemons.len() == status.nodes.len(),
                        "{} node daemons for {} nodes",
                        mesh.daemons.len(),
                        status.nodes.len()
                    );
                }
                procs.extend(mesh.sidecars.iter().map(|s| MeshProcess {
                    name: format!("{}@{}", s.process, s.pod),
                    pid: s.pid,
                    data_plane: true,
                }));
                procs.extend(mesh.daemons.iter().map(|d| MeshProcess {
                    name: format!("{}@{}", d.process, d.node),
                    pid: d.pid,
                    data_plane: true,
                }));
                procs.extend(mesh.waypoints.iter().map(|w| MeshProcess {
                    name: format!("{}@{}", w.process, w.pod),
                    pid: w.pid,
                    data_plane: true,
                }));
                // Ambient L7: the waypoint pod; sidecar L7: the engine in the server pod.
                let waypoints = mesh.waypoints.len();
                let want = usize::from(self.is_l7());
                ensure!(
                    waypoints == want,
                    "mode {} runs {waypoints} waypoints, expected {want}",
                    self.id()
                );
                Ok(procs)
            }
        }
    }

    /// Reads the path counters (the `istio_tcp_*` series of the benchmark's traffic, from
    /// the client's and the server's node daemons, or in sidecar mode from their
    /// sidecars); nothing for the baseline.
    pub fn counters(self, cluster: &Cluster) -> anyhow::Result<Counters> {
        let mut out = BTreeMap::new();
        if self == Mode::NoMesh {
            return Ok(Counters(out));
        }
        let mesh = cluster.mesh().context("the cluster has no mesh")?;
        // In the L7 modes the client's proxy tunnels to the waypoint (its pod, or its
        // engine in the server pod), which tunnels on to the server (whose proxy still
        // reports the client's identity).
        let first_hop = if self.is_l7() {
            topology::WAYPOINT
        } else {
            topology::SERVER_SA
        };
        for (pod, node, reporter, destination_sa) in [
            (
                topology::client_pod(),
                topology::CLIENT_NODE,
                "source",
                first_hop,
            ),
            (
                topology::server_pod(),
                topology::SERVER_NODE,
                "destination",
                topology::SERVER_SA,
            ),
        ] {
            let (place, addr, proxy) = if self.is_sidecar() {
                let sidecar = mesh
                    .sidecars
                    .iter()
                    .find(|s| s.pod.to_string() == pod)
                    .with_context(|| format!("no sidecar in {pod}"))?;
                (
                    Place::Pod(sidecar.pod.clone()),
                    sidecar.metrics_addr,
                    format!("the sidecar in {pod}"),
                )
            } else {
                let daemon = mesh
                    .daemons
                    .iter()
                    .find(|d| d.node == node)
                    .with_context(|| format!("no daemon on {node}"))?;
                (
                    Place::Node(node.to_owned()),
                    daemon.metrics_addr,
                    format!("the daemon on {node}"),
                )
            };
            let (code, body) = cluster
                .http_get(&place, SocketAddr::V4(addr), "/metrics")
                .with_context(|| format!("reading the metrics of {proxy}"))?;
            ensure!(code == 200, "metrics of {proxy}: HTTP {code}: {body}");
            let samples = metrics::parse(&body);
            let labels = bench_labels(reporter, destination_sa);
            let want: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            for (key, metric) in [
                ("opened", "istio_tcp_connections_opened_total"),
                ("closed", "istio_tcp_connections_closed_total"),
                ("received_bytes", "istio_tcp_received_bytes_total"),
            ] {
                out.insert(
                    format!("{reporter}.{key}"),
                    metrics::sum(&samples, metric, &want),
                );
            }
        }
        if self.is_l7() {
            let w = mesh.waypoints.first().context("no waypoint")?;
            let (code, body) = cluster
                .http_get(
                    &Place::Pod(w.pod.clone()),
                    SocketAddr::V4(w.metrics_addr),
                    "/metrics",
                )
                .context("reading the waypoint's metrics")?;
            ensure!(code == 200, "metrics of the waypoint: HTTP {code}: {body}");
            let client = principal(topology::CLIENT_SA);
            let requests = metrics::sum(
                &metrics::parse(&body),
                "istio_requests_total",
                &[
                    ("source_principal", client.as_str()),
                    ("destination_service", topology::SERVER_SERVICE_HOST),
                    ("response_code", "200"),
                ],
            );
            out.insert("waypoint.requests".to_owned(), requests);
        }
        Ok(Counters(out))
    }

    /// Checks that traffic since `before` took this mode's path and carried at least
    /// `expect`; polls the counters for up to `wait` (bytes are counted when a
    /// connection closes). `open` says the scenario's connections are still open, so
    /// only `opened` can have grown.
    pub fn verify_path(
        self,
        cluster: &Cluster,
        scenario: &str,
        before: &Counters,
        expect: Expect,
        open: bool,
        wait: Duration,
    ) -> anyhow::Result<Evidence> {
        let client = cluster
            .pod(&topology::client_pod())
            .context("the benchmark's client pod")?;
        let pid = client
            .pid
            .context("the client pod has no workload process")?;
        let listeners = procfs::listening_ports(pid)?;
        let capture: Vec<u16> = CAPTURE_PORTS
            .into_iter()
            .filter(|p| listeners.contains(p))
            .collect();
        match self {
            Mode::NoMesh => {
                ensure!(
                    cluster.mesh().is_none(),
                    "{scenario}: the no-mesh cluster runs a mesh"
                );
                ensure!(
                    capture.is_empty(),
                    "{scenario}: the no-mesh client pod has capture listeners on {capture:?}"
                );
                Ok(Evidence {
                    scenario: scenario.to_owned(),
                    path: "direct: no mesh process, no capture listener in the client pod"
                        .to_owned(),
                    expected: expect,
                    deltas: BTreeMap::new(),
                })
            }
            Mode::AmbientL4 | Mode::AmbientL7 | Mode::SidecarL4 | Mode::SidecarL7 => {
                ensure!(
                    capture.contains(&15001),
                    "{scenario}: the client pod has no outbound capture listener (15001); \
                     listeners: {listeners:?}"
                );
                let l7 = self.is_l7();
                let conns = expect.connections as f64;
                let bytes = expect.bytes_to_server as f64;
                // L7 modes: every client connection is a tunnel to the waypoint (the
                // client's proxy counts it); the waypoint pools its HTTP connections
                // to the server, so on the server's side only TCP scenarios map one to
                // one, and HTTP requests are proven by the waypoint's own counter.
                let need = |key: &str| -> f64 {
                    match key {
                        "source.opened" => conns,
                        "source.closed" if !open => conns,
                        "source.received_bytes" if l7 && !open => bytes,
                        "destination.opened" if !l7 || expect.http_requests == 0 => conns,
                        "destination.closed" if !l7 && !open => conns,
                        "destination.received_bytes" if !l7 && !open => bytes,
                        "waypoint.requests" => expect.http_requests as f64,
                        _ => 0.0,
                    }
                };
                let deadline = Instant::now() + wait;
                loop {
                    let after = self.counters(cluster)?;
                    let deltas: BTreeMap<String, f64> = after
                        .0
                        .iter()
                        .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                        .collect();
                    let short: Vec<String> = deltas
                        .iter()
                        .filter(|(k, d)| **d < need(k))
                        .map(|(k, d)| format!("{k} grew by {d}, expected at least {}", need(k)))
                        .collect();
                    if short.is_empty() {
                        return Ok(Evidence {
                            scenario: scenario.to_owned(),
                            path: if self == Mode::SidecarL7 {
                                "HBONE with mutual_tls client's sidecar → the waypoint's L7 \
                                 engine in the server pod, and engine → the server's sidecar; \
                                 HTTP requests counted by the engine"
                            } else if l7 {
                                "HBONE with mutual_tls client → waypoint (node-1's daemon) and \
                                 waypoint → server (node-2's daemon); HTTP requests counted \
                                 by the waypoint"
                            } else if self == Mode::SidecarL4 {
                                "HBONE with mutual_tls between the client's and the server's \
                                 sidecars"
                            } else {
                                "HBONE with mutual_tls through the daemons of both nodes"
                            }
                            .to_owned(),
                            expected: expect,
                            deltas,
                        });
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "{scenario}: the mesh's counters for the client's traffic did not \
                             show it within {wait:?}: {}",
                            short.join("; ")
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Extra flags for the mesh processes (profiling, log levels).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshArgs {
    pub daemon_args: Vec<String>,
    pub controller_args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_named() {
        for m in Mode::ALL {
            assert_eq!(Mode::from_id(m.id()).unwrap(), m);
        }
        let err = Mode::from_id("mesh").unwrap_err().to_string();
        assert!(
            err.contains("\"mesh\"") && err.contains("ambient-l4"),
            "{err}"
        );
    }

    #[test]
    fn every_mode_is_available() {
        for m in Mode::ALL {
            assert!(m.availability().is_ok(), "{m:?}");
        }
    }
}
