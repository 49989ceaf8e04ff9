//! `ambit-controller`: config sources, push to the proxies, certificate authority.
//!
//! Thin: parse the configuration, set up tracing and the crypto provider, build (bind
//! every listener), serve, wait for SIGTERM/SIGINT, drain with a deadline. Everything
//! else is in the library ([`ambit_controller::app`]).
#![forbid(unsafe_code)]

use clap::Parser;

use ambit_controller::app::{self, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    ambit_runtime::init_tracing(&config.log)?;
    // The Kubernetes client's TLS uses the process default provider: the mesh's.
    let _ = rustls::crypto::CryptoProvider::install_default(
        ambit_identity::tls::crypto_provider().as_ref().clone(),
    );
    let shutdown = ambit_runtime::shutdown_signal()?;
    tracing::info!(?config, "starting ambit-controller");
    let bound = app::build(&config).await?;
    bound.serve().wait_termination(shutdown).await?;
    Ok(())
}
