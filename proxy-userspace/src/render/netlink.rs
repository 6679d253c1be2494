//! Netlink framing shared by kpr's two netlink families (ctnetlink for conntrack, generic
//! netlink for IPVS): a socket, one request with its 4-byte family header (`nfgenmsg` or
//! `genlmsghdr`), the answers (ACK, error, one message or a multi-part dump), and the
//! attribute stream of a message.
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The attributes of a netlink attribute stream: (type, payload, whole attribute).
#[must_use]
pub fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len], &buf[..len]));
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// A netlink socket of one protocol, numbering its requests.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// A socket of `protocol` whose reads time out after 2 s.
    ///
    /// # Errors
    /// socket(2) failed.
    pub fn open(protocol: i32) -> io::Result<Self> {
        Ok(Self {
            fd: super::netlink_socket(protocol)?,
            seq: 1,
        })
    }

    /// Sends one request: `msg_type`, `flags`, the 4-byte family `header`, then `body`.
    /// Returns its sequence number.
    ///
    /// # Errors
    /// send(2) failed.
    pub fn send(
        &mut self,
        msg_type: u16,
        flags: u16,
        header: [u8; 4],
        body: &[u8],
    ) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + body.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
        m.extend_from_slice(&msg_type.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&header);
        m.extend_from_slice(body);
        // SAFETY: sending a buffer we own to the kernel (destination: the default, pid 0).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives until the answer to `seq` is complete; `each` sees every data message's
    /// attributes (after the 4-byte family header). Returns the NLMSG_ERROR code (0: an ACK,
    /// the end of a dump, or a single answer).
    ///
    /// # Errors
    /// recv(2) failed or timed out.
    pub fn recv(&mut self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<i32> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut msgs = &buf[..usize::try_from(n).unwrap_or(0)];
            let mut single = false;
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
                let ty = u16::from_ne_bytes([msgs[4], msgs[5]]);
                let flags = u16::from_ne_bytes([msgs[6], msgs[7]]);
                let mseq = u32::from_ne_bytes([msgs[8], msgs[9], msgs[10], msgs[11]]);
                if len < 16 || len > msgs.len() {
                    break;
                }
                if mseq == seq {
                    match ty {
                        NLMSG_DONE => return Ok(0),
                        NLMSG_ERROR => {
                            let code = msgs
                                .get(16..20)
                                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                            return Ok(code);
                        }
                        _ => {
                            each(msgs.get(20..len).unwrap_or(&[]));
                            // Without NLM_F_MULTI the answer is this one message.
                            single |= flags & NLM_F_MULTI == 0;
                        }
                    }
                }
                msgs = msgs.get((len + 3) & !3..).unwrap_or(&[]);
            }
            if single {
                return Ok(0);
            }
        }
    }
}
