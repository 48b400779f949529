//! Loading the object: maps pinned per node (reused when present, so a
//! restarted agent keeps their contents), every program verified and pinned.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier},
};
use riptide_common::{PIN_ROOT, names};

use crate::{
    Error, Result,
    bpffs::ensure_bpffs,
    endpoints,
    map_sizes::MapSizes,
    pins::{create_pin_dir, remove_if_exists},
    upgrade::{self, Upgrade},
};

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/riptide"));

/// Where a loaded datapath keeps its pins.
#[derive(Debug, Clone)]
pub enum Pinning {
    /// Maps and programs pinned under the node's directory; reused if present.
    Node(String),
    /// Nothing pinned: a private copy, for BPF_PROG_TEST_RUN tests and benches.
    None,
}

/// The loaded programs and maps of one node.
pub struct Datapath {
    // The crate's map and attach modules extend Datapath with their own
    // impl blocks; they reach the object through this field.
    pub(crate) ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    upgrade: Upgrade,
}

impl Datapath {
    /// Loads the object, reusing pinned maps of `pinning` when they exist, and
    /// loads (verifies) every program.
    pub fn load(pinning: &Pinning) -> Result<Self> {
        Self::load_sized(pinning, &MapSizes::default())
    }

    /// [`Datapath::load`] with the map sizes of `sizes` (checked when they
    /// were set). Only maps created by this load take them: a map reused
    /// from a pin keeps the size it was created with.
    pub fn load_sized(pinning: &Pinning, sizes: &MapSizes) -> Result<Self> {
        let max_entries: Vec<(&str, u32)> = sizes.overrides().collect();
        let max_entries = max_entries.as_slice();
        let (node, pin_dir) = match pinning {
            Pinning::Node(node) => (node.clone(), Some(create_pin_dir(node)?)),
            Pinning::None => (String::new(), None),
        };
        let ebpf = match &pin_dir {
            Some(dir) => sized_loader(max_entries)
                .default_map_pin_directory(dir)
                .load(EBPF_OBJECT)
                .map_err(|source| Error::Load {
                    node,
                    source: Box::new(source),
                })?,
            None => load_private(EBPF_OBJECT, max_entries)?,
        };
        let mut dp = Self {
            ebpf,
            pin_dir,
            upgrade: Upgrade::default(),
        };
        if let Some(dir) = dp.pin_dir.clone() {
            dp.upgrade = upgrade::run(&dir, &mut dp.ebpf)?;
            // Pinned endpoint entries of an earlier run (or of a version
            // that did not count them) must be counted before a program
            // that reads the counts is pinned for the CNI to attach.
            dp.policy()?.recount_endpoints()?;
        }
        dp.load_programs()?;
        Ok(dp)
    }

    fn load_programs(&mut self) -> Result<()> {
        for name in CLASSIFIERS {
            let prog = self.classifier(name)?;
            load_retrying(name, || prog.load())?;
        }
        for name in SOCK_PROGRAMS {
            let prog = self.sock_addr(name)?;
            load_retrying(name, || prog.load())?;
        }
        let prog = self.xdp(names::PROG_XDP_NET)?;
        load_retrying(names::PROG_XDP_NET, || prog.load())?;
        if let Some(dir) = self.pin_dir.clone() {
            for name in names::ALL_PROGRAMS {
                let path = dir.join(name);
                // Replace an older pin so the CNI always attaches the program
                // that matches the maps loaded now.
                remove_if_exists(&path)?;
                let prog = self
                    .ebpf
                    .program_mut(name)
                    .ok_or(Error::MissingProgram { name })?;
                prog.pin(&path).map_err(|e| Error::Io {
                    action: "pinning program at",
                    path,
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
        }
        Ok(())
    }

    /// A cgroup sock_addr (socket LB) program by name.
    pub fn sock_addr(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr> {
        self.program(name, "is not a cgroup sock_addr program")
    }

    /// The XDP program by name ([`names::PROG_XDP_NET`]).
    pub fn xdp(&mut self, name: &'static str) -> Result<&mut aya::programs::Xdp> {
        self.program(name, "is not an XDP program")
    }

    /// A tc program by name ([`names::PROG_FROM_POD`], …).
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.program(name, "is not a tc classifier")
    }

    /// Program `name` as the type `T` it is expected to be; `wrong_type`
    /// says what it is not when it is something else.
    fn program<'a, T>(&'a mut self, name: &'static str, wrong_type: &'static str) -> Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { name })?
            .try_into()
            .map_err(|source| Error::Program {
                name,
                action: wrong_type,
                source,
            })
    }

    /// The endpoint map, for reading and writing local pods.
    pub fn endpoints(&mut self) -> Result<endpoints::Endpoints<&mut aya::maps::MapData>> {
        let map = self
            .ebpf
            .map_mut(names::EP4)
            .ok_or(Error::MissingMap { name: names::EP4 })?;
        endpoints::Endpoints::new(map)
    }

    /// What this load took over from pins of an earlier version.
    pub fn upgrade(&self) -> &Upgrade {
        &self.upgrade
    }

    /// The node's pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// tc programs in the object.
const CLASSIFIERS: [&str; 4] = [
    names::PROG_FROM_POD,
    names::PROG_FROM_NET,
    names::PROG_TO_NET,
    names::PROG_TO_POD,
];
/// Socket-LB programs in the object.
pub(crate) const SOCK_PROGRAMS: [&str; 4] = [
    names::PROG_SOCK_CONNECT4,
    names::PROG_SOCK_SENDMSG4,
    names::PROG_SOCK_RECVMSG4,
    names::PROG_SOCK_GETPEERNAME4,
];

/// How often a program load is tried while BPF_PROG_LOAD says EAGAIN: the
/// verifier gives up with EAGAIN when a signal is pending (`do_check()` checks
/// `signal_pending(current)`), which says nothing about the program. libbpf
/// retries the same way (`PROG_LOAD_ATTEMPTS` in `bpf.c`).
const PROG_LOAD_ATTEMPTS: u32 = 5;

/// Runs `load` until it succeeds, fails with something other than EAGAIN, or
/// has been tried [`PROG_LOAD_ATTEMPTS`] times. aya leaves a program unloaded
/// when BPF_PROG_LOAD fails, so calling `load` again is a fresh attempt.
fn load_retrying(
    name: &'static str,
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN)
                    && attempt < PROG_LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            done => {
                return done.map_err(|source| Error::Program {
                    name,
                    action: "loading (verifier)",
                    source,
                });
            }
        }
    }
}

/// Loads `object` with maps private to this load. The maps are declared
/// pinned-by-name, so aya pins them somewhere; a fresh directory that is
/// removed right after loading keeps them private (the fds keep them alive).
pub(crate) fn load_private(object: &[u8], max_entries: &[(&str, u32)]) -> Result<Ebpf> {
    ensure_bpffs()?;
    let dir = Path::new(PIN_ROOT).join(format!("private-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        action: "creating private pin directory",
        path: dir.clone(),
        source,
    })?;
    let loaded = sized_loader(max_entries)
        .default_map_pin_directory(&dir)
        .load(object);
    let _ = std::fs::remove_dir_all(&dir);
    loaded.map_err(|source| Error::Load {
        node: String::from("(unpinned)"),
        source: Box::new(source),
    })
}

fn sized_loader<'a>(max_entries: &[(&'a str, u32)]) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for (name, size) in max_entries {
        loader.map_max_entries(name, *size);
    }
    loader
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya::programs::ProgramError;

    use super::*;

    fn load_error(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        }
    }

    /// Calls `load_retrying` with a load that fails with `errnos` in turn and
    /// then succeeds; returns the result and how often it was called.
    fn run(errnos: &[i32]) -> (Result<()>, usize) {
        let mut calls = 0;
        let r = load_retrying("rt_test", || {
            calls += 1;
            match errnos.get(calls - 1) {
                Some(&e) => Err(load_error(e)),
                None => Ok(()),
            }
        });
        (r, calls)
    }

    #[test]
    fn eagain_is_retried_until_the_load_succeeds() {
        let (r, calls) = run(&[libc::EAGAIN; 4]);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(calls, 5);
    }

    #[test]
    fn eagain_gives_up_after_the_last_attempt() {
        let (r, calls) = run(&[libc::EAGAIN; 9]);
        assert_eq!(calls, PROG_LOAD_ATTEMPTS as usize);
        assert!(
            matches!(
                r,
                Err(Error::Program {
                    name: "rt_test",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn other_errors_are_not_retried() {
        let (r, calls) = run(&[libc::EACCES, libc::EAGAIN]);
        assert_eq!(calls, 1);
        assert!(r.is_err());
    }
}
