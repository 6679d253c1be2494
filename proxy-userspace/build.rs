//! Builds the eBPF object (`proxy-ebpf`, binary `kpr-ebpf`) with the pinned nightly and
//! bpf-linker, so `kpr` can embed it. `AYA_BUILD_SKIP=1` skips that (for tools that only check
//! code); the placeholder written then cannot be loaded.
use std::path::PathBuf;

/// The eBPF toolchain; keep in step with `xtask/src/setup.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-01";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let placeholder = out_dir.join("kpr-ebpf");
        if !placeholder.exists() {
            std::fs::write(&placeholder, [])?;
        }
        println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("workspace root");
    let linker = root.join(".tools/bin/bpf-linker");
    // A missing path makes cargo rerun this script on every build, so the real object is built
    // as soon as `cargo xtask setup` has installed the linker.
    println!("cargo::rerun-if-changed={}", linker.display());
    if !linker.exists() {
        // Building xtask itself (which runs setup) must not need the linker: write an empty
        // placeholder; loading it fails with a clear message (see datapath::load_object).
        println!(
            "cargo::warning=bpf-linker is not installed at {}: the eBPF object is a placeholder until `cargo xtask setup` has run",
            linker.display()
        );
        std::fs::write(out_dir.join("kpr-ebpf"), [])?;
        return Ok(());
    }
    println!(
        "cargo::rerun-if-changed={}",
        root.join("proxy-common/src").display()
    );
    let ebpf_dir = root.join("proxy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir.to_str().expect("UTF-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
