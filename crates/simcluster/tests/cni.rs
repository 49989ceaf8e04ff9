//! The cluster's CNI calls, made with the real `ambit-cni` binary (built by `cargo
//! build --workspace --bins`) against a stand-in for the node daemon's enrolment
//! socket in a temporary directory, speaking the `ambit_cni::protocol`.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ambit_cni::{Request, Response, Status};
use ambit_simcluster::{
    Error, PodCni,
    cni::{CniCall, CniCommand},
};

const UID: &str = "6a0b1c2d-0000-4111-8222-333344445555";

/// Answers each request with what `script` says; records the requests.
struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(script: impl Fn(&Request) -> Response + Send + 'static) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("simcluster-cni-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (requests, stop) = (Arc::clone(&requests), Arc::clone(&stop));
            move || {
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
                    let _ = (&stream).write_all(&script(&request).encode().unwrap());
                }
            }
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
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn plugin() -> PathBuf {
    ambit_test_support::bin_path("ambit-cni").unwrap()
}

/// The call `up` makes for pod production/checkout-0 on node-1.
fn call(command: CniCommand, socket: &Path) -> CniCall {
    CniCall {
        command,
        namespace: "production".to_owned(),
        name: "checkout-0".to_owned(),
        cni: PodCni {
            container_id: UID.to_owned(),
            uid: UID.to_owned(),
            socket: socket.to_owned(),
            added: false,
            notes: Vec::new(),
        },
        netns: PathBuf::from("/run/netns/ambit-t.production.checkout-0"),
        ip: Ipv4Addr::new(10, 244, 1, 2),
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 244, 1, 1),
        host_veth: "veth2".to_owned(),
        bridge: "cni0".to_owned(),
        timeout: Duration::from_secs(5),
    }
}

fn run(call: &CniCall) -> Result<ambit_simcluster::cni::CniOutput, Error> {
    call.run(Command::new(plugin()), "cni-test")
}

#[test]
fn add_enrols_the_pod_and_echoes_the_previous_result() {
    let daemon = FakeDaemon::start(|_| Response::new(Status::Enrolled, ""));
    let add = call(CniCommand::Add, &daemon.socket);
    let out = run(&add).unwrap();

    let result: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(result, add.prev_result(), "{}", out.stdout);

    let requests = daemon.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let ambit_cni::Command::Add(pod) = &requests[0].command else {
        panic!("{requests:?}")
    };
    assert_eq!(pod.pod.namespace, "production");
    assert_eq!(pod.pod.name, "checkout-0");
    assert_eq!(pod.pod.uid.as_deref(), Some(UID));
    assert_eq!(pod.container_id.as_str(), UID);
    assert_eq!(
        pod.netns,
        Path::new("/run/netns/ambit-t.production.checkout-0")
    );
    assert_eq!(
        pod.ips,
        vec!["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn add_of_an_unmeshed_pod_succeeds_with_the_daemon_s_note() {
    let daemon =
        FakeDaemon::start(|_| Response::new(Status::NotMeshed, "namespace legacy is not meshed"));
    let out = run(&call(CniCommand::Add, &daemon.socket)).unwrap();
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("not meshed: namespace legacy is not meshed")),
        "{:?}",
        out.notes
    );
}

#[test]
fn a_refused_add_fails_with_the_plugin_s_error_json() {
    let daemon = FakeDaemon::start(|_| Response::error("capture is not attached"));
    let err = run(&call(CniCommand::Add, &daemon.socket)).unwrap_err();
    let Error::CniFailed { stdout, .. } = &err else {
        panic!("{err:?}")
    };
    let json: serde_json::Value = serde_json::from_str(stdout).unwrap();
    assert_eq!(json["cniVersion"], "1.0.0", "{json}");
    assert!(json["code"].as_u64().is_some_and(|c| c > 0), "{json}");
    assert!(
        json["msg"]
            .as_str()
            .unwrap()
            .contains("capture is not attached"),
        "{json}"
    );
    // What `up` reports.
    let text = err.to_string();
    assert!(
        text.starts_with("CNI ADD of pod production/checkout-0 failed"),
        "{text}"
    );
    assert!(text.contains("capture is not attached"), "{text}");
}

#[test]
fn add_without_a_daemon_fails_and_del_without_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let err = run(&call(CniCommand::Add, &socket)).unwrap_err();
    let Error::CniFailed { stdout, .. } = &err else {
        panic!("{err:?}")
    };
    let json: serde_json::Value = serde_json::from_str(stdout).unwrap();
    // 11: try again later (the daemon is not up yet).
    assert_eq!(json["code"], 11, "{json}");

    let out = run(&call(CniCommand::Del, &socket)).unwrap();
    assert!(out.stdout.trim().is_empty(), "{}", out.stdout);
}

#[test]
fn del_asks_the_daemon_to_forget_the_pod() {
    let daemon = FakeDaemon::start(|_| Response::new(Status::Removed, ""));
    run(&call(CniCommand::Del, &daemon.socket)).unwrap();
    let requests = daemon.requests();
    let [request] = requests.as_slice() else {
        panic!("{requests:?}")
    };
    let ambit_cni::Command::Del(pod) = &request.command else {
        panic!("{request:?}")
    };
    assert_eq!(pod.pod.name, "checkout-0");
    assert_eq!(pod.container_id.as_str(), UID);
}
