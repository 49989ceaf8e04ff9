//! The sample workload of the simulated cluster.
//!
//! One binary, six jobs:
//! - [`serve`]: an HTTP/1.1 + h2c echo server that reports which pod answered, with
//!   per-request and per-process failure injection and request counters ([`stats`]),
//!   plus a gRPC echo service ([`grpc`]), a raw TCP echo listener and a TCP discard
//!   sink;
//! - [`call`]: one HTTP request, printing the answer (a scriptable `curl`);
//! - [`grpc::run`]: a run of gRPC calls, counted by status and answering pod;
//! - [`load`]: a load client that counts answers by status, pod and version and prints
//!   one JSON [`load::Summary`];
//! - [`stream`]: bulk TCP throughput to the discard sink ([`stream::StreamSummary`]);
//! - [`hold`]: many open, idle TCP connections ([`hold::HoldReport`]).
//!
//! `cargo xtask bench` drives `load`, `stream` and `hold` inside the simulated cluster.
//!
//! Every entry point takes a typed, validated config struct; [`cli`] turns command-line
//! flags (with environment fallbacks) into those structs, so `main` only dispatches.
#![forbid(unsafe_code)]

pub mod call;
pub mod cli;
pub mod client;
pub mod grpc;
pub mod hold;
pub mod load;
pub mod serve;
pub mod stats;
pub mod stream;

/// Response header naming the pod that answered.
pub const POD_HEADER: &str = "x-echo-pod";
/// Response header naming the version of the workload that answered.
pub const VERSION_HEADER: &str = "x-echo-version";
/// Request header asking the server to answer with this status.
pub const STATUS_HEADER: &str = "x-echo-status";
/// Request header asking the server to answer with a body of exactly this many bytes
/// instead of the JSON description (fixed-size request/response benchmarks).
pub const RESPONSE_BYTES_HEADER: &str = "x-echo-response-bytes";
/// Request header asking the server to wait this many milliseconds before answering.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Path of the run-time failure-injection control endpoint.
pub const CONTROL_PATH: &str = "/_echo/control";
/// Path of the readiness endpoint (never subject to failure injection).
pub const HEALTH_PATH: &str = "/_echo/health";
/// Path of the per-process request counters ([`stats::Counts`]).
pub const STATS_PATH: &str = "/_echo/stats";
