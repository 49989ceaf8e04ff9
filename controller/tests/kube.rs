//! The Kubernetes source and the status writer against a fake API server at the HTTP
//! level (`kube_mock`): LIST and WATCH of core kinds and policies, a malformed policy,
//! CRDs that are not installed, RBAC refusals, re-lists after a disconnect, and status
//! written with server-side apply.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

mod kube_mock;

use std::{collections::BTreeMap, time::Duration};

use ambit_controller::{
    model::authz::AuthzAction,
    resources::{ParsedDocument, Resource, ResourceKind},
    source::{
        OriginId, SourceEvent,
        kube::{KubeSourceConfig, run_kube_source_with},
    },
    status::{
        FIELD_MANAGER, LeaseConfig, StatusReport, StatusWriterConfig, run_elected,
        run_status_writer_with,
    },
    validate::{ModelObject, Outcome, ValidationContext, validate_document},
};
use ambit_test_support::eventually_async;
use http::Method;
use kube_mock::{FakeApi, collection};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

const DEADLINE: Duration = Duration::from_secs(15);

fn pods() -> String {
    collection("", "v1", "pods")
}
fn services() -> String {
    collection("", "v1", "services")
}
fn policies() -> String {
    collection("security.istio.io", "v1", "authorizationpolicies")
}

/// Serves every core kind (empty); CRD kinds stay unserved (404) unless a test adds them.
fn serve_core(api: &FakeApi) {
    for (group, plural) in [
        ("", "namespaces"),
        ("", "nodes"),
        ("", "pods"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        api.serve(&collection(group, "v1", plural));
    }
}

fn pod(ns: &str, name: &str, node: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": app,
                 "containers": [{"name": "main", "image": "example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn service(ns: &str, name: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": app}, "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": spec,
    })
}

fn fast() -> KubeSourceConfig {
    KubeSourceConfig {
        error_backoff_initial: Duration::from_millis(20),
        error_backoff_max: Duration::from_millis(200),
        missing_kind_retry_initial: Duration::from_millis(50),
        missing_kind_retry_max: Duration::from_millis(200),
    }
}

/// The source's events as they arrive, and the documents currently held per origin.
struct Events {
    rx: mpsc::Receiver<SourceEvent>,
    held: BTreeMap<OriginId, Vec<ParsedDocument>>,
    synced: usize,
    _source: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Events {
    fn start(api: &FakeApi) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let client = api.client();
        let task = tokio::spawn(async move {
            run_kube_source_with(client, fast(), tx).await.unwrap();
        });
        Self {
            rx,
            held: BTreeMap::new(),
            synced: 0,
            _source: AbortOnDrop(task),
        }
    }

    fn record(&mut self, ev: SourceEvent) {
        match ev {
            SourceEvent::Replace { origin, documents } if documents.is_empty() => {
                self.held.remove(&origin);
            }
            SourceEvent::Replace { origin, documents } => {
                self.held.insert(origin, documents);
            }
            SourceEvent::Synced => self.synced += 1,
        }
    }

    /// Receives events until `done` holds, or fails at the deadline.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.record(ev),
                Ok(None) => panic!("{what}: the source stopped"),
                Err(_) => panic!(
                    "{what}: not reached within {DEADLINE:?}; held: {:?}",
                    self.held.keys()
                ),
            }
        }
    }

    /// Receives whatever arrives within `window` (for checking that something does
    /// *not* happen).
    async fn drain_for(&mut self, window: Duration) {
        let end = tokio::time::Instant::now() + window;
        while let Ok(Some(ev)) = tokio::time::timeout_at(end, self.rx.recv()).await {
            self.record(ev);
        }
    }

    fn resource(&self, origin: &str) -> Option<&Resource> {
        match self.held.get(&OriginId(origin.to_owned()))?.as_slice() {
            [ParsedDocument::Resource(r)] => Some(&r.resource),
            _ => None,
        }
    }

    fn document(&self, origin: &str) -> Option<&ParsedDocument> {
        self.held.get(&OriginId(origin.to_owned()))?.first()
    }
}

fn authz_action(doc: &ParsedDocument) -> AuthzAction {
    match validate_document(doc, &ValidationContext::default()).enforced() {
        Some(ModelObject::Authz(p)) => p.action,
        other => panic!("not an authorization policy: {other:?}"),
    }
}

const POD_A: &str = "kubernetes:v1/Pod/shop/web-a";
const POD_B: &str = "kubernetes:v1/Pod/shop/web-b";
const SVC: &str = "kubernetes:v1/Service/shop/web";
const AP: &str = "kubernetes:security.istio.io/v1/AuthorizationPolicy/shop/web-allow";

#[tokio::test]
async fn lists_then_follows_watch_events_and_relists() {
    let api = FakeApi::start().await;
    serve_core(&api);
    api.serve(&policies());
    // VirtualService served only in an older version: the source falls back to it.
    let vs = collection("networking.istio.io", "v1alpha3", "virtualservices");
    api.serve(&vs);
    api.apply(&pods(), pod("shop", "web-a", "node-1", "web", "10.0.1.5"));
    api.apply(&services(), service("shop", "web", "web", "10.96.0.10"));
    api.apply(
        &policies(),
        policy(
            "shop",
            "web-allow",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
        ),
    );
    api.apply(
        &vs,
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]}}),
    );

    let mut ev = Events::start(&api);
    // Synced comes after the initial list of every kind, although most CRDs (peer
    // authentication, destination rules, Gateway API) are not installed: 404.
    ev.until("initial sync", |e| e.synced == 1).await;
    assert!(
        matches!(ev.resource(POD_A), Some(Resource::Pod(_))),
        "{:?}",
        ev.held.keys()
    );
    assert!(matches!(ev.resource(SVC), Some(Resource::Service(_))));
    assert_eq!(authz_action(ev.document(AP).unwrap()), AuthzAction::Allow);
    assert!(matches!(
        ev.resource("kubernetes:networking.istio.io/v1alpha3/VirtualService/shop/web"),
        Some(Resource::VirtualService(_))
    ));
    assert_eq!(ev.held.len(), 4, "{:?}", ev.held.keys());

    // Watch: a pod is added, the policy changes, the service is deleted.
    api.apply(&pods(), pod("shop", "web-b", "node-2", "web", "10.0.2.7"));
    ev.until("pod added", |e| e.resource(POD_B).is_some()).await;
    api.apply(
        &policies(),
        policy(
            "shop",
            "web-allow",
            json!({"action": "DENY", "rules": [{}]}),
        ),
    );
    ev.until("policy modified", |e| {
        e.document(AP)
            .is_some_and(|d| authz_action(d) == AuthzAction::Deny)
    })
    .await;
    api.delete(&services(), "shop", "web");
    ev.until("service deleted", |e| {
        !e.held.contains_key(&OriginId(SVC.into()))
    })
    .await;

    // A pod deleted while the watch was down is noticed by the re-list.
    api.delete_while_disconnected(&pods(), "shop", "web-a");
    ev.until("pod gone after re-list", |e| {
        !e.held.contains_key(&OriginId(POD_A.into()))
    })
    .await;
    assert!(ev.resource(POD_B).is_some(), "the re-listed pod stays");
    let pod_lists = api
        .requests()
        .iter()
        .filter(|r| r.path == pods() && !r.query.contains("watch="))
        .count();
    assert_eq!(pod_lists, 2, "pods were listed again after 410 Gone");

    // A CRD installed later is picked up (retried with backoff).
    let pa = collection("security.istio.io", "v1", "peerauthentications");
    api.serve(&pa);
    api.apply(
        &pa,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "istio-system"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    ev.until("CRD installed later", |e| {
        e.resource("kubernetes:security.istio.io/v1/PeerAuthentication/istio-system/default")
            .is_some()
    })
    .await;
    assert_eq!(ev.synced, 1, "Synced is sent exactly once");
}

#[tokio::test]
async fn malformed_policies_reach_validation_with_the_field_named() {
    let api = FakeApi::start().await;
    serve_core(&api);
    api.serve(&policies());
    // Not decodable by our typed struct: `rules` is a map.
    api.apply(
        &policies(),
        policy(
            "shop",
            "rules-map",
            json!({"action": "DENY", "rules": {"from": [{"source": {"namespaces": ["legacy"]}}]}}),
        ),
    );
    // Typed fine, refused by validation: a bad CIDR in an ALLOW policy.
    api.apply(
        &policies(),
        policy(
            "shop",
            "bad-cidr",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.0/33"]}}]}]}),
        ),
    );
    // Beside them, a valid one still arrives.
    api.apply(
        &policies(),
        policy("shop", "fine", json!({"action": "ALLOW", "rules": [{}]})),
    );
    let mut ev = Events::start(&api);
    ev.until("initial sync", |e| e.synced == 1).await;

    let ctx = ValidationContext::default();
    let rules_map = ev
        .document("kubernetes:security.istio.io/v1/AuthorizationPolicy/shop/rules-map")
        .expect("the undecodable policy is delivered");
    let v = validate_document(rules_map, &ctx);
    let Outcome::Rejected {
        rejections,
        fail_closed,
    } = &v.outcome
    else {
        panic!("accepted: {v:?}");
    };
    assert_eq!(rejections[0].field.as_str(), "spec.rules", "{rejections:?}");
    assert!(
        rejections[0].reason.contains("expected a sequence"),
        "{rejections:?}"
    );
    assert!(
        matches!(fail_closed, Some(ModelObject::Authz(p)) if p.action == AuthzAction::Deny),
        "a broken DENY policy denies everything in scope: {fail_closed:?}"
    );

    let bad_cidr = ev
        .document("kubernetes:security.istio.io/v1/AuthorizationPolicy/shop/bad-cidr")
        .unwrap();
    let v = validate_document(bad_cidr, &ctx);
    assert_eq!(
        v.rejections()[0].field.as_str(),
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "{v:?}"
    );
    assert!(
        v.rejections()[0]
            .origin
            .as_ref()
            .unwrap()
            .source
            .starts_with("kubernetes:"),
        "the rejection names the Kubernetes object"
    );
    let fine = "kubernetes:security.istio.io/v1/AuthorizationPolicy/shop/fine";
    assert!(validate_document(ev.document(fine).unwrap(), &ctx).is_accepted());

    // The same through a watch event: the stream goes on after an undecodable object.
    api.apply(
        &policies(),
        policy(
            "shop",
            "fine",
            json!({"action": "ALLOW", "rules": [{"to": "everything"}]}),
        ),
    );
    ev.until("malformed modification", |e| {
        matches!(e.document(fine), Some(ParsedDocument::Rejected(_)))
    })
    .await;
    let v = validate_document(ev.document(fine).unwrap(), &ctx);
    assert_eq!(
        v.rejections()[0].field.as_str(),
        "spec.rules[0].to",
        "{v:?}"
    );
    api.apply(
        &policies(),
        policy("shop", "later", json!({"action": "DENY", "rules": [{}]})),
    );
    ev.until("later policy", |e| {
        e.document("kubernetes:security.istio.io/v1/AuthorizationPolicy/shop/later")
            .is_some()
    })
    .await;
}

#[tokio::test]
async fn a_kind_we_may_not_read_holds_up_sync() {
    let api = FakeApi::start().await;
    serve_core(&api);
    api.serve(&policies());
    // No RBAC for policies: starting without them could miss a DENY.
    api.fail(&policies(), Some(403));
    let mut ev = Events::start(&api);
    ev.drain_for(Duration::from_millis(500)).await;
    assert_eq!(ev.synced, 0, "not synced while policies cannot be read");
    api.fail(&policies(), None);
    ev.until("sync once allowed", |e| e.synced == 1).await;
}

/// The status writer's input, like the index's world: a list of reports.
fn rejected_report(generation: i64, message: &str) -> StatusReport {
    StatusReport {
        api_version: "security.istio.io/v1".into(),
        kind: ResourceKind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: "bad-cidr".into(),
        generation: Some(generation),
        accepted: false,
        reason: "Invalid".into(),
        message: message.into(),
        parent_refs: Vec::new(),
        gateway_class: None,
        programmed: None,
    }
}

fn status_patches(api: &FakeApi) -> Vec<kube_mock::Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == Method::PATCH)
        .collect()
}

#[tokio::test]
async fn status_is_applied_once_per_change() {
    let api = FakeApi::start().await;
    api.serve(&policies());
    api.apply(
        &policies(),
        policy("shop", "bad-cidr", json!({"action": "ALLOW"})),
    );
    let reason = "spec.rules[0].from[0].source.ipBlocks[1]: prefix length `33` is invalid";
    let (tx, rx) = watch::channel(vec![rejected_report(1, reason)]);
    let writer = AbortOnDrop(tokio::spawn(run_status_writer_with(
        api.client(),
        rx,
        Vec::clone,
        StatusWriterConfig {
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_millis(200),
        },
    )));

    eventually_async(
        "one status patch",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let n = status_patches(&api).len();
            async move {
                if n >= 1 {
                    Ok(())
                } else {
                    anyhow::bail!("{n} patches")
                }
            }
        },
    )
    .await
    .unwrap();
    let patch = &status_patches(&api)[0];
    assert_eq!(
        patch.path,
        "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/bad-cidr/status"
    );
    assert!(
        patch
            .query
            .contains(&format!("fieldManager={FIELD_MANAGER}")),
        "{}",
        patch.query
    );
    assert!(patch.query.contains("force=true"), "{}", patch.query);
    let cond = &patch.body["status"]["conditions"][0];
    assert_eq!(cond["type"], "Accepted");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Invalid");
    assert_eq!(cond["message"], reason);
    assert_eq!(cond["observedGeneration"], 1);
    assert_eq!(patch.body["status"]["observedGeneration"], 1);
    assert_eq!(patch.body["kind"], "AuthorizationPolicy");

    // A new world generation with the same verdict, beside a new object: only the new
    // object is written (its write proves the writer processed this generation).
    let mut fine = rejected_report(1, "");
    fine.name = "fine".into();
    fine.accepted = true;
    fine.reason = "Accepted".into();
    api.apply(&policies(), policy("shop", "fine", json!({})));
    tx.send(vec![rejected_report(1, reason), fine.clone()])
        .unwrap();
    eventually_async("second patch", DEADLINE, Duration::from_millis(20), || {
        let n = status_patches(&api).len();
        async move {
            if n >= 2 {
                Ok(())
            } else {
                anyhow::bail!("{n} patches")
            }
        }
    })
    .await
    .unwrap();
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 2, "the unchanged status was not rewritten");
    assert!(
        patches[1].path.ends_with("/fine/status"),
        "{}",
        patches[1].path
    );
    assert_eq!(patches[1].body["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        patches[1].body["status"]["conditions"][0]["reason"],
        "Accepted"
    );

    // A new generation of the rejected policy, still rejected: rewritten with the new
    // observedGeneration, its transition time kept (the status did not flip).
    tx.send(vec![rejected_report(2, reason), fine.clone()])
        .unwrap();
    eventually_async("third patch", DEADLINE, Duration::from_millis(20), || {
        let n = status_patches(&api).len();
        async move {
            if n >= 3 {
                Ok(())
            } else {
                anyhow::bail!("{n} patches")
            }
        }
    })
    .await
    .unwrap();
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 3);
    assert_eq!(patches[2].body["status"]["observedGeneration"], 2);
    assert_eq!(
        patches[2].body["status"]["conditions"][0]["lastTransitionTime"],
        cond["lastTransitionTime"]
    );
    drop(writer);

    // A restarted writer (failover) reads each status first and rewrites nothing
    // that is right; the write for a new object sorted after them proves it is done.
    let mut last = fine.clone();
    last.name = "zzz".into();
    api.apply(&policies(), policy("shop", "zzz", json!({})));
    let (_tx2, rx2) = watch::channel(vec![rejected_report(2, reason), fine, last]);
    let _writer = AbortOnDrop(tokio::spawn(run_status_writer_with(
        api.client(),
        rx2,
        Vec::clone,
        StatusWriterConfig::default(),
    )));
    eventually_async(
        "write after restart",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let n = status_patches(&api).len();
            async move {
                if n >= 4 {
                    Ok(())
                } else {
                    anyhow::bail!("{n} patches")
                }
            }
        },
    )
    .await
    .unwrap();
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 4, "nothing rewritten after a restart");
    assert!(
        patches[3].path.ends_with("/zzz/status"),
        "{}",
        patches[3].path
    );
    let reads = api
        .requests()
        .iter()
        .filter(|r| r.method == Method::GET && r.path.ends_with("/status"))
        .count();
    assert_eq!(
        reads,
        2 + 3,
        "each object's status read once per writer start"
    );
}

#[tokio::test]
async fn only_the_lease_holder_writes_status() {
    let api = FakeApi::start().await;
    api.serve(&policies());
    let leases = collection("coordination.k8s.io", "v1", "leases");
    api.serve(&leases);
    api.apply(
        &policies(),
        policy("shop", "bad-cidr", json!({"action": "ALLOW"})),
    );
    let (tx, rx) = watch::channel(vec![rejected_report(1, "spec.x: bad")]);
    let replica = |identity: &str| {
        let lease = LeaseConfig {
            lease_duration: Duration::from_millis(600),
            renew_deadline: Duration::from_millis(400),
            retry_period: Duration::from_millis(50),
            ..LeaseConfig::new("ambit-system", identity)
        };
        AbortOnDrop(tokio::spawn(run_elected(
            api.client(),
            rx.clone(),
            Vec::clone,
            StatusWriterConfig::default(),
            lease,
        )))
    };
    let mut replicas = BTreeMap::from([
        ("replica-a", replica("replica-a")),
        ("replica-b", replica("replica-b")),
    ]);
    let holder = || {
        api.object(&leases, "ambit-system", "ambit-controller-status")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };

    eventually_async(
        "status written by the leader",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let n = status_patches(&api).len();
            async move {
                if n >= 1 {
                    Ok(())
                } else {
                    anyhow::bail!("{n} patches")
                }
            }
        },
    )
    .await
    .unwrap();
    let first = holder().expect("a replica holds the lease");
    // A change while both run: written once, by the holder only.
    tx.send(vec![rejected_report(2, "spec.x: bad")]).unwrap();
    eventually_async("second write", DEADLINE, Duration::from_millis(20), || {
        let n = status_patches(&api).len();
        async move {
            if n >= 2 {
                Ok(())
            } else {
                anyhow::bail!("{n} patches")
            }
        }
    })
    .await
    .unwrap();

    // The holder goes away; the other replica takes over once the lease expires and
    // writes the next change.
    drop(replicas.remove(first.as_str()));
    tx.send(vec![rejected_report(3, "spec.x: bad")]).unwrap();
    eventually_async(
        "write by the new holder",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let n = status_patches(&api).len();
            let h = holder();
            let first = first.clone();
            async move {
                if n >= 3 && h.as_deref().is_some_and(|h| h != first) {
                    Ok(())
                } else {
                    anyhow::bail!("{n} patches, holder {h:?}")
                }
            }
        },
    )
    .await
    .unwrap();
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 3, "one write per change, never two writers");
    assert_eq!(patches[2].body["status"]["observedGeneration"], 3);
    let lease = api
        .object(&leases, "ambit-system", "ambit-controller-status")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn own_status_writes_do_not_reach_the_index() {
    let api = FakeApi::start().await;
    serve_core(&api);
    api.serve(&policies());
    api.apply(
        &policies(),
        policy(
            "shop",
            "web-allow",
            json!({"action": "ALLOW", "rules": [{}]}),
        ),
    );
    let mut ev = Events::start(&api);
    ev.until("initial sync", |e| e.synced == 1).await;
    let (_tx, rx) = watch::channel(vec![StatusReport {
        name: "web-allow".into(),
        accepted: true,
        reason: "Accepted".into(),
        message: String::new(),
        ..rejected_report(1, "")
    }]);
    let _writer = AbortOnDrop(tokio::spawn(run_status_writer_with(
        api.client(),
        rx,
        Vec::clone,
        StatusWriterConfig::default(),
    )));
    eventually_async(
        "status written",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let written = api
                .object(&policies(), "shop", "web-allow")
                .is_some_and(|o| o["status"]["conditions"][0]["status"] == "True");
            async move {
                if written {
                    Ok(())
                } else {
                    anyhow::bail!("not yet")
                }
            }
        },
    )
    .await
    .unwrap();
    // The MODIFIED event of the status write is not forwarded; a later spec change is.
    api.apply(
        &policies(),
        policy("shop", "other", json!({"action": "DENY", "rules": [{}]})),
    );
    let mut replaced = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, ev.rx.recv()).await {
            Ok(Some(SourceEvent::Replace { origin, .. })) => {
                let done = origin.0.ends_with("/other");
                replaced.push(origin);
                if done {
                    break;
                }
            }
            Ok(Some(SourceEvent::Synced)) => panic!("second Synced"),
            other => panic!("no event: {other:?}"),
        }
    }
    assert_eq!(replaced.len(), 1, "only the new policy: {replaced:?}");
}

/// The end-to-end case: listing and watch events for pods, services and
/// policies reach the right subscribers (mock API → Kubernetes source → index →
/// `resources_for`), and a rejected policy gets its status through the same world.
#[tokio::test]
async fn list_and_watch_events_reach_the_right_subscribers() {
    use std::sync::Arc;

    use ambit_controller::{
        index::{IndexConfig, spawn_index},
        status::run_status_writer,
        view::{ConfigView as _, Subscriber},
        world::World,
    };
    use ambit_identity::TrustDomain;

    let api = FakeApi::start().await;
    serve_core(&api);
    api.serve(&policies());
    api.apply(
        &collection("", "v1", "namespaces"),
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    api.apply(&pods(), pod("shop", "web-a", "node-1", "web", "10.0.1.5"));
    api.apply(&pods(), pod("shop", "db-a", "node-2", "db", "10.0.2.5"));
    api.apply(&services(), service("shop", "web", "web", "10.96.0.10"));
    api.apply(
        &policies(),
        policy(
            "shop",
            "web-allow",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
        ),
    );

    let (tx, rx) = mpsc::channel(64);
    let client = api.client();
    let _source = AbortOnDrop(tokio::spawn(async move {
        run_kube_source_with(client, fast(), tx).await.unwrap();
    }));
    let worlds = spawn_index(
        IndexConfig {
            validation: ValidationContext::default(),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            trust_bundle_pem: Vec::new(),
            sources: 1,
        },
        rx,
    );
    let _status = AbortOnDrop(tokio::spawn(run_status_writer(
        api.client(),
        worlds.clone(),
    )));

    fn keys(world: &World, node: &str) -> Vec<String> {
        let node = Subscriber::Node { name: node.into() };
        world.resources_for(&node).into_keys().collect()
    }
    fn has(world: &World, node: &str, key: &str) -> bool {
        keys(world, node).iter().any(|k| k == key)
    }
    type WorldCheck = Box<dyn Fn(&Arc<World>) -> bool>;
    let await_world = |what: &'static str, check: WorldCheck| {
        let worlds = worlds.clone();
        async move {
            eventually_async(what, DEADLINE, Duration::from_millis(20), || {
                let world = worlds.borrow().clone();
                let ok = check(&world);
                let seen = format!(
                    "synced={} node-1={:?} node-2={:?}",
                    world.synced(),
                    keys(&world, "node-1"),
                    keys(&world, "node-2")
                );
                async move { if ok { Ok(()) } else { anyhow::bail!("{seen}") } }
            })
            .await
            .unwrap();
        }
    };

    // The initial list: both nodes see the workloads and the service; only node-1
    // (where the selected pod runs) gets the policy.
    await_world(
        "initial list in the index",
        Box::new(move |w| {
            w.synced()
                && has(w, "node-1", "Workload/uid-web-a")
                && has(w, "node-1", "Service/shop/web")
                && has(w, "node-1", "Authorization/shop/web-allow")
                && has(w, "node-2", "Workload/uid-db-a")
                && has(w, "node-2", "Workload/uid-web-a")
                && !has(w, "node-2", "Authorization/shop/web-allow")
        }),
    )
    .await;

    // Watch: a DENY policy for the db pods reaches node-2 only; the service goes away
    // everywhere; a web pod scheduled on node-2 brings the web policy there.
    api.apply(
        &policies(),
        policy(
            "shop",
            "db-deny",
            json!({"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}),
        ),
    );
    api.delete(&services(), "shop", "web");
    api.apply(&pods(), pod("shop", "web-b", "node-2", "web", "10.0.2.7"));
    await_world(
        "watch events in the index",
        Box::new(move |w| {
            has(w, "node-2", "Authorization/shop/db-deny")
                && !has(w, "node-1", "Authorization/shop/db-deny")
                && !has(w, "node-1", "Service/shop/web")
                && has(w, "node-2", "Workload/uid-web-b")
                && has(w, "node-2", "Authorization/shop/web-allow")
        }),
    )
    .await;

    // A malformed ALLOW policy for db: enforced fail-closed on node-2, and its status
    // says why, naming the field.
    api.apply(
        &policies(),
        policy(
            "shop",
            "db-allow",
            json!({"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"ipBlocks": "10.0.0.0/8"}}]}]}),
        ),
    );
    await_world(
        "fail-closed stand-in on node-2",
        Box::new(move |w| {
            has(w, "node-2", "Authorization/shop/db-allow")
                && !has(w, "node-1", "Authorization/shop/db-allow")
        }),
    )
    .await;
    eventually_async(
        "rejection in status",
        DEADLINE,
        Duration::from_millis(20),
        || {
            let cond = api
                .object(&policies(), "shop", "db-allow")
                .map(|o| o["status"]["conditions"][0].clone())
                .unwrap_or_default();
            async move {
                let message = cond["message"].as_str().unwrap_or_default();
                if cond["status"] == "False"
                    && message.contains("spec.rules[0].from[0].source.ipBlocks")
                {
                    Ok(())
                } else {
                    anyhow::bail!("condition: {cond}")
                }
            }
        },
    )
    .await
    .unwrap();
    let accepted = api.object(&policies(), "shop", "web-allow").unwrap();
    assert_eq!(accepted["status"]["conditions"][0]["status"], "True");
}
