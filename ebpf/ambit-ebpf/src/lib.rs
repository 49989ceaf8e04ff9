//! Library target of the eBPF crate, empty on purpose: it gives the daemon something
//! to name as a build-dependency, so that cargo reruns the daemon's `build.rs` (which
//! builds the programs in `main.rs` for the BPF target) when this crate or its
//! dependencies change.
#![no_std]
