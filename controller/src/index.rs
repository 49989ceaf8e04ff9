//! The index: consumes [`SourceEvent`]s from every source, validates what they send,
//! and publishes a new immutable [`World`] after each change.
//!
//! Validation happens here, once per document received, so every source gets the same
//! rejections. Bursts are coalesced: after an event, every event already queued is
//! applied before one new generation is built and published. A `Replace` that changes
//! nothing publishes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ambit_identity::TrustDomain;
use tokio::sync::{mpsc, watch};

use crate::{
    source::{OriginId, SourceEvent},
    validate::{ValidationContext, validate_document},
    view::ConfigView as _,
    world::{Document, World, WorldSettings},
};

/// What the index needs to know.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Validation settings (root namespace).
    pub validation: ValidationContext,
    /// Trust domain of every identity.
    pub trust_domain: TrustDomain,
    /// Roots of the trust bundle pushed to the proxies, PEM, one per entry.
    pub trust_bundle_pem: Vec<String>,
    /// Number of sources that must report `Synced` before [`World::synced`] is true.
    pub sources: usize,
}

/// The index's state between generations.
#[derive(Debug)]
struct Index {
    config: IndexConfig,
    settings: WorldSettings,
    origins: BTreeMap<OriginId, Vec<Arc<Document>>>,
    synced_sources: usize,
    generation: u64,
}

impl Index {
    fn new(config: IndexConfig) -> Self {
        let settings = WorldSettings {
            trust_domain: config.trust_domain.clone(),
            trust_bundle_pem: config.trust_bundle_pem.clone(),
        };
        Self {
            config,
            settings,
            origins: BTreeMap::new(),
            synced_sources: 0,
            generation: 0,
        }
    }

    fn synced(&self) -> bool {
        self.synced_sources >= self.config.sources
    }

    /// Applies one event; whether anything changed.
    fn apply(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Synced => {
                let was = self.synced();
                self.synced_sources += 1;
                was != self.synced()
            }
            SourceEvent::Replace { origin, documents } => {
                let docs: Vec<Arc<Document>> = documents
                    .into_iter()
                    .map(|parsed| {
                        let validated = validate_document(&parsed, &self.config.validation);
                        for r in validated.rejections() {
                            tracing::warn!(%origin, "rejected: {r}");
                        }
                        Arc::new(Document {
                            origin: origin.clone(),
                            parsed,
                            validated,
                        })
                    })
                    .collect();
                let previous = if docs.is_empty() {
                    self.origins.remove(&origin)
                } else {
                    self.origins.insert(origin, docs.clone())
                };
                previous.unwrap_or_default() != docs
            }
        }
    }

    fn build(&mut self) -> World {
        self.generation += 1;
        let documents = self.origins.values().flatten().cloned().collect();
        World::build(self.generation, self.synced(), &self.settings, documents)
    }
}

/// Spawns the index task on the current tokio runtime: it consumes `events` and
/// publishes a new `Arc<World>` after each change (bursts coalesced). The first value
/// is an empty, unsynced world (generation 0). The task ends when every event sender
/// is dropped, or when every receiver of the returned channel is.
///
/// # Panics
///
/// When called outside a tokio runtime.
pub fn spawn_index(
    config: IndexConfig,
    mut events: mpsc::Receiver<SourceEvent>,
) -> watch::Receiver<Arc<World>> {
    let mut index = Index::new(config);
    let (tx, rx) = watch::channel(Arc::new(World::empty(&index.settings)));
    tokio::spawn(async move {
        // Cross-object findings already logged (each is logged when it appears).
        let mut logged: BTreeSet<(String, String)> = BTreeSet::new();
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                () = tx.closed() => None,
            };
            let Some(event) = event else { break };
            let mut changed = index.apply(event);
            while let Ok(event) = events.try_recv() {
                changed |= index.apply(event);
            }
            if !changed {
                continue;
            }
            let world = index.build();
            tracing::debug!(
                generation = world.generation(),
                synced = world.synced(),
                "config generation built"
            );
            let notes: BTreeSet<(String, String)> = world
                .notes()
                .flat_map(|(k, v)| v.iter().map(move |n| (k.to_string(), n.clone())))
                .collect();
            for (object, note) in notes.difference(&logged) {
                tracing::warn!(%object, "{note}");
            }
            logged = notes;
            tx.send_replace(Arc::new(world));
        }
    });
    rx
}
