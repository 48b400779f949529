//! How outside clients of a Service's NodePort, externalIPs and
//! LoadBalancer IPs reach a backend on another node: the cluster default
//! (`--lb-mode`, ConfigMap key `lb-mode`) unless the Service's
//! `service.riptide.io/lb-mode` annotation says otherwise (Cilium:
//! `bpf-lb-mode` and `service.cilium.io/forwarding-mode`).
//!
//! - `snat` (default): the entry node source-NATs the flow to its own
//!   address; the reply comes back through it and the backend sees the
//!   node, as with kube-proxy.
//! - `dsr`: Direct Server Return. The entry node forwards the client's
//!   packet unchanged but for the destination, with the frontend in an IPv4
//!   option; the backend's node answers the client directly and the backend
//!   sees the client's address (`ebpf/programs/src/dsr.rs`). Per flow the
//!   datapath falls back to `snat` where the option cannot go: the packet
//!   would exceed the MTU, or the backend is reached through the VXLAN
//!   tunnel (`routing-mode: vxlan` therefore gets no DSR). Needs every
//!   node on a riptide with DSR, and a network between the nodes that
//!   passes IPv4 options.
//!
//! ClusterIPs and hostPorts are not affected (their clients are inside the
//! cluster, and their replies come back through the node anyway).

use std::{fmt, str::FromStr};

use riptide_datapath::service::LbMode;

/// Annotation that picks a Service's mode.
pub const ANNOTATION: &str = "service.riptide.io/lb-mode";

/// `--lb-mode` / annotation value that is neither `snat` nor `dsr`.
#[derive(Debug, thiserror::Error)]
#[error("lb mode {0:?} is neither snat nor dsr")]
pub struct InvalidMode(pub String);

/// A mode as the flag and the annotation spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Name(pub LbMode);

impl FromStr for Name {
    type Err = InvalidMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "snat" => Ok(Self(LbMode::Snat)),
            "dsr" => Ok(Self(LbMode::Dsr)),
            other => Err(InvalidMode(other.to_owned())),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
        })
    }
}

/// The mode of `svc`'s ports, and a note when its annotation was ignored
/// (an unknown value falls back to the cluster default).
pub fn for_service(svc: &crate::slim::SlimService, default: LbMode) -> (LbMode, Option<String>) {
    match crate::lb_algorithm::annotation(svc, ANNOTATION).map(|v| v.parse::<Name>()) {
        None => (default, None),
        Some(Ok(Name(mode))) => (mode, None),
        Some(Err(e)) => (default, Some(format!("{ANNOTATION} ignored: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn svc(value: Option<&str>) -> crate::slim::SlimService {
        crate::lb_algorithm::annotated(ANNOTATION, value)
    }

    #[test]
    fn the_annotation_overrides_the_cluster_default() {
        assert_eq!(for_service(&svc(None), LbMode::Snat), (LbMode::Snat, None));
        assert_eq!(for_service(&svc(None), LbMode::Dsr), (LbMode::Dsr, None));
        assert_eq!(for_service(&svc(Some("dsr")), LbMode::Snat).0, LbMode::Dsr);
        assert_eq!(for_service(&svc(Some(" snat ")), LbMode::Dsr).0, LbMode::Snat);
        let (mode, note) = for_service(&svc(Some("hybrid")), LbMode::Dsr);
        assert_eq!(mode, LbMode::Dsr);
        assert!(note.unwrap().contains("hybrid"));
    }

    #[test]
    fn names_round_trip_and_snat_is_the_default() {
        assert_eq!(Name::default().0, LbMode::Snat);
        for n in ["snat", "dsr"] {
            assert_eq!(n.parse::<Name>().unwrap().to_string(), n);
        }
        assert!("DSR".parse::<Name>().is_err());
    }

    #[test]
    fn the_watch_keeps_the_annotations_read_here() {
        for a in [ANNOTATION, crate::lb_algorithm::ANNOTATION] {
            assert!(a.starts_with(crate::slim::SERVICE_ANNOTATION_PREFIX), "{a}");
        }
    }
}
