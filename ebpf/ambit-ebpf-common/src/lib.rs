//! Types shared by Ambit's eBPF programs (`ambit-ebpf`) and the daemon that loads them.
//!
//! Every map key and value is `#[repr(C)]` with its padding spelled out as named fields,
//! so that both sides agree on the layout byte for byte and no uninitialised padding
//! reaches the kernel (the verifier rejects reads of it, and hash lookups would compare
//! garbage). Each type states the byte order of each field.
//!
//! Programs and maps are found by name from user space; the names live here as
//! constants so that the two sides cannot drift apart silently (the daemon's loader
//! fails with the name it could not find).
//!
//! Layout of this crate as capture grows: one module per concern (`connect` for the
//! connect4 counters today; the original-destination types keyed by socket cookie and
//! by (netns cookie, port) go in a `capture` module beside it), everything re-exported
//! at the root.
#![cfg_attr(not(test), no_std)]

pub mod connect;

pub use connect::{CONNECT_COUNTS_MAP, CONNECT_COUNTS_MAX_ENTRIES, CONNECT4_PROGRAM, ConnectKey};
