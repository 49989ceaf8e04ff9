//! The node's enrolled pods: mesh membership from the controller's configuration,
//! capture through [`Capture`], and each pod's identity kept certified by the
//! [`CertManager`]. [`Pods`] is the daemon's [`Enroller`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambit_api::ResourceKind;
use ambit_api::config::v1::{Workload, resource::Kind};
use ambit_cni::protocol::{ContainerId, PodEnrollment, PodRef, PodRemoval};
use ambit_control_client::CertManager;
use ambit_control_client::discovery::ConfigState;
use ambit_identity::SpiffeId;
use tokio::sync::watch;

use crate::capture::{Capture, PodCapture, PodHandle, PodListeners};
use crate::enroll::{AddOutcome, EnrollError, Enroller};
use crate::proxy::{PodProxy, ProxyShared, delivery};

/// The enrolled pods of this node and what they need to serve them.
pub struct Pods {
    capture: Arc<Capture>,
    certs: CertManager,
    config: watch::Receiver<Arc<ConfigState>>,
    proxy: ProxyShared,
    /// How long an ADD waits for the configuration to name the pod.
    membership_wait: Duration,
    pods: Mutex<BTreeMap<Ipv4Addr, LocalPod>>,
}

/// One enrolled pod.
struct LocalPod {
    /// `namespace/name`.
    name: String,
    /// The sandbox enrolled (unknown for pods resumed from a previous daemon).
    container_id: Option<ContainerId>,
    handle: PodHandle,
    identity: Option<SpiffeId>,
    /// The pod's listeners until its proxies take them over (once its identity is
    /// known); held so that they stay bound meanwhile.
    listeners: Option<PodListeners>,
    proxy: Option<PodProxy>,
}

impl LocalPod {
    fn new(
        name: String,
        container_id: Option<ContainerId>,
        handle: PodHandle,
        listeners: PodListeners,
    ) -> Self {
        Self {
            name,
            container_id,
            handle,
            identity: None,
            listeners: Some(listeners),
            proxy: None,
        }
    }

    /// Starts the proxies once the identity is known.
    fn start_proxy(&mut self, shared: &ProxyShared) {
        if let (Some(identity), Some(listeners)) = (&self.identity, self.listeners.take()) {
            self.proxy = Some(PodProxy::spawn(
                shared.clone(),
                self.handle.clone(),
                identity.clone(),
                listeners,
            ));
        }
    }
}

/// A local pod as shown in `/config_dump`.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDump {
    /// `namespace/name`.
    pub name: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The identity its certificate carries, once known from the configuration.
    pub identity: Option<String>,
    /// Whether the enrolment resumed one of a previous daemon.
    pub resumed: bool,
    /// Whether the pod's proxies were started.
    pub proxying: bool,
}

impl Pods {
    /// Pods served with `capture`, membership from `config`, certificates from `certs`.
    pub fn new(
        capture: Arc<Capture>,
        certs: CertManager,
        config: watch::Receiver<Arc<ConfigState>>,
        proxy: ProxyShared,
        membership_wait: Duration,
    ) -> Self {
        Self {
            capture,
            certs,
            config,
            proxy,
            membership_wait,
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Ipv4Addr, LocalPod>> {
        // A panic while holding the lock leaves the map consistent (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-enrols the pods a previous daemon left captured (their links and map entries
    /// are kept; only the listeners are new). Returns how many were resumed.
    pub async fn resume_persisted(&self) -> usize {
        let capture = Arc::clone(&self.capture);
        let persisted = match tokio::task::spawn_blocking(move || capture.persisted_pods()).await {
            Ok(Ok(pods)) => pods,
            Ok(Err(error)) => {
                tracing::error!(error = %error_chain(&error), "reading the persisted pods");
                return 0;
            }
            Err(error) => {
                tracing::error!(%error, "reading the persisted pods");
                return 0;
            }
        };
        let mut resumed = 0;
        for pod in persisted {
            let name = pod.name.clone();
            let ip = pod.ip;
            let capture = Arc::clone(&self.capture);
            match tokio::task::spawn_blocking(move || capture.enroll(pod)).await {
                Ok(Ok(enrolled)) => {
                    let (handle, listeners) = enrolled.into_parts();
                    self.lock()
                        .insert(ip, LocalPod::new(name.clone(), None, handle, listeners));
                    tracing::info!(pod = %name, %ip, "resumed the capture of a pod");
                    resumed += 1;
                }
                Ok(Err(error)) => {
                    tracing::warn!(pod = %name, %ip, error = %error_chain(&error), "could not resume a pod; forgetting it");
                    let capture = Arc::clone(&self.capture);
                    let _ = tokio::task::spawn_blocking(move || capture.forget(ip)).await;
                }
                Err(error) => tracing::error!(pod = %name, %error, "resuming a pod"),
            }
        }
        resumed
    }

    /// Applies a configuration: local pods whose Workload is no longer captured are
    /// un-enrolled; the others get their identity (and a certificate kept renewed);
    /// certificates of identities no local pod has any more are dropped.
    pub async fn reconcile(&self, state: &ConfigState) {
        let mut unenroll = Vec::new();
        let mut fetch = Vec::new();
        {
            let mut pods = self.lock();
            for (ip, pod) in pods.iter_mut() {
                let Some(workload) = find_workload(state, &pod.name, None, Some(*ip)) else {
                    continue;
                };
                if !workload.captured {
                    unenroll.push(*ip);
                    continue;
                }
                match SpiffeId::parse(&workload.spiffe_id) {
                    Ok(id) => {
                        if pod.identity.is_none() {
                            pod.identity = Some(id.clone());
                            fetch.push(id);
                            pod.start_proxy(&self.proxy);
                        } else if pod.identity.as_ref() != Some(&id) {
                            // The proxies keep serving the first identity; a changed
                            // service account means a new pod (and a new ADD) anyway.
                            tracing::warn!(pod = %pod.name, %id, "workload identity changed; keeping the enrolled one");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(pod = %pod.name, %error, "workload has an invalid identity");
                    }
                }
            }
        }
        for ip in unenroll {
            let removed = self.lock().remove(&ip);
            if let Some(pod) = removed {
                tracing::info!(pod = %pod.name, %ip, "pod left the mesh; un-enrolling it");
                if let Err(error) = self.unenroll(pod.handle).await {
                    tracing::warn!(%ip, error = %error_chain(&error), "un-enrolling a pod");
                }
            }
        }
        for id in fetch {
            self.spawn_fetch(id);
        }
        if state.is_ready() {
            let keep = self.identities();
            self.certs.retain(|id| keep.contains(id));
        }
    }

    /// The identities of the local pods (known so far).
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .lock()
            .values()
            .filter_map(|p| p.identity.clone())
            .collect();
        ids.sort_by_key(ToString::to_string);
        ids.dedup();
        ids
    }

    /// Whether every local pod has a known identity with a valid certificate.
    pub fn all_certified(&self) -> bool {
        self.lock().values().all(|p| {
            p.identity
                .as_ref()
                .is_some_and(|id| self.certs.current(id).is_some())
        })
    }

    /// Drains every pod's proxies within `grace` (capture stays: the pods are refused,
    /// never let through in plaintext, until the next daemon resumes them).
    pub async fn drain(&self, grace: Duration) {
        let proxies: Vec<PodProxy> = self
            .lock()
            .values_mut()
            .filter_map(|p| p.proxy.take())
            .collect();
        let tasks: Vec<_> = proxies
            .into_iter()
            .map(|p| tokio::spawn(p.drain(grace)))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The local pods, for `/config_dump`.
    pub fn dump(&self) -> Vec<PodDump> {
        self.lock()
            .iter()
            .map(|(ip, p)| PodDump {
                name: p.name.clone(),
                ip: *ip,
                identity: p.identity.as_ref().map(ToString::to_string),
                resumed: p.handle.resumed(),
                proxying: p.proxy.is_some(),
            })
            .collect()
    }

    fn spawn_fetch(&self, id: SpiffeId) {
        let certs = self.certs.clone();
        tokio::spawn(async move {
            // On failure the manager keeps retrying in its renewal task.
            if let Err(error) = certs.fetch(&id).await {
                tracing::warn!(%id, error = %error_chain(&error), "fetching a certificate");
            }
        });
    }

    /// Removes the pod's delivery routing (best effort: the pod may be going away
    /// anyway) and ends its capture.
    async fn unenroll(&self, handle: PodHandle) -> Result<(), UnenrollError> {
        let capture = Arc::clone(&self.capture);
        let mark = capture.config().delivery_mark.get();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = delivery::teardown(&handle, mark) {
                tracing::warn!(pod = %handle.pod().name, error = %error_chain(&error), "removing the delivery routing");
            }
            capture.unenroll(&handle)
        })
        .await
        .map_err(UnenrollError::Task)?
        .map_err(UnenrollError::Capture)
    }

    /// Waits (up to the membership wait) for a ready configuration that names the pod.
    async fn membership(&self, pod: &PodRef) -> Result<Workload, EnrollError> {
        let mut config = self.config.clone();
        let found = tokio::time::timeout(self.membership_wait, async {
            loop {
                {
                    let state = config.borrow_and_update();
                    if state.is_ready()
                        && let Some(w) =
                            find_workload(&state, &pod.to_string(), pod.uid.as_deref(), None)
                    {
                        return Some(w);
                    }
                }
                if config.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some(w)) => Ok(w),
            _ => {
                let waiting_for = if self.config.borrow().is_ready() {
                    format!("workload {pod} in the controller's configuration")
                } else {
                    "configuration from the controller".to_owned()
                };
                Err(EnrollError::NotReady {
                    pod: pod.clone(),
                    waiting_for,
                })
            }
        }
    }
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods")
            .field("pods", &self.dump())
            .finish_non_exhaustive()
    }
}

impl Enroller for Pods {
    async fn add(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        let workload = self.membership(&pod.pod).await?;
        if !workload.captured {
            return Ok(AddOutcome::NotMeshed {
                reason: format!("workload {} is not enrolled in the mesh", pod.pod),
            });
        }
        let ip = pod.ipv4().ok_or_else(|| EnrollError::NoIpv4 {
            pod: pod.pod.clone(),
        })?;
        let name = pod.pod.to_string();
        let old = {
            let mut pods = self.lock();
            match pods.get(&ip) {
                // A repeated ADD of the enrolled sandbox: nothing to do.
                Some(p)
                    if p.handle.pod().netns == pod.netns
                        && p.container_id
                            .as_ref()
                            .is_none_or(|id| *id == pod.container_id) =>
                {
                    return Ok(AddOutcome::Enrolled);
                }
                _ => pods.remove(&ip),
            }
        };
        // A new sandbox with the IP of an old one: stop the old proxies first, so that
        // their listeners are closed before the new ones bind.
        if let Some(mut old) = old {
            if let Some(proxy) = old.proxy.take() {
                proxy.drain(Duration::ZERO).await;
            }
            drop(old);
        }
        let capture = Arc::clone(&self.capture);
        let spec = PodCapture {
            name: name.clone(),
            netns: pod.netns.clone(),
            ip,
        };
        let enrolled = tokio::task::spawn_blocking(move || capture.enroll(spec))
            .await
            .map_err(|source| EnrollError::Task {
                pod: pod.pod.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Capture {
                pod: pod.pod.clone(),
                source,
            })?;
        let (handle, listeners) = enrolled.into_parts();
        let identity = match SpiffeId::parse(&workload.spiffe_id) {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::warn!(pod = %name, %error, "workload has an invalid identity");
                None
            }
        };
        if let Some(id) = &identity {
            self.spawn_fetch(id.clone());
        }
        let mut local = LocalPod::new(name.clone(), Some(pod.container_id), handle, listeners);
        local.identity = identity;
        local.start_proxy(&self.proxy);
        self.lock().insert(ip, local);
        tracing::info!(pod = %name, %ip, "enrolled a pod");
        Ok(AddOutcome::Enrolled)
    }

    async fn del(&self, pod: PodRemoval) -> Result<(), EnrollError> {
        let name = pod.pod.to_string();
        let removed = {
            let mut pods = self.lock();
            let ip = pods
                .iter()
                .find(|(_, p)| {
                    p.name == name
                        && p.container_id
                            .as_ref()
                            .is_none_or(|id| *id == pod.container_id)
                })
                .map(|(ip, _)| *ip);
            ip.and_then(|ip| pods.remove(&ip))
        };
        let Some(local) = removed else {
            return Ok(());
        };
        self.unenroll(local.handle).await.map_err(|e| match e {
            UnenrollError::Task(source) => EnrollError::Task {
                pod: pod.pod.clone(),
                source,
            },
            UnenrollError::Capture(source) => EnrollError::Capture {
                pod: pod.pod.clone(),
                source,
            },
        })?;
        tracing::info!(pod = %name, "un-enrolled a pod");
        Ok(())
    }

    async fn check(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        let workload = self.membership(&pod.pod).await?;
        if !workload.captured {
            return Ok(AddOutcome::NotMeshed {
                reason: format!("workload {} is not enrolled in the mesh", pod.pod),
            });
        }
        let name = pod.pod.to_string();
        let pods = self.lock();
        let enrolled = pods.values().find(|p| p.name == name);
        match enrolled {
            Some(p) if p.handle.pod().netns == pod.netns => Ok(AddOutcome::Enrolled),
            Some(p) => Err(EnrollError::NotEnrolled {
                pod: pod.pod.clone(),
                detail: format!("; enrolled with netns {}", p.handle.pod().netns.display()),
            }),
            None => Err(EnrollError::NotEnrolled {
                pod: pod.pod.clone(),
                detail: String::new(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum UnenrollError {
    #[error("the un-enrolment task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("un-enrolling")]
    Capture(#[source] crate::capture::CaptureError),
}

/// The Workload of a pod: by uid when known, else by `namespace/name`, else by IP.
fn find_workload(
    state: &ConfigState,
    name: &str,
    uid: Option<&str>,
    ip: Option<Ipv4Addr>,
) -> Option<Workload> {
    let workloads = || {
        state
            .of_kind(ResourceKind::Workload)
            .filter_map(|r| match &r.kind {
                Some(Kind::Workload(w)) => Some(w),
                _ => None,
            })
    };
    if let Some(uid) = uid
        && let Some(w) = workloads().find(|w| w.uid == uid)
    {
        return Some(w.clone());
    }
    if let Some(w) = workloads().find(|w| format!("{}/{}", w.namespace, w.name) == name) {
        return Some(w.clone());
    }
    let ip = IpAddr::V4(ip?);
    workloads()
        .find(|w| {
            w.addresses
                .iter()
                .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
        })
        .cloned()
}

/// An error with its causes, on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ambit_api::config::v1::Resource;

    use super::*;

    fn state(workloads: Vec<Workload>) -> ConfigState {
        let mut s = ConfigState::initial();
        s.resources = workloads
            .into_iter()
            .map(|w| {
                let r = Resource::new(Kind::Workload(w));
                (r.key.clone(), Arc::new(r))
            })
            .collect::<BTreeMap<_, _>>();
        s.synced = true;
        s
    }

    fn workload(uid: &str, ns: &str, name: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: ns.into(),
            name: name.into(),
            addresses: vec![ip.into()],
            captured: true,
            ..Default::default()
        }
    }

    #[test]
    fn workloads_are_found_by_uid_then_name_then_ip() {
        let s = state(vec![
            workload("u1", "production", "checkout-0", "10.0.1.2"),
            workload("u2", "production", "payment-0", "10.0.1.3"),
        ]);
        let by_uid = find_workload(&s, "production/whatever", Some("u2"), None).unwrap();
        assert_eq!(by_uid.name, "payment-0");
        let by_name = find_workload(&s, "production/checkout-0", Some("nope"), None).unwrap();
        assert_eq!(by_name.uid, "u1");
        let by_ip = find_workload(&s, "x/y", None, Some("10.0.1.3".parse().unwrap())).unwrap();
        assert_eq!(by_ip.uid, "u2");
        assert!(find_workload(&s, "x/y", None, Some("10.9.9.9".parse().unwrap())).is_none());
    }
}
