//! Packet parsing for the TC programs: Ethernet or L3 devices (`L2` = 14 or 0), IPv4 with
//! options and fragments, IPv6 with extension headers, TCP and UDP.
use core::mem::size_of;

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::TcContext};
use proxy_common::{proto, v4_mapped};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `Packet::frag`: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (it carries the ports).
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no L4 header; follows the first fragment's translation.
pub const FRAG_LATER: u8 = 2;

/// IPv6 extension headers walked before giving up (hop-by-hop, routing, fragment,
/// destination options, in any order).
const MAX_EXT_HEADERS: usize = 4;
/// L4 offsets are masked with this so the verifier can bound packet accesses.
const OFF_MASK: usize = 0x1ff;

/// Per-CPU scratch for the parsed packet (keeps it off the 512-byte stack).
#[btf_map]
static KPR_TC_SCRATCH: PerCpuArray<Packet, 1> = PerCpuArray::new();

/// The fields of a TCP/UDP packet the programs need.
#[derive(Default)]
pub struct Packet {
    // NB: read `l4_off` through `l4()`: the packet lives in a map slot, and the verifier only
    // accepts packet offsets it can bound.
    pub l4_off: usize,
    pub proto: u8,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// 16-byte addresses (IPv4-mapped for IPv4), as keys use them.
    pub src16: [u8; 16],
    pub dst16: [u8; 16],
    /// IPv4 addresses (zero for IPv6).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// UDP with checksum 0 (none): leave the checksum alone.
    pub udp_no_csum: bool,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// The datagram's identification (fragments only).
    pub frag_id: u32,
}

impl Packet {
    /// The L4 offset, bounded for the verifier.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4_off & OFF_MASK
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == proto::TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: bounds checked against data_end just above.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// The packet's IP version (4 or 6), from the ethertype on Ethernet devices and from the
/// first nibble on L3 devices; 0 for anything else.
#[inline(always)]
pub fn ip_version<const L2: usize>(ctx: &TcContext) -> u8 {
    if L2 == 0 {
        // Two bytes, not one: a one-byte bound check compiles to `data >= data_end`, which
        // the verifier does not turn into a packet range.
        return read::<[u8; 2]>(ctx, 0).map_or(0, |b| b[0] >> 4);
    }
    match read::<[u8; 2]>(ctx, L2 - 2) {
        Some([0x08, 0x00]) => 4,
        Some([0x86, 0xdd]) => 6,
        _ => 0,
    }
}

/// Parses into this CPU's scratch slot: `None` without a slot, `Some(None)` when the packet is
/// not TCP/UDP over IP (maybe an ICMP error), else the packet.
#[inline(always)]
pub fn scratch_parse<const L2: usize>(ctx: &TcContext) -> Option<Option<&'static Packet>> {
    let p = KPR_TC_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; TC programs do not nest on one CPU.
    let p = unsafe { &mut *p };
    Some(parse_fields::<L2>(ctx, p).map(|()| &*p))
}

#[inline(always)]
fn parse_fields<const L2: usize>(ctx: &TcContext, out: &mut Packet) -> Option<()> {
    out.frag = FRAG_NONE;
    out.frag_id = 0;
    out.tcp_flags = 0;
    out.udp_no_csum = false;
    match ip_version::<L2>(ctx) {
        6 => parse_v6::<L2>(ctx, out)?,
        4 => parse_v4::<L2>(ctx, out)?,
        _ => return None,
    }
    if out.frag == FRAG_LATER {
        out.sport = 0;
        out.dport = 0;
        return Some(());
    }
    let ports = read::<[u8; 4]>(ctx, out.l4())?;
    out.sport = u16::from_be_bytes([ports[0], ports[1]]);
    out.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if out.proto == proto::TCP {
        out.tcp_flags = read::<u8>(ctx, out.l4() + 13)?;
    } else if !out.v6 {
        out.udp_no_csum = read::<u16>(ctx, out.l4() + 6)? == 0;
    }
    Some(())
}

#[inline(always)]
fn parse_v4<const L2: usize>(ctx: &TcContext, out: &mut Packet) -> Option<()> {
    let hdr = read::<[u8; 20]>(ctx, L2)?;
    let ihl = usize::from(hdr[0] & 0x0f);
    if hdr[0] >> 4 != 4 || ihl < 5 {
        return None;
    }
    let proto = hdr[9];
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if frag & 0x1fff != 0 {
        out.frag = FRAG_LATER;
    } else if frag & 0x2000 != 0 {
        out.frag = FRAG_FIRST;
    }
    out.frag_id = u32::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    out.v6 = false;
    out.proto = proto;
    out.l4_off = L2 + ihl * 4;
    out.saddr = [hdr[12], hdr[13], hdr[14], hdr[15]];
    out.daddr = [hdr[16], hdr[17], hdr[18], hdr[19]];
    out.src16 = v4_mapped(out.saddr);
    out.dst16 = v4_mapped(out.daddr);
    Some(())
}

/// IPv6: walks up to `MAX_EXT_HEADERS` extension headers to the TCP or UDP header.
#[inline(always)]
fn parse_v6<const L2: usize>(ctx: &TcContext, out: &mut Packet) -> Option<()> {
    let mut next = read::<u8>(ctx, L2 + 6)?;
    let mut off = L2 + 40;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            // hop-by-hop, routing, destination options: (length + 1) * 8 bytes
            0 | 43 | 60 => {
                let h = read::<[u8; 2]>(ctx, off & OFF_MASK)?;
                next = h[0];
                off = (off + (usize::from(h[1]) + 1) * 8) & OFF_MASK;
            }
            // fragment header: 8 bytes
            44 => {
                let h = read::<[u8; 8]>(ctx, off & OFF_MASK)?;
                next = h[0];
                let fo = u16::from_be_bytes([h[2], h[3]]);
                if fo & 0xfff8 != 0 {
                    out.frag = FRAG_LATER;
                } else if fo & 1 != 0 {
                    out.frag = FRAG_FIRST;
                }
                out.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                off = (off + 8) & OFF_MASK;
            }
            _ => break,
        }
        i += 1;
    }
    // Headers this long would not leave the L4 header inside the bound the verifier knows.
    if off > OFF_MASK - 40 || (next != proto::TCP && next != proto::UDP) {
        return None;
    }
    out.v6 = true;
    out.proto = next;
    out.l4_off = off;
    out.src16 = read::<[u8; 16]>(ctx, L2 + 8)?;
    out.dst16 = read::<[u8; 16]>(ctx, L2 + 24)?;
    out.saddr = [0; 4];
    out.daddr = [0; 4];
    Some(())
}
