//! The agent: runs the sources, keeps the store, and syncs the model's output to the datapath.
//!
//! The sync loop coalesces bursts (at most one sync per `min_sync_period`) and resyncs every
//! `sync_period` even without changes, re-reading the maps so drift is repaired.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::ebpf::datapath::{self, LoadOutcome, PinLayout, PinnedMaps};
use crate::ebpf::render::{EbpfRenderer, LbMaps as _};
use std::collections::BTreeSet;

use crate::model::{self, FrontendKey, NodeInfo, ProxyConfig};
use crate::source::ManifestSource;
use crate::store::ObjectRef;
use crate::store::{Change, Store};
use crate::{Error, Result};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    Manifests(PathBuf),
    Api(crate::kube_source::ApiConfig),
}

/// Settings of `kpr run`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    pub bpf_fs_path: PathBuf,
    pub cgroup_path: PathBuf,
    pub node: NodeInfo,
    pub proxy: ProxyConfig,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub poll_interval: Duration,
    pub tc_interfaces: datapath::TcInterfaces,
    pub healthz_bind: Option<std::net::SocketAddr>,
    pub metrics_bind: Option<std::net::SocketAddr>,
}

/// Network-programming latency: from an EndpointSlice's
/// `endpoints.kubernetes.io/last-change-trigger-time` to the sync that programmed it
/// (upstream's `network_programming_duration_seconds`).
#[derive(Clone, Debug, Default)]
pub struct ProgrammingLatency {
    pub count: u64,
    pub sum_secs: f64,
    pub max_secs: f64,
}

impl ProgrammingLatency {
    /// Seconds from an RFC 3339 trigger time until now; `None` if unparsable or in the future.
    #[must_use]
    pub fn since(trigger: &str) -> Option<f64> {
        let t: jiff::Timestamp = trigger.parse().ok()?;
        let d = jiff::Timestamp::now().duration_since(t);
        let secs = d.as_secs_f64();
        (secs >= 0.0).then_some(secs)
    }

    pub fn observe(&mut self, secs: f64) {
        self.count += 1;
        self.sum_secs += secs;
        self.max_secs = self.max_secs.max(secs);
    }
}

/// The desired state, kept between syncs and updated per changed Service, so one Service
/// change costs work proportional to that Service, not to the cluster.
#[derive(Debug, Default)]
pub struct DesiredCache {
    pub state: model::DesiredState,
    keys_by_service: std::collections::HashMap<ObjectRef, Vec<FrontendKey>>,
    primed: bool,
}

impl DesiredCache {
    /// Brings `state` up to date. Returns the frontend keys that may have changed, or `None`
    /// when everything was recomputed (the caller then syncs in full).
    pub fn update(
        &mut self,
        store: &Store,
        dirty: &crate::store::Dirty,
        node: &NodeInfo,
        config: &ProxyConfig,
    ) -> Option<BTreeSet<FrontendKey>> {
        if dirty.all || !self.primed {
            self.state = model::compute(store, node, config);
            self.keys_by_service.clear();
            for (k, fe) in &self.state.frontends {
                self.keys_by_service
                    .entry(fe.service.clone())
                    .or_default()
                    .push(*k);
            }
            self.primed = true;
            return None;
        }
        let node_port_ips = model::node_port_ips(node, config);
        let mut touched = BTreeSet::new();
        for id in &dirty.services {
            for k in self.keys_by_service.remove(id).unwrap_or_default() {
                if self
                    .state
                    .frontends
                    .get(&k)
                    .is_some_and(|fe| &fe.service == id)
                {
                    self.state.frontends.remove(&k);
                }
                touched.insert(k);
            }
            self.state.health_checks.remove(id);
            let Some(svc) = store.service(id) else {
                continue;
            };
            let (frontends, health) =
                model::compute_service(store, svc, node, config, &node_port_ips);
            let keys: Vec<FrontendKey> = frontends.iter().map(|(k, _)| *k).collect();
            touched.extend(keys.iter().copied());
            self.state.frontends.extend(frontends);
            if let Some(h) = health {
                self.state.health_checks.insert(id.clone(), h);
            }
            self.keys_by_service.insert(id.clone(), keys);
        }
        Some(touched)
    }
}

/// Store + model + renderer over the pinned maps.
pub struct Syncer {
    store: Store,
    node: NodeInfo,
    /// Node IPs given on the command line win over the Node object's.
    fixed_node_ips: bool,
    services_listed: bool,
    slices_listed: bool,
    /// `last-change-trigger-time`s of slices changed since the last sync.
    pending_triggers: Vec<String>,
    pub latency: ProgrammingLatency,
    tc_interfaces: datapath::TcInterfaces,
    /// What KPR_CONFIG holds.
    node_config: Option<proxy_common::NodeConfig>,
    pub status: crate::serve::SharedStatus,
    /// Health-check ports of eTP=Local Services, from the last sync.
    pub health_checks: std::collections::BTreeMap<crate::store::ObjectRef, (u16, usize)>,
    desired: DesiredCache,
    proxy: ProxyConfig,
    maps: PinnedMaps,
    renderer: EbpfRenderer,
    layout: PinLayout,
    /// The kernel refused SOCK_DESTROY once: do not sweep again.
    sock_destroy_unsupported: bool,
}

impl Syncer {
    /// Loads or adopts the datapath and rebuilds the renderer's memory from the maps.
    ///
    /// # Errors
    /// The datapath could not be loaded or its maps read.
    pub fn start(cfg: &AgentConfig) -> Result<(Self, LoadOutcome)> {
        let layout = PinLayout::new(&cfg.bpf_fs_path);
        let outcome = datapath::ensure_loaded(&layout, &cfg.cgroup_path)?;
        let mut maps = PinnedMaps::open(&layout)?;
        let snapshot = maps.snapshot()?;
        let (renderer, stale) = EbpfRenderer::adopt(&snapshot);
        for k in &stale {
            let _ = maps.del_slot(k);
        }
        let attached = datapath::sync_tc_links(&layout, &cfg.tc_interfaces)?;
        if !attached.is_empty() {
            tracing::info!(interfaces = ?attached, "TC programs attached");
        }
        tracing::info!(
            outcome = ?outcome,
            frontends = snapshot.services.len(),
            backends = snapshot.backends.len(),
            stale_slots = stale.len(),
            "datapath ready"
        );
        Ok((
            Self {
                store: Store::default(),
                node: cfg.node.clone(),
                fixed_node_ips: !cfg.node.ips.is_empty(),
                services_listed: false,
                slices_listed: false,
                pending_triggers: Vec::new(),
                latency: ProgrammingLatency::default(),
                tc_interfaces: cfg.tc_interfaces.clone(),
                node_config: None,
                status: std::sync::Arc::new(std::sync::Mutex::new(crate::serve::AgentStatus {
                    sync_period: cfg.sync_period,
                    ..Default::default()
                })),
                health_checks: std::collections::BTreeMap::new(),
                desired: DesiredCache::default(),
                proxy: cfg.proxy.clone(),
                maps,
                renderer,
                layout,
                sock_destroy_unsupported: false,
            },
            outcome,
        ))
    }

    /// Applies a change; returns whether the desired state may have changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Node(node) => {
                if node.name.is_empty() {
                    return false;
                }
                let mut next = self.node.clone();
                if !self.fixed_node_ips {
                    next.ips = node.ips;
                }
                next.labels = node.labels;
                let changed = next != self.node;
                self.node = next;
                if changed {
                    self.store.mark_all_dirty();
                }
                changed
            }
            Change::Reset { .. } => {
                self.services_listed = true;
                self.slices_listed = true;
                self.store.apply(change);
                true
            }
            Change::ResetServices(_) => {
                self.services_listed = true;
                self.store.apply(change);
                true
            }
            Change::ResetSlices(_) => {
                self.slices_listed = true;
                self.store.apply(change);
                true
            }
            Change::SliceUpsert(slice) => {
                let trigger = slice.trigger_time.clone();
                let changed = self.store.apply(Change::SliceUpsert(slice));
                if changed && let Some(t) = trigger {
                    self.pending_triggers.push(t);
                }
                changed
            }
            other => self.store.apply(other),
        }
    }

    /// True once the source has delivered a complete list of Services and EndpointSlices.
    /// Until then nothing is synced, so a restarted agent that cannot reach the API server
    /// leaves the pinned datapath exactly as it found it.
    #[must_use]
    pub const fn ready(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Attaches the TC programs to interfaces that appeared since the last call.
    pub fn sync_interfaces(&mut self) {
        match datapath::sync_tc_links(&self.layout, &self.tc_interfaces) {
            Ok(attached) if !attached.is_empty() => {
                tracing::info!(interfaces = ?attached, "TC programs attached");
            }
            Ok(_) => {}
            Err(e) => tracing::error!("attaching TC programs: {e}"),
        }
    }

    /// Writes the masquerade address (the first node IP of each family) when it changed.
    fn sync_node_config(&mut self) {
        let v4 = self
            .node
            .ips
            .iter()
            .find(|ip| ip.is_ipv4())
            .map_or([0; 16], |ip| crate::ebpf::addr16(*ip));
        let v6 = self
            .node
            .ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .map_or([0; 16], |ip| crate::ebpf::addr16(*ip));
        let cfg = proxy_common::NodeConfig {
            snat_v4: v4,
            snat_v6: v6,
        };
        if self.node_config == Some(cfg) {
            return;
        }
        match self.maps.set_node_config(&cfg) {
            Ok(()) => self.node_config = Some(cfg),
            Err(e) => tracing::error!("writing the node configuration: {e}"),
        }
    }

    /// Computes the desired state and applies the difference.
    pub fn sync(&mut self) {
        let started = Instant::now();
        self.sync_node_config();
        let dirty = self.store.take_dirty();
        let (stats, errors) =
            match self
                .desired
                .update(&self.store, &dirty, &self.node, &self.proxy)
            {
                None => {
                    let result = datapath::sync_full(
                        &mut self.renderer,
                        &self.desired.state,
                        &mut self.maps,
                        &self.layout,
                        &[],
                    );
                    // A full sync follows a (re)list or reload, whose parse buffers are garbage
                    // now: hand the freed heap back so RSS shows what the agent keeps.
                    // SAFETY: malloc_trim has no preconditions.
                    unsafe { libc::malloc_trim(0) };
                    result
                }
                Some(keys) => self
                    .renderer
                    .sync_keys(&self.desired.state, &keys, &mut self.maps),
            };
        self.terminate_udp_sockets();
        let desired = &self.desired.state;
        for e in &errors {
            tracing::error!("sync: {e}");
        }
        if errors.is_empty() {
            for t in self.pending_triggers.drain(..) {
                if let Some(secs) = ProgrammingLatency::since(&t) {
                    self.latency.observe(secs);
                    tracing::info!(seconds = secs, trigger = %t, "network programming latency");
                }
            }
        }
        self.health_checks = desired.health_checks.clone();
        if let Ok(mut st) = self.status.lock() {
            st.last_sync = Some(Instant::now());
            st.syncs += 1;
            st.sync_errors += u64::from(!errors.is_empty());
            st.last_sync_secs = started.elapsed().as_secs_f64();
            st.frontends = desired.frontends.len();
            st.services = self.store.service_count();
            st.endpoint_slices = self.store.slice_count();
            st.latency_count = self.latency.count;
            st.latency_sum_secs = self.latency.sum_secs;
        }
        if !stats.is_noop() || !errors.is_empty() {
            tracing::info!(
                services = self.store.service_count(),
                slices = self.store.slice_count(),
                frontends = desired.frontends.len(),
                written = stats.services_written,
                deleted = stats.services_deleted,
                slots_written = stats.slots_written,
                slots_deleted = stats.slots_deleted,
                errors = errors.len(),
                took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "synced"
            );
        }
    }

    /// Destroys connected UDP sockets that socket-level load balancing pointed at backends
    /// this sync removed (their sends would keep going to the old backend).
    fn terminate_udp_sockets(&mut self) {
        let removed = self.renderer.take_removed_udp();
        if removed.is_empty() || self.sock_destroy_unsupported {
            return;
        }
        let started = Instant::now();
        let maps = &self.maps;
        let report = crate::ebpf::sockterm::sweep(&removed, &|key| {
            maps.sock_revnat_get(key).map(|v| (v.addr, v.port))
        });
        for key in &report.forget {
            self.maps.sock_revnat_del(key);
        }
        for e in &report.errors {
            tracing::warn!("terminating UDP sockets of removed backends: {e}");
        }
        if report.unsupported {
            self.sock_destroy_unsupported = true;
            tracing::warn!(
                "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): connected UDP sockets keep sending to removed backends until the application reconnects"
            );
        }
        if let Ok(mut st) = self.status.lock() {
            st.udp_sockets_destroyed += report.destroyed as u64;
        }
        tracing::info!(
            pairs = removed.len(),
            namespaces = report.namespaces,
            destroyed = report.destroyed,
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "terminated connected UDP sockets of removed backends"
        );
    }

    /// Re-reads the maps and resyncs everything, repairing entries changed behind the agent's
    /// back.
    pub fn resync(&mut self) {
        self.store.mark_all_dirty();
        match self.maps.snapshot() {
            Ok(snapshot) => {
                let (renderer, stale) = EbpfRenderer::adopt(&snapshot);
                self.renderer = renderer;
                for k in &stale {
                    let _ = self.maps.del_slot(k);
                }
            }
            Err(e) => tracing::error!(
                "resync: reading maps under {}: {e}",
                self.layout.root.display()
            ),
        }
        self.sync();
    }
}

fn spawn_manifests(dir: PathBuf, poll: Duration, tx: mpsc::Sender<Change>) {
    tokio::spawn(async move {
        let mut source = ManifestSource::new(dir);
        loop {
            let result = tokio::task::block_in_place(|| source.poll());
            for e in &result.errors {
                tracing::error!("{e}");
            }
            if let Some(change) = result.change
                && tx.send(change).await.is_err()
            {
                return;
            }
            tokio::time::sleep(poll).await;
        }
    });
}

/// Runs the agent until SIGINT/SIGTERM. The datapath stays programmed after it exits.
///
/// # Errors
/// Start-up failed (the datapath could not be loaded).
pub async fn run(cfg: AgentConfig) -> Result<()> {
    let (mut syncer, outcome) = Syncer::start(&cfg)?;
    tracing::info!(?outcome, cgroup = %cfg.cgroup_path.display(), "kpr agent started");
    let (tx, mut rx) = mpsc::channel::<Change>(1024);
    match &cfg.source {
        SourceConfig::Manifests(dir) => spawn_manifests(dir.clone(), cfg.poll_interval, tx),
        SourceConfig::Api(api) => {
            let client = crate::kube_source::client(api).await?;
            tracing::info!(selector = %api.label_selector(), node = %api.node_name, "watching the API server");
            crate::kube_source::spawn(&client, api, &tx);
        }
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("SIGTERM handler", e))?;
    crate::serve::start(cfg.healthz_bind, cfg.metrics_bind, syncer.status.clone()).await;
    let mut health = crate::serve::HealthChecks::default();
    let mut interfaces = tokio::time::interval(Duration::from_secs(2));
    let mut dirty = false;
    let mut last_sync = Instant::now() - cfg.min_sync_period;
    let mut last_full = Instant::now();
    loop {
        let wait = if dirty {
            cfg.min_sync_period.saturating_sub(last_sync.elapsed())
        } else {
            cfg.sync_period.saturating_sub(last_full.elapsed())
        };
        tokio::select! {
            change = rx.recv() => {
                match change {
                    Some(c) => dirty |= syncer.apply(c),
                    None => return Ok(()),
                }
            }
            () = tokio::time::sleep(wait) => {
                if !syncer.ready() {
                    // Not listed yet: keep the datapath as found.
                    last_full = Instant::now();
                } else if dirty {
                    syncer.sync();
                    dirty = false;
                    last_sync = Instant::now();
                    health.sync(&syncer.health_checks).await;
                } else {
                    syncer.resync();
                    last_full = Instant::now();
                    health.sync(&syncer.health_checks).await;
                }
            }
            _ = interfaces.tick() => syncer.sync_interfaces(),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; the datapath stays programmed");
                return Ok(());
            }
            _ = sigterm.recv() => {
                tracing::info!("terminated; the datapath stays programmed");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DesiredCache, ProgrammingLatency};
    use crate::model::{NodeInfo, ProxyConfig, compute};
    use crate::source::parse_manifest;
    use crate::store::{Change, ObjectRef, Store};

    fn objects(yaml: &str) -> crate::source::FileObjects {
        parse_manifest(yaml).expect("valid")
    }

    fn svc(name: &str, ip: &str, np: Option<u16>) -> String {
        let ty = if np.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let np = np.map_or(String::new(), |p| format!(", nodePort: {p}"));
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: {name}}}\nspec: {{type: {ty}, clusterIP: {ip}, ports: [{{name: p, port: 80{np}}}]}}\n"
        )
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> String {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: 8080}}]\n",
            eps.join(", ")
        )
    }

    #[test]
    fn incremental_updates_equal_a_full_recompute() {
        let mut node = NodeInfo {
            name: "n".into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            labels: Default::default(),
        };
        let config = ProxyConfig::default();
        let mut store = Store::default();
        let mut cache = DesiredCache::default();
        let base = objects(&format!(
            "{}---\n{}---\n{}---\n{}",
            svc("a", "10.96.0.1", None),
            svc("b", "10.96.0.2", Some(30001)),
            slice("a-1", "a", &["10.0.0.1"]),
            slice("b-1", "b", &["10.0.0.2", "10.0.0.3"])
        ));
        store.apply(Change::Reset {
            services: base.services,
            slices: base.slices,
        });
        let dirty = store.take_dirty();
        assert!(
            cache.update(&store, &dirty, &node, &config).is_none(),
            "first update is full"
        );
        let steps: Vec<Change> = vec![
            Change::SliceUpsert(objects(&slice("a-1", "a", &["10.0.0.9"])).slices.remove(0)),
            Change::ServiceUpsert(
                objects(&svc("c", "10.96.0.3", Some(30003)))
                    .services
                    .remove(0),
            ),
            // a slice moves from one Service to another
            Change::SliceUpsert(objects(&slice("b-1", "c", &["10.0.0.4"])).slices.remove(0)),
            Change::ServiceDelete(ObjectRef::new("ns", "a")),
            Change::SliceDelete(ObjectRef::new("ns", "a-1")),
        ];
        for (i, change) in steps.into_iter().enumerate() {
            store.apply(change);
            let dirty = store.take_dirty();
            assert!(!dirty.all);
            let touched = cache
                .update(&store, &dirty, &node, &config)
                .expect("incremental");
            // Deleting the slice of an already deleted Service changes no frontend.
            assert_eq!(touched.is_empty(), i == 4, "step {i}: {touched:?}");
            assert_eq!(
                cache.state,
                compute(&store, &node, &config),
                "after step {i}"
            );
        }
        // A node change recomputes everything.
        node.ips.push("192.168.1.2".parse().unwrap());
        store.mark_all_dirty();
        let dirty = store.take_dirty();
        assert!(cache.update(&store, &dirty, &node, &config).is_none());
        assert_eq!(cache.state, compute(&store, &node, &config));
    }

    #[test]
    fn latency_from_trigger_time() {
        let past = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3)).to_string();
        let secs = ProgrammingLatency::since(&past).expect("parsable");
        assert!((3.0..10.0).contains(&secs), "{secs}");
        assert_eq!(ProgrammingLatency::since("not a time"), None);
        let mut l = ProgrammingLatency::default();
        l.observe(1.0);
        l.observe(3.0);
        assert_eq!((l.count, l.sum_secs, l.max_secs), (2, 4.0, 3.0));
    }
}
