//! One measurement cell: a fresh cluster in one mode, every scenario run back to back on
//! it, each scenario's path checked, the cluster torn down. And the memory-against-pods
//! cell: a cluster with N pods, the mesh's resident memory, torn down.
//!
//! Load runs inside the client pod (`ambit-echo load|stream|hold`, in the pod's network
//! namespace and cgroup), against the server pod's IP on the other node.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambit_echo::{hold::HoldReport, load::Summary, stream::StreamSummary};
use ambit_simcluster::{Cluster, ClusterName, Options};
use anyhow::{Context as _, bail, ensure};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    mode::{Evidence, Expect, MeshArgs, MeshProcess, Mode},
    plan::Plan,
    procfs,
    progress::Progress,
    topology,
};

/// How long the path counters may take to show a scenario's traffic.
const PATH_WAIT: Duration = Duration::from_secs(15);
/// How long a cluster may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Everything a cell needs besides the mode and round.
#[derive(Debug)]
pub struct Env {
    pub plan: Plan,
    pub bin_dir: PathBuf,
    pub state_root: PathBuf,
    pub mesh: MeshArgs,
    /// Where `perf record` writes, with `--perf`.
    pub perf_dir: Option<PathBuf>,
    /// Where the logs of a failed cell's cluster are copied before teardown.
    pub logs_dir: Option<PathBuf>,
    /// Test runs name clusters with the test prefix (so stale ones are swept);
    /// benchmark runs name them `bench-<tag>`.
    pub test_names: bool,
}

/// The result of one (round, mode) cell. Failed cells carry `error` and no figures.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    pub round: u32,
    pub mode: Mode,
    pub cluster: String,
    /// Wall time of the cell, cluster up and down included.
    pub seconds: f64,
    pub error: Option<String>,
    /// Figure id → value (see `report::FIGURES` for ids and units).
    pub figures: BTreeMap<String, f64>,
    /// Scenario → the load generator's own JSON output, plus CPU and memory readings.
    pub raw: BTreeMap<String, serde_json::Value>,
    /// Per scenario: proof that its traffic took the mode's path.
    pub evidence: Vec<Evidence>,
    pub mesh_processes: Vec<MeshProcess>,
    /// Things a reader should know (e.g. a fixed rate not reached).
    pub notes: Vec<String>,
}

/// The result of one memory-against-pods cell.
#[derive(Debug, Clone, Serialize)]
pub struct PodsResult {
    pub round: u32,
    pub mode: Mode,
    pub pods: usize,
    pub cluster: String,
    pub error: Option<String>,
    /// Sum of the data-plane processes' VmRSS (daemons; later waypoints, sidecars).
    pub data_plane_rss_mib: Option<f64>,
    /// The controller's VmRSS.
    pub control_plane_rss_mib: Option<f64>,
    /// Process → VmRSS bytes.
    pub per_process: BTreeMap<String, u64>,
}

/// CPU readings at one moment.
#[derive(Debug, Clone, Copy)]
struct CpuSnap {
    mesh: f64,
    workloads: f64,
}

/// A running `ambit-echo hold` (or other child) that is killed if still running when
/// dropped.
struct ChildGuard(Child);

/// `perf record` attached to the data-plane processes, stopped with SIGINT.
struct PerfGuard {
    child: Child,
    out: PathBuf,
}

const MIB: f64 = 1024.0 * 1024.0;

fn cluster_name(env: &Env, tag: &str) -> anyhow::Result<ClusterName> {
    Ok(if env.test_names {
        ClusterName::unique_for_test()
    } else {
        ClusterName::new(&format!("bench-{tag}"))?
    })
}

fn options(env: &Env, name: ClusterName) -> Options {
    Options::new(name)
        .state_root(&env.state_root)
        .binaries_dir(&env.bin_dir)
        .ready_timeout(READY_TIMEOUT)
}

/// Runs one cell; never fails: a failure is recorded in the result.
pub fn run_cell(env: &Env, mode: Mode, round: u32, progress: &mut Progress) -> CellResult {
    let started = Instant::now();
    let mut result = CellResult {
        round,
        mode,
        cluster: String::new(),
        seconds: 0.0,
        error: None,
        figures: BTreeMap::new(),
        raw: BTreeMap::new(),
        evidence: Vec::new(),
        mesh_processes: Vec::new(),
        notes: Vec::new(),
    };
    if let Err(e) = cell(env, mode, round, progress, &mut result) {
        result.error = Some(format!("{e:#}"));
        result.figures.clear();
        progress.note(&format!("round {round} {}: FAILED: {e:#}", mode.id()));
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

fn cell(
    env: &Env,
    mode: Mode,
    round: u32,
    progress: &mut Progress,
    r: &mut CellResult,
) -> anyhow::Result<()> {
    let plan = &env.plan;
    let what = |s: &str| format!("round {round}/{} · {} · {s}", plan.rounds, mode.title());

    progress.begin(&what("cluster up"), 2.0);
    let name = cluster_name(env, &format!("r{round}-{}", mode.id()))?;
    r.cluster = name.to_string();
    let cluster = mode.up(options(env, name), &mode.topology(2)?, &env.mesh)?;
    if let Err(e) = measure(env, mode, round, progress, r, &cluster) {
        if let Some(dir) = &env.logs_dir {
            match keep_logs(&cluster, dir) {
                Ok(kept) => r.notes.push(format!("logs kept in {}", kept.display())),
                Err(k) => r.notes.push(format!("keeping the logs failed: {k:#}")),
            }
        }
        return Err(e);
    }
    let report = cluster.down().context("tearing the cluster down")?;
    if report.found_nothing() {
        r.notes.push("teardown found nothing to remove".into());
    }
    Ok(())
}

/// Copies the cluster's logs (workloads, daemons, controller) to `<dir>/<cluster>/`.
fn keep_logs(cluster: &Cluster, dir: &Path) -> anyhow::Result<PathBuf> {
    let from = cluster.status().logs_dir;
    let to = dir.join(cluster.name().as_str());
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(to)
}

/// The scenarios of a cell, on its cluster.
fn measure(
    env: &Env,
    mode: Mode,
    round: u32,
    progress: &mut Progress,
    r: &mut CellResult,
    cluster: &Cluster,
) -> anyhow::Result<()> {
    let plan = &env.plan;
    let what = |s: &str| format!("round {round}/{} · {} · {s}", plan.rounds, mode.title());
    mode.wait_ready(cluster, READY_TIMEOUT)?;
    let procs = mode.mesh_processes(cluster)?;
    r.mesh_processes.clone_from(&procs);
    let server = cluster.pod(&topology::server_pod())?;
    let client = cluster.pod(&topology::client_pod())?;
    let workload_cgroups = vec![client.cgroup.clone(), server.cgroup.clone()];
    let targets = mode.targets(cluster)?;
    let (http_url, echo_addr, discard_addr) = (&targets.http_url, &targets.echo, &targets.discard);
    let http_args = |extra: &[String]| -> Vec<String> {
        let mut a = strings(&[
            "load",
            "--url",
            http_url,
            "-X",
            "POST",
            "--body-size",
            &plan.http_body.to_string(),
            "-H",
            &format!("{}: {}", ambit_echo::RESPONSE_BYTES_HEADER, plan.http_body),
            "--timeout",
            "5s",
        ]);
        a.extend_from_slice(extra);
        a
    };
    let mut ctx = Ctx {
        cluster,
        mode,
        procs: &procs,
        workload_cgroups: &workload_cgroups,
        r,
    };

    progress.begin(&what("warm-up"), 1.0);
    let _warm: Summary = ctx.scenario("warm-up", |c| {
        let s: Summary = echo_json(
            c,
            &http_args(&strings(&[
                "-n",
                &plan.warmup_requests.to_string(),
                "-c",
                "4",
            ])),
        )?;
        let e = load_expect(&s, plan.http_body)?;
        Ok((s, e))
    })?;
    let idle_rss = rss(&procs)?;
    ctx.r
        .raw
        .insert("rss_idle".into(), serde_json::to_value(&idle_rss)?);
    ctx.r.figures.insert(
        "rss_idle".into(),
        idle_rss.values().sum::<u64>() as f64 / MIB,
    );

    let perf = match &env.perf_dir {
        Some(dir) if mode.is_meshed() => Some(PerfGuard::start(
            dir,
            &format!("r{round}-{}", mode.id()),
            &procs,
        )?),
        _ => None,
    };

    for (key, streams) in [("tput_1", 1), ("tput_4", plan.multi_streams)] {
        progress.begin(
            &what(&format!("throughput, {streams} stream(s)")),
            plan.stream_duration.as_secs_f64() + 0.5,
        );
        let s: StreamSummary = ctx.scenario(key, |c| {
            let s: StreamSummary = echo_json(
                c,
                &strings(&[
                    "stream",
                    "--to",
                    discard_addr,
                    "--streams",
                    &streams.to_string(),
                    "--duration",
                    &secs(plan.stream_duration),
                ]),
            )?;
            ensure!(s.errors == 0, "{streams} stream(s): {:?}", s.error_kinds);
            Ok((
                s.clone(),
                Expect {
                    connections: streams as u64,
                    bytes_to_server: s.bytes,
                    http_requests: 0,
                },
            ))
        })?;
        ctx.r.figures.insert(key.into(), s.bits_per_second / 1e9);
    }

    progress.begin(
        &what("TCP round trips"),
        plan.rr_duration.as_secs_f64() + 0.5,
    );
    let s: Summary = ctx.scenario("tcp_rr", |c| {
        let s: Summary = echo_json(
            c,
            &strings(&[
                "load",
                "--tcp",
                echo_addr,
                "--size",
                &plan.rr_size.to_string(),
                "-c",
                "1",
                "--duration",
                &secs(plan.rr_duration),
            ]),
        )?;
        let e = load_expect(&s, plan.rr_size)?;
        Ok((s, e))
    })?;
    for (k, v) in [
        ("p50", s.latency_ms.p50),
        ("p90", s.latency_ms.p90),
        ("p99", s.latency_ms.p99),
    ] {
        ctx.r.figures.insert(format!("tcp_rr_{k}"), v * 1000.0);
    }

    progress.begin(
        &what(&format!("HTTP at {} req/s", plan.http_rate)),
        plan.http_duration.as_secs_f64() + 0.5,
    );
    let before = ctx.cpu()?;
    let s: Summary = ctx.scenario("http_fixed", |c| {
        let s: Summary = echo_json(
            c,
            &http_args(&strings(&[
                "--rate",
                &plan.http_rate.to_string(),
                "-c",
                &plan.http_connections.to_string(),
                "--duration",
                &secs(plan.http_duration),
            ])),
        )?;
        let e = load_expect(&s, plan.http_body)?;
        Ok((s, e))
    })?;
    let after = ctx.cpu()?;
    for (k, v) in [
        ("p50", s.latency_ms.p50),
        ("p90", s.latency_ms.p90),
        ("p99", s.latency_ms.p99),
    ] {
        ctx.r.figures.insert(format!("http_{k}"), v);
    }
    let achieved = s.ok as f64 / s.duration_s;
    ctx.r.figures.insert("http_achieved_rps".into(), achieved);
    if achieved < 0.95 * plan.http_rate {
        ctx.r.notes.push(format!(
            "the fixed-rate HTTP run reached {achieved:.0} of {} req/s (its latency includes the queueing)",
            plan.http_rate
        ));
    }
    let per_1k = 1000.0 / s.ok as f64;
    let mesh_cpu = after.mesh - before.mesh;
    let workload_cpu = after.workloads - before.workloads;
    ctx.r
        .figures
        .insert("mesh_cpu_per_1k".into(), mesh_cpu * per_1k);
    ctx.r.figures.insert(
        "total_cpu_per_1k".into(),
        (mesh_cpu + workload_cpu) * per_1k,
    );
    ctx.r.raw.insert(
        "http_fixed_cpu".into(),
        serde_json::json!({ "mesh_cpu_s": mesh_cpu, "workload_cpu_s": workload_cpu, "requests_ok": s.ok }),
    );

    progress.begin(
        &what("HTTP maximum rate"),
        plan.max_duration.as_secs_f64() + 0.5,
    );
    let s: Summary = ctx.scenario("http_max", |c| {
        let s: Summary = echo_json(
            c,
            &http_args(&strings(&[
                "-c",
                &plan.max_connections.to_string(),
                "--duration",
                &secs(plan.max_duration),
            ])),
        )?;
        let e = load_expect(&s, plan.http_body)?;
        Ok((s, e))
    })?;
    ctx.r
        .figures
        .insert("http_max_rps".into(), s.ok as f64 / s.duration_s);

    progress.begin(
        &what("new connections"),
        plan.new_connections as f64 / 2000.0 + 0.5,
    );
    let s: Summary = ctx.scenario("new_connections", |c| {
        let s: Summary = echo_json(
            c,
            &strings(&[
                "load",
                "--tcp",
                echo_addr,
                "--size",
                "1",
                "--new-connection",
                "-c",
                &plan.new_connection_workers.to_string(),
                "-n",
                &plan.new_connections.to_string(),
            ]),
        )?;
        let e = load_expect(&s, 1)?;
        Ok((s, e))
    })?;
    ctx.r
        .figures
        .insert("conn_rate".into(), s.ok as f64 / s.duration_s);

    progress.begin(
        &what(&format!("{} open connections", plan.held_connections)),
        plan.held_connections as f64 / 500.0 + 1.0,
    );
    let held_rss = ctx.held_connections(echo_addr, plan.held_connections)?;
    let held_total = held_rss.values().sum::<u64>() as f64;
    let idle_total = idle_rss.values().sum::<u64>() as f64;
    ctx.r.figures.insert("rss_conns".into(), held_total / MIB);
    ctx.r.figures.insert(
        "rss_per_conn".into(),
        (held_total - idle_total) / plan.held_connections as f64 / 1024.0,
    );
    ctx.r
        .raw
        .insert("rss_conns".into(), serde_json::to_value(&held_rss)?);

    if let Some(perf) = perf {
        let out = perf.stop()?;
        ctx.r.notes.push(format!("perf record: {}", out.display()));
    }
    Ok(())
}

/// Runs one memory-against-pods cell; never fails: a failure is recorded.
pub fn run_pods(
    env: &Env,
    mode: Mode,
    round: u32,
    pods: usize,
    progress: &mut Progress,
) -> PodsResult {
    progress.begin(
        &format!(
            "round {round}/{} · {} · memory with {pods} pods",
            env.plan.rounds,
            mode.title()
        ),
        1.0 + pods as f64 / 16.0,
    );
    let mut result = PodsResult {
        round,
        mode,
        pods,
        cluster: String::new(),
        error: None,
        data_plane_rss_mib: None,
        control_plane_rss_mib: None,
        per_process: BTreeMap::new(),
    };
    if let Err(e) = pods_cell(env, mode, pods, &mut result) {
        result.error = Some(format!("{e:#}"));
        result.data_plane_rss_mib = None;
        result.control_plane_rss_mib = None;
        progress.note(&format!(
            "round {round} {} with {pods} pods: FAILED: {e:#}",
            mode.id()
        ));
    }
    result
}

fn pods_cell(env: &Env, mode: Mode, pods: usize, r: &mut PodsResult) -> anyhow::Result<()> {
    let name = cluster_name(env, &format!("p{pods}-{}", mode.id()))?;
    r.cluster = name.to_string();
    let cluster = mode.up(options(env, name), &mode.topology(pods)?, &env.mesh)?;
    if let Err(e) = pods_measure(mode, &cluster, r) {
        if let Some(dir) = &env.logs_dir {
            // The error says what failed; the logs say why.
            let _ = keep_logs(&cluster, dir);
        }
        return Err(e);
    }
    cluster.down().context("tearing the cluster down")?;
    Ok(())
}

fn pods_measure(mode: Mode, cluster: &Cluster, r: &mut PodsResult) -> anyhow::Result<()> {
    mode.wait_ready(cluster, READY_TIMEOUT)?;
    let procs = mode.mesh_processes(cluster)?;
    // One request proves the pods are reachable through the mode's path.
    let url = mode.targets(cluster)?.http_url;
    let before = mode.counters(cluster)?;
    let s: Summary = echo_json(cluster, &strings(&["load", "--url", &url, "-n", "1"]))?;
    let expect = load_expect(&s, 0)?;
    mode.verify_path(cluster, "pods", &before, expect, false, PATH_WAIT)?;
    let mut data = 0u64;
    let mut control = 0u64;
    for p in &procs {
        let bytes = procfs::rss_bytes(p.pid).with_context(|| format!("memory of {}", p.name))?;
        if p.data_plane {
            data += bytes;
        } else {
            control += bytes;
        }
        r.per_process.insert(p.name.clone(), bytes);
    }
    r.data_plane_rss_mib = Some(data as f64 / MIB);
    r.control_plane_rss_mib = Some(control as f64 / MIB);
    Ok(())
}

/// What the scenarios of a cell share.
struct Ctx<'a> {
    cluster: &'a Cluster,
    mode: Mode,
    procs: &'a [MeshProcess],
    workload_cgroups: &'a [PathBuf],
    r: &'a mut CellResult,
}

impl Ctx<'_> {
    /// Runs a scenario between two path-counter readings, checks its path, and keeps
    /// its raw output and evidence.
    fn scenario<T: Serialize>(
        &mut self,
        name: &str,
        run: impl FnOnce(&Cluster) -> anyhow::Result<(T, Expect)>,
    ) -> anyhow::Result<T> {
        let before = self.mode.counters(self.cluster)?;
        let (out, expect) = run(self.cluster).with_context(|| format!("scenario {name}"))?;
        let evidence =
            self.mode
                .verify_path(self.cluster, name, &before, expect, false, PATH_WAIT)?;
        self.r.evidence.push(evidence);
        self.r
            .raw
            .insert(name.to_owned(), serde_json::to_value(&out)?);
        Ok(out)
    }

    /// CPU of the mesh processes, and of the client and server pods apart from mesh
    /// processes running inside them (sidecar modes), so that nothing counts twice.
    fn cpu(&self) -> anyhow::Result<CpuSnap> {
        let mut mesh = 0.0;
        let mut mesh_in_pods = 0.0;
        for p in self.procs {
            let cpu = procfs::cpu_seconds(p.pid).with_context(|| format!("CPU of {}", p.name))?;
            mesh += cpu;
            let cgroup =
                procfs::cgroup_of(p.pid).with_context(|| format!("cgroup of {}", p.name))?;
            if !cgroup.as_os_str().is_empty()
                && self.workload_cgroups.iter().any(|cg| cg.ends_with(&cgroup))
            {
                mesh_in_pods += cpu;
            }
        }
        let mut workloads = 0.0;
        for cg in self.workload_cgroups {
            workloads += procfs::cgroup_cpu_seconds(cg)?;
        }
        Ok(CpuSnap {
            mesh,
            workloads: workloads - mesh_in_pods,
        })
    }

    /// Opens `n` connections client → server with `ambit-echo hold`, checks their
    /// path, reads the mesh's memory while they are open, and closes them.
    fn held_connections(&mut self, addr: &str, n: usize) -> anyhow::Result<BTreeMap<String, u64>> {
        let before = self.mode.counters(self.cluster)?;
        let mut cmd = self
            .cluster
            .pod_command(&topology::client_pod(), "ambit-echo")?;
        cmd.args(strings(&[
            "hold",
            "--tcp",
            addr,
            "--connections",
            &n.to_string(),
            "--parallel",
            "64",
        ]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = ChildGuard(cmd.spawn().context("starting ambit-echo hold")?);
        let stdout = child.0.stdout.take().context("hold: no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading ambit-echo hold's report")?;
        if line.trim().is_empty() {
            let status = child.0.wait()?;
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err)?;
            }
            bail!(
                "ambit-echo hold exited ({status}) without a report: {}",
                err.trim()
            );
        }
        let report: HoldReport = serde_json::from_str(&line)
            .with_context(|| format!("ambit-echo hold printed {line:?}"))?;
        ensure!(
            report.open == n as u64,
            "hold: {} of {n} connections open: {:?}",
            report.open,
            report.error_kinds
        );
        let evidence = self.mode.verify_path(
            self.cluster,
            "held_connections",
            &before,
            Expect {
                connections: report.open,
                bytes_to_server: report.open,
                http_requests: 0,
            },
            true,
            PATH_WAIT,
        )?;
        self.r.evidence.push(evidence);
        let held = rss(self.procs)?;
        self.r
            .raw
            .insert("held_connections".into(), serde_json::to_value(&report)?);
        // EOF on its stdin tells hold to close the connections and exit.
        drop(child.0.stdin.take());
        child.wait(Duration::from_secs(30))?;
        Ok(held)
    }
}

/// VmRSS of each mesh process.
fn rss(procs: &[MeshProcess]) -> anyhow::Result<BTreeMap<String, u64>> {
    procs
        .iter()
        .map(|p| {
            procfs::rss_bytes(p.pid)
                .with_context(|| format!("memory of {}", p.name))
                .map(|b| (p.name.clone(), b))
        })
        .collect()
}

/// Runs `ambit-echo ARGS` in the client pod and parses its JSON output.
fn echo_json<T: DeserializeOwned>(cluster: &Cluster, args: &[String]) -> anyhow::Result<T> {
    let out = cluster
        .pod_command(&topology::client_pod(), "ambit-echo")?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ambit-echo in the client pod")?;
    ensure!(
        out.status.success(),
        "ambit-echo {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ambit-echo {} printed {:?}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A load run must have had no failures; what it carried, for the path check. An
/// HTTP run has statuses, a TCP run none.
fn load_expect(s: &Summary, bytes_per_request: usize) -> anyhow::Result<Expect> {
    ensure!(
        s.errors == 0 && s.ok == s.requests && s.requests > 0,
        "{} of {} requests failed: {:?} (statuses {:?})",
        s.requests - s.ok,
        s.requests,
        s.error_kinds,
        s.status
    );
    Ok(Expect {
        connections: s.connections,
        bytes_to_server: s.ok * bytes_per_request as u64,
        http_requests: if s.status.is_empty() { 0 } else { s.ok },
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl ChildGuard {
    /// Waits for the child to exit, killing it after `limit`.
    fn wait(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait()? {
                ensure!(status.success(), "child exited with {status}");
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                bail!("child did not exit within {limit:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl PerfGuard {
    fn start(dir: &Path, tag: &str, procs: &[MeshProcess]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = dir.join(format!("{tag}.data"));
        let log = std::fs::File::create(dir.join(format!("{tag}.log")))?;
        let pids: Vec<String> = procs
            .iter()
            .filter(|p| p.data_plane)
            .map(|p| p.pid.to_string())
            .collect();
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-o"])
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting perf record (is linux-perf installed?)")?;
        Ok(Self { child, out })
    }

    /// SIGINT makes `perf record` write its file and exit.
    fn stop(mut self) -> anyhow::Result<PathBuf> {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .context("sending SIGINT to perf")?;
        ensure!(status.success(), "kill -INT {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("perf record did not stop within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.out.clone())
    }
}

impl Drop for PerfGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_loads_are_refused() {
        let mut s: Summary = serde_json::from_value(serde_json::json!({
            "requests": 10, "ok": 10, "errors": 0, "status": {"200": 10}, "by_pod": {},
            "by_version": {}, "error_kinds": {},
            "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0, "mean": 1.0},
            "duration_s": 1.0, "rps": 10.0, "connections": 2
        }))
        .unwrap();
        let e = load_expect(&s, 100).unwrap();
        assert_eq!(
            (e.connections, e.bytes_to_server, e.http_requests),
            (2, 1000, 10)
        );
        s.status.clear();
        assert_eq!(load_expect(&s, 100).unwrap().http_requests, 0, "TCP");
        s.ok = 9;
        s.errors = 1;
        assert!(load_expect(&s, 100).is_err());
    }

    #[test]
    fn durations_are_passed_in_milliseconds() {
        assert_eq!(secs(Duration::from_secs_f64(0.3)), "300ms");
        assert_eq!(secs(Duration::from_secs(8)), "8000ms");
    }
}
