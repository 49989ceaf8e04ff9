//! `cargo xtask cluster` — filled in by the simulated-cluster work.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {}
pub fn run(_args: ClusterArgs) -> anyhow::Result<()> { Ok(()) }
