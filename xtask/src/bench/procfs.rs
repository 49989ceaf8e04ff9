//! What the benchmark reads from `/proc` and cgroup v2: CPU time and resident memory of
//! processes, CPU time of pod cgroups, and TCP listeners inside a process's network
//! namespace.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, bail};

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on every
/// mainstream Linux architecture, which is the fallback).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds a process has used, all its threads (live and exited)
/// together: fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks())
        .with_context(|| format!("parsing {path}: {stat:?}"))
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' after the command name")?;
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// Resident memory of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let kb: u64 = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kb * 1024)
}

/// The cgroup v2 of process `pid`, relative to the cgroup2 mount (the `0::` line of
/// `/proc/<pid>/cgroup`, without its leading `/`).
pub fn cgroup_of(pid: u32) -> anyhow::Result<PathBuf> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|rel| PathBuf::from(rel.trim().trim_start_matches('/')))
        .with_context(|| format!("{path} has no cgroup v2 line: {text:?}"))
}

/// CPU seconds used by everything in a cgroup v2 (`usage_usec` of `cpu.stat`, present
/// whether or not the cpu controller is enabled).
pub fn cgroup_cpu_seconds(cgroup: &Path) -> anyhow::Result<f64> {
    let path = cgroup.join("cpu.stat");
    let stat =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))?;
    Ok(usec as f64 / 1e6)
}

/// Local ports in the LISTEN state in the network namespace of process `pid` (IPv4,
/// from `/proc/<pid>/net/tcp`, which shows the process's namespace).
pub fn listening_ports(pid: u32) -> anyhow::Result<Vec<u16>> {
    let path = format!("/proc/{pid}/net/tcp");
    let table = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_listeners(&table).with_context(|| format!("parsing {path}"))
}

fn parse_listeners(table: &str) -> anyhow::Result<Vec<u16>> {
    const LISTEN: &str = "0A";
    let mut ports = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
            bail!("short line {line:?}");
        };
        if *state != LISTEN {
            continue;
        }
        let port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            .with_context(|| format!("bad local address {local:?}"))?;
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (ambit (node) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 9 0 100 123456 789";
        assert_eq!(parse_cpu_ticks(line).unwrap(), 175);
        assert!(parse_cpu_ticks("4242 (x) S 1").is_err());
        assert!(parse_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn rss_parses_in_kb() {
        let status = "Name:\tambit-node\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn listeners_are_read_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n   2: 0202F40A:1F90 0201F40A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
        assert_eq!(parse_listeners(table).unwrap(), vec![8080, 15001]);
        assert!(parse_listeners("header\n 0: x\n").is_err());
    }

    #[test]
    fn this_process_can_be_measured() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        let cgroup = cgroup_of(me).unwrap();
        assert!(cgroup.is_relative(), "{cgroup:?}");
    }
}
