//! riptide on node 2 of `topo.rs`, for the DSR paths: the uplink's tc
//! programs on node 2's `eth0` and the pod as a local endpoint, so a
//! packet carrying the DSR option is taken (the option stripped, the
//! reply entry recorded) and delivered into the pod with
//! `bpf_redirect_peer`, and the pod's replies leave `eth0` with the
//! frontend as source, straight to the client. Unpinned, as `node1.rs`.
//! Shared by `pps_bench` and the netns test `kernel_netns_xdp_nodeport`.

use anyhow::{Context as _, Result};
use riptide_common::{Config, EndpointValue};
use riptide_datapath::{Attachment, Datapath, Pinning};
use riptide_test_support::netns;

use super::topo::{NODE2_IP, POD_HOST_MAC, POD_IP, POD_MAC};

pub struct Riptide {
    pub dp: Datapath,
    tc: Option<Attachment>,
}

impl Riptide {
    /// Loads the datapath as node 2's agent would (its address, the SNAT
    /// port range) with the pod behind `pod0` as its endpoint, as the CNI
    /// adds it; `ns` is node 2's namespace.
    pub fn load(ns: &str) -> Result<Self> {
        let name = ns.to_owned();
        netns::run_in(ns, move || -> Result<Self> {
            let mut dp = Datapath::load(&Pinning::None).context("loading node 2's datapath")?;
            dp.set_config(&Config {
                node_ip_be: u32::from(NODE2_IP).to_be(),
                snat_port_min: 32768,
                snat_port_max: 60999,
                ..Default::default()
            })?;
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"pod0".as_ptr()) };
            anyhow::ensure!(
                ifindex != 0,
                "pod0 in {name}: {}",
                std::io::Error::last_os_error()
            );
            dp.endpoints()?.upsert(
                POD_IP,
                EndpointValue {
                    ifindex,
                    flags: 0,
                    mac: POD_MAC,
                    node_mac: POD_HOST_MAC,
                },
            )?;
            Ok(Self { dp, tc: None })
        })
    }

    /// Attaches (`on`) or detaches the uplink's tc programs on node 2's
    /// `eth0`; `ns` is node 2's namespace.
    pub fn set(mut self, ns: &str, on: bool) -> Result<Self> {
        if !on {
            // Closing the tcx links detaches them.
            self.tc = None;
            return Ok(self);
        }
        netns::run_in(ns, move || -> Result<Self> {
            if self.tc.is_none() {
                self.tc = Some(self.dp.attach_uplink("eth0")?);
            }
            Ok(self)
        })
    }
}
