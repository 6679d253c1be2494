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

use kpr_testnet::{
    JsonLines as _, Topology, backends_of, service_yaml, slice_yaml, write_manifest,
};

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
    assert_eq!(
        backends_seen(&tcp),
        expected(&BACKENDS).into_iter().collect()
    );
    for l in &tcp {
        assert_eq!(
            l["peer"], FRONTEND,
            "getpeername must show the Service address: {l}"
        );
    }

    let udp = t.client("client2", &["udp", &format!("{VIP}:80"), "200"]);
    assert_eq!(
        backends_seen(&udp),
        expected(&BACKENDS).into_iter().collect()
    );
    for l in &udp {
        assert_eq!(
            l["peer"], FRONTEND,
            "recvfrom must show the Service address: {l}"
        );
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
    assert_eq!(
        backends_seen(&tcp),
        expected(&BACKENDS[..2]).into_iter().collect()
    );

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
    assert_eq!(
        refused_udp[0]["error"], "ECONNREFUSED",
        "{}",
        refused_udp[0]
    );

    // Delete the Service: it is no longer translated (the SYN to the VIP dies in the node
    // namespace, which has no route for it).
    std::fs::remove_file(dir.join("svc.yaml")).unwrap();
    t.wait_for_services("frontend gone", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP").is_none()
    });
    let after = t.client("client1", &["tcp", &format!("{VIP}:80"), "1"]);
    assert!(
        after[0]["backend"].is_null(),
        "untranslated connect must not reach a backend: {}",
        after[0]
    );
}

fn agent_log(t: &Topology) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(&t.workdir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("agent-") {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    all
}

#[test]
fn agent_kill9_and_restart_keeps_traffic_flowing() {
    let mut t = cluster("rs");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "svc.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let mut agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS))
    });

    // An established connection that keeps talking across the agent's death and restart.
    let held = t.spawn_client("client2", &["hold", &format!("{VIP}:80"), "4", "100"]);

    agent.kill9();
    // New connections while no agent runs.
    let during = t.client("client1", &["tcp", &format!("{VIP}:80"), "20", "20"]);
    assert_eq!(during.len(), 20);
    for l in &during {
        assert!(
            l["backend"].is_string(),
            "connection failed while the agent was down: {l}"
        );
    }

    let _agent2 = t.start_agent(&dir);
    // The restarted agent adopts the pinned programs instead of reloading them...
    let start = std::time::Instant::now();
    while !agent_log(&t).contains("Adopted") {
        assert!(
            start.elapsed() < WAIT,
            "restarted agent did not adopt: {}",
            agent_log(&t)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = t.client("client1", &["tcp", &format!("{VIP}:80"), "20", "10"]);
    for l in &after {
        assert!(
            l["backend"].is_string(),
            "connection failed after restart: {l}"
        );
    }
    // ...and still applies changes as diffs against what it found.
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS[..1], 8080));
    t.wait_for_services("1 backend after restart", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS[..1]))
    });

    let out = held.wait_with_output_lines();
    assert!(
        out.first().is_some_and(|l| l["connected"].is_string()),
        "{out:?}"
    );
    let echoes = out.iter().filter(|l| l["echo"].is_string()).count();
    assert!(
        echoes >= 10,
        "the held connection must keep working: {out:?}"
    );
    assert!(
        out.iter().all(|l| l["error"].is_null()),
        "the held connection broke: {out:?}"
    );
}

#[test]
fn malformed_manifest_is_reported_and_changes_nothing() {
    let t = cluster("bad");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "svc.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let _agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS))
    });
    let before = t.services_json().unwrap();

    // A new file with a broken Service, and an edit that breaks the existing slice file.
    write_manifest(
        &dir,
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n",
    );
    write_manifest(
        &dir,
        "slice.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\naddressType: IPv4\nendpoints: []\n",
    );
    let start = std::time::Instant::now();
    loop {
        let log = agent_log(&t);
        if log.contains("broken.yaml") && log.contains("slice.yaml") {
            assert!(log.contains("not an IP address"), "{log}");
            assert!(log.contains("kubernetes.io/service-name"), "{log}");
            break;
        }
        assert!(start.elapsed() < WAIT, "errors not reported: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        t.services_json().unwrap(),
        before,
        "a rejected manifest must not change the datapath"
    );
    let tcp = t.client("client1", &["tcp", &format!("{VIP}:80"), "60"]);
    assert_eq!(
        backends_seen(&tcp),
        expected(&BACKENDS).into_iter().collect()
    );
}

#[test]
fn cleanup_removes_every_pin_and_attachment() {
    let t = cluster("cl");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "svc.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let mut agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP").is_some()
    });
    agent.kill9();
    let cg = t.cgroup.path.to_str().unwrap().to_string();
    let attached = kpr_testnet::sh(&["bpftool", "cgroup", "show", &cg]);
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "recvmsg4",
        "getpeername4",
        "getpeername6",
    ] {
        assert!(
            attached.contains(hook),
            "{hook} not attached before cleanup: {attached}"
        );
    }
    // The maps carry BTF: bpftool shows field names.
    let dump = kpr_testnet::sh(&[
        "bpftool",
        "map",
        "dump",
        "pinned",
        t.bpffs
            .join(format!(
                "v{}/maps/KPR_SERVICES",
                proxy_common::MAP_LAYOUT_VERSION
            ))
            .to_str()
            .unwrap(),
    ]);
    assert!(dump.contains("\"backend_count\": 3"), "{dump}");

    // The eBPF mode's state only: this agent ran in the host's namespace.
    let out = t.kpr(&["cleanup", "--proxy-mode", "ebpf"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!t.bpffs.exists(), "bpffs dir must be gone");
    let attached = kpr_testnet::sh(&["bpftool", "cgroup", "show", &cg]);
    assert!(
        !attached.contains("connect4") && !attached.contains("kpr_"),
        "still attached: {attached}"
    );
    let after = t.client("client1", &["tcp", &format!("{VIP}:80"), "1"]);
    assert!(
        after[0]["backend"].is_null(),
        "no translation after cleanup: {}",
        after[0]
    );
}

#[test]
fn session_affinity_at_the_socket_level() {
    let t = cluster("aff");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let svc = service_yaml("web", VIP, 80, 8080).replace(
        "spec:\n",
        "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n",
    );
    write_manifest(&dir, "svc.yaml", &svc);
    write_manifest(&dir, "slice.yaml", &slice_yaml("web", &BACKENDS, 8080));
    let _agent = t.start_agent(&dir);
    t.wait_for_services("3 backends", WAIT, |rows| {
        backends_of(rows, FRONTEND, "TCP") == Some(expected(&BACKENDS))
    });
    let first = backends_seen(&t.client("client1", &["tcp", &format!("{VIP}:80"), "40"]));
    assert_eq!(
        first.len(),
        1,
        "one client (network namespace) sticks to one backend: {first:?}"
    );
    let again = backends_seen(&t.client("client1", &["tcp", &format!("{VIP}:80"), "10"]));
    assert_eq!(first, again, "and keeps it across processes");
}

/// A connected UDP socket is translated once, at connect(); when its backend leaves the
/// Service the agent destroys it (the application sees an error and reconnects to a live
/// backend). A socket connected through another Service that keeps the backend is untouched.
#[test]
fn connected_udp_sockets_of_a_removed_backend_are_terminated() {
    let mut t = cluster("udpterm");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "a.yaml", &service_yaml("a", VIP, 80, 8080));
    write_manifest(&dir, "a-slice.yaml", &slice_yaml("a", &BACKENDS[..1], 8080));
    write_manifest(&dir, "b.yaml", &service_yaml("b", "10.96.0.11", 80, 8080));
    write_manifest(&dir, "b-slice.yaml", &slice_yaml("b", &BACKENDS[..1], 8080));
    let _agent = t.start_agent(&dir);
    t.wait_for_services("both Services", WAIT, |rows| {
        backends_of(rows, FRONTEND, "UDP") == Some(expected(&BACKENDS[..1]))
            && backends_of(rows, "10.96.0.11:80", "UDP") == Some(expected(&BACKENDS[..1]))
    });

    let via_a = t.spawn_client("client1", &["udphold", &format!("{VIP}:80"), "4", "50"]);
    let via_b = t.spawn_client("client2", &["udphold", "10.96.0.11:80", "4", "50"]);
    std::thread::sleep(Duration::from_millis(1200));
    // Service a moves from backend0 to backend1; Service b keeps backend0.
    write_manifest(
        &dir,
        "a-slice.yaml",
        &slice_yaml("a", &BACKENDS[1..2], 8080),
    );
    t.wait_for_services("a moved", WAIT, |rows| {
        backends_of(rows, FRONTEND, "UDP") == Some(expected(&BACKENDS[1..2]))
    });

    let old = format!("{}:8080", BACKENDS[0]);
    let new = format!("{}:8080", BACKENDS[1]);
    let a = via_a.wait_with_output_lines();
    let seq: Vec<String> = a
        .iter()
        .map(|l| {
            l["backend"]
                .as_str()
                .map_or_else(|| format!("error:{}", l["error"]), str::to_string)
        })
        .collect();
    let first_new = seq
        .iter()
        .position(|s| *s == new)
        .unwrap_or_else(|| panic!("the socket of Service a never reached {new}: {seq:?}"));
    assert!(seq[0] == old, "started on the old backend: {seq:?}");
    assert!(
        seq[..first_new].iter().any(|s| s.starts_with("error:")),
        "the old socket must be terminated (an error), not silently kept: {seq:?}"
    );
    assert!(
        seq[first_new..].iter().all(|s| *s == new),
        "after reconnecting, only the new backend: {seq:?}"
    );
    assert!(
        seq[..first_new]
            .iter()
            .all(|s| *s == old || s.starts_with("error:")),
        "{seq:?}"
    );

    let b = via_b.wait_with_output_lines();
    assert!(b.len() >= 20, "{b:?}");
    for l in &b {
        assert_eq!(
            l["backend"].as_str(),
            Some(old.as_str()),
            "Service b still has backend0: its socket must be left alone: {l}"
        );
    }
    let log = agent_log(&t);
    assert!(
        log.contains("terminated connected UDP sockets") && log.contains("destroyed=1"),
        "{log}"
    );
}
