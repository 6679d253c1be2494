//! Conntrack garbage collection: deletes flows whose every entry expired.
//!
//! The datapath refreshes each entry's expiry as packets use it and never deletes live
//! flows to make room (the conntrack map is a plain hash map, not an LRU). This pass, run by
//! the agent every few seconds, is what frees entries: a flow goes when all of its entries
//! (forward, masquerade, both reply directions) are past their expiry, so a flow that is
//! quiet one way but busy the other stays. Entries left without their flow (a crash between
//! two deletes) go once expired. A least-connection flow still counted is taken off its
//! backend's count.
use std::collections::HashMap;

use proxy_common::{CtKey, CtValue, ct_flags, ct_kind};

use super::pinned::PinnedMaps;
use crate::Result;

/// What one pass found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub entries_seen: usize,
    pub flows_deleted: usize,
    pub entries_deleted: usize,
    pub entries_left: usize,
    /// Flows left to the kernel's conntrack (`KERNEL_NAT`) still alive.
    pub kernel_nat_left: usize,
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns()`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The other entries of the flow whose FORWARD entry is (`k`, `v`).
#[must_use]
pub fn siblings(entries: &HashMap<CtKey, CtValue>, k: &CtKey, v: &CtValue) -> Vec<CtKey> {
    if v.flags & ct_flags::KERNEL_NAT != 0 {
        return Vec::new();
    }
    let (client, cport, backend, bport) = (k.saddr, k.sport, v.addr, v.port);
    let mut out = vec![CtKey::new(
        backend,
        client,
        bport,
        cport,
        k.proto,
        ct_kind::REPLY_SNAT,
    )];
    if v.flags & ct_flags::MASQ != 0 {
        let snat = CtKey::new(client, backend, cport, bport, k.proto, ct_kind::SNAT);
        if let Some(s) = entries.get(&snat) {
            out.push(CtKey::new(
                backend,
                s.addr,
                bport,
                s.port,
                k.proto,
                ct_kind::REPLY_DNAT,
            ));
        }
        out.push(snat);
    }
    out
}

/// What one pass decided: whole flows (FORWARD key first, then its siblings, and the
/// backend to take a live connection off) and entries left without a flow.
#[derive(Debug, Default)]
pub struct Doomed {
    pub flows: Vec<(Vec<CtKey>, Option<u32>)>,
    pub orphans: Vec<CtKey>,
}

impl Doomed {
    /// Every key, flows first.
    #[must_use]
    pub fn keys(&self) -> Vec<CtKey> {
        self.flows
            .iter()
            .flat_map(|(k, _)| k.iter().copied())
            .chain(self.orphans.iter().copied())
            .collect()
    }
}

/// The flows and entries that are dead at `now_ns`.
#[must_use]
pub fn expired(entries: &HashMap<CtKey, CtValue>, now_ns: u64) -> Doomed {
    let mut out = Doomed::default();
    let mut owned = std::collections::HashSet::new();
    for (k, v) in entries {
        if k.kind != ct_kind::FORWARD {
            continue;
        }
        let sibs = siblings(entries, k, v);
        let latest = sibs
            .iter()
            .filter_map(|s| entries.get(s))
            .map(|s| s.expires_ns)
            .fold(v.expires_ns, u64::max);
        owned.extend(sibs.iter().copied());
        if now_ns > latest {
            let mut keys = vec![*k];
            keys.extend(sibs.into_iter().filter(|s| entries.contains_key(s)));
            let uncount = (v.flags & ct_flags::COUNTED != 0).then_some(v.backend_id);
            out.flows.push((keys, uncount));
        }
    }
    for (k, v) in entries {
        if k.kind != ct_kind::FORWARD && !owned.contains(k) && now_ns > v.expires_ns {
            out.orphans.push(*k);
        }
    }
    out
}

/// One pass over the conntrack map.
///
/// # Errors
/// The map could not be read.
pub fn collect(maps: &mut PinnedMaps, now_ns: u64) -> Result<GcReport> {
    let entries: HashMap<CtKey, CtValue> = maps.conntrack()?.into_iter().collect();
    let doomed = expired(&entries, now_ns);
    let mut deleted = 0;
    let mut flows = 0;
    for (keys, uncount) in &doomed.flows {
        // The datapath may have refreshed or recreated the flow since the read: a FORWARD
        // entry that changed is left alone, with its siblings.
        let fwd = keys[0];
        let still = maps.conntrack_get(&fwd)?;
        if still.is_some_and(|v| Some(&v) != entries.get(&fwd)) {
            continue;
        }
        let gone = maps.conntrack_del(&fwd);
        deleted += usize::from(gone);
        for k in &keys[1..] {
            deleted += usize::from(maps.conntrack_del(k));
        }
        flows += 1;
        // A counted flow the datapath did not see close (an idle timeout). The read-modify-
        // write can race the datapath's atomic adds and lose one update, rarely.
        if gone && let Some(id) = uncount {
            maps.backend_conn_done(*id);
        }
    }
    for k in &doomed.orphans {
        deleted += usize::from(maps.conntrack_del(k));
    }
    let doomed_flows: std::collections::HashSet<CtKey> =
        doomed.flows.iter().map(|(keys, _)| keys[0]).collect();
    let kernel_nat_left = entries
        .iter()
        .filter(|(k, v)| {
            k.kind == ct_kind::FORWARD
                && v.flags & ct_flags::KERNEL_NAT != 0
                && !doomed_flows.contains(k)
        })
        .count();
    Ok(GcReport {
        kernel_nat_left,
        entries_seen: entries.len(),
        flows_deleted: flows,
        entries_deleted: deleted,
        entries_left: entries.len().saturating_sub(deleted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::v4_mapped;

    fn flow(masq: bool, fwd_exp: u64, reply_exp: u64) -> HashMap<CtKey, CtValue> {
        let client = v4_mapped([203, 0, 113, 2]);
        let frontend = v4_mapped([192, 168, 0, 2]);
        let backend = v4_mapped([10, 0, 0, 1]);
        let node = frontend;
        let base = CtValue {
            addr: backend,
            port: 80,
            expires_ns: fwd_exp,
            flags: if masq { ct_flags::MASQ } else { 0 },
            ..CtValue::default()
        };
        let mut m = HashMap::new();
        m.insert(
            CtKey::new(client, frontend, 40000, 3001, 6, ct_kind::FORWARD),
            base,
        );
        m.insert(
            CtKey::new(backend, client, 80, 40000, 6, ct_kind::REPLY_SNAT),
            CtValue {
                addr: frontend,
                port: 3001,
                expires_ns: reply_exp,
                ..base
            },
        );
        if masq {
            m.insert(
                CtKey::new(client, backend, 40000, 80, 6, ct_kind::SNAT),
                CtValue {
                    addr: node,
                    port: 61000,
                    ..base
                },
            );
            m.insert(
                CtKey::new(backend, node, 80, 61000, 6, ct_kind::REPLY_DNAT),
                CtValue {
                    addr: client,
                    port: 40000,
                    expires_ns: reply_exp,
                    ..base
                },
            );
        }
        m
    }

    #[test]
    fn a_flow_goes_only_when_every_entry_expired() {
        for masq in [false, true] {
            let n = if masq { 4 } else { 2 };
            // Forward side expired, replies still live: kept.
            let m = flow(masq, 100, 300);
            assert!(expired(&m, 200).keys().is_empty(), "masq={masq}");
            // Everything expired: all entries of the flow go.
            let doomed = expired(&m, 400);
            assert_eq!(
                (doomed.keys().len(), doomed.flows.len()),
                (n, 1),
                "masq={masq}"
            );
            // Nothing expired.
            assert!(expired(&m, 50).keys().is_empty());
        }
    }

    #[test]
    fn orphaned_entries_go_once_expired() {
        let mut m = flow(true, 100, 100);
        m.retain(|k, _| k.kind != ct_kind::FORWARD);
        assert!(expired(&m, 50).keys().is_empty());
        assert_eq!(expired(&m, 200).orphans.len(), 3);
    }

    #[test]
    fn counted_flows_are_taken_off_their_backend() {
        let mut m = flow(false, 100, 100);
        for v in m.values_mut() {
            v.flags |= ct_flags::COUNTED;
            v.backend_id = 7;
        }
        assert_eq!(expired(&m, 200).flows[0].1, Some(7));
    }

    #[test]
    fn a_flow_left_to_the_kernel_is_one_entry_kept_until_it_expires() {
        let mut m = flow(false, 100, 100);
        m.retain(|k, _| k.kind == ct_kind::FORWARD);
        for v in m.values_mut() {
            v.flags = ct_flags::KERNEL_NAT;
        }
        let (k, v) = m.iter().next().unwrap();
        assert!(siblings(&m, k, v).is_empty());
        assert!(expired(&m, 50).keys().is_empty());
        let doomed = expired(&m, 200);
        assert_eq!((doomed.flows.len(), doomed.orphans.len()), (1, 0));
    }
}
