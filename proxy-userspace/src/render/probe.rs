//! What this kernel offers, and which mode `--proxy-mode auto` picks from it.
//!
//! `auto` picks `ebpf` when every feature the eBPF mode uses is there, else `nftables` when
//! `nft` works, else `iptables`; `ipvs` only when asked for. Each check names the kernel
//! version (or commit) that introduced the feature; the result and its reason are logged and
//! served at `/proxyModeStatus` and by `kpr status`.
use std::path::Path;
use std::process::Command;

use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use aya::util::KernelVersion;

use super::ProxyMode;

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub feature: &'static str,
    /// The kernel version that introduced it.
    pub since: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Which mode runs, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModeChoice {
    /// What was asked for (`auto` or a mode).
    pub requested: String,
    pub mode: ProxyMode,
    pub reason: String,
    pub checks: Vec<Check>,
    /// In the ebpf mode: each capability and the renderer that serves it (per-feature
    /// fallback, `render::fallback`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<super::fallback::Capability>,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed statfs buffer.
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0).then_some(st.f_type)
}

fn check(feature: &'static str, since: &'static str, result: Result<bool, String>) -> Check {
    match result {
        Ok(ok) => Check {
            feature,
            since,
            ok,
            detail: if ok { "yes".into() } else { "no".into() },
        },
        Err(e) => Check {
            feature,
            since,
            ok: false,
            detail: e,
        },
    }
}

fn kernel_at_least(major: u8, minor: u8) -> Result<bool, String> {
    KernelVersion::current()
        .map(|v| v >= KernelVersion::new(major, minor, 0))
        .map_err(|e| e.to_string())
}

/// Probes what the eBPF mode needs.
#[must_use]
pub fn ebpf_checks(cgroup_path: &Path) -> Vec<Check> {
    vec![
        check(
            "bpf() syscall: hash maps",
            "3.19",
            is_map_supported(aya::maps::MapType::Hash).map_err(|e| e.to_string()),
        ),
        check(
            "BTF of the running kernel (/sys/kernel/btf/vmlinux)",
            "5.4",
            Ok(Path::new("/sys/kernel/btf/vmlinux").exists()),
        ),
        check(
            "cgroup v2 at --cgroup-path",
            "4.5",
            Ok(statfs_magic(cgroup_path) == Some(CGROUP2_SUPER_MAGIC)),
        ),
        check(
            "cgroup/sock_addr programs (connect, sendmsg, recvmsg)",
            "4.17",
            is_program_supported(ProgramType::CgroupSockAddr).map_err(|e| e.to_string()),
        ),
        check("bpf_link for cgroup programs", "5.7", kernel_at_least(5, 7)),
        check(
            "bpf_set_retval in cgroup programs (ECONNREFUSED at connect)",
            "5.18",
            is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
                .map_err(|e| e.to_string()),
        ),
        check(
            "TC classifier programs",
            "4.1",
            is_program_supported(ProgramType::SchedClassifier).map_err(|e| e.to_string()),
        ),
        {
            // tcx (6.6, commit e420bed02507) where the kernel has it, else a clsact qdisc
            // with direct-action cls_bpf filters over netlink (clsact: 4.5, commit
            // 1f211a1b929c).
            let tcx = tcx_supported();
            let mut c = check(
                "TC attachment: tcx (6.6), else clsact + netlink (4.5)",
                "4.5",
                kernel_at_least(4, 5),
            );
            if c.ok {
                c.detail = if tcx { "tcx" } else { "clsact (no tcx)" }.into();
            }
            c
        },
    ]
}

/// Whether TC programs attach with tcx links (Linux 6.6); else kpr uses clsact filters.
#[must_use]
pub fn tcx_supported() -> bool {
    kernel_at_least(6, 6).unwrap_or(false)
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Probes the rule-based modes.
#[must_use]
pub fn rule_checks() -> Vec<Check> {
    vec![
        check(
            "nftables (nft list tables)",
            "5.13 (nft >= 1.0.1, as upstream requires)",
            Ok(works("nft", &["list", "tables"])),
        ),
        check(
            "iptables (iptables-save -t nat)",
            "2.4",
            Ok(works("iptables-save", &["-t", "nat"])),
        ),
    ]
}

/// The mode to run: `requested` unless it is `auto`.
#[must_use]
pub fn choose(requested: Option<ProxyMode>, cgroup_path: &Path) -> ModeChoice {
    if let Some(mode) = requested {
        return ModeChoice {
            requested: mode.as_str().into(),
            mode,
            reason: "asked for (--proxy-mode)".into(),
            checks: Vec::new(),
            capabilities: if mode == ProxyMode::Ebpf {
                super::fallback::capabilities(works("nft", &["list", "tables"]))
            } else {
                Vec::new()
            },
        };
    }
    let mut checks = ebpf_checks(cgroup_path);
    let missing: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.feature).collect();
    let rules = rule_checks();
    let (mode, reason) = if missing.is_empty() {
        (
            ProxyMode::Ebpf,
            "the kernel has every feature the eBPF mode uses".to_string(),
        )
    } else if rules[0].ok {
        (
            ProxyMode::Nftables,
            format!(
                "eBPF mode unavailable (missing: {}); nftables works",
                missing.join("; ")
            ),
        )
    } else {
        (
            ProxyMode::Iptables,
            format!(
                "eBPF mode unavailable (missing: {}); nftables does not work",
                missing.join("; ")
            ),
        )
    };
    let capabilities = if mode == ProxyMode::Ebpf {
        super::fallback::capabilities(rules[0].ok)
    } else {
        Vec::new()
    };
    checks.extend(rules);
    ModeChoice {
        requested: "auto".into(),
        mode,
        reason,
        checks,
        capabilities,
    }
}
