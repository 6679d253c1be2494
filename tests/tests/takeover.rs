//! Takeover without drops: a node whose Services are served by kube-proxy-style iptables
//! rules (kpr's iptables mode stands in for kube-proxy: upstream's chain layout) is taken over
//! by the ebpf mode while connections flow — new connections continuously from a pod to a
//! ClusterIP and from outside to a NodePort, plus one long-lived connection — and the old
//! rules are removed only after the new datapath holds every Service. Zero failed new
//! connections (before the fix, removing the old rules before the first sync dropped some).
//! The long-lived connection, established through the old rules' DNAT, answers throughout:
//! the new datapath leaves flows the kernel's conntrack translates to the kernel.
//!
//! Address plan (inside the test's namespaces):
//!   client pod 10.0.0.2; backends 10.180.0.1, 10.180.0.2 (:80)
//!   outside host 203.0.113.2, linked to the node (192.168.0.2)
//!   Service web: ClusterIP 172.30.0.10:80, NodePort 30080 (eTP=Cluster)
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use kpr_testnet::{Topology, backends_of, write_manifest};

const MANIFESTS: &str = "\
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: web}
spec:
  type: NodePort
  clusterIP: 172.30.0.10
  ports: [{name: p, port: 80, targetPort: 80, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}
- {addresses: [10.180.0.2], conditions: {ready: true}, nodeName: test-node}
ports: [{name: p, port: 80, protocol: TCP}]
";

fn in_node(t: &Topology, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.node.path().display()))
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chains(t: &Topology) -> String {
    in_node(t, &["iptables-save", "-t", "nat"])
}

fn agent(t: &Topology, dir: &std::path::Path, mode: &str) -> kpr_testnet::ChildGuard {
    t.start_mode_agent_in_node(dir, mode)
}

fn collect(mut child: std::process::Child) -> Vec<serde_json::Value> {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = child.wait();
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Every one of `n` connection attempts (a workload's JSON lines) reached a backend.
fn assert_all_answered(what: &str, lines: &[serde_json::Value], n: usize) {
    assert_eq!(lines.len(), n, "{what}");
    let failed: Vec<_> = lines.iter().filter(|l| !l["error"].is_null()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} failed: {failed:?}",
        failed.len()
    );
}

/// A `hold` workload's connection was made and answered every request of its run.
fn assert_held(what: &str, hold: &[serde_json::Value]) {
    assert!(hold[0]["connected"].is_string(), "{what}: {:?}", hold[0]);
    let failed: Vec<_> = hold[1..].iter().filter(|e| !e["error"].is_null()).collect();
    assert!(
        hold.len() > 30 && failed.is_empty(),
        "{what}: {} requests, failed: {failed:?}",
        hold.len() - 1
    );
}

/// The address plan's topology, with the Service's manifests written.
fn cluster(name: &str) -> (Topology, std::path::PathBuf) {
    let mut t = Topology::new(name);
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    for (name, ip) in [("a", [10, 180, 0, 1]), ("b", [10, 180, 0, 2])] {
        t.add_pod(name, Ipv4Addr::from(ip));
        t.serve(name, &[80]);
    }
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "all.yaml", MANIFESTS);
    (t, dir)
}

#[test]
fn ebpf_takes_over_from_iptables_rules_without_dropping_connections() {
    let (t, dir) = cluster("takeover");

    // kube-proxy's rules, written by kpr's iptables mode.
    let mut old = agent(&t, &dir, "iptables");
    let start = std::time::Instant::now();
    while !chains(&t).contains("KUBE-SVC-") {
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(15)),
            "iptables rules"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Served by the rules (their jumps land right after the chains; an emulated CPU is slow).
    let start = std::time::Instant::now();
    loop {
        let lines = t.client("client", &["tcp", "172.30.0.10:80", "3"]);
        if lines.iter().all(|l| l["backend"].is_string()) {
            break;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(10)),
            "served by the rules: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Traffic that spans the takeover: a long-lived connection, and new connections every
    // 40 ms from a pod (ClusterIP) and from outside (NodePort).
    let hold = t
        .workload_in("client", &["hold", "172.30.0.10:80", "6", "100"], true)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pod = t
        .workload_in("client", &["tcp", "172.30.0.10:80", "120", "40"], true)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let outside = t
        .workload_in("outside", &["tcp", "192.168.0.2:30080", "120", "40"], false)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));

    // kube-proxy goes (its rules stay), kpr's ebpf mode comes up and only then removes them.
    old.kill9();
    let _new = agent(&t, &dir, "ebpf");
    t.wait_for_services("ebpf frontends", Duration::from_secs(15), |rows| {
        backends_of(rows, "172.30.0.10:80", "TCP").is_some()
    });
    let start = std::time::Instant::now();
    while chains(&t).contains("KUBE-SVC-") {
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(15)),
            "kube-proxy's chains are removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every KUBE-* chain of both families and both tables goes (IPv6 after IPv4); kpr holds
    // the kernel's conntrack for the flows established through them.
    let leftovers = || {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .flat_map(|save| ["nat", "filter"].map(|table| (save, table)))
            .map(|(save, table)| (save, table, in_node(&t, &[save, "-t", table])))
            .filter(|(_, _, text)| text.contains("KUBE-"))
            .collect::<Vec<_>>()
    };
    let start = std::time::Instant::now();
    while !leftovers().is_empty() && start.elapsed() < kpr_testnet::scaled(Duration::from_secs(15))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = leftovers();
    assert!(
        left.is_empty(),
        "KUBE-* chains after the takeover: {left:?}"
    );
    let hold_table = in_node(&t, &["nft", "list", "table", "inet", "kpr-takeover"]);
    assert!(
        hold_table.contains("ct state"),
        "conntrack held: {hold_table:?}"
    );

    let pod = collect(pod);
    let outside = collect(outside);
    let hold = collect(hold);
    for (what, lines) in [
        ("pod -> ClusterIP", &pod),
        ("outside -> NodePort", &outside),
    ] {
        assert_all_answered(what, &lines, 120);
    }
    // The long-lived connection was established through the old rules' DNAT: the kernel's
    // conntrack keeps translating it, and the new datapath leaves it to the kernel.
    assert_held("the long-lived connection through the takeover", &hold);
}

/// A kpr whose map layout differs from the running one's (simulated: the pinned state is moved
/// to an older layout version's directory while the agent is down) stages its programs and
/// maps, fills the maps, and only then swaps its programs into the running links and carries
/// the conntrack entries over: new connections never fail, and long-lived ones — a pod's to a
/// ClusterIP (socket level) and an outside client's to a NodePort (TC, conntrack) — survive.
#[test]
fn an_agent_with_another_map_layout_replaces_the_running_one_without_drops() {
    let (t, dir) = cluster("relayout");
    let mut old = agent(&t, &dir, "ebpf");
    t.wait_for_services("ebpf frontends", Duration::from_secs(15), |rows| {
        backends_of(rows, "172.30.0.10:80", "TCP").is_some()
    });
    let spawn = |ns: &str, args: &[&str], cgroup: bool| {
        t.workload_in(ns, args, cgroup)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let pod_hold = spawn("client", &["hold", "172.30.0.10:80", "6", "100"], true);
    let outside_hold = spawn("outside", &["hold", "192.168.0.2:30080", "6", "100"], false);
    let pod = spawn("client", &["tcp", "172.30.0.10:80", "120", "40"], true);
    let outside = spawn("outside", &["tcp", "192.168.0.2:30080", "120", "40"], false);
    std::thread::sleep(Duration::from_millis(1000));

    old.kill9();
    let current = t
        .bpffs
        .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION));
    let older = t.bpffs.join("v1");
    std::fs::rename(&current, &older).expect("moving the pins (bpffs supports rename)");
    let _new = agent(&t, &dir, "ebpf");
    let start = std::time::Instant::now();
    while older.exists() {
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(15)),
            "the older layout's pins are removed after the swap"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(current.join("maps").exists());

    for (what, lines) in [
        ("pod -> ClusterIP", collect(pod)),
        ("outside -> NodePort", collect(outside)),
    ] {
        assert_all_answered(what, &lines, 120);
    }
    for (what, hold) in [
        ("pod -> ClusterIP", collect(pod_hold)),
        ("outside -> NodePort", collect(outside_hold)),
    ] {
        assert_held(what, &hold);
    }
}
