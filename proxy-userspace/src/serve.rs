//! The agent's HTTP endpoints, as kube-proxy has them:
//! - healthz server (default 0.0.0.0:10256): `/healthz` and `/livez` (200 once the first sync
//!   is done and syncs keep happening, 503 otherwise);
//! - metrics server (default 127.0.0.1:10249): `/metrics` (Prometheus text), `/proxyMode` (the
//!   mode's name, as upstream) and `/proxyModeStatus` (JSON: requested mode, the mode chosen,
//!   why, and the kernel features probed);
//! - one health-check server per Service with externalTrafficPolicy Local, on its
//!   `healthCheckNodePort`: `{"service":{"namespace","name"},"localEndpoints":N}`, 200 when N > 0,
//!   else 503, so load balancers only send to nodes with local endpoints.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::render::{MetricKind, ModeMetric, ProxyMode};
use crate::store::ObjectRef;

/// What the endpoints report; updated by the sync loop.
#[derive(Debug, Default)]
pub struct AgentStatus {
    pub last_sync: Option<Instant>,
    pub syncs: u64,
    pub sync_errors: u64,
    pub last_sync_secs: f64,
    pub frontends: usize,
    pub services: usize,
    pub endpoint_slices: usize,
    pub latency_count: u64,
    pub latency_sum_secs: f64,
    pub sync_period: Duration,
    /// The renderer's mode, for `/proxyMode`.
    pub mode: ProxyMode,
    /// The renderer's own counters, from the last sync.
    pub mode_metrics: Vec<ModeMetric>,
    /// Why this mode runs (`/proxyModeStatus`).
    pub mode_choice: Option<crate::render::probe::ModeChoice>,
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

async fn healthz(State(status): State<SharedStatus>) -> impl IntoResponse {
    let s = status.lock().expect("status lock");
    let healthy = s
        .last_sync
        .is_some_and(|t| t.elapsed() < s.sync_period * 2 + Duration::from_secs(30));
    let body = format!(
        "{{\"lastUpdated\":\"{:.1}s ago\",\"currentTime\":\"\",\"nodeEligible\":true,\"healthy\":{healthy}}}",
        s.last_sync.map_or(-1.0, |t| t.elapsed().as_secs_f64())
    );
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [("content-type", "application/json")], body)
}

async fn metrics(State(status): State<SharedStatus>) -> impl IntoResponse {
    let s = status.lock().expect("status lock");
    let body = format!(
        "# HELP kpr_sync_proxy_rules_total Syncs of the datapath.\n# TYPE kpr_sync_proxy_rules_total counter\nkpr_sync_proxy_rules_total {}\n\
# HELP kpr_sync_proxy_rules_errors_total Syncs that reported errors.\n# TYPE kpr_sync_proxy_rules_errors_total counter\nkpr_sync_proxy_rules_errors_total {}\n\
# HELP kpr_sync_proxy_rules_last_duration_seconds Duration of the last sync.\n# TYPE kpr_sync_proxy_rules_last_duration_seconds gauge\nkpr_sync_proxy_rules_last_duration_seconds {}\n\
# HELP kpr_frontends Frontends programmed.\n# TYPE kpr_frontends gauge\nkpr_frontends {}\n\
# HELP kpr_services Services in the store.\n# TYPE kpr_services gauge\nkpr_services {}\n\
# HELP kpr_endpoint_slices EndpointSlices in the store.\n# TYPE kpr_endpoint_slices gauge\nkpr_endpoint_slices {}\n\
# HELP kpr_network_programming_duration_seconds From an EndpointSlice's last-change-trigger-time to its sync.\n# TYPE kpr_network_programming_duration_seconds summary\nkpr_network_programming_duration_seconds_sum {}\nkpr_network_programming_duration_seconds_count {}\n",
        s.syncs,
        s.sync_errors,
        s.last_sync_secs,
        s.frontends,
        s.services,
        s.endpoint_slices,
        s.latency_sum_secs,
        s.latency_count,
    );
    let mut body = body;
    let mut last = "";
    for m in &s.mode_metrics {
        let kind = match m.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        if m.name != last {
            body.push_str(&format!(
                "# HELP kpr_{name} {help}\n# TYPE kpr_{name} {kind}\n",
                name = m.name,
                help = m.help,
            ));
            last = m.name;
        }
        let labels = if m.labels.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = m
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            format!("{{{}}}", pairs.join(","))
        };
        body.push_str(&format!("kpr_{}{labels} {}\n", m.name, m.value));
    }
    ([("content-type", "text/plain; version=0.0.4")], body)
}

async fn proxy_mode(State(status): State<SharedStatus>) -> impl IntoResponse {
    status.lock().expect("status lock").mode.as_str()
}

/// Which mode runs and why: the probe's checks as JSON.
async fn proxy_mode_status(State(status): State<SharedStatus>) -> impl IntoResponse {
    let body = serde_json::to_string(&status.lock().expect("status lock").mode_choice)
        .unwrap_or_else(|_| "null".into());
    ([("content-type", "application/json")], body)
}

/// Starts the healthz and metrics servers. A bind failure is logged, not fatal: the datapath
/// matters more than its observability.
pub async fn start(
    healthz_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    status: SharedStatus,
) {
    if let Some(addr) = healthz_addr {
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/livez", get(healthz))
            .with_state(status.clone());
        spawn_server("healthz", addr, app).await;
    }
    if let Some(addr) = metrics_addr {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/proxyMode", get(proxy_mode))
            .route("/proxyModeStatus", get(proxy_mode_status))
            .route("/healthz", get(healthz))
            .with_state(status);
        spawn_server("metrics", addr, app).await;
    }
}

async fn spawn_server(
    what: &str,
    addr: SocketAddr,
    app: Router,
) -> Option<tokio::task::JoinHandle<()>> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "{what} server listening");
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }))
        }
        Err(e) => {
            tracing::error!("{what} server: binding {addr}: {e}");
            None
        }
    }
}

type HealthState = Arc<Mutex<(ObjectRef, usize)>>;

async fn service_health(State(state): State<HealthState>) -> impl IntoResponse {
    let (svc, n) = state.lock().expect("health lock").clone();
    let body = format!(
        "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{n}}}",
        svc.namespace, svc.name
    );
    let code = if n > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [("content-type", "application/json")], body)
}

/// The per-Service health-check servers (healthCheckNodePort).
#[derive(Default)]
pub struct HealthChecks {
    running: BTreeMap<u16, (HealthState, tokio::task::JoinHandle<()>)>,
}

impl HealthChecks {
    /// Makes the running servers match `wanted` (port -> (service, local endpoints)).
    pub async fn sync(&mut self, wanted: &BTreeMap<ObjectRef, (u16, usize)>) {
        let by_port: BTreeMap<u16, (ObjectRef, usize)> = wanted
            .iter()
            .map(|(svc, (port, n))| (*port, (svc.clone(), *n)))
            .collect();
        self.running.retain(|port, (_, task)| {
            let keep = by_port.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, value) in by_port {
            if let Some((state, _)) = self.running.get(&port) {
                *state.lock().expect("health lock") = value;
                continue;
            }
            let state: HealthState = Arc::new(Mutex::new(value));
            let app = Router::new()
                .fallback(get(service_health))
                .with_state(state.clone());
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            if let Some(task) = spawn_server("health check", addr, app).await {
                self.running.insert(port, (state, task));
            }
        }
    }
}
