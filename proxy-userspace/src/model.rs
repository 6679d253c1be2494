//! The model: a pure function from (store, node, config) to the desired state.
//!
//! All of upstream kube-proxy's semantics live here and only here: which endpoints are usable
//! (ready, then serving+terminating fallback), traffic policies, topology hints, which
//! frontends a Service has, and — through [`resolve`] — what happens to one packet, including
//! the masquerade decision. Every renderer and the conformance runner read this output.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::store::{EndpointInfo, ObjectRef, Protocol, ServiceInfo, ServicePortInfo, ServiceType, Store};

/// This node, as the model needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The first is the primary node IP.
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str)
    }
}

/// Which node addresses NodePorts are served on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every node IP (iptables/ipvs/ebpf default).
    #[default]
    All,
    /// The primary node IP only (nftables default, `["primary"]`).
    Primary,
    /// Node IPs inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// The knobs of KubeProxyConfiguration that change the model's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Traffic from these is pod traffic (detectLocalMode ClusterCIDR). Empty: no detector.
    pub cluster_cidrs: Vec<IpNet>,
    pub service_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub node_port_addresses: NodePortAddresses,
    pub localhost_node_ports: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            masquerade_all: false,
            node_port_addresses: NodePortAddresses::All,
            localhost_node_ports: true,
        }
    }
}

/// What a frontend does with one class of traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Targets {
    /// DNAT to one of these (sorted, deduplicated).
    Backends(Vec<SocketAddr>),
    /// No endpoint anywhere: refuse at once.
    Reject,
    /// Endpoints exist, but none this traffic may use (a Local policy without local
    /// endpoints): drop silently.
    Drop,
}

impl Targets {
    #[must_use]
    pub fn backends(&self) -> &[SocketAddr] {
        match self {
            Self::Backends(b) => b,
            Self::Reject | Self::Drop => &[],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One address:port:protocol a Service answers on, and where its traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectRef,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Traffic from pods and from the node itself.
    pub internal: Targets,
    /// Traffic from outside the cluster (equal to `internal` for ClusterIP frontends).
    pub external: Targets,
    pub external_policy_local: bool,
    pub affinity_timeout_secs: Option<u32>,
}

/// The desired state: every frontend on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Services with externalTrafficPolicy Local: their healthCheckNodePort and local
    /// endpoint count.
    pub health_checks: BTreeMap<ObjectRef, (u16, usize)>,
}

/// One endpoint for one Service port, after slices are merged.
#[derive(Clone, Debug)]
struct Candidate<'a> {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    info: &'a EndpointInfo,
}

/// Merges a Service's slices into the endpoints of one Service port. An address in several
/// slices appears once; it is ready if any copy is ready.
fn endpoints_for_port<'a>(
    store: &'a Store,
    svc: &ServiceInfo,
    port: &ServicePortInfo,
    node: &NodeInfo,
) -> Vec<Candidate<'a>> {
    let mut merged: BTreeMap<SocketAddr, Candidate<'a>> = BTreeMap::new();
    for slice in store.slices_for(&svc.id) {
        let Some(ep_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let local = ep.node_name.as_deref() == Some(node.name.as_str());
            // publishNotReadyAddresses: every endpoint counts as ready (upstream
            // endpointslicecache.go).
            let ready = ep.ready || svc.publish_not_ready_addresses;
            for ip in &ep.addresses {
                let addr = SocketAddr::new(*ip, ep_port.port);
                let c = Candidate {
                    addr,
                    ready,
                    serving: ep.serving || ready,
                    terminating: ep.terminating,
                    local,
                    info: ep,
                };
                merged
                    .entry(addr)
                    .and_modify(|old| {
                        if c.ready && !old.ready {
                            *old = c.clone();
                        }
                    })
                    .or_insert(c);
            }
        }
    }
    merged.into_values().collect()
}

/// upstream topology.go `topologyModeFromHints`: node hints win when every ready endpoint has
/// them and one names this node; otherwise zone hints when every ready endpoint has them and
/// one names this zone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    Node,
    Zone,
}

fn topology_mode(eps: &[Candidate<'_>], node: &NodeInfo) -> TopologyMode {
    let zone = node.zone();
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in eps.iter().filter(|e| e.ready) {
        match &ep.info.hint_nodes {
            Some(n) if !n.is_empty() => for_node |= n.contains(&node.name),
            _ => all_node_hints = false,
        }
        match &ep.info.hint_zones {
            Some(z) if !z.is_empty() => for_zone |= zone.is_some_and(|zone| z.contains(zone)),
            _ => all_zone_hints = false,
        }
    }
    if all_node_hints && for_node {
        TopologyMode::Node
    } else if all_zone_hints && for_zone {
        TopologyMode::Zone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &Candidate<'_>, mode: TopologyMode, node: &NodeInfo) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::Node => ep
            .info
            .hint_nodes
            .as_ref()
            .is_some_and(|n| n.contains(&node.name)),
        TopologyMode::Zone => {
            let zone = node.zone();
            ep.info
                .hint_zones
                .as_ref()
                .is_some_and(|z| zone.is_some_and(|zone| z.contains(zone)))
        }
    }
}

/// upstream topology.go `CategorizeEndpoints`.
struct Categorized {
    cluster: Vec<SocketAddr>,
    local: Vec<SocketAddr>,
    has_any: bool,
}

fn categorize(eps: &[Candidate<'_>], svc: &ServiceInfo, node: &NodeInfo) -> Categorized {
    let externally = svc.externally_accessible();
    let uses_cluster = !svc.internal_policy_local || (externally && !svc.external_policy_local);
    let uses_local = svc.internal_policy_local || (externally && svc.external_policy_local);
    let mut out = Categorized {
        cluster: Vec::new(),
        local: Vec::new(),
        has_any: false,
    };
    if uses_cluster {
        let mode = topology_mode(eps, node);
        out.cluster = eps
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node))
            .map(|e| e.addr)
            .collect();
        if out.cluster.is_empty() {
            out.cluster = eps
                .iter()
                .filter(|e| e.serving && e.terminating && available_for_topology(e, mode, node))
                .map(|e| e.addr)
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in eps {
        if e.ready {
            out.has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            out.has_any = true;
            local_serving_terminating |= e.local;
        }
    }
    if local_ready {
        out.local = eps.iter().filter(|e| e.local && e.ready).map(|e| e.addr).collect();
    } else if local_serving_terminating {
        out.local = eps
            .iter()
            .filter(|e| e.local && e.serving && e.terminating)
            .map(|e| e.addr)
            .collect();
    }
    out
}

fn targets(backends: &[SocketAddr], policy_local: bool, has_any: bool) -> Targets {
    if !backends.is_empty() {
        let mut b = backends.to_vec();
        b.sort_unstable();
        b.dedup();
        Targets::Backends(b)
    } else if policy_local && has_any {
        Targets::Drop
    } else {
        Targets::Reject
    }
}

/// Node IPs that serve NodePorts under `config`.
#[must_use]
pub fn node_port_ips(node: &NodeInfo, config: &ProxyConfig) -> Vec<IpAddr> {
    match &config.node_port_addresses {
        NodePortAddresses::All => node.ips.clone(),
        NodePortAddresses::Primary => node.ips.first().copied().into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => node
            .ips
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
            .collect(),
    }
}

/// Computes the desired state. Pure: the same inputs give the same output.
#[must_use]
pub fn compute(store: &Store, node: &NodeInfo, config: &ProxyConfig) -> DesiredState {
    let mut state = DesiredState::default();
    let node_port_ips = node_port_ips(node, config);
    for svc in store.services() {
        // ExternalName and headless Services are not proxied.
        if svc.type_ == ServiceType::ExternalName || svc.cluster_ips.is_empty() {
            continue;
        }
        let mut local_endpoint_count = BTreeSet::new();
        for port in &svc.ports {
            let eps = endpoints_for_port(store, svc, port, node);
            let cat = categorize(&eps, svc, node);
            local_endpoint_count.extend(cat.local.iter().map(SocketAddr::ip));
            let cluster_targets = targets(&cat.cluster, false, cat.has_any);
            let internal = if svc.internal_policy_local {
                targets(&cat.local, true, cat.has_any)
            } else {
                cluster_targets.clone()
            };
            let external = if svc.external_policy_local {
                targets(&cat.local, true, cat.has_any)
            } else {
                cluster_targets.clone()
            };
            // Each frontend only serves its own family; endpoints of the other family are
            // not reachable through it.
            let same_family = |t: &Targets, ip: &IpAddr| match t {
                Targets::Backends(b) => {
                    let f: Vec<_> = b.iter().copied().filter(|a| a.is_ipv4() == ip.is_ipv4()).collect();
                    if f.is_empty() { Targets::Reject } else { Targets::Backends(f) }
                }
                other => other.clone(),
            };
            let mut add = |ip: IpAddr, port_num: u16, kind: FrontendKind, internal: &Targets, external: &Targets| {
                let key = FrontendKey {
                    ip,
                    port: port_num,
                    protocol: port.protocol,
                };
                state.frontends.insert(
                    key,
                    Frontend {
                        service: svc.id.clone(),
                        port_name: port.name.clone(),
                        kind,
                        internal: same_family(internal, &ip),
                        external: same_family(external, &ip),
                        external_policy_local: svc.external_policy_local,
                        affinity_timeout_secs: svc.affinity_timeout_secs,
                    },
                );
            };
            for ip in &svc.cluster_ips {
                add(*ip, port.port, FrontendKind::ClusterIp, &internal, &internal);
            }
            // Pods reaching an externally-facing address of an eTP=Local Service use the
            // cluster endpoints (upstream's "short-circuit" of pod traffic).
            for ip in &svc.external_ips {
                add(*ip, port.port, FrontendKind::ExternalIp, &cluster_targets, &external);
            }
            for ip in &svc.load_balancer_ips {
                add(*ip, port.port, FrontendKind::LoadBalancer, &cluster_targets, &external);
            }
            if let Some(node_port) = port.node_port {
                for ip in &node_port_ips {
                    add(*ip, node_port, FrontendKind::NodePort, &cluster_targets, &external);
                }
            }
        }
        if svc.external_policy_local
            && let Some(hc) = svc.health_check_node_port
        {
            state
                .health_checks
                .insert(svc.id.clone(), (hc, local_endpoint_count.len()));
        }
    }
    state
}

/// One packet arriving at (or leaving from) the node, for [`resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub protocol: Protocol,
}

/// What happens to a [`Flow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Translated to one of these; the flag says whether the backend sees a node IP as source.
    Backends(Vec<(SocketAddr, bool)>),
    Reject,
    Drop,
    /// Not a Service address: left alone.
    None,
    /// Delivered to the node itself, untranslated (e.g. a healthCheckNodePort).
    Accept,
}

/// Where a flow's source is, for policy and masquerade decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceClass {
    Pod,
    Node,
    External,
}

#[must_use]
pub fn classify_source(src: IpAddr, node: &NodeInfo, config: &ProxyConfig) -> SourceClass {
    if src.is_loopback() || node.ips.contains(&src) {
        SourceClass::Node
    } else if config.cluster_cidrs.iter().any(|c| c.contains(&src)) {
        SourceClass::Pod
    } else {
        SourceClass::External
    }
}

/// The decision for one flow, with upstream's masquerade rules:
/// ClusterIP traffic is masqueraded under masqueradeAll or when it does not come from the
/// cluster CIDR; traffic to external frontends is masqueraded under eTP=Cluster, and under
/// eTP=Local only when it comes from the node itself; a pod reaching itself (hairpin) always is.
#[must_use]
pub fn resolve(state: &DesiredState, node: &NodeInfo, config: &ProxyConfig, flow: &Flow) -> Decision {
    let key = FrontendKey {
        ip: flow.dst,
        port: flow.dport,
        protocol: flow.protocol,
    };
    let Some(fe) = state.frontends.get(&key) else {
        let is_health_check = node.ips.contains(&flow.dst)
            && flow.protocol == Protocol::Tcp
            && state.health_checks.values().any(|(p, _)| *p == flow.dport);
        return if is_health_check { Decision::Accept } else { Decision::None };
    };
    let class = classify_source(flow.src, node, config);
    let (targets, masq) = if fe.kind == FrontendKind::ClusterIp {
        let off_cluster = !config.cluster_cidrs.is_empty()
            && !config.cluster_cidrs.iter().any(|c| c.contains(&flow.src));
        (&fe.internal, config.masquerade_all || off_cluster)
    } else if !fe.external_policy_local {
        let t = if class == SourceClass::External { &fe.external } else { &fe.internal };
        (t, true)
    } else {
        match class {
            SourceClass::Pod => (&fe.internal, false),
            SourceClass::Node => (&fe.internal, true),
            SourceClass::External => (&fe.external, false),
        }
    };
    match targets {
        Targets::Reject => Decision::Reject,
        Targets::Drop => Decision::Drop,
        Targets::Backends(b) => Decision::Backends(
            b.iter().map(|a| (*a, masq || a.ip() == flow.src)).collect(),
        ),
    }
}
