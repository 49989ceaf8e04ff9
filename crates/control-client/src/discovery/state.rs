//! The config a proxy holds, and how one update turns it into a proposed state.
//!
//! Updates are atomic (discovery.proto, step 4): an update is applied to a copy
//! (the [`ProposedState`]), checked as a whole, and either becomes the new
//! [`ConfigState`] or is rejected with every reason found, leaving the held state
//! untouched. Resources are shared (`Arc`) between consecutive states, so a delta
//! costs what it changes plus one map of pointers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use ambit_api::ResourceKind;
use ambit_api::config::v1::{ConfigUpdate, Resource};

/// Where the held config came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StateSource {
    /// Nothing yet: no state file, or it was missing or unusable, and the controller
    /// has not delivered an update this proxy accepted.
    Initial,
    /// The last-known-good state persisted by an earlier run (the controller has not
    /// delivered an update this proxy accepted since the start).
    FromDisk,
    /// Applied from the controller's stream.
    FromController,
}

/// The applied configuration, as published to the proxy.
#[derive(Clone, Debug)]
pub struct ConfigState {
    /// Every resource held, by key (`Service/production/payment`, …). Keys start with
    /// the kind, so one kind is a contiguous range (see [`ConfigState::of_kind`]).
    pub resources: BTreeMap<String, Arc<Resource>>,
    /// `ConfigUpdate.version` of the last update applied (per stream: not comparable
    /// across reconnects); for a state from disk, the version it was ACKed at.
    pub version: u64,
    /// Local counter, +1 for every state published by this process (0: the initial
    /// empty state). Strictly increasing, unlike `version`.
    pub generation: u64,
    /// Where it came from.
    pub source: StateSource,
    /// Whether an update from the controller brought this proxy in sync since it
    /// started (stays true across later disconnects: the proxy keeps serving on it).
    pub synced: bool,
    /// The controller replica that sent the last applied update.
    pub controller_id: String,
    /// When the controller produced the last applied update.
    pub generated_at: Option<SystemTime>,
}

/// A state an update would produce, handed to the proxy's validator before it is
/// accepted.
#[derive(Clone, Debug)]
pub struct ProposedState {
    /// The complete resulting set of resources.
    pub resources: BTreeMap<String, Arc<Resource>>,
    /// Keys added, or whose version changed, relative to the held state.
    pub upserted: BTreeSet<String>,
    /// Keys held before and gone now.
    pub removed: BTreeSet<String>,
    /// The update's `version` (for a state from disk: the version it was ACKed at).
    pub version: u64,
    /// Whether the update was a full snapshot (a state from disk counts as one).
    pub is_full_snapshot: bool,
    /// [`StateSource::FromController`] for an update, [`StateSource::FromDisk`] when a
    /// persisted state is loaded at start (validated again: this build may be stricter
    /// than the one that wrote it).
    pub source: StateSource,
}

/// Why an update (or a persisted state) is refused: becomes the `Nack` sent back.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Rejection {
    /// Summary (`Nack.error`).
    pub error: String,
    /// Per-resource reasons, key → reason (`Nack.resource_errors`).
    pub resource_errors: BTreeMap<String, String>,
}

impl ConfigState {
    /// The state before anything was loaded or received.
    pub fn initial() -> Self {
        Self {
            resources: BTreeMap::new(),
            version: 0,
            generation: 0,
            source: StateSource::Initial,
            synced: false,
            controller_id: String::new(),
            generated_at: None,
        }
    }

    /// Whether the proxy may serve on this state: synced with the controller, or a
    /// last-known-good state was loaded from disk. Clears the "config" readiness
    /// blocker.
    pub fn is_ready(&self) -> bool {
        self.synced || self.source == StateSource::FromDisk
    }

    /// The resource with this key.
    pub fn get(&self, key: &str) -> Option<&Resource> {
        self.resources.get(key).map(|r| &**r)
    }

    /// Every resource of one kind, in key order.
    pub fn of_kind(&self, kind: ResourceKind) -> impl Iterator<Item = &Resource> {
        let prefix = format!("{kind}/");
        self.resources
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| &**r)
    }

    /// Key → version of everything held: what `Hello.resource_versions` carries.
    pub fn resource_versions(&self) -> BTreeMap<String, String> {
        self.resources
            .iter()
            .map(|(k, r)| (k.clone(), r.version.clone()))
            .collect()
    }
}

impl Default for ConfigState {
    fn default() -> Self {
        Self::initial()
    }
}

impl ProposedState {
    /// Whether the update changes anything.
    pub fn changes_anything(&self) -> bool {
        !self.upserted.is_empty() || !self.removed.is_empty()
    }
}

impl Rejection {
    /// A rejection with a summary only.
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            resource_errors: BTreeMap::new(),
        }
    }

    /// A rejection of one resource (the summary names it).
    pub fn resource(key: impl Into<String>, error: impl Into<String>) -> Self {
        Self::from_resource_errors(BTreeMap::from([(key.into(), error.into())]))
    }

    /// A rejection listing per-resource reasons, with a summary naming them.
    pub fn from_resource_errors(resource_errors: BTreeMap<String, String>) -> Self {
        let details: Vec<String> = resource_errors
            .iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        let error = match details.as_slice() {
            [one] => format!("rejected resource {one}"),
            many => format!("rejected {} resources: {}", many.len(), many.join("; ")),
        };
        Self {
            error,
            resource_errors,
        }
    }
}

/// The checks every proxy makes on every resource, whatever its validator does:
/// the kind is one this build knows (a newer controller's kind is refused, never
/// guessed at), the key is well-formed and is the one its content determines.
pub(crate) fn check_resource(resource: &Resource) -> Result<(), String> {
    let Some(kind) = &resource.kind else {
        return Err(
            "no resource kind this proxy knows (sent by a newer controller?); the whole update is refused"
                .to_owned(),
        );
    };
    let key = resource.parsed_key().map_err(|e| e.to_string())?;
    let derived = kind.key();
    if key != derived {
        return Err(format!(
            "key does not match the content, which is {derived}"
        ));
    }
    Ok(())
}

/// Applies `update` to a copy of `current`: a full snapshot replaces everything, a
/// delta upserts `resources` and deletes `removed`. Fails, listing every problem,
/// when a resource fails [`check_resource`], a key appears twice, or a key is both
/// upserted and removed.
pub(crate) fn propose(
    current: &ConfigState,
    update: ConfigUpdate,
) -> Result<ProposedState, Rejection> {
    let mut errors = BTreeMap::new();
    let mut incoming: BTreeMap<String, Arc<Resource>> = BTreeMap::new();
    for resource in update.resources {
        if let Err(e) = check_resource(&resource) {
            errors.insert(resource.key.clone(), e);
            continue;
        }
        if incoming.contains_key(&resource.key) {
            errors.insert(
                resource.key.clone(),
                "appears more than once in the update".to_owned(),
            );
            continue;
        }
        incoming.insert(resource.key.clone(), Arc::new(resource));
    }
    if !update.is_full_snapshot {
        for key in &update.removed {
            if incoming.contains_key(key) {
                errors.insert(
                    key.clone(),
                    "is both upserted and removed by the update".to_owned(),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Rejection::from_resource_errors(errors));
    }

    let differs = |key: &str, new: &Resource| {
        current
            .resources
            .get(key)
            .is_none_or(|old| old.version != new.version)
    };
    let (resources, upserted, removed) = if update.is_full_snapshot {
        // `removed` is empty in a snapshot (discovery.proto); anything not in
        // `resources` goes either way.
        let upserted = incoming
            .iter()
            .filter(|(k, r)| differs(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        let removed = current
            .resources
            .keys()
            .filter(|k| !incoming.contains_key(*k))
            .cloned()
            .collect();
        (incoming, upserted, removed)
    } else {
        let mut resources = current.resources.clone();
        let mut upserted = BTreeSet::new();
        let mut removed = BTreeSet::new();
        for key in update.removed {
            if resources.remove(&key).is_some() {
                removed.insert(key);
            }
        }
        for (key, resource) in incoming {
            if differs(&key, &resource) {
                upserted.insert(key.clone());
                resources.insert(key, resource);
            }
        }
        (resources, upserted, removed)
    };
    Ok(ProposedState {
        resources,
        upserted,
        removed,
        version: update.version,
        is_full_snapshot: update.is_full_snapshot,
        source: StateSource::FromController,
    })
}

#[cfg(test)]
mod tests {
    use ambit_api::config::v1::{Service, Workload, resource::Kind};

    use super::*;

    fn service(name: &str, vip: &str) -> Resource {
        Resource::new(Kind::Service(Service {
            namespace: "production".into(),
            name: name.into(),
            vips: vec![vip.into()],
            ..Default::default()
        }))
    }

    fn workload(uid: &str) -> Resource {
        Resource::new(Kind::Workload(Workload {
            uid: uid.into(),
            ..Default::default()
        }))
    }

    fn update(
        version: u64,
        full: bool,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> ConfigUpdate {
        ConfigUpdate {
            version,
            is_full_snapshot: full,
            resources,
            removed: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn held(resources: &ProposedState) -> ConfigState {
        ConfigState {
            resources: resources.resources.clone(),
            ..ConfigState::initial()
        }
    }

    #[test]
    fn snapshots_replace_and_deltas_upsert_and_remove() {
        let initial = ConfigState::initial();
        let p = propose(
            &initial,
            update(1, true, vec![service("a", "10.0.0.1"), workload("w1")], &[]),
        )
        .unwrap();
        assert_eq!(
            p.upserted.iter().collect::<Vec<_>>(),
            ["Service/production/a", "Workload/w1"]
        );
        let state = held(&p);

        // Delta: change a, add b, remove w1, remove something never held.
        let p = propose(
            &state,
            update(
                2,
                false,
                vec![service("a", "10.0.0.2"), service("b", "10.0.0.3")],
                &["Workload/w1", "Workload/never-held"],
            ),
        )
        .unwrap();
        assert_eq!(
            p.resources.keys().collect::<Vec<_>>(),
            ["Service/production/a", "Service/production/b"]
        );
        assert_eq!(p.removed.iter().collect::<Vec<_>>(), ["Workload/w1"]);
        assert_eq!(p.upserted.len(), 2);
        let state = held(&p);

        // Resending unchanged content changes nothing.
        let p = propose(
            &state,
            update(3, false, vec![service("b", "10.0.0.3")], &[]),
        )
        .unwrap();
        assert!(!p.changes_anything());

        // A snapshot drops what it does not list.
        let p = propose(&state, update(4, true, vec![service("b", "10.0.0.3")], &[])).unwrap();
        assert_eq!(
            p.removed.iter().collect::<Vec<_>>(),
            ["Service/production/a"]
        );
        assert!(p.upserted.is_empty());
        assert_eq!(p.resources.len(), 1);
        assert_eq!(
            held(&p).of_kind(ResourceKind::Service).count(),
            1,
            "of_kind finds the service"
        );
    }

    #[test]
    fn bad_resources_reject_the_whole_update_with_every_reason() {
        let state = ConfigState::initial();
        let unknown_kind = Resource {
            key: "Workload/from-the-future".into(),
            version: "1".into(),
            kind: None,
        };
        let mut wrong_key = service("a", "10.0.0.1");
        wrong_key.key = "Service/production/not-a".into();
        let mut malformed = workload("w");
        malformed.key = "Workload".into();
        let rej = propose(
            &state,
            update(
                1,
                false,
                vec![
                    unknown_kind,
                    wrong_key,
                    malformed,
                    workload("dup"),
                    workload("dup"),
                    workload("both"),
                    workload("fine"),
                ],
                &["Workload/both"],
            ),
        )
        .unwrap_err();
        let keys: Vec<_> = rej.resource_errors.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Service/production/not-a",
                "Workload",
                "Workload/both",
                "Workload/dup",
                "Workload/from-the-future"
            ]
        );
        assert!(
            rej.resource_errors["Workload/from-the-future"].contains("no resource kind"),
            "{rej:?}"
        );
        assert!(
            rej.error.starts_with("rejected 5 resources"),
            "{}",
            rej.error
        );
        assert!(
            rej.error
                .contains("Service/production/not-a: key does not match")
        );
    }

    #[test]
    fn rejection_summaries_name_the_resource() {
        let r = Rejection::resource("Service/a/b", "bad port");
        assert_eq!(r.error, "rejected resource Service/a/b: bad port");
        assert_eq!(r.to_string(), r.error);
        assert!(Rejection::new("nope").resource_errors.is_empty());
    }
}
