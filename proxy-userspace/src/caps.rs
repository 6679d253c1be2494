//! Linux capabilities: which ones each mode needs (what kpr's DaemonSet grants instead of
//! `privileged`), a start-time check that names a missing one, and the helper the tests use
//! to run every agent with only these.
//!
//! Found by running the whole test suite (the ebpf, iptables and nftables modes on 6.18, all
//! modes but nftables on 6.1 in the VM) with every agent limited to [`AGENT`] (the bounding set
//! of a root process: what the DaemonSet's `capabilities: {drop: [ALL], add: [...]}` gives),
//! and by taking each one away:
//! - `NET_ADMIN`: netlink (nftables, IPVS, conntrack, links, addresses), iptables, TC
//!   attachment, cgroup attachment, network sysctls, `SOCK_DESTROY`. Every mode.
//! - `BPF`: creating maps, loading programs, opening pinned objects. The ebpf mode.
//! - `SYS_ADMIN` and `SYS_PTRACE`: finding the connected UDP sockets of a removed backend
//!   means reading other processes' `/proc/<pid>/ns/net` (ptrace access: pods' processes may
//!   hold capabilities the agent does not) and entering those namespaces (`setns`); without
//!   them such sockets are not terminated (logged) and everything else works. `SYS_ADMIN`
//!   also mounts a bpffs of kpr's own (`--allow-private-bpffs`).
//! - `NET_RAW`: iptables (legacy and nft) probes match and target revisions through a raw
//!   socket; without it, on a kernel whose netfilter is modular (Debian's 6.1), rules with
//!   `-m set`, MASQUERADE and REJECT are not installed. The rule modes.
//! - `SYS_RESOURCE`: `oom_score_adj` -999, as kube-proxy; best effort.
//! - Not needed: `PERFMON` (the verifier accepts the programs without it on 6.1 and 6.18),
//!   `DAC_OVERRIDE`. `SYS_MODULE` only for the ipvs mode on a node that does not load
//!   `ip_vs` at boot: kpr runs `modprobe ip_vs` as upstream does (whose DaemonSet is privileged
//!   for that); the schedulers' modules the kernel loads by itself.
use std::fmt::Write as _;

use crate::render::ProxyMode;

/// (name, number) of the capabilities kpr uses.
pub const KNOWN: [(&str, u32); 8] = [
    ("net_admin", 12),
    ("net_raw", 13),
    ("sys_module", 16),
    ("sys_admin", 21),
    ("sys_resource", 24),
    ("perfmon", 38),
    ("bpf", 39),
    ("sys_ptrace", 19),
];

/// What the agent needs whatever the mode (the DaemonSet's set).
pub const AGENT: [(&str, u32); 6] = [
    ("net_admin", 12),
    ("net_raw", 13),
    ("sys_ptrace", 19),
    ("sys_admin", 21),
    ("sys_resource", 24),
    ("bpf", 39),
];

/// The capabilities `mode` cannot start without.
#[must_use]
pub fn required(mode: ProxyMode) -> &'static [(&'static str, u32)] {
    match mode {
        ProxyMode::Ebpf => &[("net_admin", 12), ("bpf", 39)],
        ProxyMode::Nftables => &[("net_admin", 12)],
        ProxyMode::Iptables | ProxyMode::Ipvs => &[("net_admin", 12), ("net_raw", 13)],
    }
}

/// A capability's number by name (`net_admin`, `CAP_NET_ADMIN`).
#[must_use]
pub fn number(name: &str) -> Option<u32> {
    let n = name.to_ascii_lowercase();
    let n = n.strip_prefix("cap_").unwrap_or(&n);
    KNOWN.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
}

/// This process's effective capabilities (`CapEff` of /proc/self/status); None if unreadable.
#[must_use]
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The capabilities of `mode` this process lacks, as `CAP_*` names (empty when it has them,
/// or when they cannot be read).
#[must_use]
pub fn missing(mode: ProxyMode) -> Vec<String> {
    let Some(eff) = effective() else {
        return Vec::new();
    };
    required(mode)
        .iter()
        .filter(|(_, n)| eff & (1u64 << n) == 0)
        .map(|(name, _)| format!("CAP_{}", name.to_ascii_uppercase()))
        .collect()
}

/// A clear error when this process lacks a capability `mode` needs.
///
/// # Errors
/// The missing capabilities, and how to grant them.
pub fn check(mode: ProxyMode) -> crate::Result<()> {
    let missing = missing(mode);
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "the {mode} mode needs the capabilities {} and this process lacks them: ",
        missing.join(", ")
    );
    let _ = write!(
        msg,
        "in a DaemonSet add them under securityContext.capabilities.add (kpr's deploy/kpr.yaml lists what every mode needs), or run as root"
    );
    Err(crate::Error::Unsupported(msg))
}

/// Drops every capability but `keep` from the bounding set (and clears the ambient set), so
/// a root process exec'd next has only `keep`. For a forked child before exec (tests).
pub fn limit_bounding_set(keep: &[u32]) {
    for cap in 0..64u32 {
        if !keep.contains(&cap) {
            // SAFETY: prctl with integer arguments; EINVAL past the kernel's last capability.
            unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0);
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sets() {
        assert_eq!(number("CAP_BPF"), Some(39));
        assert_eq!(number("net_admin"), Some(12));
        assert_eq!(number("nope"), None);
        for mode in [
            ProxyMode::Ebpf,
            ProxyMode::Iptables,
            ProxyMode::Nftables,
            ProxyMode::Ipvs,
        ] {
            for (name, n) in required(mode) {
                assert!(
                    AGENT.contains(&(name, *n)),
                    "{mode}: {name} is in the agent's set"
                );
            }
        }
    }
}
