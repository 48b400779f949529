//! A pod's volumes, made on the node before its containers start and bound
//! into each container's mount namespace ([`super::mounts`]) where its
//! `volumeMounts` say.
//!
//! - `emptyDir`: a directory under the pod's state directory (0777, gone
//!   with the pod; `medium: Memory` is a plain directory too).
//! - `hostPath`: a path of the node, checked and created as `type:` says
//!   (`DirectoryOrCreate`, `Directory`, `FileOrCreate`, `File`, `Socket`,
//!   `CharDevice`, `BlockDevice`). With `--host-path-root` it is resolved
//!   under that directory, as kind's node containers give each node its
//!   own `/`, except below the `--host-path-shared` prefixes (default
//!   `/proc`, `/sys`, `/dev`, `/run/netns`, `/var/run/netns`: the kernel's
//!   views, which every node of a machine shares), which stay real. A
//!   `--host-path-map FROM=TO` entry sends FROM and everything below it to
//!   TO instead (a lab node's own cgroup for `/sys/fs/cgroup`, so an agent
//!   attaching to "the root cgroup" attaches to its node's only).
//! - `configMap`, `secret`, `downwardAPI` (fieldRef items) and `projected`
//!   (those plus `serviceAccountToken`): files under the pod's state
//!   directory, written atomically (temp file + rename), with `items`,
//!   `defaultMode`/`mode` (upstream's default 0644) and `optional`.
//! - The ServiceAccount volume upstream's admission adds to every pod:
//!   `token` (a TokenRequest bound to the pod, renewed after 80% of its
//!   life), `ca.crt` (the cluster CA from the kubelet's kubeconfig) and
//!   `namespace`, read-only at `/var/run/secrets/kubernetes.io/serviceaccount`
//!   unless `automountServiceAccountToken: false` or a container mounts
//!   something there itself.
//!
//! `fsGroup` gives the group of every file made here to that gid.
//! `mountPropagation: Bidirectional` is refused for a container that is not
//! privileged, as upstream's kubelet does.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume},
    },
};
use kube::{Api, ResourceExt as _, api::PostParams};

use super::{
    Shared, env,
    mounts::{Mount, Propagation},
    state::pod_dir,
};

/// Where in-cluster clients look for their credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name of the ServiceAccount volume the kubelet adds.
const SA_VOLUME: &str = "kube-api-access-riptide";
/// upstream's kube-api-access token lifetime.
const SA_TOKEN_SECONDS: i64 = 3607;

/// The pod's volumes as made on the node.
#[derive(Debug, Default)]
pub struct PodVolumes {
    /// Volume name → its directory (or file) on the node.
    pub sources: BTreeMap<String, PathBuf>,
    /// When the shortest-lived token should be renewed.
    pub renew_at: Option<Instant>,
    /// Events to record (reason, message).
    pub warnings: Vec<(&'static str, String)>,
}

fn volumes_dir(root: &Path, uid: &str) -> PathBuf {
    pod_dir(root, uid).join("volumes")
}

/// Where a `hostPath` volume's path is on this machine: below a
/// `--host-path-map` source, the same place below its target; else under
/// `root` unless below a `shared` prefix.
pub fn resolve_host_path(root: Option<&Path>, shared: &[PathBuf], map: &[(PathBuf, PathBuf)], path: &str) -> PathBuf {
    let p = Path::new(path);
    let normal = |p: &Path| p.components().filter(|c| matches!(c, Component::Normal(_))).collect::<PathBuf>();
    if let Some((to, rest)) = map.iter().find_map(|(from, to)| Some((to, normal(p).strip_prefix(normal(from)).ok()?.to_owned()))) {
        return if rest.as_os_str().is_empty() { to.clone() } else { to.join(rest) };
    }
    match root {
        Some(root) if !shared.iter().any(|s| p.starts_with(s)) => {
            root.join(p.components().filter(|c| matches!(c, Component::Normal(_))).collect::<PathBuf>())
        }
        _ => p.to_owned(),
    }
}

/// upstream `checkType`/`makeDir`/`makeFile` for a hostPath `type:`.
pub fn check_host_path(path: &Path, ty: &str) -> Result<(), String> {
    let md = std::fs::metadata(path);
    let is = |f: fn(&std::fs::Metadata) -> bool| md.as_ref().is_ok_and(f);
    let fail = |what: &str| Err(format!("hostPath type check failed: {} is not {what}", path.display()));
    match ty {
        "" => Ok(()),
        "DirectoryOrCreate" if md.is_err() => {
            std::fs::create_dir_all(path).map_err(|e| format!("creating hostPath directory {}: {e}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {}: {e}", path.display()))
        }
        "DirectoryOrCreate" | "Directory" => if is(std::fs::Metadata::is_dir) { Ok(()) } else { fail("a directory") },
        "FileOrCreate" if md.is_err() => {
            // upstream creates the file, not its parent directories.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(drop)
                .map_err(|e| format!("creating hostPath file {}: {e}", path.display()))
        }
        "FileOrCreate" | "File" => if is(std::fs::Metadata::is_file) { Ok(()) } else { fail("a file") },
        "Socket" => if is(|m| m.file_type().is_socket()) { Ok(()) } else { fail("a socket file") },
        "CharDevice" => if is(|m| m.file_type().is_char_device()) { Ok(()) } else { fail("a character device") },
        "BlockDevice" => if is(|m| m.file_type().is_block_device()) { Ok(()) } else { fail("a block device") },
        other => Err(format!("hostPath type {other:?} is not supported")),
    }
}

/// One file of a configMap/secret/downwardAPI/projected volume.
struct File {
    path: String,
    data: Vec<u8>,
    mode: Option<i32>,
}

/// The files a key→value map gives with `items` (or every key).
fn key_files(name: &str, data: &BTreeMap<String, Vec<u8>>, items: Option<&[KeyToPath]>, optional: bool) -> Result<Vec<File>, String> {
    match items {
        None => Ok(data.iter().map(|(k, v)| File { path: k.clone(), data: v.clone(), mode: None }).collect()),
        Some(items) => items
            .iter()
            .filter_map(|i| match data.get(&i.key) {
                Some(v) => Some(Ok(File { path: i.path.clone(), data: v.clone(), mode: i.mode })),
                None if optional => None,
                None => Some(Err(format!("configmap or secret {name:?} has no key {:?}", i.key))),
            })
            .collect(),
    }
}

fn bytes_map(text: Option<&BTreeMap<String, String>>, binary: Option<&BTreeMap<String, ByteString>>) -> BTreeMap<String, Vec<u8>> {
    let mut m: BTreeMap<String, Vec<u8>> = text.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
    m.extend(binary.into_iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
    m
}

/// Writes `files` into `dir` (each atomically) with `default_mode`, and
/// removes files a previous write left that are no longer wanted.
fn write_files(dir: &Path, files: &[File], default_mode: i32, fs_group: Option<u32>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for f in files {
        let rel = Path::new(&f.path);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("volume file path {:?} must be relative and may not contain '..'", f.path));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let mode = u32::try_from(f.mode.unwrap_or(default_mode)).unwrap_or(0o644) & 0o7777;
        std::fs::write(&tmp, &f.data)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
            .and_then(|()| std::os::unix::fs::chown(&tmp, None, fs_group))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    // Keys that went away (only top-level files: items paths are few).
    let wanted: Vec<&str> = files.iter().filter_map(|f| f.path.split('/').next()).collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name.as_str()) && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(g) = fs_group {
        std::os::unix::fs::chown(dir, None, Some(g)).map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The volume the kubelet adds for the pod's ServiceAccount (upstream's
/// admission adds it to the spec; ours does not).
pub fn service_account_volume(pod: &Pod) -> Option<Volume> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    let mounted_by_pod = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| Path::new(&m.mount_path) == Path::new(SERVICE_ACCOUNT_DIR));
    (!mounted_by_pod).then(|| Volume { name: SA_VOLUME.into(), ..Volume::default() })
}

fn service_account_name(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into())
}

struct Maker<'a> {
    shared: &'a Shared,
    pod: &'a Pod,
    ns: String,
    renew_at: Option<Instant>,
    warnings: Vec<(&'static str, String)>,
}

impl Maker<'_> {
    async fn config_map(&self, name: &str, items: Option<&[KeyToPath]>, optional: bool) -> Result<Vec<File>, String> {
        match Api::<ConfigMap>::namespaced(self.shared.client.clone(), &self.ns).get_opt(name).await {
            Ok(Some(cm)) => key_files(name, &bytes_map(cm.data.as_ref(), cm.binary_data.as_ref()), items, optional),
            // No root-CA publisher runs on our control plane (upstream's
            // kube-api-access volumes name this configmap): the kubelet
            // knows the CA from its own kubeconfig.
            Ok(None) if name == "kube-root-ca.crt" && self.shared.cfg.cluster_ca_pem.is_some() => {
                let data = BTreeMap::from([("ca.crt".to_string(), self.shared.cfg.cluster_ca_pem.clone().unwrap_or_default())]);
                key_files(name, &data, items, optional)
            }
            Ok(None) if optional => Ok(Vec::new()),
            Ok(None) => Err(format!("configmap \"{name}\" not found")),
            Err(e) => Err(format!("getting configmap \"{name}\": {e}")),
        }
    }

    async fn secret(&self, name: &str, items: Option<&[KeyToPath]>, optional: bool) -> Result<Vec<File>, String> {
        match Api::<Secret>::namespaced(self.shared.client.clone(), &self.ns).get_opt(name).await {
            Ok(Some(s)) => key_files(name, &bytes_map(s.string_data.as_ref(), s.data.as_ref()), items, optional),
            Ok(None) if optional => Ok(Vec::new()),
            Ok(None) => Err(format!("secret \"{name}\" not found")),
            Err(e) => Err(format!("getting secret \"{name}\": {e}")),
        }
    }

    fn downward(&self, items: &[DownwardAPIVolumeFile]) -> Result<Vec<File>, String> {
        items
            .iter()
            .map(|i| {
                let data = match (&i.field_ref, &i.resource_field_ref) {
                    (Some(f), _) => env::field_ref(self.pod, &f.field_path, &self.shared.cfg.node_ip),
                    (None, Some(r)) => return Err(format!("downwardAPI resourceFieldRef {:?} is not supported by riptide's kubelet", r.resource)),
                    (None, None) => String::new(),
                };
                Ok(File { path: i.path.clone(), data: data.into_bytes(), mode: i.mode })
            })
            .collect()
    }

    /// A TokenRequest for the pod's ServiceAccount, bound to the pod.
    async fn token(&mut self, audience: Option<&str>, seconds: Option<i64>) -> Result<Option<Vec<u8>>, String> {
        let sa = service_account_name(self.pod);
        let seconds = seconds.unwrap_or(SA_TOKEN_SECONDS).max(600);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
                expiration_seconds: Some(seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.pod.name_any()),
                    uid: self.pod.uid(),
                }),
            },
            ..TokenRequest::default()
        };
        let api = Api::<ServiceAccount>::namespaced(self.shared.client.clone(), &self.ns);
        let out: TokenRequest = match api.create_subresource("token", &sa, &PostParams::default(), &req).await {
            Ok(t) => t,
            // Admission guarantees the account whenever a ServiceAccount
            // controller runs; an apiserver without one (tests, benches) has
            // no `default` accounts and admits the pod anyway, so it runs
            // without a token rather than not at all.
            Err(kube::Error::Api(e)) if e.code == 404 && sa == "default" => {
                self.warnings.push(("FailedMount", format!("no token mounted: serviceaccount \"{}/default\" not found", self.ns)));
                return Ok(None);
            }
            Err(e) => return Err(format!("requesting a token for serviceaccount \"{}/{sa}\": {e}", self.ns)),
        };
        let token = out.status.map(|s| s.token).unwrap_or_default();
        // Renew after 80% of its life, as upstream's token manager does.
        let renew = Instant::now() + Duration::from_secs(u64::try_from(seconds).unwrap_or(3600) * 8 / 10);
        self.renew_at = Some(self.renew_at.map_or(renew, |r| r.min(renew)));
        Ok(Some(token.into_bytes()))
    }

    /// The kubelet's own ServiceAccount volume: the token, the CA it
    /// trusts itself (no root-CA publisher runs on our control plane, and
    /// the Node authorizer lets a kubelet read only configmaps its pods
    /// name) and the namespace.
    async fn service_account_files(&mut self) -> Result<Vec<File>, String> {
        let Some(token) = self.token(None, Some(SA_TOKEN_SECONDS)).await? else { return Ok(Vec::new()) };
        let mut out = vec![
            File { path: "token".into(), data: token, mode: None },
            File { path: "namespace".into(), data: self.ns.clone().into_bytes(), mode: None },
        ];
        if let Some(ca) = &self.shared.cfg.cluster_ca_pem {
            out.push(File { path: "ca.crt".into(), data: ca.clone(), mode: None });
        }
        Ok(out)
    }

    async fn files(&mut self, v: &Volume) -> Result<Option<(Vec<File>, i32)>, String> {
        if v.name == SA_VOLUME {
            return Ok(Some((self.service_account_files().await?, 0o644)));
        }
        if let Some(cm) = &v.config_map {
            let f = self.config_map(&cm.name, cm.items.as_deref(), cm.optional.unwrap_or(false)).await?;
            return Ok(Some((f, cm.default_mode.unwrap_or(0o644))));
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let f = self.secret(&name, s.items.as_deref(), s.optional.unwrap_or(false)).await?;
            return Ok(Some((f, s.default_mode.unwrap_or(0o644))));
        }
        if let Some(d) = &v.downward_api {
            return Ok(Some((self.downward(d.items.as_deref().unwrap_or_default())?, d.default_mode.unwrap_or(0o644))));
        }
        let Some(p) = &v.projected else { return Ok(None) };
        let mut out = Vec::new();
        for s in p.sources.iter().flatten() {
            if let Some(t) = &s.service_account_token
                && let Some(token) = self.token(t.audience.as_deref(), t.expiration_seconds).await?
            {
                out.push(File { path: t.path.clone(), data: token, mode: None });
            }
            if let Some(cm) = &s.config_map {
                out.extend(self.config_map(&cm.name, cm.items.as_deref(), cm.optional.unwrap_or(false)).await?);
            }
            if let Some(sec) = &s.secret {
                out.extend(self.secret(&sec.name, sec.items.as_deref(), sec.optional.unwrap_or(false)).await?);
            }
            if let Some(d) = &s.downward_api {
                out.extend(self.downward(d.items.as_deref().unwrap_or_default())?);
            }
        }
        Ok(Some((out, p.default_mode.unwrap_or(0o644))))
    }
}

/// Makes (or refreshes) every volume of the pod. Errors name the volume.
pub async fn setup(shared: &Shared, pod: &Pod, uid: &str) -> Result<PodVolumes, String> {
    let cfg = &shared.cfg;
    let dir = volumes_dir(&cfg.root_dir, uid);
    let fs_group = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()?.fs_group).and_then(|g| u32::try_from(g).ok());
    let mut m = Maker { shared, pod, ns: pod.namespace().unwrap_or_default(), renew_at: None, warnings: Vec::new() };
    let mut sources = BTreeMap::new();
    let vols = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    for v in vols.iter().chain(service_account_volume(pod).as_ref()) {
        let err = |e: String| format!("MountVolume.SetUp failed for volume \"{}\": {e}", v.name);
        if let Some(h) = &v.host_path {
            let path = resolve_host_path(cfg.host_path_root.as_deref(), &cfg.host_path_shared, &cfg.host_path_map, &h.path);
            check_host_path(&path, h.type_.as_deref().unwrap_or("")).map_err(err)?;
            sources.insert(v.name.clone(), path);
            continue;
        }
        let vdir = dir.join(&v.name);
        if v.empty_dir.is_some() {
            std::fs::create_dir_all(&vdir)
                .and_then(|()| std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777)))
                .and_then(|()| std::os::unix::fs::chown(&vdir, None, fs_group))
                .map_err(|e| err(format!("creating {}: {e}", vdir.display())))?;
            sources.insert(v.name.clone(), vdir);
            continue;
        }
        match m.files(v).await.map_err(err)? {
            Some((files, mode)) => {
                write_files(&vdir, &files, mode, fs_group).map_err(err)?;
                sources.insert(v.name.clone(), vdir);
            }
            None => return Err(err("this volume type is not supported by riptide's kubelet".into())),
        }
    }
    Ok(PodVolumes { sources, renew_at: m.renew_at, warnings: m.warnings })
}

/// The bind mounts of container `c` (its `volumeMounts`, `subPath`
/// included, plus the ServiceAccount volume).
pub fn container_mounts(pod: &Pod, c: &Container, vols: &PodVolumes) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let src = vols.sources.get(&vm.name).ok_or_else(|| format!("volumeMount {:?} names no volume of the pod", vm.name))?;
        let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sp) if Path::new(sp).components().all(|c| matches!(c, Component::Normal(_))) => {
                let p = src.join(sp);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|e| format!("creating subPath {}: {e}", p.display()))?;
                }
                p
            }
            Some(sp) => return Err(format!("subPath {sp:?} must be relative and may not contain '..'")),
            None => src.clone(),
        };
        let propagation = Propagation::parse(vm.mount_propagation.as_deref());
        // The apiserver refuses it too; a kubelet never lets an
        // unprivileged container's mounts reach the node.
        if propagation == Propagation::Bidirectional && !super::security::privileged(c) {
            return Err(format!("volumeMount {:?}: Bidirectional mount propagation is available only to privileged containers", vm.name));
        }
        out.push(Mount { source, target: PathBuf::from(&vm.mount_path), read_only: vm.read_only.unwrap_or(false), propagation });
    }
    if service_account_volume(pod).is_some()
        && let Some(src) = vols.sources.get(SA_VOLUME)
        && std::fs::metadata(src.join("token")).is_ok()
    {
        out.push(Mount { source: src.clone(), target: SERVICE_ACCOUNT_DIR.into(), read_only: true, propagation: Propagation::None });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_under_the_node_root_except_shared_ones() {
        let shared = [PathBuf::from("/sys"), PathBuf::from("/run/netns")];
        let root = Path::new("/lab/n1");
        assert_eq!(resolve_host_path(Some(root), &shared, &[], "/opt/cni/bin"), PathBuf::from("/lab/n1/opt/cni/bin"));
        assert_eq!(resolve_host_path(Some(root), &shared, &[], "/etc/cni/../cni/net.d"), PathBuf::from("/lab/n1/etc/cni/cni/net.d"));
        assert_eq!(resolve_host_path(Some(root), &shared, &[], "/sys/fs/bpf"), PathBuf::from("/sys/fs/bpf"));
        assert_eq!(resolve_host_path(Some(root), &shared, &[], "/run/netnsx"), PathBuf::from("/lab/n1/run/netnsx"));
        assert_eq!(resolve_host_path(None, &shared, &[], "/opt/cni/bin"), PathBuf::from("/opt/cni/bin"));
        // The node's own cgroup stands for the machine's cgroup root.
        let map = [(PathBuf::from("/sys/fs/cgroup"), PathBuf::from("/sys/fs/cgroup/unified/lab/n1"))];
        assert_eq!(resolve_host_path(Some(root), &shared, &map, "/sys/fs/cgroup"), PathBuf::from("/sys/fs/cgroup/unified/lab/n1"));
        assert_eq!(resolve_host_path(Some(root), &shared, &map, "/sys/fs/cgroup/x/"), PathBuf::from("/sys/fs/cgroup/unified/lab/n1/x"));
        assert_eq!(resolve_host_path(Some(root), &shared, &map, "/sys/fs/cgroupx"), PathBuf::from("/sys/fs/cgroupx"));
        assert_eq!(resolve_host_path(None, &shared, &map, "/sys/fs/bpf"), PathBuf::from("/sys/fs/bpf"));
    }

    #[test]
    fn host_path_types() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().join("a/b");
        assert!(check_host_path(&dir, "Directory").is_err());
        check_host_path(&dir, "DirectoryOrCreate").expect("created");
        assert!(dir.is_dir());
        check_host_path(&dir, "Directory").expect("is a dir");
        assert!(check_host_path(&dir, "File").is_err());
        let f = dir.join("f");
        check_host_path(&f, "FileOrCreate").expect("created");
        check_host_path(&f, "File").expect("is a file");
        assert!(check_host_path(&d.path().join("x/y"), "FileOrCreate").is_err(), "no parent directories");
        assert!(check_host_path(&f, "Socket").is_err());
    }

    #[test]
    fn items_and_modes() {
        let d = tempfile::tempdir().expect("tmp");
        let data = BTreeMap::from([("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())]);
        let items = [KeyToPath { key: "b".into(), path: "sub/b.txt".into(), mode: Some(0o400) }];
        let files = key_files("s", &data, Some(&items), false).expect("files");
        write_files(d.path(), &files, 0o644, None).expect("written");
        let md = std::fs::metadata(d.path().join("sub/b.txt")).expect("file");
        assert_eq!(md.permissions().mode() & 0o777, 0o400);
        assert!(!d.path().join("a").exists());
        assert!(key_files("s", &data, Some(&[KeyToPath { key: "zz".into(), path: "z".into(), mode: None }]), false).is_err());
        assert!(key_files("s", &data, Some(&[KeyToPath { key: "../x".into(), path: "../x".into(), mode: None }]), true).expect("optional").is_empty());
        let bad = [File { path: "../x".into(), data: vec![], mode: None }];
        assert!(write_files(d.path(), &bad, 0o644, None).is_err());
    }
}
