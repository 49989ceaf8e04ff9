//! The modes the benchmark compares, and everything that differs between them: how
//! the cluster is brought up, which processes are "the mesh", and how a scenario's
//! traffic is proven to have taken the mode's path.
//!
//! Adding a mode (ambient L7, sidecar L4/L7) means filling in its arms here: the rest
//! of the harness only calls these functions.

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
    /// The sidecar plus the waypoint's L7 engine inside each pod.
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
    /// Connections the client opened from the client pod to the server pod.
    pub connections: u64,
    /// Bytes the client sent to the server (at least).
    pub bytes_to_server: u64,
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

/// Labels that select the benchmark's own traffic in the daemons' metrics.
fn bench_labels(reporter: &'static str) -> [(&'static str, String); 4] {
    [
        ("reporter", reporter.to_owned()),
        (
            "source_principal",
            format!(
                "cluster.local/ns/{}/sa/{}",
                topology::NAMESPACE,
                topology::CLIENT_SA
            ),
        ),
        (
            "destination_principal",
            format!(
                "cluster.local/ns/{}/sa/{}",
                topology::NAMESPACE,
                topology::SERVER_SA
            ),
        ),
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
            Mode::NoMesh | Mode::AmbientL4 => Ok(()),
            Mode::AmbientL7 => Err(
                "needs the waypoint on the simulated cluster (issue 5) wired into this harness: \
                 bench/mode.rs",
            ),
            Mode::SidecarL4 | Mode::SidecarL7 => {
                Err("needs `ambit-node --mode sidecar` (issue 6, item 1)")
            }
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
            Mode::AmbientL4 => opts.mesh(MeshOptions {
                controller_args: mesh.controller_args.clone(),
                daemon_args: mesh.daemon_args.clone(),
                ..MeshOptions::with_daemons()
            }),
            Mode::AmbientL7 | Mode::SidecarL4 | Mode::SidecarL7 => {
                unreachable!("availability() refused the mode above")
            }
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
            Mode::AmbientL4 => {
                let mesh = cluster.mesh().context("the cluster has no mesh")?;
                let deadline = Instant::now() + timeout;
                for pod in cluster.pods() {
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
            Mode::AmbientL7 | Mode::SidecarL4 | Mode::SidecarL7 => {
                bail!("mode {} has no readiness check yet", self.id())
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
                ensure!(
                    mesh.daemons.len() == status.nodes.len(),
                    "{} node daemons for {} nodes",
                    mesh.daemons.len(),
                    status.nodes.len()
                );
                procs.extend(mesh.daemons.iter().map(|d| MeshProcess {
                    name: format!("{}@{}", d.process, d.node),
                    pid: d.pid,
                    data_plane: true,
                }));
                Ok(procs)
            }
        }
    }

    /// Reads the path counters (the daemons' `istio_tcp_*` series of the benchmark's
    /// traffic); nothing for the baseline.
    pub fn counters(self, cluster: &Cluster) -> anyhow::Result<Counters> {
        let mut out = BTreeMap::new();
        if self == Mode::NoMesh {
            return Ok(Counters(out));
        }
        let mesh = cluster.mesh().context("the cluster has no mesh")?;
        for (node, reporter) in [
            (topology::CLIENT_NODE, "source"),
            (topology::SERVER_NODE, "destination"),
        ] {
            let daemon = mesh
                .daemons
                .iter()
                .find(|d| d.node == node)
                .with_context(|| format!("no daemon on {node}"))?;
            let (code, body) = cluster
                .http_get(
                    &Place::Node(node.to_owned()),
                    SocketAddr::V4(daemon.metrics_addr),
                    "/metrics",
                )
                .with_context(|| format!("reading the metrics of the daemon on {node}"))?;
            ensure!(
                code == 200,
                "metrics of the daemon on {node}: HTTP {code}: {body}"
            );
            let samples = metrics::parse(&body);
            let labels = bench_labels(reporter);
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
            Mode::AmbientL4 => {
                ensure!(
                    capture.contains(&15001),
                    "{scenario}: the client pod has no outbound capture listener (15001); \
                     listeners: {listeners:?}"
                );
                let need = |key: &str| -> f64 {
                    match key {
                        "source.opened" | "destination.opened" => expect.connections as f64,
                        "source.closed" | "destination.closed" if !open => {
                            expect.connections as f64
                        }
                        "destination.received_bytes" if !open => expect.bytes_to_server as f64,
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
                            path: "HBONE with mutual_tls through the daemons of both nodes"
                                .to_owned(),
                            expected: expect,
                            deltas,
                        });
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "{scenario}: the daemons' mutual_tls counters for client → server \
                             did not show the traffic within {wait:?}: {}",
                            short.join("; ")
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Mode::AmbientL7 | Mode::SidecarL4 | Mode::SidecarL7 => {
                bail!("mode {} has no path check yet", self.id())
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
    fn only_runnable_modes_are_available() {
        assert!(Mode::NoMesh.availability().is_ok());
        assert!(Mode::AmbientL4.availability().is_ok());
        for m in [Mode::AmbientL7, Mode::SidecarL4, Mode::SidecarL7] {
            assert!(m.availability().is_err(), "{m:?}");
        }
    }
}
