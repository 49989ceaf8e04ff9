//! The waypoint deployer against the fake API server at the HTTP level (`kube_mock`),
//! fed by the real Kubernetes source and index: a waypoint Gateway gets its
//! ServiceAccount, Service and Deployment by server-side apply (names, labels, owner
//! references, image, token, ports checked in the PATCH bodies) and `Programmed: True`;
//! only the Lease holder applies; a same-named object that is not ours is left alone
//! and the Gateway says why; a deleted (or deleting) Gateway gets nothing; bad input
//! gets a clear reason; local mode talks to no API server at all.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

mod kube_mock;

use std::{sync::Arc, time::Duration};

use ambit_controller::{
    index::{IndexConfig, spawn_index},
    source::kube::{KubeSourceConfig, run_kube_source_with},
    status::{LeaseConfig, StatusWriterConfig},
    validate::ValidationContext,
    waypoint_deploy::{WaypointDeployConfig, run_elected, waypoint_gateways},
    world::World,
};
use ambit_identity::TrustDomain;
use ambit_test_support::eventually_async;
use http::Method;
use kube_mock::{FakeApi, Recorded, collection};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
const IMAGE: &str = "registry.example/ambit-waypoint:test";
const CONTROLLER_ADDR: &str = "http://ambit-controller.ambit-system.svc:15012";
const LEASE: &str = "ambit-controller-status";

fn gateways() -> String {
    collection("gateway.networking.k8s.io", "v1", "gateways")
}
fn deployments() -> String {
    collection("apps", "v1", "deployments")
}
fn services() -> String {
    collection("", "v1", "services")
}
fn service_accounts() -> String {
    collection("", "v1", "serviceaccounts")
}
fn leases() -> String {
    collection("coordination.k8s.io", "v1", "leases")
}
fn lease_path() -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/ambit-system/leases/{LEASE}")
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the kinds the source watches, Deployments and Leases.
fn serve(api: &FakeApi) {
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
    api.serve(&gateways());
    api.serve(&deployments());
    api.serve(&leases());
    api.apply(
        &collection("", "v1", "namespaces"),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
}

fn gateway(name: &str, class: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// The source, the index and one replica of the elected deployer + status writer.
struct Controller {
    worlds: watch::Receiver<Arc<World>>,
    _tasks: Vec<AbortOnDrop>,
}

fn start(api: &FakeApi, identity: &str) -> Controller {
    let (tx, rx) = mpsc::channel(64);
    let client = api.client();
    let source = AbortOnDrop(tokio::spawn(async move {
        let fast = KubeSourceConfig {
            error_backoff_initial: Duration::from_millis(20),
            error_backoff_max: Duration::from_millis(200),
            missing_kind_retry_initial: Duration::from_millis(200),
            missing_kind_retry_max: Duration::from_millis(500),
        };
        run_kube_source_with(client, fast, tx).await.unwrap();
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
    let deploy = WaypointDeployConfig {
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..WaypointDeployConfig::new(IMAGE, CONTROLLER_ADDR, "cluster.local", "ambit-ca")
    };
    let lease = LeaseConfig {
        lease_duration: Duration::from_millis(600),
        renew_deadline: Duration::from_millis(400),
        retry_period: Duration::from_millis(50),
        ..LeaseConfig::new("ambit-system", identity)
    };
    let status = StatusWriterConfig {
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
    };
    let elected = AbortOnDrop(tokio::spawn(run_elected(
        api.client(),
        worlds.clone(),
        deploy,
        status,
        lease,
    )));
    Controller {
        worlds,
        _tasks: vec![elected, source],
    }
}

/// PATCHes of the objects named `name` (ServiceAccount, Service, Deployment), in order.
fn object_patches(api: &FakeApi, name: &str) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| {
            r.method == Method::PATCH
                && !r.path.ends_with("/status")
                && r.path.rsplit('/').next() == Some(name)
        })
        .collect()
}

fn patch_of<'a>(patches: &'a [Recorded], plural: &str) -> &'a Recorded {
    patches
        .iter()
        .find(|r| r.path.contains(&format!("/{plural}/")))
        .unwrap_or_else(|| panic!("no PATCH of {plural}: {patches:?}"))
}

/// A condition of a Gateway's status as stored.
fn condition(api: &FakeApi, name: &str, type_: &str) -> Value {
    api.object(&gateways(), "shop", name)
        .and_then(|g| {
            g["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// Waits until the Gateway's `Programmed` condition has this status and reason.
async fn programmed(api: &FakeApi, name: &str, status: &str, reason: &str) -> Value {
    eventually_async(
        &format!("{name}: Programmed={status} ({reason})"),
        DEADLINE,
        POLL,
        || {
            let c = condition(api, name, "Programmed");
            let ok = c["status"] == status && c["reason"] == reason;
            async move { if ok { Ok(c) } else { anyhow::bail!("{c}") } }
        },
    )
    .await
    .unwrap()
}

async fn until(what: &str, check: impl Fn() -> Result<(), String>) {
    eventually_async(what, DEADLINE, POLL, || {
        let r = check();
        async move { r.map_err(|e| anyhow::anyhow!(e)) }
    })
    .await
    .unwrap();
}

fn lease_reads(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == Method::GET && r.path == lease_path())
        .count()
}

/// Waits until the replica has tried the Lease `n` more times: time in which it was
/// running and could have acted.
async fn lease_attempts(api: &FakeApi, n: usize) {
    let from = lease_reads(api);
    until("lease attempts", || {
        let now = lease_reads(api);
        if now >= from + n {
            Ok(())
        } else {
            Err(format!("{} of {n} lease reads", now - from))
        }
    })
    .await;
}

#[tokio::test]
async fn applies_serviceaccount_service_and_deployment_owned_by_the_gateway() {
    let api = FakeApi::start().await;
    serve(&api);
    api.apply(&gateways(), gateway("waypoint", "ambit-waypoint", "uid-wp"));
    api.apply(
        &gateways(),
        gateway("mesh-wp", "istio-waypoint", "uid-mesh"),
    );
    // Another class: not a waypoint, not ours.
    api.apply(&gateways(), gateway("ingress", "istio", "uid-ingress"));
    let _controller = start(&api, "replica-a");

    programmed(&api, "waypoint", "True", "Programmed").await;
    let c = programmed(&api, "mesh-wp", "True", "Programmed").await;
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("ServiceAccount, Service and Deployment shop/mesh-wp applied"),
        "{c}"
    );
    assert_eq!(condition(&api, "waypoint", "Accepted")["status"], "True");
    assert!(object_patches(&api, "ingress").is_empty());
    assert!(api.object(&gateways(), "shop", "ingress").unwrap()["status"].is_null());

    let patches = object_patches(&api, "waypoint");
    assert_eq!(patches.len(), 3, "{patches:?}");
    for p in &patches {
        assert!(
            p.query.contains("fieldManager=ambit-controller"),
            "{}",
            p.query
        );
        assert!(p.query.contains("force=true"), "{}", p.query);
        let meta = &p.body["metadata"];
        assert_eq!(meta["name"], "waypoint");
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(
            meta["labels"]["gateway.networking.k8s.io/gateway-name"],
            "waypoint"
        );
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"],
            "ambit-controller"
        );
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "waypoint", "uid": "uid-wp", "controller": true}]),
            "{}",
            p.path
        );
    }
    let sa = patch_of(&patches, "serviceaccounts");
    assert_eq!(sa.path, "/api/v1/namespaces/shop/serviceaccounts/waypoint");
    assert_eq!(sa.body["kind"], "ServiceAccount");

    let svc = patch_of(&patches, "services");
    assert_eq!(svc.path, "/api/v1/namespaces/shop/services/waypoint");
    assert_eq!(
        svc.body["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
    );
    assert_eq!(
        svc.body["spec"]["ports"],
        json!([{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP",
                "appProtocol": "HBONE"}])
    );

    let dep = patch_of(&patches, "deployments");
    assert_eq!(
        dep.path,
        "/apis/apps/v1/namespaces/shop/deployments/waypoint"
    );
    let spec = &dep.body["spec"];
    assert!(
        spec["replicas"].is_null(),
        "replicas left to the operator: {spec}"
    );
    assert_eq!(
        spec["selector"]["matchLabels"],
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
    );
    let template = &spec["template"];
    assert_eq!(
        template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "waypoint"
    );
    assert_eq!(
        template["metadata"]["labels"]["ambit.dev/dataplane-mode"],
        "none"
    );
    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], "waypoint");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let container = &pod["containers"][0];
    assert_eq!(container["image"], IMAGE);
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {}", container["env"]))
    };
    assert_eq!(env("WAYPOINT_NAME")["value"], "waypoint");
    assert_eq!(
        env("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(env("CONTROLLER_ADDR")["value"], CONTROLLER_ADDR);
    assert_eq!(env("TRUST_DOMAIN")["value"], "cluster.local");
    let token_file = env("AMBIT_TOKEN_FILE")["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let ports: Vec<(i64, &str)> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_i64().unwrap(),
                p["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        vec![(15008, "hbone"), (15020, "metrics"), (15021, "status-port")]
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021})
    );
    // The token file is the projected token with the controller's audience.
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap()
        .clone();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap()
        .clone();
    let projection = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "ambit-ca");
    assert_eq!(
        format!(
            "{}/{}",
            mount["mountPath"].as_str().unwrap(),
            projection["path"].as_str().unwrap()
        ),
        token_file
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // The objects as stored carry what was applied (the mock keeps the body).
    let stored = api.object(&deployments(), "shop", "waypoint").unwrap();
    assert_eq!(
        stored["spec"]["template"]["spec"]["containers"][0]["image"],
        IMAGE
    );

    // A change of the Gateway is applied: replicas from the annotation.
    let mut changed = gateway("waypoint", "ambit-waypoint", "uid-wp");
    changed["metadata"]["generation"] = json!(2);
    changed["metadata"]["annotations"] = json!({"ambit.dev/replicas": "3"});
    api.apply(&gateways(), changed);
    until("replicas applied", || {
        let p = object_patches(&api, "waypoint");
        match p.iter().rev().find(|r| r.path.contains("/deployments/")) {
            Some(d) if d.body["spec"]["replicas"] == 3 => Ok(()),
            other => Err(format!("{:?}", other.map(|d| &d.body["spec"]["replicas"]))),
        }
    })
    .await;
    // The unchanged waypoint was not applied again.
    assert_eq!(object_patches(&api, "mesh-wp").len(), 3);
}

#[tokio::test]
async fn only_the_lease_holder_applies() {
    let api = FakeApi::start().await;
    serve(&api);
    // Another replica holds the Lease and keeps it (an hour, on our clock).
    let held = |holder: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": LEASE, "namespace": "ambit-system"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600,
                        "renewTime": "2025-01-01T00:00:00.000000Z", "leaseTransitions": 3}})
    };
    api.apply(&leases(), held("replica-b"));
    api.apply(&gateways(), gateway("waypoint", "ambit-waypoint", "uid-wp"));
    let controller = start(&api, "replica-a");

    until("the waypoint in the synced world", || {
        let w = controller.worlds.borrow().clone();
        if w.synced() && waypoint_gateways(&w).len() == 1 {
            Ok(())
        } else {
            Err(format!("synced={}", w.synced()))
        }
    })
    .await;
    lease_attempts(&api, 3).await;
    let writes: Vec<Recorded> = api
        .requests()
        .into_iter()
        .filter(|r| r.method != Method::GET)
        .collect();
    assert!(writes.is_empty(), "a follower writes nothing: {writes:?}");

    // The holder lets go: this replica takes over and applies.
    let mut released = held("");
    released["metadata"]["resourceVersion"] = api.object(&leases(), "ambit-system", LEASE).unwrap()
        ["metadata"]["resourceVersion"]
        .clone();
    api.apply(&leases(), released);
    programmed(&api, "waypoint", "True", "Programmed").await;
    assert_eq!(object_patches(&api, "waypoint").len(), 3);
    let lease = api.object(&leases(), "ambit-system", LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // Another replica takes the Lease: this one stops applying. A Gateway change
    // seen afterwards is not applied by it.
    api.apply(&leases(), held("replica-b"));
    lease_attempts(&api, 3).await;
    let mut changed = gateway("waypoint", "ambit-waypoint", "uid-wp");
    changed["metadata"]["annotations"] = json!({"ambit.dev/replicas": "2"});
    api.apply(&gateways(), changed);
    until("the change in the world", || {
        let w = controller.worlds.borrow().clone();
        let gws = waypoint_gateways(&w);
        if gws.first().is_some_and(|g| !g.annotations.is_empty()) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    lease_attempts(&api, 3).await;
    assert_eq!(
        object_patches(&api, "waypoint").len(),
        3,
        "no apply after losing the Lease"
    );
}

#[tokio::test]
async fn objects_that_are_not_ours_are_left_alone() {
    let api = FakeApi::start().await;
    serve(&api);
    // A Service of the waypoint's name that someone else made.
    let foreign = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": "shop", "uid": "uid-legacy",
                     "labels": {"app": "legacy"}},
        "spec": {"selector": {"app": "legacy"}, "clusterIP": "10.96.0.50",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    });
    api.apply(&services(), foreign.clone());
    // A ServiceAccount controlled by this very Gateway, but not created by Ambit
    // (as istiod would for an istio-waypoint Gateway).
    api.apply(
        &service_accounts(),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "other-wp", "namespace": "shop",
                            "ownerReferences": [{"apiVersion": "gateway.networking.k8s.io/v1",
                                "kind": "Gateway", "name": "other-wp", "uid": "uid-other",
                                "controller": true}]}}),
    );
    api.apply(&gateways(), gateway("waypoint", "ambit-waypoint", "uid-wp"));
    api.apply(
        &gateways(),
        gateway("other-wp", "istio-waypoint", "uid-other"),
    );
    let _controller = start(&api, "replica-a");

    let c = programmed(&api, "waypoint", "False", "Conflict").await;
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("Service shop/waypoint already exists, with no controller owner"),
        "{message}"
    );
    assert!(message.contains("does not take over"), "{message}");
    let c = programmed(&api, "other-wp", "False", "Conflict").await;
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("ServiceAccount shop/other-wp already exists")
            && message.contains("not created by Ambit"),
        "{message}"
    );
    assert_eq!(condition(&api, "waypoint", "Accepted")["status"], "True");
    // Retried (with backoff) and still not touched: none of the three is applied.
    lease_attempts(&api, 3).await;
    assert!(object_patches(&api, "waypoint").is_empty());
    assert!(object_patches(&api, "other-wp").is_empty());
    let stored = api.object(&services(), "shop", "waypoint").unwrap();
    assert_eq!(stored["spec"], foreign["spec"]);
    assert_eq!(stored["metadata"]["labels"], foreign["metadata"]["labels"]);

    // Once the foreign Service is gone, the waypoint gets its objects.
    api.delete(&services(), "shop", "waypoint");
    programmed(&api, "waypoint", "True", "Programmed").await;
    assert_eq!(object_patches(&api, "waypoint").len(), 3);
    assert!(object_patches(&api, "other-wp").is_empty());
}

#[tokio::test]
async fn a_deleted_gateway_gets_nothing() {
    let api = FakeApi::start().await;
    serve(&api);
    api.apply(&gateways(), gateway("waypoint", "ambit-waypoint", "uid-wp"));
    let _controller = start(&api, "replica-a");
    programmed(&api, "waypoint", "True", "Programmed").await;
    assert_eq!(object_patches(&api, "waypoint").len(), 3);

    // Being deleted (a finalizer holds it): a change is not applied any more.
    let mut deleting = gateway("waypoint", "ambit-waypoint", "uid-wp");
    deleting["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    deleting["metadata"]["annotations"] = json!({"ambit.dev/replicas": "2"});
    api.apply(&gateways(), deleting);
    until(
        "the deleting Gateway handled (no Programmed verdict)",
        || {
            let c = condition(&api, "waypoint", "Programmed");
            if c.is_null() {
                Ok(())
            } else {
                Err(c.to_string())
            }
        },
    )
    .await;
    assert_eq!(object_patches(&api, "waypoint").len(), 3);

    // Deleted, its objects garbage-collected: they are not created again, while a
    // new Gateway (handled after the deletion) is served.
    api.delete(&gateways(), "shop", "waypoint");
    for path in [service_accounts(), services(), deployments()] {
        api.delete(&path, "shop", "waypoint");
    }
    api.apply(&gateways(), gateway("next", "ambit-waypoint", "uid-next"));
    programmed(&api, "next", "True", "Programmed").await;
    assert_eq!(object_patches(&api, "waypoint").len(), 3);
    assert!(api.object(&deployments(), "shop", "waypoint").is_none());
}

#[tokio::test]
async fn bad_input_gets_a_clear_reason() {
    let api = FakeApi::start().await;
    serve(&api);
    // A valid Gateway name that cannot name a Service.
    api.apply(&gateways(), gateway("wp.east", "ambit-waypoint", "uid-1"));
    let mut bad_replicas = gateway("wp-two", "ambit-waypoint", "uid-2");
    bad_replicas["metadata"]["annotations"] = json!({"ambit.dev/replicas": "-1"});
    api.apply(&gateways(), bad_replicas);
    let _controller = start(&api, "replica-a");

    let c = programmed(&api, "wp.east", "False", "Invalid").await;
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("metadata.name `wp.east` cannot name the waypoint's Service"),
        "{c}"
    );
    assert_eq!(condition(&api, "wp.east", "Accepted")["status"], "True");
    let c = programmed(&api, "wp-two", "False", "Invalid").await;
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("metadata.annotations[\"ambit.dev/replicas\"]: `-1`"),
        "{c}"
    );
    assert!(object_patches(&api, "wp.east").is_empty());
    assert!(object_patches(&api, "wp-two").is_empty());

    // Fixed: applied.
    api.apply(&gateways(), gateway("wp-two", "ambit-waypoint", "uid-2"));
    programmed(&api, "wp-two", "True", "Programmed").await;
    assert_eq!(object_patches(&api, "wp-two").len(), 3);
}

/// Local mode (`--config-dir`) never reaches for a cluster, even with a kubeconfig at
/// hand: the simulated cluster starts waypoint pods itself.
#[tokio::test]
async fn local_mode_talks_to_no_api_server() {
    use std::io::BufRead as _;

    let api = FakeApi::start().await;
    serve(&api);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let server = api.client_url();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\n\
             users:\n- name: fake\n  user: {{token: t}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    // The kubeconfig does reach the fake API (so silence below means something).
    let options = kube::config::KubeConfigOptions::default();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .unwrap(),
    )
    .unwrap();
    let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .list(&Default::default())
        .await
        .unwrap();
    let before = api.requests().len();
    assert!(before > 0);

    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("waypoint.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: shop}\n\
         spec:\n  gatewayClassName: ambit-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ambit-controller"))
        .args(["--config-dir", config.to_str().unwrap()])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--readiness-addr", "127.0.0.1:0", "--log-format", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let child = Kill(child);
    // The admin address, from the "listeners bound" log line.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = v["admin_addr"].as_str()
            {
                let _ = tx.send(addr.parse::<std::net::SocketAddr>().unwrap());
            }
        }
    });
    let admin = tokio::task::spawn_blocking(move || rx.recv_timeout(DEADLINE))
        .await
        .unwrap()
        .expect("the controller logs its admin address");
    // Synced, the Gateway accepted as a waypoint.
    let dump: Value = eventually_async("local controller synced", DEADLINE, POLL, || async move {
        let (status, body) = ambit_runtime::admin::get(admin, "/config_dump").await?;
        let dump: Value = serde_json::from_slice(&body)?;
        if status == http::StatusCode::OK && dump["synced"] == true {
            Ok(dump)
        } else {
            anyhow::bail!("{status}")
        }
    })
    .await
    .unwrap();
    assert_eq!(dump["mode"], "local");
    let gateway = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "Gateway")
        .cloned()
        .unwrap();
    assert_eq!(gateway["status"], "Accepted", "{gateway}");
    drop(child);
    assert_eq!(
        api.requests().len(),
        before,
        "local mode sent requests to the API server: {:?}",
        &api.requests()[before..]
    );
}
