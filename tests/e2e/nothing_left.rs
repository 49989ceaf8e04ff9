//! Shared by the e2e tests that tear clusters down: proof that nothing of a cluster
//! is left (namespaces, links, routes, cgroups, mounts, processes, state).

use std::{collections::BTreeSet, process::Command};

use ambit_simcluster::{ClusterName, Status};

/// Root-namespace links and routes, to show the cluster adds none.
pub fn host_network() -> (BTreeSet<String>, BTreeSet<String>) {
    let lines = |args: &[&str]| -> BTreeSet<String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let links = lines(&["-o", "link", "show"])
        .into_iter()
        .filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_owned()))
        .collect();
    (links, lines(&["route", "show", "table", "all"]))
}

/// Asserts nothing of the cluster `name` is left: namespaces, links, routes, cgroups,
/// mounts, processes, state.
pub fn assert_nothing_left(
    name: &ClusterName,
    before: &Status,
    host_before: &(BTreeSet<String>, BTreeSet<String>),
) {
    let prefix = name.netns_prefix();
    let in_run_netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        in_run_netns.is_empty(),
        "namespaces left in /run/netns: {in_run_netns:?}"
    );
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed.contains(&prefix),
        "ip netns list still shows {prefix}*:\n{listed}"
    );

    assert!(
        !before.cgroup_root.exists(),
        "cgroup {} left",
        before.cgroup_root.display()
    );
    let cgroup_name = name.cgroup_dir_name();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_else(|e| panic!("{e}"));
    let stale: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&prefix) || l.contains(&format!("/{cgroup_name}/")))
        .collect();
    assert!(stale.is_empty(), "mounts left: {stale:?}");
    assert!(
        !before.state_dir.exists(),
        "state dir {} left",
        before.state_dir.display()
    );

    // Processes: the recorded ones are gone, and none carries the cluster's mark or
    // names one of its namespaces.
    let recorded: Vec<u32> = before
        .pods
        .iter()
        .filter_map(|p| p.pid)
        .chain(before.processes.iter().map(|p| p.pid))
        .collect();
    assert!(!recorded.is_empty());
    for pid in recorded {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie_or_gone = state.is_empty()
            || state
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
        assert!(zombie_or_gone, "process {pid} is still running: {state}");
    }
    let marker = format!("AMBIT_CLUSTER={name}");
    for entry in std::fs::read_dir("/proc")
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
    {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        assert!(
            !environ.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()),
            "process {pid} still has {marker}"
        );
        let cmdline = String::from_utf8_lossy(
            &std::fs::read(entry.path().join("cmdline")).unwrap_or_default(),
        )
        .replace('\0', " ");
        assert!(
            !cmdline.contains(&prefix),
            "process {pid} names the cluster: {cmdline}"
        );
    }

    // Links and routes lived only inside the namespaces; the host's are unchanged.
    let (links, routes) = host_network();
    let ours = |l: &str| {
        l.starts_with("veth") || ["br0", "cni0", "eth0"].contains(&l) || l.contains(name.as_str())
    };
    let new_links: Vec<&String> = links
        .difference(&host_before.0)
        .filter(|l| ours(l))
        .collect();
    assert!(
        new_links.is_empty(),
        "links added to the root namespace: {new_links:?}"
    );
    let pod_prefixes: Vec<String> = before
        .nodes
        .iter()
        .map(|n| n.pod_cidr.to_string())
        .collect();
    let new_routes: Vec<&String> = routes
        .difference(&host_before.1)
        .filter(|r| {
            pod_prefixes.iter().any(|p| r.contains(p.as_str()))
                || r.contains(&before.underlay.cidr.to_string())
        })
        .collect();
    assert!(
        new_routes.is_empty(),
        "routes added to the root namespace: {new_routes:?}"
    );
}
