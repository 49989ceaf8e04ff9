//! Drives the built `ambit-echo` binary the way the simulated cluster does: `serve`
//! configured through the environment, `call` and `load` as subprocesses whose stdout
//! is parsed.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use ambit_test_support::eventually;
use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ambit-echo");

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A local port that was free a moment ago. The server is told to bind it; a clash
/// with another process shows up as the readiness poll failing.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn echo(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("LOG_LEVEL", "warn")
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn start_server(http: SocketAddr, tcp: SocketAddr) -> Running {
    let child = Command::new(BIN)
        .arg("serve")
        .env("POD_NAME", "bin-0")
        .env("POD_NAMESPACE", "shop")
        .env("POD_VERSION", "v9")
        .env("ECHO_HTTP_ADDR", http.to_string())
        .env("ECHO_TCP_ADDR", tcp.to_string())
        .env("ECHO_FAIL_RATE", "0")
        .env("ECHO_FAIL_STATUS", "503")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Running(child)
}

#[test]
fn serve_call_and_load_as_processes() {
    let (http, tcp) = (free_port(), free_port());
    let mut server = start_server(http, tcp);
    let health = format!("http://{http}/_echo/health");
    eventually(
        "the server answers health checks",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            if let Some(status) = server.0.try_wait()? {
                bail!("server exited early: {status}");
            }
            let out = echo(&["call", &health, "--timeout", "1s", "--expect-status", "200"]);
            ensure!(out.status.success(), "{}", stderr(&out));
            ensure!(
                out.stdout == b"ok\n",
                "{:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            Ok(())
        },
    )
    .unwrap();

    // call: the body is the server's JSON, the status goes to stderr.
    let url = format!("http://{http}/items?id=7");
    let out = echo(&["call", &url, "-H", "x-test: yes", "--http2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("HTTP 200"), "{}", stderr(&out));
    let body = stdout_json(&out);
    assert_eq!(body["pod"], "bin-0", "{body}");
    assert_eq!(body["namespace"], "shop", "{body}");
    assert_eq!(body["version"], "v9", "{body}");
    assert_eq!(body["path"], "/items?id=7", "{body}");
    assert_eq!(body["protocol"], "HTTP/2.0", "{body}");
    assert_eq!(body["headers"]["x-test"], "yes", "{body}");

    let out = echo(&["call", &url, "-X", "PUT", "--data", "12345"]);
    let body = stdout_json(&out);
    assert_eq!(
        (body["method"].as_str(), body["body_bytes"].as_u64()),
        (Some("PUT"), Some(5)),
        "{body}"
    );

    // Any response exits 0 unless --expect-status says otherwise.
    let out = echo(&["call", &url, "-H", "x-echo-status: 503"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("HTTP 503"), "{}", stderr(&out));
    let out = echo(&[
        "call",
        &url,
        "-H",
        "x-echo-status: 503",
        "--expect-status",
        "200",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("expected status 200, got 503"),
        "{}",
        stderr(&out)
    );

    // No response: exit 1 with a message.
    let out = echo(&["call", &format!("http://{}/", free_port())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("connect to"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = echo(&[
        "call",
        &url,
        "-H",
        "x-echo-delay-ms: 5000",
        "--timeout",
        "200ms",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no response within"),
        "{}",
        stderr(&out)
    );

    // Control endpoint through the binary.
    let control = format!("http://{http}/_echo/control");
    let out = echo(&[
        "call",
        &control,
        "-X",
        "POST",
        "--data",
        r#"{"fail_rate": 1.0, "fail_status": 500}"#,
    ]);
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"fail_rate": 1.0, "fail_status": 500})
    );

    // load over HTTP: one JSON object on stdout.
    let base = format!("http://{http}/");
    let out = echo(&["load", "--url", &base, "-n", "40", "-c", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout_json(&out);
    assert_eq!(s["requests"], 40, "{s}");
    assert_eq!(s["ok"], 0, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["status"]["500"], 40, "{s}");
    assert_eq!(s["by_pod"]["bin-0"], 40, "{s}");
    assert_eq!(s["by_version"]["v9"], 40, "{s}");
    assert!(s["error_kinds"].as_object().unwrap().is_empty(), "{s}");
    for key in ["p50", "p90", "p99", "max", "mean"] {
        assert!(s["latency_ms"][key].is_f64(), "{s}");
    }
    assert!(s["duration_s"].is_f64() && s["rps"].is_f64(), "{s}");

    let out = echo(&[
        "call",
        &control,
        "-X",
        "POST",
        "--data",
        r#"{"fail_rate": 0}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = echo(&[
        "load",
        "--url",
        &base,
        "--http2",
        "--duration",
        "300ms",
        "-c",
        "2",
        "--rate",
        "50",
        "-H",
        "x-a: b",
    ]);
    let s = stdout_json(&out);
    let n = s["requests"].as_u64().unwrap();
    assert!((1..=15).contains(&n), "{s}");
    assert_eq!(s["status"]["200"].as_u64(), Some(n), "{s}");

    // load over TCP.
    let out = echo(&[
        "load",
        "--tcp",
        &tcp.to_string(),
        "-n",
        "30",
        "-c",
        "3",
        "--size",
        "512",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout_json(&out);
    assert_eq!(
        (
            s["requests"].as_u64(),
            s["ok"].as_u64(),
            s["errors"].as_u64()
        ),
        (Some(30), Some(30), Some(0)),
        "{s}"
    );
    assert!(s["by_pod"].as_object().unwrap().is_empty(), "{s}");

    // Failed requests still exit 0; the JSON says what happened.
    let out = echo(&[
        "load",
        "--url",
        &format!("http://{}/", free_port()),
        "-n",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["errors"], 3);

    // Bad arguments exit 1.
    for args in [
        &["load", "-n", "3"][..],
        &["load", "--url", "ftp://x/"],
        &["load", "--url", &base, "-c", "0"],
        &["load", "--url", &base, "--duration", "soon"],
        &["serve", "--fail-rate", "2"],
    ] {
        let out = echo(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
    }

    // SIGTERM stops the server cleanly.
    let pid = server.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = eventually(
        "the server exits after SIGTERM",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || server.0.try_wait()?.context("still running"),
    )
    .unwrap();
    assert!(status.success(), "exit status {status}");
}
