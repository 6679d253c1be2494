//! `cargo xtask <setup|demo|test>`: everything a fresh machine needs, pinned.
mod bench;
mod demo;
mod reliability;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "kpr developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned eBPF toolchain, bpf-linker and the apt packages kpr uses (idempotent).
    Setup,
    /// Build kpr and show it load-balancing a throwaway network-namespace cluster.
    Demo,
    /// Measure kpr against shared/PERFORMANCE.md's targets (root; prints a report).
    Bench {
        /// Only these parts: tc, programming, modes, connect, rss (default: all).
        parts: Vec<String>,
    },
    /// Run every test (unit, conformance, privileged end-to-end) and print a summary line.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the reliability scenarios with their full budget and write RELIABILITY.md (root).
    Reliability {
        /// The CI-sized variant.
        #[arg(long)]
        quick: bool,
        /// Seconds per API outage (the 10 minutes by default).
        #[arg(long, default_value_t = 600)]
        outage_secs: u64,
    },
    /// Boot Debian's 6.1 kernel under qemu (no network device) and run kpr's tests on it.
    VmTest {
        /// A bash script to run in the VM instead (from the repository root).
        #[arg(long)]
        script: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Cmd::Bench { parts } => {
            setup::ensure()?;
            bench::run(&parts)
        }
        Cmd::Test { args } => {
            setup::ensure()?;
            test::run(&args)
        }
        Cmd::Reliability { quick, outage_secs } => {
            setup::ensure()?;
            reliability::run(quick, outage_secs)
        }
        Cmd::VmTest { script } => {
            setup::ensure()?;
            vm::run(script.as_deref())
        }
    }
}
