//! The agent: runs the source, keeps the store and this node's view, and syncs the model's
//! output through the one [`Renderer`] chosen at start. It knows the trait, not the mode.
//!
//! The sync loop coalesces bursts (at most one sync per `min_sync_period`) and resyncs every
//! `sync_period` even without changes; a full sync re-reads what the kernel holds, so drift
//! is repaired.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::model::{DesiredCache, NodeInfo, ProxyConfig};
use crate::render::ebpf::{EbpfConfig, EbpfRenderer};
use crate::render::probe::ModeChoice;
use crate::render::{CleanupReport, ProxyMode, Renderer, SyncReport};
use crate::source::convert::ProxySelector;
use crate::source::manifests::ManifestSource;
use crate::store::{Change, ObjectRef, Store};
use crate::{Error, Result};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    Manifests {
        dir: PathBuf,
        selector: ProxySelector,
    },
    Api(crate::source::api::ApiConfig),
}

/// Settings of `kpr run`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    /// `None`: auto (see `render::probe`).
    pub mode: Option<ProxyMode>,
    /// `--nodeport-addresses` was given (else the mode's upstream default applies).
    pub node_port_addresses_given: bool,
    /// Remove other modes' leftovers at start (`--cleanup-other-modes`).
    pub cleanup_other_modes: bool,
    /// ebpf mode: serve what eBPF cannot with the nftables renderer (`render::fallback`).
    pub fallback_renderer: bool,
    pub ebpf: EbpfConfig,
    pub ipvs: crate::render::ipvs::IpvsConfig,
    pub node: NodeInfo,
    pub proxy: ProxyConfig,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub poll_interval: Duration,
    pub healthz_bind: Option<std::net::SocketAddr>,
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// The effective configuration as KubeProxyConfiguration YAML, served at `/configz`.
    pub configz: String,
    /// The node's netfilter conntrack settings (written in the rule modes).
    pub conntrack_sysctls: crate::sysctl::ConntrackSysctls,
}

/// Removes what every mode programmed: kpr's eBPF pins under `bpf_fs_path`, `KUBE-*` iptables
/// chains and the nftables tables (kpr's and kube-proxy's), or only `only`'s: `kpr cleanup`.
///
/// # Errors
/// Something could not be removed.
pub fn cleanup_all(
    bpf_fs_path: &std::path::Path,
    only: Option<ProxyMode>,
) -> Result<CleanupReport> {
    let wants = |m: ProxyMode| only.is_none_or(|o| o == m);
    let mut report = CleanupReport::default();
    if wants(ProxyMode::Ebpf) {
        report = crate::render::ebpf::datapath::cleanup(bpf_fs_path)?;
        if crate::render::ebpf::takeover::release() {
            report.removed.push(format!(
                "nftables table inet {}",
                crate::render::ebpf::takeover::TABLE
            ));
        }
    }
    if wants(ProxyMode::Ipvs) {
        // Before the iptables cleanup: its jumps go first, then every KUBE-* chain, then
        // the ipsets those chains used.
        report
            .removed
            .extend(crate::render::ipvs::cleanup(&[])?.removed);
    }
    if wants(ProxyMode::Iptables) {
        report
            .removed
            .extend(crate::render::iptables::cleanup()?.removed);
    }
    if wants(ProxyMode::Nftables) {
        report
            .removed
            .extend(crate::render::nftables::cleanup()?.removed);
    }
    Ok(report)
}

/// Removes what modes other than `mode` left behind (a previous kpr in another mode, or
/// kube-proxy), as upstream does at start. Runs after the new mode is up, so traffic is never
/// without a datapath.
fn cleanup_other_modes(mode: ProxyMode, cfg: &AgentConfig) {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    if mode != ProxyMode::Ebpf {
        let layout = crate::render::ebpf::datapath::PinLayout::new(&cfg.ebpf.bpf_fs_path);
        if layout.root.exists() {
            match crate::render::ebpf::datapath::cleanup(&layout.root) {
                Ok(r) => removed.extend(r.removed),
                Err(e) => errors.push(e),
            }
        }
    }
    if mode != ProxyMode::Ipvs {
        // Virtual servers, kube-ipvs0 and the ipvs layout's jumps (and, where the iptables
        // mode runs, the chains only that layout has).
        removed.extend(crate::render::ipvs::cleanup_leftovers(
            &cfg.ipvs.exclude_cidrs,
            mode == ProxyMode::Iptables,
        ));
    }
    match mode {
        ProxyMode::Iptables => {}
        // The iptables mode's chains, not the ones the ipvs layout shares with it.
        ProxyMode::Ipvs => match crate::render::iptables::cleanup_keeping(
            &crate::render::ipvs::rules::FILTER_CHAINS,
            &crate::render::ipvs::rules::NAT_CHAINS,
            &crate::render::ipvs::rules::JUMPS,
        ) {
            Ok(r) => removed.extend(r.removed),
            Err(e) => errors.push(e),
        },
        _ => match crate::render::iptables::cleanup() {
            Ok(r) => removed.extend(r.removed),
            Err(e) => errors.push(e),
        },
    }
    if mode != ProxyMode::Ipvs {
        // Once no rule uses them.
        removed.extend(crate::render::ipvs::rules::destroy_sets());
    }
    if mode != ProxyMode::Nftables {
        // The ebpf mode's fallback keeps kpr's own table (its first full sync already cut
        // it down to the frontends it serves).
        let tables: &[&str] = if mode == ProxyMode::Ebpf && cfg.fallback_renderer {
            &["kube-proxy"]
        } else {
            &[crate::render::nftables::rules::TABLE, "kube-proxy"]
        };
        match crate::render::nftables::cleanup_tables(tables) {
            Ok(r) => removed.extend(r.removed),
            Err(e) => errors.push(e),
        }
    }
    if !removed.is_empty() {
        tracing::info!(?removed, "removed what other modes left behind");
    }
    for e in errors {
        tracing::warn!("removing what other modes left behind: {e}");
    }
}

/// Starts the renderer of `mode`.
///
/// # Errors
/// The mode is not built yet, or its datapath could not be set up.
/// The conntrack settings could not all be written at start (the module was not loaded):
/// the agent writes them again after its next successful sync.
static CONNTRACK_SYSCTLS_PENDING: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(0);

pub fn start_renderer(mode: ProxyMode, cfg: &AgentConfig) -> Result<Box<dyn Renderer>> {
    if matches!(
        mode,
        ProxyMode::Iptables | ProxyMode::Nftables | ProxyMode::Ipvs
    ) {
        // Their datapath is the kernel's conntrack (IPVS's too, with vs/conntrack=1): sized
        // and timed as upstream does.
        if let Err(e) = crate::render::conntrack::ensure_loaded() {
            tracing::debug!("asking ctnetlink (to load nf_conntrack): {e}");
        }
        if !cfg.conntrack_sysctls.apply_to_node() {
            // Retried after the next few successful syncs.
            CONNTRACK_SYSCTLS_PENDING.store(5, std::sync::atomic::Ordering::Relaxed);
        }
    }
    match mode {
        ProxyMode::Ebpf => {
            let (renderer, outcome) = EbpfRenderer::start(&cfg.ebpf)?;
            tracing::info!(?outcome, cgroup = %cfg.ebpf.cgroup_path.display(), "eBPF datapath ready");
            if cfg.fallback_renderer {
                match crate::render::nftables::NftablesRenderer::start() {
                    Ok(nft) => {
                        tracing::info!("SCTP frontends are served by the nftables renderer");
                        return Ok(Box::new(crate::render::fallback::WithFallback::new(
                            Box::new(renderer),
                            nft,
                        )));
                    }
                    Err(e) => tracing::warn!("no fallback for SCTP frontends: {e}"),
                }
            }
            Ok(Box::new(renderer))
        }
        ProxyMode::Iptables => Ok(Box::new(crate::render::iptables::IptablesRenderer::start()?)),
        ProxyMode::Nftables => Ok(Box::new(crate::render::nftables::NftablesRenderer::start()?)),
        ProxyMode::Ipvs => Ok(Box::new(crate::render::ipvs::IpvsRenderer::start(
            cfg.ipvs.clone(),
        )?)),
    }
}

fn initial_status(
    cfg: &AgentConfig,
    mode: ProxyMode,
    choice: ModeChoice,
) -> crate::serve::AgentStatus {
    crate::serve::AgentStatus {
        sync_period: cfg.sync_period,
        mode,
        mode_choice: Some(choice),
        node_eligible: true,
        configz: cfg.configz.clone(),
        ..Default::default()
    }
}

/// Starts the renderer. A datapath the kernel refuses in the ebpf mode (no bpffs, no cgroup v2
/// mounted, a verifier rejection, a map it will not create) is retried with a backoff up to
/// 30 s while `/healthz` says unhealthy, `kpr_datapath_start_failures_total` counts and a
/// `FailedToStartDatapath` Event says why: what a previous agent programmed keeps serving
/// meanwhile, and a mount that appears later is picked up without a restart. Other modes, and
/// a misconfiguration (a child cgroup without `--allow-child-cgroup`), fail at once.
async fn start_renderer_retrying(
    mode: ProxyMode,
    cfg: &AgentConfig,
    status: &crate::serve::SharedStatus,
) -> Result<Option<Box<dyn Renderer>>> {
    if mode != ProxyMode::Ebpf {
        return start_renderer(mode, cfg).map(Some);
    }
    if !cfg.ebpf.allow_child_cgroup && cfg.ebpf.cgroup_path.join("cgroup.type").exists() {
        crate::render::ebpf::datapath::check_root_cgroup(&cfg.ebpf.cgroup_path)?;
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut delay = Duration::from_secs(1);
    let mut last_error = String::new();
    loop {
        let e = match start_renderer(mode, cfg) {
            Ok(r) => return Ok(Some(r)),
            Err(e) => e.to_string(),
        };
        if let Ok(mut s) = status.lock() {
            s.datapath_start_failures += 1;
        }
        tracing::error!(
            retry_in_secs = delay.as_secs(),
            "starting the {mode} datapath: {e} (what is programmed keeps serving; retrying)"
        );
        if e != last_error {
            crate::events::record_on_node(
                true,
                "FailedToStartDatapath",
                "Start",
                format!("kpr could not start its {mode} datapath (retrying): {e}"),
            );
            last_error = e;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = tokio::signal::ctrl_c() => return Ok(None),
            _ = sigterm.recv() => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Network-programming latency: from an EndpointSlice's
/// `endpoints.kubernetes.io/last-change-trigger-time` to the sync that programmed it
/// (upstream's `network_programming_duration_seconds`).
#[derive(Clone, Debug, Default)]
pub struct ProgrammingLatency {
    pub count: u64,
    pub sum_secs: f64,
    pub max_secs: f64,
}

impl ProgrammingLatency {
    /// Seconds from an RFC 3339 trigger time until now; `None` if unparsable or in the future.
    #[must_use]
    pub fn since(trigger: &str) -> Option<f64> {
        let t: jiff::Timestamp = trigger.parse().ok()?;
        let d = jiff::Timestamp::now().duration_since(t);
        let secs = d.as_secs_f64();
        (secs >= 0.0).then_some(secs)
    }

    pub fn observe(&mut self, secs: f64) {
        self.count += 1;
        self.sum_secs += secs;
        self.max_secs = self.max_secs.max(secs);
    }
}

/// Store + node + model cache, synced through one renderer.
pub struct Syncer {
    store: Store,
    node: NodeInfo,
    /// Node IPs given on the command line win over the Node object's.
    fixed_node_ips: bool,
    services_listed: bool,
    slices_listed: bool,
    /// `last-change-trigger-time`s of slices changed since the last sync.
    pending_triggers: Vec<String>,
    /// Services the datapath refused at the last syncs (each gets one Event when it starts
    /// failing).
    failing_services: std::collections::BTreeSet<crate::store::ObjectRef>,
    pub latency: ProgrammingLatency,
    pub status: crate::serve::SharedStatus,
    /// Health-check ports of eTP=Local Services, from the last sync.
    pub health_checks: std::collections::BTreeMap<ObjectRef, (u16, usize)>,
    desired: DesiredCache,
    proxy: ProxyConfig,
    renderer: Box<dyn Renderer>,
    conntrack_sysctls: crate::sysctl::ConntrackSysctls,
}

impl Syncer {
    #[must_use]
    pub fn new(cfg: &AgentConfig, renderer: Box<dyn Renderer>, choice: ModeChoice) -> Self {
        let status = initial_status(cfg, renderer.mode(), choice);
        Self::with_status(
            cfg,
            renderer,
            std::sync::Arc::new(std::sync::Mutex::new(status)),
        )
    }

    /// A syncer reporting into `status` (already served while the datapath started).
    #[must_use]
    pub fn with_status(
        cfg: &AgentConfig,
        renderer: Box<dyn Renderer>,
        status: crate::serve::SharedStatus,
    ) -> Self {
        if let Ok(mut s) = status.lock() {
            s.datapath_started = true;
        }
        Self {
            store: Store::default(),
            node: cfg.node.clone(),
            fixed_node_ips: !cfg.node.ips.is_empty(),
            services_listed: false,
            slices_listed: false,
            pending_triggers: Vec::new(),
            failing_services: std::collections::BTreeSet::new(),
            latency: ProgrammingLatency::default(),
            status,
            health_checks: std::collections::BTreeMap::new(),
            desired: DesiredCache::default(),
            proxy: cfg.proxy.clone(),
            renderer,
            conntrack_sysctls: cfg.conntrack_sysctls,
        }
    }

    /// Applies a change; returns whether the desired state may have changed.
    pub fn apply(&mut self, change: Change) -> bool {
        if let Some(m) = crate::metrics::get() {
            // Upstream counts every Service and EndpointSlice event; the pending gauges drop
            // to zero when a sync takes the changes.
            match &change {
                Change::ServiceUpsert(_) | Change::ServiceDelete(_) => {
                    m.service_changes_total.inc();
                    m.service_changes_pending.inc();
                }
                Change::SliceUpsert(_) | Change::SliceDelete(_) => {
                    m.endpoint_changes_total.inc();
                    m.endpoint_changes_pending.inc();
                }
                _ => {}
            }
            let now = unix_now();
            for f in &m.families {
                m.last_queued.with_label_values(&[f]).set(now);
            }
        }
        if let Ok(mut st) = self.status.lock() {
            st.oldest_pending.get_or_insert_with(Instant::now);
        }
        match change {
            Change::Node(node) => {
                if node.name.is_empty() {
                    return false;
                }
                let mut next = self.node.clone();
                if !self.fixed_node_ips {
                    next.ips = node.ips;
                }
                next.labels = node.labels;
                next.lb_ineligible = node.lb_ineligible;
                next.pod_cidrs = node.pod_cidrs;
                if let Ok(mut st) = self.status.lock() {
                    st.node_eligible = !node.lb_ineligible;
                }
                let changed = next != self.node;
                self.node = next;
                if changed {
                    self.store.mark_all_dirty();
                }
                changed
            }
            Change::Reset { .. } => {
                self.services_listed = true;
                self.slices_listed = true;
                self.store.apply(change);
                true
            }
            Change::ResetServices(_) => {
                self.services_listed = true;
                self.store.apply(change);
                true
            }
            Change::ResetSlices(_) => {
                self.slices_listed = true;
                self.store.apply(change);
                true
            }
            Change::SliceUpsert(slice) => {
                let trigger = slice.trigger_time.clone();
                let changed = self.store.apply(Change::SliceUpsert(slice));
                if changed && let Some(t) = trigger {
                    self.pending_triggers.push(t);
                }
                changed
            }
            other => self.store.apply(other),
        }
    }

    /// True once the source has delivered a complete list of Services and EndpointSlices.
    /// Until then nothing is synced, so a restarted agent that cannot reach the API server
    /// leaves the datapath exactly as it found it.
    #[must_use]
    pub const fn ready(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Whether a sync has completed without errors since the agent started.
    #[must_use]
    pub fn synced_ok(&self) -> bool {
        self.status.lock().is_ok_and(|s| s.last_updated.is_some())
    }

    /// The renderer's mode.
    #[must_use]
    pub fn mode(&self) -> ProxyMode {
        self.renderer.mode()
    }

    /// Periodic work of the renderer between syncs.
    pub fn tick(&mut self) {
        self.renderer.tick();
        if let Ok(mut st) = self.status.lock() {
            st.mode_metrics = self.renderer.metrics();
        }
    }

    /// Computes the desired state of what changed and applies the difference: in full after
    /// a relist, a node change or a resync, else only the frontends of changed Services.
    pub fn sync(&mut self) {
        self.sync_with(false);
    }

    /// Where healthCheckNodePorts listen: every address, or (upstream) the node addresses
    /// `nodePortAddresses` selects.
    #[must_use]
    pub fn health_check_addresses(&self) -> Option<Vec<std::net::IpAddr>> {
        match self.proxy.node_port_addresses {
            crate::model::NodePortAddresses::All => None,
            _ => Some(crate::model::node_port_ips(&self.node, &self.proxy)),
        }
    }

    fn sync_with(&mut self, periodic: bool) {
        let started = Instant::now();
        if let Some(m) = crate::metrics::get() {
            m.service_changes_pending.set(0);
            m.endpoint_changes_pending.set(0);
        }
        let dirty = self.store.take_dirty();
        let report = match self
            .desired
            .update(&self.store, &dirty, &self.node, &self.proxy)
        {
            // (Every Service's frontends are in a full sync's report.)
            None => {
                let report = if periodic {
                    self.renderer.resync(&self.desired.state)
                } else {
                    self.renderer.sync_full(&self.desired.state)
                };
                // A full sync follows a (re)list or reload, whose parse buffers are garbage
                // now: hand the freed heap back so RSS shows what the agent keeps.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                report
            }
            Some(keys) => {
                let report = self.renderer.sync_frontends(&self.desired.state, &keys);
                self.record(&report, started);
                self.record_metrics(&report, started, false);
                return;
            }
        };
        self.record(&report, started);
        self.record_metrics(&report, started, true);
    }

    /// Upstream's sync metrics: durations (all, and full or partial), the last successful
    /// sync, failures per mode, and Services with a Local policy but no local endpoints.
    fn record_metrics(&self, report: &SyncReport, started: Instant, full: bool) {
        let Some(m) = crate::metrics::get() else {
            return;
        };
        let secs = started.elapsed().as_secs_f64();
        m.observe(&m.sync_duration, secs);
        m.observe(
            if full {
                &m.sync_full_duration
            } else {
                &m.sync_partial_duration
            },
            secs,
        );
        if report.errors.is_empty() {
            let now = unix_now();
            for f in &m.families {
                m.last_synced.with_label_values(&[f]).set(now);
            }
        } else {
            match self.renderer.mode() {
                ProxyMode::Iptables => {
                    m.inc(&m.iptables_restore_failures);
                    if !full {
                        m.inc(&m.iptables_partial_restore_failures);
                    }
                }
                ProxyMode::Nftables => m.inc(&m.nftables_sync_failures),
                _ => {}
            }
        }
        let (internal, external) = crate::model::no_local_endpoints(&self.desired.state);
        for f in &m.families {
            m.no_local_endpoints
                .with_label_values(&["internal", f])
                .set(i64::try_from(internal).unwrap_or(i64::MAX));
            m.no_local_endpoints
                .with_label_values(&["external", f])
                .set(i64::try_from(external).unwrap_or(i64::MAX));
        }
    }

    /// The periodic resync: recomputes the desired state and hands all of it to the renderer
    /// (`Renderer::resync`), which re-reads what the kernel holds (the eBPF maps every time,
    /// the rule-based modes' tables every hour), repairing entries changed behind the agent's
    /// back.
    pub fn resync(&mut self) {
        self.store.mark_all_dirty();
        self.sync_with(true);
    }

    /// A `FailedToProgramService` Event for each Service that starts failing.
    fn record_failed_services(&mut self, report: &SyncReport) {
        let desired = &self.desired.state;
        let mut failing: std::collections::BTreeMap<crate::store::ObjectRef, Vec<String>> =
            std::collections::BTreeMap::new();
        for k in &report.failed_frontends {
            if let Some(fe) = desired.frontends.get(k) {
                failing.entry(fe.service.clone()).or_default().push(format!(
                    "{}/{}",
                    std::net::SocketAddr::new(k.ip, k.port),
                    k.protocol.as_str()
                ));
            }
        }
        let why = report
            .errors
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        for (svc, frontends) in &failing {
            if !self.failing_services.contains(svc) {
                crate::events::record(
                    crate::events::Regarding::Service(svc.clone()),
                    true,
                    "FailedToProgramService",
                    "Sync",
                    format!(
                        "kpr could not program {} (it keeps what it had): {why}",
                        frontends.join(", ")
                    ),
                );
            }
        }
        if report.errors.is_empty() {
            self.failing_services.clear();
        }
        self.failing_services.extend(failing.into_keys());
    }

    fn record(&mut self, report: &SyncReport, started: Instant) {
        self.record_failed_services(report);
        if report.errors.is_empty() {
            use std::sync::atomic::Ordering::Relaxed;
            let left = CONNTRACK_SYSCTLS_PENDING.load(Relaxed);
            if left > 0 {
                let done = self.conntrack_sysctls.apply_to_node();
                CONNTRACK_SYSCTLS_PENDING.store(if done { 0 } else { left - 1 }, Relaxed);
            }
        }
        let desired = &self.desired.state;
        for e in &report.errors {
            tracing::error!("sync: {e}");
        }
        if report.errors.is_empty() {
            for t in self.pending_triggers.drain(..) {
                if let Some(secs) = ProgrammingLatency::since(&t) {
                    self.latency.observe(secs);
                    if let Some(m) = crate::metrics::get() {
                        m.observe(&m.network_programming, secs);
                    }
                    tracing::info!(seconds = secs, trigger = %t, "network programming latency");
                }
            }
        }
        self.health_checks.clone_from(&desired.health_checks);
        if let Ok(mut st) = self.status.lock() {
            if report.errors.is_empty() {
                st.oldest_pending = None;
                st.last_updated = Some(jiff::Timestamp::now());
            }
            st.last_sync = Some(Instant::now());
            st.syncs += 1;
            st.sync_errors += u64::from(!report.errors.is_empty());
            st.last_sync_secs = started.elapsed().as_secs_f64();
            st.frontends = desired.frontends.len();
            st.services = self.store.service_count();
            st.endpoint_slices = self.store.slice_count();
            st.latency_count = self.latency.count;
            st.latency_sum_secs = self.latency.sum_secs;
            st.mode_metrics = self.renderer.metrics();
        }
        if report.changes > 0 || !report.errors.is_empty() {
            let detail: Vec<String> = report
                .detail
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(what, n)| format!("{what}={n}"))
                .collect();
            tracing::info!(
                mode = %self.renderer.mode(),
                services = self.store.service_count(),
                slices = self.store.slice_count(),
                frontends = desired.frontends.len(),
                changes = report.changes,
                detail = %detail.join(" "),
                errors = report.errors.len(),
                took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "synced"
            );
        }
    }
}

fn spawn_manifests(mut source: ManifestSource, poll: Duration, tx: mpsc::Sender<Change>) {
    tokio::spawn(async move {
        loop {
            let result = tokio::task::block_in_place(|| source.poll());
            for e in &result.errors {
                tracing::error!("{e}");
            }
            for change in result.changes {
                if tx.send(change).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(poll).await;
        }
    });
}

/// Runs the agent until SIGINT/SIGTERM. The datapath stays programmed after it exits.
///
/// # Errors
/// Start-up failed (the datapath could not be loaded).
/// kube-proxy's `--init-only`: the one-time node setup (the mode's datapath loaded and its
/// kernel objects created), then return without watching anything.
///
/// # Errors
/// The chosen mode's datapath could not be set up.
pub fn init_only(cfg: &AgentConfig) -> Result<()> {
    let choice = crate::render::probe::choose(cfg.mode, &cfg.ebpf.cgroup_path);
    let _renderer = start_renderer(choice.mode, cfg)?;
    tracing::info!(mode = %choice.mode, "node set up (--init-only)");
    Ok(())
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let mut choice = crate::render::probe::choose(cfg.mode, &cfg.ebpf.cgroup_path);
    if choice.mode == ProxyMode::Ebpf && !cfg.fallback_renderer {
        choice.capabilities = crate::render::fallback::capabilities(false);
    }
    tracing::info!(mode = %choice.mode, requested = %choice.requested, reason = %choice.reason, "proxy mode");
    for c in &choice.capabilities {
        tracing::info!(capability = c.capability, served_by = c.served_by, why = %c.why, "capability");
    }
    for c in choice.checks.iter().filter(|c| !c.ok) {
        tracing::info!(feature = c.feature, since = c.since, detail = %c.detail, "kernel feature missing");
    }
    crate::caps::check(choice.mode)?;
    let mut cfg = cfg;
    let mut families: Vec<&'static str> = Vec::new();
    for ip in &cfg.node.ips {
        let f = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        if !families.contains(&f) {
            families.push(f);
        }
    }
    if families.is_empty() {
        families.push("IPv4");
    }
    crate::metrics::init(choice.mode, families);
    crate::render::apply_mode_defaults(choice.mode, &mut cfg.proxy, cfg.node_port_addresses_given);
    // The API client first, so a datapath that does not start can say so in an Event; the
    // health and metrics servers too, so it shows.
    let client = match &cfg.source {
        SourceConfig::Api(api) => {
            let client = crate::source::api::client(api).await?;
            crate::events::start(client.clone(), &api.node_name);
            Some(client)
        }
        SourceConfig::Manifests { .. } => None,
    };
    let status = std::sync::Arc::new(std::sync::Mutex::new(initial_status(
        &cfg,
        choice.mode,
        choice.clone(),
    )));
    crate::serve::start(cfg.healthz_bind, cfg.metrics_bind, status.clone()).await;
    let Some(renderer) = start_renderer_retrying(choice.mode, &cfg, &status).await? else {
        tracing::info!("stopped before the datapath started");
        return Ok(());
    };
    // What another mode (or kube-proxy) left is removed only once this mode's datapath holds
    // every Service (the first successful full sync): until then the old rules keep serving,
    // so a takeover drops no connection.
    let mut cleanup_pending = cfg.cleanup_other_modes;
    let mut syncer = Syncer::with_status(&cfg, renderer, status);
    tracing::info!(mode = %syncer.mode(), node = %cfg.node.name, "kpr agent started");
    let (tx, mut rx) = mpsc::channel::<Change>(1024);
    match &cfg.source {
        SourceConfig::Manifests { dir, selector } => spawn_manifests(
            ManifestSource::new(dir, selector.clone(), &cfg.node.name),
            cfg.poll_interval,
            tx,
        ),
        SourceConfig::Api(api) => {
            let client = client.expect("made above for the API source");
            crate::events::record(
                crate::events::Regarding::Node(api.node_name.clone()),
                false,
                "Starting",
                "StartKubeProxy",
                format!("Starting kube-proxy (kpr, {} mode).", syncer.mode()),
            );
            tracing::info!(selector = %api.selector.label_selector(), node = %api.node_name, "watching the API server");
            crate::source::api::spawn(&client, api, &tx);
        }
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut health = crate::serve::HealthChecks::default();
    health.status = Some(syncer.status.clone());
    let mut interfaces = tokio::time::interval(Duration::from_secs(2));
    let mut dirty = false;
    let mut last_sync = Instant::now() - cfg.min_sync_period;
    let mut last_full = Instant::now();
    loop {
        let wait = if dirty {
            cfg.min_sync_period.saturating_sub(last_sync.elapsed())
        } else {
            cfg.sync_period.saturating_sub(last_full.elapsed())
        };
        tokio::select! {
            change = rx.recv() => {
                match change {
                    Some(c) => dirty |= syncer.apply(c),
                    None => return Ok(()),
                }
            }
            () = tokio::time::sleep(wait) => {
                if !syncer.ready() {
                    // Not listed yet: keep the datapath as found.
                    last_full = Instant::now();
                } else if dirty {
                    syncer.sync();
                    dirty = false;
                    last_sync = Instant::now();
                    health.set_addresses(syncer.health_check_addresses()).await;
                    health.sync(&syncer.health_checks).await;
                } else {
                    syncer.resync();
                    last_full = Instant::now();
                    health.set_addresses(syncer.health_check_addresses()).await;
                    health.sync(&syncer.health_checks).await;
                }
                if cleanup_pending && syncer.synced_ok() {
                    cleanup_other_modes(syncer.mode(), &cfg);
                    cleanup_pending = false;
                }
            }
            _ = interfaces.tick() => syncer.tick(),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; the datapath stays programmed");
                return Ok(());
            }
            _ = sigterm.recv() => {
                tracing::info!("terminated; the datapath stays programmed");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProgrammingLatency;

    #[test]
    fn latency_from_trigger_time() {
        let past = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3)).to_string();
        let secs = ProgrammingLatency::since(&past).expect("parsable");
        assert!((3.0..10.0).contains(&secs), "{secs}");
        assert_eq!(ProgrammingLatency::since("not a time"), None);
        let mut l = ProgrammingLatency::default();
        l.observe(1.0);
        l.observe(3.0);
        assert_eq!((l.count, l.sum_secs, l.max_secs), (2, 4.0, 3.0));
    }
}

/// Seconds since the Unix epoch (the timestamp gauges).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
