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
