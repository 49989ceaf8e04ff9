//! `cargo xtask demo`: the simulated cluster with real traffic, explained as it runs.
//!
//! Today (before the mesh) it shows what the cluster is made of and that pods reach
//! each other on the same node and across nodes, in plain text. As the daemon and the
//! waypoint land, the demo grows the mesh scenarios.

use std::{fmt::Write as _, net::Ipv4Addr};

use ambit_echo::load::Summary;
use ambit_simcluster::{Cluster, ClusterName, Options, PodInfo, Topology};
use anyhow::{Context as _, bail};

use crate::{setup, test::cargo, workspace_root};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Leave the cluster running afterwards (remove it with `cargo xtask cluster down
    /// --name demo`).
    #[arg(long)]
    pub keep: bool,
}

const NAME: &str = "demo";
const CALLER: &str = "production/checkout-0";

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    setup::run(&setup::SetupArgs::default())?;
    cargo("building the binaries", &["build", "--workspace", "--bins"])?;

    let name = ClusterName::new(NAME)?;
    // A demo cluster left by an interrupted run would make `up` refuse to start.
    let leftover = ambit_simcluster::down(&Options::new(name.clone()))?;
    if !leftover.found_nothing() {
        println!("(removed the leftovers of an earlier demo run)");
    }

    heading("Bringing up the simulated cluster (the default topology: a small shop)");
    let opts = Options::new(name).binaries_dir(workspace_root().join("target/debug"));
    let cluster =
        Cluster::up(opts, &Topology::default_shop()).context("bringing the demo cluster up")?;
    describe(&cluster);

    let caller = cluster.pod(CALLER)?;
    let same_node = pick(&cluster, "payment-v1", |p| p.node == caller.node)?;
    let other_node = pick(&cluster, "payment-v1", |p| p.node != caller.node)?;

    heading("1. Same node");
    call(&cluster, &caller, &same_node)?;
    heading("2. Across nodes");
    call(&cluster, &caller, &other_node)?;
    println!(
        "   The packets went checkout-0 → {} bridge → underlay bridge → {} → its bridge → {}.",
        caller.node, other_node.node, other_node.name
    );

    heading("3. A burst of HTTP requests across nodes");
    let url = format!("http://{}:8080/", other_node.ip);
    let http = load(&cluster, &["--url", &url, "-n", "500", "-c", "4"])?;
    println!(
        "   {} requests from checkout-0 to {}: {} answered 200, {} failed; latency p50 {:.2} ms, p99 {:.2} ms.",
        http.requests,
        other_node.name,
        http.status.get(&200).copied().unwrap_or(0),
        http.requests - http.status.get(&200).copied().unwrap_or(0),
        http.latency_ms.p50,
        http.latency_ms.p99,
    );

    heading("4. TCP echo across nodes");
    let tcp_addr = format!("{}:9090", other_node.ip);
    let tcp = load(
        &cluster,
        &["--tcp", &tcp_addr, "-n", "200", "--size", "1024"],
    )?;
    println!(
        "   200 round trips of 1 KiB to {}: {} came back byte for byte, {} did not.",
        other_node.name, tcp.ok, tcp.errors
    );
    if http.ok != http.requests || tcp.ok != tcp.requests {
        bail!("some demo traffic failed: HTTP {http:?}, TCP {tcp:?}");
    }

    heading("What this shows");
    println!(
        "   Pods on this machine talk across real network namespaces, veth pairs and bridges.\n   \
         There is no mesh yet: this traffic is plain text and every pod may call every other.\n   \
         The node daemon will capture it with eBPF and carry it in mutual TLS, with policy."
    );

    if args.keep {
        cluster.detach()?;
        println!("\nThe cluster keeps running: `cargo xtask cluster status --name {NAME}`.");
        return Ok(());
    }
    heading("Tearing down");
    let report = cluster.down()?;
    println!(
        "   Removed {} network namespaces, {} processes, the cgroup tree and the state directory.",
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

fn describe(cluster: &Cluster) {
    let status = cluster.status();
    let mut out = String::new();
    for node in &status.nodes {
        let _ = writeln!(
            out,
            "   node {:<8} underlay IP {:<13} pods in {}",
            node.name, node.ip, node.pod_cidr
        );
    }
    for pod in &status.pods {
        let labels: Vec<_> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "   pod  {:<30} on {:<7} IP {:<11} service account {:<10} {}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.node,
            pod.ip,
            pod.service_account,
            labels.join(",")
        );
    }
    for svc in &status.services {
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| format!("{}→{}", p.port, p.target_port))
            .collect();
        let _ = writeln!(
            out,
            "   service {:<27} cluster IP {:<11} ports {}",
            format!("{}/{}", svc.namespace, svc.name),
            svc.cluster_ip,
            ports.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "   Kubernetes YAML for all of it: {} (cluster IPs are served by the mesh, not routed yet)",
        status.config_dir.display()
    );
    print!("{out}");
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

fn call(cluster: &Cluster, from: &PodInfo, to: &PodInfo) -> anyhow::Result<()> {
    let url = format!("http://{}:8080/", to.ip);
    let out = cluster.exec(
        &format!("{}/{}", from.namespace, from.name),
        &["ambit-echo", "call", &url, "--expect-status", "200"],
    )?;
    if !out.status.success() {
        bail!(
            "{} → {url} failed: {}",
            from.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing the echo answer")?;
    let peer_ip = answer["peer"]
        .as_str()
        .and_then(|p| p.rsplit_once(':'))
        .and_then(|(ip, _)| ip.parse::<Ipv4Addr>().ok());
    println!(
        "   {} ({}) called {url}\n   → answered by {} (namespace {}, version {}), which saw the caller as {}{}.",
        from.name,
        from.node,
        answer["pod"].as_str().unwrap_or("?"),
        answer["namespace"].as_str().unwrap_or("?"),
        answer["version"].as_str().unwrap_or("?"),
        answer["peer"].as_str().unwrap_or("?"),
        if peer_ip == Some(from.ip) {
            ": checkout-0's own pod IP"
        } else {
            ""
        },
    );
    if answer["pod"].as_str() != Some(to.name.as_str()) {
        bail!("expected {} to answer, got {answer}", to.name);
    }
    Ok(())
}

fn load(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Summary> {
    let mut argv = vec!["ambit-echo", "load"];
    argv.extend_from_slice(args);
    let out = cluster.exec(CALLER, &argv)?;
    if !out.status.success() {
        bail!(
            "ambit-echo load {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the load summary")
}
