//! Status conditions on the Istio and Gateway API objects the controller read, written
//! with server-side apply on the `status` subresource (field manager
//! [`FIELD_MANAGER`], forced), so that `kubectl get -o yaml` says whether Ambit serves
//! an object and, if not, which field is wrong (DESIGN §4, issue item 6).
//!
//! The shapes follow what operators of each API already read:
//!
//! - **Istio kinds** (AuthorizationPolicy, PeerAuthentication, VirtualService,
//!   DestinationRule): `status.conditions` holds one condition of type `Accepted`
//!   (metav1.Condition fields), as Istio's ambient mode writes `ZtunnelAccepted` /
//!   `WaypointAccepted` on policies, plus `status.observedGeneration`:
//!   ```yaml
//!   status:
//!     observedGeneration: 3
//!     conditions:
//!     - type: Accepted
//!       status: "False"            # "True" when served
//!       reason: Invalid            # "Accepted" when served
//!       message: "spec.rules[0].from[0].source.ipBlocks[1]: prefix length `33` is invalid (enforced fail-closed in the meantime)"
//!       observedGeneration: 3
//!       lastTransitionTime: "2025-01-01T00:00:00Z"
//!   ```
//! - **HTTPRoute / GRPCRoute**: Gateway API route status, one `status.parents[]` entry
//!   per `Service` parent (GAMMA) with `controllerName: ambit.dev/controller` and an
//!   `Accepted` condition (reason `Accepted`, or `UnsupportedValue` when rejected).
//!   Parents that are not Services belong to other controllers and are not written
//!   for; a route without Service parents gets no status from Ambit.
//! - **Gateway** (`gatewayClassName: ambit-waypoint` or `istio-waypoint` only):
//!   `status.conditions` with `Accepted` (reason `Accepted` / `Invalid`) and
//!   `Programmed`: `False` (reason `Invalid`) when rejected; otherwise, in Kubernetes
//!   mode, what the waypoint deployer ([`crate::waypoint_deploy`]) reports
//!   ([`StatusReport::programmed`]: `True` once the waypoint's ServiceAccount, Service
//!   and Deployment are applied, `False` with the reason why not).
//!
//! A condition's `lastTransitionTime` changes only when its `status` does. The writer
//! remembers what it wrote and writes again only when that changes, so its own writes
//! (which come back as watch events) do not make it loop; after a restart it reads
//! each object's status once before writing, so a controller restart or failover
//! rewrites nothing that is already right. Failures are logged and retried with
//! backoff; they never stop the controller.
//!
//! With several replicas only one writes: [`run_status_writer_elected`] runs the
//! writer while this replica holds a `coordination.k8s.io` Lease ([`LeaseConfig`]).

use std::sync::Arc;
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    model::waypoint::{ISTIO_WAYPOINT_CLASS, WAYPOINT_CLASS},
    resources::{ParsedDocument, Resource, ResourceKind},
    source::kube::api_resource,
    validate::{Outcome, Validated},
};
use crate::{
    source::OriginId,
    world::{Document, World},
};

/// The server-side apply field manager of every status write.
pub const FIELD_MANAGER: &str = "ambit-controller";
/// Gateway API `controllerName` of Ambit (route parent status).
pub const CONTROLLER_NAME: &str = "ambit.dev/controller";

/// Kubernetes caps a condition message at 32768 bytes.
const MAX_MESSAGE: usize = 32 * 1024;

/// The verdict on one object, as the status writer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    /// `apiVersion` the object was read in (the version its status is written in).
    pub api_version: String,
    /// Its kind; only Istio and Gateway API kinds get a status.
    pub kind: ResourceKind,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.generation`, reported back as `observedGeneration`.
    pub generation: Option<i64>,
    /// Whether Ambit serves it as written.
    pub accepted: bool,
    /// Condition reason: `Accepted`, `Invalid` or `Duplicate` (routes report any
    /// refusal as Gateway API's `UnsupportedValue`).
    pub reason: String,
    /// Why not (every problem, each naming its field), or the caveats of an accepted
    /// object; may be empty.
    pub message: String,
    /// Routes: `spec.parentRefs` as written (status echoes them back).
    pub parent_refs: Vec<Value>,
    /// Gateways: `spec.gatewayClassName` as written.
    pub gateway_class: Option<String>,
    /// Accepted waypoint Gateways: the `Programmed` condition (None: not written).
    pub programmed: Option<ProgrammedStatus>,
}

/// The `Programmed` condition of an accepted waypoint Gateway: whether the objects
/// that run it exist (see [`crate::waypoint_deploy`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedStatus {
    /// Whether the waypoint's objects are applied.
    pub programmed: bool,
    /// Condition reason: `Programmed`, `Invalid`, `Pending` or `Conflict`.
    pub reason: &'static str,
    /// What was applied, or why not, in plain words.
    pub message: String,
}

impl StatusReport {
    /// The report for one validated document, when it is an Istio or Gateway API
    /// object with a readable namespace and name (core kinds and ignored documents
    /// have none). [`reports_of`] is the same over a whole world, with what only the
    /// index knows (duplicates, cross-object findings) added.
    pub fn from_validated(doc: &ParsedDocument, validated: &Validated) -> Option<Self> {
        let accepted = match &validated.outcome {
            Outcome::Accepted { .. } => true,
            Outcome::Rejected { .. } => false,
            Outcome::Ignored { .. } => return None,
        };
        let (api_version, kind, generation) = match doc {
            ParsedDocument::Resource(r) => (
                r.api_version.clone(),
                r.resource.kind(),
                r.resource.metadata().generation,
            ),
            ParsedDocument::Rejected(r) => {
                let api_version = r.rejection.api_version.clone()?;
                let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
                let kind = ResourceKind::lookup(group, r.rejection.kind.as_deref()?)?;
                let generation = r
                    .raw
                    .as_ref()
                    .and_then(|raw| raw.get("metadata"))
                    .and_then(|m| m.get("generation"))
                    .and_then(serde_yaml::Value::as_i64);
                (api_version, kind, generation)
            }
            ParsedDocument::Ignored(_) => return None,
        };
        if kind.group().is_empty() || kind == ResourceKind::EndpointSlice {
            return None;
        }
        let spec = spec_of(doc);
        Some(Self {
            api_version,
            kind,
            namespace: validated.namespace.clone()?,
            name: validated.name.clone()?,
            generation,
            accepted,
            reason: if accepted { "Accepted" } else { "Invalid" }.to_owned(),
            message: validated.status_entry().reason,
            parent_refs: spec["parentRefs"].as_array().cloned().unwrap_or_default(),
            gateway_class: spec["gatewayClassName"].as_str().map(str::to_owned),
            programmed: None,
        })
    }
}

/// The status reports of one generation of the index's world: its
/// [`World::status_reports`], with the parent refs of routes and the class of
/// gateways read from their documents. Objects Ambit does not act on (ignored
/// documents, Gateways of other classes) are left out.
pub fn reports_of(world: &World) -> Vec<StatusReport> {
    let docs: HashMap<(&OriginId, &str), &Document> = world
        .documents()
        .filter_map(|d| Some(((&d.origin, d.validated.name.as_deref()?), d)))
        .collect();
    world
        .status_reports()
        .into_iter()
        .filter_map(|r| {
            let group = r.api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let kind = ResourceKind::lookup(group, &r.kind)?;
            let doc = docs.get(&(&r.origin, r.name.as_str()))?;
            if matches!(doc.validated.outcome, Outcome::Ignored { .. }) {
                return None;
            }
            let spec = spec_of(&doc.parsed);
            Some(StatusReport {
                api_version: r.api_version,
                kind,
                namespace: r.namespace?,
                name: r.name,
                generation: r.generation,
                accepted: r.accepted,
                reason: r.reason,
                message: r.message,
                parent_refs: spec["parentRefs"].as_array().cloned().unwrap_or_default(),
                gateway_class: spec["gatewayClassName"].as_str().map(str::to_owned),
                programmed: None,
            })
        })
        .collect()
}

/// The spec of a document as JSON, typed or as written (Null when there is none).
fn spec_of(doc: &ParsedDocument) -> Value {
    let typed = match doc {
        ParsedDocument::Resource(r) => match &r.resource {
            Resource::HttpRoute(r) => serde_json::to_value(&r.spec),
            Resource::GrpcRoute(r) => serde_json::to_value(&r.spec),
            Resource::Gateway(g) => serde_json::to_value(&g.spec),
            _ => return Value::Null,
        },
        ParsedDocument::Rejected(r) => r
            .raw
            .as_ref()
            .and_then(|raw| raw.get("spec"))
            .map_or(Ok(Value::Null), serde_json::to_value),
        ParsedDocument::Ignored(_) => return Value::Null,
    };
    typed.unwrap_or(Value::Null)
}

/// Retry timing of the status writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWriterConfig {
    /// First delay before retrying failed writes; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest delay between retries of failed writes.
    pub retry_max: Duration,
}

impl Default for StatusWriterConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Where the status lives in each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Istio,
    Route,
    Gateway,
}

/// One condition we want, without its transition time.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cond {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

/// The status we want on one object, without transition times.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Desired {
    shape: Shape,
    api_version: String,
    generation: Option<i64>,
    conditions: Vec<Cond>,
    /// Routes: the Service parent refs to report on.
    parents: Vec<Value>,
}

/// When each condition type last changed status: (status, lastTransitionTime).
type Times = BTreeMap<&'static str, (bool, String)>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    kind: ResourceKind,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct Written {
    desired: Desired,
    times: Times,
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Desired {
    fn from_report(r: &StatusReport) -> Option<Self> {
        let message = truncate(match (r.accepted, r.message.is_empty()) {
            (true, true) => "accepted by Ambit".to_owned(),
            (true, false) => format!("accepted by Ambit, with caveats: {}", r.message),
            (false, _) => r.message.clone(),
        });
        let reason = match r.reason.as_str() {
            "Duplicate" => "Duplicate",
            _ if r.accepted => "Accepted",
            _ => "Invalid",
        };
        let accepted = |refused: &'static str| Cond {
            type_: "Accepted",
            status: r.accepted,
            reason: if r.accepted { "Accepted" } else { refused },
            message: message.clone(),
        };
        let (shape, conditions, parents) = match r.kind {
            ResourceKind::AuthorizationPolicy
            | ResourceKind::PeerAuthentication
            | ResourceKind::VirtualService
            | ResourceKind::DestinationRule => (Shape::Istio, vec![accepted(reason)], vec![]),
            ResourceKind::HttpRoute | ResourceKind::GrpcRoute => {
                let parents: Vec<Value> = r
                    .parent_refs
                    .iter()
                    .filter(|p| {
                        p["kind"].as_str() == Some("Service")
                            && matches!(p["group"].as_str(), Some("" | "core"))
                    })
                    .cloned()
                    .collect();
                if parents.is_empty() {
                    return None;
                }
                (Shape::Route, vec![accepted("UnsupportedValue")], parents)
            }
            ResourceKind::Gateway => {
                if !matches!(
                    r.gateway_class.as_deref(),
                    Some(WAYPOINT_CLASS | ISTIO_WAYPOINT_CLASS)
                ) {
                    return None;
                }
                let mut conds = vec![accepted(reason)];
                if !r.accepted {
                    conds.push(Cond {
                        type_: "Programmed",
                        status: false,
                        reason,
                        message: message.clone(),
                    });
                } else if let Some(p) = &r.programmed {
                    conds.push(Cond {
                        type_: "Programmed",
                        status: p.programmed,
                        reason: p.reason,
                        message: truncate(p.message.clone()),
                    });
                }
                (Shape::Gateway, conds, vec![])
            }
            _ => return None,
        };
        Some(Self {
            shape,
            api_version: r.api_version.clone(),
            generation: r.generation,
            conditions,
            parents,
        })
    }

    fn render_conditions(&self, times: &Times) -> Vec<Value> {
        self.conditions
            .iter()
            .map(|c| {
                let mut v = json!({
                    "type": c.type_,
                    "status": if c.status { "True" } else { "False" },
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": times.get(c.type_).map(|(_, t)| t.as_str()).unwrap_or_default(),
                });
                if let Some(g) = self.generation {
                    v["observedGeneration"] = json!(g);
                }
                v
            })
            .collect()
    }

    /// The `status` to apply.
    fn render(&self, times: &Times) -> Value {
        let conditions = self.render_conditions(times);
        match self.shape {
            Shape::Istio => {
                let mut s = json!({ "conditions": conditions });
                if let Some(g) = self.generation {
                    s["observedGeneration"] = json!(g);
                }
                s
            }
            Shape::Gateway => json!({ "conditions": conditions }),
            Shape::Route => json!({
                "parents": self.parents.iter().map(|p| json!({
                    "parentRef": p,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conditions,
                })).collect::<Vec<_>>(),
            }),
        }
    }

    /// The part of an existing `status` this writer owns, in the shape of
    /// [`Self::render`]'s, for comparison.
    fn ours(&self, status: &Value) -> Value {
        let ours_only = |conds: &Value| -> Vec<Value> {
            conds
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .filter(|c| {
                            self.conditions
                                .iter()
                                .any(|d| c["type"].as_str() == Some(d.type_))
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        match self.shape {
            Shape::Istio => {
                let mut s = json!({ "conditions": ours_only(&status["conditions"]) });
                if !status["observedGeneration"].is_null() {
                    s["observedGeneration"] = status["observedGeneration"].clone();
                }
                s
            }
            Shape::Gateway => json!({ "conditions": ours_only(&status["conditions"]) }),
            Shape::Route => json!({
                "parents": status["parents"].as_array().map(|ps| ps.iter()
                    .filter(|p| p["controllerName"].as_str() == Some(CONTROLLER_NAME))
                    .cloned()
                    .collect::<Vec<_>>()).unwrap_or_default(),
            }),
        }
    }

    /// The transition times found in an existing status, for the conditions whose
    /// status is still what we want.
    fn times_from(&self, status: &Value) -> Times {
        let conds = match self.shape {
            Shape::Istio | Shape::Gateway => status["conditions"].clone(),
            Shape::Route => status["parents"]
                .as_array()
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p["controllerName"].as_str() == Some(CONTROLLER_NAME))
                })
                .map(|p| p["conditions"].clone())
                .unwrap_or(Value::Null),
        };
        let mut times = Times::new();
        for d in &self.conditions {
            let found = conds.as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"].as_str() == Some(d.type_))
                    .cloned()
            });
            if let Some(c) = found
                && let Some(t) = c["lastTransitionTime"].as_str()
            {
                let status = c["status"].as_str() == Some("True");
                times.insert(d.type_, (status, t.to_owned()));
            }
        }
        times
    }

    /// Moves the transition time of every condition whose status changes to `now`.
    fn advance(&self, times: &mut Times, now: &str) {
        for c in &self.conditions {
            match times.get(c.type_) {
                Some((status, _)) if *status == c.status => {}
                _ => {
                    times.insert(c.type_, (c.status, now.to_owned()));
                }
            }
        }
        times.retain(|t, _| self.conditions.iter().any(|c| c.type_ == *t));
    }
}

fn now_string() -> String {
    match serde_json::to_value(Time(Timestamp::now())) {
        Ok(Value::String(s)) => s,
        // Formatting the current time cannot fail; an empty time would be refused by
        // the API server and retried.
        _ => String::new(),
    }
}

/// Writes status for every generation of the index's world (see module docs), until
/// the index is gone. Failures are logged and retried; this never returns early.
pub async fn run_status_writer(client: Client, world: watch::Receiver<Arc<World>>) {
    run_status_writer_with(
        client,
        world,
        |w: &Arc<World>| reports_of(w),
        StatusWriterConfig::default(),
    )
    .await;
}

/// [`run_status_writer`] over any watched value, with explicit retry timing:
/// `reports` maps each value the channel takes to one report per object.
pub async fn run_status_writer_with<T, F>(
    client: Client,
    mut input: watch::Receiver<T>,
    mut reports: F,
    config: StatusWriterConfig,
) where
    T: Clone + Send + Sync + 'static,
    F: FnMut(&T) -> Vec<StatusReport>,
{
    let mut writer = StatusWriter {
        client,
        written: HashMap::new(),
    };
    let mut delay = config.retry_initial;
    loop {
        let current = input.borrow_and_update().clone();
        let failed = writer.sync(reports(&current)).await;
        let retry = failed > 0;
        if retry {
            warn!(
                failed,
                retry_in = ?delay,
                "some status writes failed; retrying"
            );
        } else {
            delay = config.retry_initial;
        }
        tokio::select! {
            changed = input.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(delay), if retry => {
                delay = (delay * 2).min(config.retry_max);
            }
        }
    }
}

/// Lease-based leader election for the status writer and the waypoint deployer
/// (DESIGN §5: every replica serves config, one writes status and waypoint objects).
/// A `coordination.k8s.io/v1` Lease names the writer; the holder renews it, and another replica takes it over once it has not
/// changed for `lease_duration` (measured on the taker's own clock, as client-go does,
/// so clock skew between replicas does not matter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the controller's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity in the Lease (its pod name).
    pub identity: String,
    /// How long a Lease that is not renewed stays held.
    pub lease_duration: Duration,
    /// How long the holder keeps writing without a successful renewal; shorter than
    /// `lease_duration`, so that it stops before another replica may start.
    pub renew_deadline: Duration,
    /// Interval between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults of client-go's leader election (15 s / 10 s / 2 s), for the Lease
    /// `ambit-controller-status` in `namespace`.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: "ambit-controller-status".to_owned(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// [`run_status_writer`], but only while this replica holds the Lease of `lease`;
/// the others wait to take over. Returns when the index is gone.
pub async fn run_status_writer_elected(
    client: Client,
    world: watch::Receiver<Arc<World>>,
    lease: LeaseConfig,
) {
    run_elected(
        client,
        world,
        |w: &Arc<World>| reports_of(w),
        StatusWriterConfig::default(),
        lease,
    )
    .await;
}

/// [`run_status_writer_with`] under the Lease of `lease` (see
/// [`run_status_writer_elected`]).
pub async fn run_elected<T, F>(
    client: Client,
    input: watch::Receiver<T>,
    reports: F,
    config: StatusWriterConfig,
    lease: LeaseConfig,
) where
    T: Clone + Send + Sync + 'static,
    F: FnMut(&T) -> Vec<StatusReport> + Clone,
{
    let writer_client = client.clone();
    let writer_input = input.clone();
    run_while_leading(client, &input, lease, "writing status", move || {
        run_status_writer_with(
            writer_client.clone(),
            writer_input.clone(),
            reports.clone(),
            config.clone(),
        )
    })
    .await;
}

/// Runs `term()` while this replica holds the Lease of `lease`, and only then: a
/// term's future is dropped (stopped) as soon as the Lease is lost or cannot be
/// renewed within `renew_deadline`, and a new one is started when the Lease is held
/// again. Returns when `input`'s sender is gone or a term's future returns. `what`
/// names the work in logs.
pub async fn run_while_leading<T, W, Fut>(
    client: Client,
    input: &watch::Receiver<T>,
    lease: LeaseConfig,
    what: &str,
    mut term: W,
) where
    W: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut elector = Elector {
        api: Api::namespaced(client, &lease.namespace),
        config: lease,
        observed: None,
    };
    loop {
        // Follower: try until the Lease is ours.
        loop {
            if input.has_changed().is_err() {
                return;
            }
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warn!(lease = %elector.config.name, error = %e, "acquiring the leader lease failed")
                }
            }
            tokio::time::sleep(elector.config.retry_period).await;
        }
        info!(lease = %elector.config.name, identity = %elector.config.identity, "holding the leader lease: {what}");
        let work = term();
        let mut work = std::pin::pin!(work);
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut work => return,
                () = tokio::time::sleep(elector.config.retry_period) => {
                    match elector.try_acquire_or_renew().await {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) => {
                            warn!(lease = %elector.config.name, "the leader lease was taken over: no longer {what}");
                            break;
                        }
                        Err(e) if renewed.elapsed() >= elector.config.renew_deadline => {
                            warn!(lease = %elector.config.name, error = %e, "could not renew the leader lease in time: no longer {what}");
                            break;
                        }
                        Err(e) => debug!(lease = %elector.config.name, error = %e, "renewing the leader lease failed; retrying"),
                    }
                }
            }
        }
        // Dropping the term's future stops it; a later term starts afresh.
    }
}

/// What a Lease said when we last looked, and when that changed.
#[derive(Debug)]
struct Observed {
    record: (Option<String>, Option<String>, Option<i32>),
    since: tokio::time::Instant,
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

impl Elector {
    /// Takes or renews the Lease; whether we hold it now.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let renew = spec
            .renew_time
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_owned));
        let record = (spec.holder_identity.clone(), renew, spec.lease_transitions);
        let changed = self.observed.as_ref().is_none_or(|o| o.record != record);
        if changed {
            self.observed = Some(Observed {
                record,
                since: tokio::time::Instant::now(),
            });
        }
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(me.as_str());
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|o| o.since.elapsed() >= held_for);
        if holder.is_some() && !mine && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(seconds),
            acquire_time: if mine {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        // The resourceVersion of what we read makes this a compare-and-swap: of two
        // replicas taking over at once, one gets 409 Conflict.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

struct StatusWriter {
    client: Client,
    written: HashMap<Key, Written>,
}

impl StatusWriter {
    /// Brings every object's status in line with `reports`; returns how many writes
    /// failed.
    async fn sync(&mut self, reports: Vec<StatusReport>) -> usize {
        let mut wanted: BTreeMap<Key, Desired> = BTreeMap::new();
        for r in &reports {
            if let Some(d) = Desired::from_report(r) {
                let key = Key {
                    kind: r.kind,
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                };
                wanted.insert(key, d);
            }
        }
        // Forget objects that are gone: should one come back, its status is read anew.
        self.written.retain(|k, _| wanted.contains_key(k));
        let mut failed = 0;
        for (key, desired) in wanted {
            if self.written.get(&key).is_some_and(|w| w.desired == desired) {
                continue;
            }
            if let Err(e) = self.write(&key, desired).await {
                debug!(kind = %key.kind, namespace = %key.namespace, name = %key.name, error = %e, "status write failed");
                failed += 1;
            }
        }
        failed
    }

    async fn write(&mut self, key: &Key, desired: Desired) -> Result<(), kube::Error> {
        let version = desired
            .api_version
            .rsplit_once('/')
            .map_or(desired.api_version.as_str(), |(_, v)| v);
        let ar = api_resource(key.kind, version);
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &ar);
        let mut times = match self.written.get(&key.clone()) {
            Some(w) => w.times.clone(),
            None => {
                // First time since start: what is there may already be right.
                match api.get_status(&key.name).await {
                    Ok(obj) => {
                        let status = obj.data.get("status").cloned().unwrap_or(Value::Null);
                        let times = desired.times_from(&status);
                        if desired.ours(&status) == desired.render(&times) {
                            debug!(kind = %key.kind, namespace = %key.namespace, name = %key.name, "status already up to date");
                            self.written.insert(key.clone(), Written { desired, times });
                            return Ok(());
                        }
                        times
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                    Err(e) => {
                        warn!(kind = %key.kind, namespace = %key.namespace, name = %key.name, error = %e, "reading status failed; writing it anyway");
                        Times::new()
                    }
                }
            }
        };
        desired.advance(&mut times, &now_string());
        let body = json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": { "name": key.name, "namespace": key.namespace },
            "status": desired.render(&times),
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&key.name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                let accepted = desired.conditions.first().is_some_and(|c| c.status);
                info!(kind = %key.kind, namespace = %key.namespace, name = %key.name, accepted, "status written");
                self.written.insert(key.clone(), Written { desired, times });
                Ok(())
            }
            // Deleted meanwhile: nothing to write on.
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => {
                warn!(kind = %key.kind, namespace = %key.namespace, name = %key.name, error = %e, "writing status failed");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: ResourceKind, accepted: bool) -> StatusReport {
        StatusReport {
            api_version: format!("{}/v1", kind.group()),
            kind,
            namespace: "ns".into(),
            name: "x".into(),
            generation: Some(2),
            accepted,
            reason: if accepted { "Accepted" } else { "Invalid" }.into(),
            message: if accepted {
                String::new()
            } else {
                "spec.action: bad".into()
            },
            parent_refs: vec![
                json!({"group": "", "kind": "Service", "name": "reviews"}),
                json!({"name": "ingress"}),
            ],
            gateway_class: Some(WAYPOINT_CLASS.into()),
            programmed: None,
        }
    }

    #[test]
    fn istio_status_round_trips() {
        let d = Desired::from_report(&report(ResourceKind::AuthorizationPolicy, false)).unwrap();
        let mut times = Times::new();
        d.advance(&mut times, "2025-01-01T00:00:00Z");
        let status = d.render(&times);
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["conditions"][0]["type"], "Accepted");
        assert_eq!(status["conditions"][0]["status"], "False");
        assert_eq!(status["conditions"][0]["reason"], "Invalid");
        assert_eq!(status["conditions"][0]["message"], "spec.action: bad");
        // Read back, it is recognised as up to date, times kept.
        assert_eq!(d.times_from(&status), times);
        assert_eq!(d.ours(&status), d.render(&d.times_from(&status)));
        // A later status flip moves the time; an unchanged status keeps it.
        let ok = Desired::from_report(&report(ResourceKind::AuthorizationPolicy, true)).unwrap();
        let mut t2 = times.clone();
        ok.advance(&mut t2, "2025-02-01T00:00:00Z");
        assert_eq!(t2["Accepted"].1, "2025-02-01T00:00:00Z");
        let mut t3 = times.clone();
        d.advance(&mut t3, "2025-03-01T00:00:00Z");
        assert_eq!(t3, times);
    }

    #[test]
    fn routes_report_on_service_parents_only() {
        let d = Desired::from_report(&report(ResourceKind::HttpRoute, false)).unwrap();
        let status = d.render(&Times::new());
        let parents = status["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 1);
        assert_eq!(parents[0]["parentRef"]["name"], "reviews");
        assert_eq!(parents[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[0]["conditions"][0]["reason"], "UnsupportedValue");
        let mut only_gateway = report(ResourceKind::GrpcRoute, true);
        only_gateway.parent_refs.remove(0);
        assert!(Desired::from_report(&only_gateway).is_none());
    }

    #[test]
    fn gateways_of_other_classes_are_not_ours() {
        let d = Desired::from_report(&report(ResourceKind::Gateway, false)).unwrap();
        let types: Vec<&str> = d.conditions.iter().map(|c| c.type_).collect();
        assert_eq!(types, vec!["Accepted", "Programmed"]);
        let mut other = report(ResourceKind::Gateway, true);
        other.gateway_class = Some("istio".into());
        assert!(Desired::from_report(&other).is_none());
        assert!(Desired::from_report(&report(ResourceKind::Pod, true)).is_none());
    }

    #[test]
    fn accepted_waypoints_carry_the_deployers_programmed_condition() {
        let mut r = report(ResourceKind::Gateway, true);
        r.gateway_class = Some(ISTIO_WAYPOINT_CLASS.into());
        let d = Desired::from_report(&r).unwrap();
        assert_eq!(d.conditions.len(), 1, "no verdict yet: Accepted only");
        r.programmed = Some(ProgrammedStatus {
            programmed: false,
            reason: "Conflict",
            message: "Service ns/x is not ours".into(),
        });
        let d = Desired::from_report(&r).unwrap();
        let status = d.render(&Times::new());
        assert_eq!(status["conditions"][0]["type"], "Accepted");
        assert_eq!(status["conditions"][0]["status"], "True");
        assert_eq!(status["conditions"][1]["type"], "Programmed");
        assert_eq!(status["conditions"][1]["status"], "False");
        assert_eq!(status["conditions"][1]["reason"], "Conflict");
        assert_eq!(
            status["conditions"][1]["message"],
            "Service ns/x is not ours"
        );
        // A rejected Gateway is not programmed, whatever the deployer says.
        let mut rejected = report(ResourceKind::Gateway, false);
        rejected.programmed = r.programmed.clone();
        let d = Desired::from_report(&rejected).unwrap();
        assert_eq!(d.conditions[1].reason, "Invalid");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = truncate("é".repeat(MAX_MESSAGE));
        assert!(s.len() <= MAX_MESSAGE);
        assert!(s.ends_with("..."));
    }
}
