//! Conversion from Kubernetes API objects to the store's compact types: the only place API
//! types (k8s-openapi) are read. Both sources (manifests and the API) go through here, and so
//! does upstream's label selector, so both serve the same Services.
//!
//! Conversion rejects what kube-apiserver validation would have rejected, with a reason that
//! names the object and the field.
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::store::{
    AddressType, EndpointInfo, EndpointPortInfo, LbAlgorithm, NodeInfo, ObjectRef, Protocol,
    ServiceInfo, ServicePortInfo, ServiceType, SliceInfo, TargetPort, TrafficDistribution,
};
use crate::{Error, Result};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Per-Service backend selection: "random", "maglev", "round-robin" or "least-conn" (the
/// node's `--lb-algorithm` otherwise).
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

/// Converts an API Service, rejecting what kube-apiserver validation would have rejected.
///
/// # Errors
/// A missing name, unknown type or protocol, or unparsable address or port.
pub fn service(svc: &Service) -> Result<ServiceInfo> {
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
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => match s
                .parse::<i32>()
            {
                Ok(n) => TargetPort::Number(port_u16(n, "spec.ports[].targetPort").map_err(ctx)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
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
    let affinity_timeout_secs = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
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
    Ok(ServiceInfo {
        id,
        type_,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        lb_algorithm: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
            .and_then(|v| LbAlgorithm::parse(v)),
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

/// Converts an API EndpointSlice.
///
/// # Errors
/// A missing name or service-name label, unknown address type, or unparsable address or port.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<SliceInfo> {
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
    Ok(SliceInfo {
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

/// This node's name, InternalIPs (then ExternalIPs) and labels.
#[must_use]
/// upstream (healthcheck): a Node being deleted, or tainted by the cluster autoscaler for
/// deletion, is not eligible for load-balancer traffic.
fn lb_ineligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_some()
        || node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"))
}

pub fn node(node: &Node) -> NodeInfo {
    let mut ips: Vec<IpAddr> = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for a in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            if a.type_ == wanted
                && let Ok(ip) = a.address.parse()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
    }
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        ips,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        lb_ineligible: lb_ineligible(node),
        pod_cidrs: node
            .spec
            .as_ref()
            .map(|s| {
                s.pod_cidrs
                    .clone()
                    .unwrap_or_else(|| s.pod_cidr.clone().into_iter().collect())
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
    }
}

/// Upstream's label selector: Services claimed by another proxy and headless Services are not
/// ours (the EndpointSlice controller copies both labels onto the slices, so the same selector
/// applies to them).
const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS: &str = "service.kubernetes.io/headless";

/// Which Services and EndpointSlices this proxy serves (`--service-proxy-name`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySelector {
    /// Claim Services labelled `service.kubernetes.io/service-proxy-name=<this>` instead of
    /// the unlabelled ones.
    pub service_proxy_name: Option<String>,
}

impl ProxySelector {
    /// The label selector kube-proxy watches with.
    #[must_use]
    pub fn label_selector(&self) -> String {
        match &self.service_proxy_name {
            Some(name) => format!("{SERVICE_PROXY_NAME}={name},!{HEADLESS}"),
            None => format!("!{SERVICE_PROXY_NAME},!{HEADLESS}"),
        }
    }

    /// The same selector, applied to an object's labels (for the manifests source).
    #[must_use]
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        get(HEADLESS).is_none()
            && get(SERVICE_PROXY_NAME).map(String::as_str) == self.service_proxy_name.as_deref()
    }
}

/// The objects of one manifest file (or one fixture), converted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
    pub nodes: Vec<NodeInfo>,
}

impl Objects {
    /// How many objects there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len() + self.slices.len() + self.nodes.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn labels(value: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    serde_json::from_value(value.get("metadata")?.get("labels")?.clone()).ok()
}

/// Converts one manifest document (a v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node,
/// or a `kind: List` of them) into `out`. Services and slices that `selector` does not match
/// are left out, as the API server would not send them.
///
/// # Errors
/// An unsupported kind or an invalid object, with the reason.
pub fn object(value: serde_json::Value, selector: &ProxySelector, out: &mut Objects) -> Result<()> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let selected = selector.matches(labels(&value).as_ref());
    match (api_version, kind) {
        (_, "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                object(item, selector, out)?;
            }
            Ok(())
        }
        ("v1", "Service") => {
            let svc: Service = serde_json::from_value(value)
                .map_err(|e| Error::decode("not a valid v1 Service", e))?;
            let svc = service(&svc)?;
            if selected {
                out.services.push(svc);
            }
            Ok(())
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = serde_json::from_value(value)
                .map_err(|e| Error::decode("not a valid discovery.k8s.io/v1 EndpointSlice", e))?;
            let slice = endpoint_slice(&slice)?;
            if selected {
                out.slices.push(slice);
            }
            Ok(())
        }
        ("v1", "Node") => {
            let n: Node = serde_json::from_value(value)
                .map_err(|e| Error::decode("not a valid v1 Node", e))?;
            if n.metadata.name.as_deref().is_none_or(str::is_empty) {
                return Err(Error::invalid("Node has no metadata.name"));
            }
            out.nodes.push(node(&n));
            Ok(())
        }
        ("", _) | (_, "") => Err(Error::invalid("document has no apiVersion or kind")),
        (api_version, kind) => Err(Error::invalid(format!(
            "unsupported object {api_version} {kind} (expected v1 Service, discovery.k8s.io/v1 EndpointSlice or v1 Node)"
        ))),
    }
}

/// Converts already-parsed manifests (e.g. a fixture's `objects`).
///
/// # Errors
/// The first invalid object, with its index.
pub fn objects(values: &[serde_json::Value], selector: &ProxySelector) -> Result<Objects> {
    let mut out = Objects::default();
    for (i, v) in values.iter().enumerate() {
        object(v.clone(), selector, &mut out)
            .map_err(|e| e.context(format!("object {}", i + 1)))?;
    }
    Ok(out)
}

/// The name and namespace of an object as the API reports it (for deletions).
#[must_use]
pub fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(labels: &str) -> serde_json::Value {
        serde_json::from_str(&format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"a","namespace":"x","labels":{{{labels}}}}},"spec":{{"clusterIP":"10.96.0.1","ports":[{{"port":53}}]}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_label_selector_leaves_out_claimed_and_headless_services() {
        let default = ProxySelector::default();
        let claimed = ProxySelector {
            service_proxy_name: Some("other".into()),
        };
        let cases = [
            ("", true, false),
            (
                r#""service.kubernetes.io/service-proxy-name":"other""#,
                false,
                true,
            ),
            (r#""service.kubernetes.io/headless":"""#, false, false),
            (r#""app":"web""#, true, false),
        ];
        for (labels, by_default, by_other) in cases {
            let count = |sel: &ProxySelector| objects(&[svc(labels)], sel).unwrap().services.len();
            assert_eq!(count(&default), usize::from(by_default), "{labels}");
            assert_eq!(count(&claimed), usize::from(by_other), "{labels}");
        }
        assert_eq!(
            default.label_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }

    #[test]
    fn a_node_manifest_gives_name_addresses_and_labels() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","labels":{"topology.kubernetes.io/zone":"z1"}},
                "status":{"addresses":[{"type":"Hostname","address":"n1"},{"type":"ExternalIP","address":"203.0.113.9"},{"type":"InternalIP","address":"192.168.0.2"}]}}"#,
        )
        .unwrap();
        let objs = objects(&[v], &ProxySelector::default()).unwrap();
        let n = &objs.nodes[0];
        assert_eq!(n.name, "n1");
        assert_eq!(n.zone(), Some("z1"));
        assert_eq!(
            n.ips,
            vec![
                "192.168.0.2".parse::<IpAddr>().unwrap(),
                "203.0.113.9".parse().unwrap()
            ],
            "InternalIPs first"
        );
    }
}

#[cfg(test)]
mod eligibility_tests {
    use super::*;

    fn node_json(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn deleted_or_autoscaler_tainted_nodes_are_not_eligible() {
        let plain = node_json(serde_json::json!({"metadata": {"name": "n"}}));
        assert!(!node(&plain).lb_ineligible);
        let tainted = node_json(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
        }));
        assert!(node(&tainted).lb_ineligible);
        let deleting = node_json(serde_json::json!({
            "metadata": {"name": "n", "deletionTimestamp": "2026-12-02T00:00:00Z"}
        }));
        assert!(node(&deleting).lb_ineligible);
    }
}
