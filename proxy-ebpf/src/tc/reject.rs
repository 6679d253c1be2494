//! Answers for frontends without endpoints (upstream's REJECT): a TCP RST or an ICMP port
//! unreachable, built in place and sent back out of the interface the packet came in on.
use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::generated::{bpf_redirect, bpf_skb_store_bytes},
    programs::TcContext,
};
use proxy_common::{drop_reason, proto};

use super::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, read};
use super::{ETH, SHOT, drop};

/// One's-complement sum of big-endian 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sums 16-bit big-endian words of `b` into `sum` (even length).
#[inline(always)]
fn sum_words(b: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

/// The packet's MAC addresses (destination, source), zero on L3 devices.
#[inline(always)]
fn macs<const L2: usize>(ctx: &TcContext) -> Option<[u8; 12]> {
    if L2 == ETH {
        read::<[u8; 12]>(ctx, 0)
    } else {
        Some([0; 12])
    }
}

/// Writes an Ethernet header from the packet's MACs swapped (nothing on L3 devices).
#[inline(always)]
fn reply_ethernet<const L2: usize>(out: &mut [u8], eth: &[u8; 12], ethertype: [u8; 2]) {
    if L2 == ETH {
        out[..6].copy_from_slice(&eth[6..12]);
        out[6..12].copy_from_slice(&eth[..6]);
        out[12] = ethertype[0];
        out[13] = ethertype[1];
    }
}

/// Sends the (rewritten) packet back out of the interface it arrived on.
#[inline(always)]
fn back_out<const L2: usize>(ctx: &TcContext) -> i32 {
    // SAFETY: reading ifindex from our own context; bpf_redirect is a plain helper call.
    unsafe {
        let ifindex = (*(ctx.as_ptr() as *const __sk_buff)).ifindex;
        bpf_redirect(ifindex, 0) as i32
    }
}

/// Resizes the packet to `len` and writes `out[..len]` over it.
#[inline(always)]
fn replace_packet<const L2: usize>(ctx: &TcContext, out: &[u8], len: usize) -> bool {
    if ctx.change_tail(len as u32, 0).is_err() || out.len() < len {
        return false;
    }
    // SAFETY: `out` holds at least `len` bytes; the skb was resized to `len` just above.
    unsafe { bpf_skb_store_bytes(ctx.as_ptr().cast(), 0, out.as_ptr().cast(), len as u32, 0) == 0 }
}

/// Ethernet (MACs swapped) and an IPv4 header from the packet's destination back to its
/// source, with its checksum.
#[inline(always)]
fn ipv4_reply_headers<const L2: usize>(
    out: &mut [u8],
    eth: &[u8; 12],
    p: &Packet,
    proto: u8,
    ip_len: u16,
) {
    reply_ethernet::<L2>(out, eth, [0x08, 0x00]);
    let ip = L2;
    out[ip] = 0x45;
    out[ip + 2..ip + 4].copy_from_slice(&ip_len.to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = proto;
    out[ip + 12..ip + 16].copy_from_slice(&p.daddr);
    out[ip + 16..ip + 20].copy_from_slice(&p.saddr);
    let csum = fold(sum_words(&out[ip..ip + 20], 0));
    out[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
}

/// A RST answering the segment whose first 14 TCP bytes are `hdr` and which carried
/// `payload` bytes (RFC 9293: SEQ=SEG.ACK if it had ACK, else SEQ=0, ACK=SEG.SEQ+SEG.LEN),
/// written at `t` without its checksum.
#[inline(always)]
fn write_rst(out: &mut [u8], t: usize, p: &Packet, hdr: &[u8; 14], payload: u32) {
    let flags = hdr[13];
    let seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let ack = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let syn_fin = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (
            0u32,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    out[t..t + 2].copy_from_slice(&p.dport.to_be_bytes());
    out[t + 2..t + 4].copy_from_slice(&p.sport.to_be_bytes());
    out[t + 4..t + 8].copy_from_slice(&new_seq.to_be_bytes());
    out[t + 8..t + 12].copy_from_slice(&new_ack.to_be_bytes());
    out[t + 12] = 5 << 4;
    out[t + 13] = new_flags;
}

/// The IPv6 REJECT: a TCP RST, or an ICMPv6 port unreachable (type 1 code 4) quoting the
/// datagram's IPv6 header and first 8 bytes, sent back out of the interface it came in on.
#[inline(never)]
pub fn reject_v6<const L2: usize>(ctx: &TcContext, p: &Packet) -> i32 {
    const MAX: usize = ETH + 40 + 8 + 48;
    let Some(eth) = macs::<L2>(ctx) else {
        return drop(drop_reason::REJECT);
    };
    let tcp = p.proto == proto::TCP;
    let l4_len: usize = if tcp { 20 } else { 8 + 48 };
    let mut out = [0u8; MAX];
    let l4 = L2 + 40;
    if tcp {
        // The segment's TCP header sits after any extension headers.
        let (Some(hdr), Some(plen)) = (read::<[u8; 14]>(ctx, p.l4()), read::<[u8; 2]>(ctx, L2 + 4))
        else {
            return drop(drop_reason::REJECT);
        };
        let ext = (p.l4() - (L2 + 40)) as u32;
        if hdr[13] & TCP_RST != 0 {
            return SHOT; // never answer a RST
        }
        let payload =
            u32::from(u16::from_be_bytes(plen)).saturating_sub(ext + u32::from(hdr[12] >> 4) * 4);
        write_rst(&mut out, l4, p, &hdr, payload);
    } else {
        let Some(quote) = read::<[u8; 48]>(ctx, L2) else {
            return drop(drop_reason::REJECT);
        };
        out[l4] = 1; // destination unreachable
        out[l4 + 1] = 4; // port unreachable
        out[l4 + 8..l4 + 56].copy_from_slice(&quote);
    }
    reply_ethernet::<L2>(&mut out, &eth, [0x86, 0xdd]);
    let ip = L2;
    let next = if tcp { proto::TCP } else { 58 };
    out[ip] = 0x60;
    out[ip + 4..ip + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    out[ip + 6] = next;
    out[ip + 7] = 64;
    out[ip + 8..ip + 24].copy_from_slice(&p.dst16);
    out[ip + 24..ip + 40].copy_from_slice(&p.src16);
    // Checksum over the IPv6 pseudo header and the L4 bytes.
    let pseudo = sum_words(&out[ip + 8..ip + 40], 0) + l4_len as u32 + u32::from(next);
    let csum = fold(sum_words(&out[l4..l4 + l4_len], pseudo)).to_be_bytes();
    let at = if tcp { l4 + 16 } else { l4 + 2 };
    out[at..at + 2].copy_from_slice(&csum);
    if !replace_packet::<L2>(ctx, &out, L2 + 40 + l4_len) {
        return drop(drop_reason::REJECT);
    }
    back_out::<L2>(ctx)
}

/// Turns a UDP datagram to a frontend without endpoints into an ICMP port unreachable (type 3
/// code 3, quoting the datagram's IP header and first 8 bytes) sent back out of the interface
/// it came in on: a connected UDP socket sees ECONNREFUSED, like upstream's REJECT.
#[inline(never)]
pub fn reject_udp<const L2: usize>(ctx: &TcContext, p: &Packet) -> i32 {
    const QUOTE: usize = 20 + 8;
    const IP_LEN: usize = 20 + 8 + QUOTE;
    let len = L2 + IP_LEN;
    if p.l4() != L2 + 20 {
        return drop(drop_reason::REJECT); // IP options: not worth quoting
    }
    let (Some(eth), Some(quote)) = (macs::<L2>(ctx), read::<[u8; QUOTE]>(ctx, L2)) else {
        return drop(drop_reason::REJECT);
    };
    let mut out = [0u8; ETH + IP_LEN];
    ipv4_reply_headers::<L2>(&mut out, &eth, p, 1, IP_LEN as u16);
    let icmp = L2 + 20;
    out[icmp] = 3; // destination unreachable
    out[icmp + 1] = 3; // port unreachable
    out[icmp + 8..icmp + 8 + QUOTE].copy_from_slice(&quote);
    let csum = fold(sum_words(&out[icmp..icmp + 8 + QUOTE], 0));
    out[icmp + 2..icmp + 4].copy_from_slice(&csum.to_be_bytes());
    if !replace_packet::<L2>(ctx, &out, len) {
        return drop(drop_reason::REJECT);
    }
    back_out::<L2>(ctx)
}

/// Turns a TCP segment to a frontend without endpoints into a RST sent back out of the
/// interface it came in on (upstream's REJECT: the client learns at once).
#[inline(never)]
pub fn reject_tcp<const L2: usize>(ctx: &TcContext, p: &Packet) -> i32 {
    let len = L2 + 20 + 20;
    let (Some(eth), Some(tot_len), Some(hdr)) = (
        macs::<L2>(ctx),
        read::<[u8; 2]>(ctx, L2 + 2),
        read::<[u8; 14]>(ctx, p.l4()),
    ) else {
        return drop(drop_reason::REJECT);
    };
    if hdr[13] & TCP_RST != 0 {
        return SHOT; // never answer a RST
    }
    let headers = (p.l4() - L2 + usize::from(hdr[12] >> 4) * 4) as u32;
    let payload = u32::from(u16::from_be_bytes(tot_len)).saturating_sub(headers);
    let mut out = [0u8; ETH + 20 + 20];
    ipv4_reply_headers::<L2>(&mut out, &eth, p, proto::TCP, 40);
    let t = L2 + 20;
    write_rst(&mut out, t, p, &hdr, payload);
    let pseudo = sum_words(&out[L2 + 12..L2 + 20], 0) + u32::from(proto::TCP) + 20;
    let csum = fold(sum_words(&out[t..t + 20], pseudo));
    out[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());
    if !replace_packet::<L2>(ctx, &out, len) {
        return drop(drop_reason::REJECT);
    }
    back_out::<L2>(ctx)
}
