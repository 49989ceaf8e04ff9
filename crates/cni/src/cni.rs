//! The parts of the CNI specification (1.0) the plugin needs: its environment, the
//! network configuration on stdin, the result it passes on, and error results.

use std::{ffi::OsString, fmt, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::client::DEFAULT_SOCKET;

/// The spec version this plugin implements (what VERSION reports).
pub const SPEC_VERSION: &str = "1.0.0";

/// Configuration versions the plugin accepts. Results of all of them have the same
/// shape where the plugin reads them (`ips[].address`, `ips[].interface`,
/// `interfaces[].sandbox`), and the plugin passes the result on untouched.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Default time the plugin waits for the daemon's answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The plugin's own section of the network configuration, under the key `ambit`.
pub const CONFIG_KEY: &str = "ambit";

/// CNI error codes (spec "Error"); 100 and up are this plugin's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not supported (or too old for CHECK).
    IncompatibleVersion = 1,
    /// 2: a field of the configuration is not supported.
    UnsupportedField = 2,
    /// 4: a `CNI_*` environment variable is missing or invalid.
    InvalidEnvironment = 4,
    /// 5: reading stdin failed.
    Io = 5,
    /// 6: stdin (configuration or `prevResult`) could not be decoded.
    Decode = 6,
    /// 7: the configuration is valid JSON but not valid for this plugin.
    InvalidConfig = 7,
    /// 11: the daemon is unreachable or slow; the runtime should try again later.
    TryAgainLater = 11,
    /// 100: the daemon answered that the pod could not be enrolled (or, for CHECK,
    /// that it is not captured as it should be).
    EnrollmentFailed = 100,
    /// 101: the daemon's answer was not one the protocol allows here.
    Protocol = 101,
}

/// A CNI error result: printed on stdout, with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    /// The configuration's version when known and supported, else [`SPEC_VERSION`].
    pub cni_version: String,
    /// The error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details (the chain of causes), possibly empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The CNI operation (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    /// Set up the container's network (here: enrol the pod).
    Add,
    /// Tear it down (here: un-enrol).
    Del,
    /// Check it is as set up.
    Check,
    /// Report the supported versions.
    Version,
}

/// The runtime's `CNI_*` variables, as given (validated per command by the plugin).
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Option<OsString>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<OsString>,
    /// `CNI_NETNS`.
    pub netns: Option<OsString>,
    /// `CNI_IFNAME`.
    pub ifname: Option<OsString>,
    /// `CNI_ARGS`.
    pub args: Option<OsString>,
    /// `CNI_PATH` (unused: the plugin delegates to no other plugin).
    pub path: Option<OsString>,
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs(Vec<(String, String)>);

/// The network configuration on stdin, as far as the plugin reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `cniVersion` (one of [`SUPPORTED_VERSIONS`]).
    pub cni_version: String,
    /// `name` of the network.
    pub name: String,
    /// `type` (the plugin binary's name).
    pub plugin_type: String,
    /// The previous plugin's result, passed on untouched.
    pub prev_result: Option<Map<String, Value>>,
    /// The `ambit` section.
    pub ambit: AmbitConfig,
}

/// The plugin's settings (`"ambit": {"socket": "…", "timeout": "30s"}`), all optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmbitConfig {
    /// The daemon's enrolment socket ([`DEFAULT_SOCKET`]).
    pub socket: PathBuf,
    /// How long to wait for the daemon's answer ([`DEFAULT_TIMEOUT`]); a duration
    /// such as `"500ms"`, `"30s"` or `"2m"`.
    pub timeout: Duration,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u32 {
        self as u32
    }
}

impl CniError {
    /// An error result; the version is fixed up by the plugin once the configuration
    /// is known.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            cni_version: SPEC_VERSION.to_owned(),
            code: code.code(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// With `details`: the chain of causes of `error` (whose own message is expected
    /// in `msg`).
    pub fn caused_by(mut self, error: &(dyn std::error::Error + 'static)) -> Self {
        self.details = error.source().map(error_chain).unwrap_or_default();
        self
    }

    /// The error as one line of JSON.
    pub fn to_json(&self) -> String {
        json_line(self)
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl FromStr for CniCommand {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "CNI_COMMAND {other:?} is not supported (this plugin implements ADD, DEL, \
                     CHECK and VERSION of CNI {SPEC_VERSION})"
                ),
            )),
        }
    }
}

impl CniEnv {
    /// Reads the variables through `lookup` (the binary passes `std::env::var_os`).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        Self {
            command: lookup("CNI_COMMAND"),
            container_id: lookup("CNI_CONTAINERID"),
            netns: lookup("CNI_NETNS"),
            ifname: lookup("CNI_IFNAME"),
            args: lookup("CNI_ARGS"),
            path: lookup("CNI_PATH"),
        }
    }

    /// `CNI_COMMAND`, required.
    pub fn command(&self) -> Result<CniCommand, CniError> {
        required("CNI_COMMAND", self.command.as_ref())?.parse()
    }

    /// `CNI_CONTAINERID`, required and valid.
    pub fn container_id(&self) -> Result<crate::protocol::ContainerId, CniError> {
        let id = required("CNI_CONTAINERID", self.container_id.as_ref())?;
        crate::protocol::ContainerId::try_from(id).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_CONTAINERID: {e}"),
            )
        })
    }

    /// `CNI_NETNS`, required.
    pub fn netns(&self) -> Result<PathBuf, CniError> {
        required("CNI_NETNS", self.netns.as_ref()).map(PathBuf::from)
    }

    /// `CNI_NETNS` when set and not empty (DEL: the runtime may have no netns left).
    pub fn netns_optional(&self) -> Result<Option<PathBuf>, CniError> {
        match &self.netns {
            Some(v) if !v.is_empty() => self.netns().map(Some),
            _ => Ok(None),
        }
    }

    /// `CNI_IFNAME`, required (checked, not otherwise used: capture is per netns).
    pub fn ifname(&self) -> Result<String, CniError> {
        required("CNI_IFNAME", self.ifname.as_ref())
    }

    /// `CNI_ARGS`, empty when unset.
    pub fn args(&self) -> Result<CniArgs, CniError> {
        match &self.args {
            None => Ok(CniArgs::default()),
            Some(raw) => {
                let raw = utf8("CNI_ARGS", raw)?;
                raw.parse()
            }
        }
    }
}

impl CniArgs {
    /// The value of `key`, when present and not empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The Kubernetes pod the runtime named (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_UID`); `None` when the container is not a Kubernetes pod.
    pub fn pod(&self) -> Option<crate::protocol::PodRef> {
        Some(crate::protocol::PodRef {
            namespace: self.get("K8S_POD_NAMESPACE")?.to_owned(),
            name: self.get("K8S_POD_NAME")?.to_owned(),
            uid: self.get("K8S_POD_UID").map(str::to_owned),
        })
    }
}

impl FromStr for CniArgs {
    type Err = CniError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        raw.split(';')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: {pair:?} is not a KEY=VALUE pair"),
                )),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl NetConf {
    /// Parses the configuration from stdin: code 6 when it is not JSON, 7 when a field
    /// is missing or of the wrong type, 2 for an unknown key in the `ambit` section, 1
    /// for an unsupported `cniVersion`.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::new(
                ErrorCode::Decode,
                "no network configuration on stdin",
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                format!("the network configuration on stdin is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(mut conf) = value else {
            return Err(invalid_config(
                "the network configuration is not a JSON object",
            ));
        };
        let cni_version = string_field(&conf, "cniVersion")?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError {
                details: format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")),
                ..CniError::new(
                    ErrorCode::IncompatibleVersion,
                    format!("incompatible CNI version {cni_version:?}"),
                )
            });
        }
        let name = string_field(&conf, "name")?;
        let plugin_type = string_field(&conf, "type")?;
        let prev_result = match conf.remove("prevResult") {
            None | Some(Value::Null) => None,
            Some(Value::Object(result)) => Some(result),
            Some(_) => return Err(invalid_config("prevResult is not a JSON object")),
        };
        let ambit = match conf.remove(CONFIG_KEY) {
            None | Some(Value::Null) => AmbitConfig::default(),
            Some(Value::Object(section)) => AmbitConfig::from_json(&section)?,
            Some(_) => return Err(invalid_config("\"ambit\" is not a JSON object")),
        };
        Ok(Self {
            cni_version,
            name,
            plugin_type,
            prev_result,
            ambit,
        })
    }

    /// The version of the configuration as `(major, minor, patch)`.
    pub fn version(&self) -> (u32, u32, u32) {
        parse_version(&self.cni_version).unwrap_or_default()
    }

    /// The pod's addresses from `prevResult.ips`, leaving out those on interfaces
    /// outside the sandbox (a host-side veth some primary plugins report). Empty
    /// without a `prevResult`.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(result) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let interfaces = match result.get("interfaces") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(list)) => list.as_slice(),
            Some(_) => return Err(decode_error("prevResult.interfaces is not an array")),
        };
        let ips = match result.get("ips") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(decode_error("prevResult.ips is not an array")),
        };
        let mut out = Vec::with_capacity(ips.len());
        for (i, ip) in ips.iter().enumerate() {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| decode_error(format!("prevResult.ips[{i}].address is missing")))?;
            let addr = parse_cidr_address(address).ok_or_else(|| {
                decode_error(format!(
                    "prevResult.ips[{i}].address {address:?} is not an address in CIDR notation"
                ))
            })?;
            let outside_sandbox = ip
                .get("interface")
                .and_then(Value::as_u64)
                .and_then(|idx| interfaces.get(usize::try_from(idx).ok()?))
                .is_some_and(|iface| {
                    iface
                        .get("sandbox")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                });
            if !outside_sandbox && !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// The result ADD prints: `prevResult` as received, with `cniVersion` set to the
    /// configuration's (a chained plugin that changes nothing passes it on).
    pub fn result_json(&self) -> Option<String> {
        let mut result = self.prev_result.clone()?;
        result.insert(
            "cniVersion".to_owned(),
            Value::String(self.cni_version.clone()),
        );
        Some(json_line(&result))
    }
}

impl Default for AmbitConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl AmbitConfig {
    fn from_json(section: &Map<String, Value>) -> Result<Self, CniError> {
        let mut config = Self::default();
        for (key, value) in section {
            match (key.as_str(), value) {
                ("socket", Value::String(path)) if !path.is_empty() => {
                    config.socket = PathBuf::from(path);
                }
                ("timeout", Value::String(text)) => {
                    config.timeout = parse_duration(text).ok_or_else(|| {
                        invalid_config(format!(
                            "ambit.timeout {text:?} is not a positive duration such as \
                             \"500ms\", \"30s\" or \"2m\""
                        ))
                    })?;
                }
                ("socket" | "timeout", other) => {
                    return Err(invalid_config(format!(
                        "ambit.{key} must be a non-empty string, not {other}"
                    )));
                }
                (_, other) => {
                    return Err(CniError::new(
                        ErrorCode::UnsupportedField,
                        format!("unsupported field ambit.{key} = {other} (known: socket, timeout)"),
                    ));
                }
            }
        }
        Ok(config)
    }
}

/// `"1.0.0"` as `(1, 0, 0)`.
pub fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// The address of `10.244.1.2/24` (a bare address is accepted too).
fn parse_cidr_address(cidr: &str) -> Option<IpAddr> {
    let (addr, len) = match cidr.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (cidr, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    if let Some(len) = len {
        let len: u8 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
    }
    Some(addr)
}

/// A positive duration with a unit: `ms`, `s`, `m` or `h` (`"30s"`, `"1500ms"`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// `error: cause: cause…`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Compact JSON and a newline. Serializing a `serde_json` map or a struct of strings
/// and numbers cannot fail, so a failure is reported in the output rather than
/// panicking.
fn json_line<T: Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"cniVersion":"{SPEC_VERSION}","code":5,"msg":"encoding output: {e}"}}"#)
    });
    line.push('\n');
    line
}

fn required(name: &str, value: Option<&OsString>) -> Result<String, CniError> {
    match value {
        Some(v) if !v.is_empty() => utf8(name, v),
        _ => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("{name} is not set"),
        )),
    }
}

fn utf8(name: &str, value: &OsString) -> Result<String, CniError> {
    value.to_str().map(str::to_owned).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("{name} is not valid UTF-8: {value:?}"),
        )
    })
}

fn string_field(conf: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    match conf.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(invalid_config(format!(
            "the network configuration has no {key:?}"
        ))),
        Some(other) => Err(invalid_config(format!(
            "{key:?} of the network configuration must be a string, not {other}"
        ))),
    }
}

fn invalid_config(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

fn decode_error(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Decode, msg)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn conf(json: Value) -> Result<NetConf, CniError> {
        NetConf::parse(json.to_string().as_bytes())
    }

    #[test]
    fn cni_args_parse_and_name_the_pod() {
        let args: CniArgs =
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=checkout-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
                .parse()
                .unwrap();
        let pod = args.pod().unwrap();
        assert_eq!(pod.to_string(), "shop/checkout-0");
        assert_eq!(pod.uid.as_deref(), Some("u-1"));
        let args: CniArgs = "K8S_POD_NAMESPACE=shop;".parse().unwrap();
        assert_eq!(args.pod(), None);
        let err = "A=1;oops".parse::<CniArgs>().unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("oops"), "{err}");
        assert_eq!("".parse::<CniArgs>().unwrap(), CniArgs::default());
    }

    #[test]
    fn env_reports_missing_and_invalid_variables() {
        let vars: HashMap<&str, &str> =
            HashMap::from([("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a/b")]);
        let env = CniEnv::from_lookup(|k| vars.get(k).map(OsString::from));
        assert_eq!(env.command().unwrap(), CniCommand::Add);
        let err = env.container_id().unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_CONTAINERID"), "{err}");
        let err = env.netns().unwrap_err();
        assert_eq!((err.code, err.msg.as_str()), (4, "CNI_NETNS is not set"));
        assert_eq!(env.netns_optional().unwrap(), None);
        let env = CniEnv {
            command: Some("GC".into()),
            ..CniEnv::default()
        };
        assert!(env.command().unwrap_err().msg.contains("\"GC\""));
    }

    #[test]
    fn config_errors_use_the_spec_codes() {
        let err = NetConf::parse(b"").unwrap_err();
        assert_eq!(err.code, 6);
        let err = NetConf::parse(b"{\"cniVersion\": ").unwrap_err();
        assert_eq!(err.code, 6);
        assert!(err.msg.contains("not valid JSON"), "{err}");
        let err =
            conf(serde_json::json!({"cniVersion": "1.0.0", "type": "ambit-cni"})).unwrap_err();
        assert_eq!(err.code, 7);
        assert!(err.msg.contains("\"name\""), "{err}");
        let err =
            conf(serde_json::json!({"cniVersion": "2.0.0", "name": "n", "type": "t"})).unwrap_err();
        assert_eq!(err.code, 1);
        assert!(err.details.contains("1.0.0"), "{err}");
        let err = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "t", "ambit": {"sockets": "/x"}
        }))
        .unwrap_err();
        assert_eq!(err.code, 2);
        assert!(err.msg.contains("ambit.sockets"), "{err}");
        let err = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "t", "ambit": {"timeout": "soon"}
        }))
        .unwrap_err();
        assert_eq!(err.code, 7);
        assert!(err.msg.contains("ambit.timeout"), "{err}");
    }

    #[test]
    fn config_reads_the_ambit_section() {
        let c = conf(serde_json::json!({
            "cniVersion": "0.4.0", "name": "k8s-pod-network", "type": "ambit-cni",
            "ambit": {"socket": "/tmp/x.sock", "timeout": "1500ms"},
            "runtimeConfig": {"portMappings": []},
        }))
        .unwrap();
        assert_eq!(c.ambit.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.ambit.timeout, Duration::from_millis(1500));
        assert_eq!(c.version(), (0, 4, 0));
        assert_eq!(c.result_json(), None);
        let c = conf(serde_json::json!({"cniVersion": "1.0.0", "name": "n", "type": "t"})).unwrap();
        assert_eq!(c.ambit, AmbitConfig::default());
    }

    #[test]
    fn pod_ips_skip_host_side_interfaces() {
        let c = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "t",
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "eth0", "sandbox": "/run/netns/x"},
                ],
                "ips": [
                    {"address": "10.244.1.1/24", "interface": 0},
                    {"address": "10.244.1.2/24", "interface": 1, "gateway": "10.244.1.1"},
                    {"address": "fd00::2/64"},
                ],
            },
        }))
        .unwrap();
        assert_eq!(
            c.pod_ips().unwrap(),
            vec![
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        let c = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "t",
            "prevResult": {"ips": [{"address": "10.244.1.300/24"}]},
        }))
        .unwrap();
        let err = c.pod_ips().unwrap_err();
        assert_eq!(err.code, 6);
        assert!(err.msg.contains("prevResult.ips[0]"), "{err}");
    }

    #[test]
    fn result_keeps_prev_result_and_sets_the_version() {
        let c = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "t",
            "prevResult": {"ips": [{"address": "10.0.0.2/24"}], "dns": {}},
        }))
        .unwrap();
        let out: Value = serde_json::from_str(&c.result_json().unwrap()).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}})
        );
    }

    #[test]
    fn durations_and_versions_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "30", "0s", "s", "-1s", "1.5s", "3d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_version("0.3.1"), Some((0, 3, 1)));
        assert_eq!(
            parse_cidr_address("fd00::2/64"),
            Some("fd00::2".parse().unwrap())
        );
        assert_eq!(
            parse_cidr_address("10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        for bad in ["10.0.0.1/33", "10.0.0.1/", "10.0.0/8", "x/8"] {
            assert_eq!(parse_cidr_address(bad), None, "{bad}");
        }
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
    }

    #[test]
    fn errors_serialize_per_spec() {
        let json: Value =
            serde_json::from_str(&CniError::new(ErrorCode::InvalidConfig, "bad").to_json())
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad"})
        );
    }
}
