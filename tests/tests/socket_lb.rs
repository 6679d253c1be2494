//! End to end: the agent programs the socket-LB datapath from a manifests directory and real
//! connections from client pods reach the right backends.
//!
//! Address plan (inside each test's own namespaces; nothing routes out):
//!   clients   10.0.0.2, 10.0.0.3
//!   backends  10.0.1.2, 10.0.1.3, 10.0.1.4   (TCP and UDP servers on :8080)
//!   Service   10.96.0.10:80 -> targetPort 8080
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use kpr_testnet::{Topology, backends_of, service_yaml, slice_yaml, write_manifest};

const VIP: &str = "10.96.0.10";
const FRONTEND: &str = "10.96.0.10:80";
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 1, 2),
    Ipv4Addr::new(10, 0, 1, 3),
    Ipv4Addr::new(10, 0, 1, 4),
];
const WAIT: Duration = Duration::from_secs(10);

fn cluster(tag: &str) -> Topology {
    let mut t = Topology::new(tag);
    t.add_pod("client1", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("client2", Ipv4Addr::new(10, 0, 0, 3));
    for (i, ip) in BACKENDS.iter().enumerate() {
        let name = format!("backend{i}");
        t.add_pod(&name, *ip);
        t.serve(&name, &[8080]);
    }
    t
}

fn expected(ips: &[Ipv4Addr]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
    v.sort();
    v
}

fn backends_seen(lines: &[serde_json::Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| {
            l["backend"]
                .as_str()
                .unwrap_or_else(|| panic!("attempt failed: {l}"))
                .to_string()
        })
        .collect()
}

#[test]
fn tcp_and_udp_reach_every_backend_and_only_those() {
    let t = cluster("lb");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "svc.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let _agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS))
    });

    let tcp = t.client("client1", &["tcp", &format!("{VIP}:80"), "200"]);
    assert_eq!(tcp.len(), 200);
    assert_eq!(backends_seen(&tcp), expected(&BACKENDS).into_iter().collect());
    for l in &tcp {
        assert_eq!(l["peer"], FRONTEND, "getpeername must show the Service address: {l}");
    }

    let udp = t.client("client2", &["udp", &format!("{VIP}:80"), "200"]);
    assert_eq!(backends_seen(&udp), expected(&BACKENDS).into_iter().collect());
    for l in &udp {
        assert_eq!(l["peer"], FRONTEND, "recvfrom must show the Service address: {l}");
    }
}

#[test]
fn endpoint_and_service_removal_take_effect() {
    let t = cluster("rm");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "svc.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let _agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS))
    });

    // Remove backend 10.0.1.4 from the slice: it is never chosen again.
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS[..2], 8080));
    t.wait_for_services("2 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS[..2]))
    });
    let tcp = t.client("client1", &["tcp", &format!("{VIP}:80"), "150"]);
    assert_eq!(backends_seen(&tcp), expected(&BACKENDS[..2]).into_iter().collect());

    // Zero endpoints: connect() is refused at once.
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &[], 8080));
    t.wait_for_services("no backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(vec![])
    });
    let refused = t.client("client1", &["tcp", &format!("{VIP}:80"), "3"]);
    for l in &refused {
        assert_eq!(l["error"], "ECONNREFUSED", "{l}");
    }
    let refused_udp = t.client("client1", &["udp", &format!("{VIP}:80"), "1"]);
    assert_eq!(refused_udp[0]["error"], "ECONNREFUSED", "{}", refused_udp[0]);

    // Delete the Service: it is no longer translated (the SYN to the VIP dies in the node
    // namespace, which has no route for it).
    std::fs::remove_file(dir.join("svc.yaml")).unwrap();
    t.wait_for_services("frontend gone", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP").is_none()
    });
    let after = t.client("client1", &["tcp", &format!("{VIP}:80"), "1"]);
    assert!(after[0]["backend"].is_null(), "untranslated connect must not reach a backend: {}", after[0]);
}
