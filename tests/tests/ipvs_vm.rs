//! The ipvs mode end to end in a node namespace, read back with the independent tools
//! (`ipvsadm`, `ipset`, `iptables-save`): a ClusterIP served through IPVS with the configured
//! scheduler, sessionAffinity as persistence, graceful termination (a removed backend with a
//! live connection drains at weight 0 while the connection keeps working), and `kpr cleanup`
//! leaving no virtual server, no `kube-ipvs0`, no ipset and no `KUBE-*` chain.
//!
//! IPVS needs a kernel with `ip_vs`, which this machine's 6.18 lacks: this target is
//! `test = false` (tests/Cargo.toml), so `cargo test` on the host neither runs nor counts
//! it, and the 6.1 VM builds and runs it (`cargo xtask vm-test`). The ipvs datapath
//! conformance runs here too. The refusal without IPVS is checked on every kernel in
//! `ipvs_refusal.rs`.
//!
//! Address plan (all inside the test's namespaces): client pod 10.0.0.2; backends 10.180.0.1
//! and 10.180.0.2; Services web 172.30.0.10:80, sticky 172.30.0.12:80 (ClientIP affinity),
//! dns 172.30.0.13:53/UDP; node 192.168.0.2.
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpr_testnet::{Topology, kpr_bin, write_manifest};

#[test]
fn fixtures_pass_on_the_ipvs_datapath() {
    kpr_testnet::conformance_datapath_passes("ipvs");
}

fn manifests(web: &[&str]) -> String {
    let eps = |ips: &[&str]| -> String {
        ips.iter()
            .map(|ip| format!("{{addresses: [{ip}], nodeName: test-node}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: web}}\nspec: {{clusterIP: 172.30.0.10, ports: [{{name: p, port: 80, targetPort: 80}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: 80}}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: sticky}}\nspec: {{clusterIP: 172.30.0.12, sessionAffinity: ClientIP, ports: [{{name: p, port: 80, targetPort: 80}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: sticky-1, labels: {{kubernetes.io/service-name: sticky}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: 80}}]\n",
        eps(web),
        eps(&["10.180.0.1", "10.180.0.2"]),
    )
}

fn cluster(tag: &str) -> (Topology, std::path::PathBuf) {
    Topology::client_and_two_backends(tag, &manifests(&["10.180.0.1"]))
}

/// Waits until `ipvsadm -Sn` in the node satisfies `cond`.
fn wait_ipvs(t: &Topology, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let s = t.in_node("ipvsadm", &["-Sn"]);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(30)),
            "{what}: ipvsadm -Sn shows\n{s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ipvs_mode_serves_with_affinity_and_drains_removed_backends() {
    kpr_testnet::require_root();
    assert!(kpr_testnet::kernel_has_ipvs(), "this kernel has no IPVS");
    let (mut t, dir) = cluster("ipvs");
    let mut agent = t.start_mode_agent_in_node_with(&dir, "ipvs", &["--ipvs-scheduler", "lc"]);
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    let s = t.in_node("ipvsadm", &["-Sn"]);
    assert!(
        s.contains("-A -t 172.30.0.10:80 -s lc"),
        "scheduler lc: {s}"
    );
    assert!(
        s.contains("-a -t 172.30.0.10:80 -r 10.180.0.1:80 -m -w 1"),
        "NAT real server, weight 1: {s}"
    );
    assert!(
        s.contains("-A -t 172.30.0.12:80 -s lc -p 10800"),
        "ClientIP affinity is persistence with the Service's timeout: {s}"
    );
    assert!(
        t.in_node("ip", &["-o", "addr", "show", "dev", "kube-ipvs0"])
            .contains("172.30.0.10/32"),
        "the ClusterIP is bound to kube-ipvs0"
    );
    let set = t.in_node("ipset", &["list", "KUBE-CLUSTER-IP"]);
    assert!(set.contains("172.30.0.10,tcp:80"), "{set}");
    // Affinity: one client, one backend, every time.
    let lines = t.client("client", &["tcp", "172.30.0.12:80", "12"]);
    let sticky: std::collections::BTreeSet<&str> =
        lines.iter().filter_map(|l| l["backend"].as_str()).collect();
    assert_eq!(sticky.len(), 1, "{lines:?}");

    // A long-lived connection to web's only backend, then web moves to b.
    let mut hold = t.spawn_client("client", &["hold", "172.30.0.10:80", "8", "100"]);
    let mut out = BufReader::new(hold.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("10.180.0.1:80"), "held through a: {first}");
    write_manifest(&dir, "all.yaml", &manifests(&["10.180.0.2"]));
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.2:80"]);
    let s = wait_ipvs(&t, "a drains at weight 0 while its connection lives", |s| {
        s.contains("-a -t 172.30.0.10:80 -r 10.180.0.1:80 -m -w 0")
    });
    assert!(
        s.contains("-a -t 172.30.0.10:80 -r 10.180.0.2:80 -m -w 1"),
        "{s}"
    );
    let rest: Vec<serde_json::Value> = out
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let _ = hold.wait();
    let failed: Vec<_> = rest.iter().filter(|e| !e["error"].is_null()).collect();
    assert!(
        rest.len() > 20 && failed.is_empty(),
        "the draining backend's connection kept working: {} echoes, failed {failed:?}",
        rest.len()
    );

    // Restart: the new agent adopts what IPVS holds (no duplicate, nothing lost).
    agent.kill9();
    let _agent = t.start_mode_agent_in_node_with(&dir, "ipvs", &["--ipvs-scheduler", "rr"]);
    wait_ipvs(
        &t,
        "the restarted agent switches the scheduler in place",
        |s| s.contains("-A -t 172.30.0.10:80 -s rr"),
    );
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.2:80"]);
    drop(_agent);

    // Cleanup removes everything the mode made.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.node.path().display()))
        .arg(kpr_bin())
        .args(["cleanup", "--bpf-fs-path"])
        .arg(&t.bpffs)
        .stderr(Stdio::piped())
        .output()
        .expect("kpr cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !t.in_node("ipvsadm", &["-Sn"]).contains("-A"),
        "no virtual server left"
    );
    assert!(!t.in_node("ip", &["link"]).contains("kube-ipvs0"));
    let sets = t.in_node("ipset", &["list", "-n"]);
    assert!(!sets.contains("KUBE-"), "no ipset left: {sets}");
    let save = t.in_node("iptables-save", &[]);
    assert!(
        !save.contains("KUBE-"),
        "no KUBE-* chain or jump left: {save}"
    );
}

/// Waits until `cond` holds for the node's `iptables-save` plus `ipset list -n` plus links.
fn wait_node(t: &Topology, what: &str, cond: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let s = t.in_node("iptables-save", &[])
            + &t.in_node("ipset", &["list", "-n"])
            + &t.in_node("ip", &["-o", "link"]);
        if cond(&s) {
            return;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(30)),
            "{what}:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn switching_between_the_iptables_and_ipvs_modes_keeps_serving_and_cleans_up() {
    kpr_testnet::require_root();
    assert!(kpr_testnet::kernel_has_ipvs(), "this kernel has no IPVS");
    let (t, dir) = cluster("ipvsw");
    let mut a = t.start_mode_agent_in_node(&dir, "iptables");
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    a.kill9();
    // iptables -> ipvs: the ipvs layout is hooked in, the iptables mode's chains go.
    let mut b = t.start_mode_agent_in_node(&dir, "ipvs");
    wait_node(
        &t,
        "the iptables mode's chains removed, ipvs hooked in",
        |s| {
            !s.contains(":KUBE-SVC-")
            && !s.contains(":KUBE-SEP-")
            && s.contains("-A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER")
            && s.contains("-A OUTPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER")
        },
    );
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    b.kill9();
    // ipvs -> iptables: served through the iptables rules (its jumps intact), and every
    // trace of the ipvs mode goes.
    let _c = t.start_mode_agent_in_node(&dir, "iptables");
    wait_node(&t, "the ipvs mode's leftovers removed", |s| {
        !s.contains("kube-ipvs0")
            && !s.contains("KUBE-IPVS-FILTER")
            && !s.contains("KUBE-CLUSTER-IP")
            && s.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
            && s.contains(":KUBE-SVC-")
    });
    assert!(
        !t.in_node("ipvsadm", &["-Sn"]).contains("-A"),
        "no virtual server left"
    );
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
}
