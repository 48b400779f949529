//! Helpers for the install-manifest tests (`tests/manifests_*.rs`): the
//! YAML under `manifests/` as JSON objects, RBAC rules as permission sets,
//! and a throwaway apiserver with kubectl pointed at it.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use serde_json::Value;

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// `manifests/<name>`.
pub fn manifest(name: &str) -> PathBuf {
    repo_root().join("manifests").join(name)
}

/// Every document of a multi-document YAML file, as JSON (empty documents
/// skipped).
pub fn load_yaml(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The object of `kind` named `name` among `objs`.
pub fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

/// One permission: (API group, resource, verb).
pub type Permission = (String, String, String);

/// Expands RBAC `rules` into single permissions. Wildcards and
/// non-resource URLs are kept as written, so a comparison with an exact
/// list fails on them (they grant more than any list names).
pub fn permissions(rules: &Value) -> Result<BTreeSet<Permission>> {
    let mut out = BTreeSet::new();
    let strs = |v: &Value, field: &str| -> Result<Vec<String>> {
        v[field]
            .as_array()
            .with_context(|| format!("rule without {field}: {v}"))?
            .iter()
            .map(|s| s.as_str().map(str::to_owned).with_context(|| format!("{field} entry is not a string: {s}")))
            .collect()
    };
    for rule in rules.as_array().context("rules is not a list")? {
        if rule.get("nonResourceURLs").is_some() || rule.get("resourceNames").is_some() {
            out.insert(("?".into(), rule.to_string(), "?".into()));
            continue;
        }
        for g in strs(rule, "apiGroups")? {
            for r in strs(rule, "resources")? {
                for v in strs(rule, "verbs")? {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    Ok(out)
}

/// The binaries of this workspace (`target/<profile>/`, next to `deps/`).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// A workspace binary, which must have been built (`cargo build --bins`,
/// as `cargo xtask test` does first).
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        bail!("{} is missing: build the workspace first (cargo build --bins)", p.display());
    }
    Ok(p)
}

/// A running `riptide-controlplane apiserver` on 127.0.0.1 with a random
/// port; killed on drop.
pub struct Apiserver {
    child: Child,
    pub port: u16,
    pub kubeconfig: PathBuf,
    /// CA of the serving certificate (`<data>/pki/ca.crt`).
    pub ca: PathBuf,
    dir: PathBuf,
}

impl Apiserver {
    /// Starts the apiserver with `cmd` (a `riptide-controlplane` command,
    /// possibly prepared to enter a netns) storing under `dir`, with the
    /// given bearer-token file if any.
    pub fn start_with(mut cmd: Command, dir: &Path, token_file: Option<&Path>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join("cp");
        cmd.arg("apiserver").arg("--data-dir").arg(&data).args(["--listen", "127.0.0.1:0"]);
        if let Some(t) = token_file {
            cmd.arg("--token-file").arg(t);
        }
        let log = File::create(dir.join("apiserver.log")).context("creating apiserver.log")?;
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().context("starting the apiserver")?;
        let stdout = child.stdout.take().context("apiserver stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut port, mut kubeconfig) = (None, None);
        for line in lines.by_ref() {
            let line = line.context("reading apiserver stdout")?;
            if let Some(a) = line.strip_prefix("listening ") {
                port = a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
            } else if let Some(p) = line.strip_prefix("kubeconfig ") {
                kubeconfig = Some(PathBuf::from(p));
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let mut me = Self { child, port: 0, kubeconfig: PathBuf::new(), ca: data.join("pki/ca.crt"), dir: dir.to_owned() };
        match (port, kubeconfig) {
            (Some(port), Some(kc)) => {
                me.port = port;
                me.kubeconfig = kc;
                Ok(me)
            }
            _ => bail!("apiserver did not start:\n{}", std::fs::read_to_string(dir.join("apiserver.log")).unwrap_or_default()),
        }
    }

    /// In the root namespace.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(Command::new(bin("riptide-controlplane")?), dir, None)
    }

    /// `kubectl --kubeconfig … <args>` with `stdin`; stdout on success,
    /// an error with stderr otherwise. `cmd` is `kubectl` (maybe in a netns).
    pub fn kubectl_with(&self, mut cmd: Command, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = cmd
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kcache"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let (Some(s), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(s.as_bytes()).context("writing kubectl stdin")?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().context("waiting for kubectl")?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.kubectl_with(Command::new("kubectl"), args, stdin)
    }

    /// `kubectl get <what> -o json`.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&a, None)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {} printed no JSON", a.join(" ")))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default()
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("riptide-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_expand_and_keep_wildcards_visible() {
        let rules = serde_json::json!([
            {"apiGroups": ["", "apps"], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
        ]);
        let p = permissions(&rules).unwrap();
        assert_eq!(p.len(), 5);
        assert!(p.contains(&("apps".into(), "pods".into(), "list".into())));
        assert!(p.contains(&("*".into(), "*".into(), "*".into())));
        assert!(permissions(&serde_json::json!([{"apiGroups": [""], "verbs": ["get"]}])).is_err());
    }
}
