//! The `kpr` binary.
use kpr::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    if !matches!(cli.command, None | Some(Command::Run(_))) {
        init_logging(0);
    }
    match cli.command {
        None => run(*cli.run, &matches)?,
        Some(Command::Run(args)) => {
            run(*args, matches.subcommand_matches("run").unwrap_or(&matches))?
        }
        Some(Command::Services {
            bpf_fs_path,
            output,
        }) => {
            print!("{}", kpr::cli::services(&bpf_fs_path, output)?);
        }
        Some(Command::Conformance {
            dir,
            level,
            proxy_mode,
        }) => {
            let report = kpr::conformance::run_dir(&dir, level, proxy_mode)?;
            print!("{}", kpr::conformance::format_report(&report));
            if report.failed() > 0 {
                std::process::exit(1);
            }
        }
        Some(Command::Trace {
            src,
            sport,
            dst,
            dport,
            proto,
            bpf_fs_path,
            output,
        }) => {
            let proto = kpr::model::Protocol::parse(Some(&proto.to_uppercase()))?;
            let r = kpr::render::ebpf::trace::trace(&bpf_fs_path, src, sport, dst, dport, proto)?;
            match output {
                kpr::cli::Output::Table => println!("{}", r.lines.join("\n")),
                kpr::cli::Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
            }
        }
        Some(Command::Workload { args }) => kpr::testnet::workload::run(&args),
        Some(Command::Cleanup {
            bpf_fs_path,
            proxy_mode,
        }) => {
            let report = kpr::agent::cleanup_all(&bpf_fs_path, proxy_mode)?;
            for r in &report.removed {
                println!("removed {r}");
            }
            println!("removed {} objects", report.removed.len());
        }
        Some(Command::Status {
            cgroup_path,
            output,
        }) => {
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
                    for c in &choice.capabilities {
                        println!(
                            "  {:<22} served by {:<8} ({})",
                            c.capability, c.served_by, c.why
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs the agent from kube-proxy's command line (`--config`, `--cleanup`, `--init-only`,
/// `--write-config-to` included).
fn run(mut args: kpr::cli::RunArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let resolved = args.resolve(matches);
    init_logging(args.upstream.verbosity);
    let notes = resolved?;
    for n in &notes {
        tracing::info!("{n}");
    }
    if args.upstream.cleanup {
        let report = kpr::agent::cleanup_all(&args.bpf_fs_path, None)?;
        for r in &report.removed {
            println!("removed {r}");
        }
        println!("removed {} objects", report.removed.len());
        return Ok(());
    }
    if let Some(path) = args
        .upstream
        .write_config_to
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        std::fs::write(path, kpr::config::effective_yaml(&args))?;
        println!("wrote the effective configuration to {path}");
        return Ok(());
    }
    set_oom_score_adj(args.upstream.oom_score_adj);
    let cfg = args.agent_config();
    if args.upstream.init_only {
        kpr::agent::init_only(&cfg)?;
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(kpr::agent::run(cfg))?;
    Ok(())
}

/// `--oom-score-adj` (upstream: -999, so the node's proxy is the last to go).
fn set_oom_score_adj(v: i32) {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", v.to_string()) {
        tracing::warn!("setting oom_score_adj to {v}: {e}");
    }
}

/// Logs to stderr; RUST_LOG wins, else kube-proxy's `-v` level (0-3 info, 4-5 debug, 6+
/// trace).
fn init_logging(verbosity: u32) {
    let level = match verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and `kubectl logs` get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
