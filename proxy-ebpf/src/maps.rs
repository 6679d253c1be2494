//! The maps every kpr program shares. Pinned by name under the agent's versioned bpffs
//! directory, so they outlive the agent and are adopted by the next one.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, FragKey, FragValue,
    MemberKey, NodeConfig, RevNatValue, ServiceKey, ServiceStats, ServiceValue, SockRevNatKey,
    SockRevNatValue, SrcRangeData, drop_reason, map_sizes,
};

/// Hash maps sized for the largest clusters allocate their elements on demand.
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

#[btf_map(pin_by_name)]
pub static KPR_SERVICES: HashMap<ServiceKey, ServiceValue, { map_sizes::SERVICES }> =
    HashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_SLOTS: HashMap<BackendSlotKey, u32, { map_sizes::BACKEND_SLOTS }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_BACKENDS: HashMap<u32, Backend, { map_sizes::BACKENDS }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_REVNAT: HashMap<u32, RevNatValue, { map_sizes::REVNAT }> = HashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue, { map_sizes::SOCK_REVNAT }> =
    LruHashMap::new();

/// Conntrack: a plain hash map, not an LRU. Entries leave when the agent's garbage collector
/// finds them expired, never because newer flows need room: a SYN flood fills the map and
/// then fails new flows (counted as `conntrack_full`), it cannot evict established ones.
/// Preallocated (unlike the other large maps): a new flow then costs no allocation (a
/// quarter of the new-flow time, measured) and cannot fail under memory pressure; the price
/// is ~136 bytes of kernel memory per entry up front (71 MB at the default 524288 entries,
/// `--conntrack-max` sizes it).
#[btf_map(pin_by_name)]
pub static KPR_CT: HashMap<CtKey, CtValue, { map_sizes::CONNTRACK }> = HashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map(pin_by_name)]
pub static KPR_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { map_sizes::AFFINITY }> =
    LruHashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_SRC_RANGES: LpmTrie<SrcRangeData, u8, { map_sizes::SRC_RANGES }> = LpmTrie::new();

/// Session-affinity services' current (service, backend) pairs.
#[btf_map(pin_by_name)]
pub static KPR_MEMBERS: HashMap<MemberKey, u32, { map_sizes::MEMBERS }, NO_PREALLOC> =
    HashMap::new();

/// Per-service counters, per CPU (created by the datapath on a service's first flow).
#[btf_map(pin_by_name)]
pub static KPR_STATS: PerCpuHashMap<u32, ServiceStats, { map_sizes::STATS }, NO_PREALLOC> =
    PerCpuHashMap::new();

/// Drops by reason (`drop_reason`), per CPU.
#[btf_map(pin_by_name)]
pub static KPR_DROPS: PerCpuArray<u64, { drop_reason::COUNT as usize }> = PerCpuArray::new();

/// Fragments: the translation of a datagram's first fragment, for the ones that follow.
#[btf_map(pin_by_name)]
pub static KPR_FRAGS: LruHashMap<FragKey, FragValue, { map_sizes::FRAGS }> = LruHashMap::new();

/// Live flows per backend of least-connection services.
#[btf_map(pin_by_name)]
pub static KPR_BACKEND_CONNS: HashMap<u32, u32, { map_sizes::BACKEND_CONNS }, NO_PREALLOC> =
    HashMap::new();

/// Counts a drop of `reason`.
#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(c) = KPR_DROPS.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *c += 1 };
    }
}

/// Counts `bytes` of one packet, and a new flow when `new_flow`, for `service_id`.
#[inline(never)]
pub fn count_service(service_id: u32, bytes: u64, packets: u64, new_flow: bool) {
    let flows = u64::from(new_flow);
    if let Some(s) = KPR_STATS.get_ptr_mut(&service_id) {
        // SAFETY: this CPU's copy of the value.
        unsafe {
            (*s).packets += packets;
            (*s).bytes += bytes;
            (*s).flows += flows;
        }
        return;
    }
    let first = ServiceStats {
        packets,
        bytes,
        flows,
    };
    let _ = KPR_STATS.insert(&service_id, &first, 0);
}
