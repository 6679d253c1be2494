//! The store: a compact copy of the Service and EndpointSlice fields kpr uses.
//!
//! Sources convert API objects into these types (rejecting malformed ones with a reason) and
//! feed them in as change events; the model reads only this.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::{Error, Result};

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; unset means TCP.
    ///
    /// # Errors
    /// An unknown protocol.
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(Error::invalid(format!("unknown protocol {other:?}"))),
        }
    }

    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
            Self::Sctp => proxy_common::proto::SCTP,
        }
    }

    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::proto::TCP => Some(Self::Tcp),
            proxy_common::proto::UDP => Some(Self::Udp),
            proxy_common::proto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    PreferClose,
    PreferSameZone,
    PreferSameNode,
}

/// The fields of a v1 Service that kpr uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub id: ObjectRef,
    pub type_: ServiceType,
    /// Empty for headless Services (`clusterIP: None`).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs with ipMode VIP or unset.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<ipnet::IpNet>,
    /// `kpr.io/lb-algorithm` annotation: Some(true) for "maglev", Some(false) for "random".
    pub maglev: Option<bool>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// sessionAffinity ClientIP timeout, when affinity is on.
    pub affinity_timeout_secs: Option<u32>,
    pub publish_not_ready_addresses: bool,
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hint_zones: Option<BTreeSet<String>>,
    pub hint_nodes: Option<BTreeSet<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPortInfo {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
}

/// The fields of a discovery.k8s.io/v1 EndpointSlice that kpr uses.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    pub id: ObjectRef,
    pub service: ObjectRef,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPortInfo>,
    pub endpoints: Vec<EndpointInfo>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, for network-programming latency.
    pub trigger_time: Option<String>,
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Per-Service backend selection: "maglev" or "random" (the node's `--lb-algorithm` otherwise).
pub const LB_ALGORITHM_ANNOTATION: &str = "kpr.io/lb-algorithm";
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::invalid(format!("{what} {s:?} is not an IP address")))
}

fn port_u16(p: i32, what: &str) -> Result<u16> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::invalid(format!("{what} {p} is out of range 1-65535")))
}

impl ServiceInfo {
    /// Converts an API Service, rejecting what kube-apiserver validation would have rejected.
    ///
    /// # Errors
    /// A missing name, unknown type or protocol, or unparsable address or port.
    pub fn from_api(svc: &Service) -> Result<Self> {
        let meta = &svc.metadata;
        let name = meta
            .name
            .as_deref()
            .ok_or_else(|| Error::invalid("Service has no metadata.name"))?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        let id = ObjectRef::new(namespace, name);
        let ctx = |e: Error| e.context(format!("Service {id}"));
        let spec = svc
            .spec
            .as_ref()
            .ok_or_else(|| ctx(Error::invalid("has no spec")))?;
        let type_ = match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ClusterIP" => ServiceType::ClusterIp,
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => ServiceType::ExternalName,
            other => return Err(ctx(Error::invalid(format!("unknown spec.type {other:?}")))),
        };
        let mut cluster_ips = Vec::new();
        let listed = spec
            .cluster_ips
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        for ip in listed {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            cluster_ips.push(parse_ip(&ip, "spec.clusterIPs entry").map_err(ctx)?);
        }
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            let port = port_u16(p.port, "spec.ports[].port").map_err(ctx)?;
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    TargetPort::Number(port_u16(*n, "spec.ports[].targetPort").map_err(ctx)?)
                }
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                    match s.parse::<i32>() {
                        Ok(n) => {
                            TargetPort::Number(port_u16(n, "spec.ports[].targetPort").map_err(ctx)?)
                        }
                        Err(_) => TargetPort::Name(s.clone()),
                    }
                }
            };
            let node_port = match p.node_port {
                None | Some(0) => None,
                Some(n) => Some(port_u16(n, "spec.ports[].nodePort").map_err(ctx)?),
            };
            ports.push(ServicePortInfo {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol: Protocol::parse(p.protocol.as_deref()).map_err(ctx)?,
                target_port,
                node_port: if matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer) {
                    node_port
                } else {
                    None
                },
            });
        }
        let external_ips = spec
            .external_ips
            .iter()
            .flatten()
            .map(|s| parse_ip(s, "spec.externalIPs entry"))
            .collect::<Result<Vec<_>>>()
            .map_err(ctx)?;
        let mut load_balancer_ips = Vec::new();
        if type_ == ServiceType::LoadBalancer {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for ing in ingress.into_iter().flatten() {
                // ipMode Proxy means the load balancer delivers to the node: not a VIP here.
                if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
                    continue;
                }
                if let Some(ip) = &ing.ip {
                    load_balancer_ips
                        .push(parse_ip(ip, "status.loadBalancer.ingress[].ip").map_err(ctx)?);
                }
            }
        }
        let externally_reachable = !external_ips.is_empty()
            || matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer);
        let affinity_timeout_secs =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(10_800)
            });
        let traffic_distribution = match spec.traffic_distribution.as_deref() {
            Some("PreferClose") => Some(TrafficDistribution::PreferClose),
            Some("PreferSameZone") => Some(TrafficDistribution::PreferSameZone),
            Some("PreferSameNode") => Some(TrafficDistribution::PreferSameNode),
            _ => None,
        };
        let load_balancer_source_ranges = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .map(|r| {
                r.trim()
                    .parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        Error::invalid(format!(
                            "spec.loadBalancerSourceRanges entry {r:?} is not a CIDR"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(ctx)?;
        Ok(Self {
            id,
            type_,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
            maglev: match meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
                .map(String::as_str)
            {
                Some("maglev") => Some(true),
                Some("random") => Some(false),
                _ => None,
            },
            external_policy_local: externally_reachable
                && spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0),
            affinity_timeout_secs,
            publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
            traffic_distribution,
        })
    }

    /// True when traffic from outside the cluster can reach this Service through this node.
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

impl SliceInfo {
    /// Converts an API EndpointSlice.
    ///
    /// # Errors
    /// A missing name or service-name label, unknown address type, or unparsable address or port.
    pub fn from_api(slice: &EndpointSlice) -> Result<Self> {
        let meta = &slice.metadata;
        let name = meta
            .name
            .as_deref()
            .ok_or_else(|| Error::invalid("EndpointSlice has no metadata.name"))?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        let id = ObjectRef::new(namespace, name);
        let ctx = |e: Error| e.context(format!("EndpointSlice {id}"));
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .ok_or_else(|| ctx(Error::invalid(format!("has no {SERVICE_NAME_LABEL} label"))))?;
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            other => {
                return Err(ctx(Error::invalid(format!(
                    "addressType {other:?} is not supported (IPv4, IPv6)"
                ))));
            }
        };
        let mut ports = Vec::new();
        for p in slice.ports.iter().flatten() {
            let Some(port) = p.port else { continue };
            ports.push(EndpointPortInfo {
                name: p.name.clone().unwrap_or_default(),
                port: port_u16(port, "ports[].port").map_err(ctx)?,
                protocol: Protocol::parse(p.protocol.as_deref()).map_err(ctx)?,
            });
        }
        let mut endpoints = Vec::new();
        for ep in slice.endpoints.iter().flatten() {
            let mut addresses = Vec::new();
            for a in &ep.addresses {
                let ip = parse_ip(a, "endpoints[].addresses entry").map_err(ctx)?;
                let family_ok = match address_type {
                    AddressType::IPv4 => ip.is_ipv4(),
                    AddressType::IPv6 => ip.is_ipv6(),
                };
                if !family_ok {
                    return Err(ctx(Error::invalid(format!(
                        "address {ip} does not match addressType {address_type:?}"
                    ))));
                }
                addresses.push(ip);
            }
            let cond = ep.conditions.as_ref();
            // Upstream (endpointslicecache.go): nil ready and nil serving mean true; nil
            // terminating means false.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(true);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let hints = ep.hints.as_ref();
            endpoints.push(EndpointInfo {
                addresses,
                ready,
                serving,
                terminating,
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                hint_zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect()),
                hint_nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect()),
            });
        }
        Ok(Self {
            service: ObjectRef::new(namespace, service),
            id,
            address_type,
            ports,
            endpoints,
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .cloned(),
        })
    }
}

/// A change event from a source.
#[derive(Clone, Debug)]
pub enum Change {
    ServiceUpsert(ServiceInfo),
    ServiceDelete(ObjectRef),
    SliceUpsert(SliceInfo),
    SliceDelete(ObjectRef),
    /// Replace everything (manifests reload).
    Reset {
        services: Vec<ServiceInfo>,
        slices: Vec<SliceInfo>,
    },
    /// Replace all Services (an API list or relist).
    ResetServices(Vec<ServiceInfo>),
    /// Replace all EndpointSlices (an API list or relist).
    ResetSlices(Vec<SliceInfo>),
    /// This node's name, IPs or labels changed.
    Node(crate::model::NodeInfo),
}

/// Services and EndpointSlices, indexed for the model.
#[derive(Clone, Debug, Default)]
pub struct Store {
    services: BTreeMap<ObjectRef, ServiceInfo>,
    slices: BTreeMap<ObjectRef, SliceInfo>,
    /// Service -> its slices.
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// What changed since the last `take_dirty`.
    dirty: Dirty,
}

/// The Services whose frontends may have changed since the last sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything (a relist or reload): recompute all.
    pub all: bool,
    pub services: BTreeSet<ObjectRef>,
}

impl Store {
    /// Applies one change. Returns whether anything changed; remembers which Services it
    /// touched (see [`Store::take_dirty`]).
    pub fn apply(&mut self, change: Change) -> bool {
        let touched: Option<Vec<ObjectRef>> = match &change {
            Change::ServiceUpsert(s) => Some(vec![s.id.clone()]),
            Change::ServiceDelete(id) => Some(vec![id.clone()]),
            Change::SliceUpsert(s) => {
                let mut v = vec![s.service.clone()];
                if let Some(old) = self.slices.get(&s.id) {
                    v.push(old.service.clone());
                }
                Some(v)
            }
            Change::SliceDelete(id) => Some(
                self.slices
                    .get(id)
                    .map(|s| s.service.clone())
                    .into_iter()
                    .collect(),
            ),
            Change::Node(_) => Some(Vec::new()),
            Change::Reset { .. } | Change::ResetServices(_) | Change::ResetSlices(_) => None,
        };
        let changed = self.apply_inner(change);
        if changed {
            match touched {
                Some(ids) => self.dirty.services.extend(ids),
                None => self.dirty.all = true,
            }
        }
        changed
    }

    /// Marks everything dirty (node or configuration changes).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.all = true;
    }

    /// What changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// One Service by id.
    #[must_use]
    pub fn service(&self, id: &ObjectRef) -> Option<&ServiceInfo> {
        self.services.get(id)
    }

    fn apply_inner(&mut self, change: Change) -> bool {
        match change {
            Change::ServiceUpsert(svc) => {
                if self.services.get(&svc.id) == Some(&svc) {
                    return false;
                }
                self.services.insert(svc.id.clone(), svc);
                true
            }
            Change::ServiceDelete(id) => self.services.remove(&id).is_some(),
            Change::SliceUpsert(slice) => {
                if self.slices.get(&slice.id) == Some(&slice) {
                    return false;
                }
                self.remove_slice(&slice.id);
                self.slices_by_service
                    .entry(slice.service.clone())
                    .or_default()
                    .insert(slice.id.clone());
                self.slices.insert(slice.id.clone(), slice);
                true
            }
            Change::SliceDelete(id) => self.remove_slice(&id),
            Change::ResetServices(services) => {
                let fresh: BTreeMap<ObjectRef, ServiceInfo> =
                    services.into_iter().map(|s| (s.id.clone(), s)).collect();
                let changed = fresh != self.services;
                self.services = fresh;
                changed
            }
            Change::ResetSlices(slices) => {
                let services = std::mem::take(&mut self.services);
                self.apply_inner(Change::Reset {
                    services: services.into_values().collect(),
                    slices,
                })
            }
            // The node is the agent's business, not the store's.
            Change::Node(_) => false,
            Change::Reset { services, slices } => {
                let mut fresh = Self::default();
                for s in services {
                    fresh.apply_inner(Change::ServiceUpsert(s));
                }
                for s in slices {
                    fresh.apply_inner(Change::SliceUpsert(s));
                }
                let changed = fresh.services != self.services || fresh.slices != self.slices;
                fresh.dirty = std::mem::take(&mut self.dirty);
                *self = fresh;
                changed
            }
        }
    }

    fn remove_slice(&mut self, id: &ObjectRef) -> bool {
        let Some(old) = self.slices.remove(id) else {
            return false;
        };
        if let Some(set) = self.slices_by_service.get_mut(&old.service) {
            set.remove(id);
            if set.is_empty() {
                self.slices_by_service.remove(&old.service);
            }
        }
        true
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    pub fn slices_for<'a>(&'a self, service: &ObjectRef) -> impl Iterator<Item = &'a SliceInfo> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.slices.get(id))
    }

    #[must_use]
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    #[must_use]
    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }
}
