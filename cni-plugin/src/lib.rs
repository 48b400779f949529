//! riptide's CNI plugin (CNI spec 1.1.0): gives a pod a veth, an address
//! from the node's /24, routes, and a place in the node's eBPF datapath.
//!
//! [`run`] is the whole plugin: the binary only reads the environment and
//! stdin, calls it, and prints the answer.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod commands;
pub mod config;
pub mod datapath;
pub mod env;
pub mod inspect;
pub mod ipam;
pub mod link;
pub mod netlink;
pub mod netns;
pub mod types;

use env::{CniEnv, Command};
use types::{CURRENT_VERSION, CniError, SUPPORTED_VERSIONS, VersionInfo};

/// Runs one CNI invocation. `Ok(Some(json))` is printed on stdout with exit
/// status 0, `Ok(None)` prints nothing (DEL, CHECK, STATUS, GC), `Err` is
/// printed on stdout with a non-zero exit status.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        // Like pkg/skel: stdin is not needed to answer VERSION.
        let info = VersionInfo {
            cni_version: CURRENT_VERSION.to_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        };
        return to_json(&info).map(Some);
    }
    let conf = config::parse(stdin, env.command)?;
    let version = conf.cni_version.clone();
    let with_version = |mut e: CniError| {
        e.cni_version.clone_from(&version);
        e
    };
    let out = match env.command {
        Command::Add => commands::add(env, &conf).and_then(|r| to_json(&r)).map(Some),
        Command::Del => commands::del(env, &conf).map(|()| None),
        Command::Check => commands::check(env, &conf).map(|()| None),
        Command::Status => commands::status(&conf).map(|()| None),
        Command::Gc => commands::gc(&conf).map(|()| None),
        Command::Version => unreachable_version(),
    };
    out.map_err(with_version)
}

fn unreachable_version() -> Result<Option<String>, CniError> {
    Err(CniError::new(types::code::KERNEL, "VERSION is answered before the config is read"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, CniError> {
    serde_json::to_string(v)
        .map_err(|e| CniError::new(types::code::IO_FAILURE, format!("encoding the result: {e}")))
}
