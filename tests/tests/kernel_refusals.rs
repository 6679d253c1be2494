//! Kernel refusals at start (issue 13): the ebpf datapath cannot start because the bpffs is not
//! mounted, or because the cgroup path is not a cgroup v2 directory. The agent keeps running
//! and retries, says why in its log, in `FailedToStartDatapath` Events and in
//! `kpr_datapath_start_failures_total`, reports unhealthy on `/healthz`, and starts serving
//! by itself once the bpffs is mounted. Prints one `KPR-FIGURE` line per test.
//!
//! Address plan: client 10.0.0.2; backends 10.0.1.2, 10.0.1.3 (:8080); Service web
//! 10.96.0.10:80.
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use kpr_testnet::{ChildGuard, Topology};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// GET `path` from loopback `port`: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn agent(t: &Topology, kubeconfig: &std::path::Path, port: u16, extra: &[&str]) -> ChildGuard {
    let metrics = format!("127.0.0.1:{port}");
    let healthz = format!("127.0.0.1:{}", port + 1);
    let mut args = vec![
        "--proxy-mode",
        "ebpf",
        "--metrics-bind-address",
        &metrics,
        "--healthz-bind-address",
        &healthz,
    ];
    args.extend_from_slice(extra);
    t.spawn(t.agent_command_api(kubeconfig, &args))
}

/// Waits until the agent has failed to start at least once, with the Event; returns metrics.
async fn wait_refused(
    emu: &kpr_testnet::emulator::Emulator,
    a: &mut ChildGuard,
    port: u16,
    t: &Topology,
) -> String {
    let start = Instant::now();
    loop {
        assert!(
            a.0.try_wait().expect("wait").is_none(),
            "the agent keeps running; logs in {}",
            t.workdir.display()
        );
        let (_, m) = get(port, "/metrics");
        if metric(&m, "kpr_datapath_start_failures_total") >= 2.0
            && emu
                .recorded_events()
                .iter()
                .any(|e| e["reason"] == "FailedToStartDatapath")
        {
            return m;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(WAIT),
            "no start failure reported; logs in {}",
            t.workdir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event_note(emu: &kpr_testnet::emulator::Emulator) -> String {
    emu.recorded_events()
        .iter()
        .find(|e| e["reason"] == "FailedToStartDatapath")
        .and_then(|e| e["note"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bpffs_the_agent_waits_says_why_and_starts_once_one_is_mounted() {
    kpr_testnet::require_root();
    let (emu, t, kubeconfig) = kpr_testnet::api_cluster("nobpffs").await;
    // A plain directory where the bpffs should be.
    let pins = t.workdir.join("bpf");
    std::fs::create_dir_all(&pins).expect("dir");
    let port = 19_261;
    let pins_arg = pins.display().to_string();
    let mut a = agent(&t, &kubeconfig, port, &["--bpf-fs-path", &pins_arg]);
    let m = wait_refused(&emu, &mut a, port, &t).await;
    let (health, _) = get(port + 1, "/healthz");
    let note = event_note(&emu);
    assert_eq!(metric(&m, "kpr_datapath_started"), 0.0, "{m}");
    assert_eq!(health, 503, "unhealthy while the datapath is not started");
    assert!(note.contains("is not on a BPF filesystem"), "{note}");

    // The operator mounts it: the agent starts by itself.
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&pins)
        .status()
        .expect("mount");
    assert!(mounted.success());
    let since = Instant::now();
    let start = Instant::now();
    loop {
        let (_, m) = get(port, "/metrics");
        if metric(&m, "kpr_datapath_started") == 1.0 {
            break;
        }
        assert!(
            start.elapsed() < kpr_testnet::scaled(Duration::from_secs(60)),
            "never started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started_after = since.elapsed();
    t.wait_reaches(
        "client",
        "10.96.0.10:80",
        &["10.0.1.2:8080", "10.0.1.3:8080"],
    );
    let mut healthy = 0;
    for _ in 0..50 {
        healthy = get(port + 1, "/healthz").0;
        if healthy == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(a);
    let _ = Command::new("umount").arg(&pins).status();
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "kernel refusal: no bpffs at --bpf-fs-path, mounted later", "mode": "ebpf",
               "start_failures": metric(&m, "kpr_datapath_start_failures_total"),
               "healthz_while_refused": health, "event": "FailedToStartDatapath",
               "started_ms_after_mount": started_after.as_millis(), "healthz_after": healthy})
    );
    assert_eq!(healthy, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroup_v2_at_the_cgroup_path_the_agent_waits_and_says_why() {
    kpr_testnet::require_root();
    let (emu, t, kubeconfig) = kpr_testnet::api_cluster("nocg2").await;
    // A plain directory where the cgroup v2 hierarchy should be mounted.
    let cgroup = t.workdir.join("cgroup");
    std::fs::create_dir_all(&cgroup).expect("dir");
    let port = 19_271;
    let cg = cgroup.display().to_string();
    let mut a = agent(&t, &kubeconfig, port, &["--cgroup-path", &cg]);
    let m = wait_refused(&emu, &mut a, port, &t).await;
    let (health, _) = get(port + 1, "/healthz");
    let note = event_note(&emu);
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "kernel refusal: no cgroup v2 at --cgroup-path", "mode": "ebpf",
               "start_failures": metric(&m, "kpr_datapath_start_failures_total"),
               "healthz_while_refused": health, "event": "FailedToStartDatapath"})
    );
    assert!(note.contains("is not a cgroup v2 directory"), "{note}");
    assert_eq!(health, 503);
    assert!(
        !t.bpffs
            .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION))
            .join("maps")
            .exists()
            || std::fs::read_dir(
                t.bpffs
                    .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION))
            )
            .map(|d| d
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("prog-")))
            .unwrap_or(true),
        "nothing attached"
    );
}
