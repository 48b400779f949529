//! riptide's per-node agent: turns the cluster's Services, EndpointSlices,
//! Nodes and local Pods into datapath map entries and node routes, and
//! serves what it did to operators (metrics, health, a local API for the
//! `riptide` CLI). See README.md for the design.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod api;
pub mod cli;
pub mod config_dir;
pub mod events;
pub mod gc;
pub mod health;
pub mod install;
pub mod kube_events;
pub mod l2announce;
pub mod lb_algorithm;
pub mod lb_mode;
pub mod map_usage;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod podcidr;
pub mod policy;
pub mod policy_sync;
pub mod reconcile;
pub mod reserved;
pub mod routes;
pub mod shared;
pub mod slim;
pub mod sockdiag;
pub mod source_ranges;
pub mod store;
pub mod to_pod;
pub mod tunnel;
pub mod views;
pub mod watch;
pub mod xdp;
