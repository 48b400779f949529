//! The CNI exec protocol (spec 1.1): the first `*.conflist` in
//! `--cni-conf-dir`, each plugin's binary from `--cni-bin-dir`, env
//! CNI_COMMAND/CONTAINERID/NETNS/IFNAME/ARGS/PATH, the plugin entry on
//! stdin with `name` and `cniVersion` injected and `prevResult` chained.
//! The kubelet runs in the node's netns, so the plugin does too.
//!
//! riptide-cni needs the node's podCIDR: when the plugin entry names a
//! `podCIDRFile`, the kubelet writes `Node.spec.podCIDR` there; when it
//! names neither `podCIDR` nor `podCIDRFile`, the kubelet injects
//! `podCIDR`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use super::Error;

#[derive(Debug, Clone)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

/// The kubelet's message for a node whose CNI config is missing or broken.
pub fn not_ready_message(e: &Error) -> String {
    let e = e.to_string();
    let e = e.strip_prefix("cni: ").unwrap_or(&e);
    format!("container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: {e}")
}

/// What a pod's ADD returned, kept for DEL.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub ip: Option<String>,
    pub result: Value,
}

impl Cni {
    /// The network list: first `*.conflist` (lexical order, as CRI runtimes
    /// pick), or a single `*.conf` wrapped as a list.
    pub fn load(&self) -> Result<Value, Error> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| Error::Cni(format!("reading {}: {e}", self.conf_dir.display())))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
            .collect();
        files.sort();
        let f = files.first().ok_or_else(|| Error::Cni(format!("no network config found in {}: cni plugin not initialized", self.conf_dir.display())))?;
        let text = std::fs::read_to_string(f).map_err(|e| Error::Cni(format!("reading {}: {e}", f.display())))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Cni(format!("parsing {}: {e}", f.display())))?;
        if v.get("plugins").is_some() {
            Ok(v)
        } else {
            Ok(json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]}))
        }
    }

    /// Whether the node's network is configured, or upstream's
    /// `NetworkReady=false` message naming what is missing.
    pub fn network_status(&self) -> Result<(), String> {
        self.load().map(drop).map_err(|e| not_ready_message(&e))
    }

    /// Makes the node's range available to plugins that read it from a file.
    pub fn publish_pod_cidr(&self, pod_cidr: &str) -> Result<(), Error> {
        let list = self.load()?;
        for p in list["plugins"].as_array().into_iter().flatten() {
            if let Some(f) = p.get("podCIDRFile").and_then(Value::as_str) {
                let f = Path::new(f);
                if std::fs::read_to_string(f).ok().as_deref().map(str::trim) == Some(pod_cidr) {
                    continue;
                }
                if let Some(d) = f.parent() {
                    std::fs::create_dir_all(d).map_err(|e| Error::Cni(format!("creating {}: {e}", d.display())))?;
                }
                let tmp = f.with_extension("tmp");
                std::fs::write(&tmp, format!("{pod_cidr}\n"))
                    .and_then(|()| std::fs::rename(&tmp, f))
                    .map_err(|e| Error::Cni(format!("writing {}: {e}", f.display())))?;
            }
        }
        Ok(())
    }

    // The CNI environment is this many values; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn exec(&self, command: &str, plugin: &Value, list: &Value, id: &str, netns: &str, args: &str, prev: Option<&Value>, pod_cidr: Option<&str>) -> Result<Value, Error> {
        let ty = plugin["type"].as_str().ok_or_else(|| Error::Cni("plugin entry without \"type\"".into()))?;
        let bin = self.bin_dir.join(ty);
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        if conf.get("podCIDR").is_none() && conf.get("podCIDRFile").is_none() && ty == "riptide"
            && let Some(c) = pod_cidr
        {
            conf["podCIDR"] = json!(c);
        }
        let mut child = Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Cni(format!("starting {}: {e}", bin.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| Error::Cni(format!("running {}: {e}", bin.display())))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(Error::Cni(format!(
                "{ty} {command} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if stdout.trim().is_empty() {
            return Ok(prev.cloned().unwrap_or(Value::Null));
        }
        serde_json::from_str(&stdout).map_err(|e| Error::Cni(format!("{ty} {command}: bad result {stdout:?}: {e}")))
    }

    /// ADD through every plugin of the list; on failure, DEL what was done.
    pub fn add(&self, id: &str, netns: &Path, args: &str, pod_cidr: Option<&str>) -> Result<Attachment, Error> {
        let list = self.load()?;
        let mut prev: Option<Value> = None;
        for p in list["plugins"].as_array().into_iter().flatten() {
            match self.exec("ADD", p, &list, id, &netns.to_string_lossy(), args, prev.as_ref(), pod_cidr) {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let _ = self.del(id, netns, args, prev.as_ref(), pod_cidr);
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        let ip = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .find(|a| !a.contains(':'))
            .map(|a| a.split('/').next().unwrap_or(a).to_string());
        Ok(Attachment { ip, result })
    }

    /// DEL in reverse order; must succeed when things are already gone.
    pub fn del(&self, id: &str, netns: &Path, args: &str, prev: Option<&Value>, pod_cidr: Option<&str>) -> Result<(), Error> {
        let list = self.load()?;
        let netns_s = if netns.exists() { netns.to_string_lossy().into_owned() } else { String::new() };
        let mut first_err = None;
        for p in list["plugins"].as_array().into_iter().flatten().rev() {
            if let Err(e) = self.exec("DEL", p, &list, id, &netns_s, args, prev.filter(|v| !v.is_null()), pod_cidr) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// CNI_ARGS for a pod, as kubelet/CRI runtimes pass them.
pub fn pod_args(ns: &str, name: &str, uid: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={uid};K8S_POD_UID={uid}")
}
