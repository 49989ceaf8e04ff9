//! The Ambit node daemon as a library: everything `main` wires together, so that tests
//! can drive it.
//!
//! - [`ebpf`]: the embedded eBPF programs and typed handles to load and attach them.
#![deny(unsafe_code)]

pub mod ebpf;
