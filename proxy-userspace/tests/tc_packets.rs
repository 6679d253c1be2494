//! Packet tests for the TC programs with BPF_PROG_TEST_RUN (root): build a packet, program the
//! maps through the real renderer from a model-built desired state, run, and check headers,
//! checksums and conntrack, in the spirit of Cilium's bpf/tests.
//!
//! Address plan:
//!   client     203.0.113.2:40000 (outside the cluster)
//!   node       192.168.0.2 (masquerade address), NodePort 3001
//!   LB IP      1.2.3.4:80 (externalTrafficPolicy Local service "local")
//!   backends   10.180.0.1:80 (local), 10.180.2.1:80 (remote)
mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use common::*;
use kpr::render::ebpf::packet::{self as pkt, L4};
use proxy_common::ct_kind;

#[test]
fn non_service_packets_pass_untouched() {
    let mut dp = Datapath::new("tcmiss");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let pkt = packet(CLIENT, 40000, NODE, 22, Some(0x02), &[]);
    for prog in ["kpr_tc_ingress", "kpr_tc_egress"] {
        let (rc, out) = dp.run(prog, &pkt);
        assert_eq!((rc, out), (TC_NEXT, pkt.clone()), "{prog}");
    }
    assert!(dp.ct_kinds().is_empty());
}

#[test]
fn nodeport_cluster_policy_dnat_masquerade_and_reverse() {
    let mut dp = Datapath::new("tcnp");
    dp.program(&manifests(true, &["10.180.0.1"]));
    // client -> NodePort, at the node's ingress: DNAT to the backend, source unchanged.
    let syn = packet(CLIENT, 40000, NODE, 3001, Some(0x02), &[]);
    let (rc, fwd) = dp.run("kpr_tc_ingress", &syn);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 80));
    assert_eq!(src(&fwd), (CLIENT, 40000));
    assert_checksums(&fwd);
    assert_eq!(
        dp.ct_kinds(),
        vec![
            ct_kind::FORWARD,
            ct_kind::SNAT,
            ct_kind::REPLY_DNAT,
            ct_kind::REPLY_SNAT
        ]
    );
    // ... and at egress towards the backend: masqueraded to the node.
    let (rc, out) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(rc, TC_NEXT);
    let nat = dp.nat_port(40000);
    assert_eq!(
        src(&out),
        (NODE, nat),
        "masqueraded to a port of kpr's range"
    );
    assert_eq!(dst(&out), (BACKEND_LOCAL, 80));
    assert_checksums(&out);

    // The backend's reply: ingress gives the client back as destination...
    let synack = packet(BACKEND_LOCAL, 80, NODE, nat, Some(0x12), &[]);
    let (rc, back) = dp.run("kpr_tc_ingress", &synack);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&back), (CLIENT, 40000));
    assert_checksums(&back);
    // ... and egress towards the client shows the NodePort as source.
    let (rc, back) = dp.run("kpr_tc_egress", &back);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(src(&back), (NODE, 3001));
    assert_checksums(&back);

    // An established packet follows the same entry.
    let data = packet(CLIENT, 40000, NODE, 3001, Some(0x18), b"hello");
    let (_, fwd2) = dp.run("kpr_tc_ingress", &data);
    assert_eq!(dst(&fwd2), (BACKEND_LOCAL, 80));
    assert_checksums(&fwd2);
}

#[test]
fn external_policy_local_keeps_the_client_address() {
    let mut dp = Datapath::new("tclocal");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let syn = packet(CLIENT, 40001, LB, 80, Some(0x02), &[]);
    let (rc, fwd) = dp.run("kpr_tc_ingress", &syn);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 80));
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(src(&out), (CLIENT, 40001), "eTP=Local is not masqueraded");
    assert_checksums(&out);
    assert_eq!(dp.ct_kinds(), vec![ct_kind::FORWARD, ct_kind::REPLY_SNAT]);
    // Reply from the backend straight to the client: source becomes the LB IP at egress.
    let (_, back) = dp.run(
        "kpr_tc_ingress",
        &packet(BACKEND_LOCAL, 80, CLIENT, 40001, Some(0x12), &[]),
    );
    let (_, back) = dp.run("kpr_tc_egress", &back);
    assert_eq!(src(&back), (LB, 80));
    assert_checksums(&back);
}

#[test]
fn no_endpoints_rejects_with_rst_and_local_policy_without_local_endpoints_drops() {
    let mut dp = Datapath::new("tcrej");
    dp.program(&manifests(false, &[]));
    let syn = packet(CLIENT, 40002, NODE, 3001, Some(0x02), &[]);
    let (rc, rst) = dp.run("kpr_tc_ingress", &syn);
    assert_eq!(rc, TC_ACT_REDIRECT, "sent back out of the same interface");
    assert_eq!(rst.len(), 54);
    assert_eq!(src(&rst), (NODE, 3001));
    assert_eq!(dst(&rst), (CLIENT, 40002));
    assert_eq!(rst[34 + 13], 0x14, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes([rst[42], rst[43], rst[44], rst[45]]),
        1001,
        "acks the SYN"
    );
    assert_eq!(&rst[..6], &syn[6..12], "MACs swapped");
    assert_checksums(&rst);
    let udp = packet(CLIENT, 40003, NODE, 3053, None, b"q");
    let (rc, icmp) = dp.run("kpr_tc_ingress", &udp);
    assert_eq!(rc, TC_ACT_REDIRECT, "UDP: ICMP port unreachable back out");
    assert_eq!(icmp.len(), 14 + 20 + 8 + 28);
    assert_eq!(
        (icmp[23], icmp[34], icmp[35]),
        (1, 3, 3),
        "ICMP type 3 code 3"
    );
    assert_eq!(src(&icmp).0, NODE);
    assert_eq!(dst(&icmp).0, CLIENT);
    assert_eq!(
        &icmp[42..70],
        &udp[14..42],
        "quotes the datagram's IP header and 8 bytes"
    );
    assert_checksums(&icmp);
    // eTP=Local with only a remote endpoint: external traffic is dropped.
    let lb = packet(CLIENT, 40004, LB, 80, Some(0x02), &[]);
    assert_eq!(dp.run("kpr_tc_ingress", &lb).0, TC_ACT_SHOT);
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    let mut dp = Datapath::new("tcudp");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let mut q = packet(CLIENT, 40005, NODE, 3053, None, b"query");
    q[40] = 0;
    q[41] = 0;
    let (rc, fwd) = dp.run("kpr_tc_ingress", &q);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 53));
    assert_eq!(&fwd[40..42], &[0, 0], "zero UDP checksum untouched");
    assert_checksums(&fwd);
    let q2 = packet(CLIENT, 40006, NODE, 3053, None, b"query");
    let (_, fwd2) = dp.run("kpr_tc_ingress", &q2);
    assert_checksums(&fwd2);
}

#[test]
fn stale_flows_repick_when_their_backend_goes_away() {
    let mut dp = Datapath::new("tcstale");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let q = packet(CLIENT, 40007, NODE, 3053, None, b"q");
    let (_, fwd) = dp.run("kpr_tc_ingress", &q);
    assert_eq!(dst(&fwd).0, BACKEND_LOCAL);
    // The backend is replaced: the flow's entry points at a backend that no longer exists.
    dp.program(&manifests(true, &["10.180.2.1"]));
    let (_, fwd) = dp.run("kpr_tc_ingress", &q);
    assert_eq!(
        dst(&fwd),
        ([10, 180, 2, 1], 53),
        "re-picked from the current backends"
    );
    assert_checksums(&fwd);
}

const POLICIES: &str = "\
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: sticky}
spec:
  type: NodePort
  clusterIP: 172.30.0.51
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 3101, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: mag, annotations: {kpr.io/lb-algorithm: maglev}}
spec:
  type: NodePort
  clusterIP: 172.30.0.52
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 3102, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: ranged}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.53
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 3103, protocol: TCP}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.9}]}}
";

fn policy_slices() -> String {
    ["sticky", "mag", "ranged"]
        .iter()
        .map(|svc| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints:\n- {{addresses: [10.180.0.1], conditions: {{ready: true}}, nodeName: test-node}}\n- {{addresses: [10.180.0.2], conditions: {{ready: true}}, nodeName: test-node}}\n- {{addresses: [10.180.0.3], conditions: {{ready: true}}, nodeName: test-node}}\nports: [{{name: p, port: 80, protocol: TCP}}]\n"
            )
        })
        .collect()
}

#[test]
fn session_affinity_sends_a_client_to_one_backend() {
    let mut dp = Datapath::new("tcaff");
    dp.program(&format!("{POLICIES}{}", policy_slices()));
    let mut seen = std::collections::BTreeSet::new();
    for sport in 20000..20040u16 {
        let (rc, fwd) = dp.run(
            "kpr_tc_ingress",
            &packet(CLIENT, sport, NODE, 3101, Some(0x02), &[]),
        );
        assert_eq!(rc, TC_NEXT);
        seen.insert(dst(&fwd).0);
    }
    assert_eq!(
        seen.len(),
        1,
        "40 new flows of one client must reach one backend: {seen:?}"
    );
    // Without affinity the same client spreads (the Maglev service hashes ports too).
    let mut spread = std::collections::BTreeSet::new();
    for sport in 20000..20040u16 {
        let (_, fwd) = dp.run(
            "kpr_tc_ingress",
            &packet(CLIENT, sport, NODE, 3102, Some(0x02), &[]),
        );
        spread.insert(dst(&fwd).0);
    }
    assert!(spread.len() > 1, "{spread:?}");
}

#[test]
fn maglev_picks_the_same_backend_on_every_node() {
    let yaml = format!("{POLICIES}{}", policy_slices());
    let mut node_a = Datapath::new("tcmaga");
    let mut node_b = Datapath::new("tcmagb");
    node_a.program(&yaml);
    // Node B came to the same state by another path: its slice lists the endpoints in
    // another order, and an earlier Service made it hand out other backend ids and
    // generations. Only what every node agrees on (the addresses) may decide the pick.
    let reordered = yaml.replace(
        "- {addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}\n- {addresses: [10.180.0.2], conditions: {ready: true}, nodeName: test-node}\n",
        "- {addresses: [10.180.0.2], conditions: {ready: true}, nodeName: test-node}\n- {addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}\n",
    );
    assert_ne!(reordered, yaml, "the reordering applies");
    node_b.program(&manifests(true, &["10.180.0.1", "10.180.2.1"]));
    node_b.program(&format!(
        "{reordered}---\n{}",
        manifests(true, &["10.180.2.1"])
    ));
    let ids = |dp: &Datapath| -> Vec<u32> {
        let mut ids: Vec<u32> = dp
            .renderer
            .maps()
            .snapshot()
            .unwrap()
            .backends
            .into_keys()
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_ne!(ids(&node_a), ids(&node_b), "the nodes' backend ids differ");
    let backends: Vec<std::net::SocketAddr> = ["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let table = kpr::render::ebpf::maglev::table(&backends, proxy_common::MAGLEV_TABLE_SIZE);
    for sport in 30000..30060u16 {
        let syn = packet(CLIENT, sport, NODE, 3102, Some(0x02), &[]);
        let (_, a) = node_a.run("kpr_tc_ingress", &syn);
        let (_, b) = node_b.run("kpr_tc_ingress", &syn);
        assert_eq!(dst(&a), dst(&b), "flow from port {sport}: both nodes agree");
        let hash = proxy_common::flow_hash(
            u32::from_ne_bytes(CLIENT),
            u32::from_ne_bytes(NODE),
            (u32::from(sport) << 16) | 3102,
            6,
        );
        let want = table[(hash % proxy_common::MAGLEV_TABLE_SIZE) as usize];
        let (ip, port) = dst(&a);
        assert_eq!(
            std::net::SocketAddr::from((ip, port)),
            want,
            "the agent's table and the datapath agree"
        );
    }
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_sources() {
    let mut dp = Datapath::new("tcrng");
    dp.program(&format!("{POLICIES}{}", policy_slices()));
    let inside = packet(CLIENT, 40100, [1, 2, 3, 9], 80, Some(0x02), &[]);
    let (rc, fwd) = dp.run("kpr_tc_ingress", &inside);
    assert_eq!(rc, TC_NEXT);
    assert_ne!(dst(&fwd).0, [1, 2, 3, 9], "an allowed source is translated");
    let outside = packet([198, 51, 100, 7], 40101, [1, 2, 3, 9], 80, Some(0x02), &[]);
    assert_eq!(
        dp.run("kpr_tc_ingress", &outside).0,
        TC_ACT_SHOT,
        "other sources are dropped"
    );
    let nodeport = packet([198, 51, 100, 7], 40102, NODE, 3103, Some(0x02), &[]);
    let (rc, fwd) = dp.run("kpr_tc_ingress", &nodeport);
    assert_eq!(rc, TC_NEXT);
    assert_ne!(dst(&fwd).0, NODE, "the NodePort is not restricted");
}

fn icmp_error(from: [u8; 4], to: [u8; 4], icmp_type: u8, code: u8, inner: &[u8]) -> Vec<u8> {
    pkt::icmp_error(from.into(), to.into(), icmp_type, code, inner)
}

fn quoted(p: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let (s, d) = pkt::quoted_ends(p);
    (v4(s), v4(d))
}

#[test]
fn icmp_errors_follow_their_flow() {
    let mut dp = Datapath::new("tcicmp");
    dp.program(&manifests(true, &["10.180.0.1"]));
    // A masqueraded NodePort flow: client 40000 -> node:3001 -> backend:80 as node:40000.
    let (_, fwd) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 40000, NODE, 3001, Some(0x02), &[]),
    );
    assert_eq!(dst(&fwd), (BACKEND_LOCAL, 80));
    let nat = dp.nat_port(40000);
    // A router on the way to the client says "fragmentation needed" about our reply
    // (node:3001 -> client:40000): it must reach the backend, about (backend:80 -> node:40000).
    let router = [198, 51, 100, 1];
    let reply_seen_outside = packet(NODE, 3001, CLIENT, 40000, Some(0x10), &[]);
    let err = icmp_error(router, NODE, 3, 4, &reply_seen_outside);
    let (rc, out) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&out).0, BACKEND_LOCAL, "outer destination: the backend");
    assert_eq!(src(&out).0, router);
    assert_eq!(
        quoted(&out),
        ((BACKEND_LOCAL, 80), (NODE, nat)),
        "the packet the backend sent"
    );
    assert_checksums(&out);

    // A UDP flow; the backend answers a datagram with port unreachable.
    let (_, fwd) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 40005, NODE, 3053, None, b"q"),
    );
    let (_, masq) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(src(&masq), (NODE, dp.nat_port(40005)));
    let err = icmp_error(BACKEND_LOCAL, NODE, 3, 3, &masq);
    let (rc, back) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(dst(&back).0, CLIENT, "to the client");
    assert_eq!(quoted(&back).0, (CLIENT, 40005));
    assert_checksums(&back);
    let (rc, out) = dp.run("kpr_tc_egress", &back);
    assert_eq!(rc, TC_NEXT);
    assert_eq!(src(&out).0, NODE, "from the frontend, not the backend");
    assert_eq!(
        quoted(&out),
        ((CLIENT, 40005), (NODE, 3053)),
        "about the packet the client sent"
    );
    assert_checksums(&out);

    // Errors about unknown flows pass untouched.
    let stray = icmp_error(
        router,
        NODE,
        3,
        1,
        &packet(NODE, 9999, CLIENT, 1234, Some(0x10), &[]),
    );
    assert_eq!(dp.run("kpr_tc_ingress", &stray), (TC_NEXT, stray.clone()));
}

const DUAL_STACK: &str = "\
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: ds}
spec:
  type: NodePort
  clusterIP: 172.30.0.61
  clusterIPs: [172.30.0.61, 'fd00:30::61']
  ipFamilies: [IPv4, IPv6]
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 3201, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: ds-v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
endpoints: [{addresses: ['fd00:180::1'], conditions: {ready: true}, nodeName: test-node}]
ports: [{name: p, port: 80, protocol: TCP}]
";

/// An IPv6 TCP segment, checksum right.
fn packet6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    pkt::build(
        SocketAddr::from((src, sport)),
        SocketAddr::from((dst, dport)),
        L4::Tcp(flags),
        &[],
    )
}

fn v6(a: SocketAddr) -> (Ipv6Addr, u16) {
    match a.ip() {
        IpAddr::V6(ip) => (ip, a.port()),
        IpAddr::V4(ip) => panic!("{ip} is not IPv6"),
    }
}

fn ends6(p: &[u8]) -> ((Ipv6Addr, u16), (Ipv6Addr, u16)) {
    let (s, d) = pkt::ends(p);
    (v6(s), v6(d))
}

#[test]
fn ipv6_nodeport_dnat_masquerade_and_reverse() {
    let mut dp = Datapath::new("tcv6");
    dp.program(DUAL_STACK);
    let client: Ipv6Addr = "2001:db8::2".parse().unwrap();
    let backend: Ipv6Addr = "fd00:180::1".parse().unwrap();
    let (rc, fwd) = dp.run("kpr_tc_ingress", &packet6(client, 41000, NODE6, 3201, 0x02));
    assert_eq!(rc, TC_NEXT);
    assert_eq!(
        ends6(&fwd),
        ((client, 41000), (backend, 80)),
        "DNAT to the IPv6 backend"
    );
    assert_checksums(&fwd);
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    let nat = dp.nat_port(41000);
    assert_eq!(
        ends6(&out),
        ((NODE6, nat), (backend, 80)),
        "masqueraded to the node's IPv6"
    );
    assert_checksums(&out);
    let (_, back) = dp.run("kpr_tc_ingress", &packet6(backend, 80, NODE6, nat, 0x12));
    let (_, back) = dp.run("kpr_tc_egress", &back);
    assert_eq!(
        ends6(&back),
        ((NODE6, 3201), (client, 41000)),
        "the reply shows the NodePort"
    );
    assert_checksums(&back);
    // Not a Service: untouched.
    let other = packet6(client, 41001, NODE6, 22, 0x02);
    assert_eq!(dp.run("kpr_tc_ingress", &other), (TC_NEXT, other.clone()));
}

#[test]
fn ipv6_reject_answers_with_rst() {
    let mut dp = Datapath::new("tcv6rej");
    dp.program(&DUAL_STACK.replace(
        "endpoints: [{addresses: ['fd00:180::1'], conditions: {ready: true}, nodeName: test-node}]",
        "endpoints: []",
    ));
    let client: Ipv6Addr = "2001:db8::2".parse().unwrap();
    let syn = packet6(client, 41002, NODE6, 3201, 0x02);
    let (rc, rst) = dp.run("kpr_tc_ingress", &syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(rst.len(), 14 + 40 + 20);
    assert_eq!(ends6(&rst), ((NODE6, 3201), (client, 41002)));
    assert_eq!(rst[67], 0x14, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes([rst[62], rst[63], rst[64], rst[65]]),
        1001,
        "acks the SYN"
    );
    assert_checksums(&rst);
}

#[test]
fn trace_follows_ipv6_too() {
    let mut dp = Datapath::new("tctrace6");
    dp.program(DUAL_STACK);
    let r = kpr::render::ebpf::trace::trace(
        dp.scratch.pin_dir(),
        "2001:db8::7".parse().unwrap(),
        40000,
        NODE6.into(),
        3201,
        kpr::model::Protocol::Tcp,
    )
    .expect("trace");
    assert_eq!(r.verdict, "DNAT", "{r:?}");
    assert_eq!(r.backend.as_deref(), Some("[fd00:180::1]:80"));
    let snat: std::net::SocketAddr = r.snat.as_deref().expect("masqueraded").parse().unwrap();
    assert_eq!(
        snat.ip(),
        IpAddr::from(NODE6),
        "masqueraded to the node's IPv6"
    );
    assert!(
        snat.port() >= proxy_common::NAT_PORT_MIN,
        "{snat}: a port of kpr's range"
    );
    assert!(
        dp.renderer.maps().conntrack().unwrap().is_empty(),
        "tracing leaves live conntrack alone"
    );
}

fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, icmp_type: u8, inner: &[u8]) -> Vec<u8> {
    pkt::icmp_error(from.into(), to.into(), icmp_type, 0, inner)
}

fn quoted6(p: &[u8]) -> ((Ipv6Addr, u16), (Ipv6Addr, u16)) {
    let (s, d) = pkt::quoted_ends(p);
    (v6(s), v6(d))
}

#[test]
fn icmpv6_packet_too_big_reaches_the_backend() {
    let mut dp = Datapath::new("tcicmp6");
    dp.program(DUAL_STACK);
    let client: Ipv6Addr = "2001:db8::2".parse().unwrap();
    let backend: Ipv6Addr = "fd00:180::1".parse().unwrap();
    let router: Ipv6Addr = "2001:db8:ffff::1".parse().unwrap();
    dp.run("kpr_tc_ingress", &packet6(client, 42000, NODE6, 3201, 0x02));
    let nat = dp.nat_port(42000);
    // "Packet too big" about our reply (node:3201 -> client:42000).
    let reply = packet6(NODE6, 3201, client, 42000, 0x10);
    let err = icmp6_error(router, NODE6, 2, &reply);
    let (rc, out) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_NEXT);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
    assert_eq!(dst, backend, "outer destination: the backend");
    assert_eq!(
        quoted6(&out),
        ((backend, 80), (NODE6, nat)),
        "the packet the backend sent"
    );
    assert_checksums(&out);
}
