//! [`Cluster`]: bring a topology up, look at it, run commands and processes in it,
//! tear it down.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard, atomic::AtomicU32, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{
    Error,
    addr::Ipv4Cidr,
    cgroup,
    cmd::ip_in,
    manifests::{self, CLUSTER_FILE, Deleted, ObjectRef},
    names::{ClusterName, PodRef, check_process_name},
    netns, process,
    status::{
        ControlInfo, NamespaceInfo, NodeInfo, Owner, Phase, Place, PodInfo, ProcessInfo,
        STATE_VERSION, ServiceInfo, ServicePort, Status, UnderlayInfo, WaypointInfo,
    },
    teardown::{self, TeardownReport},
    topology::{ECHO_PORTS, GATEWAY_NAME_LABEL, Resolved, Topology},
};

/// Where cluster state directories live unless [`Options::state_root`] says otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/ambit/clusters";
/// The state file inside a cluster's state directory.
pub const STATE_FILE: &str = "state.json";
/// Environment variable naming the cluster, set for every process started in it.
pub const CLUSTER_ENV: &str = "AMBIT_CLUSTER";
/// The default workload's binary, looked up in the binaries directory.
pub const ECHO_BINARY: &str = "ambit-echo";
/// How long `up` waits for the workloads to listen, by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

const UNDERLAY_BRIDGE: &str = "br0";
const NODE_BRIDGE: &str = "cni0";
const ETH: &str = "eth0";
const POLL: Duration = Duration::from_millis(20);

/// How to create or find a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cluster name; every resource carries it.
    pub name: ClusterName,
    /// Directory of the workspace binaries (`ambit-echo`, later the daemons). Needed
    /// for the default workload; programs without `/` are looked up here first.
    pub binaries_dir: Option<PathBuf>,
    /// Parent of the cluster's state directory (default [`DEFAULT_STATE_ROOT`]).
    pub state_root: PathBuf,
    /// The cgroup2 mount (default: found in `/proc/mounts`).
    pub cgroup_mount: Option<PathBuf>,
    /// How long `up` waits for each workload to listen on its ready ports.
    pub ready_timeout: Duration,
    /// When set, `up` also starts the mesh (see [`crate::mesh`]).
    pub mesh: Option<crate::mesh::MeshOptions>,
}

impl Options {
    /// Options for the cluster `name` with defaults for everything else.
    pub fn new(name: ClusterName) -> Self {
        Self {
            name,
            binaries_dir: None,
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            cgroup_mount: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            mesh: None,
        }
    }

    /// Options for a test: a fresh [`ClusterName::unique_for_test`] name, so parallel
    /// tests never collide and `cargo xtask test` can find stale ones.
    pub fn for_test(binaries_dir: impl Into<PathBuf>) -> Self {
        Self::new(ClusterName::unique_for_test()).binaries_dir(binaries_dir)
    }

    /// Sets the binaries directory.
    pub fn binaries_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.binaries_dir = Some(dir.into());
        self
    }

    /// Sets the state root.
    pub fn state_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_root = dir.into();
        self
    }

    /// Sets the readiness deadline of `up`.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Makes `up` start the mesh control plane once the workloads are ready
    /// ([`Cluster::start_mesh_control`]); with [`crate::MeshOptions::daemons`], the
    /// control plane and the node daemons before the workloads, each pod going through
    /// CNI ADD before its workload starts (see the crate docs, "Mesh").
    pub fn mesh(mut self, mesh: crate::mesh::MeshOptions) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// `<state root>/<name>`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_root.join(self.name.as_str())
    }

    pub(crate) fn find_cgroup_mount(&self) -> Result<PathBuf, Error> {
        match &self.cgroup_mount {
            Some(m) => Ok(m.clone()),
            None => cgroup::cgroup2_mount(),
        }
    }
}

/// A running simulated cluster.
///
/// A handle from [`Cluster::up`] owns the cluster: dropping it tears everything down
/// (best effort, failures logged; when the thread is panicking, the tails of the
/// workload logs are printed to stderr first so a failed test shows them). Call
/// [`Cluster::down`] to see teardown errors, or [`Cluster::detach`] to leave the
/// cluster running. A handle from [`Cluster::attach`] does not own the cluster.
///
/// All methods take `&self`; the handle is `Send + Sync`.
#[derive(Debug)]
pub struct Cluster {
    opts: Options,
    cgroup_mount: PathBuf,
    status: Mutex<Status>,
    /// Processes this handle started, kept to reap them.
    children: Mutex<Vec<Child>>,
    owned: bool,
}

/// A process started with [`Cluster::spawn`] and friends.
#[derive(Debug, Clone)]
pub struct Process {
    /// The name given at spawn time.
    pub name: String,
    /// Where it runs.
    pub place: Place,
    /// Process id.
    pub pid: u32,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Its cgroup.
    pub cgroup: PathBuf,
    cgroup_rel: String,
}

impl Cluster {
    /// Builds the cluster described by `topology`: namespaces, links, routes, cgroups,
    /// the config directory, and the workloads, and waits until every workload
    /// listens on its ready ports. Fails if anything named like this cluster exists
    /// already. On failure everything created so far is removed again.
    pub fn up(opts: Options, topology: &Topology) -> Result<Cluster, Error> {
        let resolved = topology.resolve()?;
        let cgroup_mount = opts.find_cgroup_mount()?;
        let status = plan(&opts, &cgroup_mount, topology, &resolved)?;
        check_binaries(&status)?;
        check_absent(&opts.name, &status)?;
        claim_state_dir(&opts, &status)?;
        let cluster = Cluster {
            opts,
            cgroup_mount,
            status: Mutex::new(status),
            children: Mutex::new(Vec::new()),
            owned: true,
        };
        // From here on an error drops `cluster`, which removes what was made.
        tracing::info!(cluster = %cluster.opts.name, "bringing the cluster up");
        cluster.build()?;
        Ok(cluster)
    }

    /// A handle on the running cluster recorded in `opts`' state directory. It does
    /// not own the cluster: dropping it leaves the cluster running.
    /// The binaries directory recorded by `up` applies unless `opts` names one.
    pub fn attach(mut opts: Options) -> Result<Cluster, Error> {
        let status = load_state(&opts.state_dir(), &opts.name)?;
        if opts.binaries_dir.is_none() {
            opts.binaries_dir.clone_from(&status.binaries_dir);
        }
        let cgroup_mount = match status.cgroup_root.parent() {
            Some(m) => m.to_owned(),
            None => opts.find_cgroup_mount()?,
        };
        Ok(Cluster {
            opts,
            cgroup_mount,
            status: Mutex::new(status),
            children: Mutex::new(Vec::new()),
            owned: false,
        })
    }

    /// Tears the cluster down (processes, namespaces, links, routes, cgroups, mounts,
    /// state directory), also the parts only found by name prefix.
    pub fn down(mut self) -> Result<TeardownReport, Error> {
        self.owned = false;
        self.teardown()
    }

    /// Leaves the cluster running when this handle is dropped (for `cargo xtask
    /// cluster up`); the state file no longer names an owner.
    pub fn detach(mut self) -> Result<(), Error> {
        self.owned = false;
        self.lock().owner = None;
        self.save()
    }

    /// The cluster's name.
    pub fn name(&self) -> &ClusterName {
        &self.opts.name
    }

    /// The options the handle was made with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Everything the cluster consists of, with `running` refreshed.
    pub fn status(&self) -> Status {
        self.reap();
        let mut status = self.lock().clone();
        refresh_running(&mut status, &self.cgroup_mount);
        status
    }

    /// The config directory (Kubernetes YAML for a controller's local mode).
    pub fn config_dir(&self) -> PathBuf {
        self.lock().config_dir.clone()
    }

    /// The pod `"namespace/name"`.
    pub fn pod(&self, pod: &str) -> Result<PodInfo, Error> {
        let pod: PodRef = pod.parse()?;
        self.lock()
            .pod(&pod)
            .cloned()
            .ok_or_else(|| Error::UnknownPod(pod.to_string()))
    }

    /// All pods, in topology order.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.lock().pods.clone()
    }

    /// The node `name`.
    pub fn node(&self, name: &str) -> Result<NodeInfo, Error> {
        self.lock()
            .node(name)
            .cloned()
            .ok_or_else(|| Error::UnknownNode(name.to_owned()))
    }

    /// All nodes, in topology order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.lock().nodes.clone()
    }

    /// The Service `"namespace/name"`.
    pub fn service(&self, service: &str) -> Result<ServiceInfo, Error> {
        let r: PodRef = service
            .parse()
            .map_err(|_| Error::UnknownService(service.to_owned()))?;
        self.lock()
            .service(&r.namespace, &r.name)
            .cloned()
            .ok_or_else(|| Error::UnknownService(service.to_owned()))
    }

    /// The control namespace.
    pub fn control(&self) -> ControlInfo {
        self.lock().control.clone()
    }

    /// Path of a workspace binary in the binaries directory, checked to exist.
    pub fn binary(&self, name: &str) -> Result<PathBuf, Error> {
        let dir = self
            .opts
            .binaries_dir
            .as_ref()
            .ok_or(Error::NoBinariesDir)?;
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::MissingBinary { path });
        }
        Ok(path)
    }

    /// A [`Command`] for `program` that runs in `place`'s network namespace and cgroup
    /// (a pod's own cgroup; `<node>/system/exec` or `control/exec` for short-lived
    /// commands elsewhere). A program without `/` is looked up in the binaries
    /// directory first, then in `PATH`. Stdio is inherited unless the caller sets it;
    /// convert it with `tokio::process::Command::from` for async use.
    pub fn command(&self, place: &Place, program: impl AsRef<OsStr>) -> Result<Command, Error> {
        let (netns, cgroup, _) = self.place_paths(place, "exec")?;
        cgroup::create(&cgroup)?;
        let mut cmd = Command::new(resolve_program(
            self.opts.binaries_dir.as_deref(),
            program.as_ref(),
        ));
        cmd.env(crate::CLUSTER_ENV, self.opts.name.as_str());
        process::enter(&mut cmd, &netns, &cgroup, false)?;
        Ok(cmd)
    }

    /// [`Cluster::command`] in the pod `"namespace/name"`.
    pub fn pod_command(&self, pod: &str, program: impl AsRef<OsStr>) -> Result<Command, Error> {
        self.command(&Place::Pod(pod.parse()?), program)
    }

    /// Runs `argv` in the pod `"namespace/name"` (its netns and cgroup) and collects
    /// its output; a non-zero exit is not an error (look at `Output::status`).
    pub fn exec<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<Output, Error> {
        let (program, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
        let mut cmd = self.pod_command(pod, program)?;
        cmd.args(args).stdin(Stdio::null());
        cmd.output().map_err(|source| Error::Spawn {
            what: format!("{:?} in pod {pod}", program.as_ref()),
            source,
        })
    }

    /// Starts a long-running process in `place` under `name` (unique per place):
    /// network namespace and cgroup of the place (`<node>/system/<name>`,
    /// `control/<name>`, or the pod's own cgroup), a new session, stdin from
    /// `/dev/null`, stdout and stderr appended to `logs/<place>_<name>.log`,
    /// `AMBIT_CLUSTER` set. The program is taken as given (see [`Cluster::binary`]).
    /// It is recorded in the state file and killed by `down`.
    pub fn spawn(&self, place: Place, name: &str, mut cmd: Command) -> Result<Process, Error> {
        check_process_name(name).map_err(|reason| Error::InvalidProcessName {
            name: name.to_owned(),
            reason,
        })?;
        self.reap();
        let (netns, cgroup, stem) = self.place_paths(&place, name)?;
        if let Some(p) = self
            .lock()
            .processes
            .iter()
            .find(|p| p.place == place && p.name == name)
            && process::is_alive(
                p.pid,
                Some(&cgroup::relative(&self.cgroup_mount, &p.cgroup)),
            )
        {
            return Err(Error::ProcessRunning {
                name: name.to_owned(),
                place: place.to_string(),
                pid: p.pid,
            });
        }
        cgroup::create(&cgroup)?;
        let log = self.lock().logs_dir.join(format!("{stem}.log"));
        let command: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let pid = self.spawn_detached(
            &mut cmd,
            &netns,
            &cgroup,
            &log,
            &format!("{name} in {place}"),
        )?;
        let info = ProcessInfo {
            name: name.to_owned(),
            place: place.clone(),
            pid,
            cgroup: cgroup.clone(),
            log: log.clone(),
            command,
            running: true,
        };
        {
            let mut st = self.lock();
            st.processes
                .retain(|p| !(p.place == place && p.name == name));
            st.processes.push(info);
        }
        self.save()?;
        let cgroup_rel = cgroup::relative(&self.cgroup_mount, &cgroup);
        Ok(Process {
            name: name.to_owned(),
            place,
            pid,
            log,
            cgroup,
            cgroup_rel,
        })
    }

    /// [`Cluster::spawn`] in the node `node`'s namespace (e.g. the node daemon).
    pub fn spawn_in_node(&self, node: &str, name: &str, cmd: Command) -> Result<Process, Error> {
        self.spawn(Place::Node(node.to_owned()), name, cmd)
    }

    /// [`Cluster::spawn`] in the pod `"namespace/name"`, in the pod's cgroup.
    pub fn spawn_in_pod(&self, pod: &str, name: &str, cmd: Command) -> Result<Process, Error> {
        self.spawn(Place::Pod(pod.parse()?), name, cmd)
    }

    /// [`Cluster::spawn`] in the control namespace (e.g. the controller).
    pub fn spawn_control(&self, name: &str, cmd: Command) -> Result<Process, Error> {
        self.spawn(Place::Control, name, cmd)
    }

    /// Stores the objects in the YAML file `path` in the config directory (one file
    /// per object, written atomically; see [`crate::manifests`]).
    pub fn apply(&self, path: &Path) -> Result<Vec<ObjectRef>, Error> {
        let text = read_manifest(path)?;
        self.apply_yaml_from(&text, &path.display().to_string())
    }

    /// [`Cluster::apply`] for YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> Result<Vec<ObjectRef>, Error> {
        self.apply_yaml_from(yaml, "<string>")
    }

    fn apply_yaml_from(&self, yaml: &str, origin: &str) -> Result<Vec<ObjectRef>, Error> {
        let (dir, generated) = {
            let st = self.lock();
            (st.config_dir.clone(), manifests::generated_refs(&st))
        };
        manifests::apply(&dir, yaml, origin, &generated)
    }

    /// Removes the objects named in the YAML file `path` from the config directory.
    pub fn delete(&self, path: &Path) -> Result<Vec<(ObjectRef, Deleted)>, Error> {
        let text = read_manifest(path)?;
        manifests::delete(&self.config_dir(), &text, &path.display().to_string())
    }

    /// [`Cluster::delete`] for YAML text.
    pub fn delete_yaml(&self, yaml: &str) -> Result<Vec<(ObjectRef, Deleted)>, Error> {
        manifests::delete(&self.config_dir(), yaml, "<string>")
    }

    /// Sets (`Some`) or removes (`None`) the label `key` of the Service
    /// `"namespace/name"` and rewrites the generated objects, which the controller
    /// picks up like any change of the config directory; e.g.
    /// `ambit.dev/use-waypoint: waypoint` sends the Service's traffic through that
    /// waypoint.
    pub fn label_service(
        &self,
        service: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        let r: PodRef = service
            .parse()
            .map_err(|_| Error::UnknownService(service.to_owned()))?;
        check_label(key, value, &format!("service {service} label"))?;
        self.relabel(|st| {
            let svc = st
                .services
                .iter_mut()
                .find(|s| s.namespace == r.namespace && s.name == r.name)
                .ok_or_else(|| Error::UnknownService(service.to_owned()))?;
            set_label(&mut svc.labels, key, value);
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) the label `key` of the Namespace `name`
    /// and rewrites the generated objects (see [`Cluster::label_service`]); e.g.
    /// `ambit.dev/use-waypoint` or `ambit.dev/dataplane-mode`.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) -> Result<(), Error> {
        check_label(key, value, &format!("namespace {name} label"))?;
        self.relabel(|st| {
            let ns = st
                .namespaces
                .iter_mut()
                .find(|n| n.name == name)
                .ok_or_else(|| Error::UnknownNamespace(name.to_owned()))?;
            set_label(&mut ns.labels, key, value);
            Ok(())
        })
    }

    /// Applies `change` to the status, then rewrites `00-cluster.yaml` and the state
    /// file.
    fn relabel(&self, change: impl FnOnce(&mut Status) -> Result<(), Error>) -> Result<(), Error> {
        let (path, yaml) = {
            let mut st = self.lock();
            change(&mut st)?;
            (st.cluster_config.clone(), manifests::cluster_yaml(&st)?)
        };
        manifests::write_atomic(&path, yaml.as_bytes())?;
        self.save()
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        // A panic while holding the lock leaves the status usable: it is plain data.
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self) -> Result<(), Error> {
        let (path, json) = {
            let st = self.lock();
            (
                st.state_file(),
                serde_json::to_vec_pretty(&*st).map_err(Error::Json)?,
            )
        };
        manifests::write_atomic(&path, &json)
    }

    /// Records the mesh control plane in the state file.
    pub(crate) fn set_mesh(&self, mesh: Option<crate::mesh::MeshInfo>) -> Result<(), Error> {
        self.lock().mesh = mesh;
        self.save()
    }

    /// The network namespace handle of a place.
    pub(crate) fn netns_path_of(&self, place: &Place) -> Result<PathBuf, Error> {
        Ok(self.place_paths(place, "exec")?.0)
    }

    /// Network namespace handle, cgroup directory and log stem of a place.
    fn place_paths(&self, place: &Place, name: &str) -> Result<(PathBuf, PathBuf, String), Error> {
        let st = self.lock();
        Ok(match place {
            Place::Control => (
                st.control.netns_path(),
                st.control.cgroup.join(name),
                format!("control_{name}"),
            ),
            Place::Node(n) => {
                let node = st.node(n).ok_or_else(|| Error::UnknownNode(n.clone()))?;
                (
                    node.netns_path(),
                    node.system_cgroup.join(name),
                    format!("node_{n}_{name}"),
                )
            }
            Place::Pod(p) => {
                let pod = st.pod(p).ok_or_else(|| Error::UnknownPod(p.to_string()))?;
                (
                    pod.netns_path(),
                    pod.cgroup.clone(),
                    format!("pod_{}_{name}", p.file_stem()),
                )
            }
        })
    }

    fn spawn_detached(
        &self,
        cmd: &mut Command,
        netns: &Path,
        cgroup: &Path,
        log: &Path,
        what: &str,
    ) -> Result<u32, Error> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| Error::Io {
                op: "opening log",
                path: log.to_owned(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| Error::Io {
            op: "duplicating log",
            path: log.to_owned(),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(crate::CLUSTER_ENV, self.opts.name.as_str());
        // The output goes to a file: ask for no terminal colours unless told otherwise.
        if !cmd.get_envs().any(|(k, _)| k == "NO_COLOR") {
            cmd.env("NO_COLOR", "1");
        }
        process::enter(cmd, netns, cgroup, true)?;
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what: what.to_owned(),
            source,
        })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
        Ok(pid)
    }

    /// Collects exited children so they do not linger as zombies.
    fn reap(&self) {
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// Exit status of a child of this handle that has exited (and is reaped now).
    fn exited(&self, pid: u32) -> Option<std::process::ExitStatus> {
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut exited = None;
        children.retain_mut(|c| {
            if c.id() != pid {
                return true;
            }
            // try_wait reaps the child when it has exited.
            exited = c.try_wait().ok().flatten();
            exited.is_none()
        });
        exited
    }

    fn build(&self) -> Result<(), Error> {
        let st = self.lock().clone();
        create_cgroups(&st)?;
        create_network(&st)?;
        manifests::write_atomic(&st.cluster_config, manifests::cluster_yaml(&st)?.as_bytes())?;
        match &self.opts.mesh {
            // Sidecar mode: each meshed pod's sidecar is ready (its pod captured)
            // before the pod's workload starts, as with Istio's
            // holdApplicationUntilProxyStarts; no node daemons, no CNI calls.
            Some(mesh) if mesh.daemons && mesh.mode.is_sidecar() => {
                self.start_mesh_control(mesh)?;
                self.start_mesh_sidecars(mesh)?;
                if mesh.mode == crate::mesh::DataPlaneMode::SidecarL7 {
                    self.start_mesh_l7_engines(mesh)?;
                }
                self.start_workloads(&st, false)?;
                self.wait_ready()?;
                self.start_mesh_waypoints(mesh)?;
            }
            // The data plane comes before the workloads: a pod is handed to the CNI
            // plugin, and so to its node's daemon, before it runs, as under a kubelet.
            Some(mesh) if mesh.daemons => {
                self.start_mesh_control(mesh)?;
                self.start_mesh_daemons(mesh)?;
                self.start_workloads(&st, true)?;
                self.wait_ready()?;
                self.start_mesh_waypoints(mesh)?;
            }
            mesh => {
                self.start_workloads(&st, false)?;
                self.wait_ready()?;
                if let Some(mesh) = mesh {
                    self.start_mesh_control(mesh)?;
                    self.start_mesh_waypoints(mesh)?;
                }
            }
        }
        self.lock().phase = Phase::Running;
        self.save()?;
        tracing::info!(cluster = %self.opts.name, "cluster is up");
        Ok(())
    }

    fn start_workloads(&self, st: &Status, cni_add: bool) -> Result<(), Error> {
        for pod in &st.pods {
            if cni_add {
                self.cni_add(pod)?;
            }
            if pod.waypoint.is_some() {
                continue; // the mesh runs `ambit-waypoint` in it
            }
            let (program, args) = pod.command.split_first().ok_or(Error::EmptyCommand)?;
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env("POD_NAME", &pod.name)
                .env("POD_NAMESPACE", &pod.namespace)
                .env("POD_IP", pod.ip.to_string())
                .env("NODE_NAME", &pod.node)
                .env("SERVICE_ACCOUNT", &pod.service_account);
            let pid = self.spawn_detached(
                &mut cmd,
                &pod.netns_path(),
                &pod.cgroup,
                &pod.log,
                &format!("workload of pod {}", pod.pod_ref()),
            )?;
            if let Some(p) = self
                .lock()
                .pods
                .iter_mut()
                .find(|p| p.namespace == pod.namespace && p.name == pod.name)
            {
                p.pid = Some(pid);
            }
        }
        self.save()
    }

    /// CNI ADD for `pod` through the `ambit-cni` plugin, in the pod's node, pointed at
    /// that node's daemon. Recorded in the state file first, so that teardown calls
    /// DEL even when ADD fails halfway (as a runtime does).
    fn cni_add(&self, pod: &PodInfo) -> Result<(), Error> {
        let plugin = self.binary(crate::cni::CNI_BINARY)?;
        let pod_ref = pod.pod_ref();
        let call = {
            let mut st = self.lock();
            let socket = st
                .mesh
                .as_ref()
                .and_then(|m| m.daemons.iter().find(|d| d.node == pod.node))
                .map(|d| d.cni_socket.clone())
                .ok_or(Error::MeshNotStarted)?;
            let uid = manifests::pod_uid(&st, &pod.namespace, &pod.name);
            let cni = crate::cni::PodCni {
                container_id: uid.clone(),
                uid,
                socket,
                added: false,
                notes: Vec::new(),
            };
            let p = st
                .pods
                .iter_mut()
                .find(|p| p.pod_ref() == pod_ref)
                .ok_or_else(|| Error::UnknownPod(pod_ref.to_string()))?;
            p.cni = Some(cni);
            let p = p.clone();
            crate::cni::call_for(
                &st,
                &p,
                crate::cni::CniCommand::Add,
                crate::cni::ADD_TIMEOUT,
            )
            .ok_or_else(|| Error::UnknownNode(pod.node.clone()))?
        };
        self.save()?;
        let cmd = self.command(&Place::Node(pod.node.clone()), &plugin)?;
        let out = call.run(cmd, self.opts.name.as_str())?;
        tracing::info!(cluster = %self.opts.name, pod = %pod_ref, notes = ?out.notes, "CNI ADD ok");
        if let Some(cni) = self
            .lock()
            .pods
            .iter_mut()
            .find(|p| p.pod_ref() == pod_ref)
            .and_then(|p| p.cni.as_mut())
        {
            cni.added = true;
            cni.notes = out.notes;
        }
        self.save()
    }

    fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        let mut pending: Vec<PodInfo> = self.lock().pods.clone();
        loop {
            let mut still = Vec::new();
            for pod in pending {
                let Some(pid) = pod.pid else { continue };
                if let Some(status) = self.exited(pid) {
                    return Err(Error::Exited {
                        what: format!("workload of pod {}", pod.pod_ref()),
                        status: status.to_string(),
                        log: pod.log.clone(),
                        tail: process::log_tail(&pod.log, 20),
                    });
                }
                let listening = process::listening_ports(pid);
                if !pod.ready_ports.iter().all(|p| listening.contains(p)) {
                    still.push(pod);
                }
            }
            pending = still;
            let Some(pod) = pending.first() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(Error::NotListening {
                    what: format!("workload of pod {}", pod.pod_ref()),
                    ports: pod.ready_ports.clone(),
                    timeout: self.opts.ready_timeout,
                    log: pod.log.clone(),
                    tail: process::log_tail(&pod.log, 20),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn teardown(&self) -> Result<TeardownReport, Error> {
        let status = self.lock().clone();
        let mut children = std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        teardown::teardown(
            &self.opts.name,
            &self.opts.state_dir(),
            Some(&self.cgroup_mount),
            Some(&status),
            &mut children,
        )
    }

    fn print_logs_for_failed_test(&self) {
        let st = self.lock().clone();
        eprintln!(
            "--- simulated cluster {}: logs (the test failed) ---",
            st.name
        );
        let logs = st
            .pods
            .iter()
            .map(|p| (p.pod_ref().to_string(), p.log.clone()));
        let logs = logs.chain(
            st.processes
                .iter()
                .map(|p| (format!("{} ({})", p.name, p.place), p.log.clone())),
        );
        for (what, log) in logs {
            eprintln!(
                "--- {what}: {}\n{}",
                log.display(),
                process::log_tail(&log, 30)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::thread::panicking() {
            self.print_logs_for_failed_test();
        }
        if let Err(e) = self.teardown() {
            let e = crate::error_chain(&e);
            tracing::error!(cluster = %self.opts.name, error = %e, "tearing the cluster down");
            eprintln!("simulated cluster {}: teardown failed: {e}", self.opts.name);
        }
    }
}

impl Process {
    /// Whether the process is alive (and still the one that was started).
    pub fn is_running(&self) -> bool {
        process::is_alive(self.pid, Some(&self.cgroup_rel))
    }

    /// Sends SIGKILL.
    pub fn kill(&self) {
        if self.is_running() {
            process::kill(self.pid.cast_signed());
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if self.is_running() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid.cast_signed()),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }

    /// Waits until the process's network namespace has a TCP listener on every port
    /// in `ports`, failing early (with the log tail) if the process dies.
    pub fn wait_listening(&self, ports: &[u16], timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return Err(Error::Exited {
                    what: format!("{} in {}", self.name, self.place),
                    status: "gone".to_owned(),
                    log: self.log.clone(),
                    tail: self.log_tail(20),
                });
            }
            let listening = process::listening_ports(self.pid);
            if ports.iter().all(|p| listening.contains(p)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotListening {
                    what: format!("{} in {}", self.name, self.place),
                    ports: ports.to_vec(),
                    timeout,
                    log: self.log.clone(),
                    tail: self.log_tail(20),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Reads and parses a state file.
pub(crate) fn load_state(state_dir: &Path, name: &ClusterName) -> Result<Status, Error> {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                name: name.to_string(),
                path,
            });
        }
        Err(source) => {
            return Err(Error::Io {
                op: "reading",
                path,
                source,
            });
        }
    };
    let status: Status = serde_json::from_slice(&text).map_err(|source| Error::CorruptState {
        path: path.clone(),
        source,
    })?;
    if status.version != STATE_VERSION || status.name != *name {
        return Err(Error::CorruptState {
            path,
            source: serde::de::Error::custom(format!(
                "state of cluster {} version {}",
                status.name, status.version
            )),
        });
    }
    Ok(status)
}

fn read_manifest(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| {
        manifests::ManifestError::Read {
            path: path.to_owned(),
            source,
        }
        .into()
    })
}

fn resolve_program(binaries_dir: Option<&Path>, program: &OsStr) -> PathBuf {
    let p = Path::new(program);
    if p.components().count() == 1
        && let Some(dir) = binaries_dir
        && dir.join(p).is_file()
    {
        return dir.join(p);
    }
    p.to_owned()
}

/// Computes the whole cluster description from the topology, before anything exists.
pub(crate) fn plan(
    opts: &Options,
    cgroup_mount: &Path,
    topology: &Topology,
    r: &Resolved,
) -> Result<Status, Error> {
    let name = &opts.name;
    let state_dir = opts.state_dir();
    let config_dir = state_dir.join("config");
    let logs_dir = state_dir.join("logs");
    let cgroup_root = cgroup_mount.join(name.cgroup_dir_name());
    let nodes: Vec<NodeInfo> = r
        .nodes
        .iter()
        .map(|n| NodeInfo {
            name: n.name.clone(),
            netns: name.node_netns(&n.name),
            ip: n.ip,
            pod_cidr: n.pod_cidr,
            gateway: n.gateway,
            bridge: NODE_BRIDGE.to_owned(),
            pods_cgroup: cgroup_root.join(&n.name).join("pods"),
            system_cgroup: cgroup_root.join(&n.name).join("system"),
        })
        .collect();
    let mut pods = Vec::with_capacity(r.pods.len());
    for rp in &r.pods {
        let pod_ref = PodRef::new(&rp.namespace, &rp.name);
        let node = nodes
            .iter()
            .find(|n| n.name == rp.node)
            .ok_or_else(|| Error::UnknownNode(rp.node.clone()))?;
        let Some(wl) = topology.workload(rp) else {
            if let Some(wp) = topology.waypoint(rp) {
                pods.push(PodInfo {
                    namespace: rp.namespace.clone(),
                    name: rp.name.clone(),
                    workload: wp.name.clone(),
                    node: rp.node.clone(),
                    netns: name.pod_netns(&pod_ref),
                    ip: rp.ip,
                    gateway: node.gateway,
                    cgroup: node.pods_cgroup.join(pod_ref.file_stem()),
                    service_account: wp.name.clone(),
                    labels: BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), wp.name.clone())]),
                    command: Vec::new(),
                    ready_ports: Vec::new(),
                    pid: None,
                    log: logs_dir.join(format!("pod_{}.log", pod_ref.file_stem())),
                    running: false,
                    cni: None,
                    waypoint: Some(wp.name.clone()),
                });
            }
            continue;
        };
        let (command, ready_ports) = match &wl.command {
            Some(cmd) => {
                let mut cmd = cmd.clone();
                cmd[0] = resolve_program(opts.binaries_dir.as_deref(), OsStr::new(&cmd[0]))
                    .to_string_lossy()
                    .into_owned();
                (cmd, wl.ready_ports.clone().unwrap_or_default())
            }
            None => {
                let dir = opts.binaries_dir.as_ref().ok_or(Error::NoBinariesDir)?;
                let mut cmd = vec![
                    dir.join(crate::ECHO_BINARY).to_string_lossy().into_owned(),
                    "serve".to_owned(),
                    "--pod".to_owned(),
                    rp.name.clone(),
                    "--namespace".to_owned(),
                    rp.namespace.clone(),
                ];
                if let Some(v) = wl.labels.get("version") {
                    cmd.extend(["--version".to_owned(), v.clone()]);
                }
                (
                    cmd,
                    wl.ready_ports
                        .clone()
                        .unwrap_or_else(|| ECHO_PORTS.to_vec()),
                )
            }
        };
        pods.push(PodInfo {
            namespace: rp.namespace.clone(),
            name: rp.name.clone(),
            workload: wl.name.clone(),
            node: rp.node.clone(),
            netns: name.pod_netns(&pod_ref),
            ip: rp.ip,
            gateway: node.gateway,
            cgroup: node.pods_cgroup.join(pod_ref.file_stem()),
            service_account: wl.service_account.clone(),
            labels: wl.labels.clone(),
            command,
            ready_ports,
            pid: None,
            log: logs_dir.join(format!("pod_{}.log", pod_ref.file_stem())),
            running: false,
            cni: None,
            waypoint: None,
        });
    }
    let services = r
        .services
        .iter()
        .map(|rs| {
            let spec = topology
                .namespaces
                .iter()
                .find(|n| n.name == rs.namespace)
                .and_then(|n| n.services.iter().find(|s| s.name == rs.name));
            let selector = spec.map(|s| s.selector.clone()).unwrap_or_default();
            let labels = spec.map(|s| s.labels.clone()).unwrap_or_default();
            let ports = spec
                .map(|s| {
                    s.ports
                        .iter()
                        .map(|p| ServicePort {
                            name: p.name.clone(),
                            port: p.port,
                            target_port: p.target_port.unwrap_or(p.port),
                            protocol: p.protocol,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let endpoints = pods
                .iter()
                .filter(|p| p.namespace == rs.namespace && selects(&selector, &p.labels))
                .map(PodInfo::pod_ref)
                .collect();
            ServiceInfo {
                namespace: rs.namespace.clone(),
                name: rs.name.clone(),
                cluster_ip: rs.cluster_ip,
                selector,
                labels,
                ports,
                endpoints,
            }
        })
        .collect();
    Ok(Status {
        version: STATE_VERSION,
        name: name.clone(),
        phase: Phase::Creating,
        owner: Owner::current(),
        cluster_config: config_dir.join(CLUSTER_FILE),
        config_dir,
        logs_dir,
        state_dir,
        cgroup_root: cgroup_root.clone(),
        binaries_dir: opts.binaries_dir.clone(),
        underlay: UnderlayInfo {
            netns: name.underlay_netns(),
            bridge: UNDERLAY_BRIDGE.to_owned(),
            cidr: topology.network.underlay_cidr,
        },
        control: ControlInfo {
            netns: name.control_netns(),
            ip: r.control_ip,
            cgroup: cgroup_root.join("control"),
        },
        nodes,
        namespaces: topology
            .namespaces
            .iter()
            .map(|n| NamespaceInfo {
                name: n.name.clone(),
                labels: n.labels.clone(),
            })
            .collect(),
        waypoints: topology
            .namespaces
            .iter()
            .flat_map(|ns| {
                ns.waypoints.iter().map(|wp| WaypointInfo {
                    namespace: ns.name.clone(),
                    name: wp.name.clone(),
                    waypoint_for: wp.waypoint_for.clone(),
                    pods: pods
                        .iter()
                        .filter(|p| {
                            p.namespace == ns.name && p.waypoint.as_deref() == Some(&wp.name)
                        })
                        .map(PodInfo::pod_ref)
                        .collect(),
                })
            })
            .collect(),
        pods,
        services,
        processes: Vec::new(),
        mesh: None,
    })
}

fn check_label(key: &str, value: Option<&str>, field: &str) -> Result<(), Error> {
    let labels = BTreeMap::from([(key.to_owned(), value.unwrap_or_default().to_owned())]);
    crate::topology::check_labels(&labels, field).map_err(Error::from)
}

fn set_label(labels: &mut BTreeMap<String, String>, key: &str, value: Option<&str>) {
    match value {
        Some(v) => {
            labels.insert(key.to_owned(), v.to_owned());
        }
        None => {
            labels.remove(key);
        }
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn check_binaries(st: &Status) -> Result<(), Error> {
    for pod in &st.pods {
        let Some(program) = pod.command.first() else {
            continue;
        };
        let p = Path::new(program);
        if p.is_absolute() && !p.is_file() {
            return Err(Error::MissingBinary { path: p.to_owned() });
        }
    }
    Ok(())
}

fn check_absent(name: &ClusterName, st: &Status) -> Result<(), Error> {
    let exists = |found: String| {
        Err(Error::AlreadyExists {
            name: name.to_string(),
            found,
        })
    };
    if st.state_dir.exists() {
        return exists(format!("state directory {}", st.state_dir.display()));
    }
    let prefix = name.netns_prefix();
    let leftovers: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if !leftovers.is_empty() {
        return exists(format!("network namespaces {}", leftovers.join(", ")));
    }
    if st.cgroup_root.exists() {
        return exists(format!("cgroup {}", st.cgroup_root.display()));
    }
    Ok(())
}

/// Creates the state directory atomically, with `state.json`, `config/` and `logs/`
/// already inside: a directory is prepared under a hidden name and renamed into place
/// without replacing anything, so a concurrent `up` of the same name loses cleanly and
/// the leftover scan never sees a state directory without a state file.
fn claim_state_dir(opts: &Options, st: &Status) -> Result<(), Error> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { op, path, source }
    };
    std::fs::create_dir_all(&opts.state_root).map_err(io("creating", &opts.state_root))?;
    let tmp = opts.state_root.join(format!(
        ".claim.{}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        opts.name
    ));
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(io("creating", &tmp))?;
        std::fs::create_dir(tmp.join("config")).map_err(io("creating", &tmp))?;
        std::fs::create_dir(tmp.join("logs")).map_err(io("creating", &tmp))?;
        let json = serde_json::to_vec_pretty(st).map_err(Error::Json)?;
        std::fs::write(tmp.join(STATE_FILE), json).map_err(io("writing", &tmp))?;
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &tmp,
            nix::fcntl::AT_FDCWD,
            &st.state_dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
                Err(Error::AlreadyExists {
                    name: opts.name.to_string(),
                    found: format!("state directory {}", st.state_dir.display()),
                })
            }
            Err(e) => Err(Error::Io {
                op: "renaming into place",
                path: st.state_dir.clone(),
                source: e.into(),
            }),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn create_cgroups(st: &Status) -> Result<(), Error> {
    cgroup::create(&st.cgroup_root)?;
    // `control` first: it marks the directory as a cluster root for the leftover scan.
    cgroup::create(&st.control.cgroup)?;
    for node in &st.nodes {
        if let Some(parent) = node.pods_cgroup.parent() {
            cgroup::create(parent)?;
        }
        cgroup::create(&node.pods_cgroup)?;
        cgroup::create(&node.system_cgroup)?;
    }
    for pod in &st.pods {
        cgroup::create(&pod.cgroup)?;
    }
    Ok(())
}

/// Host number of `ip` inside `cidr`, used to name a veth after the address behind it.
pub(crate) fn host_number(cidr: &Ipv4Cidr, ip: std::net::Ipv4Addr) -> u32 {
    u32::from(ip) - u32::from(cidr.network())
}

fn create_network(st: &Status) -> Result<(), Error> {
    let underlay = &st.underlay.netns;
    let ucidr = st.underlay.cidr;
    netns::add(underlay)?;
    ip_in(
        underlay,
        &["link", "add", UNDERLAY_BRIDGE, "type", "bridge"],
    )?;
    ip_in(underlay, &["link", "set", UNDERLAY_BRIDGE, "up"])?;

    // A namespace on the underlay: eth0 with `ip`, its peer `veth<host>` on br0.
    let join_underlay = |ns: &str, ip: std::net::Ipv4Addr| -> Result<(), Error> {
        let peer = format!("veth{}", host_number(&ucidr, ip));
        ip_in(
            underlay,
            &[
                "link", "add", &peer, "type", "veth", "peer", "name", ETH, "netns", ns,
            ],
        )?;
        ip_in(
            underlay,
            &["link", "set", &peer, "master", UNDERLAY_BRIDGE, "up"],
        )?;
        ip_in(ns, &["addr", "add", &ucidr.with_host(ip), "dev", ETH])?;
        ip_in(ns, &["link", "set", ETH, "up"])?;
        Ok(())
    };

    netns::add(&st.control.netns)?;
    join_underlay(&st.control.netns, st.control.ip)?;
    for node in &st.nodes {
        let ip = node.ip.to_string();
        ip_in(
            &st.control.netns,
            &[
                "route",
                "add",
                &node.pod_cidr.to_string(),
                "via",
                &ip,
                "dev",
                ETH,
            ],
        )?;
    }

    for node in &st.nodes {
        netns::add(&node.netns)?;
        join_underlay(&node.netns, node.ip)?;
        ip_in(&node.netns, &["link", "add", NODE_BRIDGE, "type", "bridge"])?;
        ip_in(
            &node.netns,
            &[
                "addr",
                "add",
                &node.pod_cidr.with_host(node.gateway),
                "dev",
                NODE_BRIDGE,
            ],
        )?;
        ip_in(&node.netns, &["link", "set", NODE_BRIDGE, "up"])?;
        netns::sysctl(&node.netns, "net.ipv4.ip_forward", "1")?;
        for other in st.nodes.iter().filter(|o| o.name != node.name) {
            let via = other.ip.to_string();
            ip_in(
                &node.netns,
                &[
                    "route",
                    "add",
                    &other.pod_cidr.to_string(),
                    "via",
                    &via,
                    "dev",
                    ETH,
                ],
            )?;
        }
    }

    for pod in &st.pods {
        let node = st
            .node(&pod.node)
            .ok_or_else(|| Error::UnknownNode(pod.node.clone()))?;
        netns::add(&pod.netns)?;
        let peer = format!("veth{}", host_number(&node.pod_cidr, pod.ip));
        ip_in(
            &node.netns,
            &[
                "link", "add", &peer, "type", "veth", "peer", "name", ETH, "netns", &pod.netns,
            ],
        )?;
        ip_in(
            &node.netns,
            &["link", "set", &peer, "master", NODE_BRIDGE, "up"],
        )?;
        ip_in(
            &pod.netns,
            &["addr", "add", &node.pod_cidr.with_host(pod.ip), "dev", ETH],
        )?;
        ip_in(&pod.netns, &["link", "set", ETH, "up"])?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &pod.gateway.to_string(),
                "dev",
                ETH,
            ],
        )?;
    }
    Ok(())
}

fn refresh_running(st: &mut Status, cgroup_mount: &Path) {
    for pod in &mut st.pods {
        let rel = cgroup::relative(cgroup_mount, &pod.cgroup);
        pod.running = pod
            .pid
            .is_some_and(|pid| process::is_alive(pid, Some(&rel)));
    }
    for p in &mut st.processes {
        let rel = cgroup::relative(cgroup_mount, &p.cgroup);
        p.running = process::is_alive(p.pid, Some(&rel));
    }
}
