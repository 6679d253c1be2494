//! The store: a compact copy of the Service and EndpointSlice fields kpr uses.
//!
//! Sources convert API objects into these types (rejecting malformed ones with a reason, see
//! `source::convert`) and feed them in as [`Change`] events; the model reads only this. No
//! API type (k8s-openapi) reaches this module.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

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
    /// `kpr.io/lb-algorithm` annotation (None: the node's `--lb-algorithm`).
    pub lb_algorithm: Option<LbAlgorithm>,
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

impl ServiceInfo {
    /// True when traffic from outside the cluster can reach this Service through this node.
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// This node, as the model needs it: from the Node object (API or manifest) and the command
/// line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The first is the primary node IP.
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The Node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`: load balancers
    /// should stop sending to it (`/healthz` says `nodeEligible: false`).
    pub lb_ineligible: bool,
    /// The Node's `spec.podCIDRs` (detectLocalMode NodeCIDR).
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

impl NodeInfo {
    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str)
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
    Node(NodeInfo),
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

/// How the ebpf mode picks a backend for a new flow (`kpr.io/lb-algorithm`, `--lb-algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbAlgorithm {
    /// Uniformly at random.
    #[default]
    Random,
    /// Consistent hashing of the flow: every node picks the same backend for a flow.
    Maglev,
    /// Each backend in turn.
    RoundRobin,
    /// The backend with the fewest live connections (counted by the datapath).
    LeastConn,
}

impl LbAlgorithm {
    pub const NAMES: [&str; 4] = ["random", "maglev", "round-robin", "least-conn"];

    /// Parses a name of [`LbAlgorithm::NAMES`] (also "rr" and "lc", IPVS's names).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Self::Random),
            "maglev" => Some(Self::Maglev),
            "round-robin" | "rr" => Some(Self::RoundRobin),
            "least-conn" | "lc" => Some(Self::LeastConn),
            _ => None,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Maglev => "maglev",
            Self::RoundRobin => "round-robin",
            Self::LeastConn => "least-conn",
        }
    }
}
