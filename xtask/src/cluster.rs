//! `cargo xtask cluster …`: the simulated cluster from the command line.
//!
//! ```text
//! cargo xtask cluster up [--mesh [--no-daemons | --mode ambient|sidecar|sidecar-l7]] [--waypoint NS/NAME[@NODE,…]]… [--topology FILE] [--name NAME] [--no-build] [--bin-dir DIR]
//! cargo xtask cluster status [--json]
//! cargo xtask cluster exec NAMESPACE/POD -- CMD…
//! cargo xtask cluster apply FILE | delete FILE
//! cargo xtask cluster label service|namespace NAME KEY=VALUE|KEY-   # e.g. ambit.dev/use-waypoint=waypoint
//! cargo xtask cluster down [--all]
//! cargo xtask cluster topology        # print the default topology (to copy and edit)
//! ```
//!
//! Everything is in `ambit_simcluster`; this file parses flags and prints.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use ambit_simcluster::{
    Cluster, ClusterName, DEFAULT_CLUSTER_NAME, DEFAULT_STATE_ROOT, DataPlaneMode, Deleted,
    MeshOptions, Options, Status, TeardownReport, Topology,
};
use anyhow::{Context as _, bail};

use crate::workspace_root;

/// Manage the simulated cluster (network namespaces, cgroups and processes standing in
/// for nodes and pods).
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Cluster name ([a-z0-9-], at most 24 characters).
    #[arg(long, global = true, default_value = DEFAULT_CLUSTER_NAME)]
    name: String,
    /// Where cluster state directories live.
    #[arg(long, global = true, default_value = DEFAULT_STATE_ROOT)]
    state_root: PathBuf,
    #[command(subcommand)]
    cmd: ClusterCmd,
}

#[derive(Debug, clap::Subcommand)]
enum ClusterCmd {
    /// Build the workspace binaries, then bring a cluster up and leave it running.
    Up(UpArgs),
    /// Describe the running cluster.
    Status {
        /// Print the full state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a pod's network namespace and cgroup.
    Exec {
        /// The pod, NAMESPACE/POD.
        pod: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Put the objects of a YAML file into the cluster's config directory.
    Apply {
        /// Kubernetes YAML (one or more documents).
        file: PathBuf,
    },
    /// Take the objects named in a YAML file out of the config directory.
    Delete {
        /// Kubernetes YAML (one or more documents).
        file: PathBuf,
    },
    /// Set (KEY=VALUE) or remove (KEY-) a label of a generated Service or Namespace,
    /// e.g. `ambit.dev/use-waypoint=waypoint`.
    Label {
        /// `service` (NAMESPACE/NAME) or `namespace` (NAME).
        #[arg(value_parser = ["service", "namespace"])]
        kind: String,
        /// The object.
        object: String,
        /// KEY=VALUE to set, KEY- to remove.
        label: String,
    },
    /// Tear the cluster down, also leftovers of a crashed run.
    Down {
        /// Every Ambit cluster on this machine, not only --name.
        #[arg(long)]
        all: bool,
    },
    /// Print the default topology.
    Topology,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Topology YAML (default: the built-in small shop; see `cluster topology`).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Do not run `cargo build --bins` first.
    #[arg(long)]
    no_build: bool,
    /// Directory holding ambit-echo and the other binaries (default: target/debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds to wait for the workloads to listen.
    #[arg(long, default_value_t = 30)]
    ready_timeout: u64,
    /// Also start the mesh control plane: ambit-controller in local mode in the
    /// control namespace, with per-node bootstrap tokens.
    #[arg(long)]
    mesh: bool,
    /// Extra flag for ambit-controller (repeatable), e.g. `--controller-arg=--cert-ttl=1h`.
    #[arg(long = "controller-arg", requires = "mesh", allow_hyphen_values = true)]
    controller_args: Vec<String>,
    /// With --mesh: start the control plane only, no node daemons and no CNI calls.
    #[arg(long, requires = "mesh")]
    no_daemons: bool,
    /// Extra flag for every ambit-node (repeatable), e.g. `--daemon-arg=--log-level=debug`.
    #[arg(
        long = "daemon-arg",
        requires = "mesh",
        conflicts_with = "no_daemons",
        allow_hyphen_values = true
    )]
    daemon_args: Vec<String>,
    /// With --mesh: where the data plane's proxies run: `ambient` (one ambit-node per
    /// node, pods enrolled through ambit-cni), `sidecar` (one `ambit-node --mode
    /// sidecar` inside every meshed pod, no node daemons) or `sidecar-l7` (also the
    /// waypoint's L7 engine inside the pods its waypoint Service selects).
    #[arg(
        long,
        requires = "mesh",
        conflicts_with = "no_daemons",
        default_value = "ambient"
    )]
    mode: DataPlaneMode,
    /// Add a waypoint to the topology: NAMESPACE/NAME, one pod on each NODE
    /// (default: the first node); repeatable. Label a Service or Namespace with
    /// `ambit.dev/use-waypoint=NAME` to use it (`cluster label`).
    #[arg(long = "waypoint", value_name = "NS/NAME[@NODE,…]")]
    waypoints: Vec<String>,
    /// Extra flag for every ambit-waypoint (repeatable).
    #[arg(long = "waypoint-arg", requires = "mesh", allow_hyphen_values = true)]
    waypoint_args: Vec<String>,
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let name = ClusterName::new(&args.name)?;
    let opts = Options::new(name).state_root(&args.state_root);
    match args.cmd {
        ClusterCmd::Up(up_args) => up(opts, &up_args),
        ClusterCmd::Status { json } => {
            let status = attach(opts, &args.state_root)?.status();
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        ClusterCmd::Exec { pod, command } => {
            let cluster = attach(opts, &args.state_root)?;
            let (program, rest) = command.split_first().context("no command given")?;
            let status = cluster
                .pod_command(&pod, program)?
                .args(rest)
                .status()
                .with_context(|| format!("running {program} in pod {pod}"))?;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            std::process::exit(code);
        }
        ClusterCmd::Apply { file } => {
            for object in attach(opts, &args.state_root)?.apply(&file)? {
                println!("{object} configured");
            }
            Ok(())
        }
        ClusterCmd::Delete { file } => {
            for (object, outcome) in attach(opts, &args.state_root)?.delete(&file)? {
                match outcome {
                    Deleted::Deleted => println!("{object} deleted"),
                    Deleted::NotFound => println!("{object} not found"),
                }
            }
            Ok(())
        }
        ClusterCmd::Label {
            kind,
            object,
            label,
        } => {
            let cluster = attach(opts, &args.state_root)?;
            let (key, value) = match label.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => match label.strip_suffix('-') {
                    Some(k) => (k, None),
                    None => bail!("label {label:?}: expected KEY=VALUE or KEY-"),
                },
            };
            if kind == "service" {
                cluster.label_service(&object, key, value)?;
            } else {
                cluster.label_namespace(&object, key, value)?;
            }
            match value {
                Some(v) => println!("{kind} {object} labelled {key}={v}"),
                None => println!("{kind} {object}: label {key} removed"),
            }
            Ok(())
        }
        ClusterCmd::Down { all: true } => {
            let reports = ambit_simcluster::down_all_in(&args.state_root)?;
            if reports.is_empty() {
                println!("no Ambit cluster found");
            }
            reports.iter().for_each(print_teardown);
            Ok(())
        }
        ClusterCmd::Down { all: false } => {
            print_teardown(&ambit_simcluster::down(&opts)?);
            Ok(())
        }
        ClusterCmd::Topology => {
            print!("{}", ambit_simcluster::DEFAULT_TOPOLOGY_YAML);
            Ok(())
        }
    }
}

fn up(opts: Options, args: &UpArgs) -> anyhow::Result<()> {
    let mut topology = match &args.topology {
        Some(path) => Topology::from_file(path)?,
        None => Topology::default_shop(),
    };
    for spec in &args.waypoints {
        topology = with_waypoint(topology, spec)?;
    }
    topology.validate()?;
    if !args.no_build {
        crate::test::cargo(
            "building the binaries (skip with --no-build)",
            &["build", "--bins"],
        )?;
    }
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    if !bin_dir.is_dir() {
        bail!(
            "binaries directory {} does not exist (build first or pass --bin-dir)",
            bin_dir.display()
        );
    }
    let mut opts = opts
        .binaries_dir(bin_dir)
        .ready_timeout(Duration::from_secs(args.ready_timeout));
    if args.mesh {
        opts = opts.mesh(MeshOptions {
            controller_args: args.controller_args.clone(),
            daemons: !args.no_daemons,
            mode: args.mode,
            daemon_args: args.daemon_args.clone(),
            waypoint_args: args.waypoint_args.clone(),
            ..MeshOptions::default()
        });
    }
    let name = opts.name.clone();
    eprintln!("▶ bringing cluster {name} up");
    let cluster = Cluster::up(opts, &topology)?;
    let status = cluster.status();
    cluster.detach()?;
    print_status(&status);
    let flag = if name.as_str() == DEFAULT_CLUSTER_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    };
    println!();
    println!("try: cargo xtask cluster exec{flag} production/checkout-0 -- ip addr");
    if status.mesh.is_some() {
        println!(
            "     ip netns exec {} target/debug/ambitctl config-dump --admin 127.0.0.1:15000",
            status.control.netns
        );
        if let Some(node) = status
            .mesh
            .as_ref()
            .and_then(|m| m.daemons.first())
            .and_then(|d| status.nodes.iter().find(|n| n.name == d.node))
        {
            println!(
                "     ip netns exec {} target/debug/ambitctl config-dump --admin 127.0.0.1:15000",
                node.netns
            );
        }
        if let Some(pod) = status
            .mesh
            .as_ref()
            .and_then(|m| m.sidecars.first())
            .and_then(|s| status.pods.iter().find(|p| p.pod_ref() == s.pod))
        {
            println!(
                "     ip netns exec {} target/debug/ambitctl config-dump --admin 127.0.0.1:15000",
                pod.netns
            );
        }
    }
    println!("tear down: cargo xtask cluster down{flag}");
    Ok(())
}

/// `topology` with the waypoint `NAMESPACE/NAME[@NODE,…]` added.
fn with_waypoint(topology: Topology, spec: &str) -> anyhow::Result<Topology> {
    let (name, nodes) = match spec.split_once('@') {
        Some((name, nodes)) => (name, nodes.split(',').map(str::to_owned).collect()),
        None => (
            spec,
            vec![
                topology
                    .nodes
                    .first()
                    .map(|n| n.name.clone())
                    .context("the topology has no node")?,
            ],
        ),
    };
    let Some((namespace, name)) = name.split_once('/') else {
        bail!("--waypoint {spec:?}: expected NAMESPACE/NAME[@NODE,…]");
    };
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    Ok(topology.with_waypoint(namespace, name, &nodes))
}

/// [`Cluster::attach`], pointing at `down` when only leftovers of the cluster exist.
fn attach(opts: Options, state_root: &Path) -> anyhow::Result<Cluster> {
    let name = opts.name.clone();
    match Cluster::attach(opts) {
        Err(ambit_simcluster::Error::NotFound { .. })
            if ambit_simcluster::list_clusters(state_root)?.contains(&name) =>
        {
            bail!(
                "cluster {name} is not running, but leftovers of it exist (a crashed run?): \
                 remove them with `cargo xtask cluster down --name {name}`"
            )
        }
        other => Ok(other?),
    }
}

/// `target/debug` of the workspace, honouring `CARGO_TARGET_DIR`.
fn default_bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    };
    target.join("debug")
}

fn print_teardown(r: &TeardownReport) {
    if r.found_nothing() {
        println!("cluster {}: nothing to remove", r.name);
        return;
    }
    println!(
        "cluster {}: removed {} network namespaces, killed {} processes{}{}",
        r.name,
        r.netns_removed.len(),
        r.processes_killed,
        r.cgroup_removed
            .as_deref()
            .map(|p| format!(", cgroup {}", p.display()))
            .unwrap_or_default(),
        r.state_dir_removed
            .as_deref()
            .map(|p| format!(", state {}", p.display()))
            .unwrap_or_default(),
    );
}

fn print_status(st: &Status) {
    let phase = match st.phase {
        ambit_simcluster::status::Phase::Running => "running",
        ambit_simcluster::status::Phase::Creating => "being created (or crashed while created)",
    };
    println!("cluster {} ({phase})", st.name);
    println!("  config dir  {}", st.config_dir.display());
    println!("  state dir   {}", st.state_dir.display());
    println!("  cgroup      {}", st.cgroup_root.display());
    println!(
        "  underlay    {} ({}, bridge {})",
        st.underlay.netns, st.underlay.cidr, st.underlay.bridge
    );
    println!("  control     {} ({})", st.control.netns, st.control.ip);
    println!();
    table(
        &["NODE", "NETNS", "IP", "POD CIDR"],
        st.nodes.iter().map(|n| {
            vec![
                n.name.clone(),
                n.netns.clone(),
                n.ip.to_string(),
                n.pod_cidr.to_string(),
            ]
        }),
    );
    println!();
    table(
        &[
            "NAMESPACE",
            "POD",
            "NODE",
            "IP",
            "SERVICE ACCOUNT",
            "LABELS",
            "STATE",
            "CNI",
            "NETNS",
            "CGROUP",
        ],
        st.pods.iter().map(|p| {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let waypoint = st
                .mesh
                .as_ref()
                .and_then(|m| m.waypoints.iter().find(|w| w.pod == p.pod_ref()));
            let state = match (p.running, p.pid, waypoint) {
                (true, Some(pid), _) => format!("running ({pid})"),
                (_, _, Some(w)) => format!("waypoint ({})", w.pid),
                _ if p.waypoint.is_some() => "waypoint (not started)".to_owned(),
                _ => "not running".to_owned(),
            };
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.node.clone(),
                p.ip.to_string(),
                p.service_account.clone(),
                labels.join(","),
                state,
                match &p.cni {
                    None => "-".to_owned(),
                    Some(c) if c.added => "add ok".to_owned(),
                    Some(_) => "add failed".to_owned(),
                },
                p.netns.clone(),
                relative(&p.cgroup, &st.cgroup_root),
            ]
        }),
    );
    println!();
    table(
        &["NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS", "ENDPOINTS"],
        st.services.iter().map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}→{}/{}",
                        p.name,
                        p.port,
                        p.target_port,
                        p.protocol.as_str()
                    )
                })
                .collect();
            let eps: Vec<String> = s.endpoints.iter().map(|e| e.name.clone()).collect();
            vec![
                s.namespace.clone(),
                s.name.clone(),
                s.cluster_ip.to_string(),
                ports.join(","),
                eps.join(","),
            ]
        }),
    );
    if !st.waypoints.is_empty() {
        println!();
        table(
            &["NAMESPACE", "WAYPOINT", "FOR", "PODS", "USED BY"],
            st.waypoints.iter().map(|w| {
                let pods: Vec<String> = w.pods.iter().map(|p| p.name.clone()).collect();
                let uses = |labels: &std::collections::BTreeMap<String, String>| {
                    ["ambit.dev/use-waypoint", "istio.io/use-waypoint"]
                        .iter()
                        .any(|k| labels.get(*k) == Some(&w.name))
                };
                let mut users: Vec<String> = st
                    .namespaces
                    .iter()
                    .filter(|n| n.name == w.namespace && uses(&n.labels))
                    .map(|n| format!("namespace {}", n.name))
                    .collect();
                users.extend(
                    st.services
                        .iter()
                        .filter(|s| s.namespace == w.namespace && uses(&s.labels))
                        .map(|s| format!("service {}", s.name)),
                );
                vec![
                    w.namespace.clone(),
                    w.name.clone(),
                    w.waypoint_for
                        .clone()
                        .unwrap_or_else(|| "service".to_owned()),
                    pods.join(","),
                    if users.is_empty() {
                        "-".to_owned()
                    } else {
                        users.join(",")
                    },
                ]
            }),
        );
    }
    if let Some(mesh) = &st.mesh {
        let c = &mesh.controller;
        println!();
        println!(
            "mesh control plane ({}, pid {}, in {})",
            c.process, c.pid, st.control.netns
        );
        println!("  gRPC (push, CA)  {}", c.grpc_addr);
        println!("  readiness        {} (control netns)", c.readiness_addr);
        println!(
            "  admin            {} (control netns: /config_dump, /metrics)",
            c.admin_addr
        );
        println!("  state dir        {}", c.state_dir.display());
        println!("  tokens file      {}", c.tokens_file.display());
        println!("  log              {}", c.log.display());
        for (node, path) in &mesh.node_tokens {
            println!("  token {node:<10} {}", path.display());
        }
        for (waypoint, path) in &mesh.waypoint_tokens {
            println!("  token {waypoint:<10} {}", path.display());
        }
        if !mesh.daemons.is_empty() {
            println!();
            println!("mesh data plane (node daemons; admin on each node's loopback)");
            table(
                &[
                    "NODE",
                    "PID",
                    "READINESS",
                    "ADMIN",
                    "METRICS",
                    "STATE DIR",
                    "CNI SOCKET",
                    "LOG",
                ],
                mesh.daemons.iter().map(|d| {
                    vec![
                        d.node.clone(),
                        d.pid.to_string(),
                        d.readiness_addr.to_string(),
                        d.admin_addr.to_string(),
                        d.metrics_addr.to_string(),
                        d.state_dir.display().to_string(),
                        d.cni_socket.display().to_string(),
                        d.log.display().to_string(),
                    ]
                }),
            );
        }
    }
    if let Some(mesh) = st.mesh.as_ref().filter(|m| !m.sidecars.is_empty()) {
        println!();
        println!("mesh data plane (sidecars, one per meshed pod; admin on each pod's loopback)");
        table(
            &["POD", "PID", "READINESS", "METRICS", "STATE DIR", "LOG"],
            mesh.sidecars.iter().map(|s| {
                vec![
                    s.pod.to_string(),
                    s.pid.to_string(),
                    s.readiness_addr.to_string(),
                    s.metrics_addr.to_string(),
                    s.state_dir.display().to_string(),
                    s.log.display().to_string(),
                ]
            }),
        );
    }
    if let Some(mesh) = st.mesh.as_ref().filter(|m| !m.waypoints.is_empty()) {
        println!();
        println!("mesh waypoints (admin on each waypoint pod's loopback)");
        table(
            &["POD", "PID", "HBONE", "READINESS", "METRICS", "LOG"],
            mesh.waypoints.iter().map(|w| {
                vec![
                    w.pod.to_string(),
                    w.pid.to_string(),
                    w.hbone_addr.to_string(),
                    w.readiness_addr.to_string(),
                    w.metrics_addr.to_string(),
                    w.log.display().to_string(),
                ]
            }),
        );
    }
    if !st.processes.is_empty() {
        println!();
        table(
            &["PROCESS", "PLACE", "PID", "STATE", "LOG"],
            st.processes.iter().map(|p| {
                vec![
                    p.name.clone(),
                    p.place.to_string(),
                    p.pid.to_string(),
                    if p.running { "running" } else { "exited" }.to_owned(),
                    p.log.display().to_string(),
                ]
            }),
        );
    }
    println!();
    println!("namespaces: {}", {
        let ns: Vec<String> = st
            .namespaces
            .iter()
            .map(|n| {
                let labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if labels.is_empty() {
                    n.name.clone()
                } else {
                    format!("{} ({})", n.name, labels.join(","))
                }
            })
            .collect();
        ns.join(", ")
    });
    println!("note: Service VIPs answer only through the mesh (no kube-proxy).");
}

fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root).map_or_else(
        |_| path.display().to_string(),
        |p| format!("…/{}", p.display()),
    )
}

fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
