//! The eBPF mode: loading and pinning the programs ([`datapath`]) and applying the desired
//! state to the maps as a diff ([`render`]); destroying connected UDP sockets of removed
//! backends ([`sockterm`]).
pub mod datapath;
pub mod maglev;
pub mod render;
pub mod sockterm;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A 16-byte map address (IPv4-mapped for IPv4).
#[must_use]
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => proxy_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr16`].
#[must_use]
pub fn ip_from16(a: [u8; 16]) -> IpAddr {
    if proxy_common::is_v4_mapped(&a) {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

#[must_use]
pub fn sockaddr_from16(a: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(ip_from16(a), port)
}
