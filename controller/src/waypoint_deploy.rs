//! Waypoints in Kubernetes: for every accepted waypoint Gateway (`gatewayClassName:
//! ambit-waypoint` or `istio-waypoint`) the controller creates what runs it, as istiod
//! does for Istio's waypoints, in the Gateway's namespace and named after it:
//!
//! - a **ServiceAccount** (the waypoint's identity is
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<name>`);
//! - a **Service** selecting the waypoint's pods, port 15008 `mesh` (appProtocol
//!   `HBONE`): what the node daemons send the fronted services' traffic to;
//! - a **Deployment** running `ambit-waypoint` ([`WaypointDeployConfig::image`]) as
//!   that ServiceAccount, pods labelled `gateway.networking.k8s.io/gateway-name:
//!   <name>` (and `ambit.dev/dataplane-mode: none`: never captured), ports 15008
//!   (HBONE), 15020 (metrics), 15021 (readiness, probed on `/healthz/ready`), a
//!   projected ServiceAccount token with the controller's audience for the
//!   controller's TokenReview, the controller's address and the trust domain.
//!
//! Each object carries a controller `ownerReference` to its Gateway (so Kubernetes
//! garbage-collects it with the Gateway) and the label
//! `app.kubernetes.io/managed-by: ambit-controller`; it is written with server-side
//! apply, field manager [`FIELD_MANAGER`]. `spec.infrastructure.labels` and
//! `.annotations` of the Gateway are copied onto the objects (and the pods), as the
//! Gateway API asks. `spec.replicas` is set only when the Gateway carries the
//! annotation [`REPLICAS_ANNOTATION`]; otherwise it is left to `kubectl scale` or an
//! autoscaler.
//!
//! Safety rules:
//!
//! - **No hijacking**: before applying, each of the three objects is read; one that
//!   exists without being ours (controller reference to this Gateway's uid *and* our
//!   managed-by label) is left alone, none of the three is applied, and the Gateway's
//!   `Programmed` condition says which object is in the way (reason `Conflict`). One
//!   still owned by an earlier, deleted Gateway of the same name is waited for
//!   (reason `Pending`) until Kubernetes has garbage-collected it.
//! - **No resurrection**: the Gateway itself is read from the API server before its
//!   objects are applied; a Gateway that is gone (or was replaced, or is being
//!   deleted) gets nothing, whatever a lagging watch still says.
//! - **Bad input**: a Gateway name that cannot name a Service (not a DNS-1035 label),
//!   a malformed replicas annotation or infrastructure label gives `Programmed:
//!   False`, reason `Invalid`, with a message naming the field.
//!
//! The Gateway's `Programmed` condition (`True`, reason `Programmed`, once the three
//! objects are applied) is written by the status writer together with `Accepted`
//! ([`crate::status`]): the deployer hands it each world with its verdicts
//! ([`Deployed`]). Both run only on the replica holding the status Lease
//! ([`run_elected`]), and only once the config source has synced. Failed or blocked
//! applies are retried with backoff; everything is re-applied every
//! [`WaypointDeployConfig::resync`] (an object deleted by hand comes back), when the
//! Gateway changes, and when another replica takes over.
//!
//! Local mode does none of this: the simulated cluster starts waypoint pods itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
            HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
            Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
            Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec,
            Volume, VolumeMount, VolumeProjection,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    model::waypoint::HBONE_PORT,
    resources::{ParsedDocument, Resource, ResourceKind},
    source::kube::api_resource,
    status::{
        FIELD_MANAGER, LeaseConfig, ProgrammedStatus, StatusReport, StatusWriterConfig, reports_of,
        run_status_writer_with, run_while_leading,
    },
    translate::{GatewayKey, cluster::GATEWAY_NAME_LABELS},
    world::World,
};

/// The image deployed when `--waypoint-image` is not given: `ambit-waypoint` at this
/// controller's version, as built from this repository (no registry is implied; set
/// the flag, or the chart's `waypoint.image`, to where the image is published).
pub const DEFAULT_WAYPOINT_IMAGE: &str = concat!("ambit-waypoint:", env!("CARGO_PKG_VERSION"));
/// The label marking the objects the controller created.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "ambit-controller";
/// Gateway annotation setting the Deployment's `spec.replicas` (a whole number).
pub const REPLICAS_ANNOTATION: &str = "ambit.dev/replicas";
/// The pod label that keeps waypoint pods out of capture.
const DATAPLANE_MODE_NONE: (&str, &str) = ("ambit.dev/dataplane-mode", "none");
/// Where the projected token is mounted in waypoint pods.
const TOKEN_DIR: &str = "/var/run/secrets/ambit";
/// The waypoint's state directory (an emptyDir).
const STATE_DIR: &str = "/var/lib/ambit/waypoint";
/// Lifetime of the projected token (the kubelet renews it at 80 %).
const TOKEN_EXPIRATION_SECONDS: i64 = 12 * 3600;
/// The unprivileged user and group waypoint pods run as.
const RUN_AS: i64 = 1337;
/// Waypoint ports: HBONE, metrics, readiness.
const METRICS_PORT: i32 = 15020;
const READINESS_PORT: i32 = 15021;

/// What the deployer puts in every waypoint Deployment, and its timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointDeployConfig {
    /// Container image of `ambit-waypoint`.
    pub image: String,
    /// The controller's gRPC address as waypoint pods reach it (`CONTROLLER_ADDR`).
    pub controller_addr: String,
    /// The mesh's trust domain (`TRUST_DOMAIN`).
    pub trust_domain: String,
    /// The audience of the projected ServiceAccount token the controller's
    /// TokenReview accepts (`--token-audience`).
    pub token_audience: String,
    /// First delay before retrying failed or blocked applies; doubles up to
    /// `retry_max`.
    pub retry_initial: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Interval at which every waypoint's objects are read and applied again.
    pub resync: Duration,
}

impl WaypointDeployConfig {
    /// A configuration with the default timing (retries 1 s doubling to 60 s, resync
    /// every 10 minutes).
    pub fn new(
        image: impl Into<String>,
        controller_addr: impl Into<String>,
        trust_domain: impl Into<String>,
        token_audience: impl Into<String>,
    ) -> Self {
        Self {
            image: image.into(),
            controller_addr: controller_addr.into(),
            trust_domain: trust_domain.into(),
            token_audience: token_audience.into(),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            resync: Duration::from_secs(600),
        }
    }
}

/// An accepted waypoint Gateway, as the deployer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointGateway {
    /// `apiVersion` it was read in (used for its owner references).
    pub api_version: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.infrastructure` as written (labels and annotations for what is created).
    pub infrastructure: Option<serde_json::Map<String, Value>>,
}

impl WaypointGateway {
    /// Its key.
    pub fn key(&self) -> GatewayKey {
        GatewayKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// The accepted waypoint Gateways of `world`.
pub fn waypoint_gateways(world: &World) -> Vec<WaypointGateway> {
    let accepted: BTreeSet<GatewayKey> = world.waypoints().into_iter().collect();
    let mut out: BTreeMap<GatewayKey, WaypointGateway> = BTreeMap::new();
    for doc in world.documents() {
        let ParsedDocument::Resource(r) = &doc.parsed else {
            continue;
        };
        let Resource::Gateway(g) = &r.resource else {
            continue;
        };
        if !doc.validated.is_accepted() {
            continue;
        }
        let gw = WaypointGateway {
            api_version: r.api_version.clone(),
            namespace: g.metadata.namespace.clone().unwrap_or_default(),
            name: g.metadata.name.clone().unwrap_or_default(),
            uid: g.metadata.uid.clone().filter(|u| !u.is_empty()),
            annotations: g.metadata.annotations.clone().unwrap_or_default(),
            infrastructure: g.spec.infrastructure.clone().map(|i| i.0),
        };
        let key = gw.key();
        // The first document of an object wins (duplicates exist only in local mode).
        if accepted.contains(&key) && !out.contains_key(&key) {
            out.insert(key, gw);
        }
    }
    out.into_values().collect()
}

/// What runs one waypoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WaypointObjects {
    /// Its identity.
    pub service_account: ServiceAccount,
    /// Its HBONE address.
    pub service: Service,
    /// Its pods.
    pub deployment: Deployment,
}

impl WaypointObjects {
    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        // Serializing k8s-openapi types cannot fail (string keys, no floats).
        serde_json::to_string(self).unwrap_or_default().hash(&mut h);
        h.finish()
    }
}

/// Whether `s` is a DNS-1035 label (what a Service name must be): lowercase letters,
/// digits and `-`, starting with a letter, ending with a letter or digit, at most 63
/// characters.
pub fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A string map under `spec.infrastructure.<field>`, or what is wrong with it.
fn infrastructure_map(
    gw: &WaypointGateway,
    field: &str,
) -> Result<BTreeMap<String, String>, String> {
    let Some(value) = gw.infrastructure.as_ref().and_then(|i| i.get(field)) else {
        return Ok(BTreeMap::new());
    };
    let Some(map) = value.as_object() else {
        return Err(format!(
            "spec.infrastructure.{field}: must be a map of strings"
        ));
    };
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_owned())),
            None => Err(format!(
                "spec.infrastructure.{field}[{k:?}]: must be a string"
            )),
        })
        .collect()
}

/// The objects that run `gw`, or why it cannot have any (a message naming the field).
pub fn waypoint_objects(
    gw: &WaypointGateway,
    config: &WaypointDeployConfig,
) -> Result<WaypointObjects, String> {
    let name = gw.name.as_str();
    if !is_dns1035_label(name) {
        return Err(format!(
            "metadata.name `{name}` cannot name the waypoint's Service, ServiceAccount and \
             Deployment: it must be a DNS-1035 label (lowercase letters, digits and '-', \
             starting with a letter, at most 63 characters); rename the Gateway"
        ));
    }
    let Some(uid) = gw.uid.clone() else {
        return Err(
            "metadata.uid is missing: the waypoint's objects cannot name their owner".to_owned(),
        );
    };
    let replicas = match gw.annotations.get(REPLICAS_ANNOTATION) {
        None => None,
        Some(v) => match v.trim().parse::<i32>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return Err(format!(
                    "metadata.annotations[\"{REPLICAS_ANNOTATION}\"]: `{v}` is not a whole \
                     number of replicas (0 or more)"
                ));
            }
        },
    };
    let infra_labels = infrastructure_map(gw, "labels")?;
    let infra_annotations = infrastructure_map(gw, "annotations")?;

    let selector = BTreeMap::from([(GATEWAY_NAME_LABELS[0].to_owned(), name.to_owned())]);
    let mut labels = infra_labels.clone();
    labels.extend(selector.clone());
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    let owner = OwnerReference {
        api_version: gw.api_version.clone(),
        kind: "Gateway".to_owned(),
        name: name.to_owned(),
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    };
    let meta = ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(gw.namespace.clone()),
        labels: Some(labels),
        annotations: (!infra_annotations.is_empty()).then(|| infra_annotations.clone()),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };

    let service_account = ServiceAccount {
        metadata: meta.clone(),
        ..ServiceAccount::default()
    };
    let service = Service {
        metadata: meta.clone(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("mesh".to_owned()),
                port: i32::from(HBONE_PORT),
                target_port: Some(IntOrString::Int(i32::from(HBONE_PORT))),
                protocol: Some("TCP".to_owned()),
                app_protocol: Some("HBONE".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };

    let mut pod_labels = infra_labels;
    pod_labels.extend(selector.clone());
    pod_labels.insert(
        DATAPLANE_MODE_NONE.0.to_owned(),
        DATAPLANE_MODE_NONE.1.to_owned(),
    );
    let mut pod_annotations = infra_annotations;
    for (k, v) in [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", METRICS_PORT.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
    ] {
        pod_annotations.insert(k.to_owned(), v);
    }
    let env = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    };
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    let container = Container {
        name: "waypoint".to_owned(),
        image: Some(config.image.clone()),
        env: Some(vec![
            env("WAYPOINT_NAME", name),
            EnvVar {
                name: "POD_NAMESPACE".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.namespace".to_owned(),
                        api_version: None,
                    }),
                    ..EnvVarSource::default()
                }),
            },
            env("CONTROLLER_ADDR", &config.controller_addr),
            env("AMBIT_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
            env("TRUST_DOMAIN", &config.trust_domain),
            env("AMBIT_STATE_DIR", STATE_DIR),
        ]),
        ports: Some(vec![
            port("hbone", i32::from(HBONE_PORT)),
            port("metrics", METRICS_PORT),
            port("status-port", READINESS_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(READINESS_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("128Mi".to_owned())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "ambit-token".to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "state".to_owned(),
                mount_path: STATE_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(name.to_owned()),
        // The waypoint never calls the Kubernetes API: only the projected token below.
        automount_service_account_token: Some(false),
        containers: vec![container],
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "ambit-token".to_owned(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(config.token_audience.clone()),
                            expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                            path: "token".to_owned(),
                        }),
                        ..VolumeProjection::default()
                    }]),
                    default_mode: None,
                }),
                ..Volume::default()
            },
            Volume {
                name: "state".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    let deployment = Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    };
    Ok(WaypointObjects {
        service_account,
        service,
        deployment,
    })
}

/// The deployer's verdict per accepted waypoint Gateway.
pub type Verdicts = BTreeMap<GatewayKey, ProgrammedStatus>;

/// One world, once the deployer has acted on it, with its verdicts: the status
/// writer's input in Kubernetes mode.
#[derive(Clone, Debug)]
pub struct Deployed {
    /// The world.
    pub world: Arc<World>,
    /// The `Programmed` condition of each accepted waypoint Gateway.
    pub programmed: Arc<Verdicts>,
}

/// The status reports of a deployed world: [`reports_of`] with each accepted waypoint
/// Gateway's `Programmed` condition filled in.
pub fn reports_deployed(deployed: &Deployed) -> Vec<StatusReport> {
    let mut reports = reports_of(&deployed.world);
    for r in &mut reports {
        if r.kind == ResourceKind::Gateway && r.accepted {
            let key = GatewayKey {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            };
            r.programmed = deployed.programmed.get(&key).cloned();
        }
    }
    reports
}

/// Runs the waypoint deployer and the status writer while this replica holds the
/// Lease of `lease` (see [`run_while_leading`]); returns when the index is gone.
pub async fn run_elected(
    client: Client,
    world: watch::Receiver<Arc<World>>,
    config: WaypointDeployConfig,
    status: StatusWriterConfig,
    lease: LeaseConfig,
) {
    let term_client = client.clone();
    let term_world = world.clone();
    run_while_leading(
        client,
        &world,
        lease,
        "writing status and waypoint objects",
        move || {
            lead(
                term_client.clone(),
                term_world.clone(),
                config.clone(),
                status.clone(),
            )
        },
    )
    .await;
}

/// One leadership term: the deployer, and the status writer on what it hands over.
async fn lead(
    client: Client,
    world: watch::Receiver<Arc<World>>,
    config: WaypointDeployConfig,
    status: StatusWriterConfig,
) {
    let (tx, rx) = watch::channel::<Option<Deployed>>(None);
    let deployer = Deployer {
        client: client.clone(),
        config,
        applied: HashMap::new(),
        verdicts: Verdicts::new(),
    };
    tokio::join!(
        deployer.run(world, tx),
        run_status_writer_with(
            client,
            rx,
            |d: &Option<Deployed>| d.as_ref().map(reports_deployed).unwrap_or_default(),
            status,
        ),
    );
}

/// Why a Gateway's objects were not applied.
enum Blocked {
    /// The Gateway is gone (or replaced, or being deleted): nothing to do or report.
    Gone,
    /// Retry later; the Gateway's `Programmed` condition says why.
    Retry(ProgrammedStatus),
}

struct Deployer {
    client: Client,
    config: WaypointDeployConfig,
    /// Per Gateway: the fingerprint of the objects last applied.
    applied: HashMap<GatewayKey, u64>,
    verdicts: Verdicts,
}

fn not_programmed(reason: &'static str, message: String) -> ProgrammedStatus {
    ProgrammedStatus {
        programmed: false,
        reason,
        message,
    }
}

impl Deployer {
    async fn run(
        mut self,
        mut input: watch::Receiver<Arc<World>>,
        out: watch::Sender<Option<Deployed>>,
    ) {
        let mut delay = self.config.retry_initial;
        let mut resync_at = tokio::time::Instant::now() + self.config.resync;
        loop {
            let world = input.borrow_and_update().clone();
            let mut retry = false;
            // A partial first view could miss a Gateway's changes; wait for the sync.
            if world.synced() {
                let failed = self.sync(&waypoint_gateways(&world)).await;
                retry = failed > 0;
                if retry {
                    warn!(failed, retry_in = ?delay, "some waypoints could not be applied; retrying");
                } else {
                    delay = self.config.retry_initial;
                }
                out.send_replace(Some(Deployed {
                    world,
                    programmed: Arc::new(self.verdicts.clone()),
                }));
            }
            tokio::select! {
                changed = input.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(delay), if retry => {
                    delay = (delay * 2).min(self.config.retry_max);
                }
                () = tokio::time::sleep_until(resync_at) => {
                    debug!("resync: applying every waypoint again");
                    self.applied.clear();
                    resync_at = tokio::time::Instant::now() + self.config.resync;
                }
            }
        }
    }

    /// Brings every waypoint's objects in line; returns how many Gateways need a
    /// retry.
    async fn sync(&mut self, gateways: &[WaypointGateway]) -> usize {
        let keys: BTreeSet<GatewayKey> = gateways.iter().map(WaypointGateway::key).collect();
        // A Gateway that is gone is not applied again; its objects go with it
        // (garbage collection).
        self.applied.retain(|k, _| keys.contains(k));
        self.verdicts.retain(|k, _| keys.contains(k));
        let mut failed = 0;
        for gw in gateways {
            let key = gw.key();
            let objects = match waypoint_objects(gw, &self.config) {
                Ok(o) => o,
                Err(message) => {
                    if self.verdicts.get(&key).is_none_or(|v| v.message != message) {
                        warn!(gateway = %key, %message, "waypoint not deployed");
                    }
                    self.applied.remove(&key);
                    self.verdicts
                        .insert(key, not_programmed("Invalid", message));
                    continue;
                }
            };
            let fingerprint = objects.fingerprint();
            if self.applied.get(&key) == Some(&fingerprint) {
                continue;
            }
            match self.apply(gw, &objects).await {
                Ok(()) => {
                    info!(gateway = %key, image = %self.config.image, "waypoint ServiceAccount, Service and Deployment applied");
                    self.applied.insert(key.clone(), fingerprint);
                    self.verdicts.insert(
                        key,
                        ProgrammedStatus {
                            programmed: true,
                            reason: "Programmed",
                            message: format!(
                                "ServiceAccount, Service and Deployment {}/{} applied (image {})",
                                gw.namespace, gw.name, self.config.image
                            ),
                        },
                    );
                }
                Err(Blocked::Gone) => {
                    debug!(gateway = %key, "the Gateway is gone: nothing applied");
                    self.applied.remove(&key);
                    self.verdicts.remove(&key);
                }
                Err(Blocked::Retry(verdict)) => {
                    warn!(gateway = %key, reason = verdict.reason, message = %verdict.message, "waypoint not applied");
                    self.applied.remove(&key);
                    self.verdicts.insert(key, verdict);
                    failed += 1;
                }
            }
        }
        failed
    }

    async fn apply(&self, gw: &WaypointGateway, objects: &WaypointObjects) -> Result<(), Blocked> {
        self.check_gateway(gw).await?;
        let ns = gw.namespace.as_str();
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        // Nothing is applied while any of the three is in the way.
        check_owner(&accounts, "ServiceAccount", gw).await?;
        check_owner(&services, "Service", gw).await?;
        check_owner(&deployments, "Deployment", gw).await?;
        apply_one(&accounts, "ServiceAccount", gw, &objects.service_account).await?;
        apply_one(&services, "Service", gw, &objects.service).await?;
        apply_one(&deployments, "Deployment", gw, &objects.deployment).await
    }

    /// The Gateway as the API server has it now: still there, same uid, not being
    /// deleted.
    async fn check_gateway(&self, gw: &WaypointGateway) -> Result<(), Blocked> {
        let version = gw
            .api_version
            .rsplit_once('/')
            .map_or(gw.api_version.as_str(), |(_, v)| v);
        let ar = api_resource(ResourceKind::Gateway, version);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &gw.namespace, &ar);
        match api.get_opt(&gw.name).await {
            Ok(Some(current))
                if current.metadata.uid == gw.uid
                    && current.metadata.deletion_timestamp.is_none() =>
            {
                Ok(())
            }
            Ok(_) => Err(Blocked::Gone),
            Err(e) => Err(Blocked::Retry(not_programmed(
                "Pending",
                format!(
                    "reading Gateway {}/{} failed (retrying): {e}",
                    gw.namespace, gw.name
                ),
            ))),
        }
    }
}

/// Leaves alone an object of the waypoint's name that is not ours.
async fn check_owner<K>(api: &Api<K>, kind: &str, gw: &WaypointGateway) -> Result<(), Blocked>
where
    K: kube::Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let what = format!("{kind} {}/{}", gw.namespace, gw.name);
    let existing = match api.get_opt(&gw.name).await {
        Ok(None) => return Ok(()),
        Ok(Some(o)) => o,
        Err(e) => {
            return Err(Blocked::Retry(not_programmed(
                "Pending",
                format!("reading {what} failed (retrying): {e}"),
            )));
        }
    };
    let meta = existing.meta();
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    let gateway_ref = controller.filter(|r| {
        r.kind == "Gateway"
            && r.api_version.starts_with("gateway.networking.k8s.io/")
            && r.name == gw.name
    });
    let managed = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    match (gateway_ref, managed) {
        (Some(r), true) if Some(&r.uid) == gw.uid.as_ref() => Ok(()),
        (Some(r), true) => Err(Blocked::Retry(not_programmed(
            "Pending",
            format!(
                "{what} still belongs to an earlier Gateway of this name (uid {}) that \
                 Kubernetes has not garbage-collected yet; retrying",
                r.uid
            ),
        ))),
        _ => {
            let owner = match (controller, managed) {
                (Some(r), false) if gateway_ref.is_some() => format!(
                    "controlled by Gateway {} but not created by Ambit (no \
                     {MANAGED_BY_LABEL}={MANAGED_BY} label: another controller, such as \
                     istiod, may be deploying this Gateway)",
                    r.name
                ),
                (Some(r), _) => format!("controlled by {} {}", r.kind, r.name),
                (None, _) => "with no controller owner".to_owned(),
            };
            Err(Blocked::Retry(not_programmed(
                "Conflict",
                format!(
                    "{what} already exists, {owner}: Ambit does not take over objects it did \
                     not create, so none of the waypoint's objects were applied; delete it or \
                     rename the Gateway"
                ),
            )))
        }
    }
}

/// Server-side applies one object (forced: it was checked to be ours).
async fn apply_one<K>(
    api: &Api<K>,
    kind: &str,
    gw: &WaypointGateway,
    object: &K,
) -> Result<(), Blocked>
where
    K: kube::Resource<Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(&gw.name, &params, &Patch::Apply(object)).await {
        Ok(_) => Ok(()),
        Err(e) => Err(Blocked::Retry(not_programmed(
            "Pending",
            format!(
                "applying {kind} {}/{} failed (retrying): {e}",
                gw.namespace, gw.name
            ),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(name: &str) -> WaypointGateway {
        WaypointGateway {
            api_version: "gateway.networking.k8s.io/v1".into(),
            namespace: "shop".into(),
            name: name.into(),
            uid: Some("uid-1".into()),
            annotations: BTreeMap::new(),
            infrastructure: None,
        }
    }

    fn config() -> WaypointDeployConfig {
        WaypointDeployConfig::new(
            "example/ambit-waypoint:1",
            "http://ambit-controller.ambit-system.svc:15012",
            "cluster.local",
            "ambit-ca",
        )
    }

    #[test]
    fn dns1035_labels() {
        for ok in ["waypoint", "a", "wp-1", &"a".repeat(63)] {
            assert!(is_dns1035_label(ok), "{ok}");
        }
        for bad in [
            "",
            "1wp",
            "wp.a",
            "Wp",
            "wp-",
            "-wp",
            "wp_a",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let err = waypoint_objects(&gateway("wp.east"), &config()).unwrap_err();
        assert!(err.starts_with("metadata.name `wp.east`"), "{err}");
        let mut gw = gateway("wp");
        gw.annotations
            .insert(REPLICAS_ANNOTATION.into(), "two".into());
        let err = waypoint_objects(&gw, &config()).unwrap_err();
        assert!(
            err.starts_with("metadata.annotations[\"ambit.dev/replicas\"]: `two`"),
            "{err}"
        );
        let mut gw = gateway("wp");
        gw.infrastructure = Some(
            serde_json::json!({"labels": {"team": 7}})
                .as_object()
                .cloned()
                .unwrap(),
        );
        let err = waypoint_objects(&gw, &config()).unwrap_err();
        assert_eq!(
            err,
            "spec.infrastructure.labels[\"team\"]: must be a string"
        );
        let mut gw = gateway("wp");
        gw.uid = None;
        assert!(
            waypoint_objects(&gw, &config())
                .unwrap_err()
                .starts_with("metadata.uid")
        );
    }

    #[test]
    fn infrastructure_labels_do_not_override_ours() {
        let mut gw = gateway("wp");
        gw.infrastructure = Some(
            serde_json::json!({
                "labels": {"team": "payments", MANAGED_BY_LABEL: "someone"},
                "annotations": {"note": "x"},
            })
            .as_object()
            .cloned()
            .unwrap(),
        );
        let o = waypoint_objects(&gw, &config()).unwrap();
        let labels = o.service.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "payments");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        let template = o
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert_eq!(template.labels.as_ref().unwrap()["team"], "payments");
        assert_eq!(template.annotations.as_ref().unwrap()["note"], "x");
        assert_eq!(
            o.service_account.metadata.annotations.as_ref().unwrap()["note"],
            "x"
        );
    }
}
