//! `ambit-echo`: parses flags and hands over to the library; see `ambit_echo::cli`.
#![forbid(unsafe_code)]

use std::{io::Write as _, process::ExitCode};

use ambit_echo::{
    call,
    cli::{Cli, Command},
    grpc, hold, load, serve, stream,
};
use anyhow::{Context as _, bail};
use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors exit 1 (not clap's 2): callers only distinguish 0 from 1.
            let code = if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
            let _ = e.print();
            return code;
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves when stdin reaches EOF (or fails): the caller's signal to stop holding.
async fn stdin_eof() {
    use tokio::io::AsyncReadExt as _;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    ambit_runtime::init_tracing(&cli.log)?;
    match cli.command {
        Command::Serve(args) => {
            // Registered before binding so an early SIGTERM is not lost.
            let shutdown = ambit_runtime::shutdown_signal()?;
            let config = args.into_config()?;
            tracing::info!(?config, "starting");
            let bound = serve::bind(config).await?;
            bound.run(shutdown).await;
        }
        Command::Call(args) => {
            let expect = args.expect_status;
            let url = args.url.to_string();
            let resp = call::run(args.into_config()?)
                .await
                .with_context(|| format!("request to {url}"))?;
            eprintln!("HTTP {}", resp.status.as_u16());
            let mut out = std::io::stdout().lock();
            out.write_all(&resp.body)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
                .context("writing the response to stdout")?;
            if let Some(want) = expect
                && resp.status.as_u16() != want
            {
                bail!("expected status {want}, got {}", resp.status.as_u16());
            }
        }
        Command::Grpc(args) => {
            let summary = grpc::run(args.into_config()).await?;
            let json = serde_json::to_string(&summary).context("serializing the summary")?;
            println!("{json}");
        }
        Command::Load(args) => {
            let summary = load::run(args.into_config()?).await?;
            let json = serde_json::to_string(&summary).context("serializing the summary")?;
            println!("{json}");
        }
        Command::Stream(args) => {
            let summary = stream::run(args.into_config()).await?;
            let json = serde_json::to_string(&summary).context("serializing the summary")?;
            println!("{json}");
        }
        Command::Hold(args) => {
            // Registered first so a SIGTERM while connecting is not lost.
            let shutdown = ambit_runtime::shutdown_signal()?;
            let held = hold::open(args.into_config()).await?;
            let json = serde_json::to_string(&held.report).context("serializing the report")?;
            {
                let mut out = std::io::stdout().lock();
                out.write_all(json.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .and_then(|()| out.flush())
                    .context("writing the report to stdout")?;
            }
            let signalled = tokio::select! {
                () = stdin_eof() => false,
                _ = shutdown => true,
            };
            drop(held);
            if signalled {
                // The blocking stdin read cannot be cancelled and would keep the
                // runtime from shutting down; the connections are closed already.
                std::process::exit(0);
            }
        }
    }
    Ok(())
}
