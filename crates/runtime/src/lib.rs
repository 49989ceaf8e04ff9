//! Process skeleton shared by every Ambit binary.
//!
//! A binary's `main` parses its clap config (which flattens [`LogArgs`]), calls
//! [`init_tracing`], builds and binds its servers, then waits on [`shutdown_signal`]
//! and drains with a deadline. Nothing here reads the environment directly: clap's
//! `env` fallbacks do that once, at parse time.
#![forbid(unsafe_code)]

pub mod admin;
pub mod logging;
pub mod readiness;

use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Logging flags every binary flattens into its config.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,ambit_node=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
}

/// Errors setting up the process.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid log filter {filter:?}")]
    LogFilter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("installing the tracing subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
    #[error("installing the {0} signal handler")]
    Signal(&'static str, #[source] std::io::Error),
}

/// Installs the global tracing subscriber. Logs go to stderr so that a binary's
/// stdout stays free for its output (the echo load client prints JSON there). The
/// filter can be changed later through [`logging::LogControl::global`] (served as
/// `/logging` by [`AdminServers`]).
pub fn init_tracing(args: &LogArgs) -> Result<(), RuntimeError> {
    let filter = EnvFilter::try_new(&args.log_level).map_err(|source| RuntimeError::LogFilter {
        filter: args.log_level.clone(),
        source,
    })?;
    let (filter, control) = logging::LogControl::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let res = match args.log_format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    res.map_err(RuntimeError::Subscriber)?;
    // Only the first subscriber installs: this one did, so its control is the first.
    control.install_global();
    Ok(())
}

/// An error with its causes, on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    Terminate,
    Interrupt,
}

/// Registers SIGTERM and SIGINT handlers now and returns a future that resolves on the
/// first of them. Registering eagerly means a signal that arrives while the binary is
/// still binding its listeners is not lost.
pub fn shutdown_signal()
-> Result<impl std::future::Future<Output = Shutdown> + Send + 'static, RuntimeError> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| RuntimeError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| RuntimeError::Signal("SIGINT", e))?;
    Ok(async move {
        let which = tokio::select! {
            _ = term.recv() => Shutdown::Terminate,
            _ = int.recv() => Shutdown::Interrupt,
        };
        tracing::info!(signal = ?which, "shutdown requested");
        which
    })
}

/// Where a long-running component serves readiness and its admin endpoints.
#[derive(Clone, Debug, Args)]
pub struct AdminArgs {
    /// Address for `GET /healthz/ready` (Istio's readiness port is 15021).
    #[arg(long, env = "READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: std::net::SocketAddr,
    /// Address for the admin endpoints (`/config_dump`, …); keep it on loopback.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,
}

/// The readiness and admin servers of one component, bound and serving.
#[derive(Debug)]
pub struct AdminServers {
    pub readiness_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    readiness: admin::Serving,
    admin: admin::Serving,
}

impl AdminServers {
    /// Binds both listeners, then serves them. Readiness answers only
    /// `/healthz/ready`; the admin listener answers it too, `/logging` (see
    /// [`logging`]), and `routes`.
    pub async fn start(
        args: &AdminArgs,
        readiness: &readiness::Readiness,
        mut routes: Vec<admin::Route>,
    ) -> Result<Self, admin::AdminError> {
        if !routes.iter().any(|r| r.path == logging::PATH) {
            routes.push(logging::route());
        }
        let ready = admin::bind(args.readiness_addr, readiness.clone(), Vec::new()).await?;
        let admin = admin::bind(args.admin_addr, readiness.clone(), routes).await?;
        let (readiness_addr, admin_addr) = (ready.local_addr(), admin.local_addr());
        tracing::info!(%readiness_addr, %admin_addr, "admin servers listening");
        Ok(Self {
            readiness_addr,
            admin_addr,
            readiness: ready.serve(),
            admin: admin.serve(),
        })
    }

    pub async fn shutdown(self) {
        self.readiness.shutdown().await;
        self.admin.shutdown().await;
    }
}

/// Drain deadline flags shared by the proxies and the controller.
#[derive(Clone, Debug, Args)]
pub struct DrainArgs {
    /// How long to let in-flight work finish after SIGTERM/SIGINT.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Runs `drain` to completion or until `deadline` passes, logging which happened.
pub async fn drain_with_deadline<F: std::future::Future<Output = ()>>(
    deadline: Duration,
    drain: F,
) {
    match tokio::time::timeout(deadline, drain).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(?deadline, "drain deadline passed; stopping anyway"),
    }
}

/// Parses durations written as `250ms`, `5s`, `2m`, `1h` (the units Istio YAML uses).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn durations_without_unit_or_number_are_rejected() {
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("xs").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
