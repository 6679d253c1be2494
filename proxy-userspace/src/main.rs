//! The `kpr` binary.
use clap::Parser as _;
use kpr::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and `kubectl logs` get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let cfg = args.agent_config();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(kpr::agent::run(cfg))?;
        }
        Command::Services {
            bpf_fs_path,
            output,
        } => {
            print!("{}", kpr::cli::services(&bpf_fs_path, output)?);
        }
        Command::Conformance {
            dir,
            level,
            proxy_mode,
        } => {
            let report = kpr::conformance::run_dir(&dir, level, proxy_mode)?;
            print!("{}", kpr::conformance::format_report(&report));
            if report.failed() > 0 {
                std::process::exit(1);
            }
        }
        Command::Trace {
            src,
            sport,
            dst,
            dport,
            proto,
            bpf_fs_path,
            output,
        } => {
            let proto = kpr::model::Protocol::parse(Some(&proto.to_uppercase()))?;
            let r = kpr::render::ebpf::trace::trace(&bpf_fs_path, src, sport, dst, dport, proto)?;
            match output {
                kpr::cli::Output::Table => println!("{}", r.lines.join("\n")),
                kpr::cli::Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
            }
        }
        Command::Workload { args } => kpr::testnet::workload::run(&args),
        Command::Cleanup {
            bpf_fs_path,
            proxy_mode,
        } => {
            let report = kpr::agent::cleanup_all(&bpf_fs_path, proxy_mode)?;
            for r in &report.removed {
                println!("removed {r}");
            }
            println!("removed {} objects", report.removed.len());
        }
        Command::Status {
            cgroup_path,
            output,
        } => {
            let choice = kpr::render::probe::choose(None, &cgroup_path);
            match output {
                kpr::cli::Output::Json => println!("{}", serde_json::to_string_pretty(&choice)?),
                kpr::cli::Output::Table => {
                    for c in &choice.checks {
                        println!(
                            "{:<4} {} (since {}){}",
                            if c.ok { "ok" } else { "MISS" },
                            c.feature,
                            c.since,
                            if c.ok || c.detail == "no" {
                                String::new()
                            } else {
                                format!(": {}", c.detail)
                            }
                        );
                    }
                    println!("auto picks: {} ({})", choice.mode, choice.reason);
                }
            }
        }
    }
    Ok(())
}
