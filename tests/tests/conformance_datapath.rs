//! `kpr conformance tests/fixtures --level datapath --proxy-mode MODE`: every fixture flow
//! as real connections through a netns topology per fixture (root). Flows this machine cannot
//! express (SCTP on a kernel without SCTP) are reported as skipped, never as passed.
fn fixtures_pass_on(mode: &str) {
    kpr_testnet::require_root();
    let dir = kpr_testnet::fixtures_dir();
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing",
        dir.display()
    );
    let out = std::process::Command::new(kpr_testnet::kpr_bin())
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

#[test]
fn fixtures_pass_on_the_ebpf_datapath() {
    fixtures_pass_on("ebpf");
}

#[test]
fn fixtures_pass_on_the_iptables_datapath() {
    fixtures_pass_on("iptables");
}

#[test]
fn fixtures_pass_on_the_nftables_datapath() {
    fixtures_pass_on("nftables");
}

/// IPVS needs a kernel with `ip_vs` (this machine's has none): the 6.1 VM runs it
/// (`cargo xtask vm-test` passes `--include-ignored`); here it is reported as ignored.
#[test]
#[ignore = "needs a kernel with IPVS: runs in the 6.1 VM (cargo xtask vm-test)"]
fn fixtures_pass_on_the_ipvs_datapath() {
    fixtures_pass_on("ipvs");
}
