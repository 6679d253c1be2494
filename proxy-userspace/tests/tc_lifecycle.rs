//! Packet tests (BPF_PROG_TEST_RUN, root) of the TC datapath's flow lifecycle: conntrack
//! states and timeouts, garbage collection, graceful termination, kpr's own masquerade port
//! range, node-local connections left alone, L3 devices, fragments, IPv6 extension headers,
//! round robin, least connections, session-affinity membership and the datapath counters.
mod common;

use std::net::{Ipv6Addr, SocketAddr};

use common::*;
use kpr::render::ebpf::DatapathConfig;
use kpr::render::ebpf::gc;
use kpr::render::ebpf::packet as pkt;
use proxy_common::{CtTimeouts, ct_kind, ct_state, drop_reason};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;
const BACKEND_2: [u8; 4] = [10, 180, 2, 1];

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    packet(CLIENT, sport, NODE, dport, Some(flags), b"")
}

/// Seconds from now until `expires_ns`.
fn secs_left(expires_ns: u64) -> i64 {
    (expires_ns as i64 - gc::monotonic_ns() as i64) / 1_000_000_000
}

#[test]
fn tcp_flows_keep_a_removed_backend_until_they_close() {
    let mut dp = Datapath::new("tcgrace");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let (_, fwd) = dp.run("kpr_tc_ingress", &tcp(41000, 3001, SYN));
    assert_eq!(dst(&fwd).0, BACKEND_LOCAL);
    dp.run("kpr_tc_ingress", &tcp(41000, 3001, ACK));
    // The backend is removed (a rolling update): the established flow stays on it...
    dp.program(&manifests(true, &["10.180.2.1"]));
    let (rc, data) = dp.run("kpr_tc_ingress", &tcp(41000, 3001, PSH_ACK));
    assert_eq!(rc, TC_NEXT);
    assert_eq!(
        dst(&data).0,
        BACKEND_LOCAL,
        "an established flow is not cut"
    );
    assert_checksums(&data);
    // ... while new flows avoid it.
    let (_, other) = dp.run("kpr_tc_ingress", &tcp(41001, 3001, SYN));
    assert_eq!(dst(&other).0, BACKEND_2, "new flows go to current backends");
    // It closes, and the client port is reused for a new connection: a new flow.
    let (_, fin) = dp.run("kpr_tc_ingress", &tcp(41000, 3001, FIN_ACK));
    assert_eq!(
        dst(&fin).0,
        BACKEND_LOCAL,
        "the FIN still reaches the old backend"
    );
    let (_, again) = dp.run("kpr_tc_ingress", &tcp(41000, 3001, SYN));
    assert_eq!(
        dst(&again).0,
        BACKEND_2,
        "a SYN after the close opens a new flow"
    );
    assert_checksums(&again);
}

#[test]
fn tcp_states_move_the_expiry() {
    let cfg = DatapathConfig {
        ct_timeouts: CtTimeouts {
            tcp_established: 3_000,
            ..CtTimeouts::DEFAULT
        },
        ..DatapathConfig::default()
    };
    let mut dp = Datapath::with_config("tcstate", cfg);
    dp.program(&manifests(true, &["10.180.0.1"]));
    let step = |flags: u8, state: u8, around: i64| {
        dp.run("kpr_tc_ingress", &tcp(41100, 3001, flags));
        let ct = dp.forward(41100).expect("the flow's entry");
        assert_eq!(ct.state, state, "after flags {flags:#x}");
        let left = secs_left(ct.expires_ns);
        assert!(
            (around - 2..=around).contains(&left),
            "after flags {flags:#x}: {left} s left, want ~{around}"
        );
    };
    step(SYN, ct_state::SYN, 60);
    step(ACK, ct_state::ESTABLISHED, 3_000); // the configured timeout
    step(PSH_ACK, ct_state::ESTABLISHED, 3_000);
    step(FIN_ACK, ct_state::FIN, 120);
    step(ACK, ct_state::FIN, 120); // ACKs after the FIN do not reopen it
    step(RST, ct_state::CLOSED, 10);
    // UDP: 30 s one way; the reply entries hold the answered ("stream") timeout.
    dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 41101, NODE, 3053, None, b"q"),
    );
    let udp = dp.forward(41101).unwrap();
    assert_eq!(udp.state, ct_state::UDP);
    assert!((28..=30).contains(&secs_left(udp.expires_ns)));
}

#[test]
fn garbage_collection_deletes_only_dead_flows() {
    let mut dp = Datapath::new("tcgc");
    dp.program(&manifests(true, &["10.180.0.1"]));
    // A masqueraded UDP flow (4 entries) and an established TCP flow (4 entries).
    let (_, q) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 41200, NODE, 3053, None, b"q"),
    );
    dp.run("kpr_tc_egress", &q);
    dp.run("kpr_tc_ingress", &tcp(41201, 3001, SYN));
    dp.run("kpr_tc_ingress", &tcp(41201, 3001, ACK));
    assert_eq!(dp.ct_kinds().len(), 8);
    let mut maps = dp.maps_mut();
    let now = gc::monotonic_ns();
    let r = gc::collect(&mut maps, now).unwrap();
    assert_eq!(
        (r.entries_seen, r.flows_deleted),
        (8, 0),
        "nothing expired yet"
    );
    // Five minutes on: the UDP flow (30 s) is dead, the TCP one (24 h) is not.
    let r = gc::collect(&mut maps, now + 300 * 1_000_000_000).unwrap();
    assert_eq!((r.flows_deleted, r.entries_deleted), (1, 4), "{r:?}");
    assert!(dp.forward(41200).is_none());
    assert!(dp.forward(41201).is_some(), "the live flow stays");
    assert_eq!(dp.ct_kinds().len(), 4);
    // A day and a bit later, the TCP flow too.
    let r = gc::collect(&mut maps, now + 90_000 * 1_000_000_000).unwrap();
    assert_eq!((r.flows_deleted, r.entries_left), (1, 0), "{r:?}");
}

#[test]
fn a_node_local_connection_is_never_hijacked() {
    let mut dp = Datapath::new("tchijack");
    dp.program(&manifests(true, &["10.180.0.1"]));
    // An external client's masqueraded flow from port 40000...
    let (_, fwd) = dp.run("kpr_tc_ingress", &tcp(40000, 3001, SYN));
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    let nat = dp.nat_port(40000);
    assert_eq!(src(&out), (NODE, nat));
    assert!(nat >= proxy_common::NAT_PORT_MIN && nat != 40000);
    // ... and the node's own connection to the same backend from the same port number: its
    // packets and the backend's replies pass untouched, both ways.
    let own = packet(NODE, 40000, BACKEND_LOCAL, 80, Some(SYN), b"");
    assert_eq!(dp.run("kpr_tc_egress", &own), (TC_NEXT, own.clone()));
    let reply = packet(BACKEND_LOCAL, 80, NODE, 40000, Some(0x12), b"");
    assert_eq!(
        dp.run("kpr_tc_ingress", &reply),
        (TC_NEXT, reply.clone()),
        "a reply to the node's own connection is not rewritten to the external client"
    );
}

#[test]
fn masquerade_ports_come_from_the_configured_range_and_run_out_cleanly() {
    let cfg = DatapathConfig {
        nat_ports: (62_000, 62_001),
        ..DatapathConfig::default()
    };
    let mut dp = Datapath::with_config("tcnat", cfg);
    dp.program(&manifests(true, &["10.180.0.1"]));
    let mut ports = std::collections::BTreeSet::new();
    for (i, client) in [[203, 0, 113, 2], [203, 0, 113, 3]].iter().enumerate() {
        // Both clients use source port 40000: they must get different masquerade ports.
        let (_, fwd) = dp.run(
            "kpr_tc_ingress",
            &packet(*client, 40000, NODE, 3001, Some(SYN), b""),
        );
        let (_, out) = dp.run("kpr_tc_egress", &fwd);
        assert_eq!(src(&out).0, NODE, "client {i}");
        ports.insert(src(&out).1);
    }
    assert_eq!(ports, [62_000, 62_001].into(), "the whole range, once each");
    // The range is exhausted: a third client's SYN is dropped and counted.
    let third = packet([203, 0, 113, 4], 40000, NODE, 3001, Some(SYN), b"");
    assert_eq!(dp.run("kpr_tc_ingress", &third).0, TC_ACT_SHOT);
    assert_eq!(dp.drops(drop_reason::NAT_EXHAUSTED), 1);
    assert!(dp.forward(40000).is_some(), "the first flows are untouched");
}

/// Strips the Ethernet header: the packet as an L3 device (tun, ipip, WireGuard) carries it.
fn l3(p: &[u8]) -> Vec<u8> {
    p[14..].to_vec()
}

/// Puts an Ethernet header back, for the packet readers.
fn eth(p: &[u8], v6: bool) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    out.extend_from_slice(p);
    out
}

#[test]
fn l3_devices_are_parsed_without_an_ethernet_header() {
    let mut dp = Datapath::new("tcl3");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let (rc, fwd) = dp.run("kpr_tc_ingress_l3", &l3(&tcp(41300, 3001, SYN)));
    assert_eq!(rc, TC_NEXT);
    let fwd = eth(&fwd, false);
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 80), "DNAT on an L3 device");
    assert_checksums(&fwd);
    let (_, out) = dp.run("kpr_tc_egress_l3", &l3(&fwd));
    let out = eth(&out, false);
    assert_eq!(
        src(&out),
        (NODE, dp.nat_port(41300)),
        "masquerade on an L3 device"
    );
    assert_checksums(&out);
    // The reply comes back through the L3 device too.
    let reply = packet(BACKEND_LOCAL, 80, NODE, dp.nat_port(41300), Some(0x12), b"");
    let (_, back) = dp.run("kpr_tc_ingress_l3", &l3(&reply));
    let (_, back) = dp.run("kpr_tc_egress_l3", &back);
    let back = eth(&back, false);
    assert_eq!((src(&back), dst(&back)), ((NODE, 3001), (CLIENT, 41300)));
    assert_checksums(&back);
    // A REJECT answer on an L3 device has no Ethernet header either.
    dp.program(&manifests(true, &[]));
    let (rc, rst) = dp.run("kpr_tc_ingress_l3", &l3(&tcp(41301, 3001, SYN)));
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(rst.len(), 40, "IPv4 + TCP, no link-layer header");
    let rst = eth(&rst, false);
    assert_eq!((src(&rst), dst(&rst)), ((NODE, 3001), (CLIENT, 41301)));
    assert_checksums(&rst);
}

/// Splits an IPv4 UDP datagram (Ethernet frame, no IP options) into two fragments at
/// `at` bytes of IP payload (a multiple of 8), with IP id `id`.
fn fragments(p: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    let payload = &p[34..];
    let mut first = p[..34].to_vec();
    first.extend_from_slice(&payload[..at]);
    let mut second = p[..34].to_vec();
    second.extend_from_slice(&payload[at..]);
    for (f, mf, off) in [
        (&mut first, 0x2000u16, 0u16),
        (&mut second, 0, (at / 8) as u16),
    ] {
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&(mf | off).to_be_bytes());
        fix_ip_checksum(f);
    }
    (first, second)
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let mut dp = Datapath::new("tcfrag");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let datagram = packet(CLIENT, 41400, NODE, 3053, None, &[7u8; 40]);
    let (first, second) = fragments(&datagram, 24, 0x4242);
    let (_, f1) = dp.run("kpr_tc_ingress", &first);
    assert_eq!(dst(&f1), (BACKEND_LOCAL, 53));
    assert!(ip_checksum_ok(&f1));
    let (rc, f2) = dp.run("kpr_tc_ingress", &second);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(
        &f2[30..34],
        &BACKEND_LOCAL,
        "the later fragment goes to the same backend"
    );
    assert!(ip_checksum_ok(&f2));
    assert_eq!(&f2[34..], &second[34..], "its payload is untouched");
    // Masqueraded at egress, both fragments.
    let (_, e1) = dp.run("kpr_tc_egress", &f1);
    let (_, e2) = dp.run("kpr_tc_egress", &f2);
    assert_eq!(src(&e1).0, NODE);
    assert_eq!(&e2[26..30], &NODE, "the later fragment is masqueraded too");
    assert!(ip_checksum_ok(&e1) && ip_checksum_ok(&e2));
    // Reassembled, the datagram's UDP checksum holds.
    let mut whole = e1[..34].to_vec();
    whole.extend_from_slice(&e1[34..]);
    whole.extend_from_slice(&e2[34..]);
    let total = (whole.len() - 14) as u16;
    whole[16..18].copy_from_slice(&total.to_be_bytes());
    whole[20..22].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut whole);
    assert_checksums(&whole);
    // A fragment of a datagram kpr never saw passes untouched.
    let (_, stray) = fragments(&packet(CLIENT, 41401, NODE, 3053, None, &[1u8; 40]), 24, 7);
    assert_eq!(dp.run("kpr_tc_ingress", &stray), (TC_NEXT, stray.clone()));
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut dp = Datapath::new("tcext6");
    dp.program(DUAL_STACK_SERVICE);
    let client: Ipv6Addr = "2001:db8::2".parse().unwrap();
    let backend: Ipv6Addr = "fd00:180::1".parse().unwrap();
    let plain = pkt::build(
        SocketAddr::from((client, 41500)),
        SocketAddr::from((NODE6, 3201)),
        pkt::L4::Tcp(SYN),
        b"",
    );
    // Insert an 8-byte destination-options header (next header TCP, PadN).
    let mut with_ext = plain[..54].to_vec();
    with_ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    with_ext.extend_from_slice(&plain[54..]);
    with_ext[20] = 60;
    let len = u16::from_be_bytes([with_ext[18], with_ext[19]]) + 8;
    with_ext[18..20].copy_from_slice(&len.to_be_bytes());
    let (rc, out) = dp.run("kpr_tc_ingress", &with_ext);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(
        &out[38..54],
        &backend.octets(),
        "DNAT behind an extension header"
    );
    assert_eq!(
        u16::from_be_bytes([out[64], out[65]]),
        80,
        "the port, past the header"
    );
    // Without the extension header the TCP checksum must verify.
    let mut stripped = out[..54].to_vec();
    stripped.extend_from_slice(&out[62..]);
    stripped[20] = 6;
    stripped[18..20].copy_from_slice(&(len - 8).to_be_bytes());
    assert_checksums(&stripped);
}

const DUAL_STACK_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: v6}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: fd00:30::41
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 3201, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
endpoints: [{addresses: ['fd00:180::1'], conditions: {ready: true}, nodeName: test-node}]
ports: [{name: p, port: 80, protocol: TCP}]
";

/// A NodePort Service on 3301 with three endpoints and the `kpr.io/lb-algorithm` given.
fn balanced(algorithm: &str, endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|ip| {
            format!("- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node2}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: bal, annotations: {{kpr.io/lb-algorithm: {algorithm}}}}}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.61\n  ports: [{{name: p, port: 80, targetPort: 80, nodePort: 3301, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: bal-1, labels: {{kubernetes.io/service-name: bal}}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: p, port: 80, protocol: TCP}}]\n"
    )
}

#[test]
fn round_robin_takes_each_backend_in_turn() {
    let mut dp = Datapath::new("tcrr");
    dp.program(&balanced(
        "round-robin",
        &["10.180.2.1", "10.180.2.2", "10.180.2.3"],
    ));
    let picks: Vec<[u8; 4]> = (0..9u16)
        .map(|i| dst(&dp.run("kpr_tc_ingress", &tcp(41600 + i, 3301, SYN)).1).0)
        .collect();
    for round in picks.chunks(3) {
        let distinct: std::collections::BTreeSet<_> = round.iter().collect();
        assert_eq!(distinct.len(), 3, "every backend once per round: {picks:?}");
    }
    assert_eq!(picks[0..3], picks[3..6], "the same order every round");
}

#[test]
fn least_connections_prefers_the_idlest_backend() {
    let mut dp = Datapath::new("tclc");
    dp.program(&balanced("least-conn", &["10.180.2.1", "10.180.2.2"]));
    let first = dst(&dp.run("kpr_tc_ingress", &tcp(41700, 3301, SYN)).1).0;
    let second = dst(&dp.run("kpr_tc_ingress", &tcp(41701, 3301, SYN)).1).0;
    assert_ne!(first, second, "the second flow goes to the idle backend");
    // The first flow ends (RST): its backend now has no live connection, the other one.
    dp.run("kpr_tc_ingress", &tcp(41700, 3301, RST));
    let conns = dp.renderer.maps().backend_conns().unwrap();
    assert_eq!(
        conns.values().sum::<u32>(),
        1,
        "two opened, one closed: {conns:?}"
    );
    let third = dst(&dp.run("kpr_tc_ingress", &tcp(41702, 3301, SYN)).1).0;
    assert_eq!(third, first, "the idle backend takes the new flow");
    let view = kpr::render::ebpf::maps::view(&dp.renderer.maps().snapshot().unwrap());
    assert!(view.iter().any(|v| v.algorithm == "least-conn"));
}

#[test]
fn affinity_forgets_a_backend_that_left_the_service() {
    // Two affinity Services share backend 10.180.2.1; the first drops it while the second
    // keeps it (same backend id, same generation): a client pinned to it must move.
    let two = |first: &[&str]| {
        format!(
            "{}---\n{}",
            balanced("random", first).replace(
                "spec:\n",
                "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n"
            ),
            balanced("random", &["10.180.2.1"])
                .replace("name: bal", "name: other")
                .replace("172.30.0.61", "172.30.0.62")
                .replace("nodePort: 3301", "nodePort: 3302")
        )
    };
    let mut dp = Datapath::new("tcaffm");
    dp.program(&two(&["10.180.2.1"]));
    let (_, a) = dp.run("kpr_tc_ingress", &tcp(41800, 3301, SYN));
    assert_eq!(dst(&a).0, BACKEND_2);
    dp.program(&two(&["10.180.2.2"]));
    let (_, b) = dp.run("kpr_tc_ingress", &tcp(41801, 3301, SYN));
    assert_eq!(
        dst(&b).0,
        [10, 180, 2, 2],
        "not the backend that left the Service"
    );
}

#[test]
fn counters_count_flows_packets_bytes_and_drops() {
    let mut dp = Datapath::new("tccount");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let syn = tcp(41900, 3001, SYN);
    let data = packet(CLIENT, 41900, NODE, 3001, Some(PSH_ACK), b"hello");
    let (_, fwd) = dp.run("kpr_tc_ingress", &syn);
    dp.run("kpr_tc_egress", &fwd);
    dp.run("kpr_tc_ingress", &data);
    let nat = dp.nat_port(41900);
    let (_, back) = dp.run(
        "kpr_tc_ingress",
        &packet(BACKEND_LOCAL, 80, NODE, nat, Some(0x12), b""),
    );
    dp.run("kpr_tc_egress", &back);
    let id = dp.forward(41900).unwrap().service_id;
    let stats = dp.renderer.maps().service_stats().unwrap()[&id];
    assert_eq!(stats.flows, 1);
    assert_eq!(stats.packets, 3, "SYN and data in, SYN-ACK out");
    assert_eq!(stats.bytes, (syn.len() + data.len() + back.len()) as u64);
    // A Local-policy frontend without local endpoints drops, and says why.
    dp.program(&manifests(false, &["10.180.0.1"]));
    let (rc, _) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 41901, LB, 80, Some(SYN), b""),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.drops(drop_reason::POLICY_DROP), 1);
}

#[test]
fn conntrack_kinds_stay_two_per_direct_flow() {
    let mut dp = Datapath::new("tckinds");
    dp.program(&manifests(true, &["10.180.0.1"]));
    dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 42000, LB, 80, Some(SYN), b""),
    );
    assert_eq!(dp.ct_kinds(), vec![ct_kind::FORWARD, ct_kind::REPLY_SNAT]);
}

#[test]
fn a_backend_reset_closes_the_whole_flow() {
    let mut dp = Datapath::new("tcrst");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let (_, fwd) = dp.run("kpr_tc_ingress", &tcp(42100, 3001, SYN));
    dp.run("kpr_tc_egress", &fwd);
    dp.run("kpr_tc_ingress", &tcp(42100, 3001, ACK));
    assert_eq!(dp.forward(42100).unwrap().state, ct_state::ESTABLISHED);
    // The backend resets the connection: the reply passes REPLY_DNAT, then REPLY_SNAT.
    let nat = dp.nat_port(42100);
    let rst = packet(BACKEND_LOCAL, 80, NODE, nat, Some(RST | ACK), b"");
    let (_, back) = dp.run("kpr_tc_ingress", &rst);
    let (_, out) = dp.run("kpr_tc_egress", &back);
    assert_eq!(dst(&out), (CLIENT, 42100));
    let fwd = dp.forward(42100).unwrap();
    assert_eq!(
        fwd.state,
        ct_state::CLOSED,
        "the client's direction is closed too"
    );
    assert!(
        secs_left(fwd.expires_ns) <= 10,
        "and expires in seconds, not a day"
    );
}

#[test]
fn a_cluster_ip_reached_from_outside_is_served_and_masqueraded_per_the_detector() {
    let mut dp = Datapath::new("tcclip");
    dp.program(&manifests(true, &["10.180.0.1"]));
    // From outside the cluster (not a pod CIDR source): DNAT and masquerade.
    let (rc, fwd) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 42200, [172, 30, 0, 41], 80, Some(SYN), b""),
    );
    assert_eq!(rc, TC_NEXT);
    assert_eq!(
        dst(&fwd),
        (BACKEND_LOCAL, 80),
        "served from the ClusterIP's entry"
    );
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(src(&out).0, NODE, "masqueraded: the source is not a pod");
    assert_checksums(&out);
    // From a pod CIDR (10.0.0.0/8 here), e.g. a pod on another node: client kept.
    let pod = [10, 99, 0, 7];
    let (_, fwd) = dp.run(
        "kpr_tc_ingress",
        &packet(pod, 42201, [172, 30, 0, 41], 80, Some(SYN), b""),
    );
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 80));
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(src(&out), (pod, 42201), "pod traffic keeps its source");
    // A port the ClusterIP does not serve stays untouched.
    let other = packet(CLIENT, 42202, [172, 30, 0, 41], 8080, Some(SYN), b"");
    assert_eq!(dp.run("kpr_tc_ingress", &other), (TC_NEXT, other.clone()));
}

#[test]
fn a_flow_the_kernel_translates_is_left_to_it() {
    use proxy_common::{CtKey, CtValue, ct_flags, v4_mapped};
    let mut dp = Datapath::new("tckernel");
    // Maglev: a mid-stream segment without a flow would be balanced (its pick depends on the
    // flow alone), so only the KERNEL_NAT entry keeps it from being translated.
    dp.program(&balanced("maglev", &["10.180.2.1", "10.180.2.2"]));
    let (rc, data) = dp.run("kpr_tc_ingress", &tcp(41700, 3301, PSH_ACK));
    assert_eq!(rc, TC_NEXT);
    assert_ne!(
        dst(&data).0,
        NODE,
        "control: without the entry it is balanced"
    );
    let entries = dp.ct_kinds().len();

    // A flow established through kube-proxy's rules, recorded at takeover.
    let key = CtKey::new(
        v4_mapped(CLIENT),
        v4_mapped(NODE),
        41701,
        3301,
        6,
        ct_kind::FORWARD,
    );
    let value = CtValue {
        addr: v4_mapped([10, 180, 2, 9]),
        port: 80,
        expires_ns: gc::monotonic_ns() + 3_600 * 1_000_000_000,
        flags: ct_flags::KERNEL_NAT,
        state: ct_state::ESTABLISHED,
        ..CtValue::default()
    };
    dp.maps_mut().conntrack_put(&key, &value).unwrap();
    let sent = tcp(41701, 3301, PSH_ACK);
    let (rc, data) = dp.run("kpr_tc_ingress", &sent);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(data, sent, "left untouched for the kernel's conntrack");
    assert_eq!(
        dp.ct_kinds().len(),
        entries + 1,
        "no flow of kpr's own was made for it"
    );
    // Its FIN moves the entry's state like any flow's.
    dp.run("kpr_tc_ingress", &tcp(41701, 3301, FIN_ACK));
    assert_eq!(dp.forward(41701).unwrap().state, ct_state::FIN);
}
