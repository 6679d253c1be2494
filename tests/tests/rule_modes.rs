//! The iptables and nftables modes end to end in a node namespace: real connections through
//! a ClusterIP, an endpoint change applied as a partial sync (the other Service's rules keep
//! their packet counters, so they were not rewritten), a switch of modes that removes what the
//! previous mode left, and `kpr cleanup` leaving no KUBE-* chain and no kpr table.
//!
//! Address plan (all inside the test's namespaces): client pod 10.0.0.2; backends 10.180.0.1
//! and 10.180.0.2; Services web 172.30.0.10:80 and other 172.30.0.11:80; node 192.168.0.2.
use std::process::Command;
use std::time::{Duration, Instant};

use kpr_testnet::{Topology, kpr_bin, write_manifest};

fn manifests(web_backends: &[&str]) -> String {
    let eps: Vec<String> = web_backends
        .iter()
        .map(|ip| format!("{{addresses: [{ip}], nodeName: test-node}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: web}}\nspec: {{clusterIP: 172.30.0.10, ports: [{{name: p, port: 80, targetPort: 80}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: 80}}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: other}}\nspec: {{clusterIP: 172.30.0.11, ports: [{{name: p, port: 80, targetPort: 80}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: other-1, labels: {{kubernetes.io/service-name: other}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.180.0.2], nodeName: test-node}}]\nports: [{{name: p, port: 80}}]\n",
        eps.join(", ")
    )
}

fn iptables_save(t: &Topology) -> String {
    t.in_node("iptables-save", &[]) + &t.in_node("iptables-save", &["-c"])
}

fn kpr_table(t: &Topology) -> String {
    t.in_node("nft", &["list", "table", "ip", "kpr"])
}

fn cluster(tag: &str) -> (Topology, std::path::PathBuf) {
    Topology::client_and_two_backends(tag, &manifests(&["10.180.0.1"]))
}

fn agent(t: &Topology, dir: &std::path::Path, mode: &str) -> kpr_testnet::ChildGuard {
    t.start_mode_agent_in_node(dir, mode)
}

fn cleanup_in_node(t: &Topology) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.node.path().display()))
        .arg(kpr_bin())
        .args(["cleanup", "--bpf-fs-path"])
        .arg(&t.bpffs)
        .output()
        .expect("kpr cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn iptables_mode_serves_syncs_partially_and_cleans_up() {
    let (t, dir) = cluster("ipt");
    let mut a = agent(&t, &dir, "iptables");
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    t.wait_reaches("client", "172.30.0.11:80", &["10.180.0.2:80"]);
    let save = iptables_save(&t);
    assert!(save.contains(":KUBE-SVC-"), "{save}");
    // The node's conntrack settings, as upstream sets them (a new namespace starts with the
    // kernel's 60 s close-wait timeout; kube-proxy's default is 1 h).
    let close_wait = t.in_node(
        "cat",
        &["/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"],
    );
    assert_eq!(
        close_wait.trim(),
        "3600",
        "conntrack.tcpCloseWaitTimeout applied"
    );
    assert!(
        save.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ),
        "{save}"
    );
    // Counters of the other Service's chain survive a change of web: its chain was not
    // rewritten (iptables-restore --noflush only touched web's chains).
    let other_counters = |save: &str| -> Vec<String> {
        save.lines()
            .filter(|l| l.starts_with('[') && l.contains("ns/other:p") && l.contains("DNAT"))
            .map(|l| l.split(']').next().unwrap_or("").to_string())
            .collect()
    };
    let before = other_counters(&t.in_node("iptables-save", &["-c", "-t", "nat"]));
    assert_eq!(before.len(), 1, "{before:?}");
    assert_ne!(before[0], "[0:0", "the other Service carried traffic");
    write_manifest(&dir, "all.yaml", &manifests(&["10.180.0.1", "10.180.0.2"]));
    t.wait_reaches(
        "client",
        "172.30.0.10:80",
        &["10.180.0.1:80", "10.180.0.2:80"],
    );
    let after = other_counters(&t.in_node("iptables-save", &["-c", "-t", "nat"]));
    assert_eq!(
        after
            .first()
            .map(String::as_str)
            .unwrap_or("")
            .split(':')
            .next(),
        before[0].split(':').next(),
        "the other Service's DNAT rule kept its packet count: not rewritten"
    );
    a.kill9();
    // Another mode takes over: it removes the KUBE-* chains once its own table is up.
    let _b = agent(&t, &dir, "nftables");
    t.wait_reaches(
        "client",
        "172.30.0.10:80",
        &["10.180.0.1:80", "10.180.0.2:80"],
    );
    let start = Instant::now();
    while iptables_save(&t).contains(":KUBE-") {
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(10)),
            "the nftables mode removes the iptables mode's chains: {}",
            iptables_save(&t)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nftables_mode_serves_syncs_incrementally_and_cleans_up() {
    let (t, dir) = cluster("nft");
    let mut a = agent(&t, &dir, "nftables");
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    let table = kpr_table(&t);
    assert!(table.contains("map service-ips"), "{table}");
    assert!(
        table.contains("172.30.0.10 . tcp . 80 : goto service-"),
        "{table}"
    );
    write_manifest(&dir, "all.yaml", &manifests(&["10.180.0.2"]));
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.2:80"]);
    assert!(
        !kpr_table(&t).contains("10.180.0.1"),
        "the removed endpoint's chain is gone"
    );
    // Scaled to zero: REJECT.
    write_manifest(&dir, "all.yaml", &manifests(&[]));
    let start = Instant::now();
    loop {
        let lines = t.client("client", &["tcp", "172.30.0.10:80", "2"]);
        if lines.iter().all(|l| l["error"] == "ECONNREFUSED") {
            break;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(20)),
            "{lines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.kill9();
    assert!(
        kpr_table(&t).contains("table ip kpr"),
        "the datapath outlives the agent"
    );
    cleanup_in_node(&t);
    assert_eq!(kpr_table(&t), "", "kpr cleanup removes the table");
    assert!(
        !t.in_node("nft", &["list", "tables"]).contains("kpr"),
        "no kpr table in either family"
    );
}

#[test]
fn cleanup_removes_every_kube_chain() {
    let (t, dir) = cluster("iptclean");
    let mut a = agent(&t, &dir, "iptables");
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    a.kill9();
    assert!(iptables_save(&t).contains("KUBE-SERVICES"));
    cleanup_in_node(&t);
    let save = iptables_save(&t) + &t.in_node("ip6tables-save", &[]);
    assert!(!save.contains("KUBE-"), "{save}");
}

fn udp_service(backend: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: dns}}\nspec: {{clusterIP: 172.30.0.20, ports: [{{name: d, port: 53, targetPort: 80, protocol: UDP}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{backend}], nodeName: test-node}}]\nports: [{{name: d, port: 80, protocol: UDP}}]\n"
    )
}

/// One connected UDP socket (one conntrack entry) keeps sending through a ClusterIP while its
/// backend is replaced: the stale entry is deleted, so the same flow reaches the new backend
/// although the old one still answers.
fn udp_flow_follows_a_replaced_backend(mode: &str) {
    let (mut t, dir) = cluster(&format!("ct{}", &mode[..3]));
    write_manifest(&dir, "dns.yaml", &udp_service("10.180.0.1"));
    let _a = agent(&t, &dir, mode);
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    // Long enough for the change's sync to land under an emulated CPU too (the VM's
    // iptables-restore takes seconds there): both stretched by the time scale.
    let secs = (6 * kpr_testnet::time_scale()).to_string();
    let flow = t.spawn_client("client", &["udphold", "172.30.0.20:53", &secs, "100"]);
    std::thread::sleep(kpr_testnet::scaled(Duration::from_secs(2)));
    write_manifest(&dir, "dns.yaml", &udp_service("10.180.0.2"));
    let out = flow.wait_with_output().expect("udphold");
    let backends: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["backend"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        backends.first().map(String::as_str),
        Some("10.180.0.1:80"),
        "{backends:?}"
    );
    assert_eq!(
        backends.last().map(String::as_str),
        Some("10.180.0.2:80"),
        "the same connected socket reaches the new backend: {backends:?}"
    );
}

#[test]
fn iptables_udp_flow_follows_a_replaced_backend() {
    udp_flow_follows_a_replaced_backend("iptables");
}

#[test]
fn nftables_udp_flow_follows_a_replaced_backend() {
    udp_flow_follows_a_replaced_backend("nftables");
}
