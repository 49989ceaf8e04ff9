//! `ambit-waypoint`: the L7 proxy placed in front of a service or namespace.
//!
//! Thin: parse the configuration, set up tracing, build (which installs the crypto
//! provider and binds every listener), serve until SIGTERM/SIGINT, drain with a
//! deadline. Everything else is in the library ([`ambit_waypoint::app`]).
#![forbid(unsafe_code)]

use clap::Parser;

use ambit_waypoint::app::{self, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    ambit_runtime::init_tracing(&config.log)?;
    let shutdown = ambit_runtime::shutdown_signal()?;
    tracing::info!(?config, "starting ambit-waypoint");
    let bound = app::build(config).await?;
    bound
        .wait_termination(async move {
            shutdown.await;
        })
        .await;
    Ok(())
}
