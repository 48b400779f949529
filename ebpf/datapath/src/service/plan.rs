//! A [`Service`] → the map entries that express it. Pure: no map access, so
//! every Kubernetes rule that decides an entry has a unit test.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use riptide_common::{
    ALG_MAGLEV, ALG_RANDOM, BE_F_LOCAL, BE_STATE_ACTIVE, BE_STATE_QUARANTINED,
    BE_STATE_TERMINATING, BackendValue, SCOPE_EXT, SCOPE_INT, SVC_F_AFFINITY, SVC_F_CLUSTERIP,
    SVC_F_EXTERNALIP, SVC_F_HOSTPORT, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY, SVC_F_NODEPORT,
    SVC_F_DSR, SVC_F_NO_SOCK_LB, SVC_F_SRC_RANGE, SVC_F_TWO_SCOPES, SvcKey, SvcValue,
};

use super::{
    Backend, BackendAddr, BackendState, Frontend, FrontendId, FrontendKind, LbMode, Service,
    TrafficPolicy,
};
use crate::{Error, Result};

/// The entries of one scope of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopePlan {
    pub scope: u8,
    pub master: SvcValue,
    /// Backend ids of slots `1..=len`.
    pub slots: Vec<u32>,
    /// The scope's Maglev table (`M` backend ids, `M` also in the master's
    /// `backend_id`) when the frontend uses Maglev and the scope has
    /// backends.
    pub maglev: Option<Vec<u32>>,
}

/// The entries of one frontend; `scopes` is in write order (INT before the
/// EXT master that points readers at it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub frontend: Frontend,
    pub id: FrontendId,
    pub revnat_id: u16,
    pub scopes: Vec<ScopePlan>,
    /// Allowed source prefixes (`rt_srcrange4_v1`) when the frontend
    /// carries [`SVC_F_SRC_RANGE`]; empty otherwise.
    pub source_ranges: BTreeSet<(Ipv4Addr, u8)>,
}

/// Every map entry of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub backends: Vec<(u32, BackendValue)>,
    pub frontends: Vec<FrontendPlan>,
}

impl FrontendId {
    /// The `rt_svc4_v1` key of slot `slot` (0 = the master) of `scope`.
    pub fn key(&self, scope: u8, slot: u16) -> SvcKey {
        SvcKey {
            vip_be: u32::from(self.addr).to_be(),
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            scope,
            slot,
            _pad: 0,
        }
    }
}

/// DSR applies to the frontends outside clients reach.
fn dsr_flag(svc: &Service, kind: FrontendKind) -> u16 {
    if svc.lb_mode == LbMode::Dsr && kind.is_external() {
        SVC_F_DSR
    } else {
        0
    }
}

fn kind_flag(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => SVC_F_CLUSTERIP,
        FrontendKind::NodePort => SVC_F_NODEPORT,
        FrontendKind::ExternalIp => SVC_F_EXTERNALIP,
        FrontendKind::LoadBalancer => SVC_F_LOADBALANCER,
        FrontendKind::HostPort => SVC_F_HOSTPORT,
    }
}

fn backend_value(svc: &Service, b: &Backend) -> BackendValue {
    BackendValue {
        addr_be: u32::from(*b.addr.ip()).to_be(),
        port_be: b.addr.port().to_be(),
        proto: svc.protocol.number(),
        state: match b.state {
            BackendState::Active => BE_STATE_ACTIVE,
            BackendState::Terminating => BE_STATE_TERMINATING,
            BackendState::Quarantined => BE_STATE_QUARANTINED,
        },
        flags: if b.local { BE_F_LOCAL } else { 0 },
    }
}

/// Builds the map entries of `svc` given its ids.
pub fn build(
    svc: &Service,
    backend_ids: &HashMap<BackendAddr, u32>,
    revnat_ids: &HashMap<FrontendId, u16>,
) -> Result<Plan> {
    let id_of = |b: &Backend| -> Result<u32> {
        backend_ids
            .get(&svc.backend_addr(b))
            .copied()
            .ok_or_else(|| Error::Service {
                service: svc.name.clone(),
                reason: format!("no id for backend {}", b.addr),
            })
    };
    let mut backends = Vec::new();
    let mut seen = BTreeSet::new();
    for b in &svc.backends {
        let id = id_of(b)?;
        if seen.insert(id) {
            backends.push((id, backend_value(svc, b)));
        }
    }
    let mut affinity_timeout_s = 0;
    let mut affinity_flag = 0;
    if let Some(t) = svc.affinity_timeout_s {
        affinity_flag = SVC_F_AFFINITY;
        affinity_timeout_s = t;
    }

    let mut frontends = Vec::new();
    for fe in &svc.frontends {
        let id = fe.id(svc.protocol);
        let revnat_id = *revnat_ids.get(&id).ok_or_else(|| Error::Service {
            service: svc.name.clone(),
            reason: format!("no reverse-NAT id for frontend {}:{}", id.addr, id.port),
        })?;
        let mut flags = kind_flag(fe.kind) | affinity_flag | dsr_flag(svc, fe.kind);
        // kube-proxy filters the load-balancer IPs only. Socket LB cannot
        // judge a source (connect() may not have one yet), so such a
        // frontend is left to the per-packet path, which sees it.
        let source_ranges = match svc.source_ranges.prefixes() {
            Some(p) if fe.kind == FrontendKind::LoadBalancer => {
                flags |= SVC_F_SRC_RANGE | SVC_F_NO_SOCK_LB;
                p
            }
            _ => BTreeSet::new(),
        };
        let maglev = svc.algorithm.maglev(fe.kind);
        let master = |flags: u16, n: usize| -> Result<SvcValue> {
            Ok(SvcValue {
                backend_id: match maglev {
                    Some(m) if n > 0 => m.get(),
                    _ => 0,
                },
                count: u16::try_from(n).map_err(|_| Error::Service {
                    service: svc.name.clone(),
                    reason: format!("{n} backends exceed a frontend's 65535 slots"),
                })?,
                revnat_id,
                flags,
                algorithm: if maglev.is_some() && n > 0 {
                    ALG_MAGLEV
                } else {
                    ALG_RANDOM
                },
                _pad: 0,
                affinity_timeout_s,
            })
        };
        let scope = |scope: u8, flags: u16, set: &[&Backend]| -> Result<ScopePlan> {
            let slots = set.iter().map(|b| id_of(b)).collect::<Result<Vec<u32>>>()?;
            let table = match maglev {
                Some(m) if !set.is_empty() => {
                    let entries: Vec<(u32, Ipv4Addr, u16)> = set
                        .iter()
                        .zip(&slots)
                        .map(|(b, id)| (*id, *b.addr.ip(), b.addr.port()))
                        .collect();
                    Some(crate::maglev::table(&entries, m))
                }
                _ => None,
            };
            Ok(ScopePlan {
                scope,
                master: master(flags, slots.len())?,
                slots,
                maglev: table,
            })
        };
        let mut scopes = Vec::with_capacity(2);
        // eTP=Local: outside clients only reach local backends (client
        // address kept); traffic from inside uses every backend, through a
        // second scope the programs pick for in-cluster sources.
        let two_scopes = fe.kind.is_external() && svc.external_policy == TrafficPolicy::Local;
        if two_scopes {
            scopes.push(scope(SCOPE_INT, flags, &svc.eligible(fe.kind, false))?);
        }
        // iTP=Local: in-cluster clients of the ClusterIP only reach backends
        // on their own node; a node without one rejects (as kube-proxy drops).
        let mut ext_flags = flags;
        if svc.local_only(fe.kind, true) {
            ext_flags |= SVC_F_LOCAL_ONLY;
        }
        if two_scopes {
            ext_flags |= SVC_F_TWO_SCOPES;
        }
        scopes.push(scope(SCOPE_EXT, ext_flags, &svc.eligible(fe.kind, true))?);
        frontends.push(FrontendPlan {
            frontend: *fe,
            id,
            revnat_id,
            scopes,
            source_ranges,
        });
    }
    Ok(Plan {
        backends,
        frontends,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{
        maglev::TableSize,
        service::{Algorithm, Protocol},
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn be(addr: &str, state: BackendState, local: bool) -> Backend {
        Backend {
            addr: SocketAddrV4::new(ip(addr), 8080),
            state,
            local,
        }
    }

    fn svc(backends: Vec<Backend>) -> Service {
        Service {
            name: "default/web:http".into(),
            protocol: Protocol::Tcp,
            frontends: vec![
                Frontend {
                    kind: FrontendKind::ClusterIp,
                    addr: ip("10.43.0.10"),
                    port: 80,
                },
                Frontend {
                    kind: FrontendKind::NodePort,
                    addr: ip("198.18.0.1"),
                    port: 30080,
                },
            ],
            backends,
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: crate::service::LbMode::Snat,
        }
    }

    fn ids(s: &Service) -> (HashMap<BackendAddr, u32>, HashMap<FrontendId, u16>) {
        let b = s
            .backends
            .iter()
            .enumerate()
            .map(|(i, x)| (s.backend_addr(x), 100 + i as u32))
            .collect();
        let f = s
            .frontends
            .iter()
            .enumerate()
            .map(|(i, x)| (x.id(s.protocol), 7 + i as u16))
            .collect();
        (b, f)
    }

    #[test]
    fn dsr_marks_the_external_frontends_only() {
        let mut s = svc(vec![be("10.42.1.3", BackendState::Active, false)]);
        let (b, f) = ids(&s);
        let dsr = |s: &Service| -> Vec<bool> {
            build(s, &b, &f)
                .unwrap()
                .frontends
                .iter()
                .map(|fp| fp.scopes[0].master.flags & SVC_F_DSR != 0)
                .collect()
        };
        assert_eq!(dsr(&s), [false, false], "snat: no frontend");
        s.lb_mode = LbMode::Dsr;
        assert_eq!(dsr(&s), [false, true], "dsr: the NodePort, not the ClusterIP");
    }

    #[test]
    fn maglev_service_gets_a_table_over_the_eligible_backends() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
            be("10.42.0.9", BackendState::Terminating, true),
        ]);
        let m = TableSize::new(1021).unwrap();
        s.algorithm = Algorithm::Maglev(m);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        for fp in &plan.frontends {
            let sp = &fp.scopes[0];
            assert_eq!(sp.master.algorithm, ALG_MAGLEV);
            assert_eq!(sp.master.backend_id, 1021, "the master carries M");
            let t = sp.maglev.as_ref().unwrap();
            assert_eq!(t.len(), 1021);
            let used: BTreeSet<u32> = t.iter().copied().collect();
            assert_eq!(used, BTreeSet::from([100, 101]), "ready backends only");
        }
        // The cluster default: Maglev on the NodePort only.
        s.algorithm = Algorithm::MaglevExternal(m);
        let plan = build(&s, &b, &f).unwrap();
        let (cip, np) = (&plan.frontends[0].scopes[0], &plan.frontends[1].scopes[0]);
        assert_eq!(plan.frontends[0].frontend.kind, FrontendKind::ClusterIp);
        assert_eq!(
            (cip.master.algorithm, cip.master.backend_id),
            (ALG_RANDOM, 0)
        );
        assert!(cip.maglev.is_none());
        assert_eq!(
            (np.master.algorithm, np.master.backend_id),
            (ALG_MAGLEV, 1021)
        );
        assert!(np.maglev.is_some());
        // Random services and services without backends have no table.
        s.algorithm = Algorithm::Random;
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.frontends[0].scopes[0].maglev.is_none());
        assert_eq!(plan.frontends[0].scopes[0].master.algorithm, ALG_RANDOM);
        s.algorithm = Algorithm::Maglev(m);
        s.backends.clear();
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.frontends[0].scopes[0].maglev.is_none());
        assert_eq!(plan.frontends[0].scopes[0].master.algorithm, ALG_RANDOM);
        assert_eq!(plan.frontends[0].scopes[0].master.backend_id, 0);
    }

    #[test]
    fn clusterip_and_nodeport_get_all_ready_backends_in_address_order() {
        let s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
            be("10.42.0.9", BackendState::Terminating, true),
        ]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(
            plan.backends.len(),
            3,
            "terminating backends stay in the backend map"
        );
        let ci = &plan.frontends[0];
        assert_eq!(ci.scopes.len(), 1);
        assert_eq!(ci.scopes[0].scope, SCOPE_EXT);
        assert_eq!(
            ci.scopes[0].slots,
            vec![101, 100],
            "sorted by address, terminating excluded"
        );
        assert_eq!(ci.scopes[0].master.count, 2);
        assert_eq!(ci.scopes[0].master.revnat_id, 7);
        assert_eq!(ci.scopes[0].master.flags, SVC_F_CLUSTERIP);
        let np = &plan.frontends[1];
        assert_eq!(np.id.key(SCOPE_EXT, 0).vip_be, 0, "NodePort is node-wide");
        assert_eq!(np.id.key(SCOPE_EXT, 0).port_be, 30080u16.to_be());
        assert_eq!(np.scopes[0].master.flags, SVC_F_NODEPORT);
        let local = plan.backends.iter().find(|(id, _)| *id == 101).unwrap().1;
        assert_eq!(local.flags, BE_F_LOCAL);
        assert_eq!(local.addr_be, u32::from(ip("10.42.0.2")).to_be());
    }

    #[test]
    fn terminating_backends_are_used_only_when_none_is_ready() {
        let s = svc(vec![
            be("10.42.0.9", BackendState::Terminating, true),
            be("10.42.0.8", BackendState::Quarantined, true),
        ]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(plan.frontends[0].scopes[0].slots, vec![100]);
        let term = plan.backends.iter().find(|(id, _)| *id == 100).unwrap().1;
        assert_eq!(term.state, BE_STATE_TERMINATING);
    }

    #[test]
    fn no_backends_gives_count_zero() {
        let s = svc(vec![]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.backends.is_empty());
        assert_eq!(plan.frontends[0].scopes[0].master.count, 0);
    }

    #[test]
    fn external_traffic_policy_local_uses_two_scopes() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
        ]);
        s.external_policy = TrafficPolicy::Local;
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        // ClusterIP is not governed by eTP.
        assert_eq!(plan.frontends[0].scopes.len(), 1);
        let np = &plan.frontends[1];
        assert_eq!(np.scopes.len(), 2);
        assert_eq!(
            np.scopes[0].scope, SCOPE_INT,
            "INT written before the EXT master"
        );
        assert_eq!(np.scopes[0].slots, vec![101, 100]);
        assert_eq!(np.scopes[1].scope, SCOPE_EXT);
        assert_eq!(np.scopes[1].slots, vec![101], "only the local backend");
        assert_eq!(
            np.scopes[1].master.flags,
            SVC_F_NODEPORT | SVC_F_LOCAL_ONLY | SVC_F_TWO_SCOPES
        );
    }

    #[test]
    fn internal_traffic_policy_local_restricts_clusterip() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
        ]);
        s.internal_policy = TrafficPolicy::Local;
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(plan.frontends[0].scopes[0].slots, vec![101]);
        assert_eq!(
            plan.frontends[0].scopes[0].master.flags,
            SVC_F_CLUSTERIP | SVC_F_LOCAL_ONLY
        );
        assert_eq!(
            plan.frontends[1].scopes[0].slots,
            vec![101, 100],
            "NodePort unaffected"
        );
    }

    #[test]
    fn affinity_sets_flag_and_timeout() {
        let mut s = svc(vec![be("10.42.0.2", BackendState::Active, true)]);
        s.affinity_timeout_s = Some(10_800);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        let m = plan.frontends[0].scopes[0].master;
        assert_eq!(m.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
        assert_eq!(m.affinity_timeout_s, 10_800);
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_frontends_only() {
        let mut s = svc(vec![be("10.42.0.2", BackendState::Active, true)]);
        s.frontends.push(Frontend {
            kind: FrontendKind::LoadBalancer,
            addr: ip("192.0.2.100"),
            port: 80,
        });
        s.external_policy = TrafficPolicy::Local;
        s.source_ranges = crate::service::SourceRanges::Only(vec![
            "203.0.113.9/24".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
        ]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        let want = SVC_F_SRC_RANGE | SVC_F_NO_SOCK_LB;
        for fp in &plan.frontends {
            let lb = fp.frontend.kind == FrontendKind::LoadBalancer;
            for sp in &fp.scopes {
                assert_eq!(sp.master.flags & want == want, lb, "{:?} scope {}", fp.frontend.kind, sp.scope);
            }
            let expect: BTreeSet<(Ipv4Addr, u8)> = if lb {
                BTreeSet::from([(ip("203.0.113.0"), 24)])
            } else {
                BTreeSet::new()
            };
            assert_eq!(fp.source_ranges, expect, "host bits masked, duplicates merged");
        }
        // Nothing valid left: the check stays on with no prefix (deny all).
        s.source_ranges = crate::service::SourceRanges::Only(Vec::new());
        let plan = build(&s, &b, &f).unwrap();
        let lb = plan.frontends.iter().find(|fp| fp.frontend.kind == FrontendKind::LoadBalancer).unwrap();
        assert!(lb.source_ranges.is_empty());
        assert_eq!(lb.scopes[0].master.flags & SVC_F_SRC_RANGE, SVC_F_SRC_RANGE);
    }
}
