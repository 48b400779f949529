//! The compile itself: objects → identities → ipcache, endpoints, rules.
//!
//! Order of work: namespaces, pods (label identities), policies (parsed
//! once per object version and cached; ipBlock prefixes get CIDR
//! identities), the ipcache, then for each local pod the policies that
//! select it, and for each of those policies' rules the peer identities
//! (resolved once per rule, only for policies that select some local pod)
//! crossed with the rule's ports.

use std::{
    borrow::Borrow,
    cell::OnceCell,
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnetwork::Ipv4Network;
use k8s_openapi::{
    api::{
        core::v1::Namespace,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt as _;
use riptide_common::{
    IpcacheValue, PE_F_ANY_IN, PE_F_ANY_OUT, PE_F_AUDIT_IN, PE_F_AUDIT_OUT, PE_F_EXACT_IN, PE_F_EXACT_OUT, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT,
    POL_DIR_EGRESS, POL_DIR_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
    PolicyEndpointValue, PolicyKey, PolicyValue, identity,
};

use crate::slim::{SlimNode, SlimPod};

use super::{
    AUDIT_ANNOTATION, Compiled, EndpointView, IdentityInfo, Inputs, NAMESPACE_NAME_LABEL, PolicyName, RuleKey,
    ids::{LabelIds, Labels, StableIds},
    pods::{namespace_of, owner_rank, pod_addr},
    ports::{port_prefixes, protocol_number},
    selector::LabelMatch,
};

/// Compiles [`Inputs`] into [`Compiled`], keeping identities, endpoint ids
/// and policy refs stable from one compile to the next, and each policy's
/// parsed form while its object is unchanged.
#[derive(Debug)]
pub struct Compiler {
    generation: u64,
    label_ids: LabelIds,
    /// Keyed by pod UID (namespace/name when a pod has none).
    ep_ids: StableIds<String>,
    cidr_ids: StableIds<Ipv4Network>,
    policy_refs: StableIds<PolicyName>,
    parsed: HashMap<PolicyName, CachedPolicy>,
    /// Numbering of a previous agent's maps, for the first compile.
    hints: Option<Hints>,
    /// Rule count of the last compile (the next one is sized for it, so
    /// the table is not grown and rehashed step by step).
    last_rules: usize,
}

#[derive(Debug)]
struct CachedPolicy {
    object: Arc<NetworkPolicy>,
    parsed: Arc<ParsedPolicy>,
    generation: u64,
}

/// What a previous agent's maps say about numbering ([`Compiler::adopt`]).
#[derive(Debug, Default)]
struct Hints {
    label_by_ip: HashMap<Ipv4Addr, u32>,
    ep_by_ip: HashMap<Ipv4Addr, u32>,
    cidr_by_prefix: HashMap<Ipv4Network, u32>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    pub fn new() -> Self {
        Self {
            generation: 0,
            label_ids: LabelIds::new(identity::FIRST_LABELS, identity::FIRST_CIDR),
            // 0 stays unused so a zeroed key never names an endpoint.
            ep_ids: StableIds::new(1, u32::MAX),
            cidr_ids: StableIds::new(identity::FIRST_CIDR, u32::MAX),
            policy_refs: StableIds::dense(0, u32::MAX),
            parsed: HashMap::new(),
            hints: None,
            last_rules: 0,
        }
    }

    /// Takes over the numbering of maps a previous agent wrote (the pinned
    /// ipcache, `rt_polep4_v1` and rule contents, tries and hashes), so
    /// that a restart rewrites only what changed meanwhile. Every identity
    /// and endpoint id found there is kept from fresh allocation; the first
    /// compile gives a label set the identity one of its pods' addresses
    /// had, a local pod the endpoint id its address had, an ipBlock prefix
    /// its old CIDR identity (each to the first claimant); ids nobody takes
    /// back are freed after that compile. Only before the first compile
    /// (returns false, ignoring the maps, afterwards).
    pub fn adopt<'m, K: Borrow<(Ipv4Addr, u8)>, V: Borrow<IpcacheValue>, R: Borrow<RuleKey>>(
        &mut self,
        ipcache: impl IntoIterator<Item = (K, V)>,
        endpoints: impl IntoIterator<Item = (&'m Ipv4Addr, &'m PolicyEndpointValue)>,
        rules: impl IntoIterator<Item = R>,
    ) -> bool {
        if self.generation != 0 {
            return false;
        }
        let labels = identity::FIRST_LABELS..identity::FIRST_CIDR;
        let mut hints = Hints::default();
        for (k, v) in ipcache {
            let (&(addr, len), v) = (k.borrow(), v.borrow());
            if labels.contains(&v.identity) {
                self.label_ids.alloc.reserve(v.identity);
                if len == 32 {
                    hints.label_by_ip.insert(addr, v.identity);
                }
            }
            if v.cidr_identity >= identity::FIRST_CIDR {
                self.cidr_ids.alloc.reserve(v.cidr_identity);
                // A prefix's own entry (a /32 pod or node entry names the
                // longest prefix holding it, not itself).
                if v.identity == identity::WORLD
                    && let Ok(net) = Ipv4Network::new(addr, len)
                {
                    hints.cidr_by_prefix.insert(net, v.cidr_identity);
                }
            }
        }
        for (&addr, v) in endpoints {
            self.ep_ids.alloc.reserve(v.ep_id);
            hints.ep_by_ip.insert(addr, v.ep_id);
            if labels.contains(&v.identity) {
                self.label_ids.alloc.reserve(v.identity);
            }
        }
        for k in rules {
            let k = k.borrow();
            self.ep_ids.alloc.reserve(u32::from_be(k.key.ep_id_be));
            let id = u32::from_be(k.key.identity_be);
            if labels.contains(&id) {
                self.label_ids.alloc.reserve(id);
            } else if id >= identity::FIRST_CIDR {
                self.cidr_ids.alloc.reserve(id);
            }
        }
        self.hints = Some(hints);
        true
    }

    /// Compiles the whole state. Invalid parts of policies are left out
    /// (allowing less, never more) and reported in [`Compiled::warnings`].
    pub fn compile(&mut self, inputs: &Inputs<'_>) -> Compiled {
        self.generation += 1;
        let generation = self.generation;
        let hints = self.hints.take();
        let mut out = Compiled::default();
        let mut warnings = Vec::new();

        let mut namespaces = namespaces(inputs.namespaces);
        // No policy: no pod is isolated and no rule names a peer, so only
        // the local pods' views (`riptide policy list`) are wanted; the
        // cluster's pods get identities once some policy exists.
        let local_only = inputs.policies.is_empty();
        let pods = pods(inputs, local_only, &mut warnings);
        for pod in &pods {
            namespaces.entry(pod.namespace).or_insert_with(|| NsData::unknown(pod.namespace));
        }

        // Label identities, one per distinct (namespace, pod labels) of
        // this compile (the namespace's labels are fixed within it).
        let mut set_hints: HashMap<(&str, &Labels), u32> = HashMap::new();
        if let Some(h) = &hints {
            for pod in &pods {
                if let Some(id) = h.label_by_ip.get(&pod.ip) {
                    set_hints.entry((pod.namespace, pod.pod.labels())).or_insert(*id);
                }
            }
        }
        let mut identities: Vec<IdentityData<'_>> = Vec::new();
        let mut by_set: HashMap<(&str, &Labels), usize> = HashMap::new();
        let mut pod_identity: Vec<Option<usize>> = Vec::with_capacity(pods.len());
        let no_labels = Arc::new(Labels::new());
        for (pod_idx, pod) in pods.iter().enumerate() {
            let labels = pod.pod.labels();
            let idx = if let Some(idx) = by_set.get(&(pod.namespace, labels)) {
                Some(*idx)
            } else {
                let ns_labels = namespaces.get(pod.namespace).map(|n| &n.labels);
                let empty = Labels::new();
                let hint = set_hints.get(&(pod.namespace, labels)).copied();
                let interned = pod.pod.labels.as_ref().unwrap_or(&no_labels);
                if let Some((id, shared)) = self.label_ids.id(pod.namespace, ns_labels.unwrap_or(&empty), interned, generation, hint) {
                    identities.push(IdentityData {
                        id,
                        namespace: pod.namespace,
                        labels: shared,
                        pods: Vec::new(),
                        named_ports: OnceCell::new(),
                    });
                    by_set.insert((pod.namespace, labels), identities.len() - 1);
                    Some(identities.len() - 1)
                } else {
                    warnings.push(format!("pod {}/{}: no label identity left", pod.namespace, pod.name));
                    None
                }
            };
            if let Some(idx) = idx {
                identities[idx].pods.push(pod_idx);
            }
            pod_identity.push(idx);
        }
        let mut ids_by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (idx, data) in identities.iter().enumerate() {
            ids_by_ns.entry(data.namespace).or_default().push(idx);
        }

        // Policies, in (namespace, name) order so new refs are numbered
        // the same way whatever order the store lists them in.
        let mut sorted: Vec<&Arc<NetworkPolicy>> = inputs.policies.iter().collect();
        sorted.sort_by(|a, b| (a.metadata.namespace.as_deref(), a.metadata.name.as_deref()).cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref())));
        let mut policies: Vec<PolicyData> = Vec::with_capacity(sorted.len());
        let mut prefixes: BTreeSet<Ipv4Network> = BTreeSet::new();
        for object in sorted {
            let name = PolicyName {
                namespace: object.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
                name: object.name_any(),
            };
            let Some(policy_ref) = self.policy_refs.id(name.clone(), generation, None) else {
                warnings.push(format!("policy {name}: no policy number left"));
                continue;
            };
            let parsed = match self.parsed.get_mut(&name) {
                Some(cached) if same_object(&cached.object, object) => {
                    cached.generation = generation;
                    Arc::clone(&cached.parsed)
                }
                _ => {
                    let parsed = Arc::new(ParsedPolicy::parse(object, &name));
                    self.parsed.insert(
                        name.clone(),
                        CachedPolicy {
                            object: Arc::clone(object),
                            parsed: Arc::clone(&parsed),
                            generation,
                        },
                    );
                    parsed
                }
            };
            warnings.extend(parsed.warnings.iter().cloned());
            prefixes.extend(parsed.prefixes.iter().copied());
            let slot = usize::try_from(policy_ref).unwrap_or(usize::MAX);
            if out.policies.len() <= slot {
                out.policies.resize(slot + 1, None);
            }
            out.policies[slot] = Some(name);
            policies.push(PolicyData {
                index: policies.len(),
                policy_ref,
                parsed,
            });
        }
        self.parsed.retain(|_, c| c.generation == generation);
        let mut cidrs = CidrIndex::default();
        for net in &prefixes {
            let hint = hints.as_ref().and_then(|h| h.cidr_by_prefix.get(net).copied());
            if let Some(id) = self.cidr_ids.id(*net, generation, hint) {
                cidrs.insert(*net, id);
                out.identities.insert(id, IdentityInfo::Cidr(*net));
            } else {
                warnings.push(format!("ipBlock {net}: no CIDR identity left"));
            }
        }

        // The ipcache, lowest precedence first: prefixes, the world,
        // other nodes, pods, this node.
        for (net, id) in &cidrs.all {
            out.ipcache.insert(
                (net.network(), net.prefix()),
                IpcacheValue {
                    identity: identity::WORLD,
                    cidr_identity: *id,
                },
            );
        }
        out.ipcache.entry((Ipv4Addr::UNSPECIFIED, 0)).or_insert(IpcacheValue {
            identity: identity::WORLD,
            cidr_identity: 0,
        });
        let mut host_addrs: Vec<Ipv4Addr> = inputs.host_addrs.to_vec();
        for node in inputs.nodes {
            let local = node.name() == inputs.node_name;
            for addr in node_addrs(node) {
                if local {
                    host_addrs.push(addr);
                } else {
                    out.ipcache.insert(
                        (addr, 32),
                        IpcacheValue {
                            identity: identity::REMOTE_NODE,
                            cidr_identity: cidrs.longest(addr),
                        },
                    );
                }
            }
        }
        for (pod, idx) in pods.iter().zip(&pod_identity) {
            if let Some(idx) = idx {
                out.ipcache.insert(
                    (pod.ip, 32),
                    IpcacheValue {
                        identity: identities[*idx].id,
                        cidr_identity: cidrs.longest(pod.ip),
                    },
                );
            }
        }
        for addr in host_addrs {
            out.ipcache.insert(
                (addr, 32),
                IpcacheValue {
                    identity: identity::HOST,
                    cidr_identity: cidrs.longest(addr),
                },
            );
        }
        for data in &identities {
            out.identities.insert(
                data.id,
                IdentityInfo::Labels {
                    namespace: data.namespace.to_owned(),
                    labels: Arc::clone(&data.labels),
                },
            );
        }

        // Local endpoints and their rules.
        let mut policies_by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (idx, p) in policies.iter().enumerate() {
            policies_by_ns.entry(p.parsed.namespace.as_str()).or_default().push(idx);
        }
        let world = World {
            namespaces: &namespaces,
            identities: &identities,
            ids_by_ns: &ids_by_ns,
            pods: &pods,
            cidrs: &cidrs,
        };
        let mut resolved: HashMap<(usize, u8, usize), ResolvedPeers> = HashMap::new();
        out.rules.reserve(self.last_rules);
        for (pod, idx) in pods.iter().zip(&pod_identity) {
            if !pod.local {
                continue;
            }
            let Some(idx) = idx else { continue };
            let key = pod.pod.uid.as_ref().map_or_else(|| format!("{}/{}", pod.namespace, pod.name), ToString::to_string);
            let hint = hints.as_ref().and_then(|h| h.ep_by_ip.get(&pod.ip).copied());
            let Some(ep_id) = self.ep_ids.id(key, generation, hint) else {
                warnings.push(format!("pod {}/{}: no endpoint id left", pod.namespace, pod.name));
                continue;
            };
            let labels = pod.pod.labels();
            let selecting: Vec<&PolicyData> = policies_by_ns
                .get(pod.namespace)
                .into_iter()
                .flatten()
                .map(|i| &policies[*i])
                .filter(|p| p.parsed.selector.matches(labels))
                .collect();
            let audit = namespaces.get(pod.namespace).is_some_and(|n| n.audit);
            let mut view = EndpointView {
                namespace: pod.namespace.to_owned(),
                pod: pod.name.to_owned(),
                ep_id,
                identity: identities[*idx].id,
                isolated_in: false,
                isolated_out: false,
                policies_in: Vec::new(),
                policies_out: Vec::new(),
                audit,
            };
            let mut flags = 0;
            let local_ports = OnceCell::new();
            for (dir, iso_flag, any_flag, audit_flag, exact_flag) in [
                (POL_DIR_INGRESS, PE_F_ISOLATED_IN, PE_F_ANY_IN, PE_F_AUDIT_IN, PE_F_EXACT_IN),
                (POL_DIR_EGRESS, PE_F_ISOLATED_OUT, PE_F_ANY_OUT, PE_F_AUDIT_OUT, PE_F_EXACT_OUT),
            ] {
                // Until a rule of this direction needs the trie.
                let mut exact = true;
                for policy in &selecting {
                    let Some(rules) = policy.parsed.rules(dir) else { continue };
                    flags |= iso_flag;
                    if audit {
                        flags |= audit_flag;
                    }
                    let names = if dir == POL_DIR_INGRESS { &mut view.policies_in } else { &mut view.policies_out };
                    names.push(policy.parsed.name.clone());
                    for (rule_idx, rule) in rules.iter().enumerate() {
                        let peers = resolved
                            .entry((policy.index, dir, rule_idx))
                            .or_insert_with(|| world.resolve(&policy.parsed, rule, dir));
                        let emit = Emit {
                            ep_id,
                            dir,
                            policy_ref: policy.policy_ref,
                            rules: &mut out.rules,
                            trie: false,
                        };
                        let local_ports = || local_ports.get_or_init(|| named_ports(pod.pod)).as_slice();
                        let wrote = emit.rule(rule, peers, &local_ports, &world);
                        if wrote.any {
                            flags |= any_flag;
                        }
                        exact &= !wrote.trie;
                    }
                }
                if exact && flags & iso_flag != 0 {
                    flags |= exact_flag;
                }
            }
            view.isolated_in = flags & PE_F_ISOLATED_IN != 0;
            view.isolated_out = flags & PE_F_ISOLATED_OUT != 0;
            view.policies_in.sort();
            view.policies_out.sort();
            if flags != 0 {
                out.endpoints.insert(
                    pod.ip,
                    PolicyEndpointValue {
                        ep_id,
                        identity: identities[*idx].id,
                        flags,
                        _pad: 0,
                    },
                );
            }
            out.views.insert(pod.ip, view);
        }

        self.label_ids.sweep(generation);
        self.ep_ids.sweep(generation);
        self.cidr_ids.sweep(generation);
        self.policy_refs.sweep(generation);
        if hints.is_some() {
            self.label_ids.alloc.release_unadopted(generation);
            self.ep_ids.alloc.release_unadopted(generation);
            self.cidr_ids.alloc.release_unadopted(generation);
        }
        self.last_rules = out.rules.len();
        warnings.sort();
        warnings.dedup();
        out.warnings = warnings;
        out
    }
}

/// The same NetworkPolicy object as cached: the same `Arc` from the store,
/// or the same UID and resourceVersion (a relist hands out new `Arc`s).
fn same_object(cached: &Arc<NetworkPolicy>, object: &Arc<NetworkPolicy>) -> bool {
    if Arc::ptr_eq(cached, object) {
        return true;
    }
    let (a, b) = (&cached.metadata, &object.metadata);
    a.uid.is_some() && a.resource_version.is_some() && a.uid == b.uid && a.resource_version == b.resource_version
}

// ------------------------------------------------------------------ inputs

struct NsData {
    /// The namespace's labels plus [`NAMESPACE_NAME_LABEL`].
    labels: Labels,
    audit: bool,
}

impl NsData {
    /// A namespace known only from its pods (the Namespace object is not
    /// in the store yet): its name label only.
    fn unknown(name: &str) -> Self {
        Self {
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())]),
            audit: false,
        }
    }
}

fn namespaces(list: &[std::sync::Arc<Namespace>]) -> HashMap<&str, NsData> {
    list.iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.as_deref()?;
            let mut labels = ns.labels().clone();
            labels.entry(NAMESPACE_NAME_LABEL.to_owned()).or_insert_with(|| name.to_owned());
            let audit = ns.annotations().get(AUDIT_ANNOTATION).is_some_and(|v| v == "true");
            Some((name, NsData { labels, audit }))
        })
        .collect()
}

/// A pod with an IPv4 address that is not finished.
struct PodData<'a> {
    pod: &'a SlimPod,
    namespace: &'a str,
    name: &'a str,
    ip: Ipv4Addr,
    local: bool,
}

/// The pods that own addresses (not the host-network ones: theirs is
/// their node's), in (namespace, name) order; with `local_only` the pods
/// of this node only. Two pods claiming one address (a stale store): the
/// one not being deleted wins.
fn pods<'a>(inputs: &Inputs<'a>, local_only: bool, warnings: &mut Vec<String>) -> Vec<PodData<'a>> {
    let mut out: Vec<PodData<'a>> = inputs
        .pods
        .iter()
        .filter_map(|pod| {
            let (ip, _) = pod_addr(pod).filter(|(_, host_network)| !host_network)?;
            let local = pod.spec.as_ref()?.node_name.as_deref() == Some(inputs.node_name);
            (local || !local_only).then(|| PodData {
                pod: pod.as_ref(),
                namespace: namespace_of(pod),
                name: pod.name(),
                ip,
                local,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    let mut by_ip: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut drop = vec![false; out.len()];
    for (idx, pod) in out.iter().enumerate() {
        if let Some(&other) = by_ip.get(&pod.ip) {
            // The rule `riptide policy check` and events name owners by.
            let keep_new = owner_rank(pod.pod, false) < owner_rank(out[other].pod, false);
            let (kept, dropped) = if keep_new { (idx, other) } else { (other, idx) };
            warnings.push(format!(
                "pods {}/{} and {}/{} both have address {}: using {}/{}",
                out[other].namespace, out[other].name, pod.namespace, pod.name, pod.ip, out[kept].namespace, out[kept].name
            ));
            drop[dropped] = true;
            by_ip.insert(pod.ip, kept);
        } else {
            by_ip.insert(pod.ip, idx);
        }
    }
    let mut keep = drop.into_iter().map(|d| !d);
    out.retain(|_| keep.next().unwrap_or(true));
    out
}

/// A containerPort with a name (regular containers and init containers,
/// which include restartable sidecars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NamedPort<'a> {
    name: &'a str,
    proto: u8,
    port: u16,
}

fn named_ports(pod: &SlimPod) -> Vec<NamedPort<'_>> {
    let Some(spec) = pod.spec.as_ref() else { return Vec::new() };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.as_deref()?,
                proto: protocol_number(p.protocol.as_deref()).ok()?,
                port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
            })
        })
        .collect()
}

/// A node's IPv4 InternalIP and ExternalIP addresses.
fn node_addrs(node: &SlimNode) -> impl Iterator<Item = Ipv4Addr> + '_ {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
}

// ---------------------------------------------------------------- policies

/// A policy of this compile.
struct PolicyData {
    /// Index in the compile's policy list (the rule-resolution cache key).
    index: usize,
    policy_ref: u32,
    parsed: Arc<ParsedPolicy>,
}

/// A NetworkPolicy as the compiler uses it, independent of pods (cached
/// while the object is unchanged).
#[derive(Debug)]
struct ParsedPolicy {
    namespace: String,
    name: String,
    selector: LabelMatch,
    /// `Some` when the policy has the type (isolates the direction).
    ingress: Option<Vec<RuleData>>,
    egress: Option<Vec<RuleData>>,
    /// Every valid ipBlock cidr and except.
    prefixes: Vec<Ipv4Network>,
    warnings: Vec<String>,
}

#[derive(Debug)]
struct RuleData {
    /// `None`: every peer (no or empty `from`/`to`).
    peers: Option<Vec<PeerData>>,
    /// `None`: every protocol and port (no or empty `ports`).
    ports: Option<Vec<PortData>>,
}

#[derive(Debug)]
enum PeerData {
    /// Pods of the namespaces matching `namespaces` (`None`: the policy's
    /// own) whose labels match `pods` (`None`: all).
    Pods {
        namespaces: Option<LabelMatch>,
        pods: Option<LabelMatch>,
    },
    Block {
        net: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
    /// Invalid or IPv6-only: matches no IPv4 peer.
    Nothing,
}

#[derive(Clone, Debug)]
enum PortData {
    /// Every port of a protocol.
    Proto(u8),
    Range { proto: u8, lo: u16, hi: u16 },
    Named { proto: u8, name: String },
}

impl ParsedPolicy {
    fn parse(policy: &NetworkPolicy, name: &PolicyName) -> Self {
        let mut warnings = Vec::new();
        let what = || format!("policy {name}");
        let mut out = Self {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            selector: LabelMatch::parse(&Default::default(), &what, &mut warnings),
            // No spec: the apiserver's defaults for an empty spec (every
            // pod, Ingress, no rules).
            ingress: Some(Vec::new()),
            egress: None,
            prefixes: Vec::new(),
            warnings: Vec::new(),
        };
        let Some(spec) = policy.spec.as_ref() else {
            return out;
        };
        out.selector = LabelMatch::parse(&spec.pod_selector.clone().unwrap_or_default(), &|| format!("{} podSelector", what()), &mut warnings);
        // The apiserver's defaulting: no types = Ingress, plus Egress when
        // there are egress rules.
        let (mut has_in, mut has_out) = (false, false);
        match spec.policy_types.as_deref() {
            None | Some([]) => {
                has_in = true;
                has_out = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
            Some(types) => {
                for t in types {
                    match t.as_str() {
                        "Ingress" => has_in = true,
                        "Egress" => has_out = true,
                        other => warnings.push(format!("{}: unknown policyType {other:?} ignored", what())),
                    }
                }
            }
        }
        out.ingress = has_in.then(|| {
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| RuleData::parse(r.from.as_deref(), r.ports.as_deref(), &|| format!("{} ingress[{i}]", what()), &mut warnings))
                .collect()
        });
        out.egress = has_out.then(|| {
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| RuleData::parse(r.to.as_deref(), r.ports.as_deref(), &|| format!("{} egress[{i}]", what()), &mut warnings))
                .collect()
        });
        for rule in out.ingress.iter().chain(out.egress.iter()).flatten() {
            for peer in rule.peers.iter().flatten() {
                if let PeerData::Block { net, except } = peer {
                    out.prefixes.push(*net);
                    out.prefixes.extend(except.iter().copied());
                }
            }
        }
        out.warnings = warnings;
        out
    }

    fn rules(&self, dir: u8) -> Option<&[RuleData]> {
        if dir == POL_DIR_INGRESS { self.ingress.as_deref() } else { self.egress.as_deref() }
    }
}

impl RuleData {
    fn parse(peers: Option<&[NetworkPolicyPeer]>, ports: Option<&[NetworkPolicyPort]>, what: &dyn Fn() -> String, warnings: &mut Vec<String>) -> Self {
        let peers = peers.filter(|p| !p.is_empty()).map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, p)| PeerData::parse(p, &|| format!("{} peer {i}", what()), warnings))
                .collect()
        });
        let ports = ports.filter(|p| !p.is_empty()).map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| PortData::parse(p, &|| format!("{} port {i}", what()), warnings))
                .collect()
        });
        Self { peers, ports }
    }
}

impl PeerData {
    fn parse(peer: &NetworkPolicyPeer, what: &dyn Fn() -> String, warnings: &mut Vec<String>) -> Self {
        if let Some(block) = &peer.ip_block {
            if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                warnings.push(format!("{}: ipBlock together with a selector is invalid; peer skipped", what()));
                return Self::Nothing;
            }
            return Self::parse_block(&block.cidr, block.except.as_deref().unwrap_or_default(), what, warnings);
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            warnings.push(format!("{}: empty peer is invalid; peer skipped", what()));
            return Self::Nothing;
        }
        Self::Pods {
            namespaces: peer
                .namespace_selector
                .as_ref()
                .map(|s| LabelMatch::parse(s, &|| format!("{} namespaceSelector", what()), warnings)),
            pods: peer
                .pod_selector
                .as_ref()
                .map(|s| LabelMatch::parse(s, &|| format!("{} podSelector", what()), warnings)),
        }
    }

    fn parse_block(cidr: &str, except: &[String], what: &dyn Fn() -> String, warnings: &mut Vec<String>) -> Self {
        // An IPv6 block is valid and simply matches no IPv4 peer.
        if cidr.contains(':') {
            return Self::Nothing;
        }
        let net = match riptide_cidr::parse("ipBlock cidr", cidr) {
            Ok(net) => net,
            Err(e) => {
                warnings.push(format!("{}: {e}; peer skipped", what()));
                return Self::Nothing;
            }
        };
        let mut excepts = Vec::with_capacity(except.len());
        for e in except {
            let parsed = match riptide_cidr::parse("ipBlock except", e) {
                Ok(p) => p,
                Err(err) => {
                    warnings.push(format!("{}: {err}; peer skipped", what()));
                    return Self::Nothing;
                }
            };
            if !contains(net, parsed) {
                warnings.push(format!("{}: except {parsed} is not inside {net}; peer skipped", what()));
                return Self::Nothing;
            }
            excepts.push(parsed);
        }
        Self::Block { net, except: excepts }
    }
}

impl PortData {
    fn parse(port: &NetworkPolicyPort, what: &dyn Fn() -> String, warnings: &mut Vec<String>) -> Option<Self> {
        let proto = match protocol_number(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(other) => {
                warnings.push(format!("{}: unknown protocol {other:?}; port skipped", what()));
                return None;
            }
        };
        match (&port.port, port.end_port) {
            (None, None) => Some(Self::Proto(proto)),
            (None, Some(_)) => {
                warnings.push(format!("{}: endPort without port; port skipped", what()));
                None
            }
            (Some(IntOrString::String(name)), None) => Some(Self::Named { proto, name: name.clone() }),
            (Some(IntOrString::String(name)), Some(_)) => {
                warnings.push(format!("{}: endPort with named port {name:?}; port skipped", what()));
                None
            }
            (Some(IntOrString::Int(p)), end) => {
                let Some(lo) = u16::try_from(*p).ok().filter(|p| *p != 0) else {
                    warnings.push(format!("{}: port {p} out of range; port skipped", what()));
                    return None;
                };
                let hi = match end {
                    None => lo,
                    Some(e) => match u16::try_from(e).ok().filter(|e| *e >= lo) {
                        Some(hi) => hi,
                        None => {
                            warnings.push(format!("{}: endPort {e} below port {lo} or out of range; port skipped", what()));
                            return None;
                        }
                    },
                };
                Some(Self::Range { proto, lo, hi })
            }
        }
    }
}

// ------------------------------------------------------------------ peers

struct IdentityData<'a> {
    id: u32,
    namespace: &'a str,
    labels: Arc<Labels>,
    /// Indices in the compile's pod list.
    pods: Vec<usize>,
    /// Union of the named ports of the identity's pods (computed when an
    /// egress rule names a port).
    named_ports: OnceCell<Vec<NamedPort<'a>>>,
}

/// The ipBlock prefixes of all policies and their identities.
#[derive(Default)]
struct CidrIndex {
    all: Vec<(Ipv4Network, u32)>,
    by_prefix: HashMap<(u32, u8), u32>,
    /// Prefix lengths in use, longest first.
    lens: Vec<u8>,
}

impl CidrIndex {
    fn insert(&mut self, net: Ipv4Network, id: u32) {
        self.all.push((net, id));
        self.by_prefix.insert((u32::from(net.network()), net.prefix()), id);
        if !self.lens.contains(&net.prefix()) {
            self.lens.push(net.prefix());
            self.lens.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Identity of the longest prefix holding `addr` (0: none).
    fn longest(&self, addr: Ipv4Addr) -> u32 {
        let addr = u32::from(addr);
        self.lens
            .iter()
            .find_map(|len| self.by_prefix.get(&(addr & mask(*len), *len)).copied())
            .unwrap_or(0)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) }
}

/// `inner` lies inside `outer`.
fn contains(outer: Ipv4Network, inner: Ipv4Network) -> bool {
    inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

/// A rule's peers as identities.
#[derive(Default)]
struct ResolvedPeers {
    any: bool,
    /// Label identities (indices), sorted, unique.
    labels: Vec<usize>,
    /// CIDR identities its ipBlocks allow.
    cidrs: Vec<u32>,
    /// Label identities with a pod inside an ipBlock peer (for egress
    /// named ports, which only pods have).
    block_labels: Vec<usize>,
}

struct World<'w, 'a> {
    namespaces: &'w HashMap<&'a str, NsData>,
    identities: &'w [IdentityData<'a>],
    ids_by_ns: &'w HashMap<&'a str, Vec<usize>>,
    pods: &'w [PodData<'a>],
    cidrs: &'w CidrIndex,
}

impl<'a> World<'_, 'a> {
    /// The named ports of identity `idx`'s pods.
    fn named_ports(&self, idx: usize) -> &[NamedPort<'a>] {
        let data = &self.identities[idx];
        data.named_ports.get_or_init(|| {
            let mut ports: Vec<NamedPort<'a>> = Vec::new();
            for port in data.pods.iter().flat_map(|p| named_ports(self.pods[*p].pod)) {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            ports
        })
    }

    fn resolve(&self, policy: &ParsedPolicy, rule: &RuleData, dir: u8) -> ResolvedPeers {
        let mut out = ResolvedPeers::default();
        let Some(peers) = &rule.peers else {
            out.any = true;
            return out;
        };
        let named_egress = dir == POL_DIR_EGRESS && rule.ports.iter().flatten().any(|p| matches!(p, PortData::Named { .. }));
        for peer in peers {
            match peer {
                PeerData::Nothing => {}
                PeerData::Pods { namespaces, pods } => {
                    let in_ns = |ns: &str| {
                        self.ids_by_ns
                            .get(ns)
                            .into_iter()
                            .flatten()
                            .filter(|i| pods.as_ref().is_none_or(|s| s.matches(&self.identities[**i].labels)))
                            .copied()
                            .collect::<Vec<_>>()
                    };
                    match namespaces {
                        None => out.labels.extend(in_ns(&policy.namespace)),
                        Some(sel) => {
                            for (ns, data) in self.namespaces {
                                if sel.matches(&data.labels) {
                                    out.labels.extend(in_ns(ns));
                                }
                            }
                        }
                    }
                }
                PeerData::Block { net, except } => {
                    let allowed = |q: Ipv4Network| contains(*net, q) && !except.iter().any(|e| contains(*e, q));
                    out.cidrs.extend(self.cidrs.all.iter().filter(|(q, _)| allowed(*q)).map(|(_, id)| *id));
                    if named_egress {
                        let host = |ip: Ipv4Addr| allowed(Ipv4Network::from(ip));
                        out.block_labels.extend(
                            self.identities
                                .iter()
                                .enumerate()
                                .filter(|(_, d)| d.pods.iter().any(|p| host(self.pods[*p].ip)))
                                .map(|(i, _)| i),
                        );
                    }
                }
            }
        }
        for v in [&mut out.labels, &mut out.block_labels] {
            v.sort_unstable();
            v.dedup();
        }
        out.cidrs.sort_unstable();
        out.cidrs.dedup();
        out
    }
}

// ------------------------------------------------------------------ rules

struct Emit<'r> {
    ep_id: u32,
    dir: u8,
    policy_ref: u32,
    rules: &'r mut HashMap<RuleKey, PolicyValue>,
    /// An entry that is not a single-port one was written.
    trie: bool,
}

/// What [`Emit::rule`] wrote.
struct Wrote {
    /// An [`identity::ANY`] entry.
    any: bool,
    /// An entry for the trie (a port range, every port or protocol).
    trie: bool,
}

impl Emit<'_> {
    /// Writes the entries of one rule for one endpoint. `local_ports`: the
    /// endpoint's own named ports.
    fn rule<'p>(mut self, rule: &RuleData, peers: &ResolvedPeers, local_ports: &dyn Fn() -> &'p [NamedPort<'p>], world: &World<'_, '_>) -> Wrote {
        let mut wrote_any = false;
        let all = [PortData::Proto(0)];
        let ports: &[PortData] = match &rule.ports {
            None => &all,
            Some(list) => list,
        };
        let every_proto = rule.ports.is_none();
        for port in ports {
            match port {
                PortData::Named { proto, name } if self.dir == POL_DIR_EGRESS => {
                    // The name resolves on the destination: each peer
                    // identity's own pods.
                    let resolve = |idx: usize| {
                        world
                            .named_ports(idx)
                            .iter()
                            .filter(|p| p.name == name && p.proto == *proto)
                            .map(move |p| (world.identities[idx].id, p.port))
                    };
                    let mut targets: Vec<(u32, u16)> = Vec::new();
                    if peers.any {
                        targets.extend((0..world.identities.len()).flat_map(resolve));
                    }
                    targets.extend(peers.labels.iter().copied().flat_map(resolve));
                    targets.extend(peers.block_labels.iter().copied().flat_map(resolve));
                    for (id, port) in targets {
                        self.insert(id, *proto, port, POLICY_PREFIX_FULL);
                    }
                }
                _ => {
                    let entries = port_entries(port, every_proto, local_ports);
                    let ids = peers
                        .any
                        .then_some(identity::ANY)
                        .into_iter()
                        .chain(peers.labels.iter().map(|i| world.identities[*i].id))
                        .chain(peers.cidrs.iter().copied());
                    for id in ids {
                        for (proto, port, prefix) in &entries {
                            self.insert(id, *proto, *port, *prefix);
                            wrote_any |= id == identity::ANY;
                        }
                    }
                }
            }
        }
        Wrote { any: wrote_any, trie: self.trie }
    }

    fn insert(&mut self, id: u32, proto: u8, port: u16, prefix_len: u32) {
        self.trie |= prefix_len != POLICY_PREFIX_FULL;
        let key = RuleKey {
            prefix_len,
            key: PolicyKey {
                ep_id_be: self.ep_id.to_be(),
                identity_be: id.to_be(),
                dir: self.dir,
                proto,
                port_be: port.to_be(),
            },
        };
        // Several policies allowing the same thing: name the lowest ref,
        // so the value does not depend on evaluation order.
        self.rules
            .entry(key)
            .and_modify(|v| v.policy_ref = v.policy_ref.min(self.policy_ref))
            .or_insert(PolicyValue {
                policy_ref: self.policy_ref,
                flags: 0,
            });
    }
}

/// (protocol, port, prefix length) entries of a port that does not depend
/// on the peer.
fn port_entries<'p>(port: &PortData, every_proto: bool, local_ports: &dyn Fn() -> &'p [NamedPort<'p>]) -> Vec<(u8, u16, u32)> {
    match port {
        PortData::Proto(_) if every_proto => vec![(0, 0, POLICY_PREFIX_ANY_PROTO)],
        PortData::Proto(proto) => vec![(*proto, 0, POLICY_PREFIX_ANY_PORT)],
        PortData::Range { proto, lo, hi } => port_prefixes(*lo, *hi).into_iter().map(|(p, len)| (*proto, p, len)).collect(),
        // Ingress: the selected pod's own port of that name.
        PortData::Named { proto, name } => local_ports()
            .iter()
            .filter(|p| p.name == name && p.proto == *proto)
            .map(|p| (*proto, p.port, POLICY_PREFIX_FULL))
            .collect(),
    }
}
