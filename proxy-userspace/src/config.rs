//! kube-proxy's configuration file: `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), as kubeadm writes it into the `kube-proxy` ConfigMap
//! and passes with `--config`.
//!
//! Every upstream field is parsed (a typo'd or newer field is reported and ignored, never
//! fatal: a node proxy that crash-loops takes the node's Services with it). The fields kpr acts
//! on are applied to the command line's settings unless that flag was given explicitly
//! (upstream: flags override the file); the others are logged once, with the reason. kpr's own
//! settings live under a top-level `kpr:` section.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A Go `time.Duration` as kube-proxy's config carries it ("24h0m0s", "1s", "250ms").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_go_duration(&s)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a Go duration: a sequence of decimal numbers with units (h, m, s, ms, us/µs, ns),
/// e.g. "24h0m0s", "1.5s", "100ms"; "0" alone is zero; a bare number means seconds (kpr's
/// flags have always taken "30" as 30 s).
///
/// # Errors
/// Anything else.
pub fn parse_go_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if let Ok(secs) = s.parse::<f64>()
        && secs >= 0.0
    {
        return Ok(Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("duration {s:?} lacks a unit"))?;
        let (num, tail) = rest.split_at(num_len);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("bad number in duration {s:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => {
                return Err(format!(
                    "bad unit {unit:?} in duration {s:?} (h, m, s, ms, us, ns)"
                ));
            }
        };
        total += n * scale;
        rest = next;
    }
    Ok(Duration::from_secs_f64(total))
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<String>,
    pub flush_frequency: Option<serde_json::Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<serde_json::Value>,
    pub options: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Iptables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    /// Newest releases: SNAT to the node's InternalIP (accepted, reported).
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ipvs {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Nftables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Winkernel {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

/// kpr's own settings (a top-level `kpr:` section; each has a flag of the same name).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KprSection {
    pub bpf_fs_path: Option<String>,
    pub cgroup_path: Option<String>,
    pub tc_interfaces: Option<String>,
    pub lb_algorithm: Option<String>,
    pub maglev_table_size: Option<u32>,
    pub masquerade_port_range: Option<String>,
    pub conntrack_max: Option<u32>,
    pub conntrack_gc_interval: Option<GoDuration>,
    pub conntrack_tcp_timeout_syn: Option<GoDuration>,
    pub conntrack_tcp_timeout_fin: Option<GoDuration>,
    pub conntrack_tcp_timeout_close: Option<GoDuration>,
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: Option<Vec<String>>,
    pub cleanup_other_modes: Option<bool>,
}

/// `KubeProxyConfiguration`, every field of v1alpha1 (optional: absent means "not set").
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<Iptables>,
    pub ipvs: Option<Ipvs>,
    pub nftables: Option<Nftables>,
    pub winkernel: Option<Winkernel>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Newer releases (1.33+) carry the sync periods at the top level too.
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    /// kpr's own settings.
    pub kpr: Option<KprSection>,
}

/// A parsed file and what did not fit the schema.
#[derive(Debug)]
pub struct Loaded {
    pub config: KubeProxyConfiguration,
    /// Dotted paths of fields the schema does not know (reported, ignored).
    pub unknown: Vec<String>,
}

/// Parses a KubeProxyConfiguration (YAML or JSON).
///
/// # Errors
/// Not YAML, not a mapping, another kind or apiVersion, or a field of the wrong type (a
/// clear message naming the field).
pub fn parse(text: &str) -> Result<Loaded> {
    let value: serde_norway::Value = serde_norway::from_str(text)
        .map_err(|e| Error::decode("the kube-proxy configuration (YAML)", e))?;
    if !value.is_mapping() {
        return Err(Error::invalid(
            "the kube-proxy configuration is not a YAML mapping",
        ));
    }
    let mut unknown = Vec::new();
    let de = serde_norway::Value::clone(&value);
    let config: KubeProxyConfiguration = serde_ignored::deserialize(de, |path| {
        // serde_ignored marks each Option level with "?": the field path is the rest.
        unknown.push(path.to_string().replace(".?", "").replace("?.", ""));
    })
    .map_err(|e| Error::decode("the kube-proxy configuration", e))?;
    if let Some(k) = &config.kind
        && k != KIND
    {
        return Err(Error::invalid(format!(
            "the configuration's kind is {k:?}, expected {KIND:?}"
        )));
    }
    if let Some(v) = &config.api_version
        && v != API_VERSION
    {
        return Err(Error::invalid(format!(
            "the configuration's apiVersion is {v:?}, expected {API_VERSION:?}"
        )));
    }
    Ok(Loaded { config, unknown })
}

/// What kubeadm (v1.31) writes into the kube-proxy ConfigMap's `config.conf`.
pub const KUBEADM_EXAMPLE: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: \"\"
  burst: 0
  contentType: \"\"
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: \"\"
  interfaceNamePrefix: \"\"
detectLocalMode: \"\"
enableProfiling: false
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: \"\"
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: \"0\"
    text:
      infoBufferSize: \"0\"
  verbosity: 0
metricsBindAddress: \"\"
mode: \"\"
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: \"\"
showHiddenMetricsForVersion: \"\"
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: \"\"
  rootHnsEndpointName: \"\"
  sourceVip: \"\"
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses_in_every_form_kube_proxy_takes() {
        let p = |v| parse_bind("--healthz-bind-address", v, 10256).unwrap();
        assert_eq!(p(""), None);
        assert_eq!(p("0.0.0.0:10256"), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(p(":10256"), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(p("0.0.0.0"), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(p("::"), Some("[::]:10256".parse().unwrap()));
        assert_eq!(p("[::1]:9"), Some("[::1]:9".parse().unwrap()));
        assert_eq!(p("192.168.0.2"), Some("192.168.0.2:10256".parse().unwrap()));
        let e = parse_bind("--healthz-bind-address", "node:80", 10256).unwrap_err();
        assert!(e.to_string().contains("--healthz-bind-address"), "{e}");
    }
    const KUBEADM: &str = KUBEADM_EXAMPLE;

    #[test]
    fn kubeadms_file_parses_with_nothing_unknown() {
        let l = parse(KUBEADM).expect("kubeadm's config parses");
        assert!(l.unknown.is_empty(), "{:?}", l.unknown);
        let c = l.config;
        assert_eq!(
            c.client_connection.unwrap().kubeconfig.as_deref(),
            Some("/var/lib/kube-proxy/kubeconfig.conf")
        );
        assert_eq!(c.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(c.mode.as_deref(), Some(""));
        assert_eq!(
            c.conntrack.unwrap().udp_timeout,
            Some(GoDuration(Duration::ZERO))
        );
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal_and_bad_types_are() {
        let l = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nfutureThing: 1\nconntrack: {tcpEstablishedTimeout: 2h30m, sparkle: true}\n",
        )
        .unwrap();
        assert_eq!(l.unknown, vec!["futureThing", "conntrack.sparkle"]);
        assert_eq!(
            l.config.conntrack.unwrap().tcp_established_timeout,
            Some(GoDuration(Duration::from_secs(9000)))
        );
        let e = parse("kind: KubeProxyConfiguration\nconntrack: {udpTimeout: soon}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("udpTimeout") || e.contains("duration"), "{e}");
        let e = parse("kind: Pod\n").unwrap_err().to_string();
        assert!(e.contains("expected \"KubeProxyConfiguration\""), "{e}");
    }

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration(s).unwrap();
        assert_eq!(d("24h0m0s"), Duration::from_secs(86_400));
        assert_eq!(d("1h0m0s"), Duration::from_secs(3600));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("0s"), Duration::ZERO);
        assert_eq!(d("0"), Duration::ZERO);
        assert_eq!(d("30"), Duration::from_secs(30));
        assert!(parse_go_duration("5 parsecs").is_err());
        assert!(parse_go_duration("").is_err());
    }
}

/// Fills `args` from the file where the flag was not given on the command line (`explicit`
/// says which were), as upstream does. Returns what was noted along the way (fields kpr
/// accepts without acting on them), for the log.
///
/// # Errors
/// A field kpr acts on holds a value it cannot use (a malformed CIDR, say).
pub fn apply(
    cfg: &KubeProxyConfiguration,
    a: &mut crate::cli::RunArgs,
    explicit: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    use crate::cli::{parse_mode, parse_nodeport_address, parse_port_range};
    let mut notes = Vec::new();
    let set = |id: &str| !explicit(id);
    let nonempty = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let nonzero = |d: Option<GoDuration>| d.map(|d| d.0).filter(|d| !d.is_zero());
    let bad = |field: &str, e: String| Error::invalid(format!("config field {field}: {e}"));

    if let Some(v) = nonempty(&cfg.hostname_override)
        && set("hostname_override")
    {
        a.hostname_override = Some(v);
    }
    if let Some(cc) = &cfg.client_connection {
        if let Some(k) = nonempty(&cc.kubeconfig)
            && set("kubeconfig")
        {
            a.kubeconfig = Some(k.into());
        }
        if let Some(q) = cc.qps.filter(|q| *q > 0.0)
            && set("kube_api_qps")
        {
            #[expect(clippy::cast_possible_truncation, reason = "a small rate")]
            let q = q as f32;
            a.upstream.kube_api_qps = q;
        }
        if let Some(b) = cc.burst.filter(|b| *b > 0)
            && set("kube_api_burst")
        {
            a.upstream.kube_api_burst = b;
        }
        if let Some(c) = nonempty(&cc.content_type)
            && set("kube_api_content_type")
        {
            a.upstream.kube_api_content_type = c;
        }
    }
    if let Some(v) = nonempty(&cfg.bind_address)
        && set("bind_address")
    {
        a.upstream.bind_address = v;
    }
    if let Some(v) = nonempty(&cfg.healthz_bind_address)
        && set("healthz_bind_address")
    {
        a.healthz_bind_address = bind_with_port(&v, 10256);
    }
    if let Some(v) = nonempty(&cfg.metrics_bind_address)
        && set("metrics_bind_address")
    {
        a.metrics_bind_address = bind_with_port(&v, 10249);
    }
    if let Some(v) = cfg.bind_address_hard_fail
        && set("bind_address_hard_fail")
    {
        a.upstream.bind_address_hard_fail = v;
    }
    if let Some(m) = nonempty(&cfg.mode)
        && set("proxy_mode")
    {
        if m == "kernelspace" {
            notes.push(format!(
                "mode {m:?} is not available in this kpr build: the mode is chosen by probing (auto)"
            ));
        } else {
            a.proxy_mode = parse_mode(&m).map_err(|e| bad("mode", e))?;
        }
    }
    let ipt = cfg.iptables.clone().unwrap_or_default();
    let nft = cfg.nftables.clone().unwrap_or_default();
    if (ipt.masquerade_all == Some(true) || nft.masquerade_all == Some(true))
        && set("masquerade_all")
    {
        a.masquerade_all = true;
    }
    if let Some(v) = ipt.localhost_node_ports
        && set("iptables_localhost_nodeports")
    {
        a.iptables_localhost_nodeports = v;
    }
    if let Some(bit) = ipt.masquerade_bit.or(nft.masquerade_bit)
        && set("iptables_masquerade_bit")
    {
        a.upstream.iptables_masquerade_bit = bit;
    }
    // Sync periods: the top-level fields (1.33+), else the mode's own block.
    let sync = nonzero(cfg.sync_period)
        .or(nonzero(ipt.sync_period))
        .or(nonzero(nft.sync_period));
    let min_sync = nonzero(cfg.min_sync_period)
        .or(nonzero(ipt.min_sync_period))
        .or(nonzero(nft.min_sync_period));
    if let Some(d) = sync
        && set("sync_period")
    {
        a.sync_period = d;
    }
    if let Some(d) = min_sync
        && set("min_sync_period")
    {
        a.min_sync_period = d;
    }
    if let Some(ipvs) = &cfg.ipvs {
        if let Some(s) = nonempty(&ipvs.scheduler)
            && set("ipvs_scheduler")
        {
            a.upstream.ipvs_scheduler = Some(s);
        }
        if ipvs.strict_arp == Some(true) && set("ipvs_strict_arp") {
            a.upstream.ipvs_strict_arp = true;
        }
        if let Some(cidrs) = &ipvs.exclude_cidrs
            && set("ipvs_exclude_cidrs")
        {
            a.upstream.ipvs_exclude_cidrs = cidrs
                .iter()
                .filter(|c| !c.is_empty())
                .map(|c| {
                    c.parse()
                        .map_err(|e| bad("ipvs.excludeCIDRs", format!("{c:?}: {e}")))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(d) = nonzero(ipvs.tcp_timeout)
            && set("ipvs_tcp_timeout")
        {
            a.upstream.ipvs_tcp_timeout = Some(d);
        }
        if let Some(d) = nonzero(ipvs.tcp_fin_timeout)
            && set("ipvs_tcpfin_timeout")
        {
            a.upstream.ipvs_tcpfin_timeout = Some(d);
        }
        if let Some(d) = nonzero(ipvs.udp_timeout)
            && set("ipvs_udp_timeout")
        {
            a.upstream.ipvs_udp_timeout = Some(d);
        }
        if a.proxy_mode.0 == Some(crate::render::ProxyMode::Ipvs) {
            if let Some(d) = nonzero(ipvs.sync_period)
                && set("sync_period")
                && nonzero(cfg.sync_period).is_none()
            {
                a.sync_period = d;
            }
            if let Some(d) = nonzero(ipvs.min_sync_period)
                && set("min_sync_period")
                && nonzero(cfg.min_sync_period).is_none()
            {
                a.min_sync_period = d;
            }
        }
    }
    if let Some(v) = nonempty(&cfg.detect_local_mode)
        && set("detect_local_mode")
    {
        a.upstream.detect_local_mode = Some(v);
    }
    if let Some(d) = &cfg.detect_local {
        if let Some(v) = nonempty(&d.bridge_interface) {
            a.upstream.pod_bridge_interface = Some(v);
        }
        if let Some(v) = nonempty(&d.interface_name_prefix) {
            a.upstream.pod_interface_name_prefix = Some(v);
        }
    }
    if let Some(v) = nonempty(&cfg.cluster_cidr)
        && set("cluster_cidr")
    {
        a.cluster_cidr = v
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .map_err(|e| bad("clusterCIDR", format!("{c:?}: {e}")))
            })
            .collect::<Result<_>>()?;
    }
    if let Some(list) = &cfg.node_port_addresses
        && !list.is_empty()
        && set("nodeport_addresses")
    {
        a.nodeport_addresses = list
            .iter()
            .map(|s| parse_nodeport_address(s).map_err(|e| bad("nodePortAddresses", e)))
            .collect::<Result<_>>()?;
    }
    if let Some(v) = cfg.oom_score_adj
        && set("oom_score_adj")
    {
        a.upstream.oom_score_adj = v;
    }
    if let Some(ct) = &cfg.conntrack {
        if let Some(v) = ct.max_per_core
            && set("conntrack_max_per_core")
        {
            a.upstream.conntrack_max_per_core = v;
        }
        if let Some(v) = ct.min
            && set("conntrack_min")
        {
            a.upstream.conntrack_min = v;
        }
        if let Some(d) = nonzero(ct.tcp_established_timeout)
            && set("conntrack_tcp_timeout_established")
        {
            a.conntrack_tcp_timeout_established = d;
        }
        if let Some(d) = nonzero(ct.tcp_close_wait_timeout)
            && set("conntrack_tcp_timeout_close_wait")
        {
            a.upstream.conntrack_tcp_timeout_close_wait = d;
        }
        if let Some(v) = ct.tcp_be_liberal
            && set("conntrack_tcp_be_liberal")
        {
            a.upstream.conntrack_tcp_be_liberal = v;
        }
        if let Some(d) = nonzero(ct.udp_timeout)
            && set("conntrack_udp_timeout")
        {
            a.conntrack_udp_timeout = d;
        }
        if let Some(d) = nonzero(ct.udp_stream_timeout)
            && set("conntrack_udp_timeout_stream")
        {
            a.conntrack_udp_timeout_stream = d;
        }
    }
    if let Some(d) = nonzero(cfg.config_sync_period)
        && set("config_sync_period")
    {
        a.upstream.config_sync_period = d;
    }
    if let Some(l) = &cfg.logging {
        if let Some(v) = l.verbosity
            && set("verbosity")
        {
            a.upstream.verbosity = v;
        }
        if let Some(f) = nonempty(&l.format)
            && set("logging_format")
        {
            a.upstream.logging_format = f;
        }
    }
    if let Some(g) = &cfg.feature_gates
        && !g.is_empty()
        && set("feature_gates")
    {
        a.upstream.feature_gates = Some(
            g.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if cfg.enable_profiling == Some(true) && set("profiling") {
        a.upstream.profiling = true;
    }
    if let Some(v) = nonempty(&cfg.show_hidden_metrics_for_version) {
        a.upstream.show_hidden_metrics_for_version = Some(v);
    }
    if nonempty(&cfg.port_range).is_some() {
        notes.push("portRange is deprecated upstream and ignored".into());
    }
    if cfg
        .winkernel
        .as_ref()
        .is_some_and(|w| *w != Winkernel::default() && w.enable_dsr == Some(true))
        || cfg.windows_run_as_service == Some(true)
    {
        notes.push("winkernel and windowsRunAsService apply to Windows nodes only".into());
    }
    if let Some(k) = &cfg.kpr {
        if let Some(v) = &k.bpf_fs_path
            && set("bpf_fs_path")
        {
            a.bpf_fs_path = v.into();
        }
        if let Some(v) = &k.cgroup_path
            && set("cgroup_path")
        {
            a.cgroup_path = v.into();
        }
        if let Some(v) = &k.tc_interfaces
            && set("tc_interfaces")
        {
            a.tc_interfaces.clone_from(v);
        }
        if let Some(v) = &k.lb_algorithm
            && set("lb_algorithm")
        {
            if crate::store::LbAlgorithm::parse(v).is_none() {
                return Err(bad(
                    "kpr.lbAlgorithm",
                    format!("{v:?} is not one of {:?}", crate::store::LbAlgorithm::NAMES),
                ));
            }
            a.lb_algorithm.clone_from(v);
        }
        if let Some(v) = k.maglev_table_size
            && set("maglev_table_size")
        {
            a.maglev_table_size = crate::cli::parse_maglev_size(&v.to_string())
                .map_err(|e| bad("kpr.maglevTableSize", e))?;
        }
        if let Some(v) = &k.masquerade_port_range
            && set("masquerade_port_range")
        {
            a.masquerade_port_range =
                parse_port_range(v).map_err(|e| bad("kpr.masqueradePortRange", e))?;
        }
        if let Some(v) = k.conntrack_max
            && set("conntrack_max")
        {
            a.conntrack_max = v;
        }
        if let Some(d) = nonzero(k.conntrack_gc_interval)
            && set("conntrack_gc_interval")
        {
            a.conntrack_gc_interval = d;
        }
        if let Some(d) = nonzero(k.conntrack_tcp_timeout_syn)
            && set("conntrack_tcp_timeout_syn")
        {
            a.conntrack_tcp_timeout_syn = d;
        }
        if let Some(d) = nonzero(k.conntrack_tcp_timeout_fin)
            && set("conntrack_tcp_timeout_fin")
        {
            a.conntrack_tcp_timeout_fin = d;
        }
        if let Some(d) = nonzero(k.conntrack_tcp_timeout_close)
            && set("conntrack_tcp_timeout_close")
        {
            a.conntrack_tcp_timeout_close = d;
        }
        if let Some(list) = &k.service_cidr
            && set("service_cidr")
        {
            a.service_cidr = list
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|e| bad("kpr.serviceCIDR", format!("{c:?}: {e}")))
                })
                .collect::<Result<_>>()?;
        }
        if let Some(v) = k.cleanup_other_modes
            && set("cleanup_other_modes")
        {
            a.cleanup_other_modes = v;
        }
    }
    Ok(notes)
}

/// "0.0.0.0" / "::" / ":10256" / "host:port" forms of a bind address, with `port` added
/// when the form lacks one (upstream takes all of them).
#[must_use]
pub fn bind_with_port(v: &str, port: u16) -> String {
    if v.parse::<std::net::SocketAddr>().is_err() && v.starts_with(':') && !v.starts_with("::") {
        return format!("0.0.0.0{v}");
    }
    if v.parse::<std::net::SocketAddr>().is_ok() {
        return v.to_string();
    }
    match v.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) => v.to_string(),
    }
}

/// A health or metrics bind address as kube-proxy takes it: `host:port`, `[v6]:port`,
/// `:port` (every address), or a bare address (with `default_port`); "" disables the server.
///
/// # Errors
/// Anything else, naming the flag.
pub fn parse_bind(
    flag: &str,
    v: &str,
    default_port: u16,
) -> crate::Result<Option<std::net::SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    bind_with_port(v, default_port)
        .parse()
        .map(Some)
        .map_err(|_| {
            crate::Error::invalid(format!(
                "{flag} {v:?}: want host:port, [ipv6]:port, :port or an address"
            ))
        })
}

/// The effective configuration as a KubeProxyConfiguration (`--write-config-to`): the
/// upstream fields kpr knows plus the `kpr:` section.
#[must_use]
pub fn effective_yaml(a: &crate::cli::RunArgs) -> String {
    let secs = |d: Duration| format!("{}s", d.as_secs_f64());
    let u = &a.upstream;
    let v = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "bindAddress": u.bind_address,
        "bindAddressHardFail": u.bind_address_hard_fail,
        "clientConnection": {
            "kubeconfig": a.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "qps": u.kube_api_qps,
            "burst": u.kube_api_burst,
            "contentType": u.kube_api_content_type,
        },
        "clusterCIDR": a.cluster_cidr.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "configSyncPeriod": secs(u.config_sync_period),
        "conntrack": {
            "maxPerCore": u.conntrack_max_per_core,
            "min": u.conntrack_min,
            "tcpBeLiberal": u.conntrack_tcp_be_liberal,
            "tcpCloseWaitTimeout": secs(u.conntrack_tcp_timeout_close_wait),
            "tcpEstablishedTimeout": secs(a.conntrack_tcp_timeout_established),
            "udpTimeout": secs(a.conntrack_udp_timeout),
            "udpStreamTimeout": secs(a.conntrack_udp_timeout_stream),
        },
        "detectLocalMode": u.detect_local_mode.clone().unwrap_or_else(|| "ClusterCIDR".into()),
        "enableProfiling": u.profiling,
        "healthzBindAddress": a.healthz_bind_address,
        "hostnameOverride": a.hostname_override.clone().unwrap_or_default(),
        "iptables": {
            "localhostNodePorts": a.iptables_localhost_nodeports,
            "masqueradeAll": a.masquerade_all,
            "masqueradeBit": u.iptables_masquerade_bit,
        },
        "logging": {"format": u.logging_format, "verbosity": u.verbosity},
        "metricsBindAddress": a.metrics_bind_address,
        "minSyncPeriod": secs(a.min_sync_period),
        "mode": a.proxy_mode.0.map(|m| m.as_str().to_string()).unwrap_or_default(),
        "nodePortAddresses": a.nodeport_addresses,
        "oomScoreAdj": u.oom_score_adj,
        "syncPeriod": secs(a.sync_period),
        "kpr": {
            "bpfFsPath": a.bpf_fs_path.display().to_string(),
            "cgroupPath": a.cgroup_path.display().to_string(),
            "tcInterfaces": a.tc_interfaces,
            "lbAlgorithm": a.lb_algorithm,
            "maglevTableSize": a.maglev_table_size,
            "masqueradePortRange": format!("{}-{}", a.masquerade_port_range.0, a.masquerade_port_range.1),
            "conntrackMax": a.conntrack_max,
            "conntrackGcInterval": secs(a.conntrack_gc_interval),
            "conntrackTcpTimeoutSyn": secs(a.conntrack_tcp_timeout_syn),
            "conntrackTcpTimeoutFin": secs(a.conntrack_tcp_timeout_fin),
            "conntrackTcpTimeoutClose": secs(a.conntrack_tcp_timeout_close),
            "serviceCIDR": a.service_cidr.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cleanupOtherModes": a.cleanup_other_modes,
        },
    });
    serde_norway::to_string(&v).unwrap_or_default()
}
