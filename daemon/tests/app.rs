//! The daemon end to end on the simulated cluster: the real controller, one
//! `ambit-node` per node (started by the cluster's mesh data plane), pods enrolled
//! through the real `ambit-cni`. Meshed calls are carried over HBONE with the pods'
//! certificates, and show up in `/config_dump` and `/metrics`.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-node`,
//! `ambit-controller`, `ambit-cni`, `ambit-echo`); fails, never skips, without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

mod common;

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, Topology};
use common::mesh_shop;

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

fn peer_ip(answer: &serde_json::Value) -> std::net::Ipv4Addr {
    let peer = answer["peer"].as_str().unwrap();
    peer.rsplit_once(':').unwrap().0.parse().unwrap()
}

fn daemon_get(cluster: &Cluster, node: &str, metrics: bool, path: &str) -> String {
    let mesh = cluster.status().mesh.unwrap();
    let d = mesh.daemons.iter().find(|d| d.node == node).unwrap();
    let addr = if metrics {
        SocketAddr::V4(d.metrics_addr)
    } else {
        SocketAddr::V4(d.admin_addr)
    };
    let (code, body) = cluster
        .http_get(&Place::Node(node.to_owned()), addr, path)
        .unwrap();
    assert_eq!(code, 200, "{path} on {node}: {body}");
    body
}

#[test]
fn meshed_calls_go_over_hbone_with_identities_in_dump_and_metrics() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // By pod IP, same node and across nodes; the app sees checkout's own IP.
        let checkout = cluster.pod("production/checkout-0").unwrap().ip;
        for target in ["production/payment-v1-0", "production/payment-v1-1"] {
            let ip = cluster.pod(target).unwrap().ip;
            let answer = call(
                &cluster,
                "production/checkout-0",
                &format!("http://{ip}:8080/"),
            );
            assert!(answer.to_string().contains("payment"), "{answer}");
            assert_eq!(peer_ip(&answer), checkout, "{answer}");
        }
        // By Service VIP.
        let vip = cluster.service("production/payment").unwrap().cluster_ip;
        let answer = call(
            &cluster,
            "production/checkout-0",
            &format!("http://{vip}:80/"),
        );
        assert!(answer.to_string().contains("payment"), "{answer}");
        // Unmeshed client → meshed server: plaintext inbound, PERMISSIVE by default.
        let ip = cluster.pod("production/payment-v1-0").unwrap().ip;
        let legacy = cluster.pod("legacy/legacy-client-0").unwrap().ip;
        let answer = call(
            &cluster,
            "legacy/legacy-client-0",
            &format!("http://{ip}:8080/"),
        );
        assert_eq!(peer_ip(&answer), legacy, "{answer}");

        for d in cluster.status().mesh.unwrap().daemons {
            let log = std::fs::read_to_string(&d.log).unwrap();
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
            assert!(errors.is_empty(), "{}: {}", d.node, errors.join("\n"));
        }
        let dump = daemon_get(&cluster, "node-1", false, "/config_dump");
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let certs = dump["certificates"].as_array().unwrap();
        assert!(
            certs.iter().any(|c| c["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/ns/production/sa/checkout"))
                && c["notAfter"].is_string()),
            "{dump:#}"
        );
        assert!(dump["workloads"].as_u64().unwrap() >= 6, "{dump:#}");

        let metrics = daemon_get(&cluster, "node-2", true, "/metrics");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("source_principal=\"cluster.local/ns/production/sa/checkout\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")),
            "{metrics}"
        );
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

/// Whether `ambit-echo call URL` from `from` succeeds.
fn call_ok(cluster: &Cluster, from: &str, url: &str) -> bool {
    cluster
        .exec(from, &["ambit-echo", "call", "--timeout", "2s", url])
        .unwrap()
        .status
        .success()
}

/// Polls `f` until it holds, for up to 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

const ALLOW_CHECKOUT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-from-checkout, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/production/sa/checkout"]}}]
"#;

const DENY_CHECKOUT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-checkout, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/production/sa/checkout"]}}]
"#;

const DENY_ALL: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: production}\nspec: {}\n";

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: production}
spec:
  mtls: {mode: STRICT}
"#;

#[test]
fn l4_policy_and_strict_mtls_apply_to_new_connections_within_a_second() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let payment = cluster.pod("production/payment-v1-1").unwrap().ip;
        let url = format!("http://{payment}:8080/");
        let refused = |from: &str| !call_ok(&cluster, from, &url);
        let allowed = |from: &str| call_ok(&cluster, from, &url);
        assert!(allowed("production/inventory-0"));

        let t = Instant::now();
        cluster.apply_yaml(ALLOW_CHECKOUT).unwrap();
        takes_effect("inventory refused by the ALLOW policy", t, || {
            refused("production/inventory-0")
        });
        assert!(allowed("production/checkout-0"));
        // A DENY beats the ALLOW.
        let t = Instant::now();
        cluster.apply_yaml(DENY_CHECKOUT).unwrap();
        takes_effect("checkout refused by the DENY policy", t, || {
            refused("production/checkout-0")
        });
        let t = Instant::now();
        cluster.delete_yaml(DENY_CHECKOUT).unwrap();
        cluster.delete_yaml(ALLOW_CHECKOUT).unwrap();
        takes_effect("inventory allowed again without the policies", t, || {
            allowed("production/inventory-0")
        });
        // `spec: {}` refuses everyone.
        let t = Instant::now();
        cluster.apply_yaml(DENY_ALL).unwrap();
        takes_effect("checkout refused by deny-all", t, || {
            refused("production/checkout-0")
        });
        let t = Instant::now();
        cluster.delete_yaml(DENY_ALL).unwrap();
        takes_effect("inventory allowed again without deny-all", t, || {
            allowed("production/inventory-0")
        });

        assert!(allowed("legacy/legacy-client-0"));
        let t = Instant::now();
        cluster.apply_yaml(STRICT).unwrap();
        takes_effect("legacy-client refused under STRICT", t, || {
            refused("legacy/legacy-client-0")
        });
        assert!(allowed("production/checkout-0"));
        let t = Instant::now();
        cluster.delete_yaml(STRICT).unwrap();
        takes_effect("legacy-client allowed again without STRICT", t, || {
            allowed("legacy/legacy-client-0")
        });
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

/// Polls `observed` (one new connection each time) until it holds, and asserts that
/// it did within a second of `since`, when the policy change was written: the
/// issue's bound for policy changes, measured end to end (file written → controller →
/// push → daemon → the call's result).
fn takes_effect(what: &str, since: Instant, mut observed: impl FnMut() -> bool) {
    const BOUND: Duration = Duration::from_secs(1);
    loop {
        let holds = observed();
        let elapsed = since.elapsed();
        assert!(
            elapsed <= BOUND,
            "{what}: {} after {elapsed:?}, the bound is {BOUND:?}",
            if holds {
                "only observed"
            } else {
                "not observed"
            }
        );
        if holds {
            eprintln!("{what}: observed after {elapsed:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_daemon_fails_closed_and_a_restarted_one_resumes_its_pods() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mesh = cluster.status().mesh.unwrap();
        let daemon = mesh
            .daemons
            .iter()
            .find(|d| d.node == "node-1")
            .unwrap()
            .clone();
        let place = Place::Node("node-1".to_owned());
        let remote = cluster.pod("production/payment-v1-1").unwrap().ip;
        let local = cluster.pod("production/payment-v1-0").unwrap().ip;
        let urls = [
            format!("http://{remote}:8080/"),
            format!("http://{local}:8080/"),
        ];
        for url in &urls {
            assert!(call_ok(&cluster, "production/checkout-0", url), "{url}");
        }

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(daemon.pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        eventually("the daemon is gone", || {
            cluster
                .http_get(
                    &place,
                    SocketAddr::V4(daemon.readiness_addr),
                    "/healthz/ready",
                )
                .is_err()
        });
        // Fail closed: no plaintext escape while the daemon is down.
        for url in &urls {
            assert!(!call_ok(&cluster, "production/checkout-0", url), "{url}");
        }

        let process = start_daemon(&cluster, &daemon, "ambit-node-restarted");
        eventually("the restarted daemon is ready", || {
            matches!(
                cluster.http_get(
                    &place,
                    SocketAddr::V4(daemon.readiness_addr),
                    "/healthz/ready"
                ),
                Ok((200, _))
            )
        });
        for url in &urls {
            eventually("calls work again", || {
                call_ok(&cluster, "production/checkout-0", url)
            });
        }
        let dump = daemon_get(&cluster, "node-1", false, "/config_dump");
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let pods = dump["pods"].as_array().unwrap();
        assert_eq!(pods.len(), 2, "{dump:#}");
        assert!(pods.iter().all(|p| p["resumed"] == true), "{dump:#}");

        // SIGTERM drains and exits; the pods stay captured and fail closed.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(process.pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        eventually("the drained daemon exits", || !process.is_running());
        for url in &urls {
            assert!(!call_ok(&cluster, "production/checkout-0", url), "{url}");
        }
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

/// Starts `ambit-node` on `daemon`'s node with the flags the cluster used.
fn start_daemon(
    cluster: &Cluster,
    daemon: &ambit_simcluster::DaemonInfo,
    name: &str,
) -> ambit_simcluster::Process {
    let mesh = cluster.status().mesh.unwrap();
    let node = cluster.node(&daemon.node).unwrap();
    let mut cmd = std::process::Command::new(ambit_test_support::bin_path("ambit-node").unwrap());
    cmd.arg("--node-name")
        .arg(&daemon.node)
        .arg("--controller-addr")
        .arg(format!("http://{}", mesh.controller.grpc_addr))
        .arg("--token-file")
        .arg(&daemon.token_file)
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("--pods-cgroup")
        .arg(&node.pods_cgroup)
        .arg("--cni-socket")
        .arg(&daemon.cni_socket)
        .arg("--readiness-addr")
        .arg(format!("0.0.0.0:{}", daemon.readiness_addr.port()))
        .arg("--admin-addr")
        .arg(daemon.admin_addr.to_string())
        .arg("--metrics-addr")
        .arg(format!("0.0.0.0:{}", daemon.metrics_addr.port()));
    cluster.spawn_in_node(&daemon.node, name, cmd).unwrap()
}

#[test]
fn traffic_survives_the_controller_going_away_and_a_daemon_restart_meanwhile() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mesh = cluster.status().mesh.unwrap();
        let daemon = mesh
            .daemons
            .iter()
            .find(|d| d.node == "node-1")
            .unwrap()
            .clone();
        let place = Place::Node("node-1".to_owned());
        let remote = cluster.pod("production/payment-v1-1").unwrap().ip;
        let url = format!("http://{remote}:8080/");
        assert!(call_ok(&cluster, "production/checkout-0", &url));

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(mesh.controller.pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let control = Place::Control;
        eventually("the controller is gone", || {
            cluster
                .http_get(
                    &control,
                    SocketAddr::V4(mesh.controller.admin_addr),
                    "/healthz/ready",
                )
                .is_err()
        });
        assert!(call_ok(&cluster, "production/checkout-0", &url));

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(daemon.pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        eventually("the daemon is gone", || {
            cluster
                .http_get(
                    &place,
                    SocketAddr::V4(daemon.readiness_addr),
                    "/healthz/ready",
                )
                .is_err()
        });
        let _process = start_daemon(&cluster, &daemon, "ambit-node-offline");
        eventually(
            "the restarted daemon is ready without the controller",
            || {
                matches!(
                    cluster.http_get(
                        &place,
                        SocketAddr::V4(daemon.readiness_addr),
                        "/healthz/ready"
                    ),
                    Ok((200, _))
                )
            },
        );
        eventually("calls work on cached config and certificates", || {
            call_ok(&cluster, "production/checkout-0", &url)
        });
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

#[test]
fn continuous_traffic_across_certificate_rotations_has_no_failures() {
    for bin in ["ambit-echo", "ambit-controller", "ambit-node", "ambit-cni"] {
        ambit_test_support::bin_path(bin).expect("workspace binaries are built");
    }
    let mesh = MeshOptions {
        controller_args: vec!["--cert-ttl".to_owned(), "4s".to_owned()],
        ..MeshOptions::with_daemons()
    };
    let opts = Options::for_test(ambit_test_support::bin_dir().unwrap()).mesh(mesh);
    let cluster = Cluster::up(opts, &Topology::default_shop()).unwrap();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let remote = cluster.pod("production/payment-v1-1").unwrap().ip;
        let url = format!("http://{remote}:8080/");
        let serial = || {
            let dump = daemon_get(&cluster, "node-1", false, "/config_dump");
            let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
            dump["certificates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["identity"].as_str().unwrap().ends_with("/sa/checkout"))
                .map(|c| c["serial"].to_string())
                .unwrap()
        };
        let first = serial();
        let start = std::time::Instant::now();
        let mut calls = 0;
        while start.elapsed() < std::time::Duration::from_secs(9) {
            assert!(
                call_ok(&cluster, "production/checkout-0", &url),
                "call {calls} failed after {:?}",
                start.elapsed()
            );
            calls += 1;
        }
        assert_ne!(serial(), first, "the certificate was renewed");
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

#[test]
fn sixty_four_mebibytes_each_way_arrive_byte_exact_over_hbone() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let remote = cluster.pod("production/payment-v1-1").unwrap().ip;
        // 64 round trips of 1 MiB on one connection: 64 MiB each way, each echo
        // compared with what was sent.
        let out = cluster
            .exec(
                "production/checkout-0",
                &[
                    "ambit-echo",
                    "load",
                    "--tcp",
                    &format!("{remote}:9090"),
                    "--size",
                    "1048576",
                    "-n",
                    "64",
                    "--timeout",
                    "20s",
                ],
            )
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(summary["ok"], 64, "{summary:#}");
        assert_eq!(summary["errors"], 0, "{summary:#}");

        // Bytes are counted when the daemon closes its side, which may be just after
        // the client has exited.
        let received = || {
            let metrics = daemon_get(&cluster, "node-2", true, "/metrics");
            let received: u64 = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("istio_tcp_received_bytes_total{")
                        && l.contains("reporter=\"destination\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            (received, metrics)
        };
        let counted = ambit_test_support::eventually(
            "64 MiB counted by node-2's daemon",
            Duration::from_secs(5),
            Duration::from_millis(50),
            || match received() {
                (n, _) if n >= 64 << 20 => Ok(()),
                (_, metrics) => Err(anyhow::anyhow!("{metrics}")),
            },
        );
        if let Err(e) = counted {
            panic!("{e:#}");
        }
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

#[test]
fn pods_whose_namespace_leaves_the_mesh_are_unenrolled() {
    let cluster = mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let enrolled = |node: &str| {
            let dump = daemon_get(&cluster, node, false, "/config_dump");
            let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
            let pods = dump["pods"].as_array().unwrap().len();
            let captured = dump["capture"]["Ok"]["pods"].as_object().unwrap().len();
            (pods, captured)
        };
        assert_eq!(enrolled("node-1"), (2, 2));

        // The generated cluster file is the only place the namespace label lives.
        let file = cluster.config_dir().join("00-cluster.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let label = "ambit.dev/dataplane-mode: ambient";
        assert_eq!(text.matches(label).count(), 1, "{text}");
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text.replace(label, "ambit.dev/dataplane-mode: none")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();

        eventually("node-1 un-enrolled its pods", || {
            enrolled("node-1") == (0, 0)
        });
        eventually("node-2 un-enrolled its pods", || {
            enrolled("node-2") == (0, 0)
        });
        // Outside the mesh, plain pod-to-pod traffic still flows.
        let remote = cluster.pod("production/payment-v1-1").unwrap().ip;
        assert!(call_ok(
            &cluster,
            "production/checkout-0",
            &format!("http://{remote}:8080/")
        ));
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}
