//! Fuzzing the TC programs through BPF_PROG_TEST_RUN (issue 13, root): random and mutated
//! packets through `kpr_tc_ingress` and `kpr_tc_egress` of a scratch datapath whose maps the
//! real renderer programmed. Seeded (a failure prints the packet and reruns the same way).
//!
//! Properties:
//! - a packet that belongs to no Service (its destination is no frontend, not the node and
//!   no backend, its source no backend) leaves unmodified, with "next";
//! - a packet that arrived with valid checksums and was translated leaves with valid
//!   checksums (IP header and L4);
//! - the kernel never refuses a run (no verifier-invisible fault).
//!
//! `KPR_FUZZ_EXECS` sets the executions (default: a quick run for CI); one `KPR-FIGURE` line
//! for RELIABILITY.md.
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::*;
use kpr::render::ebpf::packet::{self as pkt, L4};
use serde_json::json;

use kpr_testnet::rng::FuzzRng as Rng;

const FRONTEND_IPS: [[u8; 4]; 3] = [[172, 30, 0, 41], [172, 30, 0, 42], LB];
const BACKENDS: [[u8; 4]; 2] = [BACKEND_LOCAL, [10, 180, 2, 1]];
const PORTS: [u16; 7] = [80, 53, 3001, 3002, 3053, 22, 40000];

/// (IPv4 source, IPv4 destination) of an Ethernet + IPv4 frame, if it is one.
fn v4_ends(p: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    if p.len() < 34 || p[12..14] != [0x08, 0x00] || p[14] >> 4 != 4 {
        return None;
    }
    Some((p[26..30].try_into().ok()?, p[30..34].try_into().ok()?))
}

/// A packet no Service rule may touch: IPv4 whose destination is neither a frontend, the
/// node nor a backend and whose source is no backend, or anything not IPv4 or IPv6.
fn foreign(p: &[u8]) -> bool {
    match v4_ends(p) {
        Some((src, dst)) => {
            // A packet to a backend may be the DNATed half of a Service flow an earlier
            // packet opened (the egress program masquerades it): not foreign.
            !FRONTEND_IPS.contains(&dst)
                && dst != NODE
                && !BACKENDS.contains(&src)
                && !BACKENDS.contains(&dst)
        }
        None => p.len() < 14 || (p[12..14] != [0x08, 0x00] && p[12..14] != [0x86, 0xdd]),
    }
}

fn random_packet(rng: &mut Rng) -> Vec<u8> {
    let random_ip = |rng: &mut Rng| -> [u8; 4] {
        let x = rng.next_u64().to_be_bytes();
        [x[0], x[1], x[2], x[3]]
    };
    let src = match rng.below(4) {
        0 => CLIENT,
        1 => rng.pick(&BACKENDS),
        2 => NODE,
        _ => random_ip(rng),
    };
    let dst = match rng.below(5) {
        0 | 1 => rng.pick(&FRONTEND_IPS),
        2 => NODE,
        3 => rng.pick(&BACKENDS),
        _ => random_ip(rng),
    };
    let port = |rng: &mut Rng| {
        if rng.below(3) == 0 {
            u16::try_from(rng.next_u64() & 0xffff).unwrap_or(1)
        } else {
            rng.pick(&PORTS)
        }
    };
    let (sport, dport) = (port(rng), port(rng));
    let l4 = match rng.below(4) {
        0 => L4::Udp,
        1 => L4::UdpNoChecksum,
        _ => L4::Tcp(rng.pick(&[
            pkt::tcp_flags::SYN,
            pkt::tcp_flags::ACK,
            pkt::tcp_flags::PSH_ACK,
            pkt::tcp_flags::RST,
            pkt::tcp_flags::SYN_ACK,
            0x01,
            0xff,
        ])),
    };
    let payload = vec![0x61u8; rng.below(64)];
    if rng.below(10) == 0 {
        // IPv6: no IPv6 Service is programmed, so these are foreign too.
        let a = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
            sport,
        );
        let b = SocketAddr::new(IpAddr::V6(NODE6), dport);
        return pkt::build(
            a,
            b,
            if matches!(l4, L4::UdpNoChecksum) {
                L4::Udp
            } else {
                l4
            },
            &payload,
        );
    }
    pkt::build(
        SocketAddr::from((Ipv4Addr::from(src), sport)),
        SocketAddr::from((Ipv4Addr::from(dst), dport)),
        l4,
        &payload,
    )
}

fn mutate(p: &mut Vec<u8>, rng: &mut Rng) {
    match rng.below(4) {
        0 => {
            // BPF_PROG_TEST_RUN refuses a frame shorter than its Ethernet header plus a whole
            // IPv4/IPv6 header (EINVAL): cut only behind that. (The wire can deliver shorter
            // ones to TC; the programs' bounds checks, which the verifier enforces, are what
            // covers those.)
            let floor = if p.get(12..14) == Some(&[0x86, 0xdd]) {
                54
            } else {
                34
            };
            let cut = floor + rng.below(p.len().saturating_sub(floor) + 1);
            p.truncate(cut.min(p.len()));
        }
        1 => {
            for _ in 0..=rng.below(4) {
                if !p.is_empty() {
                    let i = rng.below(p.len());
                    p[i] ^= u8::try_from(rng.next_u64() & 0xff).unwrap_or(1) | 1;
                }
            }
        }
        2 => {
            // A header field of IPv4 (version/IHL, length, flags/fragment, TTL, protocol).
            let i = rng.pick(&[14usize, 16, 17, 20, 21, 22, 23]);
            if i < p.len() {
                p[i] = u8::try_from(rng.next_u64() & 0xff).unwrap_or(0);
            }
        }
        _ => p.extend(std::iter::repeat_n(0u8, rng.below(40))),
    }
}

#[test]
fn random_and_mutated_packets_leave_foreign_traffic_alone_and_checksums_valid() {
    let n: usize = std::env::var("KPR_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let mut dp = Datapath::new("tcfuzz");
    dp.program(&manifests(true, &["10.180.0.1", "10.180.2.1"]));
    let mut rng = Rng(0x7463_6675_7a7a);
    let (mut foreign_seen, mut translated, mut mutated, mut shot) =
        (0usize, 0usize, 0usize, 0usize);
    for i in 0..n {
        let mut p = random_packet(&mut rng);
        if rng.below(2) == 0 {
            mutate(&mut p, &mut rng);
            mutated += 1;
        }
        let valid_in = pkt::verify_checksums(&p).is_ok();
        let prog = if rng.below(2) == 0 {
            "kpr_tc_ingress"
        } else {
            "kpr_tc_egress"
        };
        let r = dp
            .scratch
            .run(prog, &p)
            .unwrap_or_else(|e| panic!("execution {i}: {prog} refused {p:02x?}: {e:?}"));
        if r.action == TC_ACT_SHOT {
            shot += 1;
        }
        if foreign(&p) {
            foreign_seen += 1;
            assert_eq!(
                (r.action, &r.packet),
                (TC_NEXT, &p),
                "execution {i}: {prog} touched a packet of no Service: {p:02x?}"
            );
        } else if r.packet != p && r.action != TC_ACT_SHOT {
            translated += 1;
            if valid_in {
                if let Err(e) = pkt::verify_checksums(&r.packet) {
                    panic!(
                        "execution {i}: {prog} translated {p:02x?} into {:02x?}: {e}",
                        r.packet
                    );
                }
            }
        }
    }
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "fuzz: TC programs, random and mutated packets (BPF_PROG_TEST_RUN)",
               "executions": n, "mutated": mutated, "foreign_untouched": foreign_seen,
               "translated_checksums_valid": translated, "dropped": shot, "violations": 0})
    );
    assert!(
        foreign_seen > 0 && translated > 0,
        "both properties exercised"
    );
}
