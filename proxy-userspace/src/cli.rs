//! The `kpr` command line: `run`, `services`, `trace`, `conformance`, `status`, `cleanup`.
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::agent::AgentConfig;
use crate::model::{NodeInfo, ProxyConfig};
use crate::render::ProxyMode;
use crate::render::ebpf::datapath::{PinLayout, TcInterfaces};
use crate::render::ebpf::maps::{FrontendView, view};
use crate::render::ebpf::pinned::PinnedMaps;
use crate::render::ebpf::{DatapathConfig, EbpfConfig};
use crate::source::convert::ProxySelector;
use crate::{Error, Result};

pub const DEFAULT_BPF_FS_PATH: &str = "/sys/fs/bpf/kpr";

/// kpr takes kube-proxy's command line as it is (`kube-proxy --config=... --hostname-override=...`
/// runs the agent); `kpr run ...` is the same, and the other subcommands inspect a node.
#[derive(Debug, Parser)]
#[command(
    name = "kpr",
    version,
    about = "kpr: a kube-proxy replacement with an eBPF datapath",
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand: run the agent (kube-proxy's command line).
    #[command(flatten)]
    pub run: Box<RunArgs>,
}

impl RunArgs {
    /// Reads `--config` (if given) into these settings where the flag was not given on the
    /// command line, and lists what was accepted without being acted on, for the log.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or holds a value kpr cannot use.
    /// The local-traffic detector of `--detect-local-mode` and its interface flag.
    ///
    /// # Errors
    /// An unknown mode, or an interface mode without its interface.
    pub fn local_detector(&self) -> Result<crate::model::LocalDetector> {
        let u = &self.upstream;
        crate::model::LocalDetector::parse(
            u.detect_local_mode.as_deref().unwrap_or(""),
            u.pod_bridge_interface.as_deref(),
            u.pod_interface_name_prefix.as_deref(),
        )
        .map_err(Error::invalid)
    }

    pub fn resolve(&mut self, matches: &clap::ArgMatches) -> Result<Vec<String>> {
        let explicit = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        };
        let mut notes = Vec::new();
        if let Some(path) = self.upstream.config.clone().filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(&path, e).context("reading --config"))?;
            let loaded = crate::config::parse(&text)
                .map_err(|e| e.context(format!("--config {}", path.display())))?;
            for f in &loaded.unknown {
                notes.push(format!(
                    "config field {f} is not a KubeProxyConfiguration field: ignored"
                ));
            }
            notes.extend(crate::config::apply(&loaded.config, self, &explicit)?);
        }
        // A specific --bind-address is the node IP when none was given (upstream's node IP
        // detection starts there).
        if self.node_ip.is_empty()
            && let Ok(ip) = self.upstream.bind_address.parse::<IpAddr>()
            && !ip.is_unspecified()
        {
            self.node_ip = vec![ip];
        }
        self.local_detector()?;
        crate::config::parse_bind("--healthz-bind-address", &self.healthz_bind_address, 10256)?;
        crate::config::parse_bind("--metrics-bind-address", &self.metrics_bind_address, 10249)?;
        notes.extend(self.not_acted_on());
        Ok(notes)
    }

    /// Upstream settings given a non-default value that kpr accepts without acting on.
    #[must_use]
    pub fn not_acted_on(&self) -> Vec<String> {
        let u = &self.upstream;
        let mut out = Vec::new();
        let mut say =
            |what: &str, why: &str| out.push(format!("{what}: accepted, not acted on ({why})"));
        if let Some(g) = &u.feature_gates {
            say(
                &format!("--feature-gates {g}"),
                "kpr's features are not gated",
            );
        }
        if u.vmodule.is_some() {
            say("--vmodule", "kpr has one log level, set by -v or RUST_LOG");
        }
        if u.logging_format != "text" {
            say("--logging-format", "kpr logs text");
        }
        if u.ipvs_sync_period.is_some() || u.ipvs_min_sync_period.is_some() {
            say(
                "--ipvs-sync-period/--ipvs-min-sync-period",
                "use --sync-period/--min-sync-period, which every mode honours",
            );
        }
        if u.iptables_masquerade_bit != 14 {
            say(
                "--iptables-masquerade-bit",
                "the rule modes use upstream's default mark 0x4000",
            );
        }
        if u.iptables_sync_period.is_some() || u.iptables_min_sync_period.is_some() {
            say(
                "--iptables-sync-period/--iptables-min-sync-period",
                "use --sync-period/--min-sync-period, which every mode honours",
            );
        }
        if u.kube_api_qps != 5.0
            || u.kube_api_burst != 10
            || u.kube_api_content_type != "application/vnd.kubernetes.protobuf"
        {
            say(
                "--kube-api-qps/--kube-api-burst/--kube-api-content-type",
                "kpr watches with JSON and has no client-side rate limit",
            );
        }
        if u.profiling {
            say("--profiling", "kpr serves no profiling endpoint");
        }
        if u.show_hidden_metrics_for_version.is_some() {
            say("--show-hidden-metrics-for-version", "kpr hides no metrics");
        }
        if u.config_sync_period != Duration::from_secs(900) {
            say(
                "--config-sync-period",
                "watches are resumed, not resynced; --sync-period re-reads the datapath",
            );
        }
        if u.bind_address_hard_fail {
            say(
                "--bind-address-hard-fail",
                "a failed bind is logged and the datapath keeps running",
            );
        }
        if u.healthz_port.is_some() || u.metrics_port.is_some() || u.proxy_port_range.is_some() {
            say(
                "--healthz-port/--metrics-port/--proxy-port-range",
                "deprecated upstream; use the bind-address flags",
            );
        }
        out
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch the source, program the datapath, keep it in sync.
    Run(Box<RunArgs>),
    /// List the frontends and backends the datapath holds (read from the pinned maps).
    Services {
        #[arg(long, default_value = DEFAULT_BPF_FS_PATH)]
        bpf_fs_path: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check the fixtures of a directory (shared/fixtures/FORMAT.md) against kpr.
    Conformance {
        /// Directory of fixture files.
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = crate::conformance::Level::Model)]
        level: crate::conformance::Level,
        #[arg(long, value_enum, default_value_t = ProxyMode::Ebpf)]
        proxy_mode: ProxyMode,
    },
    /// Where would this packet go? Runs it through the loaded TC programs on a copy of the
    /// live state (BPF_PROG_TEST_RUN) and prints the decision.
    Trace {
        #[arg(long)]
        src: IpAddr,
        #[arg(long, default_value_t = 40000)]
        sport: u16,
        #[arg(long)]
        dst: IpAddr,
        #[arg(long)]
        dport: u16,
        #[arg(long, default_value = "TCP")]
        proto: String,
        #[arg(long, default_value = DEFAULT_BPF_FS_PATH)]
        bpf_fs_path: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Test workloads for netns topologies (servers and clients); used by the conformance
    /// runner and the tests.
    #[command(hide = true)]
    Workload {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remove everything every mode programmed: kpr's pinned programs, links and maps, the
    /// KUBE-* iptables chains and the nftables tables (kpr's and kube-proxy's).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPF_FS_PATH)]
        bpf_fs_path: PathBuf,
        /// Only this mode's state (default: every mode's, kube-proxy's included).
        #[arg(long, value_enum)]
        proxy_mode: Option<ProxyMode>,
    },
    /// What this kernel offers, and which mode `--proxy-mode auto` would pick.
    Status {
        #[arg(long, default_value = "/sys/fs/cgroup")]
        cgroup_path: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A flag given twice takes its last value, as pflag does for kube-proxy (list flags still
/// append).
#[derive(Clone, Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// Directory of Service and EndpointSlice manifests (YAML or JSON), reloaded on change.
    /// Without it kpr watches the API server (--kubeconfig, --master, or in-cluster config).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// kubeconfig file for the API server.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL (overrides the kubeconfig's).
    #[arg(long)]
    pub master: Option<String>,
    /// Which proxy mode renders the Services: "auto" (probe the kernel: ebpf, else nftables,
    /// else iptables), "ebpf", "iptables" or "nftables".
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    pub proxy_mode: ModeArg,
    /// Serve only Services labelled service.kubernetes.io/service-proxy-name=<this>.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// bpffs directory for kpr's pinned maps and links.
    #[arg(long, default_value = DEFAULT_BPF_FS_PATH)]
    pub bpf_fs_path: PathBuf,
    /// cgroup v2 directory the socket programs attach to (its processes and descendants are
    /// load-balanced).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_path: PathBuf,
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// This node's IPs, primary first (NodePorts are served on them).
    #[arg(long, value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    /// Pod CIDRs: traffic from them is pod traffic.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<ipnet::IpNet>,
    /// Backend selection (ebpf mode) for Services without a kpr.io/lb-algorithm annotation:
    /// "random", "maglev" (consistent hashing: every node picks the same backend for a flow),
    /// "round-robin" or "least-conn" (fewest live connections, counted by the datapath).
    #[arg(long, default_value = "random", value_parser = ["random", "maglev", "round-robin", "least-conn"])]
    pub lb_algorithm: String,
    /// The Service CIDRs (kube-apiserver's --service-cluster-ip-range), for the nftables
    /// mode's drop of traffic to unallocated ClusterIPs.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<ipnet::IpNet>,
    /// Node addresses that serve NodePorts: CIDRs, or "primary" (the mode's upstream default
    /// when unset: every node IP; the primary one for nftables).
    #[arg(long, value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Vec<String>,
    /// Serve NodePorts on 127.0.0.1 to the node itself (IPv4; needs route_localnet), as
    /// upstream's iptables mode does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub iptables_localhost_nodeports: bool,
    /// At start, remove what other modes (or kube-proxy) left behind: KUBE-* chains, nftables
    /// tables, kpr's pins. kpr's own flag; tests that run the agent in the host's namespace
    /// turn it off so they never touch the host's tables.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cleanup_other_modes: bool,
    /// ebpf mode: the renderer that serves what eBPF cannot (SCTP frontends): `nftables`
    /// (default) or `none`. kpr's own flag; tests that run the agent in the host's namespace
    /// pass `none` so they never write the host's tables.
    #[arg(long, default_value = "nftables", value_parser = ["nftables", "none"])]
    pub fallback_renderer: String,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub masquerade_all: bool,
    /// Minimum time between syncs (bursts of changes are coalesced), e.g. "1s", "100ms".
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// Interfaces for the TC programs (NodePort, ExternalIPs, LoadBalancer from outside):
    /// "all" (every interface but lo, rescanned), "none", or a comma-separated list.
    #[arg(long, default_value = "all")]
    pub tc_interfaces: String,
    /// healthz server address (/healthz, /livez); "" disables it.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// metrics server address (/metrics, /proxyMode); "" disables it.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// Full resync period.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// ebpf conntrack: idle timeout of an established TCP direction.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// ebpf conntrack: idle timeout of a TCP direction that only sent SYNs.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_syn: Duration,
    /// ebpf conntrack: timeout of a TCP direction after its FIN.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_fin: Duration,
    /// ebpf conntrack: timeout of a TCP flow after a RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close: Duration,
    /// ebpf conntrack: idle timeout of a UDP flow not answered.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// ebpf conntrack: idle timeout of an answered UDP flow.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// ebpf conntrack: entries of the conntrack map (a masqueraded flow takes 4, another 2);
    /// applied when the map is created.
    #[arg(long, default_value_t = proxy_common::map_sizes::CONNTRACK as u32)]
    pub conntrack_max: u32,
    /// ebpf: entries of the services map (one per frontend and scope; the reverse-NAT map
    /// gets half). Applied when the maps are created; pinned maps smaller than this are
    /// grown at start without breaking flows.
    #[arg(long, default_value_t = proxy_common::map_sizes::SERVICES as u32)]
    pub bpf_map_services: u32,
    /// ebpf: entries of the backends map (one per backend address; the slots map gets twice
    /// as many). Applied as --bpf-map-services.
    #[arg(long, default_value_t = proxy_common::map_sizes::BACKENDS as u32)]
    pub bpf_map_backends: u32,
    /// ebpf: when a sync finds the services or backends map full, grow it (doubling, up to
    /// 16 times its configured size) while serving, instead of refusing the Services that do
    /// not fit; also resize pinned maps smaller than configured at start. Off by default: see
    /// the README's known limitations (not on kernels without tcx, before 6.6).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub bpf_map_grow: bool,
    /// ebpf conntrack: how often expired flows are collected.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub conntrack_gc_interval: Duration,
    /// ebpf: ports masqueraded flows leave with, "MIN-MAX". Keep it outside the node's
    /// net.ipv4.ip_local_port_range (default 32768-60999) and any port the node listens on.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub masquerade_port_range: (u16, u16),
    /// ebpf: slots of a Maglev table, a prime well above 100x the backends of a service.
    #[arg(long, default_value_t = proxy_common::MAGLEV_TABLE_SIZE, value_parser = parse_maglev_size)]
    pub maglev_table_size: u32,
    /// Accept a --cgroup-path that is not the node's root cgroup (only processes below it
    /// are load-balanced).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_child_cgroup: bool,
    /// Mount a bpffs of kpr's own when --bpf-fs-path is not on one (the datapath then dies
    /// with the agent's mount namespace).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_private_bpffs: bool,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

/// kube-proxy's other flags: every upstream Linux flag parses, so kubeadm's (or anyone's)
/// command line starts kpr as it is. Those kpr acts on are applied in `agent_config`; the
/// others are reported once at start (`ignored_flags`).
#[derive(Clone, Debug, clap::Args)]
pub struct UpstreamArgs {
    /// kube-proxy's configuration file (KubeProxyConfiguration v1alpha1); flags given on the
    /// command line override it.
    #[arg(long)]
    pub config: Option<String>,
    /// Write the effective configuration to this file and exit.
    #[arg(long)]
    pub write_config_to: Option<String>,
    /// Log verbosity (kube-proxy's klog levels: 0-3 info, 4-5 debug, 6+ trace).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u32,
    /// Per-module verbosity (accepted; kpr has one level).
    #[arg(long)]
    pub vmodule: Option<String>,
    /// Log format: "text" (default) or "json".
    #[arg(long, default_value = "text")]
    pub logging_format: String,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub log_flush_frequency: Duration,
    #[arg(long, hide = true)]
    pub log_text_split_stream: Option<String>,
    #[arg(long, hide = true)]
    pub log_text_info_buffer_size: Option<String>,
    #[arg(long, hide = true)]
    pub log_json_split_stream: Option<String>,
    #[arg(long, hide = true)]
    pub log_json_info_buffer_size: Option<String>,
    /// Feature gates, "Name=true,Other=false" (accepted and reported; kpr's features are not
    /// gated).
    #[arg(long)]
    pub feature_gates: Option<String>,
    /// Remove every proxy mode's state (kpr's and kube-proxy's) and exit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup: bool,
    /// Do the one-time node setup (sysctls, datapath load) and exit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub init_only: bool,
    /// The node's address for node-IP detection (0.0.0.0 / :: = detect from the Node object).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: String,
    /// Exit when the healthz or metrics server cannot bind.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub bind_address_hard_fail: bool,
    /// Resync period of the configuration from the API (informers).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub config_sync_period: Duration,
    /// Conntrack table entries per CPU (rule modes: nf_conntrack_max = max(this x CPUs, min)).
    #[arg(long, default_value_t = 32768)]
    pub conntrack_max_per_core: i32,
    #[arg(long, default_value_t = 131_072)]
    pub conntrack_min: i32,
    /// nf_conntrack_tcp_be_liberal (rule modes).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub conntrack_tcp_be_liberal: bool,
    /// nf_conntrack_tcp_timeout_close_wait (rule modes).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// How local traffic is detected: ClusterCIDR (default with --cluster-cidr), NodeCIDR,
    /// BridgeInterface, InterfaceNamePrefix.
    #[arg(long)]
    pub detect_local_mode: Option<String>,
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// Bit of the packet mark for masquerading (rule modes).
    #[arg(long, default_value_t = 14)]
    pub iptables_masquerade_bit: i32,
    #[arg(long, value_parser = parse_duration)]
    pub iptables_min_sync_period: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    pub iptables_sync_period: Option<Duration>,
    /// IPVS mode: virtual servers in these CIDRs are never removed.
    #[arg(long, value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
    #[arg(long, value_parser = parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,
    #[arg(long)]
    pub ipvs_scheduler: Option<String>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub ipvs_strict_arp: bool,
    #[arg(long, value_parser = parse_duration)]
    pub ipvs_sync_period: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    pub ipvs_tcp_timeout: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    pub ipvs_tcpfin_timeout: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    pub ipvs_udp_timeout: Option<Duration>,
    #[arg(long, default_value_t = 10)]
    pub kube_api_burst: i32,
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
    #[arg(long, default_value_t = 5.0)]
    pub kube_api_qps: f32,
    /// The agent's oom_score_adj (-1000..1000).
    #[arg(long, default_value_t = -999, allow_negative_numbers = true)]
    pub oom_score_adj: i32,
    /// Serve pprof-style profiling (accepted; kpr has none).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub profiling: bool,
    /// Deprecated upstream; accepted.
    #[arg(long)]
    pub proxy_port_range: Option<String>,
    #[arg(long)]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Deprecated upstream (use --healthz-bind-address); accepted.
    #[arg(long, hide = true)]
    pub healthz_port: Option<u16>,
    /// Deprecated upstream (use --metrics-bind-address); accepted.
    #[arg(long, hide = true)]
    pub metrics_port: Option<u16>,
}

/// `--masquerade-port-range`: "MIN-MAX", 1024 <= MIN <= MAX.
///
/// # Errors
/// Not a range of unprivileged ports.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let min: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?}"))?;
    let max: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?}"))?;
    if min < 1024 || max < min {
        return Err(format!("{s:?}: need 1024 <= MIN <= MAX"));
    }
    Ok((min, max))
}

/// `--maglev-table-size`: a prime between 251 and 131071.
///
/// # Errors
/// Not such a prime.
pub fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    let prime = n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
    if !(251..=131_071).contains(&n) || !prime {
        return Err(format!(
            "{n} is not a prime between 251 and 131071 (e.g. 16381, 65521)"
        ));
    }
    Ok(n)
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

/// One `--nodeport-addresses` entry: "primary" or a CIDR.
///
/// # Errors
/// Neither.
pub fn parse_nodeport_address(s: &str) -> Result<String, String> {
    if s == "primary" || s.parse::<ipnet::IpNet>().is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is neither \"primary\" nor a CIDR"))
    }
}

/// `--proxy-mode`: a mode, or `None` for "auto".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeArg(pub Option<ProxyMode>);

/// Parses a `--proxy-mode` ("auto" or "" for auto).
///
/// # Errors
/// Not a mode.
pub fn parse_mode(s: &str) -> Result<ModeArg, String> {
    match s {
        "" | "auto" => Ok(ModeArg(None)),
        other => <ProxyMode as ValueEnum>::from_str(other, true)
            .map(|m| ModeArg(Some(m)))
            .map_err(|_| format!("unknown proxy mode {other:?} (auto, ebpf, iptables, nftables)")),
    }
}

/// Parses a Go duration ("250ms", "5s", "1m", "24h0m0s"; a bare number is seconds).
///
/// # Errors
/// Not one of those forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_go_duration(s)
}

impl RunArgs {
    #[must_use]
    pub fn agent_config(&self) -> AgentConfig {
        let name = self.hostname_override.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_lowercase())
                .unwrap_or_default()
        });
        let selector = ProxySelector {
            service_proxy_name: self.service_proxy_name.clone(),
        };
        let source = match &self.manifests {
            Some(dir) => crate::agent::SourceConfig::Manifests {
                dir: dir.clone(),
                selector,
            },
            None => crate::agent::SourceConfig::Api(crate::source::api::ApiConfig {
                kubeconfig: self.kubeconfig.clone(),
                master: self.master.clone(),
                selector,
                node_name: name.clone(),
            }),
        };
        AgentConfig {
            conntrack_sysctls: crate::sysctl::ConntrackSysctls {
                max_per_core: u32::try_from(self.upstream.conntrack_max_per_core).unwrap_or(0),
                min: u32::try_from(self.upstream.conntrack_min).unwrap_or(0),
                tcp_established: self.conntrack_tcp_timeout_established,
                tcp_close_wait: self.upstream.conntrack_tcp_timeout_close_wait,
                tcp_be_liberal: self.upstream.conntrack_tcp_be_liberal,
                // Upstream leaves the UDP timeouts alone unless set; kpr's defaults (the
                // kernel's, which its own conntrack uses) count as unset.
                udp: if self.conntrack_udp_timeout == Duration::from_secs(30) {
                    Duration::ZERO
                } else {
                    self.conntrack_udp_timeout
                },
                udp_stream: if self.conntrack_udp_timeout_stream == Duration::from_secs(120) {
                    Duration::ZERO
                } else {
                    self.conntrack_udp_timeout_stream
                },
            },
            configz: crate::config::effective_yaml(self),
            source,
            mode: self.proxy_mode.0,
            node_port_addresses_given: !self.nodeport_addresses.is_empty(),
            cleanup_other_modes: self.cleanup_other_modes,
            fallback_renderer: self.fallback_renderer == "nftables",
            ipvs: crate::render::ipvs::IpvsConfig {
                scheduler: self
                    .upstream
                    .ipvs_scheduler
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "rr".into()),
                strict_arp: self.upstream.ipvs_strict_arp,
                exclude_cidrs: self.upstream.ipvs_exclude_cidrs.clone(),
                timeouts: crate::render::ipvs::netlink::Timeouts {
                    tcp: self.upstream.ipvs_tcp_timeout.map_or(0, secs),
                    tcp_fin: self.upstream.ipvs_tcpfin_timeout.map_or(0, secs),
                    udp: self.upstream.ipvs_udp_timeout.map_or(0, secs),
                },
            },
            ebpf: EbpfConfig {
                bpf_fs_path: self.bpf_fs_path.clone(),
                cgroup_path: self.cgroup_path.clone(),
                tc_interfaces: match self.tc_interfaces.as_str() {
                    "all" => TcInterfaces::All,
                    "none" | "" => TcInterfaces::None,
                    list => {
                        TcInterfaces::Named(list.split(',').map(|s| s.trim().to_string()).collect())
                    }
                },
                datapath: DatapathConfig {
                    ct_timeouts: proxy_common::CtTimeouts {
                        tcp_syn: secs(self.conntrack_tcp_timeout_syn),
                        tcp_established: secs(self.conntrack_tcp_timeout_established),
                        tcp_fin: secs(self.conntrack_tcp_timeout_fin),
                        tcp_close: secs(self.conntrack_tcp_timeout_close),
                        udp: secs(self.conntrack_udp_timeout),
                        udp_stream: secs(self.conntrack_udp_timeout_stream),
                    },
                    nat_ports: self.masquerade_port_range,
                    maglev_table_size: self.maglev_table_size,
                    gc_interval: self.conntrack_gc_interval,
                    conntrack_max: self.conntrack_max.max(1024),
                    services_max: self.bpf_map_services.max(16),
                    backends_max: self.bpf_map_backends.max(16),
                    grow_maps: self.bpf_map_grow,
                },
                allow_child_cgroup: self.allow_child_cgroup,
                allow_private_bpffs: self.allow_private_bpffs,
            },
            node: NodeInfo {
                name,
                ips: self.node_ip.clone(),
                ..NodeInfo::default()
            },
            proxy: ProxyConfig {
                cluster_cidrs: self.cluster_cidr.clone(),
                // Checked by `resolve`.
                local_detector: self.local_detector().unwrap_or_default(),
                masquerade_all: self.masquerade_all,
                lb_algorithm: crate::store::LbAlgorithm::parse(&self.lb_algorithm)
                    .unwrap_or_default(),
                service_cidrs: self.service_cidr.clone(),
                // Invalid entries were refused when the flags were parsed.
                node_port_addresses: crate::model::NodePortAddresses::parse(
                    &self.nodeport_addresses,
                )
                .unwrap_or_default(),
                localhost_node_ports: self.iptables_localhost_nodeports,
                ..ProxyConfig::default()
            },
            min_sync_period: self.min_sync_period,
            sync_period: self.sync_period,
            poll_interval: Duration::from_millis(200),
            // Checked by `resolve`.
            healthz_bind: crate::config::parse_bind(
                "--healthz-bind-address",
                &self.healthz_bind_address,
                10256,
            )
            .unwrap_or(None),
            metrics_bind: crate::config::parse_bind(
                "--metrics-bind-address",
                &self.metrics_bind_address,
                10249,
            )
            .unwrap_or(None),
        }
    }
}

/// Reads the frontends from the pinned maps.
///
/// # Errors
/// The maps are not pinned (kpr is not running and never ran) or unreadable.
pub fn read_services(bpf_fs_path: &std::path::Path) -> Result<Vec<FrontendView>> {
    let maps = PinnedMaps::open(&PinLayout::new(bpf_fs_path))?;
    let mut rows = view(&maps.snapshot()?);
    let stats = maps.service_stats()?;
    for r in &mut rows {
        if let Some(s) = stats.get(&r.id) {
            (r.flows, r.packets, r.bytes) = (s.flows, s.packets, s.bytes);
        }
    }
    Ok(rows)
}

/// Renders `kpr services` output.
#[must_use]
pub fn format_table(rows: &[FrontendView]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = rows
        .iter()
        .map(|r| r.frontend.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let _ = writeln!(
        out,
        "{:<w$}  {:<5}  {:<8}  {:>4}  {:<7}  {:<11}  {:>8}  {:>9}  {:>11}  BACKENDS",
        "FRONTEND", "PROTO", "SCOPE", "ID", "VERDICT", "ALGORITHM", "FLOWS", "PACKETS", "BYTES"
    );
    for r in rows {
        let backends = if r.backends.is_empty() {
            "-".to_string()
        } else {
            r.backends.join(", ")
        };
        let _ = writeln!(
            out,
            "{:<w$}  {:<5}  {:<8}  {:>4}  {:<7}  {:<11}  {:>8}  {:>9}  {:>11}  {backends}",
            r.frontend,
            r.protocol,
            r.scope,
            r.id,
            r.verdict,
            r.algorithm,
            r.flows,
            r.packets,
            r.bytes
        );
    }
    out
}

/// Runs a `kpr` command.
///
/// # Errors
/// Whatever the command reports.
pub fn services(bpf_fs_path: &std::path::Path, output: Output) -> Result<String> {
    let rows = read_services(bpf_fs_path)?;
    Ok(match output {
        Output::Table => format_table(&rows),
        Output::Json => {
            serde_json::to_string_pretty(&rows)
                .map_err(|e| Error::decode("kpr services as JSON", e))?
                + "\n"
        }
    })
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    fn mode_of(args: &[&str]) -> Result<Option<ProxyMode>, String> {
        let mut full = vec!["kpr", "run", "--manifests", "/m"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .command
        {
            Some(Command::Run(r)) => Ok(r.agent_config().mode),
            _ => unreachable!("a run command"),
        }
    }

    /// Parses a top-level (kube-proxy style) command line and resolves `--config`.
    fn kube_proxy(args: &[&str]) -> (RunArgs, Vec<String>) {
        let mut full = vec!["kube-proxy"];
        full.extend_from_slice(args);
        let cmd = <Cli as clap::CommandFactory>::command();
        let matches = cmd.try_get_matches_from(full).expect("parses");
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert!(cli.command.is_none(), "top-level flags run the agent");
        let mut run = *cli.run;
        let notes = run.resolve(&matches).expect("resolves");
        (run, notes)
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value_and_lists_append() {
        for prefix in [&[][..], &["run"][..]] {
            let mut full = vec!["kube-proxy"];
            full.extend_from_slice(prefix);
            full.extend_from_slice(&[
                "--metrics-bind-address=",
                "--metrics-bind-address=127.0.0.1:10249",
                "--node-ip=192.0.2.1",
                "--node-ip=192.0.2.2",
                "--manifests=/m",
            ]);
            let cli = <Cli as clap::Parser>::try_parse_from(&full).expect("parses");
            let run = match cli.command {
                Some(Command::Run(r)) => r,
                _ => cli.run,
            };
            assert_eq!(run.metrics_bind_address, "127.0.0.1:10249", "{full:?}");
            assert_eq!(run.node_ip.len(), 2, "{full:?}");
        }
    }

    #[test]
    fn kubeadms_command_line_and_config_start_the_agent() {
        let dir = std::env::temp_dir().join(format!("kpr-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("config.conf");
        std::fs::write(
            &conf,
            crate::config::KUBEADM_EXAMPLE.replace("mode: \"\"", "mode: nftables"),
        )
        .unwrap();
        let conf = conf.to_str().unwrap().to_string();
        let (run, notes) = kube_proxy(&[&format!("--config={conf}"), "--hostname-override=node-a"]);
        assert_eq!(run.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(
            run.kubeconfig.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(
            run.cluster_cidr,
            vec!["10.244.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(
            run.proxy_mode.0,
            Some(ProxyMode::Nftables),
            "mode from the file"
        );
        assert!(
            notes.is_empty(),
            "kubeadm's defaults need no note: {notes:?}"
        );
        // Flags given on the command line win over the file, as upstream.
        let (run, _) = kube_proxy(&[
            &format!("--config={conf}"),
            "--proxy-mode=iptables",
            "--cluster-cidr=10.1.0.0/16",
        ]);
        assert_eq!(run.proxy_mode.0, Some(ProxyMode::Iptables));
        assert_eq!(
            run.cluster_cidr,
            vec!["10.1.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_upstream_flag_parses() {
        let (run, notes) = kube_proxy(&[
            "-v=4",
            "--vmodule=proxier=5",
            "--feature-gates=Foo=true",
            "--bind-address=192.168.0.2",
            "--bind-address-hard-fail=false",
            "--cleanup=false",
            "--cluster-cidr=10.0.0.0/8",
            "--config-sync-period=15m0s",
            "--conntrack-max-per-core=0",
            "--conntrack-min=131072",
            "--conntrack-tcp-be-liberal",
            "--conntrack-tcp-timeout-close-wait=1h0m0s",
            "--conntrack-tcp-timeout-established=24h0m0s",
            "--conntrack-udp-timeout=30s",
            "--conntrack-udp-timeout-stream=2m0s",
            "--detect-local-mode=ClusterCIDR",
            "--healthz-bind-address=0.0.0.0:10256",
            "--hostname-override=n1",
            "--init-only=false",
            "--iptables-localhost-nodeports=true",
            "--iptables-masquerade-bit=14",
            "--iptables-min-sync-period=1s",
            "--iptables-sync-period=30s",
            "--ipvs-exclude-cidrs=10.0.0.0/24",
            "--ipvs-min-sync-period=0s",
            "--ipvs-scheduler=rr",
            "--ipvs-strict-arp=false",
            "--ipvs-sync-period=30s",
            "--ipvs-tcp-timeout=0s",
            "--ipvs-tcpfin-timeout=0s",
            "--ipvs-udp-timeout=0s",
            "--kube-api-burst=10",
            "--kube-api-content-type=application/vnd.kubernetes.protobuf",
            "--kube-api-qps=5",
            "--kubeconfig=/k",
            "--log-flush-frequency=5s",
            "--logging-format=text",
            "--masquerade-all=false",
            "--master=https://10.0.0.1:6443",
            "--metrics-bind-address=127.0.0.1:10249",
            "--nodeport-addresses=primary",
            "--oom-score-adj=-999",
            "--pod-bridge-interface=",
            "--pod-interface-name-prefix=",
            "--profiling=false",
            "--proxy-mode=nftables",
            "--show-hidden-metrics-for-version=",
            "--write-config-to=",
        ]);
        assert_eq!(run.upstream.verbosity, 4);
        assert_eq!(
            run.node_ip,
            vec!["192.168.0.2".parse::<IpAddr>().unwrap()],
            "from --bind-address"
        );
        assert!(
            notes.iter().any(|n| n.contains("--ipvs-sync-period")),
            "{notes:?}"
        );
        assert!(
            !notes.iter().any(|n| n.contains("--ipvs-scheduler")),
            "the ipvs mode acts on its scheduler: {notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("--feature-gates")),
            "{notes:?}"
        );
    }

    #[test]
    fn kpr_run_is_an_alias() {
        assert_eq!(
            mode_of(&["--proxy-mode=iptables"]),
            Ok(Some(ProxyMode::Iptables))
        );
    }

    #[test]
    fn proxy_mode_flag() {
        assert_eq!(mode_of(&[]), Ok(None), "auto by default");
        assert_eq!(mode_of(&["--proxy-mode", "auto"]), Ok(None));
        assert_eq!(
            mode_of(&["--proxy-mode", "nftables"]),
            Ok(Some(ProxyMode::Nftables))
        );
        assert_eq!(
            mode_of(&["--proxy-mode", "iptables"]),
            Ok(Some(ProxyMode::Iptables))
        );
        let err = mode_of(&["--proxy-mode", "userspace"]).expect_err("unknown");
        assert!(err.contains("unknown proxy mode \"userspace\""), "{err}");
    }
}
