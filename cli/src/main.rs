//! `ambitctl`: the operator CLI.
//!
//! Today it reads the admin endpoints every Ambit component serves; `check`,
//! `proxy-status` and `describe` arrive with the controller (issue 3).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use ambit_runtime::LogArgs;

#[derive(Debug, Parser)]
#[command(name = "ambitctl", version, about = "Ambit operator CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print a component's `/config_dump` (daemon, waypoint or controller admin port).
    ConfigDump {
        /// Admin address of the component.
        #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Ask a component whether it is ready; exits 1 and names the blockers if not.
    Ready {
        /// Readiness address of the component.
        #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "127.0.0.1:15021")]
        addr: SocketAddr,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ambit_runtime::init_tracing(&cli.log)?;
    // A CLI call is short; Ctrl-C simply ends the process, no drain needed.
    match cli.cmd {
        Cmd::ConfigDump { admin } => {
            let (status, body) = ambit_runtime::admin::get(admin, "/config_dump")
                .await
                .with_context(|| format!("fetching /config_dump from {admin}"))?;
            if !status.is_success() {
                bail!(
                    "{admin}/config_dump answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            println!("{}", String::from_utf8_lossy(&body).trim_end());
        }
        Cmd::Ready { addr } => {
            let (status, body) = ambit_runtime::admin::get(addr, "/healthz/ready")
                .await
                .with_context(|| format!("fetching /healthz/ready from {addr}"))?;
            let text = String::from_utf8_lossy(&body);
            println!("{}", text.trim_end());
            if !status.is_success() {
                bail!("{addr} is not ready ({status})");
            }
        }
    }
    Ok(())
}
