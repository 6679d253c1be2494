//! Loading, attaching, pinning, adopting and removing kpr's eBPF programs and maps.
//!
//! Layout under the bpffs path (default `/sys/fs/bpf/kpr`):
//! ```text
//! v<MAP_LAYOUT_VERSION>/maps/KPR_SERVICES ...        pinned maps (shared by every program)
//! v<MAP_LAYOUT_VERSION>/prog-<object hash>/connect4  pinned cgroup links, one per hook
//! ```
//! A restarted agent whose object hash matches adopts the pinned links and maps without
//! loading anything. A new kpr binary (another hash) loads its programs and swaps them into
//! the existing links atomically (`BPF_LINK_UPDATE`), so the datapath never has a gap.
use std::fs;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::links::LinkOrder;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttach};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use proxy_common::{
    Backend, BackendSlotKey, CtKey, CtValue, MAP_LAYOUT_VERSION, NodeConfig, RevNatValue,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeData, map_names,
};

use super::render::{LbMaps, MapsSnapshot};
use crate::{Error, Result};

/// The eBPF object built from `proxy-ebpf`, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpr-ebpf"));

/// The socket-LB programs: (program name in the object, pin name of its link).
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    ("kpr_connect4", "connect4"),
    ("kpr_connect6", "connect6"),
    ("kpr_sendmsg4", "sendmsg4"),
    ("kpr_sendmsg6", "sendmsg6"),
    ("kpr_recvmsg4", "recvmsg4"),
    ("kpr_recvmsg6", "recvmsg6"),
    ("kpr_getpeername4", "getpeername4"),
    ("kpr_getpeername6", "getpeername6"),
];

/// The TC programs: (program name in the object, pin name of the program).
pub const TC_PROGRAMS: [(&str, &str); 2] = [
    ("kpr_tc_ingress", "tc_ingress"),
    ("kpr_tc_egress", "tc_egress"),
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `tc-<ifindex>-<ifname>-<direction>` -> direction.
fn tc_link_direction(pin_name: &str) -> Option<&'static str> {
    if !pin_name.starts_with("tc-") {
        return None;
    }
    if pin_name.ends_with("-ingress") {
        Some("ingress")
    } else if pin_name.ends_with("-egress") {
        Some("egress")
    } else {
        None
    }
}

/// The network interfaces of the current network namespace: (ifindex, name).
#[must_use]
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Which interfaces get the TC programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcInterfaces {
    /// Every interface of the agent's network namespace but loopback (rescanned, so pod
    /// interfaces created later are covered).
    All,
    /// Only these names.
    Named(Vec<String>),
    /// No TC programs (socket load balancing only).
    None,
}

/// Attaches this build's pinned TC programs (ingress and egress, tcx) to every selected
/// interface that lacks them, pins the links, and forgets links of interfaces that are gone.
/// Returns the interfaces newly attached.
///
/// # Errors
/// The pinned programs cannot be opened. Per-interface failures are logged and skipped.
pub fn sync_tc_links(layout: &PinLayout, select: &TcInterfaces) -> Result<Vec<String>> {
    if *select == TcInterfaces::None {
        return Ok(Vec::new());
    }
    let dir = layout.links_dir(&object_hash());
    let ifaces = interfaces();
    // Links of vanished interfaces: unpin (the kernel already detached them).
    for entry in fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if tc_link_direction(&name).is_none() {
            continue;
        }
        let alive = ifaces
            .iter()
            .any(|(idx, ifname)| name.starts_with(&format!("tc-{idx}-{ifname}-")));
        if !alive {
            let _ = fs::remove_file(entry.path());
        }
    }
    let mut programs = Vec::new();
    for (_, pin) in TC_PROGRAMS {
        let path = dir.join(pin);
        programs.push(
            SchedClassifier::from_pin(&path)
                .map_err(|e| Error::bpf(format!("opening {}: {e}", path.display())))?,
        );
    }
    let mut attached = Vec::new();
    for (idx, name) in ifaces {
        let wanted = match select {
            TcInterfaces::All => name != "lo",
            TcInterfaces::Named(names) => names.contains(&name),
            TcInterfaces::None => false,
        };
        if !wanted {
            continue;
        }
        for (i, direction, attach_type) in [
            (0, "ingress", TcAttachType::Ingress),
            (1, "egress", TcAttachType::Egress),
        ] {
            let prog = &mut programs[i];
            let pin = dir.join(format!("tc-{idx}-{name}-{direction}"));
            if pin.exists() {
                continue;
            }
            let result = prog
                .attach(
                    idx,
                    TcAttach::Tcx {
                        attach_type,
                        order: LinkOrder::default(),
                    },
                )
                .map_err(|e| Error::bpf(format!("attaching TC {direction} to {name}: {e}")))
                .and_then(|id| prog.take_link(id).map_err(|e| Error::bpf(e.to_string())))
                .and_then(|link| FdLink::try_from(link).map_err(|e| Error::bpf(e.to_string())))
                .and_then(|fd| {
                    fd.pin(&pin)
                        .map(|_| ())
                        .map_err(|e| Error::bpf(format!("pinning {}: {e}", pin.display())))
                });
            match result {
                Ok(()) => attached.push(format!("{name}/{direction}")),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
    Ok(attached)
}

/// FNV-1a of the embedded object: names the directory of this build's links.
#[must_use]
pub fn object_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in EBPF_OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Where things are pinned.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    #[must_use]
    pub fn new(bpf_fs_path: &Path) -> Self {
        Self {
            root: bpf_fs_path.to_path_buf(),
        }
    }
    #[must_use]
    pub fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{MAP_LAYOUT_VERSION}"))
    }
    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    #[must_use]
    pub fn links_dir(&self, hash: &str) -> PathBuf {
        self.versioned().join(format!("prog-{hash}"))
    }
    /// Link directories of other builds.
    fn other_link_dirs(&self, hash: &str) -> Vec<PathBuf> {
        let mine = format!("prog-{hash}");
        fs::read_dir(self.versioned())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("prog-") && n != mine
            })
            .map(|e| e.path())
            .collect()
    }
}

/// Mounts a bpffs at /sys/fs/bpf when `path` is below it and nothing is mounted there yet
/// (what a DaemonSet's host mount or systemd normally provides).
fn mount_bpffs_if_missing(path: &Path) {
    let bpf = Path::new("/sys/fs/bpf");
    if !path.starts_with(bpf) || statfs_magic(bpf) == Some(BPF_FS_MAGIC) {
        return;
    }
    let _ = fs::create_dir_all(bpf);
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::warn!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs with a valid C string and an out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return None;
    }
    Some(st.f_type)
}

/// Fails with a clear message unless `path` is on a bpffs.
fn check_bpffs(path: &Path) -> Result<()> {
    mount_bpffs_if_missing(path);
    let probe = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if statfs_magic(probe) != Some(BPF_FS_MAGIC) {
        return Err(Error::invalid(format!(
            "{} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
            probe.display()
        )));
    }
    Ok(())
}

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

/// Loads the eBPF object with its maps pinned (or reused) under `layout`, without loading
/// or attaching any program.
///
/// # Errors
/// The kernel refused a map.
pub fn load_object(layout: &PinLayout) -> Result<aya::Ebpf> {
    check_object()?;
    let dir = layout.maps_dir();
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::bpf(format!("loading the eBPF object: {e}")))
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &str,
    lru: bool,
) -> Result<BpfHashMap<MapData, K, V>> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        Error::bpf(format!(
            "opening pinned map {}: {e} (is the agent running, or was `kpr cleanup` run?)",
            path.display()
        ))
    })?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    BpfHashMap::try_from(map).map_err(|e| Error::bpf(format!("map {name}: {e}")))
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
            config: {
                let path = layout.map(map_names::CONFIG);
                let data = MapData::from_pin(&path)
                    .map_err(|e| Error::bpf(format!("opening {}: {e}", path.display())))?;
                aya::maps::Array::try_from(Map::Array(data))
                    .map_err(|e| Error::bpf(format!("map {}: {e}", map_names::CONFIG)))?
            },
            src_ranges: {
                let path = layout.map(map_names::SRC_RANGES);
                let data = MapData::from_pin(&path)
                    .map_err(|e| Error::bpf(format!("opening {}: {e}", path.display())))?;
                aya::maps::LpmTrie::try_from(Map::LpmTrie(data))
                    .map_err(|e| Error::bpf(format!("map {}: {e}", map_names::SRC_RANGES)))?
            },
        })
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
            .map(|r| r.map_err(|e| Error::bpf(format!("reading {}: {e}", map_names::CONNTRACK))))
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
                .map(|r| r.map_err(|e| Error::bpf(format!("reading {name}: {e}"))))
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
fn write_batched<K: bytemuck::Pod, V: bytemuck::Pod>(
    layout: &PinLayout,
    name: &str,
    entries: &[(K, V)],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let path = layout.map(name);
    let map = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}: {e}", path.display())))?;
    for chunk in entries.chunks(8192) {
        let mut keys = Vec::with_capacity(chunk.len() * size_of::<K>());
        let mut values = Vec::with_capacity(chunk.len() * size_of::<V>());
        for (k, v) in chunk {
            keys.extend_from_slice(bytemuck::bytes_of(k));
            values.extend_from_slice(bytemuck::bytes_of(v));
        }
        update_batch(&map, &keys, &values, chunk.len())
            .map_err(|e| Error::bpf(format!("batch update of {name}: {e}")))?;
    }
    Ok(())
}

/// Map writes of a cold-start sync, held back and written with BPF_MAP_UPDATE_BATCH in
/// dependency order (backends, slots, reverse NAT, then the service entries that publish
/// them), so a frontend is never visible before its backends. Deletes go straight through
/// (and cancel a held-back write of the same key).
struct Batched<'a> {
    inner: &'a mut PinnedMaps,
    services: Vec<(ServiceKey, ServiceValue)>,
    slots: Vec<(BackendSlotKey, u32)>,
    backends: Vec<(u32, Backend)>,
    revnat: Vec<(u32, RevNatValue)>,
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
}

/// A full sync. From a cold start (nothing programmed) the writes go out with
/// BPF_MAP_UPDATE_BATCH; if the kernel refuses a batch (a full map, say), the renderer
/// re-reads what the maps hold and finishes element by element, where every frontend's
/// failure is reported on its own and leaves nothing half-published.
pub fn sync_full(
    renderer: &mut super::render::EbpfRenderer,
    desired: &crate::model::DesiredState,
    maps: &mut PinnedMaps,
    layout: &PinLayout,
    stale_slots: &[BackendSlotKey],
) -> (super::render::SyncStats, Vec<Error>) {
    if !renderer.is_empty() {
        return renderer.sync(desired, maps, stale_slots);
    }
    let mut batched = Batched {
        inner: maps,
        services: Vec::new(),
        slots: Vec::new(),
        backends: Vec::new(),
        revnat: Vec::new(),
    };
    let (stats, errors) = renderer.sync(desired, &mut batched, stale_slots);
    let Batched {
        services,
        slots,
        backends,
        revnat,
        ..
    } = batched;
    // Backends and slots are independent of each other (two cores write them at once); the
    // service entries that publish them go last.
    let flushed = std::thread::scope(|s| {
        let b = s.spawn(|| write_batched(layout, map_names::BACKENDS, &backends));
        let r = write_batched(layout, map_names::BACKEND_SLOTS, &slots)
            .and_then(|()| write_batched(layout, map_names::REVNAT, &revnat));
        b.join()
            .unwrap_or_else(|_| Err(Error::bpf("batch writer thread panicked")))
            .and(r)
    })
    .and_then(|()| write_batched(layout, map_names::SERVICES, &services));
    match flushed {
        Ok(()) => (stats, errors),
        Err(e) => {
            tracing::warn!("{e}; finishing the sync one element at a time");
            match maps.snapshot() {
                Ok(snapshot) => {
                    let (fresh, stale) = super::render::EbpfRenderer::adopt(&snapshot);
                    *renderer = fresh;
                    renderer.sync(desired, maps, &stale)
                }
                Err(e2) => (stats, vec![e, e2]),
            }
        }
    }
}

fn map_err(name: &str, op: &str, e: aya::maps::MapError) -> Error {
    Error::bpf(format!("{op} in {name}: {e}"))
}

impl LbMaps for PinnedMaps {
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
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_err(map_names::SERVICES, "insert", e))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services
            .remove(key)
            .map_err(|e| map_err(map_names::SERVICES, "delete", e))
    }
    fn put_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<()> {
        self.slots
            .insert(key, &backend_id, 0)
            .map_err(|e| map_err(map_names::BACKEND_SLOTS, "insert", e))
    }
    fn del_slot(&mut self, key: &BackendSlotKey) -> Result<()> {
        self.slots
            .remove(key)
            .map_err(|e| map_err(map_names::BACKEND_SLOTS, "delete", e))
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .insert(&id, backend, 0)
            .map_err(|e| map_err(map_names::BACKENDS, "insert", e))
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.backends
            .remove(&id)
            .map_err(|e| map_err(map_names::BACKENDS, "delete", e))
    }
    fn put_revnat(&mut self, id: u32, value: &RevNatValue) -> Result<()> {
        self.revnat
            .insert(&id, value, 0)
            .map_err(|e| map_err(map_names::REVNAT, "insert", e))
    }
    fn del_revnat(&mut self, id: u32) -> Result<()> {
        self.revnat
            .remove(&id)
            .map_err(|e| map_err(map_names::REVNAT, "delete", e))
    }
}

/// Fails clearly when this binary was built without the eBPF object.
fn check_object() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        return Err(Error::bpf(
            "this kpr was built without its eBPF programs (bpf-linker was missing): run `cargo xtask setup` and rebuild",
        ));
    }
    Ok(())
}

/// The program `name` of the object, as its concrete type.
pub(crate) fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::bpf(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| Error::bpf(format!("program {name}: {e}")))
}

/// How `ensure_loaded` found the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Links of this very build were pinned: nothing was loaded.
    Adopted,
    /// Programs were loaded and attached for the first time.
    Attached,
    /// Programs of another build were replaced in place.
    Upgraded,
}

/// Makes sure this build's programs are attached to `cgroup` with pinned links and the maps
/// are pinned; adopts what is already there.
///
/// # Errors
/// No bpffs, an unusable cgroup path, or the kernel refused to load or attach.
pub fn ensure_loaded(layout: &PinLayout, cgroup: &Path) -> Result<LoadOutcome> {
    check_object()?;
    check_bpffs(&layout.root)?;
    let hash = object_hash();
    let links_dir = layout.links_dir(&hash);
    let maps_present = map_names::ALL.iter().all(|m| layout.map(m).exists());
    let links_present = SOCK_PROGRAMS
        .iter()
        .chain(TC_PROGRAMS.iter())
        .all(|(_, pin)| links_dir.join(pin).exists());
    if maps_present && links_present {
        return Ok(LoadOutcome::Adopted);
    }
    for dir in [layout.maps_dir(), links_dir.clone()] {
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let cgroup_file = fs::File::open(cgroup).map_err(|e| {
        Error::io(cgroup, e).context("opening the cgroup to attach to (--cgroup-path)")
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(EBPF_OBJECT)
        .map_err(|e| Error::bpf(format!("loading the eBPF object: {e}")))?;
    let old_dirs = layout.other_link_dirs(&hash);
    let mut upgraded = false;
    for (prog_name, pin) in SOCK_PROGRAMS {
        let target = links_dir.join(pin);
        if target.exists() {
            continue;
        }
        let prog: &mut CgroupSockAddr = program(&mut ebpf, prog_name)?;
        prog.load()
            .map_err(|e| Error::bpf(format!("verifier rejected {prog_name}: {e}")))?;
        let old = old_dirs.iter().map(|d| d.join(pin)).find(|p| p.exists());
        let link_id = if let Some(old) = &old {
            let pinned = PinnedLink::from_pin(old)
                .map_err(|e| Error::bpf(format!("opening {}: {e}", old.display())))?;
            let fd_link: FdLink = pinned.into();
            let link = CgroupSockAddrLink::try_from(fd_link)
                .map_err(|e| Error::bpf(format!("link {}: {e}", old.display())))?;
            upgraded = true;
            prog.attach_to_link(link)
                .map_err(|e| Error::bpf(format!("replacing {prog_name} in place: {e}")))?
        } else {
            prog.attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| {
                    Error::bpf(format!(
                        "attaching {prog_name} to {}: {e}",
                        cgroup.display()
                    ))
                })?
        };
        let link = prog
            .take_link(link_id)
            .map_err(|e| Error::bpf(format!("{prog_name}: {e}")))?;
        let fd_link = FdLink::try_from(link)
            .map_err(|e| Error::bpf(format!("{prog_name}: link is not a bpf_link: {e}")))?;
        fd_link
            .pin(&target)
            .map_err(|e| Error::bpf(format!("pinning {}: {e}", target.display())))?;
        if let Some(old) = old {
            let _ = fs::remove_file(old);
        }
    }
    for (prog_name, pin) in TC_PROGRAMS {
        let target = links_dir.join(pin);
        if target.exists() {
            continue;
        }
        let prog: &mut SchedClassifier = program(&mut ebpf, prog_name)?;
        prog.load()
            .map_err(|e| Error::bpf(format!("verifier rejected {prog_name}: {e}")))?;
        prog.pin(&target)
            .map_err(|e| Error::bpf(format!("pinning {}: {e}", target.display())))?;
    }
    // TC links of an older build: swap this build's programs in, keep them attached.
    for old in &old_dirs {
        for entry in fs::read_dir(old).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(attach) = tc_link_direction(&name) else {
                continue;
            };
            let target = links_dir.join(&name);
            let prog_pin = links_dir.join(if attach == "ingress" {
                TC_PROGRAMS[0].1
            } else {
                TC_PROGRAMS[1].1
            });
            let migrated = (|| -> Result<()> {
                let mut prog = SchedClassifier::from_pin(&prog_pin)
                    .map_err(|e| Error::bpf(format!("{}: {e}", prog_pin.display())))?;
                let fd_link: FdLink = PinnedLink::from_pin(entry.path())
                    .map_err(|e| Error::bpf(e.to_string()))?
                    .into();
                let link = SchedClassifierLink::try_from(fd_link)
                    .map_err(|e| Error::bpf(e.to_string()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| Error::bpf(e.to_string()))?;
                let link = prog.take_link(id).map_err(|e| Error::bpf(e.to_string()))?;
                FdLink::try_from(link)
                    .map_err(|e| Error::bpf(e.to_string()))?
                    .pin(&target)
                    .map_err(|e| Error::bpf(e.to_string()))?;
                Ok(())
            })();
            if let Err(e) = migrated {
                tracing::warn!(
                    "could not upgrade TC link {name} in place ({e}); it will be re-attached"
                );
            }
            upgraded = true;
        }
    }
    for d in old_dirs {
        let _ = fs::remove_dir_all(d);
    }
    Ok(if upgraded {
        LoadOutcome::Upgraded
    } else {
        LoadOutcome::Attached
    })
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub removed: Vec<PathBuf>,
}

/// Removes every link, map and directory kpr pinned under `root`. Unpinning a link detaches
/// its program; unpinning the last reference to a map frees it.
///
/// # Errors
/// A pin could not be removed.
pub fn cleanup(root: &Path) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    if !root.exists() {
        return Ok(report);
    }
    fn walk(dir: &Path, report: &mut CleanupReport) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if ft.is_dir() {
                walk(&path, report)?;
                fs::remove_dir(&path).map_err(|e| Error::io(&path, e))?;
            } else {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
            report.removed.push(path);
        }
        Ok(())
    }
    walk(root, &mut report)?;
    fs::remove_dir(root).map_err(|e| Error::io(root, e))?;
    report.removed.push(root.to_path_buf());
    Ok(report)
}
