//! Builders for the store's Service and EndpointSlice types, in the spirit of controller-rs'
//! test documents: each case states only what matters to it. Shared by the unit tests, the
//! integration tests and the benchmarks (the packet builder and the scratch TC datapath live
//! in `render::ebpf::{packet, scratch}`, since `kpr trace` uses them too).
use std::net::IpAddr;

use crate::store::{
    AddressType, Change, EndpointInfo, EndpointPortInfo, ObjectRef, Protocol, ServiceInfo,
    ServicePortInfo, ServiceType, SliceInfo, Store, TargetPort,
};

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IP address"))
}

/// A Service: ClusterIP, no addresses or ports until added.
#[derive(Clone, Debug)]
pub struct ServiceBuilder(pub ServiceInfo);

/// `Service` `namespace/name`.
#[must_use]
pub fn service(namespace: &str, name: &str) -> ServiceBuilder {
    ServiceBuilder(ServiceInfo {
        id: ObjectRef::new(namespace, name),
        type_: ServiceType::ClusterIp,
        cluster_ips: vec![],
        ports: vec![],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        lb_algorithm: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        affinity_timeout_secs: None,
        publish_not_ready_addresses: false,
        traffic_distribution: None,
    })
}

impl ServiceBuilder {
    #[must_use]
    pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
        self.0.cluster_ips = ips.iter().map(|s| ip(s)).collect();
        self
    }

    #[must_use]
    pub fn cluster_ip(self, addr: &str) -> Self {
        self.cluster_ips(&[addr])
    }

    /// Adds a port whose targetPort is `target`.
    #[must_use]
    pub fn port(mut self, name: &str, port: u16, protocol: Protocol, target: u16) -> Self {
        self.0.ports.push(ServicePortInfo {
            name: name.into(),
            port,
            protocol,
            target_port: TargetPort::Number(target),
            node_port: None,
        });
        self
    }

    /// Gives the last port a NodePort (and the Service type NodePort, unless LoadBalancer).
    #[must_use]
    pub fn node_port(mut self, node_port: u16) -> Self {
        if self.0.type_ == ServiceType::ClusterIp {
            self.0.type_ = ServiceType::NodePort;
        }
        self.0
            .ports
            .last_mut()
            .expect("node_port() after port()")
            .node_port = Some(node_port);
        self
    }

    #[must_use]
    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.0.external_ips = ips.iter().map(|s| ip(s)).collect();
        self
    }

    /// Type LoadBalancer with these ingress IPs.
    #[must_use]
    pub fn load_balancer(mut self, ips: &[&str]) -> Self {
        self.0.type_ = ServiceType::LoadBalancer;
        self.0.load_balancer_ips = ips.iter().map(|s| ip(s)).collect();
        self
    }

    /// externalTrafficPolicy Local with this healthCheckNodePort.
    #[must_use]
    pub fn etp_local(mut self, health_check_node_port: u16) -> Self {
        self.0.external_policy_local = true;
        self.0.health_check_node_port = Some(health_check_node_port);
        self
    }

    #[must_use]
    pub fn itp_local(mut self) -> Self {
        self.0.internal_policy_local = true;
        self
    }

    #[must_use]
    pub fn type_(mut self, t: ServiceType) -> Self {
        self.0.type_ = t;
        self
    }

    #[must_use]
    pub fn publish_not_ready(mut self) -> Self {
        self.0.publish_not_ready_addresses = true;
        self
    }

    #[must_use]
    pub fn affinity(mut self, timeout_secs: u32) -> Self {
        self.0.affinity_timeout_secs = Some(timeout_secs);
        self
    }

    #[must_use]
    pub fn build(self) -> ServiceInfo {
        self.0
    }
}

/// An endpoint: ready, serving, not terminating, without hints unless added.
#[derive(Clone, Debug)]
pub struct EndpointBuilder(pub EndpointInfo);

/// An endpoint at `addr` on node `node`.
#[must_use]
pub fn endpoint(addr: &str, node: &str) -> EndpointBuilder {
    EndpointBuilder(EndpointInfo {
        addresses: vec![ip(addr)],
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
        zone: None,
        hint_zones: None,
        hint_nodes: None,
    })
}

impl EndpointBuilder {
    /// Not ready and not serving (a pod starting up or failing its probe).
    #[must_use]
    pub fn not_ready(mut self) -> Self {
        self.0.ready = false;
        self.0.serving = false;
        self
    }

    /// Serving but terminating (a pod shutting down gracefully).
    #[must_use]
    pub fn terminating(mut self) -> Self {
        self.0.ready = false;
        self.0.serving = true;
        self.0.terminating = true;
        self
    }

    #[must_use]
    pub fn zones(mut self, z: &[&str]) -> Self {
        self.0.hint_zones = Some(z.iter().map(|s| (*s).to_string()).collect());
        self
    }

    #[must_use]
    pub fn nodes(mut self, n: &[&str]) -> Self {
        self.0.hint_nodes = Some(n.iter().map(|s| (*s).to_string()).collect());
        self
    }
}

/// An EndpointSlice of Service `namespace/service`.
#[derive(Clone, Debug)]
pub struct SliceBuilder(pub SliceInfo);

/// EndpointSlice `namespace/name` of Service `namespace/service`, IPv4 until an IPv6
/// endpoint is added.
#[must_use]
pub fn slice(namespace: &str, name: &str, service: &str) -> SliceBuilder {
    SliceBuilder(SliceInfo {
        id: ObjectRef::new(namespace, name),
        service: ObjectRef::new(namespace, service),
        address_type: AddressType::IPv4,
        ports: vec![],
        endpoints: vec![],
        trigger_time: None,
    })
}

impl SliceBuilder {
    #[must_use]
    pub fn port(mut self, name: &str, port: u16, protocol: Protocol) -> Self {
        self.0.ports.push(EndpointPortInfo {
            name: name.into(),
            port,
            protocol,
        });
        self
    }

    /// Adds endpoints; the slice's address type follows the first one.
    #[must_use]
    pub fn endpoints(mut self, eps: &[EndpointBuilder]) -> Self {
        if self.0.endpoints.is_empty()
            && let Some(first) = eps.first()
            && first.0.addresses.first().is_some_and(IpAddr::is_ipv6)
        {
            self.0.address_type = AddressType::IPv6;
        }
        self.0.endpoints.extend(eps.iter().map(|e| e.0.clone()));
        self
    }

    #[must_use]
    pub fn build(self) -> SliceInfo {
        self.0
    }
}

/// A store holding exactly these objects.
#[must_use]
pub fn store(services: Vec<ServiceInfo>, slices: Vec<SliceInfo>) -> Store {
    let mut s = Store::default();
    s.apply(Change::Reset { services, slices });
    s
}
