//! NetworkPolicy compiler: the cluster's Pods, Namespaces, NetworkPolicies
//! and Nodes in, the contents of the policy maps out (the ipcache, the
//! endpoints and the rules, see `riptide_common`'s NetworkPolicy section;
//! `policy_sync` puts each ipcache entry and rule in its trie or in the
//! exact-match hash in front of it). Pure: no I/O, no clock, so the
//! semantics are unit-tested here and the agent only diffs and writes.
//!
//! Semantics are the `networking.k8s.io/v1` API reference's:
//! - a pod is isolated for a direction once a policy of its namespace
//!   selects it with that `policyType` (absent types: Ingress always, Egress
//!   when the policy has egress rules, as the apiserver defaults them);
//! - allows are a union over the policies selecting the pod; a rule with no
//!   peers allows every peer; a policy with the type and no rules allows
//!   nothing;
//! - a peer is a `podSelector` (pods of the policy's namespace), a
//!   `namespaceSelector` (all pods of matching namespaces), both (AND), or an
//!   `ipBlock` minus its `except`s;
//! - ports: protocol (TCP by default; SCTP rules carry protocol 132 and
//!   match only as far as the datapath parses SCTP), a number, a name
//!   (ingress: the selected pod's containerPort of that name; egress: the
//!   peer's), a range with `endPort`; no ports = every protocol and port;
//! - a pod counts from the moment it has an address until it has finished
//!   (Pending included: init containers talk too); a host-network pod has
//!   its node's address and is no endpoint.
//!
//! Identities (Cilium's shape, numbered by this node alone): a label set
//! (namespace name, namespace labels, pod labels) gets an id ≥
//! [`identity::FIRST_LABELS`]; every distinct ipBlock prefix (cidr or
//! except) of every policy gets one ≥ [`identity::FIRST_CIDR`]. An ipBlock
//! allows the prefixes inside its cidr and outside its excepts; the ipcache
//! gives each address the longest such prefix holding it
//! ([`IpcacheValue::cidr_identity`]), so the datapath's two lookups (label
//! identity, CIDR identity) decide ipBlock peers exactly.
//!
//! [`Compiler`] keeps ids stable across compiles (a label set keeps its
//! identity while some pod has it, a pod its endpoint id while it lives, a
//! policy its `policy_ref` while it exists) so that a change rewrites only
//! the entries it touches; a freed id is handed out again only after a
//! compile in which nothing used it. A restarted agent can take over the
//! numbering of the pinned maps ([`Compiler::adopt`]). Each compile is
//! complete (no incremental state to drift), but it reuses what does not
//! depend on the rest: a policy is parsed once per object version, and a
//! label set is looked up without copying (the `scale_` tests compile
//! 1,000 policies × 5,000 pods and print the time).
//!
//! While no NetworkPolicy exists the compile looks at this node's pods
//! only (their views for `riptide policy list`, their identities and
//! endpoint ids, so they keep them once a policy comes): no pod is
//! isolated and no rule names a peer, so the cluster's pods need no
//! identity and no ipcache entry, and a large cluster without policies
//! costs no per-pod working set. The first policy compiles every pod; the
//! ipcache is written before any rule or endpoint entry (`policy_sync`).
//! Pods are named for `riptide policy check` and events from the pod store
//! ([`resolve`], [`names_by_ip`]), not from a compile.
//!
//! Not expressible in the datapath's keys, and approximated: an egress rule
//! with both an ipBlock peer and a named port allows that port on every pod
//! of a label identity that has a pod inside the block (a named port is a
//! pod's, the key names identities, not addresses).

mod check;
mod compile;
mod ids;
mod pods;
mod ports;
mod selector;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

pub use check::{CheckError, DirVerdict, Peer, Verdict, Via};
pub use compile::Compiler;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
pub use pods::{identity_name_of, names_by_ip, resolve};
pub use ports::{SCTP, port_prefixes, protocol_name, protocol_number};
use riptide_common::{IpcacheValue, PolicyEndpointValue, PolicyKey, PolicyValue, identity};

use crate::slim::{SlimNode, SlimPod};

/// Namespace annotation that turns on audit mode for the namespace's pods:
/// flows their policies would drop pass and are reported instead.
pub const AUDIT_ANNOTATION: &str = "policy.riptide.io/audit";

/// The label the apiserver puts on every Namespace (its name); added here
/// when absent so selecting a namespace by name works before it is set.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Everything a compile reads. The slices are what kube reflector stores
/// give (`Store::state()`), all namespaces.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub pods: &'a [Arc<SlimPod>],
    pub namespaces: &'a [Arc<Namespace>],
    pub policies: &'a [Arc<NetworkPolicy>],
    pub nodes: &'a [Arc<SlimNode>],
    /// This node's name (`spec.nodeName` of local pods).
    pub node_name: &'a str,
    /// This node's own addresses (node IP, hairpin address, ...): ipcache
    /// [`identity::HOST`] entries, always allowed. The local Node object's
    /// addresses are added too.
    pub host_addrs: &'a [Ipv4Addr],
}

/// A NetworkPolicy's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A `rt_policy4_v1` key with its LPM prefix length. Bits of `key` past
/// `prefix_len` are always zero, so equal rules have equal keys (the
/// kernel's trie treats them as the same entry too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub prefix_len: u32,
    pub key: PolicyKey,
}

/// What an identity stands for (for display).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityInfo {
    /// Pods of `namespace` with exactly these labels.
    Labels { namespace: String, labels: Arc<BTreeMap<String, String>> },
    /// An ipBlock prefix.
    Cidr(Ipv4Network),
}

impl fmt::Display for IdentityInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Labels { namespace, labels } => {
                write!(f, "{namespace}:")?;
                let mut sep = "";
                for (k, v) in labels.iter() {
                    write!(f, "{sep}{k}={v}")?;
                    sep = ",";
                }
                Ok(())
            }
            Self::Cidr(net) => write!(f, "cidr:{net}"),
        }
    }
}

/// A local pod as `riptide policy list` shows it (every local pod, isolated
/// or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub namespace: String,
    pub pod: String,
    pub ep_id: u32,
    pub identity: u32,
    pub isolated_in: bool,
    pub isolated_out: bool,
    /// Names (same namespace as the pod) of the policies that select it for
    /// ingress / egress, sorted.
    pub policies_in: Vec<String>,
    pub policies_out: Vec<String>,
    /// The namespace is in audit mode.
    pub audit: bool,
}

/// The result of a compile: what the policy maps must hold, plus views.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// `rt_ipcache4_v1`: (address, prefix length) → identities.
    pub ipcache: BTreeMap<(Ipv4Addr, u8), IpcacheValue>,
    /// `rt_polep4_v1`: local pods isolated in some direction.
    pub endpoints: BTreeMap<Ipv4Addr, PolicyEndpointValue>,
    /// Every local pod with an address (isolated or not).
    pub views: BTreeMap<Ipv4Addr, EndpointView>,
    /// `rt_policy4_v1`: allow rules of the endpoints in [`Self::endpoints`].
    pub rules: HashMap<RuleKey, PolicyValue>,
    /// Policies by `policy_ref` (`None`: a free number).
    pub policies: Vec<Option<PolicyName>>,
    /// Identities in use (label sets and ipBlock prefixes).
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// Policies or pods that could not be compiled as written (invalid
    /// selector, CIDR or port), one line each; the rest still applies.
    pub warnings: Vec<String>,
}

impl Compiled {
    /// Whether `CFG_F_POLICY` must be set: some local pod is isolated.
    pub fn any_local_policy(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The policy a `policy_ref` stands for.
    pub fn policy(&self, policy_ref: u32) -> Option<&PolicyName> {
        self.policies.get(usize::try_from(policy_ref).ok()?)?.as_ref()
    }

    /// A readable name for an identity: a label set, a prefix or a reserved
    /// name.
    pub fn identity_name(&self, id: u32) -> String {
        match id {
            identity::ANY => "any".to_owned(),
            identity::HOST => "host".to_owned(),
            identity::WORLD => "world".to_owned(),
            identity::REMOTE_NODE => "remote-node".to_owned(),
            _ => self.identities.get(&id).map_or_else(|| format!("unknown:{id}"), ToString::to_string),
        }
    }
}
