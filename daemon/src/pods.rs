//! The node's pods: every pod the CNI plugin added ([`known`], persisted), the enrolled
//! ones among them, mesh membership from the controller's configuration, capture
//! through [`Capture`], and each enrolled pod's identity kept certified by the
//! [`CertManager`]. [`Pods`] is the daemon's [`Enroller`].
//!
//! A pod is enrolled when its Workload is `captured`: at its CNI ADD, or later, when the
//! configuration starts saying so (its namespace got the ambient label), from the
//! record its ADD left. It is un-enrolled when its Workload stops being captured (the
//! record stays, so it can join again) and forgotten at its DEL. Enrolments and
//! un-enrolments run one at a time.

mod known;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambit_api::ResourceKind;
use ambit_api::config::v1::{Workload, resource::Kind};
use ambit_cni::protocol::{ContainerId, PodEnrollment, PodRef, PodRemoval};
use ambit_control_client::CertManager;
use ambit_control_client::discovery::ConfigState;
use ambit_identity::SpiffeId;
use tokio::sync::watch;

use self::known::{NodePod, NodePods};
use crate::capture::{Capture, PodCapture, PodHandle, PodListeners};
use crate::enroll::{AddOutcome, EnrollError, Enroller};
use crate::netns::Netns;
use crate::proxy::{PodProxy, ProxyShared, delivery};

/// The pods of this node and what they need to serve them.
pub struct Pods {
    capture: Arc<Capture>,
    certs: CertManager,
    config: watch::Receiver<Arc<ConfigState>>,
    proxy: ProxyShared,
    /// How long an ADD waits for the configuration to name the pod.
    membership_wait: Duration,
    /// The enrolled pods.
    pods: Mutex<BTreeMap<Ipv4Addr, LocalPod>>,
    /// Every pod added on the node, meshed or not.
    node_pods: Mutex<NodePods>,
    /// Held by whatever enrols or un-enrols (ADD, DEL, reconcile), so that a DEL never
    /// interleaves with a reconcile enrolling the same pod.
    changes: tokio::sync::Mutex<()>,
}

/// One enrolled pod.
struct LocalPod {
    /// `namespace/name`.
    name: String,
    /// The sandbox enrolled (unknown for pods resumed from a daemon without records).
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

    /// Stops the proxies (no grace: the pod leaves the mesh or is replaced) and closes
    /// the listeners.
    async fn stop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.drain(Duration::ZERO).await;
        }
        self.listeners = None;
    }
}

/// An enrolled pod as shown in `/config_dump`.
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

/// A pod added on the node (meshed or not) as shown in `/config_dump`.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePodDump {
    /// `namespace/name`.
    pub name: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its network namespace handle.
    pub netns: PathBuf,
    /// Whether it is enrolled now.
    pub enrolled: bool,
}

impl Pods {
    /// Pods served with `capture`, membership from `config`, certificates from `certs`;
    /// the node-pod records live under the capture's state directory.
    pub fn new(
        capture: Arc<Capture>,
        certs: CertManager,
        config: watch::Receiver<Arc<ConfigState>>,
        proxy: ProxyShared,
        membership_wait: Duration,
    ) -> Self {
        let records = capture.config().state_dir.join(known::DIR);
        Self {
            capture,
            certs,
            config,
            proxy,
            membership_wait,
            pods: Mutex::new(BTreeMap::new()),
            node_pods: Mutex::new(NodePods::new(records)),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Ipv4Addr, LocalPod>> {
        // A panic while holding the lock leaves the map consistent (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node_pods(&self) -> MutexGuard<'_, NodePods> {
        // As above: single inserts and removes.
        self.node_pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the node-pod records and re-enrols the pods a previous daemon left
    /// captured (their links and map entries are kept; only the listeners are new).
    /// Returns how many were resumed.
    pub async fn resume_persisted(&self) -> usize {
        let _turn = self.changes.lock().await;
        match self.node_pods().load() {
            Ok(problems) => {
                for problem in problems {
                    tracing::warn!(error = %error_chain(&problem), "dropped a node pod record");
                }
            }
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "reading the node pod records");
            }
        }
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
            let netns = pod.netns.clone();
            let capture = Arc::clone(&self.capture);
            match tokio::task::spawn_blocking(move || capture.enroll(pod)).await {
                Ok(Ok(enrolled)) => {
                    let (handle, listeners) = enrolled.into_parts();
                    let container_id = self.adopt_record(&name, &handle);
                    self.lock().insert(
                        ip,
                        LocalPod::new(name.clone(), container_id, handle, listeners),
                    );
                    tracing::info!(pod = %name, %ip, netns = %netns.display(), "resumed the capture of a pod");
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

    /// The container id the node-pod record of a resumed pod names; writes a record
    /// when there is none (a previous daemon did not keep them), so that the pod can
    /// join the mesh again after leaving it.
    fn adopt_record(&self, name: &str, handle: &PodHandle) -> Option<ContainerId> {
        let mut node_pods = self.node_pods();
        if let Some(record) = node_pods.get(handle.ip())
            && record.netns_cookie == handle.netns_cookie()
        {
            return record.container_id.clone();
        }
        let (namespace, pod_name) = name.split_once('/')?;
        let record = NodePod {
            pod: PodRef {
                namespace: namespace.to_owned(),
                name: pod_name.to_owned(),
                uid: None,
            },
            container_id: None,
            netns: handle.pod().netns.clone(),
            netns_cookie: handle.netns_cookie(),
            ip: handle.ip(),
        };
        if let Err(error) = node_pods.insert(record) {
            tracing::warn!(pod = %name, error = %error_chain(&error), "writing a node pod record");
        }
        None
    }

    /// Applies a configuration: enrolled pods whose Workload is no longer captured are
    /// un-enrolled; pods of the node whose Workload is captured now are enrolled; the
    /// enrolled ones get their identity (and a certificate kept renewed); certificates
    /// of identities no local pod has any more are dropped.
    pub async fn reconcile(&self, state: &ConfigState) {
        let _turn = self.changes.lock().await;
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
            if let Some(name) = self.unenroll_ip(ip).await {
                tracing::info!(pod = %name, %ip, "pod left the mesh; un-enrolled it");
            }
        }
        self.enroll_joined(state).await;
        for id in fetch {
            self.spawn_fetch(id);
        }
        if state.is_ready() {
            let keep = self.identities();
            self.certs.retain(|id| keep.contains(id));
        }
    }

    /// Enrols the node's pods that are not enrolled and whose Workload is captured now;
    /// drops the records of pods that are gone (no Workload, no netns).
    async fn enroll_joined(&self, state: &ConfigState) {
        let enrolled: BTreeSet<Ipv4Addr> = self.lock().keys().copied().collect();
        let mut join = Vec::new();
        let mut gone = Vec::new();
        for pod in self.node_pods().iter() {
            if enrolled.contains(&pod.ip) {
                continue;
            }
            match find_workload(state, &pod.name(), pod.pod.uid.as_deref(), Some(pod.ip)) {
                Some(w) if w.captured => join.push((pod.clone(), w)),
                Some(_) => {}
                None if state.is_ready() && !pod.netns.exists() => gone.push(pod.ip),
                None => {}
            }
        }
        for ip in gone {
            match self.node_pods().remove(ip) {
                Ok(Some(pod)) => {
                    tracing::info!(pod = %pod.name(), %ip, "forgot a pod that went away without a DEL");
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%ip, error = %error_chain(&error), "removing a node pod record");
                }
            }
        }
        for (pod, workload) in join {
            match self.enroll_node_pod(&pod, &workload).await {
                Ok(()) => {
                    tracing::info!(pod = %pod.name(), ip = %pod.ip, "pod joined the mesh; enrolled it")
                }
                Err(error) => {
                    tracing::warn!(pod = %pod.name(), ip = %pod.ip, error = %error_chain(&error), "enrolling a pod that joined the mesh");
                }
            }
        }
    }

    /// Sidecar mode: records the one pod this process serves, as a CNI ADD would but
    /// without waiting for the configuration, and enrols it at once when the
    /// configuration already says it is meshed; otherwise the reconcile loop enrols it
    /// once it does.
    pub async fn add_own_pod(
        &self,
        pod: PodRef,
        netns: PathBuf,
        ip: Ipv4Addr,
    ) -> Result<(), EnrollError> {
        let _turn = self.changes.lock().await;
        let path = netns.clone();
        let netns_cookie = tokio::task::spawn_blocking(move || Netns::open(&path)?.cookie())
            .await
            .map_err(|source| EnrollError::Task {
                pod: pod.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Netns {
                pod: pod.clone(),
                source,
            })?;
        let node = NodePod {
            pod,
            container_id: None,
            netns,
            netns_cookie,
            ip,
        };
        if let Err(error) = self.node_pods().insert(node) {
            tracing::warn!(%ip, error = %error_chain(&error), "writing the pod record");
        }
        let state = self.config.borrow().clone();
        self.enroll_joined(&state).await;
        Ok(())
    }

    /// Whether the pod at `ip` is enrolled with its proxies started and a valid
    /// certificate for its identity.
    pub fn serving(&self, ip: Ipv4Addr) -> bool {
        self.lock().get(&ip).is_some_and(|p| {
            p.proxy.is_some()
                && p.identity
                    .as_ref()
                    .is_some_and(|id| self.certs.current(id).is_some())
        })
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

    /// The enrolled pods, for `/config_dump`.
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

    /// Every pod added on the node, for `/config_dump`.
    pub fn node_pods_dump(&self) -> Vec<NodePodDump> {
        let enrolled: BTreeSet<Ipv4Addr> = self.lock().keys().copied().collect();
        self.node_pods()
            .iter()
            .map(|p| NodePodDump {
                name: p.name(),
                ip: p.ip,
                netns: p.netns.clone(),
                enrolled: enrolled.contains(&p.ip),
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

    /// Enrols a pod of the node with its Workload: captures it (replacing a stale
    /// enrolment of its IP), starts its proxies once its identity is known. Call with
    /// the `changes` lock held.
    async fn enroll_node_pod(
        &self,
        node: &NodePod,
        workload: &Workload,
    ) -> Result<(), EnrollError> {
        let ip = node.ip;
        let name = node.name();
        let old = {
            let mut pods = self.lock();
            match pods.get(&ip) {
                // A repeated ADD of the enrolled sandbox: nothing to do.
                Some(p)
                    if p.handle.pod().netns == node.netns
                        && p.handle.netns_cookie() == node.netns_cookie
                        && (p.container_id.is_none()
                            || node.container_id.is_none()
                            || p.container_id == node.container_id) =>
                {
                    return Ok(());
                }
                _ => pods.remove(&ip),
            }
        };
        // A new sandbox with the IP of an old one: stop the old proxies first, so that
        // their listeners are closed before the new ones bind.
        if let Some(mut old) = old {
            old.stop().await;
        }
        let capture = Arc::clone(&self.capture);
        let spec = PodCapture {
            name: name.clone(),
            netns: node.netns.clone(),
            ip,
        };
        let expected = node.netns_cookie;
        let enrolled = tokio::task::spawn_blocking(move || {
            // The path may name another namespace by now (the pod went away without a
            // DEL and its path was reused): never capture that one in this pod's name.
            let found = Netns::open(&spec.netns).and_then(|n| n.cookie());
            match found {
                Ok(cookie) if cookie == expected => {}
                Ok(cookie) => return Ok(Err(cookie)),
                Err(source) => {
                    return Err(crate::capture::CaptureError::PodNetns {
                        pod: spec.name.clone(),
                        source,
                    });
                }
            }
            capture.enroll(spec).map(Ok)
        })
        .await
        .map_err(|source| EnrollError::Task {
            pod: node.pod.clone(),
            source,
        })?
        .map_err(|source| EnrollError::Capture {
            pod: node.pod.clone(),
            source,
        })?;
        let enrolled = match enrolled {
            Ok(enrolled) => enrolled,
            Err(found) => {
                return Err(EnrollError::NetnsReused {
                    pod: node.pod.clone(),
                    netns: node.netns.clone(),
                    expected: expected.0,
                    found: found.0,
                });
            }
        };
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
        let mut local = LocalPod::new(name.clone(), node.container_id.clone(), handle, listeners);
        local.identity = identity;
        local.start_proxy(&self.proxy);
        self.lock().insert(ip, local);
        tracing::info!(pod = %name, %ip, "enrolled a pod");
        Ok(())
    }

    /// Un-enrols the pod enrolled at `ip`, if any: stops its proxies, then removes its
    /// delivery routing and capture. Returns its name. Call with the `changes` lock
    /// held.
    async fn unenroll_ip(&self, ip: Ipv4Addr) -> Option<String> {
        let mut pod = self.lock().remove(&ip)?;
        pod.stop().await;
        if let Err(error) = self.unenroll(pod.handle).await {
            tracing::warn!(pod = %pod.name, %ip, error = %error_chain(&error), "un-enrolling a pod");
        }
        Some(pod.name)
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

    /// The pod's Workload in the latest configuration (which may have changed while an
    /// ADD waited for its turn), else `fallback`.
    fn current_workload(&self, pod: &PodRef, fallback: Workload) -> Workload {
        let state = self.config.borrow();
        find_workload(&state, &pod.to_string(), pod.uid.as_deref(), None).unwrap_or(fallback)
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
        let _turn = self.changes.lock().await;
        let workload = self.current_workload(&pod.pod, workload);
        let not_meshed = || AddOutcome::NotMeshed {
            reason: format!("workload {} is not enrolled in the mesh", pod.pod),
        };
        let Some(ip) = pod.ipv4() else {
            return if workload.captured {
                Err(EnrollError::NoIpv4 {
                    pod: pod.pod.clone(),
                })
            } else {
                Ok(not_meshed())
            };
        };
        // Keep a record of every pod, so that one joining the mesh later can be
        // enrolled (also by a restarted daemon).
        let path = pod.netns.clone();
        let cookie = tokio::task::spawn_blocking(move || Netns::open(&path)?.cookie())
            .await
            .map_err(|source| EnrollError::Task {
                pod: pod.pod.clone(),
                source,
            })?;
        let netns_cookie = match cookie {
            Ok(cookie) => cookie,
            Err(source) if workload.captured => {
                return Err(EnrollError::Netns {
                    pod: pod.pod.clone(),
                    source,
                });
            }
            Err(error) => {
                tracing::warn!(pod = %pod.pod, error = %error_chain(&error), "cannot read the netns of a pod outside the mesh; it cannot join the mesh later");
                return Ok(not_meshed());
            }
        };
        let node = NodePod {
            pod: pod.pod.clone(),
            container_id: Some(pod.container_id.clone()),
            netns: pod.netns.clone(),
            netns_cookie,
            ip,
        };
        if let Err(error) = self.node_pods().insert(node.clone()) {
            tracing::warn!(pod = %pod.pod, error = %error_chain(&error), "writing a node pod record; a restarted daemon will not know the pod");
        }
        if !workload.captured {
            // A stale enrolment of this IP (a pod gone without a DEL) must not capture
            // the new pod's traffic.
            if self
                .lock()
                .get(&ip)
                .is_some_and(|p| p.handle.netns_cookie() != netns_cookie)
                && let Some(name) = self.unenroll_ip(ip).await
            {
                tracing::info!(pod = %name, %ip, "un-enrolled a stale pod whose IP was reused");
            }
            return Ok(not_meshed());
        }
        self.enroll_node_pod(&node, &workload).await?;
        Ok(AddOutcome::Enrolled)
    }

    async fn del(&self, pod: PodRemoval) -> Result<(), EnrollError> {
        let _turn = self.changes.lock().await;
        let name = pod.pod.to_string();
        let same_sandbox = |id: Option<&ContainerId>| id.is_none_or(|id| *id == pod.container_id);
        {
            let mut node_pods = self.node_pods();
            let ip = node_pods
                .iter()
                .find(|p| p.name() == name && same_sandbox(p.container_id.as_ref()))
                .map(|p| p.ip);
            if let Some(ip) = ip
                && let Err(error) = node_pods.remove(ip)
            {
                tracing::warn!(pod = %name, error = %error_chain(&error), "removing a node pod record");
            }
        }
        let ip = self
            .lock()
            .iter()
            .find(|(_, p)| p.name == name && same_sandbox(p.container_id.as_ref()))
            .map(|(ip, _)| *ip);
        let Some(mut local) = ip.and_then(|ip| self.lock().remove(&ip)) else {
            return Ok(());
        };
        local.stop().await;
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
