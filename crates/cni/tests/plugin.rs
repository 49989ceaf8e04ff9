//! The real `ambit-cni` binary, run as the container runtime runs it (`CNI_*`
//! environment, configuration on stdin), against a scripted stand-in for the daemon
//! on a Unix socket in a temporary directory.
//!
//! The daemon's real server is tested against the binary in `daemon/tests/enroll.rs`.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ambit_cni::{
    Command, ContainerId, PodEnrollment, PodRef, PodRemoval, Request, Response, Status,
};
use serde_json::{Value, json};

const CONTAINER: &str = "3f9c0a1b";
const NETNS: &str = "/run/netns/cni-test";
const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=checkout-0;K8S_POD_INFRA_CONTAINER_ID=3f9c0a1b;K8S_POD_UID=uid-1";

/// What the stand-in answers to a request: a response line, or nothing (it keeps the
/// connection open without answering).
type Script = dyn Fn(&Request) -> Answer + Send + Sync;

enum Answer {
    Respond(Response),
    Raw(&'static [u8]),
    Silence,
}

/// The daemon's stand-in: accepts on a socket in a temporary directory, records each
/// request and answers it as scripted. Stopped and removed when dropped.
struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(script: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ambit-cni-test-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let thread = std::thread::spawn({
            let (requests, stop) = (Arc::clone(&requests), Arc::clone(&stop));
            move || serve(&listener, &*script, &requests, &stop)
        });
        Self {
            _dir: dir,
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// A configuration pointing at this daemon.
    fn conf(&self, version: &str, prev_result: Option<Value>) -> Value {
        conf(&self.socket, version, prev_result, "10s")
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // `dir`, with the socket, is removed once this returns.
    }
}

fn serve(
    listener: &UnixListener,
    script: &Script,
    requests: &Mutex<Vec<Request>>,
    stop: &AtomicBool,
) {
    // Connections left unanswered stay open until the stand-in stops.
    let mut held = Vec::new();
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let mut line = Vec::new();
        if BufReader::new(&stream)
            .read_until(b'\n', &mut line)
            .is_err()
        {
            continue;
        }
        let request = Request::decode(&line).unwrap();
        requests.lock().unwrap().push(request.clone());
        match script(&request) {
            Answer::Respond(response) => {
                let _ = (&stream).write_all(&response.encode().unwrap());
            }
            Answer::Raw(bytes) => {
                let _ = (&stream).write_all(bytes);
            }
            Answer::Silence => held.push(stream),
        }
    }
}

fn respond(status: Status, message: &str) -> Answer {
    Answer::Respond(Response::new(status, message))
}

fn conf(socket: &Path, version: &str, prev_result: Option<Value>, timeout: &str) -> Value {
    let mut conf = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "ambit": { "socket": socket, "timeout": timeout },
    });
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev;
    }
    conf
}

/// What a bridge + host-local primary plugin returns.
fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            { "name": "cni0", "mac": "0a:58:0a:f4:01:01" },
            { "name": "veth1234", "mac": "36:1d:2e:8c:ab:01" },
            { "name": "eth0", "mac": "0a:58:0a:f4:01:02", "sandbox": NETNS },
        ],
        "ips": [{ "address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2 }],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dns": {},
    })
}

/// The plugin's run: exit status, stdout parsed as JSON (`Null` when empty), stderr.
struct Run {
    success: bool,
    stdout: Value,
    stderr: String,
}

impl Run {
    /// Asserts a CNI error result with `code`; its `msg`.
    fn error(&self, code: u64) -> String {
        assert!(!self.success, "expected failure, got {}", self.stdout);
        assert_eq!(
            self.stdout["code"], code,
            "{}\n{}",
            self.stdout, self.stderr
        );
        assert!(self.stdout["cniVersion"].is_string(), "{}", self.stdout);
        self.stdout["msg"].as_str().unwrap().to_owned()
    }

    fn ok(&self) -> &Value {
        assert!(self.success, "failed: {}\n{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// Runs the binary with `command` and the usual pod environment, minus the variables
/// named in `unset`.
fn cni(command: &str, stdin: &Value, unset: &[&str]) -> Run {
    cni_raw(command, stdin.to_string().as_bytes(), unset)
}

fn cni_raw(command: &str, stdin: &[u8], unset: &[&str]) -> Run {
    let mut process = Process::new(env!("CARGO_BIN_EXE_ambit-cni"));
    process
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", CONTAINER)
        .env("CNI_NETNS", NETNS)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", POD_ARGS)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in unset {
        process.env_remove(var);
    }
    let mut child = process.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    Run {
        success: out.status.success(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn pod() -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: "checkout-0".into(),
        uid: Some("uid-1".into()),
    }
}

fn container() -> ContainerId {
    ContainerId::try_from(CONTAINER.to_owned()).unwrap()
}

#[test]
fn version_reports_the_supported_versions() {
    for stdin in [&b"{\"cniVersion\":\"1.0.0\"}"[..], b""] {
        let run = cni_raw("VERSION", stdin, &[]);
        assert_eq!(
            run.ok(),
            &json!({
                "cniVersion": "1.0.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
            })
        );
    }
}

#[test]
fn add_enrolls_the_pod_and_passes_the_prev_result_on() {
    let daemon = FakeDaemon::start(|_| respond(Status::Enrolled, ""));
    for version in ["1.0.0", "0.4.0"] {
        let run = cni("ADD", &daemon.conf(version, Some(prev_result())), &[]);
        let mut expected = prev_result();
        expected["cniVersion"] = json!(version);
        assert_eq!(run.ok(), &expected);
    }
    let expected = Request::new(Command::Add(PodEnrollment {
        pod: pod(),
        container_id: container(),
        netns: NETNS.into(),
        // Only the in-sandbox address.
        ips: vec!["10.244.1.2".parse().unwrap()],
    }));
    assert_eq!(daemon.requests(), vec![expected.clone(), expected]);
}

#[test]
fn add_of_a_pod_outside_the_mesh_succeeds() {
    let daemon =
        FakeDaemon::start(|_| respond(Status::NotMeshed, "namespace shop is not labelled"));
    let run = cni("ADD", &daemon.conf("1.0.0", Some(prev_result())), &[]);
    assert_eq!(run.ok(), &prev_result());
    assert!(
        run.stderr.contains("namespace shop is not labelled"),
        "{}",
        run.stderr
    );
}

#[test]
fn add_fails_when_the_daemon_cannot_enrol() {
    let daemon = FakeDaemon::start(|_| respond(Status::Error, "attaching sk_lookup: EPERM"));
    let run = cni("ADD", &daemon.conf("1.0.0", Some(prev_result())), &[]);
    let msg = run.error(100);
    assert!(msg.contains("shop/checkout-0"), "{msg}");
    assert!(msg.contains("attaching sk_lookup: EPERM"), "{msg}");
    assert!(run.stderr.contains("attaching sk_lookup"), "{}", run.stderr);
}

#[test]
fn add_fails_closed_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // No socket at all.
    let socket = dir.path().join("absent.sock");
    let run = cni(
        "ADD",
        &conf(&socket, "1.0.0", Some(prev_result()), "5s"),
        &[],
    );
    let msg = run.error(11);
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    assert!(
        run.stdout["details"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{}",
        run.stdout
    );
    // A socket file left by a daemon that is gone.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let run = cni(
        "ADD",
        &conf(&stale, "1.0.0", Some(prev_result()), "5s"),
        &[],
    );
    assert!(run.error(11).contains("stale.sock"));
    assert!(
        run.stdout["details"].as_str().unwrap().contains("refused"),
        "{}",
        run.stdout
    );
}

#[test]
fn add_gives_up_on_a_silent_daemon() {
    let daemon = FakeDaemon::start(|_| Answer::Silence);
    let started = Instant::now();
    let run = cni(
        "ADD",
        &conf(&daemon.socket, "1.0.0", Some(prev_result()), "300ms"),
        &[],
    );
    let msg = run.error(11);
    assert!(msg.contains("did not answer within 300ms"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn add_rejects_answers_outside_the_protocol() {
    for answer in [
        &b"hello\n"[..],
        b"{\"version\":9,\"status\":\"enrolled\"}\n",
        b"{\"version\":1,\"status\":\"removed\"}\n",
        // Closed without a newline.
        b"{\"version\":1",
    ] {
        let daemon = FakeDaemon::start(move |_| Answer::Raw(answer));
        let run = cni("ADD", &daemon.conf("1.0.0", Some(prev_result())), &[]);
        assert!(!run.success, "{}", String::from_utf8_lossy(answer));
        let code = run.stdout["code"].as_u64().unwrap();
        assert!(code == 101 || code == 11, "{}", run.stdout);
    }
    let daemon = FakeDaemon::start(|_| Answer::Raw(b"{\"version\":9,\"status\":\"enrolled\"}\n"));
    let run = cni("ADD", &daemon.conf("1.0.0", Some(prev_result())), &[]);
    run.error(101);
    assert!(
        run.stdout["details"]
            .as_str()
            .unwrap()
            .contains("protocol version 9"),
        "{}",
        run.stdout
    );
}

#[test]
fn add_needs_a_prev_result() {
    let daemon = FakeDaemon::start(|_| respond(Status::Enrolled, ""));
    let run = cni("ADD", &daemon.conf("1.0.0", None), &[]);
    assert!(run.error(7).contains("prevResult"));
    assert_eq!(daemon.requests(), vec![]);
}

#[test]
fn add_passes_containers_that_are_not_pods_through() {
    let daemon = FakeDaemon::start(|_| respond(Status::Error, "must not be asked"));
    let run = cni(
        "ADD",
        &daemon.conf("1.0.0", Some(prev_result())),
        &["CNI_ARGS"],
    );
    assert_eq!(run.ok(), &prev_result());
    assert!(
        run.stderr.contains("not a Kubernetes pod"),
        "{}",
        run.stderr
    );
    assert_eq!(daemon.requests(), vec![]);
}

#[test]
fn del_is_idempotent_and_best_effort() {
    let daemon = FakeDaemon::start(|_| respond(Status::Removed, ""));
    for _ in 0..2 {
        let run = cni("DEL", &daemon.conf("1.0.0", Some(prev_result())), &[]);
        assert_eq!(run.ok(), &Value::Null, "DEL prints nothing");
    }
    // Without netns and cached result (the runtime lost them).
    let run = cni("DEL", &daemon.conf("1.0.0", None), &["CNI_NETNS"]);
    run.ok();
    let with_result = Request::new(Command::Del(PodRemoval {
        pod: pod(),
        container_id: container(),
        netns: Some(NETNS.into()),
        ips: vec!["10.244.1.2".parse().unwrap()],
    }));
    let bare = Request::new(Command::Del(PodRemoval {
        pod: pod(),
        container_id: container(),
        netns: None,
        ips: vec![],
    }));
    assert_eq!(
        daemon.requests(),
        vec![with_result.clone(), with_result, bare]
    );

    // The daemon failing, or gone: DEL still succeeds, and says why on stderr.
    let failing = FakeDaemon::start(|_| respond(Status::Error, "unpinning: EBUSY"));
    let run = cni("DEL", &failing.conf("1.0.0", Some(prev_result())), &[]);
    run.ok();
    assert!(run.stderr.contains("unpinning: EBUSY"), "{}", run.stderr);
    let socket = failing.socket.clone();
    drop(failing);
    let run = cni(
        "DEL",
        &conf(&socket, "1.0.0", Some(prev_result()), "5s"),
        &[],
    );
    run.ok();
    assert!(run.stderr.contains("best effort"), "{}", run.stderr);
}

#[test]
fn check_asks_the_daemon() {
    let daemon = FakeDaemon::start(|request| match &request.command {
        Command::Check(pod) if pod.pod.name == "checkout-0" => respond(Status::Enrolled, ""),
        _ => respond(Status::Error, "pod is meshed but not enrolled"),
    });
    let run = cni("CHECK", &daemon.conf("1.0.0", Some(prev_result())), &[]);
    assert_eq!(run.ok(), &Value::Null);
    assert!(matches!(
        daemon.requests().as_slice(),
        [Request { command: Command::Check(p), .. }] if p.pod == pod() && p.netns == Path::new(NETNS)
    ));

    let failing = FakeDaemon::start(|_| respond(Status::Error, "pod is meshed but not enrolled"));
    let run = cni("CHECK", &failing.conf("1.0.0", Some(prev_result())), &[]);
    assert!(run.error(100).contains("meshed but not enrolled"));

    // CHECK came with CNI 0.4.0.
    let run = cni("CHECK", &daemon.conf("0.3.1", Some(prev_result())), &[]);
    assert!(run.error(1).contains("0.3.1"));

    // Unreachable: cannot be verified.
    let socket = failing.socket.clone();
    drop(failing);
    let run = cni(
        "CHECK",
        &conf(&socket, "1.0.0", Some(prev_result()), "5s"),
        &[],
    );
    run.error(11);
}

#[test]
fn malformed_input_gets_a_spec_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let good = conf(&socket, "1.0.0", Some(prev_result()), "5s");

    let run = cni_raw("ADD", b"{\"cniVersion\": \"1.0.0\", ", &[]);
    assert!(run.error(6).contains("not valid JSON"));
    let run = cni_raw("ADD", b"", &[]);
    assert!(run.error(6).contains("no network configuration"));

    let mut no_name = good.clone();
    no_name.as_object_mut().unwrap().remove("name");
    assert!(cni("ADD", &no_name, &[]).error(7).contains("\"name\""));

    let mut bad_prev = good.clone();
    bad_prev["prevResult"]["ips"][0]["address"] = json!("10.244.1.2/33x");
    let run = cni("ADD", &bad_prev, &[]);
    assert!(run.error(6).contains("prevResult.ips[0].address"));

    let mut unknown = good.clone();
    unknown["ambit"]["retries"] = json!(3);
    let run = cni("ADD", &unknown, &[]);
    assert!(run.error(2).contains("ambit.retries = 3"));

    let mut future = good.clone();
    future["cniVersion"] = json!("9.9.9");
    let run = cni("ADD", &future, &[]);
    assert!(run.error(1).contains("9.9.9"));
    // The error carries a version the runtime can read.
    assert_eq!(run.stdout["cniVersion"], "1.0.0");

    assert!(
        cni("ADD", &good, &["CNI_COMMAND"])
            .error(4)
            .contains("CNI_COMMAND")
    );
    assert!(cni("GC", &good, &[]).error(4).contains("\"GC\""));
    assert!(
        cni("ADD", &good, &["CNI_NETNS"])
            .error(4)
            .contains("CNI_NETNS")
    );
    assert!(
        cni("ADD", &good, &["CNI_CONTAINERID"])
            .error(4)
            .contains("CNI_CONTAINERID")
    );
    assert!(
        cni("CHECK", &good, &["CNI_IFNAME"])
            .error(4)
            .contains("CNI_IFNAME")
    );
    // An error of a configuration with a known version carries that version.
    let mut old = good.clone();
    old["cniVersion"] = json!("0.4.0");
    assert_eq!(
        cni("ADD", &old, &["CNI_NETNS"]).stdout["cniVersion"],
        "0.4.0"
    );
}
