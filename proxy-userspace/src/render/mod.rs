//! Renderers: each proxy mode turns the model's desired state into its own kernel objects and
//! applies only the difference from what the kernel holds. The agent owns one [`Renderer`],
//! chosen at start, and knows nothing of maps, rules or links.
//!
//! A renderer has no opinion about which endpoints serve what, or which traffic is
//! masqueraded: the model's [`Frontend`](crate::model::Frontend) says that per traffic class,
//! and a renderer only expresses it in its kernel's terms.
use std::collections::BTreeSet;

use crate::Error;
use crate::model::{DesiredState, FrontendKey};

pub mod conntrack;
pub mod ebpf;
pub mod fallback;
pub mod iptables;
pub mod ipvs;
pub mod netlink;
pub mod nftables;
pub mod plan;
pub mod probe;

/// The proxy modes, named as kube-proxy names them (`--proxy-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    #[default]
    Ebpf,
    Iptables,
    Nftables,
    Ipvs,
}

impl ProxyMode {
    /// The name `/proxyMode` answers.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// upstream's per-mode defaults: the nftables mode serves NodePorts on the primary node IP
/// only (unless `nodePortAddresses` was given) and checks ClusterIP traffic.
pub fn apply_mode_defaults(
    mode: ProxyMode,
    config: &mut crate::model::ProxyConfig,
    node_port_addresses_given: bool,
) {
    if mode == ProxyMode::Nftables {
        if !node_port_addresses_given {
            config.node_port_addresses = crate::model::NodePortAddresses::Primary;
        }
        config.cluster_ip_checks = true;
    }
}

/// The UDP conntrack bookkeeping of the rule-based modes: what the last sync programmed, and
/// how many stale entries were deleted.
#[derive(Debug, Default)]
pub struct UdpConntrack {
    /// `None` until the first sync: entries found at start are left alone.
    last: Option<conntrack::UdpBackends>,
    pub deleted: u64,
}

impl UdpConntrack {
    /// After a successful sync to `desired`: deletes the UDP entries it left stale.
    pub fn after_sync(&mut self, desired: &DesiredState, report: &mut SyncReport) {
        let now = conntrack::udp_backends(desired);
        if let Some(last) = &self.last {
            let stale = conntrack::stale(last, &now);
            match conntrack::delete(&stale) {
                Ok(n) => {
                    self.deleted += n as u64;
                    if n > 0 {
                        report.detail.push(("udp_conntrack_deleted", n));
                    }
                }
                Err(e) => report.errors.push(
                    crate::Error::io("ctnetlink", e)
                        .context("deleting stale UDP conntrack entries"),
                ),
            }
        }
        self.last = Some(now);
    }

    #[must_use]
    pub fn metric(&self) -> ModeMetric {
        ModeMetric {
            name: "udp_conntrack_entries_deleted_total",
            help: "UDP conntrack entries deleted because their backend went away or their Service got its first backend.",
            kind: MetricKind::Counter,
            #[expect(clippy::cast_precision_loss, reason = "a counter far below 2^52")]
            value: self.deleted as f64,
            labels: Vec::new(),
        }
    }
}

/// Runs a tool (`iptables-restore`, `nft`, ...) with `input` on its stdin; its stdout, or its
/// stderr as the error.
pub(crate) fn run_tool(
    cmd: &mut std::process::Command,
    input: Option<&str>,
) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(std::io::Error::other(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )))
    }
}

/// upstream's localhost NodePorts need `route_localnet` (in this network namespace).
///
/// # Errors
/// The sysctl could not be written.
pub(crate) fn enable_route_localnet() -> crate::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
    // Already set (by `--init-only` in kpr's DaemonSet, whose agent container sees /proc/sys
    // read-only): nothing to write.
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").map_err(|e| crate::Error::io(PATH, e))
}

/// A netlink socket of `protocol` whose reads time out after 2 s.
pub(crate) fn netlink_socket(protocol: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval; a failure only leaves reads blocking.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(16),
        );
    }
    Ok(fd)
}

/// What the rule-based modes keep between syncs besides their rules: when they last re-read
/// the kernel, and their UDP conntrack bookkeeping.
#[derive(Debug, Default)]
pub struct RuleModeState {
    last_full: Option<std::time::Instant>,
    pub conntrack: UdpConntrack,
}

impl RuleModeState {
    /// Records a full sync.
    pub fn full_sync_started(&mut self) {
        self.last_full = Some(std::time::Instant::now());
    }

    /// Whether this periodic resync is a full one ([`FULL_SYNC_PERIOD`] since the last),
    /// recording it when it is.
    pub fn resync_is_full(&mut self) -> bool {
        let due = self
            .last_full
            .is_none_or(|t| t.elapsed() >= FULL_SYNC_PERIOD);
        if due {
            self.full_sync_started();
        }
        due
    }
}

/// How often the rule-based modes re-read and rewrite everything on a periodic resync
/// (upstream's `FullSyncPeriod`).
pub const FULL_SYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

/// How many per-frontend errors one sync reports in full; the rest are counted.
pub const MAX_REPORTED_ERRORS: usize = 10;

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Kernel objects written or removed (0: the kernel already held the desired state).
    pub changes: usize,
    /// What each kind of change counted, for the log (e.g. `("slots_written", 3)`).
    pub detail: Vec<(&'static str, usize)>,
    /// Frontends or objects that could not be programmed. Each keeps what it had before;
    /// everything else was synced.
    pub errors: Vec<Error>,
    /// The frontends among `errors` (where the mode can tell them apart), for the
    /// `FailedToProgramService` Events.
    pub failed_frontends: Vec<crate::model::FrontendKey>,
}

impl SyncReport {
    /// Adds an error, keeping the first [`MAX_REPORTED_ERRORS`] in full and counting the rest.
    pub fn error(&mut self, e: Error, failed: &mut usize) {
        *failed += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(e);
        }
    }
}

/// A counter or gauge a renderer exports in `/metrics` (as `kpr_<name>`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModeMetric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    pub value: f64,
    /// Label pairs of this sample (samples of one name are exposed together).
    pub labels: Vec<(&'static str, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What `kpr cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Each removed object (a pinned path, a chain, a table).
    pub removed: Vec<String>,
}

/// One proxy mode. Implementations own every kernel object of their mode.
pub trait Renderer: Send {
    /// The mode this renderer implements.
    fn mode(&self) -> ProxyMode;

    /// Re-reads what the kernel holds (so changes made behind the agent's back are repaired)
    /// and applies the whole desired state.
    fn sync_full(&mut self, desired: &DesiredState) -> SyncReport;

    /// Applies the desired state of `keys` only: the frontends of the Services that changed
    /// (absent from `desired`: removed). Work is proportional to `keys`, not to the cluster.
    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport;

    /// The periodic resync (every `--sync-period`) with the whole desired state. By default a
    /// full sync; rule-based modes, whose full sync costs seconds at scale, diff against what
    /// they wrote and re-read the kernel only every [`FULL_SYNC_PERIOD`] (upstream does the
    /// same).
    fn resync(&mut self, desired: &DesiredState) -> SyncReport {
        self.sync_full(desired)
    }

    /// Periodic work between syncs (e.g. attaching to interfaces that appeared).
    fn tick(&mut self) {}

    /// Removes every kernel object of this mode.
    ///
    /// # Errors
    /// Something could not be removed; what could was.
    fn cleanup(&mut self) -> crate::Result<CleanupReport>;

    /// The mode's own counters and gauges.
    fn metrics(&self) -> Vec<ModeMetric> {
        Vec::new()
    }
}
