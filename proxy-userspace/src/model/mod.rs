//! The model: a pure function from (store, node, config) to the desired state.
//!
//! All of upstream kube-proxy's semantics live here and only here: which endpoints are usable
//! (ready, then serving+terminating fallback), traffic policies, topology hints, which
//! frontends a Service has, and — through [`resolve`] — what happens to one packet, including
//! the masquerade decision. Every renderer and the conformance runner read this output.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::store::{EndpointInfo, LbAlgorithm, ServiceInfo, ServicePortInfo, ServiceType, Store};
pub use crate::store::{NodeInfo, ObjectRef, Protocol};

mod cache;
mod resolve;
pub use cache::DesiredCache;
pub use resolve::{Decision, Flow, SourceClass, classify_source, resolve};

/// Which node addresses NodePorts are served on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every node IP (iptables/ipvs/ebpf default).
    #[default]
    All,
    /// The primary node IP of each family (nftables default, `["primary"]`).
    Primary,
    /// Node IPs inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    /// Parses `nodePortAddresses` / `--nodeport-addresses`: empty for every node IP,
    /// `primary`, or CIDRs.
    ///
    /// # Errors
    /// An entry that is neither `primary` nor a CIDR.
    pub fn parse(values: &[String]) -> crate::Result<Self> {
        if values.is_empty() {
            return Ok(Self::All);
        }
        if values.iter().any(|v| v == "primary") {
            return Ok(Self::Primary);
        }
        values
            .iter()
            .map(|v| {
                v.parse().map_err(|_| {
                    crate::Error::invalid(format!("nodePortAddresses entry {v:?} is not a CIDR"))
                })
            })
            .collect::<crate::Result<Vec<_>>>()
            .map(Self::Cidrs)
    }
}

/// How pod traffic is told from other traffic (upstream's `detectLocalMode`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalDetector {
    /// From `ProxyConfig::cluster_cidrs` (none given: no detector).
    #[default]
    ClusterCidr,
    /// From the Node's `spec.podCIDRs`.
    NodeCidr,
    /// Arriving on this bridge (`--pod-bridge-interface`).
    BridgeInterface(String),
    /// Arriving on an interface whose name starts so (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    /// Parses upstream's mode name with its interface setting.
    ///
    /// # Errors
    /// An unknown mode, or an interface mode without its interface.
    pub fn parse(mode: &str, bridge: Option<&str>, prefix: Option<&str>) -> Result<Self, String> {
        let need = |v: Option<&str>, flag: &str| {
            v.filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("detectLocalMode {mode} needs {flag}"))
        };
        match mode {
            "" | "ClusterCIDR" => Ok(Self::ClusterCidr),
            "NodeCIDR" => Ok(Self::NodeCidr),
            "BridgeInterface" => need(bridge, "--pod-bridge-interface").map(Self::BridgeInterface),
            "InterfaceNamePrefix" => {
                need(prefix, "--pod-interface-name-prefix").map(Self::InterfaceNamePrefix)
            }
            other => Err(format!(
                "unknown detectLocalMode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix)"
            )),
        }
    }
}

/// Pod traffic by the interface it arrives on (the interface-based detectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodInterface {
    Exact(String),
    Prefix(String),
}

/// The knobs of KubeProxyConfiguration that change the model's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Traffic from these is pod traffic (detectLocalMode ClusterCIDR). Empty: no detector.
    pub cluster_cidrs: Vec<IpNet>,
    pub local_detector: LocalDetector,
    pub service_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    /// The algorithm of Services without a `kpr.io/lb-algorithm` annotation.
    pub lb_algorithm: LbAlgorithm,
    pub node_port_addresses: NodePortAddresses,
    pub localhost_node_ports: bool,
    /// upstream nftables mode's ClusterIP checks: traffic to an active ClusterIP on a port it
    /// does not serve is rejected, traffic to an unallocated address of `service_cidrs`
    /// dropped.
    pub cluster_ip_checks: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            local_detector: LocalDetector::ClusterCidr,
            service_cidrs: Vec::new(),
            masquerade_all: false,
            lb_algorithm: LbAlgorithm::Random,
            node_port_addresses: NodePortAddresses::All,
            localhost_node_ports: true,
            cluster_ip_checks: false,
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

/// When one class of traffic is masqueraded (its source rewritten to a node IP, so replies
/// come back through this node). Traffic from a backend to itself through its Service
/// (hairpin) is always masqueraded, whatever this says: that rule is per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Masquerade {
    Never,
    Always,
    /// Unless the source is pod traffic by the local-traffic detector (`clusterCIDR`):
    /// ClusterIP traffic without `masqueradeAll`.
    UnlessFromPods,
    /// Only traffic from the node itself (externalTrafficPolicy Local: pods and outside
    /// clients keep their address).
    FromNode,
}

impl Masquerade {
    /// Whether traffic from `class` is masqueraded.
    #[must_use]
    pub fn applies(self, class: SourceClass) -> bool {
        match self {
            Self::Never => false,
            Self::Always => true,
            Self::UnlessFromPods => class != SourceClass::Pod,
            Self::FromNode => class == SourceClass::Node,
        }
    }
}

/// One address:port:protocol a Service answers on, and what happens to each class of its
/// traffic: everything a renderer needs, so no renderer restates a rule of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectRef,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Traffic from pods and from the node itself.
    pub internal: Targets,
    /// Traffic from outside the cluster (equal to `internal` for ClusterIP frontends).
    pub external: Targets,
    /// When `internal` traffic is masqueraded.
    pub internal_masquerade: Masquerade,
    /// When `external` traffic is masqueraded.
    pub external_masquerade: Masquerade,
    pub external_policy_local: bool,
    pub affinity_timeout_secs: Option<u32>,
    /// How the ebpf mode picks backends (the rule modes pick at random).
    pub lb_algorithm: LbAlgorithm,
    /// loadBalancerSourceRanges (LoadBalancer frontends only; empty: everyone).
    pub source_ranges: Vec<IpNet>,
}

impl Frontend {
    /// A frontend of `kind` sending every class of traffic to `targets`, unmasqueraded, with
    /// no affinity, Maglev or source ranges (the model fills these in; tests and benchmarks
    /// set what they need).
    #[must_use]
    pub fn new(service: ObjectRef, kind: FrontendKind, targets: Targets) -> Self {
        Self {
            service,
            port_name: String::new(),
            kind,
            internal: targets.clone(),
            external: targets,
            internal_masquerade: Masquerade::Never,
            external_masquerade: Masquerade::Never,
            external_policy_local: false,
            affinity_timeout_secs: None,
            lb_algorithm: LbAlgorithm::Random,
            source_ranges: Vec::new(),
        }
    }

    /// The targets and masquerade rule for traffic from `class`.
    #[must_use]
    pub fn for_source(&self, class: SourceClass) -> (&Targets, Masquerade) {
        if class == SourceClass::External {
            (&self.external, self.external_masquerade)
        } else {
            (&self.internal, self.internal_masquerade)
        }
    }
}

/// The desired state: every frontend on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Services with externalTrafficPolicy Local: their healthCheckNodePort and local
    /// endpoint count.
    pub health_checks: BTreeMap<ObjectRef, (u16, usize)>,
    /// The source address of masqueraded traffic: the first node IP of each family.
    pub masquerade_ips: Vec<IpAddr>,
    /// NodePorts also answer on IPv4 loopback (127.0.0.0/8) for traffic from the node itself
    /// (upstream's `localhostNodePorts`, when `nodePortAddresses` includes loopback).
    pub localhost_node_ports: bool,
    /// The local-traffic detector that [`Masquerade::UnlessFromPods`] refers to: traffic from
    /// these CIDRs is pod traffic (`detectLocalMode: ClusterCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// The interface-based detectors: traffic arriving on this interface is pod traffic
    /// (then `pod_cidrs` is empty).
    pub pod_interface: Option<PodInterface>,
    /// When set (`ProxyConfig::cluster_ip_checks`): traffic to a ClusterIP on a port no
    /// frontend serves is rejected, and traffic to an address of these Service CIDRs that is
    /// no ClusterIP is dropped.
    pub cluster_ip_checks: Option<Vec<IpNet>>,
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

/// Merges a Service's slices into the endpoints of one Service port. Like upstream
/// (endpointslicecache.go) only an endpoint's first address is used and the slice's port is
/// matched by name and protocol. An address in several slices appears once: ready if any copy
/// is ready, local if any copy is local.
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
            if let Some(ip) = ep.addresses.first() {
                let addr = SocketAddr::new(*ip, ep_port.port);
                let c = Candidate {
                    addr,
                    ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    local,
                    info: ep,
                };
                merged
                    .entry(addr)
                    .and_modify(|old| {
                        let (ready, local) = (old.ready || c.ready, old.local || c.local);
                        if c.ready && !old.ready {
                            *old = c.clone();
                        }
                        old.ready = ready;
                        old.local = local;
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
                .filter(|e| e.serving && e.terminating)
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
        out.local = eps
            .iter()
            .filter(|e| e.local && e.ready)
            .map(|e| e.addr)
            .collect();
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
        // upstream: "primary" is the primary node IP of each family (server.go turns it into
        // `<IPv4>/32, <IPv6>/128`).
        NodePortAddresses::Primary => masquerade_ips(node),
        NodePortAddresses::Cidrs(cidrs) => node
            .ips
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
            .collect(),
    }
}

/// The first node IP of each family: where masqueraded traffic comes from.
#[must_use]
pub fn masquerade_ips(node: &NodeInfo) -> Vec<IpAddr> {
    let v4 = node.ips.iter().find(|ip| ip.is_ipv4());
    let v6 = node.ips.iter().find(|ip| ip.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

/// upstream `localhostNodePorts`: IPv4 only, and only when `nodePortAddresses` includes
/// loopback (every address, or a CIDR holding 127.0.0.1).
#[must_use]
pub fn localhost_node_ports(config: &ProxyConfig) -> bool {
    config.localhost_node_ports
        && match &config.node_port_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Primary => false,
            NodePortAddresses::Cidrs(c) => {
                c.iter().any(|c| c.contains(&IpAddr::from([127, 0, 0, 1])))
            }
        }
}

/// The CIDRs of pod traffic by the CIDR-based detectors (empty for the interface-based ones).
#[must_use]
pub fn local_cidrs<'a>(node: &'a NodeInfo, config: &'a ProxyConfig) -> &'a [IpNet] {
    match config.local_detector {
        LocalDetector::ClusterCidr => &config.cluster_cidrs,
        LocalDetector::NodeCidr => &node.pod_cidrs,
        _ => &[],
    }
}

/// Whether pod traffic can be told apart at all (else ClusterIP traffic is not masqueraded,
/// as upstream without a detector).
fn has_local_detector(node: &NodeInfo, config: &ProxyConfig) -> bool {
    match &config.local_detector {
        LocalDetector::BridgeInterface(_) | LocalDetector::InterfaceNamePrefix(_) => true,
        _ => !local_cidrs(node, config).is_empty(),
    }
}

/// Computes the desired state. Pure: the same inputs give the same output.
#[must_use]
pub fn compute(store: &Store, node: &NodeInfo, config: &ProxyConfig) -> DesiredState {
    let mut state = DesiredState {
        masquerade_ips: masquerade_ips(node),
        localhost_node_ports: localhost_node_ports(config),
        pod_cidrs: local_cidrs(node, config).to_vec(),
        pod_interface: match &config.local_detector {
            LocalDetector::BridgeInterface(i) => Some(PodInterface::Exact(i.clone())),
            LocalDetector::InterfaceNamePrefix(p) => Some(PodInterface::Prefix(p.clone())),
            _ => None,
        },
        cluster_ip_checks: config
            .cluster_ip_checks
            .then(|| config.service_cidrs.clone()),
        ..DesiredState::default()
    };
    let node_port_ips = node_port_ips(node, config);
    for svc in store.services() {
        let (frontends, health) = compute_service(store, svc, node, config, &node_port_ips);
        state.frontends.extend(frontends);
        if let Some(h) = health {
            state.health_checks.insert(svc.id.clone(), h);
        }
    }
    state
}

/// What `compute_service` returns: the frontends, and (port, local endpoints) of the
/// health check under eTP=Local.
pub type ServiceFrontends = (Vec<(FrontendKey, Frontend)>, Option<(u16, usize)>);

/// One Service's frontends (and its health check, under eTP=Local): the unit of incremental
/// syncs. `compute` is exactly the union of this over every Service.
#[must_use]
pub fn compute_service(
    store: &Store,
    svc: &ServiceInfo,
    node: &NodeInfo,
    config: &ProxyConfig,
    node_port_ips: &[IpAddr],
) -> ServiceFrontends {
    let mut out: Vec<(FrontendKey, Frontend)> = Vec::new();
    // ExternalName and headless Services are not proxied.
    if svc.type_ == ServiceType::ExternalName || svc.cluster_ips.is_empty() {
        return (out, None);
    }
    {
        let mut local_endpoint_count = BTreeSet::new();
        for port in &svc.ports {
            let eps = endpoints_for_port(store, svc, port, node);
            let cat = categorize(&eps, svc, node);
            // The health check counts ready local endpoints only (upstream): a node whose
            // local pods are all terminating reports 0, so load balancers drain it, while
            // its traffic still reaches them (the terminating fallback).
            local_endpoint_count.extend(
                eps.iter()
                    .filter(|c| c.local && c.ready && !c.terminating)
                    .map(|c| c.addr.ip()),
            );
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
                    let f: Vec<_> = b
                        .iter()
                        .copied()
                        .filter(|a| a.is_ipv4() == ip.is_ipv4())
                        .collect();
                    if f.is_empty() {
                        Targets::Reject
                    } else {
                        Targets::Backends(f)
                    }
                }
                other => other.clone(),
            };
            // upstream: ClusterIP traffic is masqueraded under masqueradeAll, or when it does
            // not come from the cluster CIDR; external traffic under eTP=Cluster, and under
            // eTP=Local only when it comes from the node itself.
            let cluster_ip_masquerade = if config.masquerade_all {
                Masquerade::Always
            } else if !has_local_detector(node, config) {
                Masquerade::Never
            } else {
                Masquerade::UnlessFromPods
            };
            let (internal_masquerade, external_masquerade) = if svc.external_policy_local {
                (Masquerade::FromNode, Masquerade::Never)
            } else {
                (Masquerade::Always, Masquerade::Always)
            };
            let mut add = |ip: IpAddr,
                           port_num: u16,
                           kind: FrontendKind,
                           internal: &Targets,
                           external: &Targets| {
                let key = FrontendKey {
                    ip,
                    port: port_num,
                    protocol: port.protocol,
                };
                out.push((
                    key,
                    Frontend {
                        service: svc.id.clone(),
                        port_name: port.name.clone(),
                        kind,
                        internal: same_family(internal, &ip),
                        external: same_family(external, &ip),
                        internal_masquerade: if kind == FrontendKind::ClusterIp {
                            cluster_ip_masquerade
                        } else {
                            internal_masquerade
                        },
                        external_masquerade: if kind == FrontendKind::ClusterIp {
                            cluster_ip_masquerade
                        } else {
                            external_masquerade
                        },
                        external_policy_local: svc.external_policy_local,
                        affinity_timeout_secs: svc.affinity_timeout_secs,
                        lb_algorithm: svc.lb_algorithm.unwrap_or(config.lb_algorithm),
                        source_ranges: if kind == FrontendKind::LoadBalancer {
                            svc.load_balancer_source_ranges.clone()
                        } else {
                            Vec::new()
                        },
                    },
                ));
            };
            for ip in &svc.cluster_ips {
                add(
                    *ip,
                    port.port,
                    FrontendKind::ClusterIp,
                    &internal,
                    &internal,
                );
            }
            // Pods reaching an externally-facing address of an eTP=Local Service use the
            // cluster endpoints (upstream's "short-circuit" of pod traffic).
            for ip in &svc.external_ips {
                add(
                    *ip,
                    port.port,
                    FrontendKind::ExternalIp,
                    &cluster_targets,
                    &external,
                );
            }
            for ip in &svc.load_balancer_ips {
                add(
                    *ip,
                    port.port,
                    FrontendKind::LoadBalancer,
                    &cluster_targets,
                    &external,
                );
            }
            if let Some(node_port) = port.node_port {
                for ip in node_port_ips {
                    add(
                        *ip,
                        node_port,
                        FrontendKind::NodePort,
                        &cluster_targets,
                        &external,
                    );
                }
            }
        }
        let health = if svc.external_policy_local {
            svc.health_check_node_port
                .map(|hc| (hc, local_endpoint_count.len()))
        } else {
            None
        };
        (out, health)
    }
}

#[cfg(test)]
mod tests {
    //! Address plan: node "node-a" (zone-a) with IP 192.168.0.2; pod CIDR 10.0.0.0/8;
    //! endpoints 10.1.0.x on node-a (local), 10.2.0.x on node-b (remote);
    //! ClusterIP 172.30.0.10, external IP 192.168.99.1, LB IP 1.2.3.4, NodePort 30080.
    use super::*;
    use crate::store::SliceInfo;
    use crate::testkit::{self, EndpointBuilder, ServiceBuilder, endpoint as ep, service};

    const NODE: &str = "node-a";

    fn node() -> NodeInfo {
        NodeInfo {
            name: NODE.into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            labels: [(
                "topology.kubernetes.io/zone".to_string(),
                "zone-a".to_string(),
            )]
            .into(),
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        }
    }

    fn config() -> ProxyConfig {
        ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::default()
        }
    }

    /// The Service every case starts from: ClusterIP 172.30.0.10, port "http" 80 -> 8080.
    fn svc(name: &str) -> ServiceBuilder {
        service("ns", name)
            .cluster_ip("172.30.0.10")
            .port("http", 80, Protocol::Tcp, 8080)
    }

    /// Reachable from outside: external IP, LB IP, NodePort 30080; eTP=Local with health
    /// check port 30000 when asked.
    trait External {
        fn external(self, etp_local: bool) -> Self;
    }

    impl External for ServiceBuilder {
        fn external(self, etp_local: bool) -> Self {
            let b = self
                .load_balancer(&["1.2.3.4"])
                .external_ips(&["192.168.99.1"])
                .node_port(30080);
            if etp_local { b.etp_local(30000) } else { b }
        }
    }

    /// Slice `name` of Service `svc` with port "http" 8080.
    fn slice(svc: &str, name: &str, eps: &[EndpointBuilder]) -> SliceInfo {
        testkit::slice("ns", name, svc)
            .port("http", 8080, Protocol::Tcp)
            .endpoints(eps)
            .build()
    }

    fn store(svcs: Vec<ServiceBuilder>, slices: Vec<SliceInfo>) -> Store {
        testkit::store(
            svcs.into_iter().map(ServiceBuilder::build).collect(),
            slices,
        )
    }

    fn decide(st: &Store, src: &str, dst: &str, port: u16) -> Decision {
        let desired = compute(st, &node(), &config());
        resolve(
            &desired,
            &node(),
            &config(),
            &Flow {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                dport: port,
                protocol: Protocol::Tcp,
            },
        )
    }

    fn to(backends: &[&str], masq: bool) -> Decision {
        Decision::Backends(
            backends
                .iter()
                .map(|b| (b.parse().unwrap(), masq))
                .collect(),
        )
    }

    const POD: &str = "10.9.9.9";
    const OUTSIDE: &str = "203.0.113.5";
    const VIP: &str = "172.30.0.10";

    #[test]
    fn endpoint_conditions() {
        let cases: Vec<(&str, Vec<EndpointBuilder>, Decision)> = vec![
            (
                "ready endpoints serve, not-ready ones do not",
                vec![ep("10.1.0.1", NODE), ep("10.2.0.1", "node-b").not_ready()],
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "no ready endpoint: fall back to serving+terminating",
                vec![
                    ep("10.1.0.1", NODE).terminating(),
                    ep("10.2.0.1", "node-b").not_ready(),
                ],
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "ready wins over terminating",
                vec![ep("10.1.0.1", NODE).terminating(), ep("10.2.0.1", "node-b")],
                to(&["10.2.0.1:8080"], false),
            ),
            (
                "nothing usable: reject",
                vec![ep("10.1.0.1", NODE).not_ready()],
                Decision::Reject,
            ),
        ];
        for (name, eps, want) in cases {
            let st = store(vec![svc("s")], vec![slice("s", "s-1", &eps)]);
            assert_eq!(decide(&st, POD, VIP, 80), want, "{name}");
        }
    }

    #[test]
    fn internal_traffic_policy_local() {
        let cases: Vec<(&str, Vec<EndpointBuilder>, Decision)> = vec![
            (
                "only the local endpoint",
                vec![ep("10.1.0.1", NODE), ep("10.2.0.1", "node-b")],
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "remote endpoints only: drop",
                vec![ep("10.2.0.1", "node-b")],
                Decision::Drop,
            ),
            ("no endpoints at all: reject", vec![], Decision::Reject),
            (
                "local terminating fallback",
                vec![ep("10.1.0.1", NODE).terminating(), ep("10.2.0.1", "node-b")],
                to(&["10.1.0.1:8080"], false),
            ),
        ];
        for (name, eps, want) in cases {
            let st = store(vec![svc("s").itp_local()], vec![slice("s", "s-1", &eps)]);
            assert_eq!(decide(&st, POD, VIP, 80), want, "{name}");
        }
    }

    #[test]
    fn external_traffic_policy() {
        let eps = vec![ep("10.1.0.1", NODE), ep("10.2.0.1", "node-b")];
        let both = ["10.1.0.1:8080", "10.2.0.1:8080"];
        let local = store(vec![svc("s").external(true)], vec![slice("s", "s-1", &eps)]);
        let cluster = store(
            vec![svc("s").external(false)],
            vec![slice("s", "s-1", &eps)],
        );
        let cases: Vec<(&str, &Store, &str, &str, u16, Decision)> = vec![
            (
                "eTP=Local: outside to NodePort, local only, client IP kept",
                &local,
                OUTSIDE,
                "192.168.0.2",
                30080,
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "eTP=Local: outside to LB IP",
                &local,
                OUTSIDE,
                "1.2.3.4",
                80,
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "eTP=Local: outside to external IP",
                &local,
                OUTSIDE,
                "192.168.99.1",
                80,
                to(&["10.1.0.1:8080"], false),
            ),
            (
                "eTP=Local: pod to LB IP short-circuits to all endpoints",
                &local,
                POD,
                "1.2.3.4",
                80,
                to(&both, false),
            ),
            (
                "eTP=Local: node to NodePort uses all endpoints, masqueraded",
                &local,
                "192.168.0.2",
                "192.168.0.2",
                30080,
                to(&both, true),
            ),
            (
                "eTP=Cluster: outside to NodePort, all endpoints, masqueraded",
                &cluster,
                OUTSIDE,
                "192.168.0.2",
                30080,
                to(&both, true),
            ),
            (
                "eTP=Cluster: pod to LB IP is masqueraded too",
                &cluster,
                POD,
                "1.2.3.4",
                80,
                to(&both, true),
            ),
            (
                "ClusterIP of the same Service from a pod",
                &cluster,
                POD,
                VIP,
                80,
                to(&both, false),
            ),
            (
                "wrong port is not a Service",
                &cluster,
                POD,
                "192.168.0.2",
                30081,
                Decision::None,
            ),
            (
                "healthCheckNodePort of an eTP=Local Service is accepted",
                &local,
                OUTSIDE,
                "192.168.0.2",
                30000,
                Decision::Accept,
            ),
        ];
        for (name, st, src, dst, port, want) in cases {
            assert_eq!(decide(st, src, dst, port), want, "{name}");
        }
        let remote_only = store(
            vec![svc("s").external(true)],
            vec![slice("s", "s-1", &[ep("10.2.0.1", "node-b")])],
        );
        assert_eq!(
            decide(&remote_only, OUTSIDE, "1.2.3.4", 80),
            Decision::Drop,
            "eTP=Local without local endpoints drops"
        );
        assert_eq!(
            decide(&remote_only, POD, "1.2.3.4", 80),
            to(&["10.2.0.1:8080"], false)
        );
        let desired = compute(&local, &node(), &config());
        assert_eq!(
            desired.health_checks.get(&ObjectRef::new("ns", "s")),
            Some(&(30000, 1))
        );
        // Only terminating local endpoints: the health check reports 0 (load balancers
        // drain the node) though traffic still reaches them.
        let draining = store(
            vec![svc("s").external(true)],
            vec![slice("s", "s-1", &[ep("10.1.0.1", NODE).terminating()])],
        );
        let desired = compute(&draining, &node(), &config());
        assert_eq!(
            desired.health_checks.get(&ObjectRef::new("ns", "s")),
            Some(&(30000, 0))
        );
    }

    #[test]
    fn topology_hints() {
        let cases: Vec<(&str, Vec<EndpointBuilder>, Vec<&str>)> = vec![
            (
                "zone hints: only endpoints for this zone",
                vec![
                    ep("10.1.0.1", NODE).zones(&["zone-a"]),
                    ep("10.2.0.1", "node-b").zones(&["zone-b"]),
                ],
                vec!["10.1.0.1:8080"],
            ),
            (
                "an endpoint without hints disables topology",
                vec![
                    ep("10.1.0.1", NODE).zones(&["zone-a"]),
                    ep("10.2.0.1", "node-b"),
                ],
                vec!["10.1.0.1:8080", "10.2.0.1:8080"],
            ),
            (
                "no endpoint hinted for this zone: ignore hints",
                vec![
                    ep("10.1.0.1", NODE).zones(&["zone-c"]),
                    ep("10.2.0.1", "node-b").zones(&["zone-b"]),
                ],
                vec!["10.1.0.1:8080", "10.2.0.1:8080"],
            ),
            (
                "node hints win over zone hints",
                vec![
                    ep("10.1.0.1", "node-c")
                        .zones(&["zone-a"])
                        .nodes(&["node-c"]),
                    ep("10.2.0.1", "node-b").zones(&["zone-a"]).nodes(&[NODE]),
                ],
                vec!["10.2.0.1:8080"],
            ),
        ];
        for (name, eps, want) in cases {
            let st = store(vec![svc("s")], vec![slice("s", "s-1", &eps)]);
            assert_eq!(decide(&st, POD, VIP, 80), to(&want, false), "{name}");
        }
    }

    #[test]
    fn service_kinds_and_families() {
        let eps = vec![ep("10.1.0.1", NODE)];
        let headless = store(
            vec![svc("s").cluster_ips(&[])],
            vec![slice("s", "s-1", &eps)],
        );
        assert!(
            compute(&headless, &node(), &config()).frontends.is_empty(),
            "headless is not proxied"
        );
        let ext = store(
            vec![svc("s").type_(ServiceType::ExternalName)],
            vec![slice("s", "s-1", &eps)],
        );
        assert!(
            compute(&ext, &node(), &config()).frontends.is_empty(),
            "ExternalName is not proxied"
        );

        let dual = store(
            vec![svc("s").cluster_ips(&["172.30.0.10", "fd00::10"])],
            vec![
                slice("s", "s-v4", &eps),
                slice("s", "s-v6", &[ep("fd00:1::1", NODE)]),
            ],
        );
        assert_eq!(decide(&dual, POD, VIP, 80), to(&["10.1.0.1:8080"], false));
        assert_eq!(
            decide(&dual, "fd00:9::9", "fd00::10", 80),
            to(&["[fd00:1::1]:8080"], true),
            "v6 client outside the (v4) cluster CIDR is masqueraded"
        );
    }

    #[test]
    fn slices_merge_and_publish_not_ready() {
        let st = store(
            vec![svc("s")],
            vec![
                slice(
                    "s",
                    "s-1",
                    &[ep("10.1.0.1", NODE).not_ready(), ep("10.1.0.2", NODE)],
                ),
                slice("s", "s-2", &[ep("10.1.0.1", NODE), ep("10.1.0.2", NODE)]),
            ],
        );
        assert_eq!(
            decide(&st, POD, VIP, 80),
            to(&["10.1.0.1:8080", "10.1.0.2:8080"], false),
            "an address in two slices appears once and is ready if any copy is"
        );
        let pnr = store(
            vec![svc("s").publish_not_ready()],
            vec![slice("s", "s-1", &[ep("10.1.0.1", NODE).not_ready()])],
        );
        assert_eq!(decide(&pnr, POD, VIP, 80), to(&["10.1.0.1:8080"], false));
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let mut s = slice("s", "s-1", &[ep("10.1.0.1", NODE)]);
        s.ports[0].protocol = Protocol::Udp;
        let st = store(vec![svc("s")], vec![s]);
        assert_eq!(
            decide(&st, POD, VIP, 80),
            Decision::Reject,
            "a UDP slice port does not serve a TCP Service port"
        );
    }

    #[test]
    fn masquerade_rules_for_cluster_ips() {
        let st = store(
            vec![svc("s")],
            vec![slice(
                "s",
                "s-1",
                &[ep("10.1.0.1", NODE), ep("10.2.0.1", "node-b")],
            )],
        );
        let both = ["10.1.0.1:8080", "10.2.0.1:8080"];
        assert_eq!(
            decide(&st, POD, VIP, 80),
            to(&both, false),
            "pod traffic keeps its source"
        );
        assert_eq!(
            decide(&st, OUTSIDE, VIP, 80),
            to(&both, true),
            "off-cluster traffic is masqueraded"
        );
        let Decision::Backends(b) = decide(&st, "10.1.0.1", VIP, 80) else {
            panic!()
        };
        assert_eq!(
            b,
            vec![
                ("10.1.0.1:8080".parse().unwrap(), true),
                ("10.2.0.1:8080".parse().unwrap(), false)
            ],
            "hairpin to itself is masqueraded, other backends are not"
        );
        let all = ProxyConfig {
            masquerade_all: true,
            ..config()
        };
        let desired = compute(&st, &node(), &all);
        let flow = Flow {
            src: POD.parse().unwrap(),
            dst: VIP.parse().unwrap(),
            dport: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            resolve(&desired, &node(), &all, &flow),
            to(&both, true),
            "masqueradeAll"
        );
    }
}

/// Services with a Local traffic policy and no usable endpoint, (internal, external): what
/// upstream's `kubeproxy_sync_proxy_rules_no_local_endpoints_total` counts.
#[must_use]
pub fn no_local_endpoints(desired: &DesiredState) -> (usize, usize) {
    let mut internal = BTreeSet::new();
    let mut external = BTreeSet::new();
    for fe in desired.frontends.values() {
        if matches!(fe.internal, Targets::Drop) {
            internal.insert(&fe.service);
        }
        if fe.kind != FrontendKind::ClusterIp && matches!(fe.external, Targets::Drop) {
            external.insert(&fe.service);
        }
    }
    (internal.len(), external.len())
}
