//! `cargo xtask setup` — filled in by the eBPF/set-up work.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {}
pub fn run(_args: &SetupArgs) -> anyhow::Result<()> { Ok(()) }
