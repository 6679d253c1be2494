//! Full BPF maps (issue 13, kernel refusals): more Services than the services map holds.
//!
//! - Growth off: the Services that fit are programmed, the rest are refused with a clear
//!   error, a metric and Events, the agent keeps running, and traffic to a Service programmed
//!   before never fails.
//! - Growth on (`--bpf-map-grow=true`): the agent grows the map while serving (new maps filled beside
//!   the live ones, per-flow state carried over, programs swapped atomically per link), and a
//!   restart with a larger configured size resizes the pinned maps the same way: no connection
//!   and no long-lived flow fails. Prints one `KPR-FIGURE` line per test.
//!
//! Address plan: client 10.0.0.2; backends 10.0.1.2, 10.0.1.3 (:8080); Service web
//! 10.96.0.10:80; Services svc-N 10.96.1.N:80 -> 10.0.1.2.
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kpr_testnet::emulator::{Emulator, endpoint_slice, service};
use kpr_testnet::{
    ChildGuard, Topology, backends_of, collect_json_lines as collect, stop_json_lines as stop,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn start_agent(
    t: &Topology,
    kubeconfig: &std::path::Path,
    metrics: u16,
    extra: &[&str],
) -> ChildGuard {
    let addr = format!("127.0.0.1:{metrics}");
    let mut args = vec!["--sync-period", "1s", "--metrics-bind-address", &addr];
    args.extend_from_slice(extra);
    t.spawn(t.agent_command_api(kubeconfig, &args))
}

/// `/metrics` of the agent on loopback port `port`.
fn metrics(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The sum of the samples of `name` whose line contains `filter`.
fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn add_services(emu: &Emulator, n: u32) {
    for i in 1..=n {
        let name = format!("svc-{i}");
        emu.apply(service(
            "default",
            &name,
            &format!("10.96.1.{i}"),
            80,
            json!({}),
        ));
        emu.apply(endpoint_slice(
            "default",
            &name,
            &format!("{name}-1"),
            &["10.0.1.2"],
            8080,
        ));
    }
}

fn failures(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| !l["error"].is_null()).collect()
}

fn pinned_services_capacity(t: &Topology) -> u32 {
    let path = t
        .bpffs
        .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION))
        .join("maps")
        .join(proxy_common::map_names::SERVICES);
    aya::maps::MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn programmed(t: &Topology) -> usize {
    t.services_json().map_or(0, |rows| {
        rows.iter()
            .filter(|r| {
                r["frontend"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("10.96.1."))
            })
            .count()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_refuses_what_does_not_fit_with_an_error_a_metric_and_events() {
    kpr_testnet::require_root();
    let (emu, mut t, kubeconfig) = kpr_testnet::api_cluster("mapfull").await;
    let port = 19_251;
    let mut agent = start_agent(
        &t,
        &kubeconfig,
        port,
        &["--bpf-map-services", "16", "--bpf-map-grow=false"],
    );
    t.wait_for_services("web", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP").is_some()
    });
    let traffic = collect(t.spawn_client("client", &["tcp", "10.96.0.10:80", "100000000", "20"]));
    add_services(&emu, 30);
    let start = Instant::now();
    let m = loop {
        let m = metrics(port);
        let events = emu.recorded_events();
        let has = |reason: &str| events.iter().any(|e| e["reason"] == reason);
        if metric(&m, "kpr_bpf_map_full_total", "") > 0.0
            && has("BPFMapFull")
            && has("FailedToProgramService")
        {
            break m;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(WAIT),
            "no metric and Events for the full map; events {events:?}; logs in {}",
            t.workdir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fitted = programmed(&t);
    let lines = stop(traffic);
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent keeps running"
    );
    let events = emu.recorded_events();
    let full_note = events
        .iter()
        .find(|e| e["reason"] == "BPFMapFull")
        .and_then(|e| e["note"].as_str())
        .unwrap_or_default()
        .to_string();
    let log = std::fs::read_dir(&t.workdir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "kernel refusal: services map full (16 entries, growth off), 31 Services", "mode": "ebpf",
               "services_programmed": fitted + 1, "services_refused": 30 - fitted,
               "map_full_syncs": metric(&m, "kpr_bpf_map_full_total", ""),
               "sync_errors": metric(&m, "kpr_sync_proxy_rules_errors_total", ""),
               "failed_to_program_events": events.iter().filter(|e| e["reason"] == "FailedToProgramService").count(),
               "connections_to_a_programmed_service": lines.len(), "failed": failures(&lines).len()})
    );
    assert!(fitted > 0 && fitted < 30, "some fit, some do not: {fitted}");
    assert!(
        full_note.contains("--bpf-map-services"),
        "the Event says what to raise: {full_note}"
    );
    assert!(
        log.contains("(the map is full)"),
        "the log says which map is full"
    );
    assert!(metric(&m, "kpr_sync_proxy_rules_errors_total", "") > 0.0);
    assert!(lines.len() > 50, "traffic ran");
    assert!(failures(&lines).is_empty(), "{:?}", failures(&lines));
    assert_eq!(pinned_services_capacity(&t), 16, "no growth");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_grows_while_serving_and_a_restart_resizes_without_breaking_flows() {
    kpr_testnet::require_root();
    let (emu, mut t, kubeconfig) = kpr_testnet::api_cluster("mapgrow").await;
    let port = 19_252;
    let mut dns = service("default", "dns", "10.96.0.20", 53, json!({}));
    dns["spec"]["ports"][0]["protocol"] = "UDP".into();
    emu.apply(dns);
    let mut slice = endpoint_slice("default", "dns", "dns-1", &["10.0.1.2", "10.0.1.3"], 8080);
    slice["ports"][0]["protocol"] = "UDP".into();
    emu.apply(slice);
    let mut agent = start_agent(
        &t,
        &kubeconfig,
        port,
        &["--bpf-map-services", "16", "--bpf-map-grow=true"],
    );
    t.wait_for_services("web and dns", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP").is_some()
            && backends_of(r, "10.96.0.20:53", "UDP").is_some()
    });
    let traffic = collect(t.spawn_client("client", &["tcp", "10.96.0.10:80", "100000000", "20"]));
    let held = collect(t.spawn_client("client", &["hold", "10.96.0.10:80", "600", "100"]));
    let udp = collect(t.spawn_client("client", &["udphold", "10.96.0.20:53", "600", "100"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = 60;
    let started = Instant::now();
    add_services(&emu, n);
    let start = Instant::now();
    while programmed(&t) < n as usize {
        assert!(
            start.elapsed() < kpr_testnet::scaled(WAIT),
            "{} of {n} Services programmed; logs in {}",
            programmed(&t),
            t.workdir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown_in = started.elapsed();
    let grown = pinned_services_capacity(&t);
    let m = metrics(port);
    let resizes = metric(&m, "kpr_bpf_map_resizes_total", "");
    // A new Service through the grown maps answers.
    t.wait_reaches("client", &format!("10.96.1.{n}:80"), &["10.0.1.2:8080"]);

    // A restart configured larger resizes the pinned maps at its first sync.
    agent.kill9();
    let _agent2 = start_agent(
        &t,
        &kubeconfig,
        port,
        &["--bpf-map-services", "512", "--bpf-map-grow=true"],
    );
    let start = Instant::now();
    while pinned_services_capacity(&t) != 512 {
        assert!(
            start.elapsed() < kpr_testnet::scaled(WAIT),
            "the restart resizes to 512"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        programmed(&t),
        n as usize,
        "every Service survives the resize"
    );
    let events = emu.recorded_events();
    let resized_events = events
        .iter()
        .filter(|e| e["reason"] == "BPFMapResized")
        .count();
    let (traffic, held, udp) = (stop(traffic), stop(held), stop(udp));
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "map resize while serving: services map 16 -> grown by the agent, then 512 at a restart", "mode": "ebpf",
               "services": n + 2, "grown_to": grown, "resizes_while_running": resizes,
               "all_programmed_ms": grown_in.as_millis(), "resized_events": resized_events,
               "connections": traffic.len(), "connections_failed": failures(&traffic).len(),
               "long_lived_tcp_echoes": held.len(), "long_lived_tcp_failed": failures(&held).len(),
               "connected_udp_requests": udp.len(), "connected_udp_failed": failures(&udp).len()})
    );
    assert!(grown >= 64, "the map grew to hold {n}: {grown}");
    assert!(resizes >= 1.0, "{m}");
    assert!(resized_events >= 1, "{events:?}");
    assert!(
        traffic.len() > 50 && held.len() > 20 && udp.len() > 20,
        "traffic ran"
    );
    assert!(failures(&traffic).is_empty(), "{:?}", failures(&traffic));
    assert!(failures(&held).is_empty(), "{:?}", failures(&held));
    assert!(failures(&udp).is_empty(), "{:?}", failures(&udp));
    // The connected UDP socket kept its backend throughout.
    let backends: std::collections::BTreeSet<_> =
        udp.iter().filter_map(|l| l["backend"].as_str()).collect();
    assert_eq!(backends.len(), 1, "{backends:?}");
}
