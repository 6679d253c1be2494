//! Packets for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 + TCP/UDP (or an ICMP error quoting
//! another packet) with correct checksums, and the readers and checksum checks for what the
//! programs return. `kpr trace`, the packet tests and the benchmarks all build packets here.
use std::net::{IpAddr, SocketAddr};

const ETH: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// The layer-4 part of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment with these flags (0x02 SYN, 0x12 SYN|ACK, 0x10 ACK, 0x18 PSH|ACK, ...),
    /// sequence number 1000.
    Tcp(u8),
    /// A UDP datagram with its checksum.
    Udp,
    /// A UDP datagram without a checksum (IPv4 only; 0 means none).
    UdpNoChecksum,
}

/// TCP flags.
pub mod tcp_flags {
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    pub const SYN_ACK: u8 = 0x12;
    pub const PSH_ACK: u8 = 0x18;
}

/// The one's-complement sum of 16-bit words (odd length padded with a zero byte).
#[must_use]
pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Folds a sum into a 16-bit one's-complement checksum.
#[must_use]
pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(u16::try_from(s).unwrap_or(0))
}

fn is_v6(p: &[u8]) -> bool {
    p[12..14] == ETH_P_IPV6.to_be_bytes()
}

/// (offset of the L4 header, L4 protocol) of a packet built here.
#[must_use]
pub fn l4(p: &[u8]) -> (usize, u8) {
    if is_v6(p) {
        (ETH + 40, p[ETH + 6])
    } else {
        (ETH + usize::from(p[ETH] & 0x0f) * 4, p[ETH + 9])
    }
}

/// The pseudo-header sum of `p`'s IP header for an L4 payload of `len` bytes.
fn pseudo(p: &[u8], proto: u8, len: usize) -> u32 {
    let addrs = if is_v6(p) {
        &p[ETH + 8..ETH + 40]
    } else {
        &p[ETH + 12..ETH + 20]
    };
    sum16(addrs) + u32::from(proto) + u32::try_from(len).unwrap_or(0)
}

/// Where the checksum of this L4 protocol sits in its header.
const fn checksum_offset(proto: u8) -> usize {
    match proto {
        UDP => 6,
        TCP => 16,
        _ => 2, // ICMP, ICMPv6
    }
}

/// The L4 checksum `p` should carry (ICMPv4 has no pseudo header).
#[must_use]
pub fn l4_checksum(p: &[u8]) -> u16 {
    let (off, proto) = l4(p);
    let body = &p[off..];
    let mut copy = body.to_vec();
    let at = checksum_offset(proto);
    copy[at] = 0;
    copy[at + 1] = 0;
    let base = if proto == ICMP {
        0
    } else {
        pseudo(p, proto, body.len())
    };
    let c = fold(base + sum16(&copy));
    if proto == UDP && c == 0 { 0xffff } else { c }
}

fn set_l4_checksum(p: &mut [u8]) {
    let (off, proto) = l4(p);
    let c = l4_checksum(p);
    let at = off + checksum_offset(proto);
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Ethernet + IP header for `len` bytes of L4 (IPv4 header checksum set).
fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; ETH];
    p[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&u16::try_from(20 + len).unwrap_or(0).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = fold(sum16(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&ip);
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            };
            p[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&v6(s).octets());
            ip[24..40].copy_from_slice(&v6(d).octets());
            p.extend_from_slice(&ip);
        }
    }
    p
}

/// A TCP or UDP packet from `src` to `dst` (both of one family) carrying `payload`, with
/// correct checksums.
#[must_use]
pub fn build(src: SocketAddr, dst: SocketAddr, l4: L4, payload: &[u8]) -> Vec<u8> {
    let (proto, hdr) = match l4 {
        L4::Tcp(_) => (TCP, 20),
        L4::Udp | L4::UdpNoChecksum => (UDP, 8),
    };
    let len = hdr + payload.len();
    let mut p = ip_header(src.ip(), dst.ip(), proto, len);
    let off = p.len();
    p.resize(off + len, 0);
    p[off..off + 2].copy_from_slice(&src.port().to_be_bytes());
    p[off + 2..off + 4].copy_from_slice(&dst.port().to_be_bytes());
    match l4 {
        L4::Tcp(flags) => {
            p[off + 4..off + 8].copy_from_slice(&1000u32.to_be_bytes());
            p[off + 12] = 5 << 4;
            p[off + 13] = flags;
            p[off + 14..off + 16].copy_from_slice(&64240u16.to_be_bytes());
        }
        L4::Udp | L4::UdpNoChecksum => {
            p[off + 4..off + 6].copy_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
        }
    }
    p[off + hdr..].copy_from_slice(payload);
    if l4 != L4::UdpNoChecksum {
        set_l4_checksum(&mut p);
    }
    p
}

/// An ICMP (IPv4) or ICMPv6 error of `icmp_type`/`code` from `from` to `to`, quoting the IP
/// header and the first 8 L4 bytes of `inner` (a packet built here), with its checksum. For
/// "fragmentation needed" (3/4) and "packet too big" (ICMPv6 2) the MTU is 1280.
#[must_use]
pub fn icmp_error(from: IpAddr, to: IpAddr, icmp_type: u8, code: u8, inner: &[u8]) -> Vec<u8> {
    let (inner_l4, _) = l4(inner);
    let quote = &inner[ETH..inner_l4 + 8];
    let proto = if from.is_ipv4() { ICMP } else { ICMPV6 };
    let len = 8 + quote.len();
    let mut p = ip_header(from, to, proto, len);
    let off = p.len();
    p.resize(off + len, 0);
    p[off] = icmp_type;
    p[off + 1] = code;
    let mtu = (proto == ICMP && (icmp_type, code) == (3, 4)) || (proto == ICMPV6 && icmp_type == 2);
    if mtu {
        let at = if proto == ICMP { off + 6 } else { off + 4 };
        let size = if proto == ICMP { 2 } else { 4 };
        p[at..at + size].copy_from_slice(&1280u32.to_be_bytes()[4 - size..]);
    }
    p[off + 8..].copy_from_slice(quote);
    set_l4_checksum(&mut p);
    p
}

fn addr_at(p: &[u8], at: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(<[u8; 16]>::try_from(&p[at..at + 16]).unwrap_or([0; 16]))
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&p[at..at + 4]).unwrap_or([0; 4]))
    }
}

fn port_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

/// (source, destination) of a TCP or UDP packet.
#[must_use]
pub fn ends(p: &[u8]) -> (SocketAddr, SocketAddr) {
    let v6 = is_v6(p);
    let (off, _) = l4(p);
    let (s, d) = if v6 {
        (ETH + 8, ETH + 24)
    } else {
        (ETH + 12, ETH + 16)
    };
    (
        SocketAddr::new(addr_at(p, s, v6), port_at(p, off)),
        SocketAddr::new(addr_at(p, d, v6), port_at(p, off + 2)),
    )
}

/// (source, destination) of the packet an ICMP error quotes.
#[must_use]
pub fn quoted_ends(p: &[u8]) -> (SocketAddr, SocketAddr) {
    let v6 = is_v6(p);
    let (off, _) = l4(p);
    let ip = off + 8;
    let (s, d, l4) = if v6 {
        (ip + 8, ip + 24, ip + 40)
    } else {
        (ip + 12, ip + 16, ip + usize::from(p[ip] & 0x0f) * 4)
    };
    (
        SocketAddr::new(addr_at(p, s, v6), port_at(p, l4)),
        SocketAddr::new(addr_at(p, d, v6), port_at(p, l4 + 2)),
    )
}

/// Whether `p` is long enough for the checksum checks to read it (a truncated or malformed
/// packet is an error, never a panic).
fn well_formed(p: &[u8]) -> Result<(), String> {
    let short = || Err(format!("malformed: {} bytes", p.len()));
    if p.len() < ETH + 20 {
        return short();
    }
    if p[12..14] != ETH_P_IP.to_be_bytes() && !is_v6(p) {
        return Err("not IPv4 or IPv6".into());
    }
    if is_v6(p) && p.len() < ETH + 40 {
        return short();
    }
    if !is_v6(p) && p[ETH] & 0x0f < 5 {
        return Err("malformed: IPv4 header length".into());
    }
    let (off, proto) = l4(p);
    let need = match proto {
        TCP => off + 20,
        UDP => off + 8,
        ICMP => off + 28,
        _ => off + 4,
    };
    if p.len() < need {
        return short();
    }
    Ok(())
}

/// Checks the IPv4 header checksum and the L4 checksum (a UDP checksum of 0 means none).
///
/// # Errors
/// Which checksum is wrong.
pub fn verify_checksums(p: &[u8]) -> Result<(), String> {
    well_formed(p)?;
    if !is_v6(p) && fold(sum16(&p[ETH..ETH + 20])) != 0 {
        return Err("IPv4 header checksum".into());
    }
    let (off, proto) = l4(p);
    if proto == ICMP && fold(sum16(&p[off + 8..off + 28])) != 0 {
        return Err("quoted IPv4 header checksum".into());
    }
    let at = off + checksum_offset(proto);
    let stored = port_at(p, at);
    if proto == UDP && stored == 0 && !is_v6(p) {
        return Ok(());
    }
    let want = l4_checksum(p);
    if stored == want {
        Ok(())
    } else {
        Err(format!(
            "L4 (protocol {proto}) checksum {stored:#06x}, should be {want:#06x}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn built_packets_verify_and_read_back() {
        for (src, dst) in [
            ("203.0.113.2:40000", "192.168.0.2:3001"),
            ("[2001:db8::2]:40000", "[fd00::2]:3001"),
        ] {
            for l4 in [L4::Tcp(tcp_flags::SYN), L4::Udp] {
                let p = build(sa(src), sa(dst), l4, b"hello");
                verify_checksums(&p).unwrap_or_else(|e| panic!("{src} {l4:?}: {e}"));
                assert_eq!(ends(&p), (sa(src), sa(dst)));
                let mut bad = p.clone();
                *bad.last_mut().unwrap() ^= 1;
                assert!(verify_checksums(&bad).is_err(), "a flipped bit is noticed");
                let err = icmp_error(sa(dst).ip(), sa(src).ip(), 3, 3, &p);
                verify_checksums(&err).unwrap();
                assert_eq!(quoted_ends(&err), (sa(src), sa(dst)));
            }
        }
    }
}
