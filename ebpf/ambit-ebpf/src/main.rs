//! Ambit's eBPF programs, built for `bpfel-unknown-none` by the daemon's `build.rs`
//! (aya-build) and embedded in the daemon, which loads them with aya.
//!
//! - `probe_connect4` (here): counts connects per destination, a smoke test of load,
//!   attach and map readback.
//! - [`capture`]: in-pod traffic capture (connect4/6, sockops, sk_lookup).
//!
//! Built for the host (as `cargo clippy --workspace` and `cargo test --workspace` do),
//! the programs still type-check but the binary is an empty `main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no `AtomicU64::fetch_add` (no compare-and-swap in the target spec),
// but LLVM lowers the intrinsic to BPF's native atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "core_intrinsics for atomic_xadd, see above"
    )
)]
#![expect(
    unsafe_code,
    reason = "eBPF programs read their kernel context through raw pointers and export \
              unmangled symbols in named ELF sections"
)]

mod capture;

use ambit_ebpf_common::{CONNECT_COUNTS_MAX_ENTRIES, ConnectKey};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};

/// Returned by `cgroup/connect4` to let the `connect()` proceed.
const ALLOW: i32 = 1;

/// `IPPROTO_TCP` from `<netinet/in.h>`.
const IPPROTO_TCP: u32 = 6;

/// TCP `connect()` calls per destination; the map name must equal
/// [`ambit_ebpf_common::CONNECT_COUNTS_MAP`] (the daemon looks it up by that name).
#[map]
static CONNECT_COUNTS: HashMap<ConnectKey, u64> =
    HashMap::with_max_entries(CONNECT_COUNTS_MAX_ENTRIES, 0);

/// Counts TCP `connect()` calls from the attached cgroup per destination, and allows
/// every one of them.
///
/// Named differently from its section (`connect4`): a function named like its own
/// section clashes at link time.
#[cgroup_sock_addr(connect4)]
pub fn probe_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime; the
    // verifier checks each field access (aligned 4-byte reads here).
    let (protocol, ip, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.protocol, sa.user_ip4, sa.user_port)
    };
    if protocol == IPPROTO_TCP {
        // `user_port` holds the port in network order in its low 16 bits.
        count(&ConnectKey::new(ip, u16::from_be(port as u16)));
    }
    ALLOW
}

/// Adds one to the counter for `key`, creating it at 1 when absent.
#[inline(always)]
fn count(key: &ConnectKey) {
    for _ in 0..2 {
        if let Some(value) = CONNECT_COUNTS.get_ptr_mut(key) {
            // SAFETY: the kernel returned a pointer to this entry's 8-byte, 8-aligned value,
            // valid while the program runs.
            unsafe { atomic_add(value, 1) };
            return;
        }
        // Fails only when another CPU created the entry first (then add to it on the
        // second pass) or the map is full (then the connect goes uncounted).
        if CONNECT_COUNTS
            .insert(key, 1, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return;
        }
    }
}

/// Adds `n` to `*dst` atomically: other CPUs may update the same counter concurrently.
///
/// # Safety
///
/// `dst` must be valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, n: u64) {
    // SAFETY: the caller guarantees `dst` is valid and aligned.
    #[cfg(target_arch = "bpf")]
    unsafe {
        // The result is unused, so this is a plain `lock add` (no fetch), which every
        // kernel with BPF atomics accepts.
        let _: u64 = core::intrinsics::atomic_xadd::<
            u64,
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(dst, n);
    }
    // SAFETY: the caller guarantees `dst` is valid and aligned.
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(dst)
            .fetch_add(n, core::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Never runs: the verifier rejects infinite loops, so a program that could reach
    // this would not load at all.
    loop {}
}

/// The kernel only lets GPL-compatible programs call some helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
