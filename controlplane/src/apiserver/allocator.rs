//! Service ClusterIP and NodePort allocation.
//!
//! The allocation state is derived from the stored Services (rebuilt at
//! start), so it cannot drift from what is stored: an address is taken
//! exactly while a stored Service holds it. kube-apiserver keeps separate
//! bitmap objects; with a single apiserver per store this is equivalent
//! and has no repair loop to get wrong.
//!
//! ClusterIPs follow KEP-3070 (upstream `calculateRangeOffset` and
//! `randomScanStrategyWithOffset`): the low end of the range is a static
//! band of min(max(16, size/16), 256) addresses that dynamic allocation
//! uses only once the rest of the range is full, so a Service that asks for
//! a well-known address there (`kube-dns` at 10.43.0.10) finds it free.
//! Upstream picks a random start in each part; here a cursor rotates
//! through the upper part instead, which is deterministic and likewise
//! avoids handing a just-released address straight out again.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::Value;

use super::status::Cause;

pub const SERVICE_CIDR_BASE: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 0);
pub const SERVICE_CIDR_BITS: u32 = 16;
/// The `kubernetes` Service's address: the first of the range. The
/// apiserver creates that Service at start with an explicit request, so
/// dynamic allocation never hands out a range's first address.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 1);
pub const NODE_PORT_MIN: u16 = 30000;
pub const NODE_PORT_MAX: u16 = 32767;

/// An IPv4 Service range. Offsets count from the network address; the
/// network (offset 0) and broadcast (offset `size - 1`) addresses are never
/// allocated, as in kube-apiserver's IPv4 allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    base: u32,
    bits: u32,
}

impl ServiceCidr {
    /// `base/bits`, or `None` unless `bits` leaves at least one usable
    /// address and `base` is the network address.
    pub fn new(base: Ipv4Addr, bits: u32) -> Option<Self> {
        if !(1..=30).contains(&bits) {
            return None;
        }
        let base = u32::from(base);
        let host_mask = (1u32 << (32 - bits)) - 1;
        (base & host_mask == 0).then_some(Self { base, bits })
    }

    /// Addresses in the CIDR, network and broadcast included.
    fn size(self) -> u32 {
        1 << (32 - self.bits)
    }

    /// Offset of the last usable address.
    fn last(self) -> u32 {
        self.size() - 2
    }

    fn addr(self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + offset)
    }

    /// Whether `ip` is a usable (allocatable) address of the range.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v - self.base <= self.last()
    }

    /// Number of addresses in the static band at the low end (offsets
    /// `1..=band`): KEP-3070's min(max(16, size/16), 256), and none at all
    /// for ranges of 16 addresses or fewer.
    pub fn static_band(self) -> u32 {
        let size = self.size();
        if size <= 16 { 0 } else { (size / 16).clamp(16, 256) }
    }
}

impl Default for ServiceCidr {
    fn default() -> Self {
        Self { base: u32::from(SERVICE_CIDR_BASE), bits: SERVICE_CIDR_BITS }
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.bits)
    }
}

#[derive(Debug, Default)]
pub struct Allocator {
    cidr: ServiceCidr,
    ips: BTreeSet<u32>,
    ports: BTreeSet<u16>,
    /// Offset where the next scan of the upper (dynamic) part starts.
    next_ip: u32,
    next_port: u16,
}

/// What one Service holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub ip: Option<Ipv4Addr>,
    pub ports: Vec<u16>,
}

/// Addresses and ports a Service object holds.
pub fn held_by(svc: &Value) -> Held {
    let ip = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Ipv4Addr>().ok());
    let mut ports: Vec<u16> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                .filter_map(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .collect()
        })
        .unwrap_or_default();
    if let Some(h) = svc.pointer("/spec/healthCheckNodePort").and_then(Value::as_u64)
        && let Ok(h) = u16::try_from(h)
        && h != 0
    {
        ports.push(h);
    }
    ports.sort_unstable();
    ports.dedup();
    Held { ip, ports }
}

impl Allocator {
    /// An allocator over the default Service range, 10.43.0.0/16.
    pub fn new() -> Self {
        Self::with_cidr(ServiceCidr::default())
    }

    pub fn with_cidr(cidr: ServiceCidr) -> Self {
        Self { cidr, next_ip: cidr.static_band() + 1, next_port: NODE_PORT_MIN, ..Self::default() }
    }

    pub fn take(&mut self, h: &Held) {
        if let Some(ip) = h.ip {
            self.ips.insert(u32::from(ip));
        }
        self.ports.extend(h.ports.iter().copied());
    }

    pub fn release(&mut self, h: &Held) {
        if let Some(ip) = h.ip {
            self.ips.remove(&u32::from(ip));
        }
        for p in &h.ports {
            self.ports.remove(p);
        }
    }

    fn is_free(&self, offset: u32) -> bool {
        offset != 1 && !self.ips.contains(&u32::from(self.cidr.addr(offset)))
    }

    /// A free address for a Service that did not ask for one: from the
    /// upper part of the range, rotating from the cursor; from the static
    /// band only when the upper part is full (KEP-3070).
    fn next_free_ip(&mut self) -> Option<Ipv4Addr> {
        let band = self.cidr.static_band();
        let upper = self.cidr.last() - band;
        for i in 0..upper {
            let off = band + 1 + (self.next_ip.saturating_sub(band + 1) + i) % upper;
            if self.is_free(off) {
                self.next_ip = off + 1;
                return Some(self.cidr.addr(off));
            }
        }
        (1..=band).find(|off| self.is_free(*off)).map(|off| self.cidr.addr(off))
    }

    fn next_free_port(&mut self) -> Option<u16> {
        let n = NODE_PORT_MAX - NODE_PORT_MIN + 1;
        for i in 0..n {
            let p = NODE_PORT_MIN + (self.next_port - NODE_PORT_MIN + i) % n;
            if !self.ports.contains(&p) {
                self.next_port = if p == NODE_PORT_MAX { NODE_PORT_MIN } else { p + 1 };
                return Some(p);
            }
        }
        None
    }

    /// Fill in and reserve a Service's ClusterIP, NodePorts and
    /// healthCheckNodePort. `old` is what the stored version holds (for
    /// updates): those stay reserved to this Service. On success returns
    /// what `svc` now holds; the caller reserves it (already done here) and
    /// releases `old - new` once the write is stored.
    pub fn assign(&mut self, svc: &mut Value, old: Option<&Value>) -> Result<Held, Vec<Cause>> {
        let old_held = old.map(held_by).unwrap_or_default();
        let mut causes = Vec::new();
        let mut newly: Held = Held::default();
        let ty = svc.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();

        // ClusterIP.
        let requested = svc.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("").to_string();
        let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP").and_then(Value::as_str)).unwrap_or("").to_string();
        if ty == "ExternalName" {
            if !requested.is_empty() && requested != "None" && old_ip != requested {
                causes.push(Cause::forbidden("spec.clusterIP", "may not be set for ExternalName services"));
            }
        } else if old.is_some() && !old_ip.is_empty() && (requested.is_empty() || requested == old_ip) {
            if let Some(s) = svc.get_mut("spec").and_then(Value::as_object_mut) {
                s.insert("clusterIP".into(), Value::String(old_ip.clone()));
                s.insert("clusterIPs".into(), serde_json::json!([old_ip]));
            }
        } else if old.is_some() && !old_ip.is_empty() && old_ip != requested {
            causes.push(Cause::invalid("spec.clusterIPs[0]", &requested, "may not change once set"));
        } else if requested == "None" {
            if let Some(s) = svc.get_mut("spec").and_then(Value::as_object_mut) {
                s.insert("clusterIPs".into(), serde_json::json!(["None"]));
            }
        } else {
            let ip = if requested.is_empty() {
                match self.next_free_ip() {
                    Some(ip) => Some(ip),
                    None => {
                        causes.push(Cause::invalid("spec.clusterIPs", "", "failed to allocate IP: range is full"));
                        None
                    }
                }
            } else {
                match requested.parse::<Ipv4Addr>() {
                    Err(_) => {
                        causes.push(Cause::invalid("spec.clusterIPs[0]", &requested, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"));
                        None
                    }
                    Ok(ip) if !self.cidr.contains(ip) => {
                        let msg = format!("failed to allocate IP: the provided IP is not in the valid range. The range of valid IPs is {}", self.cidr);
                        causes.push(Cause::invalid("spec.clusterIPs", &requested, msg));
                        None
                    }
                    Ok(ip) if self.ips.contains(&u32::from(ip)) => {
                        causes.push(Cause::invalid("spec.clusterIPs", &requested, "failed to allocate IP: provided IP is already allocated"));
                        None
                    }
                    Ok(ip) => Some(ip),
                }
            };
            if let Some(ip) = ip {
                self.ips.insert(u32::from(ip));
                newly.ip = Some(ip);
                if let Some(s) = svc.get_mut("spec").and_then(Value::as_object_mut) {
                    s.insert("clusterIP".into(), Value::String(ip.to_string()));
                    s.insert("clusterIPs".into(), serde_json::json!([ip.to_string()]));
                }
            }
        }

        // NodePorts.
        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer"
                && svc.pointer("/spec/allocateLoadBalancerNodePorts").and_then(Value::as_bool) != Some(false));
        let old_ports: Vec<(i64, String, u16)> = old
            .and_then(|o| o.pointer("/spec/ports").and_then(Value::as_array))
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        let np = u16::try_from(p.get("nodePort")?.as_u64()?).ok()?;
                        Some((
                            p.get("port").and_then(Value::as_i64).unwrap_or(0),
                            p.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string(),
                            np,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut this_request: Vec<u16> = Vec::new();
        if let Some(ports) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
            for (i, p) in ports.iter_mut().enumerate() {
                let Some(pm) = p.as_object_mut() else { continue };
                let req = pm.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
                // allocateLoadBalancerNodePorts=false: no port is picked, but
                // one the user names is still checked and reserved (upstream
                // "node ports will be allocated if explicitly specified").
                if !wants_node_ports && (ty != "LoadBalancer" || req == 0) {
                    continue;
                }
                let port = pm.get("port").and_then(Value::as_i64).unwrap_or(0);
                let proto = pm.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string();
                let chosen = if req == 0 {
                    // Keep the port this Service already had for the same port.
                    if let Some((_, _, np)) = old_ports.iter().find(|(po, pr, _)| *po == port && *pr == proto) {
                        Some(*np)
                    } else {
                        match self.next_free_port() {
                            Some(np) => {
                                self.ports.insert(np);
                                newly.ports.push(np);
                                Some(np)
                            }
                            None => {
                                causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), 0, "failed to allocate port: range is full"));
                                None
                            }
                        }
                    }
                } else {
                    let Ok(np) = u16::try_from(req) else {
                        causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), req, "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                        continue;
                    };
                    if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np) {
                        causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), req, "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                        None
                    } else if old_held.ports.contains(&np) {
                        Some(np)
                    } else if this_request.contains(&np) {
                        // Same nodePort for TCP and UDP of one port is allowed.
                        Some(np)
                    } else if self.ports.contains(&np) {
                        causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), req, "provided port is already allocated"));
                        None
                    } else {
                        self.ports.insert(np);
                        newly.ports.push(np);
                        Some(np)
                    }
                };
                if let Some(np) = chosen {
                    this_request.push(np);
                    pm.insert("nodePort".into(), Value::from(np));
                }
            }
        }

        // healthCheckNodePort: kube allocates it only for LoadBalancer with
        // externalTrafficPolicy=Local.
        let local = svc.pointer("/spec/externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
        if ty == "LoadBalancer" && local {
            let req = svc.pointer("/spec/healthCheckNodePort").and_then(Value::as_i64).unwrap_or(0);
            let old_h = old.and_then(|o| o.pointer("/spec/healthCheckNodePort").and_then(Value::as_u64)).and_then(|h| u16::try_from(h).ok());
            let chosen = if req == 0 {
                old_h.or_else(|| {
                    let np = self.next_free_port()?;
                    self.ports.insert(np);
                    newly.ports.push(np);
                    Some(np)
                })
            } else {
                match u16::try_from(req) {
                    Ok(np) if old_h == Some(np) => Some(np),
                    Ok(np) if (NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np) && !self.ports.contains(&np) => {
                        self.ports.insert(np);
                        newly.ports.push(np);
                        Some(np)
                    }
                    _ => {
                        causes.push(Cause::invalid("spec.healthCheckNodePort", req, "failed to allocate requested HealthCheck NodePort"));
                        None
                    }
                }
            };
            if let (Some(np), Some(s)) = (chosen, svc.get_mut("spec").and_then(Value::as_object_mut)) {
                s.insert("healthCheckNodePort".into(), Value::from(np));
            }
        } else if svc.pointer("/spec/healthCheckNodePort").and_then(Value::as_i64).unwrap_or(0) != 0 {
            causes.push(Cause::invalid("spec.healthCheckNodePort", 0, "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"));
        }

        if !causes.is_empty() {
            self.release(&newly);
            return Err(causes);
        }
        Ok(held_by(svc))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cidr(s: &str, bits: u32) -> ServiceCidr {
        ServiceCidr::new(s.parse().unwrap(), bits).unwrap()
    }

    fn cluster_ip(a: &mut Allocator) -> Option<Ipv4Addr> {
        let mut s = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80}]}});
        a.assign(&mut s, None).ok()?.ip
    }

    #[test]
    fn allocates_without_collisions_and_rejects_bad_requests() {
        let mut a = Allocator::new();
        a.take(&Held { ip: Some(KUBERNETES_SERVICE_IP), ports: vec![] });
        let mut s1 = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let h1 = a.assign(&mut s1, None).unwrap();
        assert_eq!(h1.ip, Some(Ipv4Addr::new(10, 43, 1, 1)));
        assert_eq!(h1.ports, vec![30000]);
        let mut s2 = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}});
        assert!(a.assign(&mut s2, None).is_err());
        let mut s3 = json!({"spec": {"type": "NodePort", "clusterIP": "10.43.1.1", "ports": [{"port": 80, "nodePort": 40000}]}});
        let errs = a.assign(&mut s3, None).unwrap_err();
        assert_eq!(errs.len(), 2);
        a.release(&h1);
        let mut s4 = json!({"spec": {"type": "NodePort", "clusterIP": "10.43.1.1", "ports": [{"port": 80, "nodePort": 30000}]}});
        assert!(a.assign(&mut s4, None).is_ok());
    }

    #[test]
    fn allocate_load_balancer_node_ports_false() {
        let mut a = Allocator::new();
        let mut none = json!({"spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": [{"port": 80}]}});
        let h = a.assign(&mut none, None).unwrap();
        assert!(h.ports.is_empty(), "{h:?}");
        assert!(none.pointer("/spec/ports/0/nodePort").is_none(), "{none}");
        // An explicit port is still reserved: a second claim is refused.
        let mut named = json!({"spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": [{"port": 80, "nodePort": 30100}]}});
        assert_eq!(a.assign(&mut named, None).unwrap().ports, vec![30100]);
        let mut again = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30100}]}});
        let errs = a.assign(&mut again, None).unwrap_err();
        assert!(errs[0].message.contains("already allocated"), "{}", errs[0].message);
        // Switching allocation on later gives the ports that are missing.
        let mut on = none.clone();
        on["spec"]["allocateLoadBalancerNodePorts"] = json!(true);
        let h = a.assign(&mut on, Some(&none)).unwrap();
        assert_eq!(h.ports.len(), 1);
    }

    #[test]
    fn static_band_size_follows_kep_3070() {
        // min(max(16, size/16), 256); none for 16 addresses or fewer.
        assert_eq!(cidr("10.0.0.0", 29).static_band(), 0);
        assert_eq!(cidr("10.0.0.0", 28).static_band(), 0);
        assert_eq!(cidr("10.0.0.0", 27).static_band(), 16);
        assert_eq!(cidr("10.0.0.0", 24).static_band(), 16);
        assert_eq!(cidr("10.0.0.0", 22).static_band(), 64);
        assert_eq!(cidr("10.0.0.0", 20).static_band(), 256);
        assert_eq!(ServiceCidr::default().static_band(), 256);
        assert_eq!(cidr("10.0.0.0", 12).static_band(), 256);
        assert!(ServiceCidr::new("10.0.0.1".parse().unwrap(), 24).is_none());
        assert!(ServiceCidr::new("10.0.0.0".parse().unwrap(), 31).is_none());
    }

    #[test]
    fn small_range_fills_the_upper_part_before_the_band() {
        // /27: 30 usable addresses, .1-.16 the band, .17-.30 dynamic.
        let mut a = Allocator::with_cidr(cidr("192.0.2.0", 27));
        let mut got = Vec::new();
        for _ in 0..14 {
            got.push(cluster_ip(&mut a).unwrap());
        }
        let upper: Vec<Ipv4Addr> = (17..=30).map(|o| Ipv4Addr::new(192, 0, 2, o)).collect();
        assert_eq!(got, upper, "dynamic allocation must use the upper part first");
        // An explicit request may take a band address even while the upper
        // part has room, and is refused when taken.
        let mut a2 = Allocator::with_cidr(cidr("192.0.2.0", 27));
        let mut dns = json!({"spec": {"clusterIP": "192.0.2.10", "ports": [{"port": 53}]}});
        assert_eq!(a2.assign(&mut dns, None).unwrap().ip, Some(Ipv4Addr::new(192, 0, 2, 10)));
        let mut again = json!({"spec": {"clusterIP": "192.0.2.10", "ports": [{"port": 53}]}});
        assert!(a2.assign(&mut again, None).is_err());
        // Upper part full: the band, lowest first, skipping what is taken
        // and the first address (the `kubernetes` Service's).
        a.take(&Held { ip: Some(Ipv4Addr::new(192, 0, 2, 2)), ports: vec![] });
        assert_eq!(cluster_ip(&mut a), Some(Ipv4Addr::new(192, 0, 2, 3)));
        for _ in 4..=16 {
            assert!(cluster_ip(&mut a).is_some());
        }
        assert_eq!(cluster_ip(&mut a), None, "29 dynamic addresses, all taken");
        // A released upper address is preferred over nothing, never the
        // network or broadcast address.
        a.release(&Held { ip: Some(Ipv4Addr::new(192, 0, 2, 20)), ports: vec![] });
        assert_eq!(cluster_ip(&mut a), Some(Ipv4Addr::new(192, 0, 2, 20)));
        let mut bcast = json!({"spec": {"clusterIP": "192.0.2.31", "ports": [{"port": 80}]}});
        assert!(a2.assign(&mut bcast, None).is_err());
    }

    #[test]
    fn default_range_keeps_the_band_and_kubernetes_address_free() {
        let mut a = Allocator::new();
        let mut kubernetes = json!({"spec": {"clusterIP": "10.43.0.1", "ports": [{"port": 443}]}});
        assert_eq!(a.assign(&mut kubernetes, None).unwrap().ip, Some(KUBERNETES_SERVICE_IP));
        let band_end = u32::from(Ipv4Addr::new(10, 43, 1, 0));
        for _ in 0..1000 {
            let ip = cluster_ip(&mut a).unwrap();
            assert!(u32::from(ip) > band_end, "{ip} is in the static band");
        }
        let mut dns = json!({"spec": {"clusterIP": "10.43.0.10", "ports": [{"port": 53}]}});
        assert_eq!(a.assign(&mut dns, None).unwrap().ip, Some(Ipv4Addr::new(10, 43, 0, 10)));
        let mut outside = json!({"spec": {"clusterIP": "10.44.0.10", "ports": [{"port": 53}]}});
        let errs = a.assign(&mut outside, None).unwrap_err();
        assert!(errs[0].message.contains("10.43.0.0/16"), "{}", errs[0].message);
    }
}
