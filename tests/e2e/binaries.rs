//! The binaries' process skeleton: config from flags, readiness with named blockers,
//! `/config_dump`, `ambitctl` reading both, and a clean exit on SIGTERM. The node
//! daemon needs a cgroup and capture to start; its start-up, readiness and drain are
//! tested on the simulated cluster in `daemon/tests/app.rs`.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_test_support::{bin_path, eventually};

/// Kills the child when the test ends, also when it fails.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn ambitctl(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("ambitctl").unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn check_skeleton(bin: &str, args: &[&str], blocker: &str, config_field: (&str, &str)) {
    let (ready, admin) = (free_addr(), free_addr());
    let child = Command::new(bin_path(bin).unwrap())
        .args(args)
        .args([
            "--readiness-addr",
            &ready.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);

    // Not ready yet, and it says what it waits for.
    let out = eventually(
        &format!("{bin} readiness answers"),
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let out = ambitctl(&["ready", "--addr", &ready.to_string()]);
            if String::from_utf8_lossy(&out.stdout).contains("not ready") {
                Ok(out)
            } else {
                anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr))
            }
        },
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "ambitctl ready must fail while blocked"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(blocker), "{bin}: {text}");

    let out = ambitctl(&["config-dump", "--admin", &admin.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dump["config"][config_field.0], config_field.1, "{dump}");

    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = eventually(
        &format!("{bin} exits after SIGTERM"),
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            proc.0
                .try_wait()?
                .ok_or_else(|| anyhow::anyhow!("still running"))
        },
    )
    .unwrap();
    assert!(exit.success(), "{bin} exited with {exit}");
    let mut logs = String::new();
    std::io::Read::read_to_string(proc.0.stderr.as_mut().unwrap(), &mut logs).unwrap();
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("{bin}: log line is not JSON ({e}): {line}"));
    }
    assert!(logs.contains("shutdown requested"), "{bin} logs: {logs}");
}

#[test]
fn waypoint_without_a_controller_stays_unready_and_drains() {
    // No controller answers: the waypoint keeps waiting for its config and certificate.
    let state = tempfile::tempdir().unwrap();
    let token = state.path().join("token");
    std::fs::write(&token, "not-a-valid-token\n").unwrap();
    let (controller, hbone, metrics) = (free_addr(), free_addr(), free_addr());
    check_skeleton(
        "ambit-waypoint",
        &[
            "--name",
            "waypoint",
            "--namespace",
            "production",
            "--controller-addr",
            &format!("http://{controller}"),
            "--token-file",
            &token.display().to_string(),
            "--state-dir",
            &state.path().display().to_string(),
            "--hbone-addr",
            &hbone.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
        ],
        "config",
        ("namespace", "production"),
    );
}

#[test]
fn controller_skeleton() {
    // The controller generates and persists its root CA in the state directory.
    let state = tempfile::tempdir().unwrap();
    let config_dir = state.path().join("config-appears-later");
    check_skeleton(
        "ambit-controller",
        &[
            "--config-dir",
            config_dir.to_str().unwrap(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:0",
        ],
        "initial sync",
        ("trust_domain", "cluster.local"),
    );
}

#[test]
fn node_daemon_requires_its_node_name() {
    let out = Command::new(bin_path("ambit-node").unwrap())
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--node-name"), "{err}");
}
