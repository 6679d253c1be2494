//! `kpr conformance tests/fixtures --level datapath --proxy-mode ebpf`: every fixture flow
//! as real connections through a netns topology per fixture (root). Flows this machine cannot
//! express (SCTP on a kernel without SCTP) are reported as skipped, never as passed.
#[test]
fn shared_fixtures_pass_on_the_ebpf_datapath() {
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
        .args(["--level", "datapath", "--proxy-mode", "ebpf"])
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
