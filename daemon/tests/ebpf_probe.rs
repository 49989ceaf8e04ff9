//! The connect4 probe in the running kernel: it counts the TCP connects of processes
//! in its cgroup, exactly, and nobody else's.
//!
//! Needs root (loading eBPF, creating cgroups) and cgroup v2; fails, never skips,
//! without them.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ambit_node::ebpf::ConnectProbe;
use ambit_test_support::{eventually, unique_id};
use anyhow::{Context as _, ensure};

/// Where cgroup v2 is mounted on the hybrid-layout machines these tests run on; a
/// pure-v2 host mounts it at /sys/fs/cgroup.
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// Connects made from inside the cgroup.
const CONNECTS_IN_CGROUP: u64 = 3;

#[test]
fn connect4_probe_counts_connects_from_its_cgroup_only() -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "this test loads eBPF programs and creates cgroups: run it as root (e.g. `sudo -E \
         cargo test -p ambit-node --test ebpf_probe`)"
    );
    // Declared first so that it is dropped last, after the probe has been detached.
    let cgroup = TestCgroup::create()?;
    let probe = ConnectProbe::load_and_attach(cgroup.path())
        .context("loading and attaching the connect4 probe")?;

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);

    let script = format!(
        "for i in $(seq {CONNECTS_IN_CGROUP}); do exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; \
         exec 3>&-; done"
    );
    let status = run_in_cgroup(Command::new("bash").args(["-c", &script]), &cgroup)?;
    ensure!(status.success(), "the connecting child failed: {status}");

    // Not in the cgroup: must not be counted.
    drop(TcpStream::connect(dst).context("connecting from the test process")?);

    // connect4 programs run inside connect(2), so once the child has been waited for
    // every count is in the map: no polling needed.
    let counts = probe.counts().context("reading the probe's counts")?;
    assert_eq!(
        counts,
        [(dst, CONNECTS_IN_CGROUP)].into(),
        "expected exactly the child's {CONNECTS_IN_CGROUP} connects to {dst} and nothing else"
    );

    probe.detach().context("detaching the probe")?;
    Ok(())
}

/// Spawns `cmd` inside `cgroup` (before it executes anything) and waits for it.
fn run_in_cgroup(
    cmd: &mut Command,
    cgroup: &TestCgroup,
) -> anyhow::Result<std::process::ExitStatus> {
    let procs = cgroup.procs_file()?;
    in_cgroup_before_exec(cmd, procs);
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {cmd:?} in {}", cgroup.path().display()))?;
    child.wait().context("waiting for the child")
}

/// Makes the child write its own pid ("0") to `procs` (an open `cgroup.procs`)
/// between fork and exec.
#[expect(unsafe_code, reason = "pre_exec runs code in the forked child")]
fn in_cgroup_before_exec(cmd: &mut Command, procs: File) {
    // SAFETY: the closure only calls write(2) on an already-open descriptor (no
    // allocation, no locks), which is async-signal-safe as required after fork.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0"));
    }
}

fn is_root() -> bool {
    // `/proc/self/status` avoids a libc dependency for one getuid().
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// A cgroup v2 created for one test and removed when dropped, even on failure.
#[derive(Debug)]
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn create() -> anyhow::Result<Self> {
        let root = CGROUP2_MOUNTS
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").is_file() && p.join("cgroup.controllers").is_file())
            .with_context(|| format!("no cgroup v2 mount at any of {CGROUP2_MOUNTS:?}"))?;
        let path = root.join(format!("ambit-test-ebpf-{}", unique_id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn procs_file(&self) -> anyhow::Result<File> {
        let procs = self.path.join("cgroup.procs");
        File::options()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The children have been waited for; the kernel may still be releasing them for
        // a moment, during which rmdir says EBUSY.
        let removed = eventually(
            "removing the test cgroup",
            Duration::from_secs(5),
            Duration::from_millis(20),
            || match fs::remove_dir(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
        );
        if let Err(e) = removed {
            eprintln!("leaked cgroup {}: {e:#}", self.path.display());
        }
    }
}
