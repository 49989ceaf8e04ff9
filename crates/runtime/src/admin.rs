//! A small HTTP/1.1 server for health, readiness and admin endpoints.
//!
//! Every binary serves `GET /healthz/ready` from its [`Readiness`]: `200 ready` when no
//! blocker is left, otherwise `503` listing what is still awaited. Further paths
//! (`/metrics`, `/config_dump`, …) are added as [`Route`]s by the component that owns
//! the data. The server is bound first and served afterwards ("bind, then serve"), so
//! tests can use port 0 and read the bound address.
//!
//! Routes answer `GET`; a route may also take `POST` ([`Route::with_post`]) to change
//! something (e.g. `/logging`). Such changes are accepted only from loopback peers,
//! whatever address the server is bound to: `403` otherwise.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::readiness::Readiness;

/// Answers a `GET` on one path.
pub type Handler = Arc<dyn Fn() -> Response<Full<Bytes>> + Send + Sync>;

/// Answers a `POST` on one path, given the request's query string (if any).
pub type PostHandler = Arc<dyn Fn(Option<&str>) -> Response<Full<Bytes>> + Send + Sync>;

/// A path served by the admin server.
#[derive(Clone)]
pub struct Route {
    pub path: &'static str,
    pub handler: Handler,
    /// What a `POST` does; `None`: `GET` only.
    pub post: Option<PostHandler>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("path", &self.path)
            .field("post", &self.post.is_some())
            .finish()
    }
}

impl Route {
    pub fn new(
        path: &'static str,
        handler: impl Fn() -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            path,
            handler: Arc::new(handler),
            post: None,
        }
    }

    /// Also answers `POST` (from loopback peers only) with `handler`, which gets the
    /// query string.
    pub fn with_post(
        mut self,
        handler: impl Fn(Option<&str>) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        self.post = Some(Arc::new(handler));
        self
    }

    /// A route answering pretty-printed JSON built by `f` at request time.
    pub fn json<T, F>(path: &'static str, f: F) -> Self
    where
        T: serde::Serialize,
        F: Fn() -> T + Send + Sync + 'static,
    {
        Self::new(path, move || match serde_json::to_vec_pretty(&f()) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("serializing {path}: {e}\n"),
            ),
        })
    }
}

/// Builds a response with a body and content type.
pub fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        res.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    res
}

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Errors fetching an admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr}{path}")]
    Http {
        addr: SocketAddr,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("building the request for {path}")]
    Request {
        path: String,
        #[source]
        source: http::Error,
    },
}

/// `GET path` on an admin server; returns the status and the whole body. Used by
/// `ambitctl` and by tests.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), FetchError> {
    fetch(Method::GET, addr, path).await
}

/// `POST path` (with its query string, no body) on an admin server; returns the status
/// and the whole body.
pub async fn post(addr: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), FetchError> {
    fetch(Method::POST, addr, path).await
}

async fn fetch(
    method: Method,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Bytes), FetchError> {
    use http_body_util::{BodyExt as _, Empty};

    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect { addr, source })?;
    let http_err = |source| FetchError::Http {
        addr,
        path: path.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|source| FetchError::Request {
            path: path.to_owned(),
            source,
        })?;
    let res = sender.send_request(req).await.map_err(http_err)?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(http_err)?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// An admin server whose listener is bound but not yet serving.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    routes: Arc<Vec<Route>>,
    readiness: Readiness,
}

/// A running admin server; dropping it does not stop it, [`Serving::shutdown`] does.
#[derive(Debug)]
pub struct Serving {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Binds the admin listener.
pub async fn bind(
    addr: SocketAddr,
    readiness: Readiness,
    routes: Vec<Route>,
) -> Result<Bound, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    Ok(Bound {
        listener,
        addr,
        routes: Arc::new(routes),
        readiness,
    })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving on the runtime; returns a handle to stop it.
    pub fn serve(self) -> Serving {
        let (stop, mut stopped) = watch::channel(false);
        let Self {
            listener,
            addr,
            routes,
            readiness,
        } = self;
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    res = listener.accept() => match res {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "admin accept failed");
                            continue;
                        }
                    },
                    _ = stopped.changed() => return,
                };
                let routes = routes.clone();
                let readiness = readiness.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let res = answer(req.method(), req.uri(), peer, &routes, &readiness);
                        async move { Ok::<_, Infallible>(res) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                });
            }
        });
        Serving { stop, task }
    }
}

impl Serving {
    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn answer(
    method: &Method,
    uri: &http::Uri,
    peer: SocketAddr,
    routes: &[Route],
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    let route = routes.iter().find(|r| r.path == path);
    if *method == Method::POST
        && let Some(post) = route.and_then(|r| r.post.as_ref())
    {
        if !is_loopback(peer) {
            return respond(
                StatusCode::FORBIDDEN,
                "text/plain",
                format!("POST {path} is only accepted from loopback, not from {peer}\n"),
            );
        }
        return post(uri.query());
    }
    if *method != Method::GET {
        let allow = if route.is_some_and(|r| r.post.is_some()) {
            "GET, POST"
        } else {
            "GET"
        };
        let mut res = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("{method} is not served on {path} (allowed: {allow})\n"),
        );
        res.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        return res;
    }
    if path == "/healthz/ready" {
        let pending = readiness.pending();
        return if pending.is_empty() {
            respond(StatusCode::OK, "text/plain", "ready\n")
        } else {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready, waiting for: {}\n", pending.join(", ")),
            )
        };
    }
    match route {
        Some(route) => (route.handler)(),
        None => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such path: {path}\n"),
        ),
    }
}

/// Whether `peer` is on this host's loopback (IPv4-mapped IPv6 included).
fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readiness_follows_blockers_and_routes_answer() {
        let readiness = Readiness::new();
        let blocker = readiness.register("config");
        let routes = vec![Route::json(
            "/config_dump",
            || serde_json::json!({"nodes": 2}),
        )];
        let bound = bind("127.0.0.1:0".parse().unwrap(), readiness.clone(), routes)
            .await
            .unwrap();
        let addr = bound.local_addr();
        let serving = bound.serve();

        let res = get(addr, "/healthz/ready").await;
        assert!(res.starts_with("HTTP/1.1 503"), "{res}");
        assert!(res.contains("waiting for: config"), "{res}");
        blocker.unblock();
        let res = get(addr, "/healthz/ready").await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");

        let (status, body) = super::get(addr, "/config_dump").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(dump["nodes"], 2);
        let res = get(addr, "/nope").await;
        assert!(res.starts_with("HTTP/1.1 404"), "{res}");
        serving.shutdown().await;
    }

    #[tokio::test]
    async fn post_reaches_only_routes_that_take_it() {
        let routes = vec![
            Route::new("/knob", || respond(StatusCode::OK, "text/plain", "get\n")).with_post(
                |query| respond(StatusCode::OK, "text/plain", format!("post {query:?}\n")),
            ),
            Route::new("/view", || respond(StatusCode::OK, "text/plain", "view\n")),
        ];
        let bound = bind("127.0.0.1:0".parse().unwrap(), Readiness::new(), routes)
            .await
            .unwrap();
        let addr = bound.local_addr();
        let serving = bound.serve();

        let (status, body) = super::post(addr, "/knob?level=debug").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"post Some(\"level=debug\")\n");
        let (status, body) = super::get(addr, "/knob").await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"get\n"[..]));

        let (status, body) = super::post(addr, "/view").await.unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(String::from_utf8_lossy(&body).contains("allowed: GET"));
        let (status, _) = super::post(addr, "/healthz/ready").await.unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        serving.shutdown().await;
    }

    #[test]
    fn post_from_a_remote_peer_is_forbidden() {
        let routes = vec![
            Route::new("/knob", || respond(StatusCode::OK, "text/plain", ""))
                .with_post(|_| respond(StatusCode::OK, "text/plain", "changed\n")),
        ];
        let uri: http::Uri = "/knob?level=debug".parse().unwrap();
        let readiness = Readiness::new();
        for (peer, expected) in [
            ("10.1.2.3:4000", StatusCode::FORBIDDEN),
            ("[2001:db8::1]:4000", StatusCode::FORBIDDEN),
            ("127.0.0.1:4000", StatusCode::OK),
            ("[::1]:4000", StatusCode::OK),
            ("[::ffff:127.0.0.1]:4000", StatusCode::OK),
        ] {
            let res = answer(
                &Method::POST,
                &uri,
                peer.parse().unwrap(),
                &routes,
                &readiness,
            );
            assert_eq!(res.status(), expected, "{peer}");
        }
        // Reading stays open to every peer the server is reachable from.
        let res = answer(
            &Method::GET,
            &uri,
            "10.1.2.3:4000".parse().unwrap(),
            &routes,
            &readiness,
        );
        assert_eq!(res.status(), StatusCode::OK);
    }
}
