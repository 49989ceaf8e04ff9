//! `cargo xtask …`: set-up, tests, the simulated cluster, the demo and the benchmark.
//!
//! Every command that needs tools installs them first (idempotently), so the README's
//! two commands work on a fresh machine.

mod bench;
mod cluster;
mod demo;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Ambit project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what this machine lacks for building and testing (idempotent).
    Setup(setup::SetupArgs),
    /// Set up, then run formatting and lint checks and every test.
    Test(test::TestArgs),
    /// Manage the simulated cluster.
    Cluster(cluster::ClusterArgs),
    /// Set up, bring the default topology up, show traffic on it, tear it down.
    Demo(demo::DemoArgs),
    /// Set up, build release binaries, measure the mesh against no mesh on the
    /// simulated cluster; report in target/bench/.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XTASK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Setup(args) => setup::run(&args),
        Cmd::Test(args) => test::run(&args),
        Cmd::Cluster(args) => cluster::run(args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench(args) => bench::run(&args),
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
