//! One immutable generation of the controller's state: the documents in force, their
//! verdicts, and what each proxy receives ([`World`]).
//!
//! The index ([`crate::index`]) publishes a new `Arc<World>` after every change; the
//! push server reads subscribers' resources from it ([`ConfigView`]), the certificate
//! authority asks it who may hold which identity ([`IdentityAuthority`]), the admin dump
//! shows [`World::statuses`], and the Kubernetes status writer writes
//! [`World::status_reports`].
//!
//! **Duplicates**: two documents naming the same object (possible in local mode, where
//! two files can define it) are resolved by origin order (file path, then position in
//! the file): the first is used, the others are reported as rejected duplicates.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ambit_api::config::v1::Resource;
use ambit_identity::{SpiffeId, TrustDomain};
use serde::Serialize;

use crate::{
    resources::{ParsedDocument, ResourceKind},
    source::OriginId,
    translate::{self, GatewayKey, Input, ObjectKey, Settings, Translation},
    validate::{StatusEntry, Validated},
    view::{ConfigView, IdentityAuthority, Subscriber},
};

/// One document as the index holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Where it came from.
    pub origin: OriginId,
    /// The document.
    pub parsed: ParsedDocument,
    /// Its verdict.
    pub validated: Validated,
}

impl Document {
    /// The object the document names, when readable (kind and name at least).
    pub fn object_key(&self) -> Option<ObjectKey> {
        let kind = self.validated.kind.as_deref()?;
        let name = self.validated.name.as_deref()?;
        let namespaced = ResourceKind::ALL
            .iter()
            .find(|k| k.kind() == kind)
            .is_none_or(|k| k.namespaced());
        let namespace = if namespaced {
            self.validated.namespace.as_deref()
        } else {
            None
        };
        Some(ObjectKey::new(kind, namespace, name))
    }

    fn api_version(&self) -> Option<String> {
        match &self.parsed {
            ParsedDocument::Resource(r) => Some(r.api_version.clone()),
            ParsedDocument::Ignored(i) => Some(i.api_version.clone()),
            ParsedDocument::Rejected(r) => r.rejection.api_version.clone(),
        }
    }

    fn generation(&self) -> Option<i64> {
        match &self.parsed {
            ParsedDocument::Resource(r) => r.resource.metadata().generation,
            ParsedDocument::Ignored(_) => None,
            ParsedDocument::Rejected(r) => r
                .raw
                .as_ref()
                .and_then(|v| v.get("metadata"))
                .and_then(|m| m.get("generation"))
                .and_then(serde_yaml::Value::as_i64),
        }
    }
}

/// The verdict on one object, for the Kubernetes status writer: one per document of a
/// kind Ambit writes status for (the Istio and Gateway API kinds), accepted or not.
/// Documents of kinds Ambit does not own (and Gateways of other classes) are not
/// reported: their status belongs to someone else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// `apiVersion` as written.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// Namespace.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// `metadata.generation` as read, for the condition's `observedGeneration`.
    pub generation: Option<i64>,
    /// Whether the object is served as written.
    pub accepted: bool,
    /// A condition reason: `Accepted`, `Invalid` (rejected; a fail-closed stand-in may
    /// be enforced meanwhile, see `message`) or `Duplicate`.
    pub reason: String,
    /// What is wrong or worth knowing, in plain words (empty when nothing is).
    pub message: String,
    /// Where the document came from.
    pub origin: OriginId,
}

/// One generation of translated config (module docs).
#[derive(Debug)]
pub struct World {
    generation: u64,
    synced: bool,
    trust_domain: TrustDomain,
    documents: Vec<Arc<Document>>,
    /// Index into `documents` → the origin of the document that won.
    duplicates: BTreeMap<usize, OriginId>,
    translation: Translation,
}

/// Inputs of [`World::build`] other than the documents.
#[derive(Clone, Debug)]
pub struct WorldSettings {
    /// Trust domain of every identity.
    pub trust_domain: TrustDomain,
    /// Roots of the trust bundle, PEM.
    pub trust_bundle_pem: Vec<String>,
}

impl World {
    /// The state before any source reported: nothing, not synced.
    pub fn empty(settings: &WorldSettings) -> Self {
        Self::build(0, false, settings, Vec::new())
    }

    /// Translates `documents` (in origin order) into generation `generation`.
    pub fn build(
        generation: u64,
        synced: bool,
        settings: &WorldSettings,
        documents: Vec<Arc<Document>>,
    ) -> Self {
        let mut first: BTreeMap<ObjectKey, usize> = BTreeMap::new();
        let mut duplicates = BTreeMap::new();
        for (i, d) in documents.iter().enumerate() {
            if matches!(d.parsed, ParsedDocument::Ignored(_)) {
                continue;
            }
            let Some(key) = d.object_key() else { continue };
            match first.get(&key) {
                Some(&j) => {
                    duplicates.insert(i, documents[j].origin.clone());
                }
                None => {
                    first.insert(key, i);
                }
            }
        }
        let inputs: Vec<Input<'_>> = documents
            .iter()
            .enumerate()
            .filter(|(i, _)| !duplicates.contains_key(i))
            .map(|(_, d)| Input {
                parsed: &d.parsed,
                validated: &d.validated,
            })
            .collect();
        let translation = translate::translate(
            &inputs,
            &Settings {
                trust_domain: &settings.trust_domain,
                trust_bundle_pem: &settings.trust_bundle_pem,
            },
        );
        drop(inputs);
        Self {
            generation,
            synced,
            trust_domain: settings.trust_domain.clone(),
            documents,
            duplicates,
            translation,
        }
    }

    /// Whether every source has delivered its initial state.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The documents in force, in origin order (duplicates included).
    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.documents.iter().map(AsRef::as_ref)
    }

    /// The accepted waypoints.
    pub fn waypoints(&self) -> Vec<GatewayKey> {
        self.translation.waypoints.keys().cloned().collect()
    }

    /// Cross-object findings, per object (also appended to [`World::statuses`]).
    pub fn notes(&self) -> impl Iterator<Item = (&ObjectKey, &[String])> {
        self.translation.notes.iter()
    }

    /// The nodes that run at least one pod.
    pub fn nodes(&self) -> Vec<String> {
        self.translation.nodes.keys().cloned().collect()
    }

    /// The (namespace, service account) pairs of the pods scheduled on `node`: the
    /// identities its daemon may be issued (for the admin dump).
    pub fn node_identities(&self, node: &str) -> BTreeSet<(String, String)> {
        self.translation
            .nodes
            .get(node)
            .map(|p| p.identities.clone())
            .unwrap_or_default()
    }

    fn status_parts(&self, i: usize, d: &Document) -> (StatusEntry, &'static str) {
        let mut entry = d.validated.status_entry();
        if let Some(winner) = self.duplicates.get(&i) {
            entry.status = "Rejected";
            entry.reason = format!(
                "duplicate: the same object is also defined in {winner}, which is used instead"
            );
            return (entry, "Duplicate");
        }
        if let Some(key) = d.object_key() {
            let notes = self.translation.notes.get(&key);
            if !notes.is_empty() {
                let mut parts: Vec<String> = Vec::new();
                if !entry.reason.is_empty() {
                    parts.push(entry.reason.clone());
                }
                parts.extend(notes.iter().cloned());
                entry.reason = parts.join("; ");
            }
        }
        let reason = if d.validated.is_accepted() {
            "Accepted"
        } else {
            "Invalid"
        };
        (entry, reason)
    }

    /// One entry per document, for `/config_dump`'s `resources` (cross-object findings
    /// are appended to the reason).
    pub fn statuses(&self) -> Vec<StatusEntry> {
        self.documents
            .iter()
            .enumerate()
            .map(|(i, d)| self.status_parts(i, d).0)
            .collect()
    }

    /// One report per document of a kind Ambit writes status for (see
    /// [`StatusReport`]).
    pub fn status_reports(&self) -> Vec<StatusReport> {
        let mut out = Vec::new();
        for (i, d) in self.documents.iter().enumerate() {
            if matches!(d.parsed, ParsedDocument::Ignored(_)) {
                continue;
            }
            let (Some(api_version), Some(kind), Some(name)) = (
                d.api_version(),
                d.validated.kind.clone(),
                d.validated.name.clone(),
            ) else {
                continue;
            };
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let owned = ResourceKind::lookup(group, &kind).is_some_and(|k| !k.group().is_empty())
                && group != "discovery.k8s.io";
            if !owned {
                continue;
            }
            let (entry, reason) = self.status_parts(i, d);
            out.push(StatusReport {
                api_version,
                kind,
                namespace: d.validated.namespace.clone(),
                name,
                generation: d.generation(),
                accepted: entry.status == "Accepted",
                reason: reason.to_owned(),
                message: entry.reason,
                origin: d.origin.clone(),
            });
        }
        out
    }
}

impl ConfigView for World {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn resources_for(&self, subscriber: &Subscriber) -> BTreeMap<String, Resource> {
        let t = &self.translation;
        match subscriber {
            Subscriber::Node { name } => {
                let Some(pods) = t.nodes.get(name) else {
                    return BTreeMap::new();
                };
                let mut out: BTreeMap<String, Resource> = BTreeMap::new();
                out.extend(t.workloads.iter().map(|(k, r)| (k.clone(), r.clone())));
                out.extend(t.services.iter().map(|(k, r)| (k.clone(), r.clone())));
                if let Some(b) = &t.trust_bundle {
                    out.insert(b.key.clone(), b.clone());
                }
                for p in &t.node_policies {
                    if pods.workloads.iter().any(|w| p.applies.selects(w)) {
                        out.insert(p.resource.key.clone(), p.resource.clone());
                    }
                }
                out
            }
            Subscriber::Waypoint { namespace, name } => t
                .waypoints
                .get(&GatewayKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
                .map(|w| w.resources.clone())
                .unwrap_or_default(),
        }
    }
}

impl IdentityAuthority for World {
    fn node_may_hold(&self, node: &str, id: &SpiffeId) -> bool {
        *id.trust_domain() == self.trust_domain
            && self.translation.nodes.get(node).is_some_and(|p| {
                p.identities
                    .contains(&(id.namespace().to_owned(), id.service_account().to_owned()))
            })
    }

    fn waypoint_identity(&self, namespace: &str, name: &str) -> Option<SpiffeId> {
        let key = GatewayKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if !self.translation.waypoints.contains_key(&key) {
            return None;
        }
        translate::cluster::waypoint_identity(&key, &self.trust_domain)
    }
}
