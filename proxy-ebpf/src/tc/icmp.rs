//! ICMP and ICMPv6 errors about translated flows, translated like the flow itself.
use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use proxy_common::{CtKey, ct_flags, ct_kind, proto, v4_mapped};

use super::parse::{ip_version, read};
use super::{NEXT as OK, SHOT, csum_diff16};
use crate::maps::KPR_CT;

const IPPROTO_ICMP: u8 = 1;

/// Rewrites, in an ICMP error, the quoted packet's source (`src`) or destination address and
/// port, keeping the quoted IP header checksum and the ICMP checksum right.
#[inline(never)]
fn icmp_rewrite_inner<const L2: usize>(
    ctx: &TcContext,
    src: bool,
    addr: &[u8; 16],
    port: u16,
) -> i32 {
    let (ip_off, port_off) = if src {
        (L2 + 28 + 12, L2 + 48)
    } else {
        (L2 + 28 + 16, L2 + 48 + 2)
    };
    let (Some(old_ip), Some(old_port), Some(old_csum)) = (
        read::<[u8; 4]>(ctx, ip_off),
        read::<u16>(ctx, port_off),
        read::<u16>(ctx, L2 + 28 + 10),
    ) else {
        return SHOT;
    };
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let from = u64::from(u32::from_ne_bytes(old_ip));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if ctx.store(ip_off, &new_ip, 0).is_err()
        || ctx.l3_csum_replace(L2 + 28 + 10, from, to, 4).is_err()
        || ctx.l4_csum_replace(L2 + 22, from, to, 4).is_err()
    {
        return SHOT;
    }
    let Some(new_csum) = read::<u16>(ctx, L2 + 28 + 10) else {
        return SHOT;
    };
    let new_port = port.to_be();
    if ctx
        .l4_csum_replace(L2 + 22, u64::from(old_csum), u64::from(new_csum), 2)
        .is_err()
        || ctx.store(port_off, &new_port, 0).is_err()
        || ctx
            .l4_csum_replace(L2 + 22, u64::from(old_port), u64::from(new_port), 2)
            .is_err()
    {
        return SHOT;
    }
    OK
}

/// Rewrites the outer source (`src`) or destination address of an ICMP error.
#[inline(always)]
fn icmp_rewrite_outer<const L2: usize>(
    ctx: &TcContext,
    src: bool,
    old: [u8; 4],
    addr: &[u8; 16],
) -> i32 {
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let off = if src { L2 + 12 } else { L2 + 16 };
    let from = u64::from(u32::from_ne_bytes(old));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if ctx.l3_csum_replace(L2 + 10, from, to, 4).is_err() || ctx.store(off, &new_ip, 0).is_err() {
        return SHOT;
    }
    OK
}

/// ICMP errors (destination unreachable, time exceeded, parameter problem) about a translated
/// flow are translated like the flow itself, so path-MTU discovery and unreachables reach the
/// socket they concern. At ingress: an error about our reply to a client goes to the backend
/// (outer destination, quoted source, and the quoted masquerade address); an error from the
/// backend's side about a masqueraded packet goes back to the client. At egress: an error from a
/// backend towards a client shows the frontend instead of the backend.
#[inline(never)]
fn icmp_error<const L2: usize>(ctx: &TcContext, ingress: bool) -> i32 {
    // Whole headers at once: fewer bounds checks, and nothing the verifier mistakes for
    // pointer arithmetic.
    let Some(outer) = read::<[u8; 20]>(ctx, L2) else {
        return OK;
    };
    if outer[0] != 0x45 || outer[9] != IPPROTO_ICMP {
        return OK;
    }
    let Some(icmp) = read::<[u8; 8]>(ctx, L2 + 20) else {
        return OK;
    };
    if !matches!(icmp[0], 3 | 11 | 12) {
        return OK;
    }
    let Some(inner) = read::<[u8; 20]>(ctx, L2 + 28) else {
        return OK;
    };
    let Some(ports) = read::<[u8; 4]>(ctx, L2 + 48) else {
        return OK;
    };
    let inner_proto = inner[9];
    if inner[0] != 0x45 || (inner_proto != proto::TCP && inner_proto != proto::UDP) {
        return OK;
    }
    let outer_src = [outer[12], outer[13], outer[14], outer[15]];
    let outer_dst = [outer[16], outer[17], outer[18], outer[19]];
    let isrc = [inner[12], inner[13], inner[14], inner[15]];
    let idst = [inner[16], inner[17], inner[18], inner[19]];
    let isport = u16::from_be_bytes([ports[0], ports[1]]);
    let idport = u16::from_be_bytes([ports[2], ports[3]]);
    let (isrc16, idst16) = (v4_mapped(isrc), v4_mapped(idst));
    if ingress {
        // About our reply (frontend -> client): the flow's forward entry names the backend.
        let mut key = CtKey::new(
            idst16,
            isrc16,
            idport,
            isport,
            inner_proto,
            ct_kind::FORWARD,
        );
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: a value pointer from a successful lookup, valid for this program run.
            let ct = unsafe { &*ct };
            let (backend, bport, masq) = (ct.addr, ct.port, ct.flags & ct_flags::MASQ != 0);
            if masq {
                key = CtKey::new(idst16, backend, idport, bport, inner_proto, ct_kind::SNAT);
                if let Some(snat) = KPR_CT.get_ptr(&key) {
                    // SAFETY: as above.
                    let snat = unsafe { &*snat };
                    let (s_addr, s_port) = (snat.addr, snat.port);
                    if icmp_rewrite_inner::<L2>(ctx, false, &s_addr, s_port) != OK {
                        return SHOT;
                    }
                }
            }
            if icmp_rewrite_inner::<L2>(ctx, true, &backend, bport) != OK {
                return SHOT;
            }
            return icmp_rewrite_outer::<L2>(ctx, false, outer_dst, &backend);
        }
        // From the backend's side, about a masqueraded packet (node -> backend): to the client.
        key = CtKey::new(
            idst16,
            isrc16,
            idport,
            isport,
            inner_proto,
            ct_kind::REPLY_DNAT,
        );
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: as above.
            let ct = unsafe { &*ct };
            let (client, cport) = (ct.addr, ct.port);
            if icmp_rewrite_inner::<L2>(ctx, true, &client, cport) != OK {
                return SHOT;
            }
            return icmp_rewrite_outer::<L2>(ctx, false, outer_dst, &client);
        }
        return OK;
    }
    // Egress, towards a client, about its packet to a backend: show the frontend.
    let key = CtKey::new(
        idst16,
        isrc16,
        idport,
        isport,
        inner_proto,
        ct_kind::REPLY_SNAT,
    );
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        let (frontend, fport) = (ct.addr, ct.port);
        if icmp_rewrite_inner::<L2>(ctx, false, &frontend, fport) != OK {
            return SHOT;
        }
        if outer_src == idst {
            return icmp_rewrite_outer::<L2>(ctx, true, outer_src, &frontend);
        }
    }
    OK
}

/// ICMP or ICMPv6: each translator is called from the program itself, so their frames never
/// stack on each other.
#[inline(always)]
pub fn errors<const L2: usize>(ctx: &TcContext, ingress: bool) -> i32 {
    match ip_version::<L2>(ctx) {
        6 => icmp6_error::<L2>(ctx, ingress),
        4 => icmp_error::<L2>(ctx, ingress),
        _ => OK,
    }
}

/// Writes a 16-byte address at `off` of an ICMPv6 error and moves the ICMPv6 checksum by the
/// difference (`pseudo`: the address is in the outer header, which the checksum covers through
/// its pseudo header).
#[inline(never)]
fn icmp6_set_addr<const L2: usize>(
    ctx: &TcContext,
    off: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    pseudo: bool,
) -> bool {
    let diff = csum_diff16(old, new);
    let flags = if pseudo {
        u64::from(BPF_F_PSEUDO_HDR)
    } else {
        0
    };
    diff >= 0
        && ctx.l4_csum_replace(L2 + 42, 0, diff as u64, flags).is_ok()
        && ctx.store(off, new, 0).is_ok()
}

/// Writes a port at `off` inside an ICMPv6 error's quoted packet.
#[inline(always)]
fn icmp6_set_port<const L2: usize>(ctx: &TcContext, off: usize, old: u16, new: u16) -> bool {
    ctx.l4_csum_replace(L2 + 42, u64::from(old.to_be()), u64::from(new.to_be()), 2)
        .is_ok()
        && ctx.store(off, &new.to_be(), 0).is_ok()
}

/// The ICMPv6 form of `icmp_error` (destination unreachable, packet too big, time exceeded,
/// parameter problem), with the same three translations.
#[inline(never)]
fn icmp6_error<const L2: usize>(ctx: &TcContext, ingress: bool) -> i32 {
    // One read per header block, each checked on its own (see `icmp_error`).
    let Some(outer) = read::<[u8; 8]>(ctx, L2) else {
        return OK;
    };
    let Some(icmp) = read::<[u8; 8]>(ctx, L2 + 40) else {
        return OK;
    };
    let Some(inner) = read::<[u8; 8]>(ctx, L2 + 48) else {
        return OK;
    };
    let inner_next = inner[6];
    if outer[6] != 58
        || !matches!(icmp[0], 1..=4)
        || inner[0] >> 4 != 6
        || (inner_next != proto::TCP && inner_next != proto::UDP)
    {
        return OK;
    }
    let Some(ports) = read::<[u8; 4]>(ctx, L2 + 88) else {
        return OK;
    };
    let Some(outer_src) = read::<[u8; 16]>(ctx, L2 + 8) else {
        return OK;
    };
    let Some(outer_dst) = read::<[u8; 16]>(ctx, L2 + 24) else {
        return OK;
    };
    let Some(isrc) = read::<[u8; 16]>(ctx, L2 + 48 + 8) else {
        return OK;
    };
    let Some(idst) = read::<[u8; 16]>(ctx, L2 + 48 + 24) else {
        return OK;
    };
    let isport = u16::from_be_bytes([ports[0], ports[1]]);
    let idport = u16::from_be_bytes([ports[2], ports[3]]);
    if ingress {
        let mut key = CtKey::new(idst, isrc, idport, isport, inner_next, ct_kind::FORWARD);
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: a value pointer from a successful lookup, valid for this program run.
            let ct = unsafe { &*ct };
            let (backend, bport, masq) = (ct.addr, ct.port, ct.flags & ct_flags::MASQ != 0);
            if masq {
                key = CtKey::new(idst, backend, idport, bport, inner_next, ct_kind::SNAT);
                if let Some(snat) = KPR_CT.get_ptr(&key) {
                    // SAFETY: as above.
                    let snat = unsafe { &*snat };
                    let (s_addr, s_port) = (snat.addr, snat.port);
                    if !icmp6_set_addr::<L2>(ctx, L2 + 48 + 24, &idst, &s_addr, false)
                        || !icmp6_set_port::<L2>(ctx, L2 + 88 + 2, idport, s_port)
                    {
                        return SHOT;
                    }
                }
            }
            if !icmp6_set_addr::<L2>(ctx, L2 + 48 + 8, &isrc, &backend, false)
                || !icmp6_set_port::<L2>(ctx, L2 + 88, isport, bport)
                || !icmp6_set_addr::<L2>(ctx, L2 + 24, &outer_dst, &backend, true)
            {
                return SHOT;
            }
            return OK;
        }
        key = CtKey::new(idst, isrc, idport, isport, inner_next, ct_kind::REPLY_DNAT);
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: as above.
            let ct = unsafe { &*ct };
            let (client, cport) = (ct.addr, ct.port);
            if !icmp6_set_addr::<L2>(ctx, L2 + 48 + 8, &isrc, &client, false)
                || !icmp6_set_port::<L2>(ctx, L2 + 88, isport, cport)
                || !icmp6_set_addr::<L2>(ctx, L2 + 24, &outer_dst, &client, true)
            {
                return SHOT;
            }
        }
        return OK;
    }
    let key = CtKey::new(idst, isrc, idport, isport, inner_next, ct_kind::REPLY_SNAT);
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        let (frontend, fport) = (ct.addr, ct.port);
        if !icmp6_set_addr::<L2>(ctx, L2 + 48 + 24, &idst, &frontend, false)
            || !icmp6_set_port::<L2>(ctx, L2 + 88 + 2, idport, fport)
        {
            return SHOT;
        }
        if outer_src == idst && !icmp6_set_addr::<L2>(ctx, L2 + 8, &outer_src, &frontend, true) {
            return SHOT;
        }
    }
    OK
}
