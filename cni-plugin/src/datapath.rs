//! The node's eBPF datapath as the plugin sees it: pins the agent created
//! under `/sys/fs/bpf/riptide/<node>/`. The plugin never loads programs; it
//! attaches the pinned `rt_from_pod` (tc ingress of the host veth: what the
//! pod sends) and `rt_to_pod` (tc egress: what the kernel routes into the
//! pod, for ingress NetworkPolicy) and writes `rt_ep4_v1`.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use riptide_common::{EndpointValue, names};
use riptide_datapath::endpoints::Endpoints;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("datapath of node {node} is not loaded: {} is missing (is riptide-agent running?)", path.display())]
    NotLoaded { node: String, path: PathBuf },
    #[error("node {node}: {action}")]
    Datapath {
        node: String,
        action: String,
        // Boxed: the datapath error is large and this is the cold path.
        #[source]
        source: Box<riptide_datapath::Error>,
    },
    #[error("attaching {prog} at tc {hook} of {ifname}")]
    Attach {
        prog: &'static str,
        hook: &'static str,
        ifname: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("adding clsact qdisc to {ifname}")]
    Qdisc {
        ifname: String,
        #[source]
        source: tc::TcError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The programs of a pod's host veth and the tc hook each goes to.
const VETH_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (names::PROG_FROM_POD, TcAttachType::Ingress, "ingress"),
    (names::PROG_TO_POD, TcAttachType::Egress, "egress"),
];

/// Where the pins of `node` are: (endpoint map, veth programs in
/// [`VETH_PROGRAMS`] order).
fn pins(node: &str) -> Result<(PathBuf, [PathBuf; 2])> {
    let dir = riptide_datapath::pin_dir(node).map_err(|source| Error::Datapath {
        node: node.to_owned(),
        action: "locating pins".into(),
        source: Box::new(source),
    })?;
    Ok((dir.join(names::EP4), VETH_PROGRAMS.map(|(name, _, _)| dir.join(name))))
}

/// Ok when every pin the plugin needs exists.
pub fn ready(node: &str) -> Result<()> {
    let (ep, progs) = pins(node)?;
    for path in std::iter::once(ep).chain(progs) {
        if !path.exists() {
            return Err(Error::NotLoaded {
                node: node.to_owned(),
                path,
            });
        }
    }
    Ok(())
}

/// The endpoint map, or `None` when the node's datapath is gone (DEL and GC
/// then have nothing to remove from it).
pub fn endpoints(node: &str) -> Result<Option<Endpoints<aya::maps::MapData>>> {
    let (ep, _) = pins(node)?;
    if !ep.exists() {
        return Ok(None);
    }
    Endpoints::open_pinned(node)
        .map(Some)
        .map_err(|source| Error::Datapath {
            node: node.to_owned(),
            action: format!("opening {}", ep.display()),
            source: Box::new(source),
        })
}

pub fn register(node: &str, ip: Ipv4Addr, value: EndpointValue) -> Result<()> {
    let mut eps = endpoints(node)?.ok_or_else(|| Error::NotLoaded {
        node: node.to_owned(),
        path: pins(node).map(|p| p.0).unwrap_or_default(),
    })?;
    eps.upsert(ip, value).map_err(|source| Error::Datapath {
        node: node.to_owned(),
        action: format!("writing endpoint {ip}"),
        source: Box::new(source),
    })
}

/// Removes `ip` from the endpoint map; absent map or entry is success.
pub fn unregister(node: &str, ip: Ipv4Addr) -> Result<()> {
    let Some(mut eps) = endpoints(node)? else {
        return Ok(());
    };
    // aya reports deleting an absent key as a syscall error (ENOENT), which
    // `Endpoints::remove` does not treat as absent: look first.
    let present = eps.get(ip).map_err(|source| Error::Datapath {
        node: node.to_owned(),
        action: format!("reading endpoint {ip}"),
        source: Box::new(source),
    })?;
    if present.is_none() {
        return Ok(());
    }
    eps.remove(ip).map_err(|source| Error::Datapath {
        node: node.to_owned(),
        action: format!("removing endpoint {ip}"),
        source: Box::new(source),
    })
}

pub fn lookup(node: &str, ip: Ipv4Addr) -> Result<Option<EndpointValue>> {
    let Some(eps) = endpoints(node)? else {
        return Ok(None);
    };
    eps.get(ip).map_err(|source| Error::Datapath {
        node: node.to_owned(),
        action: format!("reading endpoint {ip}"),
        source: Box::new(source),
    })
}

/// Attaches the pinned `rt_from_pod` at tc ingress and `rt_to_pod` at tc
/// egress of `ifname` (a fresh host-side veth, in the calling thread's
/// namespace).
///
/// Attached through netlink (clsact + cls_bpf), not a TCX link: a netlink
/// filter belongs to the device and lives exactly as long as the veth, so
/// the plugin can exit right after ADD and a crash can never leave a pinned
/// link behind. TCX links would die with this process unless pinned.
pub fn attach(node: &str, ifname: &str) -> Result<()> {
    let (_, prog_paths) = pins(node)?;
    tc::qdisc_add_clsact(ifname).map_err(|source| Error::Qdisc {
        ifname: ifname.to_owned(),
        source,
    })?;
    for ((name, hook, hook_name), path) in VETH_PROGRAMS.into_iter().zip(prog_paths) {
        let attach_err = |source| Error::Attach {
            prog: name,
            hook: hook_name,
            ifname: ifname.to_owned(),
            source,
        };
        let mut prog = SchedClassifier::from_pin(&path).map_err(attach_err)?;
        let id = prog
            .attach_with_options(
                ifname,
                hook,
                TcAttachOptions::Netlink(NlOptions {
                    priority: 1,
                    ..NlOptions::default()
                }),
            )
            .map_err(attach_err)?;
        // Dropping the link (or the program holding it) would detach the
        // filter; the filter must outlive this process, so forget the handle.
        let link = prog.take_link(id).map_err(attach_err)?;
        std::mem::forget(link);
    }
    Ok(())
}
