//! The failures users of other kube-proxy replacements report most often, each reproduced with
//! real traffic in every mode this kernel runs (ebpf, iptables, nftables; the ipvs mode's
//! kernel is the VM's). Each test prints one `KPR-FIGURE` line for `cargo xtask reliability`.
//!
//! 1. UDP 0 -> N and N -> 0 endpoints, one client with a fixed source port.
//! 2. A connected UDP socket whose backend is deleted, from a pod and from the host.
//! 3. The agent SIGKILLed under TCP and UDP load while the API server is unresponsive.
//! 4. eTP=Local when the only local endpoints are terminating.
//! 5. Path MTU discovery through a ClusterIP and a NodePort across a 1280-byte hop.
//! 6. A SYN flood beside long-lived flows.
//!
//! Address plan (all inside the test's namespaces): client pod 10.0.0.2; backends 10.180.0.1
//! ("a") and 10.180.0.2 ("b"); outside host 203.0.113.2 linked to the node's 192.168.0.2.
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kpr_testnet::{
    ChildGuard, NetNs, Pod, Topology, collect_json_lines as collect, kpr_bin, scaled,
    stop_json_lines as stop, write_manifest,
};
use serde_json::{Value, json};

fn figure(v: &Value) {
    println!("KPR-FIGURE {v}");
}

/// Extra flags per mode: the ebpf mode's conntrack map is kept small where a test fills it.
fn agent(t: &Topology, dir: &std::path::Path, mode: &str, extra: &[&str]) -> ChildGuard {
    t.start_mode_agent_in_node_with(dir, mode, extra)
}

/// A ClusterIP TCP Service `web` 172.30.0.10:80 -> a, which tells when the agent has synced.
const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {namespace: ns, name: web}\nspec: {clusterIP: 172.30.0.10, ports: [{name: p, port: 80, targetPort: 80}]}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: ns, name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.180.0.1], nodeName: test-node}]\nports: [{name: p, port: 80}]\n";

/// A UDP Service `dns` 172.30.0.20:53 -> :80 with `backends` ready.
fn dns(backends: &[&str]) -> String {
    let eps: Vec<String> = backends
        .iter()
        .map(|ip| {
            format!("{{addresses: [{ip}], conditions: {{ready: true}}, nodeName: test-node}}")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: dns}}\nspec: {{clusterIP: 172.30.0.20, ports: [{{name: d, port: 53, targetPort: 80, protocol: UDP}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: d, port: 80, protocol: UDP}}]\n",
        eps.join(", ")
    )
}

/// The JSON lines a spawned client printed (after it exits or is killed).
fn lines_of(child: Child) -> Vec<Value> {
    let out = child.wait_with_output().expect("client");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The time allowed for a change to reach the datapath (agent sync plus conntrack cleanup).
fn converge_limit() -> u64 {
    ms(scaled(Duration::from_secs(3)))
}

// ---------------------------------------------------------------------------------------
// 1. UDP 0 -> N -> 0 with a fixed source port.

fn udp_zero_to_n_and_back(mode: &str) {
    let (mut t, dir) = Topology::client_and_two_backends(&format!("u0n{}", &mode[..2]), WEB);
    write_manifest(&dir, "dns.yaml", &dns(&[]));
    let _a = agent(&t, &dir, mode, &[]);
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    let secs = 12;
    let started = Instant::now();
    let client = t.spawn_client(
        "client",
        &[
            "udpfixed",
            "172.30.0.20:53",
            "40053",
            &secs.to_string(),
            "100",
        ],
    );
    std::thread::sleep(scaled(Duration::from_secs(2)));
    let t1 = ms(started.elapsed());
    write_manifest(&dir, "dns.yaml", &dns(&["10.180.0.2"]));
    std::thread::sleep(scaled(Duration::from_secs(5)));
    let t2 = ms(started.elapsed());
    write_manifest(&dir, "dns.yaml", &dns(&[]));
    let lines = lines_of(client);
    let at = |l: &Value| l["t_ms"].as_u64().unwrap_or(0);
    let answered = |l: &Value| l["backend"].is_string();
    let before: Vec<_> = lines.iter().filter(|l| at(l) < t1).collect();
    let during: Vec<_> = lines.iter().filter(|l| at(l) >= t1 && at(l) < t2).collect();
    let after: Vec<_> = lines.iter().filter(|l| at(l) >= t2).collect();
    let first = during.iter().find(|l| answered(l)).map(|l| at(l) - t1);
    let failed_after_recovery = first.map_or(0, |f| {
        during
            .iter()
            .filter(|l| at(l) >= t1 + f && !answered(l))
            .count()
    });
    let last_after = after
        .iter()
        .filter(|l| answered(l))
        .map(|l| at(l) - t2)
        .max();
    figure(
        &json!({"scenario": "UDP 0 -> N -> 0 endpoints, fixed source port", "mode": mode,
        "datagrams": lines.len(), "answered_without_endpoints": before.iter().filter(|l| answered(l)).count(),
        "answered_ms_after_0_to_n": first, "unanswered_after_first_answer": failed_after_recovery,
        "last_answer_ms_after_n_to_0": last_after.unwrap_or(0)}),
    );
    assert!(before.len() > 5 && !after.is_empty(), "{lines:?}");
    assert!(
        before.iter().all(|l| !answered(l)),
        "no endpoints, no answer: {before:?}"
    );
    let first = first.unwrap_or_else(|| {
        panic!("0 -> N: the fixed-port flow never got an answer (black-holed): {during:?}")
    });
    assert!(
        first < converge_limit(),
        "0 -> N took {first} ms: {during:?}"
    );
    assert!(
        during
            .iter()
            .filter(|l| answered(l))
            .all(|l| l["backend"] == "10.180.0.2:80"),
        "{during:?}"
    );
    assert_eq!(failed_after_recovery, 0, "{during:?}");
    let last = last_after.unwrap_or(0);
    assert!(
        last < converge_limit(),
        "N -> 0: answers went on {last} ms: {after:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Connected UDP sockets whose backend is deleted (the backend itself keeps answering, as a
// pod would until it is gone), from a pod and from the host network.

fn connected_udp_to_a_deleted_backend(mode: &str) {
    let (mut t, dir) = Topology::client_and_two_backends(&format!("cud{}", &mode[..2]), WEB);
    // The node's own address (the host client's source), on a link of its own.
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    write_manifest(&dir, "dns.yaml", &dns(&["10.180.0.1"]));
    let _a = agent(&t, &dir, mode, &[]);
    t.wait_reaches("client", "172.30.0.10:80", &["10.180.0.1:80"]);
    let hold = ["workload", "udphold", "172.30.0.20:53", "8", "100"];
    let spawn = |ns: &std::path::Path| -> Child {
        t.command_in_ns(ns, &kpr_bin(), &hold, true)
            .stdout(Stdio::piped())
            .spawn()
            .expect("udphold")
    };
    let started = Instant::now();
    let pod = spawn(&t.pod("client").ns.path());
    let host = spawn(&t.node.path());
    std::thread::sleep(scaled(Duration::from_secs(2)));
    let changed = started.elapsed();
    write_manifest(&dir, "dns.yaml", &dns(&["10.180.0.2"]));
    let mut result = serde_json::Map::new();
    result.insert(
        "scenario".into(),
        "connected UDP socket, its backend deleted (pod and host clients)".into(),
    );
    result.insert("mode".into(), mode.into());
    let mut problems = Vec::new();
    for (who, child) in [("pod", pod), ("host", host)] {
        let lines = lines_of(child);
        // One line per 100 ms: the index gives the time closely enough.
        let backends: Vec<&str> = lines
            .iter()
            .map(|l| l["backend"].as_str().or(l["error"].as_str()).unwrap_or("-"))
            .collect();
        let change_at = usize::try_from(ms(changed) / 100).unwrap_or(0);
        let first_new = backends.iter().position(|b| *b == "10.180.0.2:80");
        let old_after = first_new.map_or(usize::MAX, |i| {
            backends[i..]
                .iter()
                .filter(|b| **b == "10.180.0.1:80")
                .count()
        });
        let switched_ms = first_new.map(|i| i.saturating_sub(change_at) * 100);
        result.insert(format!("{who}_requests"), lines.len().into());
        result.insert(format!("{who}_switched_ms"), switched_ms.into());
        result.insert(
            format!("{who}_answers_from_deleted_after_switch"),
            old_after.min(9999).into(),
        );
        if backends.first() != Some(&"10.180.0.1:80") {
            problems.push(format!("{who}: started at {:?}", backends.first()));
        }
        match switched_ms {
            None => problems.push(format!("{who}: stuck on the deleted backend: {backends:?}")),
            Some(s) if s as u64 > converge_limit() => {
                problems.push(format!("{who}: switched after {s} ms"))
            }
            Some(_) => {}
        }
        if old_after > 0 && old_after != usize::MAX {
            problems.push(format!(
                "{who}: the deleted backend answered after the switch: {backends:?}"
            ));
        }
    }
    figure(&Value::Object(result));
    assert!(problems.is_empty(), "{problems:?}");
}

// ---------------------------------------------------------------------------------------
// 3. The agent SIGKILLed under TCP and UDP load while the API server does not answer; the
// restarted agent must not disturb the datapath until it has synced.

fn agent_killed_under_load_with_a_hanging_api(mode: &str) {
    use kpr_testnet::emulator::{Emulator, endpoint_slice, node, service};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut t = Topology::new(&format!("kil{}", &mode[..2]));
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("b0", Ipv4Addr::new(10, 0, 1, 2));
    t.add_pod("b1", Ipv4Addr::new(10, 0, 1, 3));
    t.serve("b0", &[8080]);
    t.serve("b1", &[8080]);
    let emu = rt.block_on(Emulator::start_in_netns(&t.node.path()));
    emu.apply(service("default", "web", "10.96.0.10", 80, json!({})));
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2", "10.0.1.3"],
        8080,
    ));
    let mut udp = service("default", "dns", "10.96.0.20", 53, json!({}));
    udp["spec"]["ports"][0]["protocol"] = "UDP".into();
    emu.apply(udp);
    let mut slice = endpoint_slice("default", "dns", "dns-1", &["10.0.1.2", "10.0.1.3"], 8080);
    slice["ports"][0]["protocol"] = "UDP".into();
    emu.apply(slice);
    emu.apply(node("test-node", "192.168.0.2", "zone-a"));
    let kubeconfig = t.workdir.join("kubeconfig");
    emu.write_kubeconfig(&kubeconfig);
    let start = |t: &Topology| {
        t.spawn(t.agent_command_api_in_node(
            &kubeconfig,
            &Topology::mode_agent_flags(mode, &["--sync-period", "1s"]),
        ))
    };
    let mut a1 = start(&t);
    t.wait_reaches(
        "client",
        "10.96.0.10:80",
        &["10.0.1.2:8080", "10.0.1.3:8080"],
    );

    let tcp = collect(t.spawn_client("client", &["tcp", "10.96.0.10:80", "100000000", "20"]));
    let udp = collect(t.spawn_client("client", &["udp", "10.96.0.20:53", "100000000", "20"]));
    let held = collect(t.spawn_client("client", &["hold", "10.96.0.10:80", "600", "100"]));
    std::thread::sleep(Duration::from_secs(1));
    emu.set_hang(true);
    emu.drop_watches();
    a1.kill9();
    let _a2 = start(&t);
    // The restarted agent waits on the API meanwhile; a change made now arrives after.
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.3"],
        8080,
    ));
    std::thread::sleep(scaled(Duration::from_secs(4)));
    emu.set_hang(false);
    let back = Instant::now();
    t.wait_reaches("client", "10.96.0.10:80", &["10.0.1.3:8080"]);
    let converged = back.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (tcp, udp, held) = (stop(tcp), stop(udp), stop(held));
    let failed = |v: &[Value]| v.iter().filter(|l| !l["error"].is_null()).count();
    figure(
        &json!({"scenario": "agent SIGKILLed under TCP+UDP load, API hanging, restarted", "mode": mode,
        "tcp_connections": tcp.len(), "tcp_failed": failed(&tcp),
        "udp_requests": udp.len(), "udp_failed": failed(&udp),
        "long_lived_echoes": held.len(), "long_lived_failed": failed(&held),
        "converged_ms_after_api_back": ms(converged)}),
    );
    assert!(
        tcp.len() > 50 && udp.len() > 50 && held.len() > 20,
        "load ran"
    );
    assert_eq!(
        failed(&tcp),
        0,
        "{:?}",
        tcp.iter()
            .filter(|l| !l["error"].is_null())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        failed(&udp),
        0,
        "{:?}",
        udp.iter()
            .filter(|l| !l["error"].is_null())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        failed(&held),
        0,
        "{:?}",
        held.iter()
            .filter(|l| !l["error"].is_null())
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// 4. eTP=Local when the only local endpoints are terminating: outside traffic must keep
// reaching them (upstream's serving-terminating fallback), not be dropped.

fn etp_local(local: &str, remote: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: lb}}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.42\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30000\n  ports: [{{name: t, port: 80, targetPort: 80, nodePort: 3002, protocol: TCP}}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: lb-1, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nendpoints:\n- {{addresses: [10.180.0.1], conditions: {local}, nodeName: test-node}}\n- {{addresses: [10.180.2.1], conditions: {remote}, nodeName: node2}}\nports: [{{name: t, port: 80, protocol: TCP}}]\n"
    )
}

fn etp_local_with_only_terminating_local_endpoints(mode: &str) {
    let ready = "{ready: true, serving: true, terminating: false}";
    let terminating = "{ready: false, serving: true, terminating: true}";
    let mut t = Topology::new(&format!("etl{}", &mode[..2]));
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    t.add_pod("a", Ipv4Addr::new(10, 180, 0, 1));
    t.serve("a", &[80]);
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifest(&dir, "all.yaml", &etp_local(ready, ready));
    let _a = agent(&t, &dir, mode, &[]);
    let reach = |n: &str| t.outside_client("outside", &["tcp", "192.168.0.2:3002", n]);
    let start = Instant::now();
    while !reach("1").iter().all(|l| l["backend"] == "10.180.0.1:80") {
        assert!(
            start.elapsed() < scaled(Duration::from_secs(20)),
            "the NodePort never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut traffic = t.workload_in(
        "outside",
        &["tcp", "192.168.0.2:3002", "100000000", "50"],
        false,
    );
    let traffic = collect(traffic.stdout(Stdio::piped()).spawn().expect("client"));
    std::thread::sleep(Duration::from_secs(1));
    // The local pod is being deleted: terminating, still serving; the remote one is ready.
    write_manifest(&dir, "all.yaml", &etp_local(terminating, ready));
    std::thread::sleep(scaled(Duration::from_secs(4)));
    let lines = stop(traffic);
    let failed: Vec<_> = lines
        .iter()
        .filter(|l| l["backend"] != "10.180.0.1:80")
        .collect();
    figure(
        &json!({"scenario": "eTP=Local, only terminating local endpoints", "mode": mode,
        "connections": lines.len(), "failed_or_elsewhere": failed.len()}),
    );
    assert!(lines.len() > 40, "traffic ran: {}", lines.len());
    assert!(
        failed.is_empty(),
        "{} of {}: {failed:?}",
        failed.len(),
        lines.len()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Path MTU discovery across a 1280-byte hop between the node and a backend two routers away
// (node -1500- r1 -1280- r2 -1500- backend): full-size segments from a pod client (ClusterIP)
// and an outside client (NodePort, masqueraded) only arrive if r1's "fragmentation needed"
// reaches the sender, translated back through the Service.

const PMTU: &str = "apiVersion: v1\nkind: Service\nmetadata: {namespace: ns, name: far}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.50\n  ports: [{name: t, port: 80, targetPort: 80, nodePort: 3005, protocol: TCP}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: ns, name: far-1, labels: {kubernetes.io/service-name: far}}\naddressType: IPv4\nendpoints: [{addresses: [10.180.9.1], conditions: {ready: true}, nodeName: test-node}]\nports: [{name: t, port: 80, protocol: TCP}]\n";

/// Two routers and a backend 10.180.9.1 behind them; the hop r1-r2 has MTU 1280, or the
/// node's own link to r1 when `at_node` (then the node itself reports the smaller MTU).
fn routers_and_far_backend(t: &mut Topology, at_node: bool) -> (NetNs, NetNs) {
    let (node_mtu, hop_mtu) = if at_node {
        ("1280", "1500")
    } else {
        ("1500", "1280")
    };
    let r1 = NetNs::new(&format!("{}-r1", t.prefix));
    let r2 = NetNs::new(&format!("{}-r2", t.prefix));
    let far = NetNs::new(&format!("{}-far", t.prefix));
    for r in [&r1, &r2] {
        r.sysctl(&["net.ipv4.ip_forward=1", "net.ipv4.icmp_ratelimit=0"]);
    }
    // node r0 (10.99.0.1) <-> r1 eth0 (10.99.0.2), 1500
    t.node.ip(&[
        "link", "add", "r0", "mtu", node_mtu, "type", "veth", "peer", "name", "eth0", "netns",
        &r1.name,
    ]);
    r1.ip(&["link", "set", "eth0", "mtu", node_mtu]);
    t.node.ip(&["addr", "add", "10.99.0.1/30", "dev", "r0"]);
    t.node.ip(&["link", "set", "r0", "up"]);
    t.node
        .ip(&["route", "add", "10.180.9.1/32", "via", "10.99.0.2"]);
    r1.ip(&["addr", "add", "10.99.0.2/30", "dev", "eth0"]);
    r1.ip(&["link", "set", "eth0", "up"]);
    r1.ip(&["route", "add", "default", "via", "10.99.0.1"]);
    // r1 hop (10.99.1.1) <-> r2 eth0 (10.99.1.2), 1280 on both ends
    r1.ip(&[
        "link", "add", "hop", "mtu", hop_mtu, "type", "veth", "peer", "name", "eth0", "netns",
        &r2.name,
    ]);
    r1.ip(&["addr", "add", "10.99.1.1/30", "dev", "hop"]);
    r1.ip(&["link", "set", "hop", "up"]);
    r1.ip(&["route", "add", "10.180.9.1/32", "via", "10.99.1.2"]);
    r2.ip(&["link", "set", "eth0", "mtu", hop_mtu]);
    r2.ip(&["addr", "add", "10.99.1.2/30", "dev", "eth0"]);
    r2.ip(&["link", "set", "eth0", "up"]);
    r2.ip(&["route", "add", "default", "via", "10.99.1.1"]);
    // r2 be (10.99.2.1) <-> backend eth0 (10.180.9.1), 1500
    r2.ip(&[
        "link", "add", "be", "type", "veth", "peer", "name", "eth0", "netns", &far.name,
    ]);
    r2.ip(&["addr", "add", "10.99.2.1/32", "dev", "be"]);
    r2.ip(&["link", "set", "be", "up"]);
    r2.ip(&["route", "add", "10.180.9.1/32", "dev", "be"]);
    far.ip(&["addr", "add", "10.180.9.1/32", "dev", "eth0"]);
    far.ip(&["link", "set", "eth0", "up"]);
    far.ip(&["route", "add", "10.99.2.1", "dev", "eth0"]);
    far.ip(&["route", "add", "default", "via", "10.99.2.1"]);
    t.pods.push(Pod {
        name: "far".into(),
        ip: "10.180.9.1".parse().expect("ip"),
        ns: far,
    });
    t.serve("far", &[80]);
    (r1, r2)
}

fn pmtu_across_a_1280_hop(mode: &str) {
    pmtu(mode, false);
}

fn pmtu_when_the_node_has_the_1280_link(mode: &str) {
    pmtu(mode, true);
}

fn pmtu(mode: &str, at_node: bool) {
    let mut t = Topology::new(&format!("mt{}{}", u8::from(at_node), &mode[..2]));
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    let _routers = routers_and_far_backend(&mut t, at_node);
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifest(&dir, "all.yaml", PMTU);
    let _a = agent(&t, &dir, mode, &[]);
    t.wait_reaches("client", "172.30.0.50:80", &["10.180.9.1:80"]);
    let big = ["bigline", "", "60000", "3"];
    let run = |who: &str, to: &str| -> Vec<Value> {
        let mut args = big;
        args[1] = to;
        if who == "client" {
            t.client(who, &args)
        } else {
            t.outside_client(who, &args)
        }
    };
    let pod = run("client", "172.30.0.50:80");
    let outside = run("outside", "192.168.0.2:3005");
    // The senders learnt the hop's MTU: the ICMP error came back to them.
    let cache =
        |who: &str| kpr_testnet::sh(&["ip", "-n", &t.pod(who).ns.name, "route", "show", "cache"]);
    let (pod_cache, outside_cache) = (cache("client"), cache("outside"));
    let ok = |v: &[Value]| v.iter().filter(|l| l["backend"] == "10.180.9.1:80").count();
    figure(
        &json!({"scenario": if at_node { "PMTU through a ClusterIP and a NodePort, the node's own link 1280" } else { "PMTU through a ClusterIP and a NodePort across a 1280-MTU hop" }, "mode": mode,
        "clusterip_ok": ok(&pod), "nodeport_ok": ok(&outside), "attempts_each": pod.len(),
        "clusterip_sender_learnt_1280": pod_cache.contains("mtu 1280"),
        "nodeport_sender_learnt_1280": outside_cache.contains("mtu 1280")}),
    );
    assert_eq!(ok(&pod), 3, "ClusterIP: {pod:?}");
    assert_eq!(ok(&outside), 3, "NodePort: {outside:?}");
    assert!(pod_cache.contains("mtu 1280"), "{pod_cache}");
    assert!(outside_cache.contains("mtu 1280"), "{outside_cache}");
}

// ---------------------------------------------------------------------------------------
// 6. A SYN flood at a NodePort beside long-lived flows through it: the flows keep working
// (the ebpf mode's conntrack map is shrunk to 1024 entries so the flood overfills it).

const FLOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {namespace: ns, name: np}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.41\n  ports: [{name: t, port: 80, targetPort: 80, nodePort: 3001, protocol: TCP}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: ns, name: np-1, labels: {kubernetes.io/service-name: np}}\naddressType: IPv4\nendpoints: [{addresses: [10.180.0.1], conditions: {ready: true}, nodeName: test-node}]\nports: [{name: t, port: 80, protocol: TCP}]\n";

fn syn_flood_beside_long_lived_flows(mode: &str) {
    let mut t = Topology::new(&format!("syn{}", &mode[..2]));
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    t.add_external(
        "flooder",
        Ipv4Addr::new(203, 0, 113, 3),
        Ipv4Addr::new(192, 168, 1, 2),
    );
    t.add_pod("a", Ipv4Addr::new(10, 180, 0, 1));
    t.serve("a", &[80]);
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifest(&dir, "all.yaml", FLOOD);
    let small_ct = [
        "--conntrack-max",
        "1024",
        "--conntrack-tcp-timeout-syn",
        "2s",
        "--conntrack-gc-interval",
        "1s",
    ];
    let mut extra = vec!["--metrics-bind-address", "127.0.0.1:10249"];
    if mode == "ebpf" {
        extra.extend_from_slice(&small_ct);
    }
    let _a = agent(&t, &dir, mode, &extra);
    let start = Instant::now();
    while !t
        .outside_client("outside", &["tcp", "192.168.0.2:3001", "1"])
        .iter()
        .all(|l| l["backend"] == "10.180.0.1:80")
    {
        assert!(
            start.elapsed() < scaled(Duration::from_secs(20)),
            "the NodePort never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let flows: Vec<_> = (0..4)
        .map(|_| {
            let mut c = t.workload_in(
                "outside",
                &["hold", "192.168.0.2:3001", "600", "100"],
                false,
            );
            collect(c.stdout(Stdio::piped()).spawn().expect("hold"))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let count = 20_000;
    let flood = t
        .workload_in(
            "flooder",
            &[
                "synflood",
                "192.168.0.2:3001",
                &count.to_string(),
                "198.18.0.0",
            ],
            false,
        )
        .output()
        .expect("synflood");
    let sent: u64 = String::from_utf8_lossy(&flood.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|l| l["sent"].as_u64())
        .unwrap_or(0);
    // New connections after the flood: refused while half-open entries fill the table, then
    // served again once they expire.
    let after = Instant::now();
    let mut recovered = None;
    while after.elapsed() < scaled(Duration::from_secs(20)) {
        if t.outside_client("outside", &["tcp", "192.168.0.2:3001", "1"])
            .iter()
            .all(|l| l["backend"] == "10.180.0.1:80")
        {
            recovered = Some(after.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    // (The agent refreshes its datapath counters on its collection interval.)
    let ct_full = conntrack_full_drops(&t);
    let echoes: Vec<Vec<Value>> = flows.into_iter().map(stop).collect();
    let total: usize = echoes.iter().map(Vec::len).sum();
    let failed: usize = echoes
        .iter()
        .flatten()
        .filter(|l| !l["error"].is_null())
        .count();
    figure(
        &json!({"scenario": "SYN flood beside long-lived flows (NodePort)", "mode": mode,
        "syns_sent": sent, "conntrack_full_drops": ct_full, "long_lived_flows": 4, "long_lived_echoes": total, "long_lived_failed": failed,
        "new_connections_served_again_ms": recovered.map(ms)}),
    );
    assert_eq!(sent, count, "{}", String::from_utf8_lossy(&flood.stderr));
    assert!(total > 40, "the long-lived flows ran: {total}");
    assert_eq!(failed, 0, "{echoes:?}");
    assert!(
        recovered.is_some(),
        "new connections were never served again after the flood"
    );
    if mode == "ebpf" {
        assert!(
            ct_full > 0,
            "the flood overfilled the 1024-entry conntrack map"
        );
    }
}

/// The ebpf mode's `kpr_datapath_drops_total{reason="conntrack_full"}` (0 in other modes).
fn conntrack_full_drops(t: &Topology) -> u64 {
    let out = t
        .command_in_ns(
            &t.node.path(),
            &kpr_bin(),
            &["workload", "http", "127.0.0.1:10249", "/metrics"],
            false,
        )
        .output()
        .expect("metrics");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if std::env::var_os("KPR_DEBUG_METRICS").is_some() {
        for l in reply["body"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("kpr_"))
        {
            eprintln!("{l}");
        }
    }
    reply["body"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("datapath_drops_total") && l.contains("conntrack_full"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn ebpf() {
                super::$scenario("ebpf");
            }
            #[test]
            fn iptables() {
                super::$scenario("iptables");
            }
            #[test]
            fn nftables() {
                super::$scenario("nftables");
            }
        }
    )*};
}

in_every_mode!(
    udp_zero_to_n_and_back,
    connected_udp_to_a_deleted_backend,
    agent_killed_under_load_with_a_hanging_api,
    etp_local_with_only_terminating_local_endpoints,
    pmtu_across_a_1280_hop,
    pmtu_when_the_node_has_the_1280_link,
    syn_flood_beside_long_lived_flows,
);
