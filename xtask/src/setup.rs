//! `cargo xtask setup`: install what this machine lacks for building and testing Ambit,
//! idempotently, and check the kernel prerequisites.
//!
//! Every step prints one line (`✓` present, `→` installing, `✗` missing, `!` worth
//! knowing) and skips what is already there, so a second run takes seconds. Nothing is
//! mounted and no system setting is changed.

use std::{
    fs,
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

/// Version pinned because bpf-linker 0.13 needs LLVM 23 (see NOTES-kernel.md); 0.10.4
/// uses the Rust toolchain's own LLVM.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages the tests and the demo use, each with a command it provides (the
/// fallback check on machines without dpkg).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"), // ip, bridge, ss: the simulated cluster's netns, veths, bridge
    ("iputils-ping", "ping"),
    ("procps", "ps"),       // ps, sysctl, pkill
    ("psmisc", "killall"),  // killall, fuser
    ("tcpdump", "tcpdump"), // the demo shows packets on the underlay
];

/// Oldest kernel the project is tested on (README).
const MIN_KERNEL: (u32, u32) = (6, 6);

/// What `cargo xtask setup` installs, and how to do it by hand.
const MANUAL: &str = "\
What it installs, when missing (and the command to run by hand):
  rust-src for the nightly toolchain   rustup toolchain install nightly --profile minimal --component rust-src
                                       (or, with nightly present: rustup component add rust-src --toolchain nightly)
  bpf-linker 0.10.4 (~2 minutes)       cargo install bpf-linker@0.10.4 --locked
  Debian packages                      apt-get update && apt-get install -y --no-install-recommends \\
                                         iproute2 iputils-ping procps psmisc tcpdump

What it checks, without changing anything: running as root, Linux >= 6.6 with the bpf(2)
syscall and BTF (/sys/kernel/btf/vmlinux), a cgroup v2 mount (/sys/fs/cgroup/unified on
hybrid hosts, /sys/fs/cgroup otherwise), /sys/fs/bpf (bpffs is not mounted by set-up).";

/// Options of `cargo xtask setup`.
#[derive(Debug, Default, clap::Args)]
#[command(after_long_help = MANUAL)]
pub struct SetupArgs {
    /// Only report what is present and what is missing; install nothing. Exits non-zero
    /// when something is missing.
    #[arg(long)]
    pub check: bool,
}

/// Something missing that `--check` (or a non-root run) found, with its fix.
#[derive(Debug)]
struct Missing {
    what: String,
    fix: String,
}

/// Installs what is missing (or, with `--check`, only reports it), then checks the
/// kernel prerequisites. Fails naming each missing piece and the command that adds it.
pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    let install = !args.check;
    let mut missing = Vec::new();
    let root = is_root();

    missing.extend(rust_src(install)?);
    missing.extend(bpf_linker(install)?);
    missing.extend(debian_packages(install, root)?);
    missing.extend(kernel(root));

    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|m| format!("  {}: {}", m.what, m.fix))
        .collect();
    bail!("set-up is incomplete:\n{}", list.join("\n"))
}

/// The nightly toolchain's `rust-src`, which `-Z build-std=core` builds the eBPF
/// programs from.
fn rust_src(install: bool) -> anyhow::Result<Option<Missing>> {
    const WHAT: &str = "rust-src (nightly)";
    let installed = run_captured(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    let (toolchain_present, rust_src_present) = match &installed {
        Ok(out) if out.status.success() => (
            true,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src")),
        ),
        // rustup exits non-zero for a toolchain that is not installed.
        Ok(_) => (false, false),
        Err(e) => bail!("{e:#}; install rustup first (https://rustup.rs)"),
    };
    if rust_src_present {
        done(&format!("{WHAT} present"));
        return Ok(None);
    }
    let args: &[&str] = if toolchain_present {
        &["component", "add", "rust-src", "--toolchain", "nightly"]
    } else {
        &[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]
    };
    let fix = format!("rustup {}", args.join(" "));
    if !install {
        return Ok(Some(absent(WHAT, fix)));
    }
    doing(if toolchain_present {
        "installing rust-src for the nightly toolchain (under a minute)"
    } else {
        "installing the nightly toolchain with rust-src (a minute or two)"
    });
    run_checked(Command::new("rustup").args(args), WHAT, &fix)?;
    done(&format!("{WHAT} installed"));
    Ok(None)
}

/// `bpf-linker`, the linker of the `bpfel-unknown-none` target.
fn bpf_linker(install: bool) -> anyhow::Result<Option<Missing>> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    let version = bpf_linker_version();
    if version.as_deref() == Some(BPF_LINKER_VERSION) {
        done(&format!("{what} present"));
        return Ok(None);
    }
    let fix = format!("cargo install bpf-linker@{BPF_LINKER_VERSION} --locked");
    if !install {
        let what = match version {
            Some(other) => format!("{what} (found {other})"),
            None => what,
        };
        return Ok(Some(absent(&what, fix)));
    }
    doing(&format!("installing {what} (about 2 minutes)"));
    // The cargo that runs xtask; `cargo install` replaces another installed version.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_checked(
        Command::new(cargo).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]),
        &what,
        &fix,
    )?;
    if bpf_linker_version().as_deref() != Some(BPF_LINKER_VERSION) {
        bail!(
            "cargo installed {what}, but the bpf-linker on PATH is not it: put cargo's bin \
             directory ($CARGO_HOME/bin, usually ~/.cargo/bin) first on PATH"
        );
    }
    done(&format!("{what} installed"));
    Ok(None)
}

/// The version the `bpf-linker` on `PATH` reports (`bpf-linker 0.10.4`), if any.
fn bpf_linker_version() -> Option<String> {
    let out = run_captured(Command::new("bpf-linker").arg("--version")).ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

/// The Debian packages of [`DEBIAN_PACKAGES`], installed with one `apt-get` run.
fn debian_packages(install: bool, root: bool) -> anyhow::Result<Vec<Missing>> {
    let absent_pkgs: Vec<&str> = if which("dpkg-query") {
        DEBIAN_PACKAGES
            .iter()
            .map(|(pkg, _)| *pkg)
            .filter(|pkg| !dpkg_installed(pkg))
            .collect()
    } else {
        // Not Debian: check for the commands instead and let the user map them.
        let absent: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .filter(|(_, cmd)| !which(cmd))
            .map(|(_, cmd)| *cmd)
            .collect();
        if absent.is_empty() {
            done("system tools present (ip, ping, ps, killall, tcpdump)");
            return Ok(Vec::new());
        }
        let what = format!("commands {}", absent.join(", "));
        absent_line(&what);
        return Ok(vec![Missing {
            what,
            fix: "install them with this system's package manager (no dpkg here)".to_owned(),
        }]);
    };
    if absent_pkgs.is_empty() {
        let names: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(pkg, _)| *pkg).collect();
        done(&format!("Debian packages present ({})", names.join(", ")));
        return Ok(Vec::new());
    }
    let list = absent_pkgs.join(" ");
    let what = format!("Debian packages {list}");
    let fix = format!("apt-get update && apt-get install -y --no-install-recommends {list}");
    if !install || !root {
        let fix = if root { fix } else { format!("as root: {fix}") };
        return Ok(vec![absent(&what, fix)]);
    }
    doing(&format!("installing {what} (apt-get, under a minute)"));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_checked(&mut apt(&["update"]), "apt-get update", &fix)?;
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(&absent_pkgs);
    run_checked(&mut apt(&install_args), &what, &fix)?;
    let still: Vec<&str> = absent_pkgs
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get reported success but {} is still not installed; run by hand: {fix}",
            still.join(", ")
        );
    }
    done(&format!("{what} installed"));
    Ok(Vec::new())
}

/// Kernel and privilege prerequisites: reported, never changed.
fn kernel(root: bool) -> Vec<Missing> {
    let mut missing = Vec::new();
    let mut require = |ok: bool, good: String, what: &str, fix: &str| {
        if ok {
            done(&good);
        } else {
            missing.push(absent(what, fix.to_owned()));
        }
    };

    require(
        root,
        "running as root".to_owned(),
        "root privileges",
        "run as root (the tests load eBPF programs and create network namespaces and cgroups)",
    );

    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    require(
        kernel_version(release).is_some_and(|v| v >= MIN_KERNEL),
        format!("Linux {release}"),
        &format!(
            "Linux >= {}.{} (this is {release:?})",
            MIN_KERNEL.0, MIN_KERNEL.1
        ),
        "use a newer kernel",
    );

    // The sysctl exists exactly when the kernel has the bpf(2) syscall.
    require(
        Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        "bpf(2) syscall available".to_owned(),
        "the bpf(2) syscall",
        "use a kernel built with CONFIG_BPF_SYSCALL=y",
    );

    require(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "kernel BTF present (/sys/kernel/btf/vmlinux)".to_owned(),
        "kernel BTF (/sys/kernel/btf/vmlinux)",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    );

    let cgroup2 = mounts_of_type("cgroup2");
    require(
        !cgroup2.is_empty(),
        format!("cgroup v2 mounted at {}", cgroup2.join(", ")),
        "a cgroup v2 mount",
        "mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid layout) or boot with cgroup v2",
    );

    // Not required today: nothing is pinned yet, and bpffs is mounted where needed,
    // never by set-up.
    let bpffs = mounts_of_type("bpf");
    if !bpffs.is_empty() {
        done(&format!("bpffs mounted at {}", bpffs.join(", ")));
    } else if Path::new("/sys/fs/bpf").is_dir() {
        done("/sys/fs/bpf present (bpffs not mounted; set-up mounts nothing)");
    } else {
        note("/sys/fs/bpf missing: pinning eBPF links and maps will need a bpffs mount point");
    }
    missing
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc-v669`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Mount points of every filesystem of type `fstype`, from `/proc/mounts`.
fn mounts_of_type(fstype: &str) -> Vec<String> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
            (ty == fstype).then(|| dir.replace("\\040", " "))
        })
        .collect()
}

/// Effective uid 0, read from `/proc/self/status` (xtask has no libc dependency).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn dpkg_installed(pkg: &str) -> bool {
    run_captured(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg])).is_ok_and(|out| {
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
    })
}

/// Whether `program` is an executable file on `PATH`.
fn which(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            dir.join(program)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Runs `cmd` with its output captured.
fn run_captured(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {}", cmd.get_program().to_string_lossy()))
}

/// Runs an installation command quietly; on failure shows the end of its output and
/// the command to run by hand.
fn run_checked(cmd: &mut Command, what: &str, fix: &str) -> anyhow::Result<()> {
    let out = run_captured(cmd)
        .with_context(|| format!("installing {what} failed; run by hand: {fix}"))?;
    if out.status.success() {
        return Ok(());
    }
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    bail!(
        "installing {what} failed ({}):\n{tail}\nrun by hand: {fix}",
        out.status
    )
}

fn absent(what: &str, fix: String) -> Missing {
    absent_line(what);
    Missing {
        what: what.to_owned(),
        fix,
    }
}

fn done(msg: &str) {
    eprintln!("✓ {msg}");
}

fn doing(msg: &str) {
    eprintln!("→ {msg}");
}

fn absent_line(what: &str) {
    eprintln!("✗ {what} missing");
}

fn note(msg: &str) {
    eprintln!("! {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("6.6.0"), Some((6, 6)));
        assert_eq!(kernel_version("5.15-rc1"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("6.1.0").is_some_and(|v| v < MIN_KERNEL));
    }

    #[test]
    fn manual_names_every_package() {
        for (pkg, _) in DEBIAN_PACKAGES {
            assert!(MANUAL.contains(pkg), "MANUAL does not mention {pkg}");
        }
        assert!(MANUAL.contains(&format!("bpf-linker@{BPF_LINKER_VERSION}")));
    }
}
