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
pub mod maglev;
pub mod maps;
pub mod packet;
pub mod pinned;
pub mod scratch;
pub mod sockterm;
pub mod trace;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use proxy_common::{BackendSlotKey, NodeConfig, map_names};

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
}

impl EbpfRenderer {
    /// Loads the programs, or adopts those a previous agent pinned, and attaches the TC
    /// programs. The maps are read by the first full sync.
    ///
    /// # Errors
    /// The datapath could not be loaded or its maps opened.
    pub fn start(cfg: &EbpfConfig) -> Result<(Self, LoadOutcome)> {
        let layout = PinLayout::new(&cfg.bpf_fs_path);
        let outcome = datapath::ensure_loaded(&layout, &cfg.cgroup_path)?;
        let renderer = Self {
            tc_interfaces: cfg.tc_interfaces.clone(),
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
        })
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
        let (diff, stale) = MapDiff::adopt(&snapshot);
        self.diff = diff;
        Ok(stale)
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
        let cfg = NodeConfig {
            snat_v4: first(true),
            snat_v6: first(false),
        };
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
        let (stats, errors) = if self.diff.is_empty() && stale.is_empty() {
            self.sync_batched(desired)
        } else {
            self.diff.sync(desired, &mut self.maps, &stale)
        };
        self.finish(stats, errors, report)
    }

    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        self.sync_node_config(desired, &mut report);
        let (stats, errors) = self.diff.sync_keys(desired, keys, &mut self.maps);
        self.finish(stats, errors, report)
    }

    fn tick(&mut self) {
        if let Err(e) = self.attach_tc() {
            tracing::error!("attaching TC programs: {e}");
        }
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        datapath::cleanup(&self.layout.root)
    }

    fn metrics(&self) -> Vec<ModeMetric> {
        vec![ModeMetric {
            name: "udp_sockets_destroyed_total",
            help: "Connected UDP sockets destroyed because their backend was removed.",
            kind: MetricKind::Counter,
            #[expect(clippy::cast_precision_loss, reason = "a counter far below 2^52")]
            value: self.udp_sockets_destroyed as f64,
        }]
    }
}

/// A 16-byte map address (IPv4-mapped for IPv4).
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
