//! TC programs for traffic that does not start on this node: NodePort, ExternalIPs and
//! LoadBalancer IPs reached from outside.
//!
//! `kpr_tc_ingress` rewrites destinations (before routing): a new flow to an EXTERNAL-scope
//! frontend picks a backend, records conntrack entries and is DNATed; established flows follow
//! their entry; replies to masqueraded flows get the client back as destination.
//! `kpr_tc_egress` rewrites sources (after routing): masquerade towards the backend, and the
//! frontend address on replies towards the client. Splitting it this way keeps the kernel's
//! own routing and forwarding in charge, and never shows the stack a packet whose source is a
//! local address. Parsing uses direct packet access; writes use the checksum-aware helpers.
use core::mem::size_of;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::PerCpuArray,
    helpers::generated::{bpf_csum_diff, bpf_get_prandom_u32, bpf_redirect, bpf_skb_store_bytes},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::{
    CtKey, CtValue, NodeConfig, ServiceKey, ct_flags, ct_kind, proto, scope, service_flags,
    v4_mapped,
};

use crate::maps::{KPR_BACKENDS, KPR_CONFIG, KPR_CT, KPR_SERVICES, KPR_SRC_RANGES};
use crate::select::{self, flow_hash, select_backend};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Per-CPU scratch for the parsed packet (keeps it off the 512-byte stack).
#[btf_map]
static KPR_TC_SCRATCH: PerCpuArray<Packet, 1> = PerCpuArray::new();

const OK: i32 = TC_ACT_OK as i32;
/// Internal verdict of `choose`: answer with a TCP RST (done by the caller, so the RST
/// builder's stack frame never stacks on top of `choose`'s).
const REJECT: i32 = -1;
const SHOT: i32 = TC_ACT_SHOT as i32;

/// The fields of a TCP/UDP packet the programs need.
#[derive(Default)]
struct Packet {
    // NB: read `l4_off` through `l4()`: the packet lives in a map slot, and the verifier only
    // accepts packet offsets it can bound.
    l4_off: usize,
    proto: u8,
    /// IPv6 (else IPv4).
    v6: bool,
    /// 16-byte addresses (IPv4-mapped for IPv4), as keys use them.
    src16: [u8; 16],
    dst16: [u8; 16],
    /// IPv4 addresses (zero for IPv6).
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    /// UDP with checksum 0 (none): leave the checksum alone.
    udp_no_csum: bool,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: bounds checked against data_end just above.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// Parses into this CPU's scratch slot: `None` without a slot, `Some(None)` when the packet is
/// not TCP/UDP over IP (maybe an ICMP error), else the packet.
#[inline(always)]
fn scratch_parse(ctx: &TcContext) -> Option<Option<&'static Packet>> {
    let p = KPR_TC_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; TC programs do not nest on one CPU.
    let p = unsafe { &mut *p };
    Some(parse(ctx, p).then_some(&*p))
}

/// Parses the packet into `out` (a per-CPU scratch slot, so no stack holds it), field by
/// field: no temporary packet on the stack either.
#[inline(always)]
fn parse(ctx: &TcContext, out: &mut Packet) -> bool {
    parse_fields(ctx, out).is_some()
}

#[inline(always)]
fn parse_fields(ctx: &TcContext, out: &mut Packet) -> Option<()> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype == ETH_P_IPV6 {
        let version = read::<u8>(ctx, ETH_HLEN)?;
        let proto = read::<u8>(ctx, ETH_HLEN + 6)?;
        if version >> 4 != 6 || (proto != proto::TCP && proto != proto::UDP) {
            return None;
        }
        out.v6 = true;
        out.proto = proto;
        out.l4_off = ETH_HLEN + 40;
        out.src16 = read::<[u8; 16]>(ctx, IP6_SRC_OFF)?;
        out.dst16 = read::<[u8; 16]>(ctx, IP6_DST_OFF)?;
        out.saddr = [0; 4];
        out.daddr = [0; 4];
        out.udp_no_csum = false;
    } else {
        if ethertype != ETH_P_IP {
            return None;
        }
        let vhl = read::<u8>(ctx, ETH_HLEN)?;
        let ihl = usize::from(vhl & 0x0f);
        if vhl >> 4 != 4 || ihl < 5 {
            return None;
        }
        // Non-first fragments carry no ports.
        if u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & 0x1fff != 0 {
            return None;
        }
        let proto = read::<u8>(ctx, ETH_HLEN + 9)?;
        if proto != proto::TCP && proto != proto::UDP {
            return None;
        }
        let l4_off = ETH_HLEN + ihl * 4;
        out.v6 = false;
        out.proto = proto;
        out.l4_off = l4_off;
        out.saddr = read::<[u8; 4]>(ctx, IP_SRC_OFF)?;
        out.daddr = read::<[u8; 4]>(ctx, IP_DST_OFF)?;
        out.src16 = v4_mapped(out.saddr);
        out.dst16 = v4_mapped(out.daddr);
        out.udp_no_csum = proto == proto::UDP && read::<u16>(ctx, l4_off + 6)? == 0;
    }
    let ports = read::<[u8; 4]>(ctx, out.l4())?;
    out.sport = u16::from_be_bytes([ports[0], ports[1]]);
    out.dport = u16::from_be_bytes([ports[2], ports[3]]);
    Some(())
}

impl Packet {
    /// The L4 offset, bounded for the verifier (IPv4 with options: at most 74; IPv6: 54).
    #[inline(always)]
    fn l4(&self) -> usize {
        self.l4_off & 0x7f
    }
}

#[inline(always)]
fn l4_csum_off(p: &Packet) -> usize {
    if p.proto == proto::TCP {
        p.l4() + 16
    } else {
        p.l4() + 6
    }
}

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    if p.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites the source (`src`) or destination address and port to `addr`:`port`, fixing the
/// IPv4 and L4 checksums. Out of line (shared by every path, small stack of its own).
#[inline(never)]
fn rewrite(ctx: &TcContext, p: &Packet, src: bool, addr: &[u8; 16], port: u16) -> i32 {
    if p.v6 {
        return rewrite_v6(ctx, p, src, addr, port);
    }
    let (ip_off, old_ip, port_off, old_port) = if src {
        (IP_SRC_OFF, p.saddr, p.l4(), p.sport)
    } else {
        (IP_DST_OFF, p.daddr, p.l4() + 2, p.dport)
    };
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let from = u64::from(u32::from_ne_bytes(old_ip));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if !p.udp_no_csum {
        let csum = l4_csum_off(p);
        if ctx
            .l4_csum_replace(
                csum,
                from,
                to,
                u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p) | 4,
            )
            .is_err()
            || ctx
                .l4_csum_replace(
                    csum,
                    u64::from(old_port.to_be()),
                    u64::from(port.to_be()),
                    l4_flags(p) | 2,
                )
                .is_err()
        {
            return SHOT;
        }
    }
    if ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).is_err()
        || ctx.store(ip_off, &new_ip, 0).is_err()
        || ctx.store(port_off, &port.to_be(), 0).is_err()
    {
        return SHOT;
    }
    OK
}

/// The checksum difference between two 16-byte addresses (bpf_csum_diff), negative on error.
#[inline(always)]
fn csum_diff16(old: &[u8; 16], new: &[u8; 16]) -> i64 {
    let mut from = [0u32; 4];
    let mut to = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        from[i] = u32::from_ne_bytes([old[i * 4], old[i * 4 + 1], old[i * 4 + 2], old[i * 4 + 3]]);
        to[i] = u32::from_ne_bytes([new[i * 4], new[i * 4 + 1], new[i * 4 + 2], new[i * 4 + 3]]);
        i += 1;
    }
    // SAFETY: both buffers are 16 bytes on our stack, as the helper requires.
    unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) }
}

/// The IPv6 form of `rewrite`: no IP checksum; the L4 checksum moves by the difference of
/// the 16-byte addresses (bpf_csum_diff) and of the ports.
#[inline(never)]
fn rewrite_v6(ctx: &TcContext, p: &Packet, src: bool, addr: &[u8; 16], port: u16) -> i32 {
    let (ip_off, old, port_off, old_port) = if src {
        (IP6_SRC_OFF, &p.src16, p.l4(), p.sport)
    } else {
        (IP6_DST_OFF, &p.dst16, p.l4() + 2, p.dport)
    };
    let diff = csum_diff16(old, addr);
    if diff < 0 {
        return SHOT;
    }
    let csum = l4_csum_off(p);
    if ctx
        .l4_csum_replace(
            csum,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p),
        )
        .is_err()
        || ctx
            .l4_csum_replace(
                csum,
                u64::from(old_port.to_be()),
                u64::from(port.to_be()),
                l4_flags(p) | 2,
            )
            .is_err()
        || ctx.store(ip_off, addr, 0).is_err()
        || ctx.store(port_off, &port.to_be(), 0).is_err()
    {
        return SHOT;
    }
    OK
}

#[inline(always)]
fn rewrite_dst(ctx: &TcContext, p: &Packet, addr: &[u8; 16], port: u16) -> i32 {
    rewrite(ctx, p, false, addr, port)
}

#[inline(always)]
fn rewrite_src(ctx: &TcContext, p: &Packet, addr: &[u8; 16], port: u16) -> i32 {
    rewrite(ctx, p, true, addr, port)
}

#[inline(always)]
fn ct_key(saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16, proto: u8, kind: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        kind,
        _pad: [0; 2],
    }
}

/// A conntrack entry is stale when its backend is gone or was replaced (generation).
#[inline(always)]
fn backend_current(ct: &CtValue) -> bool {
    match KPR_BACKENDS.get_ptr(&ct.backend_id) {
        // SAFETY: as in `ct_get`.
        Some(b) => unsafe { (*b).generation == ct.generation },
        None => false,
    }
}

#[classifier]
fn kpr_tc_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

#[classifier]
fn kpr_tc_egress(ctx: TcContext) -> i32 {
    egress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    let p = match scratch_parse(ctx) {
        Some(Some(p)) => p,
        Some(None) => return icmp_errors(ctx, true),
        None => return OK,
    };
    // An established flow to a frontend (its backend still current), or a reply to a
    // masqueraded flow. Map values are used in place, not copied to the stack.
    let mut key = ct_key(
        p.src16,
        p.dst16,
        p.sport,
        p.dport,
        p.proto,
        ct_kind::FORWARD,
    );
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        let ct = unsafe { &*ct };
        if backend_current(ct) {
            return rewrite_dst(ctx, p, &ct.addr, ct.port);
        }
    }
    key.kind = ct_kind::REPLY_DNAT;
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        return rewrite_dst(ctx, p, &ct.addr, ct.port);
    }
    let mut choice = Choice::default();
    match choose(p, &mut choice) {
        CHOSEN => create_flow(ctx, p, &choice),
        REJECT if p.v6 => reject_v6(ctx, p),
        REJECT if p.proto == proto::TCP => reject_tcp(ctx, p),
        REJECT => reject_udp(ctx, p),
        verdict => verdict,
    }
}

/// loadBalancerSourceRanges: is `client` inside one of the service's ranges?
#[inline(never)]
fn source_allowed(service_id: u32, client: &[u8; 16]) -> bool {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&service_id.to_be_bytes());
    data[4..].copy_from_slice(client);
    KPR_SRC_RANGES.get(&Key::new(160, data)).is_some()
}

/// The masquerade address of the packet's family, when the agent configured one.
#[inline(always)]
fn snat_address(cfg: &NodeConfig, v6: bool) -> Option<[u8; 16]> {
    if v6 {
        (cfg.snat_v6 != [0; 16]).then_some(cfg.snat_v6)
    } else {
        (cfg.snat_v4[10] == 0xff).then_some(cfg.snat_v4)
    }
}

/// An address as one hash word: the IPv4 address itself (what the agent's Maglev prediction
/// uses), or the XOR of an IPv6 address's four words.
#[inline(always)]
fn fold_addr(a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if a[10] == 0xff && a[..10] == [0; 10] {
        w(12)
    } else {
        w(0) ^ w(4) ^ w(8) ^ w(12)
    }
}

/// What `choose` picked for a new flow.
#[derive(Default)]
struct Choice {
    backend_id: u32,
    service_id: u32,
    service_flags: u32,
}

/// Internal verdict of `choose`: `Choice` is filled in, go on with `create_flow`.
const CHOSEN: i32 = -2;

// Out of line, like `create_flow`: the two run one after the other from `ingress`, so their
// stack frames never add up (the verifier allows 512 bytes along any call chain).
#[inline(never)]
fn choose(p: &Packet, out: &mut Choice) -> i32 {
    let skey = ServiceKey {
        addr: p.dst16,
        port: p.dport,
        proto: p.proto,
        scope: scope::EXTERNAL,
    };
    let Some(svc) = KPR_SERVICES.get_ptr(&skey) else {
        return OK;
    };
    // SAFETY: a value pointer from a successful lookup, valid for this program run.
    let svc = unsafe { &*svc };
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_allowed(svc.id, &p.src16) {
        return SHOT;
    }
    if svc.backend_count == 0 {
        if svc.flags & service_flags::DROP != 0 {
            return SHOT;
        }
        return REJECT;
    }
    let hash = flow_hash(
        fold_addr(&p.src16),
        fold_addr(&p.dst16),
        (u32::from(p.sport) << 16) | u32::from(p.dport),
        u32::from(p.proto),
    );
    let backend_id = select_backend(svc, &p.src16, hash);
    if backend_id == select::NONE {
        return OK;
    }
    out.backend_id = backend_id;
    out.service_id = svc.id;
    out.service_flags = svc.flags;
    CHOSEN
}

/// Records the conntrack entries of a new flow and DNATs its first packet. One key and one
/// value are reused for every entry to stay well inside the stack limit.
#[inline(never)]
fn create_flow(ctx: &TcContext, p: &Packet, choice: &Choice) -> i32 {
    let backend_id = choice.backend_id;
    let (svc_id, svc_flags) = (choice.service_id, choice.service_flags);
    let client = p.src16;
    let Some(backend) = KPR_BACKENDS.get_ptr(&backend_id) else {
        return OK;
    };
    let mut key = CtKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        proto: p.proto,
        kind: 0,
        _pad: [0; 2],
    };
    let mut val = CtValue {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        addr: unsafe { (*backend).addr },
        port: unsafe { (*backend).port },
        flags: 0,
        _pad: 0,
        backend_id,
        generation: unsafe { (*backend).generation },
        service_id: svc_id,
    };
    let (backend_addr, backend_port) = (val.addr, val.port);
    // Masquerade (eTP=Cluster): to the node address, keeping the client's port unless another
    // flow to this backend already owns it.
    let mut snat_port = p.sport;
    let mut masq = false;
    if svc_flags & service_flags::EXTERNAL_MASQ != 0
        && let Some(cfg) = KPR_CONFIG.get(0)
        && let Some(snat) = snat_address(cfg, p.v6)
    {
        masq = true;
        key.saddr = backend_addr;
        key.sport = backend_port;
        key.daddr = snat;
        key.kind = ct_kind::REPLY_DNAT;
        let mut attempt = 0;
        while attempt < 4 {
            key.dport = snat_port;
            match KPR_CT.get_ptr(&key) {
                // SAFETY: as above.
                Some(other) if unsafe { (*other).addr != client || (*other).port != p.sport } => {
                    // SAFETY: plain helper call.
                    snat_port = 32768 + (unsafe { bpf_get_prandom_u32() } % 28_000) as u16;
                }
                _ => break,
            }
            attempt += 1;
        }
    }
    // client -> frontend (ingress): to the backend.
    key.saddr = client;
    key.daddr = p.dst16;
    key.sport = p.sport;
    key.dport = p.dport;
    key.kind = ct_kind::FORWARD;
    if masq {
        val.flags = ct_flags::MASQ;
    }
    if KPR_CT.insert(&key, &val, 0).is_err() {
        return SHOT;
    }
    if masq {
        let Some(snat) = KPR_CONFIG.get(0).and_then(|cfg| snat_address(cfg, p.v6)) else {
            return SHOT;
        };
        // client -> backend (egress): from the node.
        key.daddr = backend_addr;
        key.dport = backend_port;
        key.kind = ct_kind::SNAT;
        val.addr = snat;
        val.port = snat_port;
        if KPR_CT.insert(&key, &val, 0).is_err() {
            return SHOT;
        }
        // backend -> node (ingress): back to the client.
        key.saddr = backend_addr;
        key.sport = backend_port;
        key.daddr = snat;
        key.dport = snat_port;
        key.kind = ct_kind::REPLY_DNAT;
        val.addr = client;
        val.port = p.sport;
        if KPR_CT.insert(&key, &val, 0).is_err() {
            return SHOT;
        }
    }
    // backend -> client (egress): from the frontend.
    key.saddr = backend_addr;
    key.sport = backend_port;
    key.daddr = client;
    key.dport = p.sport;
    key.kind = ct_kind::REPLY_SNAT;
    val.addr = p.dst16;
    val.port = p.dport;
    if KPR_CT.insert(&key, &val, 0).is_err() {
        return SHOT;
    }
    rewrite_dst(ctx, p, &backend_addr, backend_port)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    let p = match scratch_parse(ctx) {
        Some(Some(p)) => p,
        Some(None) => return icmp_errors(ctx, false),
        None => return OK,
    };
    let mut key = ct_key(p.src16, p.dst16, p.sport, p.dport, p.proto, ct_kind::SNAT);
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: a value pointer from a successful lookup, valid for this program run.
        let ct = unsafe { &*ct };
        return rewrite_src(ctx, p, &ct.addr, ct.port);
    }
    key.kind = ct_kind::REPLY_SNAT;
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        return rewrite_src(ctx, p, &ct.addr, ct.port);
    }
    OK
}

const IPPROTO_ICMP: u8 = 1;
/// Offsets in an ICMP error about a TCP/UDP packet (outer and quoted IP headers without
/// options): the ICMP header, the quoted IP header, the quoted ports.
const ICMP_OFF: usize = ETH_HLEN + 20;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
const INNER_IP: usize = ICMP_OFF + 8;
const INNER_L4: usize = INNER_IP + 20;

/// Rewrites, in an ICMP error, the quoted packet's source (`src`) or destination address and
/// port, keeping the quoted IP header checksum and the ICMP checksum right.
#[inline(never)]
fn icmp_rewrite_inner(ctx: &TcContext, src: bool, addr: &[u8; 16], port: u16) -> i32 {
    let (ip_off, port_off) = if src {
        (INNER_IP + 12, INNER_L4)
    } else {
        (INNER_IP + 16, INNER_L4 + 2)
    };
    let (Some(old_ip), Some(old_port), Some(old_csum)) = (
        read::<[u8; 4]>(ctx, ip_off),
        read::<u16>(ctx, port_off),
        read::<u16>(ctx, INNER_IP + 10),
    ) else {
        return SHOT;
    };
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let from = u64::from(u32::from_ne_bytes(old_ip));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if ctx.store(ip_off, &new_ip, 0).is_err()
        || ctx.l3_csum_replace(INNER_IP + 10, from, to, 4).is_err()
        || ctx.l4_csum_replace(ICMP_CSUM_OFF, from, to, 4).is_err()
    {
        return SHOT;
    }
    let Some(new_csum) = read::<u16>(ctx, INNER_IP + 10) else {
        return SHOT;
    };
    let new_port = port.to_be();
    if ctx
        .l4_csum_replace(ICMP_CSUM_OFF, u64::from(old_csum), u64::from(new_csum), 2)
        .is_err()
        || ctx.store(port_off, &new_port, 0).is_err()
        || ctx
            .l4_csum_replace(ICMP_CSUM_OFF, u64::from(old_port), u64::from(new_port), 2)
            .is_err()
    {
        return SHOT;
    }
    OK
}

/// Rewrites the outer source (`src`) or destination address of an ICMP error.
#[inline(always)]
fn icmp_rewrite_outer(ctx: &TcContext, src: bool, old: [u8; 4], addr: &[u8; 16]) -> i32 {
    let new_ip = [addr[12], addr[13], addr[14], addr[15]];
    let off = if src { IP_SRC_OFF } else { IP_DST_OFF };
    let from = u64::from(u32::from_ne_bytes(old));
    let to = u64::from(u32::from_ne_bytes(new_ip));
    if ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).is_err() || ctx.store(off, &new_ip, 0).is_err()
    {
        return SHOT;
    }
    OK
}

/// ICMP errors (destination unreachable, time exceeded, parameter problem) about a translated
/// flow are translated like the flow itself, so path-MTU discovery and unreachables reach the
/// socket they concern. At ingress: an error about our reply to a client goes to the backend
/// (outer destination, quoted source, and the quoted masquerade address); an error from the
/// backend's side about a masqueraded packet goes back to the client. At egress: an error from a
/// backend towards a client shows the frontend instead of the backend.
#[inline(never)]
fn icmp_error(ctx: &TcContext, ingress: bool) -> i32 {
    // Whole headers at once: fewer bounds checks, and nothing the verifier mistakes for
    // pointer arithmetic.
    let Some(outer) = read::<[u8; 20]>(ctx, ETH_HLEN) else {
        return OK;
    };
    let Some(ethertype) = read::<[u8; 2]>(ctx, 12) else {
        return OK;
    };
    if ethertype != [0x08, 0x00] || outer[0] != 0x45 || outer[9] != IPPROTO_ICMP {
        return OK;
    }
    let Some(icmp) = read::<[u8; 8]>(ctx, ICMP_OFF) else {
        return OK;
    };
    if !matches!(icmp[0], 3 | 11 | 12) {
        return OK;
    }
    let Some(inner) = read::<[u8; 20]>(ctx, INNER_IP) else {
        return OK;
    };
    let Some(ports) = read::<[u8; 4]>(ctx, INNER_L4) else {
        return OK;
    };
    let inner_proto = inner[9];
    if inner[0] != 0x45 || (inner_proto != proto::TCP && inner_proto != proto::UDP) {
        return OK;
    }
    let outer_src = [outer[12], outer[13], outer[14], outer[15]];
    let outer_dst = [outer[16], outer[17], outer[18], outer[19]];
    let isrc = [inner[12], inner[13], inner[14], inner[15]];
    let idst = [inner[16], inner[17], inner[18], inner[19]];
    let isport = u16::from_be_bytes([ports[0], ports[1]]);
    let idport = u16::from_be_bytes([ports[2], ports[3]]);
    let (isrc16, idst16) = (v4_mapped(isrc), v4_mapped(idst));
    if ingress {
        // About our reply (frontend -> client): the flow's forward entry names the backend.
        let mut key = ct_key(
            idst16,
            isrc16,
            idport,
            isport,
            inner_proto,
            ct_kind::FORWARD,
        );
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: a value pointer from a successful lookup, valid for this program run.
            let ct = unsafe { &*ct };
            let (backend, bport, masq) = (ct.addr, ct.port, ct.flags & ct_flags::MASQ != 0);
            if masq {
                key = ct_key(idst16, backend, idport, bport, inner_proto, ct_kind::SNAT);
                if let Some(snat) = KPR_CT.get_ptr(&key) {
                    // SAFETY: as above.
                    let snat = unsafe { &*snat };
                    let (s_addr, s_port) = (snat.addr, snat.port);
                    if icmp_rewrite_inner(ctx, false, &s_addr, s_port) != OK {
                        return SHOT;
                    }
                }
            }
            if icmp_rewrite_inner(ctx, true, &backend, bport) != OK {
                return SHOT;
            }
            return icmp_rewrite_outer(ctx, false, outer_dst, &backend);
        }
        // From the backend's side, about a masqueraded packet (node -> backend): to the client.
        key = ct_key(
            idst16,
            isrc16,
            idport,
            isport,
            inner_proto,
            ct_kind::REPLY_DNAT,
        );
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: as above.
            let ct = unsafe { &*ct };
            let (client, cport) = (ct.addr, ct.port);
            if icmp_rewrite_inner(ctx, true, &client, cport) != OK {
                return SHOT;
            }
            return icmp_rewrite_outer(ctx, false, outer_dst, &client);
        }
        return OK;
    }
    // Egress, towards a client, about its packet to a backend: show the frontend.
    let key = ct_key(
        idst16,
        isrc16,
        idport,
        isport,
        inner_proto,
        ct_kind::REPLY_SNAT,
    );
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        let (frontend, fport) = (ct.addr, ct.port);
        if icmp_rewrite_inner(ctx, false, &frontend, fport) != OK {
            return SHOT;
        }
        if outer_src == idst {
            return icmp_rewrite_outer(ctx, true, outer_src, &frontend);
        }
    }
    OK
}

/// ICMP or ICMPv6: each translator is called from the program itself, so their frames never
/// stack on each other.
#[inline(always)]
fn icmp_errors(ctx: &TcContext, ingress: bool) -> i32 {
    match read::<[u8; 2]>(ctx, 12) {
        Some([0x86, 0xdd]) => icmp6_error(ctx, ingress),
        Some([0x08, 0x00]) => icmp_error(ctx, ingress),
        _ => OK,
    }
}

/// Offsets in an ICMPv6 error about a TCP/UDP packet (no extension headers).
const ICMP6_OFF: usize = ETH_HLEN + 40;
const ICMP6_CSUM_OFF: usize = ICMP6_OFF + 2;
const INNER6_IP: usize = ICMP6_OFF + 8;
const INNER6_L4: usize = INNER6_IP + 40;

/// Writes a 16-byte address at `off` of an ICMPv6 error and moves the ICMPv6 checksum by the
/// difference (`pseudo`: the address is in the outer header, which the checksum covers through
/// its pseudo header).
#[inline(never)]
fn icmp6_set_addr(
    ctx: &TcContext,
    off: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    pseudo: bool,
) -> bool {
    let diff = csum_diff16(old, new);
    let flags = if pseudo {
        u64::from(BPF_F_PSEUDO_HDR)
    } else {
        0
    };
    diff >= 0
        && ctx
            .l4_csum_replace(ICMP6_CSUM_OFF, 0, diff as u64, flags)
            .is_ok()
        && ctx.store(off, new, 0).is_ok()
}

/// Writes a port at `off` inside an ICMPv6 error's quoted packet.
#[inline(always)]
fn icmp6_set_port(ctx: &TcContext, off: usize, old: u16, new: u16) -> bool {
    ctx.l4_csum_replace(
        ICMP6_CSUM_OFF,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        2,
    )
    .is_ok()
        && ctx.store(off, &new.to_be(), 0).is_ok()
}

/// The ICMPv6 form of `icmp_error` (destination unreachable, packet too big, time exceeded,
/// parameter problem), with the same three translations.
#[inline(never)]
fn icmp6_error(ctx: &TcContext, ingress: bool) -> i32 {
    // One read per header block, each checked on its own (see `icmp_error`).
    let Some(outer) = read::<[u8; 8]>(ctx, ETH_HLEN) else {
        return OK;
    };
    let Some(icmp) = read::<[u8; 8]>(ctx, ICMP6_OFF) else {
        return OK;
    };
    let Some(inner) = read::<[u8; 8]>(ctx, INNER6_IP) else {
        return OK;
    };
    let inner_next = inner[6];
    if outer[6] != 58
        || !matches!(icmp[0], 1..=4)
        || inner[0] >> 4 != 6
        || (inner_next != proto::TCP && inner_next != proto::UDP)
    {
        return OK;
    }
    let Some(ports) = read::<[u8; 4]>(ctx, INNER6_L4) else {
        return OK;
    };
    let Some(outer_src) = read::<[u8; 16]>(ctx, ETH_HLEN + 8) else {
        return OK;
    };
    let Some(outer_dst) = read::<[u8; 16]>(ctx, ETH_HLEN + 24) else {
        return OK;
    };
    let Some(isrc) = read::<[u8; 16]>(ctx, INNER6_IP + 8) else {
        return OK;
    };
    let Some(idst) = read::<[u8; 16]>(ctx, INNER6_IP + 24) else {
        return OK;
    };
    let isport = u16::from_be_bytes([ports[0], ports[1]]);
    let idport = u16::from_be_bytes([ports[2], ports[3]]);
    if ingress {
        let mut key = ct_key(idst, isrc, idport, isport, inner_next, ct_kind::FORWARD);
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: a value pointer from a successful lookup, valid for this program run.
            let ct = unsafe { &*ct };
            let (backend, bport, masq) = (ct.addr, ct.port, ct.flags & ct_flags::MASQ != 0);
            if masq {
                key = ct_key(idst, backend, idport, bport, inner_next, ct_kind::SNAT);
                if let Some(snat) = KPR_CT.get_ptr(&key) {
                    // SAFETY: as above.
                    let snat = unsafe { &*snat };
                    let (s_addr, s_port) = (snat.addr, snat.port);
                    if !icmp6_set_addr(ctx, INNER6_IP + 24, &idst, &s_addr, false)
                        || !icmp6_set_port(ctx, INNER6_L4 + 2, idport, s_port)
                    {
                        return SHOT;
                    }
                }
            }
            if !icmp6_set_addr(ctx, INNER6_IP + 8, &isrc, &backend, false)
                || !icmp6_set_port(ctx, INNER6_L4, isport, bport)
                || !icmp6_set_addr(ctx, ETH_HLEN + 24, &outer_dst, &backend, true)
            {
                return SHOT;
            }
            return OK;
        }
        key = ct_key(idst, isrc, idport, isport, inner_next, ct_kind::REPLY_DNAT);
        if let Some(ct) = KPR_CT.get_ptr(&key) {
            // SAFETY: as above.
            let ct = unsafe { &*ct };
            let (client, cport) = (ct.addr, ct.port);
            if !icmp6_set_addr(ctx, INNER6_IP + 8, &isrc, &client, false)
                || !icmp6_set_port(ctx, INNER6_L4, isport, cport)
                || !icmp6_set_addr(ctx, ETH_HLEN + 24, &outer_dst, &client, true)
            {
                return SHOT;
            }
        }
        return OK;
    }
    let key = ct_key(idst, isrc, idport, isport, inner_next, ct_kind::REPLY_SNAT);
    if let Some(ct) = KPR_CT.get_ptr(&key) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        let (frontend, fport) = (ct.addr, ct.port);
        if !icmp6_set_addr(ctx, INNER6_IP + 24, &idst, &frontend, false)
            || !icmp6_set_port(ctx, INNER6_L4 + 2, idport, fport)
        {
            return SHOT;
        }
        if outer_src == idst && !icmp6_set_addr(ctx, ETH_HLEN + 8, &outer_src, &frontend, true) {
            return SHOT;
        }
    }
    OK
}

/// One's-complement sum of big-endian 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sums 16-bit big-endian words of `b` into `sum` (even length).
#[inline(always)]
fn sum_words(b: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

/// Sends the (rewritten) packet back out of the interface it arrived on.
#[inline(always)]
fn back_out(ctx: &TcContext) -> i32 {
    // SAFETY: reading ifindex from our own context; bpf_redirect is a plain helper call.
    unsafe {
        let ifindex = (*(ctx.as_ptr() as *const __sk_buff)).ifindex;
        bpf_redirect(ifindex, 0) as i32
    }
}

/// Resizes the packet to `len` and writes `out[..len]` over it.
#[inline(always)]
fn replace_packet(ctx: &TcContext, out: &[u8], len: usize) -> bool {
    if ctx.change_tail(len as u32, 0).is_err() || out.len() < len {
        return false;
    }
    // SAFETY: `out` holds at least `len` bytes; the skb was resized to `len` just above.
    unsafe { bpf_skb_store_bytes(ctx.as_ptr().cast(), 0, out.as_ptr().cast(), len as u32, 0) == 0 }
}

/// Ethernet (MACs swapped) and an IPv4 header from the packet's destination back to its
/// source, with its checksum.
#[inline(always)]
fn ipv4_reply_headers(out: &mut [u8], eth: &[u8; 12], p: &Packet, proto: u8, ip_len: u16) {
    out[..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[..6]);
    out[12] = 0x08;
    let ip = ETH_HLEN;
    out[ip] = 0x45;
    out[ip + 2..ip + 4].copy_from_slice(&ip_len.to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = proto;
    out[ip + 12..ip + 16].copy_from_slice(&p.daddr);
    out[ip + 16..ip + 20].copy_from_slice(&p.saddr);
    let csum = fold(sum_words(&out[ip..ip + 20], 0));
    out[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
}

/// A RST answering the segment whose first 14 TCP bytes are `hdr` and which carried
/// `payload` bytes (RFC 9293: SEQ=SEG.ACK if it had ACK, else SEQ=0, ACK=SEG.SEQ+SEG.LEN),
/// written at `t` without its checksum.
#[inline(always)]
fn write_rst(out: &mut [u8], t: usize, p: &Packet, hdr: &[u8; 14], payload: u32) {
    let flags = hdr[13];
    let seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let ack = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let syn_fin = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (
            0u32,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    out[t..t + 2].copy_from_slice(&p.dport.to_be_bytes());
    out[t + 2..t + 4].copy_from_slice(&p.sport.to_be_bytes());
    out[t + 4..t + 8].copy_from_slice(&new_seq.to_be_bytes());
    out[t + 8..t + 12].copy_from_slice(&new_ack.to_be_bytes());
    out[t + 12] = 5 << 4;
    out[t + 13] = new_flags;
}

/// The IPv6 REJECT: a TCP RST, or an ICMPv6 port unreachable (type 1 code 4) quoting the
/// datagram's IPv6 header and first 8 bytes, sent back out of the interface it came in on.
#[inline(never)]
fn reject_v6(ctx: &TcContext, p: &Packet) -> i32 {
    const MAX: usize = ETH_HLEN + 40 + 8 + 48;
    let Some(eth) = read::<[u8; 12]>(ctx, 0) else {
        return SHOT;
    };
    let tcp = p.proto == proto::TCP;
    let l4_len: usize = if tcp { 20 } else { 8 + 48 };
    let mut out = [0u8; MAX];
    let l4 = ETH_HLEN + 40;
    if tcp {
        let (Some(hdr), Some(plen)) = (
            read::<[u8; 14]>(ctx, l4),
            read::<[u8; 2]>(ctx, ETH_HLEN + 4),
        ) else {
            return SHOT;
        };
        if hdr[13] & TCP_RST != 0 {
            return SHOT;
        }
        let payload =
            u32::from(u16::from_be_bytes(plen)).saturating_sub(u32::from(hdr[12] >> 4) * 4);
        write_rst(&mut out, l4, p, &hdr, payload);
    } else {
        let Some(quote) = read::<[u8; 48]>(ctx, ETH_HLEN) else {
            return SHOT;
        };
        out[l4] = 1; // destination unreachable
        out[l4 + 1] = 4; // port unreachable
        out[l4 + 8..l4 + 56].copy_from_slice(&quote);
    }
    out[..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[..6]);
    out[12] = 0x86;
    out[13] = 0xdd;
    let ip = ETH_HLEN;
    let next = if tcp { proto::TCP } else { 58 };
    out[ip] = 0x60;
    out[ip + 4..ip + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    out[ip + 6] = next;
    out[ip + 7] = 64;
    out[ip + 8..ip + 24].copy_from_slice(&p.dst16);
    out[ip + 24..ip + 40].copy_from_slice(&p.src16);
    // Checksum over the IPv6 pseudo header and the L4 bytes.
    let pseudo = sum_words(&out[ip + 8..ip + 40], 0) + l4_len as u32 + u32::from(next);
    let csum = fold(sum_words(&out[l4..l4 + l4_len], pseudo)).to_be_bytes();
    let at = if tcp { l4 + 16 } else { l4 + 2 };
    out[at..at + 2].copy_from_slice(&csum);
    if !replace_packet(ctx, &out, ETH_HLEN + 40 + l4_len) {
        return SHOT;
    }
    back_out(ctx)
}

/// Turns a UDP datagram to a frontend without endpoints into an ICMP port unreachable (type 3
/// code 3, quoting the datagram's IP header and first 8 bytes) sent back out of the interface
/// it came in on: a connected UDP socket sees ECONNREFUSED, like upstream's REJECT.
#[inline(never)]
fn reject_udp(ctx: &TcContext, p: &Packet) -> i32 {
    const QUOTE: usize = 20 + 8;
    const LEN: usize = ETH_HLEN + 20 + 8 + QUOTE;
    if p.l4() != ETH_HLEN + 20 {
        return SHOT; // IP options: not worth quoting
    }
    let (Some(eth), Some(quote)) = (read::<[u8; 12]>(ctx, 0), read::<[u8; QUOTE]>(ctx, ETH_HLEN))
    else {
        return SHOT;
    };
    let mut out = [0u8; LEN];
    ipv4_reply_headers(&mut out, &eth, p, 1, (LEN - ETH_HLEN) as u16);
    let icmp = ETH_HLEN + 20;
    out[icmp] = 3; // destination unreachable
    out[icmp + 1] = 3; // port unreachable
    out[icmp + 8..].copy_from_slice(&quote);
    let csum = fold(sum_words(&out[icmp..], 0));
    out[icmp + 2..icmp + 4].copy_from_slice(&csum.to_be_bytes());
    if !replace_packet(ctx, &out, LEN) {
        return SHOT;
    }
    back_out(ctx)
}

/// Turns a TCP segment to a frontend without endpoints into a RST sent back out of the
/// interface it came in on (upstream's REJECT: the client learns at once).
#[inline(never)]
fn reject_tcp(ctx: &TcContext, p: &Packet) -> i32 {
    const LEN: usize = ETH_HLEN + 20 + 20;
    let (Some(eth), Some(tot_len), Some(hdr)) = (
        read::<[u8; 12]>(ctx, 0),
        read::<[u8; 2]>(ctx, ETH_HLEN + 2),
        read::<[u8; 14]>(ctx, p.l4()),
    ) else {
        return SHOT;
    };
    if hdr[13] & TCP_RST != 0 {
        return SHOT;
    }
    let headers = (p.l4() - ETH_HLEN + usize::from(hdr[12] >> 4) * 4) as u32;
    let payload = u32::from(u16::from_be_bytes(tot_len)).saturating_sub(headers);
    let mut out = [0u8; LEN];
    ipv4_reply_headers(&mut out, &eth, p, proto::TCP, 40);
    let t = ETH_HLEN + 20;
    write_rst(&mut out, t, p, &hdr, payload);
    let pseudo = sum_words(&out[ETH_HLEN + 12..ETH_HLEN + 20], 0) + u32::from(proto::TCP) + 20;
    let csum = fold(sum_words(&out[t..t + 20], pseudo));
    out[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());
    if !replace_packet(ctx, &out, LEN) {
        return SHOT;
    }
    back_out(ctx)
}
