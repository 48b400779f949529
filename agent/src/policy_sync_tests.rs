//! The sync's order and failure rules, against a recorder that logs every
//! operation and fails the ones a test names (the kernel maps rarely fail
//! on demand; `tests/kernel_policy_sync.rs` runs the same sync on real
//! maps).

use std::{collections::HashMap, fmt};

use riptide_common::{
    IpcacheValue, PE_F_FAIL_CLOSED, PE_F_ISOLATED_IN, POL_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyEndpointValue,
    PolicyKey, PolicyValue, identity,
};

use super::*;

#[derive(Debug)]
struct Injected(String);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected failure: {}", self.0)
    }
}

impl std::error::Error for Injected {}

/// The three maps in memory, an operation log, and operations to fail (by
/// their log line).
#[derive(Default)]
struct Recorder {
    maps: MapState,
    log: Vec<String>,
    fail: Vec<String>,
}

impl Recorder {
    fn op(&mut self, line: String) -> Result<(), Injected> {
        if self.fail.contains(&line) {
            return Err(Injected(line));
        }
        self.log.push(line);
        Ok(())
    }
}

impl PolicyWriter for Recorder {
    type Error = Injected;
    fn upsert_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: IpcacheValue) -> Result<(), Injected> {
        self.op(format!("+ipcache {addr}/{prefix_len}"))?;
        self.maps.ipcache.insert((addr, prefix_len), value);
        Ok(())
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), Injected> {
        self.op(format!("-ipcache {addr}/{prefix_len}"))?;
        self.maps.ipcache.remove(&(addr, prefix_len));
        Ok(())
    }
    fn list_ipcache(&self) -> Result<Vec<((Ipv4Addr, u8), IpcacheValue)>, Injected> {
        Ok(self.maps.ipcache.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn upsert_endpoint(&mut self, addr: Ipv4Addr, value: PolicyEndpointValue) -> Result<(), Injected> {
        self.op(format!("+ep {addr}"))?;
        self.maps.endpoints.insert(addr, value);
        Ok(())
    }
    fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), Injected> {
        self.op(format!("-ep {addr}"))?;
        self.maps.endpoints.remove(&addr);
        Ok(())
    }
    fn list_endpoints(&self) -> Result<Vec<(Ipv4Addr, PolicyEndpointValue)>, Injected> {
        Ok(self.maps.endpoints.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn upsert_rule(&mut self, rule: RuleKey, value: PolicyValue) -> Result<(), Injected> {
        self.op(format!("+rule {}", describe(&rule)))?;
        self.maps.rules.insert(rule, value);
        Ok(())
    }
    fn remove_rule(&mut self, rule: RuleKey) -> Result<(), Injected> {
        self.op(format!("-rule {}", describe(&rule)))?;
        self.maps.rules.remove(&rule);
        Ok(())
    }
    fn list_rules(&self) -> Result<Vec<(RuleKey, PolicyValue)>, Injected> {
        Ok(self.maps.rules.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn upsert_ipcache_exact(&mut self, addr: Ipv4Addr, value: IpcacheValue) -> Result<(), Injected> {
        self.op(format!("+ipcache4x {addr}"))?;
        self.maps.ipcache_exact.insert(addr, value);
        Ok(())
    }
    fn remove_ipcache_exact(&mut self, addr: Ipv4Addr) -> Result<(), Injected> {
        self.op(format!("-ipcache4x {addr}"))?;
        self.maps.ipcache_exact.remove(&addr);
        Ok(())
    }
    fn list_ipcache_exact(&self) -> Result<Vec<(Ipv4Addr, IpcacheValue)>, Injected> {
        Ok(self.maps.ipcache_exact.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn upsert_rule_exact(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), Injected> {
        self.op(format!("+rule4x {}", describe(&RuleKey { prefix_len: POLICY_PREFIX_FULL, key })))?;
        self.maps.rules_exact.insert(key, value);
        Ok(())
    }
    fn remove_rule_exact(&mut self, key: PolicyKey) -> Result<(), Injected> {
        self.op(format!("-rule4x {}", describe(&RuleKey { prefix_len: POLICY_PREFIX_FULL, key })))?;
        self.maps.rules_exact.remove(&key);
        Ok(())
    }
    fn list_rules_exact(&self) -> Result<Vec<(PolicyKey, PolicyValue)>, Injected> {
        Ok(self.maps.rules_exact.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn rule(ep: u32, peer: u32, port: u16) -> RuleKey {
    RuleKey {
        prefix_len: POLICY_PREFIX_FULL,
        key: PolicyKey { ep_id_be: ep.to_be(), identity_be: peer.to_be(), dir: POL_DIR_INGRESS, proto: 6, port_be: port.to_be() },
    }
}

/// Pod 10.42.0.5 (ep 1, identity 256) isolated for ingress, allowing
/// identity 257 (pod 10.42.1.9) on `ports`.
fn compiled(ports: &[u16]) -> Compiled {
    let mut c = Compiled::default();
    c.ipcache.insert((ip("0.0.0.0"), 0), IpcacheValue { identity: identity::WORLD, cidr_identity: 0 });
    c.ipcache.insert((ip("10.42.0.5"), 32), IpcacheValue { identity: 256, cidr_identity: 0 });
    c.ipcache.insert((ip("10.42.1.9"), 32), IpcacheValue { identity: 257, cidr_identity: 0 });
    c.endpoints.insert(ip("10.42.0.5"), PolicyEndpointValue { ep_id: 1, identity: 256, flags: PE_F_ISOLATED_IN, _pad: 0 });
    c.rules = ports.iter().map(|p| (rule(1, 257, *p), PolicyValue { policy_ref: 0, flags: 0 })).collect::<HashMap<_, _>>();
    c
}

fn kinds(log: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for l in log {
        let k = l.split(' ').next().unwrap();
        if out.last() != Some(&k) {
            out.push(k);
        }
    }
    out
}

#[test]
fn writes_in_reader_order_then_deletes_what_is_stale() {
    let mut s = PolicySync::new(Recorder::default());
    let rep = s.sync(&compiled(&[80, 81]));
    assert!(rep.ok() && rep.read_back, "{rep:?}");
    assert_eq!(kinds(&s.writer().log), ["+ipcache", "+ipcache4x", "+rule4x", "+ep"]);
    assert_eq!((rep.ipcache_written, rep.rules_written, rep.endpoints_written), (3, 2, 1));
    assert_eq!(s.writer().maps, MapState::desired(&compiled(&[80, 81])));

    // Port 81 goes, 82 comes, the peer pod goes, a second endpoint comes
    // and the first loses isolation: adds first, deletions last.
    let mut next = compiled(&[80, 82]);
    next.ipcache.remove(&(ip("10.42.1.9"), 32));
    next.endpoints.clear();
    next.endpoints.insert(ip("10.42.0.6"), PolicyEndpointValue { ep_id: 2, identity: 256, flags: PE_F_ISOLATED_IN, _pad: 0 });
    next.rules = [(rule(2, 257, 82), PolicyValue::default())].into_iter().collect();
    s.writer.log.clear();
    let rep = s.sync(&next);
    assert!(rep.ok() && !rep.read_back, "{rep:?}");
    assert_eq!(
        s.writer().log,
        [
            "+rule4x ep 2 identity 257 dir 1 proto 6 port 82/96",
            "+ep 10.42.0.6",
            "-ep 10.42.0.5",
            "-rule4x ep 1 identity 257 dir 1 proto 6 port 80/96",
            "-rule4x ep 1 identity 257 dir 1 proto 6 port 81/96",
            "-ipcache4x 10.42.1.9",
        ]
    );
    assert_eq!(s.writer().maps, MapState::desired(&next));
    // Nothing changed: nothing written.
    s.writer.log.clear();
    let rep = s.sync(&next);
    assert!(rep.ok() && !rep.changed() && s.writer().log.is_empty(), "{rep:?} {:?}", s.writer().log);
}

#[test]
fn a_failed_rule_write_fails_its_endpoint_closed_until_a_retry_succeeds() {
    let mut s = PolicySync::new(Recorder::default());
    s.writer.fail.push("+rule4x ep 1 identity 257 dir 1 proto 6 port 81/96".into());
    let rep = s.sync(&compiled(&[80, 81]));
    assert!(!rep.ok());
    assert_eq!(rep.fail_closed.iter().copied().collect::<Vec<_>>(), [ip("10.42.0.5")]);
    assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
    let ep = s.writer().maps.endpoints[&ip("10.42.0.5")];
    assert_eq!(ep.flags, PE_F_ISOLATED_IN | PE_F_FAIL_CLOSED);
    assert!(s.known().is_none(), "after a failure the next pass reads the maps back");

    s.writer.fail.clear();
    let rep = s.sync(&compiled(&[80, 81]));
    assert!(rep.ok() && rep.read_back, "{rep:?}");
    assert_eq!(s.writer().maps, MapState::desired(&compiled(&[80, 81])), "retry wrote the rule and cleared the flag");
}

#[test]
fn a_failed_removal_is_reported_kept_and_retried() {
    let mut s = PolicySync::new(Recorder::default());
    assert!(s.sync(&compiled(&[80, 81])).ok());
    let mut next = compiled(&[80]);
    next.ipcache.remove(&(ip("10.42.1.9"), 32));
    s.writer.fail.push("-rule4x ep 1 identity 257 dir 1 proto 6 port 81/96".into());
    s.writer.log.clear();
    let rep = s.sync(&next);
    assert_eq!(rep.errors, ["removing rule ep 1 identity 257 dir 1 proto 6 port 81/96: injected failure: -rule4x ep 1 identity 257 dir 1 proto 6 port 81/96"]);
    assert_eq!((rep.rules_removed, rep.ipcache_removed), (0, 1), "the other removals went on");
    assert!(rep.fail_closed.is_empty(), "a rule left over allows no more than before");
    assert!(s.writer().maps.rules_exact.contains_key(&rule(1, 257, 81).key));
    assert!(s.known().is_none());

    s.writer.fail.clear();
    let rep = s.sync(&next);
    assert!(rep.ok() && rep.read_back, "{rep:?}");
    assert_eq!(rep.rules_removed, 1);
    assert_eq!(s.writer().maps, MapState::desired(&next));
}

#[test]
fn a_failed_ipcache_write_fails_every_endpoint_closed() {
    let mut s = PolicySync::new(Recorder::default());
    s.writer.fail.push("+ipcache4x 10.42.1.9".into());
    let rep = s.sync(&compiled(&[80]));
    assert_eq!(rep.fail_closed.len(), 1);
    assert_ne!(s.writer().maps.endpoints[&ip("10.42.0.5")].flags & PE_F_FAIL_CLOSED, 0);
}

#[test]
fn a_first_pass_converges_from_leftovers_and_closes_renumbered_endpoints_first() {
    // Pinned by an earlier agent: the same pod as endpoint 7 with identity
    // 300, a rule for it, a pod that is gone.
    let mut w = Recorder::default();
    w.maps.ipcache.insert((ip("10.42.0.5"), 32), IpcacheValue { identity: 300, cidr_identity: 0 });
    w.maps.ipcache.insert((ip("10.42.3.3"), 32), IpcacheValue { identity: 257, cidr_identity: 0 });
    w.maps.endpoints.insert(ip("10.42.0.5"), PolicyEndpointValue { ep_id: 7, identity: 300, flags: PE_F_ISOLATED_IN, _pad: 0 });
    w.maps.rules.insert(rule(7, 257, 443), PolicyValue::default());
    let mut s = PolicySync::new(w);
    let want = compiled(&[80]);
    let rep = s.sync(&want);
    assert!(rep.ok() && rep.read_back && rep.renumbered, "{rep:?}");
    assert_eq!(s.writer().log[0], "+ep 10.42.0.5", "closed before anything else: {:?}", s.writer().log);
    assert_eq!(s.writer().maps, MapState::desired(&want));

    // The same state pinned again (a restart that changed nothing): no
    // closing, no writes.
    let mut again = PolicySync::new(Recorder { maps: MapState::desired(&want), ..Recorder::default() });
    let rep = again.sync(&want);
    assert!(rep.ok() && !rep.renumbered && !rep.changed(), "{rep:?}");
}

#[test]
fn entries_of_the_tries_move_to_the_exact_hashes_before_leaving_the_tries() {
    // Written before the split: every /32 and single-port rule in a trie.
    let want = compiled(&[80]);
    let mut w = Recorder::default();
    w.maps.ipcache = want.ipcache.clone();
    w.maps.endpoints = want.endpoints.clone();
    w.maps.rules = want.rules.clone();
    let mut s = PolicySync::new(w);
    let rep = s.sync(&want);
    assert!(rep.ok() && !rep.renumbered, "{rep:?}");
    assert_eq!(
        s.writer().log,
        [
            "+ipcache4x 10.42.0.5",
            "+ipcache4x 10.42.1.9",
            "+rule4x ep 1 identity 257 dir 1 proto 6 port 80/96",
            "-rule ep 1 identity 257 dir 1 proto 6 port 80/96",
            "-ipcache 10.42.0.5/32",
            "-ipcache 10.42.1.9/32",
        ],
        "the programs ask the hashes first: written before the trie entries go"
    );
    assert_eq!(s.writer().maps, MapState::desired(&want));
    assert_eq!((s.writer().maps.ipcache.len(), s.writer().maps.rules.len()), (1, 0), "only 0.0.0.0/0 stays in a trie");
}

#[test]
fn the_fingerprint_follows_what_the_compiler_reads_only() {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Namespace;

    use crate::slim::{SlimNode as Node, SlimPod as Pod};

    let pod = |rv: &str, labels: serde_json::Value, ready: &str| -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "x", "name": "a", "uid": "u1", "resourceVersion": rv, "labels": labels},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "10.42.0.5", "conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap(),
        )
    };
    let node = |rv: &str, ip: &str| -> Arc<Node> {
        Arc::new(serde_json::from_value(serde_json::json!({"metadata": {"name": "n1", "resourceVersion": rv}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})).unwrap())
    };
    let ns: Vec<Arc<Namespace>> = vec![Arc::new(serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap())];
    let fp = |pods: &[Arc<Pod>], nodes: &[Arc<Node>]| {
        inputs_fingerprint(&Inputs { pods, namespaces: &ns, policies: &[], nodes, node_name: "n1", host_addrs: &[ip("198.18.0.10")] })
    };
    let base = fp(&[pod("1", serde_json::json!({"app": "a"}), "True")], &[node("1", "198.18.0.10")]);
    assert_eq!(base, fp(&[pod("1", serde_json::json!({"app": "a"}), "True")], &[node("1", "198.18.0.10")]));
    // A heartbeat (new resourceVersion, same addresses): unchanged.
    assert_eq!(base, fp(&[pod("1", serde_json::json!({"app": "a"}), "True")], &[node("9", "198.18.0.10")]));
    assert_ne!(base, fp(&[pod("1", serde_json::json!({"app": "b"}), "True")], &[node("1", "198.18.0.10")]), "labels count");
    assert_ne!(base, fp(&[pod("1", serde_json::json!({"app": "a"}), "True")], &[node("1", "198.18.0.11")]), "node addresses count");
    assert_ne!(base, fp(&[], &[node("1", "198.18.0.10")]), "a pod gone counts");
}
