//! Test support: the netns harness (re-exported from `kpr::testnet`, which the conformance
//! runner uses too) and the Kubernetes API server emulator.
pub mod emulator;

pub use kpr::testnet::*;

/// The conformance fixtures the tests run: `KPR_FIXTURES`, else the copy in this repository
/// (`tests/fixtures`, the format of `tests/fixtures/FORMAT.md`).
#[must_use]
pub fn fixtures_dir() -> std::path::PathBuf {
    std::env::var_os("KPR_FIXTURES").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        std::path::PathBuf::from,
    )
}

/// The API tests' cluster: the emulator serving Service `default/web` 10.96.0.10:80 with
/// endpoints 10.0.1.2 and 10.0.1.3 (:8080) and Node `test-node`; a topology with a client
/// pod 10.0.0.2 and the two backends serving; the kubeconfig pointing at the emulator.
pub async fn api_cluster(tag: &str) -> (emulator::Emulator, Topology, std::path::PathBuf) {
    use emulator::{Emulator, endpoint_slice, node, service};
    let emu = Emulator::start().await;
    emu.apply(service(
        "default",
        "web",
        "10.96.0.10",
        80,
        serde_json::json!({}),
    ));
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2", "10.0.1.3"],
        8080,
    ));
    emu.apply(node("test-node", "192.168.0.2", "zone-a"));
    let mut t = Topology::new(tag);
    t.add_pod("client", std::net::Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("b0", std::net::Ipv4Addr::new(10, 0, 1, 2));
    t.add_pod("b1", std::net::Ipv4Addr::new(10, 0, 1, 3));
    t.serve("b0", &[8080]);
    t.serve("b1", &[8080]);
    let kubeconfig = t.workdir.join("kubeconfig");
    emu.write_kubeconfig(&kubeconfig);
    (emu, t, kubeconfig)
}

/// Starts `kpr run --kubeconfig` (resync every second), logging to `<workdir>/agent-<n>.log`.
#[must_use]
pub fn start_api_agent(t: &Topology, kubeconfig: &std::path::Path, n: &str) -> ChildGuard {
    let log = std::fs::File::create(t.workdir.join(format!("agent-{n}.log"))).expect("log");
    ChildGuard(
        t.agent_command_api(kubeconfig, &["--sync-period", "1s"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn kpr"),
    )
}

/// `kpr conformance <fixtures> --level datapath --proxy-mode MODE` passes: every flow passed
/// or was skipped with its reason, and at least one was checked (root).
pub fn conformance_datapath_passes(mode: &str) {
    require_root();
    let dir = fixtures_dir();
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing",
        dir.display()
    );
    let out = std::process::Command::new(kpr_bin())
        .arg("conformance")
        .arg(&dir)
        .args(["--level", "datapath", "--proxy-mode", mode])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kpr conformance");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "conformance failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    let passed: usize = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed > 0, "no flow was checked: {summary}");
    // Anything skipped must say why.
    for line in text.lines().filter(|l| l.starts_with("SKIP")) {
        assert!(line.contains("skipped: "), "{line}");
    }
}

/// Whether this kernel has IPVS (loading `ip_vs` where modules load).
#[must_use]
pub fn kernel_has_ipvs() -> bool {
    let _ = std::process::Command::new("modprobe").arg("ip_vs").output();
    std::path::Path::new("/proc/net/ip_vs").exists()
}

/// A long-running client and the thread collecting its JSON lines.
pub type CollectedLines = (
    std::process::Child,
    std::thread::JoinHandle<Vec<serde_json::Value>>,
);

/// Collects a spawned client's JSON lines (stdout piped) on a thread, so it can be stopped
/// later with [`stop_json_lines`].
#[must_use]
pub fn collect_json_lines(mut child: std::process::Child) -> CollectedLines {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("piped stdout");
    let h = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .collect()
    });
    (child, h)
}

/// Kills the client and returns the lines it printed.
#[must_use]
pub fn stop_json_lines(c: CollectedLines) -> Vec<serde_json::Value> {
    let (mut child, h) = c;
    let _ = child.kill();
    let _ = child.wait();
    h.join().expect("reader")
}
