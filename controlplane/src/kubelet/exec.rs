//! `kubectl exec`: the kubelet's [`ExecSpawner`] for the WebSocket
//! channel protocol in [`crate::exec`]. The command joins the running
//! container's network, mount, UTS and PID namespaces (so it sees the
//! pod's /etc files, hostname and processes) and the container's cgroup
//! (its device rules), runs as
//! the container's user with its capabilities, starts in
//! the container's working directory and gets the container's environment
//! (as `runc exec` does: the Service variables, `KUBERNETES_SERVICE_HOST`,
//! the pod's `env`), read from the container process's initial environment.

use std::sync::Arc;

use crate::exec::{ExecError, ExecRequest, ExecSpawner};

use super::{Shared, process, sandbox};

pub struct KubeletExec(pub Arc<Shared>);

#[async_trait::async_trait]
impl ExecSpawner for KubeletExec {
    async fn command(&self, req: &ExecRequest) -> Result<std::process::Command, ExecError> {
        let (mut place, pid) = {
            let r = self.0.registry.lock().map_err(|_| ExecError::Internal("pod registry poisoned".into()))?;
            let reg = r
                .get(&(req.namespace.clone(), req.pod.clone()))
                .ok_or_else(|| ExecError::NotFound(format!("pod {}/{} is not running on this node", req.namespace, req.pod)))?;
            let pid = reg
                .containers
                .get(&req.container)
                .and_then(|(_, pid)| *pid)
                .ok_or_else(|| ExecError::NotFound(format!("container {} is not running", req.container)))?;
            let mut place = reg.placement.clone();
            place.security = reg.security.get(&req.container).cloned();
            (place, pid)
        };
        place.join_uts_of = Some(pid);
        place.hostname = None;
        // The container's own mount namespace (its volumes), whichever it is.
        place.mntns = Some(std::path::PathBuf::from(format!("/proc/{pid}/ns/mnt")));
        // And its PID namespace (its /proc is already in that mount
        // namespace).
        place.pidns = process::pidns_of(pid);
        // And its cgroup, with its device rules.
        place.cgroup = place.cgroup.map(|pod| sandbox::joined_cgroup(&pod, &req.container));
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok().map(|p| p.to_string_lossy().into_owned());
        let env = exec_env(std::fs::read(format!("/proc/{pid}/environ")).ok().as_deref(), &req.pod);
        process::command(&req.command, &env, cwd.as_deref(), &place).map_err(|e| ExecError::Internal(e.to_string()))
    }
}

/// The container's environment (`/proc/<pid>/environ`, NUL separated) plus
/// `TERM`; without it (the process just exited), a basic one.
fn exec_env(environ: Option<&[u8]>, pod: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = environ
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    if env.is_empty() {
        env.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
        env.push(("HOSTNAME".into(), pod.to_owned()));
    }
    if !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::exec_env;

    #[test]
    fn exec_gets_the_container_environment() {
        let env = exec_env(Some(b"PATH=/bin\0KUBERNETES_SERVICE_HOST=10.43.0.1\0A=x=y\0\0"), "p");
        assert_eq!(
            env,
            [("PATH", "/bin"), ("KUBERNETES_SERVICE_HOST", "10.43.0.1"), ("A", "x=y"), ("TERM", "xterm")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let basic = exec_env(None, "p");
        assert!(basic.contains(&("HOSTNAME".into(), "p".into())) && basic.iter().any(|(k, _)| k == "TERM"));
    }
}
