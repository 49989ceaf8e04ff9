//! Starting processes inside a namespace and cgroup, and looking at processes through
//! `/proc`.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::Command,
};

use crate::Error;

/// Makes `cmd`'s child join the network namespace behind `netns` (a `/run/netns/…`
/// handle) and the cgroup directory `cgroup` before it executes, and optionally start
/// a new session (detached from the caller's terminal and its signals).
///
/// Both files are opened here, before the fork; the child only calls `setns(2)`,
/// `write(2)` and `setsid(2)`.
pub(crate) fn enter(
    cmd: &mut Command,
    netns: &Path,
    cgroup: &Path,
    new_session: bool,
) -> Result<(), Error> {
    let ns: OwnedFd = File::open(netns)
        .map_err(|source| Error::Io {
            op: "opening network namespace",
            path: netns.to_owned(),
            source,
        })?
        .into();
    let procs_path = cgroup.join("cgroup.procs");
    let procs: OwnedFd = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|source| Error::Io {
            op: "opening",
            path: procs_path,
            source,
        })?
        .into();
    // Both descriptors are close-on-exec (std opens files with O_CLOEXEC), so the
    // program never inherits them; the closure keeps them open until the Command is
    // dropped.
    #[expect(
        unsafe_code,
        reason = "pre_exec is how a child enters a namespace and cgroup before exec"
    )]
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls setns, write and setsid on descriptors that stay
    // open for the life of the Command; it allocates nothing and takes no locks
    // (`last_os_error` only reads errno).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Writing "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Fields of `/proc/<pid>/stat` after the command name, which may contain spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of a live (non-zombie) process, in clock ticks since boot.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // f[0] is field 3 (state); start time is field 22.
    if f.first().is_none_or(|s| s == "Z" || s == "X") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Parent process id.
pub(crate) fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether `pid` is alive (not a zombie) and, when given, in the cgroup `cgroup_rel`
/// (path relative to the cgroup2 root): guards against a recycled pid.
pub(crate) fn is_alive(pid: u32, cgroup_rel: Option<&str>) -> bool {
    if start_time(pid).is_none() {
        return false;
    }
    match cgroup_rel {
        None => true,
        Some(want) => std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.strip_prefix("0::") == Some(want))),
    }
}

/// TCP ports the process's network namespace listens on (IPv4 and IPv6), read from
/// `/proc/<pid>/net/tcp{,6}`, which show the namespace of that process.
pub(crate) fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) = (f.nth(1), f.next(), f.next()) else {
                continue;
            };
            if state != "0A" {
                continue; // not TCP_LISTEN
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// Sends SIGKILL; a process that is already gone is not an error.
pub(crate) fn kill(pid: i32) {
    use nix::{sys::signal, unistd::Pid};
    let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
}

/// Processes (other than this one) whose environment holds exactly `KEY=VALUE`.
pub(crate) fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    let me = std::process::id().to_string();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && *n != me)
        .filter(|n| {
            std::fs::read(format!("/proc/{n}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Values of `KEY` in the environments of all processes (other than this one).
pub(crate) fn env_values(key: &str) -> BTreeSet<String> {
    let prefix = format!("{key}=");
    let me = std::process::id().to_string();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    proc.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && *n != me)
        .filter_map(|n| std::fs::read(format!("/proc/{n}/environ")).ok())
        .flat_map(|env| {
            env.split(|&b| b == 0)
                .filter_map(|kv| kv.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The last `lines` lines of a log file (at most the last 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_with_start_time() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(is_alive(me, None));
        assert!(!is_alive(me, Some("/surely/not/this/cgroup")));
    }

    #[test]
    fn log_tail_takes_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("simcluster-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        std::fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&log, 2), "c\nd");
        assert!(log_tail(&dir.join("missing"), 2).contains("no log"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
