//! The ipvs mode refuses a start it cannot make with a clear error (on every kernel; this
//! binary is not in the VM suite, which loads `ip_vs` only in `ipvs_vm` at its end).
use std::process::Command;

use kpr_testnet::Topology;

/// The ipvs mode refuses a start it cannot make, with a clear error and nothing left behind:
/// without IPVS (this machine), or with IPVS (the VM) an unknown scheduler.
#[test]
fn ipvs_mode_refuses_a_bad_start_with_a_clear_error() {
    kpr_testnet::require_root();
    let (t, dir) = Topology::client_and_two_backends("ipvsno", "");
    // Without IPVS the mode cannot start; with it, an unknown scheduler is refused.
    let (extra, want) = if kpr_testnet::kernel_has_ipvs() {
        (vec!["--ipvs-scheduler", "fastest"], "not an IPVS scheduler")
    } else {
        (vec![], "IPVS")
    };
    let mut args: Vec<&str> = vec![
        "run",
        "--manifests",
        dir.to_str().unwrap(),
        "--proxy-mode",
        "ipvs",
        "--hostname-override",
        "test-node",
        "--node-ip",
        "192.168.0.2",
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
        "--bpf-fs-path",
    ];
    let bpffs = t.bpffs.to_string_lossy().into_owned();
    args.push(&bpffs);
    args.extend(extra);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.node.path().display()))
        .arg(kpr_testnet::kpr_bin())
        .args(&args)
        .output()
        .expect("kpr run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must not start: {err}");
    assert!(err.contains(want), "a clear error naming {want:?}: {err}");
    assert!(
        !t.in_node("ip", &["link"]).contains("kube-ipvs0"),
        "a refused start leaves nothing behind"
    );
}
