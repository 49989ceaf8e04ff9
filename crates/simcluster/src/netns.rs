//! Named network namespaces (`ip netns`), the handles under `/run/netns`.

use std::path::PathBuf;

use crate::{
    Error,
    cmd::{ip, run},
};

/// Where `ip netns add` keeps the namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of the handle of the namespace `name`.
pub(crate) fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Creates the namespace with its loopback interface up.
pub(crate) fn add(name: &str) -> Result<(), Error> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Removes the namespace handle (the namespace itself, with its interfaces, goes once
/// no process is left in it). A missing namespace is not an error.
pub(crate) fn delete(name: &str) -> Result<(), Error> {
    if !path(name).exists() {
        return Ok(());
    }
    match ip(&["netns", "delete", name]) {
        // Someone else (a concurrent teardown) removed it meanwhile.
        Err(_) if !path(name).exists() => Ok(()),
        other => other.map(drop),
    }
}

/// Names of all named namespaces.
pub(crate) fn list() -> Result<Vec<String>, Error> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                op: "listing",
                path: NETNS_DIR.into(),
                source,
            });
        }
    };
    let mut names: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Processes with the namespace as their network namespace.
pub(crate) fn pids(name: &str) -> Result<Vec<i32>, Error> {
    if !path(name).exists() {
        return Ok(Vec::new());
    }
    match ip(&["netns", "pids", name]) {
        Ok(out) => Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()),
        Err(_) if !path(name).exists() => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Sets a sysctl inside the namespace (per-namespace keys such as
/// `net.ipv4.ip_forward`).
pub(crate) fn sysctl(name: &str, key: &str, value: &str) -> Result<(), Error> {
    let setting = format!("{key}={value}");
    run(
        "ip",
        &["netns", "exec", name, "sysctl", "-q", "-w", &setting],
    )
    .map(drop)
}
