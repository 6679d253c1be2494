//! Crash consistency (issue 13): the agent is SIGKILLed at a random map write of a sync that
//! moves every Service from one backend set to another, many times. After each kill the
//! pinned maps must show every Service either entirely old or entirely new, never a mix;
//! the restarted agent then converges to the new state.
//!
//! `KPR_CRASH_ITERS` sets the iterations (default 4; `cargo xtask reliability` runs 40).
//! Prints one `KPR-FIGURE` line.
//!
//! Address plan: Services 10.96.1.0-10.96.8.249:80 (2000, `vip(i)`); backend sets A {10.0.1.2,
//! 10.0.1.3} and B {10.0.2.1 .. 10.0.2.30} (:8080). Nothing connects: only the maps are read.
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use kpr_testnet::{Topology, backends_of, write_manifest};

const SERVICES: usize = 2000;

fn manifests(backends: &[&str]) -> String {
    let eps: Vec<String> = backends
        .iter()
        .map(|ip| format!("{{addresses: [{ip}], conditions: {{ready: true}}}}"))
        .collect();
    let mut out = String::new();
    for i in 0..SERVICES {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: s{i}}}\nspec: {{clusterIP: {vip}, ports: [{{name: p, port: 80, targetPort: 8080}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: 8080}}]\n---\n",
            eps.join(", "),
            vip = vip(i)
        );
    }
    out
}

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", 1 + i / 250, i % 250)
}

/// The lines of the newest agent log that report a finished sync, with their `took_us`.
fn syncs_logged(t: &Topology) -> Vec<u64> {
    let newest = std::fs::read_dir(&t.workdir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    let text = newest
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(" synced "))
        .filter_map(|l| {
            l.split("took_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn set(ips: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
    v.sort();
    v
}

/// How many Services show `a`, how many `b`, and the ones that show neither.
fn census(rows: &[serde_json::Value], a: &[String], b: &[String]) -> (usize, usize, Vec<String>) {
    let (mut na, mut nb, mut mixed) = (0, 0, Vec::new());
    for i in 0..SERVICES {
        let fe = format!("{}:80", vip(i));
        match backends_of(rows, &fe, "TCP") {
            Some(v) if v == a => na += 1,
            Some(v) if v == b => nb += 1,
            other => mixed.push(format!("{fe}: {other:?}")),
        }
    }
    (na, nb, mixed)
}

#[test]
fn a_sigkill_mid_sync_leaves_every_service_old_or_new_and_the_restart_converges() {
    kpr_testnet::require_root();
    let iters: usize = std::env::var("KPR_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let t = Topology::new("crash");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    // B has 30 backends: moving 2000 Services between A and B writes some 60,000 map
    // entries, a sync long enough to be caught under way.
    let a_ips = ["10.0.1.2", "10.0.1.3"];
    let b_owned: Vec<String> = (1..=30).map(|i| format!("10.0.2.{i}")).collect();
    let b_ips: Vec<&str> = b_owned.iter().map(String::as_str).collect();
    let (a, b) = (set(&a_ips), set(&b_ips));
    write_manifest(&dir, "all.yaml", &manifests(&a_ips));
    let mut agent = t.start_agent(&dir);
    t.wait_for_services("initial sync", Duration::from_secs(30), |r| {
        census(r, &a, &b).0 == SERVICES
    });
    // Calibration, no kill: how long after the manifest is written the A -> B sync ends,
    // and how long its writes take (the agent's own `took_us`).
    let before = syncs_logged(&t).len();
    let written = Instant::now();
    write_manifest(&dir, "all.yaml", &manifests(&b_ips));
    let (ends_after, took) = loop {
        let s = syncs_logged(&t);
        if s.len() > before {
            break (written.elapsed(), Duration::from_micros(*s.last().unwrap()));
        }
        assert!(
            written.elapsed() < Duration::from_secs(30),
            "no sync logged"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    t.wait_for_services("calibration", Duration::from_secs(30), |r| {
        census(r, &a, &b).1 == SERVICES
    });
    write_manifest(&dir, "all.yaml", &manifests(&a_ips));
    t.wait_for_services("back to A", Duration::from_secs(30), |r| {
        census(r, &a, &b).0 == SERVICES
    });
    let _ = (ends_after, took);
    let mut seed: u64 = 0x6372_6173_68;
    let (mut caught_mid, mut mixed_total) = (0usize, 0usize);
    let mut first_mixed: Option<String> = None;
    let mut converge_ms = Vec::new();
    for i in 0..iters {
        let (from, to, to_ips) = if i % 2 == 0 {
            (&a, &b, &b_ips[..])
        } else {
            (&b, &a, &a_ips[..])
        };
        // The agent goes down; the change arrives; the restarted agent dies (SIGKILL, from
        // its own test hook) just before a random one of the ~64,000 map writes its sync
        // makes, so every kill lands inside the sync, at a different point each time.
        agent.kill9();
        write_manifest(&dir, "all.yaml", &manifests(to_ips));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let crash_after = 1 + seed % 64_000;
        let mut cmd = t.agent_command(&dir, &[]);
        cmd.env("KPR_TEST_CRASH_AFTER_MAP_WRITES", crash_after.to_string());
        agent = t.spawn(cmd);
        let started = Instant::now();
        let crashed = loop {
            if agent.0.try_wait().expect("wait").is_some() {
                break true;
            }
            if t.services_json()
                .is_some_and(|r| census(&r, from, to).1 == SERVICES)
            {
                break false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "neither crashed nor converged"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let rows = t.services_json().expect("the pinned maps are readable");
        let (_, n_to, mixed) = census(&rows, from, to);
        if crashed && n_to < SERVICES {
            caught_mid += 1;
        }
        if !mixed.is_empty() {
            first_mixed.get_or_insert_with(|| {
                format!(
                    "iteration {i} (crash before write {crash_after}): {:?}",
                    &mixed[..mixed.len().min(3)]
                )
            });
        }
        mixed_total += mixed.len();
        let restarted = Instant::now();
        agent.kill9();
        agent = t.start_agent(&dir);
        t.wait_for_services(
            "the restarted agent converges",
            Duration::from_secs(30),
            |r| census(r, from, to).1 == SERVICES,
        );
        converge_ms.push(restarted.elapsed().as_millis());
    }
    converge_ms.sort_unstable();
    println!(
        "KPR-FIGURE {}",
        serde_json::json!({"scenario": "crash consistency: SIGKILL at a random map write of a 2000-Service sync",
               "sync_took_us": took.as_micros(), "iterations": iters, "killed_mid_sync": caught_mid, "services_half_written": mixed_total,
               "restart_converged_ms_p50": converge_ms[converge_ms.len() / 2],
               "restart_converged_ms_max": converge_ms.last().copied().unwrap_or(0)})
    );
    assert!(
        caught_mid * 2 >= iters,
        "most kills must land inside the sync: {caught_mid} of {iters}"
    );
    assert!(
        first_mixed.is_none(),
        "{mixed_total} Services were left half old, half new after a SIGKILL; first: {first_mixed:?}"
    );
}
