//! The waypoint's L7 routing core, independent of the transport.
//!
//! The request path is a stack of `tower` layers (STYLE §3):
//!
//! ```text
//! Router (route selection, redirect / direct response, rewrite, header modifiers,
//!         weighted destination)
//!   └─ Fault (delay, then abort)
//!       └─ Timeout (whole request, 504)
//!           └─ Retry (per-try timeout, retry conditions, backoff, body replay)
//!               └─ upstream: any `tower::Service<http::Request<ProxyBody>>`
//! ```
//!
//! The router compiles a proto [`RouteSet`](ambit_api::config::v1::RouteSet) with
//! [`routes::RouteTable::try_from_proto`] and passes each forwarded request's policies
//! down as request extensions ([`fault::FaultPolicy`], [`timeout::RequestTimeout`],
//! [`retry::RetryPolicy`], [`router::Destination`]), so every layer also works on its
//! own. Endpoint choice within a destination (subsets and load balancing) lives in
//! [`balance`], for the upstream to apply.
//!
//! Not here yet (issue 5): sending mirrors (compiled into
//! [`routes::Forward::mirrors`], never sent), connection-pool limits and outlier
//! detection from the DestinationPolicy, L7 authorization, telemetry, and the HBONE
//! listener and upstream this stack plugs between.
#![forbid(unsafe_code)]

pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod context;
pub mod detect;
pub mod fault;
pub mod inbound;
pub mod modify;
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
