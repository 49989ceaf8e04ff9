//! The enrolment server and the real `ambit-cni` binary over a Unix socket in a
//! temporary directory, with an in-test [`Enroller`] whose behaviour depends on the
//! pod's name:
//!
//! - `plain-*`: not meshed;
//! - `broken-*`: ADD fails;
//! - `gated-*`: ADD waits for the test to open the gate;
//! - `stuck-*`: ADD never finishes;
//! - anything else: enrolled.
//!
//! Needs the workspace binaries (`ambit-cni`): `cargo test -p ambit-cni -p ambit-node`
//! or `cargo xtask test` builds it.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_cni::{
    Response, Status,
    protocol::{MAX_MESSAGE_LEN, PROTOCOL_VERSION},
};
use ambit_node::enroll::{
    AddOutcome, ContainerId, EnrollConfig, EnrollError, EnrollServer, EnrollServerError, Enroller,
    PodEnrollment, PodRef, PodRemoval,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::Semaphore,
};

/// What the test enroller was asked, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    AddStarted(String),
    Added(PodEnrollment),
    Deleted(PodRemoval),
    Checked(String),
}

#[derive(Debug)]
struct TestEnroller {
    events: Mutex<Vec<Event>>,
    /// Enrolled pods: `namespace/name` → container id.
    enrolled: Mutex<BTreeMap<String, ContainerId>>,
    /// `gated-*` ADDs take a permit.
    gate: Semaphore,
}

impl TestEnroller {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::default(),
            enrolled: Mutex::default(),
            gate: Semaphore::new(0),
        })
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn record(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    fn enrolled(&self) -> BTreeMap<String, ContainerId> {
        self.enrolled.lock().unwrap().clone()
    }
}

impl Enroller for TestEnroller {
    async fn add(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        let name = pod.pod.name.clone();
        self.record(Event::AddStarted(name.clone()));
        if name.starts_with("plain-") {
            return Ok(AddOutcome::NotMeshed {
                reason: format!("namespace {} is not labelled", pod.pod.namespace),
            });
        }
        if name.starts_with("broken-") {
            return Err(EnrollError::NoIpv4 { pod: pod.pod });
        }
        if name.starts_with("stuck-") {
            std::future::pending::<()>().await;
        }
        if name.starts_with("gated-") {
            self.gate.acquire().await.unwrap().forget();
        }
        self.enrolled
            .lock()
            .unwrap()
            .insert(pod.pod.to_string(), pod.container_id.clone());
        self.record(Event::Added(pod));
        Ok(AddOutcome::Enrolled)
    }

    async fn del(&self, pod: PodRemoval) -> Result<(), EnrollError> {
        let mut enrolled = self.enrolled.lock().unwrap();
        let key = pod.pod.to_string();
        if enrolled.get(&key) == Some(&pod.container_id) {
            enrolled.remove(&key);
        }
        drop(enrolled);
        self.record(Event::Deleted(pod));
        Ok(())
    }

    async fn check(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        self.record(Event::Checked(pod.pod.name.clone()));
        if pod.pod.name.starts_with("plain-") {
            return Ok(AddOutcome::NotMeshed {
                reason: "not labelled".into(),
            });
        }
        match self.enrolled.lock().unwrap().get(&pod.pod.to_string()) {
            Some(id) if *id == pod.container_id => Ok(AddOutcome::Enrolled),
            _ => Err(EnrollError::NotEnrolled {
                pod: pod.pod,
                detail: String::new(),
            }),
        }
    }
}

/// A server on a socket in a temporary directory, with the test enroller.
struct Fixture {
    enroller: Arc<TestEnroller>,
    server: Option<EnrollServer>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(|config| config).await
    }

    async fn start_with(configure: impl FnOnce(EnrollConfig) -> EnrollConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ambit-enroll-test-")
            .tempdir()
            .unwrap();
        // A directory that does not exist yet: the server creates it.
        let socket = dir.path().join("run/ambit/cni.sock");
        let enroller = TestEnroller::new();
        let server =
            EnrollServer::bind(configure(EnrollConfig::new(&socket)), Arc::clone(&enroller))
                .await
                .unwrap();
        Self {
            enroller,
            server: Some(server),
            socket,
            _dir: dir,
        }
    }

    fn server(&self) -> &EnrollServer {
        self.server.as_ref().unwrap()
    }

    async fn stop(&mut self) {
        self.server.take().unwrap().shutdown().await;
    }

    /// Runs the plugin for pod `shop/<pod>` in sandbox `container`.
    async fn cni(&self, command: &str, pod: &str, container: &str) -> Run {
        run_cni(command, self.socket.clone(), pod, container).await
    }
}

/// The plugin's run: exit status, stdout as JSON (`Null` when empty), stderr.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: Value,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Value {
        assert!(self.success, "failed: {}\n{}", self.stdout, self.stderr);
        &self.stdout
    }

    /// Asserts a CNI error result with `code`; its message.
    fn error(&self, code: u64) -> String {
        assert!(!self.success, "succeeded: {}", self.stdout);
        assert_eq!(
            self.stdout["code"], code,
            "{}\n{}",
            self.stdout, self.stderr
        );
        self.stdout["msg"].as_str().unwrap().to_owned()
    }
}

fn prev_result(ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "eth0", "sandbox": "/run/netns/test" }],
        "ips": [{ "address": format!("{ip}/24"), "interface": 0 }],
    })
}

async fn run_cni(command: &str, socket: PathBuf, pod: &str, container: &str) -> Run {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "ambit": { "socket": socket, "timeout": "10s" },
        "prevResult": prev_result("10.244.1.7"),
    });
    let mut child =
        tokio::process::Command::new(ambit_test_support::bin_path("ambit-cni").unwrap())
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/run/netns/{container}"))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"),
            )
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    Run {
        success: out.status.success(),
        stdout: if out.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap()
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends raw bytes on a new connection (closing the write side when `eof`) and reads
/// the answer line. (After an oversized request the server closes with unread input,
/// which resets the connection once the answer has been read: read up to the newline
/// only, as the plugin does.)
async fn raw_exchange(socket: &Path, bytes: &[u8], eof: bool) -> Response {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if eof {
        stream.shutdown().await.unwrap();
    }
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        reader.read_until(b'\n', &mut answer),
    )
    .await
    .expect("no answer within 10 s")
    .unwrap();
    Response::decode(&answer).unwrap()
}

fn pod_ref(name: &str) -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
    }
}

fn cid(id: &str) -> ContainerId {
    ContainerId::try_from(id.to_owned()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_enrols_the_pod_and_passes_the_prev_result_on() {
    let mut fx = Fixture::start().await;
    let run = fx.cni("ADD", "checkout-0", "c1").await;
    let mut expected = prev_result("10.244.1.7");
    expected["cniVersion"] = json!("1.0.0");
    assert_eq!(run.ok(), &expected);
    assert_eq!(
        fx.enroller.events(),
        vec![
            Event::AddStarted("checkout-0".into()),
            Event::Added(PodEnrollment {
                pod: pod_ref("checkout-0"),
                container_id: cid("c1"),
                netns: "/run/netns/c1".into(),
                ips: vec!["10.244.1.7".parse().unwrap()],
            }),
        ]
    );
    assert_eq!(fx.server().requests(), 1);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_of_a_pod_outside_the_mesh_succeeds() {
    let mut fx = Fixture::start().await;
    let run = fx.cni("ADD", "plain-0", "c1").await;
    assert_eq!(run.ok()["ips"][0]["address"], "10.244.1.7/24");
    assert!(
        run.stderr.contains("namespace shop is not labelled"),
        "{}",
        run.stderr
    );
    assert_eq!(fx.enroller.enrolled(), BTreeMap::new());
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_closed_when_enrolment_fails() {
    let mut fx = Fixture::start().await;
    let run = fx.cni("ADD", "broken-0", "c1").await;
    let msg = run.error(100);
    assert!(
        msg.contains("pod shop/broken-0 has no IPv4 address"),
        "{msg}"
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_closed_without_the_daemon() {
    let mut fx = Fixture::start().await;
    fx.stop().await;
    assert!(
        !fx.socket.exists(),
        "the socket is removed on shutdown: {}",
        fx.socket.display()
    );
    let run = fx.cni("ADD", "checkout-0", "c1").await;
    let msg = run.error(11);
    assert!(msg.contains(&fx.socket.display().to_string()), "{msg}");
    assert_eq!(fx.enroller.events(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_is_idempotent_and_best_effort() {
    let mut fx = Fixture::start().await;
    fx.cni("ADD", "checkout-0", "c1").await.ok();
    // A DEL of another (older) sandbox of the same pod leaves the enrolment alone.
    fx.cni("DEL", "checkout-0", "c0").await.ok();
    assert_eq!(
        fx.enroller.enrolled().into_keys().collect::<Vec<_>>(),
        ["shop/checkout-0"]
    );
    for _ in 0..2 {
        let run = fx.cni("DEL", "checkout-0", "c1").await;
        assert_eq!(run.ok(), &Value::Null);
    }
    assert_eq!(fx.enroller.enrolled(), BTreeMap::new());
    let dels = fx
        .enroller
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Deleted(_)))
        .count();
    assert_eq!(dels, 3);
    let Some(Event::Deleted(removal)) = fx.enroller.events().pop() else {
        panic!("the last event is not a DEL")
    };
    assert_eq!(
        removal,
        PodRemoval {
            pod: pod_ref("checkout-0"),
            container_id: cid("c1"),
            netns: Some("/run/netns/c1".into()),
            ips: vec!["10.244.1.7".parse().unwrap()],
        }
    );
    // The daemon gone: DEL still succeeds.
    fx.stop().await;
    let run = fx.cni("DEL", "checkout-0", "c1").await;
    run.ok();
    assert!(run.stderr.contains("best effort"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_whether_the_pod_is_enrolled() {
    let mut fx = Fixture::start().await;
    let run = fx.cni("CHECK", "checkout-0", "c1").await;
    assert!(run.error(100).contains("meshed but not enrolled"));
    fx.cni("ADD", "checkout-0", "c1").await.ok();
    assert_eq!(fx.cni("CHECK", "checkout-0", "c1").await.ok(), &Value::Null);
    fx.cni("CHECK", "plain-0", "c2").await.ok();
    fx.stop().await;
    fx.cni("CHECK", "checkout-0", "c1").await.error(11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_and_in_order_per_pod() {
    let mut fx = Fixture::start().await;
    // gated-0's ADD blocks in the enroller…
    let add = tokio::spawn(run_cni("ADD", fx.socket.clone(), "gated-0", "g1"));
    let enroller = Arc::clone(&fx.enroller);
    ambit_test_support::eventually_async(
        "gated-0's ADD reached the enroller",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let started = enroller
                .events()
                .contains(&Event::AddStarted("gated-0".into()));
            async move {
                started
                    .then_some(())
                    .ok_or_else(|| anyhow::anyhow!("not yet"))
            }
        },
    )
    .await
    .unwrap();
    // …other pods are served meanwhile…
    fx.cni("ADD", "checkout-0", "c1").await.ok();
    // …and gated-0's DEL waits for its ADD.
    let del = tokio::spawn(run_cni("DEL", fx.socket.clone(), "gated-0", "g1"));
    let server = fx.server.as_ref().unwrap();
    ambit_test_support::eventually_async(
        "the DEL was received",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let n = server.requests();
            async move {
                (n == 3)
                    .then_some(())
                    .ok_or_else(|| anyhow::anyhow!("{n} requests"))
            }
        },
    )
    .await
    .unwrap();
    fx.enroller.gate.add_permits(1);
    add.await.unwrap().ok();
    del.await.unwrap().ok();
    let gated: Vec<&'static str> = fx
        .enroller
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::AddStarted(p) if p == "gated-0" => Some("add-started"),
            Event::Added(p) if p.pod.name == "gated-0" => Some("added"),
            Event::Deleted(p) if p.pod.name == "gated-0" => Some("deleted"),
            _ => None,
        })
        .collect();
    assert_eq!(gated, ["add-started", "added", "deleted"]);
    assert_eq!(
        fx.enroller.enrolled().into_keys().collect::<Vec<_>>(),
        ["shop/checkout-0"]
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_enroller_gets_a_timely_error_answer() {
    let mut fx = Fixture::start_with(|config| EnrollConfig {
        handler_timeout: Duration::from_millis(300),
        ..config
    })
    .await;
    let msg = fx.cni("ADD", "stuck-0", "s1").await.error(100);
    assert!(msg.contains("did not finish within 300ms"), "{msg}");
    // The server is still serving.
    fx.cni("ADD", "checkout-0", "c1").await.ok();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_error_answers() {
    let mut fx = Fixture::start_with(|config| EnrollConfig {
        request_timeout: Duration::from_millis(300),
        ..config
    })
    .await;
    let socket = fx.socket.clone();

    let answer = raw_exchange(&socket, b"hello daemon\n", false).await;
    assert_eq!(answer.status, Status::Error);
    assert!(answer.message.contains("not valid JSON"), "{answer:?}");
    assert_eq!(answer.version, PROTOCOL_VERSION);

    let answer = raw_exchange(&socket, b"{\"version\":2,\"command\":\"add\"}\n", false).await;
    assert!(answer.message.contains("protocol version 2"), "{answer:?}");

    let answer = raw_exchange(
        &socket,
        b"{\"version\":1,\"command\":\"add\",\"pod\":{\"name\":\"x\"}}\n",
        false,
    )
    .await;
    assert!(answer.message.contains("malformed message"), "{answer:?}");
    assert!(answer.message.contains("missing field"), "{answer:?}");

    let answer = raw_exchange(&socket, &vec![b'x'; MAX_MESSAGE_LEN + 10], false).await;
    assert!(answer.message.contains("longer than"), "{answer:?}");

    // An incomplete request: answered once the request timeout passed.
    let answer = raw_exchange(&socket, b"{\"version\":", false).await;
    assert!(
        answer.message.contains("no complete request within 300ms"),
        "{answer:?}"
    );

    // A request ended by EOF rather than a newline is served.
    let request = br#"{"version":1,"command":"check","pod":{"namespace":"shop","name":"plain-0","containerId":"p1","netns":"/run/netns/p1"}}"#;
    let answer = raw_exchange(&socket, request, true).await;
    assert_eq!(answer.status, Status::NotMeshed, "{answer:?}");

    // A connection closed without a request is no request.
    drop(UnixStream::connect(&socket).await.unwrap());

    // Still serving.
    fx.cni("ADD", "checkout-0", "c1").await.ok();
    assert_eq!(fx.server().requests(), 2);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_only_stale_sockets_are_replaced() {
    let mut fx = Fixture::start().await;
    let meta = std::fs::symlink_metadata(&fx.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let entries: Vec<_> = std::fs::read_dir(fx.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["cni.sock"], "no temporary name left behind");

    // A second server on a live socket: refused, and the first keeps its socket.
    let err = EnrollServer::bind(EnrollConfig::new(&fx.socket), TestEnroller::new())
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollServerError::InUse { .. }), "{err:?}");
    fx.cni("ADD", "checkout-0", "c1").await.ok();

    // A stale socket (its server gone without removing it) is replaced, with the mode
    // asked for.
    fx.stop().await;
    drop(std::os::unix::net::UnixListener::bind(&fx.socket).unwrap());
    let server = EnrollServer::bind(
        EnrollConfig {
            mode: 0o660,
            ..EnrollConfig::new(&fx.socket)
        },
        Arc::clone(&fx.enroller),
    )
    .await
    .unwrap();
    let meta = std::fs::symlink_metadata(&fx.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    fx.cni("CHECK", "checkout-0", "c1").await.ok();

    // A server whose socket was replaced by a newer one leaves the newer one alone.
    std::fs::remove_file(&fx.socket).unwrap();
    let newer = EnrollServer::bind(EnrollConfig::new(&fx.socket), Arc::clone(&fx.enroller))
        .await
        .unwrap();
    server.shutdown().await;
    assert!(fx.socket.exists());
    fx.cni("CHECK", "checkout-0", "c1").await.ok();
    newer.shutdown().await;
    assert!(!fx.socket.exists());

    // Anything else at the path is never removed.
    std::fs::write(&fx.socket, "not a socket").unwrap();
    let err = EnrollServer::bind(EnrollConfig::new(&fx.socket), TestEnroller::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnrollServerError::NotASocket { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read_to_string(&fx.socket).unwrap(), "not a socket");
}
