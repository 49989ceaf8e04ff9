//! The certificate authority's gRPC face: `CertificateService`
//! (`proto/ambit/ca/v1/ca.proto` is the specification).
//!
//! Who calls is taken from the credential alone ([`crate::auth`]); what it may hold is
//! node authorization over the current config ([`IdentityAuthority`]): a node daemon
//! gets certificates only for identities with a pod on its node, a waypoint only for
//! its own identity. Until the config sources have synced the answer is `UNAVAILABLE`
//! (a partial view would refuse entitled callers).
//!
//! The root: operator-supplied, or generated once and persisted — in local mode in the
//! state directory, in Kubernetes mode in a Secret ([`load_or_create_in_secret`]), so
//! that every replica and every restart signs with the same root.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use ambit_api::ca::v1::{
    CreateCertificateRequest, CreateCertificateResponse,
    certificate_service_server::{CertificateService, CertificateServiceServer},
};
use ambit_identity::{
    CertificateAuthority, SpiffeId, TrustDomain,
    ca::{CERT_FILE, KEY_FILE, PersistError, SignError},
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use tonic::{Request, Response, Status};

use crate::{
    auth::{Authenticator, Caller, authenticate_request},
    metrics::{CallerTypeLabels, Metrics, RefusalLabels},
    push::Worlds,
    view::IdentityAuthority,
};

/// The `CertificateService`. Cheap to clone.
pub struct CaServer<V> {
    inner: Arc<Inner<V>>,
}

struct Inner<V> {
    worlds: Worlds<V>,
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    ttl: Duration,
    metrics: Metrics,
}

impl<V> Clone for CaServer<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V> std::fmt::Debug for CaServer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("ca", &self.inner.ca)
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl<V: IdentityAuthority> CaServer<V> {
    /// Signs with `ca`, deciding entitlement on `worlds`. Certificates live `ttl`
    /// unless the caller asks for less.
    pub fn new(
        worlds: Worlds<V>,
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        ttl: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                worlds,
                ca,
                authenticator,
                ttl,
                metrics,
            }),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> CertificateServiceServer<Self> {
        CertificateServiceServer::new(self)
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.inner
            .metrics
            .certificate_refusals
            .get_or_create(&RefusalLabels { reason })
            .inc();
        status
    }

    fn authorize(&self, caller: &Caller, id: &SpiffeId) -> Result<(), Status> {
        let world = self.inner.worlds.borrow().clone();
        let Some(world) = world else {
            return Err(self.refuse(
                "unavailable",
                Status::unavailable("the controller has not finished reading its config yet"),
            ));
        };
        let allowed = match caller {
            Caller::Node { name } => world.node_may_hold(name, id),
            Caller::Waypoint { namespace, name } => {
                world.waypoint_identity(namespace, name).as_ref() == Some(id)
            }
        };
        if allowed {
            return Ok(());
        }
        let why = match caller {
            Caller::Node { name } => format!("node {name} runs no pod with identity {id}"),
            Caller::Waypoint { namespace, name } => {
                format!("waypoint {namespace}/{name} may hold only its own identity, not {id}")
            }
        };
        tracing::warn!(%caller, identity = %id, "refused a certificate request: {why}");
        Err(self.refuse("permission_denied", Status::permission_denied(why)))
    }

    fn ttl_for(&self, request: &CreateCertificateRequest) -> Result<Duration, Status> {
        let requested = ambit_api::time::optional_duration(request.requested_ttl.as_ref())
            .map_err(|e| {
                self.refuse(
                    "invalid_argument",
                    Status::invalid_argument(format!("requested_ttl: {e}")),
                )
            })?;
        Ok(requested.map_or(self.inner.ttl, |t| t.min(self.inner.ttl)))
    }
}

#[tonic::async_trait]
impl<V: IdentityAuthority> CertificateService for CaServer<V> {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let caller = authenticate_request(&*self.inner.authenticator, &request)
            .await
            .map_err(|s| {
                let reason = if s.code() == tonic::Code::Unavailable {
                    "unavailable"
                } else {
                    "unauthenticated"
                };
                self.refuse(reason, s)
            })?;
        let request = request.into_inner();
        let id = SpiffeId::parse(&request.identity).map_err(|e| {
            self.refuse(
                "invalid_argument",
                Status::invalid_argument(format!(
                    "identity {:?}: {}",
                    request.identity,
                    crate::app::error_chain(&e)
                )),
            )
        })?;
        if id.trust_domain() != self.inner.ca.trust_domain() {
            return Err(self.refuse(
                "invalid_argument",
                Status::invalid_argument(format!(
                    "{id} is not in this CA's trust domain {}",
                    self.inner.ca.trust_domain()
                )),
            ));
        }
        self.authorize(&caller, &id)?;
        let ttl = self.ttl_for(&request)?;
        let issued = self
            .inner
            .ca
            .sign_csr(&request.csr_pem, &id, ttl)
            .map_err(|e| {
                let msg = crate::app::error_chain(&e);
                match e {
                    SignError::Sign { .. } | SignError::Random => {
                        tracing::error!(identity = %id, error = %msg, "signing failed");
                        self.refuse("internal", Status::internal(msg))
                    }
                    SignError::CaExpired => {
                        tracing::error!(identity = %id, "the CA certificate expired");
                        self.refuse("unavailable", Status::unavailable(msg))
                    }
                    _ => self.refuse("invalid_argument", Status::invalid_argument(msg)),
                }
            })?;
        self.inner
            .metrics
            .certificates_issued
            .get_or_create(&CallerTypeLabels {
                caller_type: caller.kind(),
            })
            .inc();
        tracing::info!(
            %caller,
            identity = %id,
            serial = %issued.serial,
            ttl = ?ttl,
            "issued a workload certificate"
        );
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            not_before: Some(ambit_api::time::timestamp_to_proto(issued.not_before)),
            not_after: Some(ambit_api::time::timestamp_to_proto(issued.not_after)),
            trust_domain: self.inner.ca.trust_domain().as_str().to_owned(),
        }))
    }
}

/// Persisting the CA root in a Kubernetes Secret failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretCaError {
    /// Reading or creating the Secret failed.
    #[error("{action} Secret {namespace}/{name}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Secret lacks one of its two keys.
    #[error(
        "Secret {namespace}/{name} has no {key:?} (it must hold {CERT_FILE:?} and {KEY_FILE:?})"
    )]
    Incomplete {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The missing key.
        key: &'static str,
    },
    /// The local copy in the state directory could not be used.
    #[error("the CA copy in the state directory")]
    State(#[source] Box<PersistError>),
    /// Writing the local copy failed.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Kubernetes mode: the CA whose root and key live in the Secret `namespace/name`
/// (keys [`CERT_FILE`], [`KEY_FILE`]).
///
/// The Secret wins: when it exists its content is copied into `state_dir` and loaded.
/// Otherwise the CA in `state_dir` (generated there if absent) is stored as the
/// Secret; when another replica created the Secret meanwhile (`AlreadyExists`), that
/// one is used instead, so every replica ends up with the same root.
pub async fn load_or_create_in_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    state_dir: &Path,
    trust_domain: TrustDomain,
    validity: Duration,
) -> Result<CertificateAuthority, SecretCaError> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let api_err = |action| {
        move |source| SecretCaError::Api {
            action,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        }
    };
    let load = |dir: &Path, td: TrustDomain| {
        CertificateAuthority::load_or_generate(dir, td, validity)
            .map_err(|e| SecretCaError::State(Box::new(e)))
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_err("reading"))? {
        copy_secret_to_dir(&secret, namespace, name, state_dir)?;
        tracing::info!(namespace, name, "CA root loaded from its Secret");
        return load(state_dir, trust_domain);
    }
    let ca = load(state_dir, trust_domain.clone())?;
    let read = |file: &str| {
        std::fs::read(state_dir.join(file)).map_err(|source| SecretCaError::Write {
            path: state_dir.join(file),
            source,
        })
    };
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "ambit-controller".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (CERT_FILE.to_owned(), ByteString(read(CERT_FILE)?)),
            (KEY_FILE.to_owned(), ByteString(read(KEY_FILE)?)),
        ])),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "CA root stored in a new Secret");
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => {
            let theirs = api.get(name).await.map_err(api_err("re-reading"))?;
            copy_secret_to_dir(&theirs, namespace, name, state_dir)?;
            tracing::info!(
                namespace,
                name,
                "another replica stored the CA root first; using it"
            );
            load(state_dir, trust_domain)
        }
        Err(e) => Err(api_err("creating")(e)),
    }
}

fn copy_secret_to_dir(
    secret: &Secret,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<(), SecretCaError> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &'static str| {
        data.get(key)
            .map(|b| b.0.clone())
            .ok_or_else(|| SecretCaError::Incomplete {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
            })
    };
    let (cert, key) = (get(CERT_FILE)?, zeroize::Zeroizing::new(get(KEY_FILE)?));
    write_private(dir, KEY_FILE, &key)?;
    write_private(dir, CERT_FILE, &cert)
}

/// Writes `dir/file` with mode 0600 (directory 0700), replacing it atomically.
fn write_private(dir: &Path, file: &str, contents: &[u8]) -> Result<(), SecretCaError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let path = dir.join(file);
    let err = |source| SecretCaError::Write {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A mock API server holding at most one Secret; `conflict` makes the first create
    /// fail with AlreadyExists after storing `preset` (another replica won the race).
    fn api_server(
        stored: Arc<Mutex<Option<serde_json::Value>>>,
        race: Option<serde_json::Value>,
    ) -> kube::Client {
        use http_body_util::BodyExt as _;
        let race = Arc::new(Mutex::new(race));
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (stored, race) = (stored.clone(), race.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let json = |code: u16, v: serde_json::Value| {
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(serde_json::to_vec(&v).unwrap()))
                        .unwrap()
                };
                let status = |code: u16, reason: &str| {
                    json(
                        code,
                        serde_json::json!({"apiVersion": "v1", "kind": "Status",
                            "status": "Failure", "reason": reason, "code": code, "message": reason}),
                    )
                };
                assert!(
                    parts
                        .uri
                        .path()
                        .starts_with("/api/v1/namespaces/ambit-system/secrets"),
                    "{}",
                    parts.uri
                );
                let resp = if parts.method == http::Method::GET {
                    match stored.lock().unwrap().clone() {
                        Some(s) => json(200, s),
                        None => status(404, "NotFound"),
                    }
                } else if let Some(theirs) = race.lock().unwrap().take() {
                    *stored.lock().unwrap() = Some(theirs);
                    status(409, "AlreadyExists")
                } else {
                    let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    *stored.lock().unwrap() = Some(created.clone());
                    json(201, created)
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        kube::Client::new(svc, "default")
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn secret_json(ca_dir: &Path) -> serde_json::Value {
        let b64 = |f: &str| ByteString(std::fs::read(ca_dir.join(f)).unwrap());
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ambit-ca-root", "namespace": "ambit-system"},
            "data": {CERT_FILE: b64(CERT_FILE), KEY_FILE: b64(KEY_FILE)}})
    }

    #[tokio::test]
    async fn the_root_is_generated_once_and_shared_through_the_secret() {
        let stored = Arc::new(Mutex::new(None));
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let validity = Duration::from_secs(86_400);
        let first = load_or_create_in_secret(
            api_server(stored.clone(), None),
            "ambit-system",
            "ambit-ca-root",
            a.path(),
            td(),
            validity,
        )
        .await
        .unwrap();
        let secret = stored
            .lock()
            .unwrap()
            .clone()
            .expect("the Secret was created");
        assert!(secret["data"][KEY_FILE].is_string(), "{secret}");
        // Another replica, with an empty state directory, gets the same root.
        let second = load_or_create_in_secret(
            api_server(stored.clone(), None),
            "ambit-system",
            "ambit-ca-root",
            b.path(),
            td(),
            validity,
        )
        .await
        .unwrap();
        assert_eq!(
            first.trust_bundle().roots_pem(),
            second.trust_bundle().roots_pem()
        );
    }

    #[tokio::test]
    async fn losing_the_creation_race_adopts_the_winners_root() {
        let winner_dir = tempfile::tempdir().unwrap();
        let winner = CertificateAuthority::load_or_generate(
            winner_dir.path(),
            td(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        let stored = Arc::new(Mutex::new(None));
        let mine = tempfile::tempdir().unwrap();
        let ca = load_or_create_in_secret(
            api_server(stored, Some(secret_json(winner_dir.path()))),
            "ambit-system",
            "ambit-ca-root",
            mine.path(),
            td(),
            Duration::from_secs(86_400),
        )
        .await
        .unwrap();
        assert_eq!(
            ca.trust_bundle().roots_pem(),
            winner.trust_bundle().roots_pem()
        );
        // The local copy now holds the winner's root too.
        let again =
            CertificateAuthority::load_or_generate(mine.path(), td(), Duration::from_secs(86_400))
                .unwrap();
        assert_eq!(
            again.trust_bundle().roots_pem(),
            winner.trust_bundle().roots_pem()
        );
    }
}
