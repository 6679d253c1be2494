//! `cargo xtask reliability [--quick]` (root): runs the reliability scenarios and writes
//! `RELIABILITY.md`, one row per scenario with its figure.
//!
//! Each scenario is a test that prints one `KPR-FIGURE {json}` line; the same tests run in CI
//! (in `cargo xtask test`) as their quick variant. This runner gives them their full budget:
//! `KPR_FUZZ_EXECS` executions per fuzz target, `KPR_OUTAGE_SECS` per API outage.
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::setup::root;

/// (cargo package, test target) of every scenario.
const SCENARIOS: [(&str, &str); 9] = [
    ("proxy-userspace", "fuzz_inputs"),
    ("proxy-userspace", "tc_fuzz"),
    ("kpr-tests", "api_faults"),
    ("kpr-tests", "crash_consistency"),
    ("kpr-tests", "reported_failures"),
    ("kpr-tests", "map_limits"),
    ("kpr-tests", "kernel_refusals"),
    ("kpr-tests", "least_privilege"),
    ("kpr-tests", "soak"),
];

/// What the issue asks for that no scenario covers yet (kept honest in the report).
const NOT_YET: [&str; 4] = [
    "The reported failures in the ipvs mode (its kernel is the VM's; the scenarios run in ebpf, iptables and nftables)",
    "A verifier rejection shown by a test (it takes the same retrying start path as a missing bpffs or cgroup v2, which are)",
    "Fuzzing with cargo-fuzz (coverage-guided); the fuzzers here are seeded mutation loops",
    "Out-of-order watch events (the emulator serves events in resourceVersion order only)",
];

struct Figure {
    target: String,
    passed: bool,
    figures: Vec<serde_json::Value>,
}

fn run_target(package: &str, target: &str, env: &[(&str, String)]) -> anyhow::Result<Figure> {
    println!("== {package} {target}");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "-q",
        "-p",
        package,
        "--test",
        target,
        "--",
        "--nocapture",
    ])
    .current_dir(root())
    .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("cargo test")?;
    let mut figures = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(json) = line.split("KPR-FIGURE ").nth(1)
            && let Ok(v) = serde_json::from_str(json)
        {
            figures.push(v);
        }
    }
    let passed = child.wait()?.success();
    Ok(Figure {
        target: target.into(),
        passed,
        figures,
    })
}

fn cell(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "scenario")
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

pub fn run(quick: bool, outage_secs: u64) -> anyhow::Result<()> {
    kpr_testnet::require_root();
    let status = Command::new("cargo")
        .args(["build", "--workspace", "--bins"])
        .current_dir(root())
        .status()?;
    anyhow::ensure!(status.success(), "cargo build failed");
    let execs = if quick { "3000" } else { "300000" }.to_string();
    let outage = if quick { 3 } else { outage_secs }.to_string();
    let iters = if quick { "4" } else { "40" }.to_string();
    let soak_services = if quick { "300" } else { "10000" }.to_string();
    let soak_secs = if quick { "15" } else { "120" }.to_string();
    let env = [
        ("KPR_FUZZ_EXECS", execs.clone()),
        ("KPR_OUTAGE_SECS", outage.clone()),
        ("KPR_CRASH_ITERS", iters),
        ("KPR_SOAK_SERVICES", soak_services),
        ("KPR_SOAK_SECS", soak_secs),
    ];
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    for (package, target) in SCENARIOS {
        results.push(run_target(package, target, &env)?);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Reliability (`cargo xtask reliability{}`)\n",
        if quick { " --quick" } else { "" }
    );
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let _ = writeln!(
        md,
        "Run {date} on Linux {kernel}, {cpus} CPUs, as root, in {:.0} s: {execs} executions per fuzz target, {outage} s per API outage. \
         Each row is one scenario's test (its quick variant runs in CI with `cargo xtask test`); the figure is what the test printed.\n",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(md, "| scenario | figure | result |\n|---|---|---|");
    for r in &results {
        if r.figures.is_empty() {
            let _ = writeln!(
                md,
                "| `{}` | (no figure printed) | {} |",
                r.target,
                if r.passed { "pass" } else { "**FAIL**" }
            );
        }
        for f in &r.figures {
            let _ = writeln!(
                md,
                "| {} (`{}`) | {} | {} |",
                f["scenario"].as_str().unwrap_or(&r.target),
                r.target,
                cell(f),
                if r.passed { "pass" } else { "**FAIL**" }
            );
        }
    }
    let _ = writeln!(md, "\n## Not covered yet (issue 13)\n");
    for n in NOT_YET {
        let _ = writeln!(md, "- {n}");
    }
    std::fs::write(root().join("RELIABILITY.md"), &md)?;
    println!("\nwrote RELIABILITY.md");
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.target.as_str())
        .collect();
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {failed:?}");
    Ok(())
}
