//! UDP conntrack cleanup for the rule-based modes, as upstream does it
//! (`pkg/proxy/conntrack/cleanup.go`): netfilter NATs a UDP flow once, when its conntrack entry
//! is created, and the entry lives on (30 s, 120 s once it saw replies) while packets keep
//! coming. So after a sync:
//! - entries DNATed to a backend that a UDP frontend no longer has are deleted, so the flow's
//!   next datagram is balanced afresh instead of going to the removed backend;
//! - for a UDP frontend that had no backends before (REJECT or DROP), every entry to it is
//!   deleted, so a flow that was refused or dropped is translated now (0 -> N).
//!
//! One `ctnetlink` dump per family and one delete message per stale entry, over one netlink
//! socket: no process is spawned.
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};

use super::netlink::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, attrs};
use crate::model::{DesiredState, FrontendKey, Protocol};

/// The UDP backends of every UDP frontend (both traffic classes), to compare across syncs.
pub type UdpBackends = BTreeMap<FrontendKey, BTreeSet<SocketAddr>>;

/// [`UdpBackends`] of a desired state.
#[must_use]
pub fn udp_backends(desired: &DesiredState) -> UdpBackends {
    desired
        .frontends
        .iter()
        .filter(|(k, _)| k.protocol == Protocol::Udp)
        .map(|(k, fe)| {
            let mut b: BTreeSet<SocketAddr> = fe.internal.backends().iter().copied().collect();
            b.extend(fe.external.backends().iter().copied());
            (*k, b)
        })
        .collect()
}

/// Entries to delete: every entry to `frontend`, or only those DNATed to `backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stale {
    pub frontend: SocketAddr,
    pub backend: Option<SocketAddr>,
}

/// What changed between two syncs that leaves stale UDP entries behind.
#[must_use]
pub fn stale(old: &UdpBackends, new: &UdpBackends) -> BTreeSet<Stale> {
    let mut out = BTreeSet::new();
    for (key, now) in new {
        let frontend = SocketAddr::new(key.ip, key.port);
        match old.get(key) {
            // Had no backend: flows to it were refused or dropped, untranslated.
            Some(before) if before.is_empty() && !now.is_empty() => {
                out.insert(Stale {
                    frontend,
                    backend: None,
                });
            }
            Some(before) => {
                for b in before.difference(now) {
                    out.insert(Stale {
                        frontend,
                        backend: Some(*b),
                    });
                }
            }
            None => {
                if !now.is_empty() {
                    out.insert(Stale {
                        frontend,
                        backend: None,
                    });
                }
            }
        }
    }
    for (key, before) in old {
        if !new.contains_key(key) {
            for b in before {
                out.insert(Stale {
                    frontend: SocketAddr::new(key.ip, key.port),
                    backend: Some(*b),
                });
            }
        }
    }
    out
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// (protocol, source, destination) of a `CTA_TUPLE_*` payload.
fn tuple(payload: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let mut ips: (Option<IpAddr>, Option<IpAddr>) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, None, None);
    for (ty, p, _) in attrs(payload) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, a, _) in attrs(p) {
                    let ip = match a.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(a).ok()?),
                        16 => IpAddr::from(<[u8; 16]>::try_from(a).ok()?),
                        _ => continue,
                    };
                    // V4_SRC 1, V4_DST 2, V6_SRC 3, V6_DST 4
                    if ty % 2 == 1 {
                        ips.0 = Some(ip);
                    } else {
                        ips.1 = Some(ip);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, a, _) in attrs(p) {
                    match (ty, a) {
                        (CTA_PROTO_NUM, [n, ..]) => proto = Some(*n),
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => {
                            sport = Some(u16::from_be_bytes([*a, *b]))
                        }
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => {
                            dport = Some(u16::from_be_bytes([*a, *b]))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        SocketAddr::new(ips.0?, sport?),
        SocketAddr::new(ips.1?, dport?),
    ))
}

/// A ctnetlink socket.
struct Socket(super::netlink::Socket);

impl Socket {
    fn open() -> io::Result<Self> {
        super::netlink::Socket::open(NETLINK_NETFILTER).map(Self)
    }

    fn send(&mut self, msg_type: u16, flags: u16, family: u8, body: &[u8]) -> io::Result<u32> {
        self.0.send(
            (NFNL_SUBSYS_CTNETLINK << 8) | msg_type,
            flags,
            [family, 0, 0, 0],
            body,
        )
    }

    fn recv(&mut self, seq: u32, each: impl FnMut(&[u8])) -> io::Result<i32> {
        self.0.recv(seq, each)
    }
}

/// One conntrack entry as a dump shows it: protocol, original tuple (source, destination),
/// the source of the reply tuple, and the original tuple's raw attribute (to delete it by).
struct Entry {
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    reply_src: SocketAddr,
    raw: Vec<u8>,
}

/// Dumps one family's conntrack table, keeping the entries `want` accepts.
fn dump(
    sock: &mut Socket,
    family: u8,
    mut want: impl FnMut(&Entry) -> bool,
) -> io::Result<Vec<Entry>> {
    let seq = sock.send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, &[])?;
    let mut kept = Vec::new();
    let code = sock.recv(seq, |body| {
        let mut orig = None;
        let mut reply = None;
        for (ty, payload, whole) in attrs(body) {
            match ty {
                CTA_TUPLE_ORIG => orig = tuple(payload).map(|t| (t, whole)),
                CTA_TUPLE_REPLY => reply = tuple(payload),
                _ => {}
            }
        }
        let (Some(((proto, src, dst), raw)), Some((_, reply_src, _))) = (orig, reply) else {
            return;
        };
        let e = Entry {
            proto,
            src,
            dst,
            reply_src,
            raw: Vec::new(),
        };
        if want(&e) {
            kept.push(Entry {
                raw: raw.to_vec(),
                ..e
            });
        }
    })?;
    if code != 0 {
        return Err(io::Error::from_raw_os_error(-code));
    }
    Ok(kept)
}

const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// Makes the kernel load netfilter's conntrack where it is a module: any ctnetlink request
/// autoloads `nf_conntrack_netlink` and with it `nf_conntrack` (CAP_NET_ADMIN is enough; no
/// modprobe), so its sysctls exist before the first rules would load it.
///
/// # Errors
/// No netfilter conntrack in this kernel, or no permission.
pub fn ensure_loaded() -> io::Result<()> {
    const IPCTNL_MSG_CT_GET_STATS: u16 = 5;
    let mut sock = Socket::open()?;
    let seq = sock.send(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST, 0, &[])?;
    sock.recv(seq, |_| {})?;
    Ok(())
}

/// Deletes the UDP conntrack entries `stale` describes, in this network namespace. Returns
/// how many were deleted.
///
/// # Errors
/// The conntrack table could not be read (no netfilter conntrack, no permission).
pub fn delete(stale: &BTreeSet<Stale>) -> io::Result<usize> {
    if stale.is_empty() {
        return Ok(0);
    }
    let mut sock = Socket::open()?;
    let mut deleted = 0;
    for family in FAMILIES {
        let want: Vec<&Stale> = stale
            .iter()
            .filter(|s| s.frontend.is_ipv4() == (family == libc::AF_INET as u8))
            .collect();
        if want.is_empty() {
            continue;
        }
        let victims = dump(&mut sock, family, |e| {
            e.proto == 17
                && want
                    .iter()
                    .any(|s| s.frontend == e.dst && s.backend.is_none_or(|b| b == e.reply_src))
        })?;
        for v in victims {
            let seq = sock.send(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                family,
                &v.raw,
            )?;
            match sock.recv(seq, |_| {})? {
                0 => deleted += 1,
                // Gone meanwhile.
                c if -c == libc::ENOENT => {}
                c => return Err(io::Error::from_raw_os_error(-c)),
            }
        }
    }
    Ok(deleted)
}

/// A flow the kernel's conntrack translates: its client, the frontend it was sent to, and
/// the backend netfilter's DNAT chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelNatFlow {
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
}

/// The TCP and UDP flows, in this network namespace, that netfilter DNATs from one of
/// `frontends` to another address: flows established through kube-proxy's (or kpr's rule
/// modes') rules, which the kernel keeps translating after the rules are gone.
///
/// # Errors
/// The conntrack table could not be read (no netfilter conntrack, no permission).
pub fn kernel_nat_flows(frontends: &BTreeSet<FrontendKey>) -> io::Result<Vec<KernelNatFlow>> {
    if frontends.is_empty() {
        return Ok(Vec::new());
    }
    let mut sock = Socket::open()?;
    let mut out = Vec::new();
    for family in FAMILIES {
        for e in dump(&mut sock, family, |e| {
            let protocol = match e.proto {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                _ => return false,
            };
            e.reply_src != e.dst
                && frontends.contains(&FrontendKey {
                    ip: e.dst.ip(),
                    port: e.dst.port(),
                    protocol,
                })
        })? {
            out.push(KernelNatFlow {
                protocol: if e.proto == 6 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                client: e.src,
                frontend: e.dst,
                backend: e.reply_src,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> FrontendKey {
        let a: SocketAddr = s.parse().unwrap();
        FrontendKey {
            ip: a.ip(),
            port: a.port(),
            protocol: Protocol::Udp,
        }
    }

    fn set(v: &[&str]) -> BTreeSet<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn stale_entries_after_a_sync() {
        let old: UdpBackends = [
            (key("172.30.0.10:53"), set(&["10.0.1.1:53", "10.0.1.2:53"])),
            (key("172.30.0.11:53"), set(&[])),
            (key("172.30.0.12:53"), set(&["10.0.1.9:53"])),
        ]
        .into();
        let new: UdpBackends = [
            (key("172.30.0.10:53"), set(&["10.0.1.2:53"])),
            (key("172.30.0.11:53"), set(&["10.0.1.3:53"])),
        ]
        .into();
        let s = stale(&old, &new);
        let sa = |x: &str| x.parse::<SocketAddr>().unwrap();
        assert_eq!(
            s,
            [
                Stale {
                    frontend: sa("172.30.0.10:53"),
                    backend: Some(sa("10.0.1.1:53"))
                },
                Stale {
                    frontend: sa("172.30.0.11:53"),
                    backend: None
                },
                Stale {
                    frontend: sa("172.30.0.12:53"),
                    backend: Some(sa("10.0.1.9:53"))
                },
            ]
            .into(),
            "a removed backend, 0 -> N, a removed Service"
        );
        assert!(stale(&new, &new).is_empty());
    }
}
