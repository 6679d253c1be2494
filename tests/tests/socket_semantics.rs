//! End to end for the socket-level datapath's finer semantics: an unconnected UDP socket
//! keeps one backend, least connections counts sockets until they close, a Local policy
//! without local endpoints drops (no ECONNREFUSED), and loadBalancerSourceRanges apply to
//! pod clients of the LB IP too.
//!
//! Address plan (inside each test's own namespaces; nothing routes out):
//!   clients   10.0.0.2, 10.0.0.3 (pod CIDR 10.0.0.0/24)
//!   backends  10.0.1.2, 10.0.1.3, 10.0.1.4   (TCP and UDP servers on :8080)
//!   Services  10.96.0.10-13 (ClusterIPs), 1.2.3.4 and 1.2.3.5 (LB IPs)
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use kpr_testnet::{Topology, backends_of, slice_yaml, write_manifest};

const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 1, 2),
    Ipv4Addr::new(10, 0, 1, 3),
    Ipv4Addr::new(10, 0, 1, 4),
];
const WAIT: Duration = Duration::from_secs(10);

fn cluster(tag: &str, manifests: &str) -> (Topology, kpr_testnet::ChildGuard) {
    let mut t = Topology::new(tag);
    t.add_pod("client1", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("client2", Ipv4Addr::new(10, 0, 0, 3));
    for (i, ip) in BACKENDS.iter().enumerate() {
        let name = format!("backend{i}");
        t.add_pod(&name, *ip);
        t.serve(&name, &[8080]);
    }
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "all.yaml", manifests);
    let agent = t.start_agent_with(&dir, &["--cluster-cidr", "10.0.0.0/24"]);
    (t, agent)
}

/// A Service `name` on `vip`:80 -> 8080 (TCP and UDP) with `extra` spec lines and
/// metadata annotations, and its slice of `ips` (on this node).
fn service(name: &str, vip: &str, spec: &str, annotations: &str, ips: &[Ipv4Addr]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}, annotations: {{{annotations}}}}}\nspec:\n  clusterIP: {vip}\n{spec}  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}\n---\n{}---\n",
        slice_yaml(name, ips, 8080)
    )
}

fn wait_for(t: &Topology, frontend: &str) {
    t.wait_for_services(frontend, WAIT, |rows| {
        backends_of(rows, frontend, "TCP").is_some()
    });
}

#[test]
fn an_unconnected_udp_socket_keeps_one_backend() {
    let (t, _agent) = cluster("udpsock", &service("web", "10.96.0.10", "", "", &BACKENDS));
    wait_for(&t, "10.96.0.10:80");
    let mut all = BTreeSet::new();
    for _ in 0..10 {
        let lines = t.client("client1", &["udpsendto", "10.96.0.10:80", "20"]);
        let seen: BTreeSet<String> = lines
            .iter()
            .map(|l| {
                assert_eq!(
                    l["peer"], "10.96.0.10:80",
                    "recvfrom shows the Service: {l}"
                );
                l["backend"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{l}"))
                    .to_string()
            })
            .collect();
        assert_eq!(seen.len(), 1, "one socket, one backend: {seen:?}");
        all.extend(seen);
    }
    assert!(all.len() > 1, "different sockets still spread: {all:?}");
}

#[test]
fn least_connections_counts_sockets_until_they_close() {
    let (t, _agent) = cluster(
        "lcsock",
        &service(
            "web",
            "10.96.0.11",
            "",
            "kpr.io/lb-algorithm: least-conn",
            &BACKENDS[..2],
        ),
    );
    wait_for(&t, "10.96.0.11:80");
    // client1 holds one connection open: its backend has one live connection.
    let mut hold = t
        .workload_in("client1", &["hold", "10.96.0.11:80", "4", "200"], true)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    let held: serde_json::Value = serde_json::from_str(&first).unwrap();
    let held = held["connected"].as_str().unwrap().to_string();
    // Each short connection closes before the next: with closed sockets uncounted, every
    // one goes to the other backend.
    let lines = t.client("client2", &["tcp", "10.96.0.11:80", "10"]);
    for l in &lines {
        assert_ne!(
            l["backend"].as_str(),
            Some(held.as_str()),
            "the busy backend is avoided: {l}"
        );
        assert!(l["backend"].is_string(), "{l}");
    }
    let _ = hold.kill();
}

#[test]
fn local_policy_without_local_endpoints_drops_at_the_socket() {
    let yaml = service(
        "local",
        "10.96.0.12",
        "  internalTrafficPolicy: Local\n",
        "",
        &BACKENDS,
    )
    .replace("nodeName: test-node", "nodeName: node2");
    let (t, _agent) = cluster("localdrop", &yaml);
    wait_for(&t, "10.96.0.12:80");
    for l in t.client("client1", &["tcp", "10.96.0.12:80", "2"]) {
        assert_eq!(l["error"], "ETIMEDOUT", "dropped, not refused: {l}");
    }
    let udp = t.client("client1", &["udpsendto", "10.96.0.12:80", "1"]);
    assert_eq!(
        udp[0]["error"], "ETIMEDOUT",
        "a datagram vanishes: {}",
        udp[0]
    );
}

#[test]
fn load_balancer_source_ranges_apply_to_pod_clients() {
    let lb = |name: &str, vip: &str, lb_ip: &str, range: &str| {
        service(
            name,
            vip,
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{range}]\n"),
            "",
            &BACKENDS[..1],
        )
        .replace(
            "---\napiVersion: discovery",
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}}}\n---\napiVersion: discovery"),
        )
    };
    let yaml = format!(
        "{}{}",
        lb("closed", "10.96.0.13", "1.2.3.4", "192.0.2.0/24"),
        lb("open", "10.96.0.14", "1.2.3.5", "10.0.0.0/16")
    );
    let (t, _agent) = cluster("lbranges", &yaml);
    wait_for(&t, "1.2.3.5:80");
    for l in t.client("client1", &["tcp", "1.2.3.4:80", "2"]) {
        assert_eq!(
            l["error"], "ETIMEDOUT",
            "pods are outside the ranges: dropped: {l}"
        );
    }
    for l in t.client("client1", &["tcp", "1.2.3.5:80", "2"]) {
        assert_eq!(
            l["backend"], "10.0.1.2:8080",
            "pods are inside the ranges: {l}"
        );
    }
    // The ClusterIP of the closed Service is not subject to the ranges.
    for l in t.client("client1", &["tcp", "10.96.0.13:80", "2"]) {
        assert_eq!(l["backend"], "10.0.1.2:8080", "{l}");
    }
}

#[test]
fn started_like_kube_proxy_with_a_config_file() {
    let mut t = Topology::new("kpstyle");
    t.add_pod("client1", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("backend0", BACKENDS[0]);
    t.serve("backend0", &[8080]);
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(
        &dir,
        "all.yaml",
        &service("web", "10.96.0.20", "", "", &BACKENDS[..1]),
    );
    // kubeadm's config.conf, with the mode and the kpr section a node would add.
    let conf = t.workdir.join("config.conf");
    std::fs::write(
        &conf,
        kpr::config::KUBEADM_EXAMPLE.replace("mode: \"\"", "mode: ebpf")
            + "kpr:\n  lbAlgorithm: round-robin\n  conntrackMax: 65536\n",
    )
    .unwrap();
    let _agent = t.spawn(t.agent_command_kube_proxy_style(
        &dir,
        &[
            &format!("--config={}", conf.display()),
            "--hostname-override=test-node",
            "-v=2",
        ],
    ));
    wait_for(&t, "10.96.0.20:80");
    for l in t.client("client1", &["tcp", "10.96.0.20:80", "3"]) {
        assert_eq!(l["backend"], "10.0.1.2:8080", "{l}");
    }
    let rows = t.services_json().unwrap();
    let web = rows
        .iter()
        .find(|r| r["frontend"] == "10.96.0.20:80" && r["protocol"] == "TCP")
        .unwrap();
    assert_eq!(
        web["algorithm"], "round-robin",
        "the kpr section applies: {web}"
    );
}

#[test]
fn refuses_a_cgroup_that_is_not_the_nodes_root() {
    let t = Topology::new("cgcheck");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(kpr_testnet::kpr_bin())
        .arg(format!("--manifests={}", dir.display()))
        .arg(format!("--bpf-fs-path={}", t.bpffs.display()))
        .arg(format!("--cgroup-path={}", t.cgroup.path.display()))
        .args([
            "--proxy-mode=ebpf",
            "--tc-interfaces=none",
            "--cleanup-other-modes=false",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a child cgroup is refused: {err}");
    assert!(err.contains("is not the node's root cgroup"), "{err}");
    assert!(
        !t.bpffs
            .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION))
            .exists(),
        "nothing was loaded"
    );
}
