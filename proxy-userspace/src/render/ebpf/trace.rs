//! `kpr trace`: where would this packet go? Runs a synthetic packet through this build's TC
//! programs with BPF_PROG_TEST_RUN against a *copy* of the live state (frontends, backends,
//! node configuration, source ranges, and the conntrack entries of this very flow), so live
//! conntrack and affinity are never touched, and prints the decision.
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use proxy_common::{CtKey, ct_kind};

use super::datapath::PinLayout;
use super::maps::LbMaps as _;
use super::packet::{self, L4, ends, tcp_flags};
use super::pinned::PinnedMaps;
use super::scratch::{ScratchDatapath, ScratchPins};
use crate::model::Protocol;
use crate::{Error, Result};

/// What the trace found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceResult {
    pub verdict: String,
    pub backend: Option<String>,
    pub snat: Option<String>,
    pub established: bool,
    pub lines: Vec<String>,
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
    let mut scratch = ScratchDatapath::load(ScratchPins::new(
        bpf_fs_path.parent().unwrap_or(Path::new("/sys/fs/bpf")),
        &format!(
            "{}-trace",
            bpf_fs_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("kpr")
        ),
    ))?;
    let copy = &mut scratch.maps;
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
    let l4 = if proto == Protocol::Udp {
        L4::Udp
    } else {
        L4::Tcp(tcp_flags::SYN)
    };
    let pkt = packet::build(
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        l4,
        &[],
    );
    let ingress = scratch.run("kpr_tc_ingress", &pkt)?;
    let (rc, out) = (ingress.action, ingress.packet);
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
        // TCX_NEXT / TC_ACT_UNSPEC (-1): the packet goes on, translated or not.
        0 | u32::MAX => {
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
                let egress = scratch.run("kpr_tc_egress", &out)?.packet;
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
