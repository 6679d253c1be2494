//! Map keys, values, names and sizes shared by kpr's eBPF programs and its agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so its layout is the same in
//! the kernel and in userspace and no byte of a map key is left uninitialised. Addresses are
//! always 16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one
//! set of maps serves both families. Ports are stored in host byte order (readable in
//! `bpftool map dump`); the programs convert at the edge.
#![cfg_attr(not(test), no_std)]

/// Bumped whenever a key or value layout changes. Pins live under `<bpffs>/v<VERSION>/`, so a
/// new agent never reads maps laid out by an older one.
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// Map names, as the loader sees them and as they are pinned.
pub mod map_names {
    pub const SERVICES: &str = "KPR_SERVICES";
    pub const BACKEND_SLOTS: &str = "KPR_SLOTS";
    pub const BACKENDS: &str = "KPR_BACKENDS";
    pub const REVNAT: &str = "KPR_REVNAT";
    pub const SOCK_REVNAT: &str = "KPR_SOCK_REVNAT";
    pub const CONNTRACK: &str = "KPR_CT";
    pub const CONFIG: &str = "KPR_CONFIG";
    pub const AFFINITY: &str = "KPR_AFFINITY";
    pub const SRC_RANGES: &str = "KPR_SRC_RANGES";
    pub const MEMBERS: &str = "KPR_MEMBERS";
    pub const STATS: &str = "KPR_STATS";
    pub const DROPS: &str = "KPR_DROPS";
    pub const FRAGS: &str = "KPR_FRAGS";
    pub const BACKEND_CONNS: &str = "KPR_BACKEND_CONNS";
    pub const ALL: [&str; 14] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        REVNAT,
        SOCK_REVNAT,
        CONNTRACK,
        CONFIG,
        AFFINITY,
        SRC_RANGES,
        MEMBERS,
        STATS,
        DROPS,
        FRAGS,
        BACKEND_CONNS,
    ];
}

/// Map capacities: 128k frontend keys, 1M backends, 2M backend slots. The large hash maps
/// are not preallocated (BPF_F_NO_PREALLOC): kernel memory grows with what is used.
pub mod map_sizes {
    pub const SERVICES: usize = 131_072;
    pub const BACKEND_SLOTS: usize = 2_097_152;
    pub const BACKENDS: usize = 1_048_576;
    pub const REVNAT: usize = 65_536;
    pub const SOCK_REVNAT: usize = 262_144;
    pub const CONNTRACK: usize = 524_288;
    pub const AFFINITY: usize = 262_144;
    pub const SRC_RANGES: usize = 65_536;
    /// (service, backend) pairs of services with session affinity.
    pub const MEMBERS: usize = 1_048_576;
    /// Per-service counters (per CPU).
    pub const STATS: usize = 131_072;
    /// IPv4/IPv6 fragments of translated datagrams in flight.
    pub const FRAGS: usize = 16_384;
    /// Live connection counts of least-connection backends.
    pub const BACKEND_CONNS: usize = 1_048_576;
}

/// Default slots of a Maglev lookup table (a prime, Cilium's default: even shares up to
/// about a thousand backends). `--maglev-table-size` picks another prime.
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// IP protocol numbers as used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Which backend set of a frontend a key selects (see `ServiceKey::scope`).
pub mod scope {
    /// Traffic from inside the cluster (pods, the node): internalTrafficPolicy applies.
    pub const INTERNAL: u8 = 0;
    /// Traffic from outside the cluster: externalTrafficPolicy applies.
    pub const EXTERNAL: u8 = 1;
}

/// Flags in `ServiceValue::flags`.
pub mod service_flags {
    /// The frontend is a ClusterIP (as opposed to NodePort, ExternalIP, LoadBalancer).
    pub const CLUSTER_IP: u32 = 1 << 0;
    /// sessionAffinity: ClientIP.
    pub const AFFINITY_CLIENT_IP: u32 = 1 << 1;
    /// No usable endpoint and the policy says drop (a Local policy without local
    /// endpoints), not reject.
    pub const DROP: u32 = 1 << 2;
    /// Traffic from outside to this (external-scope) frontend is masqueraded to the node
    /// (externalTrafficPolicy Cluster).
    pub const EXTERNAL_MASQ: u32 = 1 << 3;
    /// The backend slots are a Maglev table: pick by flow hash, not at random, so every node
    /// picks the same backend for a flow.
    pub const MAGLEV: u32 = 1 << 4;
    /// loadBalancerSourceRanges: only sources in `KPR_SRC_RANGES` for this service id may
    /// use this frontend; others are dropped.
    pub const SOURCE_RANGES: u32 = 1 << 5;
    /// Round robin: slot = a per-frontend counter (`ServiceValue::rr`), bumped per new flow.
    pub const ROUND_ROBIN: u32 = 1 << 6;
    /// Least connections: the backend with the fewest live flows (`KPR_BACKEND_CONNS`), kept
    /// by the datapath itself.
    pub const LEAST_CONN: u32 = 1 << 7;
    /// SOURCE_RANGES at the socket level, for a socket whose source is not chosen yet: the
    /// node's clients are admitted (a node address is inside the ranges).
    pub const RANGES_ADMIT_NODE: u32 = 1 << 8;
    /// ... pod clients are admitted (every pod CIDR is inside the ranges).
    pub const RANGES_ADMIT_PODS: u32 = 1 << 9;
    /// On a ClusterIP's (internal) entry: traffic to it that arrives from outside the node
    /// (the TC path) is masqueraded unless its source is in the pod CIDRs (`POD_CIDRS_ID`),
    /// upstream's local-traffic detector. `EXTERNAL_MASQ` on that entry: always (masqueradeAll).
    pub const MASQ_UNLESS_PODS: u32 = 1 << 10;
}

/// The `KPR_SRC_RANGES` id under which the agent writes the pod CIDRs (never a service id).
pub const POD_CIDRS_ID: u32 = u32::MAX;

/// Why the datapath dropped a packet: the index into the per-CPU `KPR_DROPS` array.
pub mod drop_reason {
    /// A Local traffic policy without local endpoints (upstream's DROP).
    pub const POLICY_DROP: u32 = 0;
    /// loadBalancerSourceRanges refused the source.
    pub const SOURCE_RANGE: u32 = 1;
    /// The conntrack map is full: a new flow could not be recorded.
    pub const CT_FULL: u32 = 2;
    /// No masquerade port of the range was free for this backend.
    pub const NAT_EXHAUSTED: u32 = 3;
    /// After translation the flow's tuple equals another live flow's.
    pub const TUPLE_COLLISION: u32 = 4;
    /// A packet rewrite (checksum or store helper) failed.
    pub const REWRITE: u32 = 5;
    /// A reject answer (RST or ICMP) could not be built.
    pub const REJECT: u32 = 6;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; 7] = [
        "policy_drop",
        "source_range",
        "conntrack_full",
        "nat_ports_exhausted",
        "tuple_collision",
        "rewrite_failed",
        "reject_failed",
    ];
}

/// Per-service datapath counters (`KPR_STATS`, per CPU): packets and bytes of translated
/// traffic in both directions (TC path), and new flows (TC and socket level).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// `KPR_MEMBERS` key: a backend that belongs to a service's current set (kept for services
/// with session affinity, whose remembered backend must still be a member).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// `KPR_FRAGS` key: an IP datagram's fragments, by the tuple they arrive with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The IPv4 identification or the IPv6 fragment header's identification.
    pub id: u32,
    pub proto: u8,
    /// 0 at ingress, 1 at egress.
    pub egress: u8,
    pub _pad: [u8; 2],
}

/// `KPR_FRAGS` value: what the first fragment's translation wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub addr: [u8; 16],
    /// 1: the source was rewritten, 0: the destination.
    pub src: u8,
    pub _pad: [u8; 3],
}

/// sessionAffinity ClientIP: which backend a client was sent to, and when last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityKey {
    /// The client: its IP (TC), or its network namespace cookie in the first 8 bytes with
    /// byte 15 = 1 (socket load balancing, where the source IP is not known yet).
    pub client: [u8; 16],
    pub service_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub generation: u32,
    /// bpf_ktime_get_ns() of the last use.
    pub last_used_ns: u64,
}

/// `KPR_SRC_RANGES` key data: service id (big endian, so prefixes match bit by bit) and a
/// 16-byte address; the prefix length counts 32 bits of service id plus the address prefix.
pub type SrcRangeData = [u8; 20];

/// A frontend: the address, port and protocol a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// What a frontend resolves to. `backend_count == 0` means "no endpoints": reject.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable id of this frontend; also its reverse-NAT id.
    pub id: u32,
    pub backend_count: u32,
    /// The revision of the backend slots in use; slots of other revisions are being written
    /// or retired.
    pub revision: u32,
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// Round-robin position, bumped by the datapath (reset when the agent rewrites the entry).
    pub rr: u32,
}

/// Key of one backend slot of a frontend's backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub revision: u32,
    pub slot: u32,
}

/// A backend: where traffic is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// Bumped when a backend id is reused, so flows pinned to an older incarnation are stale.
    pub generation: u32,
}

/// Reverse NAT entry: the frontend a translated flow must appear to talk to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNatValue {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Socket-level reverse NAT key: (socket cookie, backend address, backend port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Socket-level reverse NAT value: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatValue {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// What a conntrack entry translates (`CtKey::kind`). Destination rewrites happen at ingress
/// (before routing), source rewrites at egress (after routing), like netfilter's
/// PREROUTING DNAT / POSTROUTING SNAT split, so the kernel never sees a local address as the
/// source of a packet it receives.
pub mod ct_kind {
    /// client -> frontend, seen at ingress: rewrite the destination to the backend.
    pub const FORWARD: u8 = 1;
    /// client -> backend, seen at egress: rewrite the source to the node (masquerade).
    pub const SNAT: u8 = 2;
    /// backend -> node, seen at ingress: rewrite the destination back to the client.
    pub const REPLY_DNAT: u8 = 3;
    /// backend -> client, seen at egress: rewrite the source back to the frontend.
    pub const REPLY_SNAT: u8 = 4;
}

/// Flags in `CtValue::flags`.
pub mod ct_flags {
    /// The forward flow is masqueraded.
    pub const MASQ: u8 = 1 << 0;
    /// The flow counts towards its backend's live connections (least-connection services);
    /// cleared once it stopped counting.
    pub const COUNTED: u8 = 1 << 1;
    /// The kernel's own conntrack NATs this flow: it was established through kube-proxy's
    /// rules before kpr took over (the agent records such flows at its first sync). The TC
    /// programs only keep the entry alive and leave the packets to the kernel.
    pub const KERNEL_NAT: u8 = 1 << 2;
}

/// TCP/UDP state of one direction of a flow (`CtValue::state`); each state has its timeout.
pub mod ct_state {
    /// Only SYNs seen in this direction.
    pub const SYN: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    /// A FIN was seen in this direction.
    pub const FIN: u8 = 3;
    /// A RST was seen.
    pub const CLOSED: u8 = 4;
    /// UDP, forward direction.
    pub const UDP: u8 = 5;
    /// UDP, reply direction (a "stream": the backend answered).
    pub const UDP_REPLY: u8 = 6;
}

/// A conntrack key: the packet's tuple as seen where the entry is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub proto: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The key of an entry of `kind` for the tuple (`saddr`:`sport` -> `daddr`:`dport`).
    #[inline(always)]
    #[must_use]
    pub const fn new(
        saddr: [u8; 16],
        daddr: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        kind: u8,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            kind,
            _pad: [0; 2],
        }
    }
}

/// A conntrack value: the address and port to write, the backend the flow is pinned to, and
/// its lifecycle (state and expiry). Every entry of a flow carries the forward tuple's
/// essentials, so the agent's garbage collector can find all of a flow's entries from any one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub addr: [u8; 16],
    /// `bpf_ktime_get_ns()` after which this entry is dead (refreshed by its packets).
    pub expires_ns: u64,
    /// Host byte order.
    pub port: u16,
    pub flags: u8,
    /// `ct_state`.
    pub state: u8,
    pub backend_id: u32,
    /// The backend's generation when the flow was created: a mismatch means stale.
    pub generation: u32,
    pub service_id: u32,
    /// The masquerade port of a masqueraded flow (0 otherwise).
    pub nat_port: u16,
    pub _pad: [u8; 6],
}

/// Conntrack timeouts in seconds, per state (upstream's conntrack settings as defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn: u32,
    /// kube-proxy's `conntrack.tcpEstablishedTimeout` (24 h).
    pub tcp_established: u32,
    /// After a FIN in this direction (the kernel's FIN_WAIT/TIME_WAIT, 120 s). A half-closed
    /// connection lives on through its other direction, still established.
    pub tcp_fin: u32,
    /// After a RST.
    pub tcp_close: u32,
    /// kube-proxy's `conntrack.udpTimeout` (the kernel's 30 s).
    pub udp: u32,
    /// kube-proxy's `conntrack.udpStreamTimeout` (the kernel's 120 s): UDP that was answered.
    pub udp_stream: u32,
}

impl CtTimeouts {
    pub const DEFAULT: Self = Self {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_fin: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
    };
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The masquerade port range's default: above the kernel's default ephemeral range
/// (32768-60999), so no connection the node opens itself shares a tuple with a masqueraded
/// flow; configurable with `--masquerade-port-range`.
pub const NAT_PORT_MIN: u16 = 61_000;
pub const NAT_PORT_MAX: u16 = 65_535;

/// Node-wide settings the TC programs need (`KPR_CONFIG`, one entry at index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// The address masqueraded traffic leaves with (IPv4-mapped).
    pub snat_v4: [u8; 16],
    pub snat_v6: [u8; 16],
    /// The node's network namespace (`SO_NETNS_COOKIE` of the agent's): sockets there are
    /// the node's own clients.
    pub node_netns_cookie: u64,
    /// The masquerade port range, inclusive (0: the defaults).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Conntrack timeouts in seconds (0: the default of that state).
    pub tcp_syn_secs: u32,
    pub tcp_established_secs: u32,
    pub tcp_fin_secs: u32,
    pub tcp_close_secs: u32,
    pub udp_secs: u32,
    pub udp_stream_secs: u32,
    pub _pad: u32,
}

/// The flow hash Maglev services pick by: a 32-bit mix (murmur3 steps) of (source address,
/// destination address, source port << 16 | destination port, protocol), IPv4 addresses as
/// their native-endian u32 of the network-order bytes. Shared by the TC program and the agent,
/// so both compute the same value, on every node.
#[inline(always)]
#[must_use]
pub fn flow_hash(a: u32, b: u32, c: u32, d: u32) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let words = [a, b, c, d];
    let mut i = 0;
    while i < 4 {
        let mut k = words[i].wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `::ffff:a.b.c.d` for an IPv4 address given as its four octets.
#[inline(always)]
#[must_use]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// True when a 16-byte address is IPv4-mapped.
#[inline(always)]
#[must_use]
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

#[cfg(feature = "user")]
mod user {
    use super::{
        AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, FragKey, FragValue,
        MemberKey, NodeConfig, RevNatValue, ServiceKey, ServiceStats, ServiceValue, SockRevNatKey,
        SockRevNatValue,
    };

    /// Implements the Pod traits for a map type, after proving at compile time that its
    /// layout has no implicit padding: every listed field starts where the previous one ended
    /// and nothing follows the last. Removing a `_pad` field (or reordering fields so the
    /// compiler pads) fails the build, because every byte of a Pod type must be a field.
    macro_rules! pod {
        ($($t:ident { $($f:ident: $ft:ty),* $(,)? })*) => {$(
            const _: () = {
                let mut end = 0usize;
                $(
                    assert!(
                        core::mem::offset_of!($t, $f) == end,
                        concat!(stringify!($t), ".", stringify!($f), ": implicit padding before this field")
                    );
                    end += core::mem::size_of::<$ft>();
                )*
                assert!(
                    core::mem::size_of::<$t>() == end,
                    concat!(stringify!($t), ": trailing padding or an unlisted field")
                );
            };
            // SAFETY: repr(C), every field an integer or integer array, and the assertion
            // above proves there is no padding byte.
            unsafe impl aya::Pod for $t {}
            unsafe impl bytemuck::Zeroable for $t {}
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKey { addr: [u8; 16], port: u16, proto: u8, scope: u8 }
        ServiceValue {
            id: u32,
            backend_count: u32,
            revision: u32,
            flags: u32,
            affinity_timeout_secs: u32,
            rr: u32,
        }
        BackendSlotKey { service_id: u32, revision: u32, slot: u32 }
        Backend { addr: [u8; 16], port: u16, _pad: u16, generation: u32 }
        RevNatValue { addr: [u8; 16], port: u16, _pad: u16 }
        SockRevNatKey { cookie: u64, addr: [u8; 16], port: u16, _pad: [u8; 6] }
        SockRevNatValue { addr: [u8; 16], port: u16, _pad: u16, service_id: u32 }
        CtKey {
            saddr: [u8; 16],
            daddr: [u8; 16],
            sport: u16,
            dport: u16,
            proto: u8,
            kind: u8,
            _pad: [u8; 2],
        }
        CtValue {
            addr: [u8; 16],
            expires_ns: u64,
            port: u16,
            flags: u8,
            state: u8,
            backend_id: u32,
            generation: u32,
            service_id: u32,
            nat_port: u16,
            _pad: [u8; 6],
        }
        NodeConfig {
            snat_v4: [u8; 16],
            snat_v6: [u8; 16],
            node_netns_cookie: u64,
            nat_port_min: u16,
            nat_port_max: u16,
            tcp_syn_secs: u32,
            tcp_established_secs: u32,
            tcp_fin_secs: u32,
            tcp_close_secs: u32,
            udp_secs: u32,
            udp_stream_secs: u32,
            _pad: u32,
        }
        ServiceStats { packets: u64, bytes: u64, flows: u64 }
        MemberKey { service_id: u32, backend_id: u32 }
        FragKey { saddr: [u8; 16], daddr: [u8; 16], id: u32, proto: u8, egress: u8, _pad: [u8; 2] }
        FragValue { addr: [u8; 16], src: u8, _pad: [u8; 3] }
        AffinityKey { client: [u8; 16], service_id: u32, _pad: u32 }
        AffinityValue { backend_id: u32, generation: u32, last_used_ns: u64 }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// The sizes the eBPF side's maps were created with (padding itself is ruled out at
    /// compile time by `pod!`).
    #[test]
    fn map_types_have_their_abi_sizes() {
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceValue>(), 6 * 4);
        assert_eq!(size_of::<BackendSlotKey>(), 3 * 4);
        assert_eq!(size_of::<Backend>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<RevNatValue>(), 16 + 2 + 2);
        assert_eq!(size_of::<SockRevNatKey>(), 8 + 16 + 2 + 6);
        assert_eq!(size_of::<SockRevNatValue>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<CtKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtValue>(), 16 + 8 + 2 + 1 + 1 + 4 + 4 + 4 + 2 + 6);
        assert_eq!(size_of::<NodeConfig>(), 32 + 8 + 4 + 6 * 4 + 4);
        assert_eq!(size_of::<ServiceStats>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<AffinityKey>(), 16 + 4 + 4);
        assert_eq!(size_of::<AffinityValue>(), 4 + 4 + 8);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let a = v4_mapped([10, 96, 0, 10]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[10, 96, 0, 10]);
        assert!(!is_v4_mapped(&[0; 16]));
    }
}
