//! The mesh control plane on the simulated cluster: `ambit-controller` in local mode
//! in the control namespace, reading the cluster's config directory, with bootstrap
//! tokens provisioned for every node.
//!
//! ```text
//! <state dir>/
//!   controller/                  the controller's state (generated root CA)
//!   tokens/                      mode 0700
//!     <node>.token               one random token per node, mode 0600 (node daemons)
//!     controller-tokens.yaml     the controller's --bootstrap-tokens, mode 0600
//! ```
//!
//! The controller listens on `<control ip>:15012` (gRPC: config push and CA, reached
//! from the nodes over the underlay), `0.0.0.0:15021` (readiness) and `127.0.0.1:15000`
//! (admin: `/config_dump`, `/metrics`) inside the control namespace; use
//! [`Cluster::http_get`] or `ambitctl` run with [`Cluster::command`] in
//! [`Place::Control`] to read the admin endpoints.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{Cluster, Error, Place};

/// The controller's binary, looked up in the binaries directory.
pub const CONTROLLER_BINARY: &str = "ambit-controller";
/// The controller's process name in the cluster (`control_<name>.log`).
pub const CONTROLLER_PROCESS: &str = "ambit-controller";
/// gRPC port of the controller (config push and CA), Istio's xDS port.
pub const CONTROLLER_GRPC_PORT: u16 = 15012;
/// Readiness port of the controller.
pub const CONTROLLER_READINESS_PORT: u16 = 15021;
/// Admin port of the controller (loopback of the control namespace).
pub const CONTROLLER_ADMIN_PORT: u16 = 15000;
/// How long [`Cluster::start_mesh_control`] waits for the controller to be ready.
pub const DEFAULT_CONTROLLER_READY_TIMEOUT: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(50);

/// How to start the mesh control plane.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Extra flags for `ambit-controller` (e.g. `["--cert-ttl", "10s"]`).
    pub controller_args: Vec<String>,
    /// How long to wait for the controller's `/healthz/ready`.
    pub ready_timeout: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            controller_args: Vec::new(),
            ready_timeout: DEFAULT_CONTROLLER_READY_TIMEOUT,
        }
    }
}

/// The mesh control plane of a cluster, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshInfo {
    /// The controller.
    pub controller: ControllerInfo,
    /// Directory of the bootstrap tokens (mode 0700).
    pub tokens_dir: PathBuf,
    /// Node name → the file holding its bootstrap token (mode 0600), for its daemon's
    /// `authorization: Bearer` credential.
    pub node_tokens: BTreeMap<String, PathBuf>,
}

/// Where the controller runs and listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerInfo {
    /// Its process name ([`CONTROLLER_PROCESS`]), in [`Place::Control`].
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// gRPC (push and CA), reachable from every node: `<control ip>:15012`.
    pub grpc_addr: SocketAddrV4,
    /// Readiness, inside the control namespace.
    pub readiness_addr: SocketAddrV4,
    /// Admin endpoints, on the control namespace's loopback.
    pub admin_addr: SocketAddrV4,
    /// Its state directory (the generated root CA).
    pub state_dir: PathBuf,
    /// Its `--bootstrap-tokens` file.
    pub tokens_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

impl Cluster {
    /// Provisions the node bootstrap tokens and starts `ambit-controller` in local
    /// mode in the control namespace on the cluster's config directory; returns once
    /// its `/healthz/ready` answers 200 (it has read the config directory). Recorded
    /// in the state file (`Status::mesh`) and stopped by `down`.
    pub fn start_mesh_control(&self, opts: &MeshOptions) -> Result<MeshInfo, Error> {
        let binary = self.binary(CONTROLLER_BINARY)?;
        let st = self.status();
        let tokens_dir = st.state_dir.join("tokens");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens_dir)
            .map_err(|source| Error::Io {
                op: "creating",
                path: tokens_dir.clone(),
                source,
            })?;
        let mut node_tokens = BTreeMap::new();
        let mut entries = Vec::new();
        for node in &st.nodes {
            let token = random_token()?;
            let path = tokens_dir.join(format!("{}.token", node.name));
            write_secret(&path, format!("{token}\n").as_bytes())?;
            entries.push(serde_json::json!({"token": token, "node": node.name}));
            node_tokens.insert(node.name.clone(), path);
        }
        let tokens_file = tokens_dir.join("controller-tokens.yaml");
        let yaml =
            serde_yaml::to_string(&serde_json::json!({ "tokens": entries })).map_err(|source| {
                Error::Yaml {
                    what: "bootstrap tokens".to_owned(),
                    source,
                }
            })?;
        write_secret(&tokens_file, yaml.as_bytes())?;

        let state_dir = st.state_dir.join("controller");
        let grpc_addr = SocketAddrV4::new(st.control.ip, CONTROLLER_GRPC_PORT);
        let readiness_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTROLLER_READINESS_PORT);
        let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, CONTROLLER_ADMIN_PORT);
        let mut cmd = Command::new(&binary);
        cmd.arg("--config-dir")
            .arg(&st.config_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--bootstrap-tokens")
            .arg(&tokens_file)
            .arg("--grpc-addr")
            .arg(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTROLLER_GRPC_PORT).to_string())
            .arg("--readiness-addr")
            .arg(readiness_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string())
            .args(&opts.controller_args);
        let process = self.spawn_control(CONTROLLER_PROCESS, cmd)?;
        let info = MeshInfo {
            controller: ControllerInfo {
                process: CONTROLLER_PROCESS.to_owned(),
                pid: process.pid,
                grpc_addr,
                readiness_addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, CONTROLLER_READINESS_PORT),
                admin_addr,
                state_dir,
                tokens_file,
                log: process.log.clone(),
            },
            tokens_dir,
            node_tokens,
        };
        self.set_mesh(Some(info.clone()))?;

        let ready = SocketAddr::V4(info.controller.readiness_addr);
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            if !process.is_running() {
                return Err(Error::Exited {
                    what: format!("{CONTROLLER_PROCESS} in {}", Place::Control),
                    status: "gone".to_owned(),
                    log: process.log.clone(),
                    tail: process.log_tail(30),
                });
            }
            let last = match self.http_get(&Place::Control, ready, "/healthz/ready") {
                Ok((200, _)) => break,
                Ok((code, body)) => format!("{code}: {}", body.trim()),
                Err(e) => crate::error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("{CONTROLLER_PROCESS} in {}", Place::Control),
                    timeout: opts.ready_timeout,
                    last,
                    log: process.log.clone(),
                    tail: process.log_tail(30),
                });
            }
            std::thread::sleep(POLL);
        }
        tracing::info!(cluster = %self.name(), grpc = %info.controller.grpc_addr, "mesh control plane ready");
        Ok(info)
    }

    /// The mesh control plane, when started.
    pub fn mesh(&self) -> Option<MeshInfo> {
        self.status().mesh
    }

    /// `GET path` over HTTP/1.1 on `addr` from inside `place`'s network namespace (a
    /// component's admin or readiness endpoint); the status code and body.
    pub fn http_get(
        &self,
        place: &Place,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), Error> {
        let netns = self.netns_path_of(place)?;
        let path = path.to_owned();
        let what = format!("GET http://{addr}{path} in {place}");
        let io = |source| Error::Io {
            op: "HTTP",
            path: PathBuf::from(what.clone()),
            source,
        };
        // A socket belongs to the namespace its thread was in when it was created: do
        // the exchange on a thread of its own that enters the namespace first.
        let result = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<String> {
                let ns = std::fs::File::open(&netns)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let mut stream =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(
                    stream,
                    "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
                )?;
                let mut out = Vec::new();
                stream.read_to_end(&mut out)?;
                Ok(String::from_utf8_lossy(&out).into_owned())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("HTTP thread panicked")))
        })
        .map_err(io)?;
        parse_response(&result).ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an HTTP/1.1 response",
            ))
        })
    }
}

/// Status code and body of a `connection: close` HTTP/1.1 response (the admin
/// servers answer with a content length, never chunked).
fn parse_response(raw: &str) -> Option<(u16, String)> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((code, body.to_owned()))
}

/// 32 random bytes from the kernel, hex.
fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| Error::Io {
            op: "reading",
            path: PathBuf::from("/dev/urandom"),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file readable by its owner only.
fn write_secret(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        let raw = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nnope\n";
        assert_eq!(parse_response(raw), Some((503, "nope\n".to_owned())));
        assert_eq!(parse_response("garbage"), None);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("simcluster-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t");
        write_secret(&p, b"x").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
