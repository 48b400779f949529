//! `kubectl exec` end to end: the Kubernetes remote-command channel
//! protocol over a WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`).
//!
//! Two halves, as in Kubernetes:
//!
//! - **Kubelet side** ([`server`]): accepts the WebSocket upgrade on
//!   `GET /exec/{namespace}/{pod}/{container}?command=…&command=…&stdin=…&stdout=…&stderr=…&tty=…`
//!   (the kubelet's own path), asks an [`ExecSpawner`] for the command to
//!   run, starts it with pipes (or a pty when `tty=true`), and carries its
//!   stdio over binary frames whose first byte is the channel
//!   (0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize). The client closes
//!   stdin with the v5 frame `[255, 0]`. When the process has exited and its
//!   output is drained, a `metav1.Status` goes out on channel 3 — `Success`,
//!   or `Failure`/`NonZeroExitCode` with the cause `{reason: ExitCode,
//!   message: "<code>"}` that kubectl turns into its own exit code — and the
//!   WebSocket is closed normally. Pings are answered. If the client goes
//!   away first, the process (its process group when it leads one) is killed.
//! - **Apiserver side** ([`proxy`]): `pods/exec` resolves the pod's node
//!   and splices the client's upgrade request (over its own authenticated
//!   HTTPS connection) to that node's kubelet endpoint (`status.addresses[InternalIP]` and
//!   `status.daemonEndpoints.kubeletEndpoint.Port`, the same endpoint
//!   `pods/log` uses) like kube-apiserver's upgrade-aware proxy: the
//!   WebSocket handshake and every frame pass through unchanged, so the
//!   subprotocol is negotiated between kubectl and the kubelet.
//!
//! # What the kubelet implements
//!
//! One trait method: build the `std::process::Command` for an
//! [`ExecRequest`], already placed in the pod (network namespace via
//! `setns`, the container's UTS namespace, the pod's cgroup, env, cwd —
//! e.g. with the kubelet's `process::command` and a `pre_exec` hook).
//! This module sets stdin/stdout/stderr (pipes or the pty), makes the
//! pty the controlling terminal, spawns, and owns the process until it exits.
//!
//! ```ignore
//! struct KubeletExec { /* pod registry */ }
//!
//! #[async_trait::async_trait]
//! impl riptide_controlplane::exec::ExecSpawner for KubeletExec {
//!     async fn command(&self, req: &ExecRequest) -> Result<std::process::Command, ExecError> {
//!         let pid = self.running_pid(&req.namespace, &req.pod, &req.container)
//!             .ok_or_else(|| ExecError::NotFound(format!("container {} is not running", req.container)))?;
//!         process::command(&req.command, &env, cwd, &Placement { netns, mntns, cgroup, join_uts_of: Some(pid), hostname: None })
//!             .map_err(|e| ExecError::Internal(e.to_string()))
//!     }
//! }
//!
//! // In the kubelet's axum router (any state type):
//! let app = Router::new()
//!     .route("/containerLogs/{ns}/{pod}/{container}", get(logs))
//!     .merge(riptide_controlplane::exec::router(Arc::new(KubeletExec { .. })));
//! ```
//!
//! `exec::server::serve(spawner, target, request)` is the same thing for
//! a hand-written router; it works on any hyper/axum request served with
//! upgrades enabled (`axum::serve` and hyper's `serve_connection_with_upgrades` do).
//!
//! Who may exec is decided in front of the router: the kubelet serves it
//! over HTTPS behind its authentication and authorization
//! (`kubelet::auth`), and the apiserver connects with its own client
//! certificate (`apiserver::proxy`).
//!
//! Not implemented: `pods/attach` (the apiserver answers 501 with a
//! Status), `pods/portforward` (501 with a Status naming the
//! alternatives), SPDY (kubectl ≥ 1.30 uses WebSockets; its SPDY fallback
//! gets a 400 Status).

pub mod protocol;
pub mod proxy;
mod pty;
pub mod server;

use std::sync::Arc;

pub use self::server::{ExecTarget, router, serve};

/// What the client asked for: the path (namespace, pod, container) and the
/// query (`command` repeated, `stdin`, `stdout`, `stderr`, `tty`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// argv; never empty (the server rejects an empty command with 400).
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    /// Always false when `tty` (a terminal has one output stream).
    pub stderr: bool,
    pub tty: bool,
}

/// Why an exec cannot start. Returned by the spawner before the WebSocket
/// upgrade, so it reaches the client as a plain HTTP `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The pod or container is not (or no longer) running here: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be served as asked: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Anything else: 500.
    #[error("{0}")]
    Internal(String),
}

/// The kubelet's part: the command for an exec request, placed in the pod
/// (namespaces, cgroup, env, working directory). Stdio is set by this
/// module and overrides whatever the command had.
#[async_trait::async_trait]
pub trait ExecSpawner: Send + Sync + 'static {
    async fn command(&self, req: &ExecRequest) -> Result<std::process::Command, ExecError>;
}

/// An [`ExecSpawner`] from a closure.
pub struct FnSpawner<F>(pub F);

#[async_trait::async_trait]
impl<F> ExecSpawner for FnSpawner<F>
where
    F: Fn(&ExecRequest) -> Result<std::process::Command, ExecError> + Send + Sync + 'static,
{
    async fn command(&self, req: &ExecRequest) -> Result<std::process::Command, ExecError> {
        (self.0)(req)
    }
}

/// Shorthand for `Arc::new(FnSpawner(f))`.
pub fn spawner_fn<F>(f: F) -> Arc<dyn ExecSpawner>
where
    F: Fn(&ExecRequest) -> Result<std::process::Command, ExecError> + Send + Sync + 'static,
{
    Arc::new(FnSpawner(f))
}
