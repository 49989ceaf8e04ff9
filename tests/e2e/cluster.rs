//! The simulated cluster itself: pods reach each other by pod IP within and across
//! nodes, processes land in the right namespace and cgroup, and teardown — explicit,
//! on a panic, or of a crashed run found by name — leaves nothing behind.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use ambit_simcluster::{Cluster, Deleted, Error, Options, Status, Topology};
use nothing_left::{assert_nothing_left, host_network};

mod nothing_left;

/// Options for a fresh, uniquely named test cluster using the workspace binaries.
fn test_options() -> Options {
    ambit_test_support::bin_path("ambit-echo").expect("ambit-echo is built");
    Options::for_test(ambit_test_support::bin_dir().unwrap())
}

/// Two nodes, one echo pod on each: quicker than the shop where the shop is not the
/// point.
fn two_pods() -> Topology {
    Topology::from_yaml(
        r#"
nodes: [{ name: node-a }, { name: node-b }]
namespaces:
  - name: shop
    workloads:
      - { name: web, labels: { app: web, version: v7 }, nodes: [node-a, node-b] }
"#,
    )
    .unwrap()
}

/// `ambit-echo call URL` from inside `from`; the JSON answer.
fn call(cluster: &Cluster, from: &str, url: &str) -> serde_json::Value {
    let out = cluster
        .exec(from, &["ambit-echo", "call", "--timeout", "5s", url])
        .unwrap();
    assert!(
        out.status.success(),
        "call {url} from {from} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "answer of {url} is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn peer_ip(answer: &serde_json::Value) -> Ipv4Addr {
    let peer = answer["peer"]
        .as_str()
        .unwrap_or_else(|| panic!("no peer in {answer}"));
    peer.rsplit_once(':').unwrap().0.parse().unwrap()
}

#[test]
fn shop_pods_reach_each_other_by_pod_ip_and_down_leaves_nothing() {
    let host_before = host_network();
    let cluster = Cluster::up(test_options(), &Topology::default_shop()).unwrap();
    let name = cluster.name().clone();
    let checkout = cluster.pod("production/checkout-0").unwrap();
    assert_eq!(checkout.node, "node-1");

    // Across nodes and on the same node, by pod IP.
    for (target, node) in [
        ("production/payment-v1-1", "node-2"),
        ("production/payment-v1-0", "node-1"),
    ] {
        let pod = cluster.pod(target).unwrap();
        assert_eq!(pod.node, node);
        let answer = call(
            &cluster,
            "production/checkout-0",
            &format!("http://{}:8080/", pod.ip),
        );
        assert_eq!(answer["pod"], pod.name.as_str(), "{answer}");
        assert_eq!(answer["namespace"], "production", "{answer}");
        assert_eq!(answer["version"], "v1", "{answer}");
        assert_eq!(
            peer_ip(&answer),
            checkout.ip,
            "the server sees checkout's pod IP: {answer}"
        );
    }
    let v2 = cluster.pod("production/payment-v2-0").unwrap();
    let answer = call(
        &cluster,
        "legacy/legacy-client-0",
        &format!("http://{}:8080/", v2.ip),
    );
    assert_eq!(answer["version"], "v2", "{answer}");

    // What status reports.
    let status = cluster.status();
    assert_eq!(status.pods.len(), 6);
    assert!(status.pods.iter().all(|p| p.running), "{:?}", status.pods);
    let payment = cluster.service("production/payment").unwrap();
    assert_eq!(payment.cluster_ip, Ipv4Addr::new(10, 96, 0, 11));
    assert_eq!(payment.endpoints.len(), 3);
    for pod in &status.pods {
        let cgroup = std::fs::read_to_string(pod.cgroup.join("cgroup.procs")).unwrap();
        assert!(
            cgroup.lines().any(|l| l == pod.pid.unwrap().to_string()),
            "{} not in {}",
            pod.name,
            pod.cgroup.display()
        );
        assert!(
            pod.cgroup
                .starts_with(&status.node(&pod.node).unwrap().pods_cgroup)
        );
    }

    // exec: the pod's netns and cgroup, exit codes passed through.
    let out = cluster
        .exec(
            "production/checkout-0",
            &[
                "sh",
                "-c",
                "cat /proc/self/cgroup; ip -o -4 addr show eth0; exit 3",
            ],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "0::/{}/node-1/pods/production_checkout-0",
            name.cgroup_dir_name()
        )),
        "{text}"
    );
    assert!(text.contains(&format!("{}/24", checkout.ip)), "{text}");

    // System processes: a node daemon stand-in and a controller stand-in that a pod reaches.
    let daemon = cluster
        .spawn_in_node(
            "node-2",
            "daemon",
            Command::new("sleep").tap_arg("infinity"),
        )
        .unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", daemon.pid)).unwrap();
    assert!(
        cgroup.contains(&format!("/{}/node-2/system/daemon", name.cgroup_dir_name())),
        "{cgroup}"
    );
    assert!(daemon.is_running());
    let mut controller = Command::new(cluster.binary("ambit-echo").unwrap());
    controller.args([
        "serve",
        "--pod",
        "controller",
        "--http-addr",
        "0.0.0.0:8080",
        "--tcp-addr",
        "0.0.0.0:9090",
    ]);
    let controller = cluster.spawn_control("controller", controller).unwrap();
    controller
        .wait_listening(&[8080], Duration::from_secs(20))
        .unwrap();
    let answer = call(
        &cluster,
        "production/inventory-0",
        &format!("http://{}:8080/", cluster.control().ip),
    );
    assert_eq!(answer["pod"], "controller", "{answer}");
    assert!(matches!(
        cluster.spawn_control("controller", Command::new("true")),
        Err(Error::ProcessRunning { .. })
    ));

    // The config directory: generated objects, and apply/delete of policy.
    let generated =
        std::fs::read_to_string(cluster.config_dir().join(ambit_simcluster::CLUSTER_FILE)).unwrap();
    assert!(generated.contains("podIP: 10.244.2.2"), "{generated}");
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: production}\nspec: {}\n";
    let applied = cluster.apply_yaml(policy).unwrap();
    let file = cluster.config_dir().join(applied[0].file_name());
    assert!(file.exists());
    assert_eq!(cluster.delete_yaml(policy).unwrap()[0].1, Deleted::Deleted);
    assert!(!file.exists());

    let before = cluster.status();
    let report = cluster.down().unwrap();
    assert_eq!(
        report.netns_removed.len(),
        before.netns_names().len(),
        "{report:?}"
    );
    assert_nothing_left(&name, &before, &host_before);
}

#[test]
fn down_removes_the_leftovers_of_a_crashed_run() {
    let host_before = host_network();
    let opts = test_options();
    let cluster = Cluster::up(opts.clone(), &two_pods()).unwrap();
    cluster
        .spawn_in_node(
            "node-a",
            "daemon",
            Command::new("sleep").tap_arg("infinity"),
        )
        .unwrap();
    // A stray process in a pod netns outside every cgroup of the cluster.
    let pod = cluster.pod("shop/web-1").unwrap();
    let stray = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "sleep", "infinity"])
        .spawn()
        .unwrap();
    let before = cluster.status();
    // The crash: the handle is lost without teardown, the state file is garbage.
    std::mem::forget(cluster);
    std::fs::write(before.state_file(), "{ not json").unwrap();
    assert!(matches!(
        Cluster::attach(opts.clone()),
        Err(Error::CorruptState { .. })
    ));

    let report = ambit_simcluster::down(&opts).unwrap();
    assert_eq!(
        report.netns_removed.len(),
        before.netns_names().len(),
        "{report:?}"
    );
    assert!(report.processes_killed >= 4, "{report:?}");
    let mut stray = stray;
    let _ = stray.wait();
    assert_nothing_left(&opts.name, &before, &host_before);
    // Nothing left means nothing to do the second time.
    assert!(ambit_simcluster::down(&opts).unwrap().found_nothing());
}

#[test]
fn a_panicking_test_still_tears_its_cluster_down_and_names_are_exclusive() {
    let host_before = host_network();
    let opts = test_options();
    let status = std::panic::catch_unwind(|| {
        let cluster = Cluster::up(opts.clone(), &two_pods()).unwrap();
        let answer = call(
            &cluster,
            "shop/web-0",
            &format!("http://{}:8080/", cluster.pod("shop/web-1").unwrap().ip),
        );
        assert_eq!(answer["version"], "v7");
        // A second cluster of the same name is refused and does not harm the first.
        let again = Cluster::up(opts.clone(), &two_pods());
        assert!(
            matches!(again, Err(Error::AlreadyExists { .. })),
            "{again:?}"
        );
        assert!(cluster.status().pods.iter().all(|p| p.running));
        std::panic::panic_any(cluster.status());
    })
    .unwrap_err();
    let status = status.downcast::<Status>().unwrap();
    assert_nothing_left(&opts.name, &status, &host_before);
}

#[test]
fn a_workload_that_dies_fails_up_with_its_log_and_leaves_nothing() {
    let host_before = host_network();
    let opts = test_options();
    let topology = Topology::from_yaml(
        r#"
nodes: [{ name: n }]
namespaces:
  - name: x
    workloads:
      - { name: ok, nodes: [n], command: [sleep, infinity] }
      - { name: broken, nodes: [n], command: [sh, -c, "echo cannot start >&2; exit 4"], readyPorts: [8080] }
"#,
    )
    .unwrap();
    let err = Cluster::up(opts.clone(), &topology).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("x/broken-0") && text.contains("cannot start"),
        "{text}"
    );
    // Nothing of the half-built cluster is left (the state is gone too, so build a
    // stand-in description from the options).
    let mount = ambit_simcluster::cgroup2_mount().unwrap();
    assert!(!mount.join(opts.name.cgroup_dir_name()).exists());
    assert!(!opts.state_dir().exists());
    let netns: Vec<String> = std::fs::read_dir(Path::new(ambit_simcluster::NETNS_DIR))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !netns
            .iter()
            .any(|n| n.starts_with(&opts.name.netns_prefix())),
        "{netns:?}"
    );
    assert_eq!(host_network().0, host_before.0);
}

/// `Command::new(p).arg(a)` returns `&mut`; this keeps the value.
trait TapArg {
    fn tap_arg(self, arg: &str) -> Self;
}

impl TapArg for Command {
    fn tap_arg(mut self, arg: &str) -> Self {
        self.arg(arg);
        self
    }
}

#[test]
fn stale_test_clusters_are_those_whose_owner_is_gone() {
    let host_before = host_network();
    let sleepers = Topology::from_yaml(
        "nodes: [{ name: n }]\nnamespaces: [{ name: x, workloads: [{ name: s, nodes: [n], command: [sleep, infinity] }] }]",
    )
    .unwrap();
    let live = Cluster::up(test_options(), &sleepers).unwrap();
    let orphan_opts = test_options();
    let orphan = Cluster::up(orphan_opts.clone(), &sleepers).unwrap();
    let before = orphan.status();
    // The owning test "was killed": forget the handle and name a dead owner.
    std::mem::forget(orphan);
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(before.state_file()).unwrap()).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    state["owner"] = serde_json::json!({ "pid": gone.id(), "startTime": 1 });
    std::fs::write(before.state_file(), serde_json::to_vec(&state).unwrap()).unwrap();

    let removed = ambit_simcluster::down_stale_test_clusters().unwrap();
    // (A test process running in parallel may have removed the orphan first; in a
    // lone run this call did.)
    assert!(
        !removed.iter().any(|r| r.name == live.name().as_str()),
        "a live test's cluster was removed"
    );
    assert!(live.status().pods.iter().all(|p| p.running));
    assert_nothing_left(&orphan_opts.name, &before, &host_before);
    live.down().unwrap();
}
