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
//! One module per concern, everything re-exported at the root:
//! - [`connect`]: the connect4 probe's counters (a smoke test of load, attach, readback);
//! - [`capture`]: in-pod capture (original destinations, enrolled pods, listeners).
#![cfg_attr(not(test), no_std)]

pub mod capture;
pub mod connect;

pub use capture::{
    CAPTURE_MAPS, CONNECT4_CAPTURE_PROGRAM, CONNECT6_CAPTURE_PROGRAM, CaptureSettings,
    EXCLUDED_CIDRS_MAP, EXCLUDED_PORTS_MAP, Exclusion, HBONE_PORT, INBOUND_PORT,
    INBOUND_SOCKETS_MAP, LAYOUT_VERSION, ListenerKey, MAX_EXCLUSIONS, MAX_INBOUND_SOCKETS,
    MAX_ORIG_DST, MAX_PODS, ORIG_DST_BY_SOCKET_MAP, ORIG_DST_MAP, OUTBOUND_PORT, OrigDstKey,
    OrigDstV4, PODS_BY_IP_MAP, PODS_BY_NETNS_MAP, PodEntry, SETTINGS_MAP,
    SK_LOOKUP_CAPTURE_PROGRAM, SOCKOPS_CAPTURE_PROGRAM, ipv4_from_wire, ipv4_to_wire,
};
pub use connect::{CONNECT_COUNTS_MAP, CONNECT_COUNTS_MAX_ENTRIES, CONNECT4_PROGRAM, ConnectKey};
