//! Sidecar mode end to end on the simulated cluster: the default shop with the real
//! controller and one `ambit-node --mode sidecar` inside every meshed pod (in the
//! pod's netns and cgroup, capturing that pod only), no node daemons and no CNI calls.
//! The same proxies as ambient mode: meshed calls go over HBONE with both pods'
//! certificates, L4 policy and STRICT mTLS are enforced, a killed sidecar fails
//! closed and a restarted one resumes.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-node`,
//! `ambit-controller`, `ambit-echo`); fails, never skips, without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, SidecarInfo, Topology};
use ambit_test_support::eventually;

/// The default shop in sidecar mode.
fn sidecar_shop() -> Cluster {
    for bin in ["ambit-echo", "ambit-controller", "ambit-node"] {
        if let Err(e) = ambit_test_support::bin_path(bin) {
            panic!("{e:#}");
        }
    }
    let bin_dir = ambit_test_support::bin_dir().unwrap_or_else(|e| panic!("{e:#}"));
    let opts = Options::for_test(bin_dir).mesh(MeshOptions::with_sidecars());
    Cluster::up(opts, &Topology::default_shop()).unwrap_or_else(|e| panic!("sidecar shop: {e}"))
}

/// Runs `f` on the cluster, then tears it down (also when `f` panics).
fn with_cluster(cluster: Cluster, f: impl FnOnce(&Cluster)) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&cluster)));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

/// `ambit-echo call URL` from inside `from`; the JSON answer.
fn call(cluster: &Cluster, from: &str, url: &str) -> serde_json::Value {
    let out = cluster
        .exec(from, &["ambit-echo", "call", "--timeout", "5s", url])
        .unwrap();
    assert!(
        out.status.success(),
        "call {url} from {from} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether `ambit-echo call URL` from `from` succeeds.
fn call_ok(cluster: &Cluster, from: &str, url: &str) -> bool {
    cluster
        .exec(from, &["ambit-echo", "call", "--timeout", "2s", url])
        .unwrap()
        .status
        .success()
}

/// Polls until `f` holds (a new connection each time), for up to 10 s.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    eventually(
        what,
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            if f() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("not yet"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn peer_ip(answer: &serde_json::Value) -> std::net::Ipv4Addr {
    let peer = answer["peer"].as_str().unwrap();
    peer.rsplit_once(':').unwrap().0.parse().unwrap()
}

fn sidecar(cluster: &Cluster, pod: &str) -> SidecarInfo {
    let mesh = cluster.status().mesh.unwrap();
    mesh.sidecars
        .into_iter()
        .find(|s| s.pod.to_string() == pod)
        .unwrap_or_else(|| panic!("no sidecar in {pod}"))
}

/// `GET path` on the sidecar of `pod`: its metrics on the pod's address, else its
/// admin endpoint on the pod's loopback.
fn sidecar_get(cluster: &Cluster, pod: &str, metrics: bool, path: &str) -> String {
    let s = sidecar(cluster, pod);
    let addr = if metrics {
        s.metrics_addr
    } else {
        s.admin_addr
    };
    let (code, body) = cluster
        .http_get(&Place::Pod(s.pod.clone()), SocketAddr::V4(addr), path)
        .unwrap();
    assert_eq!(code, 200, "{path} of the sidecar in {pod}: {body}");
    body
}

/// The `istio_tcp_connections_opened_total` lines of the sidecar in `pod`.
fn opened(cluster: &Cluster, pod: &str) -> Vec<String> {
    sidecar_get(cluster, pod, true, "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .map(str::to_owned)
        .collect()
}

const CHECKOUT: &str = "source_principal=\"cluster.local/ns/production/sa/checkout\"";
const PAYMENT: &str = "destination_principal=\"cluster.local/ns/production/sa/payment\"";
const MTLS: &str = "connection_security_policy=\"mutual_tls\"";

const ALLOW_CHECKOUT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-from-checkout, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/production/sa/checkout"]}}]
"#;

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: production}
spec:
  mtls: {mode: STRICT}
"#;

/// The mesh binaries whose processes belong to the cluster (by its `AMBIT_CLUSTER`
/// mark), as (pid, binary name).
fn mesh_processes(cluster: &Cluster) -> Vec<(u32, String)> {
    const MESH_BINARIES: [&str; 4] = [
        "ambit-node",
        "ambit-controller",
        "ambit-waypoint",
        "ambit-cni",
    ];
    let mark = format!("AMBIT_CLUSTER={}", cluster.name());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap() {
        let entry = entry.unwrap();
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue; // exited meanwhile
        };
        if !environ.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let name = exe
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned();
        if MESH_BINARIES.contains(&name.as_str()) {
            found.push((pid, name));
        }
    }
    found.sort();
    found
}

/// The cgroup v2 path of `pid`, relative to the cgroup2 mount.
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim_start_matches('/')
        .to_owned()
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn sidecars_carry_meshed_calls_over_mtls_and_enforce_policy() {
    with_cluster(sidecar_shop(), |cluster| {
        let st = cluster.status();
        let mesh = st.mesh.clone().unwrap();

        // The data plane is one sidecar per meshed pod, in that pod's netns and cgroup:
        // no node daemon, no CNI attachment, none in the unmeshed legacy-client.
        assert!(mesh.daemons.is_empty(), "{:?}", mesh.daemons);
        assert!(st.pods.iter().all(|p| p.cni.is_none()));
        let meshed: Vec<String> = cluster
            .meshed_pods()
            .iter()
            .map(|p| p.pod_ref().to_string())
            .collect();
        assert_eq!(
            meshed,
            [
                "production/checkout-0",
                "production/payment-v1-0",
                "production/payment-v1-1",
                "production/payment-v2-0",
                "production/inventory-0",
            ]
        );
        let mut sidecar_pods: Vec<String> =
            mesh.sidecars.iter().map(|s| s.pod.to_string()).collect();
        sidecar_pods.sort();
        let mut expected = meshed.clone();
        expected.sort();
        assert_eq!(sidecar_pods, expected);

        let procs = mesh_processes(cluster);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, name) in &procs {
            *counts.entry(name.as_str()).or_default() += 1;
        }
        assert_eq!(
            counts,
            BTreeMap::from([("ambit-controller", 1), ("ambit-node", meshed.len())]),
            "{procs:?}"
        );
        for (pid, name) in &procs {
            if name != "ambit-node" {
                assert_eq!(*pid, mesh.controller.pid);
                continue;
            }
            let s = mesh
                .sidecars
                .iter()
                .find(|s| s.pid == *pid)
                .unwrap_or_else(|| panic!("ambit-node {pid} is not a recorded sidecar"));
            let pod = st.pods.iter().find(|p| p.pod_ref() == s.pod).unwrap();
            assert_eq!(
                netns_inode(Path::new(&format!("/proc/{pid}/ns/net"))),
                netns_inode(&pod.netns_path()),
                "sidecar {pid} is not in the netns of {}",
                s.pod
            );
            assert!(
                pod.cgroup.ends_with(cgroup_of(*pid)),
                "sidecar {pid} is in cgroup {}, not {}",
                cgroup_of(*pid),
                pod.cgroup.display()
            );
        }

        // Each sidecar captures its own pod only, from its own bpffs.
        let dump: serde_json::Value = serde_json::from_str(&sidecar_get(
            cluster,
            "production/checkout-0",
            false,
            "/config_dump",
        ))
        .unwrap();
        let checkout = cluster.pod("production/checkout-0").unwrap();
        let capture = &dump["capture"]["Ok"];
        assert_eq!(
            capture["pods"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            [&checkout.ip.to_string()],
            "{dump:#}"
        );
        assert_eq!(
            capture["podsCgroup"].as_str().unwrap(),
            checkout.cgroup.to_str().unwrap()
        );
        assert!(
            Path::new(capture["bpffs"].as_str().unwrap())
                .starts_with(sidecar(cluster, "production/checkout-0").state_dir),
            "{dump:#}"
        );
        assert_eq!(dump["config"]["mode"], "sidecar");

        // checkout → payment by pod IP, on the other node and on its own: over HBONE,
        // the app sees checkout's own IP.
        for target in ["production/payment-v1-1", "production/payment-v1-0"] {
            let ip = cluster.pod(target).unwrap().ip;
            let answer = call(
                cluster,
                "production/checkout-0",
                &format!("http://{ip}:8080/"),
            );
            assert_eq!(answer["pod"], target.split_once('/').unwrap().1, "{answer}");
            assert_eq!(peer_ip(&answer), checkout.ip, "{answer}");
        }
        let remote = opened(cluster, "production/payment-v1-1");
        assert!(
            remote.iter().any(|l| l.contains("reporter=\"destination\"")
                && l.contains(CHECKOUT)
                && l.contains(PAYMENT)
                && l.contains(MTLS)),
            "{remote:#?}"
        );
        // By Service VIP: resolved by checkout's sidecar.
        let vip = cluster.service("production/payment").unwrap().cluster_ip;
        let answer = call(
            cluster,
            "production/checkout-0",
            &format!("http://{vip}:80/"),
        );
        assert!(
            answer["pod"].as_str().unwrap().starts_with("payment-"),
            "{answer}"
        );
        let source = opened(cluster, "production/checkout-0");
        assert!(
            source.iter().any(|l| l.contains("reporter=\"source\"")
                && l.contains(CHECKOUT)
                && l.contains(PAYMENT)
                && l.contains("destination_service=\"payment.production.svc.cluster.local\"")
                && l.contains(MTLS)),
            "{source:#?}"
        );

        // An ALLOW for checkout refuses inventory, keeps checkout.
        let payment = cluster.pod("production/payment-v1-1").unwrap().ip;
        let url = format!("http://{payment}:8080/");
        assert!(call_ok(cluster, "production/inventory-0", &url));
        cluster.apply_yaml(ALLOW_CHECKOUT).unwrap();
        until("inventory refused by the ALLOW policy", || {
            !call_ok(cluster, "production/inventory-0", &url)
        });
        assert!(call_ok(cluster, "production/checkout-0", &url));
        cluster.delete_yaml(ALLOW_CHECKOUT).unwrap();
        until("inventory allowed again", || {
            call_ok(cluster, "production/inventory-0", &url)
        });

        // STRICT refuses the unmeshed legacy-client (plaintext), keeps checkout.
        let answer = call(cluster, "legacy/legacy-client-0", &url);
        assert_eq!(
            peer_ip(&answer),
            cluster.pod("legacy/legacy-client-0").unwrap().ip
        );
        cluster.apply_yaml(STRICT).unwrap();
        until("legacy-client refused under STRICT", || {
            !call_ok(cluster, "legacy/legacy-client-0", &url)
        });
        assert!(call_ok(cluster, "production/checkout-0", &url));
        // The sidecars' own readiness and metrics ports stay reachable from outside
        // the pod under STRICT (excluded from capture, as the kubelet needs).
        let node = Place::Node(checkout.node.clone());
        let ready = SocketAddr::V4(sidecar(cluster, "production/checkout-0").readiness_addr);
        assert_eq!(
            cluster.http_get(&node, ready, "/healthz/ready").unwrap().0,
            200
        );

        // Every connection the sidecars made on behalf of their pods went over mutual
        // TLS: none of their own (controller, CA) was captured and proxied in plaintext.
        for s in &mesh.sidecars {
            let pod = s.pod.to_string();
            for line in opened(cluster, &pod) {
                assert!(
                    !line.contains("reporter=\"source\"") || line.contains(MTLS),
                    "{pod}: {line}"
                );
            }
            let log = std::fs::read_to_string(&s.log).unwrap();
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
            assert!(errors.is_empty(), "{pod}: {}", errors.join("\n"));
        }
    });
}

#[test]
fn a_killed_sidecar_fails_closed_and_a_restarted_one_resumes() {
    with_cluster(sidecar_shop(), |cluster| {
        let s = sidecar(cluster, "production/checkout-0");
        let payment = cluster.pod("production/payment-v1-1").unwrap().ip;
        let checkout = cluster.pod("production/checkout-0").unwrap().ip;
        let out_url = format!("http://{payment}:8080/");
        let in_url = format!("http://{checkout}:8080/");
        assert!(call_ok(cluster, "production/checkout-0", &out_url));
        assert!(call_ok(cluster, "legacy/legacy-client-0", &in_url));

        let command = cluster
            .status()
            .processes
            .into_iter()
            .find(|p| p.pid == s.pid)
            .unwrap()
            .command;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(s.pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Capture stays pinned: neither direction falls back to plaintext.
        until("outbound refused without the sidecar", || {
            !call_ok(cluster, "production/checkout-0", &out_url)
        });
        until("inbound refused without the sidecar", || {
            !call_ok(cluster, "legacy/legacy-client-0", &in_url)
        });

        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..]);
        let restarted = cluster
            .spawn(Place::Pod(s.pod.clone()), &s.process, cmd)
            .unwrap();
        let place = Place::Pod(s.pod.clone());
        until("the restarted sidecar is ready", || {
            assert!(restarted.is_running(), "{}", restarted.log_tail(30));
            matches!(
                cluster.http_get(&place, SocketAddr::V4(s.readiness_addr), "/healthz/ready"),
                Ok((200, _))
            )
        });
        assert!(call_ok(cluster, "production/checkout-0", &out_url));
        assert!(call_ok(cluster, "legacy/legacy-client-0", &in_url));
        let dump: serde_json::Value = serde_json::from_str(&sidecar_get(
            cluster,
            "production/checkout-0",
            false,
            "/config_dump",
        ))
        .unwrap();
        assert_eq!(dump["pods"][0]["resumed"], true, "{dump:#}");
        assert_eq!(dump["subscription"]["connected"], true, "{dump:#}");
    });
}
