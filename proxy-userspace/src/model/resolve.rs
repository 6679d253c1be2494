//! What happens to one packet: the model's answer for a single flow, used by the conformance
//! runner's model level and by the datapath runner to know what to expect. It reads only the
//! desired state, so it cannot disagree with what the renderers program.
use std::net::{IpAddr, SocketAddr};

use super::{DesiredState, FrontendKey, FrontendKind, NodeInfo, Protocol, ProxyConfig, Targets};

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
/// The local-traffic detector comes first, as in upstream's rules (the pod-CIDR match precedes
/// `--src-type LOCAL`): a node address inside the cluster CIDR (a bridge's gateway address,
/// say) counts as pod traffic.
pub fn classify_source(src: IpAddr, node: &NodeInfo, config: &ProxyConfig) -> SourceClass {
    if super::local_cidrs(node, config)
        .iter()
        .any(|c| c.contains(&src))
    {
        SourceClass::Pod
    } else if src.is_loopback() || node.ips.contains(&src) {
        SourceClass::Node
    } else {
        SourceClass::External
    }
}

/// The decision for one flow: the frontend's targets and masquerade rule for the flow's
/// source class (see [`super::Masquerade`]); a pod reaching itself (hairpin) is always
/// masqueraded. An IPv4 loopback destination reaches the NodePort of that port when
/// `localhostNodePorts` is on.
#[must_use]
pub fn resolve(
    state: &DesiredState,
    node: &NodeInfo,
    config: &ProxyConfig,
    flow: &Flow,
) -> Decision {
    let key = FrontendKey {
        ip: flow.dst,
        port: flow.dport,
        protocol: flow.protocol,
    };
    let localhost_node_port = || {
        let loopback = matches!(flow.dst, IpAddr::V4(v4) if v4.is_loopback());
        (loopback && state.localhost_node_ports)
            .then(|| {
                state.frontends.iter().find(|(k, fe)| {
                    fe.kind == FrontendKind::NodePort
                        && k.ip.is_ipv4()
                        && k.port == flow.dport
                        && k.protocol == flow.protocol
                })
            })
            .flatten()
            .map(|(_, fe)| fe)
    };
    let Some(fe) = state.frontends.get(&key).or_else(localhost_node_port) else {
        if let Some(service_cidrs) = &state.cluster_ip_checks {
            let is_cluster_ip = state
                .frontends
                .iter()
                .any(|(k, fe)| fe.kind == FrontendKind::ClusterIp && k.ip == flow.dst);
            if is_cluster_ip {
                return Decision::Reject;
            }
            if service_cidrs.iter().any(|c| c.contains(&flow.dst)) {
                return Decision::Drop;
            }
        }
        let is_health_check = node.ips.contains(&flow.dst)
            && flow.protocol == Protocol::Tcp
            && state.health_checks.values().any(|(p, _)| *p == flow.dport);
        return if is_health_check {
            Decision::Accept
        } else {
            Decision::None
        };
    };
    let class = classify_source(flow.src, node, config);
    let (targets, masquerade) = fe.for_source(class);
    let masq = masquerade.applies(class);
    match targets {
        Targets::Reject => Decision::Reject,
        Targets::Drop => Decision::Drop,
        Targets::Backends(b) => {
            Decision::Backends(b.iter().map(|a| (*a, masq || a.ip() == flow.src)).collect())
        }
    }
}
