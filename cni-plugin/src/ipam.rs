//! Address management for the node's pod range.
//!
//! Layout, like the reference `host-local` plugin: one file per reserved
//! address under `<stateDir>/ipam/`, named by the address and holding
//! `containerID\nifname`. Writers hold an exclusive `flock` on the directory,
//! write a temporary file, fsync it, rename it over the final name and fsync
//! the directory, so a crash at any instant leaves either no record or a
//! whole one (a leftover temporary file is garbage the next locked reader
//! removes). Allocation is round-robin from the last reserved address
//! (`last_reserved`, a hint written the same way but without fsync: losing
//! it only changes where the next search starts).

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use ipnetwork::Ipv4Network;

use crate::types::Attachment;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free address in {range} ({usable} usable, all reserved)")]
    Exhausted { range: Ipv4Network, usable: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The node side of every pod's default route: the range's first host
/// address.
pub fn gateway(range: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.network()).saturating_add(1))
}

/// First and last address handed to pods (skipping network, gateway and
/// broadcast). Only meaningful for prefixes up to /30 (config.rs checks).
fn pod_bounds(range: Ipv4Network) -> (u32, u32) {
    (
        u32::from(range.network()).saturating_add(2),
        u32::from(range.broadcast()).saturating_sub(1),
    )
}

/// How many addresses of `range` pods can get.
pub fn usable(range: Ipv4Network) -> u32 {
    let (first, last) = pod_bounds(range);
    last.saturating_add(1).saturating_sub(first)
}

/// Is `ip` one the allocator could hand out?
pub fn is_pod_address(range: Ipv4Network, ip: Ipv4Addr) -> bool {
    let (first, last) = pod_bounds(range);
    (first..=last).contains(&u32::from(ip))
}

/// The next free pod address after `last` (round-robin, wrapping), or the
/// first free one when `last` is unknown or outside the range.
pub fn next_free(range: Ipv4Network, reserved: &HashSet<Ipv4Addr>, last: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (first, end) = pod_bounds(range);
    if end < first {
        return None;
    }
    let n = end - first + 1;
    let start = match last {
        Some(l) if is_pod_address(range, l) => (u32::from(l) - first + 1) % n,
        _ => 0,
    };
    (0..n)
        .map(|i| Ipv4Addr::from(first + (start + i) % n))
        .find(|ip| !reserved.contains(ip))
}

/// One reservation on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

impl Reservation {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

const LAST_RESERVED: &str = "last_reserved";
const TMP_PREFIX: &str = ".tmp-";

/// The reservation directory of one node.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// `<state_dir>/ipam`; created on first use.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("ipam"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the directory lock, creating the directory if needed.
    pub fn lock(&self) -> Result<Locked<'_>> {
        fs::create_dir_all(&self.dir).map_err(io("creating IPAM directory", &self.dir))?;
        let fd = File::open(&self.dir).map_err(io("opening IPAM directory", &self.dir))?;
        loop {
            // SAFETY: flock on an fd we own; the lock dies with the fd.
            if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io("locking IPAM directory", &self.dir)(e));
            }
        }
        Ok(Locked { store: self, dir_fd: fd })
    }

    /// Does the directory exist at all (STATUS, read-only callers)?
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }
}

/// The store with its lock held (released on drop, when the fd closes).
pub struct Locked<'a> {
    store: &'a Store,
    dir_fd: File,
}

impl Locked<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.store.dir.join(name)
    }

    /// Every reservation. Leftover temporary files are removed: with the
    /// lock held no writer is live, so they are remains of a crash.
    pub fn reservations(&self) -> Result<Vec<Reservation>> {
        let dir = &self.store.dir;
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(io("listing IPAM directory", dir))? {
            let entry = entry.map_err(io("listing IPAM directory", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                let p = entry.path();
                fs::remove_file(&p).map_err(io("removing stale temporary file", &p))?;
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else { continue };
            let p = entry.path();
            let text = match fs::read_to_string(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading reservation", &p)(e)),
            };
            let mut lines = text.lines();
            let container_id = lines.next().unwrap_or_default().trim().to_owned();
            let ifname = lines.next().unwrap_or_default().trim().to_owned();
            out.push(Reservation {
                ip,
                container_id,
                ifname,
            });
        }
        Ok(out)
    }

    /// The address reserved for (container, ifname), if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .reservations()?
            .into_iter()
            .find(|r| r.is(container_id, ifname))
            .map(|r| r.ip))
    }

    /// Reserves an address for (container, ifname). A second ADD for the
    /// same attachment (a runtime retrying after a crash) gets the same
    /// address back: one reservation per attachment, never two.
    pub fn reserve(&self, range: Ipv4Network, container_id: &str, ifname: &str) -> Result<Ipv4Addr> {
        let all = self.reservations()?;
        if let Some(r) = all.iter().find(|r| r.is(container_id, ifname)) {
            return Ok(r.ip);
        }
        let taken: HashSet<Ipv4Addr> = all.iter().map(|r| r.ip).collect();
        let last = fs::read_to_string(self.path(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip = next_free(range, &taken, last).ok_or(Error::Exhausted {
            range,
            usable: usable(range),
        })?;
        self.write_atomic(&ip.to_string(), format!("{container_id}\n{ifname}").as_bytes(), true)?;
        // A hint only: failing to record it must not fail the reservation.
        if let Err(e) = self.write_atomic(LAST_RESERVED, ip.to_string().as_bytes(), false) {
            tracing::warn!(error = %e, "could not record the last reserved address");
        }
        Ok(ip)
    }

    /// Releases the reservation of (container, ifname); absent is success.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        let Some(ip) = self.find(container_id, ifname)? else {
            return Ok(None);
        };
        self.release_ip(ip)?;
        Ok(Some(ip))
    }

    /// Removes the record of `ip` and makes the removal durable.
    pub fn release_ip(&self, ip: Ipv4Addr) -> Result<()> {
        let p = self.path(&ip.to_string());
        match fs::remove_file(&p) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing reservation", &p)(e)),
        }
    }

    fn write_atomic(&self, name: &str, data: &[u8], durable: bool) -> Result<()> {
        let tmp = self.path(&format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        let fin = self.path(name);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("creating", &tmp))?;
            f.write_all(data).map_err(io("writing", &tmp))?;
            if durable {
                f.sync_all().map_err(io("syncing", &tmp))?;
            }
            fs::rename(&tmp, &fin).map_err(io("renaming into place", &fin))?;
            if durable {
                self.sync_dir()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn sync_dir(&self) -> Result<()> {
        self.dir_fd
            .sync_all()
            .map_err(io("syncing IPAM directory", &self.store.dir))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Network {
        riptide_cidr::parse("podCIDR", s).unwrap()
    }

    #[test]
    fn pod_addresses_skip_network_gateway_and_broadcast() {
        let c = net("10.42.7.0/24");
        assert_eq!(gateway(c), ip("10.42.7.1"));
        assert_eq!(usable(c), 253);
        assert!(is_pod_address(c, ip("10.42.7.2")) && is_pod_address(c, ip("10.42.7.254")));
        assert!(!is_pod_address(c, ip("10.42.7.1")) && !is_pod_address(c, ip("10.42.7.255")));
        assert_eq!(usable(net("10.42.7.0/30")), 1);
        assert_eq!(usable(net("10.42.7.0/31")), 0);
        assert_eq!(usable(net("255.255.255.255/32")), 0, "no overflow at the top of the space");
    }

    #[test]
    fn allocation_skips_reserved_and_wraps() {
        let c = net("10.42.0.0/29"); // pods .2 ..= .6
        let mut taken = HashSet::new();
        assert_eq!(next_free(c, &taken, None), Some(ip("10.42.0.2")));
        // Round-robin: after .4 comes .5, even though .2 is free.
        assert_eq!(next_free(c, &taken, Some(ip("10.42.0.4"))), Some(ip("10.42.0.5")));
        // Wraps from the last usable address to the first.
        assert_eq!(next_free(c, &taken, Some(ip("10.42.0.6"))), Some(ip("10.42.0.2")));
        taken.extend([ip("10.42.0.5"), ip("10.42.0.6")]);
        assert_eq!(next_free(c, &taken, Some(ip("10.42.0.4"))), Some(ip("10.42.0.2")));
        // A hint outside the range restarts at the beginning.
        assert_eq!(next_free(c, &taken, Some(ip("192.0.2.1"))), Some(ip("10.42.0.2")));
        taken.extend([ip("10.42.0.2"), ip("10.42.0.3"), ip("10.42.0.4")]);
        assert_eq!(next_free(c, &taken, None), None);
    }

    #[test]
    fn store_reserves_once_per_attachment_and_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let range = net("10.42.0.0/29");
        let l = store.lock().unwrap();
        let a = l.reserve(range, "c1", "eth0").unwrap();
        assert_eq!(l.reserve(range, "c1", "eth0").unwrap(), a, "same attachment, same address");
        let b = l.reserve(range, "c1", "eth1").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            fs::read_to_string(store.dir().join(a.to_string())).unwrap(),
            "c1\neth0"
        );
        assert_eq!(l.release("c1", "eth0").unwrap(), Some(a));
        assert_eq!(l.release("c1", "eth0").unwrap(), None, "release is idempotent");
        // Round-robin: the freed address is not reused right away.
        let c = l.reserve(range, "c2", "eth0").unwrap();
        assert_ne!(c, a);
    }

    #[test]
    fn exhaustion_is_an_error_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let range = net("10.42.0.0/30");
        let l = store.lock().unwrap();
        l.reserve(range, "c1", "eth0").unwrap();
        let before: Vec<_> = fs::read_dir(store.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        let e = l.reserve(range, "c2", "eth0").unwrap_err();
        assert!(e.to_string().contains("no free address in 10.42.0.0/30"), "{e}");
        let after: Vec<_> = fs::read_dir(store.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn crash_leftovers_are_ignored_and_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let l = store.lock().unwrap();
        // A writer killed before its rename leaves only a temporary file.
        fs::write(store.dir().join(".tmp-10.42.0.2-999"), "c9\neth0").unwrap();
        assert!(l.reservations().unwrap().is_empty());
        assert!(!store.dir().join(".tmp-10.42.0.2-999").exists());
    }

    #[test]
    fn concurrent_reservations_never_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let range = net("10.42.0.0/24");
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let store = store.clone();
                    s.spawn(move || {
                        (0..25)
                            .map(|i| store.lock().unwrap().reserve(range, &format!("c{t}-{i}"), "eth0").unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), 200);
        assert_eq!(store.lock().unwrap().reservations().unwrap().len(), 200);
    }
}
