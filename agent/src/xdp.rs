//! XDP NodePort acceleration on the uplink (`--xdp`, ConfigMap key `xdp`:
//! `native`, `generic` or `disabled`, the default: on a veth uplink XDP
//! also needs an XDP program on the peer and full checksums from the
//! senders, which the agent cannot arrange; see `riptide_datapath::xdp`
//! and `ebpf/README.md`, "Turning XDP on safely").
//!
//! At start the agent attaches `rt_xdp_net` next to the uplink's tc
//! programs (or, `disabled`, removes a link an earlier run pinned). A
//! driver without native XDP gets generic mode, logged as a warning and
//! shown in `riptide status`. When the settings come from a ConfigMap
//! directory, [`watch`] re-reads its `xdp` file and switches the program
//! on, off or between modes live: it attaches the program the loader
//! pinned, so it needs nothing from the running datapath. NodePort & co
//! keep working through tc while XDP changes (XDP only accelerates).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use riptide_datapath::{
    Datapath,
    xdp::{XdpAttached, XdpSetting, attach_pinned_xdp},
};

/// How often the ConfigMap file is read (kubelet updates ConfigMap volumes
/// within about a minute anyway).
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// The `riptide status` line for an attach result.
pub fn describe(uplink: &str, r: Option<&XdpAttached>) -> String {
    match r {
        None => format!("xdp:{uplink} (disabled)"),
        Some(XdpAttached {
            mode,
            fell_back: None,
            ..
        }) => format!("xdp:{uplink} ({mode})"),
        Some(XdpAttached {
            mode,
            fell_back: Some(why),
            ..
        }) => format!("xdp:{uplink} ({mode}; native refused: {why})"),
    }
}

/// Attaches (or detaches) at start with the agent's own datapath.
pub fn attach(
    dp: &mut Datapath,
    uplink: &str,
    setting: XdpSetting,
    links_dir: &Path,
) -> Result<String, riptide_datapath::Error> {
    let r = dp.attach_xdp(uplink, setting, links_dir)?;
    report(uplink, r.as_ref());
    Ok(describe(uplink, r.as_ref()))
}

fn report(uplink: &str, r: Option<&XdpAttached>) {
    match r {
        Some(XdpAttached {
            fell_back: Some(why),
            ..
        }) => {
            tracing::warn!(uplink, reason = %why, "XDP: native mode refused, attached in generic mode")
        }
        Some(a) => tracing::info!(uplink, mode = %a.mode, "XDP attached"),
        None => tracing::info!(uplink, "XDP disabled"),
    }
}

/// The `xdp` value in `file`, `None` when the file is absent or invalid
/// (logged).
fn read_setting(file: &Path) -> Option<XdpSetting> {
    let text = std::fs::read_to_string(file).ok()?;
    match text.parse() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring the xdp setting");
            None
        }
    }
}

/// Applies changes of the ConfigMap's `xdp` key live; `current` is what
/// the agent attached at start. Runs until the process exits.
pub fn watch(
    file: PathBuf,
    pin_dir: PathBuf,
    links_dir: PathBuf,
    uplink: String,
    mut current: XdpSetting,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tick.tick().await;
            let Some(want) = read_setting(&file) else {
                continue;
            };
            if want == current {
                continue;
            }
            let (p, l, u) = (pin_dir.clone(), links_dir.clone(), uplink.clone());
            let r = tokio::task::spawn_blocking(move || attach_pinned_xdp(&p, &u, want, &l)).await;
            match r {
                Ok(Ok(a)) => {
                    report(&uplink, a.as_ref());
                    current = want;
                }
                Ok(Err(e)) => tracing::error!(uplink, setting = %want, error = %e, "switching XDP"),
                Err(e) => tracing::error!(error = %e, "XDP switch task"),
            }
        }
    })
}
