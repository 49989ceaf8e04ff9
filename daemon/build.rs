//! Builds the eBPF programs (`ebpf/ambit-ebpf`) for the BPF target with aya-build and
//! leaves the object at `$OUT_DIR/ambit-ebpf`, where `src/ebpf.rs` embeds it.
//!
//! aya-build runs `rustup run nightly cargo build -Z build-std=core --target
//! bpfel-unknown-none` in a target directory of its own under `OUT_DIR`, so it needs the
//! nightly toolchain with `rust-src` and `bpf-linker` on `PATH`. `AYA_BUILD_SKIP=1`
//! skips that build (for quick `cargo check`/`clippy` runs) and embeds an empty object,
//! which the loader refuses at run time.
//!
//! `ambit-ebpf` is also a build-dependency (its library target is an empty stub), so
//! cargo reruns this script when that crate, `ambit-ebpf-common` or `aya-ebpf` change.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// Name of the eBPF package and of its binary (the object copied to `OUT_DIR`).
const EBPF_PACKAGE: &str = "ambit-ebpf";

/// What a machine lacking the eBPF toolchain should run.
const SETUP_HINT: &str = "building the eBPF programs needs the nightly toolchain with \
     rust-src and bpf-linker 0.10.4; run `cargo xtask setup` (or: `rustup toolchain install \
     nightly --component rust-src` and `cargo install bpf-linker@0.10.4 --locked`), or set \
     AYA_BUILD_SKIP=1 for a check-only build that cannot load programs";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_PACKAGE);
    let ebpf_dir = manifest_dir
        .parent()
        .context("daemon crate has no parent directory")?
        .join("ebpf")
        .join(EBPF_PACKAGE);
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", ebpf_dir.display()))?;

    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if skip_requested() {
        // Leave an empty object so that `include_bytes!` still compiles.
        println!("cargo:warning=AYA_BUILD_SKIP is set: the eBPF programs are not built");
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    }

    check_toolchain()?;
    println!("cargo:rerun-if-env-changed=PATH");
    quiet_inner_cargo();

    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir_str,
            ..Package::default()
        }],
        Toolchain::Nightly,
    )
    .with_context(|| {
        format!(
            "building {EBPF_PACKAGE} for the BPF target failed (its errors are the \
             warnings above); if the toolchain is at fault: {SETUP_HINT}"
        )
    })?;

    if !object.is_file() {
        bail!("aya-build produced no {}; {SETUP_HINT}", object.display());
    }
    Ok(())
}

/// aya-build relays every line the inner cargo prints as a `cargo:warning`, so each
/// rebuild would show ~30 "Compiling …" warnings; compiler diagnostics and errors still
/// come through with `CARGO_TERM_QUIET`.
fn quiet_inner_cargo() {
    if env::var_os("CARGO_TERM_QUIET").is_none() {
        // SAFETY: build scripts are single-threaded here: no other thread reads the
        // environment while it is modified.
        #[expect(unsafe_code, reason = "env::set_var is unsafe in edition 2024")]
        unsafe {
            env::set_var("CARGO_TERM_QUIET", "true");
        }
    }
}

/// Mirrors aya-build's own test of `AYA_BUILD_SKIP`.
fn skip_requested() -> bool {
    env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Fails early, with the command that fixes it, when a piece of the eBPF toolchain is
/// missing: aya-build's own errors would bury that in cargo's output.
fn check_toolchain() -> anyhow::Result<()> {
    let Some(linker) = find_in_path("bpf-linker") else {
        bail!("bpf-linker not found on PATH; {SETUP_HINT}");
    };
    // Relink when bpf-linker is reinstalled (the eBPF crate's build.rs does the same for
    // the inner build).
    println!("cargo:rerun-if-changed={}", linker.display());

    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .with_context(|| format!("running `rustup run nightly rustc`; {SETUP_HINT}"))?;
    if !sysroot.status.success() {
        bail!(
            "the nightly toolchain is not usable ({}); {SETUP_HINT}",
            String::from_utf8_lossy(&sysroot.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        bail!(
            "the nightly toolchain lacks rust-src ({} missing); {SETUP_HINT}",
            core_src.display()
        );
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
