//! The Ambit node daemon as a library: everything `main` wires together, so that tests
//! can drive it.
//!
//! - [`ebpf`]: the embedded eBPF programs and typed handles to load and attach them.
//! - [`netns`]: running code in a pod's network namespace; the daemon's socket options.
//! - [`capture`]: in-pod eBPF capture (enrolment, listeners, original destinations).
//! - [`enroll`]: the enrolment server the `ambit-cni` plugin talks to.
//! - [`pods`]: the enrolled pods (membership from the controller, identities).
//! - [`proxy`]: the per-pod L4 proxies; [`metrics`]: Istio's TCP metrics.
//! - [`sidecar`]: sidecar mode, the same capture and proxies run inside one pod.
//! - [`app`]: everything assembled: build, serve, drain.
#![deny(unsafe_code)]

pub mod app;
pub mod capture;
pub mod ebpf;
pub mod enroll;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod sidecar;
