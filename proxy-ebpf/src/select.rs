//! Backend selection shared by the socket and TC programs: session affinity, Maglev
//! (flow-hash into a consistent table) or random.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
pub use proxy_common::flow_hash;
use proxy_common::{
    AffinityKey, AffinityValue, BackendSlotKey, MemberKey, ServiceValue, service_flags,
};

use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{
    KPR_AFFINITY, KPR_BACKEND_CONNS, KPR_BACKENDS, KPR_MEMBERS, KPR_SLOTS, KPR_SRC_RANGES,
};

/// Least connections scans every backend of sets up to this size; larger sets compare two
/// random backends ("power of two choices", within a few percent of the best at any size).
const LC_SCAN: u32 = 16;

/// Adds `delta` (u32::MAX for -1) to a backend's live connections.
#[inline(never)]
pub fn conns_add(backend_id: u32, delta: u32) {
    if let Some(c) = KPR_BACKEND_CONNS.get_ptr_mut(&backend_id) {
        // SAFETY: a value pointer from a successful lookup; updated atomically since every
        // CPU counts into it.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(c, delta) };
        return;
    }
    if delta == 1
        && KPR_BACKEND_CONNS
            .insert(&backend_id, &1, u64::from(BPF_NOEXIST))
            .is_err()
        && let Some(c) = KPR_BACKEND_CONNS.get_ptr_mut(&backend_id)
    {
        // Another CPU created the counter first: add to it.
        // SAFETY: as above.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(c, 1) };
    }
}

/// loadBalancerSourceRanges: is `client` inside one of the service's ranges?
#[inline(never)]
pub fn in_source_ranges(service_id: u32, client: &[u8; 16]) -> bool {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&service_id.to_be_bytes());
    data[4..].copy_from_slice(client);
    KPR_SRC_RANGES.get(&Key::new(160, data)).is_some()
}

/// A backend's live connections (0 when it has none recorded).
#[inline(always)]
fn conns(backend_id: u32) -> u32 {
    // SAFETY: a value pointer from a successful lookup, read once.
    KPR_BACKEND_CONNS
        .get_ptr(&backend_id)
        .map_or(0, |c| unsafe { *c })
}

/// The backend id in slot `slot` of the service's current revision.
#[inline(always)]
fn slot_backend(svc: &ServiceValue, slot: u32) -> Option<u32> {
    let key = BackendSlotKey {
        service_id: svc.id,
        revision: svc.revision,
        slot,
    };
    // SAFETY: as above.
    KPR_SLOTS.get_ptr(&key).map(|id| unsafe { *id })
}

/// Least connections: the backend with the fewest live flows.
#[inline(never)]
fn least_conn(svc: &ServiceValue) -> u32 {
    let n = svc.backend_count;
    let mut best = NONE;
    let mut best_conns = u32::MAX;
    if n <= LC_SCAN {
        // Start at a random slot so ties spread instead of all landing on slot 0.
        // SAFETY: plain helper call.
        let start = unsafe { bpf_get_prandom_u32() };
        let mut i = 0;
        while i < LC_SCAN && i < n {
            if let Some(id) = slot_backend(svc, start.wrapping_add(i) % n) {
                let c = conns(id);
                if c < best_conns {
                    best = id;
                    best_conns = c;
                }
            }
            i += 1;
        }
        return best;
    }
    let mut i = 0;
    while i < 2 {
        // SAFETY: plain helper call.
        let slot = (unsafe { bpf_get_prandom_u32() }) % n;
        if let Some(id) = slot_backend(svc, slot) {
            let c = conns(id);
            if c < best_conns {
                best = id;
                best_conns = c;
            }
        }
        i += 1;
    }
    best
}

/// No backend (a lookup raced an update): the caller leaves the packet alone.
pub const NONE: u32 = u32::MAX;

/// Picks a backend id for a new connection of `client` to `svc`. `hash` is the flow hash
/// (used by Maglev services). Out of line: one copy shared by every program. `svc` is the
/// map value itself (round robin moves its counter).
#[inline(never)]
pub fn select_backend(svc: &mut ServiceValue, client: &[u8; 16], hash: u32) -> u32 {
    let affinity = svc.flags & service_flags::AFFINITY_CLIENT_IP != 0;
    let key = AffinityKey {
        client: *client,
        service_id: svc.id,
        _pad: 0,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity && let Some(a) = KPR_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a value pointer from a successful lookup; this CPU's update of last_used
        // may race another's, which only moves the expiry by a few ns.
        let (id, generation, last) =
            unsafe { ((*a).backend_id, (*a).generation, (*a).last_used_ns) };
        let fresh = now.saturating_sub(last) < u64::from(svc.affinity_timeout_secs) * 1_000_000_000;
        let alive = KPR_BACKENDS
            .get_ptr(&id)
            // SAFETY: as above.
            .is_some_and(|b| unsafe { (*b).generation } == generation);
        // The remembered backend must still serve this service (it may have left the set,
        // or the id may belong to another backend now).
        let member = KPR_MEMBERS
            .get_ptr(&MemberKey {
                service_id: svc.id,
                backend_id: id,
            })
            .is_some();
        if fresh && alive && member {
            // SAFETY: as above.
            unsafe { (*a).last_used_ns = now };
            return id;
        }
    }
    let id = if svc.flags & service_flags::LEAST_CONN != 0 {
        least_conn(svc)
    } else {
        let slot = if svc.flags & service_flags::MAGLEV != 0 {
            hash % svc.backend_count
        } else if svc.flags & service_flags::ROUND_ROBIN != 0 {
            // The map value's counter. Not atomic (the generic BPF CPU has no fetch-add): two
            // CPUs opening flows in the same instant may take the same slot, which only
            // shifts the rotation by one.
            let n = svc.rr;
            svc.rr = n.wrapping_add(1);
            n % svc.backend_count
        } else {
            // SAFETY: plain helper call.
            (unsafe { bpf_get_prandom_u32() }) % svc.backend_count
        };
        match slot_backend(svc, slot) {
            Some(id) => id,
            None => return NONE,
        }
    };
    if id == NONE {
        return NONE;
    }
    if affinity && let Some(b) = KPR_BACKENDS.get_ptr(&id) {
        let value = AffinityValue {
            backend_id: id,
            // SAFETY: as above.
            generation: unsafe { (*b).generation },
            last_used_ns: now,
        };
        let _ = KPR_AFFINITY.insert(&key, &value, 0);
    }
    id
}
