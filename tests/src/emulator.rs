//! A Kubernetes API server emulator for tests: real HTTP on loopback, speaking the list/watch
//! protocol kube-rs's client uses, for Services, EndpointSlices and Nodes.
//!
//! - lists return `resourceVersion` and honour `labelSelector` / `fieldSelector`
//!   (`metadata.name=`), `limit` and `continue`;
//! - watches (`?watch=true`) stream JSON lines from a resourceVersion, send BOOKMARKs, end
//!   after `timeoutSeconds`, and answer a compacted (too old) version with a 410 ERROR event;
//! - faults: fail the next N requests with 500, hang requests, drop every open watch,
//!   compact history (forcing 410s), insert raw (malformed) objects.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds the emulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
            Self::Node => "NodeList",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn of(obj: &Value) -> Option<Self> {
        match obj["kind"].as_str()? {
            "Service" => Some(Self::Service),
            "EndpointSlice" => Some(Self::EndpointSlice),
            "Node" => Some(Self::Node),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct Faults {
    fail_next: u32,
    hang: bool,
}

struct Inner {
    rv: u64,
    /// Objects by kind and "namespace/name".
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<WatchEvent>,
    /// Watches from before this version get 410 Gone.
    compacted: u64,
    faults: Faults,
    requests: u64,
    /// Every API call as RBAC sees it: (API group, resource, verb).
    calls: std::collections::BTreeSet<(String, String, String)>,
    /// events.k8s.io/v1 Events posted (created, then merged with their patches), by
    /// "namespace/name".
    recorded_events: BTreeMap<String, Value>,
}

/// Shared state of a running emulator.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<WatchEvent>,
    /// Bumped to end every open watch.
    drops: broadcast::Sender<()>,
    pub addr: SocketAddr,
}

fn key_of(obj: &Value) -> String {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    format!("{ns}/{name}")
}

/// Evaluates a label selector of the forms `k`, `!k`, `k=v`, `k==v`, `k!=v`, comma-joined.
fn labels_match(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let term = term.trim();
        if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).and_then(Value::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(k).and_then(Value::as_str) == Some(v)
        } else {
            labels.get(term).is_some()
        }
    })
}

fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
            Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        })
}

impl Emulator {
    /// Starts the emulator on an ephemeral loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind emulator");
        Self::serve_on(listener)
    }

    /// Starts the emulator on an ephemeral port of the loopback of the network namespace at
    /// `netns` (for an agent running in that namespace).
    pub async fn start_in_netns(netns: &std::path::Path) -> Self {
        let netns = netns.to_path_buf();
        // A thread of its own enters the namespace: the socket it makes stays there.
        let std_listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&netns).expect("open netns");
            // SAFETY: setns on this short-lived thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind emulator")
        })
        .join()
        .expect("bind thread");
        std_listener.set_nonblocking(true).expect("nonblocking");
        Self::serve_on(tokio::net::TcpListener::from_std(std_listener).expect("tokio listener"))
    }

    fn serve_on(listener: tokio::net::TcpListener) -> Self {
        let (events, _) = broadcast::channel(4096);
        let (drops, _) = broadcast::channel(16);
        let addr = listener.local_addr().expect("addr");
        let emu = Self {
            inner: Arc::new(Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                faults: Faults::default(),
                requests: 0,
                calls: std::collections::BTreeSet::new(),
                recorded_events: BTreeMap::new(),
            })),
            events,
            drops,
            addr,
        };
        let app = Router::new()
            .route("/api/v1/services", get(list_or_watch_services))
            .route("/api/v1/nodes", get(list_or_watch_nodes))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(list_or_watch_slices),
            )
            .route(
                "/version",
                get(|| async {
                    axum::Json(
                        json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0-kpr-emulator"}),
                    )
                }),
            )
            .route("/api/v1/namespaces/{ns}/services/{name}", get(get_one))
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events",
                axum::routing::post(create_event),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}",
                axum::routing::patch(patch_event),
            )
            .with_state(emu.clone())
            .layer(axum::middleware::from_fn_with_state(
                emu.clone(),
                record_call,
            ));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        emu
    }

    /// The URL for `--master`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at the emulator.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster: {{server: \"{}\"}}\nusers:\n- name: emu\n  user: {{}}\ncontexts:\n- name: emu\n  context: {{cluster: emu, user: emu}}\ncurrent-context: emu\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn record(&self, kind: Kind, type_: &'static str, mut object: Value) {
        let ev = {
            let mut inner = self.inner.lock().unwrap();
            inner.rv += 1;
            let rv = inner.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = (kind, key_of(&object));
            if type_ == "DELETED" {
                inner.objects.remove(&key);
            } else {
                inner.objects.insert(key, object.clone());
            }
            let ev = WatchEvent {
                rv,
                kind,
                type_,
                object,
            };
            inner.history.push(ev.clone());
            ev
        };
        let _ = self.events.send(ev);
    }

    /// Creates or replaces an object (its `kind` says which collection).
    pub fn apply(&self, object: Value) {
        let kind = Kind::of(&object).expect("object with a supported kind");
        let exists = self
            .inner
            .lock()
            .unwrap()
            .objects
            .contains_key(&(kind, key_of(&object)));
        self.record(kind, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    /// Inserts an object of `kind` as is, however malformed.
    pub fn apply_raw(&self, kind: Kind, object: Value) {
        self.record(kind, "ADDED", object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (kind, format!("{namespace}/{name}"));
        let obj = self.inner.lock().unwrap().objects.get(&key).cloned();
        if let Some(obj) = obj {
            self.record(kind, "DELETED", obj);
        }
    }

    /// Fails the next `n` requests with 500.
    pub fn fail_next(&self, n: u32) {
        self.inner.lock().unwrap().faults.fail_next = n;
    }

    /// While set, requests hang without an answer (an unreachable API server).
    pub fn set_hang(&self, hang: bool) {
        self.inner.lock().unwrap().faults.hang = hang;
    }

    /// Ends every open watch stream (as a load balancer dropping connections would).
    pub fn drop_watches(&self) {
        let _ = self.drops.send(());
    }

    /// Forgets history: watches from any version up to now get 410 Gone (a relist returns
    /// the new, post-compaction version).
    pub fn compact(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// The Events the agent recorded (events.k8s.io/v1 objects, patches merged in).
    pub fn recorded_events(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .recorded_events
            .values()
            .cloned()
            .collect()
    }

    /// The calls made so far as RBAC rules name them: (API group, resource, verb).
    pub fn api_calls(&self) -> std::collections::BTreeSet<(String, String, String)> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn requests(&self) -> u64 {
        self.inner.lock().unwrap().requests
    }

    async fn serve(&self, kind: Kind, q: BTreeMap<String, String>) -> Response {
        let (fail, hang) = {
            let mut inner = self.inner.lock().unwrap();
            inner.requests += 1;
            let fail = inner.faults.fail_next > 0;
            if fail {
                inner.faults.fail_next -= 1;
            }
            (fail, inner.faults.hang)
        };
        if hang {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !self.inner.lock().unwrap().faults.hang {
                    break;
                }
            }
            return (StatusCode::SERVICE_UNAVAILABLE, "the emulator was hanging").into_response();
        }
        if fail {
            return status_response(500, "InternalError", "injected failure");
        }
        let labels = q.get("labelSelector").cloned().unwrap_or_default();
        let fields = q.get("fieldSelector").cloned().unwrap_or_default();
        if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return self.watch(kind, &q, labels, fields);
        }
        self.list(kind, &q, &labels, &fields)
    }

    fn list(
        &self,
        kind: Kind,
        q: &BTreeMap<String, String>,
        labels: &str,
        fields: &str,
    ) -> Response {
        let inner = self.inner.lock().unwrap();
        let all: Vec<&Value> = inner
            .objects
            .iter()
            .filter(|((k, _), o)| *k == kind && labels_match(labels, o) && fields_match(fields, o))
            .map(|(_, o)| o)
            .collect();
        let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = q
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<Value> = all
            .iter()
            .skip(start)
            .take(limit)
            .map(|o| (*o).clone())
            .collect();
        let next = start + page.len();
        let mut meta = json!({"resourceVersion": inner.rv.to_string()});
        if next < all.len() {
            meta["continue"] = json!(next.to_string());
        }
        axum::Json(json!({
            "apiVersion": kind.api_version(),
            "kind": kind.list_kind(),
            "metadata": meta,
            "items": page,
        }))
        .into_response()
    }

    fn watch(
        &self,
        kind: Kind,
        q: &BTreeMap<String, String>,
        labels: String,
        fields: String,
    ) -> Response {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let mut rx = self.events.subscribe();
        let mut drops = self.drops.subscribe();
        let (backlog, gone, current) = {
            let inner = self.inner.lock().unwrap();
            let gone = from != 0 && from < inner.compacted;
            let backlog: Vec<WatchEvent> = inner
                .history
                .iter()
                .filter(|e| e.kind == kind && e.rv > from)
                .cloned()
                .collect();
            (backlog, gone, inner.rv)
        };
        let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
        tokio::spawn(async move {
            let line =
                |e: &WatchEvent| format!("{}\n", json!({"type": e.type_, "object": e.object}));
            if gone {
                let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                let _ = tx.send(Ok(format!("{status}\n"))).await;
                return;
            }
            let matches = |e: &WatchEvent| {
                e.kind == kind
                    && labels_match(&labels, &e.object)
                    && fields_match(&fields, &e.object)
            };
            for e in backlog.iter().filter(|e| matches(e)) {
                if tx.send(Ok(line(e))).await.is_err() {
                    return;
                }
            }
            let mut last = current;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(e) if e.rv > last => {
                            last = e.rv;
                            if matches(&e) && tx.send(Ok(line(&e))).await.is_err() { return; }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => {
                        if bookmarks {
                            let bm = json!({"type": "BOOKMARK", "object": {"kind": match kind { Kind::Service => "Service", Kind::EndpointSlice => "EndpointSlice", Kind::Node => "Node" }, "apiVersion": kind.api_version(), "metadata": {"resourceVersion": last.to_string()}}});
                            if tx.send(Ok(format!("{bm}\n"))).await.is_err() { return; }
                        }
                    }
                    _ = drops.recv() => return,
                    () = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
        let stream = futures::stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .expect("response")
    }
}

/// Records each request as RBAC would authorize it: (group, resource, verb).
async fn record_call(
    State(e): State<Emulator>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    // /api/v1/... is the core group; /apis/<group>/<version>/...
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.first() {
        Some(&"api") => (String::new(), parts.get(2..).unwrap_or_default()),
        Some(&"apis") => (
            parts.get(1).copied().unwrap_or_default().to_string(),
            parts.get(3..).unwrap_or_default(),
        ),
        _ => (String::from("(non-resource)"), &parts[..]),
    };
    let rest: Vec<&str> = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        rest[2..].to_vec()
    } else {
        rest.to_vec()
    };
    let resource = rest.first().copied().unwrap_or_default().to_string();
    let named = rest.len() > 1;
    let verb = match *req.method() {
        axum::http::Method::GET if watch => "watch",
        axum::http::Method::GET if named => "get",
        axum::http::Method::GET => "list",
        axum::http::Method::POST => "create",
        axum::http::Method::PATCH => "patch",
        axum::http::Method::PUT => "update",
        axum::http::Method::DELETE => "delete",
        _ => "other",
    };
    let resource = if group == "(non-resource)" {
        path.clone()
    } else {
        resource
    };
    e.inner
        .lock()
        .unwrap()
        .calls
        .insert((group, resource, verb.to_string()));
    next.run(req).await
}

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

async fn list_or_watch_services(
    State(e): State<Emulator>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    e.serve(Kind::Service, q).await
}
async fn list_or_watch_slices(
    State(e): State<Emulator>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    e.serve(Kind::EndpointSlice, q).await
}
async fn list_or_watch_nodes(
    State(e): State<Emulator>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    e.serve(Kind::Node, q).await
}
async fn create_event(
    State(e): State<Emulator>,
    Path(ns): Path<String>,
    axum::Json(mut ev): axum::Json<Value>,
) -> Response {
    let name = ev["metadata"]["name"].as_str().unwrap_or("").to_string();
    if name.is_empty() {
        return status_response(422, "Invalid", "metadata.name is required");
    }
    ev["metadata"]["namespace"] = json!(ns);
    let mut inner = e.inner.lock().unwrap();
    let key = format!("{ns}/{name}");
    if inner.recorded_events.contains_key(&key) {
        return status_response(409, "AlreadyExists", "event exists");
    }
    inner.recorded_events.insert(key, ev.clone());
    (StatusCode::CREATED, axum::Json(ev)).into_response()
}

async fn patch_event(
    State(e): State<Emulator>,
    Path((ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    // A merge patch (application/merge-patch+json), not plain JSON.
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_response(400, "BadRequest", "the patch is not JSON");
    };
    fn merge(into: &mut Value, patch: &Value) {
        match (into, patch) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v.clone(),
        }
    }
    let mut inner = e.inner.lock().unwrap();
    match inner.recorded_events.get_mut(&format!("{ns}/{name}")) {
        Some(ev) => {
            merge(ev, &patch);
            axum::Json(ev.clone()).into_response()
        }
        None => status_response(404, "NotFound", "not found"),
    }
}

async fn get_one(State(e): State<Emulator>, Path((ns, name)): Path<(String, String)>) -> Response {
    let obj = e
        .inner
        .lock()
        .unwrap()
        .objects
        .get(&(Kind::Service, format!("{ns}/{name}")))
        .cloned();
    match obj {
        Some(o) => axum::Json(o).into_response(),
        None => status_response(404, "NotFound", "not found"),
    }
}

/// A v1 Service object with one TCP port.
pub fn service(ns: &str, name: &str, vip: &str, port: u16, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": port}]}})
}

/// A discovery.k8s.io/v1 EndpointSlice for `service` with ready endpoints on `port`.
pub fn endpoint_slice(ns: &str, service: &str, name: &str, ips: &[&str], port: u16) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(
            |ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "test-node"}),
        )
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-25T10:00:00Z"}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
}

/// A v1 Node with an InternalIP and a zone label.
pub fn node(name: &str, ip: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}
