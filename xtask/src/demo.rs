//! `cargo xtask demo`: the simulated cluster with the mesh and real traffic, explained
//! as it runs.
//!
//! It brings the default topology up with the controller and one node daemon per node,
//! then shows, each with what was observed (answers, the daemons' metrics and logs, a
//! packet capture on the underlay): same-node and cross-node calls carried in mutual
//! TLS with the identities on both ends, calls by Service VIP, an AuthorizationPolicy
//! refusing a caller, and PeerAuthentication STRICT refusing the unmeshed
//! `legacy-client`; then L7 through a waypoint (module [`waypoint`]): a 90/10 split,
//! retries, a timeout, outlier detection and an L7 AuthorizationPolicy. Any scenario
//! that does not behave as described fails the demo
//! (non-zero exit, `✘` and what was seen instead); the cluster is torn down in every
//! case (dropping the [`Cluster`] handle tears it down on an early return).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ambit_echo::load::Summary;
use ambit_simcluster::{Cluster, ClusterName, MeshOptions, Options, PodInfo, Topology};
use anyhow::{Context as _, bail, ensure};

use crate::{setup, test::cargo, workspace_root};

mod waypoint;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Leave the cluster running afterwards (remove it with `cargo xtask cluster down
    /// --name demo`).
    #[arg(long)]
    pub keep: bool,
}

const NAME: &str = "demo";
const CHECKOUT: &str = "production/checkout-0";
const INVENTORY: &str = "production/inventory-0";
const LEGACY: &str = "legacy/legacy-client-0";
const CHECKOUT_PRINCIPAL: &str = "cluster.local/ns/production/sa/checkout";
/// How long a policy change may take to show in the demo (the tests hold it to 1 s).
const POLICY_DEADLINE: Duration = Duration::from_secs(5);
/// A request body easy to spot in a packet capture.
const SECRET: &str = "card-number=4111-1111-1111-1111;cvv=737;demo-secret";

const ALLOW_CHECKOUT: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-from-checkout, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [\"cluster.local/ns/production/sa/checkout\"]}}]
";

const STRICT: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: production}
spec:
  mtls: {mode: STRICT}
";

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    setup::run(&setup::SetupArgs::default())?;
    cargo("building the binaries", &["build", "--workspace", "--bins"])?;

    let name = ClusterName::new(NAME)?;
    // A demo cluster left by an interrupted run would make `up` refuse to start.
    let leftover = ambit_simcluster::down(&Options::new(name.clone()))?;
    if !leftover.found_nothing() {
        println!("(removed the leftovers of an earlier demo run)");
    }

    heading(
        "Bringing up the simulated cluster with the mesh (the default topology, a small shop, \
         with a waypoint in production)",
    );
    let opts = Options::new(name)
        .binaries_dir(workspace_root().join("target/debug"))
        .mesh(MeshOptions::with_daemons());
    // The waypoint's pod gets its address after every workload pod: the shop's
    // addresses stay those of the default topology.
    let topology = Topology::default_shop().with_waypoint(
        waypoint::NAMESPACE,
        waypoint::NAME,
        &[waypoint::NODE],
    );
    let cluster = Cluster::up(opts, &topology).context("bringing the demo cluster up")?;
    // From here on an error drops `cluster`, which tears it down.
    let demo = Demo::new(&cluster)?;
    demo.describe()?;
    demo.same_node()?;
    demo.across_nodes()?;
    demo.by_vip()?;
    demo.authorization_policy()?;
    demo.strict_mtls()?;
    demo.burst()?;
    demo.waypoint()?;

    heading("What this shows");
    println!(
        "   No pod was changed: the node daemons captured the pods' connections with eBPF and\n   \
         carried them in mutual TLS (HBONE on port 15008), each end proving its identity with a\n   \
         certificate from the controller. Istio's AuthorizationPolicy and PeerAuthentication YAML\n   \
         decided who got in, for new connections, moments after it was written. Once payment was\n   \
         labelled to use the waypoint, its VirtualService, DestinationRule and L7 policy applied\n   \
         per request: split, retried, timed out, ejected and authorized."
    );

    if args.keep {
        cluster.detach()?;
        println!("\nThe cluster keeps running: `cargo xtask cluster status --name {NAME}`.");
        return Ok(());
    }
    heading("Tearing down");
    let report = cluster.down()?;
    println!(
        "   Removed {} network namespaces, {} processes (controller, daemons, workloads), \
         the cgroup tree and the state directory.",
        report.netns_removed.len(),
        report.processes_killed
    );
    Ok(())
}

fn heading(text: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m{text}\x1b[0m");
    } else {
        println!("\n{text}");
    }
}

fn ok(text: impl std::fmt::Display) {
    println!("   ✔ {text}");
}

/// The cluster and the pods the scenarios use.
struct Demo<'a> {
    cluster: &'a Cluster,
    checkout: PodInfo,
    /// payment on checkout's node.
    near: PodInfo,
    /// payment on another node.
    far: PodInfo,
    legacy: PodInfo,
}

impl<'a> Demo<'a> {
    fn new(cluster: &'a Cluster) -> anyhow::Result<Self> {
        let checkout = cluster.pod(CHECKOUT)?;
        let near = pick(cluster, "payment-v1", |p| p.node == checkout.node)?;
        let far = pick(cluster, "payment-v1", |p| p.node != checkout.node)?;
        let legacy = cluster.pod(LEGACY)?;
        Ok(Self {
            cluster,
            checkout,
            near,
            far,
            legacy,
        })
    }

    fn describe(&self) -> anyhow::Result<()> {
        let status = self.cluster.status();
        for node in &status.nodes {
            println!(
                "   node {:<8} underlay IP {:<13} pods in {}",
                node.name, node.ip, node.pod_cidr
            );
        }
        for pod in &status.pods {
            let meshed = status.namespaces.iter().any(|ns| {
                ns.name == pod.namespace
                    && ns
                        .labels
                        .get("ambit.dev/dataplane-mode")
                        .map(String::as_str)
                        == Some("ambient")
            });
            println!(
                "   pod  {:<30} on {:<7} IP {:<11} service account {:<14} {}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.node,
                pod.ip,
                pod.service_account,
                if pod.waypoint.is_some() {
                    "waypoint (L7 proxy, not captured)"
                } else if meshed {
                    "in the mesh"
                } else {
                    "not in the mesh"
                }
            );
        }
        for svc in &status.services {
            println!(
                "   service {:<27} cluster IP {}",
                format!("{}/{}", svc.namespace, svc.name),
                svc.cluster_ip,
            );
        }
        let mesh = status
            .mesh
            .context("the cluster came up without the mesh")?;
        println!(
            "   controller (pid {}) on {}: Kubernetes YAML from {}, certificate authority",
            mesh.controller.pid,
            mesh.controller.grpc_addr,
            status.config_dir.display()
        );
        for w in &mesh.waypoints {
            println!(
                "   waypoint {}/{} (Gateway of class ambit-waypoint; pid {} in pod {}): HBONE on {}",
                w.namespace, w.name, w.pid, w.pod.name, w.hbone_addr
            );
        }
        for d in &mesh.daemons {
            let dump = self.daemon_get(&d.node, "/config_dump")?;
            let dump: serde_json::Value =
                serde_json::from_str(&dump).context("parsing a daemon's /config_dump")?;
            let pods = dump["pods"].as_array().cloned().unwrap_or_default();
            let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
            println!(
                "   node daemon on {} (pid {}): {} pods enrolled",
                d.node,
                d.pid,
                pods.len()
            );
            for pod in &pods {
                let identity = pod["identity"].as_str().unwrap_or("?");
                let expiry = certs
                    .iter()
                    .find(|c| c["identity"].as_str() == Some(identity))
                    .and_then(|c| c["notAfter"].as_str())
                    .unwrap_or("not issued yet");
                println!(
                    "     {:<24} {identity}, certificate valid until {expiry}",
                    pod["name"].as_str().unwrap_or("?"),
                );
            }
        }
        Ok(())
    }

    fn same_node(&self) -> anyhow::Result<()> {
        heading(&format!(
            "1. Same node: checkout → payment on {}, in mutual TLS",
            self.checkout.node
        ));
        self.meshed_call(&self.near)
    }

    fn across_nodes(&self) -> anyhow::Result<()> {
        heading(&format!(
            "2. Across nodes: checkout on {} → payment on {}, in mutual TLS, as seen on the wire",
            self.checkout.node, self.far.node
        ));
        let status = self.cluster.status();
        let dir = status
            .config_dir
            .parent()
            .context("the cluster's state directory")?
            .to_path_buf();
        let capture = Capture::start(
            &status.underlay.netns,
            &status.underlay.bridge,
            dir.join("demo-underlay.pcap"),
        )?;
        self.meshed_call(&self.far)?;
        let url = format!("http://{}:8080/", self.far.ip);
        // The same request body from checkout (meshed) and from legacy-client (not):
        // the plaintext copy, sent last, also tells when the capture holds everything.
        self.post(CHECKOUT, &url, SECRET)?;
        self.post(LEGACY, &url, SECRET)?;
        let packets = capture.stop_after(SECRET)?;

        let meshed: Vec<&Line> = packets
            .iter()
            .filter(|p| p.between(self.checkout.ip, self.far.ip))
            .collect();
        let readable = meshed.iter().filter(|p| p.text.contains(SECRET)).count();
        ensure!(
            !meshed.is_empty(),
            "✘ the capture on the underlay saw no packet between {} and {}",
            self.checkout.ip,
            self.far.ip
        );
        ensure!(
            meshed.iter().all(|p| p.src.1 == 15008 || p.dst.1 == 15008),
            "✘ TCP between {} and {} not on port 15008: {:?}",
            self.checkout.ip,
            self.far.ip,
            meshed.iter().find(|p| p.src.1 != 15008 && p.dst.1 != 15008)
        );
        ensure!(
            readable == 0,
            "✘ the request body crossed the underlay in clear in {readable} packets"
        );
        ok(format_args!(
            "On the underlay (tcpdump on {}): {} packets between checkout-0 and {}, every one \
             to or from port 15008 (HBONE); checkout-0's request body {SECRET:?} was \
             readable in none of them.",
            status.underlay.bridge,
            meshed.len(),
            self.far.name,
        ));
        let plain: Vec<&Line> = packets
            .iter()
            .filter(|p| p.between(self.legacy.ip, self.far.ip))
            .collect();
        let plain_readable = plain.iter().filter(|p| p.text.contains(SECRET)).count();
        ensure!(
            plain_readable > 0,
            "✘ legacy-client-0's plaintext body was not seen on the underlay: the capture \
             proves nothing"
        );
        ok(format_args!(
            "For comparison, legacy-client-0 (not in the mesh) sent the same body to {}: it \
             crossed to port {} and was readable on the wire.",
            self.far.name,
            plain
                .iter()
                .find(|p| p.dst.0 == self.far.ip)
                .map_or(0, |p| p.dst.1),
        ));
        Ok(())
    }

    fn by_vip(&self) -> anyhow::Result<()> {
        let vip = self.cluster.service("production/payment")?.cluster_ip;
        heading(&format!(
            "3. By the payment Service's cluster IP {vip} (no kube-proxy: the daemon picks an endpoint)"
        ));
        let before = self.mtls_connections()?;
        let mut by_pod: BTreeMap<String, u32> = BTreeMap::new();
        let calls = 9;
        for _ in 0..calls {
            let answer = self.call_ok(CHECKOUT, &format!("http://{vip}/"))?;
            *by_pod.entry(answer.pod).or_default() += 1;
        }
        let counted = self.mtls_connections()?.since(&before);
        let spread: Vec<String> = by_pod.iter().map(|(p, n)| format!("{p} ×{n}")).collect();
        ok(format_args!(
            "{calls} calls from checkout-0 to http://{vip}/ answered by {}",
            spread.join(", ")
        ));
        let in_mtls: u64 = counted
            .iter()
            .filter(|c| c.source == CHECKOUT_PRINCIPAL)
            .map(|c| c.count)
            .sum();
        ensure!(
            in_mtls >= calls,
            "✘ the daemons counted only {in_mtls} of {calls} VIP calls as mutual TLS: {counted:?}"
        );
        ok(format_args!(
            "the destination daemons counted all {calls} as mutual TLS from {CHECKOUT_PRINCIPAL}"
        ));
        Ok(())
    }

    fn authorization_policy(&self) -> anyhow::Result<()> {
        heading("4. AuthorizationPolicy: only checkout may call payment");
        let url = format!("http://{}:8080/", self.far.ip);
        self.call_ok(INVENTORY, &url)
            .context("✘ before any policy, inventory-0 should reach payment")?;
        ok(format_args!(
            "before: inventory-0 → {} answered",
            self.far.name
        ));
        let log = self.daemon_log(&self.far.node)?;
        let mark = log_len(&log);
        println!("   applying:");
        print_yaml(ALLOW_CHECKOUT);
        let t = Instant::now();
        self.cluster.apply_yaml(ALLOW_CHECKOUT)?;
        let took = self
            .until(t, || Ok(!self.call(INVENTORY, &url)?.status.success()))
            .with_context(|| {
                format!(
                    "✘ inventory-0 still reached payment {POLICY_DEADLINE:?} after the ALLOW policy"
                )
            })?;
        ok(format_args!(
            "inventory-0 → {}: refused (new connections, {} ms after the YAML was written)",
            self.far.name,
            took.as_millis()
        ));
        if let Some(line) = log_line_since(&log, mark, &["denied by policy", "sa/inventory"]) {
            ok(format_args!("{}'s daemon logged: {line}", self.far.node));
        }
        self.checkout_in_mtls(&url)
            .context("✘ checkout-0 should still reach payment under the ALLOW policy")?;
        ok(format_args!(
            "checkout-0 → {}: still answered, its certificate proving {CHECKOUT_PRINCIPAL}",
            self.far.name
        ));
        let t = Instant::now();
        self.cluster.delete_yaml(ALLOW_CHECKOUT)?;
        let took = self
            .until(t, || Ok(self.call(INVENTORY, &url)?.status.success()))
            .context("✘ inventory-0 still refused after the policy was removed")?;
        ok(format_args!(
            "policy removed: inventory-0 → {} answered again after {} ms",
            self.far.name,
            took.as_millis()
        ));
        Ok(())
    }

    fn strict_mtls(&self) -> anyhow::Result<()> {
        heading("5. PeerAuthentication STRICT on production: plaintext refused");
        let url = format!("http://{}:8080/", self.far.ip);
        let before = self.connections()?;
        self.call_ok(LEGACY, &url)
            .context("✘ before STRICT, legacy-client-0 should reach payment in plaintext")?;
        let plain = self
            .connections()?
            .since(&before)
            .into_iter()
            .find(|c| c.security == "none");
        ensure!(
            plain.is_some(),
            "✘ no daemon counted legacy-client-0's connection as plaintext"
        );
        ok(format_args!(
            "before: legacy-client-0 (not in the mesh) → {} answered; {}'s daemon counted it \
             with connection_security_policy=\"none\"",
            self.far.name, self.far.node
        ));
        let log = self.daemon_log(&self.far.node)?;
        let mark = log_len(&log);
        println!("   applying:");
        print_yaml(STRICT);
        let t = Instant::now();
        self.cluster.apply_yaml(STRICT)?;
        let took = self
            .until(t, || Ok(!self.call(LEGACY, &url)?.status.success()))
            .with_context(|| {
                format!("✘ legacy-client-0 still reached payment {POLICY_DEADLINE:?} after STRICT")
            })?;
        ok(format_args!(
            "legacy-client-0 → {}: refused ({} ms after the YAML was written)",
            self.far.name,
            took.as_millis()
        ));
        let legacy_ip = self.legacy.ip.to_string();
        if let Some(line) = log_line_since(&log, mark, &["plaintext inbound refused", &legacy_ip]) {
            ok(format_args!("{}'s daemon logged: {line}", self.far.node));
        }
        self.checkout_in_mtls(&url)
            .context("✘ checkout-0 should still reach payment in mutual TLS under STRICT")?;
        ok(format_args!(
            "checkout-0 → {}: still answered, in mutual TLS",
            self.far.name
        ));
        let t = Instant::now();
        self.cluster.delete_yaml(STRICT)?;
        let took = self
            .until(t, || Ok(self.call(LEGACY, &url)?.status.success()))
            .context("✘ legacy-client-0 still refused after STRICT was removed")?;
        ok(format_args!(
            "STRICT removed: legacy-client-0 → {} answered again after {} ms",
            self.far.name,
            took.as_millis()
        ));
        Ok(())
    }

    fn burst(&self) -> anyhow::Result<()> {
        heading("6. A burst of traffic across nodes, through the mesh");
        let url = format!("http://{}:8080/", self.far.ip);
        let http = self.load(&["--url", &url, "-n", "500", "-c", "4"])?;
        let answered = http.status.get(&200).copied().unwrap_or(0);
        ensure!(
            answered == http.requests,
            "✘ only {answered} of {} HTTP requests answered 200: {http:?}",
            http.requests
        );
        ok(format_args!(
            "{} HTTP requests from checkout-0 to {}: all answered 200; latency p50 {:.2} ms, p99 {:.2} ms",
            http.requests, self.far.name, http.latency_ms.p50, http.latency_ms.p99,
        ));
        let tcp_addr = format!("{}:9090", self.far.ip);
        let tcp = self.load(&["--tcp", &tcp_addr, "-n", "200", "--size", "1024"])?;
        ensure!(
            tcp.ok == tcp.requests,
            "✘ only {} of {} TCP echo round trips came back intact: {tcp:?}",
            tcp.ok,
            tcp.requests
        );
        ok(format_args!(
            "{} TCP echo round trips of 1 KiB to {}: every one came back byte for byte",
            tcp.requests, self.far.name
        ));
        Ok(())
    }

    /// A call from checkout to `to` by pod IP, and the connection the destination's
    /// daemon counted for it.
    fn meshed_call(&self, to: &PodInfo) -> anyhow::Result<()> {
        let url = format!("http://{}:8080/", to.ip);
        let before = self.connections()?;
        let answer = self.call_ok(CHECKOUT, &url)?;
        ensure!(
            answer.pod == to.name,
            "✘ expected {} to answer {url}, got {}",
            to.name,
            answer.pod
        );
        ok(format_args!(
            "checkout-0 ({}) called {url}: answered by {} ({}), which saw the caller as {}{}",
            self.checkout.node,
            answer.pod,
            to.node,
            answer.peer,
            if answer.peer.starts_with(&format!("{}:", self.checkout.ip)) {
                ", checkout-0's own pod IP"
            } else {
                ""
            }
        ));
        let counted = self.connections()?.since(&before);
        let Some(conn) = counted
            .iter()
            .find(|c| c.node == to.node && c.source == CHECKOUT_PRINCIPAL)
        else {
            bail!(
                "✘ {}'s daemon did not count a connection from checkout: {counted:?}",
                to.node
            );
        };
        ensure!(
            conn.security == "mutual_tls",
            "✘ {}'s daemon counted the call with connection_security_policy={:?}",
            to.node,
            conn.security
        );
        ok(format_args!(
            "{}'s daemon took it over HBONE in mutual TLS: client {} → server {} \
             (istio_tcp_connections_opened_total +{}, connection_security_policy=\"mutual_tls\")",
            to.node, conn.source, conn.destination, conn.count
        ));
        Ok(())
    }

    /// A call from checkout to `url` that a destination daemon counted as mutual TLS
    /// from checkout's identity.
    fn checkout_in_mtls(&self, url: &str) -> anyhow::Result<()> {
        let before = self.connections()?;
        self.call_ok(CHECKOUT, url)?;
        let counted = self.connections()?.since(&before);
        ensure!(
            counted
                .iter()
                .any(|c| c.source == CHECKOUT_PRINCIPAL && c.security == "mutual_tls"),
            "✘ no daemon counted checkout-0's call as mutual TLS: {counted:?}"
        );
        Ok(())
    }

    fn call(&self, from: &str, url: &str) -> anyhow::Result<std::process::Output> {
        Ok(self
            .cluster
            .exec(from, &["ambit-echo", "call", "--timeout", "2s", url])?)
    }

    fn call_ok(&self, from: &str, url: &str) -> anyhow::Result<Answer> {
        let out = self.call(from, url)?;
        ensure!(
            out.status.success(),
            "✘ {from} → {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Answer::parse(&out.stdout)
    }

    fn post(&self, from: &str, url: &str, body: &str) -> anyhow::Result<()> {
        let out = self.cluster.exec(
            from,
            &["ambit-echo", "call", "-X", "POST", "--data", body, url],
        )?;
        ensure!(
            out.status.success(),
            "✘ POST {url} from {from} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn load(&self, args: &[&str]) -> anyhow::Result<Summary> {
        let mut argv = vec!["ambit-echo", "load"];
        argv.extend_from_slice(args);
        let out = self.cluster.exec(CHECKOUT, &argv)?;
        ensure!(
            out.status.success(),
            "✘ ambit-echo load {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).context("parsing the load summary")
    }

    /// Polls `done` (each poll a new connection) until it holds; how long after
    /// `since` it did.
    fn until(
        &self,
        since: Instant,
        mut done: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        loop {
            if done()? {
                return Ok(since.elapsed());
            }
            ensure!(
                since.elapsed() < POLICY_DEADLINE,
                "not within {POLICY_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn daemon(&self, node: &str) -> anyhow::Result<ambit_simcluster::DaemonInfo> {
        self.cluster
            .status()
            .mesh
            .and_then(|m| m.daemons.into_iter().find(|d| d.node == node))
            .with_context(|| format!("no node daemon on {node}"))
    }

    fn daemon_log(&self, node: &str) -> anyhow::Result<PathBuf> {
        Ok(self.daemon(node)?.log)
    }

    /// `GET path` on a daemon's admin (`/config_dump`) or metrics (`/metrics`) port.
    fn daemon_get(&self, node: &str, path: &str) -> anyhow::Result<String> {
        let d = self.daemon(node)?;
        let addr = if path == "/metrics" {
            d.metrics_addr
        } else {
            d.admin_addr
        };
        let place = ambit_simcluster::Place::Node(node.to_owned());
        let (code, body) = self.cluster.http_get(&place, SocketAddr::V4(addr), path)?;
        ensure!(code == 200, "GET {path} on {node}'s daemon: {code} {body}");
        Ok(body)
    }

    /// Every daemon's `istio_tcp_connections_opened_total` as destination reporter.
    fn connections(&self) -> anyhow::Result<Counts> {
        let mut counts = Counts::default();
        let mesh = self.cluster.status().mesh.context("no mesh")?;
        for d in &mesh.daemons {
            let metrics = self.daemon_get(&d.node, "/metrics")?;
            for line in metrics.lines() {
                let Some((labels, count)) =
                    parse_counter(line, "istio_tcp_connections_opened_total")
                else {
                    continue;
                };
                if labels.get("reporter").map(String::as_str) != Some("destination") {
                    continue;
                }
                let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
                counts.0.push(Connections {
                    node: d.node.clone(),
                    source: label("source_principal"),
                    destination: label("destination_principal"),
                    security: label("connection_security_policy"),
                    labels,
                    count,
                });
            }
        }
        Ok(counts)
    }

    /// [`Demo::connections`] in mutual TLS only.
    fn mtls_connections(&self) -> anyhow::Result<Counts> {
        let mut counts = self.connections()?;
        counts.0.retain(|c| c.security == "mutual_tls");
        Ok(counts)
    }
}

/// What the echo server answered.
struct Answer {
    pod: String,
    peer: String,
}

impl Answer {
    fn parse(stdout: &[u8]) -> anyhow::Result<Self> {
        let v: serde_json::Value =
            serde_json::from_slice(stdout).context("parsing the echo answer")?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {k:?} in the echo answer {v}"))
        };
        Ok(Self {
            pod: field("pod")?,
            peer: field("peer")?,
        })
    }
}

/// One `istio_tcp_connections_opened_total` series of one daemon.
#[derive(Debug, Clone)]
struct Connections {
    node: String,
    /// All its labels: what tells one series from another.
    labels: BTreeMap<String, String>,
    source: String,
    destination: String,
    security: String,
    count: u64,
}

#[derive(Debug, Default)]
struct Counts(Vec<Connections>);

impl Counts {
    /// The series that grew since `before`, with the increase as their count.
    fn since(&self, before: &Counts) -> Vec<Connections> {
        self.0
            .iter()
            .filter_map(|c| {
                let old = before
                    .0
                    .iter()
                    .find(|b| (&b.node, &b.labels) == (&c.node, &c.labels))
                    .map_or(0, |b| b.count);
                (c.count > old).then(|| Connections {
                    count: c.count - old,
                    ..c.clone()
                })
            })
            .collect()
    }
}

/// `name{k="v",…} value` → the labels and the value.
fn parse_counter(line: &str, name: &str) -> Option<(BTreeMap<String, String>, u64)> {
    let rest = line.strip_prefix(name)?.strip_prefix('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => value.push(chars.next()?.1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        map.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((map, value.trim().parse().ok()?))
}

fn print_yaml(yaml: &str) {
    for line in yaml.lines() {
        println!("     │ {line}");
    }
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The first line written to `path` after byte `mark` that contains every one of
/// `needles`.
fn log_line_since(path: &Path, mark: u64, needles: &[&str]) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let new = text.get(usize::try_from(mark).ok()?..)?;
    String::from_utf8_lossy(new)
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(|l| {
            // Drop the timestamp, level and module of a plain log line.
            let l = l.trim();
            let l = l.split_once(" INFO ").map_or(l, |(_, rest)| rest.trim());
            l.split_once(": ")
                .filter(|(target, _)| target.contains("::") && !target.contains(' '))
                .map_or(l, |(_, message)| message)
                .to_owned()
        })
}

/// A pod of `workload` matching `filter`.
fn pick(
    cluster: &Cluster,
    workload: &str,
    filter: impl Fn(&PodInfo) -> bool,
) -> anyhow::Result<PodInfo> {
    cluster
        .pods()
        .into_iter()
        .find(|p| p.workload == workload && filter(p))
        .with_context(|| format!("the topology has no matching {workload} pod"))
}

/// A packet as `tcpdump -r FILE -n -t -A` prints it: addresses and ports, and the
/// payload as text (non-printable bytes as dots).
#[derive(Debug)]
struct Line {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    text: String,
}

impl Line {
    fn between(&self, a: Ipv4Addr, b: Ipv4Addr) -> bool {
        (self.src.0, self.dst.0) == (a, b) || (self.src.0, self.dst.0) == (b, a)
    }
}

/// `tcpdump` writing the TCP packets on an interface to a pcap file; killed (and the
/// file removed) on drop.
struct Capture {
    child: Child,
    file: PathBuf,
    what: String,
}

impl Capture {
    /// Starts tcpdump on `iface` in the network namespace `netns`; returns once it
    /// listens.
    fn start(netns: &str, iface: &str, file: PathBuf) -> anyhow::Result<Self> {
        let what = format!("tcpdump on {iface} in {netns}");
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", iface])
            .args(["-n", "--immediate-mode", "-U", "-B", "16384", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stderr = child.stderr.take().context("tcpdump's stderr")?;
        let capture = Self { child, file, what };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => seen.push(line),
                Err(_) => bail!("{} is not listening: {}", capture.what, seen.join("\n")),
            }
        }
    }

    /// Waits until a packet with `last` in its payload is in the file (everything
    /// sent before it is then in too), stops tcpdump and reads the packets back.
    fn stop_after(mut self, last: &str) -> anyhow::Result<Vec<Line>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.read()?.iter().any(|l| l.text.contains(last)) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: the last packet never arrived",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // SIGINT: tcpdump flushes the file and exits.
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        ensure!(sent.success(), "could not interrupt {}", self.what);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "{} exited with {status}", self.what);
                break;
            }
            ensure!(Instant::now() < deadline, "{} did not stop", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.read()
    }

    fn read(&self) -> anyhow::Result<Vec<Line>> {
        let out = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", "-t", "-A"])
            .stderr(Stdio::null())
            .output()
            .context("running tcpdump -r")?;
        Ok(parse_tcpdump(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Packets from `tcpdump -n -t -A` output: a header line `IP a.b.c.d.port >
/// e.f.g.h.port: …` followed by the packet as text.
fn parse_tcpdump(out: &str) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::new();
    for l in out.lines() {
        if let Some(header) = l.strip_prefix("IP ")
            && let Some((src, rest)) = header.split_once(" > ")
            && let Some((dst, _)) = rest.split_once(": ")
            && let (Some(src), Some(dst)) = (endpoint(src), endpoint(dst))
        {
            lines.push(Line {
                src,
                dst,
                text: String::new(),
            });
        } else if let Some(last) = lines.last_mut() {
            last.text.push_str(l);
            last.text.push('\n');
        }
    }
    lines
}

/// `a.b.c.d.port`.
fn endpoint(s: &str) -> Option<(Ipv4Addr, u16)> {
    let (ip, port) = s.rsplit_once('.')?;
    Some((ip.parse().ok()?, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_with_their_labels() {
        let line = r#"istio_tcp_connections_opened_total{reporter="destination",source_principal="cluster.local/ns/a/sa/b",x="q\"uote"} 3"#;
        let (labels, value) = parse_counter(line, "istio_tcp_connections_opened_total").unwrap();
        assert_eq!(value, 3);
        assert_eq!(labels["reporter"], "destination");
        assert_eq!(labels["source_principal"], "cluster.local/ns/a/sa/b");
        assert_eq!(labels["x"], "q\"uote");
        assert!(
            parse_counter(
                "# HELP istio_tcp_connections_opened x",
                "istio_tcp_connections_opened_total"
            )
            .is_none()
        );
    }

    #[test]
    fn tcpdump_text_parses_into_packets() {
        let out = "IP 10.244.1.2.40000 > 10.244.2.2.15008: Flags [P.], seq 1:5, ack 1, win 1, length 4\n\
                   E..4..@.\n\
                   IP 10.244.1.4.40001 > 10.244.2.2.8080: Flags [P.], length 9\n\
                   E..POST / HTTP/1.1\n\
                   card=1\n";
        let packets = parse_tcpdump(out);
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].dst, ("10.244.2.2".parse().unwrap(), 15008));
        assert!(packets[1].text.contains("card=1"));
        assert!(packets[1].between("10.244.2.2".parse().unwrap(), "10.244.1.4".parse().unwrap()));
    }
}
