//! The conformance fixtures (`tests/fixtures`, a copy of the team's shared set) at model level,
//! for every mode the model serves (ebpf, iptables, nftables with its own defaults and
//! overrides). `KPR_FIXTURES` points at another fixture directory.
use kpr::conformance::{Level, format_report, run_dir};
use kpr::render::ProxyMode;

#[test]
fn shared_fixtures_pass_at_model_level() {
    let dir = kpr_testnet::fixtures_dir();
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing",
        dir.display()
    );
    for mode in [ProxyMode::Ebpf, ProxyMode::Iptables, ProxyMode::Nftables] {
        let report = run_dir(&dir, Level::Model, mode).expect("fixtures readable");
        let text = format_report(&report);
        assert!(report.passed() > 0, "no flow was checked:\n{text}");
        assert_eq!(report.failed(), 0, "mode {}:\n{text}", mode.as_str());
    }
}
