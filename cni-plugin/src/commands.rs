//! The six CNI operations.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use riptide_common::{EP_F_HOST, EndpointValue};

use crate::{
    config::Config,
    datapath,
    env::CniEnv,
    inspect,
    ipam::{self, Store},
    link::{self, Plan},
    netlink::{Netlink, fmt_mac},
    netns::NetNs,
    types::{Attachment, CniError, CniResult, Interface, IpConfig, Route, code},
};

fn kernel(what: &str) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |e| CniError::new(code::KERNEL, format!("{what}: {e}"))
}

impl From<ipam::Error> for CniError {
    fn from(e: ipam::Error) -> Self {
        let c = match e {
            ipam::Error::Exhausted { .. } => code::RANGE_EXHAUSTED,
            ipam::Error::Io { .. } => code::IO_FAILURE,
        };
        CniError::from_chain(c, &e)
    }
}

impl From<link::Error> for CniError {
    fn from(e: link::Error) -> Self {
        CniError::from_chain(code::KERNEL, &e)
    }
}

impl From<datapath::Error> for CniError {
    fn from(e: datapath::Error) -> Self {
        let c = match e {
            datapath::Error::NotLoaded { .. } => code::TRY_AGAIN_LATER,
            _ => code::KERNEL,
        };
        CniError::from_chain(c, &e)
    }
}

fn plan(env: &CniEnv, conf: &Config, range: Ipv4Network, ip: Ipv4Addr) -> Plan {
    Plan {
        host: link::host_ifname(&env.container_id, &env.ifname),
        pod_ifname: env.ifname.clone(),
        mtu: conf.mtu,
        pod_ip: ip,
        gateway: ipam::gateway(range),
    }
}

fn open_netns(env: &CniEnv) -> Result<NetNs, CniError> {
    let path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "required env variables [CNI_NETNS] missing"))?;
    let ns = NetNs::open(path).map_err(|e| {
        CniError::new(code::INVALID_ENV, format!("CNI_NETNS {}: {e}", path.display()))
    })?;
    if ns.is_current().map_err(kernel("comparing network namespaces"))? {
        return Err(CniError::new(
            code::INVALID_ENV,
            "plugin's netns and netns from CNI_NETNS should not be the same",
        ));
    }
    Ok(ns)
}

/// ADD: reserve an address, wire the veth, attach the datapath, register
/// the endpoint. Any failure after the reservation undoes everything.
pub fn add(env: &CniEnv, conf: &Config) -> Result<CniResult, CniError> {
    let range = conf.pod_range()?;
    datapath::ready(&conf.node)?;
    let ns = open_netns(env)?;
    let mut pod = ns.netlink().map_err(kernel("opening netlink in the container's netns"))?;
    if pod
        .link_by_name(&env.ifname)
        .map_err(kernel("reading the container's links"))?
        .is_some()
    {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!("interface {} already exists in {}", env.ifname, ns.path().display()),
        ));
    }
    let mut node = Netlink::open().map_err(kernel("opening netlink"))?;
    let store = Store::new(&conf.state_dir);
    let ip = store.lock()?.reserve(range, &env.container_id, &env.ifname)?;
    let plan = plan(env, conf, range, ip);
    tracing::debug!(container = %env.container_id, ip = %ip, host = %plan.host, "reserved");
    stop_point("reserved");

    let wired = (|| -> Result<link::Wired, CniError> {
        // A host link with our deterministic name is a leftover of an
        // earlier ADD of this same attachment that died half-way.
        if link::remove(&mut node, &plan.host)? {
            tracing::info!(host = %plan.host, "removed a stale host veth");
        }
        let wired = link::create(&mut node, &mut pod, &ns, &plan)?;
        stop_point("wired");
        datapath::attach(&conf.node, &plan.host)?;
        stop_point("attached");
        datapath::register(
            &conf.node,
            ip,
            EndpointValue {
                ifindex: wired.host_index,
                flags: 0,
                mac: wired.pod_mac,
                node_mac: wired.host_mac,
            },
        )?;
        Ok(wired)
    })();
    let wired = match wired {
        Ok(w) => w,
        Err(e) => {
            // Undo in reverse order; report the original error.
            let _ = datapath::unregister(&conf.node, ip);
            let _ = link::remove(&mut node, &plan.host);
            if let Ok(l) = store.lock() {
                let _ = l.release(&env.container_id, &env.ifname);
            }
            return Err(e);
        }
    };

    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: plan.host.clone(),
                mac: Some(fmt_mac(wired.host_mac)),
                mtu: Some(conf.mtu),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: Some(fmt_mac(wired.pod_mac)),
                mtu: Some(conf.mtu),
                sandbox: Some(ns.path().display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            version: None,
            address: format!("{ip}/32"),
            gateway: Some(ipam::gateway(range).to_string()),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(ipam::gateway(range).to_string()),
        }],
        dns: conf.dns.clone(),
    }
    .for_version(&conf.cni_version))
}

/// DEL: remove the endpoint, the veth and the reservation. Everything
/// already gone (netns, link, reservation, datapath) is success.
pub fn del(env: &CniEnv, conf: &Config) -> Result<(), CniError> {
    let store = Store::new(&conf.state_dir);
    // Never create state on DEL: no directory means no reservation.
    let ip = if store.exists() {
        store.lock()?.find(&env.container_id, &env.ifname)?
    } else {
        None
    };
    let mut node = Netlink::open().map_err(kernel("opening netlink"))?;
    let host = link::host_ifname(&env.container_id, &env.ifname);
    if let Some(ip) = ip {
        datapath::unregister(&conf.node, ip)?;
    } else if let Some(prev) = &conf.prev_result {
        // No reservation (lost, or released by GC): the prevResult still
        // names the address; remove its endpoint only if it points at our
        // own host veth, since the address may belong to someone else now.
        let host_index = node
            .link_by_name(&host)
            .map_err(kernel("reading links"))?
            .map(|l| l.header.index);
        for ip in prev.ips.iter().filter_map(|i| i.address.split('/').next()?.parse().ok()) {
            if let (Some(idx), Some(ep)) = (host_index, datapath::lookup(&conf.node, ip)?)
                && ep.ifindex == idx
            {
                datapath::unregister(&conf.node, ip)?;
            }
        }
    }
    link::remove(&mut node, &host)?;
    if ip.is_some() {
        store.lock()?.release(&env.container_id, &env.ifname)?;
    }
    Ok(())
}

/// CHECK: the attachment in `prevResult` is still exactly what ADD built.
pub fn check(env: &CniEnv, conf: &Config) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK requires prevResult"))?;
    let range = conf.pod_range()?;
    let store = Store::new(&conf.state_dir);
    let unknown = || {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "container {} has no address reserved for {} on node {}",
                env.container_id, env.ifname, conf.node
            ),
        )
    };
    if !store.exists() {
        return Err(unknown());
    }
    let ip = store
        .lock()?
        .find(&env.container_id, &env.ifname)?
        .ok_or_else(unknown)?;
    let failed = |msg: String| CniError::new(code::CHECK_FAILED, msg);
    let want = format!("{ip}/32");
    if !prev.ips.iter().any(|i| i.address == want) {
        return Err(failed(format!("prevResult does not list the reserved address {want}")));
    }
    let pod_mac = prev
        .interfaces
        .iter()
        .find(|i| i.name == env.ifname && i.sandbox.is_some())
        .and_then(|i| i.mac.as_deref())
        .and_then(parse_mac);
    let ns = open_netns(env)?;
    let mut pod = ns.netlink().map_err(kernel("opening netlink in the container's netns"))?;
    let mut node = Netlink::open().map_err(kernel("opening netlink"))?;
    let plan = plan(env, conf, range, ip);
    let wired = inspect::verify(&mut node, &mut pod, &inspect::Expect { plan: &plan, pod_mac })?.map_err(failed)?;
    let want_ep = EndpointValue {
        ifindex: wired.host_index,
        flags: 0,
        mac: wired.pod_mac,
        node_mac: wired.host_mac,
    };
    match datapath::lookup(&conf.node, ip)? {
        Some(v) if v == want_ep => Ok(()),
        Some(v) => Err(failed(format!("endpoint {ip} in the datapath is {v:?}, expected {want_ep:?}"))),
        None => Err(failed(format!("endpoint {ip} is missing from the datapath of node {}", conf.node))),
    }
}

/// STATUS: ready when the node has a pod range with a free address and its
/// datapath is loaded.
pub fn status(conf: &Config) -> Result<(), CniError> {
    let unavailable = |msg: String| CniError::new(code::NOT_AVAILABLE, msg);
    let range = conf.pod_range().map_err(|e| unavailable(format!("no pod range: {}", e.msg)))?;
    datapath::ready(&conf.node).map_err(|e| unavailable(e.to_string()))?;
    let store = Store::new(&conf.state_dir);
    if store.exists() {
        let used = store.lock()?.reservations()?.len();
        if u32::try_from(used).unwrap_or(u32::MAX) >= ipam::usable(range) {
            return Err(unavailable(format!(
                "pod range {range} is exhausted ({used} of {} addresses reserved)",
                ipam::usable(range)
            )));
        }
    }
    Ok(())
}

/// GC: release every attachment not in `cni.dev/valid-attachments`, and
/// sweep what a crash can leave without a record: host veths with our name
/// pattern and endpoints in the pod range with no reservation.
pub fn gc(conf: &Config) -> Result<(), CniError> {
    let valid: HashSet<Attachment> = conf.valid_attachments.iter().flatten().cloned().collect();
    let store = Store::new(&conf.state_dir);
    let mut node = Netlink::open().map_err(kernel("opening netlink"))?;
    // Hold the lock for the whole sweep: an ADD reserves before it creates
    // its veth, so no ADD can be between those steps while we look.
    let lock = if store.exists() { Some(store.lock()?) } else { None };
    let mut reserved: HashSet<Ipv4Addr> = HashSet::new();
    let mut keep_links: HashSet<String> = HashSet::new();
    if let Some(lock) = &lock {
        for r in lock.reservations()? {
            if valid.contains(&r.attachment()) {
                reserved.insert(r.ip);
                keep_links.insert(link::host_ifname(&r.container_id, &r.ifname));
                continue;
            }
            tracing::info!(container = %r.container_id, ifname = %r.ifname, ip = %r.ip, "gc: releasing");
            datapath::unregister(&conf.node, r.ip)?;
            link::remove(&mut node, &link::host_ifname(&r.container_id, &r.ifname))?;
            lock.release_ip(r.ip)?;
        }
    }
    for l in node.links().map_err(kernel("listing links"))? {
        let Some(name) = crate::netlink::link_name(&l) else { continue };
        if link::is_host_ifname(name) && !keep_links.contains(name) {
            tracing::info!(link = name, "gc: deleting orphan veth");
            node.del_link(l.header.index)
                .map_err(kernel("deleting an orphan veth"))?;
        }
    }
    if let (Ok(range), Some(mut eps)) = (conf.pod_range(), datapath::endpoints(&conf.node)?) {
        for (ip, v) in eps.list() {
            if range.contains(ip) && v.flags & EP_F_HOST == 0 && !reserved.contains(&ip) {
                tracing::info!(ip = %ip, "gc: removing orphan endpoint");
                eps.remove(ip).map_err(|e| CniError::from_chain(code::KERNEL, &e))?;
            }
        }
    }
    Ok(())
}

/// Crash-test hook: with `RIPTIDE_CNI_STOP_AT=<point>` the plugin stops
/// itself (SIGSTOP) at that point of ADD, so a test can SIGKILL it at a
/// known instant. Unset in normal operation; costs one getenv.
fn stop_point(point: &str) {
    if std::env::var_os("RIPTIDE_CNI_STOP_AT").is_some_and(|v| v == point) {
        // SAFETY: raise has no preconditions.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}
