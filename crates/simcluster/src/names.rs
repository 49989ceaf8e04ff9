//! Names: the cluster's own name, pod references, and how every kernel object the
//! cluster creates is named after them (see the crate docs for the scheme).

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicU32, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Prefix of every network namespace and cgroup root the simulated cluster creates.
pub const RESOURCE_PREFIX: &str = "ambit-";
/// Name of the cluster `cargo xtask cluster` manages when `--name` is not given.
pub const DEFAULT_CLUSTER_NAME: &str = "ambit";
/// Prefix of cluster names made by [`ClusterName::unique_for_test`];
/// [`crate::down_stale_test_clusters`] only ever touches clusters named like this.
pub const TEST_NAME_PREFIX: &str = "test-";
/// Longest cluster name accepted (keeps netns names and paths short).
pub const MAX_CLUSTER_NAME_LEN: usize = 24;

/// Node names that would collide with the cluster's own namespaces.
pub(crate) const RESERVED_NODE_NAMES: &[&str] = &["underlay", "control"];

/// A validated cluster name: 1–24 characters of `[a-z0-9-]`, starting and ending
/// with a letter or digit, without `--`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name.len() > MAX_CLUSTER_NAME_LEN {
            return Err(invalid("longer than 24 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "only lowercase letters, digits and '-' are allowed",
            ));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(invalid("must start and end with a letter or digit"));
        }
        if name.contains("--") {
            return Err(invalid("must not contain \"--\""));
        }
        Ok(Self(name.to_owned()))
    }

    /// A fresh name for a test cluster, unique within this process and across
    /// concurrently running test processes: `test-<pid hex>-<counter hex>`. The pid
    /// lets [`crate::down_stale_test_clusters`] tell a running test's cluster from a
    /// killed one's even when the state file is unreadable.
    pub fn unique_for_test() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // pid_max is at most 2^22, so the name stays far below the length limit.
        Self(format!("{TEST_NAME_PREFIX}{:x}-{n:x}", std::process::id()))
    }

    /// The pid in a [`ClusterName::unique_for_test`] name.
    pub(crate) fn test_pid(&self) -> Option<u32> {
        let (pid, _) = self.0.strip_prefix(TEST_NAME_PREFIX)?.split_once('-')?;
        u32::from_str_radix(pid, 16).ok()
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a test cluster's name (see [`TEST_NAME_PREFIX`]).
    pub fn is_test(&self) -> bool {
        self.0.starts_with(TEST_NAME_PREFIX)
    }

    /// Prefix shared by all of this cluster's network namespaces: `ambit-<name>.`.
    ///
    /// The dot cannot occur in a cluster name, so the prefix of cluster `a` never
    /// matches a namespace of cluster `a-b`.
    pub fn netns_prefix(&self) -> String {
        format!("{RESOURCE_PREFIX}{}.", self.0)
    }

    /// Name of the cgroup directory under the cgroup2 mount: `ambit-<name>`.
    pub fn cgroup_dir_name(&self) -> String {
        format!("{RESOURCE_PREFIX}{}", self.0)
    }

    pub(crate) fn underlay_netns(&self) -> String {
        format!("{}underlay", self.netns_prefix())
    }

    pub(crate) fn control_netns(&self) -> String {
        format!("{}control", self.netns_prefix())
    }

    pub(crate) fn node_netns(&self, node: &str) -> String {
        format!("{}{node}", self.netns_prefix())
    }

    pub(crate) fn pod_netns(&self, pod: &PodRef) -> String {
        format!("{}{}.{}", self.netns_prefix(), pod.namespace, pod.name)
    }

    /// The cluster a network namespace name belongs to, if it is one of ours.
    pub(crate) fn from_netns(netns: &str) -> Option<Self> {
        let rest = netns.strip_prefix(RESOURCE_PREFIX)?;
        let (name, tail) = rest.split_once('.')?;
        if tail.is_empty() {
            return None;
        }
        Self::new(name).ok()
    }

    /// The cluster a cgroup directory name belongs to, if it is named like ours.
    pub(crate) fn from_cgroup_dir(dir: &str) -> Option<Self> {
        Self::new(dir.strip_prefix(RESOURCE_PREFIX)?).ok()
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> Self {
        n.0
    }
}

/// A pod, named `NAMESPACE/POD` as on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PodRef {
    /// The pod's Kubernetes namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
}

impl PodRef {
    /// The pod `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// File-name-safe form, `<namespace>_<pod>` (Kubernetes names never contain `_`).
    pub(crate) fn file_stem(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(Error::InvalidPodRef(s.to_owned())),
        }
    }
}

impl TryFrom<String> for PodRef {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PodRef> for String {
    fn from(p: PodRef) -> Self {
        p.to_string()
    }
}

/// Checks a Kubernetes DNS label (RFC 1123): 1–63 of `[a-z0-9-]`, alphanumeric at both
/// ends. Returns why not.
pub(crate) fn check_dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > 63 {
        return Err("must be at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must consist of lowercase letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks a process name given to `spawn_*`: used in cgroup and log file names.
pub(crate) fn check_process_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1-63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || s.starts_with('.')
    {
        return Err("must consist of letters, digits, '-', '_' and '.', not starting with '.'");
    }
    if s == "exec" {
        return Err("\"exec\" is reserved for short-lived commands");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for good in ["ambit", "a", "e2e-1f2a0", "x1-2-3"] {
            ClusterName::new(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a--b",
            "abcdefghijklmnopqrstuvwxyz",
        ] {
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
        let t = ClusterName::unique_for_test();
        assert!(t.is_test());
        assert_eq!(t.test_pid(), Some(std::process::id()));
        assert_eq!(ClusterName::new("test-zz").unwrap().test_pid(), None);
        assert_ne!(
            ClusterName::unique_for_test(),
            ClusterName::unique_for_test()
        );
    }

    #[test]
    fn netns_names_round_trip_and_never_match_a_longer_cluster() {
        let a = ClusterName::new("a").unwrap();
        let ab = ClusterName::new("a-b").unwrap();
        let pod = PodRef::new("production", "checkout-0");
        assert_eq!(a.node_netns("node-1"), "ambit-a.node-1");
        assert_eq!(a.pod_netns(&pod), "ambit-a.production.checkout-0");
        assert_eq!(ClusterName::from_netns(&a.pod_netns(&pod)), Some(a.clone()));
        assert_eq!(
            ClusterName::from_netns(&ab.underlay_netns()),
            Some(ab.clone())
        );
        assert!(!ab.underlay_netns().starts_with(&a.netns_prefix()));
        assert_eq!(ClusterName::from_netns("ambit-test"), None);
        assert_eq!(ClusterName::from_netns("other.x"), None);
    }

    #[test]
    fn pod_refs() {
        let p: PodRef = "production/checkout-0".parse().unwrap();
        assert_eq!(p, PodRef::new("production", "checkout-0"));
        assert_eq!(p.to_string(), "production/checkout-0");
        for bad in ["checkout-0", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<PodRef>().is_err(), "{bad}");
        }
    }
}
