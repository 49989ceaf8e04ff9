//! Peer authentication (Istio `PeerAuthentication`): whether a workload accepts
//! plaintext, and its resolution.
//!
//! Precedence: workload (selector) > namespace (no selector) > mesh (no selector, in the
//! root namespace) > the default, PERMISSIVE. A level whose mode is UNSET inherits the
//! level above. A workload policy's `portLevelMtls` entry overrides the workload's mode
//! for that (target) port; an UNSET entry inherits. When several policies compete at the
//! same level, the oldest wins (then the lexically first name), as in Istio.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{
    Enforcement, NamespaceName, ObjectId, PortNumber, WorkloadRef, WorkloadSelector,
};

/// Effective mTLS mode of a workload port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are accepted; plaintext is refused.
    Strict,
    /// Both mTLS and plaintext are accepted.
    Permissive,
    /// mTLS is not required (Ambit still accepts HBONE; plaintext is accepted).
    Disable,
}

/// Which workloads a peer authentication policy covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerAuthnScope {
    /// The whole mesh (root namespace, no selector).
    Mesh,
    /// One namespace (no selector, or an empty one).
    Namespace(NamespaceName),
    /// Workloads of one namespace matching a non-empty selector.
    Workloads {
        /// The policy's namespace.
        namespace: NamespaceName,
        /// The label selector.
        selector: WorkloadSelector,
    },
}

/// One peer authentication policy of the internal model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthn {
    /// The object it came from.
    pub id: ObjectId,
    /// What it covers.
    pub scope: PeerAuthnScope,
    /// Its mode; `None` is UNSET (inherit).
    pub mode: Option<MtlsMode>,
    /// Per target port overrides (workload policies only); `None` is UNSET.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_modes: BTreeMap<PortNumber, Option<MtlsMode>>,
    /// As written, or a fail-closed (STRICT) stand-in for a rejected policy.
    pub enforcement: Enforcement,
}

impl PeerAuthn {
    fn level(&self, workload: &WorkloadRef) -> Option<u8> {
        match &self.scope {
            PeerAuthnScope::Mesh => Some(0),
            PeerAuthnScope::Namespace(ns) => (*ns == workload.namespace).then_some(1),
            PeerAuthnScope::Workloads {
                namespace,
                selector,
            } => (*namespace == workload.namespace && selector.matches(&workload.labels))
                .then_some(2),
        }
    }
}

/// The mode a workload's port enforces, given every peer authentication policy in the
/// mesh (those that do not cover the workload are skipped).
pub fn effective_mtls_mode<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthn>,
    workload: &WorkloadRef,
    port: u16,
) -> MtlsMode {
    // The winning (oldest) policy per level: mesh, namespace, workload.
    let mut winners: [Option<&PeerAuthn>; 3] = [None, None, None];
    for p in policies {
        if let Some(level) = p.level(workload) {
            let slot = &mut winners[usize::from(level)];
            if slot.is_none_or(|w| p.id.precedence_key() < w.id.precedence_key()) {
                *slot = Some(p);
            }
        }
    }
    let mut mode = MtlsMode::Permissive;
    for p in winners.iter().flatten() {
        if let Some(m) = p.mode {
            mode = m;
        }
    }
    if let Some(w) = winners[2]
        && let Some(Some(m)) = w
            .port_modes
            .iter()
            .find(|(p, _)| p.get() == port)
            .map(|(_, m)| m)
    {
        mode = *m;
    }
    mode
}
