//! TC programs for traffic that does not start on this node: NodePort, ExternalIPs and
//! LoadBalancer IPs reached from outside.
//!
//! `kpr_tc_ingress` rewrites destinations (before routing): a new flow to an EXTERNAL-scope
//! frontend picks a backend, records its conntrack entries and is DNATed; established flows
//! follow their entry; replies to masqueraded flows get the client back as destination.
//! `kpr_tc_egress` rewrites sources (after routing): masquerade towards the backend, and the
//! frontend address on replies towards the client. Splitting it this way keeps the kernel's
//! own routing and forwarding in charge, and never shows the stack a packet whose source is a
//! local address. Parsing uses direct packet access; writes use the checksum-aware helpers.
//!
//! Every program exists twice: `kpr_tc_*` for Ethernet devices and `kpr_tc_*_l3` for devices
//! without a link-layer header (tun, ipip, WireGuard); the agent attaches the one that fits.
//! Packets kpr does not translate, drop or answer go on with `TCX_NEXT` (`TC_ACT_UNSPEC`
//! under clsact), so programs attached after kpr see them; translated packets do too.
mod ct;
mod icmp;
mod observe;
mod parse;
mod reject;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT},
    helpers::generated::{bpf_csum_diff, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{CtKey, FragKey, FragValue, ct_flags, ct_kind, drop_reason, proto};

use self::parse::{FRAG_FIRST, FRAG_LATER, Packet, scratch_parse};
use crate::maps::{KPR_CT, KPR_FRAGS, count_drop, count_service};

/// Go on: the next program of the chain (tcx) or the next filter (clsact), then the stack.
pub const NEXT: i32 = -1;
pub const SHOT: i32 = TC_ACT_SHOT as i32;
/// Ethernet header length.
pub const ETH: usize = 14;

#[classifier]
fn kpr_tc_ingress(ctx: TcContext) -> i32 {
    ingress::<ETH>(&ctx)
}

#[classifier]
fn kpr_tc_egress(ctx: TcContext) -> i32 {
    egress::<ETH>(&ctx)
}

#[classifier]
fn kpr_tc_ingress_l3(ctx: TcContext) -> i32 {
    ingress::<0>(&ctx)
}

#[classifier]
fn kpr_tc_egress_l3(ctx: TcContext) -> i32 {
    egress::<0>(&ctx)
}

/// Drops the packet, counting why.
#[inline(always)]
pub fn drop(reason: u32) -> i32 {
    count_drop(reason);
    SHOT
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// The packet when it is a TCP/UDP packet with ports, or the verdict when the program is
/// done with it here: ICMP errors and later fragments are handled whole, everything else
/// that is not TCP/UDP over IP passes.
#[inline(always)]
fn flow_packet<const L2: usize>(ctx: &TcContext, egress: bool) -> Result<&'static Packet, i32> {
    match scratch_parse::<L2>(ctx) {
        Some(Some(p)) if p.frag == FRAG_LATER => Err(follow_fragment::<L2>(ctx, p, egress)),
        Some(Some(p)) => Ok(p),
        Some(None) => Err(icmp::errors::<L2>(ctx, !egress)),
        None => Err(NEXT),
    }
}

#[inline(always)]
fn ingress<const L2: usize>(ctx: &TcContext) -> i32 {
    let p = match flow_packet::<L2>(ctx, false) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    let now = now_ns();
    // An established flow to a frontend, or a reply to a masqueraded flow. Map values are
    // used in place, not copied to the stack.
    let mut key = CtKey::new(
        p.src16,
        p.dst16,
        p.sport,
        p.dport,
        p.proto,
        ct_kind::FORWARD,
    );
    if let Some(ct) = KPR_CT.get_ptr_mut(&key) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        let ct = unsafe { &mut *ct };
        if ct::keeps_flow(p, ct, now) {
            ct::refresh(p, ct, now, false);
            if ct.flags & ct_flags::KERNEL_NAT != 0 {
                // Established through kube-proxy's rules: the kernel's conntrack NATs it.
                return NEXT;
            }
            count_service(ct.service_id, u64::from(ctx.len()), 1, false);
            return translate::<L2>(ctx, p, false, &ct.addr, ct.port);
        }
        // Expired, closed and reopened, or a UDP flow whose backend left: a new flow.
        ct::delete_flow(&key, ct);
    }
    key.kind = ct_kind::REPLY_DNAT;
    if let Some(ct) = KPR_CT.get_ptr_mut(&key) {
        // SAFETY: as above.
        let ct = unsafe { &mut *ct };
        ct::refresh(p, ct, now, true);
        return translate::<L2>(ctx, p, false, &ct.addr, ct.port);
    }
    let mut choice = ct::Choice::default();
    match ct::choose(p, &mut choice) {
        ct::CHOSEN => ct::create_flow::<L2>(ctx, p, &choice, now),
        ct::REJECT if p.v6 => reject::reject_v6::<L2>(ctx, p),
        ct::REJECT if p.proto == proto::TCP => reject::reject_tcp::<L2>(ctx, p),
        ct::REJECT => reject::reject_udp::<L2>(ctx, p),
        verdict => verdict,
    }
}

#[inline(always)]
fn egress<const L2: usize>(ctx: &TcContext) -> i32 {
    let p = match flow_packet::<L2>(ctx, true) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    let mut key = CtKey::new(p.src16, p.dst16, p.sport, p.dport, p.proto, ct_kind::SNAT);
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        let ct = unsafe { &*ct };
        return translate::<L2>(ctx, p, true, &ct.addr, ct.port);
    }
    key.kind = ct_kind::REPLY_SNAT;
    if let Some(ct) = KPR_CT.get_ptr_mut(&key) {
        // SAFETY: as above.
        let ct = unsafe { &mut *ct };
        let now = now_ns();
        ct::refresh(p, ct, now, true);
        if p.tcp_flags & parse::TCP_RST != 0 {
            ct::close_forward(&key, ct, now);
        }
        count_service(ct.service_id, u64::from(ctx.len()), 1, false);
        return translate::<L2>(ctx, p, true, &ct.addr, ct.port);
    }
    NEXT
}

/// Rewrites the source (`src`) or destination of a packet and, for the first fragment of a
/// datagram, remembers the rewrite for the fragments that follow.
#[inline(always)]
pub fn translate<const L2: usize>(
    ctx: &TcContext,
    p: &Packet,
    src: bool,
    addr: &[u8; 16],
    port: u16,
) -> i32 {
    if p.frag == FRAG_FIRST {
        remember_fragment(p, src, addr);
    }
    let verdict = rewrite::<L2>(ctx, p, src, addr, port);
    if verdict == SHOT {
        return drop(drop_reason::REWRITE);
    }
    verdict
}

/// Egress fragments are keyed like ingress ones, with `egress` set.
#[inline(never)]
fn remember_fragment(p: &Packet, src: bool, addr: &[u8; 16]) {
    let key = FragKey {
        saddr: p.src16,
        daddr: p.dst16,
        id: p.frag_id,
        proto: p.proto,
        egress: u8::from(src),
        _pad: [0; 2],
    };
    let value = FragValue {
        addr: *addr,
        src: u8::from(src),
        _pad: [0; 3],
    };
    let _ = KPR_FRAGS.insert(&key, &value, 0);
}

/// A later fragment (no ports): rewritten like its datagram's first fragment was, address
/// only (the L4 checksum, in the first fragment, already accounts for it). Sources are
/// rewritten at egress, destinations at ingress, as for whole packets.
#[inline(never)]
fn follow_fragment<const L2: usize>(ctx: &TcContext, p: &Packet, egress: bool) -> i32 {
    let key = FragKey {
        saddr: p.src16,
        daddr: p.dst16,
        id: p.frag_id,
        proto: p.proto,
        egress: u8::from(egress),
        _pad: [0; 2],
    };
    let Some(f) = KPR_FRAGS.get_ptr(&key) else {
        return NEXT;
    };
    // SAFETY: a value pointer from a successful lookup, valid for this program run.
    let (addr, src) = unsafe { ((*f).addr, (*f).src != 0) };
    let ok = if p.v6 {
        ctx.store(if src { L2 + 8 } else { L2 + 24 }, &addr, 0)
            .is_ok()
    } else {
        let (off, old) = if src {
            (L2 + 12, p.saddr)
        } else {
            (L2 + 16, p.daddr)
        };
        let new_ip = [addr[12], addr[13], addr[14], addr[15]];
        ctx.l3_csum_replace(
            L2 + 10,
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new_ip)),
            4,
        )
        .is_ok()
            && ctx.store(off, &new_ip, 0).is_ok()
    };
    if ok { NEXT } else { drop(drop_reason::REWRITE) }
}

#[inline(always)]
fn l4_csum_off(p: &Packet) -> usize {
    if p.proto == proto::TCP {
        p.l4() + 16
    } else {
        p.l4() + 6
    }
}

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    if p.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites the source (`src`) or destination address and port to `addr`:`port`, fixing the
/// IPv4 and L4 checksums. Out of line (shared by every path, small stack of its own).
#[inline(never)]
fn rewrite<const L2: usize>(
    ctx: &TcContext,
    p: &Packet,
    src: bool,
    addr: &[u8; 16],
    port: u16,
) -> i32 {
    if p.v6 {
        return rewrite_v6::<L2>(ctx, p, src, addr, port);
    }
    let (ip_off, old_ip, port_off, old_port) = if src {
        (L2 + 12, p.saddr, p.l4(), p.sport)
    } else {
        (L2 + 16, p.daddr, p.l4() + 2, p.dport)
    };
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let from = u64::from(u32::from_ne_bytes(old_ip));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if !p.udp_no_csum {
        let csum = l4_csum_off(p);
        if ctx
            .l4_csum_replace(
                csum,
                from,
                to,
                u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p) | 4,
            )
            .is_err()
            || ctx
                .l4_csum_replace(
                    csum,
                    u64::from(old_port.to_be()),
                    u64::from(port.to_be()),
                    l4_flags(p) | 2,
                )
                .is_err()
        {
            return SHOT;
        }
    }
    if ctx.l3_csum_replace(L2 + 10, from, to, 4).is_err()
        || ctx.store(ip_off, &new_ip, 0).is_err()
        || ctx.store(port_off, &port.to_be(), 0).is_err()
    {
        return SHOT;
    }
    NEXT
}

/// The checksum difference between two 16-byte addresses (bpf_csum_diff), negative on error.
#[inline(always)]
pub fn csum_diff16(old: &[u8; 16], new: &[u8; 16]) -> i64 {
    let mut from = [0u32; 4];
    let mut to = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        from[i] = u32::from_ne_bytes([old[i * 4], old[i * 4 + 1], old[i * 4 + 2], old[i * 4 + 3]]);
        to[i] = u32::from_ne_bytes([new[i * 4], new[i * 4 + 1], new[i * 4 + 2], new[i * 4 + 3]]);
        i += 1;
    }
    // SAFETY: both buffers are 16 bytes on our stack, as the helper requires.
    unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) }
}

/// The IPv6 form of `rewrite`: no IP checksum; the L4 checksum moves by the difference of
/// the 16-byte addresses (bpf_csum_diff) and of the ports.
#[inline(never)]
fn rewrite_v6<const L2: usize>(
    ctx: &TcContext,
    p: &Packet,
    src: bool,
    addr: &[u8; 16],
    port: u16,
) -> i32 {
    let (ip_off, old, port_off, old_port) = if src {
        (L2 + 8, &p.src16, p.l4(), p.sport)
    } else {
        (L2 + 24, &p.dst16, p.l4() + 2, p.dport)
    };
    let diff = csum_diff16(old, addr);
    if diff < 0 {
        return SHOT;
    }
    let csum = l4_csum_off(p);
    if ctx
        .l4_csum_replace(
            csum,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p),
        )
        .is_err()
        || ctx
            .l4_csum_replace(
                csum,
                u64::from(old_port.to_be()),
                u64::from(port.to_be()),
                l4_flags(p) | 2,
            )
            .is_err()
        || ctx.store(ip_off, addr, 0).is_err()
        || ctx.store(port_off, &port.to_be(), 0).is_err()
    {
        return SHOT;
    }
    NEXT
}
