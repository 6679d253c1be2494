//! Packet tests for the TC programs with BPF_PROG_TEST_RUN (root): build a packet, program the
//! maps through the real renderer from a model-built desired state, run, and check headers,
//! checksums and conntrack, in the spirit of Cilium's bpf/tests.
//!
//! Address plan:
//!   client     203.0.113.2:40000 (outside the cluster)
//!   node       192.168.0.2 (masquerade address), NodePort 3001
//!   LB IP      1.2.3.4:80 (externalTrafficPolicy Local service "local")
//!   backends   10.180.0.1:80 (local), 10.180.2.1:80 (remote)
use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use kpr::model::{NodeInfo, ProxyConfig, compute};
use kpr::render::ebpf::datapath::{PinLayout, load_object};
use kpr::render::ebpf::maps::MapDiff;
use kpr::render::ebpf::pinned::PinnedMaps;
use kpr::source::convert::ProxySelector;
use kpr::source::manifests::parse_manifest;
use kpr::store::{Change, Store};
use proxy_common::{NodeConfig, ct_kind, v4_mapped};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [203, 0, 113, 2];
const NODE: [u8; 4] = [192, 168, 0, 2];
const LB: [u8; 4] = [1, 2, 3, 4];
const BACKEND_LOCAL: [u8; 4] = [10, 180, 0, 1];
const NODE6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

fn manifests(local_endpoints: bool, cluster_endpoints: &[&str]) -> String {
    let eps: String = cluster_endpoints
        .iter()
        .map(|ip| {
            format!(
                "  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {}}}\n",
                if *ip == "10.180.0.1" {
                    "test-node"
                } else {
                    "node2"
                }
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "  []\n".to_string()
    } else {
        eps
    };
    let local_eps = if local_endpoints {
        "  - {addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}\n"
    } else {
        "  - {addresses: [10.180.2.1], conditions: {ready: true}, nodeName: node2}\n"
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: np}}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.41\n  ports: [{{name: p, port: 80, targetPort: 80, nodePort: 3001, protocol: TCP}}, {{name: u, port: 53, targetPort: 53, nodePort: 3053, protocol: UDP}}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: np-1, labels: {{kubernetes.io/service-name: np}}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: p, port: 80, protocol: TCP}}, {{name: u, port: 53, protocol: UDP}}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: local}}\nspec:\n  type: LoadBalancer\n  clusterIP: 172.30.0.42\n  externalTrafficPolicy: Local\n  ports: [{{name: p, port: 80, targetPort: 80, nodePort: 3002, protocol: TCP}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4}}]}}}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: local-1, labels: {{kubernetes.io/service-name: local}}}}\naddressType: IPv4\nendpoints:\n{local_eps}ports: [{{name: p, port: 80, protocol: TCP}}]\n"
    )
}

/// A private bpffs directory, removed on drop (also when loading fails).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loaded TC datapath with its maps pinned in a private bpffs directory.
struct Datapath {
    ebpf: aya::Ebpf,
    maps: PinnedMaps,
    renderer: MapDiff,
    _root: PinDir,
}

impl Datapath {
    fn new(tag: &str) -> Self {
        kpr_testnet::require_root();
        kpr_testnet::ensure_bpffs();
        let root = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            kpr_testnet::unique(tag)
        )));
        let layout = PinLayout::new(&root.0);
        let mut ebpf = load_object(&layout).expect("load object");
        for name in ["kpr_tc_ingress", "kpr_tc_egress"] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
        }
        let mut maps = PinnedMaps::open(&layout).expect("open maps");
        maps.set_node_config(&NodeConfig {
            snat_v4: v4_mapped(NODE),
            snat_v6: NODE6.octets(),
        })
        .unwrap();
        Self {
            ebpf,
            maps,
            renderer: MapDiff::default(),
            _root: root,
        }
    }

    fn program(&mut self, yaml: &str) {
        let objs = parse_manifest(yaml, &ProxySelector::default()).expect("valid manifests");
        let mut store = Store::default();
        store.apply(Change::Reset {
            services: objs.services,
            slices: objs.slices,
        });
        let node = NodeInfo {
            name: "test-node".into(),
            ips: vec![Ipv4Addr::from(NODE).into(), NODE6.into()],
            labels: Default::default(),
        };
        let config = ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::default()
        };
        let desired = compute(&store, &node, &config);
        let (_, errors) = self.renderer.sync(&desired, &mut self.maps, &[]);
        assert!(errors.is_empty(), "{errors:?}");
    }

    fn run(&self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; 1600];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn ct_kinds(&self) -> Vec<u8> {
        let mut k: Vec<u8> = self
            .maps
            .conntrack()
            .unwrap()
            .iter()
            .map(|(k, _)| k.kind)
            .collect();
        k.sort_unstable();
        k
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Builds Ethernet + IPv4 + TCP (flags) or UDP with correct checksums.
fn packet(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    tcp_flags: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    let udp = tcp_flags.is_none();
    let l4_len = if udp { 8 } else { 20 } + payload.len();
    let mut p = vec![0u8; 14 + 20 + l4_len];
    p[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = 14;
    p[ip] = 0x45;
    p[ip + 2..ip + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    p[ip + 8] = 64;
    p[ip + 9] = if udp { 17 } else { 6 };
    p[ip + 12..ip + 16].copy_from_slice(&src);
    p[ip + 16..ip + 20].copy_from_slice(&dst);
    let c = fold(sum16(&p[ip..ip + 20]));
    p[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let l4 = 34;
    p[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    p[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
    if udp {
        p[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        p[l4 + 8..].copy_from_slice(payload);
    } else {
        p[l4 + 4..l4 + 8].copy_from_slice(&1000u32.to_be_bytes());
        p[l4 + 12] = 5 << 4;
        p[l4 + 13] = tcp_flags.unwrap();
        p[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
        p[l4 + 20..].copy_from_slice(payload);
    }
    let csum_off = if udp { l4 + 6 } else { l4 + 16 };
    let c = l4_checksum(&p);
    p[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    p
}

fn l4_checksum(p: &[u8]) -> u16 {
    let proto = p[23];
    let l4 = &p[34..];
    let pseudo = sum16(&p[26..34]) + u32::from(proto) + l4.len() as u32;
    let csum_off = if proto == 17 { 6 } else { 16 };
    let mut copy = l4.to_vec();
    copy[csum_off] = 0;
    copy[csum_off + 1] = 0;
    let c = fold(pseudo + sum16(&copy));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// Panics unless the IPv4 and L4 checksums of `p` verify.
fn assert_checksums(p: &[u8]) {
    assert_eq!(fold(sum16(&p[14..34])), 0, "IPv4 header checksum");
    let proto = p[23];
    let off = 34 + if proto == 17 { 6 } else { 16 };
    let stored = u16::from_be_bytes([p[off], p[off + 1]]);
    if proto == 17 && stored == 0 {
        return;
    }
    assert_eq!(stored, l4_checksum(p), "L4 checksum");
}

fn src(p: &[u8]) -> ([u8; 4], u16) {
    (
        [p[26], p[27], p[28], p[29]],
        u16::from_be_bytes([p[34], p[35]]),
    )
}

fn dst(p: &[u8]) -> ([u8; 4], u16) {
    (
        [p[30], p[31], p[32], p[33]],
        u16::from_be_bytes([p[36], p[37]]),
    )
}

#[test]
fn non_service_packets_pass_untouched() {
    let mut dp = Datapath::new("tcmiss");
    dp.program(&manifests(true, &["10.180.0.1"]));
    let pkt = packet(CLIENT, 40000, NODE, 22, Some(0x02), &[]);
    for prog in ["kpr_tc_ingress", "kpr_tc_egress"] {
        let (rc, out) = dp.run(prog, &pkt);
        assert_eq!((rc, out), (TC_ACT_OK, pkt.clone()), "{prog}");
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
    assert_eq!(rc, TC_ACT_OK);
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
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(src(&out), (NODE, 40000));
    assert_eq!(dst(&out), (BACKEND_LOCAL, 80));
    assert_checksums(&out);

    // The backend's reply: ingress gives the client back as destination...
    let synack = packet(BACKEND_LOCAL, 80, NODE, 40000, Some(0x12), &[]);
    let (rc, back) = dp.run("kpr_tc_ingress", &synack);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dst(&back), (CLIENT, 40000));
    assert_checksums(&back);
    // ... and egress towards the client shows the NodePort as source.
    let (rc, back) = dp.run("kpr_tc_egress", &back);
    assert_eq!(rc, TC_ACT_OK);
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
    assert_eq!(rc, TC_ACT_OK);
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
    assert_eq!(fold(sum16(&icmp[14..34])), 0, "IPv4 header checksum");
    assert_eq!(fold(sum16(&icmp[34..])), 0, "ICMP checksum");
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
    assert_eq!(rc, TC_ACT_OK);
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
        assert_eq!(rc, TC_ACT_OK);
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
    node_b.program(&yaml);
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
    assert_eq!(rc, TC_ACT_OK);
    assert_ne!(dst(&fwd).0, [1, 2, 3, 9], "an allowed source is translated");
    let outside = packet([198, 51, 100, 7], 40101, [1, 2, 3, 9], 80, Some(0x02), &[]);
    assert_eq!(
        dp.run("kpr_tc_ingress", &outside).0,
        TC_ACT_SHOT,
        "other sources are dropped"
    );
    let nodeport = packet([198, 51, 100, 7], 40102, NODE, 3103, Some(0x02), &[]);
    let (rc, fwd) = dp.run("kpr_tc_ingress", &nodeport);
    assert_eq!(rc, TC_ACT_OK);
    assert_ne!(dst(&fwd).0, NODE, "the NodePort is not restricted");
}

/// An ICMP error (type, code) from `from` to `to`, quoting `inner` (an IPv4 packet built by
/// `packet`, Ethernet header included).
fn icmp_error(from: [u8; 4], to: [u8; 4], icmp_type: u8, code: u8, inner: &[u8]) -> Vec<u8> {
    let quote = &inner[14..14 + 28];
    let mut p = vec![0u8; 14 + 20 + 8 + 28];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&((20 + 8 + 28) as u16).to_be_bytes());
    p[22] = 64;
    p[23] = 1;
    p[26..30].copy_from_slice(&from);
    p[30..34].copy_from_slice(&to);
    let c = fold(sum16(&p[14..34]));
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p[34] = icmp_type;
    p[35] = code;
    p[38..40].copy_from_slice(&1400u16.to_be_bytes()); // next-hop MTU for "fragmentation needed"
    p[42..].copy_from_slice(quote);
    let c = fold(sum16(&p[34..]));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn assert_icmp_checksums(p: &[u8]) {
    assert_eq!(fold(sum16(&p[14..34])), 0, "outer IPv4 checksum");
    assert_eq!(fold(sum16(&p[34..])), 0, "ICMP checksum");
    assert_eq!(fold(sum16(&p[42..62])), 0, "quoted IPv4 header checksum");
}

fn quoted(p: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let ip = 42;
    let l4 = 62;
    (
        (
            [p[ip + 12], p[ip + 13], p[ip + 14], p[ip + 15]],
            u16::from_be_bytes([p[l4], p[l4 + 1]]),
        ),
        (
            [p[ip + 16], p[ip + 17], p[ip + 18], p[ip + 19]],
            u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
        ),
    )
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
    // A router on the way to the client says "fragmentation needed" about our reply
    // (node:3001 -> client:40000): it must reach the backend, about (backend:80 -> node:40000).
    let router = [198, 51, 100, 1];
    let reply_seen_outside = packet(NODE, 3001, CLIENT, 40000, Some(0x10), &[]);
    let err = icmp_error(router, NODE, 3, 4, &reply_seen_outside);
    let (rc, out) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dst(&out).0, BACKEND_LOCAL, "outer destination: the backend");
    assert_eq!(src(&out).0, router);
    assert_eq!(
        quoted(&out),
        ((BACKEND_LOCAL, 80), (NODE, 40000)),
        "the packet the backend sent"
    );
    assert_icmp_checksums(&out);

    // A UDP flow; the backend answers a datagram with port unreachable.
    let (_, fwd) = dp.run(
        "kpr_tc_ingress",
        &packet(CLIENT, 40005, NODE, 3053, None, b"q"),
    );
    let (_, masq) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(src(&masq), (NODE, 40005));
    let err = icmp_error(BACKEND_LOCAL, NODE, 3, 3, &masq);
    let (rc, back) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dst(&back).0, CLIENT, "to the client");
    assert_eq!(quoted(&back).0, (CLIENT, 40005));
    assert_icmp_checksums(&back);
    let (rc, out) = dp.run("kpr_tc_egress", &back);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(src(&out).0, NODE, "from the frontend, not the backend");
    assert_eq!(
        quoted(&out),
        ((CLIENT, 40005), (NODE, 3053)),
        "about the packet the client sent"
    );
    assert_icmp_checksums(&out);

    // Errors about unknown flows pass untouched.
    let stray = icmp_error(
        router,
        NODE,
        3,
        1,
        &packet(NODE, 9999, CLIENT, 1234, Some(0x10), &[]),
    );
    assert_eq!(dp.run("kpr_tc_ingress", &stray), (TC_ACT_OK, stray.clone()));
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

/// Ethernet + IPv6 + TCP with a correct checksum.
fn packet6(
    src: std::net::Ipv6Addr,
    sport: u16,
    dst: std::net::Ipv6Addr,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 40 + 20];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&20u16.to_be_bytes());
    p[20] = 6;
    p[21] = 64;
    p[22..38].copy_from_slice(&src.octets());
    p[38..54].copy_from_slice(&dst.octets());
    p[54..56].copy_from_slice(&sport.to_be_bytes());
    p[56..58].copy_from_slice(&dport.to_be_bytes());
    p[58..62].copy_from_slice(&1000u32.to_be_bytes());
    p[66] = 5 << 4;
    p[67] = flags;
    p[68..70].copy_from_slice(&64240u16.to_be_bytes());
    let c = tcp6_checksum(&p);
    p[70..72].copy_from_slice(&c.to_be_bytes());
    p
}

fn tcp6_checksum(p: &[u8]) -> u16 {
    let l4 = &p[54..];
    let pseudo = sum16(&p[22..54]) + l4.len() as u32 + 6;
    let mut copy = l4.to_vec();
    copy[16] = 0;
    copy[17] = 0;
    fold(pseudo + sum16(&copy))
}

fn ends6(p: &[u8]) -> ((std::net::Ipv6Addr, u16), (std::net::Ipv6Addr, u16)) {
    let a = |o: usize| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap());
    (
        (a(22), u16::from_be_bytes([p[54], p[55]])),
        (a(38), u16::from_be_bytes([p[56], p[57]])),
    )
}

#[test]
fn ipv6_nodeport_dnat_masquerade_and_reverse() {
    let mut dp = Datapath::new("tcv6");
    dp.program(DUAL_STACK);
    let client: std::net::Ipv6Addr = "2001:db8::2".parse().unwrap();
    let backend: std::net::Ipv6Addr = "fd00:180::1".parse().unwrap();
    let (rc, fwd) = dp.run("kpr_tc_ingress", &packet6(client, 41000, NODE6, 3201, 0x02));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        ends6(&fwd),
        ((client, 41000), (backend, 80)),
        "DNAT to the IPv6 backend"
    );
    assert_eq!(
        u16::from_be_bytes([fwd[70], fwd[71]]),
        tcp6_checksum(&fwd),
        "TCP checksum"
    );
    let (_, out) = dp.run("kpr_tc_egress", &fwd);
    assert_eq!(
        ends6(&out),
        ((NODE6, 41000), (backend, 80)),
        "masqueraded to the node's IPv6"
    );
    assert_eq!(u16::from_be_bytes([out[70], out[71]]), tcp6_checksum(&out));
    let (_, back) = dp.run("kpr_tc_ingress", &packet6(backend, 80, NODE6, 41000, 0x12));
    let (_, back) = dp.run("kpr_tc_egress", &back);
    assert_eq!(
        ends6(&back),
        ((NODE6, 3201), (client, 41000)),
        "the reply shows the NodePort"
    );
    assert_eq!(
        u16::from_be_bytes([back[70], back[71]]),
        tcp6_checksum(&back)
    );
    // Not a Service: untouched.
    let other = packet6(client, 41001, NODE6, 22, 0x02);
    assert_eq!(dp.run("kpr_tc_ingress", &other), (TC_ACT_OK, other.clone()));
}

#[test]
fn ipv6_reject_answers_with_rst() {
    let mut dp = Datapath::new("tcv6rej");
    dp.program(&DUAL_STACK.replace(
        "endpoints: [{addresses: ['fd00:180::1'], conditions: {ready: true}, nodeName: test-node}]",
        "endpoints: []",
    ));
    let client: std::net::Ipv6Addr = "2001:db8::2".parse().unwrap();
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
    assert_eq!(
        u16::from_be_bytes([rst[70], rst[71]]),
        tcp6_checksum(&rst),
        "TCP checksum"
    );
}

#[test]
fn trace_follows_ipv6_too() {
    let mut dp = Datapath::new("tctrace6");
    dp.program(DUAL_STACK);
    let r = kpr::render::ebpf::trace::trace(
        &dp._root.0,
        "2001:db8::7".parse().unwrap(),
        40000,
        NODE6.into(),
        3201,
        kpr::model::Protocol::Tcp,
    )
    .expect("trace");
    assert_eq!(r.verdict, "DNAT", "{r:?}");
    assert_eq!(r.backend.as_deref(), Some("[fd00:180::1]:80"));
    assert_eq!(
        r.snat.as_deref(),
        Some("[fd00::2]:40000"),
        "masqueraded to the node's IPv6"
    );
    assert!(
        dp.maps.conntrack().unwrap().is_empty(),
        "tracing leaves live conntrack alone"
    );
}

/// An ICMPv6 error (type, code) from `from` to `to`, quoting the IPv6 header and first 8 L4
/// bytes of `inner` (built by `packet6`), with its checksum.
fn icmp6_error(
    from: std::net::Ipv6Addr,
    to: std::net::Ipv6Addr,
    icmp_type: u8,
    inner: &[u8],
) -> Vec<u8> {
    let quote = &inner[14..14 + 48];
    let mut p = vec![0u8; 14 + 40 + 8 + 48];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&56u16.to_be_bytes());
    p[20] = 58;
    p[21] = 64;
    p[22..38].copy_from_slice(&from.octets());
    p[38..54].copy_from_slice(&to.octets());
    p[54] = icmp_type;
    if icmp_type == 2 {
        p[58..62].copy_from_slice(&1280u32.to_be_bytes()); // MTU
    }
    p[62..].copy_from_slice(quote);
    let c = icmp6_checksum(&p);
    p[56..58].copy_from_slice(&c.to_be_bytes());
    p
}

fn icmp6_checksum(p: &[u8]) -> u16 {
    let body = &p[54..];
    let pseudo = sum16(&p[22..54]) + body.len() as u32 + 58;
    let mut copy = body.to_vec();
    copy[2] = 0;
    copy[3] = 0;
    fold(pseudo + sum16(&copy))
}

fn quoted6(p: &[u8]) -> ((std::net::Ipv6Addr, u16), (std::net::Ipv6Addr, u16)) {
    let a = |o: usize| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap());
    let ip = 62;
    let l4 = ip + 40;
    (
        (a(ip + 8), u16::from_be_bytes([p[l4], p[l4 + 1]])),
        (a(ip + 24), u16::from_be_bytes([p[l4 + 2], p[l4 + 3]])),
    )
}

#[test]
fn icmpv6_packet_too_big_reaches_the_backend() {
    let mut dp = Datapath::new("tcicmp6");
    dp.program(DUAL_STACK);
    let client: std::net::Ipv6Addr = "2001:db8::2".parse().unwrap();
    let backend: std::net::Ipv6Addr = "fd00:180::1".parse().unwrap();
    let router: std::net::Ipv6Addr = "2001:db8:ffff::1".parse().unwrap();
    dp.run("kpr_tc_ingress", &packet6(client, 42000, NODE6, 3201, 0x02));
    // "Packet too big" about our reply (node:3201 -> client:42000).
    let reply = packet6(NODE6, 3201, client, 42000, 0x10);
    let err = icmp6_error(router, NODE6, 2, &reply);
    let (rc, out) = dp.run("kpr_tc_ingress", &err);
    assert_eq!(rc, TC_ACT_OK);
    let dst = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
    assert_eq!(dst, backend, "outer destination: the backend");
    assert_eq!(
        quoted6(&out),
        ((backend, 80), (NODE6, 42000)),
        "the packet the backend sent"
    );
    assert_eq!(
        u16::from_be_bytes([out[56], out[57]]),
        icmp6_checksum(&out),
        "ICMPv6 checksum"
    );
}
