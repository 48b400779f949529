//! One worker per pod (by uid): sandbox (netns + CNI ADD + cgroup + the
//! mount namespace with the pod's /etc files), volumes, init containers
//! (in order, each to success, retried with back-off), the containers
//! (image resolved, own mount and PID namespaces, own cgroup with its
//! device rules, start, restart with back-off, probes), status, and
//! graceful termination
//! (SIGTERM, grace period, SIGKILL, CNI DEL, netns, mount namespace and
//! cgroup removed, then the final delete with gracePeriodSeconds=0).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    process::Child,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    Shared, cni, env, etc,
    image::{self, Image},
    mntns, mounts,
    probes::{self, Outcome, Tracker},
    process::{self, PidNs, Placement, ProcMount},
    sandbox,
    security::{self, Security},
    state::{PodState, Term, log_path, pod_dir},
    volumes::{self, PodVolumes},
};
use crate::controllers::util::now;

const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// In-memory state of a container that need not survive a restart.
#[derive(Default)]
struct Live {
    child: Option<Child>,
    backoff: Duration,
    backoff_until: Option<Instant>,
    started_instant: Option<Instant>,
    startup: Tracker,
    liveness: Tracker,
    readiness: Tracker,
    kill_deadline: Option<Instant>,
    last_error: Option<String>,
    /// The image has no mapping: (message, failed attempts).
    image_error: Option<(String, u32)>,
    /// securityContext or volumeMounts that cannot be honoured.
    config_error: Option<String>,
    security: Option<Security>,
}

pub struct Worker {
    shared: Arc<Shared>,
    st: PodState,
    live: HashMap<String, Live>,
    /// (type → (status, lastTransitionTime)) for stable timestamps.
    cond_times: HashMap<String, (String, Value)>,
    last_status: Option<Value>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Instant>,
    volumes: Option<PodVolumes>,
    volume_error: Option<String>,
    volume_retry: Option<Instant>,
    terminating_since: Option<(Instant, Instant)>,
    /// The pause process of a `shareProcessNamespace` pod, when this
    /// kubelet started it (an adopted one is only known by pid).
    pause: Option<Child>,
}

fn container_id(uid: &str, name: &str, restart: i32) -> String {
    format!("riptide://{uid}-{name}-{restart}")
}

impl Worker {
    pub fn new(shared: Arc<Shared>, pod: &Pod, adopted: Option<PodState>) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let st = adopted.unwrap_or_else(|| PodState {
            uid: uid.clone(),
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            host_network,
            netns: (!host_network).then(|| sandbox::netns_name(&shared.cfg.node_name, &uid)),
            cgroup: sandbox::cgroup_dir(&shared.cfg.cgroup_root, &uid),
            ..Default::default()
        });
        Self {
            shared,
            st,
            live: HashMap::new(),
            cond_times: HashMap::new(),
            last_status: None,
            sandbox_error: None,
            sandbox_retry: None,
            volumes: None,
            volume_error: None,
            volume_retry: None,
            terminating_since: None,
            pause: None,
        }
    }

    fn save(&self) {
        if let Err(e) = self.st.save(&self.shared.cfg.root_dir) {
            tracing::warn!(pod = %self.st.name, error = %e, "saving pod state");
        }
    }

    fn placement(&self) -> Placement {
        Placement {
            netns: self.st.netns.as_ref().map(|n| sandbox::netns_path(n)),
            mntns: self.st.mntns.clone(),
            // State of an earlier kubelet may predate `hostname`.
            hostname: (!self.st.host_network).then(|| self.st.hostname.clone().unwrap_or_else(|| self.st.name.clone())),
            cgroup: Some(self.st.cgroup.clone()),
            join_uts_of: None,
            security: None,
            pidns: PidNs::Host,
            proc_mount: ProcMount::Inherit,
        }
    }

    /// The PID namespace a container of `pod` starts in. upstream: the
    /// node's with `hostPID` (whatever `privileged` says); with
    /// `shareProcessNamespace` the pod's, whose PID 1 is a pause process
    /// (started here when there is none alive); else one per container,
    /// the container's process its PID 1.
    fn pid_namespace(&mut self, pod: &Pod) -> Result<PidNs, super::Error> {
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_pid).unwrap_or(false) {
            return Ok(PidNs::Host);
        }
        if !spec.and_then(|s| s.share_process_namespace).unwrap_or(false) {
            return Ok(PidNs::New);
        }
        if let Some((pid, ticks)) = self.st.pause.filter(|(pid, ticks)| process::alive(*pid, *ticks)) {
            tracing::trace!(pod = %self.st.name, pid, ticks, "pause process alive");
            return Ok(PidNs::Pod(format!("/proc/{pid}/ns/pid").into()));
        }
        if let Some(mut old) = self.pause.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let child = process::spawn_pause(&self.st.cgroup)?;
        let pid = i32::try_from(child.id()).map_err(|_| super::Error::Process("pause pid out of range".into()))?;
        self.st.pause = Some((pid, process::start_ticks(pid).unwrap_or(0)));
        self.pause = Some(child);
        self.save();
        tracing::info!(pod = %self.st.name, pid, "started pause process");
        Ok(PidNs::Pod(format!("/proc/{pid}/ns/pid").into()))
    }

    fn publish(&self) {
        if let Ok(mut r) = self.shared.registry.lock() {
            r.insert(
                (self.st.namespace.clone(), self.st.name.clone()),
                super::Registered {
                    uid: self.st.uid.clone(),
                    containers: self.st.containers.iter().map(|(n, c)| (n.clone(), (c.restart_count, c.pid))).collect(),
                    security: self.live.iter().filter_map(|(n, l)| Some((n.clone(), l.security.clone()?))).collect(),
                    placement: self.placement(),
                },
            );
        }
    }

    /// Runs until the pod is gone. `rx` carries the latest Pod (None once it
    /// left the API).
    pub async fn run(mut self, mut rx: watch::Receiver<Option<Arc<Pod>>>) {
        self.publish();
        loop {
            let pod = rx.borrow_and_update().clone();
            match pod {
                None => {
                    self.teardown().await;
                    return;
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    if self.terminate_step(&p).await {
                        self.teardown().await;
                        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.st.namespace);
                        let dp = DeleteParams {
                            grace_period_seconds: Some(0),
                            preconditions: Some(Preconditions { uid: Some(self.st.uid.clone()), resource_version: None }),
                            ..Default::default()
                        };
                        if let Err(e) = api.delete(&self.st.name, &dp).await {
                            tracing::debug!(pod = %self.st.name, error = %e, "final delete");
                        }
                        return;
                    }
                    self.update_status(&p).await;
                }
                Some(p) => {
                    self.sync(&p).await;
                    self.update_status(&p).await;
                }
            }
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    async fn setup_sandbox(&mut self, pod: &Pod) -> Result<(), super::Error> {
        sandbox::create_cgroup(&self.st.cgroup)?;
        if self.st.host_network {
            self.st.ip = Some(self.shared.cfg.node_ip.clone());
        } else {
            // upstream: pods other than hostNetwork ones wait for the network.
            self.shared.cni.network_status().map_err(super::Error::Cni)?;
            let cidr = self.shared.pod_cidr.borrow().clone();
            let Some(cidr) = cidr else {
                return Err(super::Error::Cni("node has no podCIDR yet".into()));
            };
            self.shared.cni.publish_pod_cidr(&cidr)?;
            let name = self.st.netns.clone().unwrap_or_default();
            // On disk before anything exists, so a crash leaves a trail
            // the next start (or the lab's teardown) can clean up.
            self.save();
            sandbox::create_netns(&name)?;
            sandbox::set_sysctls(&name, security::UNPRIVILEGED_SYSCTLS)?;
            let cni = self.shared.cni.clone();
            let (ns, pname, uid) = (self.st.namespace.clone(), self.st.name.clone(), self.st.uid.clone());
            let path = sandbox::netns_path(&name);
            let att = tokio::task::spawn_blocking(move || cni.add(&uid, &path, &cni::pod_args(&ns, &pname, &uid), Some(&cidr)))
                .await
                .map_err(|e| super::Error::Cni(format!("CNI task: {e}")))??;
            self.st.ip = att.ip;
            self.st.cni_result = Some(att.result);
        }
        // The mount namespace is pinned before it is recorded; a crash in
        // between leaves a pin that teardown removes by uid.
        let (cfg, p, uid, ip) = (self.shared.cfg.clone(), pod.clone(), self.st.uid.clone(), self.st.ip.clone());
        let files = tokio::task::spawn_blocking(move || etc::setup(&cfg, &p, &uid, ip.as_deref()))
            .await
            .map_err(|e| super::Error::Sandbox(format!("pod /etc files task: {e}")))??;
        for (reason, msg) in &files.warnings {
            self.shared.recorder.warning(pod, reason, msg).await;
        }
        self.st.mntns = files.mntns;
        self.st.hostname = files.hostname;
        self.st.sandbox_ready = true;
        self.st.start_time.get_or_insert_with(now);
        self.save();
        tracing::info!(pod = %format!("{}/{}", self.st.namespace, self.st.name), ip = ?self.st.ip, "sandbox ready");
        Ok(())
    }

    fn restart_policy(pod: &Pod) -> &str {
        pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always")
    }

    /// Checks whether a running container exited; returns its termination.
    fn reap(&mut self, name: &str) -> Option<Term> {
        let cs = self.st.containers.get(name)?;
        let pid = cs.pid?;
        let live = self.live.entry(name.to_string()).or_default();
        let (code, signal, unknown) = if let Some(child) = live.child.as_mut() {
            match child.try_wait() {
                Ok(Some(st)) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    live.child = None;
                    match (st.code(), st.signal()) {
                        (Some(c), _) => (c, None, false),
                        (None, Some(s)) => (128 + s, Some(s), false),
                        _ => (255, None, false),
                    }
                }
                Ok(None) => return None,
                Err(_) => (255, None, true),
            }
        } else if process::alive(pid, cs.ticks) {
            return None;
        } else {
            // Adopted process (not our child): its exit code is lost; the
            // kubelet reports such containers the same way.
            (137, None, true)
        };
        let reason = if unknown {
            "ContainerStatusUnknown"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        Some(Term { exit_code: code, signal, reason: reason.into(), message: None, started_at: cs.started_at.clone(), finished_at: Some(now()) })
    }

    /// Schedules the next start attempt of `name` after a failed one.
    fn back_off(&mut self, name: &str) {
        let base = self.shared.cfg.backoff_base;
        let live = self.live.entry(name.to_string()).or_default();
        live.backoff = if live.backoff.is_zero() { base } else { (live.backoff * 2).min(MAX_BACKOFF) };
        live.backoff_until = Some(Instant::now() + live.backoff);
    }

    /// What the container runs and how, before anything is started: its
    /// image, security settings and mounts. Errors are recorded on `Live`
    /// (they become the container's waiting reason).
    async fn prepare_container(&mut self, pod: &Pod, c: &Container) -> Option<(Image, Security, Vec<mounts::Mount>)> {
        let image_ref = c.image.clone().unwrap_or_default();
        let image = match self.shared.cfg.image_map.resolve(&image_ref) {
            Ok(i) => i.clone(),
            Err(msg) => {
                let live = self.live.entry(c.name.clone()).or_default();
                let n = live.image_error.as_ref().map_or(0, |(_, n)| *n) + 1;
                live.image_error = Some((msg.clone(), n));
                self.back_off(&c.name);
                tracing::warn!(pod = %self.st.name, container = %c.name, image = %image_ref, "{msg}");
                self.shared.recorder.warning(pod, "Failed", &format!("Failed to pull image \"{image_ref}\": {msg}")).await;
                self.shared.recorder.warning(pod, "Failed", "Error: ErrImagePull").await;
                return None;
            }
        };
        let prepared = security::for_container(pod, c).and_then(|sec| {
            let mut m = match &self.volumes {
                Some(v) => volumes::container_mounts(pod, c, v)?,
                None => Vec::new(),
            };
            if let Image::Dir(d) = &image {
                m.insert(0, mounts::Mount { source: d.clone(), target: image::IMAGE_BIN_DIR.into(), read_only: true, propagation: mounts::Propagation::None });
            }
            Ok((sec, m))
        });
        let live = self.live.entry(c.name.clone()).or_default();
        live.image_error = None;
        match prepared {
            Ok((sec, m)) => {
                live.config_error = None;
                Some((image, sec, m))
            }
            Err(msg) => {
                let first = live.config_error.as_deref() != Some(msg.as_str());
                live.config_error = Some(msg.clone());
                self.back_off(&c.name);
                if first {
                    self.shared.recorder.warning(pod, "Failed", &format!("Error: {msg}")).await;
                }
                None
            }
        }
    }

    async fn start_container(&mut self, pod: &Pod, c: &Container) {
        let Some((image, sec, mut mounts)) = self.prepare_container(pod, c).await else { return };
        let services = self.shared.services.state();
        let ip = self.st.ip.clone().unwrap_or_default();
        let (envs, mut argv) = env::build(&self.shared.client, pod, c, &services, &ip, &self.shared.cfg.node_ip).await;
        if argv.is_empty() && image == Image::Pause {
            argv = image::pause_argv();
        }
        let cs = self.st.containers.entry(c.name.clone()).or_default();
        if cs.ever_started {
            cs.restart_count += 1;
        }
        let restart = cs.restart_count;
        let log = log_path(&self.shared.cfg.root_dir, &self.st.uid, &c.name, restart);
        let mut place = self.placement();
        place.security = Some(sec.clone());
        let privileged = security::privileged(c);
        // Only privileged containers see the node's state unmasked and
        // writable.
        let masks = if privileged { Vec::new() } else { self.shared.cfg.masked_paths.clone() };
        let read_only_rootfs = c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem).unwrap_or(false);
        let host_ipc = pod.spec.as_ref().and_then(|s| s.host_ipc).unwrap_or(false);
        let iso = if privileged {
            Ok(mounts::Isolation { read_only_root: read_only_rootfs, ..Default::default() })
        } else {
            mounts::Isolation::unprivileged(&pod_dir(&self.shared.cfg.root_dir, &self.st.uid), &c.name, read_only_rootfs, host_ipc)
        };
        if let (Ok(iso), Image::Host) = (&iso, &image) {
            mounts.extend(iso.host_command(argv.first()));
        }
        let pidns = self.pid_namespace(pod);
        place.proc_mount = if privileged { ProcMount::Full } else { ProcMount::Restricted };
        // A PID namespace of its own needs a mount namespace of its own
        // for its /proc.
        let own_ns = !mounts.is_empty() || !masks.is_empty() || iso.as_ref().is_ok_and(|i| i.read_only_root) || pidns.as_ref().is_ok_and(|p| *p != PidNs::Host);
        // A container of its own starts in `/` unless it says otherwise, as
        // an image without WORKDIR does (the kubelet's directory may be
        // under a volume's mount point, or masked).
        let cwd = c.working_dir.clone().or_else(|| own_ns.then(|| "/".to_owned()));
        let cgroup = {
            let (pod_cgroup, name) = (self.st.cgroup.clone(), c.name.clone());
            tokio::task::spawn_blocking(move || sandbox::create_container_cgroup(&pod_cgroup, &name, privileged))
                .await
                .map_err(|e| super::Error::Sandbox(format!("container cgroup task: {e}")))
                .and_then(|r| r)
        };
        let spawned = match (pidns, iso) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(pidns), Ok(_)) if !own_ns => {
                place.pidns = pidns;
                Ok(place)
            }
            (Ok(pidns), Ok(iso)) => {
            place.pidns = pidns;
            let (root, uid, name, base) = (self.shared.cfg.root_dir.clone(), self.st.uid.clone(), c.name.clone(), self.st.mntns.clone());
            tokio::task::spawn_blocking(move || mounts::create(&root, &uid, &name, base.as_deref(), &mounts, &masks, &iso))
                .await
                .map_err(|e| super::Error::Sandbox(format!("container mounts task: {e}")))
                .and_then(|r| r)
                .map(|pin| {
                    place.mntns = Some(pin);
                    place
                })
            }
        }
        .and_then(|mut place| {
            place.cgroup = Some(cgroup?);
            process::spawn(&argv, &envs, cwd.as_deref(), &place, &log)
        });
        let live = self.live.entry(c.name.clone()).or_default();
        live.security = Some(sec);
        match spawned {
            Ok(child) => {
                let pid = i32::try_from(child.id()).unwrap_or(0);
                let cs = self.st.containers.entry(c.name.clone()).or_default();
                cs.pid = Some(pid);
                cs.ticks = process::start_ticks(pid).unwrap_or(0);
                cs.started_at = Some(now());
                cs.ever_started = true;
                live.child = Some(child);
                live.started_instant = Some(Instant::now());
                live.startup = Tracker::default();
                live.liveness = Tracker::default();
                live.readiness = Tracker::default();
                live.kill_deadline = None;
                live.last_error = None;
                tracing::info!(pod = %self.st.name, container = %c.name, pid, restart, "started container");
                let msg = format!("Started container {}", c.name);
                self.shared.recorder.normal(pod, "Started", &msg).await;
            }
            Err(e) => {
                let cs = self.st.containers.entry(c.name.clone()).or_default();
                // A failed start is a failed run for back-off purposes.
                cs.ever_started = true;
                cs.last = Some(Term { exit_code: 128, reason: "StartError".into(), message: Some(e.to_string()), finished_at: Some(now()), ..Default::default() });
                live.last_error = Some(e.to_string());
                self.back_off(&c.name);
                tracing::warn!(pod = %self.st.name, container = %c.name, error = %e, "starting container");
                self.shared.recorder.warning(pod, "Failed", &format!("Error: {e}")).await;
            }
        }
        self.publish();
        self.save();
    }

    /// Makes (or renews) the pod's volumes; false while they cannot be.
    async fn sync_volumes(&mut self, pod: &Pod) -> bool {
        let renew = self.volumes.as_ref().and_then(|v| v.renew_at).is_some_and(|t| Instant::now() >= t);
        if self.volumes.is_some() && !renew {
            return true;
        }
        if self.volume_retry.is_some_and(|t| Instant::now() < t) {
            return self.volumes.is_some();
        }
        match volumes::setup(&self.shared, pod, &self.st.uid).await {
            Ok(v) => {
                if self.volumes.is_none() {
                    for (reason, msg) in &v.warnings {
                        self.shared.recorder.warning(pod, reason, msg).await;
                    }
                }
                self.volumes = Some(v);
                self.volume_error = None;
                true
            }
            Err(msg) => {
                if self.volume_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(pod = %self.st.name, error = %msg, "setting up volumes");
                    self.shared.recorder.warning(pod, "FailedMount", &msg).await;
                }
                self.volume_error = Some(msg);
                self.volume_retry = Some(Instant::now() + Duration::from_secs(2));
                // A renewal that failed keeps the volumes already there.
                self.volumes.is_some()
            }
        }
    }

    /// Runs the init containers in order; true once all succeeded.
    async fn sync_init(&mut self, pod: &Pod, policy: &str) -> bool {
        let inits = pod.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
        for c in &inits {
            if let Some(term) = self.reap(&c.name) {
                let cs = self.st.containers.entry(c.name.clone()).or_default();
                cs.pid = None;
                cs.last = Some(term.clone());
                // upstream: a failed init container restarts unless the
                // pod's policy is Never, which fails the pod.
                if term.exit_code == 0 || policy == "Never" {
                    cs.done = true;
                } else {
                    self.back_off(&c.name);
                }
                tracing::info!(pod = %self.st.name, container = %c.name, exit = term.exit_code, "init container exited");
                self.publish();
                self.save();
            }
            let cs = self.st.containers.get(&c.name).cloned().unwrap_or_default();
            if cs.done && cs.last.as_ref().is_some_and(|t| t.exit_code == 0) {
                continue;
            }
            if cs.pid.is_none() && !cs.done && self.live.get(&c.name).and_then(|l| l.backoff_until).is_none_or(|t| Instant::now() >= t) {
                self.start_container(pod, c).await;
            }
            return false;
        }
        true
    }

    async fn sync(&mut self, pod: &Pod) {
        if !self.st.sandbox_ready {
            if self.sandbox_retry.is_some_and(|t| Instant::now() < t) {
                return;
            }
            if let Err(e) = self.setup_sandbox(pod).await {
                let msg = e.to_string();
                if self.sandbox_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(pod = %self.st.name, error = %msg, "creating pod sandbox");
                    self.shared.recorder.warning(pod, "FailedCreatePodSandBox", &format!("Failed to create pod sandbox: {msg}")).await;
                }
                self.sandbox_error = Some(msg);
                self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
                return;
            }
            self.sandbox_error = None;
        }
        if self.st.network_released {
            return;
        }
        let policy = Self::restart_policy(pod).to_string();
        if !self.sync_volumes(pod).await || !self.sync_init(pod, &policy).await {
            return;
        }
        let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        for c in &containers {
            // Exit detection.
            if let Some(term) = self.reap(&c.name) {
                let live = self.live.entry(c.name.clone()).or_default();
                let ran = live.started_instant.map(|t| t.elapsed());
                let cs = self.st.containers.entry(c.name.clone()).or_default();
                cs.pid = None;
                cs.last = Some(term.clone());
                let restart = policy == "Always" || (policy == "OnFailure" && term.exit_code != 0);
                if restart {
                    // Reset after 10 minutes of good running, like kubelet.
                    if ran.is_some_and(|r| r > Duration::from_secs(600)) {
                        live.backoff = Duration::ZERO;
                    }
                    self.back_off(&c.name);
                } else {
                    cs.done = true;
                }
                tracing::info!(pod = %self.st.name, container = %c.name, exit = term.exit_code, restart, "container exited");
                self.publish();
                self.save();
            }
            let cs = self.st.containers.get(&c.name).cloned().unwrap_or_default();
            if cs.pid.is_none() && !cs.done {
                let live = self.live.entry(c.name.clone()).or_default();
                if live.backoff_until.is_none_or(|t| Instant::now() >= t) {
                    self.start_container(pod, c).await;
                }
                continue;
            }
            if cs.pid.is_some() {
                self.probe(pod, c, grace).await;
            }
        }
        // All containers finished for good: release the network now.
        if !containers.is_empty() && containers.iter().all(|c| self.st.containers.get(&c.name).is_some_and(|s| s.done)) {
            self.release_network().await;
            self.st.network_released = true;
            self.save();
        }
    }

    async fn probe(&mut self, pod: &Pod, c: &Container, grace: i64) {
        let pid = self.st.containers.get(&c.name).and_then(|s| s.pid).unwrap_or(0);
        let pod_ip: Option<IpAddr> = self.st.ip.as_deref().and_then(|s| s.parse().ok());
        let mut place = self.placement();
        place.join_uts_of = Some(pid);
        place.hostname = None;
        place.mntns = (pid > 0).then(|| std::path::PathBuf::from(format!("/proc/{pid}/ns/mnt")));
        place.pidns = process::pidns_of(pid);
        place.cgroup = Some(sandbox::joined_cgroup(&self.st.cgroup, &c.name));
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok().map(|p| p.to_string_lossy().into_owned());
        let live = self.live.entry(c.name.clone()).or_default();
        place.security.clone_from(&live.security);
        if let Some(d) = live.kill_deadline {
            if Instant::now() >= d {
                process::signal_group(pid, libc::SIGKILL);
            }
            return;
        }
        let Some(started) = live.started_instant else {
            // Adopted (started before this kubelet): the initial delays are
            // over, so every probe is due now. Not by backdating the start:
            // `Instant` is CLOCK_MONOTONIC, and on a machine up for less
            // than the backdated age that instant does not exist.
            let now = Instant::now();
            live.started_instant = Some(now);
            for t in [&mut live.startup, &mut live.liveness, &mut live.readiness] {
                t.next_due = Some(now);
            }
            return;
        };
        let due = |t: &Tracker, p: &k8s_openapi::api::core::v1::Probe| {
            let first = started + Duration::from_secs(u64::try_from(p.initial_delay_seconds.unwrap_or(0).max(0)).unwrap_or(0));
            Instant::now() >= t.next_due.unwrap_or(first)
        };
        let period = |p: &k8s_openapi::api::core::v1::Probe| Duration::from_secs(u64::try_from(p.period_seconds.unwrap_or(10).max(1)).unwrap_or(10));
        let envs: Vec<(String, String)> = vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())];
        let mut kill_reason: Option<String> = None;
        // "<Kind> probe failed: <output>", one Unhealthy event per failed run
        // as kubelet records them (repeats bump the event's count).
        let mut unhealthy: Vec<String> = Vec::new();
        // Startup gates the other two.
        let started_ok = match &c.startup_probe {
            None => true,
            Some(p) => {
                if live.startup.verdict != Some(Outcome::Success) && due(&live.startup, p) {
                    let r = probes::run(p, c, pod_ip, &place, &envs, cwd.as_deref()).await;
                    live.startup.next_due = Some(Instant::now() + period(p));
                    if r.outcome == Outcome::Failure {
                        unhealthy.push(format!("Startup probe failed: {}", r.output));
                    }
                    if live.startup.record(p, r.outcome) == Some(Outcome::Failure) {
                        kill_reason = Some(format!("Container {} failed startup probe, will be restarted", c.name));
                    }
                }
                live.startup.verdict == Some(Outcome::Success)
            }
        };
        if started_ok && kill_reason.is_none() {
            if let Some(p) = &c.liveness_probe
                && due(&live.liveness, p)
            {
                let r = probes::run(p, c, pod_ip, &place, &envs, cwd.as_deref()).await;
                live.liveness.next_due = Some(Instant::now() + period(p));
                if r.outcome == Outcome::Failure {
                    unhealthy.push(format!("Liveness probe failed: {}", r.output));
                }
                if live.liveness.record(p, r.outcome) == Some(Outcome::Failure) {
                    kill_reason = Some(format!("Container {} failed liveness probe, will be restarted", c.name));
                }
            }
            if let Some(p) = &c.readiness_probe
                && due(&live.readiness, p)
            {
                let r = probes::run(p, c, pod_ip, &place, &envs, cwd.as_deref()).await;
                live.readiness.next_due = Some(Instant::now() + period(p));
                if r.outcome == Outcome::Failure {
                    unhealthy.push(format!("Readiness probe failed: {}", r.output));
                }
                live.readiness.record(p, r.outcome);
            }
        }
        for msg in unhealthy {
            tracing::debug!(pod = %self.st.name, container = %c.name, "{msg}");
            self.shared.recorder.warning(pod, "Unhealthy", &msg).await;
        }
        if let Some(msg) = kill_reason {
            let live = self.live.entry(c.name.clone()).or_default();
            live.kill_deadline = Some(Instant::now() + Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(30)));
            process::signal_group(pid, libc::SIGTERM);
            tracing::info!(pod = %self.st.name, container = %c.name, "{msg}");
            self.shared.recorder.normal(pod, "Killing", &msg).await;
        }
    }

    fn container_ready(&self, c: &Container) -> (bool, bool) {
        let running = self.st.containers.get(&c.name).is_some_and(|s| s.pid.is_some());
        let live = self.live.get(&c.name);
        let started = running && (c.startup_probe.is_none() || live.is_some_and(|l| l.startup.verdict == Some(Outcome::Success)));
        let ready = started
            && live.is_none_or(|l| l.kill_deadline.is_none())
            && (c.readiness_probe.is_none() || live.is_some_and(|l| l.readiness.verdict == Some(Outcome::Success)));
        (started, ready)
    }

    fn cond(&mut self, type_: &str, ok: bool, reason: Option<&str>) -> Value {
        let status = if ok { "True" } else { "False" };
        let t = match self.cond_times.get(type_) {
            Some((s, t)) if s == status => t.clone(),
            _ => {
                let t = json!(now());
                self.cond_times.insert(type_.to_string(), (status.to_string(), t.clone()));
                t
            }
        };
        let mut v = json!({"type": type_, "status": status, "lastTransitionTime": t, "lastProbeTime": null});
        if let Some(r) = reason.filter(|_| !ok) {
            v["reason"] = json!(r);
        }
        v
    }

    fn term_json(t: &Term) -> Value {
        let mut v = json!({"exitCode": t.exit_code, "reason": t.reason, "startedAt": t.started_at, "finishedAt": t.finished_at,
                           "containerID": Value::Null});
        if let Some(s) = t.signal {
            v["signal"] = json!(s);
        }
        if let Some(m) = &t.message {
            v["message"] = json!(m);
        }
        v
    }

    /// A container's `state` while it has no process.
    fn waiting(&self, c: &Container, cs: &super::state::ContainerState, initializing: bool) -> Value {
        let live = self.live.get(&c.name);
        let waiting = |reason: &str, msg: Option<String>| {
            let mut w = json!({"reason": reason});
            if let Some(m) = msg {
                w["message"] = json!(m);
            }
            json!({"waiting": w})
        };
        if let Some((msg, n)) = live.and_then(|l| l.image_error.clone()) {
            // upstream: ErrImagePull on a failed pull, ImagePullBackOff while
            // waiting for the next one.
            let reason = if n <= 1 { "ErrImagePull" } else { "ImagePullBackOff" };
            return waiting(reason, Some(msg));
        }
        if let Some(msg) = live.and_then(|l| l.config_error.clone()) {
            return waiting("CreateContainerConfigError", Some(msg));
        }
        if initializing {
            return waiting("PodInitializing", None);
        }
        if let Some(err) = live.and_then(|l| l.last_error.clone()) {
            return waiting("RunContainerError", Some(err));
        }
        if cs.ever_started {
            let b = live.map(|l| l.backoff.as_secs()).unwrap_or(0);
            return waiting(
                "CrashLoopBackOff",
                Some(format!("back-off {b}s restarting failed container={} pod={}_{}({})", c.name, self.st.name, self.st.namespace, self.st.uid)),
            );
        }
        waiting("ContainerCreating", None)
    }

    fn container_status(&self, c: &Container, initializing: bool) -> Value {
        let cs = self.st.containers.get(&c.name).cloned().unwrap_or_default();
        let (started, ready) = self.container_ready(c);
        let state = if cs.pid.is_some() {
            json!({"running": {"startedAt": cs.started_at}})
        } else if cs.done {
            cs.last.as_ref().map(|t| json!({"terminated": Self::term_json(t)})).unwrap_or(json!({"waiting": {"reason": "ContainerCreating"}}))
        } else {
            self.waiting(c, &cs, initializing)
        };
        let mut s = json!({
            "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
            "containerID": container_id(&self.st.uid, &c.name, cs.restart_count),
            "ready": ready, "started": started, "restartCount": cs.restart_count, "state": state, "lastState": {},
        });
        if let Some(t) = cs.last.as_ref().filter(|_| cs.pid.is_some() || !cs.done) {
            s["lastState"] = json!({"terminated": Self::term_json(t)});
        }
        s
    }

    async fn update_status(&mut self, pod: &Pod) {
        let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        let inits = pod.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
        let init_ok = |w: &Self, c: &Container| w.st.containers.get(&c.name).is_some_and(|s| s.done && s.last.as_ref().is_some_and(|t| t.exit_code == 0));
        let pending_inits: Vec<String> = inits.iter().filter(|c| !init_ok(self, c)).map(|c| c.name.clone()).collect();
        let init_failed = inits.iter().any(|c| self.st.containers.get(&c.name).is_some_and(|s| s.done && s.last.as_ref().is_some_and(|t| t.exit_code != 0)));
        let initialized = pending_inits.is_empty();
        let init_statuses: Vec<Value> = inits.iter().map(|c| self.container_status(c, false)).collect();
        let mut statuses = Vec::new();
        let (mut all_ready, mut any_running, mut all_done, mut all_ok, mut all_started_once) = (true, false, true, true, true);
        for c in &containers {
            let cs = self.st.containers.get(&c.name).cloned().unwrap_or_default();
            let (_, ready) = self.container_ready(c);
            all_ready &= ready;
            all_started_once &= cs.ever_started;
            any_running |= cs.pid.is_some();
            all_done &= cs.done;
            all_ok &= cs.last.as_ref().is_some_and(|t| t.exit_code == 0);
            statuses.push(self.container_status(c, !initialized));
        }
        let phase = if init_failed {
            "Failed"
        } else if !self.st.sandbox_ready || !initialized {
            "Pending"
        } else if !containers.is_empty() && all_done {
            if all_ok { "Succeeded" } else { "Failed" }
        } else if any_running || all_started_once {
            "Running"
        } else {
            "Pending"
        };
        let mut init_cond = self.cond("Initialized", initialized, Some("ContainersNotInitialized"));
        if !initialized {
            init_cond["message"] = json!(format!("containers with incomplete status: [{}]", pending_inits.join(" ")));
        }
        let sandbox = self.cond("PodReadyToStartContainers", self.st.sandbox_ready, None);
        let cready = self.cond("ContainersReady", all_ready && any_running, Some("ContainersNotReady"));
        let ready = self.cond("Ready", all_ready && any_running, Some("ContainersNotReady"));
        let scheduled = self.cond("PodScheduled", true, None);
        let ip = self.st.ip.clone();
        let node_ip = self.shared.cfg.node_ip.clone();
        let mut status = json!({
            "phase": phase,
            "conditions": [sandbox, init_cond, ready, cready, scheduled],
            "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
            "startTime": self.st.start_time,
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        });
        if !inits.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if let Some(ip) = ip.filter(|_| !self.st.network_released || self.st.host_network) {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        if let Some(err) = &self.sandbox_error {
            status["message"] = json!(err);
            status["reason"] = json!("SandboxNotReady");
        }
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.st.namespace);
        match api.patch_status(&self.st.name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::debug!(pod = %self.st.name, error = %e, "updating pod status"),
        }
    }

    /// One step of graceful termination; true once every process is gone.
    async fn terminate_step(&mut self, pod: &Pod) -> bool {
        let names: Vec<String> = self.st.containers.keys().cloned().collect();
        for n in &names {
            if let Some(term) = self.reap(n) {
                tracing::info!(pod = %self.st.name, container = %n, exit = term.exit_code, signal = ?term.signal, "container exited while terminating");
                let cs = self.st.containers.entry(n.clone()).or_default();
                cs.pid = None;
                cs.last = Some(term);
                cs.done = true;
            }
        }
        let running: Vec<i32> = self.st.containers.values().filter_map(|c| c.pid).collect();
        let (_, deadline) = *self.terminating_since.get_or_insert_with(|| {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30)
                .max(0);
            for pid in &running {
                process::signal_group(*pid, libc::SIGTERM);
            }
            tracing::info!(pod = %self.st.name, grace, "terminating pod");
            (Instant::now(), Instant::now() + Duration::from_secs(u64::try_from(grace).unwrap_or(30)))
        });
        if running.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            for pid in &running {
                process::signal_group(*pid, libc::SIGKILL);
            }
            return true;
        }
        false
    }

    async fn release_network(&mut self) {
        if let Some(name) = self.st.netns.clone() {
            let cni = self.shared.cni.clone();
            let (ns, pname, uid) = (self.st.namespace.clone(), self.st.name.clone(), self.st.uid.clone());
            let prev = self.st.cni_result.clone();
            let cidr = self.shared.pod_cidr.borrow().clone();
            let path = sandbox::netns_path(&name);
            let r = tokio::task::spawn_blocking(move || {
                let r = cni.del(&uid, &path, &cni::pod_args(&ns, &pname, &uid), prev.as_ref(), cidr.as_deref());
                (r, sandbox::delete_netns(&name))
            })
            .await;
            match r {
                Ok((Ok(()), Ok(()))) => {}
                Ok((a, b)) => tracing::warn!(pod = %self.st.name, cni = ?a.err(), netns = ?b.err(), "releasing pod network"),
                Err(e) => tracing::warn!(pod = %self.st.name, error = %e, "releasing pod network"),
            }
        }
    }

    /// Everything the pod had on this node goes: processes, network,
    /// netns, cgroup, state and logs.
    async fn teardown(&mut self) {
        for c in self.st.containers.values() {
            if let Some(pid) = c.pid {
                process::signal_group(pid, libc::SIGKILL);
            }
        }
        let cg = self.st.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || sandbox::remove_cgroup(&cg)).await;
        for mut ch in self.live.values_mut().filter_map(|l| l.child.take()).chain(self.pause.take()) {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        if !self.st.network_released {
            self.release_network().await;
        }
        if let Err(e) = mntns::remove(&self.shared.cfg.root_dir, &self.st.uid) {
            tracing::warn!(pod = %self.st.name, error = %e, "removing pod mount namespace");
        }
        let dir = pod_dir(&self.shared.cfg.root_dir, &self.st.uid);
        let _ = std::fs::remove_dir_all(&dir);
        if let Ok(mut r) = self.shared.registry.lock() {
            r.remove(&(self.st.namespace.clone(), self.st.name.clone()));
        }
        tracing::info!(pod = %format!("{}/{}", self.st.namespace, self.st.name), "pod torn down");
    }
}

/// Removes what a pod left on the node when its worker is gone (orphans
/// found on start with no Pod in the API).
pub async fn cleanup_orphan(shared: Arc<Shared>, st: PodState) {
    let pod = Pod {
        metadata: kube::api::ObjectMeta { name: Some(st.name.clone()), namespace: Some(st.namespace.clone()), uid: Some(st.uid.clone()), ..Default::default() },
        ..Default::default()
    };
    let mut w = Worker::new(shared, &pod, Some(st));
    w.teardown().await;
}

pub type ContainerIndex = BTreeMap<String, (i32, Option<i32>)>;
