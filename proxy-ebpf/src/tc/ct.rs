//! Conntrack and NAT for the TC path: flow creation (atomic, `BPF_NOEXIST`), per-direction
//! TCP/UDP state with timeouts, masquerade ports from kpr's own range, and flow deletion.
//!
//! A flow has two entries (FORWARD at ingress, REPLY_SNAT at egress), four when masqueraded
//! (plus SNAT at egress and REPLY_DNAT at ingress). Each entry expires on its own timer,
//! refreshed by the packets that use it; the agent's garbage collector deletes a flow once
//! all of its entries expired, so the datapath never evicts a live flow to make room.
use aya_ebpf::{
    bindings::BPF_NOEXIST, btf_maps::PerCpuArray, macros::btf_map, programs::TcContext,
};
use proxy_common::{
    CtKey, CtTimeouts, CtValue, NAT_PORT_MAX, NAT_PORT_MIN, NodeConfig, POD_CIDRS_ID, ServiceKey,
    ct_flags, ct_kind, ct_state, drop_reason, proto, scope, service_flags,
};

use super::parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN};
use super::{NEXT, drop, translate};
use crate::maps::{KPR_BACKENDS, KPR_CONFIG, KPR_CT, KPR_SERVICES, count_service};
use crate::select::{self, conns_add, flow_hash, in_source_ranges, select_backend};

const EEXIST: i32 = 17;
const NS: u64 = 1_000_000_000;
/// Masquerade ports tried for one new flow before it is dropped.
const NAT_TRIES: u32 = 8;

/// Internal verdict of `choose`: answer with a TCP RST or ICMP unreachable.
pub const REJECT: i32 = -3;
/// Internal verdict of `choose`: `Choice` is filled in, go on with `create_flow`.
pub const CHOSEN: i32 = -2;

/// What `choose` picked for a new flow.
#[derive(Default)]
pub struct Choice {
    pub backend_id: u32,
    pub service_id: u32,
    pub service_flags: u32,
}

/// A state's timeout in ns: the configured one, else the default.
#[inline(always)]
fn timeout_ns(state: u8) -> u64 {
    let d = CtTimeouts::DEFAULT;
    let (configured, default) = match KPR_CONFIG.get(0) {
        Some(c) => match state {
            ct_state::SYN => (c.tcp_syn_secs, d.tcp_syn),
            ct_state::ESTABLISHED => (c.tcp_established_secs, d.tcp_established),
            ct_state::FIN => (c.tcp_fin_secs, d.tcp_fin),
            ct_state::CLOSED => (c.tcp_close_secs, d.tcp_close),
            ct_state::UDP_REPLY => (c.udp_stream_secs, d.udp_stream),
            _ => (c.udp_secs, d.udp),
        },
        None => (0, d.udp),
    };
    u64::from(if configured == 0 { default } else { configured }) * NS
}

/// The state a packet moves its direction's entry to.
#[inline(always)]
fn next_state(p: &Packet, old: u8, reply: bool) -> u8 {
    if p.proto != proto::TCP {
        return if reply {
            ct_state::UDP_REPLY
        } else {
            ct_state::UDP
        };
    }
    let f = p.tcp_flags;
    if f & TCP_RST != 0 {
        ct_state::CLOSED
    } else if f & TCP_FIN != 0 || old == ct_state::FIN || old == ct_state::CLOSED {
        // A closing direction stays closing (its ACKs do not reopen it).
        if old == ct_state::CLOSED {
            ct_state::CLOSED
        } else {
            ct_state::FIN
        }
    } else if f & TCP_SYN != 0 {
        ct_state::SYN
    } else {
        ct_state::ESTABLISHED
    }
}

/// Moves an entry's state and expiry for one of its packets. The expiry is written when the
/// state changes or when it would move by more than a second, so a busy flow does not write
/// its cache line on every packet.
#[inline(always)]
pub fn refresh(p: &Packet, ct: &mut CtValue, now: u64, reply: bool) {
    let state = next_state(p, ct.state, reply);
    let expires = now + timeout_ns(state);
    if state != ct.state || expires > ct.expires_ns + NS {
        ct.state = state;
        ct.expires_ns = expires;
        // Only the FORWARD entry carries COUNTED; a closing direction ends the count.
        if !reply && (state == ct_state::FIN || state == ct_state::CLOSED) {
            uncount(ct);
        }
    }
}

/// A RST from the backend's side closes the whole flow: its FORWARD entry (found from the
/// REPLY_SNAT entry `key` -> `ct`) is marked closed too, so the flow expires in seconds, stops
/// counting towards least connections, and a SYN reusing the client port opens a new flow.
#[inline(never)]
pub fn close_forward(key: &CtKey, ct: &CtValue, now: u64) {
    let fwd = CtKey::new(
        key.daddr,
        ct.addr,
        key.dport,
        ct.port,
        key.proto,
        ct_kind::FORWARD,
    );
    if let Some(f) = KPR_CT.get_ptr_mut(&fwd) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        let f = unsafe { &mut *f };
        f.state = ct_state::CLOSED;
        f.expires_ns = now + timeout_ns(ct_state::CLOSED);
        uncount(f);
    }
}

/// Whether the reply direction of a flow (its REPLY_SNAT entry) is still alive: an
/// answered UDP flow lives on its stream timeout even when the client is quiet.
#[inline(never)]
pub fn reply_alive(p: &Packet, ct: &CtValue, now: u64) -> bool {
    let key = CtKey::new(
        ct.addr,
        p.src16,
        ct.port,
        p.sport,
        p.proto,
        ct_kind::REPLY_SNAT,
    );
    // SAFETY: a value pointer from a successful lookup, read once.
    KPR_CT
        .get_ptr(&key)
        .is_some_and(|r| now <= unsafe { (*r).expires_ns })
}

/// Whether a packet continues the flow of its FORWARD entry. A TCP flow keeps its backend
/// even when the backend was removed or is terminating (upstream keeps established
/// connections), until it closes or expires; a SYN reopening a closed flow starts a new one.
/// A UDP flow whose backend left picks a new one (upstream clears those conntrack entries).
#[inline(always)]
pub fn keeps_flow(p: &Packet, ct: &CtValue, now: u64) -> bool {
    if now > ct.expires_ns && !reply_alive(p, ct, now) {
        return false;
    }
    if p.proto == proto::TCP || ct.flags & ct_flags::KERNEL_NAT != 0 {
        return !(p.is_syn() && (ct.state == ct_state::FIN || ct.state == ct_state::CLOSED));
    }
    match KPR_BACKENDS.get_ptr(&ct.backend_id) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        Some(b) => unsafe { (*b).generation == ct.generation },
        None => false,
    }
}

/// Stops counting a flow towards its backend's live connections (least connections).
#[inline(always)]
fn uncount(ct: &mut CtValue) {
    if ct.flags & ct_flags::COUNTED != 0 {
        ct.flags &= !ct_flags::COUNTED;
        conns_add(ct.backend_id, u32::MAX);
    }
}

/// The masquerade address of the packet's family, when the agent configured one.
#[inline(always)]
fn snat_address(cfg: &NodeConfig, v6: bool) -> Option<[u8; 16]> {
    if v6 {
        (cfg.snat_v6 != [0; 16]).then_some(cfg.snat_v6)
    } else {
        (cfg.snat_v4[10] == 0xff).then_some(cfg.snat_v4)
    }
}

/// Deletes every entry of the flow whose FORWARD entry is `fwd` (the flow being replaced).
#[inline(never)]
pub fn delete_flow(fwd: &CtKey, ct: &mut CtValue) {
    uncount(ct);
    let (client, cport, backend, bport) = (fwd.saddr, fwd.sport, ct.addr, ct.port);
    let mut key = CtKey::new(
        backend,
        client,
        bport,
        cport,
        fwd.proto,
        ct_kind::REPLY_SNAT,
    );
    let _ = KPR_CT.remove(&key);
    if ct.flags & ct_flags::MASQ != 0 {
        key = CtKey::new(client, backend, cport, bport, fwd.proto, ct_kind::SNAT);
        if let Some(snat) = KPR_CT.get_ptr(&key) {
            // SAFETY: as above.
            let (addr, port) = unsafe { ((*snat).addr, (*snat).port) };
            let _ = KPR_CT.remove(&key);
            key = CtKey::new(backend, addr, bport, port, fwd.proto, ct_kind::REPLY_DNAT);
            let _ = KPR_CT.remove(&key);
        }
    }
    let _ = KPR_CT.remove(fwd);
}

/// An address as one hash word: the IPv4 address itself (what the agent's Maglev prediction
/// uses), or the XOR of an IPv6 address's four words.
#[inline(always)]
pub fn fold_addr(a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if a[10] == 0xff && a[..10] == [0; 10] {
        w(12)
    } else {
        w(0) ^ w(4) ^ w(8) ^ w(12)
    }
}

// Out of line, like `create_flow`: the two run one after the other from `ingress`, so their
// stack frames never add up (the verifier allows 512 bytes along any call chain).
#[inline(never)]
pub fn choose(p: &Packet, out: &mut Choice) -> i32 {
    let mut skey = ServiceKey {
        addr: p.dst16,
        port: p.dport,
        proto: p.proto,
        scope: scope::EXTERNAL,
    };
    let svc = match KPR_SERVICES.get_ptr_mut(&skey) {
        Some(svc) => svc,
        None => {
            // A ClusterIP reached from outside the node (routed to it): served from its
            // internal entry, as upstream serves every source of a ClusterIP.
            skey.scope = scope::INTERNAL;
            match KPR_SERVICES.get_ptr_mut(&skey) {
                Some(svc) => svc,
                None => return NEXT,
            }
        }
    };
    // SAFETY: a value pointer from a successful lookup, valid for this program run.
    let svc = unsafe { &mut *svc };
    if skey.scope == scope::INTERNAL && svc.flags & service_flags::CLUSTER_IP == 0 {
        return NEXT;
    }
    // loadBalancerSourceRanges; traffic the network presents with the LB IP itself as its
    // source (a load balancer hairpinning the node's own connection) is let in, as upstream.
    if svc.flags & service_flags::SOURCE_RANGES != 0
        && p.src16 != p.dst16
        && !in_source_ranges(svc.id, &p.src16)
    {
        return drop(drop_reason::SOURCE_RANGE);
    }
    if svc.backend_count == 0 {
        if svc.flags & service_flags::DROP != 0 {
            return drop(drop_reason::POLICY_DROP);
        }
        return REJECT;
    }
    // Only a packet that can open a flow does: a stray mid-stream TCP segment to a frontend
    // (its flow long gone) is left to the stack, which answers it with a RST. Maglev
    // services are the exception: their pick depends on the flow alone, so a flow whose
    // entries were lost (another node took over, a map upgrade) lands where it was.
    if p.proto == proto::TCP && p.tcp_flags & TCP_SYN == 0 && svc.flags & service_flags::MAGLEV == 0
    {
        return NEXT;
    }
    let hash = flow_hash(
        fold_addr(&p.src16),
        fold_addr(&p.dst16),
        (u32::from(p.sport) << 16) | u32::from(p.dport),
        u32::from(p.proto),
    );
    let backend_id = select_backend(svc, &p.src16, hash);
    if backend_id == select::NONE {
        return NEXT;
    }
    out.backend_id = backend_id;
    out.service_id = svc.id;
    out.service_flags = svc.flags;
    // Outside traffic to a ClusterIP is masqueraded unless it comes from a pod CIDR
    // (upstream's local-traffic detector).
    if svc.flags & service_flags::MASQ_UNLESS_PODS != 0 && !in_source_ranges(POD_CIDRS_ID, &p.src16)
    {
        out.service_flags |= service_flags::EXTERNAL_MASQ;
    }
    CHOSEN
}

/// The key and value `create_flow` builds its entries in: per-CPU, so they cost no stack.
struct FlowScratch {
    key: CtKey,
    val: CtValue,
    /// The masquerade port's REPLY_DNAT key (undone on failure).
    nat_key: CtKey,
}

#[btf_map]
static KPR_FLOW_SCRATCH: PerCpuArray<FlowScratch, 1> = PerCpuArray::new();

/// Records the conntrack entries of a new flow and DNATs its first packet. Entries are
/// created with `BPF_NOEXIST`: the masquerade port is claimed by creating its REPLY_DNAT
/// entry, and a flow another CPU created first is followed, not overwritten. One key and one
/// value (per-CPU scratch) are rewritten for every entry to stay well inside the stack limit.
#[inline(never)]
pub fn create_flow<const L2: usize>(ctx: &TcContext, p: &Packet, choice: &Choice, now: u64) -> i32 {
    let Some(sc) = KPR_FLOW_SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: this CPU's scratch slot; TC programs do not nest on one CPU.
    let sc = unsafe { &mut *sc };
    let backend_id = choice.backend_id;
    let Some(backend) = KPR_BACKENDS.get_ptr(&backend_id) else {
        return NEXT;
    };
    let open_state = if p.proto != proto::TCP {
        ct_state::UDP
    } else if p.tcp_flags & TCP_SYN != 0 {
        ct_state::SYN
    } else {
        ct_state::ESTABLISHED
    };
    let v = &mut sc.val;
    // SAFETY: a value pointer from a successful lookup, valid for this program run.
    unsafe {
        v.addr = (*backend).addr;
        v.port = (*backend).port;
        v.generation = (*backend).generation;
    }
    v.expires_ns = now + timeout_ns(open_state);
    v.flags = 0;
    v.state = open_state;
    v.backend_id = backend_id;
    v.service_id = choice.service_id;
    v.nat_port = 0;
    v._pad = [0; 6];
    let (backend_addr, backend_port) = (v.addr, v.port);
    let k = &mut sc.key;
    k.proto = p.proto;
    k._pad = [0; 2];
    // Masquerade (eTP=Cluster): claim a port of kpr's range for (backend, node address).
    let mut masq = false;
    if choice.service_flags & service_flags::EXTERNAL_MASQ != 0
        && let Some(cfg) = KPR_CONFIG.get(0)
        && let Some(snat) = snat_address(cfg, p.v6)
    {
        let (min, max) = if cfg.nat_port_min == 0 || cfg.nat_port_max < cfg.nat_port_min {
            (NAT_PORT_MIN, NAT_PORT_MAX)
        } else {
            (cfg.nat_port_min, cfg.nat_port_max)
        };
        let span = u32::from(max - min) + 1;
        let start = flow_hash(
            fold_addr(&p.src16),
            u32::from(p.sport),
            backend_id,
            choice.service_id,
        );
        k.saddr = backend_addr;
        k.sport = backend_port;
        k.daddr = snat;
        k.kind = ct_kind::REPLY_DNAT;
        sc.val.addr = p.src16;
        sc.val.port = p.sport;
        let mut i = 0;
        let mut full = false;
        while i < NAT_TRIES {
            // A stride co-prime with most spans walks the range, not one neighbourhood.
            sc.key.dport = min + (start.wrapping_add(i.wrapping_mul(7919)) % span) as u16;
            match KPR_CT.insert(&sc.key, &sc.val, u64::from(BPF_NOEXIST)) {
                Ok(()) => {
                    masq = true;
                    break;
                }
                // Taken: try the next port.
                Err(e) if e == -EEXIST => {}
                // The map is full (no other port would fit either).
                Err(_) => {
                    full = true;
                    break;
                }
            }
            i += 1;
        }
        if full {
            return drop(drop_reason::CT_FULL);
        }
        if !masq {
            return drop(drop_reason::NAT_EXHAUSTED);
        }
        sc.nat_key = sc.key;
        sc.val.flags = ct_flags::MASQ;
        sc.val.nat_port = sc.key.dport;
    }
    if choice.service_flags & service_flags::LEAST_CONN != 0 {
        sc.val.flags |= ct_flags::COUNTED;
    }
    // client -> frontend (ingress): to the backend.
    sc.key.saddr = p.src16;
    sc.key.daddr = p.dst16;
    sc.key.sport = p.sport;
    sc.key.dport = p.dport;
    sc.key.kind = ct_kind::FORWARD;
    sc.val.addr = backend_addr;
    sc.val.port = backend_port;
    let inserted = KPR_CT.insert(&sc.key, &sc.val, u64::from(BPF_NOEXIST));
    // Only the FORWARD entry counts towards least connections.
    sc.val.flags &= !ct_flags::COUNTED;
    if let Err(e) = inserted {
        if masq {
            let _ = KPR_CT.remove(&sc.nat_key);
        }
        if e == -EEXIST
            && let Some(other) = KPR_CT.get_ptr(&sc.key)
        {
            // Another CPU created this flow a moment ago: follow it.
            // SAFETY: as above.
            let (addr, port) = unsafe { ((*other).addr, (*other).port) };
            return translate::<L2>(ctx, p, false, &addr, port);
        }
        return drop(drop_reason::CT_FULL);
    }
    // From here on a failure undoes what was created.
    let mut failed = 0u32;
    if masq {
        // client -> backend (egress): from the node.
        sc.key.daddr = backend_addr;
        sc.key.dport = backend_port;
        sc.key.kind = ct_kind::SNAT;
        sc.val.addr = sc.nat_key.daddr;
        sc.val.port = sc.nat_key.dport;
        if let Err(e) = KPR_CT.insert(&sc.key, &sc.val, u64::from(BPF_NOEXIST)) {
            failed = collision_or_full(e);
        }
    }
    if failed == 0 {
        // backend -> client (egress): from the frontend.
        sc.key.saddr = backend_addr;
        sc.key.sport = backend_port;
        sc.key.daddr = p.src16;
        sc.key.dport = p.sport;
        sc.key.kind = ct_kind::REPLY_SNAT;
        sc.val.addr = p.dst16;
        sc.val.port = p.dport;
        if let Err(e) = KPR_CT.insert(&sc.key, &sc.val, u64::from(BPF_NOEXIST)) {
            failed = collision_or_full(e);
            if masq {
                sc.key.saddr = p.src16;
                sc.key.sport = p.sport;
                sc.key.daddr = backend_addr;
                sc.key.dport = backend_port;
                sc.key.kind = ct_kind::SNAT;
                let _ = KPR_CT.remove(&sc.key);
            }
        }
    }
    if failed != 0 {
        sc.val.flags = 0;
        sc.key.saddr = p.src16;
        sc.key.daddr = p.dst16;
        sc.key.sport = p.sport;
        sc.key.dport = p.dport;
        sc.key.kind = ct_kind::FORWARD;
        let _ = KPR_CT.remove(&sc.key);
        if masq {
            let _ = KPR_CT.remove(&sc.nat_key);
        }
        return drop(failed);
    }
    if choice.service_flags & service_flags::LEAST_CONN != 0 {
        conns_add(backend_id, 1);
    }
    count_service(choice.service_id, u64::from(ctx.len()), 1, true);
    translate::<L2>(ctx, p, false, &backend_addr, backend_port)
}

#[inline(always)]
fn collision_or_full(e: i32) -> u32 {
    if e == -EEXIST {
        drop_reason::TUPLE_COLLISION
    } else {
        drop_reason::CT_FULL
    }
}
