//! Prometheus metrics (the `prometheus` crate): upstream kube-proxy's `kubeproxy_*` metrics
//! with their names, types, buckets and labels (`ip_family` where upstream has it), the
//! `process_*` metrics, and kpr's own under `kpr_*` (sync counts, the renderer's counters:
//! conntrack fill, datapath drops, per-Service traffic...).
use std::sync::OnceLock;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::render::{MetricKind, ProxyMode};
use crate::serve::SharedStatus;

/// `metrics.ExponentialBuckets(0.001, 2, 15)`: the sync and conntrack histograms.
#[must_use]
pub fn sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// Upstream's network-programming buckets: 0, 0.25, 0.5, 1..59 by 1, 60..115 by 5,
/// 120..300 by 30 (81 bounds).
#[must_use]
pub fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..60).map(f64::from));
    b.extend((60..120).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

/// Every metric the agent updates.
pub struct Metrics {
    pub registry: Registry,
    /// The IP families this node proxies ("IPv4", "IPv6"), for `ip_family` labels.
    pub families: Vec<&'static str>,
    pub sync_duration: HistogramVec,
    pub sync_full_duration: HistogramVec,
    pub sync_partial_duration: HistogramVec,
    pub network_programming: HistogramVec,
    pub last_synced: prometheus::GaugeVec,
    pub last_queued: prometheus::GaugeVec,
    pub endpoint_changes_pending: IntGauge,
    pub endpoint_changes_total: IntCounter,
    pub service_changes_pending: IntGauge,
    pub service_changes_total: IntCounter,
    pub iptables_restore_failures: IntCounterVec,
    pub iptables_partial_restore_failures: IntCounterVec,
    pub nftables_sync_failures: IntCounterVec,
    pub no_local_endpoints: IntGaugeVec,
    pub healthz: IntCounterVec,
    pub livez: IntCounterVec,
    pub conntrack_reconciler_duration: HistogramVec,
    pub conntrack_reconciler_deleted: IntCounterVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, registered for `mode` on first use (a process runs one mode).
pub fn init(mode: ProxyMode, families: Vec<&'static str>) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(mode, families))
}

/// The metrics, if the agent registered them.
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

fn hist(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help)
            .subsystem("kubeproxy")
            .buckets(buckets),
        labels,
    )
    .expect("valid histogram")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help).subsystem("kubeproxy"), labels).expect("valid counter")
}

impl Metrics {
    fn new(mode: ProxyMode, families: Vec<&'static str>) -> Self {
        let fam = &["ip_family"];
        let m = Self {
            registry: Registry::new(),
            families,
            sync_duration: hist(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets(),
                fam,
            ),
            sync_full_duration: hist(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets(),
                fam,
            ),
            sync_partial_duration: hist(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets(),
                fam,
            ),
            network_programming: hist(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                programming_buckets(),
                fam,
            ),
            last_synced: prometheus::GaugeVec::new(
                Opts::new(
                    "sync_proxy_rules_last_timestamp_seconds",
                    "The last time proxy rules were successfully synced",
                )
                .subsystem("kubeproxy"),
                fam,
            )
            .expect("valid gauge"),
            last_queued: prometheus::GaugeVec::new(
                Opts::new(
                    "sync_proxy_rules_last_queued_timestamp_seconds",
                    "The last time a sync of proxy rules was queued",
                )
                .subsystem("kubeproxy"),
                fam,
            )
            .expect("valid gauge"),
            endpoint_changes_pending: IntGauge::with_opts(
                Opts::new(
                    "sync_proxy_rules_endpoint_changes_pending",
                    "Pending proxy rules Endpoint changes",
                )
                .subsystem("kubeproxy"),
            )
            .expect("valid gauge"),
            endpoint_changes_total: IntCounter::with_opts(
                Opts::new(
                    "sync_proxy_rules_endpoint_changes_total",
                    "Cumulative proxy rules Endpoint changes",
                )
                .subsystem("kubeproxy"),
            )
            .expect("valid counter"),
            service_changes_pending: IntGauge::with_opts(
                Opts::new(
                    "sync_proxy_rules_service_changes_pending",
                    "Pending proxy rules Service changes",
                )
                .subsystem("kubeproxy"),
            )
            .expect("valid gauge"),
            service_changes_total: IntCounter::with_opts(
                Opts::new(
                    "sync_proxy_rules_service_changes_total",
                    "Cumulative proxy rules Service changes",
                )
                .subsystem("kubeproxy"),
            )
            .expect("valid counter"),
            iptables_restore_failures: counter_vec(
                "sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
                fam,
            ),
            iptables_partial_restore_failures: counter_vec(
                "sync_proxy_rules_iptables_partial_restore_failures_total",
                "Cumulative proxy iptables partial restore failures",
                fam,
            ),
            nftables_sync_failures: counter_vec(
                "sync_proxy_rules_nftables_sync_failures_total",
                "Cumulative proxy nftables sync failures",
                fam,
            ),
            no_local_endpoints: IntGaugeVec::new(
                Opts::new(
                    "sync_proxy_rules_no_local_endpoints_total",
                    "Number of services with a Local traffic policy and no endpoints",
                )
                .subsystem("kubeproxy"),
                &["traffic_policy", "ip_family"],
            )
            .expect("valid gauge"),
            healthz: counter_vec(
                "proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                &["code"],
            ),
            livez: counter_vec(
                "proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                &["code"],
            ),
            conntrack_reconciler_duration: hist(
                "conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds",
                sync_buckets(),
                fam,
            ),
            conntrack_reconciler_deleted: counter_vec(
                "conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
                fam,
            ),
        };
        let r = &m.registry;
        let core: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.sync_duration.clone()),
            Box::new(m.network_programming.clone()),
            Box::new(m.last_synced.clone()),
            Box::new(m.last_queued.clone()),
            Box::new(m.endpoint_changes_pending.clone()),
            Box::new(m.endpoint_changes_total.clone()),
            Box::new(m.service_changes_pending.clone()),
            Box::new(m.service_changes_total.clone()),
            Box::new(m.no_local_endpoints.clone()),
            Box::new(m.healthz.clone()),
            Box::new(m.livez.clone()),
            // Full and partial syncs exist in every kpr mode (upstream: iptables, nftables).
            Box::new(m.sync_full_duration.clone()),
            Box::new(m.sync_partial_duration.clone()),
        ];
        for c in core {
            r.register(c).expect("unique metric");
        }
        match mode {
            ProxyMode::Iptables => {
                r.register(Box::new(m.iptables_restore_failures.clone()))
                    .expect("unique");
                r.register(Box::new(m.iptables_partial_restore_failures.clone()))
                    .expect("unique");
            }
            ProxyMode::Nftables => {
                r.register(Box::new(m.nftables_sync_failures.clone()))
                    .expect("unique");
            }
            _ => {}
        }
        if matches!(
            mode,
            ProxyMode::Iptables | ProxyMode::Nftables | ProxyMode::Ipvs
        ) {
            r.register(Box::new(m.conntrack_reconciler_duration.clone()))
                .expect("unique");
            r.register(Box::new(m.conntrack_reconciler_deleted.clone()))
                .expect("unique");
        }
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        m
    }

    /// The text exposition: everything registered, then kpr's own metrics read from the
    /// agent's status.
    #[must_use]
    pub fn render(&self, status: &SharedStatus) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::core::Collector::collect(&KprCollector::new(
            status.clone(),
        )));
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }

    /// kpr's own metrics alone (before the agent registered upstream's).
    #[must_use]
    pub fn render_kpr_only(status: &SharedStatus) -> String {
        let families = prometheus::core::Collector::collect(&KprCollector::new(status.clone()));
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }

    /// Observes `value` for every family.
    pub fn observe(&self, h: &HistogramVec, value: f64) {
        for f in &self.families {
            h.with_label_values(&[f]).observe(value);
        }
    }

    /// Increments `c` for every family.
    pub fn inc(&self, c: &IntCounterVec) {
        for f in &self.families {
            c.with_label_values(&[f]).inc();
        }
    }
}

/// kpr's own metrics: the agent's sync counters and the renderer's mode metrics, as they
/// stood at the last sync or tick.
struct KprCollector {
    status: SharedStatus,
    descs: Vec<prometheus::core::Desc>,
}

impl KprCollector {
    fn new(status: SharedStatus) -> Self {
        Self {
            status,
            descs: Vec::new(),
        }
    }
}

fn family(name: &str, help: &str, kind: MetricType, samples: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(samples);
    f
}

fn sample(kind: MetricKind, value: f64, labels: &[(&str, String)]) -> Metric {
    let mut m = Metric::default();
    match kind {
        MetricKind::Counter => {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        MetricKind::Gauge => {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
    }
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name((*k).to_string());
                l.set_value(v.clone());
                l
            })
            .collect(),
    );
    m
}

impl prometheus::core::Collector for KprCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        // Unchecked collector: its families vary with the mode (allowed by the registry).
        self.descs.iter().collect()
    }

    #[expect(clippy::cast_precision_loss, reason = "counters far below 2^52")]
    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(s) = self.status.lock() else {
            return Vec::new();
        };
        let c = MetricType::COUNTER;
        let g = MetricType::GAUGE;
        let plain = |kind, v: f64| vec![sample(kind, v, &[])];
        let mut out = vec![
            family(
                "kpr_sync_proxy_rules_total",
                "Syncs of the datapath.",
                c,
                plain(MetricKind::Counter, s.syncs as f64),
            ),
            family(
                "kpr_sync_proxy_rules_errors_total",
                "Syncs that reported errors.",
                c,
                plain(MetricKind::Counter, s.sync_errors as f64),
            ),
            family(
                "kpr_sync_proxy_rules_last_duration_seconds",
                "Duration of the last sync.",
                g,
                plain(MetricKind::Gauge, s.last_sync_secs),
            ),
            family(
                "kpr_datapath_start_failures_total",
                "Attempts to start the datapath that the kernel refused (no bpffs, no cgroup v2, a verifier rejection...); the agent retries.",
                c,
                plain(MetricKind::Counter, s.datapath_start_failures as f64),
            ),
            family(
                "kpr_datapath_started",
                "1 once the datapath is loaded and attached.",
                g,
                plain(
                    MetricKind::Gauge,
                    if s.datapath_started { 1.0 } else { 0.0 },
                ),
            ),
            family(
                "kpr_frontends",
                "Frontends programmed.",
                g,
                plain(MetricKind::Gauge, s.frontends as f64),
            ),
            family(
                "kpr_services",
                "Services known.",
                g,
                plain(MetricKind::Gauge, s.services as f64),
            ),
            family(
                "kpr_endpoint_slices",
                "EndpointSlices known.",
                g,
                plain(MetricKind::Gauge, s.endpoint_slices as f64),
            ),
        ];
        let mut i = 0;
        while i < s.mode_metrics.len() {
            let first = &s.mode_metrics[i];
            let mut samples = Vec::new();
            while i < s.mode_metrics.len() && s.mode_metrics[i].name == first.name {
                let m = &s.mode_metrics[i];
                samples.push(sample(m.kind, m.value, &m.labels));
                i += 1;
            }
            out.push(family(
                &format!("kpr_{}", first.name),
                first.help,
                match first.kind {
                    MetricKind::Counter => c,
                    MetricKind::Gauge => g,
                },
                samples,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_upstream() {
        let s = sync_buckets();
        assert_eq!(s.len(), 15);
        assert!((s[0] - 0.001).abs() < 1e-12 && (s[14] - 16.384).abs() < 1e-9);
        let p = programming_buckets();
        assert_eq!(p.len(), 81);
        assert_eq!(&p[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(p[61], 59.0);
        assert_eq!(p[62], 60.0);
        assert_eq!(p[73], 115.0);
        assert_eq!(p[74], 120.0);
        assert_eq!(*p.last().unwrap(), 300.0);
    }
}
