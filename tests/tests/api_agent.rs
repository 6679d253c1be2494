//! End to end with the Kubernetes API source: `kpr run --kubeconfig` against the in-repo API
//! server emulator (real HTTP on loopback), programming the socket-LB datapath for pods in a
//! netns topology.
//!
//! Address plan: client 10.0.0.2; backends 10.0.1.2, 10.0.1.3 (:8080); Service 10.96.0.10:80.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kpr_testnet::emulator::{Emulator, endpoint_slice, node, service};
use kpr_testnet::{Topology, backends_of};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn log_contains(t: &Topology, needle: &str) -> bool {
    std::fs::read_dir(&t.workdir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(needle)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_the_datapath_and_an_outage_changes_nothing() {
    let (emu, t, kubeconfig) = kpr_testnet::api_cluster("api").await;
    let start_agent = |t: &Topology, n: &str| kpr_testnet::start_api_agent(t, &kubeconfig, n);

    let mut agent = start_agent(&t, "1");
    let both = vec!["10.0.1.2:8080".to_string(), "10.0.1.3:8080".to_string()];
    t.wait_for_services("initial sync", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(both.clone())
    });
    let seen: BTreeSet<String> = t
        .client("client", &["tcp", "10.96.0.10:80", "60"])
        .iter()
        .map(|l| {
            l["backend"]
                .as_str()
                .unwrap_or_else(|| panic!("failed: {l}"))
                .to_string()
        })
        .collect();
    assert_eq!(seen, both.iter().cloned().collect());

    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.3"],
        8080,
    ));
    t.wait_for_services("update", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(vec!["10.0.1.3:8080".into()])
    });
    emu.apply(service("default", "api", "10.96.0.11", 80, json!({})));
    t.wait_for_services("new Service", WAIT, |r| {
        backends_of(r, "10.96.0.11:80", "TCP") == Some(vec![])
    });
    emu.delete(kpr_testnet::emulator::Kind::Service, "default", "api");
    t.wait_for_services("deleted Service", WAIT, |r| {
        backends_of(r, "10.96.0.11:80", "TCP").is_none()
    });

    // API server unreachable, agent restarted: the datapath stays exactly as it was.
    agent.kill9();
    emu.set_hang(true);
    emu.drop_watches();
    let before = t.services_json().unwrap();
    let _agent2 = start_agent(&t, "2");
    let started = Instant::now();
    while !log_contains(&t, "Adopted") {
        assert!(started.elapsed() < WAIT, "agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(2500)); // longer than --sync-period
    assert_eq!(
        t.services_json().unwrap(),
        before,
        "an unreachable API server must not change the datapath"
    );
    let l = t.client("client", &["tcp", "10.96.0.10:80", "5"]);
    assert!(l.iter().all(|l| l["backend"] == "10.0.1.3:8080"), "{l:?}");

    // The server comes back: the agent lists and catches up.
    emu.set_hang(false);
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2", "10.0.1.3"],
        8080,
    ));
    t.wait_for_services("catch-up after the outage", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(both.clone())
    });
}

/// kubeadm's DaemonSet with kpr's image: its exact command line and `config.conf` (the
/// kubeconfig path pointed at the emulator), against an API server. The agent serves the
/// Service and records upstream's Events as `kube-proxy`: the Node's `Starting`, and
/// `FailedToStartServiceHealthcheck` for a Service whose healthCheckNodePort is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeadms_command_line_and_config_start_kpr_against_an_api_server() {
    let emu = Emulator::start().await;
    emu.apply(service("default", "web", "10.96.0.10", 80, json!({})));
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2"],
        8080,
    ));
    emu.apply(node("test-node", "192.168.0.2", "zone-a"));
    // Something else holds the health check port of this Service (in the agent's namespace).
    let squatter = std::net::TcpListener::bind("0.0.0.0:30977").unwrap();
    emu.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "lb", "uid": "u-lb"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 30977,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30978}]}}));
    let mut t = Topology::new("kubeadm");
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("b0", Ipv4Addr::new(10, 0, 1, 2));
    t.serve("b0", &[8080]);
    let kubeconfig = t.workdir.join("kubeconfig.conf");
    emu.write_kubeconfig(&kubeconfig);
    let conf = t.workdir.join("config.conf");
    let text = kpr::config::KUBEADM_EXAMPLE
        .replace(
            "/var/lib/kube-proxy/kubeconfig.conf",
            &kubeconfig.display().to_string(),
        )
        .replace("mode: \"\"", "mode: ebpf");
    assert!(text.contains(&kubeconfig.display().to_string()));
    std::fs::write(&conf, text).unwrap();
    let _agent = t.spawn(t.agent_command_kubeadm(&[
        &format!("--config={}", conf.display()),
        "--hostname-override=test-node",
    ]));
    t.wait_for_services("served from the API", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(vec!["10.0.1.2:8080".into()])
    });
    for l in t.client("client", &["tcp", "10.96.0.10:80", "3"]) {
        assert_eq!(l["backend"], "10.0.1.2:8080", "{l}");
    }
    let event = |reason: &str| {
        let start = Instant::now();
        loop {
            let found = emu
                .recorded_events()
                .into_iter()
                .find(|e| e["reason"] == reason);
            if let Some(e) = found {
                break e;
            }
            assert!(
                start.elapsed() < WAIT,
                "no {reason} Event in {:?}",
                emu.recorded_events()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let starting = event("Starting");
    assert_eq!(starting["regarding"]["kind"], "Node", "{starting}");
    assert_eq!(starting["regarding"]["name"], "test-node", "{starting}");
    assert_eq!(starting["reportingController"], "kube-proxy", "{starting}");
    assert_eq!(starting["reportingInstance"], "test-node", "{starting}");
    assert_eq!(starting["type"], "Normal", "{starting}");
    assert_eq!(starting["metadata"]["namespace"], "default", "{starting}");
    let hc = event("FailedToStartServiceHealthcheck");
    assert_eq!(hc["regarding"]["kind"], "Service", "{hc}");
    assert_eq!(hc["regarding"]["name"], "lb", "{hc}");
    assert_eq!(hc["type"], "Warning", "{hc}");
    assert!(hc["note"].as_str().unwrap().contains("30977"), "{hc}");
    drop(squatter);
}
