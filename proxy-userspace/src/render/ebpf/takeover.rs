//! Keeps the kernel's conntrack translating flows established through kube-proxy's rules
//! while they live on after a takeover.
//!
//! netfilter runs conntrack in a network namespace only while some rule needs it (the
//! `nf_ct_netns_get` reference every NAT or `ct` expression takes). kube-proxy's rules are
//! usually those rules: once kpr removes them, conntrack stops in the namespace, and a flow
//! whose DNAT conntrack was applying (a long-lived connection to a ClusterIP made before the
//! takeover) is no longer translated: it dies. While such flows exist (`KERNEL_NAT`
//! conntrack entries), kpr holds conntrack with one table of its own, `inet kpr-takeover`,
//! whose only rule is never evaluated (its chain has no hook); the garbage collector removes
//! the table once the last of those flows is gone.
use crate::render::run_tool;

/// The table that holds conntrack (family `inet`: both IPv4 and IPv6).
pub const TABLE: &str = "kpr-takeover";

fn nft(args: &[&str], input: Option<&str>) -> std::io::Result<String> {
    run_tool(std::process::Command::new("nft").args(args), input)
}

/// Whether the holding table exists in this network namespace.
#[must_use]
pub fn held() -> bool {
    nft(&["list", "table", "inet", TABLE], None).is_ok()
}

/// Creates the holding table (idempotent).
///
/// # Errors
/// `nft` is missing or the kernel refused the table.
pub fn hold() -> std::io::Result<()> {
    nft(
        &["-f", "-"],
        Some(&format!(
            "table inet {TABLE} {{\n  comment \"kpr: keeps conntrack running for flows established through kube-proxy's rules\"\n  chain hold {{\n    ct state established,related counter\n  }}\n}}\n"
        )),
    )
    .map(|_| ())
}

/// Removes the holding table; whether it was there.
pub fn release() -> bool {
    held() && nft(&["delete", "table", "inet", TABLE], None).is_ok()
}
