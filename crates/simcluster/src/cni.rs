//! Calling the `ambit-cni` plugin as a kubelet's runtime would: chained after a
//! primary plugin (the cluster's own veth/bridge set-up plays that part), with the
//! `CNI_*` environment and the network configuration, `prevResult` included, on stdin.
//!
//! With the mesh data plane on, `up` calls ADD for each pod after its network exists
//! and before its workload starts; teardown calls DEL (best effort) before the pod's
//! network namespace goes. The plugin talks to the node daemon's enrolment socket.
//!
//! ```text
//! CNI_COMMAND=ADD CNI_CONTAINERID=<pod uid> CNI_NETNS=/run/netns/<pod netns> CNI_IFNAME=eth0
//! CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=<ns>;K8S_POD_NAME=<pod>;K8S_POD_INFRA_CONTAINER_ID=<id>;K8S_POD_UID=<uid>
//! stdin: {"cniVersion":"1.0.0","name":"ambit","type":"ambit-cni",
//!         "ambit":{"socket":"<node cni socket>","timeout":"30s"},
//!         "prevResult":{"cniVersion":"1.0.0","interfaces":[cni0, veth<n>, eth0 (sandbox)],
//!                       "ips":[{"address":"<pod ip>/<len>","gateway":"<gw>","interface":2}], …}}
//! ```

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    Error,
    addr::Ipv4Cidr,
    status::{PodInfo, Status},
};

/// The plugin's binary, looked up in the binaries directory.
pub const CNI_BINARY: &str = "ambit-cni";
/// The CNI specification version the cluster speaks.
pub const CNI_VERSION: &str = "1.0.0";
/// The network's name in the configuration.
pub const CNI_NETWORK: &str = "ambit";
/// The interface name in the pod.
pub const CNI_IFNAME: &str = "eth0";
/// How long the plugin waits for the daemon on ADD (the plugin's default, 30 s).
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the plugin waits for the daemon on DEL (teardown should not hang).
pub const DEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time granted to the plugin process beyond its own timeout before it is killed.
const PROCESS_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// A CNI command the cluster issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// The pod's network was created.
    Add,
    /// The pod's network is going away.
    Del,
}

/// A pod's attachment to the CNI plugin, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCni {
    /// `CNI_CONTAINERID` (the pod's uid: one sandbox per pod here).
    pub container_id: String,
    /// `K8S_POD_UID` (the uid in the generated Pod object).
    pub uid: String,
    /// The node daemon's enrolment socket the plugin was pointed at.
    pub socket: PathBuf,
    /// Whether ADD succeeded (the daemon answered `enrolled` or `not-meshed`).
    pub added: bool,
    /// What the plugin wrote to stderr on ADD (e.g. `not meshed: …`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Everything one plugin call is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniCall {
    /// ADD or DEL.
    pub command: CniCommand,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `CNI_CONTAINERID` and `K8S_POD_UID`.
    pub cni: PodCni,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// The pod's address and prefix.
    pub ip: Ipv4Addr,
    /// The pod prefix the address belongs to.
    pub pod_cidr: Ipv4Cidr,
    /// The pod's default gateway.
    pub gateway: Ipv4Addr,
    /// The node-side end of the pod's veth pair.
    pub host_veth: String,
    /// The node bridge.
    pub bridge: String,
    /// How long the plugin waits for the daemon.
    pub timeout: Duration,
}

/// What a successful call printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniOutput {
    /// stdout (the result for ADD, empty for DEL).
    pub stdout: String,
    /// stderr, one note a line.
    pub notes: Vec<String>,
}

impl CniCommand {
    /// `ADD` or `DEL`, as in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
        }
    }
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CniCall {
    /// The `CNI_*` environment (and nothing else: a runtime passes a minimal one).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", self.command.as_str().to_owned()),
            ("CNI_CONTAINERID", self.cni.container_id.clone()),
            ("CNI_NETNS", self.netns.to_string_lossy().into_owned()),
            ("CNI_IFNAME", CNI_IFNAME.to_owned()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    self.namespace, self.name, self.cni.container_id, self.cni.uid
                ),
            ),
            ("CNI_PATH", String::new()),
        ]
    }

    /// What the primary (bridge) plugin would have returned for the pod.
    pub fn prev_result(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": CNI_VERSION,
            "interfaces": [
                { "name": self.bridge },
                { "name": self.host_veth },
                { "name": CNI_IFNAME, "sandbox": self.netns },
            ],
            "ips": [{
                "address": self.pod_cidr.with_host(self.ip),
                "gateway": self.gateway.to_string(),
                "interface": 2,
            }],
            "routes": [{ "dst": "0.0.0.0/0", "gw": self.gateway.to_string() }],
            "dns": {},
        })
    }

    /// The network configuration on stdin.
    pub fn stdin(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": CNI_NETWORK,
            "type": CNI_BINARY,
            "ambit": {
                "socket": self.cni.socket,
                "timeout": format!("{}ms", self.timeout.as_millis()),
            },
            "prevResult": self.prev_result(),
        })
    }

    /// Runs the plugin with `cmd` (the plugin's program, possibly set up to enter a
    /// namespace; its environment is replaced). A non-zero exit is
    /// [`Error::CniFailed`] with the plugin's error JSON.
    pub fn run(&self, mut cmd: Command, cluster: &str) -> Result<CniOutput, Error> {
        let what = format!(
            "CNI {} of pod {}/{}",
            self.command, self.namespace, self.name
        );
        cmd.env_clear()
            .envs(self.env())
            .env(crate::CLUSTER_ENV, cluster)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            what: what.clone(),
            source,
        })?;
        let io = |op| {
            let what = what.clone();
            move |source| Error::Io {
                op,
                path: PathBuf::from(what),
                source,
            }
        };
        let mut input = self.stdin().to_string();
        input.push('\n');
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(io("writing the configuration for"))?;
        }
        // The plugin bounds its own wait for the daemon; this only guards against a
        // plugin that hangs anyway. Its output is a few lines, well below a pipe's size.
        let deadline = Instant::now() + self.timeout + PROCESS_GRACE;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for"))? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::CniFailed {
                    what,
                    status: format!("still running after {:?}, killed", self.timeout),
                    stdout: String::new(),
                    stderr: String::new(),
                });
            }
            std::thread::sleep(POLL);
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            out.read_to_string(&mut stdout)
                .map_err(io("reading the output of"))?;
        }
        if let Some(mut err) = child.stderr.take() {
            err.read_to_string(&mut stderr)
                .map_err(io("reading the output of"))?;
        }
        if !status.success() {
            return Err(Error::CniFailed {
                what,
                status: status.to_string(),
                stdout: stdout.trim().to_owned(),
                stderr: stderr.trim().to_owned(),
            });
        }
        Ok(CniOutput {
            stdout,
            notes: stderr
                .lines()
                .map(|l| l.strip_prefix("ambit-cni: ").unwrap_or(l).to_owned())
                .filter(|l| !l.is_empty())
                .collect(),
        })
    }
}

/// The plugin in the binaries directory, if it exists.
pub(crate) fn plugin_path(binaries_dir: Option<&Path>) -> Option<PathBuf> {
    binaries_dir
        .map(|d| d.join(CNI_BINARY))
        .filter(|p| p.is_file())
}

/// The call for `pod` (which must have its [`PodCni`] recorded) in the cluster `st`.
pub(crate) fn call_for(
    st: &Status,
    pod: &PodInfo,
    command: CniCommand,
    timeout: Duration,
) -> Option<CniCall> {
    let node = st.node(&pod.node)?;
    Some(CniCall {
        command,
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        cni: pod.cni.clone()?,
        netns: pod.netns_path(),
        ip: pod.ip,
        pod_cidr: node.pod_cidr,
        gateway: pod.gateway,
        host_veth: format!(
            "veth{}",
            crate::cluster::host_number(&node.pod_cidr, pod.ip)
        ),
        bridge: node.bridge.clone(),
        timeout,
    })
}

/// CNI DEL for every pod of `st` that was handed to the plugin, concurrently and best
/// effort (failures are logged): the daemons must still run, so this comes before
/// anything is killed. The plugin runs in the caller's namespaces: it only talks to
/// the daemon's Unix socket, and the pod's namespace is named by path.
pub(crate) fn del_all(st: &Status) {
    let Some(plugin) = plugin_path(st.binaries_dir.as_deref()) else {
        return;
    };
    let calls: Vec<CniCall> = st
        .pods
        .iter()
        .filter_map(|pod| call_for(st, pod, CniCommand::Del, DEL_TIMEOUT))
        .collect();
    std::thread::scope(|s| {
        for call in &calls {
            let plugin = &plugin;
            s.spawn(move || {
                if let Err(e) = call.run(Command::new(plugin), st.name.as_str()) {
                    tracing::warn!(
                        cluster = %st.name,
                        pod = %format!("{}/{}", call.namespace, call.name),
                        error = %crate::error_chain(&e),
                        "CNI DEL failed (ignored)"
                    );
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(command: CniCommand, socket: &Path) -> CniCall {
        CniCall {
            command,
            namespace: "production".to_owned(),
            name: "checkout-0".to_owned(),
            cni: PodCni {
                container_id: "0a1b2c3d-0000-1111-2222-333344445555".to_owned(),
                uid: "0a1b2c3d-0000-1111-2222-333344445555".to_owned(),
                socket: socket.to_owned(),
                added: false,
                notes: Vec::new(),
            },
            netns: PathBuf::from("/run/netns/ambit-t.production.checkout-0"),
            ip: Ipv4Addr::new(10, 244, 1, 2),
            pod_cidr: "10.244.1.0/24".parse().unwrap_or_else(|_| unreachable!()),
            gateway: Ipv4Addr::new(10, 244, 1, 1),
            host_veth: "veth2".to_owned(),
            bridge: "cni0".to_owned(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_environment_is_a_kubelet_s() {
        let env: std::collections::BTreeMap<_, _> = call(CniCommand::Add, Path::new("/s"))
            .env()
            .into_iter()
            .collect();
        assert_eq!(env["CNI_COMMAND"], "ADD");
        assert_eq!(
            env["CNI_CONTAINERID"],
            "0a1b2c3d-0000-1111-2222-333344445555"
        );
        assert_eq!(env["CNI_NETNS"], "/run/netns/ambit-t.production.checkout-0");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        let args = &env["CNI_ARGS"];
        for part in [
            "K8S_POD_NAMESPACE=production",
            "K8S_POD_NAME=checkout-0",
            "K8S_POD_UID=0a1b2c3d-0000-1111-2222-333344445555",
        ] {
            assert!(args.split(';').any(|p| p == part), "{args}");
        }
        let env: std::collections::BTreeMap<_, _> = call(CniCommand::Del, Path::new("/s"))
            .env()
            .into_iter()
            .collect();
        assert_eq!(env["CNI_COMMAND"], "DEL");
    }

    #[test]
    fn the_configuration_chains_after_a_bridge_result() {
        let conf = call(CniCommand::Add, Path::new("/run/x/cni.sock")).stdin();
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["type"], "ambit-cni");
        assert_eq!(conf["ambit"]["socket"], "/run/x/cni.sock");
        assert_eq!(conf["ambit"]["timeout"], "5000ms");
        let prev = &conf["prevResult"];
        assert_eq!(prev["ips"][0]["address"], "10.244.1.2/24");
        assert_eq!(prev["ips"][0]["gateway"], "10.244.1.1");
        let iface = prev["ips"][0]["interface"].as_u64().unwrap_or(99);
        let iface = &prev["interfaces"][usize::try_from(iface).unwrap_or(99)];
        assert_eq!(iface["name"], "eth0");
        assert_eq!(iface["sandbox"], "/run/netns/ambit-t.production.checkout-0");
    }
}
