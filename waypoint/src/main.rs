//! `ambit-waypoint`: the L7 proxy placed in front of a service or namespace.
#![forbid(unsafe_code)]

use clap::Parser;

use ambit_runtime::{
    AdminArgs, AdminServers, DrainArgs, LogArgs, admin::Route, readiness::Readiness,
};

/// Waypoint configuration; every flag also reads an environment variable.
#[derive(Clone, Debug, Parser, serde::Serialize)]
#[command(name = "ambit-waypoint", version, about = "Ambit waypoint (L7 proxy)")]
struct Config {
    /// Name of the waypoint (its Gateway object).
    #[arg(long, env = "WAYPOINT_NAME")]
    name: String,
    /// Namespace of the waypoint's Gateway.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Controller gRPC address (config stream and certificate authority).
    #[arg(
        long,
        env = "CONTROLLER_ADDR",
        default_value = "http://127.0.0.1:15012"
    )]
    controller_addr: String,
    #[command(flatten)]
    #[serde(skip)]
    admin: AdminArgs,
    #[command(flatten)]
    #[serde(skip)]
    drain: DrainArgs,
    #[command(flatten)]
    #[serde(skip)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    ambit_runtime::init_tracing(&config.log)?;
    let shutdown = ambit_runtime::shutdown_signal()?;
    tracing::info!(?config, "starting ambit-waypoint");

    let readiness = Readiness::new();
    // Released once routes from the controller and the waypoint's certificate are in
    // place (issue 5).
    let _config_blocker = readiness.register("config from the controller");
    let dump = config.clone();
    let admin = AdminServers::start(
        &config.admin,
        &readiness,
        vec![Route::json(
            "/config_dump",
            move || serde_json::json!({ "config": &dump }),
        )],
    )
    .await?;

    shutdown.await;
    ambit_runtime::drain_with_deadline(config.drain.drain_timeout, admin.shutdown()).await;
    Ok(())
}
