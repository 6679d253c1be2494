//! Per-feature fallback: the ebpf mode runs on whatever the kernel offers, and the
//! capabilities it cannot provide are served by the nftables renderer for just those
//! frontends, while everything else stays in eBPF.
//!
//! The capability served this way today is **SCTP frontends**: the cgroup connect hook runs
//! from `sk_prot->pre_connect` (`inet_pre_connect` → `BPF_CGROUP_RUN_PROG_INET4_CONNECT`),
//! which SCTP's protocol does not define, so no kernel lets the socket programs balance SCTP;
//! and the TC programs parse TCP and UDP only. The nftables renderer gets a desired state
//! holding only the SCTP frontends (without upstream's ClusterIP checks, which would refuse
//! the TCP and UDP ports it does not see), in its own `kpr` tables.
//!
//! Which renderer serves each capability is reported by [`capabilities`] in `kpr status`
//! and at `/proxyModeStatus`.
use std::collections::BTreeSet;

use super::nftables::NftablesRenderer;
use super::{CleanupReport, ModeMetric, ProxyMode, Renderer, SyncReport};
use crate::model::{DesiredState, FrontendKey, Protocol};

/// One capability and the renderer that serves it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Capability {
    pub capability: &'static str,
    /// `ebpf`, `nftables`, or `none`.
    pub served_by: &'static str,
    pub why: String,
}

/// Whether a frontend is served by the fallback renderer.
#[must_use]
pub fn needs_fallback(key: &FrontendKey) -> bool {
    key.protocol == Protocol::Sctp
}

/// The capabilities of the ebpf mode on this node and who serves each (`nft_works`: the
/// nftables fallback is available).
#[must_use]
pub fn capabilities(nft_works: bool) -> Vec<Capability> {
    vec![
        Capability {
            capability: "TCP and UDP frontends",
            served_by: "ebpf",
            why: "socket programs at connect/sendmsg/recvmsg/getpeername, TC programs for traffic from outside".into(),
        },
        Capability {
            capability: "SCTP frontends",
            served_by: if nft_works { "nftables" } else { "none" },
            why: if nft_works {
                "the cgroup connect hook runs from sk_prot->pre_connect, which SCTP lacks (every kernel); TC parses TCP and UDP only".into()
            } else {
                "no eBPF hook for SCTP, and nft does not work here: SCTP Services are not served".into()
            },
        },
    ]
}

/// `desired` restricted to the frontends the fallback serves.
#[must_use]
pub fn fallback_state(desired: &DesiredState) -> DesiredState {
    DesiredState {
        frontends: desired
            .frontends
            .iter()
            .filter(|(k, _)| needs_fallback(k))
            .map(|(k, fe)| (*k, fe.clone()))
            .collect(),
        health_checks: std::collections::BTreeMap::new(),
        cluster_ip_checks: None,
        // Node-wide route_localnet is not the fallback's call.
        localhost_node_ports: false,
        ..desired.clone()
    }
}

/// The ebpf renderer with the nftables renderer serving what eBPF cannot. The fallback's
/// tables exist only while some frontend needs them: without one, no netfilter hook of kpr's
/// is in the path of the traffic eBPF serves.
pub struct WithFallback {
    primary: Box<dyn Renderer>,
    fallback: NftablesRenderer,
    /// The fallback's tables are programmed.
    active: bool,
}

/// How the fallback is synced.
enum Pass<'a> {
    Full,
    Resync,
    Frontends(&'a BTreeSet<FrontendKey>),
}

impl WithFallback {
    #[must_use]
    pub fn new(primary: Box<dyn Renderer>, fallback: NftablesRenderer) -> Self {
        Self {
            primary,
            fallback,
            // Unknown at start: a previous run's tables may exist; the first sync decides.
            active: true,
        }
    }

    fn sync_fallback(&mut self, desired: &DesiredState, pass: Pass<'_>) -> SyncReport {
        let state = fallback_state(desired);
        if state.frontends.is_empty() {
            if !self.active {
                return SyncReport::default();
            }
            // Nothing needs it (any more): its tables go, after eBPF took its traffic.
            let _ = self.fallback.cleanup_own_tables();
            self.active = false;
            return SyncReport::default();
        }
        if !self.active {
            self.active = true;
            return self.fallback.sync_full(&state);
        }
        match pass {
            Pass::Full => self.fallback.sync_full(&state),
            Pass::Resync => self.fallback.resync(&state),
            Pass::Frontends(keys) => {
                let theirs: BTreeSet<FrontendKey> =
                    keys.iter().filter(|k| needs_fallback(k)).copied().collect();
                if theirs.is_empty() {
                    SyncReport::default()
                } else {
                    self.fallback.sync_frontends(&state, &theirs)
                }
            }
        }
    }
}

fn merge(mut a: SyncReport, b: SyncReport) -> SyncReport {
    a.changes += b.changes;
    a.detail.extend(b.detail);
    a.errors.extend(
        b.errors
            .into_iter()
            .map(|e| e.context("the nftables fallback (SCTP frontends)")),
    );
    a.failed_frontends.extend(b.failed_frontends);
    a
}

impl Renderer for WithFallback {
    fn mode(&self) -> ProxyMode {
        self.primary.mode()
    }

    fn sync_full(&mut self, desired: &DesiredState) -> SyncReport {
        let a = self.primary.sync_full(desired);
        let b = self.sync_fallback(desired, Pass::Full);
        merge(a, b)
    }

    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport {
        let a = self.primary.sync_frontends(desired, keys);
        let b = self.sync_fallback(desired, Pass::Frontends(keys));
        merge(a, b)
    }

    fn resync(&mut self, desired: &DesiredState) -> SyncReport {
        let a = self.primary.resync(desired);
        let b = self.sync_fallback(desired, Pass::Resync);
        merge(a, b)
    }

    fn tick(&mut self) {
        self.primary.tick();
        self.fallback.tick();
    }

    fn cleanup(&mut self) -> crate::Result<CleanupReport> {
        let mut r = self.primary.cleanup()?;
        r.removed.extend(self.fallback.cleanup()?.removed);
        Ok(r)
    }

    fn metrics(&self) -> Vec<ModeMetric> {
        let mut m = self.primary.metrics();
        m.extend(self.fallback.metrics());
        m
    }
}
