//! Installs what building and testing kpr needs, at pinned versions, without touching
//! anything global but apt packages and rustup toolchains:
//! - the eBPF toolchain `EBPF_TOOLCHAIN` with rust-src (aya-build compiles core for bpfel),
//! - bpf-linker `BPF_LINKER_VERSION` built against that nightly's own libLLVM, into `.tools/`,
//! - Debian packages: iproute2 (netns, veth), bpftool (map dumps in tests), util-linux,
//!   iptables and nftables (the fallback modes and their tests); for the VM tests
//!   (`cargo xtask vm-test`), qemu-system-x86, busybox-static and Debian 12's kernel
//!   (linux-image-amd64, 6.1).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Keep in step with `proxy-userspace/build.rs`.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-10-01";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The userspace toolchain (also in rust-toolchain.toml); bpf-linker is built with it.
pub const USER_TOOLCHAIN: &str = "1.99.0";
const APT_PACKAGES: [(&str, &str); 9] = [
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("iptables-nft-restore", "iptables"),
    ("nft", "nftables"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    // The ipvs mode's ipsets; ipvsadm lets its tests (and operators) read IPVS independently.
    ("ipset", "ipset"),
    ("ipvsadm", "ipvsadm"),
];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn linker_path() -> PathBuf {
    root().join(".tools/bin/bpf-linker")
}

fn ebpf_toolchain_ready() -> bool {
    Command::new("rustc")
        .args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").exists())
}

fn linker_ready() -> bool {
    Command::new(linker_path())
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = APT_PACKAGES
        .iter()
        .filter(|(cmd, _)| !has_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if crate::vm::find_kernel().is_none() {
        missing.push("linux-image-amd64");
    }
    missing
}

/// Runs setup only when something is missing.
pub fn ensure() -> anyhow::Result<()> {
    if ebpf_toolchain_ready() && linker_ready() && missing_packages().is_empty() {
        return Ok(());
    }
    run_setup()
}

pub fn run() -> anyhow::Result<()> {
    run_setup()
}

fn run_setup() -> anyhow::Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !ebpf_toolchain_ready() {
        eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src");
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    if !linker_ready() {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against {EBPF_TOOLCHAIN}'s LLVM"
        );
        let out = Command::new("rustc")
            .args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"])
            .output()?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let lib = std::fs::read_dir(sysroot.join("lib"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
            .context("no libLLVM.so.*-rust-* in the nightly's sysroot")?;
        let tools = root().join(".tools");
        let prefix = tools.join("llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        for name in ["libLLVM.so", lib.as_str()] {
            let link = prefix.join("lib").join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(sysroot.join("lib").join(&lib), &link)?;
        }
        exec(
            Command::new("cargo")
                .args([
                    &format!("+{USER_TOOLCHAIN}"),
                    "install",
                    "--locked",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--root",
                ])
                .arg(&tools)
                .env("LLVM_PREFIX", &prefix)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO_TARGET_DIR"),
        )?;
        if !linker_ready() {
            bail!(
                "bpf-linker was built but `{} --version` does not run",
                linker_path().display()
            );
        }
    }
    eprintln!("setup: ready ({EBPF_TOOLCHAIN}, bpf-linker {BPF_LINKER_VERSION})");
    Ok(())
}
