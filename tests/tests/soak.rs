//! Soak (issue 13): many Services, continuous endpoint churn through the API emulator, and
//! traffic, for a bounded time, in every mode this kernel runs. Services that always keep a
//! ready endpoint must never fail a connection; the agent's RSS must stay flat (its slope is
//! reported); after the churn stops the datapath holds exactly the desired state: no leaked
//! service, slot, backend or reverse-NAT entry (ebpf), no leaked chain (iptables), no leaked
//! Service chain or endpoint element (nftables).
//!
//! `KPR_SOAK_SERVICES` (default 300), `KPR_SOAK_SECS` (default 15) and
//! `KPR_SOAK_CHANGES_PER_SEC` (default 100) size it; `cargo xtask reliability` runs 10,000
//! Services (100,000 endpoints) for minutes. Prints one `KPR-FIGURE` line per mode.
//!
//! Address plan: client 10.0.0.2; real backends 10.0.1.2-5 (:8080); probe Services
//! 10.96.0.10-13:80 (always two real backends); bulk Services 10.97.x.y:80 with ten endpoints
//! each drawn from 10.200.0.0/16 (addresses nobody owns: only the datapath's tables see them).
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kpr_testnet::emulator::{Emulator, endpoint_slice, node, service};
use kpr_testnet::rng::FuzzRng;
use kpr_testnet::{ChildGuard, Topology, collect_json_lines as collect};
use serde_json::{Value, json};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const REAL: [&str; 4] = ["10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"];
const PROBES: usize = 4;

fn bulk_vip(i: u64) -> String {
    let n = i + 1;
    format!("10.97.{}.{}", n / 256, n % 256)
}

fn fake_endpoints(rng: &mut FuzzRng, n: usize) -> Vec<String> {
    let mut set = BTreeSet::new();
    while set.len() < n {
        // A pool of 20,000 addresses: Services share backends (refcounted in the ebpf mode).
        let k = rng.below(20_000);
        set.insert(format!("10.200.{}.{}", k / 250, k % 250 + 1));
    }
    set.into_iter().collect()
}

/// The EndpointSlice of Service `name` with `eps` ready on :8080.
fn apply_slice(emu: &Emulator, name: &str, eps: &[String]) {
    let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
    emu.apply(endpoint_slice(
        "default",
        name,
        &format!("{name}-1"),
        &refs,
        8080,
    ));
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Least-squares slope of (seconds, KiB) in KiB per minute.
fn slope_kib_per_min(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// What the datapath holds, counted the way the desired state is: (services or Service
/// chains, endpoints or endpoint chains, distinct backends (ebpf only), reverse NAT (ebpf)).
fn held(t: &Topology, mode: &str) -> (usize, usize, usize, usize) {
    match mode {
        "ebpf" => {
            let layout = kpr::render::ebpf::datapath::PinLayout::new(&t.bpffs);
            let snap = kpr::render::ebpf::pinned::PinnedMaps::open(&layout)
                .and_then(|m| m.snapshot())
                .expect("the pinned maps");
            (
                snap.services.len(),
                snap.slots.len(),
                snap.backends.len(),
                snap.revnat.len(),
            )
        }
        "iptables" => {
            let save = t.in_node("iptables-save", &["-t", "nat"]);
            let count = |p: &str| save.lines().filter(|l| l.starts_with(p)).count();
            (count(":KUBE-SVC-"), count(":KUBE-SEP-"), 0, 0)
        }
        _ => {
            // Service chains (their numgen maps DNAT to the endpoints), and the endpoints as
            // the hairpin set holds them (one element per endpoint address and port).
            let table = t.in_node("nft", &["list", "table", "ip", "kpr"]);
            let chains = table
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix("chain "))
                .map(|n| n.trim_end_matches(" {").trim_matches('"'))
                .filter(|n| n.starts_with("service-") && *n != "service-endpoints-check")
                .count();
            let set = t.in_node("nft", &["list", "set", "ip", "kpr", "hairpin-connections"]);
            let elements = set
                .split_once("elements = {")
                .and_then(|(_, rest)| rest.split_once('}'))
                .map_or(0, |(body, _)| {
                    body.split(',').filter(|e| !e.trim().is_empty()).count()
                });
            (chains, elements, 0, 0)
        }
    }
}

fn soak(mode: &str) {
    kpr_testnet::require_root();
    let services = env_or("KPR_SOAK_SERVICES", 300);
    let secs = env_or("KPR_SOAK_SECS", 15);
    let rate = env_or("KPR_SOAK_CHANGES_PER_SEC", 100).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut t = Topology::new(&format!("soak{}", &mode[..2]));
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    for (i, ip) in REAL.iter().enumerate() {
        let name = format!("b{i}");
        t.add_pod(&name, ip.parse::<Ipv4Addr>().expect("ip"));
        t.serve(&name, &[8080]);
    }
    let emu = rt.block_on(Emulator::start_in_netns(&t.node.path()));
    emu.apply(node("test-node", "192.168.0.2", "zone-a"));
    let mut rng = FuzzRng(0x50a6);
    // The desired state as this test last wrote it: Service name -> endpoint addresses.
    let mut desired: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in 0..PROBES {
        let name = format!("probe-{k}");
        let eps = vec![REAL[k % 4].to_string(), REAL[(k + 1) % 4].to_string()];
        emu.apply(service(
            "default",
            &name,
            &format!("10.96.0.{}", 10 + k),
            80,
            json!({}),
        ));
        apply_slice(&emu, &name, &eps);
        desired.insert(name, eps);
    }
    for i in 0..services {
        let name = format!("bulk-{i}");
        let eps = fake_endpoints(&mut rng, 10);
        emu.apply(service("default", &name, &bulk_vip(i), 80, json!({})));
        apply_slice(&emu, &name, &eps);
        desired.insert(name, eps);
    }
    let kubeconfig = t.workdir.join("kubeconfig");
    emu.write_kubeconfig(&kubeconfig);
    let agent: ChildGuard = t.spawn(t.agent_command_api_in_node(
        &kubeconfig,
        &Topology::mode_agent_flags(mode, &["--sync-period", "10s"]),
    ));
    let started = Instant::now();
    for k in 0..PROBES {
        let want: Vec<String> = desired[&format!("probe-{k}")]
            .iter()
            .map(|a| format!("{a}:8080"))
            .collect();
        let refs: Vec<&str> = want.iter().map(String::as_str).collect();
        t.wait_reaches("client", &format!("10.96.0.{}:80", 10 + k), &refs);
    }
    let cold_start = started.elapsed();

    let clients: Vec<_> = (0..PROBES)
        .map(|k| {
            collect(t.spawn_client(
                "client",
                &["tcp", &format!("10.96.0.{}:80", 10 + k), "100000000", "20"],
            ))
        })
        .collect();
    let mut rss = Vec::new();
    let churn_start = Instant::now();
    let mut changes = 0u64;
    let mut next_sample = Instant::now();
    let tick = Duration::from_secs_f64(1.0 / rate as f64);
    while churn_start.elapsed() < Duration::from_secs(secs) {
        let name = if changes.is_multiple_of(50) {
            // A probe Service moves to another pair of real backends: never without one.
            let k = rng.below(PROBES);
            let first = rng.below(4);
            let eps = vec![REAL[first].to_string(), REAL[(first + 1) % 4].to_string()];
            let name = format!("probe-{k}");
            desired.insert(name.clone(), eps);
            name
        } else {
            let i = rng.below(usize::try_from(services).unwrap_or(1).max(1));
            let name = format!("bulk-{i}");
            let n = 5 + rng.below(10);
            desired.insert(name.clone(), fake_endpoints(&mut rng, n));
            name
        };
        apply_slice(&emu, &name, &desired[&name]);
        changes += 1;
        if Instant::now() >= next_sample {
            if let Some(kib) = rss_kib(agent.pid()) {
                rss.push((churn_start.elapsed().as_secs_f64(), kib as f64));
            }
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(tick);
    }
    let churned = churn_start.elapsed();

    // Converged: the probes reach their last backends, and the tables hold exactly the
    // desired state.
    for k in 0..PROBES {
        let want: Vec<String> = desired[&format!("probe-{k}")]
            .iter()
            .map(|a| format!("{a}:8080"))
            .collect();
        let refs: Vec<&str> = want.iter().map(String::as_str).collect();
        t.wait_reaches("client", &format!("10.96.0.{}:80", 10 + k), &refs);
    }
    let frontends = desired.len();
    let endpoints: usize = desired.values().map(Vec::len).sum();
    let distinct: BTreeSet<&String> = desired.values().flatten().collect();
    let want = match mode {
        "ebpf" => (frontends, endpoints, distinct.len(), frontends),
        "iptables" => (frontends, endpoints, 0, 0),
        _ => (frontends, distinct.len(), 0, 0),
    };
    let start = Instant::now();
    let mut got = held(&t, mode);
    while got != want && start.elapsed() < kpr_testnet::scaled(Duration::from_secs(60)) {
        std::thread::sleep(Duration::from_millis(500));
        got = held(&t, mode);
    }
    let lines: Vec<Vec<Value>> = clients
        .into_iter()
        .map(|(mut c, h)| {
            let _ = c.kill();
            let _ = c.wait();
            h.join().expect("reader")
        })
        .collect();
    let connections: usize = lines.iter().map(Vec::len).sum();
    let failed: Vec<&Value> = lines
        .iter()
        .flatten()
        .filter(|l| !l["error"].is_null())
        .collect();
    let warm = rss.len() / 4;
    let slope = slope_kib_per_min(&rss[warm..]);
    let rss_first = rss.get(warm).map_or(0.0, |s| s.1);
    let rss_last = rss.last().map_or(0.0, |s| s.1);
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "soak: Services x 10 endpoints, endpoint churn, traffic to Services that keep ready endpoints",
               "mode": mode, "services": frontends, "endpoints": endpoints,
               "cold_start_ms": cold_start.as_millis(), "secs": churned.as_secs(),
               "endpoint_changes": changes, "changes_per_sec": (changes as f64 / churned.as_secs_f64()).round(),
               "connections": connections, "failed": failed.len(),
               "rss_kib_after_warmup": rss_first, "rss_kib_end": rss_last,
               "rss_slope_kib_per_min": slope.round(),
               "held": format!("{got:?}"), "desired": format!("{want:?}"),
               "leaked_entries": (got.0 + got.1 + got.2 + got.3) as i64 - (want.0 + want.1 + want.2 + want.3) as i64})
    );
    assert!(connections > 100, "traffic ran: {connections}");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        got, want,
        "the datapath holds exactly the desired state (nothing leaked)"
    );
    // Flat: after warm-up the agent does not keep growing (a generous bound for short runs).
    assert!(
        rss_last <= rss_first * 1.5 + 8192.0,
        "RSS grew from {rss_first} KiB to {rss_last} KiB (slope {slope:.0} KiB/min)"
    );
}

#[test]
fn soak_ebpf() {
    soak("ebpf");
}

#[test]
fn soak_iptables() {
    soak("iptables");
}

#[test]
fn soak_nftables() {
    soak("nftables");
}
