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
    /// The datapath could not be started (the kernel refused), counted per attempt; while it
    /// is not started the agent is unhealthy.
    pub datapath_start_failures: u64,
    pub datapath_started: bool,
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
    let healthy = s.oldest_pending.is_none_or(|t| t.elapsed() < timeout)
        && (s.datapath_started || s.datapath_start_failures == 0);
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

/// Binds `addr`; an unspecified address (`0.0.0.0`, `::`) listens on both families (`[::]`
/// without `IPV6_V6ONLY`, falling back to IPv4 where the node has no IPv6).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let bind = |a: SocketAddr, v6only: Option<bool>| -> std::io::Result<tokio::net::TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(a),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(only) = v6only {
            s.set_only_v6(only)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&a.into())?;
        s.listen(1024)?;
        tokio::net::TcpListener::from_std(s.into())
    };
    if addr.ip().is_unspecified() {
        let any6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
        match bind(any6, Some(false)) {
            Ok(l) => return Ok(l),
            Err(e) if addr.is_ipv6() => return Err(e),
            Err(_) => {}
        }
        return bind(
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port()),
            None,
        );
    }
    bind(addr, None)
}

/// Serves `app` on `addr`. A bind failure (the port taken, the address not there yet) is
/// logged and retried every 5 s, as upstream retries its servers, never fatal.
async fn spawn_server(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
) -> tokio::task::JoinHandle<()> {
    spawn_server_retrying(what, addr, app, std::time::Duration::from_secs(5))
}

fn spawn_server_retrying(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    async fn serve(
        what: &'static str,
        addr: SocketAddr,
        listener: tokio::net::TcpListener,
        app: Router,
    ) {
        let local = listener.local_addr().map_or(addr, |a| a);
        tracing::info!(%addr, listening = %local, "{what} server listening");
        let _ = axum::serve(listener, app).await;
    }
    match listen(addr) {
        Ok(listener) => tokio::spawn(serve(what, addr, listener, app)),
        Err(e) => {
            tracing::error!("{what} server: binding {addr}: {e}; retrying every {every:?}");
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match listen(addr) {
                        Ok(listener) => return serve(what, addr, listener, app).await,
                        Err(e) => tracing::debug!("{what} server: binding {addr}: {e}"),
                    }
                }
            })
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
    running: BTreeMap<u16, (HealthState, Vec<tokio::task::JoinHandle<()>>)>,
    /// Where the servers listen: `None` on every address (both families), else on these
    /// (upstream: the node addresses `nodePortAddresses` selects).
    listen_on: Option<Vec<std::net::IpAddr>>,
    /// The proxy's own health, which every check reports as `serviceProxyHealthy`.
    pub status: Option<SharedStatus>,
}

impl HealthChecks {
    /// Sets where the servers listen; running servers move when it changed.
    pub async fn set_addresses(&mut self, addresses: Option<Vec<std::net::IpAddr>>) {
        if self.listen_on != addresses {
            for (_, tasks) in std::mem::take(&mut self.running).into_values() {
                for t in tasks {
                    t.abort();
                    // Wait until its listener is closed, so the port can be bound again.
                    let _ = t.await;
                }
            }
            self.listen_on = addresses;
        }
    }

    /// Makes the running servers match `wanted` (port -> (service, local endpoints)).
    pub async fn sync(&mut self, wanted: &BTreeMap<ObjectRef, (u16, usize)>) {
        let by_port: BTreeMap<u16, (ObjectRef, usize, Option<SharedStatus>)> = wanted
            .iter()
            .map(|(svc, (port, n))| (*port, (svc.clone(), *n, self.status.clone())))
            .collect();
        self.running.retain(|port, (_, tasks)| {
            let keep = by_port.contains_key(port);
            if !keep {
                tasks.iter().for_each(tokio::task::JoinHandle::abort);
            }
            keep
        });
        let ips: Vec<std::net::IpAddr> = self
            .listen_on
            .clone()
            .unwrap_or_else(|| vec![std::net::Ipv4Addr::UNSPECIFIED.into()]);
        for (port, value) in by_port {
            if let Some((state, _)) = self.running.get(&port) {
                *state.lock().expect("health lock") = value;
                continue;
            }
            let svc = value.0.clone();
            let state: HealthState = Arc::new(Mutex::new(value));
            let mut tasks = Vec::new();
            for ip in &ips {
                let app = Router::new()
                    .fallback(get(service_health))
                    .with_state(state.clone());
                let addr = SocketAddr::new(*ip, port);
                if let Err(e) = listen(addr) {
                    // upstream's Event; the server keeps retrying.
                    crate::events::record(
                        crate::events::Regarding::Service(svc.clone()),
                        true,
                        "FailedToStartServiceHealthcheck",
                        "Listen",
                        format!("node {addr} health check port could not be listened on: {e}"),
                    );
                }
                tasks.push(spawn_server("health check", addr, app).await);
            }
            self.running.insert(port, (state, tasks));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_app() -> Router {
        Router::new().fallback(get(|| async { "ok" }))
    }

    async fn answers(addr: SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    }

    #[tokio::test]
    async fn an_unspecified_address_listens_on_both_families() {
        let l = listen("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(l, ok_app()).await;
        });
        assert!(
            answers(SocketAddr::from(([127, 0, 0, 1], port))).await,
            "IPv4"
        );
        assert!(
            answers(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port)).await,
            "IPv6"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_until_it_is_free() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = squatter.local_addr().unwrap();
        let _task =
            spawn_server_retrying("test", addr, ok_app(), std::time::Duration::from_millis(50));
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        drop(squatter);
        let start = std::time::Instant::now();
        // Connecting to the squatter's backlog would succeed too: ask for an answer.
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                let mut body = String::new();
                let _ = s.read_to_string(&mut body).await;
                if body.ends_with("ok") {
                    break;
                }
            }
            assert!(start.elapsed().as_secs() < 5, "the server never came up");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn health_check_servers_listen_where_node_port_addresses_say() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut hc = HealthChecks::default();
        hc.set_addresses(Some(vec![std::net::Ipv4Addr::LOCALHOST.into()]))
            .await;
        let wanted = BTreeMap::from([(ObjectRef::new("ns", "lb"), (port, 1))]);
        hc.sync(&wanted).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(answers(SocketAddr::from(([127, 0, 0, 1], port))).await);
        assert!(
            !answers(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port)).await,
            "not on the addresses nodePortAddresses leaves out"
        );
        // Every address again (nodePortAddresses unset): the server moves.
        hc.set_addresses(None).await;
        hc.sync(&wanted).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(answers(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port)).await);
    }
}
