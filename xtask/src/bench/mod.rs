//! `cargo xtask bench`: the mesh measured against no mesh on the simulated cluster
//! (issue 6). Method, figures and how to read them: `benches/README.md`.
//!
//! ```text
//! cargo xtask bench [--quick | --smoke] [--rounds N] [--modes no-mesh,ambient-l4]
//!                   [--no-pods] [--no-build] [--debug] [--bin-dir DIR] [--out DIR]
//!                   [--perf] [--daemon-arg ARG]… [--controller-arg ARG]…
//! ```
//!
//! Every round brings one fresh cluster up per mode (same topology), runs every
//! scenario on it back to back, checks that each scenario's traffic took the mode's
//! path, and tears it down; the mode order alternates between rounds. Then the
//! memory-against-pods clusters. The report goes to `target/bench/`.

mod cell;
mod metrics;
mod mode;
mod plan;
mod procfs;
mod progress;
mod report;
mod stats;
mod svg;
mod topology;

use std::path::PathBuf;

use ambit_simcluster::{ClusterName, DEFAULT_STATE_ROOT};
use anyhow::{Context as _, bail};

use self::{
    cell::{CellResult, Env, PodsResult},
    mode::{MeshArgs, Mode},
    plan::{Plan, Profile},
    progress::Progress,
};
use crate::{setup, workspace_root};

/// Prefix of the benchmark's cluster names (leftovers of a killed run are swept).
const CLUSTER_PREFIX: &str = "bench-";

/// Measure the mesh against no mesh on the simulated cluster; writes
/// target/bench/report.{md,json} and SVG charts.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The reduced set: fewer rounds, shorter runs (under 5 minutes).
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// A tiny set that only shows every scenario runs and takes its path (seconds;
    /// the figures mean nothing).
    #[arg(long)]
    smoke: bool,
    /// Rounds (default: 5 full, 3 quick, 1 smoke).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Modes to run, comma-separated (default: all). Modes not available yet are
    /// listed in the report as such.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    modes: Vec<Mode>,
    /// Skip the memory-against-pods clusters.
    #[arg(long)]
    no_pods: bool,
    /// Do not build; use the binaries already in --bin-dir (default target/release).
    #[arg(long)]
    no_build: bool,
    /// Build and use debug binaries (quick to build; the figures are not
    /// representative, and the report says so).
    #[arg(long)]
    debug: bool,
    /// Directory of the binaries (default: target/release, or target/debug with --debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the report goes (default: target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Record the data-plane processes with `perf record -g` during each meshed cell
    /// (installs linux-perf if missing); files in <out>/perf/. Figures of such a run
    /// carry perf's overhead.
    #[arg(long)]
    perf: bool,
    /// Extra flag for every ambit-node (repeatable), e.g. `--daemon-arg=--log-level=warn`.
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Extra flag for ambit-controller (repeatable).
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    controller_args: Vec<String>,
    /// Where the clusters' state directories live.
    #[arg(long, default_value = DEFAULT_STATE_ROOT)]
    state_root: PathBuf,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::from_id(s.trim()).map_err(|e| e.to_string())
}

/// Runs the benchmark and writes the report.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let selected: Vec<Mode> = if args.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        args.modes.clone()
    };
    if !selected.iter().any(|m| m.availability().is_ok()) {
        let ids: Vec<&str> = selected.iter().map(|m| m.id()).collect();
        bail!(
            "none of the selected modes ({}) is available yet; available: {}",
            ids.join(", "),
            Mode::ALL
                .iter()
                .filter(|m| m.availability().is_ok())
                .map(|m| m.id())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !selected.contains(&Mode::NoMesh) {
        eprintln!("! no-mesh is not selected: the report will have no ratios to the baseline");
    }
    // The binaries the selected, available modes start (package = binary name).
    let mut packages: Vec<&str> = selected
        .iter()
        .filter(|m| m.availability().is_ok())
        .flat_map(|m| m.binaries().iter().copied())
        .collect();
    packages.sort_unstable();
    packages.dedup();
    setup::run(&setup::SetupArgs::default())?;
    let target = target_dir();
    let profile_dir = if args.debug { "debug" } else { "release" };
    if !args.no_build {
        let mut cargo_args = vec!["build", "--bins"];
        if !args.debug {
            cargo_args.push("--release");
        }
        for p in &packages {
            cargo_args.extend(["-p", p]);
        }
        crate::test::cargo("building the benchmark's binaries", &cargo_args)?;
    }
    let bin_dir = args
        .bin_dir
        .clone()
        .unwrap_or_else(|| target.join(profile_dir));
    for p in &packages {
        let bin = bin_dir.join(p);
        if !bin.is_file() {
            bail!(
                "{} is missing (build it, or drop --no-build)",
                bin.display()
            );
        }
    }
    let out = args.out.clone().unwrap_or_else(|| target.join("bench"));
    let perf_dir = if args.perf {
        ensure_perf()?;
        Some(out.join("perf"))
    } else {
        None
    };

    let mut plan = Plan::new(if args.smoke {
        Profile::Smoke
    } else if args.quick {
        Profile::Quick
    } else {
        Profile::Full
    });
    if let Some(r) = args.rounds {
        plan.rounds = r;
    }
    if args.no_pods {
        plan.pod_counts.clear();
    }
    sweep_leftovers(&args.state_root)?;

    let env = Env {
        plan,
        bin_dir,
        state_root: args.state_root.clone(),
        mesh: MeshArgs {
            daemon_args: args.daemon_args.clone(),
            controller_args: args.controller_args.clone(),
        },
        perf_dir,
        logs_dir: Some(out.join("logs")),
        test_names: false,
    };
    let measuring = std::time::Instant::now();
    let (cells, pods) = execute(&env, &selected, None);
    let measure_seconds = measuring.elapsed().as_secs_f64();

    let build = if args.debug || args.bin_dir.is_some() {
        format!(
            "binaries from {} (debug builds are not representative)",
            env.bin_dir.display()
        )
    } else {
        "release".to_owned()
    };
    let command = format!(
        "cargo xtask bench {}",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    let meta = report::meta(
        &build,
        measure_seconds,
        started.elapsed().as_secs_f64(),
        command.trim().to_owned(),
    );
    let report = report::Report::new(meta, env.plan.clone(), &selected, cells, pods);
    let written = report.write(&out)?;
    println!("{}", report.markdown());
    for w in &written {
        eprintln!("wrote {}", w.display());
    }
    if let Some(dir) = &env.perf_dir {
        eprintln!(
            "perf data in {}: perf report -i {}/<round>-<mode>.data",
            dir.display(),
            dir.display()
        );
    }
    match report.failures() {
        0 => Ok(()),
        n => bail!("{n} benchmark cell(s) failed; see the Failures section of the report"),
    }
}

/// Runs every round of every available selected mode, then the memory-against-pods
/// clusters. `progress` defaults to a bar on stderr.
fn execute(
    env: &Env,
    selected: &[Mode],
    progress: Option<Progress>,
) -> (Vec<CellResult>, Vec<PodsResult>) {
    let plan = &env.plan;
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| selected.contains(m) && m.availability().is_ok())
        .collect();
    for m in selected {
        if let Err(why) = m.availability() {
            eprintln!(
                "! {}: not available yet ({why}); listed in the report without figures",
                m.id()
            );
        }
    }
    let per_cell = plan.cell_seconds() + 3.0;
    let per_pods: f64 = plan.pod_counts.iter().map(|n| 1.0 + *n as f64 / 16.0).sum();
    let total = f64::from(plan.rounds) * modes.len() as f64 * (per_cell + per_pods);
    let mut progress = progress.unwrap_or_else(|| Progress::new(total));
    let mut cells = Vec::new();
    let mut pods = Vec::new();
    for round in 1..=plan.rounds {
        // Alternate the order so slow drift (thermal, other work) does not always
        // favour the same mode.
        let order: Vec<Mode> = if round % 2 == 1 {
            modes.clone()
        } else {
            modes.iter().rev().copied().collect()
        };
        for mode in &order {
            cells.push(cell::run_cell(env, *mode, round, &mut progress));
        }
        for mode in &order {
            for n in &plan.pod_counts {
                pods.push(cell::run_pods(env, *mode, round, *n, &mut progress));
            }
        }
    }
    progress.finish(&format!(
        "measured {} mode(s) × {} round(s)",
        modes.len(),
        plan.rounds
    ));
    (cells, pods)
}

/// `target/` of the workspace, honouring `CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    }
}

/// Tears down clusters a killed benchmark run left behind (named `bench-…`; a user's
/// own clusters are never touched).
fn sweep_leftovers(state_root: &std::path::Path) -> anyhow::Result<()> {
    for name in ambit_simcluster::list_clusters(state_root)? {
        if name.as_str().starts_with(CLUSTER_PREFIX) {
            eprintln!("! removing cluster {name}, left by an earlier benchmark run");
            ambit_simcluster::down(
                &ambit_simcluster::Options::new(ClusterName::new(name.as_str())?)
                    .state_root(state_root),
            )
            .with_context(|| format!("removing leftover cluster {name}"))?;
        }
    }
    Ok(())
}

/// `perf` on PATH, installing Debian's linux-perf if it is missing.
fn ensure_perf() -> anyhow::Result<()> {
    let works = || {
        std::process::Command::new("perf")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return Ok(());
    }
    eprintln!("→ installing linux-perf (apt-get) for --perf");
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", "linux-perf"][..],
    ] {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!(
                "apt-get {} failed; install perf by hand for --perf",
                args.join(" ")
            );
        }
    }
    if !works() {
        bail!("linux-perf is installed but `perf --version` fails");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The benchmark's own scenarios, tiny, on real clusters: each scenario must carry
    //! its traffic through the intended path (issue 6, "Done when"). Not a timing.

    use super::*;

    #[test]
    fn smoke_scenarios_take_each_modes_path() {
        let bin_dir = ambit_test_support::bin_dir().unwrap();
        let selected = [
            Mode::NoMesh,
            Mode::AmbientL4,
            Mode::AmbientL7,
            Mode::SidecarL4,
            Mode::SidecarL7,
        ];
        for bin in Mode::AmbientL7.binaries() {
            ambit_test_support::bin_path(bin).unwrap();
        }
        let l7 = |mode| matches!(mode, Mode::AmbientL7 | Mode::SidecarL7);
        let env = Env {
            plan: Plan::new(Profile::Smoke),
            bin_dir,
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            mesh: MeshArgs::default(),
            perf_dir: None,
            logs_dir: None,
            test_names: true,
        };
        let (cells, pods) = execute(&env, &selected, Some(Progress::quiet()));

        assert_eq!(cells.len(), selected.len(), "{cells:#?}");
        for c in &cells {
            assert!(c.error.is_none(), "{:?} failed: {:?}", c.mode, c.error);
            for f in report::FIGURES {
                assert!(c.figures.contains_key(f.id), "{:?} lacks {}", c.mode, f.id);
            }
            let scenarios: Vec<&str> = c.evidence.iter().map(|e| e.scenario.as_str()).collect();
            for s in [
                "warm-up",
                "tput_1",
                "tput_4",
                "tcp_rr",
                "http_fixed",
                "http_max",
                "new_connections",
                "held_connections",
            ] {
                assert!(
                    scenarios.contains(&s),
                    "{:?}: no evidence for {s}: {scenarios:?}",
                    c.mode
                );
            }
        }

        let base = cells.iter().find(|c| c.mode == Mode::NoMesh).unwrap();
        assert!(base.mesh_processes.is_empty());
        assert_eq!(base.figures["rss_idle"], 0.0);
        assert_eq!(base.figures["mesh_cpu_per_1k"], 0.0);
        for e in &base.evidence {
            assert!(e.path.starts_with("direct"), "{e:?}");
            assert!(e.deltas.is_empty(), "no mesh, no counters: {e:?}");
        }

        // Two node daemons; plus the waypoint; one sidecar in each of the two pods;
        // plus the L7 engine in the server pod.
        for (mode, data_plane) in [
            (Mode::AmbientL4, 2),
            (Mode::AmbientL7, 3),
            (Mode::SidecarL4, 2),
            (Mode::SidecarL7, 3),
        ] {
            let amb = cells.iter().find(|c| c.mode == mode).unwrap();
            assert_eq!(
                amb.mesh_processes.iter().filter(|p| p.data_plane).count(),
                data_plane,
                "{mode:?}: {:?}",
                amb.mesh_processes
            );
            assert!(amb.figures["rss_idle"] > 0.0);
            assert!(amb.figures["mesh_cpu_per_1k"] > 0.0);
            for e in &amb.evidence {
                assert!(e.path.contains("mutual_tls"), "{e:?}");
                assert!(e.expected.connections > 0, "{e:?}");
                // Every client connection is a mutual-TLS tunnel from node-1's daemon
                // (to the server, or to the waypoint).
                let opened = e.deltas["source.opened"];
                assert!(
                    opened >= e.expected.connections as f64,
                    "{mode:?} {}: node-1's daemon counted {opened} mutual_tls connections,                      the client opened {}",
                    e.scenario,
                    e.expected.connections
                );
                let served = if l7(mode) && e.expected.http_requests > 0 {
                    // The waypoint pools its connections to the server: its own
                    // counter proves the requests.
                    e.deltas["waypoint.requests"] >= e.expected.http_requests as f64
                } else {
                    e.deltas["destination.opened"] >= e.expected.connections as f64
                };
                assert!(served, "{mode:?} {}: {e:?}", e.scenario);
            }
            let streamed = amb
                .evidence
                .iter()
                .find(|e| e.scenario == "tput_4")
                .unwrap();
            assert!(streamed.expected.bytes_to_server > 0);
            let counted = if l7(mode) {
                streamed.deltas["source.received_bytes"]
            } else {
                streamed.deltas["destination.received_bytes"]
            };
            assert!(
                counted >= streamed.expected.bytes_to_server as f64,
                "{streamed:?}"
            );
        }

        assert_eq!(pods.len(), selected.len() * env.plan.pod_counts.len());
        for p in &pods {
            assert!(p.error.is_none(), "{p:?}");
            let data = p.data_plane_rss_mib.unwrap();
            if p.mode == Mode::NoMesh {
                assert_eq!(data, 0.0);
            } else {
                assert!(data > 0.0, "{p:?}");
            }
        }

        // The report renders every mode.
        let meta = report::meta("debug (test)", 0.0, 0.0, "test".into());
        let rep = report::Report::new(meta, env.plan.clone(), &selected, cells, pods);
        let md = rep.markdown();
        assert!(!md.contains("not available yet"), "{md}");
        assert!(rep.summary[&Mode::SidecarL4]["tput_1"].ratio.is_some());
        assert!(rep.summary[&Mode::AmbientL4]["tput_1"].ratio.is_some());
        assert!(rep.summary[&Mode::AmbientL7]["http_p50"].ratio.is_some());
        assert!(rep.summary[&Mode::SidecarL7]["http_p50"].ratio.is_some());
        let dir = std::env::temp_dir().join(format!("ambit-bench-test-{}", std::process::id()));
        let written = rep.write(&dir).unwrap();
        assert_eq!(written.len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
