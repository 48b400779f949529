//! Which backend-selection algorithm a Service port gets: the cluster
//! default (`--lb-algorithm`, ConfigMap key `lb-algorithm`) unless the
//! Service's `service.riptide.io/lb-algorithm` annotation says otherwise
//! (Cilium: `bpf-lb-algorithm` and `service.cilium.io/lb-algorithm`).
//!
//! - default `maglev`: Maglev on the frontends outside clients reach
//!   (NodePort, externalIPs, LoadBalancer IPs), where an upstream router may
//!   hand one flow to different nodes and every node must pick the same
//!   backend; random on the ClusterIP and hostPorts (only this node's
//!   clients reach them, mostly through socket LB, which picks at connect
//!   time anyway). Cilium recommends Maglev for north-south traffic the
//!   same way.
//! - default `random`: random everywhere (kube-proxy's behaviour).
//! - annotation `maglev`: Maglev on every frontend of the Service, the
//!   ClusterIP included (per-packet LB from pods then agrees across nodes
//!   too); annotation `random`: random everywhere.
//!
//! The table size (`--maglev-table-size`, key `maglev-table-size`) is one
//! of 251, 1021, 4093, 16381 (default) or 65521 and must be the same on
//! every node, like Cilium's `maglev-table-size`: keep it ≥ 100× the
//! largest backend count for ≈ 1 % imbalance. Backend weights are not
//! supported (EndpointSlices carry none): every backend owns an equal share.

use std::{fmt, str::FromStr};

use riptide_datapath::{maglev::TableSize, service::Algorithm};

use crate::slim::SlimService;

/// Annotation that picks a Service's algorithm.
pub const ANNOTATION: &str = "service.riptide.io/lb-algorithm";

/// An algorithm name as the flag and the annotation spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Name {
    Random,
    #[default]
    Maglev,
}

/// `--lb-algorithm` / annotation value that is neither `random` nor `maglev`.
#[derive(Debug, thiserror::Error)]
#[error("lb algorithm {0:?} is neither random nor maglev")]
pub struct InvalidName(pub String);

impl FromStr for Name {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "random" => Ok(Self::Random),
            "maglev" => Ok(Self::Maglev),
            other => Err(InvalidName(other.to_owned())),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Random => "random",
            Self::Maglev => "maglev",
        })
    }
}

/// The cluster-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Defaults {
    pub algorithm: Name,
    pub maglev_table_size: TableSize,
    /// `--lb-mode`, for Services without the `service.riptide.io/lb-mode`
    /// annotation (`lb_mode.rs`).
    pub lb_mode: riptide_datapath::service::LbMode,
}

/// The value of `svc`'s annotation `key`.
pub(crate) fn annotation<'a>(svc: &'a SlimService, key: &str) -> Option<&'a str> {
    svc.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A Service carrying `key: value` (none when `value` is `None`).
#[cfg(test)]
pub(crate) fn annotated(key: &str, value: Option<&str>) -> SlimService {
    let mut s = SlimService::default();
    s.annotations =
        value.map(|v| std::collections::BTreeMap::from([(key.to_owned(), v.to_owned())]));
    s
}

/// The algorithm of `svc`'s ports, and a note when its annotation was
/// ignored (an unknown value falls back to the cluster default).
pub fn for_service(svc: &SlimService, d: Defaults) -> (Algorithm, Option<String>) {
    let annotation = annotation(svc, ANNOTATION);
    let m = d.maglev_table_size;
    let default = match d.algorithm {
        Name::Random => Algorithm::Random,
        Name::Maglev => Algorithm::MaglevExternal(m),
    };
    match annotation.map(|v| v.parse::<Name>()) {
        None => (default, None),
        Some(Ok(Name::Random)) => (Algorithm::Random, None),
        Some(Ok(Name::Maglev)) => (Algorithm::Maglev(m), None),
        Some(Err(e)) => (default, Some(format!("{ANNOTATION} ignored: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn svc(value: Option<&str>) -> SlimService {
        annotated(ANNOTATION, value)
    }

    #[test]
    fn the_annotation_overrides_the_cluster_default() {
        let m = TableSize::new(1021).unwrap();
        let maglev = Defaults {
            algorithm: Name::Maglev,
            maglev_table_size: m,
            ..Defaults::default()
        };
        let random = Defaults {
            algorithm: Name::Random,
            ..maglev
        };
        assert_eq!(
            for_service(&svc(None), maglev),
            (Algorithm::MaglevExternal(m), None)
        );
        assert_eq!(for_service(&svc(None), random), (Algorithm::Random, None));
        assert_eq!(
            for_service(&svc(Some("random")), maglev).0,
            Algorithm::Random
        );
        assert_eq!(
            for_service(&svc(Some("maglev")), random).0,
            Algorithm::Maglev(m)
        );
        assert_eq!(
            for_service(&svc(Some(" maglev ")), random).0,
            Algorithm::Maglev(m)
        );
        let (alg, note) = for_service(&svc(Some("round-robin")), random);
        assert_eq!(alg, Algorithm::Random);
        assert!(note.unwrap().contains("round-robin"));
    }

    #[test]
    fn defaults_are_maglev_at_16381() {
        let d = Defaults::default();
        assert_eq!(d.algorithm, Name::Maglev);
        assert_eq!(d.maglev_table_size.get(), 16381);
        assert_eq!("random".parse::<Name>().unwrap().to_string(), "random");
        assert!("Maglev".parse::<Name>().is_err());
    }
}
