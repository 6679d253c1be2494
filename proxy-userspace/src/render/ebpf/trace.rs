//! `kpr trace`: where would this packet go? Runs a synthetic packet through this build's TC
//! programs with BPF_PROG_TEST_RUN against a *copy* of the live state (frontends, backends,
//! node configuration, source ranges, and the conntrack entries of this very flow), so live
//! conntrack and affinity are never touched, and prints the decision.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use proxy_common::{CtKey, ct_kind};

use super::datapath::{PinLayout, load_object, program};
use super::maps::LbMaps as _;
use super::pinned::PinnedMaps;
use crate::model::Protocol;
use crate::{Error, Result};

/// A scratch bpffs directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the trace found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceResult {
    pub verdict: String,
    pub backend: Option<String>,
    pub snat: Option<String>,
    pub established: bool,
    pub lines: Vec<String>,
}

fn packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: Protocol) -> Vec<u8> {
    let udp = proto == Protocol::Udp;
    let l4_len = if udp { 8 } else { 20 };
    let mut p = vec![0u8; 14 + 20 + l4_len];
    p[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&u16::try_from(20 + l4_len).unwrap_or(40).to_be_bytes());
    p[22] = 64;
    p[23] = proto.number();
    p[26..30].copy_from_slice(&src.octets());
    p[30..34].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[14..34]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[34..36].copy_from_slice(&sport.to_be_bytes());
    p[36..38].copy_from_slice(&dport.to_be_bytes());
    if udp {
        p[38..40].copy_from_slice(&8u16.to_be_bytes());
        // checksum 0: none (the programs keep it so)
    } else {
        p[46] = 5 << 4;
        p[47] = 0x02; // SYN
        p[48..50].copy_from_slice(&64240u16.to_be_bytes());
    }
    p
}

/// Ethernet + IPv6 + TCP SYN (checksum left zero: the programs only adjust it) or UDP.
fn packet6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: Protocol) -> Vec<u8> {
    let l4_len: u16 = if proto == Protocol::Udp { 8 } else { 20 };
    let mut p = vec![0u8; 14 + 40 + usize::from(l4_len)];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&l4_len.to_be_bytes());
    p[20] = proto.number();
    p[21] = 64;
    p[22..38].copy_from_slice(&src.octets());
    p[38..54].copy_from_slice(&dst.octets());
    p[54..56].copy_from_slice(&sport.to_be_bytes());
    p[56..58].copy_from_slice(&dport.to_be_bytes());
    if proto == Protocol::Udp {
        p[58..60].copy_from_slice(&8u16.to_be_bytes());
    } else {
        p[66] = 5 << 4;
        p[67] = 0x02;
    }
    p
}

/// (source, destination) of an IPv4 or IPv6 packet built above.
fn ends(p: &[u8]) -> (SocketAddr, SocketAddr) {
    if p[12..14] == [0x86, 0xdd] {
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap_or([0; 16]));
        let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
        (
            SocketAddr::new(a(22), port(54)),
            SocketAddr::new(a(38), port(56)),
        )
    } else {
        (addr_at(p, 26, 34), addr_at(p, 30, 36))
    }
}

fn addr_at(p: &[u8], ip: usize, port: usize) -> SocketAddr {
    SocketAddr::from((
        [p[ip], p[ip + 1], p[ip + 2], p[ip + 3]],
        u16::from_be_bytes([p[port], p[port + 1]]),
    ))
}

fn run(ebpf: &aya::Ebpf, prog: &str, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
    let p: &SchedClassifier = ebpf
        .program(prog)
        .ok_or_else(|| Error::Unsupported(format!("program {prog} is missing from the object")))?
        .try_into()
        .map_err(|e| Error::program(prog, "typing", e))?;
    let mut out = vec![0u8; 1600];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .map_err(|e| Error::program(prog, "BPF_PROG_TEST_RUN", e))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Traces one packet (IPv4 or IPv6) arriving at the node from `src`:`sport` to `dst`:`dport`.
///
/// # Errors
/// The live maps cannot be read (kpr not running here), mixed families, or the kernel refused
/// to load or run the programs.
pub fn trace(
    bpf_fs_path: &Path,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: Protocol,
) -> Result<TraceResult> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(Error::invalid(
            "--src and --dst must be of the same IP family",
        ));
    }
    let (src16, dst16) = (super::addr16(src), super::addr16(dst));
    let live = PinnedMaps::open(&PinLayout::new(bpf_fs_path))?;
    let snapshot = live.snapshot()?;
    let scratch = Scratch(bpf_fs_path.with_file_name(format!(
        "{}-trace-{}",
        bpf_fs_path.file_name().and_then(|n| n.to_str()).unwrap_or("kpr"),
        std::process::id()
    )));
    let layout = PinLayout::new(&scratch.0);
    let mut ebpf = load_object(&layout)?;
    for name in ["kpr_tc_ingress", "kpr_tc_egress"] {
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        prog.load()
            .map_err(|e| Error::program(name, "loading (verifier)", e))?;
    }
    let mut copy = PinnedMaps::open(&layout)?;
    for (k, v) in &snapshot.services {
        copy.put_service(k, v)?;
    }
    for (k, v) in &snapshot.slots {
        copy.put_slot(k, *v)?;
    }
    for (k, v) in &snapshot.backends {
        copy.put_backend(*k, v)?;
    }
    for (id, r) in &snapshot.src_ranges {
        copy.put_src_range(*id, r)?;
    }
    if let Some(cfg) = live.node_config()? {
        copy.set_node_config(&cfg)?;
    }
    // This flow's own conntrack entries, so an established flow traces as established.
    let mut established = false;
    for kind in [ct_kind::FORWARD, ct_kind::REPLY_DNAT] {
        let key = CtKey {
            saddr: src16,
            daddr: dst16,
            sport,
            dport,
            proto: proto.number(),
            kind,
            _pad: [0; 2],
        };
        if let Some(v) = live.conntrack_get(&key)? {
            copy.conntrack_put(&key, &v)?;
            established |= kind == ct_kind::FORWARD;
        }
    }
    let pkt = match (src, dst) {
        (IpAddr::V4(s4), IpAddr::V4(d4)) => packet(s4, sport, d4, dport, proto),
        (IpAddr::V6(s6), IpAddr::V6(d6)) => packet6(s6, sport, d6, dport, proto),
        _ => unreachable!("families checked above"),
    };
    let (rc, out) = run(&ebpf, "kpr_tc_ingress", &pkt)?;
    let mut lines = vec![format!(
        "packet {} {src}:{sport} -> {dst}:{dport} arriving at the node",
        proto.as_str()
    )];
    let frontend = snapshot.services.iter().find(|(k, _)| {
        k.addr == dst16
            && k.port == dport
            && k.proto == proto.number()
            && k.scope == proxy_common::scope::EXTERNAL
    });
    if let Some((_, v)) = frontend {
        lines.push(format!(
            "frontend {dst}:{dport}/{} (service id {}, {} backend slots)",
            proto.as_str(),
            v.id,
            v.backend_count
        ));
    }
    let result = match rc {
        2 => {
            lines.push("verdict: DROP".into());
            TraceResult {
                verdict: "DROP".into(),
                backend: None,
                snat: None,
                established,
                lines,
            }
        }
        7 => {
            lines.push("verdict: REJECT (TCP RST sent back to the client)".into());
            TraceResult {
                verdict: "REJECT".into(),
                backend: None,
                snat: None,
                established,
                lines,
            }
        }
        0 => {
            let new_dst = ends(&out).1;
            if new_dst == SocketAddr::new(dst, dport) {
                lines.push(
                    "verdict: NONE (not a Service frontend; the packet passes untouched)".into(),
                );
                TraceResult {
                    verdict: "NONE".into(),
                    backend: None,
                    snat: None,
                    established,
                    lines,
                }
            } else {
                lines.push(format!(
                    "verdict: DNAT to backend {new_dst}{}",
                    if established {
                        " (established flow)"
                    } else {
                        " (new flow)"
                    }
                ));
                let (_, egress) = run(&ebpf, "kpr_tc_egress", &out)?;
                let new_src = ends(&egress).0;
                let snat = (new_src != SocketAddr::new(src, sport)).then(|| new_src.to_string());
                match &snat {
                    Some(s) => lines.push(format!(
                        "egress: masquerade to {s} (externalTrafficPolicy Cluster)"
                    )),
                    None => lines.push("egress: source kept (no masquerade)".into()),
                }
                TraceResult {
                    verdict: "DNAT".into(),
                    backend: Some(new_dst.to_string()),
                    snat,
                    established,
                    lines,
                }
            }
        }
        other => {
            lines.push(format!("verdict: TC action {other}"));
            TraceResult {
                verdict: format!("TC_ACT_{other}"),
                backend: None,
                snat: None,
                established,
                lines,
            }
        }
    };
    Ok(result)
}
