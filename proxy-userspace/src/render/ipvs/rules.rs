//! The ipvs mode's ipsets and iptables rules, in upstream's layout
//! (`pkg/proxy/ipvs/proxier.go` `writeIptablesRules`, `ipset.go`): a fixed set of rules per
//! family that match ipsets, and ipsets whose members are the frontends. A Service change
//! touches set members only; the rules change only with the node's settings.
//!
//! - nat `KUBE-SERVICES`: ClusterIP traffic from outside the pod network (the local-traffic
//!   detector) is marked for masquerade, external IPs and NodePorts (unless eTP=Local) always,
//!   LoadBalancer IPs through `KUBE-LOAD-BALANCER`; `KUBE-POSTROUTING` masquerades marked
//!   traffic and hairpin (`KUBE-LOOP-BACK`: a backend reaching itself).
//! - filter `KUBE-IPVS-FILTER`: new connections to a `kube-ipvs0` address on a port no
//!   frontend serves are rejected; `KUBE-PROXY-FIREWALL` enforces loadBalancerSourceRanges;
//!   `KUBE-NODE-PORT` accepts health-check ports; `KUBE-FORWARD` accepts marked and
//!   established traffic.
//!
//! ipsets are written with `ipset restore`: a full sync fills a scratch set per set and
//! swaps it in (atomic: the set is never seen half-filled); a partial sync adds and deletes
//! the members that changed.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Command;

use crate::model::{DesiredState, FrontendKind, Masquerade, Protocol};
use crate::render::iptables::rules::{MASQ_MARK, Ruleset, push};
use crate::render::iptables::{self, Backend};
use crate::render::plan::{Family, proto_lower};
use crate::render::{CleanupReport, run_tool as run};
use crate::{Error, Result};

/// An ipset's type: upstream's (name, type, match direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SetType {
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    HashIp,
    BitmapPort,
}

impl SetType {
    const fn name(self) -> &'static str {
        match self {
            Self::HashIpPort => "hash:ip,port",
            Self::HashIpPortIp => "hash:ip,port,ip",
            Self::HashIpPortNet => "hash:ip,port,net",
            Self::HashIp => "hash:ip",
            Self::BitmapPort => "bitmap:port",
        }
    }
}

/// upstream's sets, by their IPv4 names, and kpr's two (`KPR-*`): frontends whose
/// traffic is refused (no endpoint at all) or dropped (none this traffic may use). IPVS
/// itself answers a virtual server without real servers with an ICMP error only for IPv4.
const SETS: [(&str, SetType); 19] = [
    ("KPR-REJECT", SetType::HashIpPort),
    ("KPR-DROP", SetType::HashIpPort),
    ("KUBE-LOOP-BACK", SetType::HashIpPortIp),
    ("KUBE-CLUSTER-IP", SetType::HashIpPort),
    ("KUBE-EXTERNAL-IP", SetType::HashIpPort),
    ("KUBE-EXTERNAL-IP-LOCAL", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-LOCAL", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-FW", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", SetType::HashIpPortNet),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", SetType::HashIpPortIp),
    ("KUBE-NODE-PORT-TCP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-LOCAL-TCP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-UDP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-LOCAL-UDP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-SCTP-HASH", SetType::HashIpPort),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", SetType::HashIpPort),
    ("KUBE-HEALTH-CHECK-NODE-PORT", SetType::BitmapPort),
    ("KUBE-IPVS-IPS", SetType::HashIp),
];

/// A set's name in `family`: upstream prefixes IPv6 sets with `KUBE-6-` and cuts names to
/// ipset's 31 characters.
#[must_use]
pub fn set_name(base: &str, family: Family) -> String {
    match family {
        Family::V4 => base.to_string(),
        Family::V6 => {
            let mut n = if base.starts_with("KPR-") {
                base.replacen("KPR-", "KPR-6-", 1)
            } else {
                base.replacen("KUBE-", "KUBE-6-", 1)
            };
            n.truncate(31);
            n
        }
    }
}

/// Every set's members, by set name (both families).
pub type SetMembers = BTreeMap<String, BTreeSet<String>>;

fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", proto_lower(protocol))
}

/// The members of every set for `desired`; `bound` are the `kube-ipvs0` addresses.
#[must_use]
pub fn members(desired: &DesiredState, bound: &BTreeSet<IpAddr>) -> SetMembers {
    let mut out = SetMembers::new();
    for family in [Family::V4, Family::V6] {
        for (base, _) in SETS {
            out.insert(set_name(base, family), BTreeSet::new());
        }
    }
    let mut add = |base: &str, ip: IpAddr, entry: String| {
        out.entry(set_name(base, Family::of(&ip)))
            .or_default()
            .insert(entry);
    };
    for (k, fe) in &desired.frontends {
        let e = ip_port(k.ip, k.protocol, k.port);
        let local = fe.external_policy_local;
        match super::served_targets(fe) {
            crate::model::Targets::Reject => add("KPR-REJECT", k.ip, e.clone()),
            crate::model::Targets::Drop => add("KPR-DROP", k.ip, e.clone()),
            crate::model::Targets::Backends(_) => {}
        }
        match fe.kind {
            FrontendKind::ClusterIp => add("KUBE-CLUSTER-IP", k.ip, e),
            FrontendKind::ExternalIp => add(
                if local {
                    "KUBE-EXTERNAL-IP-LOCAL"
                } else {
                    "KUBE-EXTERNAL-IP"
                },
                k.ip,
                e,
            ),
            FrontendKind::LoadBalancer => {
                add("KUBE-LOAD-BALANCER", k.ip, e.clone());
                if local {
                    add("KUBE-LOAD-BALANCER-LOCAL", k.ip, e.clone());
                }
                let ranges: Vec<&ipnet::IpNet> = fe
                    .source_ranges
                    .iter()
                    .filter(|r| r.addr().is_ipv4() == k.ip.is_ipv4())
                    .collect();
                // Ranges only of the other family: no firewall (upstream the same).
                if !ranges.is_empty() {
                    add("KUBE-LOAD-BALANCER-FW", k.ip, e.clone());
                    for r in ranges {
                        // hash:ip,port,net takes no /0: two halves say the same.
                        for half in halves_of_everything(*r) {
                            add(
                                "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                                k.ip,
                                format!("{e},{half}"),
                            );
                        }
                    }
                    // The node itself may reach a LoadBalancer IP whose ranges hold a node IP.
                    if desired
                        .masquerade_ips
                        .iter()
                        .any(|n| fe.source_ranges.iter().any(|r| r.contains(n)))
                    {
                        add(
                            "KUBE-LOAD-BALANCER-SOURCE-IP",
                            k.ip,
                            format!("{e},{}", k.ip),
                        );
                    }
                }
            }
            FrontendKind::NodePort => match k.protocol {
                Protocol::Sctp => {
                    add("KUBE-NODE-PORT-SCTP-HASH", k.ip, e.clone());
                    if local {
                        add("KUBE-NODE-PORT-LOCAL-SCTP-HASH", k.ip, e);
                    }
                }
                p => {
                    let (all, loc) = if p == Protocol::Tcp {
                        ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP")
                    } else {
                        ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP")
                    };
                    add(all, k.ip, k.port.to_string());
                    if local {
                        add(loc, k.ip, k.port.to_string());
                    }
                }
            },
        }
        // Hairpin: a backend reaching itself through any frontend is masqueraded (upstream
        // lists the local endpoints; a remote backend's traffic to itself never passes here).
        for b in fe.internal.backends().iter().chain(fe.external.backends()) {
            add(
                "KUBE-LOOP-BACK",
                b.ip(),
                format!(
                    "{},{}:{},{}",
                    b.ip(),
                    proto_lower(k.protocol),
                    b.port(),
                    b.ip()
                ),
            );
        }
    }
    for (port, _) in desired.health_checks.values() {
        for family in [Family::V4, Family::V6] {
            out.entry(set_name("KUBE-HEALTH-CHECK-NODE-PORT", family))
                .or_default()
                .insert(port.to_string());
        }
    }
    for ip in bound {
        out.entry(set_name("KUBE-IPVS-IPS", Family::of(ip)))
            .or_default()
            .insert(ip.to_string());
    }
    out
}

/// `r`, or its two /1 halves when it is a /0 (which `hash:ip,port,net` refuses).
fn halves_of_everything(r: ipnet::IpNet) -> Vec<ipnet::IpNet> {
    if r.prefix_len() > 0 {
        return vec![r];
    }
    let (lo, hi): (IpAddr, IpAddr) = if r.addr().is_ipv4() {
        ([0, 0, 0, 0].into(), [128, 0, 0, 0].into())
    } else {
        (
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            std::net::Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0).into(),
        )
    };
    [lo, hi]
        .into_iter()
        .filter_map(|a| ipnet::IpNet::new(a, 1).ok())
        .collect()
}

fn create_line(name: &str, ty: SetType, family: Family) -> String {
    match ty {
        SetType::BitmapPort => format!("create {name} bitmap:port range 0-65535"),
        _ => format!(
            "create {name} {} family {} hashsize 1024 maxelem 1048576",
            ty.name(),
            if family == Family::V4 {
                "inet"
            } else {
                "inet6"
            }
        ),
    }
}

/// `ipset restore` input that brings the sets from `old` to `new`: per changed set, either a
/// scratch set filled and swapped in (`swap`), or the member differences. Sets in `existing`
/// are not created again: kube-proxy's (a takeover) may differ in `maxelem`, which `create
/// -exist` refuses and `swap` does not mind.
#[must_use]
pub fn ipset_input(
    old: Option<&SetMembers>,
    new: &SetMembers,
    existing: &BTreeSet<String>,
) -> Option<String> {
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        for (i, (base, ty)) in SETS.iter().enumerate() {
            let name = set_name(base, family);
            let want = new.get(&name).cloned().unwrap_or_default();
            match old {
                None => {
                    // Exists (or is created) and is replaced whole.
                    let tmp = format!("KPR-SWAP-{}{i}", if family == Family::V4 { 4 } else { 6 });
                    if !existing.contains(&name) {
                        let _ = writeln!(out, "{} -exist", create_line(&name, *ty, family));
                    }
                    let _ = writeln!(out, "{} -exist", create_line(&tmp, *ty, family));
                    let _ = writeln!(out, "flush {tmp}");
                    for m in &want {
                        let _ = writeln!(out, "add {tmp} {m}");
                    }
                    let _ = writeln!(out, "swap {tmp} {name}");
                    let _ = writeln!(out, "destroy {tmp}");
                }
                Some(old) => {
                    let had = old.get(&name).cloned().unwrap_or_default();
                    for m in had.difference(&want) {
                        let _ = writeln!(out, "del {name} {m} -exist");
                    }
                    for m in want.difference(&had) {
                        let _ = writeln!(out, "add {name} {m} -exist");
                    }
                }
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The jumps from built-in chains into the ipvs mode's chains, in the order they end up in
/// (upstream prepends each in the reverse of this order).
pub const JUMPS: [(&str, &str, &str); 9] = [
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER",
    ),
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    ),
    (
        "filter",
        "OUTPUT",
        "-m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER",
    ),
];

/// The ipvs layout's chains in the nat table.
pub const NAT_CHAINS: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-POSTROUTING",
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-MARK-MASQ",
];

/// The ipvs layout's chains in the filter table.
pub const FILTER_CHAINS: [&str; 6] = [
    "KUBE-FORWARD",
    "KUBE-NODE-PORT",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// Chains only the ipvs layout has.
pub const IPVS_ONLY_CHAINS: [&str; 6] = [
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// The rule set of `family`.
#[must_use]
pub fn build(desired: &DesiredState, family: Family) -> Ruleset {
    let mut rs = Ruleset::default();
    for c in NAT_CHAINS {
        rs.nat.entry(c.into()).or_default();
    }
    for c in FILTER_CHAINS {
        rs.filter.entry(c.into()).or_default();
    }
    let s = |base: &str| set_name(base, family);
    let nat = &mut rs.nat;
    push(
        nat,
        "KUBE-SERVICES",
        if family == Family::V4 {
            "-s 127.0.0.0/8 -j RETURN"
        } else {
            "-s ::1/128 -j RETURN"
        },
    );
    push(
        nat,
        "KUBE-POSTROUTING",
        format!(
            "-m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set {} dst,dst,src -j MASQUERADE",
            s("KUBE-LOOP-BACK")
        ),
    );
    push(
        nat,
        "KUBE-SERVICES",
        format!(
            "-m comment --comment \"Kubernetes service lb portal\" -m set --match-set {} dst,dst -j KUBE-LOAD-BALANCER",
            s("KUBE-LOAD-BALANCER")
        ),
    );
    push(
        nat,
        "KUBE-LOAD-BALANCER",
        format!(
            "-m comment --comment \"Kubernetes service load balancer ip + port with externalTrafficPolicy=local\" -m set --match-set {} dst,dst -j RETURN",
            s("KUBE-LOAD-BALANCER-LOCAL")
        ),
    );
    for (proto, all, local, dir) in [
        (
            "tcp",
            "KUBE-NODE-PORT-TCP",
            "KUBE-NODE-PORT-LOCAL-TCP",
            "dst",
        ),
        (
            "udp",
            "KUBE-NODE-PORT-UDP",
            "KUBE-NODE-PORT-LOCAL-UDP",
            "dst",
        ),
        (
            "sctp",
            "KUBE-NODE-PORT-SCTP-HASH",
            "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
            "dst,dst",
        ),
    ] {
        let up = proto.to_uppercase();
        push(
            nat,
            "KUBE-NODE-PORT",
            format!(
                "-p {proto} -m comment --comment \"Kubernetes nodeport {up} port with externalTrafficPolicy=local\" -m set --match-set {} {dir} -j RETURN",
                s(local)
            ),
        );
        push(
            nat,
            "KUBE-NODE-PORT",
            format!(
                "-p {proto} -m comment --comment \"Kubernetes nodeport {up} port for masquerade purpose\" -m set --match-set {} {dir} -j KUBE-MARK-MASQ",
                s(all)
            ),
        );
    }
    let masquerade_all = desired.frontends.values().any(|fe| {
        fe.kind == FrontendKind::ClusterIp && fe.internal_masquerade == Masquerade::Always
    });
    let local = iptables::rules::LocalMatch::iptables(desired, family);
    let cluster = format!(
        "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set {}",
        s("KUBE-CLUSTER-IP")
    );
    push(
        nat,
        "KUBE-SERVICES",
        match (&local, masquerade_all) {
            (_, true) => format!("{cluster} dst,dst -j KUBE-MARK-MASQ"),
            (Some(l), false) => format!("{cluster} dst,dst {} -j KUBE-MARK-MASQ", l.not),
            (None, false) => format!("{cluster} src,dst -j KUBE-MARK-MASQ"),
        },
    );
    let ext = format!(
        "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set {} dst,dst",
        s("KUBE-EXTERNAL-IP")
    );
    push(nat, "KUBE-SERVICES", format!("{ext} -j KUBE-MARK-MASQ"));
    push(
        nat,
        "KUBE-SERVICES",
        format!("{ext} -m addrtype --dst-type LOCAL -j ACCEPT"),
    );
    push(
        nat,
        "KUBE-SERVICES",
        format!(
            "-m comment --comment \"Kubernetes service external ip + port with externalTrafficPolicy=local\" -m set --match-set {} dst,dst -m addrtype --dst-type LOCAL -j ACCEPT",
            s("KUBE-EXTERNAL-IP-LOCAL")
        ),
    );
    push(
        nat,
        "KUBE-SERVICES",
        "-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
    );
    push(nat, "KUBE-LOAD-BALANCER", "-j KUBE-MARK-MASQ");
    push(
        nat,
        "KUBE-SERVICES",
        format!(
            "-m set --match-set {} dst,dst -j ACCEPT",
            s("KUBE-CLUSTER-IP")
        ),
    );
    push(
        nat,
        "KUBE-SERVICES",
        format!(
            "-m set --match-set {} dst,dst -j ACCEPT",
            s("KUBE-LOAD-BALANCER")
        ),
    );
    push(
        nat,
        "KUBE-POSTROUTING",
        format!("-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
    );
    push(
        nat,
        "KUBE-POSTROUTING",
        format!("-j MARK --xor-mark {MASQ_MARK}"),
    );
    push(
        nat,
        "KUBE-POSTROUTING",
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
    );
    push(
        nat,
        "KUBE-MARK-MASQ",
        format!("-j MARK --or-mark {MASQ_MARK}"),
    );

    let filter = &mut rs.filter;
    push(
        filter,
        "KUBE-PROXY-FIREWALL",
        format!(
            "-m comment --comment \"Kubernetes service load balancer ip + port for load balancer with sourceRange\" -m set --match-set {} dst,dst -j KUBE-SOURCE-RANGES-FIREWALL",
            s("KUBE-LOAD-BALANCER-FW")
        ),
    );
    push(
        filter,
        "KUBE-SOURCE-RANGES-FIREWALL",
        format!(
            "-m comment --comment \"Kubernetes service load balancer ip + port + source cidr for packet filter purpose\" -m set --match-set {} dst,dst,src -j RETURN",
            s("KUBE-LOAD-BALANCER-SOURCE-CIDR")
        ),
    );
    push(
        filter,
        "KUBE-SOURCE-RANGES-FIREWALL",
        format!(
            "-m comment --comment \"Kubernetes service load balancer ip + port + source IP for packet filter purpose\" -m set --match-set {} dst,dst,src -j RETURN",
            s("KUBE-LOAD-BALANCER-SOURCE-IP")
        ),
    );
    push(filter, "KUBE-SOURCE-RANGES-FIREWALL", "-j DROP");
    // The node itself may not reach a LoadBalancer IP whose source ranges exclude it
    // (upstream issue 119656): its traffic has the LB IP as source.
    for (k, fe) in &desired.frontends {
        if fe.kind == FrontendKind::LoadBalancer
            && Family::of(&k.ip) == family
            && !fe.source_ranges.is_empty()
            && !desired
                .masquerade_ips
                .iter()
                .any(|n| fe.source_ranges.iter().any(|r| r.contains(n)))
        {
            let host = if k.ip.is_ipv4() { 32 } else { 128 };
            push(
                filter,
                "KUBE-IPVS-OUT-FILTER",
                format!(
                    "-s {ip}/{host} -m ipvs --vaddr {ip}/{host} --vproto {} --vport {} -j DROP",
                    proto_num(k.protocol),
                    k.port,
                    ip = k.ip
                ),
            );
        }
    }
    push(
        filter,
        "KUBE-FORWARD",
        format!(
            "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
        ),
    );
    push(
        filter,
        "KUBE-FORWARD",
        "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
    push(
        filter,
        "KUBE-NODE-PORT",
        format!(
            "-m comment --comment \"Kubernetes health check node port\" -m set --match-set {} dst -j ACCEPT",
            s("KUBE-HEALTH-CHECK-NODE-PORT")
        ),
    );
    // A TCP reset for TCP, as the other rule modes: a client hears an ICMPv6 error about its
    // SYN only with the SYN's retransmission, a second later.
    push(
        filter,
        "KUBE-IPVS-FILTER",
        format!(
            "-p tcp -m comment --comment \"kpr: frontends without endpoints\" -m set --match-set {} dst,dst -j REJECT --reject-with tcp-reset",
            s("KPR-REJECT")
        ),
    );
    push(
        filter,
        "KUBE-IPVS-FILTER",
        format!(
            "-m comment --comment \"kpr: frontends without endpoints\" -m set --match-set {} dst,dst -j REJECT",
            s("KPR-REJECT")
        ),
    );
    push(
        filter,
        "KUBE-IPVS-FILTER",
        format!(
            "-m comment --comment \"kpr: frontends without endpoints for this traffic\" -m set --match-set {} dst,dst -j DROP",
            s("KPR-DROP")
        ),
    );
    for set in [
        "KUBE-LOAD-BALANCER",
        "KUBE-CLUSTER-IP",
        "KUBE-EXTERNAL-IP",
        "KUBE-EXTERNAL-IP-LOCAL",
    ] {
        push(
            filter,
            "KUBE-IPVS-FILTER",
            format!("-m set --match-set {} dst,dst -j RETURN", s(set)),
        );
    }
    push(
        filter,
        "KUBE-IPVS-FILTER",
        format!(
            "-m set --match-set {} dst -j RETURN",
            s("KUBE-HEALTH-CHECK-NODE-PORT")
        ),
    );
    push(
        filter,
        "KUBE-IPVS-FILTER",
        format!(
            "-m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
            s("KUBE-IPVS-IPS")
        ),
    );
    rs
}

const fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// What the ipvs mode wrote to ipset and iptables, per family.
pub struct RuleState {
    backend: Backend,
    families: Vec<Family>,
    sets: Option<SetMembers>,
    written: Vec<(Family, Ruleset)>,
}

impl RuleState {
    /// Finds the iptables backend and checks that `ipset` works.
    ///
    /// # Errors
    /// No working `ipset` or `iptables-restore`.
    pub fn start() -> Result<Self> {
        run(Command::new("ipset").arg("version"), None).map_err(|e| {
            Error::Unsupported(format!(
                "--proxy-mode ipvs needs the ipset tool (apt install ipset): {e}"
            ))
        })?;
        let backend = Backend::detect();
        let families = iptables::working_families(backend);
        if families.is_empty() {
            return Err(Error::Unsupported(
                "--proxy-mode ipvs needs a working iptables-restore (apt install iptables)".into(),
            ));
        }
        Ok(Self {
            backend,
            families,
            sets: None,
            written: Vec::new(),
        })
    }

    /// Writes the sets for `desired` (`bound`: the `kube-ipvs0` addresses), then the rules;
    /// `full` rewrites every set and re-reads the kernel's chains.
    ///
    /// # Errors
    /// `ipset restore` or `iptables-restore` failed; the next sync rewrites everything.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        bound: &BTreeSet<IpAddr>,
        full: bool,
    ) -> Result<usize> {
        let new = members(desired, bound);
        let old = if full { None } else { self.sets.as_ref() };
        let existing: BTreeSet<String> = if full {
            run(Command::new("ipset").args(["list", "-n"]), None)
                .map(|l| l.lines().map(|s| s.trim().to_string()).collect())
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        let mut changes = 0;
        if let Some(input) = ipset_input(old, &new, &existing) {
            changes += input.lines().count();
            if let Err(e) = run(Command::new("ipset").args(["restore"]), Some(&input)) {
                self.sets = None;
                return Err(Error::io("ipset restore", e).context("writing the ipvs mode's ipsets"));
            }
        }
        self.sets = Some(new);
        for family in self.families.clone() {
            let rules = build(desired, family);
            let (old, saved) = if full {
                let (mut k, text) = iptables::read_kernel(self.backend, family)?;
                // Other layouts' chains (the iptables mode's) are the cleanup's.
                k.filter.retain(|c, _| FILTER_CHAINS.contains(&c.as_str()));
                k.nat.retain(|c, _| NAT_CHAINS.contains(&c.as_str()));
                (k, Some(text))
            } else {
                let w = self
                    .written
                    .iter()
                    .find(|(f, _)| *f == family)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                (w, None)
            };
            if let Some(input) = iptables::rules::restore_input(&old, &rules) {
                let restore = self.backend.command(family, "iptables-restore");
                run(
                    Command::new(&restore).args(["-w", "5", "--noflush", "--counters"]),
                    Some(&input),
                )
                .map_err(|e| {
                    self.written.retain(|(f, _)| *f != family);
                    Error::io(&restore, e).context("applying the ipvs mode's rules")
                })?;
                changes += input.lines().filter(|l| l.starts_with(':')).count();
            }
            if let Some(text) = &saved {
                iptables::ensure_jumps(self.backend, family, &JUMPS, text)?;
            }
            self.written.retain(|(f, _)| *f != family);
            self.written.push((family, rules));
        }
        Ok(changes)
    }
}

/// Removes the ipvs mode's jumps from both backends and families (not those the iptables
/// mode has too, byte for byte: they are its, or go with its cleanup), and its own chains
/// when `chains` (the iptables cleanup removes every `KUBE-*` chain otherwise).
pub fn remove_jumps_and_chains(chains: bool) -> Vec<String> {
    let mut removed = Vec::new();
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [Family::V4, Family::V6] {
            let ipt = backend.command(family, "iptables");
            for (table, chain, spec) in JUMPS.iter().filter(|j| !iptables::rules::JUMPS.contains(j))
            {
                let ok = Command::new(&ipt)
                    .args(["-w", "-t", table, "-D", chain])
                    .args(iptables::shell_words(spec))
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    removed.push(format!("{ipt} -t {table} {chain} jump"));
                }
            }
            if chains {
                for table in ["filter", "nat"] {
                    for c in IPVS_ONLY_CHAINS {
                        let flushed = Command::new(&ipt)
                            .args(["-w", "-t", table, "-F", c])
                            .output()
                            .is_ok_and(|o| o.status.success());
                        if flushed {
                            let _ = Command::new(&ipt)
                                .args(["-w", "-t", table, "-X", c])
                                .output();
                            removed.push(format!("{ipt} -t {table} {c}"));
                        }
                    }
                }
            }
        }
    }
    removed
}

/// Destroys the ipvs mode's ipsets (both families' names, and kpr's scratch sets).
///
/// # Errors
/// None: a set still in use or absent is skipped.
pub fn destroy_sets() -> Vec<String> {
    let Ok(list) = run(Command::new("ipset").args(["list", "-n"]), None) else {
        return Vec::new();
    };
    let ours: BTreeSet<String> = [Family::V4, Family::V6]
        .iter()
        .flat_map(|f| SETS.iter().map(move |(b, _)| set_name(b, *f)))
        .collect();
    let mut removed = Vec::new();
    for name in list.lines().map(str::trim) {
        if (ours.contains(name) || name.starts_with("KPR-SWAP-"))
            && run(Command::new("ipset").args(["destroy", name]), None).is_ok()
        {
            removed.push(format!("ipset {name}"));
        }
    }
    removed
}

/// Removes the ipvs mode's rules and sets (kpr's or kube-proxy's).
///
/// # Errors
/// The `KUBE-*` chains could not be removed.
pub fn cleanup() -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    report.removed.extend(remove_jumps_and_chains(false));
    report.removed.extend(iptables::cleanup()?.removed);
    report.removed.extend(destroy_sets());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_set_names_are_prefixed_and_cut_like_upstream() {
        assert_eq!(set_name("KUBE-CLUSTER-IP", Family::V6), "KUBE-6-CLUSTER-IP");
        assert_eq!(
            set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", Family::V6),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        assert!(
            SETS.iter()
                .all(|(b, _)| set_name(b, Family::V6).len() <= 31)
        );
    }

    #[test]
    fn a_source_range_of_everything_becomes_two_halves() {
        let h = |s: &str| -> Vec<String> {
            halves_of_everything(s.parse().unwrap())
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(h("0.0.0.0/0"), ["0.0.0.0/1", "128.0.0.0/1"]);
        assert_eq!(h("::/0"), ["::/1", "8000::/1"]);
        assert_eq!(h("203.0.113.0/24"), ["203.0.113.0/24"]);
    }

    #[test]
    fn partial_ipset_input_is_the_member_difference() {
        let mut old = SetMembers::new();
        old.insert(
            "KUBE-CLUSTER-IP".into(),
            [
                "172.30.0.41,tcp:80".to_string(),
                "172.30.0.42,tcp:80".into(),
            ]
            .into(),
        );
        let mut new = old.clone();
        new.get_mut("KUBE-CLUSTER-IP")
            .unwrap()
            .remove("172.30.0.42,tcp:80");
        new.get_mut("KUBE-CLUSTER-IP")
            .unwrap()
            .insert("172.30.0.43,udp:53".into());
        assert_eq!(
            ipset_input(Some(&old), &new, &BTreeSet::new()).unwrap(),
            "del KUBE-CLUSTER-IP 172.30.0.42,tcp:80 -exist\nadd KUBE-CLUSTER-IP 172.30.0.43,udp:53 -exist\n"
        );
        assert_eq!(ipset_input(Some(&new), &new, &BTreeSet::new()), None);
        let full = ipset_input(None, &new, &BTreeSet::new()).unwrap();
        assert!(
            full.contains("create KUBE-CLUSTER-IP hash:ip,port"),
            "{full}"
        );
        let taken_over = ipset_input(None, &new, &["KUBE-CLUSTER-IP".to_string()].into()).unwrap();
        assert!(
            !taken_over.contains("create KUBE-CLUSTER-IP "),
            "an existing set is swapped into, not created: {taken_over}"
        );
        assert!(full.contains("swap KPR-SWAP-43 KUBE-CLUSTER-IP"), "{full}");
        assert!(
            full.contains("add KPR-SWAP-43 172.30.0.43,udp:53\n"),
            "{full}"
        );
    }
}
