//! `cargo xtask test`: builds the binaries the end-to-end tests spawn, runs every test of the
//! workspace, then the VM suite (the ebpf and rule modes' end-to-end tests on Debian 12's 6.1
//! kernel, see `vm.rs`), and closes with one summary line over all of them.
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::setup::root;

/// Counts from cargo's "test result: ok. 5 passed; 0 failed; 0 ignored; ..." lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("the end-to-end tests need root (network namespaces, cgroups, BPF): run as root");
    }
    let status = Command::new("cargo")
        .args(["build", "--workspace", "--bins"])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let mut child = Command::new("cargo")
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    // The same kpr on Debian 12's kernel (6.1: no tcx), in a VM: unless a filter was given
    // or KPR_NO_VM is set.
    let mut vm_ok = true;
    if extra.is_empty() && std::env::var_os("KPR_NO_VM").is_none() {
        println!("\n== the VM suite (cargo xtask vm-test)");
        match crate::vm::run_suite() {
            Ok((out, ok)) => {
                for line in out.lines() {
                    println!("vm: {line}");
                    tally.add_line(line);
                }
                vm_ok = ok;
            }
            Err(e) => {
                println!("vm: {e:#}");
                vm_ok = false;
                tally.failed += 1;
            }
        }
    }
    println!();
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    if !status.success() || tally.failed > 0 || !vm_ok {
        bail!("tests failed");
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
