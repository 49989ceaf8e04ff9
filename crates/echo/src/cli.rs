//! Command-line flags (with environment fallbacks) and their conversion into the
//! library's config structs. This is the only place that knows about flags or the
//! environment.

use std::{
    net::SocketAddr,
    num::{NonZeroU64, NonZeroUsize},
    time::Duration,
};

use ambit_runtime::{DrainArgs, LogArgs, parse_duration};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::Method;

use crate::{
    call::CallConfig,
    client::{HeaderArg, Protocol, RequestSpec, RequestSpecError, Target},
    grpc::{self, GrpcConfig},
    hold::HoldConfig,
    load::{LoadConfig, LoadTarget, Stop},
    serve::{FaultError, Faults, Identity, ServeConfig},
    stream::StreamConfig,
};

/// Sample workload for the Ambit simulated cluster: an HTTP/TCP echo server, a
/// one-shot HTTP client and a load client.
#[derive(Debug, Parser)]
#[command(name = "ambit-echo")]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP/1.1 + h2c echo and TCP echo until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Send one HTTP request; print the response body to stdout and `HTTP <status>` to
    /// stderr. Exits 1 when no response arrives (or the status differs from
    /// --expect-status).
    Call(CallArgs),
    /// Make gRPC echo calls one after another on one connection; print one JSON
    /// summary (calls by status code and answering pod) to stdout. Failed calls are
    /// counted in the summary; the exit status is 1 only when the run could not happen.
    Grpc(GrpcArgs),
    /// Generate load and print one JSON summary to stdout. Failed requests are counted
    /// in the summary; the exit status is 1 only when the run could not happen.
    Load(LoadArgs),
    /// Bulk TCP throughput to a discard sink; print one JSON summary to stdout.
    Stream(StreamArgs),
    /// Open many TCP connections to an echo server, print one JSON report line, and
    /// keep them open until stdin reaches EOF (or SIGTERM/SIGINT).
    Hold(HoldArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Pod name reported in answers and the x-echo-pod header.
    #[arg(long, env = "POD_NAME", default_value = "unknown")]
    pub pod: String,
    /// Namespace reported in answers.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Workload version reported in answers and the x-echo-version header.
    #[arg(long = "version", env = "POD_VERSION", default_value = "unknown")]
    pub version: String,
    /// HTTP/1.1 and h2c listen address.
    #[arg(long, env = "ECHO_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// TCP echo listen address.
    #[arg(long, env = "ECHO_TCP_ADDR", default_value = "0.0.0.0:9090")]
    pub tcp_addr: SocketAddr,
    /// TCP discard sink listen address (reads and drops everything; for `stream`).
    #[arg(long, env = "ECHO_DISCARD_ADDR", default_value = "0.0.0.0:9091")]
    pub discard_addr: SocketAddr,
    /// gRPC echo listen address (h2c, `ambit.echo.v1.Echo`).
    #[arg(long, env = "ECHO_GRPC_ADDR", default_value = "0.0.0.0:7070")]
    pub grpc_addr: SocketAddr,
    /// Fraction (0.0 to 1.0) of requests answered with --fail-status.
    #[arg(long, env = "ECHO_FAIL_RATE", default_value_t = 0.0, value_parser = parse_fail_rate)]
    pub fail_rate: f64,
    /// Status of injected failures (200 to 599).
    #[arg(long, env = "ECHO_FAIL_STATUS", default_value_t = 503, value_parser = parse_fail_status)]
    pub fail_status: u16,
    #[command(flatten)]
    pub drain: DrainArgs,
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// http:// URL to request.
    pub url: Target,
    /// Request header `name: value`; repeatable. A Host header overrides the URL's
    /// authority.
    #[arg(long = "header", short = 'H', value_name = "'NAME: VALUE'")]
    pub headers: Vec<HeaderArg>,
    /// Request method.
    #[arg(long, short = 'X', default_value = "GET", value_parser = parse_method)]
    pub method: Method,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Deadline for connecting and reading the whole response (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Request body.
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Request body read from this file (for bodies too large for the command line).
    #[arg(long, value_name = "FILE", conflicts_with = "data", value_parser = read_body_file)]
    pub data_file: Option<Bytes>,
    /// Exit 1 unless the response has this status.
    #[arg(long, value_name = "STATUS")]
    pub expect_status: Option<u16>,
}

#[derive(Debug, Args)]
pub struct GrpcArgs {
    /// http://HOST:PORT of the gRPC server (h2c).
    pub url: Target,
    /// The method to call.
    #[arg(long, value_enum, default_value = "echo")]
    pub method: grpc::Method,
    /// Number of calls, one after another.
    #[arg(short = 'n', long = "calls", default_value = "1")]
    pub calls: NonZeroU64,
    /// Request metadata `name: value` on every call; repeatable.
    #[arg(long = "header", short = 'H', value_name = "'NAME: VALUE'")]
    pub metadata: Vec<HeaderArg>,
    /// Deadline per call, including connecting when needed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: LoadTargetArgs,
    /// Total number of requests (unless --duration is given).
    #[arg(
        short = 'n',
        long = "requests",
        default_value = "100",
        conflicts_with = "duration"
    )]
    pub requests: NonZeroU64,
    /// Run for this long instead of a request count (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Number of workers, each with its own connection.
    #[arg(short = 'c', long, default_value = "1")]
    pub concurrency: NonZeroUsize,
    /// Global request rate in requests per second, shared by all workers (request k is
    /// scheduled at start + k/rate; late workers catch up back-to-back). Default:
    /// as fast as the workers go.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// HTTP: speak HTTP/2 with prior knowledge (h2c).
    #[arg(long, conflicts_with = "tcp")]
    pub http2: bool,
    /// HTTP: request header `name: value`; repeatable.
    #[arg(
        long = "header",
        short = 'H',
        value_name = "'NAME: VALUE'",
        conflicts_with = "tcp"
    )]
    pub headers: Vec<HeaderArg>,
    /// HTTP: request method.
    #[arg(long, short = 'X', default_value = "GET", value_parser = parse_method, conflicts_with = "tcp")]
    pub method: Method,
    /// HTTP: send a request body of this many bytes (use with -X POST).
    #[arg(long, default_value = "0", conflicts_with = "tcp")]
    pub body_size: usize,
    /// Open a new connection for every request and close it afterwards (connecting
    /// then counts in the request's latency).
    #[arg(long)]
    pub new_connection: bool,
    /// TCP: bytes per round trip.
    #[arg(long, default_value = "64", conflicts_with = "url")]
    pub size: NonZeroUsize,
    /// Per-request deadline, including connecting when needed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// HOST:PORT of a discard sink (`ambit-echo serve` listens on 9091).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub to: String,
    /// Parallel connections.
    #[arg(long, default_value = "1")]
    pub streams: NonZeroUsize,
    /// How long each stream sends (e.g. 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Bytes per write.
    #[arg(long, default_value = "65536")]
    pub chunk_size: NonZeroUsize,
    /// Deadline for connecting, and for the sink to close after the last write.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// HOST:PORT of a TCP echo server.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub tcp: String,
    /// Connections to open.
    #[arg(long, default_value = "1000")]
    pub connections: NonZeroUsize,
    /// Connections being opened at the same time.
    #[arg(long, default_value = "64")]
    pub parallel: NonZeroUsize,
    /// Deadline per connection for connecting and its one-byte round trip.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Exactly one of --url and --tcp.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct LoadTargetArgs {
    /// HTTP load against this http:// URL.
    #[arg(long)]
    pub url: Option<Target>,
    /// TCP echo round trips against this host:port.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub tcp: Option<String>,
}

impl ServeArgs {
    pub fn into_config(self) -> Result<ServeConfig, FaultError> {
        Ok(ServeConfig {
            identity: Identity {
                pod: self.pod,
                namespace: self.namespace,
                version: self.version,
            },
            http_addr: self.http_addr,
            tcp_addr: self.tcp_addr,
            discard_addr: self.discard_addr,
            grpc_addr: self.grpc_addr,
            faults: Faults::new(self.fail_rate, self.fail_status)?,
            drain_timeout: self.drain.drain_timeout,
        })
    }
}

impl CallArgs {
    pub fn into_config(self) -> Result<CallConfig, RequestSpecError> {
        let protocol = protocol(self.http2);
        let body = self
            .data
            .map(Bytes::from)
            .or(self.data_file)
            .unwrap_or_default();
        Ok(CallConfig {
            request: RequestSpec::new(&self.url, protocol, self.method, self.headers, body)?,
            timeout: self.timeout,
        })
    }
}

impl GrpcArgs {
    pub fn into_config(self) -> GrpcConfig {
        GrpcConfig {
            target: self.url,
            method: self.method,
            calls: self.calls,
            timeout: self.timeout,
            metadata: self.metadata,
        }
    }
}

impl LoadArgs {
    pub fn into_config(self) -> Result<LoadConfig, RequestSpecError> {
        let target = match (self.target.url, self.target.tcp) {
            (Some(url), _) => LoadTarget::Http(RequestSpec::new(
                &url,
                protocol(self.http2),
                self.method,
                self.headers,
                Bytes::from(vec![b'x'; self.body_size]),
            )?),
            // clap requires exactly one of --url and --tcp.
            (None, tcp) => LoadTarget::Tcp {
                addr: tcp.unwrap_or_default(),
                size: self.size,
            },
        };
        let stop = match self.duration {
            Some(d) => Stop::After(d),
            None => Stop::Requests(self.requests),
        };
        Ok(LoadConfig {
            target,
            stop,
            concurrency: self.concurrency,
            rate: self.rate,
            timeout: self.timeout,
            new_connection: self.new_connection,
        })
    }
}

impl StreamArgs {
    pub fn into_config(self) -> StreamConfig {
        StreamConfig {
            addr: self.to,
            streams: self.streams,
            duration: self.duration,
            chunk: self.chunk_size,
            timeout: self.timeout,
        }
    }
}

impl HoldArgs {
    pub fn into_config(self) -> HoldConfig {
        HoldConfig {
            addr: self.tcp,
            connections: self.connections,
            parallel: self.parallel,
            timeout: self.timeout,
        }
    }
}

fn protocol(http2: bool) -> Protocol {
    if http2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    }
}

fn parse_fail_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    Faults::new(rate, 503)
        .map(|f| f.fail_rate())
        .map_err(|e| e.to_string())
}

fn parse_fail_status(s: &str) -> Result<u16, String> {
    let status: u16 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an HTTP status"))?;
    Faults::new(0.0, status)
        .map(|f| f.fail_status())
        .map_err(|e| e.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of requests per second"
        )),
    }
}

fn read_body_file(path: &str) -> Result<Bytes, String> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| format!("reading the request body from {path}: {e}"))
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_bytes(s.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{s:?} is not an HTTP method"))
}

fn parse_host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err(format!("{s:?} is not HOST:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ambit-echo").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse_and_validate() {
        let cli = parse(&[
            "serve",
            "--pod",
            "p-0",
            "--namespace",
            "ns",
            "--version",
            "v2",
            "--http-addr",
            "127.0.0.1:0",
            "--fail-rate",
            "0.5",
            "--fail-status",
            "500",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.identity.version, "v2");
        assert_eq!(config.faults, Faults::new(0.5, 500).unwrap());

        let err = parse(&["serve", "--fail-rate", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fail_rate 1.5 is not between"), "{err}");
        let err = parse(&["serve", "--fail-status", "42"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fail_status 42"), "{err}");
    }

    #[test]
    fn load_needs_exactly_one_target() {
        assert!(parse(&["load"]).is_err());
        assert!(parse(&["load", "--url", "http://a/", "--tcp", "a:1"]).is_err());
        assert!(parse(&["load", "--tcp", "a"]).is_err());
        assert!(parse(&["load", "--tcp", "a:1", "--http2"]).is_err());
        assert!(parse(&["load", "--url", "http://a/", "--size", "8"]).is_err());
        assert!(parse(&["load", "--url", "http://a/", "-n", "5", "--duration", "1s"]).is_err());
        assert!(parse(&["load", "--url", "http://a/", "-c", "0"]).is_err());
        assert!(parse(&["load", "--url", "http://a/", "--rate", "0"]).is_err());

        let cli = parse(&["load", "--url", "http://a/"]).unwrap();
        let Command::Load(args) = cli.command else {
            panic!("not load")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.stop, Stop::Requests(NonZeroU64::new(100).unwrap()));

        let cli = parse(&[
            "load",
            "--tcp",
            "a:1",
            "--size",
            "8",
            "--duration",
            "2s",
            "-c",
            "3",
        ])
        .unwrap();
        let Command::Load(args) = cli.command else {
            panic!("not load")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.stop, Stop::After(Duration::from_secs(2)));
        assert!(
            matches!(config.target, LoadTarget::Tcp { ref addr, size } if addr == "a:1" && size.get() == 8)
        );
    }

    #[test]
    fn bench_flags_parse() {
        let cli = parse(&[
            "load",
            "--url",
            "http://a/",
            "-X",
            "POST",
            "--body-size",
            "1024",
            "--new-connection",
        ])
        .unwrap();
        let Command::Load(args) = cli.command else {
            panic!("not load")
        };
        let config = args.into_config().unwrap();
        assert!(config.new_connection);
        let LoadTarget::Http(spec) = config.target else {
            panic!("not HTTP")
        };
        use hyper::body::Body as _;
        assert_eq!(spec.request().body().size_hint().exact(), Some(1024));
        assert!(parse(&["load", "--tcp", "a:1", "--body-size", "8"]).is_err());

        let cli = parse(&["stream", "--to", "a:9091", "--streams", "4"]).unwrap();
        let Command::Stream(args) = cli.command else {
            panic!("not stream")
        };
        let config = args.into_config();
        assert_eq!((config.addr.as_str(), config.streams.get()), ("a:9091", 4));
        assert!(parse(&["stream", "--to", "a"]).is_err());
        assert!(parse(&["stream", "--to", "a:1", "--streams", "0"]).is_err());

        let cli = parse(&["hold", "--tcp", "a:9090", "--connections", "10"]).unwrap();
        let Command::Hold(args) = cli.command else {
            panic!("not hold")
        };
        assert_eq!(args.into_config().connections.get(), 10);

        let cli = parse(&["serve", "--discard-addr", "127.0.0.1:0"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.into_config().unwrap().discard_addr.port(), 0);
    }

    #[test]
    fn call_flags_parse() {
        let cli = parse(&[
            "call",
            "http://a:8080/x",
            "-H",
            "x-a: 1",
            "--header",
            "x-b: 2",
            "-X",
            "post",
            "--http2",
            "--timeout",
            "250ms",
            "--data",
            "hi",
            "--expect-status",
            "201",
        ])
        .unwrap();
        let Command::Call(args) = cli.command else {
            panic!("not call")
        };
        assert_eq!(args.headers.len(), 2);
        assert_eq!(args.method, Method::POST);
        assert_eq!(args.expect_status, Some(201));
        let config = args.into_config().unwrap();
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.request.protocol(), Protocol::Http2);
        assert!(parse(&["call", "https://a/"]).is_err());
    }

    #[test]
    fn call_body_from_a_file() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let cli = parse(&["call", "http://a/", "-X", "POST", "--data-file", file]).unwrap();
        let Command::Call(args) = cli.command else {
            panic!("not call")
        };
        assert_eq!(
            args.data_file.as_deref(),
            Some(std::fs::read(file).unwrap().as_slice())
        );

        let err = parse(&["call", "http://a/", "--data-file", "/nonexistent/body"]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/body"), "{err}");
        assert!(parse(&["call", "http://a/", "-d", "x", "--data-file", file]).is_err());
    }
}
