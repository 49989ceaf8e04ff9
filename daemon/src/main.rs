//! `ambit-node`: the per-node daemon.
//!
//! Thin: parse the configuration, set up tracing, build (which installs the crypto
//! provider and binds every listener), serve until SIGTERM/SIGINT, drain with a
//! deadline. Everything else is in the library ([`ambit_node::app`]).
#![forbid(unsafe_code)]

use clap::Parser;

use ambit_node::app::{self, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    ambit_runtime::init_tracing(&config.log)?;
    let shutdown = ambit_runtime::shutdown_signal()?;
    tracing::info!(?config, "starting ambit-node");
    let bound = app::build(config).await?;
    bound
        .wait_termination(async move {
            shutdown.await;
        })
        .await;
    Ok(())
}
