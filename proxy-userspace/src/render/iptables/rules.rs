//! The iptables rule set for one IP family, generated from the desired state in upstream
//! kube-proxy's layout (`pkg/proxy/iptables/proxier.go`): pure text, no kernel access.
//!
//! nat: `KUBE-SERVICES` dispatches Service addresses to per-Service-port chains
//! (`KUBE-SVC-*` for the backends pods and the node use, `KUBE-SVL-*` for the local backends of
//! eTP=Local, `KUBE-EXT-*` for external frontends, `KUBE-FW-*` for loadBalancerSourceRanges),
//! which pick a `KUBE-SEP-*` (one per endpoint, DNAT) with `statistic` probabilities;
//! `KUBE-NODEPORTS` holds NodePorts; `KUBE-MARK-MASQ` marks, `KUBE-POSTROUTING` masquerades.
//! filter: REJECT and DROP for frontends without usable endpoints (`KUBE-SERVICES`,
//! `KUBE-EXTERNAL-SERVICES`), health-check ports (`KUBE-NODEPORTS`), forwarding of marked and
//! established traffic (`KUBE-FORWARD`), and the localnet guard (`KUBE-FIREWALL`).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::model::{DesiredState, FrontendKind, Masquerade, Targets};
use crate::render::plan::{
    ClassHandling, Family, Handling, ServicePort, proto_lower, service_ports,
};

/// The masquerade mark (upstream's default `masqueradeBit` 14).
pub const MASQ_MARK: &str = "0x4000";

/// One table: chain name -> its rules, each a whole `-A CHAIN ...` line.
pub type Chains = BTreeMap<String, Vec<String>>;

/// Everything kpr owns in the filter and nat tables of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub filter: Chains,
    pub nat: Chains,
}

/// The jumps from built-in chains into kpr's chains: (table, built-in chain, rule spec), in
/// the order they are inserted at the top of the built-in chain.
pub const JUMPS: [(&str, &str, &str); 10] = [
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    ("filter", "INPUT", "-j KUBE-FIREWALL"),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
];

/// The chains every rule set has, even when empty.
const FILTER_BASE: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-FORWARD",
    "KUBE-FIREWALL",
];
const NAT_BASE: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Appends `-A chain rule` to `chain`.
pub(crate) fn push(chains: &mut Chains, chain: &str, rule: impl AsRef<str>) {
    chains
        .entry(chain.to_string())
        .or_default()
        .push(format!("-A {chain} {}", rule.as_ref()));
}

/// Builds the rule set of `family` from `desired`.
#[must_use]
pub fn build(desired: &DesiredState, family: Family) -> Ruleset {
    let mut rs = Ruleset::default();
    for c in FILTER_BASE {
        rs.filter.entry(c.into()).or_default();
    }
    for c in NAT_BASE {
        rs.nat.entry(c.into()).or_default();
    }
    let local = LocalMatch::iptables(desired, family);
    let localhost = family == Family::V4 && desired.localhost_node_ports;
    let ports = service_ports(desired);
    for port in ports.values().filter(|p| p.family == family) {
        service_port(&mut rs, port, local.as_ref(), localhost);
    }
    for (svc, (hc_port, _)) in &desired.health_checks {
        push(
            &mut rs.filter,
            "KUBE-NODEPORTS",
            format!(
                "-m comment --comment \"{}/{} health check node port\" -m tcp -p tcp --dport {hc_port} -j ACCEPT",
                svc.namespace, svc.name
            ),
        );
    }
    let nodeports_jump = if localhost || family == Family::V6 {
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_string()
    } else {
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS".to_string()
    };
    push(&mut rs.nat, "KUBE-SERVICES", nodeports_jump);
    push(
        &mut rs.nat,
        "KUBE-MARK-MASQ",
        format!("-j MARK --or-mark {MASQ_MARK}"),
    );
    push(
        &mut rs.nat,
        "KUBE-POSTROUTING",
        format!("-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
    );
    push(
        &mut rs.nat,
        "KUBE-POSTROUTING",
        format!("-j MARK --xor-mark {MASQ_MARK}"),
    );
    push(
        &mut rs.nat,
        "KUBE-POSTROUTING",
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
    );
    push(
        &mut rs.filter,
        "KUBE-FORWARD",
        format!(
            "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
        ),
    );
    push(
        &mut rs.filter,
        "KUBE-FORWARD",
        "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
    if localhost {
        push(
            &mut rs.filter,
            "KUBE-FIREWALL",
            "-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        );
    }
    rs
}

/// The rules of one Service port.
fn service_port(
    rs: &mut Ruleset,
    port: &ServicePort<'_>,
    local: Option<&LocalMatch>,
    localhost: bool,
) {
    let name = port.name();
    let hash = port.hash();
    let proto = proto_lower(port.protocol);
    let sets = port.backend_sets();
    let chain_of = |backends: &[SocketAddr]| -> String {
        match sets.iter().position(|s| *s == backends) {
            Some(0) => format!("KUBE-SVC-{hash}"),
            Some(1) => format!("KUBE-SVL-{hash}"),
            _ => format!(
                "KUBE-SVX-{}",
                crate::render::plan::chain_hash(&format!("{name}{proto}{backends:?}"))
            ),
        }
    };
    let affinity = port.affinity();
    // Endpoint chains, shared by every backend set that holds the endpoint.
    let endpoints = port.endpoints();
    for ep in &endpoints {
        let sep = format!("KUBE-SEP-{}", port.endpoint_hash(ep));
        push(
            &mut rs.nat,
            &sep,
            format!(
                "-m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                host(ep.ip())
            ),
        );
        let recent = if affinity.is_some() {
            format!(
                "-m recent --name {sep} --mask {} --rsource --set ",
                full_mask(ep.ip())
            )
        } else {
            String::new()
        };
        push(
            &mut rs.nat,
            &sep,
            format!(
                "-m comment --comment {name} {recent}-m {proto} -p {proto} -j DNAT --to-destination {ep}"
            ),
        );
    }
    // Backend-set chains: affinity first, then a random pick.
    let mut masq_in_set: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, fe) in &port.frontends {
        if fe.kind != FrontendKind::ClusterIp {
            continue;
        }
        // ClusterIP masquerade rules sit at the top of the chain the ClusterIP jumps to,
        // restricted to the ClusterIP (the chain is shared with external frontends).
        if let Targets::Backends(b) = &fe.internal {
            let matcher = format!(
                "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {}",
                host(key.ip),
                key.port
            );
            let rule = match (fe.internal_masquerade, local) {
                (Masquerade::Always, _) => Some(format!("{matcher} -j KUBE-MARK-MASQ")),
                (Masquerade::UnlessFromPods, Some(l)) => {
                    Some(format!("{matcher} {} -j KUBE-MARK-MASQ", l.not))
                }
                (Masquerade::FromNode, _) => Some(format!(
                    "{matcher} -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                )),
                _ => None,
            };
            if let Some(r) = rule {
                masq_in_set.entry(chain_of(b)).or_default().push(r);
            }
        }
    }
    for set in &sets {
        let chain = chain_of(set);
        rs.nat.entry(chain.clone()).or_default();
        for r in masq_in_set.remove(&chain).unwrap_or_default() {
            push(&mut rs.nat, &chain, r);
        }
        if let Some(secs) = affinity {
            for ep in set.iter() {
                let sep = format!("KUBE-SEP-{}", port.endpoint_hash(ep));
                push(
                    &mut rs.nat,
                    &chain,
                    format!(
                        "-m comment --comment \"{name} -> {ep}\" -m recent --name {sep} --mask {} --rsource --rcheck --seconds {secs} --reap -j {sep}",
                        full_mask(ep.ip())
                    ),
                );
            }
        }
        let n = set.len();
        for (i, ep) in set.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", port.endpoint_hash(ep));
            let stat = if i + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "endpoint counts are small")]
                let p = 1.0 / (n - i) as f64;
                format!("-m statistic --mode random --probability {p:.10} ")
            } else {
                String::new()
            };
            push(
                &mut rs.nat,
                &chain,
                format!("-m comment --comment \"{name} -> {ep}\" {stat}-j {sep}"),
            );
        }
    }
    // Dispatch, and REJECT/DROP for classes without backends.
    let ext_chain = format!("KUBE-EXT-{hash}");
    let fw_chain = format!("KUBE-FW-{hash}");
    let mut ext_written = false;
    for (key, fe) in &port.frontends {
        let h = Handling::of(fe);
        let dport = format!("-m {proto} -p {proto} --dport {}", key.port);
        let what = match fe.kind {
            FrontendKind::ClusterIp => "cluster IP",
            FrontendKind::NodePort => "node port",
            FrontendKind::ExternalIp => "external IP",
            FrontendKind::LoadBalancer => "loadbalancer IP",
        };
        let filter_chain = if fe.kind == FrontendKind::ClusterIp {
            "KUBE-SERVICES"
        } else {
            "KUBE-EXTERNAL-SERVICES"
        };
        let dst = format!("-d {}", host(key.ip));
        filter_verdicts(
            rs,
            filter_chain,
            &name,
            &format!("{dst} {dport}"),
            &h,
            local,
        );
        if fe.kind == FrontendKind::NodePort && localhost && key.ip.is_ipv4() {
            filter_verdicts(
                rs,
                filter_chain,
                &name,
                &format!("-d 127.0.0.0/8 {dport}"),
                &h,
                local,
            );
        }
        let any_backends = matches!(h.internal.targets, Targets::Backends(_))
            || matches!(h.external.targets, Targets::Backends(_));
        if !any_backends {
            continue;
        }
        if fe.kind == FrontendKind::ClusterIp {
            if let Targets::Backends(b) = &fe.internal {
                push(
                    &mut rs.nat,
                    "KUBE-SERVICES",
                    format!(
                        "-m comment --comment \"{name} cluster IP\" {dst} {dport} -j {}",
                        chain_of(b)
                    ),
                );
            }
            continue;
        }
        // External frontends go through KUBE-EXT (one per Service port: every external
        // frontend of a port is handled alike).
        if !ext_written {
            ext_written = true;
            external_chain(rs, &ext_chain, &name, &h, local, &chain_of);
        }
        let target = if fe.source_ranges.is_empty() {
            ext_chain.clone()
        } else {
            rs.nat.entry(fw_chain.clone()).or_default();
            if rs.nat[&fw_chain].is_empty() {
                for r in &fe.source_ranges {
                    push(
                        &mut rs.nat,
                        &fw_chain,
                        format!(
                            "-m comment --comment \"{name} loadbalancer IP\" -s {r} -j {ext_chain}"
                        ),
                    );
                }
                // Node traffic that the network presents with the LB IP as its source.
                push(
                    &mut rs.nat,
                    &fw_chain,
                    format!(
                        "-m comment --comment \"{name} loadbalancer IP\" -s {} -j {ext_chain}",
                        host(key.ip)
                    ),
                );
                push(
                    &mut rs.nat,
                    &fw_chain,
                    format!("-m comment --comment \"{name} loadbalancer IP\" -j KUBE-MARK-DROP"),
                );
            }
            fw_chain.clone()
        };
        if fe.kind == FrontendKind::NodePort {
            push(
                &mut rs.nat,
                "KUBE-NODEPORTS",
                format!("-m comment --comment {name} {dst} {dport} -j {target}"),
            );
            if localhost && key.ip.is_ipv4() {
                push(
                    &mut rs.nat,
                    "KUBE-NODEPORTS",
                    format!("-m comment --comment {name} -d 127.0.0.0/8 {dport} -j {target}"),
                );
            }
        } else {
            push(
                &mut rs.nat,
                "KUBE-SERVICES",
                format!("-m comment --comment \"{name} {what}\" {dst} {dport} -j {target}"),
            );
        }
    }
    if rs.nat.contains_key(&fw_chain) {
        rs.nat.entry("KUBE-MARK-DROP".into()).or_default();
        if rs.nat["KUBE-MARK-DROP"].is_empty() {
            push(&mut rs.nat, "KUBE-MARK-DROP", "-j MARK --or-mark 0x8000");
            push(
                &mut rs.filter,
                "KUBE-FIREWALL",
                "-m comment --comment \"kubernetes firewall for dropping marked packets\" -m mark --mark 0x8000/0x8000 -j DROP",
            );
        }
    }
}

/// `--mask` for `recent`: the whole address.
const fn full_mask(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "255.255.255.255"
    } else {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    }
}

/// The local-traffic detector as rule matches: pod traffic, and everything else.
pub struct LocalMatch {
    pub is: String,
    pub not: String,
}

impl LocalMatch {
    /// iptables' spelling for `family`: `-s CIDR`, `-i IFACE` or `-i PREFIX+`.
    #[must_use]
    pub fn iptables(desired: &DesiredState, family: Family) -> Option<Self> {
        use crate::model::PodInterface;
        let m = match &desired.pod_interface {
            Some(PodInterface::Exact(i)) => format!("-i {i}"),
            Some(PodInterface::Prefix(p)) => format!("-i {p}+"),
            None => format!(
                "-s {}",
                desired
                    .pod_cidrs
                    .iter()
                    .find(|c| Family::of(&c.addr()) == family)?
            ),
        };
        Some(Self {
            not: format!("! {m}"),
            is: m,
        })
    }
}

/// The source match of the internal class's two halves: pods and the node.
fn internal_sources(local: Option<&LocalMatch>) -> Vec<(String, crate::model::SourceClass)> {
    let mut out = Vec::new();
    if let Some(l) = local {
        out.push((l.is.clone(), crate::model::SourceClass::Pod));
    }
    out.push((
        "-m addrtype --src-type LOCAL".to_string(),
        crate::model::SourceClass::Node,
    ));
    out
}

/// `KUBE-EXT-*`: masquerade and pick per traffic class.
fn external_chain(
    rs: &mut Ruleset,
    chain: &str,
    name: &str,
    h: &Handling<'_>,
    local: Option<&LocalMatch>,
    chain_of: &dyn Fn(&[SocketAddr]) -> String,
) {
    rs.nat.entry(chain.to_string()).or_default();
    let jump = |c: &ClassHandling<'_>| match c.targets {
        Targets::Backends(b) => Some(chain_of(b)),
        Targets::Reject | Targets::Drop => None,
    };
    if h.split() {
        for (m, class) in internal_sources(local) {
            if h.internal.masquerade.applies(class) {
                push(
                    &mut rs.nat,
                    chain,
                    format!(
                        "-m comment --comment \"masquerade traffic for {name} external destinations\" {m} -j KUBE-MARK-MASQ"
                    ),
                );
            }
            // Without backends for this class, stop here: the filter table answers.
            let target = jump(&h.internal).unwrap_or_else(|| "RETURN".into());
            push(
                &mut rs.nat,
                chain,
                format!(
                    "-m comment --comment \"route internal traffic for {name} external destinations\" {m} -j {target}"
                ),
            );
        }
    }
    let c = if h.split() { &h.external } else { &h.internal };
    let masq_rule = match c.masquerade {
        Masquerade::Never => None,
        Masquerade::Always => Some(String::new()),
        Masquerade::UnlessFromPods => local.map(|l| format!("{} ", l.not)),
        Masquerade::FromNode => Some("-m addrtype --src-type LOCAL ".to_string()),
    };
    if let Some(m) = masq_rule {
        push(
            &mut rs.nat,
            chain,
            format!(
                "-m comment --comment \"masquerade traffic for {name} external destinations\" {m}-j KUBE-MARK-MASQ"
            ),
        );
    }
    if let Some(target) = jump(c) {
        push(&mut rs.nat, chain, format!("-j {target}"));
    }
}

/// REJECT or DROP in the filter table for the classes of a frontend that have no backends.
fn filter_verdicts(
    rs: &mut Ruleset,
    chain: &str,
    name: &str,
    matcher: &str,
    h: &Handling<'_>,
    local: Option<&LocalMatch>,
) {
    // TCP is refused with a reset: an ICMPv6 error for a locally sent SYN reaches a
    // non-blocking connect() only with the SYN's retransmission, a second later.
    let reject = if matcher.contains("-p tcp") {
        "REJECT --reject-with tcp-reset"
    } else {
        "REJECT"
    };
    let verdict = |t: &Targets| match t {
        Targets::Reject => Some(("has no endpoints", reject)),
        Targets::Drop => Some(("has no local endpoints", "DROP")),
        Targets::Backends(_) => None,
    };
    let (vi, ve) = (verdict(h.internal.targets), verdict(h.external.targets));
    if vi == ve {
        if let Some((why, target)) = vi {
            push(
                &mut rs.filter,
                chain,
                format!("-m comment --comment \"{name} {why}\" {matcher} -j {target}"),
            );
        }
        return;
    }
    // The classes differ. Translated packets never reach these rules (their destination
    // changed), so each rule only has to name the sources it is for.
    if let Some((why, target)) = vi {
        for (m, _) in internal_sources(local) {
            push(
                &mut rs.filter,
                chain,
                format!("-m comment --comment \"{name} {why}\" {m} {matcher} -j {target}"),
            );
        }
    }
    if let Some((why, target)) = ve {
        push(
            &mut rs.filter,
            chain,
            format!("-m comment --comment \"{name} {why}\" {matcher} -j {target}"),
        );
    }
}

/// The `iptables-restore --noflush` input that turns `old` (what kpr wrote last, or what the
/// kernel holds) into `new`: every chain of `new` whose rules differ is declared (which
/// flushes it) and rewritten; chains only in `old` are flushed and deleted. `None` when
/// nothing differs.
#[must_use]
pub fn restore_input(old: &Ruleset, new: &Ruleset) -> Option<String> {
    let mut out = String::new();
    let mut changed = false;
    for (table, o, n) in [
        ("filter", &old.filter, &new.filter),
        ("nat", &old.nat, &new.nat),
    ] {
        let rewrite: Vec<(&String, &Vec<String>)> = n
            .iter()
            .filter(|(c, rules)| o.get(*c) != Some(*rules))
            .collect();
        let gone: Vec<&String> = o.keys().filter(|c| !n.contains_key(*c)).collect();
        if rewrite.is_empty() && gone.is_empty() {
            continue;
        }
        changed = true;
        let _ = writeln!(out, "*{table}");
        for (c, _) in &rewrite {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &gone {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for (_, rules) in &rewrite {
            for r in *rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        for c in &gone {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    //! Address plan: node 192.168.0.2 ("node-a"), pod CIDR 10.0.0.0/8; ns1/svc1 ClusterIP
    //! 172.30.0.41:80 (NodePort 3001); endpoints 10.180.0.1 (node-a) and 10.180.2.1 (node-b).
    use super::*;
    use crate::model::{NodeInfo, ProxyConfig, compute};
    use crate::store::{Protocol, ServiceInfo, SliceInfo};
    use crate::testkit::{self, endpoint, service};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            labels: Default::default(),
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        }
    }

    fn desired(svcs: Vec<ServiceInfo>, slices: Vec<SliceInfo>) -> DesiredState {
        let config = ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::default()
        };
        compute(&testkit::store(svcs, slices), &node(), &config)
    }

    fn svc1() -> crate::testkit::ServiceBuilder {
        service("ns1", "svc1")
            .cluster_ip("172.30.0.41")
            .port("p80", 80, Protocol::Tcp, 80)
    }

    fn slice1(eps: &[&str]) -> SliceInfo {
        let eps: Vec<_> = eps
            .iter()
            .map(|ip| {
                endpoint(
                    ip,
                    if ip.contains(".0.") {
                        "node-a"
                    } else {
                        "node-b"
                    },
                )
            })
            .collect();
        testkit::slice("ns1", "svc1-1", "svc1")
            .port("p80", 80, Protocol::Tcp)
            .endpoints(&eps)
            .build()
    }

    fn has(chains: &Chains, chain: &str, rule: &str) -> bool {
        chains
            .get(chain)
            .is_some_and(|rules| rules.iter().any(|r| r == &format!("-A {chain} {rule}")))
    }

    #[test]
    fn cluster_ip_in_upstream_layout() {
        let d = desired(
            vec![svc1().build()],
            vec![slice1(&["10.180.0.1", "10.180.2.1"])],
        );
        let rs = build(&d, Family::V4);
        let svc = "KUBE-SVC-XPGD46QRK7WJZT7O";
        assert!(
            has(
                &rs.nat,
                "KUBE-SERVICES",
                &format!(
                    "-m comment --comment \"ns1/svc1:p80 cluster IP\" -d 172.30.0.41/32 -m tcp -p tcp --dport 80 -j {svc}"
                )
            ),
            "{:#?}",
            rs.nat
        );
        let rules = &rs.nat[svc];
        assert_eq!(rules.len(), 3, "{rules:#?}");
        assert!(
            rules[0].contains("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"),
            "{}",
            rules[0]
        );
        assert!(
            rules[1].contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"),
            "{}",
            rules[1]
        );
        assert!(
            !rules[2].contains("statistic"),
            "the last endpoint takes the rest"
        );
        let seps: Vec<&String> = rs
            .nat
            .keys()
            .filter(|c| c.starts_with("KUBE-SEP-"))
            .collect();
        assert_eq!(seps.len(), 2);
        assert!(
            rs.nat[seps[0]]
                .iter()
                .any(|r| r.contains("-j DNAT --to-destination 10.180."))
        );
        assert!(
            rs.filter["KUBE-SERVICES"].is_empty(),
            "endpoints: no REJECT"
        );
    }

    #[test]
    fn every_local_traffic_detector_reaches_the_masquerade_rule() {
        use crate::model::LocalDetector;
        let mut n = node();
        n.pod_cidrs = vec!["10.1.2.0/24".parse().unwrap()];
        for (detector, want) in [
            (
                LocalDetector::ClusterCidr,
                "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            ),
            (
                LocalDetector::NodeCidr,
                "! -s 10.1.2.0/24 -j KUBE-MARK-MASQ",
            ),
            (
                LocalDetector::BridgeInterface("cbr0".into()),
                "! -i cbr0 -j KUBE-MARK-MASQ",
            ),
            (
                LocalDetector::InterfaceNamePrefix("veth".into()),
                "! -i veth+ -j KUBE-MARK-MASQ",
            ),
        ] {
            let config = ProxyConfig {
                cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                local_detector: detector.clone(),
                ..ProxyConfig::default()
            };
            let d = compute(
                &testkit::store(vec![svc1().build()], vec![slice1(&["10.180.0.1"])]),
                &n,
                &config,
            );
            let rs = build(&d, Family::V4);
            let masq = rs
                .nat
                .iter()
                .filter(|(c, _)| c.starts_with("KUBE-SVC-"))
                .flat_map(|(_, r)| r)
                .find(|r| r.contains("KUBE-MARK-MASQ"))
                .unwrap_or_else(|| panic!("{detector:?}: no masquerade rule"));
            assert!(masq.ends_with(want), "{detector:?}: {masq}");
        }
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_writes_no_nat_chain() {
        let d = desired(vec![svc1().node_port(3001).build()], vec![]);
        let rs = build(&d, Family::V4);
        assert!(
            has(
                &rs.filter,
                "KUBE-SERVICES",
                "-m comment --comment \"ns1/svc1:p80 has no endpoints\" -d 172.30.0.41/32 -m tcp -p tcp --dport 80 -j REJECT --reject-with tcp-reset"
            ),
            "{:#?}",
            rs.filter
        );
        assert!(
            has(
                &rs.filter,
                "KUBE-EXTERNAL-SERVICES",
                "-m comment --comment \"ns1/svc1:p80 has no endpoints\" -d 192.168.0.2/32 -m tcp -p tcp --dport 3001 -j REJECT --reject-with tcp-reset"
            ),
            "{:#?}",
            rs.filter
        );
        assert!(
            !rs.nat
                .keys()
                .any(|c| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-EXT-"))
        );
    }

    #[test]
    fn etp_local_short_circuits_pods_and_the_node_and_drops_without_local_endpoints() {
        let d = desired(
            vec![svc1().node_port(3001).etp_local(30000).build()],
            vec![slice1(&["10.180.2.1"])],
        );
        let rs = build(&d, Family::V4);
        let ext = &rs.nat["KUBE-EXT-XPGD46QRK7WJZT7O"];
        let text = ext.join("\n");
        assert!(
            text.contains("-s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O"),
            "{text}"
        );
        assert!(
            text.contains("-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"),
            "{text}"
        );
        assert!(
            text.contains("-m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O"),
            "{text}"
        );
        assert!(
            !text.contains("KUBE-SVL-"),
            "no local endpoints: no SVL chain"
        );
        assert!(
            has(
                &rs.filter,
                "KUBE-EXTERNAL-SERVICES",
                "-m comment --comment \"ns1/svc1:p80 has no local endpoints\" -d 192.168.0.2/32 -m tcp -p tcp --dport 3001 -j DROP"
            ),
            "{:#?}",
            rs.filter
        );
        assert!(has(
            &rs.filter,
            "KUBE-NODEPORTS",
            "-m comment --comment \"ns1/svc1 health check node port\" -m tcp -p tcp --dport 30000 -j ACCEPT"
        ));
    }

    #[test]
    fn a_partial_sync_rewrites_only_the_changed_service_chains() {
        let other = service("ns2", "svc2")
            .cluster_ip("172.30.0.42")
            .port("p80", 80, Protocol::Tcp, 80)
            .build();
        let other_slice = testkit::slice("ns2", "svc2-1", "svc2")
            .port("p80", 80, Protocol::Tcp)
            .endpoints(&[endpoint("10.180.0.9", "node-a")])
            .build();
        let before = build(
            &desired(
                vec![svc1().build(), other.clone()],
                vec![slice1(&["10.180.0.1", "10.180.2.1"]), other_slice.clone()],
            ),
            Family::V4,
        );
        let after = build(
            &desired(
                vec![svc1().build(), other],
                vec![slice1(&["10.180.0.1"]), other_slice],
            ),
            Family::V4,
        );
        let input = restore_input(&before, &after).expect("something changed");
        let declared: Vec<&str> = input.lines().filter(|l| l.starts_with(':')).collect();
        assert_eq!(
            declared.len(),
            2,
            "svc1's SVC chain rewritten and its removed endpoint's SEP chain dropped, nothing else: {input}"
        );
        assert!(input.contains(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]"));
        assert_eq!(
            input
                .lines()
                .filter(|l| l.starts_with("-X KUBE-SEP-"))
                .count(),
            1
        );
        assert!(!input.contains("svc2"), "svc2 untouched: {input}");
        assert_eq!(restore_input(&after, &after), None, "no change, no restore");
    }
}
