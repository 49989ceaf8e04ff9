//! A fake Kubernetes API server at the HTTP level, on `127.0.0.1:0`, for the
//! Kubernetes source and the status writer.
//!
//! It serves LIST and WATCH (newline-delimited watch events, replayed from the
//! requested `resourceVersion`) for the collections a test registers, `404` with a
//! `Status` body for every other collection (a CRD that is not installed), GET of
//! single objects and their `status`, PATCH of `status` (stored, and announced to
//! watchers like the real API server does), server-side apply of whole objects (PATCH
//! without subresource: the body becomes the object, keeping its uid and status; a
//! real server would merge with fields other managers own), create (POST) and
//! replace (PUT, with the `resourceVersion` compare-and-swap that leader election
//! relies on). Every request is recorded.
#![allow(
    dead_code,
    reason = "shared by several test binaries, each using part of it"
)]

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::{StreamExt as _, wrappers::UnboundedReceiverStream};

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct Collection {
    /// By (namespace, name); cluster-scoped objects have an empty namespace.
    objects: BTreeMap<(String, String), Value>,
    /// Every change, by resourceVersion, as a watch event line.
    log: Vec<(u64, String)>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Answer every request with this status code instead (403: missing RBAC).
    fail_with: Option<u16>,
    /// History before this resourceVersion is gone: older watches get 410 Gone.
    compacted_at: u64,
}

#[derive(Default)]
struct State {
    /// By collection path, e.g. `/api/v1/pods`, `/apis/security.istio.io/v1/authorizationpolicies`.
    collections: HashMap<String, Collection>,
    requests: Vec<Recorded>,
    resource_version: u64,
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The collection path of a core or group resource: `("", "v1", "pods")` is
/// `/api/v1/pods`.
pub fn collection(group: &str, version: &str, plural: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}/{plural}")
    } else {
        format!("/apis/{group}/{version}/{plural}")
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: u16, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn not_found(what: &str) -> Response<Body> {
    respond(
        404,
        &status_body(
            404,
            "NotFound",
            &format!("the server could not find {what}"),
        ),
    )
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FakeApi {
    /// Starts the server.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let server = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// The server's URL, `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Serves `path` (see [`collection`]), initially empty.
    pub fn serve(&self, path: &str) {
        self.lock().collections.entry(path.to_owned()).or_default();
    }

    /// Answers every request to `path` with `code` (None: serve normally again).
    pub fn fail(&self, path: &str, code: Option<u16>) {
        self.lock()
            .collections
            .entry(path.to_owned())
            .or_default()
            .fail_with = code;
    }

    /// Creates or replaces an object, announcing it to watchers.
    pub fn apply(&self, path: &str, mut obj: Value) {
        let mut st = self.lock();
        st.resource_version += 1;
        let rv = st.resource_version;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let coll = st.collections.entry(path.to_owned()).or_default();
        let key = key_of(&obj);
        let kind = if coll.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        coll.objects.insert(key, obj.clone());
        publish(coll, rv, kind, &obj);
    }

    /// Deletes an object, announcing it to watchers.
    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        let mut st = self.lock();
        st.resource_version += 1;
        let rv = st.resource_version;
        let coll = st.collections.entry(path.to_owned()).or_default();
        if let Some(mut obj) = coll
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            publish(coll, rv, "DELETED", &obj);
        }
    }

    /// Deletes an object without telling watchers, then expires their watches (410
    /// Gone), as when a watcher was disconnected while the object went away: only a
    /// re-list can tell.
    pub fn delete_while_disconnected(&self, path: &str, namespace: &str, name: &str) {
        let mut st = self.lock();
        st.resource_version += 1;
        let rv = st.resource_version;
        let coll = st.collections.entry(path.to_owned()).or_default();
        coll.objects
            .remove(&(namespace.to_owned(), name.to_owned()));
        // The history is compacted: a watch from an older version must re-list.
        coll.log.clear();
        coll.compacted_at = rv;
        let expired = json!({
            "type": "ERROR",
            "object": status_body(410, "Expired", "too old resource version"),
        });
        for w in coll.watchers.drain(..) {
            let _ = w.send(Bytes::from(format!("{expired}\n")));
        }
    }

    /// An object as stored.
    pub fn object(&self, path: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .collections
            .get(path)?
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }
}

fn publish(coll: &mut Collection, rv: u64, kind: &str, obj: &Value) {
    let line = format!("{}\n", json!({"type": kind, "object": obj}));
    coll.log.push((rv, line.clone()));
    coll.watchers
        .retain(|w| w.send(Bytes::from(line.clone())).is_ok());
}

/// A request path, split.
struct Route {
    /// The collection path (see [`collection`]).
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix_len, rest) = match segs.first() {
        Some(&"api") if segs.len() >= 2 => (2, &segs[2..]),
        Some(&"apis") if segs.len() >= 3 => (3, &segs[3..]),
        _ => return None,
    };
    let prefix = format!("/{}", segs[..prefix_len].join("/"));
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some((*ns).to_owned()), tail),
        other => (None, other),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    Some(Route {
        collection: format!("{prefix}/{plural}"),
        namespace,
        name,
        subresource,
    })
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut st = state.lock().unwrap();
    st.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    let Some(Route {
        collection: coll_path,
        namespace: ns,
        name,
        subresource: sub,
    }) = route(&path)
    else {
        return not_found(&path);
    };
    st.resource_version += 1;
    let rv = st.resource_version;
    let Some(coll) = st.collections.get_mut(&coll_path) else {
        return not_found(&coll_path);
    };
    if let Some(code) = coll.fail_with {
        return respond(code, &status_body(code, "Forbidden", "denied by the test"));
    }
    match (method, name, sub.as_deref()) {
        (Method::GET, None, None) => {
            let watch = matches!(query_param(&query, "watch"), Some("true" | "1"));
            if !watch {
                let items: Vec<Value> = coll
                    .objects
                    .values()
                    // List items carry neither apiVersion nor kind.
                    .map(|o| {
                        let mut o = o.clone();
                        if let Some(m) = o.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                        o
                    })
                    .collect();
                return respond(
                    200,
                    &json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": rv.to_string()},
                        "items": items,
                    }),
                );
            }
            let from: u64 = query_param(&query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            if from < coll.compacted_at {
                // Compacted history (see delete_while_disconnected): too old.
                let expired = json!({
                    "type": "ERROR",
                    "object": status_body(410, "Expired", "too old resource version"),
                });
                let _ = tx.send(Bytes::from(format!("{expired}\n")));
                drop(tx);
            } else {
                for (v, line) in &coll.log {
                    if *v > from {
                        let _ = tx.send(Bytes::from(line.clone()));
                    }
                }
                coll.watchers.push(tx);
            }
            let stream = UnboundedReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
            let mut resp = Response::new(StreamBody::new(stream).boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        (Method::GET, Some(name), None | Some("status")) => {
            let key = (ns.unwrap_or_default(), name);
            match coll.objects.get(&key) {
                Some(o) => respond(200, o),
                None => not_found(&key.1),
            }
        }
        (Method::PATCH, Some(name), Some("status")) => {
            let key = (ns.unwrap_or_default(), name);
            let Some(obj) = coll.objects.get_mut(&key) else {
                return not_found(&key.1);
            };
            obj["status"] = body["status"].clone();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let obj = obj.clone();
            publish(coll, rv, "MODIFIED", &obj);
            respond(200, &obj)
        }
        (Method::PATCH, Some(name), None) => {
            let key = (ns.unwrap_or_default(), name);
            let mut obj = body;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let (code, kind) = match coll.objects.get(&key) {
                Some(current) => {
                    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                    if !current["status"].is_null() {
                        obj["status"] = current["status"].clone();
                    }
                    (200, "MODIFIED")
                }
                None => {
                    obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                    (201, "ADDED")
                }
            };
            coll.objects.insert(key, obj.clone());
            publish(coll, rv, kind, &obj);
            respond(code, &obj)
        }
        (Method::POST, None, None) => {
            let mut obj = body;
            let key = (ns.unwrap_or_default(), key_of(&obj).1);
            if coll.objects.contains_key(&key) {
                return respond(409, &status_body(409, "AlreadyExists", "already exists"));
            }
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            coll.objects.insert(key, obj.clone());
            publish(coll, rv, "ADDED", &obj);
            respond(201, &obj)
        }
        (Method::PUT, Some(name), None) => {
            let mut obj = body;
            let key = (ns.unwrap_or_default(), name);
            let Some(current) = coll.objects.get(&key) else {
                return not_found(&key.1);
            };
            if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return respond(
                    409,
                    &status_body(409, "Conflict", "the object has been modified"),
                );
            }
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            coll.objects.insert(key, obj.clone());
            publish(coll, rv, "MODIFIED", &obj);
            respond(200, &obj)
        }
        _ => respond(
            405,
            &status_body(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}
