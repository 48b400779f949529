//! The NetworkPolicy paths' policies: 100 NetworkPolicies selecting both
//! netserver pods, installed right before a `policy` measurement and
//! removed right after, so the interleaved `direct` runs see a cluster
//! without any policy (no endpoint isolated, `CFG_F_POLICY` off).
//!
//! The set is shaped like a namespace that many teams write policies for:
//! 99 policies each allow some other label (every third from a namespace
//! selector too, every fifth from an ipBlock) on a port of their own, and
//! one allows the client pod on every port. The server is then
//! ingress-isolated and each of the client's new flows is judged against
//! rules of 100 policies (Kubernetes' union of allows: the one that matches
//! decides).

use std::{fmt::Write as _, time::Duration};

use anyhow::{Result, ensure};

use super::{agent_status, topology};
use crate::{e2e, lab::Lab};

/// Policies selecting the servers during a `policy` measurement.
pub const POLICIES: usize = 100;

/// Quiet time after a change is written: the apiserver, kubectl and both
/// agents finish what the change set off (watch fan-out, the agents' last
/// passes and logs) before netperf runs, instead of inside the first
/// `policy` (or next `direct`) measurement.
const SETTLE: Duration = Duration::from_secs(1);

/// The policies, as one multi-document manifest (labelled `bench=netpol`).
pub fn manifest() -> String {
    let mut m = String::with_capacity(POLICIES * 420);
    for k in 0..POLICIES {
        let from = if k == POLICIES - 1 {
            // The client, on every port (netperf's control and data ports).
            "  - from: [{podSelector: {matchLabels: {app: client}}}]\n".to_owned()
        } else {
            let mut peers = format!("{{podSelector: {{matchLabels: {{app: team-{k}}}}}}}");
            if k % 3 == 0 {
                let _ = write!(
                    peers,
                    ", {{namespaceSelector: {{matchLabels: {{team: t{k}}}}}, podSelector: {{matchLabels: {{role: api}}}}}}"
                );
            }
            if k % 5 == 0 {
                let _ = write!(peers, ", {{ipBlock: {{cidr: 198.51.100.{}/32}}}}", k + 1);
            }
            format!(
                "  - from: [{peers}]\n    ports: [{{protocol: TCP, port: {}}}]\n",
                5_000 + k
            )
        };
        let _ = write!(
            m,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: netpol-{k}, labels: {{bench: netpol}}}}\nspec:\n  podSelector:\n    matchExpressions: [{{key: app, operator: In, values: [netserver, netserver-local]}}]\n  policyTypes: [Ingress]\n  ingress:\n{from}"
        );
    }
    m
}

/// Applies the policies and waits until both nodes enforce all of them.
pub fn install(lab: &Lab) -> Result<()> {
    topology::apply(lab, "netpol.yaml", &manifest())?;
    wait_for(lab, POLICIES)?;
    std::thread::sleep(SETTLE);
    Ok(())
}

/// Deletes the policies and waits until no node enforces any.
pub fn uninstall(lab: &Lab) -> Result<()> {
    e2e::kubectl(
        lab,
        &["delete", "networkpolicy", "-l", "bench=netpol", "--wait=false"],
    )?;
    wait_for(lab, 0)?;
    std::thread::sleep(SETTLE);
    Ok(())
}

/// Waits until both agents' last policy pass compiled `want` policies,
/// wrote everything, and enforce (some local pod isolated: each node has
/// a netserver) exactly when there are policies.
fn wait_for(lab: &Lab, want: usize) -> Result<()> {
    let c = lab.config();
    e2e::eventually(Duration::from_secs(120), || {
        for node in 1..=2 {
            let v = agent_status(c, node)?;
            let p = &v["policy"];
            let have = p["policies"].as_u64().unwrap_or(u64::MAX) as usize;
            let enforcing = p["enforcing"].as_bool().unwrap_or(false);
            let errors = p["errors"].as_array().map_or(0, Vec::len);
            ensure!(
                have == want && enforcing == (want > 0) && errors == 0,
                "node {node}: {have}/{want} policies, enforcing {enforcing}, {errors} write errors"
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_policy_selects_both_servers_and_only_the_last_allows_the_client() {
        let m = super::manifest();
        let docs: Vec<&str> = m.split("---\n").filter(|d| !d.is_empty()).collect();
        assert_eq!(docs.len(), super::POLICIES);
        for (k, d) in docs.iter().enumerate() {
            assert!(d.contains(&format!("name: netpol-{k},")), "{d}");
            assert!(d.contains("values: [netserver, netserver-local]"), "{d}");
            let client = d.contains("app: client");
            assert_eq!(client, k == super::POLICIES - 1, "{d}");
            assert_eq!(d.contains("ports:"), !client, "{d}");
        }
    }
}
