//! `--config-dir`: the agent's settings from a directory holding one file
//! per key — a ConfigMap mounted as a volume (`riptide-config` in
//! `manifests/riptide.yaml`), the way cilium-agent reads its ConfigMap.
//!
//! Keys become command-line flags, so the flags stay the one definition of
//! every setting and a flag given on the command line wins over the file.
//!
//! | key | flag |
//! |---|---|
//! | `routing-mode` | `native` → nothing (the default), `vxlan` → `--tunnel=vxlan`, `none` → `--no-routes` |
//! | `socket-lb` | `true` → `--cgroup=<cgroup-root>`; `false` → nothing |
//! | `cgroup-root` | cgroup v2 directory for socket LB (default `/sys/fs/cgroup`) |
//! | `masquerade` | `false` → `--no-masquerade` |
//! | `lb-algorithm` | `--lb-algorithm=maglev\|random` (see `lb_algorithm.rs`) |
//! | `maglev-table-size` | `--maglev-table-size=M` (251, 1021, 4093, 16381, 65521) |
//! | `lb-mode` | `--lb-mode=snat\|dsr` (see `lb_mode.rs`) |
//! | `xdp` | `--xdp=native\|generic\|disabled`; read again while running (`xdp.rs`) |
//! | `mtu`, `k8s-service-host`, `k8s-service-port` | not flags: the CNI installer and the pod's env read them |
//! | any other `key` | `--key=value`; `true` → `--key`; `false` or empty → nothing |
//!
//! The files are read once at start (except `xdp`); restart the pods after
//! a change (`kubectl -n riptide-system rollout restart ds/riptide-agent`).

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

/// Environment variable naming the directory when `--config-dir` is absent.
pub const ENV: &str = "RIPTIDE_CONFIG_DIR";

/// Keys other consumers read; never turned into agent flags.
pub const NOT_FLAGS: &[&str] = &["mtu", "k8s-service-host", "k8s-service-port", "cgroup-root"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading config dir {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config key {key}={value:?}: {reason}")]
    Value { key: String, value: String, reason: &'static str },
    #[error("--config-dir needs a value")]
    MissingValue,
}

/// Reads every key of `dir`. ConfigMap volumes hold `..data`,
/// `..<timestamp>` directories and symlinks `key → ..data/key`: dot names
/// are skipped, symlinks followed.
pub fn read(dir: &Path) -> Result<BTreeMap<String, String>, Error> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Read { path, source }
    };
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(err(dir))? {
        let entry = entry.map_err(err(dir))?;
        let Some(key) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let path = entry.path();
        if key.starts_with('.') || !path.is_file() {
            continue;
        }
        let value = std::fs::read_to_string(&path).map_err(err(&path))?;
        out.insert(key, value.trim().to_owned());
    }
    Ok(out)
}

fn is_true(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" => Ok(true),
        "false" | "" => Ok(false),
        _ => Err(Error::Value { key: key.into(), value: value.into(), reason: "expected true or false" }),
    }
}

/// The config directory `argv` names (`--config-dir`, else the
/// environment), without reading it.
pub fn dir(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == OsStr::new("--config-dir") {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config-dir=")) {
            return Some(v.into());
        }
    }
    std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The flags `keys` stand for, as `(flag name without --, value)`.
pub fn to_flags(keys: &BTreeMap<String, String>) -> Result<Vec<(String, Option<String>)>, Error> {
    let mut out = Vec::new();
    for (key, value) in keys {
        match key.as_str() {
            k if NOT_FLAGS.contains(&k) => {}
            "routing-mode" => match value.as_str() {
                "native" | "" => {}
                "none" => out.push(("no-routes".into(), None)),
                "vxlan" => out.push(("tunnel".into(), Some("vxlan".into()))),
                _ => return Err(Error::Value { key: key.clone(), value: value.clone(), reason: "routing modes: native, vxlan, none" }),
            },
            "socket-lb" => {
                if is_true(key, value)? {
                    let root = keys.get("cgroup-root").map_or("/sys/fs/cgroup", String::as_str);
                    out.push(("cgroup".into(), Some(root.to_owned())));
                }
            }
            "masquerade" => {
                if !is_true(key, value)? {
                    out.push(("no-masquerade".into(), None));
                }
            }
            _ => match value.as_str() {
                "true" => out.push((key.clone(), None)),
                "false" | "" => {}
                v => out.push((key.clone(), Some(v.to_owned()))),
            },
        }
    }
    Ok(out)
}

/// `--name` or `--name=…` appears in `argv`.
fn has_flag(argv: &[OsString], name: &str) -> bool {
    let long = format!("--{name}");
    argv.iter().filter_map(|a| a.to_str()).any(|a| a == long || a.strip_prefix(&long).is_some_and(|r| r.starts_with('=')))
}

/// Takes `--config-dir DIR` (or `--config-dir=DIR`, or [`ENV`]) out of
/// `argv` and appends the flags its keys stand for, except flags already
/// on the command line. Without a config dir `argv` is returned unchanged.
pub fn expand(argv: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, Error> {
    let mut args = Vec::new();
    let mut dir: Option<PathBuf> = None;
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        if a == OsStr::new("--config-dir") {
            dir = Some(it.next().ok_or(Error::MissingValue)?.into());
        } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config-dir=")) {
            dir = Some(v.into());
        } else {
            args.push(a);
        }
    }
    let dir = dir.or_else(|| std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
    let Some(dir) = dir else { return Ok(args) };
    let flags = to_flags(&read(&dir)?)?;
    let given: Vec<OsString> = args.clone();
    for (name, value) in flags {
        if has_flag(&given, &name) {
            continue;
        }
        args.push(match value {
            Some(v) => format!("--{name}={v}").into(),
            None => format!("--{name}").into(),
        });
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(keys: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        // Shaped like a ConfigMap volume: data in ..data, symlinks on top.
        let data = d.path().join("..2025_01_01_00_00_00.1");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, d.path().join("..data")).unwrap();
        for (k, v) in keys {
            std::fs::write(data.join(k), v).unwrap();
            std::os::unix::fs::symlink(format!("..data/{k}"), d.path().join(k)).unwrap();
        }
        d
    }

    fn strs(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn configmap_keys_become_flags() {
        let d = dir(&[
            ("cluster-cidr", "10.42.0.0/16\n"),
            ("routing-mode", "native"),
            ("socket-lb", "true"),
            ("cgroup-root", "/host/sys/fs/cgroup"),
            ("masquerade", "false"),
            ("uplink", ""),
            ("mtu", "1450"),
            ("k8s-service-host", "192.0.2.10"),
            ("pod-cidr-fallback-after", "30"),
        ]);
        let argv = ["riptide-agent", "--node-name", "n1", "--config-dir", d.path().to_str().unwrap()].map(OsString::from);
        let out = expand(argv).unwrap();
        assert_eq!(
            strs(&out),
            [
                "riptide-agent",
                "--node-name",
                "n1",
                "--cluster-cidr=10.42.0.0/16",
                "--no-masquerade",
                "--pod-cidr-fallback-after=30",
                "--cgroup=/host/sys/fs/cgroup",
            ]
        );
    }

    #[test]
    fn command_line_wins_and_bad_values_fail() {
        let d = dir(&[("cluster-cidr", "10.42.0.0/16"), ("socket-lb", "true"), ("routing-mode", "none")]);
        let p = format!("--config-dir={}", d.path().display());
        let out = expand(["a", "--cluster-cidr=10.99.0.0/16", "--cgroup", "/x", &p].map(OsString::from)).unwrap();
        assert_eq!(strs(&out), ["a", "--cluster-cidr=10.99.0.0/16", "--cgroup", "/x", "--no-routes"]);

        let d = dir(&[("routing-mode", "vxlan"), ("vxlan-vni", "7")]);
        let out = expand(["a", "--config-dir", d.path().to_str().unwrap()].map(OsString::from)).unwrap();
        assert_eq!(strs(&out), ["a", "--tunnel=vxlan", "--vxlan-vni=7"]);
        let d = dir(&[("routing-mode", "geneve")]);
        let e = expand(["a", "--config-dir", d.path().to_str().unwrap()].map(OsString::from)).unwrap_err();
        assert!(e.to_string().contains("routing modes"), "{e}");
        let d = dir(&[("socket-lb", "yes")]);
        assert!(expand(["a", "--config-dir", d.path().to_str().unwrap()].map(OsString::from)).is_err());
        assert!(expand(["a", "--config-dir"].map(OsString::from)).is_err());
    }

    #[test]
    fn without_a_config_dir_nothing_changes() {
        if std::env::var_os(ENV).is_some() {
            return;
        }
        let argv = ["a", "--node-name", "x"].map(OsString::from);
        assert_eq!(expand(argv.clone()).unwrap(), argv.to_vec());
    }
}
