//! Socket termination: destroys connected UDP sockets still pointing at a removed backend.
//!
//! Socket-level load balancing translates a connected UDP socket once, at `connect()`; its
//! later `send()`s never pass a sock_addr hook again, so when the backend goes away the socket
//! would keep sending to it (upstream kube-proxy flushes conntrack for the same reason). After
//! a sync that removed backends from UDP frontends, the agent visits every network namespace
//! on the node, dumps its connected UDP sockets with `sock_diag`, and destroys
//! (`SOCK_DESTROY`, like `ss -K`) each socket whose peer is a removed backend *and* whose
//! socket-LB reverse-NAT entry (keyed by the socket cookie) says it was connected through the
//! frontend that lost it. Sockets talking to the backend directly, or through a Service that
//! still has it, are left alone. The application sees `ECONNABORTED` and reconnects, which
//! balances afresh.
//!
//! Needs `CONFIG_INET_DIAG_DESTROY`; without it the sweep reports that once and does nothing.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;

use proxy_common::SockRevNatKey;

use super::addr16;
use proxy_common::v4_mapped;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const STATE_ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg` (the part we read).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Request {
    hdr: NlMsgHdr,
    req: DiagReq,
}

/// A `T` read from `buf` at `off`, when the buffer holds one.
fn read_at<T: bytemuck::Pod>(buf: &[u8], off: usize) -> Option<T> {
    let bytes = buf.get(off..off.checked_add(size_of::<T>())?)?;
    Some(bytemuck::pod_read_unaligned(bytes))
}

/// A connected socket as `sock_diag` reports it.
#[derive(Clone, Copy, Debug)]
struct DiagSocket {
    family: u8,
    id: SockId,
}

impl DiagSocket {
    fn peer16(&self) -> [u8; 16] {
        if i32::from(self.family) == libc::AF_INET {
            v4_mapped([
                self.id.dst[0],
                self.id.dst[1],
                self.id.dst[2],
                self.id.dst[3],
            ])
        } else {
            self.id.dst
        }
    }
    fn peer_port(&self) -> u16 {
        u16::from_be_bytes(self.id.dport)
    }
    fn cookie(&self) -> u64 {
        u64::from(self.id.cookie[0]) | (u64::from(self.id.cookie[1]) << 32)
    }
}

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    fn open() -> io::Result<Self> {
        let fd = crate::render::netlink_socket(NETLINK_SOCK_DIAG)?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn send(&mut self, ty: u16, flags: u16, req: DiagReq) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let msg = Request {
            hdr: NlMsgHdr {
                len: size_of::<Request>() as u32,
                ty,
                flags,
                seq: self.seq,
                pid: 0,
            },
            req,
        };
        let bytes = bytemuck::bytes_of(&msg);
        // SAFETY: sending our own buffer on our own socket (to the kernel: no address).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives replies to `seq`, calling `each` with every payload until DONE or an
    /// ACK/error; returns the error code of an NLMSG_ERROR (0 for an ACK or DONE).
    fn recv(&mut self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<i32> {
        let Self { fd, buf, .. } = self;
        loop {
            // SAFETY: receiving into our own buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let data = &buf[..n as usize];
            let mut off = 0;
            while let Some(hdr) = read_at::<NlMsgHdr>(data, off) {
                let len = hdr.len as usize;
                if len < size_of::<NlMsgHdr>() || off + len > data.len() {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let payload = &data[off + size_of::<NlMsgHdr>()..off + len];
                if hdr.seq == seq {
                    match hdr.ty {
                        NLMSG_DONE => return Ok(0),
                        NLMSG_ERROR => {
                            let code = read_at::<i32>(payload, 0).unwrap_or(0);
                            return Ok(code);
                        }
                        _ => each(payload),
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Every connected UDP socket of `family` in this namespace.
    fn connected_udp(&mut self, family: u8) -> io::Result<Vec<DiagSocket>> {
        let req = DiagReq {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            states: 1 << STATE_ESTABLISHED,
            ..DiagReq::default()
        };
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)?;
        let mut out = Vec::new();
        let code = self.recv(seq, |payload| {
            if let Some(m) = read_at::<DiagMsg>(payload, 0) {
                out.push(DiagSocket {
                    family: m.family,
                    id: m.id,
                });
            }
        })?;
        if code < 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
        Ok(out)
    }

    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()> {
        let req = DiagReq {
            family: s.family,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id: s.id,
            ..DiagReq::default()
        };
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)?;
        let code = self.recv(seq, |_| {})?;
        if code < 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
        Ok(())
    }
}

/// One network namespace per distinct `/proc/<pid>/ns/net` (every namespace that holds a
/// process, hence every namespace a socket can live in but for fds passed across).
fn network_namespaces() -> Vec<File> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // Processes come and go: skip whatever vanished meanwhile.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if let Ok(f) = File::open(&path) {
            out.push(f);
        }
    }
    out
}

/// Runs `f` on a thread that joined network namespace `ns`.
fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (new, short-lived) thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("socket sweep thread panicked")))
    })
}

/// An address and port as the maps hold them (16-byte address, host-order port).
type MapAddr = ([u8; 16], u16);

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub namespaces: usize,
    pub destroyed: usize,
    /// Reverse-NAT entries of the destroyed sockets, to delete.
    pub forget: Vec<SockRevNatKey>,
    /// Set when the kernel cannot destroy sockets (no `CONFIG_INET_DIAG_DESTROY`).
    pub unsupported: bool,
    pub errors: Vec<String>,
}

/// Destroys the connected UDP sockets that socket-level load balancing connected through one
/// of the `removed` (frontend, backend) pairs, in every network namespace of the node.
/// `revnat` looks a socket's reverse-NAT entry up: the frontend it was connected through.
pub fn sweep(
    removed: &BTreeSet<(SocketAddr, SocketAddr)>,
    revnat: &(dyn Fn(&SockRevNatKey) -> Option<MapAddr> + Sync),
) -> SweepReport {
    let mut report = SweepReport::default();
    if removed.is_empty() {
        return report;
    }
    // backend -> frontends that lost it
    let mut by_backend: HashMap<MapAddr, HashSet<MapAddr>> = HashMap::new();
    for (fe, be) in removed {
        by_backend
            .entry((addr16(be.ip()), be.port()))
            .or_default()
            .insert((addr16(fe.ip()), fe.port()));
    }
    for ns in network_namespaces() {
        report.namespaces += 1;
        let result = in_netns(&ns, || -> io::Result<(Vec<SockRevNatKey>, bool)> {
            let mut diag = Diag::open()?;
            let mut destroyed = Vec::new();
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                for s in diag.connected_udp(family)? {
                    let backend = (s.peer16(), s.peer_port());
                    let Some(frontends) = by_backend.get(&backend) else {
                        continue;
                    };
                    let key = SockRevNatKey {
                        cookie: s.cookie(),
                        addr: backend.0,
                        port: backend.1,
                        _pad: [0; 6],
                    };
                    let Some(frontend) = revnat(&key) else {
                        continue; // not connected through a Service
                    };
                    if !frontends.contains(&frontend) {
                        continue; // connected through a Service that keeps this backend
                    }
                    match diag.destroy(&s) {
                        Ok(()) => destroyed.push(key),
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            return Ok((destroyed, true));
                        }
                        // Closed meanwhile: nothing to do.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok((destroyed, false))
        });
        match result.and_then(|r| r) {
            Ok((keys, unsupported)) => {
                report.destroyed += keys.len();
                report.forget.extend(keys);
                if unsupported {
                    report.unsupported = true;
                    break;
                }
            }
            Err(e) => {
                if report.errors.len() < 5 {
                    report.errors.push(e.to_string());
                }
            }
        }
    }
    report
}
