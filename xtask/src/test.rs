//! `cargo xtask test`: the one command CI runs.
//!
//! Set-up first (idempotent), then the same gates a reviewer would apply: formatting,
//! clippy with warnings denied, the workspace binaries (the end-to-end tests start
//! them inside the simulated cluster), and every test.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{setup, workspace_root};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy (for quick local iterations).
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments for `cargo test` (e.g. `-- --test-threads 1` or a test name).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    setup::run(&setup::SetupArgs::default())?;

    if !args.no_lint {
        cargo("formatting", &["fmt", "--all", "--", "--check"])?;
        cargo(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )?;
    }
    cargo("building the binaries", &["build", "--workspace", "--bins"])?;
    // Test clusters left behind by a run that was killed would only waste memory;
    // their names carry the test prefix, so a user's own cluster is never touched.
    ambit_simcluster::down_stale_test_clusters()
        .context("removing leftovers of earlier test runs")?;
    let mut test_args = vec!["test", "--workspace", "--no-fail-fast"];
    test_args.extend(args.cargo_test_args.iter().map(String::as_str));
    cargo("tests", &test_args)
}

/// Runs `cargo ARGS` in the workspace root, echoing what runs and failing with `what`.
pub(crate) fn cargo(what: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("▶ {what}: cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(workspace_root());
    if std::env::var_os("CI").is_some() {
        // CI builds once from a clean clone: incremental caches would only cost time
        // and several GB of disk.
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!(
            "{what} failed (cargo {} exited with {status})",
            args.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The dependency direction of DESIGN §1, checked against `cargo metadata`.

    use std::collections::BTreeMap;

    use super::*;

    const BINARIES: &[&str] = &[
        "ambit-node",
        "ambit-waypoint",
        "ambit-controller",
        "ambitctl",
    ];
    const MAY_USE_KUBE: &[&str] = &["ambit-controller", "ambitctl"];

    /// package name → (manifest path, names of its normal and build dependencies).
    fn workspace_deps() -> BTreeMap<String, (String, Vec<String>)> {
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(workspace_root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let deps = p["dependencies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["kind"].as_str() != Some("dev"))
                    .map(|d| d["name"].as_str().unwrap().to_owned())
                    .collect();
                (
                    p["name"].as_str().unwrap().to_owned(),
                    (p["manifest_path"].as_str().unwrap().to_owned(), deps),
                )
            })
            .collect()
    }

    #[test]
    fn shared_crates_never_depend_on_binaries() {
        let pkgs = workspace_deps();
        let shared: Vec<_> = pkgs
            .iter()
            .filter(|(_, (manifest, _))| manifest.contains("/crates/"))
            .collect();
        assert!(!shared.is_empty(), "no crates under crates/ found");
        for (name, (_, deps)) in shared {
            for bin in BINARIES {
                assert!(
                    !deps.iter().any(|d| d == bin),
                    "{name} (crates/) depends on binary {bin}"
                );
            }
        }
    }

    #[test]
    fn only_the_controller_and_cli_talk_to_kubernetes() {
        for (name, (_, deps)) in workspace_deps() {
            if MAY_USE_KUBE.contains(&name.as_str()) {
                continue;
            }
            for kube in ["kube", "kube-runtime", "kube-client", "k8s-openapi"] {
                assert!(!deps.iter().any(|d| d == kube), "{name} depends on {kube}");
            }
        }
    }

    #[test]
    fn every_crate_uses_the_workspace_lints() {
        for (name, (manifest, _)) in workspace_deps() {
            let text = std::fs::read_to_string(&manifest).unwrap();
            assert!(
                text.contains("[lints]\nworkspace = true"),
                "{name} ({manifest}) does not inherit [workspace.lints]"
            );
            assert!(
                text.contains("rust-version.workspace = true"),
                "{name} ({manifest}) does not inherit rust-version"
            );
        }
    }
}
