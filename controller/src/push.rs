//! Config push: the `ConfigDiscovery` gRPC service (`proto/ambit/config/v1/discovery.proto`
//! is the specification).
//!
//! Per stream: the first message must be `Hello`; the caller's credential must belong
//! to the subscriber it names; the first update is a full snapshot, or, when the proxy
//! says what it holds (`Hello.resource_versions`), a delta against exactly that set.
//! After that an update is sent only when the subscriber's resources differ from what
//! it last ACKed, with at most one update unacknowledged (changes made meanwhile are
//! coalesced into the next one). A NACK leaves the ACKed state as it was; it is logged,
//! counted and shown in the admin dump, and the rejected update is not resent
//! unchanged.
//!
//! The server follows a `watch` of config generations, `None` until every source has
//! delivered its initial state: nothing is pushed from a partial view.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use ambit_api::config::v1::{
    ConfigUpdate, Hello, Resource, SubscribeRequest,
    config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer},
    hello, subscribe_request,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::{Authenticator, Caller, authenticate_request},
    metrics::{Metrics, SubscriberTypeLabels},
    view::{ConfigView, Subscriber},
};

/// The config generations the server follows: `None` until the sources are synced.
pub type Worlds<V> = watch::Receiver<Option<Arc<V>>>;

/// The `ConfigDiscovery` service. Cheap to clone.
pub struct PushServer<V> {
    inner: Arc<Inner<V>>,
}

struct Inner<V> {
    worlds: Worlds<V>,
    authenticator: Arc<dyn Authenticator>,
    subscribers: Subscribers,
    metrics: Metrics,
    controller_id: String,
    stop: watch::Sender<bool>,
    next_stream: AtomicU64,
}

/// What the admin dump shows about every config stream.
#[derive(Clone, Debug, Default)]
pub struct Subscribers {
    streams: Arc<Mutex<BTreeMap<(Subscriber, u64), SubscriberStatus>>>,
}

/// One config stream, as the admin dump shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    /// `node/<name>` or `waypoint/<namespace>/<name>`.
    pub subscriber: String,
    /// Whether the stream is open.
    pub connected: bool,
    /// Version of the last update sent on the stream (0: none yet).
    pub version_sent: u64,
    /// Version of the last update the proxy ACKed (0: none yet).
    pub version_acked: u64,
    /// The last NACK on this stream, if any.
    pub last_nack: Option<NackStatus>,
    /// Number of resources the proxy holds as of its last ACK (or its `Hello`).
    pub resources: usize,
    /// Config generation of the last update sent.
    pub generation_sent: u64,
    /// `Hello.proxy_version`.
    pub proxy_version: String,
    /// `Hello.last_acked_version` (of the proxy's previous stream).
    pub resumed_from_version: u64,
}

/// A rejected update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NackStatus {
    /// The rejected `ConfigUpdate.version`.
    pub version: u64,
    /// The proxy's summary.
    pub error: String,
    /// Per-resource reasons, `key: error`.
    pub resource_errors: Vec<String>,
}

impl<V> Clone for PushServer<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V> std::fmt::Debug for PushServer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushServer")
            .field("controller_id", &self.inner.controller_id)
            .field("subscribers", &self.inner.subscribers)
            .finish_non_exhaustive()
    }
}

impl<V: ConfigView> PushServer<V> {
    /// A server pushing from `worlds`, authenticating callers with `authenticator`.
    /// `controller_id` names this replica in every update.
    pub fn new(
        worlds: Worlds<V>,
        authenticator: Arc<dyn Authenticator>,
        metrics: Metrics,
        controller_id: impl Into<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                worlds,
                authenticator,
                subscribers: Subscribers::default(),
                metrics,
                controller_id: controller_id.into(),
                stop: watch::Sender::new(false),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    /// The per-stream status, for the admin dump.
    pub fn subscribers(&self) -> Subscribers {
        self.inner.subscribers.clone()
    }

    /// Ends every open stream with `UNAVAILABLE` (graceful shutdown: the proxies
    /// reconnect to another replica, or to this one after a restart, and resume).
    pub fn stop_streams(&self) {
        self.inner.stop.send_replace(true);
    }

    /// The tonic service, with Ambit's message size limits.
    pub fn into_service(self) -> ConfigDiscoveryServer<Self> {
        ConfigDiscoveryServer::new(self)
            .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(ambit_api::MAX_MESSAGE_SIZE)
    }
}

impl Subscribers {
    /// Every stream, connected or not (the last disconnected one of a subscriber is
    /// kept until it reconnects), ordered by subscriber.
    pub fn list(&self) -> Vec<SubscriberStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Subscriber, u64), SubscriberStatus>> {
        // Plain data updated field by field: consistent after a panic elsewhere.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, subscriber: &Subscriber, stream: u64, status: SubscriberStatus) {
        let mut streams = self.lock();
        streams.retain(|(s, _), st| s != subscriber || st.connected);
        streams.insert((subscriber.clone(), stream), status);
    }

    fn update(&self, subscriber: &Subscriber, stream: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        if let Some(st) = self.lock().get_mut(&(subscriber.clone(), stream)) {
            f(st);
        }
    }
}

#[tonic::async_trait]
impl<V: ConfigView> ConfigDiscovery for PushServer<V> {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = authenticate_request(&*self.inner.authenticator, &request).await?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let stream = inner.next_stream.fetch_add(1, Ordering::Relaxed);
            if let Err(status) = run_stream(&inner, stream, &caller, inbound, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The state of one stream.
struct Session {
    subscriber: Subscriber,
    stream: u64,
    /// Key → version of what the proxy holds as of its last ACK (or `Hello`).
    acked: BTreeMap<String, String>,
    /// Whether the first (SYNC) update is still to be sent.
    first: bool,
    /// The proxy said it holds nothing: the SYNC update is a full snapshot.
    full_first: bool,
    next_version: u64,
    in_flight: Option<InFlight>,
    /// Desired state of the last NACKed update: not resent unchanged.
    rejected: Option<BTreeMap<String, String>>,
}

struct InFlight {
    version: u64,
    state: BTreeMap<String, String>,
}

/// Decrements the connected-streams gauge and marks the stream disconnected, however
/// the stream ends.
struct Connected<'a> {
    subscribers: &'a Subscribers,
    metrics: &'a Metrics,
    subscriber: Subscriber,
    stream: u64,
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.metrics
            .subscribers
            .get_or_create(&type_labels(&self.subscriber))
            .dec();
        self.subscribers
            .update(&self.subscriber, self.stream, |st| st.connected = false);
        tracing::info!(subscriber = %self.subscriber, stream = self.stream, "config stream closed");
    }
}

async fn run_stream<V: ConfigView>(
    inner: &Inner<V>,
    stream: u64,
    caller: &Caller,
    mut inbound: Streaming<SubscribeRequest>,
    tx: &mpsc::Sender<Result<ConfigUpdate, Status>>,
) -> Result<(), Status> {
    let mut stop = inner.stop.subscribe();
    if *stop.borrow_and_update() {
        return Err(shutting_down());
    }
    let first = tokio::select! {
        msg = inbound.message() => msg,
        () = tx.closed() => return Ok(()),
        _ = stop.changed() => return Err(shutting_down()),
    };
    let hello = match first {
        Ok(Some(SubscribeRequest {
            kind: Some(subscribe_request::Kind::Hello(h)),
        })) => h,
        Ok(None) | Err(_) => return Ok(()),
        Ok(Some(_)) => {
            return Err(Status::invalid_argument(
                "the first message of a stream must be Hello",
            ));
        }
    };
    let subscriber = subscriber_of(&hello)?;
    if !caller.may_subscribe_as(&subscriber) {
        tracing::warn!(%caller, %subscriber, "refused a subscription with another subscriber's credential");
        return Err(Status::permission_denied(format!(
            "the credential of {caller} may not subscribe as {subscriber}"
        )));
    }
    tracing::info!(
        %subscriber,
        stream,
        held = hello.resource_versions.len(),
        last_acked_version = hello.last_acked_version,
        proxy_version = %hello.proxy_version,
        "config stream opened"
    );
    let mut session = Session {
        subscriber: subscriber.clone(),
        stream,
        full_first: hello.resource_versions.is_empty(),
        acked: hello.resource_versions.clone(),
        first: true,
        next_version: 1,
        in_flight: None,
        rejected: None,
    };
    inner.subscribers.register(
        &subscriber,
        stream,
        SubscriberStatus {
            subscriber: subscriber.to_string(),
            connected: true,
            version_sent: 0,
            version_acked: 0,
            last_nack: None,
            resources: session.acked.len(),
            generation_sent: 0,
            proxy_version: hello.proxy_version.clone(),
            resumed_from_version: hello.last_acked_version,
        },
    );
    inner
        .metrics
        .subscribers
        .get_or_create(&type_labels(&subscriber))
        .inc();
    let _connected = Connected {
        subscribers: &inner.subscribers,
        metrics: &inner.metrics,
        subscriber: subscriber.clone(),
        stream,
    };

    let mut worlds = inner.worlds.clone();
    let mut dirty = true;
    loop {
        if dirty && session.in_flight.is_none() {
            let world = worlds.borrow_and_update().clone();
            if let Some(world) = world {
                dirty = false;
                if let Some(update) = session.next_update(&*world, &inner.controller_id) {
                    let version = update.version;
                    tracing::debug!(
                        subscriber = %subscriber,
                        version,
                        generation = world.generation(),
                        full = update.is_full_snapshot,
                        upserts = update.resources.len(),
                        removed = update.removed.len(),
                        "sending config update"
                    );
                    if tx.send(Ok(update)).await.is_err() {
                        return Ok(());
                    }
                    inner
                        .metrics
                        .pushes
                        .get_or_create(&type_labels(&subscriber))
                        .inc();
                    let generation = world.generation();
                    inner.subscribers.update(&subscriber, stream, |st| {
                        st.version_sent = version;
                        st.generation_sent = generation;
                    });
                }
            }
        }
        tokio::select! {
            changed = worlds.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("the controller's config index stopped"));
                }
                dirty = true;
            }
            msg = inbound.message() => match msg {
                Ok(Some(SubscribeRequest { kind: Some(kind) })) => {
                    session.answer(inner, kind)?;
                }
                Ok(Some(SubscribeRequest { kind: None })) => {
                    return Err(Status::invalid_argument("empty SubscribeRequest"));
                }
                Ok(None) | Err(_) => return Ok(()),
            },
            () = tx.closed() => return Ok(()),
            _ = stop.changed() => return Err(shutting_down()),
        }
    }
}

impl Session {
    /// The next update to send, or `None` when the proxy already holds everything
    /// (or the only difference is what it just rejected).
    fn next_update(&mut self, view: &dyn ConfigView, controller_id: &str) -> Option<ConfigUpdate> {
        let desired = view.resources_for(&self.subscriber);
        let state: BTreeMap<String, String> = desired
            .iter()
            .map(|(k, r)| (k.clone(), r.version.clone()))
            .collect();
        let first = std::mem::replace(&mut self.first, false);
        let (full, resources, removed): (bool, Vec<Resource>, Vec<String>) =
            if first && self.full_first {
                (true, desired.into_values().collect(), Vec::new())
            } else {
                if !first && (state == self.acked || self.rejected.as_ref() == Some(&state)) {
                    return None;
                }
                let removed = self
                    .acked
                    .keys()
                    .filter(|k| !desired.contains_key(*k))
                    .cloned()
                    .collect();
                let upserts = desired
                    .into_iter()
                    .filter(|(k, r)| self.acked.get(k) != Some(&r.version))
                    .map(|(_, r)| r)
                    .collect();
                (false, upserts, removed)
            };
        let version = self.next_version;
        self.next_version += 1;
        self.in_flight = Some(InFlight { version, state });
        Some(ConfigUpdate {
            version,
            is_full_snapshot: full,
            resources,
            removed,
            generated_at: Some(ambit_api::time::timestamp_to_proto(SystemTime::now())),
            controller_id: controller_id.to_owned(),
        })
    }

    fn answer<V>(&mut self, inner: &Inner<V>, kind: subscribe_request::Kind) -> Result<(), Status> {
        match kind {
            subscribe_request::Kind::Hello(_) => Err(Status::invalid_argument(
                "Hello may be sent only once per stream",
            )),
            subscribe_request::Kind::Ack(ack) => {
                match self.in_flight.take_if(|f| f.version == ack.version) {
                    Some(f) => {
                        self.acked = f.state;
                        self.rejected = None;
                        let held = self.acked.len();
                        inner
                            .subscribers
                            .update(&self.subscriber, self.stream, |st| {
                                st.version_acked = ack.version;
                                st.resources = held;
                            });
                    }
                    None => tracing::warn!(
                        subscriber = %self.subscriber,
                        version = ack.version,
                        "ignoring an ACK for an update that is not in flight"
                    ),
                }
                Ok(())
            }
            subscribe_request::Kind::Nack(nack) => {
                match self.in_flight.take_if(|f| f.version == nack.version) {
                    Some(f) => {
                        let resource_errors: Vec<String> = nack
                            .resource_errors
                            .iter()
                            .map(|e| format!("{}: {}", e.key, e.error))
                            .collect();
                        tracing::warn!(
                            subscriber = %self.subscriber,
                            version = nack.version,
                            error = %nack.error,
                            resource_errors = ?resource_errors,
                            "proxy rejected a config update (NACK); it keeps its previous config"
                        );
                        inner
                            .metrics
                            .nacks
                            .get_or_create(&type_labels(&self.subscriber))
                            .inc();
                        self.rejected = Some(f.state);
                        inner
                            .subscribers
                            .update(&self.subscriber, self.stream, |st| {
                                st.last_nack = Some(NackStatus {
                                    version: nack.version,
                                    error: nack.error,
                                    resource_errors,
                                });
                            });
                    }
                    None => tracing::warn!(
                        subscriber = %self.subscriber,
                        version = nack.version,
                        "ignoring a NACK for an update that is not in flight"
                    ),
                }
                Ok(())
            }
        }
    }
}

fn subscriber_of(hello: &Hello) -> Result<Subscriber, Status> {
    match &hello.subscriber {
        Some(hello::Subscriber::Node(n)) if !n.node_name.is_empty() => Ok(Subscriber::Node {
            name: n.node_name.clone(),
        }),
        Some(hello::Subscriber::Waypoint(w)) if !w.namespace.is_empty() && !w.name.is_empty() => {
            Ok(Subscriber::Waypoint {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            })
        }
        Some(_) => Err(Status::invalid_argument(
            "Hello names a subscriber with an empty name",
        )),
        None => Err(Status::invalid_argument("Hello names no subscriber")),
    }
}

fn type_labels(subscriber: &Subscriber) -> SubscriberTypeLabels {
    SubscriberTypeLabels {
        subscriber_type: match subscriber {
            Subscriber::Node { .. } => "node",
            Subscriber::Waypoint { .. } => "waypoint",
        },
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the controller is shutting down; reconnect and resume")
}
