//! A container's `securityContext`, applied to its process just before
//! exec: the capability bounding set (containerd's default set unless
//! `privileged`; `capabilities.drop`/`add`, `ALL` included), the user and
//! groups (`runAsUser`, `runAsGroup`, pod-level `fsGroup` and
//! `supplementalGroups`, `runAsNonRoot` checked), and no_new_privs for
//! `allowPrivilegeEscalation: false`.
//!
//! Only the bounding set is set: at exec a root process gets permitted and
//! effective = bounding set, a non-root one none (no file capabilities, no
//! ambient set), which is what runc + containerd give (ambient capabilities
//! for non-root users are not upstream either).
//!
//! Pods also get containerd 2's pod-network sysctls
//! ([`UNPRIVILEGED_SYSCTLS`]): every port and ping open to unprivileged
//! processes inside the pod's own network namespace, so `drop: [ALL]`
//! servers still bind :53 or :80.

use k8s_openapi::api::core::v1::{Container, Pod};

/// containerd's `enable_unprivileged_ports`/`enable_unprivileged_icmp`.
pub const UNPRIVILEGED_SYSCTLS: &[(&str, &str)] =
    &[("net.ipv4.ip_unprivileged_port_start", "0"), ("net.ipv4.ping_group_range", "0 2147483647")];

/// Capability numbers (linux/capability.h).
const CAPS: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

/// containerd's `oci.defaultUnixCaps()`.
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT",
    "KILL", "AUDIT_WRITE",
];

fn cap_bit(name: &str) -> Option<u64> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("CAP_").unwrap_or(&n);
    CAPS.iter().find(|(c, _)| *c == n).map(|(_, b)| 1u64 << b)
}

fn set_of(names: &[&str]) -> u64 {
    names.iter().filter_map(|n| cap_bit(n)).fold(0, |a, b| a | b)
}

/// What the process becomes before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// Capabilities kept in the bounding set (bit n = capability n).
    pub caps: u64,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Supplementary groups (set when any of uid, gid or these is).
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
}

fn id(v: Option<i64>, what: &str) -> Result<Option<u32>, String> {
    v.map(|v| u32::try_from(v).map_err(|_| format!("{what} {v} is not a valid id"))).transpose()
}

/// `securityContext.privileged: true`: all capabilities, and the node's
/// filesystem unmasked ([`super::mounts`]).
pub fn privileged(c: &Container) -> bool {
    c.security_context.as_ref().and_then(|s| s.privileged).unwrap_or(false)
}

/// The container's settings, or the `CreateContainerConfigError` message.
pub fn for_container(pod: &Pod, c: &Container) -> Result<Security, String> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let privileged = privileged(c);
    let mut caps = if privileged { u64::MAX } else { set_of(DEFAULT_CAPS) };
    if !privileged && let Some(cs) = csc.and_then(|s| s.capabilities.as_ref()) {
        for d in cs.drop.iter().flatten() {
            if d.eq_ignore_ascii_case("ALL") {
                caps = 0;
            } else {
                caps &= !cap_bit(d).ok_or_else(|| format!("unknown capability {d:?} in capabilities.drop"))?;
            }
        }
        for a in cs.add.iter().flatten() {
            if a.eq_ignore_ascii_case("ALL") {
                caps = u64::MAX;
            } else {
                caps |= cap_bit(a).ok_or_else(|| format!("unknown capability {a:?} in capabilities.add"))?;
            }
        }
    }
    let uid = id(csc.and_then(|s| s.run_as_user).or_else(|| psc.and_then(|s| s.run_as_user)), "runAsUser")?;
    let gid = id(csc.and_then(|s| s.run_as_group).or_else(|| psc.and_then(|s| s.run_as_group)), "runAsGroup")?;
    let non_root = csc.and_then(|s| s.run_as_non_root).or_else(|| psc.and_then(|s| s.run_as_non_root)).unwrap_or(false);
    if non_root && uid.is_none_or(|u| u == 0) {
        return Err(match uid {
            // The node's filesystem is the "image": its user is root.
            None => "container has runAsNonRoot and image will run as root (pod: riptide's kubelet runs images as root unless runAsUser is set)".into(),
            Some(_) => "container's runAsUser breaks non-root policy".into(),
        });
    }
    let mut groups = Vec::new();
    if let Some(g) = id(psc.and_then(|s| s.fs_group), "fsGroup")? {
        groups.push(g);
    }
    for g in psc.and_then(|s| s.supplemental_groups.clone()).into_iter().flatten() {
        groups.extend(id(Some(g), "supplementalGroups")?);
    }
    let escalation = csc.and_then(|s| s.allow_privilege_escalation).unwrap_or(true);
    Ok(Security { caps, uid, gid: gid.or(uid.map(|_| 0)), groups, no_new_privs: !escalation && !privileged })
}

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Applies `s` to the calling process. Runs between fork and exec: only
/// async-signal-safe syscalls, no allocation.
pub fn apply(s: &Security, last_cap: u32) -> std::io::Result<()> {
    let check = |r: libc::c_long| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain syscalls on values owned by this frame.
    unsafe {
        for cap in 0..=last_cap.min(63) {
            if s.caps & (1u64 << cap) == 0 {
                check(libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0).into())?;
            }
        }
        // Nothing inherited beyond the bounding set through exec.
        let _ = libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
        let mut data = [CapData::default(); 2];
        check(libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()))?;
        for d in &mut data {
            d.inheritable = 0;
        }
        check(libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()))?;
        // upstream: fsGroup and supplementalGroups are groups of the
        // container's user, root included.
        if s.uid.is_some() || s.gid.is_some() || !s.groups.is_empty() {
            check(libc::setgroups(s.groups.len(), s.groups.as_ptr()).into())?;
        }
        if let Some(g) = s.gid {
            check(libc::setresgid(g, g, g).into())?;
        }
        if let Some(u) = s.uid {
            check(libc::setresuid(u, u, u).into())?;
        }
        if s.no_new_privs {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> (Pod, Container) {
        let p: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).expect("pod");
        let c = p.spec.as_ref().expect("spec").containers[0].clone();
        (p, c)
    }

    #[test]
    fn capabilities_like_containerd() {
        let (p, c) = pod(serde_json::json!({"containers": [{"name": "c"}]}));
        let s = for_container(&p, &c).expect("ok");
        assert_eq!(s.caps, set_of(DEFAULT_CAPS));
        assert!(s.caps & cap_bit("NET_ADMIN").unwrap_or(0) == 0 && !s.no_new_privs && s.uid.is_none());
        // riptide-dns: drop ALL, add NET_BIND_SERVICE, no escalation.
        let (p, c) = pod(serde_json::json!({"containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": false, "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}}]}));
        let s = for_container(&p, &c).expect("ok");
        assert_eq!(s.caps, 1 << 10);
        assert!(s.no_new_privs);
        let (p, c) = pod(serde_json::json!({"containers": [{"name": "c", "securityContext": {"privileged": true, "capabilities": {"drop": ["ALL"]}}}]}));
        assert_eq!(for_container(&p, &c).expect("ok").caps, u64::MAX);
        let (p, c) = pod(serde_json::json!({"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["CAP_BPF"], "drop": ["KILL"]}}}]}));
        let s = for_container(&p, &c).expect("ok");
        assert!(s.caps & (1 << 39) != 0 && s.caps & (1 << 5) == 0);
        let (p, c) = pod(serde_json::json!({"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["FLY"]}}}]}));
        assert!(for_container(&p, &c).is_err());
    }

    #[test]
    fn users_and_groups() {
        let (p, c) = pod(serde_json::json!({"securityContext": {"runAsUser": 1000, "fsGroup": 2000, "supplementalGroups": [3000]},
            "containers": [{"name": "c", "securityContext": {"runAsGroup": 1500}}]}));
        let s = for_container(&p, &c).expect("ok");
        assert_eq!((s.uid, s.gid, s.groups.clone()), (Some(1000), Some(1500), vec![2000, 3000]));
        let (p, c) = pod(serde_json::json!({"securityContext": {"runAsNonRoot": true}, "containers": [{"name": "c"}]}));
        assert!(for_container(&p, &c).is_err());
        let (p, c) = pod(serde_json::json!({"securityContext": {"runAsNonRoot": true, "runAsUser": 7}, "containers": [{"name": "c"}]}));
        assert_eq!(for_container(&p, &c).expect("ok").gid, Some(0));
    }
}
