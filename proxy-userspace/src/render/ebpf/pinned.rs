//! The pinned maps, opened by path: typed reads and writes (the [`LbMaps`] the map diff
//! writes through), whole-map snapshots, and `BPF_MAP_UPDATE_BATCH` for cold starts.
use std::os::fd::AsFd as _;

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use proxy_common::{
    Backend, BackendSlotKey, CtKey, CtValue, MemberKey, NodeConfig, RevNatValue, ServiceKey,
    ServiceStats, ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeData, drop_reason,
    map_names,
};

use super::datapath::PinLayout;
use super::maps::{LbMaps, MapsSnapshot};
use crate::{Error, Result};

/// The pinned load-balancing maps, opened by path.
pub struct PinnedMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    slots: BpfHashMap<MapData, BackendSlotKey, u32>,
    backends: BpfHashMap<MapData, u32, Backend>,
    revnat: BpfHashMap<MapData, u32, RevNatValue>,
    sock_revnat: BpfHashMap<MapData, SockRevNatKey, SockRevNatValue>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    config: aya::maps::Array<MapData, NodeConfig>,
    src_ranges: aya::maps::LpmTrie<MapData, SrcRangeData, u8>,
    members: BpfHashMap<MapData, MemberKey, u32>,
    stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    drops: PerCpuArray<MapData, u64>,
    conns: BpfHashMap<MapData, u32, u32>,
    conntrack_capacity: u32,
}

/// The `KPR_SRC_RANGES` key of (service id, range).
fn src_range_key(service_id: u32, range: &ipnet::IpNet) -> aya::maps::lpm_trie::Key<SrcRangeData> {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&service_id.to_be_bytes());
    data[4..].copy_from_slice(&super::addr16(range.network()));
    let bits = match range {
        ipnet::IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        ipnet::IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    aya::maps::lpm_trie::Key::new(32 + bits, data)
}

/// The inverse of `src_range_key`.
fn src_range_of(key: &aya::maps::lpm_trie::Key<SrcRangeData>) -> Option<(u32, ipnet::IpNet)> {
    let data = key.data();
    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&data[4..]);
    let ip = super::ip_from16(addr);
    let bits = key.prefix_len().checked_sub(32)?;
    let net = match ip {
        std::net::IpAddr::V4(v4) => ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(v4, u8::try_from(bits.checked_sub(96)?).ok()?).ok()?,
        ),
        std::net::IpAddr::V6(v6) => {
            ipnet::IpNet::V6(ipnet::Ipv6Net::new(v6, u8::try_from(bits).ok()?).ok()?)
        }
    };
    Some((id, net))
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &str,
    lru: bool,
) -> Result<BpfHashMap<MapData, K, V>> {
    let data = open_pinned(layout, name)?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    BpfHashMap::try_from(map).map_err(|e| Error::map(name, "typing", e))
}

impl PinnedMaps {
    /// Opens the maps pinned under `layout`.
    ///
    /// # Errors
    /// A map is not pinned or has another layout.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            services: open_hash(layout, map_names::SERVICES, false)?,
            slots: open_hash(layout, map_names::BACKEND_SLOTS, false)?,
            backends: open_hash(layout, map_names::BACKENDS, false)?,
            revnat: open_hash(layout, map_names::REVNAT, false)?,
            sock_revnat: open_hash(layout, map_names::SOCK_REVNAT, true)?,
            conntrack: open_hash(layout, map_names::CONNTRACK, true)?,
            config: aya::maps::Array::try_from(Map::Array(open_pinned(layout, map_names::CONFIG)?))
                .map_err(|e| Error::map(map_names::CONFIG, "typing", e))?,
            src_ranges: aya::maps::LpmTrie::try_from(Map::LpmTrie(open_pinned(
                layout,
                map_names::SRC_RANGES,
            )?))
            .map_err(|e| Error::map(map_names::SRC_RANGES, "typing", e))?,
            members: open_hash(layout, map_names::MEMBERS, false)?,
            stats: PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(
                layout,
                map_names::STATS,
            )?))
            .map_err(|e| Error::map(map_names::STATS, "typing", e))?,
            drops: PerCpuArray::try_from(Map::PerCpuArray(open_pinned(layout, map_names::DROPS)?))
                .map_err(|e| Error::map(map_names::DROPS, "typing", e))?,
            conns: open_hash(layout, map_names::BACKEND_CONNS, false)?,
            conntrack_capacity: open_pinned(layout, map_names::CONNTRACK)?
                .info()
                .map_or(proxy_common::map_sizes::CONNTRACK as u32, |i| {
                    i.max_entries()
                }),
        })
    }

    /// Per-service counters, summed over CPUs.
    ///
    /// # Errors
    /// The kernel refused a read.
    pub fn service_stats(&self) -> Result<BTreeMap<u32, ServiceStats>> {
        let mut out = BTreeMap::new();
        for r in self.stats.iter() {
            let (id, per_cpu) = r.map_err(|e| Error::map(map_names::STATS, "reading", e))?;
            let mut sum = ServiceStats::default();
            for s in per_cpu.iter() {
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.flows += s.flows;
            }
            out.insert(id, sum);
        }
        Ok(out)
    }

    /// Forgets a service id's counters (the id was freed).
    pub fn forget_service_stats(&mut self, id: u32) {
        let _ = self.stats.remove(&id);
    }

    /// Drops by reason (`drop_reason`), summed over CPUs.
    ///
    /// # Errors
    /// The kernel refused a read.
    pub fn drops(&self) -> Result<[u64; drop_reason::COUNT as usize]> {
        let mut out = [0u64; drop_reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .drops
                .get(&(i as u32), 0)
                .map_err(|e| Error::map(map_names::DROPS, "reading", e))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Live connections per least-connection backend id.
    ///
    /// # Errors
    /// The kernel refused a read.
    pub fn backend_conns(&self) -> Result<BTreeMap<u32, u32>> {
        self.conns
            .iter()
            .map(|r| r.map_err(|e| Error::map(map_names::BACKEND_CONNS, "reading", e)))
            .collect()
    }

    /// Takes one live connection off a backend (a flow the datapath counted expired).
    pub fn backend_conn_done(&mut self, id: u32) {
        if let Ok(n) = self.conns.get(&id, 0) {
            let _ = self.conns.insert(&id, &n.saturating_sub(1), 0);
        }
    }

    /// The conntrack map's size (`max_entries`).
    #[must_use]
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    /// Deletes one conntrack entry.
    pub fn conntrack_del(&mut self, key: &CtKey) -> bool {
        self.conntrack.remove(key).is_ok()
    }

    /// Sets the address masqueraded traffic leaves with.
    ///
    /// # Errors
    /// The kernel refused the write.
    pub fn set_node_config(&mut self, cfg: &NodeConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| map_err(map_names::CONFIG, "set", e))
    }

    /// What KPR_CONFIG holds.
    ///
    /// # Errors
    /// The kernel refused the read.
    pub fn node_config(&self) -> Result<Option<NodeConfig>> {
        match self.config.get(&0, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CONFIG, "read", e)),
        }
    }

    /// One conntrack entry.
    ///
    /// # Errors
    /// The kernel refused the read.
    pub fn conntrack_get(&self, key: &CtKey) -> Result<Option<CtValue>> {
        match self.conntrack.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CONNTRACK, "read", e)),
        }
    }

    /// Writes one conntrack entry.
    ///
    /// # Errors
    /// The kernel refused the write.
    pub fn conntrack_put(&mut self, key: &CtKey, value: &CtValue) -> Result<()> {
        self.conntrack
            .insert(key, value, 0)
            .map_err(|e| map_err(map_names::CONNTRACK, "insert", e))
    }

    /// Every conntrack entry (for `kpr conntrack`-style inspection and tests).
    ///
    /// # Errors
    /// The kernel refused a read.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        self.conntrack
            .iter()
            .map(|r| r.map_err(|e| Error::map(map_names::CONNTRACK, "reading", e)))
            .collect()
    }

    /// Reads every load-balancing map.
    ///
    /// # Errors
    /// The kernel refused a read.
    pub fn snapshot(&self) -> Result<MapsSnapshot> {
        fn collect<K: aya::Pod + Ord, V: aya::Pod>(
            m: &BpfHashMap<MapData, K, V>,
            name: &str,
        ) -> Result<std::collections::BTreeMap<K, V>> {
            m.iter()
                .map(|r| r.map_err(|e| Error::map(name, "reading", e)))
                .collect()
        }
        Ok(MapsSnapshot {
            services: collect(&self.services, map_names::SERVICES)?,
            slots: collect(&self.slots, map_names::BACKEND_SLOTS)?,
            backends: collect(&self.backends, map_names::BACKENDS)?,
            revnat: collect(&self.revnat, map_names::REVNAT)?,
            src_ranges: self
                .src_ranges
                .keys()
                .filter_map(|k| k.ok().and_then(|k| src_range_of(&k)))
                .collect(),
            members: self
                .members
                .keys()
                .filter_map(std::result::Result::ok)
                .collect(),
            slot_capacity: None,
        })
    }

    /// The frontend a socket was connected through (its socket-LB reverse-NAT entry).
    #[must_use]
    pub fn sock_revnat_get(&self, key: &SockRevNatKey) -> Option<SockRevNatValue> {
        self.sock_revnat.get(key, 0).ok()
    }

    /// Forgets a socket's reverse-NAT entry (its socket was destroyed).
    pub fn sock_revnat_del(&mut self, key: &SockRevNatKey) {
        let _ = self.sock_revnat.remove(key);
    }

    /// Number of live socket reverse-NAT entries (for metrics and tests).
    #[must_use]
    pub fn sock_revnat_len(&self) -> usize {
        self.sock_revnat.keys().count()
    }
}

/// `BPF_MAP_UPDATE_BATCH` of `count` fixed-size keys and values. On failure the error says
/// how many elements the kernel wrote before refusing one.
fn update_batch(map: &MapData, keys: &[u8], values: &[u8], count: usize) -> std::io::Result<()> {
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(count).map_err(|_| std::io::Error::other("batch too large"))?,
        map_fd: std::os::fd::AsRawFd::as_raw_fd(&map.fd().as_fd()) as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: bpf(2) with a correctly laid out attribute that points at buffers holding
    // `count` keys and values, all alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("{e} after {} of {count} elements", attr.count),
        ));
    }
    Ok(())
}

/// Writes `entries` in batches of 8k with BPF_MAP_UPDATE_BATCH.
pub(super) fn write_batched<K: bytemuck::Pod, V: bytemuck::Pod>(
    layout: &PinLayout,
    name: &str,
    entries: &[(K, V)],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let map = open_pinned(layout, name)?;
    for chunk in entries.chunks(8192) {
        let mut keys = Vec::with_capacity(chunk.len() * size_of::<K>());
        let mut values = Vec::with_capacity(chunk.len() * size_of::<V>());
        for (k, v) in chunk {
            keys.extend_from_slice(bytemuck::bytes_of(k));
            values.extend_from_slice(bytemuck::bytes_of(v));
        }
        update_batch(&map, &keys, &values, chunk.len()).map_err(|io_error| {
            Error::map(
                name,
                "batch update",
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error,
                }),
            )
        })?;
    }
    Ok(())
}

/// Map writes of a cold-start sync, held back and written with BPF_MAP_UPDATE_BATCH in
/// dependency order (backends, slots, reverse NAT, then the service entries that publish
/// them), so a frontend is never visible before its backends. Deletes go straight through
/// (and cancel a held-back write of the same key).
pub(super) struct Batched<'a> {
    pub inner: &'a mut PinnedMaps,
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub slots: Vec<(BackendSlotKey, u32)>,
    pub backends: Vec<(u32, Backend)>,
    pub revnat: Vec<(u32, RevNatValue)>,
}

impl LbMaps for Batched<'_> {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.push((*key, *value));
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.retain(|(k, _)| k != key);
        self.inner.del_service(key)
    }
    fn put_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<()> {
        self.slots.push((*key, backend_id));
        Ok(())
    }
    fn del_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        self.slots.retain(|(k, _)| k != key);
        self.inner.del_slot(key)
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.push((id, *backend));
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.backends.retain(|(k, _)| *k != id);
        self.inner.del_backend(id)
    }
    fn put_revnat(&mut self, id: u32, value: &RevNatValue) -> Result<()> {
        self.revnat.push((id, *value));
        Ok(())
    }
    fn del_revnat(&mut self, id: u32) -> Result<()> {
        self.revnat.retain(|(k, _)| *k != id);
        self.inner.del_revnat(id)
    }
    fn put_src_range(&mut self, service_id: u32, range: &ipnet::IpNet) -> Result<()> {
        self.inner.put_src_range(service_id, range)
    }
    fn del_src_range(&mut self, service_id: u32, range: &ipnet::IpNet) -> Result<()> {
        self.inner.del_src_range(service_id, range)
    }
    fn put_member(&mut self, key: &MemberKey) -> Result<()> {
        self.inner.put_member(key)
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        self.inner.del_member(key)
    }
}

/// Test hook for crash-consistency tests: with `KPR_TEST_CRASH_AFTER_MAP_WRITES=N` in its
/// environment the agent SIGKILLs itself just before its N-th single-entry write to the
/// load-balancing maps, so a crash lands at a chosen point of a sync (a kill from outside
/// rarely does). Inert without the variable.
fn crash_point() {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LEFT: AtomicI64 = AtomicI64::new(i64::MIN);
    let mut left = LEFT.load(Ordering::Relaxed);
    if left == i64::MIN {
        left = std::env::var("KPR_TEST_CRASH_AFTER_MAP_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1);
        LEFT.store(left, Ordering::Relaxed);
    }
    if left < 0 {
        return;
    }
    if left <= 1 {
        // SAFETY: kill(2) on this process: it dies here, as from an outside SIGKILL.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    LEFT.store(left - 1, Ordering::Relaxed);
}

fn map_err(name: &str, op: &'static str, e: aya::maps::MapError) -> Error {
    Error::map(name, op, e)
}

fn open_pinned(layout: &PinLayout, name: &str) -> Result<MapData> {
    let path = layout.map(name);
    MapData::from_pin(&path)
        .map_err(|e| Error::map(path.display().to_string(), "opening pinned map", e))
        .map_err(|e| e.context("is the agent running, or was `kpr cleanup` run?"))
}

impl LbMaps for PinnedMaps {
    fn put_member(&mut self, key: &MemberKey) -> Result<()> {
        self.members
            .insert(key, &1, 0)
            .map_err(|e| map_err(map_names::MEMBERS, "insert", e))
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        self.members
            .remove(key)
            .map_err(|e| map_err(map_names::MEMBERS, "delete", e))
    }
    fn put_src_range(&mut self, service_id: u32, range: &ipnet::IpNet) -> Result<()> {
        self.src_ranges
            .insert(&src_range_key(service_id, range), &1, 0)
            .map_err(|e| map_err(map_names::SRC_RANGES, "insert", e))
    }
    fn del_src_range(&mut self, service_id: u32, range: &ipnet::IpNet) -> Result<()> {
        self.src_ranges
            .remove(&src_range_key(service_id, range))
            .map_err(|e| map_err(map_names::SRC_RANGES, "delete", e))
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        crash_point();
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_err(map_names::SERVICES, "insert", e))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        crash_point();
        self.services
            .remove(key)
            .map_err(|e| map_err(map_names::SERVICES, "delete", e))
    }
    fn put_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<()> {
        crash_point();
        self.slots
            .insert(key, &backend_id, 0)
            .map_err(|e| map_err(map_names::BACKEND_SLOTS, "insert", e))
    }
    fn del_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        crash_point();
        self.slots
            .remove(key)
            .map_err(|e| map_err(map_names::BACKEND_SLOTS, "delete", e))
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        crash_point();
        self.backends
            .insert(&id, backend, 0)
            .map_err(|e| map_err(map_names::BACKENDS, "insert", e))
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        crash_point();
        self.backends
            .remove(&id)
            .map_err(|e| map_err(map_names::BACKENDS, "delete", e))
    }
    fn put_revnat(&mut self, id: u32, value: &RevNatValue) -> Result<()> {
        crash_point();
        self.revnat
            .insert(&id, value, 0)
            .map_err(|e| map_err(map_names::REVNAT, "insert", e))
    }
    fn del_revnat(&mut self, id: u32) -> Result<()> {
        crash_point();
        self.revnat
            .remove(&id)
            .map_err(|e| map_err(map_names::REVNAT, "delete", e))
    }
}
