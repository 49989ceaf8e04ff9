//! `ambit-controller`: config sources, push to the proxies, certificate authority.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use clap::Parser;

use ambit_runtime::{
    AdminArgs, AdminServers, DrainArgs, LogArgs, admin::Route, readiness::Readiness,
};

/// Controller configuration; every flag also reads an environment variable.
#[derive(Clone, Debug, Parser, serde::Serialize)]
#[command(name = "ambit-controller", version, about = "Ambit controller")]
struct Config {
    /// Local mode: read Kubernetes YAML from this directory instead of an API server.
    #[arg(long, env = "AMBIT_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Address of the gRPC server (config push and certificate authority).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:15012")]
    grpc_addr: std::net::SocketAddr,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of issued workload certificates.
    #[arg(long, env = "CERT_TTL", default_value = "24h", value_parser = ambit_runtime::parse_duration)]
    cert_ttl: Duration,
    /// Where the generated root CA and other state are persisted (local mode).
    #[arg(
        long,
        env = "AMBIT_STATE_DIR",
        default_value = "/var/lib/ambit/controller"
    )]
    state_dir: PathBuf,
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
    tracing::info!(?config, "starting ambit-controller");

    let readiness = Readiness::new();
    // Released once the first full read of the config source is indexed (issue 3).
    let _sync_blocker = readiness.register("initial sync of the config source");
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
