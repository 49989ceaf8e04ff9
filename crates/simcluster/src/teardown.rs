//! Tearing clusters down, from their state file and by name prefix, so that the
//! leftovers of a crashed run go as well.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    CLUSTER_ENV, Error, Options, cgroup,
    cluster::{DEFAULT_STATE_ROOT, load_state},
    names::{ClusterName, RESOURCE_PREFIX},
    netns, process,
    status::Status,
};

/// How long killed processes get to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a teardown removed.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TeardownReport {
    /// The cluster.
    pub name: String,
    /// Processes killed (cgroup members, namespace members, marked by environment).
    pub processes_killed: usize,
    /// Network namespaces removed.
    pub netns_removed: Vec<String>,
    /// The cgroup tree removed, if there was one.
    pub cgroup_removed: Option<PathBuf>,
    /// The state directory removed, if there was one.
    pub state_dir_removed: Option<PathBuf>,
}

impl TeardownReport {
    /// Whether nothing of the cluster was found.
    pub fn found_nothing(&self) -> bool {
        self.processes_killed == 0
            && self.netns_removed.is_empty()
            && self.cgroup_removed.is_none()
            && self.state_dir_removed.is_none()
    }
}

/// Tears down the cluster `opts.name`: from its state file if it is readable, and in
/// any case everything found by name (network namespaces `ambit-<name>.*`, the cgroup
/// `ambit-<name>`, processes carrying `AMBIT_CLUSTER=<name>`). Finding nothing is
/// not an error.
pub fn down(opts: &Options) -> Result<TeardownReport, Error> {
    let known = match load_state(&opts.state_dir(), &opts.name) {
        Ok(s) => Some(s),
        Err(Error::NotFound { .. }) => None,
        Err(e) => {
            tracing::warn!(cluster = %opts.name, error = %crate::error_chain(&e), "ignoring unreadable state; removing by name");
            None
        }
    };
    let mount = opts.find_cgroup_mount().ok();
    teardown(
        &opts.name,
        &opts.state_dir(),
        mount.as_deref(),
        known.as_ref(),
        &mut Vec::new(),
    )
}

/// Tears down every Ambit cluster under the default state root, including leftovers
/// of crashed runs.
pub fn down_all() -> Result<Vec<TeardownReport>, Error> {
    down_all_in(Path::new(DEFAULT_STATE_ROOT))
}

/// [`down_all`] for another state root.
pub fn down_all_in(state_root: &Path) -> Result<Vec<TeardownReport>, Error> {
    down_matching(state_root, |_, _| true)
}

/// Tears down test clusters (named [`crate::TEST_NAME_PREFIX`]…) whose owning process
/// is gone: the leftovers of killed test runs. The owner is the one in the state file
/// or, when that is unreadable, the pid in a [`ClusterName::unique_for_test`] name.
/// Clusters of running tests and clusters with other names are never touched.
pub fn down_stale_test_clusters() -> Result<Vec<TeardownReport>, Error> {
    down_matching(Path::new(DEFAULT_STATE_ROOT), |name, state| {
        let owner_alive = match state {
            Some(s) => s.owner.is_some_and(|o| o.is_alive()),
            None => name
                .test_pid()
                .is_some_and(|pid| process::start_time(pid).is_some()),
        };
        name.is_test() && !owner_alive
    })
}

/// Names of all clusters found under `state_root` or by their kernel objects.
pub fn list_clusters(state_root: &Path) -> Result<Vec<ClusterName>, Error> {
    let mount = cgroup::cgroup2_mount().ok();
    Ok(discover(state_root, mount.as_deref())?
        .into_iter()
        .collect())
}

fn down_matching(
    state_root: &Path,
    pick: impl Fn(&ClusterName, Option<&Status>) -> bool,
) -> Result<Vec<TeardownReport>, Error> {
    let mount = cgroup::cgroup2_mount().ok();
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    for name in discover(state_root, mount.as_deref())? {
        let state_dir = state_root.join(name.as_str());
        let known = load_state(&state_dir, &name).ok();
        if !pick(&name, known.as_ref()) {
            continue;
        }
        match teardown(
            &name,
            &state_dir,
            mount.as_deref(),
            known.as_ref(),
            &mut Vec::new(),
        ) {
            Ok(r) => reports.push(r),
            Err(e) => problems.push(e),
        }
    }
    remove_abandoned_claims(state_root);
    if problems.is_empty() {
        Ok(reports)
    } else {
        Err(Error::Teardown {
            name: "(several)".to_owned(),
            problems,
        })
    }
}

/// Cluster names from state directories, network namespaces, cgroup roots (those
/// with a `control` child, which `up` creates first and `down` removes last) and
/// process environments.
fn discover(
    state_root: &Path,
    cgroup_mount: Option<&Path>,
) -> Result<BTreeSet<ClusterName>, Error> {
    let mut names = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(state_root) {
        names.extend(
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| ClusterName::new(&e.file_name().to_string_lossy()).ok()),
        );
    }
    names.extend(
        netns::list()?
            .iter()
            .filter_map(|n| ClusterName::from_netns(n)),
    );
    if let Some(mount) = cgroup_mount
        && let Ok(rd) = std::fs::read_dir(mount)
    {
        names.extend(
            rd.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name().to_string_lossy().starts_with(RESOURCE_PREFIX)
                        && e.path().join("control").is_dir()
                })
                .filter_map(|e| ClusterName::from_cgroup_dir(&e.file_name().to_string_lossy())),
        );
    }
    names.extend(
        process::env_values(CLUSTER_ENV)
            .iter()
            .filter_map(|v| ClusterName::new(v).ok()),
    );
    Ok(names)
}

/// Mount points at or below `dir` in this mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && let Ok(text) = std::str::from_utf8(oct)
            && let Ok(b) = u8::from_str_radix(text, 8)
        {
            out.push(b);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Removes `.claim.<pid>.…` directories left by an `up` that died before renaming
/// its state directory into place.
fn remove_abandoned_claims(state_root: &Path) {
    let Ok(rd) = std::fs::read_dir(state_root) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".claim.")
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if process::start_time(pid).is_none() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes everything of the cluster `name`: kill its processes (cgroup, namespace
/// members, environment marker), reap this process's own children among them,
/// delete its namespaces (their links and routes go with them), remove its cgroup
/// tree, then its state directory (last, so a crash midway leaves it discoverable).
pub(crate) fn teardown(
    name: &ClusterName,
    state_dir: &Path,
    cgroup_mount: Option<&Path>,
    known: Option<&Status>,
    children: &mut Vec<Child>,
) -> Result<TeardownReport, Error> {
    let mut report = TeardownReport {
        name: name.to_string(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    let cgroup_root = match (known, cgroup_mount) {
        (Some(s), _) => Some(s.cgroup_root.clone()),
        (None, Some(m)) => Some(m.join(name.cgroup_dir_name())),
        (None, None) => {
            problems.push(Error::NoCgroup2);
            None
        }
    };

    // 0. CNI DEL for the pods handed to the plugin, while their daemons still run.
    if let Some(s) = known {
        crate::cni::del_all(s);
    }

    // 1. Processes in the cgroup tree.
    let mut killed: BTreeSet<i32> = BTreeSet::new();
    if let Some(root) = cgroup_root.as_deref().filter(|r| r.exists()) {
        killed.extend(cgroup::pids_in_tree(root));
        if let Err(e) = cgroup::kill_all(root, KILL_TIMEOUT) {
            problems.push(e);
        }
    }

    // 2. Processes in the namespaces or marked by environment, whatever their cgroup.
    let prefix = name.netns_prefix();
    let mut namespaces: Vec<String> = Vec::new();
    if let Some(s) = known {
        namespaces.extend(s.netns_names());
    }
    match netns::list() {
        Ok(all) => namespaces.extend(all.into_iter().filter(|n| n.starts_with(&prefix))),
        Err(e) => problems.push(e),
    }
    let mut seen = BTreeSet::new();
    namespaces.retain(|n| seen.insert(n.clone()));
    let mut stragglers = BTreeSet::new();
    for ns in &namespaces {
        match netns::pids(ns) {
            Ok(p) => stragglers.extend(p),
            Err(e) => problems.push(e),
        }
    }
    stragglers.extend(process::pids_with_env(CLUSTER_ENV, name.as_str()));
    stragglers.remove(&std::process::id().cast_signed());
    for &pid in &stragglers {
        process::kill(pid);
    }
    killed.extend(stragglers.iter().copied());
    report.processes_killed = killed.len();

    // 3. Reap our own children so none lingers as a zombie; wait for the others.
    for mut c in children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let me = std::process::id();
    let deadline = Instant::now() + KILL_TIMEOUT;
    for &pid in &stragglers {
        let upid = pid.cast_unsigned();
        loop {
            if process::parent(upid) == Some(me) {
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
            if process::start_time(upid).is_none() {
                break;
            }
            if Instant::now() >= deadline {
                problems.push(Error::ProcessSurvived { pid: upid });
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // 4. Namespaces, pods first, the underlay last (the reverse of creation).
    for ns in namespaces.iter().rev() {
        if !netns::path(ns).exists() {
            continue;
        }
        match netns::delete(ns) {
            Ok(()) => report.netns_removed.push(ns.clone()),
            Err(e) => problems.push(e),
        }
    }

    // 5. The cgroup tree.
    if let Some(root) = cgroup_root.filter(|r| r.exists()) {
        // Reap zombies among our children that were cgroup members.
        for &pid in &killed {
            if process::parent(pid.cast_unsigned()) == Some(me) {
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
        match cgroup::remove_tree(&root, KILL_TIMEOUT) {
            Ok(()) => report.cgroup_removed = Some(root),
            Err(e) => problems.push(e),
        }
    }

    // 6. File systems mounted under the state directory (the node daemons' bpffs,
    //    holding their pinned programs and maps), deepest first, then the directory,
    //    only once the rest is gone.
    for mount in mounts_under(state_dir) {
        if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            problems.push(Error::Io {
                op: "unmounting",
                path: mount,
                source: e.into(),
            });
        }
    }
    if problems.is_empty() && state_dir.exists() {
        match std::fs::remove_dir_all(state_dir) {
            Ok(()) => report.state_dir_removed = Some(state_dir.to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => problems.push(Error::Io {
                op: "removing",
                path: state_dir.to_owned(),
                source,
            }),
        }
    }

    if problems.is_empty() {
        tracing::info!(cluster = %name, ?report, "cluster torn down");
        Ok(report)
    } else {
        Err(Error::Teardown {
            name: name.to_string(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/run/a\040b/bpf"),
            PathBuf::from("/run/a b/bpf")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path(r"/odd\0"), PathBuf::from(r"/odd\0"));
    }
}
