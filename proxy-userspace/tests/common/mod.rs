//! Helpers shared by the TC packet tests: a scratch datapath programmed by the real
//! renderer, packet builders and readers.
#![allow(dead_code, reason = "each test file uses its own subset")]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kpr::model::{NodeInfo, ProxyConfig, compute};
use kpr::render::Renderer as _;
use kpr::render::ebpf::EbpfRenderer;
use kpr::render::ebpf::packet::{self as pkt, L4};
use kpr::render::ebpf::scratch::{ScratchDatapath, ScratchPins};
use kpr::source::convert::ProxySelector;
use kpr::source::manifests::parse_manifest;
use kpr::store::{Change, Store};
use proxy_common::ct_kind;

/// TCX_NEXT (TC_ACT_UNSPEC, -1): the packet goes on to the next program, translated or not.
pub const TC_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: [u8; 4] = [203, 0, 113, 2];
pub const NODE: [u8; 4] = [192, 168, 0, 2];
pub const LB: [u8; 4] = [1, 2, 3, 4];
pub const BACKEND_LOCAL: [u8; 4] = [10, 180, 0, 1];
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

pub fn manifests(local_endpoints: bool, cluster_endpoints: &[&str]) -> String {
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

/// A scratch TC datapath whose maps are programmed by the real eBPF renderer from a
/// model-built desired state.
pub struct Datapath {
    pub scratch: ScratchDatapath,
    pub renderer: EbpfRenderer,
}

impl Datapath {
    pub fn new(tag: &str) -> Self {
        kpr_testnet::require_root();
        kpr_testnet::ensure_bpffs();
        let scratch = ScratchDatapath::load(ScratchPins::new(
            std::path::Path::new("/sys/fs/bpf"),
            &kpr_testnet::unique(tag),
        ))
        .expect("load the TC programs");
        let renderer = EbpfRenderer::with_maps(scratch.layout.clone()).expect("open the maps");
        Self { scratch, renderer }
    }

    pub fn program(&mut self, yaml: &str) {
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
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        };
        let config = ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::default()
        };
        let report = self.renderer.sync_full(&compute(&store, &node, &config));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    pub fn run(&self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let r = self.scratch.run(prog, packet).expect("BPF_PROG_TEST_RUN");
        (r.action, r.packet)
    }

    /// The masquerade port of the flow from client port `sport` (kpr's own port range).
    pub fn nat_port(&self, sport: u16) -> u16 {
        let port = self
            .renderer
            .maps()
            .conntrack()
            .unwrap()
            .iter()
            .find(|(k, v)| k.kind == ct_kind::FORWARD && k.sport == sport && v.nat_port != 0)
            .map(|(_, v)| v.nat_port)
            .expect("a masqueraded flow");
        assert!(
            (proxy_common::NAT_PORT_MIN..=proxy_common::NAT_PORT_MAX).contains(&port),
            "masquerade port {port} outside kpr's range"
        );
        port
    }

    pub fn ct_kinds(&self) -> Vec<u8> {
        let mut k: Vec<u8> = self
            .renderer
            .maps()
            .conntrack()
            .unwrap()
            .iter()
            .map(|(k, _)| k.kind)
            .collect();
        k.sort_unstable();
        k
    }
}

/// An IPv4 TCP segment (`Some(flags)`) or UDP datagram (`None`), checksums right.
pub fn packet(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    tcp_flags: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    pkt::build(
        SocketAddr::from((src, sport)),
        SocketAddr::from((dst, dport)),
        tcp_flags.map_or(L4::Udp, L4::Tcp),
        payload,
    )
}

pub fn v4(a: SocketAddr) -> ([u8; 4], u16) {
    match a.ip() {
        IpAddr::V4(ip) => (ip.octets(), a.port()),
        IpAddr::V6(ip) => panic!("{ip} is not IPv4"),
    }
}

pub fn src(p: &[u8]) -> ([u8; 4], u16) {
    v4(pkt::ends(p).0)
}

pub fn dst(p: &[u8]) -> ([u8; 4], u16) {
    v4(pkt::ends(p).1)
}

/// Panics unless every checksum of `p` verifies.
pub fn assert_checksums(p: &[u8]) {
    pkt::verify_checksums(p).unwrap_or_else(|e| panic!("{e}"));
}

impl Datapath {
    /// A scratch datapath whose renderer writes `cfg` (timeouts, NAT ports) at its first sync.
    pub fn with_config(tag: &str, cfg: kpr::render::ebpf::DatapathConfig) -> Self {
        let mut dp = Self::new(tag);
        dp.renderer.set_datapath_config(cfg);
        dp
    }

    /// A second handle on the maps, for writes (garbage collection).
    pub fn maps_mut(&self) -> kpr::render::ebpf::pinned::PinnedMaps {
        kpr::render::ebpf::pinned::PinnedMaps::open(&self.scratch.layout).expect("open the maps")
    }

    /// The FORWARD conntrack entry of the flow from client port `sport`.
    pub fn forward(&self, sport: u16) -> Option<proxy_common::CtValue> {
        self.renderer
            .maps()
            .conntrack()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.kind == ct_kind::FORWARD && k.sport == sport)
            .map(|(_, v)| v)
    }

    /// Drops counted for `reason` (`proxy_common::drop_reason`).
    pub fn drops(&self, reason: u32) -> u64 {
        self.renderer.maps().drops().unwrap()[reason as usize]
    }
}

/// Recomputes an IPv4 header's checksum (Ethernet frame).
pub fn fix_ip_checksum(p: &mut [u8]) {
    p[24] = 0;
    p[25] = 0;
    let c = pkt::fold(pkt::sum16(&p[14..34]));
    p[24..26].copy_from_slice(&c.to_be_bytes());
}

/// True when an IPv4 header's checksum verifies (Ethernet frame).
pub fn ip_checksum_ok(p: &[u8]) -> bool {
    pkt::fold(pkt::sum16(&p[14..34])) == 0
}
