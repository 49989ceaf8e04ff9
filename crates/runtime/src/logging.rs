//! The log filter, changeable while the process runs (`/logging` on the admin server,
//! DESIGN §6).
//!
//! [`crate::init_tracing`] installs the filter behind a reload layer and keeps its
//! [`LogControl`] for the process ([`LogControl::global`]); every
//! [`crate::AdminServers`] then serves [`route`]:
//!
//! - `GET /logging`: the current filter, e.g. `info`;
//! - `POST /logging?level=<EnvFilter directives>` (e.g. `debug`,
//!   `ambit_node=trace,info`; percent-encoding is decoded): replaces the filter. An
//!   invalid or empty filter gets `400` naming what is wrong, and the filter stays.
//!
//! Changes are accepted from loopback peers only (see [`crate::admin`]).

use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::admin::{Route, respond};

/// The path served.
pub const PATH: &str = "/logging";

/// The filter of the process's subscriber, and the means to replace it.
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// Serialises changes, so that the logged "from" is the filter replaced.
    change: Mutex<()>,
}

/// Why a filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// No directive at all (the empty filter would silence everything but errors).
    #[error(
        "empty log filter; give EnvFilter directives such as `info` or `ambit_node=debug,info`"
    )]
    Empty,
    /// The directives do not parse.
    #[error("invalid log filter {filter:?}")]
    Invalid {
        /// What was given.
        filter: String,
        /// The parser's complaint.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The subscriber holding the filter is gone.
    #[error("the tracing subscriber is gone")]
    Gone(#[source] reload::Error),
}

static GLOBAL: OnceLock<LogControl> = OnceLock::new();

impl LogControl {
    /// A reloadable filter starting as `initial`: put the layer first on a
    /// [`Registry`] and keep the control to change it.
    pub fn new(initial: EnvFilter) -> (reload::Layer<EnvFilter, Registry>, Self) {
        let (layer, handle) = reload::Layer::new(initial);
        (
            layer,
            Self {
                handle,
                change: Mutex::new(()),
            },
        )
    }

    /// The control of the process-wide subscriber, once [`crate::init_tracing`]
    /// installed it.
    pub fn global() -> Option<&'static Self> {
        GLOBAL.get()
    }

    /// Makes `self` the process's control; `false` when one is set already.
    pub(crate) fn install_global(self) -> bool {
        GLOBAL.set(self).is_ok()
    }

    /// The current filter, in EnvFilter syntax.
    pub fn current(&self) -> Result<String, LogFilterError> {
        self.handle
            .with_current(ToString::to_string)
            .map_err(LogFilterError::Gone)
    }

    /// Replaces the filter with `directives`; returns the filter replaced. On error
    /// the filter is unchanged.
    pub fn set(&self, directives: &str) -> Result<String, LogFilterError> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err(LogFilterError::Empty);
        }
        let filter = EnvFilter::try_new(directives).map_err(|source| LogFilterError::Invalid {
            filter: directives.to_owned(),
            source,
        })?;
        let _turn = self.change.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current()?;
        self.handle.reload(filter).map_err(LogFilterError::Gone)?;
        tracing::info!(from = %previous, to = %directives, "log filter changed");
        Ok(previous)
    }
}

/// `/logging` for the process's control ([`LogControl::global`]); answers `503` while
/// tracing was not installed by [`crate::init_tracing`].
pub fn route() -> Route {
    Route::new(PATH, || match LogControl::global() {
        Some(c) => show(c),
        None => not_installed(),
    })
    .with_post(|query| match LogControl::global() {
        Some(c) => change(c, query),
        None => not_installed(),
    })
}

fn not_installed() -> Response<Full<Bytes>> {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        "the log filter is not reloadable: tracing was not set up by ambit-runtime\n",
    )
}

/// `/logging` for `control` (tests, or a subscriber of the binary's own making).
pub fn route_for(control: &'static LogControl) -> Route {
    Route::new(PATH, move || show(control)).with_post(move |query| change(control, query))
}

fn show(control: &LogControl) -> Response<Full<Bytes>> {
    match control.current() {
        Ok(filter) => respond(StatusCode::OK, "text/plain", format!("{filter}\n")),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{}\n", crate::error_chain(&e)),
        ),
    }
}

fn change(control: &LogControl, query: Option<&str>) -> Response<Full<Bytes>> {
    let level = match query_param(query.unwrap_or(""), "level") {
        Ok(Some(level)) => level,
        Ok(None) => {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "missing ?level=<EnvFilter directives>, e.g. POST /logging?level=debug\n",
            );
        }
        Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    };
    match control.set(&level) {
        Ok(previous) => respond(
            StatusCode::OK,
            "text/plain",
            format!(
                "log filter changed from {previous:?} to {:?}\n",
                level.trim()
            ),
        ),
        Err(e @ LogFilterError::Gone(_)) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{}\n", crate::error_chain(&e)),
        ),
        Err(e) => {
            let kept = control.current().unwrap_or_default();
            respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{}; the filter stays {kept:?}\n", crate::error_chain(&e)),
            )
        }
    }
}

/// The percent-decoded value of `name` in a query string (`a=1&level=x%3Dy`); `None`
/// when absent. The value keeps any further `=`.
fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return percent_decode(value).map(Some).ok_or_else(|| {
                format!("the {name} parameter {value:?} is not valid percent-encoded UTF-8")
            });
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(
            query_param("level=debug", "level").unwrap().as_deref(),
            Some("debug")
        );
        assert_eq!(
            query_param("x=1&level=ambit_node=trace,info", "level")
                .unwrap()
                .as_deref(),
            Some("ambit_node=trace,info")
        );
        assert_eq!(
            query_param("level=ambit_node%3Dtrace%2Cinfo", "level")
                .unwrap()
                .as_deref(),
            Some("ambit_node=trace,info")
        );
        assert_eq!(query_param("levels=debug", "level").unwrap(), None);
        assert_eq!(query_param("", "level").unwrap(), None);
        assert!(query_param("level=%zz", "level").is_err());
        assert!(query_param("level=%f", "level").is_err());
        assert!(query_param("level=%ff", "level").is_err());
    }

    #[test]
    fn a_control_reloads_the_filter_of_its_subscriber() {
        use tracing_subscriber::prelude::*;

        let (layer, control) = LogControl::new(EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            assert_eq!(control.current().unwrap(), "info");

            assert!(matches!(
                control.set("debug,nope=loud"),
                Err(LogFilterError::Invalid { .. })
            ));
            assert!(matches!(control.set("  "), Err(LogFilterError::Empty)));
            assert_eq!(control.current().unwrap(), "info");
            assert!(!tracing::enabled!(tracing::Level::DEBUG));

            assert_eq!(control.set("debug").unwrap(), "info");
            assert_eq!(control.current().unwrap(), "debug");
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert!(!tracing::enabled!(tracing::Level::TRACE));
        });
    }
}
