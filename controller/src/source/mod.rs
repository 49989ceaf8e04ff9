//! Where the controller's objects come from.
//!
//! Both sources — the Kubernetes API ([`kube`], kube-rs watchers) and a local directory
//! of YAML ([`local`], the embedded default) — speak the same small protocol to the
//! index: "everything that origin X holds is now this list of documents". A file is an
//! origin (a changed file replaces its documents, a removed file empties them); a
//! Kubernetes object is an origin of its own (`kubernetes:<apiVersion>/<kind>/<ns>/<name>`).
//! Validation happens in the index, so both sources get the same rejections.

use crate::resources::ParsedDocument;

pub mod kube;
pub mod local;

/// A stable label for where documents came from: a file path, or a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct OriginId(pub String);

impl std::fmt::Display for OriginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a source tells the index.
#[derive(Debug)]
pub enum SourceEvent {
    /// Everything `origin` holds is now `documents` (empty: the origin is gone).
    Replace {
        origin: OriginId,
        documents: Vec<ParsedDocument>,
    },
    /// The source has delivered its complete initial state; until every source has
    /// said so, the controller is not ready and pushes nothing (a partial first view
    /// could miss an ALLOW policy's peers or a DENY policy).
    Synced,
}
