//! The Kubernetes source: one kube-rs watcher per kind Ambit reads, across all
//! namespaces, each object an origin of its own.
//!
//! Every kind — core kinds and the Istio / Gateway API kinds alike — is watched as a
//! [`DynamicObject`] and handed to the same parser as local-mode YAML
//! ([`parse_value`]). A typed watcher would fail to decode an object our types refuse
//! (a misspelt field, a bad `ipBlocks` entry) and stall the whole stream; watched raw,
//! such an object reaches validation and is rejected with a reason naming the field,
//! like its YAML twin in local mode.
//!
//! Protocol with the index (see [`super`]):
//! - an added or changed object: `Replace { origin, documents: [parsed] }`, where
//!   origin is `kubernetes:<apiVersion>/<kind>/<namespace>/<name>` (cluster-scoped
//!   kinds: `kubernetes:<apiVersion>/<kind>/<name>`);
//! - a deleted object: `Replace { origin, documents: [] }`;
//! - after a re-list (the watcher lost its place, e.g. `410 Gone` after a disconnect),
//!   every object that was known but not listed again is deleted the same way;
//! - once every kind has completed its first list, `Synced`, exactly once.
//!
//! Writes that change nothing the index reads (our own status writes on policies, a
//! `resourceVersion` bump) are not forwarded: `metadata.resourceVersion` and
//! `metadata.managedFields` are dropped, as is `status` of the Istio / Gateway API
//! kinds (the parser ignores it), and an object is only sent when what remains differs
//! from what was sent last.
//!
//! Each kind is watched at the first of its [`ResourceKind::versions`] the API server
//! serves. A kind the cluster does not serve at all (its CRD is not installed: `404` on
//! list) counts as empty, so it does not hold up `Synced`; it is logged and looked for
//! again with backoff. Any other failure (`403` for missing RBAC, a network error) is
//! retried with backoff and *does* hold up `Synced`: starting without the
//! AuthorizationPolicies we were not allowed to read could widen access.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    pin::pin,
    time::Duration,
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::watcher::{self, Event},
};
use serde_json::Value;
use tokio::{
    sync::{mpsc, oneshot},
    task::{self, JoinSet},
};
use tokio_stream::StreamExt as _;
use tracing::{debug, info, warn};

use super::{OriginId, SourceEvent};
use crate::{
    diagnostics::Origin,
    resources::{ResourceKind, parse_value},
};

/// Failure to build a Kubernetes client from the environment.
#[derive(Debug, thiserror::Error)]
#[error("building a Kubernetes client (in-cluster service account or kubeconfig)")]
pub struct ClientFromEnvError(#[source] kube::Error);

/// Failure of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The task watching one kind panicked or was cancelled.
    #[error("the watcher of {kind} stopped unexpectedly")]
    WatchTask {
        /// The kind it watched (`Synced` announcer: `initial sync`).
        kind: String,
        /// The task's failure.
        #[source]
        source: task::JoinError,
    },
}

/// Retry timing of the Kubernetes source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSourceConfig {
    /// First delay after a failed list or watch; doubles up to `error_backoff_max`.
    pub error_backoff_initial: Duration,
    /// Longest delay between retries of a failing list or watch.
    pub error_backoff_max: Duration,
    /// First delay before looking again for a kind the cluster does not serve (CRD
    /// not installed); doubles up to `missing_kind_retry_max`.
    pub missing_kind_retry_initial: Duration,
    /// Longest delay between looks for a kind the cluster does not serve.
    pub missing_kind_retry_max: Duration,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            error_backoff_initial: Duration::from_millis(500),
            error_backoff_max: Duration::from_secs(30),
            missing_kind_retry_initial: Duration::from_secs(30),
            missing_kind_retry_max: Duration::from_secs(300),
        }
    }
}

/// The event channel is closed: the index is gone, and so is our reason to run.
#[derive(Debug)]
struct Closed;

/// Exponential backoff between two bounds.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Builds a client from the environment: the in-cluster service account when running
/// in a pod, else the current kubeconfig context (`KUBECONFIG`, `~/.kube/config`).
pub async fn client_from_env() -> Result<Client, ClientFromEnvError> {
    Client::try_default().await.map_err(ClientFromEnvError)
}

/// Runs the Kubernetes source with default retry timing; see
/// [`run_kube_source_with`].
pub async fn run_kube_source(
    client: Client,
    events: mpsc::Sender<SourceEvent>,
) -> Result<(), KubeSourceError> {
    run_kube_source_with(client, KubeSourceConfig::default(), events).await
}

/// Watches every kind Ambit reads and reports to `events` (module docs: the
/// protocol). Runs until the receiver of `events` is dropped (then `Ok`); dropping the
/// future stops every watcher.
pub async fn run_kube_source_with(
    client: Client,
    config: KubeSourceConfig,
    events: mpsc::Sender<SourceEvent>,
) -> Result<(), KubeSourceError> {
    let mut tasks = JoinSet::new();
    let mut names: HashMap<task::Id, String> = HashMap::new();
    let mut synced = Vec::new();
    for kind in ResourceKind::ALL {
        let (tx, rx) = oneshot::channel();
        synced.push(rx);
        let watch = KindWatch {
            kind,
            client: client.clone(),
            events: events.clone(),
            config: config.clone(),
            known: HashMap::new(),
            synced: Some(tx),
            missing: false,
        };
        let handle = tasks.spawn(async move {
            // Closed: the index is gone; the caller sees the channel closed.
            let _ = watch.run().await;
        });
        names.insert(handle.id(), kind.kind().to_owned());
    }
    let announcer = events.clone();
    let handle = tasks.spawn(async move {
        for rx in synced {
            if rx.await.is_err() {
                return;
            }
        }
        info!("kubernetes source: initial list of every kind complete");
        let _ = announcer.send(SourceEvent::Synced).await;
    });
    names.insert(handle.id(), "initial sync".to_owned());

    loop {
        tokio::select! {
            () = events.closed() => return Ok(()),
            done = tasks.join_next_with_id() => match done {
                // The announcer is done (or a watcher saw the channel close, which the
                // other branch reports); the watchers go on.
                Some(Ok(_)) => {}
                None => return Ok(()),
                Some(Err(source)) => {
                    return Err(KubeSourceError::WatchTask {
                        kind: names.remove(&source.id()).unwrap_or_default(),
                        source,
                    });
                }
            },
        }
    }
}

/// The plural resource name of `kind` in URLs.
fn plural(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Namespace => "namespaces",
        ResourceKind::Node => "nodes",
        ResourceKind::Pod => "pods",
        ResourceKind::Service => "services",
        ResourceKind::ServiceAccount => "serviceaccounts",
        ResourceKind::EndpointSlice => "endpointslices",
        ResourceKind::PeerAuthentication => "peerauthentications",
        ResourceKind::AuthorizationPolicy => "authorizationpolicies",
        ResourceKind::VirtualService => "virtualservices",
        ResourceKind::DestinationRule => "destinationrules",
        ResourceKind::HttpRoute => "httproutes",
        ResourceKind::GrpcRoute => "grpcroutes",
        ResourceKind::Gateway => "gateways",
    }
}

/// The API resource of `kind` at `version`.
pub fn api_resource(kind: ResourceKind, version: &str) -> ApiResource {
    let group = kind.group();
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.kind().to_owned(),
        plural: plural(kind).to_owned(),
    }
}

/// The origin of one Kubernetes object (module docs: the format).
pub fn origin_id(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> OriginId {
    match namespace {
        Some(ns) => OriginId(format!("kubernetes:{api_version}/{kind}/{ns}/{name}")),
        None => OriginId(format!("kubernetes:{api_version}/{kind}/{name}")),
    }
}

/// One kind's watcher and what it has told the index.
struct KindWatch {
    kind: ResourceKind,
    client: Client,
    events: mpsc::Sender<SourceEvent>,
    config: KubeSourceConfig,
    /// Every object the index holds from us, with the hash of what was sent.
    known: HashMap<OriginId, u64>,
    /// Fired once, when the first list completed (or the kind is not served).
    synced: Option<oneshot::Sender<()>>,
    /// The cluster served no version at the last look (and we said so).
    missing: bool,
}

impl KindWatch {
    async fn run(mut self) -> Result<(), Closed> {
        let mut retry = Backoff::new(
            self.config.missing_kind_retry_initial,
            self.config.missing_kind_retry_max,
        );
        loop {
            self.watch_first_served_version().await?;
            // No version is served: the CRD is not installed (or was removed). Said
            // once, not at every look.
            if self.missing {
                debug!(kind = %self.kind, "still not served");
            } else {
                warn!(
                    kind = %self.kind,
                    group = self.kind.group(),
                    versions = ?self.kind.versions(),
                    "the cluster serves no version of {} ({}): treating it as empty until it does; is its CRD installed?",
                    self.kind,
                    self.kind.group(),
                );
                self.missing = true;
            }
            let gone: Vec<OriginId> = self.known.keys().cloned().collect();
            for origin in gone {
                self.forget(origin).await?;
            }
            self.mark_synced();
            tokio::time::sleep(retry.next_delay()).await;
        }
    }

    /// Watches the kind at the first version the cluster serves; returns once the
    /// cluster serves none of them (404 on list).
    async fn watch_first_served_version(&mut self) -> Result<(), Closed> {
        let mut backoff = Backoff::new(
            self.config.error_backoff_initial,
            self.config.error_backoff_max,
        );
        for version in self.kind.versions() {
            let ar = api_resource(self.kind, version);
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &ar);
            let mut stream = pin!(watcher::watcher(api, watcher::Config::default()));
            // Origins seen since the current (re-)list began.
            let mut listing: Option<HashSet<OriginId>> = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Event::Init) => listing = Some(HashSet::new()),
                    Ok(Event::InitApply(obj)) => {
                        let origin = self.apply(&ar, obj).await?;
                        if let Some(seen) = listing.as_mut() {
                            seen.insert(origin);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let Some(seen) = listing.take() {
                            let gone: Vec<OriginId> = self
                                .known
                                .keys()
                                .filter(|o| !seen.contains(*o))
                                .cloned()
                                .collect();
                            for origin in gone {
                                debug!(%origin, "not listed again: deleted while we were away");
                                self.forget(origin).await?;
                            }
                        }
                        if self.synced.is_some() || self.missing {
                            info!(kind = %self.kind, api_version = %ar.api_version, objects = self.known.len(), "initial list complete");
                        }
                        self.missing = false;
                        self.mark_synced();
                        backoff.reset();
                    }
                    Ok(Event::Apply(obj)) => {
                        self.apply(&ar, obj).await?;
                        backoff.reset();
                    }
                    Ok(Event::Delete(obj)) => {
                        let origin = origin_id(
                            &ar.api_version,
                            &ar.kind,
                            obj.metadata.namespace.as_deref(),
                            obj.metadata.name.as_deref().unwrap_or_default(),
                        );
                        self.forget(origin).await?;
                        backoff.reset();
                    }
                    // 404 on list: not served in this version. On watch: it no
                    // longer is (CRD removed); the objects go with it.
                    Err(
                        watcher::Error::InitialListFailed(kube::Error::Api(status))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(status)),
                    ) if status.is_not_found() => {
                        debug!(kind = %self.kind, api_version = %ar.api_version, "not served");
                        break;
                    }
                    Err(error) => {
                        let delay = backoff.next_delay();
                        warn!(
                            kind = %self.kind,
                            api_version = %ar.api_version,
                            error = %error,
                            retry_in = ?delay,
                            "kubernetes watch failed; retrying"
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                if self.events.is_closed() {
                    return Err(Closed);
                }
            }
        }
        Ok(())
    }

    fn mark_synced(&mut self) {
        if let Some(tx) = self.synced.take() {
            let _ = tx.send(());
        }
    }

    /// Sends an added or changed object, unless nothing the index reads changed.
    async fn apply(&mut self, ar: &ApiResource, obj: DynamicObject) -> Result<OriginId, Closed> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let namespace = obj.metadata.namespace.clone();
        let origin = origin_id(&ar.api_version, &ar.kind, namespace.as_deref(), &name);
        let json = object_json(self.kind, ar, obj);
        let hash = content_hash(&json);
        if self.known.get(&origin) == Some(&hash) {
            return Ok(origin);
        }
        let document = parse_value(
            Origin {
                source: origin.0.clone(),
                document: 1,
                line: 1,
            },
            json,
        );
        self.known.insert(origin.clone(), hash);
        self.events
            .send(SourceEvent::Replace {
                origin: origin.clone(),
                documents: vec![document],
            })
            .await
            .map_err(|_| Closed)?;
        Ok(origin)
    }

    /// Tells the index an object is gone.
    async fn forget(&mut self, origin: OriginId) -> Result<(), Closed> {
        if self.known.remove(&origin).is_none() {
            return Ok(());
        }
        self.events
            .send(SourceEvent::Replace {
                origin,
                documents: Vec::new(),
            })
            .await
            .map_err(|_| Closed)
    }
}

/// The object as the parser reads it: `apiVersion` and `kind` filled in (list items
/// carry neither), without the fields that change on every write.
fn object_json(kind: ResourceKind, ar: &ApiResource, obj: DynamicObject) -> Value {
    let DynamicObject {
        mut metadata, data, ..
    } = obj;
    metadata.managed_fields = None;
    metadata.resource_version = None;
    let mut map = match data {
        Value::Object(map) => map,
        // `data` collects the object's other top-level fields: always a map.
        _ => serde_json::Map::new(),
    };
    if !matches!(kind.group(), "" | "discovery.k8s.io") {
        // Written by controllers (us included); the parser ignores it.
        map.remove("status");
    }
    map.insert("apiVersion".to_owned(), Value::from(ar.api_version.clone()));
    map.insert("kind".to_owned(), Value::from(ar.kind.clone()));
    // ObjectMeta has only string keys and no floats: serializing it cannot fail. Were
    // it to, the object is rejected (no metadata) rather than dropped.
    let meta = serde_json::to_value(&metadata).unwrap_or(Value::Null);
    map.insert("metadata".to_owned(), meta);
    Value::Object(map)
}

/// A hash of the object's content, to skip sending an object that did not change.
fn content_hash(value: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    hash_value(value, &mut h);
    h.finish()
}

fn hash_value(value: &Value, h: &mut DefaultHasher) {
    // A tag per variant keeps `["a"]` and `"a"` (and the like) apart.
    match value {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (1u8, b).hash(h),
        Value::Number(n) => (2u8, n.to_string()).hash(h),
        Value::String(s) => (3u8, s).hash(h),
        Value::Array(items) => {
            (4u8, items.len()).hash(h);
            for v in items {
                hash_value(v, h);
            }
        }
        Value::Object(map) => {
            (5u8, map.len()).hash(h);
            for (k, v) in map {
                k.hash(h);
                hash_value(v, h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_resources() {
        let ar = api_resource(ResourceKind::AuthorizationPolicy, "v1beta1");
        assert_eq!(ar.api_version, "security.istio.io/v1beta1");
        assert_eq!(ar.plural, "authorizationpolicies");
        assert_eq!(
            origin_id(&ar.api_version, &ar.kind, Some("ns"), "p").0,
            "kubernetes:security.istio.io/v1beta1/AuthorizationPolicy/ns/p"
        );
        let node = api_resource(ResourceKind::Node, "v1");
        assert_eq!(
            origin_id(&node.api_version, &node.kind, None, "n1").0,
            "kubernetes:v1/Node/n1"
        );
    }

    #[test]
    fn status_and_resource_version_do_not_count_as_changes() {
        let ar = api_resource(ResourceKind::AuthorizationPolicy, "v1");
        let obj = |rv: &str, status: Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "resourceVersion": rv},
                "spec": {"action": "DENY"},
                "status": status,
            }))
            .unwrap()
        };
        let a = object_json(
            ResourceKind::AuthorizationPolicy,
            &ar,
            obj("1", Value::Null),
        );
        let b = object_json(
            ResourceKind::AuthorizationPolicy,
            &ar,
            obj("2", serde_json::json!({"conditions": []})),
        );
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(a["apiVersion"], "security.istio.io/v1");
        assert_eq!(a["kind"], "AuthorizationPolicy");
    }

    #[test]
    fn backoff_doubles_to_its_bound() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        let seq: Vec<u64> = (0..4).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(seq, vec![1, 2, 3, 3]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }
}
