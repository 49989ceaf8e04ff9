//! The plugin's side of the protocol: one blocking request with a deadline.
//!
//! Blocking on purpose: the plugin is a short-lived process making one call, so it
//! needs no runtime.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::protocol::{Command, DecodeError, EncodeError, MAX_MESSAGE_LEN, Request, Response};

/// Default path of the daemon's enrolment socket.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// Talks to the daemon's enrolment socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket (absent, or the daemon is down).
    #[error("connecting to the ambit node daemon at {}", socket.display())]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// What `connect` reported.
        #[source]
        source: io::Error,
    },
    /// The request could not be encoded.
    #[error("encoding the request")]
    Encode(#[source] EncodeError),
    /// Sending the request or reading the answer failed.
    #[error("talking to the ambit node daemon at {}", socket.display())]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// No answer within the timeout.
    #[error("the ambit node daemon at {} did not answer within {timeout:?}", socket.display())]
    TimedOut {
        /// The socket path.
        socket: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
    /// The daemon closed the connection without a (complete) answer.
    #[error("the ambit node daemon at {} closed the connection without answering", socket.display())]
    Closed {
        /// The socket path.
        socket: PathBuf,
    },
    /// The answer could not be read.
    #[error("reading the answer of the ambit node daemon at {}", socket.display())]
    Response {
        /// The socket path.
        socket: PathBuf,
        /// What was wrong with it.
        #[source]
        source: DecodeError,
    },
}

impl Client {
    /// A client for the daemon listening on `socket`; each call gives up after
    /// `timeout` (connecting, sending and waiting for the answer together).
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `command` and waits for the daemon's answer.
    pub fn call(&self, command: Command) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let line = Request::new(command)
            .encode()
            .map_err(ClientError::Encode)?;
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_write_timeout(Some(self.remaining(deadline)?))
            .map_err(|e| self.io_error(e))?;
        stream.write_all(&line).map_err(|e| self.io_error(e))?;

        let mut answer = Vec::with_capacity(256);
        let mut buf = [0; 4096];
        loop {
            stream
                .set_read_timeout(Some(self.remaining(deadline)?))
                .map_err(|e| self.io_error(e))?;
            match stream.read(&mut buf) {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        socket: self.socket.clone(),
                    });
                }
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if let Some(end) = answer.iter().position(|b| *b == b'\n') {
                        return Response::decode(&answer[..=end]).map_err(|source| {
                            ClientError::Response {
                                socket: self.socket.clone(),
                                source,
                            }
                        });
                    }
                    if answer.len() > MAX_MESSAGE_LEN {
                        return Err(ClientError::Response {
                            socket: self.socket.clone(),
                            source: DecodeError::TooLong,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// Time left until `deadline`; an error once it has passed (a zero timeout would
    /// mean "block forever" to the socket).
    fn remaining(&self, deadline: Instant) -> Result<Duration, ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timed_out())
        } else {
            Ok(left)
        }
    }

    /// Socket timeouts show up as `WouldBlock` or `TimedOut`.
    fn io_error(&self, source: io::Error) -> ClientError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(),
            _ => ClientError::Io {
                socket: self.socket.clone(),
                source,
            },
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::TimedOut {
            socket: self.socket.clone(),
            timeout: self.timeout,
        }
    }
}
