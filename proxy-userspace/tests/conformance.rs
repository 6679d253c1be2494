//! The shared conformance fixtures, at model level, for the ebpf mode (and iptables, whose
//! semantics the model follows). `KPR_FIXTURES` points at another fixture directory.
use std::path::PathBuf;

use kpr::conformance::{Level, ProxyMode, format_report, run_dir};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("KPR_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
        PathBuf::from,
    )
}

#[test]
fn shared_fixtures_pass_at_model_level() {
    let dir = fixtures_dir();
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing",
        dir.display()
    );
    for mode in [ProxyMode::Ebpf, ProxyMode::Iptables] {
        let report = run_dir(&dir, Level::Model, mode).expect("fixtures readable");
        let text = format_report(&report);
        assert!(report.passed() > 0, "no flow was checked:\n{text}");
        assert_eq!(report.failed(), 0, "mode {}:\n{text}", mode.as_str());
    }
}
