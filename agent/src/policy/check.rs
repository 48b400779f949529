//! `riptide policy check`: the verdict the datapath would give a new flow,
//! computed from a [`Compiled`] state with the datapath's lookups (LPM on
//! the ipcache, then up to three LPM lookups in the rules per direction).

use std::{fmt, net::Ipv4Addr, str::FromStr, sync::Arc};

use riptide_common::{
    IpcacheValue, PE_F_ANY_IN, PE_F_ANY_OUT, PE_F_AUDIT_IN, PE_F_AUDIT_OUT, PE_F_FAIL_CLOSED, PE_F_ISOLATED_IN,
    PE_F_ISOLATED_OUT, POL_DIR_EGRESS, POL_DIR_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL, PolicyKey, identity,
};

use super::{Compiled, PolicyName, RuleKey, pods::resolve};
use crate::slim::SlimPod;

/// One end of a flow: a pod by name or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Pod { namespace: String, name: String },
    Addr(Ipv4Addr),
}

impl FromStr for Peer {
    type Err = CheckError;

    /// `namespace/pod`, an address, or an address with a prefix length
    /// (`203.0.113.7/32`; the address as written is judged).
    fn from_str(s: &str) -> Result<Self, CheckError> {
        let addr = s.split_once('/').map_or(s, |(a, _)| a);
        if let Ok(addr) = addr.parse::<Ipv4Addr>() {
            return Ok(Self::Addr(addr));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(Self::Pod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(CheckError::Syntax(s.to_owned())),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Addr(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("{0:?} is neither namespace/pod nor an IPv4 address")]
    Syntax(String),
    #[error("pod {namespace}/{name} is unknown or has no IPv4 address")]
    UnknownPod { namespace: String, name: String },
}

/// Which lookup allowed a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The peer's own identity (a label set, or WORLD/REMOTE_NODE).
    Identity(u32),
    /// The CIDR identity of the longest ipBlock prefix holding the peer.
    Cidr(u32),
    /// A rule allowing every peer.
    Any,
}

/// The verdict of one direction (egress of the source, ingress of the
/// destination).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirVerdict {
    /// The pod is not on this node (or not a pod): its own node judges.
    NotLocal,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// The node's own addresses always pass (kubelet probes).
    AlwaysHost,
    /// A pod always reaches itself.
    AlwaysSelf,
    Allowed {
        policy: Option<PolicyName>,
        via: Via,
        /// The matching rule (prefix length and key).
        rule: RuleKey,
    },
    Denied,
    /// Would be denied; the namespace is in audit mode, so it passes and
    /// is reported.
    Audited,
    /// The agent failed to write the pod's rules: denied.
    FailClosed,
}

impl DirVerdict {
    fn passes(&self) -> bool {
        !matches!(self, Self::Denied | Self::FailClosed)
    }
}

impl fmt::Display for DirVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLocal => write!(f, "not judged here (not a local pod)"),
            Self::NotIsolated => write!(f, "not isolated"),
            Self::AlwaysHost => write!(f, "allowed (node address)"),
            Self::AlwaysSelf => write!(f, "allowed (pod to itself)"),
            Self::Allowed { policy, via, .. } => {
                let by = policy.as_ref().map_or_else(|| "an unknown policy".to_owned(), ToString::to_string);
                let via = match via {
                    Via::Identity(id) => format!("identity {id}"),
                    Via::Cidr(id) => format!("ipBlock identity {id}"),
                    Via::Any => "any peer".to_owned(),
                };
                write!(f, "allowed by {by} ({via})")
            }
            Self::Denied => write!(f, "denied"),
            Self::Audited => write!(f, "denied, passed in audit mode"),
            Self::FailClosed => write!(f, "denied (fail-closed: rules not written)"),
        }
    }
}

/// The verdict for a new flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub allowed: bool,
    /// Egress of the source.
    pub egress: DirVerdict,
    /// Ingress of the destination.
    pub ingress: DirVerdict,
}

impl Compiled {
    /// Judges a new flow `from` → `to`:`port`/`proto` (after Service
    /// translation: `to` is the backend) as the datapath would on this
    /// node. Directions of pods on other nodes are [`DirVerdict::NotLocal`].
    /// Pods are named by `pods` (the pod store).
    pub fn check(
        &self,
        pods: &[Arc<SlimPod>],
        from: &Peer,
        to: &Peer,
        port: u16,
        proto: u8,
    ) -> Result<Verdict, CheckError> {
        let from = resolve(pods, from)?;
        let to = resolve(pods, to)?;
        let egress = self.judge(from, to, POL_DIR_EGRESS, proto, port);
        let ingress = self.judge(to, from, POL_DIR_INGRESS, proto, port);
        Ok(Verdict {
            from,
            to,
            allowed: egress.passes() && ingress.passes(),
            egress,
            ingress,
        })
    }

    /// The ipcache's answer for `addr` (longest prefix).
    pub fn ipcache_lookup(&self, addr: Ipv4Addr) -> IpcacheValue {
        let bits = u32::from(addr);
        (0..=32u8)
            .rev()
            .find_map(|len| {
                let masked = if len == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(len))) };
                self.ipcache.get(&(Ipv4Addr::from(masked), len)).copied()
            })
            .unwrap_or_default()
    }

    /// The longest rule matching (ep, peer identity, dir, proto, port).
    pub fn rule_lookup(&self, ep_id: u32, peer: u32, dir: u8, proto: u8, port: u16) -> Option<RuleKey> {
        let port_lens = (POLICY_PREFIX_ANY_PORT + 1..=POLICY_PREFIX_FULL).rev();
        port_lens
            .chain([POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO])
            .map(|prefix_len| {
                let port_bits = prefix_len.saturating_sub(POLICY_PREFIX_ANY_PORT);
                let port_mask = if port_bits == 0 { 0 } else { u16::MAX << (16 - port_bits) };
                RuleKey {
                    prefix_len,
                    key: PolicyKey {
                        ep_id_be: ep_id.to_be(),
                        identity_be: peer.to_be(),
                        dir,
                        proto: if prefix_len > POLICY_PREFIX_ANY_PROTO { proto } else { 0 },
                        port_be: (port & port_mask).to_be(),
                    },
                }
            })
            .find(|k| self.rules.contains_key(k))
    }

    /// One direction: `subject` is the pod whose policy applies, `peer`
    /// the other end.
    fn judge(&self, subject: Ipv4Addr, peer: Ipv4Addr, dir: u8, proto: u8, port: u16) -> DirVerdict {
        let Some(ep) = self.endpoints.get(&subject) else {
            return if self.views.contains_key(&subject) { DirVerdict::NotIsolated } else { DirVerdict::NotLocal };
        };
        let (isolated, any, audit) = if dir == POL_DIR_INGRESS {
            (PE_F_ISOLATED_IN, PE_F_ANY_IN, PE_F_AUDIT_IN)
        } else {
            (PE_F_ISOLATED_OUT, PE_F_ANY_OUT, PE_F_AUDIT_OUT)
        };
        if ep.flags & isolated == 0 {
            return DirVerdict::NotIsolated;
        }
        if subject == peer {
            return DirVerdict::AlwaysSelf;
        }
        let cached = self.ipcache_lookup(peer);
        if cached.identity == identity::HOST {
            return DirVerdict::AlwaysHost;
        }
        if ep.flags & PE_F_FAIL_CLOSED != 0 {
            return DirVerdict::FailClosed;
        }
        let lookups = [
            Some((cached.identity, Via::Identity(cached.identity))),
            (cached.cidr_identity != 0).then_some((cached.cidr_identity, Via::Cidr(cached.cidr_identity))),
            (ep.flags & any != 0).then_some((identity::ANY, Via::Any)),
        ];
        for (id, via) in lookups.into_iter().flatten() {
            if let Some(rule) = self.rule_lookup(ep.ep_id, id, dir, proto, port) {
                let policy = self.rules.get(&rule).and_then(|v| self.policy(v.policy_ref)).cloned();
                return DirVerdict::Allowed { policy, via, rule };
            }
        }
        if ep.flags & audit != 0 { DirVerdict::Audited } else { DirVerdict::Denied }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        assert_eq!(
            "x/a".parse::<Peer>(),
            Ok(Peer::Pod {
                namespace: "x".into(),
                name: "a".into()
            })
        );
        assert_eq!("10.0.0.1".parse::<Peer>(), Ok(Peer::Addr(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!("10.0.0.1/32".parse::<Peer>(), Ok(Peer::Addr(Ipv4Addr::new(10, 0, 0, 1))));
        assert!("x".parse::<Peer>().is_err());
        assert!("x/a/b".parse::<Peer>().is_err());
        assert!("/a".parse::<Peer>().is_err());
    }
}
