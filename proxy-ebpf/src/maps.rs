//! The maps every kpr program shares. Pinned by name under the agent's versioned bpffs
//! directory, so they outlive the agent and are adopted by the next one.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, NodeConfig, RevNatValue,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeData, map_sizes,
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

#[btf_map(pin_by_name)]
pub static KPR_CT: LruHashMap<CtKey, CtValue, { map_sizes::CONNTRACK }> = LruHashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map(pin_by_name)]
pub static KPR_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { map_sizes::AFFINITY }> =
    LruHashMap::new();

#[btf_map(pin_by_name)]
pub static KPR_SRC_RANGES: LpmTrie<SrcRangeData, u8, { map_sizes::SRC_RANGES }> = LpmTrie::new();
