//! The device cgroup of a container that is not privileged: which device
//! nodes its processes may create and open. The rules are runc's default
//! (`AllowedDevices` in `libcontainer/specconv/spec_linux.go`), which is
//! what containerd's CRI leaves an unprivileged container with (its spec
//! denies every device, runc appends these):
//!
//! - mknod of any character or block device (`c *:* m`, `b *:* m`): the
//!   node can be made (`CAP_MKNOD` is a default capability) but not opened
//!   unless a rule below allows it;
//! - read, write and mknod of `/dev/null` (1:3), `/dev/zero` (1:5),
//!   `/dev/full` (1:7), `/dev/random` (1:8), `/dev/urandom` (1:9),
//!   `/dev/tty` (5:0), `/dev/ptmx` (5:2) and the pseudo-terminals
//!   (136:*).
//!
//! Everything else is denied: the node's disks (`/dev/vda`), `/dev/mem`
//! (1:1), `/dev/kmsg` (1:11), `/dev/console` (5:1), `/dev/net/tun`
//! (10:200, dropped from runc's list in 1.2), `/dev/fuse`. The kernel asks
//! the program on mknod(2) and on open(2) of a device node
//! (`devcgroup_check_permission()`); the access bits of one request must
//! all be allowed by one rule, as in runc's generated filter
//! (`libcontainer/cgroups/devices/devicefilter.go`).

use aya_ebpf::{
    bindings::{
        BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE, BPF_DEVCG_DEV_BLOCK,
        BPF_DEVCG_DEV_CHAR,
    },
    programs::DeviceContext,
};

/// Return values of a cgroup device program.
pub const DEV_ALLOW: i32 = 1;
pub const DEV_DENY: i32 = 0;

/// Any minor number of a major.
const ANY: u32 = u32::MAX;
const RWM: u32 = BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE | BPF_DEVCG_ACC_MKNOD;

/// Character devices a container may read, write and create: (major,
/// minor or [`ANY`]).
const CHAR_RWM: [(u32, u32); 8] = [
    (1, 3),     // /dev/null
    (1, 5),     // /dev/zero
    (1, 7),     // /dev/full
    (1, 8),     // /dev/random
    (1, 9),     // /dev/urandom
    (5, 0),     // /dev/tty
    (5, 2),     // /dev/ptmx
    (136, ANY), // /dev/pts/*
];

/// The verdict for one request. Nothing here can fail (no map, no packet
/// to parse), so there is no error path to choose a verdict for.
#[inline(always)]
pub fn judge(ctx: &DeviceContext) -> i32 {
    let dev = ctx.device;
    // SAFETY: the kernel hands the program a valid `bpf_cgroup_dev_ctx`.
    // One 4-byte load per field: the verifier rejects wider context loads
    // (`cgroup_dev_is_valid_access()`), which the compiler may otherwise
    // merge two fields into.
    let (access_type, major, minor) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*dev).access_type),
            core::ptr::read_volatile(&raw const (*dev).major),
            core::ptr::read_volatile(&raw const (*dev).minor),
        )
    };
    verdict(access_type, major, minor)
}

/// `access_type` is the kernel's: the device type in the low 16 bits, the
/// access (mknod/read/write bits) in the high 16.
#[inline(always)]
fn verdict(access_type: u32, major: u32, minor: u32) -> i32 {
    let ty = access_type & 0xffff;
    let access = access_type >> 16;
    if access == 0 || access & !RWM != 0 {
        return DEV_DENY;
    }
    if ty != BPF_DEVCG_DEV_CHAR && ty != BPF_DEVCG_DEV_BLOCK {
        return DEV_DENY;
    }
    // `c *:* m`, `b *:* m`.
    if access == BPF_DEVCG_ACC_MKNOD {
        return DEV_ALLOW;
    }
    if ty != BPF_DEVCG_DEV_CHAR {
        return DEV_DENY;
    }
    let mut i = 0;
    while i < CHAR_RWM.len() {
        let (ma, mi) = CHAR_RWM[i];
        if major == ma && (mi == ANY || minor == mi) {
            return DEV_ALLOW;
        }
        i += 1;
    }
    DEV_DENY
}
