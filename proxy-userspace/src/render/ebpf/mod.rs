//! The eBPF mode: socket-level load balancing at the cgroup hooks and TC programs for
//! traffic from outside the node, fed from pinned maps.
//!
//! - [`datapath`]: loading, attaching, pinning, adopting and removing programs and links;
//! - [`pinned`]: the pinned maps (typed access, snapshots, batched writes);
//! - [`maps`]: the map diff, which turns the desired state into map entries;
//! - [`maglev`]: Maglev tables; [`sockterm`]: destroying connected UDP sockets of removed
//!   backends; [`trace`]: `kpr trace`.
//!
//! [`EbpfRenderer`] ties them together behind the [`Renderer`] trait.
pub mod datapath;
pub mod gc;
pub mod maglev;
pub mod maps;
pub mod packet;
pub mod pinned;
pub mod scratch;
pub mod sockterm;
pub mod takeover;
pub mod trace;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proxy_common::{BackendSlotKey, CtTimeouts, NodeConfig, drop_reason, map_names, map_sizes};

use self::datapath::{LoadOutcome, PinLayout, TcInterfaces};
use self::maps::{MapDiff, SyncStats};
use self::pinned::{Batched, PinnedMaps, write_batched};
use super::{CleanupReport, MetricKind, ModeMetric, ProxyMode, Renderer, SyncReport};
use crate::model::{DesiredState, FrontendKey};
use crate::{Error, Result};

/// Where the eBPF mode keeps and attaches its programs.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    pub bpf_fs_path: PathBuf,
    pub cgroup_path: PathBuf,
    pub tc_interfaces: TcInterfaces,
    pub datapath: DatapathConfig,
    /// Attach to a cgroup that is not the node's root (tests, a node whose pods live in one
    /// known subtree).
    pub allow_child_cgroup: bool,
    /// Mount a bpffs of kpr's own when none is there (it dies with the mount namespace).
    pub allow_private_bpffs: bool,
}

/// Settings of the datapath itself (conntrack, NAT, Maglev).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub ct_timeouts: CtTimeouts,
    /// The masquerade port range, inclusive.
    pub nat_ports: (u16, u16),
    /// Slots of a Maglev table (a prime).
    pub maglev_table_size: u32,
    /// How often expired conntrack entries are collected.
    pub gc_interval: Duration,
    /// Entries of the conntrack map (applied when the map is created).
    pub conntrack_max: u32,
    /// Entries of the services and backends maps (applied when the maps are created, or
    /// by a resize when the pinned ones are smaller).
    pub services_max: u32,
    pub backends_max: u32,
    /// Grow a map a sync finds full (doubling it, up to [`MAX_GROWTH`] times its configured
    /// size) instead of refusing the Services that do not fit.
    pub grow_maps: bool,
}

/// How far a full map may grow past its configured size.
pub const MAX_GROWTH: u32 = 16;

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            ct_timeouts: CtTimeouts::DEFAULT,
            nat_ports: (proxy_common::NAT_PORT_MIN, proxy_common::NAT_PORT_MAX),
            maglev_table_size: proxy_common::MAGLEV_TABLE_SIZE,
            gc_interval: Duration::from_secs(10),
            conntrack_max: map_sizes::CONNTRACK as u32,
            services_max: map_sizes::SERVICES as u32,
            backends_max: map_sizes::BACKENDS as u32,
            grow_maps: false,
        }
    }
}

/// What the datapath's own counters said at the last look (every GC pass).
#[derive(Debug, Default)]
struct DatapathCounters {
    gc: gc::GcReport,
    gc_runs: u64,
    flows_collected: u64,
    /// Flows established through the previous rules, left to the kernel's conntrack.
    kernel_nat_flows: u64,
    drops: [u64; drop_reason::COUNT as usize],
    /// (frontend, scope, stats)
    services: Vec<(String, &'static str, proxy_common::ServiceStats)>,
    fill_warned: bool,
}

/// The eBPF mode. Owns the pinned maps, the map diff's memory of them, the TC links and the
/// socket termination that connected UDP sockets need.
pub struct EbpfRenderer {
    layout: PinLayout,
    maps: PinnedMaps,
    diff: MapDiff,
    tc_interfaces: TcInterfaces,
    /// What KPR_CONFIG holds.
    node_config: Option<NodeConfig>,
    /// The kernel refused SOCK_DESTROY once: do not sweep again.
    sock_destroy_unsupported: bool,
    udp_sockets_destroyed: u64,
    datapath: DatapathConfig,
    last_gc: Option<Instant>,
    counters: DatapathCounters,
    /// The pod CIDRs written under `POD_CIDRS_ID` (None: not written by this agent yet).
    pod_cidrs: Option<BTreeSet<ipnet::IpNet>>,
    /// Flows the kernel's conntrack NATs were recorded (once, at the first full sync).
    kernel_flows_recorded: bool,
    /// The `takeover` table holds the kernel's conntrack for them.
    conntrack_held: bool,
    /// Loaded but not attached yet: another map layout's build serves until the first
    /// successful full sync filled this build's maps.
    staged: Option<datapath::StagedUpgrade>,
    /// The cgroup the socket programs are attached to (a resize attaches there).
    cgroup_path: PathBuf,
    /// Sizes the pinned maps should grow to at the first full sync (they were pinned smaller
    /// than configured).
    pending_resize: Option<datapath::MapSizes>,
    /// Syncs that found a map full, by map.
    map_full: std::collections::BTreeMap<String, u64>,
    resizes: u64,
    /// A full map could not grow (at its limit, or growth is off): said once.
    growth_refused: bool,
}

impl DatapathConfig {
    /// The map sizes this configuration asks for.
    #[must_use]
    pub fn map_sizes(&self) -> datapath::MapSizes {
        datapath::MapSizes {
            services: self.services_max,
            backends: self.backends_max,
            conntrack: self.conntrack_max,
        }
    }
}

impl EbpfRenderer {
    /// Loads the programs, or adopts those a previous agent pinned, and attaches the TC
    /// programs. The maps are read by the first full sync.
    ///
    /// # Errors
    /// The datapath could not be loaded or its maps opened.
    pub fn start(cfg: &EbpfConfig) -> Result<(Self, LoadOutcome)> {
        let layout = PinLayout::new(&cfg.bpf_fs_path);
        if cfg.allow_child_cgroup {
            datapath::check_cgroup_v2(&cfg.cgroup_path)?;
        } else {
            datapath::check_root_cgroup(&cfg.cgroup_path)?;
        }
        let wanted = cfg.datapath.map_sizes();
        let (outcome, staged) = datapath::ensure_loaded_staged(
            &layout,
            &cfg.cgroup_path,
            wanted,
            cfg.allow_private_bpffs,
        )?;
        // Maps pinned smaller than configured grow at the first full sync (flows kept).
        let grow = cfg.datapath.grow_maps;
        let pending_resize = datapath::MapSizes::pinned(&layout).and_then(|pinned| {
            let grown = datapath::MapSizes {
                services: pinned.services.max(wanted.services),
                backends: pinned.backends.max(wanted.backends),
                conntrack: pinned.conntrack.max(wanted.conntrack),
            };
            if grown != pinned && !grow {
                tracing::warn!(
                    ?pinned,
                    configured = ?grown,
                    "the pinned maps are smaller than configured and keep their size: --bpf-map-grow=true resizes them while serving, or `kpr cleanup` and a restart"
                );
            }
            (grown != pinned && grow).then(|| {
                tracing::info!(
                    ?pinned,
                    ?grown,
                    "the pinned maps are smaller than configured: they grow at the first sync"
                );
                grown
            })
        });
        if staged.is_some() {
            tracing::info!(
                "a kpr with another map layout is running: it keeps serving until this one's maps are filled"
            );
        }
        let renderer = Self {
            tc_interfaces: cfg.tc_interfaces.clone(),
            datapath: cfg.datapath,
            // A previous agent's hold (restarted during a takeover): released by the
            // collector like its own.
            conntrack_held: takeover::held(),
            staged,
            cgroup_path: cfg.cgroup_path.clone(),
            pending_resize,
            ..Self::with_maps(layout)?
        };
        renderer.attach_tc()?;
        Ok((renderer, outcome))
    }

    /// A renderer over maps already pinned under `layout` (e.g. by
    /// [`datapath::load_object`]), attaching nothing: for tests and benchmarks of the map
    /// side alone.
    ///
    /// # Errors
    /// The maps are not pinned there.
    pub fn with_maps(layout: PinLayout) -> Result<Self> {
        Ok(Self {
            maps: PinnedMaps::open(&layout)?,
            layout,
            diff: MapDiff::default(),
            tc_interfaces: TcInterfaces::None,
            node_config: None,
            sock_destroy_unsupported: false,
            udp_sockets_destroyed: 0,
            datapath: DatapathConfig::default(),
            last_gc: None,
            counters: DatapathCounters::default(),
            pod_cidrs: None,
            kernel_flows_recorded: false,
            conntrack_held: false,
            staged: None,
            cgroup_path: PathBuf::new(),
            pending_resize: None,
            map_full: std::collections::BTreeMap::new(),
            resizes: 0,
            growth_refused: false,
        })
    }

    /// After a sync: counts full maps, and grows them when growth is on (the fill's report
    /// then replaces `report`: what did not fit is programmed now).
    fn grow_if_full(&mut self, desired: &DesiredState, report: &mut SyncReport) {
        let full: BTreeSet<String> = report
            .errors
            .iter()
            .filter_map(Error::full_map)
            .map(str::to_string)
            .collect();
        for m in &full {
            *self.map_full.entry(m.clone()).or_default() += 1;
        }
        if self.staged.is_some() {
            return;
        }
        let Some(current) = datapath::MapSizes::pinned(&self.layout) else {
            return;
        };
        let mut want = self.pending_resize.take().unwrap_or(current);
        let grows = |m: &str, names: [&str; 2]| names.contains(&m);
        let services_full = |m: &str| grows(m, [map_names::SERVICES, map_names::REVNAT]);
        let backends_full = |m: &str| grows(m, [map_names::BACKENDS, map_names::BACKEND_SLOTS]);
        // Room for what is desired now and a quarter more: each frontend takes up to two
        // service entries and one reverse-NAT entry (that map gets half the services size).
        let frontends = u32::try_from(desired.frontends.len()).unwrap_or(u32::MAX);
        let fit = |n: u32| {
            n.saturating_add(n / 4)
                .checked_next_power_of_two()
                .unwrap_or(u32::MAX)
        };
        if full.iter().any(|m| services_full(m)) {
            want.services = want
                .services
                .max(current.services.saturating_mul(2))
                .max(fit(frontends.saturating_mul(2)));
        }
        if full.iter().any(|m| backends_full(m)) {
            want.backends = want.backends.max(current.backends.saturating_mul(2));
        }
        if want == current {
            return;
        }
        let limit = self.datapath.map_sizes();
        let over = |w: &datapath::MapSizes| {
            w.services
                > limit
                    .services
                    .saturating_mul(MAX_GROWTH)
                    .max(current.services)
                || w.backends
                    > limit
                        .backends
                        .saturating_mul(MAX_GROWTH)
                        .max(current.backends)
        };
        let configured = want.services <= limit.services && want.backends <= limit.backends;
        if !configured && (!self.datapath.grow_maps || over(&want)) {
            if !self.growth_refused {
                let why = if over(&want) {
                    format!("they would pass {MAX_GROWTH} times their configured size")
                } else {
                    "--bpf-map-grow=false".to_string()
                };
                let note = format!(
                    "BPF maps {} are full and do not grow ({why}): Services that do not fit are not programmed; raise --bpf-map-services / --bpf-map-backends",
                    full.iter().cloned().collect::<Vec<_>>().join(", ")
                );
                tracing::error!("{note}");
                crate::events::record_on_node(true, "BPFMapFull", "Sync", note);
                self.growth_refused = true;
            }
            return;
        }
        let started = Instant::now();
        let mut attempt = self.resize(desired, want);
        // Still too small (more backends per frontend than guessed, say): double what filled.
        for _ in 0..4 {
            let Err(e) = &attempt else { break };
            let Some(m) = e.full_map().map(str::to_string) else {
                break;
            };
            let mut next = want;
            if services_full(&m) {
                next.services = next.services.saturating_mul(2);
            } else if backends_full(&m) {
                next.backends = next.backends.saturating_mul(2);
            }
            if next == want || over(&next) {
                break;
            }
            want = next;
            attempt = self.resize(desired, want);
        }
        match attempt {
            Ok(filled) => {
                self.resizes += 1;
                self.growth_refused = false;
                let note = format!(
                    "BPF maps resized from {current:?} to {want:?} in {} ms, flows kept{}",
                    started.elapsed().as_millis(),
                    if full.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({} were full)",
                            full.iter().cloned().collect::<Vec<_>>().join(", ")
                        )
                    }
                );
                tracing::info!("{note}");
                crate::events::record_on_node(false, "BPFMapResized", "Resize", note);
                *report = filled;
            }
            Err(e) => report.errors.push(e.context("growing the BPF maps")),
        }
    }

    /// Builds maps of `want` sizes beside the live ones, fills them with the whole desired
    /// state, carries the per-flow state over and swaps this build's programs, bound to the
    /// new maps, into the running links (atomically per link): no flow is broken. On an error
    /// before the swap the live maps keep serving, untouched.
    fn resize(&mut self, desired: &DesiredState, want: datapath::MapSizes) -> Result<SyncReport> {
        let root = self.layout.root.clone();
        let staging = PinLayout::staging(&root);
        let _ = std::fs::remove_dir_all(staging.versioned());
        let (_, staged) = datapath::ensure_loaded_staged(&staging, &self.cgroup_path, want, false)?;
        let Some(staged) = staged else {
            let _ = std::fs::remove_dir_all(staging.versioned());
            return Err(Error::Unsupported(
                "resizing needs a running datapath to take over from".into(),
            ));
        };
        let maps = PinnedMaps::open(&staging)?;
        let live = (
            std::mem::replace(&mut self.layout, staging),
            std::mem::replace(&mut self.maps, maps),
            std::mem::take(&mut self.diff),
            self.node_config.take(),
            self.pod_cidrs.take(),
        );
        let mut report = SyncReport::default();
        self.sync_node_config(desired, &mut report);
        let (stats, errors) = self.sync_batched(desired);
        let mut report = self.finish(stats, errors, report);
        let swapped = if report.errors.is_empty() {
            staged.complete(&self.layout)
        } else {
            let mut errors = std::mem::take(&mut report.errors);
            Err(errors
                .remove(0)
                .context("filling the maps of the new sizes"))
        };
        if let Err(e) = swapped {
            // Back to the live maps (which served throughout).
            let staging_dir = self.layout.versioned();
            (
                self.layout,
                self.maps,
                self.diff,
                self.node_config,
                self.pod_cidrs,
            ) = live;
            let _ = std::fs::remove_dir_all(staging_dir);
            return Err(e);
        }
        self.layout = datapath::finish_resize(&root)?;
        if let Err(e) = self.attach_tc() {
            tracing::warn!("attaching the TC programs after the resize: {e}");
        }
        Ok(report)
    }

    /// Replaces the datapath settings (before the first sync).
    pub fn set_datapath_config(&mut self, cfg: DatapathConfig) {
        self.datapath = cfg;
    }

    /// Collects expired conntrack entries now and refreshes the datapath counters.
    pub fn collect_garbage(&mut self) -> gc::GcReport {
        let now = gc::monotonic_ns();
        let report = match gc::collect(&mut self.maps, now) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("conntrack garbage collection: {e}");
                return gc::GcReport::default();
            }
        };
        self.last_gc = Some(Instant::now());
        if self.conntrack_held && report.kernel_nat_left == 0 && takeover::release() {
            tracing::info!(
                "the last flow established through the previous rules is gone: the kernel's conntrack is no longer held"
            );
            self.conntrack_held = false;
        }
        let c = &mut self.counters;
        c.gc_runs += 1;
        c.flows_collected += report.flows_deleted as u64;
        c.gc = report;
        let capacity = self.maps.conntrack_capacity();
        #[expect(clippy::cast_precision_loss, reason = "map sizes far below 2^52")]
        let fill = report.entries_left as f64 / f64::from(capacity.max(1));
        if fill > 0.9 && !c.fill_warned {
            tracing::warn!(
                entries = report.entries_left,
                capacity,
                "the conntrack map is over 90% full: new flows will be dropped when it is full (established ones are kept)"
            );
            c.fill_warned = true;
        } else if fill < 0.8 {
            c.fill_warned = false;
        }
        if let Ok(d) = self.maps.drops() {
            c.drops = d;
        }
        if let Ok(stats) = self.maps.service_stats() {
            let names = self.diff.frontend_names();
            c.services = stats
                .into_iter()
                .filter_map(|(id, s)| names.get(&id).map(|(f, scope)| (f.clone(), *scope, s)))
                .collect();
        }
        report
    }

    /// The pinned maps, for inspection.
    #[must_use]
    pub const fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// Where this renderer's objects are pinned.
    #[must_use]
    pub const fn layout(&self) -> &PinLayout {
        &self.layout
    }

    fn attach_tc(&self) -> Result<()> {
        if self.staged.is_some() {
            // The running build's TC links are taken over when the upgrade completes.
            return Ok(());
        }
        let attached = datapath::sync_tc_links(&self.layout, &self.tc_interfaces)?;
        if !attached.is_empty() {
            tracing::info!(interfaces = ?attached, "TC programs attached");
        }
        Ok(())
    }

    /// Rebuilds the map diff's memory from what the maps hold, and returns the slots of
    /// revisions no service points at (left by a crash between publish and cleanup).
    fn adopt_kernel_state(&mut self) -> Result<Vec<BackendSlotKey>> {
        let snapshot = self.maps.snapshot()?;
        let (diff, stale) = MapDiff::adopt(
            &snapshot,
            self.datapath.maglev_table_size,
            maps::ID_QUARANTINE,
        );
        self.diff = diff;
        Ok(stale)
    }

    /// Marks every flow the kernel's conntrack DNATs from one of the desired frontends (it was
    /// established through kube-proxy's rules) with a `KERNEL_NAT` conntrack entry: the TC
    /// programs then leave its packets to the kernel instead of balancing a mid-stream packet
    /// afresh (which would collide with the kernel's entry for the same flow). Without
    /// netfilter conntrack there is nothing to record. Returns how many were recorded.
    fn record_kernel_nat_flows(&mut self, desired: &DesiredState) -> usize {
        use proxy_common::{CtKey, CtValue, ct_flags, ct_kind, ct_state};
        if self.tc_interfaces == TcInterfaces::None {
            return 0;
        }
        let frontends: BTreeSet<FrontendKey> = desired.frontends.keys().copied().collect();
        let flows = match crate::render::conntrack::kernel_nat_flows(&frontends) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("reading the kernel's conntrack table: {e}");
                return 0;
            }
        };
        let now = gc::monotonic_ns();
        let t = self.datapath.ct_timeouts;
        let mut recorded = 0;
        for f in flows {
            let (proto, state, secs) = match f.protocol {
                crate::model::Protocol::Tcp => (6, ct_state::ESTABLISHED, t.tcp_established),
                crate::model::Protocol::Udp => (17, ct_state::UDP_REPLY, t.udp_stream),
                _ => continue,
            };
            let key = CtKey::new(
                addr16(f.client.ip()),
                addr16(f.frontend.ip()),
                f.client.port(),
                f.frontend.port(),
                proto,
                ct_kind::FORWARD,
            );
            if matches!(self.maps.conntrack_get(&key), Ok(Some(_))) {
                continue;
            }
            let value = CtValue {
                addr: addr16(f.backend.ip()),
                expires_ns: now + u64::from(secs) * 1_000_000_000,
                port: f.backend.port(),
                flags: ct_flags::KERNEL_NAT,
                state,
                backend_id: 0,
                generation: 0,
                service_id: 0,
                nat_port: 0,
                _pad: [0; 6],
            };
            match self.maps.conntrack_put(&key, &value) {
                Ok(()) => recorded += 1,
                Err(e) => {
                    tracing::warn!("recording a flow the kernel translates: {e}");
                    break;
                }
            }
        }
        if recorded > 0 {
            tracing::info!(
                flows = recorded,
                "flows established through the previous rules are left to the kernel's conntrack"
            );
            if !self.conntrack_held {
                match takeover::hold() {
                    Ok(()) => self.conntrack_held = true,
                    Err(e) => tracing::warn!(
                        "cannot keep the kernel's conntrack running for them (nftables table inet {}): {e}; they may break when the previous rules are removed",
                        takeover::TABLE
                    ),
                }
            }
        }
        self.counters.kernel_nat_flows += recorded as u64;
        recorded
    }

    /// Writes the masquerade addresses when they changed.
    fn sync_node_config(&mut self, desired: &DesiredState, report: &mut SyncReport) {
        let first = |v4: bool| {
            desired
                .masquerade_ips
                .iter()
                .find(|ip| ip.is_ipv4() == v4)
                .map_or([0; 16], |ip| addr16(*ip))
        };
        let t = self.datapath.ct_timeouts;
        let cfg = NodeConfig {
            snat_v4: first(true),
            snat_v6: first(false),
            node_netns_cookie: own_netns_cookie(),
            nat_port_min: self.datapath.nat_ports.0,
            nat_port_max: self.datapath.nat_ports.1,
            tcp_syn_secs: t.tcp_syn,
            tcp_established_secs: t.tcp_established,
            tcp_fin_secs: t.tcp_fin,
            tcp_close_secs: t.tcp_close,
            udp_secs: t.udp,
            udp_stream_secs: t.udp_stream,
            _pad: 0,
        };
        self.sync_pod_cidrs(desired, report);
        if self.node_config == Some(cfg) {
            return;
        }
        match self.maps.set_node_config(&cfg) {
            Ok(()) => {
                self.node_config = Some(cfg);
                report.changes += 1;
            }
            Err(e) => report
                .errors
                .push(e.context("writing the node configuration")),
        }
    }

    /// From a cold start (nothing programmed) the writes go out with BPF_MAP_UPDATE_BATCH;
    /// if the kernel refuses a batch (a full map, say), the renderer re-reads what the maps
    /// hold and finishes element by element, where every frontend's failure is reported on
    /// its own and leaves nothing half-published.
    /// The pod CIDRs (the local-traffic detector) in `KPR_SRC_RANGES` under `POD_CIDRS_ID`,
    /// for outside traffic to ClusterIPs.
    fn sync_pod_cidrs(&mut self, desired: &DesiredState, report: &mut SyncReport) {
        use self::maps::LbMaps as _;
        let want: BTreeSet<ipnet::IpNet> = desired.pod_cidrs.iter().copied().collect();
        if self.pod_cidrs.as_ref() == Some(&want) {
            return;
        }
        let old = self.pod_cidrs.take().unwrap_or_default();
        for r in want.difference(&old) {
            if let Err(e) = self.maps.put_src_range(proxy_common::POD_CIDRS_ID, r) {
                report.errors.push(e.context("writing the pod CIDRs"));
                return;
            }
        }
        for r in old.difference(&want) {
            let _ = self.maps.del_src_range(proxy_common::POD_CIDRS_ID, r);
        }
        report.changes += 1;
        self.pod_cidrs = Some(want);
    }

    fn sync_batched(&mut self, desired: &DesiredState) -> (SyncStats, Vec<Error>) {
        let mut batched = Batched {
            inner: &mut self.maps,
            services: Vec::new(),
            slots: Vec::new(),
            backends: Vec::new(),
            revnat: Vec::new(),
        };
        let (stats, errors) = self.diff.sync(desired, &mut batched, &[]);
        let Batched {
            services,
            slots,
            backends,
            revnat,
            ..
        } = batched;
        let layout = &self.layout;
        // Backends and slots are independent of each other (two cores write them at once);
        // the service entries that publish them go last.
        let flushed = std::thread::scope(|s| {
            let b = s.spawn(|| write_batched(layout, map_names::BACKENDS, &backends));
            let r = write_batched(layout, map_names::BACKEND_SLOTS, &slots)
                .and_then(|()| write_batched(layout, map_names::REVNAT, &revnat));
            b.join()
                .unwrap_or_else(|_| Err(Error::invalid("the batch writer thread panicked")))
                .and(r)
        })
        .and_then(|()| write_batched(layout, map_names::SERVICES, &services));
        match flushed {
            Ok(()) => (stats, errors),
            Err(e) => {
                tracing::warn!("{e}; finishing the sync one element at a time");
                match self.adopt_kernel_state() {
                    Ok(stale) => self.diff.sync(desired, &mut self.maps, &stale),
                    Err(e2) => (stats, vec![e, e2]),
                }
            }
        }
    }

    /// Destroys connected UDP sockets that socket-level load balancing pointed at backends
    /// this sync removed (their sends would keep going to the old backend).
    fn terminate_udp_sockets(&mut self) {
        let removed = self.diff.take_removed_udp();
        if removed.is_empty() || self.sock_destroy_unsupported {
            return;
        }
        let started = Instant::now();
        let maps = &self.maps;
        let report = sockterm::sweep(&removed, &|key| {
            maps.sock_revnat_get(key).map(|v| (v.addr, v.port))
        });
        for key in &report.forget {
            self.maps.sock_revnat_del(key);
        }
        for e in &report.errors {
            tracing::warn!("terminating UDP sockets of removed backends: {e}");
        }
        if report.unsupported {
            self.sock_destroy_unsupported = true;
            tracing::warn!(
                "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): connected UDP sockets keep sending to removed backends until the application reconnects"
            );
        }
        self.udp_sockets_destroyed += report.destroyed as u64;
        tracing::info!(
            pairs = removed.len(),
            namespaces = report.namespaces,
            destroyed = report.destroyed,
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "terminated connected UDP sockets of removed backends"
        );
    }

    fn finish(
        &mut self,
        stats: SyncStats,
        errors: Vec<Error>,
        mut report: SyncReport,
    ) -> SyncReport {
        self.terminate_udp_sockets();
        report.changes += stats.services_written
            + stats.services_deleted
            + stats.slots_written
            + stats.slots_deleted
            + stats.backends_written
            + stats.backends_deleted;
        report.detail = vec![
            ("services_written", stats.services_written),
            ("services_deleted", stats.services_deleted),
            ("slots_written", stats.slots_written),
            ("slots_deleted", stats.slots_deleted),
            ("backends_written", stats.backends_written),
            ("backends_deleted", stats.backends_deleted),
        ];
        report.errors.extend(errors);
        report.failed_frontends = stats.failed;
        report
    }
}

impl Renderer for EbpfRenderer {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ebpf
    }

    fn sync_full(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        self.sync_node_config(desired, &mut report);
        let stale = match self.adopt_kernel_state() {
            Ok(stale) => stale,
            Err(e) => {
                report.errors.push(e.context(format!(
                    "reading the maps under {}",
                    self.layout.root.display()
                )));
                return report;
            }
        };
        // Flows established through kube-proxy's rules (a takeover) are recorded before the
        // frontends are published and once more after, so the TC programs leave them to the
        // kernel's conntrack, which keeps translating them after the rules are gone.
        let first = !self.kernel_flows_recorded;
        if first {
            self.record_kernel_nat_flows(desired);
        }
        let (stats, errors) = if self.diff.is_empty() && stale.is_empty() {
            self.sync_batched(desired)
        } else {
            self.diff.sync(desired, &mut self.maps, &stale)
        };
        if first {
            self.record_kernel_nat_flows(desired);
            self.kernel_flows_recorded = true;
        }
        let report = self.finish(stats, errors, report);
        if report.errors.is_empty()
            && let Some(staged) = self.staged.take()
        {
            // The maps hold every Service: swap this build in.
            match staged.complete(&self.layout) {
                Ok(()) => {
                    if let Err(e) = self.attach_tc() {
                        tracing::warn!("attaching the TC programs: {e}");
                    }
                }
                Err(e) => tracing::error!(
                    "replacing the build with another map layout: {e}; it keeps serving"
                ),
            }
        }
        let mut report = report;
        self.grow_if_full(desired, &mut report);
        report
    }

    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        self.sync_node_config(desired, &mut report);
        let (stats, errors) = self.diff.sync_keys(desired, keys, &mut self.maps);
        let mut report = self.finish(stats, errors, report);
        self.grow_if_full(desired, &mut report);
        report
    }

    fn tick(&mut self) {
        if let Err(e) = self.attach_tc() {
            tracing::error!("attaching TC programs: {e}");
        }
        if self
            .last_gc
            .is_none_or(|t| t.elapsed() >= self.datapath.gc_interval)
        {
            self.collect_garbage();
        }
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        let mut report = datapath::cleanup(&self.layout.root)?;
        if takeover::release() {
            report
                .removed
                .push(format!("nftables table inet {}", takeover::TABLE));
        }
        Ok(report)
    }

    #[expect(clippy::cast_precision_loss, reason = "counters far below 2^52")]
    fn metrics(&self) -> Vec<ModeMetric> {
        let c = &self.counters;
        let plain = |name, help, kind, value: f64| ModeMetric {
            name,
            help,
            kind,
            value,
            labels: Vec::new(),
        };
        let mut out = vec![
            plain(
                "udp_sockets_destroyed_total",
                "Connected UDP sockets destroyed because their backend was removed.",
                MetricKind::Counter,
                self.udp_sockets_destroyed as f64,
            ),
            plain(
                "conntrack_entries",
                "Entries in the conntrack map at the last garbage collection.",
                MetricKind::Gauge,
                c.gc.entries_left as f64,
            ),
            plain(
                "conntrack_capacity",
                "Entries the conntrack map can hold.",
                MetricKind::Gauge,
                f64::from(self.maps.conntrack_capacity()),
            ),
            plain(
                "conntrack_gc_runs_total",
                "Conntrack garbage collections.",
                MetricKind::Counter,
                c.gc_runs as f64,
            ),
            plain(
                "conntrack_flows_collected_total",
                "Expired flows deleted by the conntrack garbage collector.",
                MetricKind::Counter,
                c.flows_collected as f64,
            ),
            plain(
                "conntrack_kernel_nat_flows_total",
                "Flows found established through the previous rules (kube-proxy's) at takeover, left to the kernel's conntrack.",
                MetricKind::Counter,
                c.kernel_nat_flows as f64,
            ),
        ];
        out.push(plain(
            "bpf_map_resizes_total",
            "Times the load-balancing maps were grown (or resized to the configured sizes) while serving.",
            MetricKind::Counter,
            self.resizes as f64,
        ));
        for (map, n) in &self.map_full {
            out.push(ModeMetric {
                labels: vec![("map", map.clone())],
                ..plain(
                    "bpf_map_full_total",
                    "Syncs that found a BPF map full, by map.",
                    MetricKind::Counter,
                    *n as f64,
                )
            });
        }
        if let Some(sizes) = datapath::MapSizes::pinned(&self.layout) {
            for (map, entries) in [
                (map_names::SERVICES, sizes.services),
                (map_names::BACKENDS, sizes.backends),
            ] {
                out.push(ModeMetric {
                    labels: vec![("map", map.to_string())],
                    ..plain(
                        "bpf_map_capacity",
                        "Entries a sized BPF map can hold.",
                        MetricKind::Gauge,
                        f64::from(entries),
                    )
                });
            }
        }
        for (i, name) in drop_reason::NAMES.iter().enumerate() {
            out.push(ModeMetric {
                labels: vec![("reason", (*name).to_string())],
                ..plain(
                    "datapath_drops_total",
                    "Packets the datapath dropped, by reason.",
                    MetricKind::Counter,
                    c.drops[i] as f64,
                )
            });
        }
        for (metric, help, pick) in [
            (
                "service_packets_total",
                "Packets translated by the TC path (both directions), per frontend; datagrams sent by unconnected sockets at the socket level.",
                0,
            ),
            (
                "service_bytes_total",
                "Bytes translated by the TC path (both directions), per frontend.",
                1,
            ),
            (
                "service_flows_total",
                "New flows (TC) and connected sockets (socket level), per frontend.",
                2,
            ),
        ] {
            for (frontend, scope, s) in &c.services {
                let v = [s.packets, s.bytes, s.flows][pick];
                out.push(ModeMetric {
                    labels: vec![
                        ("frontend", frontend.clone()),
                        ("scope", (*scope).to_string()),
                    ],
                    ..plain(metric, help, MetricKind::Counter, v as f64)
                });
            }
        }
        out
    }
}

/// A 16-byte map address (IPv4-mapped for IPv4).
/// The cookie of the agent's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), 0 when
/// unknown: the node's own sockets are those in this namespace.
#[must_use]
pub fn own_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a datagram socket, queried and closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 0;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        );
        libc::close(fd);
        if rc == 0 { cookie } else { 0 }
    }
}

#[must_use]
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => proxy_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr16`].
#[must_use]
pub fn ip_from16(a: [u8; 16]) -> IpAddr {
    if proxy_common::is_v4_mapped(&a) {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

#[must_use]
pub fn sockaddr_from16(a: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(ip_from16(a), port)
}
