//! Node install and uninstall: `riptide-agent install-cni` (the DaemonSet's
//! init container) and `riptide-agent uninstall`.
//!
//! `install-cni` puts the plugin at `<cni-bin-dir>/riptide` and the conflist
//! at `<cni-conf-dir>/10-riptide.conflist`, each written to a dot-named
//! temporary file in the same directory, fsynced and renamed into place:
//! the runtime (which watches the conf dir) never reads half a conflist, and
//! replacing a plugin binary that is executing at that moment is safe
//! (rename, never write into a busy executable: ETXTBSY). The conflist's
//! `podCIDRFile` is the file the agent writes, `/run/riptide/<node>/podcidr`.
//!
//! `uninstall` undoes what riptide did to a node: removes the conflist (the
//! runtime stops offering riptide to new pods), every route with riptide's
//! protocol (201), the node's pins under `/sys/fs/bpf/riptide/<node>/` —
//! pinned bpf_links (socket LB on the cgroup, tcx on the uplink) detach when
//! their pin goes; on kernels without tcx the uplink's tc filters are
//! deleted — and the node's run dir. Run it with the agent stopped
//! (a running agent would load and pin again).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use clap::Parser;
use ipnetwork::Ipv4Network;

use crate::routes::{self, Routes};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the config dir")]
    Config(#[from] crate::config_dir::Error),
    #[error("config key {key}={value:?} is not valid")]
    Value { key: &'static str, value: String },
    #[error(transparent)]
    Cidr(#[from] riptide_cidr::Error),
    #[error("removing riptide's routes")]
    Routes(#[source] routes::Error),
    #[error("removing the vxlan device")]
    Tunnel(#[source] crate::tunnel::Error),
    #[error("removing the pins of node {node}")]
    Unpin {
        node: String,
        #[source]
        source: Box<riptide_datapath::Error>,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { action, path, source }
}

/// The two node-level subcommands of `riptide-agent`.
#[derive(Debug)]
pub enum Subcommand {
    InstallCni(InstallCni),
    Uninstall(Uninstall),
}

impl Subcommand {
    /// `Some` when `argv[1]` names a subcommand (parsed from the rest);
    /// `None` for the agent itself.
    pub fn from_argv(argv: &[OsString]) -> Option<Result<Self, clap::Error>> {
        let rest = argv.get(1..)?;
        match argv.get(1)?.to_str()? {
            "install-cni" => Some(InstallCni::try_parse_from(rest).map(Self::InstallCni)),
            "uninstall" => Some(Uninstall::try_parse_from(rest).map(Self::Uninstall)),
            _ => None,
        }
    }

    pub async fn run(self) -> Result<(), Error> {
        match self {
            Self::InstallCni(a) => a.run().map(|_| ()),
            Self::Uninstall(a) => {
                let report = a.run().await?;
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
                Ok(())
            }
        }
    }
}

/// Installs the riptide CNI plugin and this node's conflist.
#[derive(Debug, Clone, Parser)]
#[command(name = "install-cni")]
pub struct InstallCni {
    /// This node's name (the conflist's `nodeName`).
    #[arg(long, env = "RIPTIDE_NODE_NAME")]
    pub node_name: String,
    /// ConfigMap directory; `cluster-cidr` and `mtu` are read from it unless
    /// given as flags.
    #[arg(long, env = crate::config_dir::ENV)]
    pub config_dir: Option<PathBuf>,
    /// Cluster pod range (default 10.42.0.0/16).
    #[arg(long, value_parser = |s: &str| riptide_cidr::parse("cluster-cidr", s))]
    pub cluster_cidr: Option<Ipv4Network>,
    /// MTU of pod interfaces (default 1500).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// The plugin binary to install (default: `riptide-cni` next to this executable).
    #[arg(long)]
    pub cni_bin_src: Option<PathBuf>,
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = "10-riptide.conflist")]
    pub conflist_name: String,
    /// The agent's run dir on the host (`podCIDRFile` = `<run-dir>/<node>/podcidr`).
    #[arg(long, default_value = "/run/riptide")]
    pub run_dir: PathBuf,
    /// IPAM state on the host (`stateDir` = `<cni-state-dir>/<node>`).
    #[arg(long, default_value = "/var/lib/cni/riptide")]
    pub cni_state_dir: PathBuf,
}

/// What `install-cni` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub plugin: PathBuf,
    pub conflist: PathBuf,
}

impl InstallCni {
    /// The conflist for this node (host paths: the runtime runs the plugin
    /// on the host).
    pub fn conflist(&self) -> Result<serde_json::Value, Error> {
        let keys = match &self.config_dir {
            Some(d) => crate::config_dir::read(d)?,
            None => BTreeMap::new(),
        };
        self.conflist_with(&keys)
    }

    /// Like [`Self::conflist`] with the config keys given (e.g. a
    /// ConfigMap's `data`).
    pub fn conflist_with(&self, keys: &BTreeMap<String, String>) -> Result<serde_json::Value, Error> {
        let cluster = match (self.cluster_cidr, keys.get("cluster-cidr")) {
            (Some(c), _) => c,
            (None, Some(v)) => riptide_cidr::parse("cluster-cidr", v)?,
            (None, None) => riptide_cidr::parse("cluster-cidr", "10.42.0.0/16")?,
        };
        let mtu = match (self.mtu, keys.get("mtu")) {
            (Some(m), _) => m,
            (None, Some(v)) => v.parse().map_err(|_| Error::Value { key: "mtu", value: v.clone() })?,
            (None, None) => 1500,
        };
        Ok(serde_json::json!({
            "cniVersion": "1.1.0",
            "cniVersions": ["1.0.0", "1.1.0"],
            "name": "riptide",
            "plugins": [{
                "type": "riptide",
                "nodeName": self.node_name,
                "podCIDRFile": self.run_dir.join(&self.node_name).join("podcidr"),
                "clusterCIDR": cluster.to_string(),
                "stateDir": self.cni_state_dir.join(&self.node_name),
                "mtu": mtu,
            }],
        }))
    }

    pub fn run(&self) -> Result<Installed, Error> {
        let conflist = self.conflist()?;
        let src = match &self.cni_bin_src {
            Some(p) => p.clone(),
            None => {
                let exe = std::env::current_exe().map_err(io("locating", Path::new("/proc/self/exe")))?;
                exe.with_file_name("riptide-cni")
            }
        };
        let bin = std::fs::read(&src).map_err(io("reading the plugin", &src))?;
        let plugin = self.cni_bin_dir.join("riptide");
        write_atomic(&plugin, &bin, 0o755)?;
        let mut text = serde_json::to_vec_pretty(&conflist).unwrap_or_default();
        text.push(b'\n');
        let path = self.cni_conf_dir.join(&self.conflist_name);
        write_atomic(&path, &text, 0o644)?;
        tracing::info!(plugin = %plugin.display(), conflist = %path.display(), "CNI installed");
        Ok(Installed { plugin, conflist: path })
    }
}

/// Writes `data` to a dot-named temporary file next to `path`, fsyncs it and
/// renames it over `path`, then fsyncs the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // Dot name and no .conf/.conflist/.json suffix: libcni ignores it.
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("renaming into place", path)(e));
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

/// Removes riptide from this node.
#[derive(Debug, Clone, Parser)]
#[command(name = "uninstall")]
pub struct Uninstall {
    #[arg(long, env = "RIPTIDE_NODE_NAME")]
    pub node_name: String,
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = "10-riptide.conflist")]
    pub conflist_name: String,
    /// Also remove `<dir>/riptide` (only once no pod uses it: the runtime
    /// needs the plugin to tear down pods that still have riptide networking).
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// The agent's run dir; `<run-dir>/<node>` is removed.
    #[arg(long, default_value = "/run/riptide")]
    pub run_dir: PathBuf,
    /// Keep routes (e.g. when another netns owner manages them).
    #[arg(long)]
    pub keep_routes: bool,
}

/// What `uninstall` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UninstallReport {
    pub conflist_removed: bool,
    pub plugin_removed: bool,
    pub routes_removed: Vec<String>,
    /// The `--tunnel vxlan` device (with its neighbours and FDB entries);
    /// only reported when there was one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tunnel_removed: bool,
    pub pins_removed: bool,
    pub run_dir_removed: bool,
}

fn remove(path: &Path, dir: bool) -> Result<bool, Error> {
    let r = if dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("removing", path)(e)),
    }
}

impl Uninstall {
    /// Idempotent: a second run removes nothing and succeeds.
    pub async fn run(&self) -> Result<UninstallReport, Error> {
        let mut r = UninstallReport {
            conflist_removed: remove(&self.cni_conf_dir.join(&self.conflist_name), false)?,
            ..UninstallReport::default()
        };
        if let Some(d) = &self.cni_bin_dir {
            r.plugin_removed = remove(&d.join("riptide"), false)?;
        }
        if !self.keep_routes {
            // Deletion never looks at the range: every route tagged with
            // riptide's protocol is riptide's.
            let any = Ipv4Network::new([0, 0, 0, 0].into(), 0).map_err(|_| Error::Value { key: "cluster-cidr", value: String::new() })?;
            let routes = Routes::new(any).map_err(Error::Routes)?;
            let rep = routes.sync(&BTreeMap::new()).await.map_err(Error::Routes)?;
            r.routes_removed = rep.removed.iter().map(ToString::to_string).collect();
            let mut t = crate::tunnel::Tunnel::new(crate::tunnel::VxlanConfig::default()).map_err(Error::Tunnel)?;
            r.tunnel_removed = t.remove_device().await.map_err(Error::Tunnel)?;
        }
        let pins = riptide_datapath::pin_dir(&self.node_name).map_err(|e| Error::Unpin { node: self.node_name.clone(), source: Box::new(e) })?;
        r.pins_removed = pins.exists();
        riptide_datapath::unpin_node(&self.node_name).map_err(|e| Error::Unpin { node: self.node_name.clone(), source: Box::new(e) })?;
        // Kernels without tcx hold the uplink programs in tc filters, which
        // no pin keeps: delete them from the devices.
        riptide_datapath::detach_uplink_filters().map_err(|e| Error::Unpin { node: self.node_name.clone(), source: Box::new(e) })?;
        r.run_dir_removed = remove(&self.run_dir.join(&self.node_name), true)?;
        tracing::info!(report = ?r, "riptide removed from this node");
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn subcommands_are_recognised_and_the_agent_is_not() {
        assert!(Subcommand::from_argv(&argv(&["riptide-agent", "--node-name", "n"])).is_none());
        assert!(Subcommand::from_argv(&argv(&["riptide-agent"])).is_none());
        let s = Subcommand::from_argv(&argv(&["riptide-agent", "uninstall", "--node-name", "n"])).unwrap().unwrap();
        assert!(matches!(s, Subcommand::Uninstall(u) if u.node_name == "n" && u.cni_conf_dir == Path::new("/etc/cni/net.d")));
        assert!(Subcommand::from_argv(&argv(&["riptide-agent", "install-cni", "--bogus"])).unwrap().is_err());
    }

    #[test]
    fn conflist_takes_flags_over_config_keys() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cluster-cidr"), "10.50.0.0/16\n").unwrap();
        std::fs::write(d.path().join("mtu"), "1450").unwrap();
        let a = InstallCni::try_parse_from(["install-cni", "--node-name", "n1", "--config-dir", d.path().to_str().unwrap()]).unwrap();
        let c = a.conflist().unwrap();
        let p = &c["plugins"][0];
        assert_eq!(p["type"], "riptide");
        assert_eq!(p["nodeName"], "n1");
        assert_eq!(p["podCIDRFile"], "/run/riptide/n1/podcidr");
        assert_eq!(p["clusterCIDR"], "10.50.0.0/16");
        assert_eq!(p["stateDir"], "/var/lib/cni/riptide/n1");
        assert_eq!(p["mtu"], 1450);
        let a = InstallCni::try_parse_from(["install-cni", "--node-name", "n1", "--mtu", "9000", "--config-dir", d.path().to_str().unwrap()]).unwrap();
        assert_eq!(a.conflist().unwrap()["plugins"][0]["mtu"], 9000);
        std::fs::write(d.path().join("mtu"), "big").unwrap();
        let a = InstallCni::try_parse_from(["install-cni", "--node-name", "n1", "--config-dir", d.path().to_str().unwrap()]).unwrap();
        assert!(a.conflist().is_err());
    }

    #[test]
    fn cluster_cidr_with_host_bits_is_refused_with_the_network_meant() {
        let want = "cluster-cidr 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?";
        let e = InstallCni::try_parse_from(["install-cni", "--node-name", "n1", "--cluster-cidr", "10.42.0.1/16"]).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cluster-cidr"), "10.42.0.1/16\n").unwrap();
        let a = InstallCni::try_parse_from(["install-cni", "--node-name", "n1", "--config-dir", d.path().to_str().unwrap()]).unwrap();
        assert_eq!(a.conflist().unwrap_err().to_string(), want);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/riptide");
        write_atomic(&p, b"one", 0o755).unwrap();
        write_atomic(&p, b"two", 0o755).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o755);
        let names: Vec<_> = std::fs::read_dir(d.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [OsString::from("riptide")]);
    }
}
