//! Compiles `proto/ambit/echo/v1/echo.proto` (the gRPC echo service) with protox (no
//! `protoc` needed) and tonic's prost code generator.

use std::path::PathBuf;

use anyhow::Context as _;

const PROTO: &str = "ambit/echo/v1/echo.proto";

fn main() -> anyhow::Result<()> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join(PROTO).display()
    );
    let fds = protox::compile([PROTO], [&proto_root])
        .with_context(|| format!("compiling {PROTO} under {}", proto_root.display()))?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(fds)
        .context("generating Rust from the file descriptor set")?;
    Ok(())
}
