//! Services → map entries, in three files: [`types`](self) (the vocabulary
//! the agent speaks too), [`plan`] (a service → its entries, pure) and the
//! writer ([`Services`], which owns the maps and the ids).
//!
//! A [`Service`] is one Kubernetes *service port*: its frontends
//! (ClusterIP:port, NodePort, externalIPs, LoadBalancer ingress IPs,
//! hostPorts) share one backend list (endpoints with the target port
//! resolved per EndpointSlice). The agent makes one per `ServicePort` and
//! one per Pod hostPort.

pub mod plan;
mod types;
mod writer;

pub use types::{
    Algorithm, Backend, BackendAddr, BackendState, Frontend, FrontendId, FrontendKind, LbMode,
    Protocol, Service, SourceRanges, TrafficPolicy, eligible,
};
pub use writer::Services;
