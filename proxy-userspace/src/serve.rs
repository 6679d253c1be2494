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

use crate::render::{ModeMetric, ProxyMode};
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
    /// When the oldest change not yet synced arrived (health).
    pub oldest_pending: Option<Instant>,
    /// The last successful sync, wall clock (health's `lastUpdated`).
    pub last_updated: Option<jiff::Timestamp>,
    /// Whether this node should get load-balancer traffic (`nodeEligible`).
    pub node_eligible: bool,
    /// The effective configuration (`/configz`).
    pub configz: String,
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

/// upstream's health: unhealthy when a queued change has waited longer than twice the sync
/// period without a successful sync; `/healthz` also says whether the node is eligible for
/// load-balancer traffic, `/livez` ignores that.
fn health(status: &SharedStatus, livez: bool) -> (StatusCode, String) {
    let (code, body) = health_of(status, livez);
    if let Some(m) = crate::metrics::get() {
        let c = if livez { &m.livez } else { &m.healthz };
        c.with_label_values(&[code.as_str()]).inc();
    }
    (code, body)
}

/// The proxy's health as `/healthz` answers it, without counting the request.
fn health_peek(status: &SharedStatus) -> (StatusCode, String) {
    health_of(status, false)
}

fn health_of(status: &SharedStatus, livez: bool) -> (StatusCode, String) {
    let s = status.lock().expect("status lock");
    let timeout = s.sync_period * 2;
    let healthy = s.oldest_pending.is_none_or(|t| t.elapsed() < timeout);
    let eligible = s.node_eligible;
    let ok = healthy && (livez || eligible);
    let stamp = |t: Option<jiff::Timestamp>| {
        t.unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .strftime("%Y-%m-%dT%H:%M:%S%.fZ")
            .to_string()
    };
    let body = serde_json::json!({
        "lastUpdated": stamp(s.last_updated),
        "currentTime": stamp(Some(jiff::Timestamp::now())),
        "nodeEligible": eligible,
        "healthy": healthy,
    })
    .to_string();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// The effective configuration (kube-proxy's `/configz`): KubeProxyConfiguration YAML with
/// kpr's section.
async fn configz(State(status): State<SharedStatus>) -> impl IntoResponse {
    let body = status.lock().expect("status lock").configz.clone();
    ([("content-type", "application/yaml")], body)
}

async fn healthz(State(status): State<SharedStatus>) -> impl IntoResponse {
    let (code, body) = health(&status, false);
    (code, [("content-type", "application/json")], body)
}

async fn livez(State(status): State<SharedStatus>) -> impl IntoResponse {
    let (code, body) = health(&status, true);
    (code, [("content-type", "application/json")], body)
}

async fn metrics(State(status): State<SharedStatus>) -> impl IntoResponse {
    let body = match crate::metrics::get() {
        Some(m) => m.render(&status),
        None => crate::metrics::Metrics::render_kpr_only(&status),
    };
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
            .route("/livez", get(livez))
            .with_state(status.clone());
        spawn_server("healthz", addr, app).await;
    }
    if let Some(addr) = metrics_addr {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/proxyMode", get(proxy_mode))
            .route("/proxyModeStatus", get(proxy_mode_status))
            .route("/configz", get(configz))
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

type HealthState = Arc<Mutex<(ObjectRef, usize, Option<SharedStatus>)>>;

async fn service_health(State(state): State<HealthState>) -> impl IntoResponse {
    let (svc, n, status) = state.lock().expect("health lock").clone();
    // upstream: 503 when the node's proxy itself is unhealthy, else by local endpoints.
    let (proxy_code, _) = status
        .as_ref()
        .map_or((StatusCode::OK, String::new()), |s| health_peek(s));
    let proxy_healthy = proxy_code == StatusCode::OK;
    let body = serde_json::json!({
        "service": {"namespace": svc.namespace.to_string(), "name": svc.name.to_string()},
        "localEndpoints": n,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let code = if n > 0 && proxy_healthy {
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
    /// The proxy's own health, which every check reports as `serviceProxyHealthy`.
    pub status: Option<SharedStatus>,
}

impl HealthChecks {
    /// Makes the running servers match `wanted` (port -> (service, local endpoints)).
    pub async fn sync(&mut self, wanted: &BTreeMap<ObjectRef, (u16, usize)>) {
        let by_port: BTreeMap<u16, (ObjectRef, usize, Option<SharedStatus>)> = wanted
            .iter()
            .map(|(svc, (port, n))| (*port, (svc.clone(), *n, self.status.clone())))
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
