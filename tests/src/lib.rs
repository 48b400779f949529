//! The lab: a local multi-node cluster in network namespaces, and the
//! helpers the end-to-end suites share (see `lab` and `netns`).
//!
//! Topology of a lab with prefix `P` and subnet index `S`:
//!
//! ```text
//!  root netns ── P0 (198.18.S.1/24, forwarding off) ──┐
//!                                                      │ veth
//!  netns P-ul:  br0 ── cp ┘ ── n1 ── n2 ── … ── out
//!                        │      │            │
//!  netns P-n1: eth0 198.18.S.11 │   netns P-out: eth0 198.18.S.100
//!  netns P-n2: eth0 198.18.S.12 ┘
//! ```
//!
//! The only thing in the root namespace is the `P0` veth, so that the
//! control plane (which runs in the root namespace) is reachable from the
//! nodes and kubectl can reach it. IPv4 forwarding is disabled on it, and
//! nodes have no default route, so nothing from the lab can leave the
//! machine.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod bench;
pub mod e2e;
pub mod lab;
pub mod lab_vm;
pub mod manifests;
pub mod netexec;
pub mod netpol;
pub mod netns;
