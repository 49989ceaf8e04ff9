//! Who is calling: the credential of a config subscriber or a CA client, mapped to a
//! [`Caller`].
//!
//! Both gRPC services read `authorization: Bearer <token>` ([`BearerToken`]) and ask
//! an [`Authenticator`] who that is. Nothing in a request body is trusted for it.
//!
//! - Local mode: [`BootstrapTokens`], per-node and per-waypoint tokens from a file the
//!   cluster runner provisions (`--bootstrap-tokens`), compared in constant time and
//!   re-read when the file changes.
//! - Kubernetes mode: [`TokenReviewAuthenticator`], a `TokenReview` of the caller's
//!   projected ServiceAccount token. The node daemon's service account maps to
//!   [`Caller::Node`] (the node the token's pod is bound to); any other service
//!   account maps to [`Caller::Waypoint`] named after it (a waypoint runs as the
//!   service account named like its Gateway), which entitles it to nothing unless
//!   such a waypoint exists.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::SystemTime,
};

use ambit_api::BearerToken;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::view::Subscriber;

/// An authenticated caller of the controller's gRPC services.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Caller {
    /// A node daemon, by Kubernetes node name.
    Node { name: String },
    /// A waypoint, by its Gateway's namespace and name.
    Waypoint { namespace: String, name: String },
}

/// Why a caller was not authenticated. Never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No or malformed `authorization` metadata.
    #[error("no usable bearer token")]
    Credential(#[source] ambit_api::BearerTokenError),
    /// The token is not one of the bootstrap tokens.
    #[error("unknown bootstrap token")]
    UnknownToken,
    /// The API server did not authenticate the token.
    #[error("token rejected by TokenReview: {reason}")]
    Rejected {
        /// The API server's reason (`status.error`), or a summary.
        reason: String,
    },
    /// The token is valid but does not identify an Ambit node daemon or waypoint.
    #[error("{who} is not an Ambit node daemon or waypoint: {reason}")]
    NotAProxy {
        /// The authenticated user.
        who: String,
        /// Why it cannot be mapped.
        reason: String,
    },
    /// Talking to the API server failed (not the caller's fault).
    #[error("TokenReview request failed")]
    Api(#[source] kube::Error),
}

/// Maps a bearer token to the caller it belongs to.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Who presents `token`.
    async fn authenticate(&self, token: &BearerToken) -> Result<Caller, AuthError>;
}

impl Caller {
    /// The config subscription this caller may open.
    pub fn may_subscribe_as(&self, subscriber: &Subscriber) -> bool {
        match (self, subscriber) {
            (Caller::Node { name }, Subscriber::Node { name: s }) => name == s,
            (
                Caller::Waypoint { namespace, name },
                Subscriber::Waypoint {
                    namespace: sn,
                    name: s,
                },
            ) => namespace == sn && name == s,
            _ => false,
        }
    }

    /// `node` or `waypoint`, the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Caller::Node { .. } => "node",
            Caller::Waypoint { .. } => "waypoint",
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node { name } => write!(f, "node/{name}"),
            Self::Waypoint { namespace, name } => write!(f, "waypoint/{namespace}/{name}"),
        }
    }
}

/// Reads the bearer token of a request and authenticates it; the gRPC status to
/// answer with when that fails (`UNAUTHENTICATED`, or `UNAVAILABLE` when the API
/// server could not be asked).
pub async fn authenticate_request<T>(
    authenticator: &dyn Authenticator,
    request: &tonic::Request<T>,
) -> Result<Caller, tonic::Status> {
    let token = BearerToken::from_metadata(request.metadata())
        .map_err(|e| tonic::Status::unauthenticated(AuthError::Credential(e).to_string()))?;
    authenticator.authenticate(&token).await.map_err(|e| {
        tracing::info!(error = %crate::app::error_chain(&e), "refused an unauthenticated caller");
        match e {
            AuthError::Api(_) => tonic::Status::unavailable(e.to_string()),
            e => tonic::Status::unauthenticated(e.to_string()),
        }
    })
}

// ---------------------------------------------------------------------------------
// Local mode: bootstrap tokens.

/// The bootstrap tokens file: `{tokens: [{token, node} | {token, waypoint: ns/name}]}`
/// (YAML or JSON).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// One entry per credential.
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

/// One bootstrap token and whom it belongs to.
#[derive(Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The secret.
    pub token: String,
    /// The node this token authenticates (exclusive with `waypoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The waypoint `namespace/name` this token authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("token", &"<redacted>")
            .field("node", &self.node)
            .field("waypoint", &self.waypoint)
            .finish()
    }
}

/// The bootstrap tokens file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// Reading the file failed.
    #[error("reading bootstrap tokens {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the expected YAML/JSON.
    #[error("parsing bootstrap tokens {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_yaml::Error,
    },
    /// An entry is unusable.
    #[error("bootstrap tokens {}: entry {index}: {reason}", path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// Index of the entry (from 0).
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Per-node / per-waypoint bootstrap tokens (local mode).
///
/// With a file, the file is checked for changes (modification time and size) on
/// each authentication and re-read when it changed; a file that became unreadable
/// keeps the previous tokens in force (logged).
#[derive(Debug)]
pub struct BootstrapTokens {
    path: Option<PathBuf>,
    state: Mutex<TokensState>,
}

#[derive(Debug)]
struct TokensState {
    stamp: Option<Stamp>,
    entries: Vec<Entry>,
}

/// Modification time and size of the tokens file, to notice changes.
type Stamp = (SystemTime, u64);
/// A token's bytes and whom it authenticates.
type Entry = (Vec<u8>, Caller);

impl BootstrapTokens {
    /// No tokens: every caller is refused (local mode without `--bootstrap-tokens`).
    pub fn none() -> Self {
        Self {
            path: None,
            state: Mutex::new(TokensState {
                stamp: None,
                entries: Vec::new(),
            }),
        }
    }

    /// Fixed tokens, e.g. for tests.
    pub fn from_entries(file: &TokensFile) -> Result<Self, TokensError> {
        let entries = parse_entries(Path::new("<memory>"), file)?;
        Ok(Self {
            path: None,
            state: Mutex::new(TokensState {
                stamp: None,
                entries,
            }),
        })
    }

    /// Reads the tokens from `path` (and re-reads them when it changes).
    pub fn from_file(path: &Path) -> Result<Self, TokensError> {
        let (stamp, entries) = load_tokens(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            state: Mutex::new(TokensState {
                stamp: Some(stamp),
                entries,
            }),
        })
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no token is in force.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokensState> {
        // Plain data replaced whole: still consistent after a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        let current = std::fs::metadata(path).ok().and_then(|m| stamp_of(&m));
        if current.is_none() || current == self.lock().stamp {
            return;
        }
        match load_tokens(path) {
            Ok((stamp, entries)) => {
                tracing::info!(path = %path.display(), tokens = entries.len(), "bootstrap tokens reloaded");
                let mut state = self.lock();
                state.stamp = Some(stamp);
                state.entries = entries;
            }
            Err(e) => {
                tracing::warn!(error = %crate::app::error_chain(&e), "keeping the previous bootstrap tokens");
                // Do not retry on every call until the file changes again.
                self.lock().stamp = current;
            }
        }
    }
}

#[tonic::async_trait]
impl Authenticator for BootstrapTokens {
    async fn authenticate(&self, token: &BearerToken) -> Result<Caller, AuthError> {
        self.refresh();
        let presented = token.secret().as_bytes();
        let state = self.lock();
        // Compare against every token, without stopping at a match, so timing says
        // nothing about which (or whether a) token matched.
        let mut found: Option<&Caller> = None;
        for (secret, caller) in &state.entries {
            if bool::from(secret.as_slice().ct_eq(presented)) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(AuthError::UnknownToken)
    }
}

fn stamp_of(meta: &std::fs::Metadata) -> Option<Stamp> {
    Some((meta.modified().ok()?, meta.len()))
}

fn load_tokens(path: &Path) -> Result<(Stamp, Vec<Entry>), TokensError> {
    let read_err = |source| TokensError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let file: TokensFile = if text.trim().is_empty() {
        TokensFile::default()
    } else {
        serde_yaml::from_str(&text).map_err(|source| TokensError::Parse {
            path: path.to_owned(),
            source,
        })?
    };
    let stamp = stamp_of(&meta).unwrap_or((SystemTime::UNIX_EPOCH, meta.len()));
    Ok((stamp, parse_entries(path, &file)?))
}

fn parse_entries(path: &Path, file: &TokensFile) -> Result<Vec<Entry>, TokensError> {
    let entry_err = |index, reason| TokensError::Entry {
        path: path.to_owned(),
        index,
        reason,
    };
    let mut out = Vec::with_capacity(file.tokens.len());
    for (index, e) in file.tokens.iter().enumerate() {
        let token = e.token.trim();
        if token.is_empty() {
            return Err(entry_err(index, "empty token"));
        }
        let caller = match (&e.node, &e.waypoint) {
            (Some(node), None) if !node.is_empty() => Caller::Node { name: node.clone() },
            (None, Some(wp)) => match wp.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Caller::Waypoint {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                    }
                }
                _ => return Err(entry_err(index, "`waypoint` must be NAMESPACE/NAME")),
            },
            _ => {
                return Err(entry_err(
                    index,
                    "exactly one of `node` and `waypoint` must be set",
                ));
            }
        };
        out.push((token.as_bytes().to_vec(), caller));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// Kubernetes mode: TokenReview.

/// Extra key (Kubernetes ≥ 1.32) naming the node the token's pod is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Extra key naming the pod the token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Authenticates projected ServiceAccount tokens with a `TokenReview`.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    node_service_account: (String, String),
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audiences", &self.audiences)
            .field("node_service_account", &self.node_service_account)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// `audiences`: what the projected token must be issued for (e.g. `ambit-ca`);
    /// `node_service_account`: `(namespace, name)` of the node daemon's service
    /// account.
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        node_service_account: (String, String),
    ) -> Self {
        Self {
            client,
            audiences,
            node_service_account,
        }
    }

    async fn node_of_pod(&self, namespace: &str, pod: &str) -> Result<Option<String>, AuthError> {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let pod = pods.get_opt(pod).await.map_err(AuthError::Api)?;
        Ok(pod.and_then(|p| p.spec).and_then(|s| s.node_name))
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, token: &BearerToken) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.secret().to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(AuthError::Api)?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected {
                reason: status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let not_a_proxy = |reason: &str| AuthError::NotAProxy {
            who: username.clone(),
            reason: reason.to_owned(),
        };
        let Some((namespace, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(not_a_proxy("not a service account"));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if (namespace, sa) != (&self.node_service_account.0, &self.node_service_account.1) {
            return Ok(Caller::Waypoint {
                namespace: namespace.to_owned(),
                name: sa.to_owned(),
            });
        }
        if let Some(node) = first(NODE_NAME_EXTRA).filter(|n| !n.is_empty()) {
            return Ok(Caller::Node { name: node });
        }
        // Older API servers bind the token to the pod only: look the pod up.
        let Some(pod) = first(POD_NAME_EXTRA) else {
            return Err(not_a_proxy(
                "the token is not bound to a pod (use a projected service account token)",
            ));
        };
        match self.node_of_pod(namespace, &pod).await? {
            Some(node) => Ok(Caller::Node { name: node }),
            None => Err(not_a_proxy("its pod does not exist or is not scheduled")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> BearerToken {
        BearerToken::new(s).unwrap()
    }

    #[tokio::test]
    async fn bootstrap_tokens_map_to_their_callers_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(
            &path,
            "tokens:\n- {token: aaa, node: node-1}\n- {token: bbb, waypoint: shop/wp}\n",
        )
        .unwrap();
        let auth = BootstrapTokens::from_file(&path).unwrap();
        assert_eq!(
            auth.authenticate(&token("aaa")).await.unwrap(),
            Caller::Node {
                name: "node-1".into()
            }
        );
        assert_eq!(
            auth.authenticate(&token("bbb")).await.unwrap(),
            Caller::Waypoint {
                namespace: "shop".into(),
                name: "wp".into()
            }
        );
        assert!(matches!(
            auth.authenticate(&token("aa")).await,
            Err(AuthError::UnknownToken)
        ));

        // A changed file is picked up (the size differs, so the stamp does too).
        std::fs::write(
            &path,
            r#"{"tokens": [{"token": "cccc", "node": "node-2"}]}"#,
        )
        .unwrap();
        assert_eq!(
            auth.authenticate(&token("cccc")).await.unwrap(),
            Caller::Node {
                name: "node-2".into()
            }
        );
        assert!(auth.authenticate(&token("aaa")).await.is_err());
        // A broken file keeps the previous tokens.
        std::fs::write(&path, "tokens: [{token: x}]\n").unwrap();
        assert!(auth.authenticate(&token("cccc")).await.is_ok());
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let file = |yaml: &str| serde_yaml::from_str::<TokensFile>(yaml).unwrap();
        let err = BootstrapTokens::from_entries(&file("tokens: [{token: a}]")).unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
        let err =
            BootstrapTokens::from_entries(&file("tokens: [{token: a, waypoint: wp}]")).unwrap_err();
        assert!(err.to_string().contains("NAMESPACE/NAME"), "{err}");
        let err =
            BootstrapTokens::from_entries(&file("tokens: [{token: ' ', node: n}]")).unwrap_err();
        assert!(err.to_string().contains("empty token"), "{err}");
        assert!(!format!("{:?}", file("tokens: [{token: sekrit, node: n}]")).contains("sekrit"));
    }

    /// A kube client whose "API server" is this function: TokenReview answers by
    /// token, and one pod for the lookup fallback.
    fn mock_api_server() -> kube::Client {
        use http_body_util::BodyExt as _;
        let svc = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let json = |v: serde_json::Value| {
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&v).unwrap()))
                    .unwrap()
            };
            let path = parts.uri.path();
            if parts.method == http::Method::POST
                && path == "/apis/authentication.k8s.io/v1/tokenreviews"
            {
                let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(review["spec"]["audiences"], serde_json::json!(["ambit-ca"]));
                let node_sa = "system:serviceaccount:ambit-system:ambit-node";
                let status = match review["spec"]["token"].as_str().unwrap() {
                    "node-token" => serde_json::json!({"authenticated": true, "user": {
                        "username": node_sa,
                        "extra": {NODE_NAME_EXTRA: ["node-7"], POD_NAME_EXTRA: ["ambit-node-x"]}}}),
                    "old-node-token" => serde_json::json!({"authenticated": true, "user": {
                        "username": node_sa, "extra": {POD_NAME_EXTRA: ["ambit-node-abc"]}}}),
                    "unscheduled-token" => serde_json::json!({"authenticated": true, "user": {
                        "username": node_sa, "extra": {POD_NAME_EXTRA: ["gone"]}}}),
                    "wp-token" => serde_json::json!({"authenticated": true, "user": {
                        "username": "system:serviceaccount:shop:wp"}}),
                    "user-token" => serde_json::json!({"authenticated": true, "user": {
                        "username": "alice"}}),
                    _ => {
                        serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
                    }
                };
                let mut answer = review;
                answer["status"] = status;
                return Ok::<_, std::convert::Infallible>(json(answer));
            }
            if path == "/api/v1/namespaces/ambit-system/pods/ambit-node-abc" {
                return Ok(json(serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "ambit-node-abc", "namespace": "ambit-system"},
                    "spec": {"nodeName": "node-9", "containers": []}})));
            }
            let mut not_found = json(serde_json::json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{path} not found")}));
            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
            Ok(not_found)
        });
        kube::Client::new(svc, "default")
    }

    #[tokio::test]
    async fn token_review_maps_service_accounts_to_callers() {
        let auth = TokenReviewAuthenticator::new(
            mock_api_server(),
            vec!["ambit-ca".into()],
            ("ambit-system".into(), "ambit-node".into()),
        );
        assert_eq!(
            auth.authenticate(&token("node-token")).await.unwrap(),
            Caller::Node {
                name: "node-7".into()
            }
        );
        // Without the node-name extra, the bound pod's node.
        assert_eq!(
            auth.authenticate(&token("old-node-token")).await.unwrap(),
            Caller::Node {
                name: "node-9".into()
            }
        );
        assert_eq!(
            auth.authenticate(&token("wp-token")).await.unwrap(),
            Caller::Waypoint {
                namespace: "shop".into(),
                name: "wp".into()
            }
        );
        let err = auth.authenticate(&token("forged")).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Rejected { reason } if reason == "invalid bearer token"),
            "{err:?}"
        );
        let err = auth.authenticate(&token("user-token")).await.unwrap_err();
        assert!(matches!(err, AuthError::NotAProxy { .. }), "{err:?}");
        let err = auth
            .authenticate(&token("unscheduled-token"))
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::NotAProxy { .. }), "{err:?}");
    }

    #[test]
    fn callers_subscribe_only_as_themselves() {
        let node = Caller::Node { name: "n1".into() };
        assert!(node.may_subscribe_as(&Subscriber::Node { name: "n1".into() }));
        assert!(!node.may_subscribe_as(&Subscriber::Node { name: "n2".into() }));
        assert!(!node.may_subscribe_as(&Subscriber::Waypoint {
            namespace: "n1".into(),
            name: "n1".into()
        }));
    }
}
