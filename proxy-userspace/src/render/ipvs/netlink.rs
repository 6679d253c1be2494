//! IPVS over generic netlink (`include/uapi/linux/ip_vs.h`, the family `IPVS`): virtual
//! servers, their real servers and the connection timeouts, read and written with the
//! kernel's own messages on one socket. No crate speaks IPVS's netlink family with the
//! attributes kpr needs (persistence, flags, per-destination connection counts), and the
//! messages are few, so they are written here on top of the netlink framing kpr already uses
//! for ctnetlink.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::render::netlink::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Socket};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_VERSION: u8 = 1;

const NLA_F_NESTED: u16 = 0x8000;
// enum ipvs_cmd
const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_SET_CONFIG: u8 = 12;
const CMD_GET_CONFIG: u8 = 13;

// IPVS_CMD_ATTR_*
const ATTR_SERVICE: u16 = 1;
const ATTR_DEST: u16 = 2;
const ATTR_TIMEOUT_TCP: u16 = 4;
const ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const ATTR_TIMEOUT_UDP: u16 = 6;

// IPVS_SVC_ATTR_*
const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_FWMARK: u16 = 5;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

// IPVS_DEST_ATTR_*
const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// `IP_VS_CONN_F_MASQ`: real servers are reached by NAT (the only method kube-proxy uses).
const FWD_MASQ: u32 = 0;
const FWD_MASK: u32 = 0x7;
/// `IP_VS_SVC_F_PERSISTENT`: sessionAffinity ClientIP.
pub const SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_SCHED_MH_PORT` (`IP_VS_SVC_F_SCHED2`): the `mh` scheduler hashes the source
/// port too, as upstream asks for it.
pub const SVC_F_SCHED_MH_PORT: u32 = 0x10;
/// The flags kpr sets and compares (`IP_VS_SVC_F_HASHED` and the like are the kernel's).
const SVC_F_KPR_MASK: u32 = SVC_F_PERSISTENT | 0x8 | 0x10 | 0x20;

/// A virtual server's identity: protocol (IPPROTO_*), address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub protocol: u8,
    pub addr: SocketAddr,
}

/// One virtual server as kpr programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub key: ServiceKey,
    /// `rr`, `lc`, `wrr`, `sh`, `mh`, ...
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` (persistence, the scheduler flags).
    pub flags: u32,
    /// Persistence timeout in seconds (with [`SVC_F_PERSISTENT`]).
    pub timeout: u32,
}

/// One real server of a virtual server, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealServer {
    pub addr: SocketAddr,
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

/// The connection timeouts (seconds; 0 leaves one unchanged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// An IPVS netlink socket.
pub struct Ipvs {
    sock: Socket,
    family: u16,
}

struct Attrs(Vec<u8>);

impl Attrs {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn nested(&mut self, ty: u16, inner: &Self) -> &mut Self {
        self.put(ty | NLA_F_NESTED, &inner.0)
    }
}

/// The attributes of a netlink attribute stream: (type, payload).
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    crate::render::netlink::attrs(buf)
        .into_iter()
        .map(|(ty, payload, _)| (ty, payload))
        .collect()
}

fn get_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

fn get_u16(p: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
}

fn af(ip: IpAddr) -> u16 {
    #[expect(clippy::cast_possible_truncation, reason = "AF_INET(6) are 2 and 10")]
    if ip.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

/// `union nf_inet_addr`: 16 bytes, IPv4 in the first 4.
fn inet_addr(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b = v6.octets(),
    }
    b
}

fn parse_addr(family: u16, p: &[u8]) -> Option<IpAddr> {
    if i32::from(family) == libc::AF_INET6 {
        Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(p.get(..16)?).ok()?,
        )))
    } else {
        Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(p.get(..4)?).ok()?,
        )))
    }
}

fn key_attrs(key: &ServiceKey) -> Attrs {
    let mut a = Attrs::new();
    a.u16(SVC_AF, af(key.addr.ip()))
        .u16(SVC_PROTOCOL, u16::from(key.protocol))
        .put(SVC_ADDR, &inet_addr(key.addr.ip()))
        .put(SVC_PORT, &key.addr.port().to_be_bytes());
    a
}

fn service_attrs(vs: &VirtualServer) -> Attrs {
    let mut a = key_attrs(&vs.key);
    let mut sched = vs.scheduler.as_bytes().to_vec();
    sched.push(0);
    let mut flags = [0u8; 8];
    flags[..4].copy_from_slice(&vs.flags.to_ne_bytes());
    flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    let netmask: u32 = if vs.key.addr.is_ipv4() { u32::MAX } else { 128 };
    a.put(SVC_SCHED_NAME, &sched)
        .put(SVC_FLAGS, &flags)
        .u32(SVC_TIMEOUT, vs.timeout)
        .put(
            SVC_NETMASK,
            &if vs.key.addr.is_ipv4() {
                netmask.to_be_bytes()
            } else {
                netmask.to_ne_bytes()
            },
        );
    a
}

fn dest_attrs(addr: SocketAddr, weight: u32) -> Attrs {
    let mut a = Attrs::new();
    a.put(DEST_ADDR, &inet_addr(addr.ip()))
        .put(DEST_PORT, &addr.port().to_be_bytes())
        .u32(DEST_FWD_METHOD, FWD_MASQ)
        .u32(DEST_WEIGHT, weight)
        .u32(DEST_U_THRESH, 0)
        .u32(DEST_L_THRESH, 0)
        .u16(DEST_ADDR_FAMILY, af(addr.ip()));
    a
}

fn parse_service(p: &[u8]) -> Option<VirtualServer> {
    let mut family = 0;
    let (mut proto, mut addr, mut port) = (None, None, None);
    let (mut sched, mut flags, mut timeout, mut fwmark) = (String::new(), 0, 0, 0);
    let a = attrs(p);
    for (ty, v) in &a {
        if *ty == SVC_AF {
            family = get_u16(v)?;
        }
    }
    for (ty, v) in a {
        match ty {
            SVC_PROTOCOL => proto = get_u16(v),
            SVC_ADDR => addr = parse_addr(family, v),
            SVC_PORT => port = Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)),
            SVC_FWMARK => fwmark = get_u32(v)?,
            SVC_SCHED_NAME => {
                sched = String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string();
            }
            SVC_FLAGS => flags = get_u32(v)? & SVC_F_KPR_MASK,
            SVC_TIMEOUT => timeout = get_u32(v)?,
            _ => {}
        }
    }
    if fwmark != 0 {
        // Firewall-mark services are not kpr's (it never creates them).
        return None;
    }
    Some(VirtualServer {
        key: ServiceKey {
            protocol: u8::try_from(proto?).ok()?,
            addr: SocketAddr::new(addr?, port?),
        },
        scheduler: sched,
        flags,
        timeout,
    })
}

fn parse_dest(p: &[u8], default_family: u16) -> Option<RealServer> {
    let a = attrs(p);
    let family = a
        .iter()
        .find(|(ty, _)| *ty == DEST_ADDR_FAMILY)
        .and_then(|(_, v)| get_u16(v))
        .unwrap_or(default_family);
    let (mut addr, mut port, mut weight, mut active, mut inactive, mut fwd) =
        (None, None, 0, 0, 0, 0);
    for (ty, v) in a {
        match ty {
            DEST_ADDR => addr = parse_addr(family, v),
            DEST_PORT => port = Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)),
            DEST_WEIGHT => weight = get_u32(v)?,
            DEST_ACTIVE_CONNS => active = get_u32(v)?,
            DEST_INACT_CONNS => inactive = get_u32(v)?,
            DEST_FWD_METHOD => fwd = get_u32(v)? & FWD_MASK,
            _ => {}
        }
    }
    let _ = fwd;
    Some(RealServer {
        addr: SocketAddr::new(addr?, port?),
        weight,
        active,
        inactive,
    })
}

/// The errno of a netlink error answer (callers add what failed as context; the raw errno
/// stays readable, e.g. `EEXIST`).
fn os_error(code: i32, _what: &str) -> io::Error {
    io::Error::from_raw_os_error(-code)
}

impl Ipvs {
    /// Opens a generic netlink socket and resolves the `IPVS` family.
    ///
    /// # Errors
    /// No generic netlink, or no IPVS in this kernel (`ip_vs` not loaded and not loadable).
    pub fn open() -> io::Result<Self> {
        let mut s = Self {
            sock: Socket::open(NETLINK_GENERIC)?,
            family: GENL_ID_CTRL,
        };
        let mut name = Attrs::new();
        name.put(CTRL_ATTR_FAMILY_NAME, b"IPVS\0");
        let seq = s.send(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, NLM_F_REQUEST, &name.0)?;
        let mut id = None;
        let code = s.recv(seq, |body| {
            for (ty, v) in attrs(body) {
                if ty == CTRL_ATTR_FAMILY_ID {
                    id = get_u16(v);
                }
            }
        })?;
        match id {
            Some(id) if code == 0 => {
                s.family = id;
                Ok(s)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the kernel has no IPVS generic netlink family (modprobe ip_vs)",
            )),
        }
    }

    fn send(&mut self, ty: u16, cmd: u8, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.sock
            .send(ty, flags, [cmd, IPVS_GENL_VERSION, 0, 0], body)
    }

    fn recv(&mut self, seq: u32, each: impl FnMut(&[u8])) -> io::Result<i32> {
        self.sock.recv(seq, each)
    }

    fn request(&mut self, cmd: u8, body: &Attrs, what: &str) -> io::Result<()> {
        let seq = self.send(self.family, cmd, NLM_F_REQUEST | NLM_F_ACK, &body.0)?;
        match self.recv(seq, |_| {})? {
            0 => Ok(()),
            c => Err(os_error(c, what)),
        }
    }

    /// Every address/port virtual server in this network namespace.
    ///
    /// # Errors
    /// The dump failed.
    pub fn services(&mut self) -> io::Result<Vec<VirtualServer>> {
        let seq = self.send(
            self.family,
            CMD_GET_SERVICE,
            NLM_F_REQUEST | NLM_F_DUMP,
            &[],
        )?;
        let mut out = Vec::new();
        let code = self.recv(seq, |body| {
            for (ty, v) in attrs(body) {
                if ty == ATTR_SERVICE
                    && let Some(vs) = parse_service(v)
                {
                    out.push(vs);
                }
            }
        })?;
        if code != 0 {
            return Err(os_error(code, "listing IPVS services"));
        }
        Ok(out)
    }

    /// The real servers of `key`.
    ///
    /// # Errors
    /// The dump failed (e.g. no such virtual server).
    pub fn destinations(&mut self, key: &ServiceKey) -> io::Result<Vec<RealServer>> {
        let mut body = Attrs::new();
        body.nested(ATTR_SERVICE, &key_attrs(key));
        let seq = self.send(
            self.family,
            CMD_GET_DEST,
            NLM_F_REQUEST | NLM_F_DUMP,
            &body.0,
        )?;
        let family = af(key.addr.ip());
        let mut out = Vec::new();
        let code = self.recv(seq, |body| {
            for (ty, v) in attrs(body) {
                if ty == ATTR_DEST
                    && let Some(rs) = parse_dest(v, family)
                {
                    out.push(rs);
                }
            }
        })?;
        if code != 0 {
            return Err(os_error(code, "listing IPVS destinations"));
        }
        Ok(out)
    }

    /// Adds a virtual server.
    ///
    /// # Errors
    /// The kernel refused (e.g. an unknown scheduler: `ENOENT`).
    pub fn add_service(&mut self, vs: &VirtualServer) -> io::Result<()> {
        let mut body = Attrs::new();
        body.nested(ATTR_SERVICE, &service_attrs(vs));
        self.request(CMD_NEW_SERVICE, &body, "adding an IPVS service")
    }

    /// Changes a virtual server's scheduler, flags or timeout.
    ///
    /// # Errors
    /// The kernel refused.
    pub fn update_service(&mut self, vs: &VirtualServer) -> io::Result<()> {
        let mut body = Attrs::new();
        body.nested(ATTR_SERVICE, &service_attrs(vs));
        self.request(CMD_SET_SERVICE, &body, "updating an IPVS service")
    }

    /// Deletes a virtual server and its real servers.
    ///
    /// # Errors
    /// The kernel refused.
    pub fn delete_service(&mut self, key: &ServiceKey) -> io::Result<()> {
        let mut body = Attrs::new();
        body.nested(ATTR_SERVICE, &key_attrs(key));
        self.request(CMD_DEL_SERVICE, &body, "deleting an IPVS service")
    }

    fn dest_request(
        &mut self,
        cmd: u8,
        key: &ServiceKey,
        addr: SocketAddr,
        weight: u32,
        what: &str,
    ) -> io::Result<()> {
        let mut body = Attrs::new();
        body.nested(ATTR_SERVICE, &key_attrs(key))
            .nested(ATTR_DEST, &dest_attrs(addr, weight));
        self.request(cmd, &body, what)
    }

    /// Adds a real server (NAT forwarding).
    ///
    /// # Errors
    /// The kernel refused.
    pub fn add_destination(
        &mut self,
        key: &ServiceKey,
        addr: SocketAddr,
        weight: u32,
    ) -> io::Result<()> {
        self.dest_request(
            CMD_NEW_DEST,
            key,
            addr,
            weight,
            "adding an IPVS destination",
        )
    }

    /// Changes a real server's weight (0: no new connections, the graceful part of removal).
    ///
    /// # Errors
    /// The kernel refused.
    pub fn set_weight(
        &mut self,
        key: &ServiceKey,
        addr: SocketAddr,
        weight: u32,
    ) -> io::Result<()> {
        self.dest_request(
            CMD_SET_DEST,
            key,
            addr,
            weight,
            "updating an IPVS destination",
        )
    }

    /// Removes a real server.
    ///
    /// # Errors
    /// The kernel refused.
    pub fn delete_destination(&mut self, key: &ServiceKey, addr: SocketAddr) -> io::Result<()> {
        self.dest_request(CMD_DEL_DEST, key, addr, 0, "deleting an IPVS destination")
    }

    /// Sets the connection timeouts (0 leaves one as it is).
    ///
    /// # Errors
    /// The kernel refused.
    pub fn set_timeouts(&mut self, t: Timeouts) -> io::Result<()> {
        let mut body = Attrs::new();
        body.u32(ATTR_TIMEOUT_TCP, t.tcp)
            .u32(ATTR_TIMEOUT_TCP_FIN, t.tcp_fin)
            .u32(ATTR_TIMEOUT_UDP, t.udp);
        self.request(CMD_SET_CONFIG, &body, "setting the IPVS timeouts")
    }

    /// The connection timeouts.
    ///
    /// # Errors
    /// The kernel refused.
    pub fn timeouts(&mut self) -> io::Result<Timeouts> {
        let seq = self.send(self.family, CMD_GET_CONFIG, NLM_F_REQUEST, &[])?;
        let mut t = Timeouts::default();
        let code = self.recv(seq, |body| {
            for (ty, v) in attrs(body) {
                let Some(x) = get_u32(v) else { continue };
                match ty {
                    ATTR_TIMEOUT_TCP => t.tcp = x,
                    ATTR_TIMEOUT_TCP_FIN => t.tcp_fin = x,
                    ATTR_TIMEOUT_UDP => t.udp = x,
                    _ => {}
                }
            }
        })?;
        if code != 0 {
            return Err(os_error(code, "reading the IPVS timeouts"));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_round_trips_through_its_attributes() {
        let vs = VirtualServer {
            key: ServiceKey {
                protocol: 6,
                addr: "172.30.0.41:80".parse().unwrap(),
            },
            scheduler: "rr".into(),
            flags: SVC_F_PERSISTENT,
            timeout: 10800,
        };
        assert_eq!(parse_service(&service_attrs(&vs).0), Some(vs));
        let v6 = VirtualServer {
            key: ServiceKey {
                protocol: 17,
                addr: "[fd00::1]:53".parse().unwrap(),
            },
            scheduler: "lc".into(),
            flags: 0,
            timeout: 0,
        };
        assert_eq!(parse_service(&service_attrs(&v6).0), Some(v6));
    }

    #[test]
    fn a_destination_round_trips_through_its_attributes() {
        let a: SocketAddr = "10.180.0.1:8080".parse().unwrap();
        let rs = parse_dest(&dest_attrs(a, 1).0, af(a.ip())).unwrap();
        assert_eq!((rs.addr, rs.weight), (a, 1));
    }
}
