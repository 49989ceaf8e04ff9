//! The enrolment server: the daemon's end of the `ambit-cni` plugin's Unix socket
//! (DESIGN §2, "Enrollment"; the protocol is `ambit_cni::protocol`).
//!
//! The server reads one request per connection, hands it to an [`Enroller`] — the
//! daemon's decision whether the pod is meshed, and its capture — and answers once the
//! enroller is done: for ADD that is the moment capture is ready, which is when the
//! plugin lets the runtime start the pod.
//!
//! # Robustness
//!
//! - Requests are served concurrently, one task each; requests for the same pod
//!   (namespace and name) run one after the other, in arrival order, so that a DEL
//!   never overtakes the ADD it undoes.
//! - A malformed, oversized, wrong-version or slow request gets an `error` answer (and
//!   a log line), never a crash; a connection that sends nothing is closed quietly.
//! - An enroller call that takes longer than [`EnrollConfig::handler_timeout`] is
//!   answered with an error, but it is not cancelled: it runs to completion in the
//!   background (capture calls are not safe to interrupt halfway), still holding the
//!   pod's turn.
//! - The socket is created under a temporary name, given its mode, then renamed into
//!   place, so that it is never reachable with looser permissions. A socket file left
//!   by a daemon that is gone is replaced; one a live daemon answers on is not.

use std::{
    collections::HashMap,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ambit_cni::{
    Command, Request, Response, Status,
    cni::error_chain,
    protocol::{DecodeError, MAX_MESSAGE_LEN},
};
pub use ambit_cni::{ContainerId, PodEnrollment, PodRef, PodRemoval};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{OwnedMutexGuard, watch},
    task::{JoinHandle, JoinSet},
};

use crate::capture::CaptureError;

/// Default path of the enrolment socket (the plugin's default too).
pub const DEFAULT_SOCKET: &str = ambit_cni::client::DEFAULT_SOCKET;

/// How the daemon serves enrolment.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollConfig {
    /// The socket path; missing parent directories are created.
    pub socket: PathBuf,
    /// The socket's permission bits (default `0o600`: only root's plugin connects).
    pub mode: u32,
    /// How long a client may take to send its request, and to take the answer.
    pub request_timeout: Duration,
    /// How long the server waits for the enroller before answering with an error.
    /// Below the plugin's timeout (30 s by default), so that the plugin reports the
    /// daemon's message rather than its own timeout.
    pub handler_timeout: Duration,
}

/// What the daemon does with pods; implemented by the daemon's app with the mesh
/// membership it learns from the controller and [`crate::capture::Capture`].
///
/// Implementations write `async fn`; the futures must be `Send`. Capture calls block:
/// run them in `tokio::task::spawn_blocking`. Calls for the same pod never overlap (see
/// the module docs); calls for different pods do.
pub trait Enroller: Send + Sync + 'static {
    /// CNI ADD: decide whether the pod is meshed and, if it is, enrol it; return once
    /// capture is ready. An error fails the pod's ADD: the pod is not started.
    fn add(
        &self,
        pod: PodEnrollment,
    ) -> impl Future<Output = Result<AddOutcome, EnrollError>> + Send;

    /// CNI DEL: forget the pod (idempotent: unknown pods are fine). Only remove an
    /// enrolment of the same container id: a DEL of an old sandbox may arrive after
    /// the ADD of the pod's new one. The plugin treats DEL as best-effort, so an error
    /// here is logged by the runtime but does not keep the pod from going away.
    fn del(&self, pod: PodRemoval) -> impl Future<Output = Result<(), EnrollError>> + Send;

    /// CNI CHECK: is the pod captured if and only if it should be? What ADD would
    /// answer now, without changing anything; an error when a meshed pod is not
    /// enrolled.
    fn check(
        &self,
        pod: PodEnrollment,
    ) -> impl Future<Output = Result<AddOutcome, EnrollError>> + Send;
}

/// The outcome of an ADD (or a CHECK) that did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// The pod is captured; its daemon listeners are up.
    Enrolled,
    /// The pod is not part of the mesh; nothing was done.
    NotMeshed {
        /// Why, for the runtime's logs (e.g. "namespace shop is not labelled
        /// ambit.dev/dataplane-mode=ambient").
        reason: String,
    },
}

/// Why an enroller call failed; its message (with causes) is what the plugin reports.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Capture could not be set up or removed.
    #[error("capture of pod {pod}")]
    Capture {
        /// The pod.
        pod: PodRef,
        /// What capture reported.
        #[source]
        source: CaptureError,
    },
    /// The pod's network namespace could not be opened or read.
    #[error("network namespace of pod {pod}")]
    Netns {
        /// The pod.
        pod: PodRef,
        /// What failed.
        #[source]
        source: crate::netns::NetnsError,
    },
    /// The pod's netns path names another namespace than at its ADD: the pod is gone
    /// (without a DEL) and the path was reused. Nothing was captured.
    #[error(
        "the network namespace {} of pod {pod} is not the pod's any more (cookie {found}, \
         {expected} at its ADD)",
        netns.display()
    )]
    NetnsReused {
        /// The pod.
        pod: PodRef,
        /// The path.
        netns: PathBuf,
        /// The namespace cookie at ADD.
        expected: u64,
        /// The cookie found now.
        found: u64,
    },
    /// The pod has no IPv4 address among those the plugin reported (capture is
    /// IPv4-only).
    #[error("pod {pod} has no IPv4 address (capture is IPv4-only)")]
    NoIpv4 {
        /// The pod.
        pod: PodRef,
    },
    /// The daemon cannot decide yet whether the pod is meshed (no configuration from
    /// the controller yet); the runtime retries the pod.
    #[error("the daemon cannot enrol pod {pod} yet: {waiting_for}")]
    NotReady {
        /// The pod.
        pod: PodRef,
        /// What the daemon waits for, e.g. "configuration from the controller".
        waiting_for: String,
    },
    /// CHECK: the pod is meshed but not enrolled (or enrolled with another netns or
    /// container).
    #[error("pod {pod} is meshed but not enrolled{detail}")]
    NotEnrolled {
        /// The pod.
        pod: PodRef,
        /// More, starting with "; " or empty.
        detail: String,
    },
    /// A blocking task of the enroller panicked or was cancelled.
    #[error("the enrolment task of pod {pod} failed")]
    Task {
        /// The pod.
        pod: PodRef,
        /// What tokio reported.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EnrollServerError {
    /// The socket's directory could not be created.
    #[error("creating the enrolment socket directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The socket path has no file name or no parent directory.
    #[error("enrolment socket path {} has no file name", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// The path exists and is not a socket (never removed).
    #[error("{} exists and is not a socket; not replacing it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another process serves on the socket (another daemon?).
    #[error("another process is serving on the enrolment socket {}", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Inspecting, binding, setting the mode of or renaming the socket failed.
    #[error("{action} the enrolment socket {}", path.display())]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A running enrolment server. Dropping it stops accepting (in-flight requests are
/// abandoned unanswered); [`EnrollServer::shutdown`] also waits for them.
#[derive(Debug)]
pub struct EnrollServer {
    socket: PathBuf,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

/// Counters, for tests and metrics.
#[derive(Debug, Default)]
struct Stats {
    /// Requests read and decoded.
    requests: AtomicU64,
}

/// The socket file this server created: removed at the end unless another server
/// replaced it meanwhile.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// One lock per pod (namespace, name), to run a pod's requests one at a time; entries
/// go when nobody holds or waits for them.
#[derive(Debug, Default)]
struct PodLocks(Mutex<HashMap<PodKey, Arc<tokio::sync::Mutex<()>>>>);

/// A pod's namespace and name (not its uid, which the runtime may not pass).
type PodKey = (String, String);

/// A pod's turn; releasing it drops the lock's entry when nobody else wants it.
struct PodTurn {
    locks: Arc<PodLocks>,
    key: PodKey,
    guard: Option<OwnedMutexGuard<()>>,
}

/// What each connection needs.
struct Shared<E> {
    enroller: Arc<E>,
    config: EnrollConfig,
    locks: Arc<PodLocks>,
    stats: Arc<Stats>,
}

/// Why a request could not be read; answered as an `error`.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("no complete request within {0:?}")]
    TimedOut(Duration),
    #[error("request longer than {MAX_MESSAGE_LEN} bytes")]
    TooLong,
    #[error("reading the request")]
    Io(#[source] io::Error),
    #[error("invalid request")]
    Decode(#[source] DecodeError),
}

impl Default for EnrollConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            mode: 0o600,
            request_timeout: Duration::from_secs(5),
            handler_timeout: Duration::from_secs(25),
        }
    }
}

impl EnrollConfig {
    /// The defaults with another socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            ..Self::default()
        }
    }
}

impl EnrollServer {
    /// Binds the socket (see the module docs) and serves `enroller` on it until
    /// [`EnrollServer::shutdown`] or drop.
    pub async fn bind<E: Enroller>(
        config: EnrollConfig,
        enroller: Arc<E>,
    ) -> Result<Self, EnrollServerError> {
        let socket = config.socket.clone();
        let (listener, file) = bind_socket(&socket, config.mode)?;
        tracing::info!(socket = %config.socket.display(), mode = format_args!("{:o}", config.mode), "enrolment server listening");
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            enroller,
            config,
            locks: Arc::default(),
            stats: Arc::clone(&stats),
        });
        let task = tokio::spawn(serve(listener, file, shared, stopped));
        Ok(Self {
            socket,
            stop,
            task: Some(task),
            stats,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Requests read and decoded so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Stops accepting, removes the socket (unless another server replaced it), and
    /// waits for the requests in flight to be answered (each is bounded by the
    /// configured timeouts; wrap this in the daemon's drain deadline).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the enrolment server task failed");
        }
    }
}

impl Drop for EnrollServer {
    fn drop(&mut self) {
        // Ends the accept loop, which removes the socket; in-flight requests go with
        // the tasks when the runtime ends.
        let _ = self.stop.send(true);
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "removing the enrolment socket");
                }
            }
            // Replaced by another server, or gone: not ours to remove.
            _ => {}
        }
    }
}

impl PodLocks {
    /// Waits for the pod's turn.
    async fn turn(self: &Arc<Self>, pod: &PodRef) -> PodTurn {
        let key = (pod.namespace.clone(), pod.name.clone());
        let lock = Arc::clone(
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.clone())
                .or_default(),
        );
        PodTurn {
            locks: Arc::clone(self),
            key,
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for PodTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Clones are made under the map's lock: a count of one (the map's) means no
        // holder and no waiter.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// Prepares the path and binds: parent directories, the stale-socket check, a
/// temporary name given `mode`, then a rename into place.
fn bind_socket(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), EnrollServerError> {
    let bad_path = || EnrollServerError::BadPath {
        path: path.to_path_buf(),
    };
    let name = path.file_name().ok_or_else(bad_path)?;
    let dir = path.parent().ok_or_else(bad_path)?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::create_dir_all(dir).map_err(|source| EnrollServerError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let socket_error = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| EnrollServerError::Socket {
            action,
            path,
            source,
        }
    };

    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(EnrollServerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(socket = %path.display(), "replacing a stale enrolment socket");
        }
        Ok(_) => {
            return Err(EnrollServerError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(socket_error("inspecting", path)(source)),
    }

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(socket_error("removing the temporary name of", &tmp)(source)),
    }
    let listener = UnixListener::bind(&tmp).map_err(socket_error("binding", &tmp))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(socket_error("setting the mode of", &tmp))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(socket_error("renaming into place", path))
        })
        .and_then(|()| std::fs::symlink_metadata(path).map_err(socket_error("inspecting", path)));
    match placed {
        Ok(meta) => Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The accept loop; on stop it closes the listener, removes the socket and waits for
/// the connections in flight.
async fn serve<E: Enroller>(
    listener: UnixListener,
    file: SocketFile,
    shared: Arc<Shared<E>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // The value only ever goes to `true`: any change, or the sender's drop,
            // means stop.
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(handle(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    // E.g. out of file descriptors: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting on the enrolment socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "an enrolment connection task failed");
                }
            }
        }
    }
    drop(listener);
    drop(file);
    tracing::info!(
        in_flight = connections.len(),
        "enrolment server stopped accepting"
    );
    while connections.join_next().await.is_some() {}
}

/// One connection: read the request, run it, answer.
async fn handle<E: Enroller>(mut stream: UnixStream, shared: Arc<Shared<E>>) {
    let timeout = shared.config.request_timeout;
    let response = match read_request(&mut stream, timeout).await {
        Ok(None) => return,
        Ok(Some(request)) => {
            shared.stats.requests.fetch_add(1, Ordering::Relaxed);
            dispatch(request, &shared).await
        }
        Err(e) => {
            let message = error_chain(&e);
            tracing::warn!(error = %message, "bad enrolment request");
            Response::error(message)
        }
    };
    let line = match response.encode() {
        Ok(line) => line,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "encoding an enrolment answer");
            return;
        }
    };
    let write = async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "answering an enrolment request"),
        Err(_) => tracing::warn!(?timeout, "answering an enrolment request timed out"),
    }
}

/// Reads one request line; `None` when the client closed without sending anything.
async fn read_request(
    stream: &mut UnixStream,
    timeout: Duration,
) -> Result<Option<Request>, ReadError> {
    let limit = u64::try_from(MAX_MESSAGE_LEN).unwrap_or(u64::MAX) + 1;
    let mut reader = BufReader::new(stream.take(limit));
    let mut line = Vec::with_capacity(512);
    tokio::time::timeout(timeout, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| ReadError::TimedOut(timeout))?
        .map_err(ReadError::Io)?;
    if line.len() > MAX_MESSAGE_LEN {
        return Err(ReadError::TooLong);
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // A request closed by EOF instead of a newline is accepted as well.
    Request::decode(&line).map(Some).map_err(ReadError::Decode)
}

/// Runs the request in its own task (so that it completes even when its answer is
/// late) in the pod's turn, and turns the outcome into the answer.
async fn dispatch<E: Enroller>(request: Request, shared: &Shared<E>) -> Response {
    let command = request.command.name();
    let pod = request.command.pod().clone();
    let task = tokio::spawn({
        let enroller = Arc::clone(&shared.enroller);
        let locks = Arc::clone(&shared.locks);
        async move {
            let _turn = locks.turn(request.command.pod()).await;
            match request.command {
                Command::Add(p) => enroller.add(p).await.map(outcome_response),
                Command::Check(p) => enroller.check(p).await.map(outcome_response),
                Command::Del(p) => enroller
                    .del(p)
                    .await
                    .map(|()| Response::new(Status::Removed, "")),
            }
        }
    });
    let timeout = shared.config.handler_timeout;
    let response = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(response))) => response,
        Ok(Ok(Err(e))) => Response::error(error_chain(&e)),
        Ok(Err(e)) => Response::error(format!("{command} of pod {pod} failed: {e}")),
        Err(_) => Response::error(format!(
            "{command} of pod {pod} did not finish within {timeout:?} (it goes on in the daemon)"
        )),
    };
    match response.status {
        Status::Error => {
            tracing::warn!(command, %pod, error = %response.message, "enrolment request failed");
        }
        status => {
            tracing::info!(command, %pod, %status, message = %response.message, "enrolment request done");
        }
    }
    response
}

fn outcome_response(outcome: AddOutcome) -> Response {
    match outcome {
        AddOutcome::Enrolled => Response::new(Status::Enrolled, ""),
        AddOutcome::NotMeshed { reason } => Response::new(Status::NotMeshed, reason),
    }
}
