//! End to end for traffic from outside the cluster (TC programs in the node namespace):
//! NodePort and LoadBalancer IPs, masquerade under eTP=Cluster, client IP kept under
//! eTP=Local, REJECT (TCP RST) without endpoints.
//!
//! Address plan (all inside the test's namespaces):
//!   outside host 203.0.113.2, linked to the node, which owns 192.168.0.2 on that link
//!   backend pod  10.180.0.1 (:80 TCP+UDP), on this node
//!   Service np    NodePort 3001 (TCP) / 3053 (UDP), eTP=Cluster
//!   Service lb    LoadBalancer 1.2.3.4:80, NodePort 3002, eTP=Local
//!   Service empty NodePort 3003, no endpoints
use std::net::Ipv4Addr;
use std::time::Duration;

use kpr_testnet::{ChildGuard, Topology, backends_of, write_manifest};

const MANIFESTS: &str = "\
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: np}
spec:
  type: NodePort
  clusterIP: 172.30.0.41
  ports:
  - {name: t, port: 80, targetPort: 80, nodePort: 3001, protocol: TCP}
  - {name: u, port: 80, targetPort: 80, nodePort: 3053, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: np-1, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}]
ports: [{name: t, port: 80, protocol: TCP}, {name: u, port: 80, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: lb}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.42
  externalTrafficPolicy: Local
  healthCheckNodePort: 30000
  ports: [{name: t, port: 80, targetPort: 80, nodePort: 3002, protocol: TCP}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: lb-1, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}]
ports: [{name: t, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: remote-only}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.44
  externalTrafficPolicy: Local
  healthCheckNodePort: 30001
  ports: [{name: t, port: 81, targetPort: 80, nodePort: 3004, protocol: TCP}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.5}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: remote-only-1, labels: {kubernetes.io/service-name: remote-only}}
addressType: IPv4
endpoints: [{addresses: [10.180.2.1], conditions: {ready: true}, nodeName: node2}]
ports: [{name: t, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: empty}
spec:
  type: NodePort
  clusterIP: 172.30.0.43
  ports:
  - {name: t, port: 80, targetPort: 80, nodePort: 3003, protocol: TCP}
  - {name: u, port: 80, targetPort: 80, nodePort: 3063, protocol: UDP}
";

/// The topology of the plan above with `MANIFESTS` programmed by an agent in the node
/// namespace.
fn cluster(tag: &str) -> (Topology, ChildGuard) {
    let mut t = Topology::new(tag);
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    t.add_pod("backend", Ipv4Addr::new(10, 180, 0, 1));
    t.serve("backend", &[80]);
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "all.yaml", MANIFESTS);
    let agent = t.start_agent_in_node(&dir, &["--node-ip", "192.168.0.2"]);
    t.wait_for_services("frontends", Duration::from_secs(15), |rows| {
        backends_of(rows, "192.168.0.2:3001", "TCP").is_some()
    });
    (t, agent)
}

#[test]
fn outside_traffic_to_nodeport_and_lb_ip() {
    let (t, _agent) = cluster("np");
    // The TC programs attach on the next interface scan.
    std::thread::sleep(Duration::from_millis(500));

    let np = t.outside_client("outside", &["tcp", "192.168.0.2:3001", "5"]);
    for l in &np {
        assert_eq!(l["backend"], "10.180.0.1:80", "{l}");
        assert_eq!(
            l["seen_src"], "192.168.0.2",
            "eTP=Cluster is masqueraded to the node: {l}"
        );
        assert_eq!(l["peer"], "192.168.0.2:3001", "{l}");
    }
    let udp = t.outside_client("outside", &["udp", "192.168.0.2:3053", "3"]);
    for l in &udp {
        assert_eq!(l["backend"], "10.180.0.1:80", "{l}");
        assert_eq!(
            l["peer"], "192.168.0.2:3053",
            "replies come from the NodePort: {l}"
        );
    }
    let lb = t.outside_client("outside", &["tcp", "1.2.3.4:80", "5"]);
    for l in &lb {
        assert_eq!(l["backend"], "10.180.0.1:80", "{l}");
        assert_eq!(
            l["seen_src"], "203.0.113.2",
            "eTP=Local keeps the client address: {l}"
        );
        assert_eq!(l["peer"], "1.2.3.4:80", "{l}");
    }
    let refused = t.outside_client("outside", &["tcp", "192.168.0.2:3003", "2"]);
    for l in &refused {
        assert_eq!(
            l["error"], "ECONNREFUSED",
            "no endpoints: TCP RST at once: {l}"
        );
    }
}

#[test]
fn health_check_node_ports_healthz_and_metrics() {
    let (t, _agent) = cluster("hc");
    let get = |addr: &str, path: &str| -> serde_json::Value {
        let start = std::time::Instant::now();
        loop {
            let l = t.outside_client("outside", &["http", addr, path]).remove(0);
            if l["status"].as_u64().is_some_and(|s| s != 0)
                || start.elapsed() > kpr_testnet::scaled(Duration::from_secs(10))
            {
                return l;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let ok = get("192.168.0.2:30000", "/");
    assert_eq!(ok["status"], 200, "{ok}");
    let body: serde_json::Value = serde_json::from_str(ok["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["service"]["namespace"], "ns");
    assert_eq!(body["service"]["name"], "lb");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["serviceProxyHealthy"], true, "{body}");
    let none = get("192.168.0.2:30001", "/");
    assert_eq!(none["status"], 503, "no local endpoint: {none}");
    assert!(
        none["body"]
            .as_str()
            .unwrap()
            .contains("\"localEndpoints\":0"),
        "{none}"
    );
    let healthz = get("192.168.0.2:10256", "/healthz");
    assert_eq!(healthz["status"], 200, "{healthz}");
    // Metrics listen on the node's loopback only.
    let out = t
        .command_in_ns(
            &t.node.path(),
            &kpr_testnet::kpr_bin(),
            &["workload", "http", "127.0.0.1:10249", "/metrics"],
            false,
        )
        .output()
        .unwrap();
    let l: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l["status"], 200);
    let text = l["body"].as_str().unwrap();
    for want in [
        "kpr_sync_proxy_rules_total",
        // upstream's names, types and labels
        "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "# TYPE kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 1",
        "process_resident_memory_bytes",
        // kpr's datapath counters
        "kpr_conntrack_capacity",
        "kpr_datapath_drops_total{reason=\"conntrack_full\"}",
    ] {
        assert!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }
    // /configz: the effective configuration.
    let out = t
        .command_in_ns(
            &t.node.path(),
            &kpr_testnet::kpr_bin(),
            &["workload", "http", "127.0.0.1:10249", "/configz"],
            false,
        )
        .output()
        .unwrap();
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = kpr::config::parse(c["body"].as_str().unwrap()).expect("/configz parses back");
    assert_eq!(
        cfg.config.hostname_override.as_deref(),
        Some("test-node"),
        "{c}"
    );
    assert!(cfg.unknown.is_empty(), "{:?}", cfg.unknown);
    // upstream's health body: timestamps, node eligibility
    let body: serde_json::Value = serde_json::from_str(healthz["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["healthy"], true, "{body}");
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert!(
        body["lastUpdated"].as_str().unwrap().starts_with("20"),
        "an RFC 3339 time: {body}"
    );
}
