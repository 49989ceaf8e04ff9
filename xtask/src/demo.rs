//! `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}
pub fn run(_args: &DemoArgs) -> anyhow::Result<()> { Ok(()) }
