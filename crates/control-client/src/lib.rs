//! The proxies' side of the control plane (DESIGN §3, §5): what the node daemon and
//! the waypoint both run to get their configuration and their certificates from the
//! controller. Nothing here is specific to either proxy.
//!
//! - [`discovery`]: [`Subscription`], the config subscriber task. `Hello` with the
//!   versions held (resume), full snapshots and deltas applied atomically to a
//!   proposed state, checked by the proxy's validator, then ACKed and published on a
//!   `watch` — or NACKed with the reason, keeping the previous state. The applied
//!   state is persisted as last-known-good and published again on start, so a proxy
//!   restarted while the controller is away serves on its cached config.
//! - [`certs`]: [`CertManager`], workload certificates. Keys are generated here and
//!   never leave the process (except to the optional 0700 cache directory); CSRs go
//!   to the controller's CA; certificates are renewed at half life and the old one is
//!   kept until it expires; [`CertManager::current`] is cheap enough for every TLS
//!   handshake.
//! - [`TokenSource`]: the bearer credential both services require, re-read on every
//!   connect (projected ServiceAccount tokens rotate).
//! - [`Backoff`]: capped exponential backoff with jitter, used for reconnects and
//!   certificate retries.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod certs;
pub mod discovery;
pub mod token;

mod fsutil;

pub use backoff::Backoff;
pub use certs::{CaClientConfig, CertManager, CertSnapshot, CertState, FetchError};
pub use discovery::{
    ConfigState, ProposedState, Rejection, StateSource, Subscriber, Subscription,
    SubscriptionConfig, SubscriptionCounters, SubscriptionStatus,
};
pub use token::{TokenError, TokenSource};

use std::time::Duration;

/// Default time allowed to establish a connection to the controller.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the gRPC endpoint for the controller: connect timeout, HTTP/2 keepalive
/// (so a controller that vanished without closing the connection — a partitioned
/// node, a killed pod — is noticed and the proxy reconnects elsewhere).
pub(crate) fn endpoint(
    uri: &tonic::transport::Uri,
    connect_timeout: Duration,
) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from(uri.clone())
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// Connects to the controller from TCP sockets carrying an `SO_MARK` (set before
/// `connect`, so that cgroup connect programs see it), for tonic's
/// `connect_with_connector`. Tries every address the host resolves to, in order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MarkedConnector {
    mark: u32,
}

impl MarkedConnector {
    pub(crate) fn new(mark: u32) -> Self {
        Self { mark }
    }
}

impl tower::Service<tonic::transport::Uri> for MarkedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            connect_marked(&uri, mark)
                .await
                .map(hyper_util::rt::TokioIo::new)
        })
    }
}

/// A TCP connection to `uri`'s host and port from a socket marked with `mark`.
async fn connect_marked(
    uri: &tonic::transport::Uri,
    mark: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    use std::io::{Error, ErrorKind};
    let host = uri
        .host()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("{uri} names no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(Error::new(e.kind(), format!("connecting to {addr}: {e}"))),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

/// An error and its sources on one line (`a: b: c`), for status dumps and logs.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // tonic and hyper often repeat the inner message in the outer one.
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `CAP_NET_ADMIN` (setting `SO_MARK`), as the sidecar does.
    #[tokio::test]
    async fn marked_connections_carry_the_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let uri: tonic::transport::Uri = format!("http://{addr}").parse().unwrap();
        let stream = connect_marked(&uri, 0x539).await.unwrap();
        let mark = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::Mark).unwrap();
        assert_eq!(mark, 0x539);
        assert!(stream.nodelay().unwrap());

        let nowhere: tonic::transport::Uri = "http://127.0.0.1:1".parse().unwrap();
        let err = connect_marked(&nowhere, 0x539).await.unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}
