//! The map diff: turns the desired state into load-balancing map entries and applies only the
//! difference from what the maps hold (the eBPF renderer's core, over any [`LbMaps`]).
//!
//! A frontend's backend set changes atomically: the new set is written as slots of a new
//! revision, then one update of the service entry publishes it, then the old revision's slots
//! are deleted. A lookup therefore sees the whole old set or the whole new set. When the
//! kernel refuses a write (a full map, say), the half-written revision is removed again and
//! the frontend keeps serving its old set.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proxy_common::{
    Backend, BackendSlotKey, MemberKey, RevNatValue, ServiceKey, ServiceValue, map_sizes, scope,
    service_flags,
};

use super::{addr16, sockaddr_from16};
use crate::model::{
    DesiredState, Frontend, FrontendKey, FrontendKind, Masquerade, Protocol, Targets,
};
use crate::render::MAX_REPORTED_ERRORS;
use crate::store::LbAlgorithm;
use crate::{Error, Result};
use ipnet::IpNet;

/// Flag in `ServiceValue::flags`: no usable endpoint and the policy says drop, not reject.
pub const FLAG_DROP: u32 = service_flags::DROP;

fn too_many_backends() -> Error {
    Error::MapFull {
        map: proxy_common::map_names::BACKEND_SLOTS.into(),
        detail: "more than 2^32 backends for one frontend".into(),
    }
}

/// Writes to the load-balancing maps. Implemented by the pinned kernel maps and, for tests,
/// by [`MapsSnapshot`] itself.
pub trait LbMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<()>;
    fn del_slot(&mut self, key: &BackendSlotKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn del_backend(&mut self, id: u32) -> Result<()>;
    fn put_revnat(&mut self, id: u32, value: &RevNatValue) -> Result<()>;
    fn del_revnat(&mut self, id: u32) -> Result<()>;
    fn put_src_range(&mut self, service_id: u32, range: &IpNet) -> Result<()>;
    fn del_src_range(&mut self, service_id: u32, range: &IpNet) -> Result<()>;
    fn put_member(&mut self, key: &MemberKey) -> Result<()>;
    fn del_member(&mut self, key: &MemberKey) -> Result<()>;
}

/// Everything the load-balancing maps hold, read back from the kernel (or an in-memory
/// stand-in for it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsSnapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub revnat: BTreeMap<u32, RevNatValue>,
    /// loadBalancerSourceRanges by service id.
    pub src_ranges: BTreeSet<(u32, IpNet)>,
    /// (service, backend) pairs of session-affinity services.
    pub members: BTreeSet<MemberKey>,
    /// Test hook: refuse inserts beyond this many slots, like a full kernel map.
    pub slot_capacity: Option<usize>,
}

impl LbMaps for MapsSnapshot {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key);
        Ok(())
    }
    fn put_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<()> {
        if let Some(cap) = self.slot_capacity
            && self.slots.len() >= cap
            && !self.slots.contains_key(key)
        {
            return Err(Error::map(
                proxy_common::map_names::BACKEND_SLOTS,
                "insert",
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
                }),
            ));
        }
        self.slots.insert(*key, backend_id);
        Ok(())
    }
    fn del_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        self.slots.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_revnat(&mut self, id: u32, value: &RevNatValue) -> Result<()> {
        self.revnat.insert(id, *value);
        Ok(())
    }
    fn del_revnat(&mut self, id: u32) -> Result<()> {
        self.revnat.remove(&id);
        Ok(())
    }
    fn put_src_range(&mut self, service_id: u32, range: &IpNet) -> Result<()> {
        self.src_ranges.insert((service_id, *range));
        Ok(())
    }
    fn del_src_range(&mut self, service_id: u32, range: &IpNet) -> Result<()> {
        self.src_ranges.remove(&(service_id, *range));
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey) -> Result<()> {
        self.members.insert(*key);
        Ok(())
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        self.members.remove(key);
        Ok(())
    }
}

/// How long a freed service or backend id stays unused. Readers that may still hold one:
/// programs running when it was freed (microseconds), per-service counters, and conntrack
/// and affinity entries (those check generation and membership, so reuse is safe for them;
/// the quarantine keeps counters and `kpr services` from mixing two services).
pub const ID_QUARANTINE: Duration = Duration::from_secs(120);

/// Free ids: released ones wait out [`ID_QUARANTINE`] before they are handed out again.
#[derive(Debug, Default)]
struct IdPool {
    free: BTreeSet<u32>,
    quarantined: VecDeque<(Instant, u32)>,
    next: u32,
    quarantine: Duration,
}

impl IdPool {
    fn new(quarantine: Duration) -> Self {
        Self {
            quarantine,
            ..Self::default()
        }
    }

    /// An id: a free one past its quarantine, else a new one below `limit`.
    fn take(&mut self, limit: usize) -> Option<u32> {
        let now = Instant::now();
        while let Some((at, id)) = self.quarantined.front().copied() {
            if now.duration_since(at) < self.quarantine {
                break;
            }
            self.quarantined.pop_front();
            self.free.insert(id);
        }
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next as usize >= limit {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    /// Gives an id back; it is reused after the quarantine.
    fn release(&mut self, id: u32) {
        self.quarantined.push_back((Instant::now(), id));
    }

    /// Gives back an id that no reader ever saw (a failed write): reusable at once.
    fn unuse(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Rebuilt from the ids in use: every gap below the highest is quarantined from now (the
    /// previous agent may have freed it a moment ago).
    fn adopt(quarantine: Duration, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(0, |m| m + 1);
        let now = Instant::now();
        Self {
            free: BTreeSet::new(),
            quarantined: (0..next)
                .filter(|i| !used.contains(i))
                .map(|i| (now, i))
                .collect(),
            next,
            quarantine,
        }
    }

    fn len(&self) -> usize {
        self.free.len() + self.quarantined.len()
    }
}

/// One map entry set the renderer wants for a service key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WantedService {
    /// Slot order: the backends, or a Maglev table of them.
    backends: Vec<SocketAddr>,
    source_ranges: Vec<IpNet>,
    flags: u32,
    affinity_timeout_secs: u32,
    frontend: SocketAddr,
    /// Write `KPR_MEMBERS` pairs for this frontend (session affinity and the backends
    /// unconnected UDP sockets remember check them).
    members: bool,
}

/// What one frontend key holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    value: ServiceValue,
    backends: Vec<u32>,
    source_ranges: Vec<IpNet>,
    /// `KPR_MEMBERS` holds this frontend's (service, backend) pairs.
    members: bool,
}

/// Counts of what a sync wrote, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub services_written: usize,
    pub services_deleted: usize,
    pub slots_written: usize,
    pub slots_deleted: usize,
    pub backends_written: usize,
    pub backends_deleted: usize,
    pub errors: usize,
    /// The frontends that could not be programmed (each kept what it had).
    pub failed: Vec<FrontendKey>,
}

impl SyncStats {
    #[must_use]
    pub const fn is_noop(&self) -> bool {
        self.services_written == 0
            && self.services_deleted == 0
            && self.slots_written == 0
            && self.slots_deleted == 0
            && self.backends_written == 0
            && self.backends_deleted == 0
    }
}

/// Hash maps of the renderer: keys are our own addresses and ids, so a fast non-keyed-random
/// hasher is fine (foldhash; seeded per process).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The renderer's memory of what the maps hold (rebuilt from the maps at start).
#[derive(Debug)]
pub struct MapDiff {
    services: FastMap<ServiceKey, Programmed>,
    /// backend address -> (id, number of slots using it)
    backend_ids: FastMap<SocketAddr, (u32, usize)>,
    /// backend id -> address (the inverse of `backend_ids`), so every lookup is O(1).
    backend_addr: FastMap<u32, SocketAddr>,
    service_ids: IdPool,
    backend_ids_pool: IdPool,
    /// Slots of a Maglev table (a prime).
    maglev_table_size: u32,
    /// Generation handed to a reused backend id.
    next_generation: u32,
    /// (frontend, backend) pairs of UDP frontends that lost a backend since the last
    /// [`MapDiff::take_removed_udp`]: sockets connected through them are destroyed.
    removed_udp: BTreeSet<(SocketAddr, SocketAddr)>,
}

fn key_for(fe: &FrontendKey, scope: u8) -> ServiceKey {
    ServiceKey {
        addr: addr16(fe.ip),
        port: fe.port,
        proto: fe.protocol.number(),
        scope,
    }
}

/// What the map entries of a frontend depend on beyond the frontend itself.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    maglev_table_size: u32,
    /// The node's addresses and pod CIDRs: who socket-level clients of an LB IP with
    /// loadBalancerSourceRanges are.
    node_ips: &'a [std::net::IpAddr],
    pod_cidrs: &'a [IpNet],
}

impl<'a> Ctx<'a> {
    fn new(desired: &'a DesiredState, maglev_table_size: u32) -> Self {
        Self {
            maglev_table_size,
            node_ips: &desired.masquerade_ips,
            pod_cidrs: &desired.pod_cidrs,
        }
    }
}

/// The socket-level verdicts for a frontend's ranges when the source is not known yet: node
/// clients are admitted when a node address is inside, pod clients when every pod CIDR is.
fn range_admits(ranges: &[IpNet], ctx: Ctx<'_>) -> u32 {
    let mut flags = 0;
    if ctx
        .node_ips
        .iter()
        .any(|ip| ranges.iter().any(|r| r.contains(ip)))
    {
        flags |= service_flags::RANGES_ADMIT_NODE;
    }
    if !ctx.pod_cidrs.is_empty()
        && ctx
            .pod_cidrs
            .iter()
            .all(|c| ranges.iter().any(|r| r.contains(c)))
    {
        flags |= service_flags::RANGES_ADMIT_PODS;
    }
    flags
}

fn wanted(
    fe: &Frontend,
    targets: &Targets,
    frontend: SocketAddr,
    external: bool,
    ctx: Ctx<'_>,
) -> WantedService {
    let maglev_table_size = ctx.maglev_table_size;
    let mut flags = 0;
    // The TC path serves external traffic: masquerade it when the model says so for every
    // external source. (Socket-level load balancing never rewrites a source.) A ClusterIP has
    // no external entry: outside traffic to it is served from its internal entry, which says
    // how to masquerade that traffic.
    if (external || fe.kind == FrontendKind::ClusterIp)
        && fe.external_masquerade == Masquerade::Always
    {
        flags |= service_flags::EXTERNAL_MASQ;
    }
    if !external
        && fe.kind == FrontendKind::ClusterIp
        && fe.external_masquerade == Masquerade::UnlessFromPods
    {
        flags |= service_flags::MASQ_UNLESS_PODS;
    }
    if fe.kind == FrontendKind::ClusterIp {
        flags |= service_flags::CLUSTER_IP;
    }
    if fe.affinity_timeout_secs.is_some() {
        flags |= service_flags::AFFINITY_CLIENT_IP;
    }
    if matches!(targets, Targets::Drop) {
        flags |= FLAG_DROP;
    }
    let mut backends = targets.backends().to_vec();
    if !backends.is_empty() {
        match fe.lb_algorithm {
            LbAlgorithm::Random => {}
            LbAlgorithm::Maglev => {
                flags |= service_flags::MAGLEV;
                backends = super::maglev::table(&backends, maglev_table_size);
            }
            LbAlgorithm::RoundRobin => flags |= service_flags::ROUND_ROBIN,
            LbAlgorithm::LeastConn => flags |= service_flags::LEAST_CONN,
        }
    }
    // loadBalancerSourceRanges apply to every source: outside clients at TC (external
    // key), pods and the node at the socket level (internal key).
    let source_ranges = fe.source_ranges.clone();
    if !source_ranges.is_empty() {
        flags |= service_flags::SOURCE_RANGES;
        if !external {
            flags |= range_admits(&source_ranges, ctx);
        }
    }
    WantedService {
        backends,
        source_ranges,
        flags,
        affinity_timeout_secs: fe.affinity_timeout_secs.unwrap_or(0),
        frontend,
        members: fe.affinity_timeout_secs.is_some(),
    }
}

/// The map entries the desired state asks for: one INTERNAL key per frontend, plus an
/// EXTERNAL key for frontends reachable from outside the cluster.
fn wanted_entries(desired: &DesiredState, maglev: u32) -> BTreeMap<ServiceKey, WantedService> {
    let ctx = Ctx::new(desired, maglev);
    let mut out = BTreeMap::new();
    for (fe_key, fe) in &desired.frontends {
        out.extend(wanted_for(fe_key, fe, ctx));
    }
    out
}

/// The map entries of one frontend.
fn wanted_for(
    fe_key: &FrontendKey,
    fe: &Frontend,
    ctx: Ctx<'_>,
) -> Vec<(ServiceKey, WantedService)> {
    let frontend = SocketAddr::new(fe_key.ip, fe_key.port);
    let mut internal = wanted(fe, &fe.internal, frontend, false, ctx);
    // Unconnected UDP sockets keep their backend while it is a member of the set.
    internal.members |= fe_key.protocol == Protocol::Udp;
    let mut out = vec![(key_for(fe_key, scope::INTERNAL), internal)];
    if fe.kind != FrontendKind::ClusterIp {
        out.push((
            key_for(fe_key, scope::EXTERNAL),
            wanted(fe, &fe.external, frontend, true, ctx),
        ));
    }
    out
}

impl Default for MapDiff {
    fn default() -> Self {
        Self::new(proxy_common::MAGLEV_TABLE_SIZE, ID_QUARANTINE)
    }
}

impl MapDiff {
    /// Rebuilds the renderer's memory from what the maps hold, so a restarted agent applies
    /// only the difference. Slots of revisions no service points at (left by a crash between
    /// publish and cleanup) are returned for deletion by the next sync.
    #[must_use]
    pub fn new(maglev_table_size: u32, quarantine: Duration) -> Self {
        Self {
            services: FastMap::default(),
            backend_ids: FastMap::default(),
            backend_addr: FastMap::default(),
            service_ids: IdPool::new(quarantine),
            backend_ids_pool: IdPool::new(quarantine),
            maglev_table_size,
            next_generation: 0,
            removed_udp: BTreeSet::new(),
        }
    }

    /// Each programmed service id's frontend ("address:port/PROTO") and scope, for the
    /// per-frontend counters.
    #[must_use]
    pub fn frontend_names(&self) -> HashMap<u32, (String, &'static str)> {
        self.services
            .iter()
            .map(|(k, p)| {
                let proto = Protocol::from_number(k.proto).map_or("?", |p| p.as_str());
                let scope = if k.scope == scope::EXTERNAL {
                    "external"
                } else {
                    "internal"
                };
                (
                    p.value.id,
                    (
                        format!("{}/{proto}", sockaddr_from16(k.addr, k.port)),
                        scope,
                    ),
                )
            })
            .collect()
    }

    /// Ids waiting out their quarantine or free (for tests and metrics).
    #[must_use]
    pub fn spare_ids(&self) -> (usize, usize) {
        (self.service_ids.len(), self.backend_ids_pool.len())
    }

    #[must_use]
    pub fn adopt(
        snapshot: &MapsSnapshot,
        maglev_table_size: u32,
        quarantine: Duration,
    ) -> (Self, Vec<BackendSlotKey>) {
        let mut r = Self::new(maglev_table_size, quarantine);
        let mut used_slots = BTreeSet::new();
        for (key, value) in &snapshot.services {
            let mut backends = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let sk = BackendSlotKey {
                    service_id: value.id,
                    revision: value.revision,
                    slot,
                };
                used_slots.insert(sk);
                if let Some(id) = snapshot.slots.get(&sk) {
                    backends.push(*id);
                }
            }
            for id in &backends {
                if let Some(b) = snapshot.backends.get(id) {
                    let addr = sockaddr_from16(b.addr, b.port);
                    r.backend_ids.entry(addr).or_insert((*id, 0)).1 += 1;
                    r.backend_addr.insert(*id, addr);
                    r.next_generation = r.next_generation.max(b.generation + 1);
                }
            }
            let source_ranges = snapshot
                .src_ranges
                .iter()
                .filter(|(id, _)| *id == value.id)
                .map(|(_, r)| *r)
                .collect();
            r.services.insert(
                *key,
                Programmed {
                    value: *value,
                    backends,
                    source_ranges,
                    members: value.flags & service_flags::AFFINITY_CLIENT_IP != 0
                        || (key.scope == scope::INTERNAL && key.proto == proxy_common::proto::UDP),
                },
            );
        }
        let used_ids: BTreeSet<u32> = r.services.values().map(|p| p.value.id).collect();
        r.service_ids = IdPool::adopt(quarantine, &used_ids);
        // Ids of backends still in the map but no longer used count as used until the next
        // sync deletes them (they may be read right now).
        let mut backend_ids: BTreeSet<u32> = snapshot.backends.keys().copied().collect();
        backend_ids.extend(r.backend_ids.values().map(|(id, _)| *id));
        r.backend_ids_pool = IdPool::adopt(quarantine, &backend_ids);
        let live: BTreeSet<u32> = r.backend_ids.values().map(|(id, _)| *id).collect();
        for id in backend_ids.difference(&live) {
            r.backend_ids_pool.release(*id);
        }
        let stale = snapshot
            .slots
            .keys()
            .filter(|k| !used_slots.contains(k))
            .copied()
            .collect();
        (r, stale)
    }

    fn alloc_service_id(&mut self) -> Result<u32> {
        self.service_ids
            .take(map_sizes::SERVICES)
            .ok_or_else(|| Error::MapFull {
                map: proxy_common::map_names::SERVICES.into(),
                detail: format!(
                    "all {} frontend ids are in use or in quarantine",
                    map_sizes::SERVICES
                ),
            })
    }

    /// True when nothing is programmed (a cold start): every write of the next sync is new.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The (frontend, backend) pairs of UDP frontends that lost backends since the last call.
    /// Socket-level load balancing translates a connected UDP socket only once, so the agent
    /// destroys the sockets still connected through these pairs (see `sockterm`).
    pub fn take_removed_udp(&mut self) -> BTreeSet<(SocketAddr, SocketAddr)> {
        std::mem::take(&mut self.removed_udp)
    }

    /// Records the backends of `old` that `key` no longer has (socket-level, UDP only).
    fn note_removed(&mut self, key: &ServiceKey, old: &[u32], now: &[u32]) {
        if key.scope != scope::INTERNAL || key.proto != proxy_common::proto::UDP {
            return;
        }
        let frontend = sockaddr_from16(key.addr, key.port);
        let kept: BTreeSet<SocketAddr> = now
            .iter()
            .filter_map(|id| self.backend_addr.get(id).copied())
            .collect();
        for id in old {
            if let Some(addr) = self.backend_addr.get(id)
                && !kept.contains(addr)
            {
                self.removed_udp.insert((frontend, *addr));
            }
        }
    }

    /// Takes a reference on the backend for `addr`, writing it to the map when new.
    fn acquire_backend(
        &mut self,
        addr: SocketAddr,
        maps: &mut impl LbMaps,
        stats: &mut SyncStats,
    ) -> Result<u32> {
        if let Some((id, refs)) = self.backend_ids.get_mut(&addr) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self
            .backend_ids_pool
            .take(map_sizes::BACKENDS)
            .ok_or_else(|| Error::MapFull {
                map: proxy_common::map_names::BACKENDS.into(),
                detail: format!(
                    "all {} backend ids are in use or in quarantine",
                    map_sizes::BACKENDS
                ),
            })?;
        let backend = Backend {
            addr: addr16(addr.ip()),
            port: addr.port(),
            _pad: 0,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        if let Err(e) = maps.put_backend(id, &backend) {
            self.backend_ids_pool.unuse(id);
            return Err(e.context(format!("writing backend {addr}")));
        }
        stats.backends_written += 1;
        self.backend_ids.insert(addr, (id, 1));
        self.backend_addr.insert(id, addr);
        Ok(id)
    }

    fn release_backend(&mut self, id: u32, maps: &mut impl LbMaps, stats: &mut SyncStats) {
        let Some(addr) = self.backend_addr.get(&id).copied() else {
            return;
        };
        let Some(entry) = self.backend_ids.get_mut(&addr) else {
            return;
        };
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            self.backend_ids.remove(&addr);
            self.backend_addr.remove(&id);
            if maps.del_backend(id).is_ok() {
                stats.backends_deleted += 1;
            }
            self.backend_ids_pool.release(id);
        }
    }

    /// Applies the difference between `desired` and what the maps hold. Errors on single
    /// frontends are collected and returned after every other frontend was synced; a failed
    /// frontend keeps its previous entries.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        maps: &mut impl LbMaps,
        stale_slots: &[BackendSlotKey],
    ) -> (SyncStats, Vec<Error>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        for k in stale_slots {
            if maps.del_slot(k).is_ok() {
                stats.slots_deleted += 1;
            }
        }
        let wanted = wanted_entries(desired, self.maglev_table_size);
        // Deletions first: they free ids and map room for what follows.
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Err(e) = self.remove(&key, maps, &mut stats) {
                errors.push(e);
            }
        }
        for (key, want) in &wanted {
            if let Err(e) = self.upsert(key, want, maps, &mut stats) {
                stats.errors += 1;
                let addr = sockaddr_from16(key.addr, key.port);
                if let Some(protocol) = Protocol::from_number(key.proto) {
                    stats.failed.push(FrontendKey {
                        ip: addr.ip(),
                        port: addr.port(),
                        protocol,
                    });
                }
                // The first errors say what and where; the rest is counted, so a full map
                // does not flood the log.
                if errors.len() < MAX_REPORTED_ERRORS {
                    errors.push(e.context(format!(
                        "frontend {} {}",
                        want.frontend,
                        Protocol::from_number(key.proto).map_or("?", |p| p.as_str())
                    )));
                }
            }
        }
        if stats.errors > errors.len() {
            let more = stats.errors - errors.len();
            let first = errors.first().map(ToString::to_string).unwrap_or_default();
            errors.push(Error::invalid(format!(
                "{more} more frontends failed like the first ({first})"
            )));
        }
        (stats, errors)
    }

    /// Applies the difference for `keys` only: the frontends of the Services that changed.
    /// Work is proportional to what changed, not to the number of Services. `desired` must
    /// already hold the new state of those frontends (absent: they are removed).
    pub fn sync_keys(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
        maps: &mut impl LbMaps,
    ) -> (SyncStats, Vec<Error>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        for fe_key in keys {
            let wanted = desired
                .frontends
                .get(fe_key)
                .map(|fe| wanted_for(fe_key, fe, Ctx::new(desired, self.maglev_table_size)))
                .unwrap_or_default();
            for scope in [scope::INTERNAL, scope::EXTERNAL] {
                let key = key_for(fe_key, scope);
                let result = match wanted.iter().find(|(k, _)| *k == key) {
                    Some((_, want)) => self.upsert(&key, want, maps, &mut stats),
                    None => self.remove(&key, maps, &mut stats),
                };
                if let Err(e) = result {
                    stats.errors += 1;
                    stats.failed.push(*fe_key);
                    errors.push(e.context(format!(
                        "frontend {} {}",
                        SocketAddr::new(fe_key.ip, fe_key.port),
                        fe_key.protocol.as_str()
                    )));
                }
            }
        }
        (stats, errors)
    }

    /// True when `ids` are exactly `want`, slot by slot.
    fn same_backends(&self, ids: &[u32], want: &[SocketAddr]) -> bool {
        ids.len() == want.len()
            && ids
                .iter()
                .zip(want)
                .all(|(id, w)| self.backend_addr.get(id) == Some(w))
    }

    fn upsert(
        &mut self,
        key: &ServiceKey,
        want: &WantedService,
        maps: &mut impl LbMaps,
        stats: &mut SyncStats,
    ) -> Result<()> {
        let old = self.services.get(key).cloned();
        if let Some(old) = &old
            && old.value.flags == want.flags
            && old.value.affinity_timeout_secs == want.affinity_timeout_secs
            && old.members == want.members
            && old.source_ranges == want.source_ranges
            && self.same_backends(&old.backends, &want.backends)
        {
            return Ok(());
        }
        let (id, revision, new_service) = match &old {
            Some(o) => (o.value.id, o.value.revision.wrapping_add(1), false),
            None => (self.alloc_service_id()?, 0, true),
        };
        // 1. backends and slots of the new revision
        let mut ids = Vec::with_capacity(want.backends.len());
        let mut written = Vec::with_capacity(want.backends.len());
        let result = (|| {
            for (slot, addr) in want.backends.iter().enumerate() {
                let backend_id = self.acquire_backend(*addr, maps, stats)?;
                ids.push(backend_id);
                let sk = BackendSlotKey {
                    service_id: id,
                    revision,
                    slot: u32::try_from(slot).map_err(|_| too_many_backends())?,
                };
                maps.put_slot(&sk, backend_id)?;
                written.push(sk);
                stats.slots_written += 1;
            }
            // Source ranges and members go in before the service entry that uses them.
            for r in &want.source_ranges {
                maps.put_src_range(id, r)?;
            }
            if want.members {
                for b in ids.iter().collect::<BTreeSet<_>>() {
                    maps.put_member(&MemberKey {
                        service_id: id,
                        backend_id: *b,
                    })?;
                }
            }
            if new_service {
                maps.put_revnat(
                    id,
                    &RevNatValue {
                        addr: addr16(want.frontend.ip()),
                        port: want.frontend.port(),
                        _pad: 0,
                    },
                )?;
            }
            let value = ServiceValue {
                id,
                backend_count: u32::try_from(ids.len()).map_err(|_| too_many_backends())?,
                revision,
                flags: want.flags,
                affinity_timeout_secs: want.affinity_timeout_secs,
                rr: 0,
            };
            // 2. publish
            maps.put_service(key, &value)?;
            Ok(value)
        })();
        match result {
            Ok(value) => {
                stats.services_written += 1;
                // 3. retire the old revision
                if let Some(old) = old {
                    for r in old
                        .source_ranges
                        .iter()
                        .filter(|r| !want.source_ranges.contains(r))
                    {
                        let _ = maps.del_src_range(id, r);
                    }
                    for slot in 0..old.value.backend_count {
                        let sk = BackendSlotKey {
                            service_id: id,
                            revision: old.value.revision,
                            slot,
                        };
                        if maps.del_slot(&sk).is_ok() {
                            stats.slots_deleted += 1;
                        }
                    }
                    let now: BTreeSet<u32> = if want.members {
                        ids.iter().copied().collect()
                    } else {
                        BTreeSet::new()
                    };
                    for b in old.backends.iter().collect::<BTreeSet<_>>() {
                        if old.members && !now.contains(b) {
                            let _ = maps.del_member(&MemberKey {
                                service_id: id,
                                backend_id: *b,
                            });
                        }
                    }
                    self.note_removed(key, &old.backends, &ids);
                    for b in old.backends {
                        self.release_backend(b, maps, stats);
                    }
                }
                self.services.insert(
                    *key,
                    Programmed {
                        value,
                        backends: ids,
                        source_ranges: want.source_ranges.clone(),
                        members: want.members,
                    },
                );
                Ok(())
            }
            Err(e) => {
                // Undo the unpublished revision; the old one stays in service.
                for sk in &written {
                    let _ = maps.del_slot(sk);
                }
                for b in ids.clone() {
                    self.release_backend(b, maps, stats);
                }
                let kept = old.as_ref().map_or(&[][..], |o| o.source_ranges.as_slice());
                for r in want.source_ranges.iter().filter(|r| !kept.contains(r)) {
                    let _ = maps.del_src_range(id, r);
                }
                let kept: BTreeSet<u32> = old
                    .as_ref()
                    .map(|o| o.backends.iter().copied().collect())
                    .unwrap_or_default();
                if want.members {
                    for b in &ids {
                        if !kept.contains(b) {
                            let _ = maps.del_member(&MemberKey {
                                service_id: id,
                                backend_id: *b,
                            });
                        }
                    }
                }
                if new_service {
                    let _ = maps.del_revnat(id);
                    self.service_ids.unuse(id);
                }
                Err(e)
            }
        }
    }

    fn remove(
        &mut self,
        key: &ServiceKey,
        maps: &mut impl LbMaps,
        stats: &mut SyncStats,
    ) -> Result<()> {
        let Some(old) = self.services.remove(key) else {
            return Ok(());
        };
        maps.del_service(key)?;
        stats.services_deleted += 1;
        for slot in 0..old.value.backend_count {
            let sk = BackendSlotKey {
                service_id: old.value.id,
                revision: old.value.revision,
                slot,
            };
            if maps.del_slot(&sk).is_ok() {
                stats.slots_deleted += 1;
            }
        }
        let _ = maps.del_revnat(old.value.id);
        for r in &old.source_ranges {
            let _ = maps.del_src_range(old.value.id, r);
        }
        if old.members {
            for b in old.backends.iter().collect::<BTreeSet<_>>() {
                let _ = maps.del_member(&MemberKey {
                    service_id: old.value.id,
                    backend_id: *b,
                });
            }
        }
        self.service_ids.release(old.value.id);
        self.note_removed(key, &old.backends, &[]);
        for b in old.backends {
            self.release_backend(b, maps, stats);
        }
        Ok(())
    }
}

/// One frontend as read back from the maps, for `kpr services`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    pub id: u32,
    pub revision: u32,
    pub verdict: String,
    /// "random", "maglev", "round-robin" or "least-conn".
    pub algorithm: String,
    /// The distinct backends (a Maglev table lists each many times).
    pub backends: Vec<String>,
    /// Datapath counters (filled in by `kpr services` from `KPR_STATS`): new flows or
    /// connected sockets, and packets and bytes the TC path translated.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the frontends and their current backends out of a snapshot of the maps.
#[must_use]
pub fn view(snapshot: &MapsSnapshot) -> Vec<FrontendView> {
    snapshot
        .services
        .iter()
        .map(|(k, v)| {
            let backends: Vec<String> = (0..v.backend_count)
                .filter_map(|slot| {
                    snapshot.slots.get(&BackendSlotKey {
                        service_id: v.id,
                        revision: v.revision,
                        slot,
                    })
                })
                .filter_map(|id| snapshot.backends.get(id))
                .map(|b| sockaddr_from16(b.addr, b.port))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|a| a.to_string())
                .collect();
            let verdict = if v.backend_count > 0 {
                "forward"
            } else if v.flags & FLAG_DROP != 0 {
                "drop"
            } else {
                "reject"
            };
            FrontendView {
                frontend: sockaddr_from16(k.addr, k.port).to_string(),
                protocol: Protocol::from_number(k.proto)
                    .map_or_else(|| k.proto.to_string(), |p| p.as_str().to_string()),
                scope: if k.scope == scope::EXTERNAL {
                    "external"
                } else {
                    "internal"
                }
                .to_string(),
                id: v.id,
                revision: v.revision,
                verdict: verdict.to_string(),
                algorithm: if v.flags & service_flags::MAGLEV != 0 {
                    "maglev"
                } else if v.flags & service_flags::ROUND_ROBIN != 0 {
                    "round-robin"
                } else if v.flags & service_flags::LEAST_CONN != 0 {
                    "least-conn"
                } else {
                    "random"
                }
                .to_string(),
                backends,
                flows: 0,
                packets: 0,
                bytes: 0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FrontendKey, ObjectRef};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn state(frontends: &[(&str, Protocol, Targets)]) -> DesiredState {
        let mut d = DesiredState::default();
        for (fe, proto, targets) in frontends {
            let addr = sa(fe);
            d.frontends.insert(
                FrontendKey {
                    ip: addr.ip(),
                    port: addr.port(),
                    protocol: *proto,
                },
                Frontend::new(
                    ObjectRef::new("ns", "svc"),
                    FrontendKind::ClusterIp,
                    targets.clone(),
                ),
            );
        }
        d
    }

    fn backends(list: &[&str]) -> Targets {
        Targets::Backends(list.iter().map(|s| sa(s)).collect())
    }

    fn sync(r: &mut MapDiff, d: &DesiredState, m: &mut MapsSnapshot) -> SyncStats {
        let (stats, errors) = r.sync(d, m, &[]);
        assert!(errors.is_empty(), "{errors:?}");
        stats
    }

    fn frontend_backends(m: &MapsSnapshot, fe: &str) -> Vec<String> {
        let v = view(m);
        let row = v
            .iter()
            .find(|r| r.frontend == fe)
            .unwrap_or_else(|| panic!("{fe} missing: {v:?}"));
        let mut b = row.backends.clone();
        b.sort();
        b
    }

    #[test]
    fn removed_udp_backends_are_reported_per_frontend() {
        let both = ["10.0.1.2:53", "10.0.1.3:53"];
        let mut d = state(&[
            ("10.96.0.10:53", Protocol::Udp, backends(&both)),
            ("10.96.0.11:53", Protocol::Udp, backends(&both)),
            ("10.96.0.10:80", Protocol::Tcp, backends(&["10.0.1.2:80"])),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        assert!(
            r.take_removed_udp().is_empty(),
            "a first sync removes nothing"
        );

        // 10.0.1.2 leaves the first Service only; the TCP frontend loses its only backend.
        d = state(&[
            ("10.96.0.10:53", Protocol::Udp, backends(&["10.0.1.3:53"])),
            ("10.96.0.11:53", Protocol::Udp, backends(&both)),
            ("10.96.0.10:80", Protocol::Tcp, backends(&[])),
        ]);
        sync(&mut r, &d, &mut m);
        let removed: Vec<_> = r.take_removed_udp().into_iter().collect();
        assert_eq!(removed, vec![(sa("10.96.0.10:53"), sa("10.0.1.2:53"))]);
        assert!(r.take_removed_udp().is_empty(), "taken once");

        // Deleting a UDP frontend removes all of its backends.
        d = state(&[("10.96.0.10:53", Protocol::Udp, backends(&["10.0.1.3:53"]))]);
        sync(&mut r, &d, &mut m);
        let removed: Vec<_> = r.take_removed_udp().into_iter().collect();
        assert_eq!(
            removed,
            vec![
                (sa("10.96.0.11:53"), sa("10.0.1.2:53")),
                (sa("10.96.0.11:53"), sa("10.0.1.3:53")),
            ]
        );
    }

    #[test]
    fn first_sync_writes_everything_second_writes_nothing() {
        let d = state(&[
            (
                "10.96.0.10:80",
                Protocol::Tcp,
                backends(&["10.0.1.2:8080", "10.0.1.3:8080"]),
            ),
            ("10.96.0.11:53", Protocol::Udp, backends(&["10.0.1.2:53"])),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        let s = sync(&mut r, &d, &mut m);
        assert_eq!(
            (s.services_written, s.slots_written, s.backends_written),
            (2, 3, 3)
        );
        assert_eq!(m.revnat.len(), 2);
        let again = sync(&mut r, &d, &mut m);
        assert!(again.is_noop(), "{again:?}");
    }

    #[test]
    fn changing_one_frontend_touches_only_that_frontend() {
        let mut d = state(&[
            (
                "10.96.0.10:80",
                Protocol::Tcp,
                backends(&["10.0.1.2:8080", "10.0.1.3:8080"]),
            ),
            ("10.96.0.11:80", Protocol::Tcp, backends(&["10.0.1.4:8080"])),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        let other = key_for(
            &FrontendKey {
                ip: "10.96.0.11".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            scope::INTERNAL,
        );
        let other_before = *m.services.get(&other).expect("10.96.0.11:80 is programmed");
        d = state(&[
            ("10.96.0.10:80", Protocol::Tcp, backends(&["10.0.1.2:8080"])),
            ("10.96.0.11:80", Protocol::Tcp, backends(&["10.0.1.4:8080"])),
        ]);
        let s = sync(&mut r, &d, &mut m);
        assert_eq!(s.services_written, 1);
        assert_eq!(s.slots_written, 1, "new revision has one slot");
        assert_eq!(s.slots_deleted, 2, "old revision's two slots retired");
        assert_eq!(s.backends_deleted, 1, "10.0.1.3 is no longer used");
        assert_eq!(
            frontend_backends(&m, "10.96.0.10:80"),
            vec!["10.0.1.2:8080"]
        );
        let other_after = *m
            .services
            .get(&other)
            .expect("10.96.0.11:80 is still programmed");
        assert_eq!(other_before, other_after, "untouched: same id and revision");
        // No slot of a retired revision is left.
        assert_eq!(m.slots.len(), 2);
    }

    #[test]
    fn shared_backends_are_refcounted() {
        let d = state(&[
            ("10.96.0.10:80", Protocol::Tcp, backends(&["10.0.1.2:8080"])),
            ("10.96.0.11:80", Protocol::Tcp, backends(&["10.0.1.2:8080"])),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        assert_eq!(m.backends.len(), 1);
        let d2 = state(&[("10.96.0.11:80", Protocol::Tcp, backends(&["10.0.1.2:8080"]))]);
        let s = sync(&mut r, &d2, &mut m);
        assert_eq!((s.services_deleted, s.backends_deleted), (1, 0));
        assert_eq!(m.backends.len(), 1);
        let s = sync(&mut r, &DesiredState::default(), &mut m);
        assert_eq!((s.services_deleted, s.backends_deleted), (1, 1));
        assert_eq!(m, MapsSnapshot::default(), "everything removed");
    }

    #[test]
    fn no_endpoints_is_a_reject_entry_and_drop_is_flagged() {
        let d = state(&[
            ("10.96.0.10:80", Protocol::Tcp, Targets::Reject),
            ("10.96.0.11:80", Protocol::Tcp, Targets::Drop),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        let verdicts: Vec<_> = view(&m)
            .into_iter()
            .map(|v| (v.frontend, v.verdict))
            .collect();
        assert_eq!(
            verdicts,
            vec![
                ("10.96.0.10:80".into(), "reject".into()),
                ("10.96.0.11:80".into(), "drop".into())
            ]
        );
    }

    #[test]
    fn adopting_the_maps_makes_the_next_sync_a_noop() {
        let d = state(&[
            (
                "10.96.0.10:80",
                Protocol::Tcp,
                backends(&["10.0.1.2:8080", "10.0.1.3:8080"]),
            ),
            (
                "[fd00::10]:80",
                Protocol::Tcp,
                backends(&["[fd00:1::2]:8080"]),
            ),
        ]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        // A crash between publish and retire leaves a stray slot behind.
        m.slots.insert(
            BackendSlotKey {
                service_id: 0,
                revision: 77,
                slot: 0,
            },
            0,
        );
        let (mut adopted, stale) =
            MapDiff::adopt(&m, proxy_common::MAGLEV_TABLE_SIZE, ID_QUARANTINE);
        assert_eq!(stale.len(), 1);
        let (s, errors) = adopted.sync(&d, &mut m, &stale);
        assert!(errors.is_empty());
        assert_eq!(s.services_written, 0, "{s:?}");
        assert_eq!(s.slots_deleted, 1);
        // A new frontend gets a fresh id, not one in use.
        let d2 = {
            let mut d2 = d.clone();
            d2.frontends.extend(
                state(&[("10.96.0.12:80", Protocol::Tcp, backends(&["10.0.1.9:80"]))]).frontends,
            );
            d2
        };
        sync(&mut adopted, &d2, &mut m);
        let ids: BTreeSet<u32> = m.services.values().map(|v| v.id).collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn a_full_map_keeps_the_old_backend_set() {
        let d = state(&[("10.96.0.10:80", Protocol::Tcp, backends(&["10.0.1.2:8080"]))]);
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        let before = m.clone();
        m.slot_capacity = Some(2);
        let bigger = state(&[(
            "10.96.0.10:80",
            Protocol::Tcp,
            backends(&["10.0.1.2:8080", "10.0.1.3:8080", "10.0.1.4:8080"]),
        )]);
        let (_, errors) = r.sync(&bigger, &mut m, &[]);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].is_map_full(),
            "a full map, typed: {:?}",
            errors[0]
        );
        assert!(
            errors[0].to_string().contains("10.96.0.10:80"),
            "the error names the frontend: {}",
            errors[0]
        );
        m.slot_capacity = None;
        assert_eq!(
            m, before,
            "the old backend set stays published, nothing half-written"
        );
        // Once there is room, the next sync succeeds.
        sync(&mut r, &bigger, &mut m);
        assert_eq!(frontend_backends(&m, "10.96.0.10:80").len(), 3);
    }

    #[test]
    fn maglev_frontends_get_a_table_and_ranges_come_and_go() {
        let mut d = state(&[(
            "1.2.3.4:80",
            Protocol::Tcp,
            backends(&["10.0.1.2:80", "10.0.1.3:80"]),
        )]);
        for fe in d.frontends.values_mut() {
            fe.kind = FrontendKind::LoadBalancer;
            fe.lb_algorithm = crate::store::LbAlgorithm::Maglev;
            fe.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        }
        let mut r = MapDiff::default();
        let mut m = MapsSnapshot::default();
        sync(&mut r, &d, &mut m);
        // internal + external keys, each a full table
        assert_eq!(m.slots.len(), 2 * proxy_common::MAGLEV_TABLE_SIZE as usize);
        assert_eq!(m.backends.len(), 2, "table slots share backend entries");
        let ext = view(&m)
            .into_iter()
            .find(|v| v.scope == "external")
            .unwrap();
        assert_eq!((ext.algorithm.as_str(), ext.backends.len()), ("maglev", 2));
        assert_eq!(
            m.src_ranges.len(),
            2,
            "ranges on both keys: outside clients (TC) and pods or the node (sockets)"
        );
        assert!(sync(&mut r, &d, &mut m).is_noop());
        for fe in d.frontends.values_mut() {
            fe.source_ranges.clear();
        }
        sync(&mut r, &d, &mut m);
        assert!(m.src_ranges.is_empty());
        let (mut adopted, _) = MapDiff::adopt(&m, proxy_common::MAGLEV_TABLE_SIZE, ID_QUARANTINE);
        assert!(adopted.sync(&d, &mut m, &[]).0.is_noop());
        sync(&mut r, &DesiredState::default(), &mut m);
        assert!(m.slots.is_empty() && m.backends.is_empty());
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn socket_clients_are_admitted_by_where_they_live() {
        let node = ["192.168.0.2".parse().unwrap()];
        let pods: Vec<IpNet> = vec![
            "10.0.0.0/24".parse().unwrap(),
            "10.0.1.0/24".parse().unwrap(),
        ];
        let ctx = Ctx {
            maglev_table_size: 251,
            node_ips: &node,
            pod_cidrs: &pods,
        };
        let r = |s: &[&str]| -> Vec<IpNet> { s.iter().map(|x| x.parse().unwrap()).collect() };
        assert_eq!(range_admits(&r(&["192.0.2.0/24"]), ctx), 0);
        assert_eq!(
            range_admits(&r(&["192.168.0.0/16"]), ctx),
            service_flags::RANGES_ADMIT_NODE
        );
        assert_eq!(
            range_admits(&r(&["10.0.0.0/16"]), ctx),
            service_flags::RANGES_ADMIT_PODS
        );
        // One pod CIDR of two inside: pods are not all admitted.
        assert_eq!(range_admits(&r(&["10.0.0.0/24"]), ctx), 0);
        assert_eq!(
            range_admits(&r(&["0.0.0.0/0"]), ctx),
            service_flags::RANGES_ADMIT_NODE | service_flags::RANGES_ADMIT_PODS
        );
    }
}
