//! Backend selection shared by the socket and TC programs: session affinity, Maglev
//! (flow-hash into a consistent table) or random.
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
pub use proxy_common::flow_hash;
use proxy_common::{AffinityKey, AffinityValue, BackendSlotKey, ServiceValue, service_flags};

use crate::maps::{KPR_AFFINITY, KPR_BACKENDS, KPR_SLOTS};

/// No backend (a lookup raced an update): the caller leaves the packet alone.
pub const NONE: u32 = u32::MAX;

/// Picks a backend id for a new connection of `client` to `svc`. `hash` is the flow hash
/// (used by Maglev services). Out of line: one copy shared by every program.
#[inline(never)]
pub fn select_backend(svc: &ServiceValue, client: &[u8; 16], hash: u32) -> u32 {
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
        if fresh && alive {
            // SAFETY: as above.
            unsafe { (*a).last_used_ns = now };
            return id;
        }
    }
    let slot = if svc.flags & service_flags::MAGLEV != 0 {
        hash % svc.backend_count
    } else {
        // SAFETY: plain helper call.
        (unsafe { bpf_get_prandom_u32() }) % svc.backend_count
    };
    let slot_key = BackendSlotKey {
        service_id: svc.id,
        revision: svc.revision,
        slot,
    };
    let Some(id) = KPR_SLOTS.get_ptr(&slot_key) else {
        return NONE;
    };
    // SAFETY: as above.
    let id = unsafe { *id };
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
