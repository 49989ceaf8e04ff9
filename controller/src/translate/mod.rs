//! Translation: the accepted objects of one generation into the wire resources
//! (`ambit_api::config::v1`) each proxy receives.
//!
//! The index hands over every document in force (duplicates already resolved); this
//! module computes, once per generation:
//!
//! - every `Workload` and `Service` ([`cluster`]): mesh membership, identities, VIPs,
//!   ports, endpoints and waypoint assignment;
//! - the daemon-enforced `Authorization` and `PeerAuthentication` policies with the
//!   scope that decides which nodes receive them ([`security`]);
//! - per waypoint, everything it needs: fronted services, their workloads, merged
//!   `RouteSet`s ([`routes`]), `DestinationPolicy`s ([`destination`]),
//!   `targetRefs` policies, and every captured workload (its possible clients, for
//!   the source labels of its telemetry).
//!
//! What a node receives is filtered at request time ([`crate::world::World`]) because
//! it depends only on which pods run there, which the precomputed scopes answer.
//!
//! Problems found *between* objects (a label naming a missing waypoint, a route to a
//! subset nobody defines, a `targetRefs` policy no waypoint enforces) are collected as
//! [`Notes`] against the object concerned and shown in its status.

use std::collections::{BTreeMap, BTreeSet};

use ambit_api::config::v1::{Resource, TrustBundle, resource::Kind};
use ambit_identity::TrustDomain;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use crate::{
    model::{
        WorkloadRef,
        authz::{AuthzPolicy, AuthzScope},
        destination::DestinationPolicy,
        peer_authn::{PeerAuthn, PeerAuthnScope},
        route::RouteTable,
        waypoint::Waypoint,
    },
    resources::{ParsedDocument, Resource as Object},
    validate::{ModelObject, Validated, undefined_subsets},
};

pub mod cluster;
pub mod destination;
pub mod routes;
pub mod security;

/// Kubernetes' default cluster DNS domain, used for `Service.hostname`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Identifies an object for notes and status: kind, namespace (none for cluster-scoped
/// kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    /// `kind` as written in YAML.
    pub kind: String,
    /// Namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(kind: &str, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A waypoint Gateway, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GatewayKey {
    /// Namespace of the Gateway.
    pub namespace: String,
    /// Name of the Gateway.
    pub name: String,
}

impl std::fmt::Display for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Cross-object findings, per object, in the order found (deduplicated).
#[derive(Clone, Debug, Default)]
pub struct Notes(BTreeMap<ObjectKey, Vec<String>>);

impl Notes {
    /// Records `message` against `object`.
    pub fn add(&mut self, object: ObjectKey, message: impl Into<String>) {
        let message = message.into();
        let list = self.0.entry(object).or_default();
        if !list.contains(&message) {
            list.push(message);
        }
    }

    /// The notes of `object`.
    pub fn get(&self, object: &ObjectKey) -> &[String] {
        self.0.get(object).map_or(&[], Vec::as_slice)
    }

    /// Every object with notes.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &[String])> {
        self.0.iter().map(|(k, v)| (k, v.as_slice()))
    }
}

/// One document in force, as translation reads it.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The parsed document.
    pub parsed: &'a ParsedDocument,
    /// Its verdict.
    pub validated: &'a Validated,
}

/// Settings translation depends on.
#[derive(Clone, Debug)]
pub struct Settings<'a> {
    /// Trust domain of every identity.
    pub trust_domain: &'a TrustDomain,
    /// Roots of the trust bundle, PEM.
    pub trust_bundle_pem: &'a [String],
}

/// Where a daemon-enforced policy applies (decides which nodes receive it).
#[derive(Clone, Debug, PartialEq)]
pub enum Applies {
    /// An authorization policy's (non-`targetRefs`) scope.
    Authz(AuthzScope),
    /// A peer authentication policy's scope.
    PeerAuthn(PeerAuthnScope),
}

impl Applies {
    /// Whether the policy can apply to `workload`.
    pub fn selects(&self, workload: &WorkloadRef) -> bool {
        match self {
            Self::Authz(scope) => match scope {
                AuthzScope::Mesh => true,
                AuthzScope::Namespace(ns) => *ns == workload.namespace,
                AuthzScope::Workloads {
                    namespace,
                    selector,
                } => {
                    namespace
                        .as_ref()
                        .is_none_or(|ns| *ns == workload.namespace)
                        && selector.matches(&workload.labels)
                }
                AuthzScope::Targets(_) => false,
            },
            Self::PeerAuthn(scope) => match scope {
                PeerAuthnScope::Mesh => true,
                PeerAuthnScope::Namespace(ns) => *ns == workload.namespace,
                PeerAuthnScope::Workloads {
                    namespace,
                    selector,
                } => *namespace == workload.namespace && selector.matches(&workload.labels),
            },
        }
    }
}

/// A policy the node daemons enforce, and where it applies.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePolicy {
    /// The wire resource.
    pub resource: Resource,
    /// Its scope.
    pub applies: Applies,
}

/// What one waypoint receives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WaypointConfig {
    /// Its resources, by key.
    pub resources: BTreeMap<String, Resource>,
}

/// The pods scheduled on one node, as policies see them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePods {
    /// Namespace and labels of each pod.
    pub workloads: Vec<WorkloadRef>,
    /// (namespace, service account) of each pod.
    pub identities: BTreeSet<(String, String)>,
}

/// Everything translated from one generation.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// Every workload, by key.
    pub workloads: BTreeMap<String, Resource>,
    /// Every service, by key.
    pub services: BTreeMap<String, Resource>,
    /// The trust bundle.
    pub trust_bundle: Option<Resource>,
    /// Daemon-enforced policies.
    pub node_policies: Vec<NodePolicy>,
    /// Pods per node.
    pub nodes: BTreeMap<String, NodePods>,
    /// Accepted waypoints and their config.
    pub waypoints: BTreeMap<GatewayKey, WaypointConfig>,
    /// Cross-object findings.
    pub notes: Notes,
}

/// The objects of one generation, sorted by kind.
#[derive(Debug, Default)]
pub(crate) struct Objects<'a> {
    pub namespaces: BTreeMap<&'a str, &'a Namespace>,
    pub pods: Vec<&'a Pod>,
    pub services: BTreeMap<(&'a str, &'a str), &'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
    pub authz: Vec<&'a AuthzPolicy>,
    pub peer_authn: Vec<&'a PeerAuthn>,
    pub routes: Vec<&'a RouteTable>,
    pub destinations: Vec<&'a DestinationPolicy>,
    pub waypoints: BTreeMap<GatewayKey, &'a Waypoint>,
}

impl<'a> Objects<'a> {
    fn collect(inputs: &[Input<'a>]) -> Self {
        let mut o = Objects::default();
        for input in inputs {
            // Core kinds: only accepted ones are served.
            if input.validated.is_accepted()
                && let ParsedDocument::Resource(r) = input.parsed
            {
                match &r.resource {
                    Object::Namespace(n) => {
                        if let Some(name) = n.metadata.name.as_deref() {
                            o.namespaces.insert(name, n);
                        }
                    }
                    Object::Pod(p) => o.pods.push(p),
                    Object::Service(s) => {
                        if let (Some(ns), Some(name)) =
                            (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
                        {
                            o.services.insert((ns, name), s);
                        }
                    }
                    Object::EndpointSlice(s) => o.slices.push(s),
                    _ => {}
                }
            }
            // Model kinds: what is enforced, fail-closed stand-ins included.
            match input.validated.enforced() {
                Some(ModelObject::Authz(p)) => o.authz.push(p),
                Some(ModelObject::PeerAuthn(p)) => o.peer_authn.push(p),
                Some(ModelObject::Routes(t)) => o.routes.push(t),
                Some(ModelObject::Destination(d)) => o.destinations.push(d),
                Some(ModelObject::Waypoint(w)) => {
                    o.waypoints.insert(
                        GatewayKey {
                            namespace: w.id.namespace.as_str().to_owned(),
                            name: w.id.name.clone(),
                        },
                        w,
                    );
                }
                None => {}
            }
        }
        o
    }
}

/// Translates the documents in force.
pub fn translate(inputs: &[Input<'_>], settings: &Settings<'_>) -> Translation {
    let objects = Objects::collect(inputs);
    let mut notes = Notes::default();
    let mesh = cluster::Mesh::build(&objects, settings.trust_domain, &mut notes);

    let mut out = Translation {
        trust_bundle: Some(Resource::new(Kind::TrustBundle(TrustBundle {
            trust_domain: settings.trust_domain.as_str().to_owned(),
            roots_pem: settings.trust_bundle_pem.to_vec(),
        }))),
        ..Translation::default()
    };
    for w in mesh.workloads() {
        let r = Resource::new(Kind::Workload(w));
        out.workloads.insert(r.key.clone(), r);
    }
    for s in mesh.services() {
        let r = Resource::new(Kind::Service(s));
        out.services.insert(r.key.clone(), r);
    }
    out.nodes = mesh.node_pods();

    let security = security::translate(&objects, &mesh, settings.trust_domain, &mut notes);
    out.node_policies = security.node_policies;

    let route_sets = routes::route_sets(&objects, &mesh, &mut notes);
    let destinations = destination::destination_policies(&objects, &mesh, &mut notes);
    for problem in undefined_subsets(objects.routes.iter().copied(), &objects.destinations) {
        notes.add(
            ObjectKey::new(
                &problem.object.kind,
                Some(problem.object.namespace.as_str()),
                &problem.object.name,
            ),
            format!("{}: {}", problem.field, problem.message),
        );
    }

    for gateway in objects.waypoints.keys() {
        let mut resources = BTreeMap::new();
        let mut insert = |r: Resource| {
            resources.insert(r.key.clone(), r);
        };
        if let Some(b) = &out.trust_bundle {
            insert(b.clone());
        }
        let fronted = mesh.fronted_by(gateway);
        let mut services: BTreeSet<cluster::ServiceKey> = fronted.iter().cloned().collect();
        for svc in &fronted {
            if let Some(rs) = route_sets.get(svc) {
                services.extend(routes::forward_targets(rs));
                insert(Resource::new(Kind::RouteSet(rs.clone())));
            }
        }
        let mut workload_uids = BTreeSet::new();
        for svc in &services {
            let key = ambit_api::ResourceKey::service(&svc.namespace, &svc.name);
            if let Some(r) = out.services.get(key.as_str()) {
                if let Some(Kind::Service(s)) = &r.kind {
                    workload_uids.extend(s.endpoints.iter().map(|e| e.workload_uid.clone()));
                }
                insert(r.clone());
            }
            if let Some(dp) = destinations.get(svc) {
                insert(Resource::new(Kind::DestinationPolicy(dp.clone())));
            }
        }
        workload_uids.extend(mesh.workloads_bound_to(gateway));
        for uid in workload_uids {
            let key = ambit_api::ResourceKey::workload(&uid);
            if let Some(r) = out.workloads.get(key.as_str()) {
                insert(r.clone());
            }
        }
        // The possible clients, so the waypoint can name the source workload in its
        // metrics and logs: every captured workload. Only those can reach it (it
        // accepts HBONE from mesh identities only, and uncaptured pods hold none);
        // every node already receives all workloads, so this is never more than a
        // node's share.
        for r in out.workloads.values() {
            if matches!(&r.kind, Some(Kind::Workload(w)) if w.captured) {
                insert(r.clone());
            }
        }
        for (key, r) in security
            .waypoint_policies
            .get(gateway)
            .into_iter()
            .flatten()
        {
            resources.insert(key.clone(), r.clone());
        }
        out.waypoints
            .insert(gateway.clone(), WaypointConfig { resources });
    }
    out.notes = notes;
    out
}
