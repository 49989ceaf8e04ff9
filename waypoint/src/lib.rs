//! The waypoint: an L7 proxy between HBONE tunnels (DESIGN §4).
//!
//! ```text
//! app (controller subscription, certificate, admin/metrics, drain)
//!   └─ inbound::DataPlane — HBONE server (mTLS with the waypoint's identity)
//!       CONNECT target must be a fronted Service VIP:port or a bound pod (else 400)
//!       ├─ TCP (declared, or not HTTP on the first bytes): L4 authorization, an
//!       │   endpoint over HBONE, bytes copied
//!       └─ HTTP/1.1, HTTP/2, gRPC (hyper) — per request, a tower stack:
//!           Telemetry (metrics, access log, trace context)
//!             └─ authorization (targetRefs policies; 403)
//!                 └─ Router (route selection, redirect / direct response, rewrite,
//!                     header modifiers, weighted destination)
//!                     └─ Fault (delay, then abort)
//!                         └─ Mirror (copies sent fire-and-forget to the upstream below)
//!                             └─ Timeout (whole request, 504)
//!                                 └─ Retry (per-try timeout, conditions, backoff, replay)
//!                                     └─ Pool (connectionPool limits, 503 UO)
//!                                         └─ upstream::HttpUpstream (endpoint choice
//!                                             with outlier detection and previous-host
//!                                             avoidance; HBONE, reused connections)
//! ```
//!
//! Configuration arrives as controller resources and is compiled into an immutable
//! [`snapshot::Snapshot`] per change; each connection and request takes the current
//! one. The router passes each forwarded request's policies down as request
//! extensions ([`fault::FaultPolicy`], [`mirror::MirrorPolicy`],
//! [`timeout::RequestTimeout`], [`retry::RetryPolicy`], [`router::Destination`]), so
//! every layer also works on its own; [`context::RequestContext`] carries the caller
//! and the snapshot.
//!
//! Not here yet (issue 5): WebSocket / `Upgrade` requests.
#![forbid(unsafe_code)]

pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod context;
pub mod detect;
pub mod fault;
pub mod inbound;
pub mod mirror;
pub mod modify;
pub mod otlp;
pub mod outlier;
pub mod pool;
pub mod retry;
pub mod rng;
pub mod router;
pub mod routes;
pub mod snapshot;
pub mod telemetry;
pub mod timeout;
pub mod upstream;

pub use body::{BoxError, ProxyBody};
