//! The CRD YAML committed under `deploy/charts/ambit-crds/templates` must be exactly
//! what the Rust types generate.
//!
//! Regenerate after changing a type:
//! `AMBIT_REGENERATE_CRDS=1 cargo test -p ambit-controller --test crds`
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{fs, path::PathBuf};

use ambit_controller::resources::crds::{CRD_DIR, crd_files, shipped_crds};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Marks the files this test owns in the directory (hand-written files are left alone).
const GENERATED_MARK: &str = "# Generated from the Rust types in controller/src/resources";

fn crd_dir() -> PathBuf {
    // controller/ is one level below the repository root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("controller/ has a parent")
        .join(CRD_DIR)
}

fn generated_on_disk() -> Vec<String> {
    let Ok(entries) = fs::read_dir(crd_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| fs::read_to_string(p).is_ok_and(|t| t.starts_with(GENERATED_MARK)))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn crds_are_up_to_date() {
    let files = crd_files().unwrap();
    let dir = crd_dir();
    if std::env::var_os("AMBIT_REGENERATE_CRDS").is_some() {
        fs::create_dir_all(&dir).unwrap();
        for stale in generated_on_disk() {
            if !files.iter().any(|f| f.file_name == stale) {
                fs::remove_file(dir.join(stale)).unwrap();
            }
        }
        for f in &files {
            fs::write(dir.join(&f.file_name), &f.yaml).unwrap();
        }
        return;
    }
    let hint =
        "regenerate with: AMBIT_REGENERATE_CRDS=1 cargo test -p ambit-controller --test crds";
    for f in &files {
        let path = dir.join(&f.file_name);
        let committed =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; {hint}", path.display()));
        assert!(
            committed == f.yaml,
            "{} differs from what the Rust types generate; {hint}",
            path.display()
        );
    }
    let mut expected: Vec<String> = files.iter().map(|f| f.file_name.clone()).collect();
    expected.sort();
    assert_eq!(
        generated_on_disk(),
        expected,
        "stale generated CRDs in {}; {hint}",
        dir.display()
    );
}

#[test]
fn shipped_crds_serve_every_istio_version_with_one_storage_version() {
    for crd in shipped_crds() {
        let name = crd.metadata.name.clone().unwrap();
        let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        let storage: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(storage.len(), 1, "{name}: storage versions {storage:?}");
        assert!(
            versions.contains(&"v1") && versions.contains(&"v1beta1"),
            "{name}: {versions:?}"
        );
        assert!(
            crd.spec.versions.iter().all(|v| v.served),
            "{name}: every version is served"
        );
        for v in &crd.spec.versions {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap();
            assert!(
                schema
                    .required
                    .as_ref()
                    .is_none_or(|r| !r.contains(&"spec".to_owned())),
                "{name}: Istio does not require spec"
            );
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{name}: status subresource"
            );
        }
    }
}

#[test]
fn committed_crds_parse_as_crds() {
    for f in crd_files().unwrap() {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&f.yaml).unwrap();
        assert_eq!(format!("{}.yaml", crd.metadata.name.unwrap()), f.file_name);
    }
}
