//! riptide on node 1 of `topo.rs`, loaded the way the agent loads it but
//! unpinned (nothing under /sys/fs/bpf; everything goes with the process):
//! the datapath, its Service writer, and what is attached to `eth0` now.
//! Shared by `pps_bench` and the netns test `kernel_netns_xdp_nodeport`.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::programs::{XdpMode, xdp::XdpLinkId};
use riptide_common::{Config, names};
use riptide_datapath::{Attachment, Datapath, Pinning, service::Services};
use riptide_test_support::netns;

use super::topo::{NODE1_IP, NODE2_IP};

pub struct Riptide {
    pub dp: Datapath,
    pub svcs: Services,
    tc: Option<Attachment>,
    xdp: Option<XdpLinkId>,
}

impl Riptide {
    /// Loads and configures the datapath as node 1's agent would (its
    /// address, the cluster CIDR, the SNAT port range, node 2's pod CIDR).
    /// Call inside node 1's namespace.
    pub fn load() -> Result<Self> {
        let mut dp = Datapath::load(&Pinning::None).context("loading the datapath")?;
        dp.set_config(&Config {
            node_ip_be: u32::from(NODE1_IP).to_be(),
            cluster_cidr_be: u32::from(Ipv4Addr::new(10, 42, 0, 0)).to_be(),
            cluster_cidr_len: 16,
            snat_port_min: 32768,
            snat_port_max: 60999,
            ..Default::default()
        })?;
        dp.upsert_node(Ipv4Addr::new(10, 42, 2, 0), 24, NODE2_IP)?;
        let svcs = dp.services()?;
        Ok(Self {
            dp,
            svcs,
            tc: None,
            xdp: None,
        })
    }

    /// Attaches or detaches the uplink's tc programs and `rt_xdp_net`
    /// (native) on node 1's `eth0`; `ns` is node 1's namespace, where the
    /// device name resolves.
    pub fn set(mut self, ns: &str, tc: bool, xdp: bool) -> Result<Self> {
        if !xdp && let Some(id) = self.xdp.take() {
            self.dp.xdp(names::PROG_XDP_NET)?.detach(id)?;
        }
        if !tc {
            // Closing the tcx links detaches them.
            self.tc = None;
        }
        netns::run_in(ns, move || -> Result<Self> {
            if tc && self.tc.is_none() {
                self.tc = Some(self.dp.attach_uplink("eth0")?);
            }
            if xdp && self.xdp.is_none() {
                let id = self
                    .dp
                    .xdp(names::PROG_XDP_NET)?
                    .attach("eth0", XdpMode::Driver)
                    .context("attaching rt_xdp_net natively to node 1's eth0")?;
                self.xdp = Some(id);
            }
            Ok(self)
        })
    }
}
