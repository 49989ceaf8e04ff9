//! The plugin's behaviour, per CNI command, as a function of its environment and
//! stdin, so that it can be tested without a process.
//!
//! # Decisions
//!
//! - **ADD fails closed.** It returns only once the daemon answered `enrolled` or
//!   `not-meshed`; an unreachable or silent daemon, or an `error` answer, fails ADD, so
//!   the runtime does not start the pod uncaptured (and retries the sandbox later).
//!   Whether a pod is meshed is the daemon's decision.
//! - **DEL is best-effort.** It succeeds whatever the daemon says or whether it is
//!   reachable at all (the problem goes to stderr): a failing DEL makes the runtime
//!   retry it forever and keeps the pod from terminating, while the daemon removes
//!   what is left of pods that are gone when it reconciles with the pods the controller
//!   reports for its node. DEL still fails on an invalid configuration or environment.
//! - **CHECK** succeeds when the daemon answers `enrolled` or `not-meshed`, and fails
//!   otherwise (including when the daemon is unreachable: capture cannot be verified).
//! - A container without `K8S_POD_NAMESPACE` and `K8S_POD_NAME` in `CNI_ARGS` is not a
//!   Kubernetes pod and cannot carry the mesh labels: every command passes it through.

use crate::{
    client::{Client, ClientError},
    cni::{CniCommand, CniEnv, CniError, ErrorCode, NetConf, SPEC_VERSION, SUPPORTED_VERSIONS},
    protocol::{Command, PodEnrollment, PodRemoval, Response, Status},
};

/// What the process prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginOutput {
    /// For stdout: the result (ADD, VERSION), an error result, or nothing.
    pub stdout: String,
    /// Whether the command succeeded (exit 0) or not (exit 1).
    pub success: bool,
    /// For stderr, one line each: what the runtime's logs should show.
    pub notes: Vec<String>,
}

/// Runs the command the environment names on the configuration in `stdin`.
pub fn run(env: &CniEnv, stdin: &[u8]) -> PluginOutput {
    let mut notes = Vec::new();
    let result = env.command().and_then(|command| match command {
        CniCommand::Version => Ok(version()),
        command => {
            let conf = NetConf::parse(stdin)?;
            let outcome = match command {
                CniCommand::Add => add(env, &conf, &mut notes),
                CniCommand::Del => del(env, &conf, &mut notes),
                CniCommand::Check => check(env, &conf, &mut notes),
                CniCommand::Version => Ok(version()),
            };
            outcome.map_err(|e| CniError {
                cni_version: conf.cni_version.clone(),
                ..e
            })
        }
    });
    match result {
        Ok(stdout) => PluginOutput {
            stdout,
            success: true,
            notes,
        },
        Err(error) => {
            notes.push(error.to_string());
            PluginOutput {
                stdout: error.to_json(),
                success: false,
                notes,
            }
        }
    }
}

/// The VERSION result.
fn version() -> String {
    let mut line = serde_json::json!({
        "cniVersion": SPEC_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string();
    line.push('\n');
    line
}

fn add(env: &CniEnv, conf: &NetConf, notes: &mut Vec<String>) -> Result<String, CniError> {
    let container_id = env.container_id()?;
    let netns = env.netns()?;
    env.ifname()?;
    let args = env.args()?;
    let Some(result) = conf.result_json() else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!(
                "no prevResult: {} must be chained after the plugin that sets up the pod's \
                 network (list it after that plugin in the network configuration list)",
                conf.plugin_type
            ),
        ));
    };
    let Some(pod) = args.pod() else {
        notes.push(format!(
            "container {container_id} is not a Kubernetes pod (no K8S_POD_NAMESPACE and \
             K8S_POD_NAME in CNI_ARGS): passed through"
        ));
        return Ok(result);
    };
    let enrollment = PodEnrollment {
        pod,
        container_id,
        netns,
        ips: conf.pod_ips()?,
    };
    let what = format!("enrolling pod {}", enrollment.pod);
    let response = client(conf)
        .call(Command::Add(enrollment))
        .map_err(|e| daemon_error(&what, &e))?;
    match response.status {
        Status::Enrolled => Ok(result),
        Status::NotMeshed => {
            if !response.message.is_empty() {
                notes.push(format!("not meshed: {}", response.message));
            }
            Ok(result)
        }
        Status::Error => Err(refused(&what, &response)),
        Status::Removed => Err(unexpected(&what, &response)),
    }
}

fn del(env: &CniEnv, conf: &NetConf, notes: &mut Vec<String>) -> Result<String, CniError> {
    let container_id = env.container_id()?;
    let netns = env.netns_optional()?;
    let args = env.args()?;
    let Some(pod) = args.pod() else {
        return Ok(String::new());
    };
    // A stale or odd cached result must not keep the pod from being deleted.
    let ips = conf.pod_ips().unwrap_or_else(|e| {
        notes.push(format!("ignoring the addresses in prevResult: {}", e.msg));
        Vec::new()
    });
    let removal = PodRemoval {
        pod,
        container_id,
        netns,
        ips,
    };
    let what = format!("un-enrolling pod {}", removal.pod);
    match client(conf).call(Command::Del(removal)) {
        Ok(Response {
            status: Status::Removed,
            ..
        }) => {}
        Ok(response) => notes.push(format!(
            "{what}: the daemon answered {} {:?}; DEL succeeds anyway (best effort)",
            response.status, response.message
        )),
        Err(e) => notes.push(format!(
            "{what}: {}; DEL succeeds anyway (best effort, the daemon reconciles)",
            crate::cni::error_chain(&e)
        )),
    }
    Ok(String::new())
}

fn check(env: &CniEnv, conf: &NetConf, _notes: &mut Vec<String>) -> Result<String, CniError> {
    if conf.version() < (0, 4, 0) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "CHECK is not defined for CNI version {} (needs 0.4.0 or later)",
                conf.cni_version
            ),
        ));
    }
    let container_id = env.container_id()?;
    let netns = env.netns()?;
    env.ifname()?;
    let args = env.args()?;
    let Some(pod) = args.pod() else {
        return Ok(String::new());
    };
    let enrollment = PodEnrollment {
        pod,
        container_id,
        netns,
        ips: conf.pod_ips()?,
    };
    let what = format!("checking pod {}", enrollment.pod);
    let response = client(conf)
        .call(Command::Check(enrollment))
        .map_err(|e| daemon_error(&what, &e))?;
    match response.status {
        Status::Enrolled | Status::NotMeshed => Ok(String::new()),
        Status::Error => Err(refused(&what, &response)),
        Status::Removed => Err(unexpected(&what, &response)),
    }
}

fn client(conf: &NetConf) -> Client {
    Client::new(conf.ambit.socket.clone(), conf.ambit.timeout)
}

/// No usable answer: try again later when the daemon is down or slow, a protocol
/// error otherwise.
fn daemon_error(what: &str, error: &ClientError) -> CniError {
    let code = match error {
        ClientError::Unreachable { .. }
        | ClientError::TimedOut { .. }
        | ClientError::Closed { .. }
        | ClientError::Io { .. } => ErrorCode::TryAgainLater,
        ClientError::Encode(_) => ErrorCode::InvalidEnvironment,
        ClientError::Response { .. } => ErrorCode::Protocol,
    };
    CniError::new(code, format!("{what}: {error}")).caused_by(error)
}

fn refused(what: &str, response: &Response) -> CniError {
    CniError::new(
        ErrorCode::EnrollmentFailed,
        format!(
            "{what}: the ambit node daemon answered: {}",
            response.message
        ),
    )
}

fn unexpected(what: &str, response: &Response) -> CniError {
    CniError::new(
        ErrorCode::Protocol,
        format!(
            "{what}: unexpected answer {} from the ambit node daemon",
            response.status
        ),
    )
}
