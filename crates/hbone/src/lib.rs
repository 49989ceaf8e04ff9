//! HBONE: TCP tunnelled in HTTP/2 `CONNECT` streams over TLS 1.3 mutual
//! authentication, on port 15008 (DESIGN §3), wire-compatible with Istio ztunnel.
//!
//! Wire contract:
//! - TLS 1.3 only, AES-GCM suites (ambit-identity's provider), ALPN `h2`, no SNI. The
//!   server picks its certificate by the LOCAL address a connection arrived on
//!   ([`ServerCredentials`]); the client accepts only the exact destination identity it
//!   dialled ([`ambit_identity::tls::SpiffeServerVerifier`]).
//! - One HTTP/2 `CONNECT` stream per tunnelled TCP connection: `:authority` is the
//!   original destination `ip:port`; request headers `forwarded: for=<client ip>`
//!   (RFC 7239), `traceparent` (W3C), `baggage`.
//! - The server answers `200` only once its policy hook passed AND the upstream is
//!   connected; `400` for a malformed request or a target that is not served here,
//!   `401` for a policy denial, `503` when the upstream could not be reached
//!   ([`Refusal`]).
//! - Large flow-control windows ([`Http2Config`]), HTTP/2 PING keepalive both ways,
//!   graceful GOAWAY on drain.
//!
//! The client side is a [`Pool`] of connections keyed by (source identity,
//! destination identity, destination address) carrying many streams each; the server
//! side is a [`Server`] calling a [`Handler`] per `CONNECT`. Byte copying between a
//! tunnel and a socket is [`copy_bidirectional`] (half-close propagated both ways).
#![forbid(unsafe_code)]

mod client;
mod config;
mod credentials;
mod headers;
mod keepalive;
mod server;
mod stream;
pub mod tls;

pub use client::{ConnectError, ConnectRequest, Dialer, EstablishError, Pool, TcpDialer};
pub use config::{Http2Config, Keepalive, PoolConfig, ServerConfig};
pub use credentials::{
    CertStore, Credentials, IdentityByAddress, ServerCredentials, SingleIdentity,
};
pub use headers::{Baggage, HeaderError, Traceparent, forwarded_for, parse_forwarded_for};
pub use server::{
    BindError, DrainReport, Handler, InboundRequest, Refusal, Server, ServerHandle, ServerStats,
    Upstream,
};
pub use stream::{
    CopyError, HboneStream, Transferred, copy_bidirectional, copy_bidirectional_counted,
    copy_bidirectional_split,
};

/// The HBONE port (DESIGN §2: every enrolled pod's HBONE listener).
pub const HBONE_PORT: u16 = 15008;

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";
