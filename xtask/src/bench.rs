//! `cargo xtask bench`: measures kpr against the targets in shared/PERFORMANCE.md and prints a
//! report (numbers, not pass/fail: timings are never asserted in tests).
//! - TC program cost per packet (BPF_PROG_TEST_RUN): miss, established, new flow;
//! - programming: cold start of N Services x 10 endpoints into the real maps; one Service
//!   change at N;
//! - ClusterIP connect latency through socket LB vs a direct connection, at N Services
//!   (netns topology, interleaved rounds, medians);
//! - agent RSS at 10k Services / 100k endpoints.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use aya::programs::SchedClassifier;
use kpr::model::DesiredCache;
use kpr::model::{
    DesiredState, Frontend, FrontendKey, FrontendKind, Masquerade, NodeInfo, ProxyConfig, Targets,
};
use kpr::render::ebpf::EbpfRenderer;
use kpr::render::ebpf::datapath::{PinLayout, load_object};
use kpr::render::ebpf::maps::MapDiff;
use kpr::render::ebpf::packet::{self, L4, tcp_flags};
use kpr::render::ebpf::pinned::PinnedMaps;
use kpr::render::ebpf::scratch::{ScratchDatapath, ScratchPins};
use kpr::render::iptables::IptablesRenderer;
use kpr::render::nftables::NftablesRenderer;
use kpr::render::{ProxyMode, Renderer};
use kpr::store::{Change, ObjectRef, Protocol, ServiceInfo, SliceInfo, Store};
use kpr::testkit::{endpoint, service, slice};
use kpr_testnet::Topology;

/// N ClusterIP frontends 10.96.x.y:80 with `eps` endpoints each, plus extra.
fn desired(n: usize, eps: usize) -> DesiredState {
    let mut d = DesiredState::default();
    for i in 0..n {
        let ip = Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let backends: Vec<SocketAddr> = (0..eps)
            .map(|j| {
                SocketAddr::from((
                    [10, 200 + (j % 50) as u8, (i >> 8) as u8, i as u8],
                    8080 + (j / 50) as u16,
                ))
            })
            .collect();
        d.frontends.insert(
            FrontendKey {
                ip: IpAddr::V4(ip),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Frontend::new(
                ObjectRef::new("bench", &format!("s{i}")),
                FrontendKind::ClusterIp,
                Targets::Backends(backends),
            ),
        );
    }
    d
}

/// A TCP SYN from an outside client to the node.
fn tc_packet(sport: u16, dport: u16) -> Vec<u8> {
    packet::build(
        SocketAddr::from(([203, 0, 113, 2], sport)),
        SocketAddr::from(([192, 168, 0, 2], dport)),
        L4::Tcp(tcp_flags::SYN),
        &[],
    )
}

fn bench_tc() -> anyhow::Result<()> {
    let mut scratch = ScratchDatapath::load(ScratchPins::new(
        std::path::Path::new("/sys/fs/bpf"),
        "kpr-bench-tc",
    ))?;
    let mut d = desired(1000, 3);
    let np = FrontendKey {
        ip: "192.168.0.2".parse()?,
        port: 3001,
        protocol: Protocol::Tcp,
    };
    let mut fe = d.frontends.values().next().unwrap().clone();
    fe.kind = FrontendKind::NodePort;
    fe.external_policy_local = true;
    d.frontends.insert(np, fe.clone());
    // eTP=Cluster: external traffic masqueraded.
    fe.external_policy_local = false;
    fe.internal_masquerade = Masquerade::Always;
    fe.external_masquerade = Masquerade::Always;
    d.frontends.insert(FrontendKey { port: 3002, ..np }, fe);
    scratch.maps.set_node_config(&proxy_common::NodeConfig {
        snat_v4: proxy_common::v4_mapped([192, 168, 0, 2]),
        snat_v6: [0; 16],
        ..Default::default()
    })?;
    let (_, errors) = MapDiff::default().sync(&d, &mut scratch.maps, &[]);
    anyhow::ensure!(errors.is_empty(), "{errors:?}");
    let prog: &SchedClassifier = scratch.ebpf.program("kpr_tc_ingress").unwrap().try_into()?;
    let run = |pkt: &[u8], repeat: u32| -> anyhow::Result<f64> {
        let r = scratch.run_repeat("kpr_tc_ingress", pkt, repeat)?;
        Ok(r.duration.as_nanos() as f64)
    };
    let stats = || -> anyhow::Result<(f64, u64)> {
        let info = prog.info()?;
        Ok((info.run_time().as_nanos() as f64, info.run_count()))
    };
    let per_run = |before: (f64, u64), after: (f64, u64)| {
        (after.0 - before.0) / (after.1 - before.1).max(1) as f64
    };
    let miss = run(&tc_packet(40000, 22), 1_000_000)?;
    run(&tc_packet(40000, 3001), 1)?;
    let est = run(&tc_packet(40000, 3001), 1_000_000)?;
    // From here on also the program's own time per run (BPF_ENABLE_STATS: two clock reads
    // around each run, no test_run per-call cost).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut new_flow = Vec::new();
    let s0 = stats()?;
    for sport in 1000..21000u16 {
        new_flow.push(run(&tc_packet(sport, 3001), 1)?);
    }
    let nf_prog = per_run(s0, stats()?);
    new_flow.sort_by(f64::total_cmp);
    // Masqueraded (eTP=Cluster) new flows: four conntrack entries instead of two.
    let s0 = stats()?;
    for sport in 1000..21000u16 {
        run(&tc_packet(sport, 3002), 1)?;
    }
    let masq_prog = per_run(s0, stats()?);
    // Single runs carry a larger fixed cost than amortised repeats: time single misses too, so
    // the new-flow figure has its own baseline.
    let mut single_miss = Vec::new();
    let s0 = stats()?;
    for sport in 1000..21000u16 {
        single_miss.push(run(&tc_packet(sport, 22), 1)?);
    }
    let miss_prog = per_run(s0, stats()?);
    let s0 = stats()?;
    run(&tc_packet(40000, 3001), 1_000_000)?;
    let est_prog = per_run(s0, stats()?);
    single_miss.sort_by(f64::total_cmp);
    println!("TC ingress (BPF_PROG_TEST_RUN, ns/packet incl. ~33 ns harness):");
    println!("  miss (not a Service)      {miss:>6.0}");
    println!("  established flow          {est:>6.0}");
    let (nf, sm) = (
        new_flow[new_flow.len() / 2],
        single_miss[single_miss.len() / 2],
    );
    println!("  new flow (median of 20k single runs)  {nf:>6.0}");
    println!(
        "  miss     (median of 20k single runs)  {sm:>6.0}   new flow - miss = {:.0}",
        nf - sm
    );
    println!("TC ingress, the program alone (bpf_stats run_time / run_cnt, no harness):");
    println!("  miss                      {miss_prog:>6.0}");
    println!("  established flow          {est_prog:>6.0}");
    println!("  new flow, client IP kept  {nf_prog:>6.0}   (2 conntrack entries)");
    println!(
        "  new flow, masqueraded     {masq_prog:>6.0}   (4 conntrack entries; target: new flow <= 150 above the harness)"
    );
    Ok(())
}

fn service_info(i: usize) -> ServiceInfo {
    let ip = Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
    service("bench", &format!("s{i}"))
        .cluster_ip(&ip.to_string())
        .port("p", 80, Protocol::Tcp, 8080)
        .build()
}

fn slice_info(i: usize, eps: usize) -> SliceInfo {
    let eps: Vec<_> = (0..eps)
        .map(|j| {
            let ip = Ipv4Addr::new(10, 200 + (j % 50) as u8, (i >> 8) as u8, i as u8);
            endpoint(&ip.to_string(), "elsewhere")
        })
        .collect();
    slice("bench", &format!("s{i}-1"), &format!("s{i}"))
        .port("p", 8080, Protocol::Tcp)
        .endpoints(&eps)
        .build()
}

fn bench_programming() -> anyhow::Result<()> {
    println!(
        "Programming the maps (cold: batched writes; agent work = store + model + diff + map writes):"
    );
    for n in [10_000usize, 50_000] {
        let pins = ScratchPins::new(
            std::path::Path::new("/sys/fs/bpf"),
            &format!("kpr-bench-p{n}"),
        );
        let layout = PinLayout::new(pins.path());
        let _ebpf = load_object(&layout)?;
        let node = NodeInfo {
            name: "bench".into(),
            ips: vec!["192.168.0.2".parse()?],
            labels: Default::default(),
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        };
        let config = ProxyConfig::default();
        let mut store = Store::default();
        store.apply(Change::Reset {
            services: (0..n).map(service_info).collect(),
            slices: (0..n).map(|i| slice_info(i, 10)).collect(),
        });
        let mut cache = DesiredCache::default();
        let mut r = EbpfRenderer::with_maps(layout.clone())?;
        let t = Instant::now();
        let dirty = store.take_dirty();
        anyhow::ensure!(cache.update(&store, &dirty, &node, &config).is_none());
        let model = t.elapsed();
        let report = r.sync_full(&cache.state);
        let cold = t.elapsed();
        if let Some(e) = report.errors.first() {
            println!("  {n}: {} errors, first: {e}", report.errors.len());
        }
        // One Service loses an endpoint.
        let mut samples = Vec::new();
        for k in 0..200usize {
            let t = Instant::now();
            store.apply(Change::SliceUpsert(slice_info(k, 9)));
            let dirty = store.take_dirty();
            let keys = cache
                .update(&store, &dirty, &node, &config)
                .expect("incremental");
            let report = r.sync_frontends(&cache.state, &keys);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(
                report.errors.is_empty() && report.detail.contains(&("services_written", 1)),
                "{report:?}"
            );
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "  {n:>6} Services x 10 endpoints: cold {:>7.1} ms (model {:.1} ms; target < 500 ms at 50k); one Service changed: p50 {:>5.1} us, p90 {:>5.1} us (target <= 50 us)",
            cold.as_secs_f64() * 1e3,
            model.as_secs_f64() * 1e3,
            samples[samples.len() / 2],
            samples[samples.len() * 9 / 10]
        );
    }
    Ok(())
}

fn bench_connect() -> anyhow::Result<()> {
    let mut t = Topology::new("bench");
    t.add_pod("client", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("backend", Ipv4Addr::new(10, 0, 1, 2));
    t.serve("backend", &[8080]);
    kpr::render::ebpf::datapath::ensure_loaded(&PinLayout::new(&t.bpffs), &t.cgroup.path)?;
    let layout = PinLayout::new(&t.bpffs);
    let mut maps = PinnedMaps::open(&layout)?;
    let mut r = MapDiff::default();
    println!("ClusterIP connect+read+close, p50 in us (interleaved rounds of 300):");
    for n in [10usize, 1000, 10_000, 50_000] {
        let mut d = desired(n, 10);
        let vip = FrontendKey {
            ip: "10.255.0.10".parse()?,
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut fe = d.frontends.values().next().unwrap().clone();
        fe.internal = Targets::Backends(vec!["10.0.1.2:8080".parse()?]);
        d.frontends.insert(vip, fe);
        let (_, errors) = r.sync(&d, &mut maps, &[]);
        anyhow::ensure!(errors.is_empty(), "{errors:?}");
        // Let the kernel finish freeing the previous round's map elements (RCU) first.
        std::thread::sleep(Duration::from_secs(2));
        let (mut via, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            for (dst, acc) in [("10.255.0.10:80", &mut via), ("10.0.1.2:8080", &mut direct)] {
                let l = t.client("client", &["bench", dst, "300"]);
                acc.push(l[0]["p50_us"].as_f64().unwrap_or(0.0));
            }
        }
        via.sort_by(f64::total_cmp);
        direct.sort_by(f64::total_cmp);
        let (v, dd) = (via[2], direct[2]);
        println!(
            "  {n:>6} Services: via ClusterIP {v:>7.1}  direct {dd:>7.1}  ratio {:.3} (target <= 1.02)",
            v / dd
        );
    }
    Ok(())
}

/// Waits until the agent programmed 10k frontends, then prints its RSS.
fn report_rss(
    t: &Topology,
    agent: &kpr_testnet::ChildGuard,
    start: Instant,
    source: &str,
) -> anyhow::Result<()> {
    let mut synced = None;
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(rows) = t.services_json()
            && rows.len() >= 10_000
        {
            synced = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    println!(
        "Agent at 10k Services / 100k endpoints ({source}): programmed after {:.1} s; {} (target < 64 MiB)",
        synced.map_or(f64::NAN, |d| d.as_secs_f64()),
        rss.trim_start_matches("VmRSS:").trim()
    );
    Ok(())
}

fn bench_rss() -> anyhow::Result<()> {
    let t = Topology::new("rss");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir)?;
    let mut yaml = String::new();
    for i in 0..10_000usize {
        let ip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 255, i & 255);
        yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: bench, name: s{i}}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80, targetPort: 8080}}]}}\n"));
        yaml.push_str(&format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: bench, name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"));
        for j in 0..10 {
            yaml.push_str(&format!(
                "- {{addresses: [10.{}.{}.{}], conditions: {{ready: true}}}}\n",
                200 + j,
                (i >> 8) & 255,
                i & 255
            ));
        }
    }
    std::fs::write(dir.join("all.yaml"), yaml)?;
    let start = Instant::now();
    let agent = t.start_agent(&dir);
    report_rss(&t, &agent, start, "manifests")?;
    Ok(())
}

/// RSS of the agent fed by the API server emulator (the production source) with 10k Services
/// and 100k endpoints.
fn bench_rss_api() -> anyhow::Result<()> {
    use kpr_testnet::emulator::{Emulator, endpoint_slice, service};
    let rt = tokio::runtime::Runtime::new()?;
    let emu = rt.block_on(Emulator::start());
    for i in 0..10_000usize {
        let vip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 255, i & 255);
        emu.apply(service(
            "bench",
            &format!("s{i}"),
            &vip,
            80,
            serde_json::json!({}),
        ));
        let ips: Vec<String> = (0..10)
            .map(|j| format!("10.{}.{}.{}", 200 + j, (i >> 8) & 255, i & 255))
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        emu.apply(endpoint_slice(
            "bench",
            &format!("s{i}"),
            &format!("s{i}-1"),
            &ips,
            80,
        ));
    }
    let t = Topology::new("rssapi");
    let kubeconfig = t.workdir.join("kubeconfig");
    emu.write_kubeconfig(&kubeconfig);
    let log = std::fs::File::create(t.workdir.join("agent-api.log"))?;
    let start = Instant::now();
    let agent = kpr_testnet::ChildGuard(
        t.agent_command_api(&kubeconfig, &[])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    report_rss(&t, &agent, start, "API server emulator")?;
    drop(agent);
    drop(rt);
    Ok(())
}

unsafe extern "C" {
    fn unshare(flags: i32) -> i32;
}

/// Programming time of the rule-based modes: a full sync of N Services x 10 endpoints and a
/// one-Service change, in a network namespace of this thread's own (the rules never touch the
/// host's tables).
fn bench_modes() -> anyhow::Result<()> {
    println!("Rule-based modes, programming time (median of 5; N Services x 10 endpoints):");
    std::thread::spawn(|| -> anyhow::Result<()> {
        const CLONE_NEWNET: i32 = 0x4000_0000;
        // SAFETY: unshare affects only this thread, which from here on lives in an empty
        // network namespace; the tools it spawns inherit it.
        anyhow::ensure!(unsafe { unshare(CLONE_NEWNET) } == 0, "unshare(CLONE_NEWNET)");
        // KPR_BENCH_MODES="nftables iptables" and KPR_BENCH_SIZES="1000 10000" narrow the run.
        let list = |var: &str, default: &str| -> Vec<String> {
            std::env::var(var)
                .unwrap_or_else(|_| default.into())
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let sizes: Vec<usize> = list("KPR_BENCH_SIZES", "1000 10000")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let modes: Vec<ProxyMode> = list("KPR_BENCH_MODES", "iptables nftables")
            .iter()
            .filter_map(|m| match m.as_str() {
                "iptables" => Some(ProxyMode::Iptables),
                "nftables" => Some(ProxyMode::Nftables),
                _ => None,
            })
            .collect();
        for &n in &sizes {
            for &mode in &modes {
                let mut r: Box<dyn Renderer> = match mode {
                    ProxyMode::Iptables => Box::new(IptablesRenderer::start()?),
                    _ => Box::new(NftablesRenderer::start()?),
                };
                let d = desired(n, 10);
                let t = Instant::now();
                let report = r.sync_full(&d);
                let full = t.elapsed();
                anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors);
                let mut one = Vec::new();
                for k in 0..5u16 {
                    let mut d2 = d.clone();
                    let key = *d2.frontends.keys().nth(usize::from(k) * 7).unwrap();
                    let fe = d2.frontends.get_mut(&key).unwrap();
                    let mut b = fe.internal.backends().to_vec();
                    b.pop();
                    fe.internal = Targets::Backends(b.clone());
                    fe.external = Targets::Backends(b);
                    let t = Instant::now();
                    let report = r.sync_frontends(&d2, &std::iter::once(key).collect());
                    one.push(t.elapsed().as_secs_f64() * 1e3);
                    anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors);
                    r.sync_frontends(&d, &std::iter::once(key).collect());
                }
                one.sort_by(f64::total_cmp);
                let t = Instant::now();
                let report = r.sync_full(&d);
                let resync = t.elapsed();
                anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors);
                println!(
                    "  {mode:<8} {n:>6} Services: full sync {:>8.1} ms, resync (re-read + rewrite) {:>8.1} ms, one Service changed {:>6.1} ms",
                    full.as_secs_f64() * 1e3,
                    resync.as_secs_f64() * 1e3,
                    one[one.len() / 2]
                );
                r.cleanup()?;
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

pub fn run(parts: &[String]) -> anyhow::Result<()> {
    const ALL: [&str; 5] = ["tc", "programming", "modes", "connect", "rss"];
    if let Some(bad) = parts.iter().find(|p| !ALL.contains(&p.as_str())) {
        anyhow::bail!("unknown bench part {bad:?}; parts are {}", ALL.join(", "));
    }
    let want = |p: &str| parts.is_empty() || parts.iter().any(|x| x == p);
    kpr_testnet::require_root();
    // What is measured is what ships: an optimised build of the agent code. A debug xtask
    // re-runs itself as a release build.
    if cfg!(debug_assertions) {
        let status = std::process::Command::new("cargo")
            .args([
                "run",
                "--release",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "bench",
            ])
            .args(parts)
            .current_dir(crate::setup::root())
            .status()?;
        anyhow::ensure!(status.success(), "bench failed");
        return Ok(());
    }
    let status = std::process::Command::new("cargo")
        .args(["build", "--release", "--workspace", "--bins"])
        .current_dir(crate::setup::root())
        .status()?;
    anyhow::ensure!(status.success(), "build failed");
    // SAFETY: set before any thread reads it.
    unsafe { std::env::set_var("KPR_BIN_DIR", crate::setup::root().join("target/release")) };
    if want("tc") {
        bench_tc()?;
    }
    if want("programming") {
        bench_programming()?;
    }
    if want("modes") {
        bench_modes()?;
    }
    if want("connect") {
        bench_connect()?;
    }
    if want("rss") {
        bench_rss()?;
        bench_rss_api()?;
    }
    Ok(())
}
