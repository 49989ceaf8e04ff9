//! The CustomResourceDefinitions Ambit ships for clusters without Istio, generated from
//! the Rust types of this module's parent.
//!
//! Only the Istio kinds are shipped (Gateway API CRDs come from the upstream Gateway
//! API release). Each CRD serves every version Istio serves, with one schema; the
//! storage version is Istio's (`v1beta1` for security, `v1alpha3` for networking), so
//! installing Istio's own CRDs over Ambit's later needs no storage migration.
//!
//! The YAML is committed under [`CRD_DIR`]; `controller/tests/crds.rs` fails when
//! regenerating would change it. To regenerate:
//! `AMBIT_REGENERATE_CRDS=1 cargo test -p ambit-controller --test crds`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, ResourceKind, VirtualService,
};

/// Where the generated CRDs live, relative to the repository root.
pub const CRD_DIR: &str = "deploy/charts/ambit-crds/templates";

/// Failure to render a CRD.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// serde_yaml could not serialize it.
    #[error("rendering the {name} CRD as YAML")]
    Render {
        /// The CRD's name.
        name: String,
        /// The serializer's error.
        #[source]
        source: serde_yaml::Error,
    },
}

/// One generated file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdFile {
    /// File name inside [`CRD_DIR`], `<plural>.<group>.yaml`.
    pub file_name: String,
    /// Its full content.
    pub yaml: String,
}

fn storage_version(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::VirtualService | ResourceKind::DestinationRule => "v1alpha3",
        _ => "v1beta1",
    }
}

/// Expands a single-version CRD into one serving every version of `kind`.
fn all_versions(mut crd: CustomResourceDefinition, kind: ResourceKind) -> CustomResourceDefinition {
    let storage = storage_version(kind);
    if let Some(mut base) = crd.spec.versions.first().cloned() {
        // Istio does not require `spec` (an absent spec means `spec: {}`).
        if let Some(schema) = base
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            && let Some(required) = schema.required.as_mut()
        {
            required.retain(|r| r != "spec");
            if required.is_empty() {
                schema.required = None;
            }
        }
        crd.spec.versions = kind
            .versions()
            .iter()
            .rev()
            .map(|v| {
                let mut version = base.clone();
                version.name = (*v).to_owned();
                version.served = true;
                version.storage = *v == storage;
                version
            })
            .collect();
    }
    crd
}

/// The CRDs Ambit ships, one per Istio kind, every version served.
pub fn shipped_crds() -> Vec<CustomResourceDefinition> {
    vec![
        all_versions(
            AuthorizationPolicy::crd(),
            ResourceKind::AuthorizationPolicy,
        ),
        all_versions(PeerAuthentication::crd(), ResourceKind::PeerAuthentication),
        all_versions(DestinationRule::crd(), ResourceKind::DestinationRule),
        all_versions(VirtualService::crd(), ResourceKind::VirtualService),
    ]
}

const HEADER: &str = "\
# Generated from the Rust types in controller/src/resources; do not edit.
# Regenerate: AMBIT_REGENERATE_CRDS=1 cargo test -p ambit-controller --test crds
";

/// The files to commit under [`CRD_DIR`].
pub fn crd_files() -> Result<Vec<CrdFile>, CrdError> {
    shipped_crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body = serde_yaml::to_string(&crd).map_err(|source| CrdError::Render {
                name: name.clone(),
                source,
            })?;
            Ok(CrdFile {
                file_name: format!("{name}.yaml"),
                yaml: format!("{HEADER}{body}"),
            })
        })
        .collect()
}
