//! The pinned maps → the views the CLI shows (frontend → backends,
//! conntrack, affinity, endpoints, NetworkPolicy). Decoded from the maps
//! themselves, not from what the agent believes it wrote; names of
//! policies and label sets come from the agent's last compile, names of
//! pods from its pod store.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use riptide_common::{
    BE_F_LOCAL, BE_STATE_ACTIVE, BE_STATE_QUARANTINED, BE_STATE_TERMINATING, BackendKey,
    BackendValue, CtKey, CtValue, EndpointValue, RevNatKey, RevNatValue, SCOPE_INT,
    SVC_F_AFFINITY, SVC_F_CLUSTERIP, SVC_F_EXTERNALIP, SVC_F_HOSTPORT, SVC_F_LOADBALANCER,
    SVC_F_LOCAL_ONLY, SVC_F_NO_SOCK_LB, SVC_F_NODEPORT, SVC_F_TWO_SCOPES, SvcKey, SvcValue, proto,
};
use riptide_common::{
    PE_F_AUDIT_IN, PE_F_AUDIT_OUT, PE_F_FAIL_CLOSED, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, POL_DIR_EGRESS,
    POL_DIR_INGRESS, PolicyEndpointValue,
};
use riptide_datapath::service::Service;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{CheckError, Compiled, DirVerdict, Peer},
    slim::SlimPod,
};

/// One backend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub id: u32,
    pub addr: SocketAddrV4,
    pub state: String,
    pub local: bool,
}

/// One frontend scope as the maps hold it: `riptide service list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendView {
    /// `ip:port/PROTO`; ip 0.0.0.0 = every node address.
    pub frontend: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub scope: String,
    pub kind: String,
    pub flags: Vec<String>,
    pub revnat_id: u16,
    pub affinity_timeout: Option<u32>,
    /// Backends in slot order (what new flows pick from).
    pub backends: Vec<BackendView>,
    /// The service port that owns it (as this agent wrote it), if known.
    pub service: Option<String>,
}

fn proto_name(n: u8) -> String {
    match n {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        other => other.to_string(),
    }
}

fn state_name(s: u8) -> String {
    match s {
        BE_STATE_ACTIVE => "active".into(),
        BE_STATE_TERMINATING => "terminating".into(),
        BE_STATE_QUARANTINED => "quarantined".into(),
        other => format!("state-{other}"),
    }
}

fn flag_names(flags: u16) -> (String, Vec<String>) {
    let kind = [
        (SVC_F_CLUSTERIP, "ClusterIP"),
        (SVC_F_NODEPORT, "NodePort"),
        (SVC_F_EXTERNALIP, "ExternalIP"),
        (SVC_F_LOADBALANCER, "LoadBalancer"),
        (SVC_F_HOSTPORT, "HostPort"),
    ]
    .iter()
    .find(|(f, _)| flags & f != 0)
    .map_or("?", |(_, n)| n)
    .to_owned();
    let names = [
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_LOCAL_ONLY, "local-only"),
        (SVC_F_TWO_SCOPES, "two-scopes"),
        (SVC_F_NO_SOCK_LB, "no-sock-lb"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| (*n).to_owned())
    .collect();
    (kind, names)
}

/// Decodes raw dumps of `rt_svc4_v1` and `rt_be4_v1` into frontend views.
/// `owners` maps `(ip, port, proto-number)` to the owning port name.
pub fn frontend_views(
    svc: &[(SvcKey, SvcValue)],
    be: &[(BackendKey, BackendValue)],
    owners: &HashMap<(Ipv4Addr, u16, u8), String>,
) -> Vec<FrontendView> {
    let backends: HashMap<u32, BackendValue> = be.iter().map(|(k, v)| (k.id, *v)).collect();
    let slots: HashMap<(u32, u16, u8, u8, u16), u32> = svc
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(k, v)| ((k.vip_be, k.port_be, k.proto, k.scope, k.slot), v.backend_id))
        .collect();
    let mut out: Vec<FrontendView> = svc
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, m)| {
            let ip = Ipv4Addr::from(u32::from_be(k.vip_be));
            let port = u16::from_be(k.port_be);
            let (kind, flags) = flag_names(m.flags);
            let backends = (1..=m.count)
                .filter_map(|slot| slots.get(&(k.vip_be, k.port_be, k.proto, k.scope, slot)))
                .map(|id| match backends.get(id) {
                    Some(b) => BackendView {
                        id: *id,
                        addr: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.addr_be)), u16::from_be(b.port_be)),
                        state: state_name(b.state),
                        local: b.flags & BE_F_LOCAL != 0,
                    },
                    // A slot naming a missing backend is a datapath bug the
                    // operator should see, not hide.
                    None => BackendView {
                        id: *id,
                        addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                        state: "missing".into(),
                        local: false,
                    },
                })
                .collect();
            FrontendView {
                frontend: format!("{ip}:{port}/{}", proto_name(k.proto)),
                ip,
                port,
                protocol: proto_name(k.proto),
                scope: if k.scope == SCOPE_INT { "internal".into() } else { "external".into() },
                kind,
                flags,
                revnat_id: m.revnat_id,
                affinity_timeout: (m.flags & SVC_F_AFFINITY != 0).then_some(m.affinity_timeout_s),
                backends,
                service: owners.get(&(ip, port, k.proto)).cloned(),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.ip, a.port, &a.protocol, &a.scope).cmp(&(b.ip, b.port, &b.protocol, &b.scope)));
    out
}

/// `(ip, port, proto)` → port name, from what the reconciler wrote.
pub fn owner_index<'a>(ports: impl Iterator<Item = &'a Service>) -> HashMap<(Ipv4Addr, u16, u8), String> {
    let mut m = HashMap::new();
    for p in ports {
        for f in &p.frontends {
            m.insert((f.addr, f.port, p.protocol.number()), p.name.clone());
        }
    }
    m
}

/// One conntrack entry: `riptide ct list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtView {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub protocol: String,
    pub direction: String,
    pub backend_id: u32,
    pub revnat_id: u16,
    pub flags: u16,
    /// Seconds since the last packet (from the kernel's monotonic clock).
    pub idle_s: u64,
}

pub fn ct_views(entries: &[(CtKey, CtValue)], now_ns: u64) -> Vec<CtView> {
    let mut v: Vec<CtView> = entries
        .iter()
        .map(|(k, e)| CtView {
            src: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.saddr_be)), u16::from_be(k.sport_be)),
            dst: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.daddr_be)), u16::from_be(k.dport_be)),
            protocol: proto_name(k.proto),
            // Conntrack keys every entry with one `dir`; the role is a flag.
            direction: if e.flags & riptide_common::CT_F_REPLY != 0 {
                "reply".into()
            } else if e.flags & riptide_common::CT_F_INBOUND != 0 {
                "inbound".into()
            } else {
                "forward".into()
            },
            backend_id: e.backend_id,
            revnat_id: e.revnat_id,
            flags: e.flags,
            idle_s: now_ns.saturating_sub(e.last_seen_ns) / 1_000_000_000,
        })
        .collect();
    v.sort_by(|a, b| (a.src, a.dst, &a.direction).cmp(&(b.src, b.dst, &b.direction)));
    v
}

/// One entry of a NAT table: `riptide bpf nat list` (both tables).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatView {
    /// The table holding it: `rt_nat4_v2` (TCP) or `rt_natany4_v2` (the
    /// rest).
    #[serde(default)]
    pub table: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub protocol: String,
    /// `egress` (the source is rewritten to `xlate`) or `ingress` (a reply:
    /// the destination is rewritten back to `xlate`).
    pub direction: String,
    pub xlate: SocketAddrV4,
    /// `masquerade`, `nodeport` or `host` (a host socket's reserved tuple,
    /// `nat::track_host`), plus `closing` after a FIN/RST.
    pub kind: Vec<String>,
    pub idle_s: u64,
}

pub fn nat_views(entries: &[(CtKey, riptide_common::NatValue)], now_ns: u64) -> Vec<NatView> {
    let mut v: Vec<NatView> = entries
        .iter()
        .map(|(k, e)| {
            let mut kind = Vec::new();
            for (bit, name) in [
                (riptide_common::NAT_F_MASQ, "masquerade"),
                (riptide_common::NAT_F_NODEPORT, "nodeport"),
                (riptide_common::NAT_F_CLOSING, "closing"),
                (riptide_common::NAT_F_HOST, "host"),
            ] {
                if e.flags & bit != 0 {
                    kind.push(name.to_owned());
                }
            }
            NatView {
                table: riptide_datapath::gc::nat_table(k.proto).to_owned(),
                src: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.saddr_be)), u16::from_be(k.sport_be)),
                dst: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.daddr_be)), u16::from_be(k.dport_be)),
                protocol: proto_name(k.proto),
                direction: match k.dir {
                    riptide_common::NAT_DIR_EGRESS => "egress".into(),
                    riptide_common::NAT_DIR_INGRESS => "ingress".into(),
                    d => d.to_string(),
                },
                xlate: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(e.addr_be)), u16::from_be(e.port_be)),
                kind,
                idle_s: now_ns.saturating_sub(e.last_seen_ns) / 1_000_000_000,
            }
        })
        .collect();
    v.sort_by(|a, b| (&a.table, &a.direction, a.src, a.dst).cmp(&(&b.table, &b.direction, b.src, b.dst)));
    v
}

/// A Node as this agent sees it: `riptide node list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidr: Option<String>,
    /// `local` (this node), `routed` (route + `rt_node4_v1` entry),
    /// `refused` (podCIDR outside --cluster-cidr), `incomplete` (no
    /// podCIDR or address yet).
    pub state: String,
}

/// One sessionAffinity entry: `riptide affinity list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityView {
    /// The client: its IP (per-packet path) or `netns:<cookie>` (socket LB
    /// keys a client by its network namespace).
    pub client: String,
    /// The frontend (`ip:port`; 0.0.0.0 = every node address).
    pub frontend: String,
    pub revnat_id: u16,
    pub backend_id: u32,
    /// The backend's address, if the id is still in `rt_be4_v1`.
    pub backend: Option<SocketAddrV4>,
    /// Seconds since the client last used it.
    pub idle_s: u64,
}

pub fn affinity_views(
    entries: &[(riptide_common::AffKey, riptide_common::AffValue)],
    revnat: &[(RevNatKey, RevNatValue)],
    backends: &[(BackendKey, BackendValue)],
    now_ns: u64,
) -> Vec<AffinityView> {
    let fe: HashMap<u16, SocketAddrV4> = revnat
        .iter()
        .map(|(k, v)| (k.id, SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v.vip_be)), u16::from_be(v.port_be))))
        .collect();
    let be: HashMap<u32, SocketAddrV4> = backends
        .iter()
        .map(|(k, v)| (k.id, SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v.addr_be)), u16::from_be(v.port_be))))
        .collect();
    let mut v: Vec<AffinityView> = entries
        .iter()
        .map(|(k, e)| AffinityView {
            client: if k.kind == riptide_common::AFF_CLIENT_NETNS {
                format!("netns:{}", k.client)
            } else {
                // The key holds the address as the packet carries it.
                Ipv4Addr::from(u32::from_be(u32::try_from(k.client).unwrap_or(0))).to_string()
            },
            frontend: fe.get(&k.revnat_id).map_or_else(|| "-".into(), ToString::to_string),
            revnat_id: k.revnat_id,
            backend_id: e.backend_id,
            backend: be.get(&e.backend_id).copied(),
            idle_s: now_ns.saturating_sub(e.last_used_ns) / 1_000_000_000,
        })
        .collect();
    v.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    v
}

/// One local pod endpoint: `riptide endpoint list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub mac: String,
    pub flags: u32,
}

pub fn endpoint_views(entries: &[(Ipv4Addr, EndpointValue)]) -> Vec<EndpointView> {
    let mut v: Vec<EndpointView> = entries
        .iter()
        .map(|(ip, e)| EndpointView {
            ip: *ip,
            ifindex: e.ifindex,
            mac: e.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
            flags: e.flags,
        })
        .collect();
    v.sort_by_key(|e| e.ip);
    v
}

/// One local pod's NetworkPolicy state: `riptide policy list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEndpointView {
    /// `namespace/name`.
    pub pod: String,
    pub ip: Ipv4Addr,
    pub ep_id: u32,
    pub identity: u32,
    /// What the identity stands for (`namespace:label=value,...`).
    pub labels: String,
    /// Isolation, audit and fail-closed as `rt_polep4_v1` holds them now
    /// (no entry: not isolated).
    pub isolated_in: bool,
    pub isolated_out: bool,
    pub audit: bool,
    pub fail_closed: bool,
    /// The policies of its namespace selecting it, per direction.
    pub policies_in: Vec<String>,
    pub policies_out: Vec<String>,
    /// Allow-rule entries of the endpoint in the last compile.
    pub rules: usize,
    /// The map differs from the last compile (a write is pending retry).
    pub pending: bool,
}

/// Every local pod of the last compile, with its `rt_polep4_v1` entry
/// (`in_map`, read at request time).
pub fn policy_endpoint_views(compiled: &Compiled, in_map: &[(Ipv4Addr, PolicyEndpointValue)]) -> Vec<PolicyEndpointView> {
    let map: HashMap<Ipv4Addr, PolicyEndpointValue> = in_map.iter().copied().collect();
    let mut rules: HashMap<u32, usize> = HashMap::new();
    for k in compiled.rules.keys() {
        *rules.entry(u32::from_be(k.key.ep_id_be)).or_default() += 1;
    }
    compiled
        .views
        .iter()
        .map(|(ip, v)| {
            let entry = map.get(ip);
            let flags = entry.map_or(0, |e| e.flags);
            let want = compiled.endpoints.get(ip);
            PolicyEndpointView {
                pod: format!("{}/{}", v.namespace, v.pod),
                ip: *ip,
                ep_id: v.ep_id,
                identity: v.identity,
                labels: compiled.identity_name(v.identity),
                isolated_in: flags & PE_F_ISOLATED_IN != 0,
                isolated_out: flags & PE_F_ISOLATED_OUT != 0,
                audit: flags & (PE_F_AUDIT_IN | PE_F_AUDIT_OUT) != 0,
                fail_closed: flags & PE_F_FAIL_CLOSED != 0,
                policies_in: v.policies_in.clone(),
                policies_out: v.policies_out.clone(),
                rules: rules.get(&v.ep_id).copied().unwrap_or(0),
                pending: entry.map(|e| (e.ep_id, e.identity, e.flags)) != want.map(|e| (e.ep_id, e.identity, e.flags)),
            }
        })
        .collect()
}

/// `riptide policy check`: the verdict for a new flow, per direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheckView {
    pub from: String,
    pub to: String,
    pub from_ip: Ipv4Addr,
    pub to_ip: Ipv4Addr,
    /// `namespace/name` of each address, when it is a pod.
    pub from_pod: Option<String>,
    pub to_pod: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    /// Egress of the source, ingress of the destination: the verdict in
    /// words (`allowed by ns/policy (identity 257)`, `denied`, ...).
    pub egress: String,
    pub ingress: String,
    /// The policy that allows, when one does.
    pub egress_policy: Option<String>,
    pub ingress_policy: Option<String>,
    /// Denied or audited: the policies that isolate the pod in that
    /// direction (none of them allows the flow).
    pub egress_isolated_by: Vec<String>,
    pub ingress_isolated_by: Vec<String>,
    /// What the peer is to each side's policy (identity name).
    pub from_identity: String,
    pub to_identity: String,
}

/// Judges `from` → `to`:`port`/`protocol` on the last compile, naming
/// pods from `pods` (the pod store).
pub fn policy_check_view(
    compiled: &Compiled,
    pods: &[Arc<SlimPod>],
    from: &Peer,
    to: &Peer,
    port: u16,
    protocol: (u8, &str),
) -> Result<PolicyCheckView, CheckError> {
    let v = compiled.check(pods, from, to, port, protocol.0)?;
    let pod_of = crate::policy::names_by_ip(pods);
    // A pod's identity is its label set whether or not the compile gave
    // it one (with no policy it looks at local pods only).
    let identity = |ip: Ipv4Addr| {
        crate::policy::identity_name_of(pods, ip)
            .unwrap_or_else(|| compiled.identity_name(compiled.ipcache_lookup(ip).identity))
    };
    let allowed_by = |d: &DirVerdict| match d {
        DirVerdict::Allowed { policy, .. } => policy.as_ref().map(ToString::to_string),
        _ => None,
    };
    let isolated_by = |d: &DirVerdict, subject: Ipv4Addr, dir: u8| match d {
        DirVerdict::Denied | DirVerdict::Audited | DirVerdict::FailClosed => compiled.views.get(&subject).map_or_else(Vec::new, |view| {
            let names = if dir == POL_DIR_INGRESS { &view.policies_in } else { &view.policies_out };
            names.iter().map(|n| format!("{}/{n}", view.namespace)).collect()
        }),
        _ => Vec::new(),
    };
    Ok(PolicyCheckView {
        from: from.to_string(),
        to: to.to_string(),
        from_ip: v.from,
        to_ip: v.to,
        from_pod: pod_of.get(&v.from).cloned(),
        to_pod: pod_of.get(&v.to).cloned(),
        port,
        protocol: protocol.1.to_owned(),
        allowed: v.allowed,
        egress: v.egress.to_string(),
        ingress: v.ingress.to_string(),
        egress_policy: allowed_by(&v.egress),
        ingress_policy: allowed_by(&v.ingress),
        egress_isolated_by: isolated_by(&v.egress, v.from, POL_DIR_EGRESS),
        ingress_isolated_by: isolated_by(&v.ingress, v.to, POL_DIR_INGRESS),
        from_identity: identity(v.from),
        to_identity: identity(v.to),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_views_name_clients_frontends_and_backends() {
        use riptide_common::{AFF_CLIENT_IP, AFF_CLIENT_NETNS, AffKey, AffValue};
        let s = 1_000_000_000u64;
        let entries = [
            (
                AffKey { client: u64::from(u32::from(Ipv4Addr::new(198, 18, 0, 100)).to_be()), revnat_id: 7, kind: AFF_CLIENT_IP, _pad: [0; 5] },
                AffValue { last_used_ns: 90 * s, backend_id: 3, _pad: 0 },
            ),
            (AffKey { client: 4242, revnat_id: 7, kind: AFF_CLIENT_NETNS, _pad: [0; 5] }, AffValue { last_used_ns: 99 * s, backend_id: 9, _pad: 0 }),
        ];
        let revnat = [(RevNatKey { id: 7, _pad: 0 }, RevNatValue { vip_be: 0, port_be: 30083u16.to_be(), _pad: 0 })];
        let backends = [(
            BackendKey { id: 3 },
            BackendValue { addr_be: u32::from(Ipv4Addr::new(10, 42, 1, 5)).to_be(), port_be: 8080u16.to_be(), ..BackendValue::default() },
        )];
        let v = affinity_views(&entries, &revnat, &backends, 100 * s);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].client.as_str(), v[0].frontend.as_str()), ("198.18.0.100", "0.0.0.0:30083"));
        assert_eq!(v[0].backend, Some("10.42.1.5:8080".parse().unwrap()));
        assert_eq!(v[0].idle_s, 10);
        assert_eq!(v[1].client, "netns:4242");
        assert_eq!(v[1].backend, None, "backend 9 is gone");
    }

    #[test]
    fn views_decode_master_slots_and_backends() {
        let key = |slot, scope| SvcKey {
            vip_be: u32::from(Ipv4Addr::new(10, 43, 0, 10)).to_be(),
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            scope,
            slot,
            _pad: 0,
        };
        let master = SvcValue { count: 2, revnat_id: 7, flags: SVC_F_CLUSTERIP | SVC_F_AFFINITY, affinity_timeout_s: 60, ..SvcValue::default() };
        let slot = |id| SvcValue { backend_id: id, revnat_id: 7, ..SvcValue::default() };
        let svc = vec![(key(0, 0), master), (key(2, 0), slot(5)), (key(1, 0), slot(4))];
        let be = vec![
            (BackendKey { id: 4 }, BackendValue { addr_be: u32::from(Ipv4Addr::new(10, 42, 0, 4)).to_be(), port_be: 8080u16.to_be(), proto: proto::TCP, state: BE_STATE_ACTIVE, flags: BE_F_LOCAL }),
        ];
        let owners = HashMap::from([((Ipv4Addr::new(10, 43, 0, 10), 80, proto::TCP), "ns/web:http".to_owned())]);
        let v = frontend_views(&svc, &be, &owners);
        assert_eq!(v.len(), 1);
        let f = &v[0];
        assert_eq!(f.frontend, "10.43.0.10:80/TCP");
        assert_eq!(f.kind, "ClusterIP");
        assert_eq!(f.flags, vec!["affinity"]);
        assert_eq!(f.affinity_timeout, Some(60));
        assert_eq!(f.service.as_deref(), Some("ns/web:http"));
        assert_eq!(f.backends.len(), 2);
        assert_eq!(f.backends[0].addr, "10.42.0.4:8080".parse().unwrap());
        assert!(f.backends[0].local);
        assert_eq!(f.backends[1].state, "missing", "slot 2 names an absent backend");
    }
}
