//! Compiles `proto/` (workspace root) into Rust with protox (no `protoc` needed) and
//! tonic's prost code generator.

use std::path::PathBuf;

use anyhow::Context as _;

const PROTOS: &[&str] = &[
    "ambit/ca/v1/ca.proto",
    "ambit/config/v1/common.proto",
    "ambit/config/v1/discovery.proto",
    "ambit/config/v1/route.proto",
    "ambit/config/v1/security.proto",
    "ambit/config/v1/workload.proto",
];

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }

    let fds = protox::compile(PROTOS, [&proto_root])
        .with_context(|| format!("compiling protos under {}", proto_root.display()))?;

    tonic_prost_build::configure()
        // BTreeMap makes encoding deterministic, which resource versions (content
        // hashes) rely on.
        .btree_map(".")
        .compile_fds(fds)
        .context("generating Rust from the file descriptor set")?;
    Ok(())
}
