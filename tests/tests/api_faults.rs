//! API faults through the emulator (issue 13) with traffic throughout: 500s, dropped watches,
//! a compaction (410 Gone on resume), duplicate events, an outage with the agent running and
//! an outage with the agent SIGKILLed and restarted during it. A client connects to the
//! Service every 50 ms the whole time; the Service always has a ready endpoint, so not one
//! connection may fail, and an endpoint change made while the server is unreachable must be
//! programmed once it is back.
//!
//! `KPR_OUTAGE_SECS` sets each outage's length (default 3 s; `cargo xtask reliability`
//! runs 600 s, the 10 minutes). Prints one `KPR-FIGURE` line.
//!
//! Address plan: client 10.0.0.2; backends 10.0.1.2, 10.0.1.3 (:8080); Service 10.96.0.10:80.
use std::io::{BufRead as _, BufReader};
use std::time::{Duration, Instant};

use kpr_testnet::emulator::endpoint_slice;
use kpr_testnet::{Topology, backends_of};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_and_outages_never_break_a_served_service_and_converge_after() {
    kpr_testnet::require_root();
    let outage = Duration::from_secs(
        std::env::var("KPR_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    );
    let (emu, mut t, kubeconfig) = kpr_testnet::api_cluster("apif").await;
    let start_agent = |t: &Topology, n: &str| kpr_testnet::start_api_agent(t, &kubeconfig, n);
    let both = vec!["10.0.1.2:8080".to_string(), "10.0.1.3:8080".to_string()];
    let only_b1 = vec!["10.0.1.3:8080".to_string()];
    let mut agent = start_agent(&t, "1");
    t.wait_for_services("initial sync", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(both.clone())
    });

    // Traffic for the whole run: one connection every 50 ms, until stopped.
    let mut client = t.spawn_client("client", &["tcp", "10.96.0.10:80", "100000000", "50"]);
    let stdout = client.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .collect::<Vec<_>>()
    });
    let mut faults = 0;

    // 1. Server errors, dropped watches, a compaction, duplicate events.
    emu.fail_next(5);
    emu.drop_watches();
    faults += 2;
    tokio::time::sleep(Duration::from_secs(2)).await;
    emu.compact();
    emu.drop_watches();
    faults += 2;
    for _ in 0..3 {
        emu.apply(endpoint_slice(
            "default",
            "web",
            "web-1",
            &["10.0.1.2", "10.0.1.3"],
            8080,
        ));
    }
    faults += 1;
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.wait_for_services("after errors, drops, 410 and duplicates", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(both.clone())
    });

    // 2. An outage with the agent running; a change is made meanwhile.
    emu.set_hang(true);
    emu.drop_watches();
    faults += 1;
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.3"],
        8080,
    ));
    tokio::time::sleep(outage).await;
    emu.set_hang(false);
    let back = Instant::now();
    t.wait_for_services("the change made during the outage", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(only_b1.clone())
    });
    let converge_running = back.elapsed();

    // 3. An outage with the agent SIGKILLed and restarted during it.
    emu.set_hang(true);
    emu.drop_watches();
    faults += 1;
    agent.kill9();
    faults += 1;
    let _agent2 = start_agent(&t, "2");
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2", "10.0.1.3"],
        8080,
    ));
    tokio::time::sleep(outage).await;
    emu.set_hang(false);
    let back = Instant::now();
    t.wait_for_services("the change made during the restarted outage", WAIT, |r| {
        backends_of(r, "10.96.0.10:80", "TCP") == Some(both.clone())
    });
    let converge_restarted = back.elapsed();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = client.kill();
    let _ = client.wait();
    let lines = reader.join().unwrap();
    let failed: Vec<_> = lines.iter().filter(|l| !l["error"].is_null()).collect();
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "API faults: 500s, dropped watches, 410, duplicates, outages (agent running; agent SIGKILLed and restarted)",
               "faults_injected": faults, "outage_secs": outage.as_secs(),
               "connections": lines.len(), "failed": failed.len(),
               "converged_ms_after_outage": converge_running.as_millis(),
               "converged_ms_after_outage_with_restart": converge_restarted.as_millis()})
    );
    assert!(lines.len() > 100, "traffic ran: {}", lines.len());
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        lines.len()
    );
}
