//! The report: `report.md` (tables, one row per mode, every figure with its ratio to
//! the baseline), `report.json` (every raw figure of every round) and SVG charts.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    cell::{CellResult, PodsResult},
    mode::Mode,
    plan::Plan,
    stats::{Stat, fmt},
    svg::{self, PALETTE, Series},
};

/// A figure of the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FigureDef {
    pub id: &'static str,
    pub group: Group,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Zero for the baseline by definition (no mesh process): no ratio.
    pub mesh_only: bool,
}

/// Tables of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Throughput,
    TcpRoundTrip,
    HttpFixedRate,
    Rates,
    Cpu,
    Memory,
}

const fn fig(
    id: &'static str,
    group: Group,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    mesh_only: bool,
) -> FigureDef {
    FigureDef {
        id,
        group,
        label,
        unit,
        higher_is_better,
        mesh_only,
    }
}

/// Every figure a cell produces, in report order.
pub const FIGURES: &[FigureDef] = &[
    fig(
        "tput_1",
        Group::Throughput,
        "1 stream",
        "Gbit/s",
        true,
        false,
    ),
    fig(
        "tput_4",
        Group::Throughput,
        "4 streams",
        "Gbit/s",
        true,
        false,
    ),
    fig("tcp_rr_p50", Group::TcpRoundTrip, "p50", "µs", false, false),
    fig("tcp_rr_p90", Group::TcpRoundTrip, "p90", "µs", false, false),
    fig("tcp_rr_p99", Group::TcpRoundTrip, "p99", "µs", false, false),
    fig("http_p50", Group::HttpFixedRate, "p50", "ms", false, false),
    fig("http_p90", Group::HttpFixedRate, "p90", "ms", false, false),
    fig("http_p99", Group::HttpFixedRate, "p99", "ms", false, false),
    fig(
        "http_achieved_rps",
        Group::HttpFixedRate,
        "achieved",
        "req/s",
        true,
        false,
    ),
    fig(
        "http_max_rps",
        Group::Rates,
        "HTTP 1 KB, max",
        "req/s",
        true,
        false,
    ),
    fig(
        "conn_rate",
        Group::Rates,
        "new TCP connections",
        "conn/s",
        true,
        false,
    ),
    fig(
        "mesh_cpu_per_1k",
        Group::Cpu,
        "mesh processes",
        "CPU s",
        false,
        true,
    ),
    fig(
        "total_cpu_per_1k",
        Group::Cpu,
        "mesh + client and server pods",
        "CPU s",
        false,
        false,
    ),
    fig("rss_idle", Group::Memory, "idle", "MiB", false, true),
    fig(
        "rss_conns",
        Group::Memory,
        "with open connections",
        "MiB",
        false,
        true,
    ),
    fig(
        "rss_per_conn",
        Group::Memory,
        "growth per open connection",
        "KiB",
        false,
        true,
    ),
];

/// A figure of a mode over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct FigureSummary {
    pub value: Stat,
    /// Per-round ratio to the baseline of the same round; `None` for the baseline
    /// itself and for mesh-only figures.
    pub ratio: Option<Stat>,
}

/// Where and what the run was.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub date: String,
    pub machine: String,
    pub kernel: String,
    pub git: String,
    pub build: String,
    /// Wall time of the measurements.
    pub measure_seconds: f64,
    /// Wall time of the whole command (set-up and build included).
    pub seconds: f64,
    pub command: String,
}

/// Everything written.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub meta: Meta,
    pub plan: Plan,
    pub modes: Vec<ModeEntry>,
    pub figures: Vec<FigureDef>,
    /// Every (round, mode) cell with its raw figures.
    pub cells: Vec<CellResult>,
    /// Every memory-against-pods cell.
    pub pods: Vec<PodsResult>,
    /// mode → figure → medians.
    pub summary: BTreeMap<Mode, BTreeMap<String, FigureSummary>>,
    /// mode → pod count → data-plane RSS (MiB) over rounds.
    pub pods_summary: BTreeMap<Mode, BTreeMap<usize, Stat>>,
}

/// A mode as the report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ModeEntry {
    pub id: &'static str,
    pub title: &'static str,
    /// Selected on the command line.
    pub selected: bool,
    /// Why it was not measured, when it was not.
    pub not_available: Option<&'static str>,
}

impl Report {
    /// Summarizes the cells.
    pub fn new(
        meta: Meta,
        plan: Plan,
        selected: &[Mode],
        cells: Vec<CellResult>,
        pods: Vec<PodsResult>,
    ) -> Self {
        let modes = Mode::ALL
            .iter()
            .map(|m| ModeEntry {
                id: m.id(),
                title: m.title(),
                selected: selected.contains(m),
                not_available: m.availability().err(),
            })
            .collect();
        let summary = summarize(&cells);
        let mut pods_summary: BTreeMap<Mode, BTreeMap<usize, Stat>> = BTreeMap::new();
        for m in Mode::ALL {
            for n in &plan.pod_counts {
                let v: Vec<f64> = pods
                    .iter()
                    .filter(|p| p.mode == m && p.pods == *n)
                    .filter_map(|p| p.data_plane_rss_mib)
                    .collect();
                if let Some(st) = Stat::of(&v) {
                    pods_summary.entry(m).or_default().insert(*n, st);
                }
            }
        }
        Self {
            schema: 1,
            meta,
            plan,
            modes,
            figures: FIGURES.to_vec(),
            cells,
            pods,
            summary,
            pods_summary,
        }
    }

    /// Whether any cell failed.
    pub fn failures(&self) -> usize {
        self.cells.iter().filter(|c| c.error.is_some()).count()
            + self.pods.iter().filter(|p| p.error.is_some()).count()
    }

    /// Writes `report.md`, `report.json` and the charts into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut written = Vec::new();
        let mut put = |name: &str, text: String| -> anyhow::Result<()> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
            Ok(())
        };
        put("report.md", self.markdown())?;
        put("report.json", serde_json::to_string_pretty(self)? + "\n")?;
        for (name, svg) in self.charts() {
            put(name, svg)?;
        }
        Ok(written)
    }

    fn measured(&self) -> Vec<Mode> {
        Mode::ALL
            .into_iter()
            .filter(|m| {
                self.modes
                    .iter()
                    .any(|e| e.id == m.id() && e.selected && e.not_available.is_none())
            })
            .collect()
    }

    fn absent_titles(&self) -> Vec<String> {
        self.modes
            .iter()
            .filter(|e| e.not_available.is_some())
            .map(|e| e.title.to_owned())
            .collect()
    }

    fn group_title(&self, g: Group) -> String {
        let p = &self.plan;
        match g {
            Group::Throughput => "Throughput, client → server across nodes (Gbit/s)".to_owned(),
            Group::TcpRoundTrip => format!(
                "TCP request/response round trip, {} B, one connection, closed loop (µs)",
                p.rr_size
            ),
            Group::HttpFixedRate => format!(
                "HTTP/1.1 {} B request + {} B response at {} req/s, open loop over {} connections (latency from the scheduled send time)",
                p.http_body, p.http_body, p.http_rate, p.http_connections
            ),
            Group::Rates => format!(
                "Maximum rates: HTTP over {} connections; new TCP connections (connect + 1-byte echo + close) with {} workers",
                p.max_connections, p.new_connection_workers
            ),
            Group::Cpu => format!(
                "CPU seconds per 1000 requests of the {} req/s HTTP run",
                p.http_rate
            ),
            Group::Memory => format!(
                "Resident memory of the mesh processes (MiB): idle, and with {} open connections",
                p.held_connections
            ),
        }
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.meta;
        let _ = writeln!(md, "# Ambit benchmark report\n");
        let _ = writeln!(
            md,
            "{} · {} · Linux {} · commit {} · build: {} · {} plan, {} round(s) · measured in {} ({} with set-up and build)\n",
            m.date,
            m.machine,
            m.kernel,
            m.git,
            m.build,
            serde_json::to_value(self.plan.profile)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.plan.rounds,
            super::progress::fmt_duration(m.measure_seconds),
            super::progress::fmt_duration(m.seconds),
        );
        let _ = writeln!(md, "Command: `{}`\n", m.command);
        let _ = writeln!(md, "Modes:\n");
        for e in &self.modes {
            let state = match (e.not_available, e.selected) {
                (Some(why), _) => format!("not available yet: {why}"),
                (None, false) => "not selected in this run".to_owned(),
                (None, true) => "measured".to_owned(),
            };
            let _ = writeln!(md, "- **{}** (`{}`): {state}", e.title, e.id);
        }
        let _ = writeln!(
            md,
            "\nEach value is the median over the rounds with the range (min–max) in \
             parentheses. \"vs baseline\" is the median of the per-round ratio to the no-mesh \
             baseline of the same round, with its range: for throughput and rates below ×1 \
             means slower, for latency, CPU and memory above ×1 means more. Figures that are \
             zero without a mesh (mesh CPU, mesh memory) have no ratio. Method: \
             `benches/README.md`.\n"
        );

        let measured = self.measured();
        for group in [
            Group::Throughput,
            Group::TcpRoundTrip,
            Group::HttpFixedRate,
            Group::Rates,
            Group::Cpu,
            Group::Memory,
        ] {
            let figs: Vec<&FigureDef> = FIGURES.iter().filter(|f| f.group == group).collect();
            let _ = writeln!(md, "## {}\n", self.group_title(group));
            let mut header = vec!["mode".to_owned()];
            for f in &figs {
                header.push(format!("{} ({})", f.label, f.unit));
                if !f.mesh_only {
                    header.push("vs baseline".to_owned());
                }
            }
            let _ = writeln!(md, "| {} |", header.join(" | "));
            let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
            for mode in Mode::ALL {
                let entry = self.modes.iter().find(|e| e.id == mode.id());
                let mut row = vec![mode.title().to_owned()];
                if let Some(why) = entry.and_then(|e| e.not_available) {
                    row.push(format!("not available yet: {why}"));
                    row.extend(std::iter::repeat_n(String::new(), header.len() - 2));
                } else if !measured.contains(&mode) {
                    row.push("not selected".to_owned());
                    row.extend(std::iter::repeat_n(String::new(), header.len() - 2));
                } else {
                    let sums = self.summary.get(&mode);
                    for f in &figs {
                        let s = sums.and_then(|s| s.get(f.id));
                        row.push(s.map_or("no data".to_owned(), |s| with_range(&s.value)));
                        if !f.mesh_only {
                            row.push(match (mode, s.and_then(|s| s.ratio.as_ref())) {
                                (Mode::NoMesh, _) => "×1".to_owned(),
                                (_, Some(r)) => format!("×{}", with_range(r)),
                                (_, None) => "—".to_owned(),
                            });
                        }
                    }
                }
                let _ = writeln!(md, "| {} |", row.join(" | "));
            }
            let _ = writeln!(md);
        }

        let _ = writeln!(
            md,
            "## Memory of the data plane against the number of pods (MiB)\n\n\
             Every pod enrolled; daemons (ambient) or proxies (sidecar) summed; idle after one \
             request. The controller's memory is in `report.json` (`pods[].control_plane_rss_mib`).\n"
        );
        let mut header = vec!["mode".to_owned()];
        header.extend(self.plan.pod_counts.iter().map(|n| format!("{n} pods")));
        let _ = writeln!(md, "| {} |", header.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
        for mode in Mode::ALL {
            let mut row = vec![mode.title().to_owned()];
            if let Err(why) = mode.availability() {
                row.push(format!("not available yet: {why}"));
                row.extend(std::iter::repeat_n(String::new(), header.len() - 2));
            } else if !measured.contains(&mode) {
                row.push("not selected".to_owned());
                row.extend(std::iter::repeat_n(String::new(), header.len() - 2));
            } else {
                for n in &self.plan.pod_counts {
                    row.push(
                        self.pods_summary
                            .get(&mode)
                            .and_then(|p| p.get(n))
                            .map_or("no data".to_owned(), with_range),
                    );
                }
            }
            let _ = writeln!(md, "| {} |", row.join(" | "));
        }
        let _ = writeln!(md);

        let _ = writeln!(md, "## Where the mesh costs, against the baseline\n");
        let mut any = false;
        for mode in measured.iter().filter(|m| m.is_meshed()) {
            let Some(sums) = self.summary.get(mode) else {
                continue;
            };
            let mut worse = Vec::new();
            for f in FIGURES.iter().filter(|f| !f.mesh_only) {
                let Some(r) = sums.get(f.id).and_then(|s| s.ratio) else {
                    continue;
                };
                let x = r.median;
                if (x - 1.0).abs() < 0.01 {
                    continue;
                }
                // A range of per-round ratios that reaches ×1 means some round saw
                // no cost at all: within the noise, not a finding.
                let doubt = if r.min <= 1.0 && r.max >= 1.0 {
                    ", rounds range from ×".to_owned()
                        + &fmt(r.min)
                        + " to ×"
                        + &fmt(r.max)
                        + ": within noise"
                } else {
                    String::new()
                };
                if f.higher_is_better && x < 1.0 {
                    worse.push(format!(
                        "{} {}: ×{} ({:.0}% less{doubt})",
                        group_short(f.group),
                        f.label,
                        fmt(x),
                        (1.0 - x) * 100.0
                    ));
                } else if !f.higher_is_better && x > 1.0 {
                    worse.push(format!(
                        "{} {}: ×{} ({:.0}% more{doubt})",
                        group_short(f.group),
                        f.label,
                        fmt(x),
                        (x - 1.0) * 100.0
                    ));
                }
            }
            any = true;
            if worse.is_empty() {
                let _ = writeln!(
                    md,
                    "- **{}**: no figure worse than the baseline",
                    mode.title()
                );
            } else {
                let _ = writeln!(md, "- **{}**: {}", mode.title(), worse.join("; "));
            }
        }
        if !any {
            let _ = writeln!(md, "No meshed mode was measured.");
        }
        let _ = writeln!(md);

        let _ = writeln!(md, "## Noise\n");
        let _ = writeln!(
            md,
            "Spread over rounds, (max − min) / median, of the baseline's own figures: a \
             difference between modes smaller than this is not a finding.\n"
        );
        if let Some(base) = self.summary.get(&Mode::NoMesh) {
            let parts: Vec<String> = FIGURES
                .iter()
                .filter(|f| !f.mesh_only)
                .filter_map(|f| {
                    base.get(f.id).map(|s| {
                        format!(
                            "{} {} {:.0}%",
                            group_short(f.group),
                            f.label,
                            s.value.spread() * 100.0
                        )
                    })
                })
                .collect();
            let _ = writeln!(md, "{}\n", parts.join(" · "));
        } else {
            let _ = writeln!(md, "No baseline was measured.\n");
        }

        let failed_cells: Vec<String> = self
            .cells
            .iter()
            .filter_map(|c| {
                c.error
                    .as_ref()
                    .map(|e| format!("- round {} {}: {e}", c.round, c.mode.id()))
            })
            .chain(self.pods.iter().filter_map(|p| {
                p.error.as_ref().map(|e| {
                    format!(
                        "- round {} {} with {} pods: {e}",
                        p.round,
                        p.mode.id(),
                        p.pods
                    )
                })
            }))
            .collect();
        if !failed_cells.is_empty() {
            let _ = writeln!(
                md,
                "## Failures\n\nThese cells have no figures (the medians above are over the \
                 others):\n\n{}\n",
                failed_cells.join("\n")
            );
        }
        let notes: Vec<String> = self
            .cells
            .iter()
            .flat_map(|c| {
                c.notes
                    .iter()
                    .map(move |n| format!("- round {} {}: {n}", c.round, c.mode.id()))
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(md, "## Notes\n\n{}\n", notes.join("\n"));
        }
        let _ = writeln!(
            md,
            "## Charts\n\n![throughput](throughput.svg)\n\n![latency](latency.svg)\n\n\
             ![memory against pods](memory-pods.svg)\n\nEvery raw figure of every round, the \
             load generators' own output and the per-scenario path evidence are in \
             `report.json`."
        );
        md
    }

    fn series(&self, figs: &[&str]) -> Vec<Series> {
        self.measured()
            .into_iter()
            .map(|m| Series {
                name: m.title().to_owned(),
                color: color(m),
                values: figs
                    .iter()
                    .map(|f| {
                        self.summary
                            .get(&m)
                            .and_then(|s| s.get(*f))
                            .map(|s| s.value)
                    })
                    .collect(),
            })
            .collect()
    }

    /// (file name, SVG) of every chart.
    pub fn charts(&self) -> Vec<(&'static str, String)> {
        let absent = self.absent_titles();
        let p = &self.plan;
        let throughput = svg::bars(
            "Throughput by mode (client → server across nodes)",
            "Gbit/s",
            &["1 stream".into(), format!("{} streams", p.multi_streams)],
            &self.series(&["tput_1", "tput_4"]),
            &absent,
        );
        // TCP round trips are tens of microseconds, HTTP latencies milliseconds: two
        // panels with their own scales, stacked in one file.
        let tcp = svg::bars(
            &format!("TCP round trip, {} B, one connection", p.rr_size),
            "microseconds",
            &["p50".into(), "p90".into(), "p99".into()],
            &self.series(&["tcp_rr_p50", "tcp_rr_p90", "tcp_rr_p99"]),
            &absent,
        );
        let http = svg::bars(
            &format!(
                "HTTP {} B request/response at {} req/s, open loop",
                p.http_body, p.http_rate
            ),
            "milliseconds",
            &["p50".into(), "p90".into(), "p99".into()],
            &self.series(&["http_p50", "http_p90", "http_p99"]),
            &absent,
        );
        let latency = svg::stack(&[tcp, http]);
        let xs: Vec<f64> = p.pod_counts.iter().map(|n| *n as f64).collect();
        let mem_series: Vec<Series> = self
            .measured()
            .into_iter()
            .map(|m| Series {
                name: m.title().to_owned(),
                color: color(m),
                values: p
                    .pod_counts
                    .iter()
                    .map(|n| self.pods_summary.get(&m).and_then(|s| s.get(n)).copied())
                    .collect(),
            })
            .collect();
        let memory = svg::lines(
            "Data-plane memory against pods",
            "MiB (VmRSS)",
            "pods in the cluster (two nodes)",
            &xs,
            &mem_series,
            &absent,
        );
        vec![
            ("throughput.svg", throughput),
            ("latency.svg", latency),
            ("memory-pods.svg", memory),
        ]
    }
}

fn color(m: Mode) -> &'static str {
    let i = Mode::ALL.iter().position(|x| *x == m).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn group_short(g: Group) -> &'static str {
    match g {
        Group::Throughput => "throughput",
        Group::TcpRoundTrip => "TCP round trip",
        Group::HttpFixedRate => "HTTP fixed rate",
        Group::Rates => "max rate",
        Group::Cpu => "CPU per 1000 requests",
        Group::Memory => "memory",
    }
}

fn with_range(s: &Stat) -> String {
    if s.n > 1 {
        format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max))
    } else {
        fmt(s.median)
    }
}

/// Medians per mode and figure, with per-round ratios to the baseline.
fn summarize(cells: &[CellResult]) -> BTreeMap<Mode, BTreeMap<String, FigureSummary>> {
    let ok: Vec<&CellResult> = cells.iter().filter(|c| c.error.is_none()).collect();
    let mut out: BTreeMap<Mode, BTreeMap<String, FigureSummary>> = BTreeMap::new();
    for mode in Mode::ALL {
        let mine: Vec<&&CellResult> = ok.iter().filter(|c| c.mode == mode).collect();
        if mine.is_empty() {
            continue;
        }
        for f in FIGURES {
            let values: Vec<f64> = mine
                .iter()
                .filter_map(|c| c.figures.get(f.id).copied())
                .collect();
            let Some(value) = Stat::of(&values) else {
                continue;
            };
            let ratio = if mode == Mode::NoMesh || f.mesh_only {
                None
            } else {
                let ratios: Vec<f64> = mine
                    .iter()
                    .filter_map(|c| {
                        let base = ok
                            .iter()
                            .find(|b| b.mode == Mode::NoMesh && b.round == c.round)?
                            .figures
                            .get(f.id)
                            .copied()?;
                        let v = c.figures.get(f.id).copied()?;
                        (base > 0.0).then(|| v / base)
                    })
                    .collect();
                Stat::of(&ratios)
            };
            out.entry(mode)
                .or_default()
                .insert(f.id.to_owned(), FigureSummary { value, ratio });
        }
    }
    out
}

/// The date, machine, kernel and commit of this run.
pub fn meta(build: &str, measure_seconds: f64, seconds: f64, command: String) -> Meta {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Meta {
        date: utc_now(),
        machine: format!("{cpu}, {cores} CPUs, {mem_gib:.0} GiB"),
        kernel,
        git: git_describe(),
        build: build.to_owned(),
        measure_seconds,
        seconds,
        command,
    }
}

fn git_describe() -> String {
    let root = crate::workspace_root();
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(sha) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{sha} (with local changes)")
            } else {
                sha
            }
        }
        None => "unknown".to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM UTC` from the system clock.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(round: u32, mode: Mode, figs: &[(&str, f64)]) -> CellResult {
        CellResult {
            round,
            mode,
            cluster: String::new(),
            seconds: 1.0,
            error: None,
            figures: figs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            raw: BTreeMap::new(),
            evidence: Vec::new(),
            mesh_processes: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    #[test]
    fn ratios_are_per_round_and_failed_cells_are_left_out() {
        let mut failed = cell(3, Mode::AmbientL4, &[("tput_1", 100.0)]);
        failed.error = Some("boom".into());
        let cells = vec![
            cell(1, Mode::NoMesh, &[("tput_1", 10.0), ("rss_idle", 0.0)]),
            cell(1, Mode::AmbientL4, &[("tput_1", 5.0), ("rss_idle", 12.0)]),
            cell(2, Mode::NoMesh, &[("tput_1", 20.0)]),
            cell(2, Mode::AmbientL4, &[("tput_1", 5.0)]),
            cell(3, Mode::NoMesh, &[("tput_1", 10.0)]),
            failed,
        ];
        let s = summarize(&cells);
        let a = &s[&Mode::AmbientL4]["tput_1"];
        assert_eq!(a.value.median, 5.0);
        let r = a.ratio.unwrap();
        assert_eq!((r.median, r.min, r.max, r.n), (0.375, 0.25, 0.5, 2));
        assert!(s[&Mode::NoMesh]["tput_1"].ratio.is_none());
        assert!(
            s[&Mode::AmbientL4]["rss_idle"].ratio.is_none(),
            "mesh-only: no ratio"
        );
    }

    #[test]
    fn markdown_has_a_row_per_mode_and_says_what_is_missing() {
        let plan = Plan::new(super::super::plan::Profile::Smoke);
        let mut cells = Vec::new();
        for f in FIGURES {
            cells.push((f.id, 1.0));
        }
        let base = cell(1, Mode::NoMesh, &cells);
        let amb = cell(
            1,
            Mode::AmbientL4,
            &cells.iter().map(|(k, v)| (*k, v * 2.0)).collect::<Vec<_>>(),
        );
        let meta = meta("release", 10.0, 12.0, "cargo xtask bench --smoke".into());
        let report = Report::new(
            meta,
            plan,
            &[Mode::NoMesh, Mode::AmbientL4],
            vec![base, amb],
            Vec::new(),
        );
        let md = report.markdown();
        for m in Mode::ALL {
            assert!(
                md.contains(&format!("| {} |", m.title())),
                "{m:?} row missing:\n{md}"
            );
        }
        // Whichever modes are not available yet say so, with the reason.
        for m in Mode::ALL {
            if let Err(why) = m.availability() {
                assert!(
                    md.contains(&format!("| {} | not available yet: {why}", m.title())),
                    "{m:?}:\n{md}"
                );
            }
        }
        assert!(md.contains("| ×2.00 |"), "{md}");
        assert!(md.contains("TCP round trip p50: ×2.00 (100% more)"), "{md}");
        assert!(
            !md.contains("throughput 1 stream: ×"),
            "faster is not a cost:\n{md}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["cells"].as_array().unwrap().len(), 2);
        assert_eq!(report.charts().len(), 3);
    }
}
