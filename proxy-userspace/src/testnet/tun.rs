//! An L3 link between two test namespaces: a TUN device in each, joined by relay threads
//! that copy packets between them. Packets on it carry no Ethernet header, like ipip,
//! WireGuard or Calico's IPIP devices, which this kernel lacks as modules.
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::NetNs;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates TUN device `name` in `ns` (from a thread that enters the namespace, so the test's
/// own thread never leaves its namespace).
fn open_tun(ns: &NetNs, name: &str) -> OwnedFd {
    let path = ns.path();
    let name = name.to_string();
    std::thread::spawn(move || {
        let nsf = File::open(&path).expect("open the namespace");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // SAFETY: ifreq is plain old data; zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: TUNSETIFF with a valid ifreq on the tun fd.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut req) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from(tun)
    })
    .join()
    .expect("tun thread")
}

/// Two TUN devices and the relays between them; dropping it stops the relays and removes
/// the devices.
pub struct TunLink {
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

impl TunLink {
    /// `name_a` in `a` and `name_b` in `b`, both down and without addresses.
    #[must_use]
    pub fn new(a: &NetNs, name_a: &str, b: &NetNs, name_b: &str) -> Self {
        let fa = Arc::new(File::from(open_tun(a, name_a)));
        let fb = Arc::new(File::from(open_tun(b, name_b)));
        let stop = Arc::new(AtomicBool::new(false));
        let relay = |from: Arc<File>, to: Arc<File>, stop: Arc<AtomicBool>| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: from.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll on one valid pollfd.
                    if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
                        continue;
                    }
                    match (&*from).read(&mut buf) {
                        Ok(n) if n > 0 => {
                            let _ = (&*to).write(&buf[..n]);
                        }
                        _ => {}
                    }
                }
            })
        };
        let relays = vec![
            relay(fa.clone(), fb.clone(), stop.clone()),
            relay(fb, fa, stop.clone()),
        ];
        Self { stop, relays }
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for r in self.relays.drain(..) {
            let _ = r.join();
        }
    }
}
