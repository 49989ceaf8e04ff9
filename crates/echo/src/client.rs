//! The small HTTP client shared by [`crate::call`] and [`crate::load`]: plain `http://`
//! only, one connection at a time, HTTP/1.1 or HTTP/2 with prior knowledge (h2c).
//!
//! It is built on hyper's connection-level API rather than a pooled client so that the
//! load client controls exactly which connection each worker uses.

use std::{fmt, io, str::FromStr, time::Duration};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version,
    header::HOST,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Which HTTP version the client speaks on its connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (what gRPC clients do).
    Http2,
}

/// A parsed `http://host[:port]/path?query` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    authority: Authority,
    path_and_query: PathAndQuery,
}

/// A URL the client cannot use.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("invalid URL {url:?}")]
    Parse {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("URL {url:?}: only http:// URLs are supported")]
    Scheme { url: String },
    #[error("URL {url:?} has no host")]
    NoHost { url: String },
}

/// One `--header 'name: value'` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderArg {
    pub name: HeaderName,
    pub value: HeaderValue,
}

/// A `--header` argument that is not `name: value`.
#[derive(Debug, thiserror::Error)]
pub enum HeaderArgError {
    #[error("header {0:?} is not of the form 'name: value'")]
    NoColon(String),
    #[error("header name {name:?} is invalid")]
    Name {
        name: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
    #[error("value of header {name:?} is invalid")]
    Value {
        name: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
}

/// What to send: built once, then turned into as many identical requests as needed.
#[derive(Clone, Debug)]
pub struct RequestSpec {
    connect_addr: String,
    protocol: Protocol,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A request that cannot be built from the given parts.
#[derive(Debug, thiserror::Error)]
pub enum RequestSpecError {
    #[error("Host header {0:?} is not a valid authority for an HTTP/2 request")]
    HostAuthority(String),
    #[error("building the request URI")]
    Uri(#[source] http::Error),
}

/// One open client connection.
#[derive(Debug)]
pub enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// Why a request got no (complete) response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("HTTP handshake with {addr}")]
    Handshake {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("sending the request")]
    Request(#[source] hyper::Error),
    #[error("reading the response body")]
    Body(#[source] hyper::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

impl Target {
    /// The `host:port` to connect to (port 80 when the URL names none).
    pub fn connect_addr(&self) -> String {
        let port = self.authority.port_u16().unwrap_or(80);
        format!("{}:{port}", self.authority.host())
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn path_and_query(&self) -> &PathAndQuery {
        &self.path_and_query
    }
}

impl FromStr for Target {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let uri: Uri = url.parse().map_err(|source| UrlError::Parse {
            url: url.to_owned(),
            source,
        })?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(UrlError::Scheme {
                url: url.to_owned(),
            });
        }
        let authority = match uri.authority() {
            Some(a) if !a.host().is_empty() => a.clone(),
            _ => {
                return Err(UrlError::NoHost {
                    url: url.to_owned(),
                });
            }
        };
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Self {
            authority,
            path_and_query,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path_and_query)
    }
}

impl FromStr for HeaderArg {
    type Err = HeaderArgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once(':')
            .ok_or_else(|| HeaderArgError::NoColon(s.to_owned()))?;
        let name = name.trim();
        let value = value.trim();
        Ok(Self {
            name: HeaderName::from_str(name).map_err(|source| HeaderArgError::Name {
                name: name.to_owned(),
                source,
            })?,
            value: HeaderValue::from_str(value).map_err(|source| HeaderArgError::Value {
                name: name.to_owned(),
                source,
            })?,
        })
    }
}

impl RequestSpec {
    /// Prepares requests to `target`. A `Host` header among `headers` overrides the
    /// authority the request names (so a request can be sent to a pod IP but addressed
    /// to a service name); over HTTP/2 it becomes the `:authority`.
    pub fn new(
        target: &Target,
        protocol: Protocol,
        method: Method,
        headers: impl IntoIterator<Item = HeaderArg>,
        body: Bytes,
    ) -> Result<Self, RequestSpecError> {
        let mut map = HeaderMap::new();
        for h in headers {
            map.append(h.name, h.value);
        }
        let uri = match protocol {
            // HTTP/1.1 requests carry the origin form plus a Host header.
            Protocol::Http1 => {
                if !map.contains_key(HOST) {
                    let host = HeaderValue::from_str(target.authority.as_str()).map_err(|_| {
                        RequestSpecError::HostAuthority(target.authority.to_string())
                    })?;
                    map.insert(HOST, host);
                }
                Uri::from(target.path_and_query.clone())
            }
            // HTTP/2 carries the authority in the :authority pseudo-header, which hyper
            // takes from an absolute URI; a Host header alongside it would be ignored.
            Protocol::Http2 => {
                let authority = match map.remove(HOST) {
                    Some(host) => {
                        let host_str = String::from_utf8_lossy(host.as_bytes()).into_owned();
                        Authority::from_str(&host_str)
                            .map_err(|_| RequestSpecError::HostAuthority(host_str))?
                    }
                    None => target.authority.clone(),
                };
                Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(authority)
                    .path_and_query(target.path_and_query.clone())
                    .build()
                    .map_err(RequestSpecError::Uri)?
            }
        };
        Ok(Self {
            connect_addr: target.connect_addr(),
            protocol,
            method,
            uri,
            headers: map,
            body,
        })
    }

    pub fn connect_addr(&self) -> &str {
        &self.connect_addr
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A fresh copy of the request.
    pub fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        *req.version_mut() = match self.protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::Http2 => Version::HTTP_2,
        };
        req
    }
}

impl Connection {
    /// Opens a TCP connection to `addr` and performs the HTTP handshake. The connection's
    /// I/O runs on a spawned task that ends when the returned handle is dropped.
    pub async fn connect(addr: &str, protocol: Protocol) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        // Small request/response exchanges must not wait for Nagle's algorithm.
        stream
            .set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let io = TokioIo::new(stream);
        let handshake_err = |source| ClientError::Handshake {
            addr: addr.to_owned(),
            source,
        };
        match protocol {
            Protocol::Http1 => {
                let (send, conn) = http1::handshake(io).await.map_err(handshake_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "HTTP/1.1 client connection ended");
                    }
                });
                Ok(Self::Http1(send))
            }
            Protocol::Http2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(handshake_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "HTTP/2 client connection ended");
                    }
                });
                Ok(Self::Http2(send))
            }
        }
    }

    /// Waits until the connection can take another request; fails if it was closed.
    pub async fn ready(&mut self) -> Result<(), ClientError> {
        match self {
            Self::Http1(s) => s.ready().await,
            Self::Http2(s) => s.ready().await,
        }
        .map_err(ClientError::Request)
    }

    /// Sends one request and returns the response head; the body is still streaming.
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ClientError> {
        match self {
            Self::Http1(s) => s.send_request(req).await,
            Self::Http2(s) => s.send_request(req).await,
        }
        .map_err(ClientError::Request)
    }
}

impl ClientError {
    /// A short label for counting failures by cause, e.g.
    /// `connect: Connection refused (os error 111)` or `timeout`. Addresses are left out
    /// so that the same failure against different endpoints counts once.
    pub fn kind(&self) -> String {
        match self {
            Self::Connect { source, .. } => format!("connect: {source}"),
            Self::Handshake { source, .. } => format!("handshake: {}", chain(source)),
            Self::Request(source) => format!("request: {}", chain(source)),
            Self::Body(source) => format!("body: {}", chain(source)),
            Self::Timeout(_) => "timeout".to_owned(),
        }
    }
}

/// An error and its sources on one line (hyper's own message is often just
/// "connection error", with the useful part in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_port_and_path() {
        let t: Target = "http://payment.default.svc".parse().unwrap();
        assert_eq!(t.connect_addr(), "payment.default.svc:80");
        assert_eq!(t.path_and_query().as_str(), "/");
        let t: Target = "http://10.0.0.1:8080/a/b?c=d".parse().unwrap();
        assert_eq!(t.connect_addr(), "10.0.0.1:8080");
        assert_eq!(t.path_and_query().as_str(), "/a/b?c=d");
        assert_eq!(t.to_string(), "http://10.0.0.1:8080/a/b?c=d");
    }

    #[test]
    fn non_http_urls_are_rejected() {
        assert!(matches!(
            "https://x/".parse::<Target>(),
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(
            "x:80".parse::<Target>(),
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(
            "not a url".parse::<Target>(),
            Err(UrlError::Parse { .. })
        ));
    }

    #[test]
    fn header_args_parse() {
        let h: HeaderArg = "X-Test:  a: b ".parse().unwrap();
        assert_eq!(h.name, "x-test");
        assert_eq!(h.value, "a: b");
        assert!(matches!(
            "nocolon".parse::<HeaderArg>(),
            Err(HeaderArgError::NoColon(_))
        ));
        assert!(matches!(
            "bad name: v".parse::<HeaderArg>(),
            Err(HeaderArgError::Name { .. })
        ));
    }

    #[test]
    fn host_header_overrides_authority() {
        let t: Target = "http://127.0.0.1:1/p".parse().unwrap();
        let host: HeaderArg = "host: svc.ns:80".parse().unwrap();
        let h1 = RequestSpec::new(
            &t,
            Protocol::Http1,
            Method::GET,
            [host.clone()],
            Bytes::new(),
        )
        .unwrap()
        .request();
        assert_eq!(h1.uri(), "/p");
        assert_eq!(h1.headers()[HOST], "svc.ns:80");
        let h2 = RequestSpec::new(&t, Protocol::Http2, Method::GET, [host], Bytes::new())
            .unwrap()
            .request();
        assert_eq!(h2.uri(), "http://svc.ns:80/p");
        assert!(!h2.headers().contains_key(HOST));
        let plain = RequestSpec::new(&t, Protocol::Http1, Method::GET, [], Bytes::new())
            .unwrap()
            .request();
        assert_eq!(plain.headers()[HOST], "127.0.0.1:1");
    }
}
