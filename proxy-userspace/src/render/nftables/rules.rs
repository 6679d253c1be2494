//! kpr's nftables table for one IP family, generated from the desired state in the spirit of
//! upstream kube-proxy's nftables mode (`pkg/proxy/nftables/proxier.go`): dispatch by verdict
//! maps keyed by (address, protocol, port), so finding a Service is O(1) whatever their number.
//! Pure data, no kernel access; [`transaction`] turns two states into one `nft -f` input.
//!
//! - `services` (nat prerouting/output): `@service-ips` and `@service-nodeports` (on
//!   `@nodeport-ips`) jump to per-Service-port chains: `service-*` (the backends pods and the
//!   node use), `local-*` (eTP=Local's local backends), `external-*` (traffic class split and
//!   masquerade), `endpoint-*` (hairpin mark, affinity, DNAT).
//! - filter: `@no-endpoint-services` / `@no-endpoint-nodeports` reject or drop where a class has
//!   no backends, `@firewall-ips` drops sources outside loadBalancerSourceRanges, and
//!   `cluster-ips-check` rejects unserved ports of ClusterIPs and drops unallocated Service
//!   addresses (when the model asks for it).
//! - `masquerading` (nat postrouting) masquerades marked traffic.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use sha2::{Digest as _, Sha256};

use crate::model::{DesiredState, FrontendKind, Masquerade, SourceClass, Targets};
use crate::render::plan::{Family, Handling, ServicePort, proto_lower, service_ports};

/// kpr's table name (one per family: `ip kpr`, `ip6 kpr`).
pub const TABLE: &str = "kpr";

/// The masquerade mark.
pub const MASQ_MARK: &str = "0x4000";

/// A set or map: its declaration body and elements (key -> value, "" for sets).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Set {
    pub is_map: bool,
    pub decl: String,
    pub elements: BTreeMap<String, String>,
}

/// Everything in kpr's table of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub family: &'static str,
    /// Base chains: name -> declaration (`type nat hook prerouting priority -100 ;`).
    pub base: BTreeMap<String, String>,
    /// Every chain (base and regular) -> its rules.
    pub chains: BTreeMap<String, Vec<String>>,
    pub sets: BTreeMap<String, Set>,
}

/// upstream `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name, at most 240 bytes.
fn hashed(prefix: &str, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut hash = data_encoding::BASE32.encode(&digest);
    hash.truncate(8);
    let mut out = format!("{prefix}{hash}-{name}");
    if out.len() > 240 {
        out.truncate(237);
        out.push_str("...");
    }
    out
}

fn port_base(port: &ServicePort<'_>) -> String {
    format!(
        "{}/{}/{}/{}",
        port.service.namespace,
        port.service.name,
        proto_lower(port.protocol),
        port.port_name
    )
}

fn endpoint_base(port: &ServicePort<'_>, ep: &SocketAddr) -> String {
    let ip = ep.ip().to_string().replace(':', ".");
    format!("{}__{ip}/{}", port_base(port), ep.port())
}

fn addr(ip: IpAddr) -> String {
    ip.to_string()
}

fn dnat_to(ep: &SocketAddr) -> String {
    match ep {
        SocketAddr::V4(v4) => format!("{}:{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

impl Table {
    fn chain(&mut self, name: &str) -> &mut Vec<String> {
        self.chains.entry(name.to_string()).or_default()
    }

    fn rule(&mut self, chain: &str, rule: impl Into<String>) {
        self.chain(chain).push(rule.into());
    }

    fn set(&mut self, name: &str, is_map: bool, decl: &str) -> &mut Set {
        self.sets.entry(name.to_string()).or_insert_with(|| Set {
            is_map,
            decl: decl.to_string(),
            elements: BTreeMap::new(),
        })
    }

    fn element(&mut self, set: &str, key: String, value: String) {
        if let Some(s) = self.sets.get_mut(set) {
            s.elements.insert(key, value);
        }
    }
}

/// Builds the table of `family` from `desired`.
#[must_use]
#[expect(clippy::too_many_lines, reason = "one table, written top to bottom")]
pub fn build(desired: &DesiredState, family: Family) -> Table {
    let (fam, ip, addr_type, loopback) = match family {
        Family::V4 => ("ip", "ip", "ipv4_addr", "127.0.0.0/8"),
        Family::V6 => ("ip6", "ip6", "ipv6_addr", "::1"),
    };
    let mut t = Table {
        family: fam,
        ..Table::default()
    };
    for (name, decl) in [
        (
            "filter-prerouting-pre-dnat",
            "type filter hook prerouting priority -110 ;",
        ),
        (
            "filter-output-pre-dnat",
            "type filter hook output priority -110 ;",
        ),
        ("filter-input", "type filter hook input priority 0 ;"),
        ("filter-forward", "type filter hook forward priority 0 ;"),
        ("filter-output", "type filter hook output priority 0 ;"),
        ("nat-prerouting", "type nat hook prerouting priority -100 ;"),
        ("nat-output", "type nat hook output priority -100 ;"),
        (
            "nat-postrouting",
            "type nat hook postrouting priority 100 ;",
        ),
    ] {
        t.base.insert(name.into(), decl.into());
        t.chain(name);
    }
    let key3 = format!("{addr_type} . inet_proto . inet_service : verdict ;");
    t.set("cluster-ips", false, &format!("type {addr_type} ;"));
    t.set(
        "nodeport-ips",
        false,
        &format!("type {addr_type} ; flags interval ;"),
    );
    t.set("service-ips", true, &format!("type {key3}"));
    t.set(
        "service-nodeports",
        true,
        "type inet_proto . inet_service : verdict ;",
    );
    t.set("no-endpoint-services", true, &format!("type {key3}"));
    t.set(
        "no-endpoint-nodeports",
        true,
        "type inet_proto . inet_service : verdict ;",
    );
    t.set("firewall-ips", true, &format!("type {key3}"));

    for (chain, rule) in [
        ("filter-input", "ct state new jump nodeport-endpoints-check"),
        ("filter-input", "ct state new jump service-endpoints-check"),
        (
            "filter-forward",
            "ct state new jump service-endpoints-check",
        ),
        ("filter-output", "ct state new jump service-endpoints-check"),
        (
            "filter-prerouting-pre-dnat",
            "ct state new jump firewall-check",
        ),
        ("filter-output-pre-dnat", "ct state new jump firewall-check"),
        ("nat-output", "jump services"),
        ("nat-prerouting", "jump services"),
        ("nat-postrouting", "jump masquerading"),
    ] {
        t.rule(chain, rule);
    }
    t.rule(
        "mark-for-masquerade",
        format!("mark set mark or {MASQ_MARK}"),
    );
    // A pod reaching itself through a Service (hairpin) is masqueraded: after DNAT its source
    // and destination are the same endpoint (upstream's newest layout; no chain per endpoint).
    t.set(
        "hairpin-connections",
        false,
        &format!("type {addr_type} . {addr_type} . inet_proto . inet_service ;"),
    );
    t.rule(
        "masquerading",
        format!("ct status dnat {ip} saddr . {ip} daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"),
    );
    t.rule("masquerading", format!("mark and {MASQ_MARK} == 0 return"));
    t.rule("masquerading", format!("mark set mark xor {MASQ_MARK}"));
    t.rule("masquerading", "masquerade fully-random");
    // TCP is refused with a reset: an ICMPv6 error for a locally sent SYN reaches a
    // non-blocking connect() only with the SYN's retransmission, a second later.
    t.rule("reject-chain", "meta l4proto tcp reject with tcp reset");
    t.rule("reject-chain", "reject");
    t.rule(
        "service-endpoints-check",
        format!("{ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    );
    t.rule(
        "nodeport-endpoints-check",
        format!("{ip} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    t.rule(
        "firewall-check",
        format!("{ip} daddr . meta l4proto . th dport vmap @firewall-ips"),
    );
    t.rule(
        "services",
        format!("{ip} daddr . meta l4proto . th dport vmap @service-ips"),
    );
    t.rule(
        "services",
        format!("{ip} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
    );
    if let Some(cidrs) = &desired.cluster_ip_checks {
        t.rule("filter-forward", "ct state new jump cluster-ips-check");
        t.rule("filter-output", "ct state new jump cluster-ips-check");
        t.rule(
            "cluster-ips-check",
            format!("{ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
        );
        let mine: Vec<String> = cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
            .map(ToString::to_string)
            .collect();
        if !mine.is_empty() {
            t.rule(
                "cluster-ips-check",
                format!(
                    "{ip} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                    mine.join(", ")
                ),
            );
        }
    }
    if family == Family::V4 && desired.localhost_node_ports {
        t.element("nodeport-ips", loopback.to_string(), String::new());
    }
    let local = local_match(desired, family, ip);
    for port in service_ports(desired)
        .values()
        .filter(|p| p.family == family)
    {
        service_port(&mut t, port, ip, local.as_ref());
    }
    t
}

/// The local-traffic detector as rule matches: pod traffic, and everything else.
struct LocalMatch {
    is: String,
    not: String,
}

/// nftables' spelling for `family` (`ip` is `ip` or `ip6`): `ip saddr CIDR`, `iifname "IFACE"`
/// or `iifname "PREFIX*"`.
fn local_match(desired: &DesiredState, family: Family, ip: &str) -> Option<LocalMatch> {
    use crate::model::PodInterface;
    let (is, not) = match &desired.pod_interface {
        Some(PodInterface::Exact(i)) => (format!("iifname \"{i}\""), format!("iifname != \"{i}\"")),
        Some(PodInterface::Prefix(p)) => {
            (format!("iifname \"{p}*\""), format!("iifname != \"{p}*\""))
        }
        None => {
            let c = desired
                .pod_cidrs
                .iter()
                .find(|c| Family::of(&c.addr()) == family)?;
            (format!("{ip} saddr {c}"), format!("{ip} saddr != {c}"))
        }
    };
    Some(LocalMatch { is, not })
}

fn service_port(t: &mut Table, port: &ServicePort<'_>, ip: &str, local: Option<&LocalMatch>) {
    let base = port_base(port);
    let proto = proto_lower(port.protocol);
    let sets = port.backend_sets();
    let chain_of = |backends: &[SocketAddr]| -> String {
        match sets.iter().position(|s| *s == backends) {
            Some(0) => hashed("service-", &base),
            Some(1) => hashed("local-", &base),
            _ => hashed("service-", &format!("{base}/{}", backends.len())),
        }
    };
    let affinity = port.affinity();
    let endpoints = port.endpoints();
    for ep in &endpoints {
        t.element(
            "hairpin-connections",
            format!(
                "{} . {} . {proto} . {}",
                addr(ep.ip()),
                addr(ep.ip()),
                ep.port()
            ),
            String::new(),
        );
    }
    // Chains per endpoint only for ClientIP affinity (they remember the client); otherwise the
    // Service chain DNATs through a numgen map.
    if let Some(secs) = affinity {
        for ep in &endpoints {
            let eb = endpoint_base(port, ep);
            let chain = hashed("endpoint-", &eb);
            let set = hashed("affinity-", &eb);
            let addr_type = if ep.is_ipv4() {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            t.set(
                &set,
                false,
                &format!("type {addr_type} ; flags dynamic,timeout ; timeout {secs}s ;"),
            );
            t.rule(&chain, format!("update @{set} {{ {ip} saddr }}"));
            t.rule(
                &chain,
                format!("meta l4proto {proto} dnat to {}", dnat_to(ep)),
            );
        }
    }
    // ClusterIP masquerade rules sit in the chain the ClusterIP goes to.
    for (key, fe) in &port.frontends {
        if fe.kind != FrontendKind::ClusterIp {
            continue;
        }
        t.element("cluster-ips", addr(key.ip), String::new());
        if let Targets::Backends(b) = &fe.internal {
            let chain = chain_of(b);
            let daddr = format!("{ip} daddr {}", addr(key.ip));
            let rule = match (fe.internal_masquerade, local) {
                (Masquerade::Always, _) => Some(format!("{daddr} jump mark-for-masquerade")),
                (Masquerade::UnlessFromPods, Some(l)) => {
                    Some(format!("{daddr} {} jump mark-for-masquerade", l.not))
                }
                (Masquerade::FromNode, _) => Some(format!(
                    "{daddr} fib saddr type local jump mark-for-masquerade"
                )),
                _ => None,
            };
            if let Some(r) = rule {
                t.rule(&chain, r);
            }
        }
    }
    for set in &sets {
        let chain = chain_of(set);
        if affinity.is_some() {
            for ep in set.iter() {
                let eb = endpoint_base(port, ep);
                t.rule(
                    &chain,
                    format!(
                        "{ip} saddr @{} goto {}",
                        hashed("affinity-", &eb),
                        hashed("endpoint-", &eb)
                    ),
                );
            }
        }
        if affinity.is_some() {
            let picks: Vec<String> = set
                .iter()
                .enumerate()
                .map(|(i, ep)| {
                    format!(
                        "{i} : goto {}",
                        hashed("endpoint-", &endpoint_base(port, ep))
                    )
                })
                .collect();
            t.rule(
                &chain,
                format!(
                    "numgen random mod {} vmap {{ {} }}",
                    set.len(),
                    picks.join(" , ")
                ),
            );
        } else if let [only] = &set[..] {
            t.rule(
                &chain,
                format!("meta l4proto {proto} dnat to {}", dnat_to(only)),
            );
        } else {
            let picks: Vec<String> = set
                .iter()
                .enumerate()
                .map(|(i, ep)| format!("{i} : {} . {}", addr(ep.ip()), ep.port()))
                .collect();
            t.rule(
                &chain,
                format!(
                    "meta l4proto {proto} dnat {ip} addr . port to numgen random mod {} map {{ {} }}",
                    set.len(),
                    picks.join(" , ")
                ),
            );
        }
    }
    let ext_chain = hashed("external-", &base);
    let fw_chain = hashed("firewall-", &base);
    let mut ext_written = false;
    for (key, fe) in &port.frontends {
        let h = Handling::of(fe);
        let comment = format!("comment \"{}\"", port.name());
        let verdict = |targets: &Targets| match targets {
            Targets::Reject => Some("goto reject-chain".to_string()),
            Targets::Drop => Some("drop".to_string()),
            Targets::Backends(_) => None,
        };
        // A class without backends is answered in the filter hooks; translated packets never
        // get there, so the external class's verdict covers the untranslated rest.
        let no_endpoints = verdict(h.external.targets).or_else(|| verdict(h.internal.targets));
        let is_node_port = fe.kind == FrontendKind::NodePort;
        if is_node_port {
            t.element("nodeport-ips", addr(key.ip), String::new());
        }
        if let Some(v) = no_endpoints {
            if is_node_port {
                t.element(
                    "no-endpoint-nodeports",
                    format!("{proto} . {} {comment}", key.port),
                    v,
                );
            } else {
                t.element(
                    "no-endpoint-services",
                    format!("{} . {proto} . {} {comment}", addr(key.ip), key.port),
                    v,
                );
            }
        }
        let any_backends = matches!(h.internal.targets, Targets::Backends(_))
            || matches!(h.external.targets, Targets::Backends(_));
        if !any_backends {
            continue;
        }
        let target = if fe.kind == FrontendKind::ClusterIp {
            match &fe.internal {
                Targets::Backends(b) => chain_of(b),
                _ => continue,
            }
        } else {
            if !ext_written {
                ext_written = true;
                external_chain(t, &ext_chain, &h, local, &chain_of);
            }
            ext_chain.clone()
        };
        if is_node_port {
            t.element(
                "service-nodeports",
                format!("{proto} . {}", key.port),
                format!("goto {target}"),
            );
        } else {
            t.element(
                "service-ips",
                format!("{} . {proto} . {}", addr(key.ip), key.port),
                format!("goto {target}"),
            );
        }
        if fe.kind == FrontendKind::LoadBalancer && !fe.source_ranges.is_empty() {
            let mut allowed: Vec<String> =
                fe.source_ranges.iter().map(ToString::to_string).collect();
            // Node traffic that the network presents with the LB IP as its source.
            allowed.push(addr(key.ip));
            t.chains.entry(fw_chain.clone()).or_insert_with(|| {
                vec![format!("{ip} saddr != {{ {} }} drop", allowed.join(", "))]
            });
            t.element(
                "firewall-ips",
                format!("{} . {proto} . {}", addr(key.ip), key.port),
                format!("goto {fw_chain}"),
            );
        }
    }
}

/// `external-*`: masquerade and pick per traffic class.
fn external_chain(
    t: &mut Table,
    chain: &str,
    h: &Handling<'_>,
    local: Option<&LocalMatch>,
    chain_of: &dyn Fn(&[SocketAddr]) -> String,
) {
    let goto = |targets: &Targets| match targets {
        Targets::Backends(b) => format!("goto {}", chain_of(b)),
        Targets::Reject | Targets::Drop => "return".to_string(),
    };
    if h.split() {
        if let Some(l) = local {
            if h.internal.masquerade.applies(SourceClass::Pod) {
                t.rule(chain, format!("{} jump mark-for-masquerade", l.is));
            }
            t.rule(
                chain,
                format!(
                    "{} {} comment \"short-circuit pod traffic\"",
                    l.is,
                    goto(h.internal.targets)
                ),
            );
        }
        if h.internal.masquerade.applies(SourceClass::Node) {
            t.rule(
                chain,
                "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"",
            );
        }
        t.rule(
            chain,
            format!(
                "fib saddr type local {} comment \"short-circuit local traffic\"",
                goto(h.internal.targets)
            ),
        );
    }
    let c = if h.split() { &h.external } else { &h.internal };
    match (c.masquerade, local) {
        (Masquerade::Always, _) => t.rule(chain, "jump mark-for-masquerade"),
        (Masquerade::UnlessFromPods, Some(l)) => {
            t.rule(chain, format!("{} jump mark-for-masquerade", l.not));
        }
        (Masquerade::FromNode, _) => t.rule(chain, "fib saddr type local jump mark-for-masquerade"),
        _ => {}
    }
    if let Targets::Backends(b) = c.targets {
        t.rule(chain, format!("goto {}", chain_of(b)));
    }
}

/// The `nft -f` input turning `old` (what kpr wrote last; `None`: unknown, rebuild) into
/// `new`, in one transaction: changed chains are flushed and rewritten, chains and sets no
/// longer wanted are deleted after the elements that point at them, and map elements are
/// added and deleted one by one. Affinity sets keep their (dynamic) entries. `None` when
/// nothing differs.
#[must_use]
pub fn transaction(old: Option<&Table>, new: &Table) -> Option<String> {
    let fam = new.family;
    let mut out = String::new();
    let empty = Table::default();
    let old_t = old.unwrap_or(&empty);
    if old.is_none() {
        let _ = writeln!(
            out,
            "add table {fam} {TABLE} {{ comment \"rules for kpr\" ; }}"
        );
    }
    // Declarations of what is new (and, on a rebuild, of everything).
    for (name, decl) in &new.base {
        if old.is_none() || !old_t.base.contains_key(name) {
            let _ = writeln!(out, "add chain {fam} {TABLE} {name} {{ {decl} }}");
        }
    }
    for name in new.chains.keys().filter(|n| !new.base.contains_key(*n)) {
        if old.is_none() || !old_t.chains.contains_key(name) {
            let _ = writeln!(out, "add chain {fam} {TABLE} {name}");
        }
    }
    for (name, set) in &new.sets {
        let kind = if set.is_map { "map" } else { "set" };
        match old_t.sets.get(name) {
            Some(o) if old.is_some() && o.decl == set.decl => {}
            _ => {
                let _ = writeln!(out, "add {kind} {fam} {TABLE} {name} {{ {} }}", set.decl);
            }
        }
    }
    // Elements: a full rebuild flushes every non-affinity set; else a diff.
    for (name, set) in &new.sets {
        let kind = if set.is_map { "map" } else { "set" };
        let dynamic = set.decl.contains("dynamic");
        if dynamic {
            continue;
        }
        let prev = if old.is_none() {
            let _ = writeln!(out, "flush {kind} {fam} {TABLE} {name}");
            None
        } else {
            old_t.sets.get(name).filter(|o| o.decl == set.decl)
        };
        if prev.is_none() && old.is_some() {
            let _ = writeln!(out, "flush {kind} {fam} {TABLE} {name}");
        }
        let empty_set = Set::default();
        let prev = prev.unwrap_or(&empty_set);
        // One command per set and 1,000 elements: nft handles each command with its own
        // lookups, so a line per element makes large transactions quadratic.
        let gone: Vec<&str> = prev
            .elements
            .iter()
            .filter(|(k, v)| new.sets[name].elements.get(*k) != Some(*v))
            .map(|(k, _)| strip_comment(k))
            .collect();
        for chunk in gone.chunks(1000) {
            let _ = writeln!(
                out,
                "delete element {fam} {TABLE} {name} {{ {} }}",
                chunk.join(", ")
            );
        }
        let added: Vec<String> = set
            .elements
            .iter()
            .filter(|(k, v)| prev.elements.get(*k) != Some(*v))
            .map(|(k, v)| {
                if set.is_map {
                    format!("{k} : {v}")
                } else {
                    k.clone()
                }
            })
            .collect();
        for chunk in added.chunks(1000) {
            let _ = writeln!(
                out,
                "add element {fam} {TABLE} {name} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
    // Rules of changed chains (a chain new in this transaction needs no flush).
    for (name, rules) in &new.chains {
        let existed = old.is_some() && old_t.chains.contains_key(name);
        if existed && old_t.chains.get(name) == Some(rules) {
            continue;
        }
        if existed {
            let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
        }
        for r in rules {
            let _ = writeln!(out, "add rule {fam} {TABLE} {name} {r}");
        }
    }
    // What is gone: elements first (above), then chains (flushed before deletion, so chains
    // that jump to each other can go in one transaction), then sets.
    let gone: Vec<&String> = old_t
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &gone {
        let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
    }
    for name in &gone {
        let _ = writeln!(out, "delete chain {fam} {TABLE} {name}");
    }
    for (name, set) in &old_t.sets {
        if !new.sets.contains_key(name) {
            let kind = if set.is_map { "map" } else { "set" };
            let _ = writeln!(out, "delete {kind} {fam} {TABLE} {name}");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// An element key without its `comment "..."` (delete takes the bare key).
fn strip_comment(key: &str) -> &str {
    key.split(" comment ").next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    //! Address plan as in upstream's TestOverallNFTablesRules: node 192.168.0.2, pod CIDR
    //! 10.0.0.0/8, ns1/svc1 ClusterIP 172.30.0.41:80 with endpoint 10.180.0.1.
    use super::*;
    use crate::model::{NodeInfo, ProxyConfig, compute};
    use crate::store::{Protocol, ServiceInfo, SliceInfo};
    use crate::testkit::{self, endpoint, service};

    fn desired(svcs: Vec<ServiceInfo>, slices: Vec<SliceInfo>) -> DesiredState {
        let node = NodeInfo {
            name: "node-a".into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            labels: Default::default(),
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        };
        let mut config = ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
            ..ProxyConfig::default()
        };
        crate::render::apply_mode_defaults(crate::render::ProxyMode::Nftables, &mut config, false);
        compute(&testkit::store(svcs, slices), &node, &config)
    }

    fn svc(name: &str, ip: &str) -> crate::testkit::ServiceBuilder {
        service(name.replace("svc", "ns").as_str(), name)
            .cluster_ip(ip)
            .port("p80", 80, Protocol::Tcp, 80)
    }

    fn slice(name: &str, eps: &[&str]) -> SliceInfo {
        let eps: Vec<_> = eps.iter().map(|ip| endpoint(ip, "node-a")).collect();
        testkit::slice(&name.replace("svc", "ns"), &format!("{name}-1"), name)
            .port("p80", 80, Protocol::Tcp)
            .endpoints(&eps)
            .build()
    }

    #[test]
    fn chain_names_and_rules_as_upstream() {
        let t = build(
            &desired(
                vec![svc("svc1", "172.30.0.41").build()],
                vec![slice("svc1", &["10.180.0.1"])],
            ),
            Family::V4,
        );
        // Upstream's expected output names this exact chain; like upstream's newest layout,
        // no chain per endpoint without affinity.
        let service = "service-ULMVA6XW-ns1/svc1/tcp/p80";
        assert_eq!(
            t.chains[service],
            [
                "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
                "meta l4proto tcp dnat to 10.180.0.1:80",
            ]
        );
        assert!(!t.chains.keys().any(|c| c.starts_with("endpoint-")));
        assert!(
            t.sets["hairpin-connections"]
                .elements
                .contains_key("10.180.0.1 . 10.180.0.1 . tcp . 80"),
            "a pod reaching itself is masqueraded"
        );
        // With affinity, a chain per endpoint remembers the client.
        let sticky = build(
            &desired(
                vec![svc("svc5", "172.30.0.45").affinity(10800).build()],
                vec![slice("svc5", &["10.180.0.3"])],
            ),
            Family::V4,
        );
        assert_eq!(
            sticky.chains["endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"],
            [
                "update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { ip saddr }",
                "meta l4proto tcp dnat to 10.180.0.3:80",
            ]
        );
        assert_eq!(
            t.sets["service-ips"].elements.get("172.30.0.41 . tcp . 80"),
            Some(&format!("goto {service}"))
        );
        assert!(t.sets["cluster-ips"].elements.contains_key("172.30.0.41"));
        assert!(
            t.chains["cluster-ips-check"]
                .iter()
                .any(|r| r.contains("ip daddr { 172.30.0.0/16 } drop")),
            "unallocated ClusterIPs are dropped"
        );
    }

    #[test]
    fn interface_detectors_match_the_input_interface() {
        use crate::model::LocalDetector;
        for (detector, want) in [
            (
                LocalDetector::BridgeInterface("cbr0".into()),
                "iifname != \"cbr0\"",
            ),
            (
                LocalDetector::InterfaceNamePrefix("veth".into()),
                "iifname != \"veth*\"",
            ),
        ] {
            let node = NodeInfo {
                name: "node-a".into(),
                ips: vec!["192.168.0.2".parse().unwrap()],
                ..NodeInfo::default()
            };
            let config = ProxyConfig {
                local_detector: detector.clone(),
                ..ProxyConfig::default()
            };
            let d = compute(
                &testkit::store(
                    vec![svc("svc1", "172.30.0.41").build()],
                    vec![slice("svc1", &["10.180.0.1"])],
                ),
                &node,
                &config,
            );
            let t = build(&d, Family::V4);
            assert_eq!(
                t.chains["service-ULMVA6XW-ns1/svc1/tcp/p80"][0],
                format!("ip daddr 172.30.0.41 {want} jump mark-for-masquerade"),
                "{detector:?}"
            );
        }
    }

    #[test]
    fn no_endpoints_and_local_policy_verdicts() {
        let t = build(
            &desired(
                vec![
                    svc("svc6", "172.30.0.46").build(),
                    svc("svc2", "172.30.0.42")
                        .node_port(3001)
                        .etp_local(30000)
                        .build(),
                ],
                vec![{
                    let mut s = slice("svc2", &["10.180.0.2"]);
                    s.endpoints[0].node_name = Some("node-b".into());
                    s
                }],
            ),
            Family::V4,
        );
        assert_eq!(
            t.sets["no-endpoint-services"]
                .elements
                .get("172.30.0.46 . tcp . 80 comment \"ns6/svc6:p80\""),
            Some(&"goto reject-chain".to_string())
        );
        assert_eq!(
            t.sets["no-endpoint-nodeports"]
                .elements
                .get("tcp . 3001 comment \"ns2/svc2:p80\""),
            Some(&"drop".to_string()),
            "eTP=Local without local endpoints drops outside traffic"
        );
        let ext = &t.chains["external-42NFTM6N-ns2/svc2/tcp/p80"];
        assert_eq!(
            ext,
            &[
                "ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment \"short-circuit pod traffic\"",
                "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"",
                "fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment \"short-circuit local traffic\"",
            ],
        );
        assert!(t.sets["nodeport-ips"].elements.contains_key("192.168.0.2"));
    }

    #[test]
    fn an_incremental_transaction_touches_only_what_changed() {
        let before = build(
            &desired(
                vec![
                    svc("svc1", "172.30.0.41").build(),
                    svc("svc4", "172.30.0.44").build(),
                ],
                vec![
                    slice("svc1", &["10.180.0.1"]),
                    slice("svc4", &["10.180.0.4"]),
                ],
            ),
            Family::V4,
        );
        let after = build(
            &desired(
                vec![
                    svc("svc1", "172.30.0.41").build(),
                    svc("svc4", "172.30.0.44").build(),
                ],
                vec![
                    slice("svc1", &["10.180.0.1", "10.180.0.5"]),
                    slice("svc4", &["10.180.0.4"]),
                ],
            ),
            Family::V4,
        );
        let tx = transaction(Some(&before), &after).expect("a change");
        assert!(!tx.contains("svc4"), "svc4 untouched:\n{tx}");
        assert!(!tx.contains("add table"), "no rebuild:\n{tx}");
        assert!(
            tx.contains("flush chain ip kpr service-ULMVA6XW-ns1/svc1/tcp/p80"),
            "{tx}"
        );
        assert!(
            tx.contains(
                "dnat ip addr . port to numgen random mod 2 map { 0 : 10.180.0.1 . 80 , 1 : 10.180.0.5 . 80 }"
            ),
            "{tx}"
        );
        assert!(
            tx.contains(
                "add element ip kpr hairpin-connections { 10.180.0.5 . 10.180.0.5 . tcp . 80 }"
            ),
            "{tx}"
        );
        assert_eq!(transaction(Some(&after), &after), None);
        // Removing the Service deletes its chains and elements.
        let gone = build(
            &desired(
                vec![svc("svc4", "172.30.0.44").build()],
                vec![slice("svc4", &["10.180.0.4"])],
            ),
            Family::V4,
        );
        let tx = transaction(Some(&after), &gone).expect("a change");
        assert!(
            tx.contains("delete element ip kpr service-ips { 172.30.0.41 . tcp . 80 }"),
            "{tx}"
        );
        assert!(
            tx.contains("delete chain ip kpr service-ULMVA6XW-ns1/svc1/tcp/p80"),
            "{tx}"
        );
        let del_elem = tx.find("delete element").unwrap();
        let del_chain = tx.find("delete chain").unwrap();
        assert!(
            del_elem < del_chain,
            "elements go before the chains they point at"
        );
    }
}
