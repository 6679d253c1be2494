//! The ipvs mode, as upstream's IPVS proxier (`pkg/proxy/ipvs/proxier.go`) builds it:
//!
//! - **IPVS virtual servers** ([`netlink`]): one per frontend (ClusterIP, external IP,
//!   LoadBalancer IP, NodePort on each node IP), NAT forwarding, the scheduler of
//!   `--ipvs-scheduler` (default `rr`), persistence for sessionAffinity ClientIP. A frontend's
//!   real servers are the backends of its internal class for ClusterIPs and of its external
//!   class otherwise: IPVS cannot tell pods from outside clients, so, as upstream, pods that
//!   reach an eTP=Local Service through its external addresses get only the local endpoints.
//! - **`kube-ipvs0`**: a dummy interface holding every ClusterIP, external IP and
//!   LoadBalancer IP, so the node accepts them and IPVS (at LOCAL_IN/LOCAL_OUT) translates.
//! - **ipsets + iptables** ([`rules`]): masquerade and filtering, matched against ipsets so
//!   the rule count does not grow with the Services.
//! - **Graceful termination**: a TCP real server that still has connections is set to weight
//!   0 and deleted once they are gone (checked at every tick); UDP and SCTP real servers are
//!   deleted at once (`expire_nodest_conn` then ends their flows), as upstream.
//! - Partial syncs touch only the changed frontends' virtual servers; the ipsets and
//!   addresses are diffed against what kpr wrote. A full sync re-reads the kernel.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use ipnet::IpNet;

pub mod netlink;
pub mod rules;

use self::netlink::{Ipvs, RealServer, ServiceKey, Timeouts, VirtualServer};
use super::{CleanupReport, MetricKind, ModeMetric, ProxyMode, Renderer, SyncReport};
use crate::model::{DesiredState, FrontendKey, FrontendKind, Protocol};
use crate::{Error, Result};

/// The dummy interface that holds the Service addresses.
pub const DUMMY: &str = "kube-ipvs0";

/// The ipvs mode's settings (`--ipvs-*`, the config's `ipvs` block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsConfig {
    pub scheduler: String,
    /// ARP only for addresses of the receiving interface (`arp_ignore=1`, `arp_announce=2`),
    /// so the node does not answer ARP for the Service IPs on `kube-ipvs0`.
    pub strict_arp: bool,
    /// Virtual servers in these CIDRs are never removed (someone else's).
    pub exclude_cidrs: Vec<IpNet>,
    pub timeouts: Timeouts,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        Self {
            scheduler: "rr".into(),
            strict_arp: false,
            exclude_cidrs: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }
}

/// The schedulers IPVS has (`net/netfilter/ipvs/ip_vs_*.c`).
pub const SCHEDULERS: [&str; 13] = [
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh",
];

const fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// What kpr wants IPVS to hold for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedServer {
    pub server: VirtualServer,
    pub backends: BTreeSet<SocketAddr>,
}

/// The virtual servers `desired` asks for.
#[must_use]
pub fn virtual_servers(
    desired: &DesiredState,
    cfg: &IpvsConfig,
) -> BTreeMap<ServiceKey, WantedServer> {
    desired
        .frontends
        .iter()
        .map(|(k, fe)| (service_key(k), wanted(k, fe, cfg)))
        .collect()
}

fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey {
        protocol: proto_num(k.protocol),
        addr: SocketAddr::new(k.ip, k.port),
    }
}

/// The targets one virtual server serves: the internal class's for ClusterIPs, the
/// external class's for the other frontends (IPVS cannot tell the classes apart).
#[must_use]
pub fn served_targets(fe: &crate::model::Frontend) -> &crate::model::Targets {
    if fe.kind == FrontendKind::ClusterIp {
        &fe.internal
    } else {
        &fe.external
    }
}

fn wanted(k: &FrontendKey, fe: &crate::model::Frontend, cfg: &IpvsConfig) -> WantedServer {
    let targets = served_targets(fe);
    let (mut flags, timeout) = match fe.affinity_timeout_secs {
        Some(t) => (netlink::SVC_F_PERSISTENT, t),
        None => (0, 0),
    };
    if cfg.scheduler == "mh" {
        // upstream: Maglev hashing over source address and port (`mh-port`).
        flags |= netlink::SVC_F_SCHED_MH_PORT;
    }
    WantedServer {
        server: VirtualServer {
            key: service_key(k),
            scheduler: cfg.scheduler.clone(),
            flags,
            timeout,
        },
        backends: targets.backends().iter().copied().collect(),
    }
}

/// The addresses `kube-ipvs0` holds for `desired`: every frontend address but NodePorts'.
#[must_use]
pub fn bound_addresses(desired: &DesiredState) -> BTreeSet<IpAddr> {
    desired
        .frontends
        .iter()
        .filter(|(_, fe)| fe.kind != FrontendKind::NodePort)
        .map(|(k, _)| k.ip)
        .collect()
}

fn run(cmd: &mut Command, input: Option<&str>) -> std::io::Result<String> {
    super::run_tool(cmd, input)
}

/// The addresses `kube-ipvs0` holds (creating it when missing), and those on every other
/// interface.
fn ensure_dummy() -> Result<(BTreeSet<IpAddr>, BTreeSet<IpAddr>)> {
    let exists = Command::new("ip")
        .args(["link", "show", DUMMY])
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        run(
            Command::new("ip").args(["link", "add", DUMMY, "type", "dummy"]),
            None,
        )
        .map_err(|e| Error::io("ip link add", e).context(format!("creating {DUMMY}")))?;
    }
    // Down, as upstream keeps it: the kernel still routes its addresses locally.
    let out = run(Command::new("ip").args(["-o", "addr", "show"]), None)
        .map_err(|e| Error::io("ip addr show", e).context("reading the node's addresses"))?;
    let (mut dummy, mut others) = (BTreeSet::new(), BTreeSet::new());
    for l in out.lines() {
        let mut w = l.split_whitespace();
        let dev = w.nth(1).unwrap_or("");
        if w.find(|t| *t == "inet" || *t == "inet6").is_none() {
            continue;
        }
        let Some(ip) = w
            .next()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
        else {
            continue;
        };
        if dev == DUMMY {
            dummy.insert(ip);
        } else {
            others.insert(ip);
        }
    }
    Ok((dummy, others))
}

/// Adds and removes `kube-ipvs0` addresses in one `ip -batch`.
fn bind_addresses(add: &BTreeSet<IpAddr>, del: &BTreeSet<IpAddr>) -> Result<usize> {
    let mut batch = String::new();
    for ip in add {
        if ip.is_ipv4() {
            batch.push_str(&format!("addr add {ip}/32 dev {DUMMY}\n"));
        } else {
            // No duplicate address detection: the address is the node's alone.
            batch.push_str(&format!("addr add {ip}/128 dev {DUMMY} nodad\n"));
        }
    }
    for ip in del {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        batch.push_str(&format!("addr del {ip}/{len} dev {DUMMY}\n"));
    }
    if batch.is_empty() {
        return Ok(0);
    }
    run(
        Command::new("ip").args(["-force", "-batch", "-"]),
        Some(&batch),
    )
    .map_err(|e| Error::io("ip -batch", e).context(format!("binding addresses to {DUMMY}")))?;
    Ok(add.len() + del.len())
}

fn write_sysctl(path: &str, value: &str, report: &mut SyncReport) {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == value => {}
        _ => {
            if let Err(e) = std::fs::write(path, value) {
                report
                    .errors
                    .push(Error::io(path, e).context(format!("setting it to {value}")));
            }
        }
    }
}

/// A real server on its way out: weight 0, deleted when its connections are gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Draining {
    service: ServiceKey,
    backend: SocketAddr,
}

/// The ipvs mode.
pub struct IpvsRenderer {
    ipvs: Ipvs,
    cfg: IpvsConfig,
    /// The virtual servers kpr programmed (the diff base of partial syncs).
    programmed: BTreeMap<ServiceKey, WantedServer>,
    bound: BTreeSet<IpAddr>,
    /// Addresses to unbind once their virtual servers are gone (within one sync).
    unbind: BTreeSet<IpAddr>,
    draining: BTreeSet<Draining>,
    /// The node's own addresses (on other interfaces): never bound to `kube-ipvs0`.
    node_addresses: BTreeSet<IpAddr>,
    /// A sync failed: the next resync re-reads the kernel.
    needs_full: bool,
    rules: rules::RuleState,
    state: super::RuleModeState,
    drained: u64,
}

impl IpvsRenderer {
    /// Opens IPVS (loading `ip_vs` when the kernel can), checks the scheduler, and sets the
    /// sysctls IPVS needs.
    ///
    /// # Errors
    /// No IPVS in this kernel, an unknown scheduler, or no working ipset/iptables.
    pub fn start(cfg: IpvsConfig) -> Result<Self> {
        let ipvs = Ipvs::open().or_else(|_| {
            // The family appears when the module is loaded; modprobe where it exists.
            let _ = Command::new("modprobe").arg("ip_vs").output();
            Ipvs::open()
        });
        let ipvs = ipvs.map_err(|e| {
            Error::Unsupported(format!(
                "--proxy-mode ipvs: {e} (the kernel needs CONFIG_IP_VS, Linux 2.6.28+ for its generic netlink interface)"
            ))
        })?;
        if !SCHEDULERS.contains(&cfg.scheduler.as_str()) {
            return Err(Error::invalid(format!(
                "--ipvs-scheduler {:?}: not an IPVS scheduler (one of {})",
                cfg.scheduler,
                SCHEDULERS.join(", ")
            )));
        }
        // The scheduler's module loads on first use; load it now so a missing one fails here.
        let _ = Command::new("modprobe")
            .arg(format!("ip_vs_{}", cfg.scheduler))
            .output();
        let rules = rules::RuleState::start()?;
        tracing::info!(scheduler = %cfg.scheduler, strict_arp = cfg.strict_arp, "ipvs mode");
        Ok(Self {
            ipvs,
            cfg,
            programmed: BTreeMap::new(),
            bound: BTreeSet::new(),
            unbind: BTreeSet::new(),
            draining: BTreeSet::new(),
            node_addresses: BTreeSet::new(),
            needs_full: false,
            rules,
            state: super::RuleModeState::default(),
            drained: 0,
        })
    }

    /// upstream's sysctls: IPVS connections visible to netfilter conntrack (so masquerade
    /// works), connections to deleted real servers and quiescent templates expired, IPv4
    /// forwarding, strict ARP when asked.
    fn sysctls(&self, report: &mut SyncReport) {
        write_sysctl("/proc/sys/net/ipv4/vs/conntrack", "1", report);
        write_sysctl("/proc/sys/net/ipv4/vs/expire_nodest_conn", "1", report);
        write_sysctl(
            "/proc/sys/net/ipv4/vs/expire_quiescent_template",
            "1",
            report,
        );
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1", report);
        if self.cfg.strict_arp {
            write_sysctl("/proc/sys/net/ipv4/conf/all/arp_ignore", "1", report);
            write_sysctl("/proc/sys/net/ipv4/conf/all/arp_announce", "2", report);
        }
        if self.cfg.timeouts != Timeouts::default()
            && let Err(e) = self.ipvs_timeouts()
        {
            report.errors.push(e);
        }
    }

    fn ipvs_timeouts(&self) -> Result<()> {
        let mut ipvs = Ipvs::open().map_err(|e| Error::io("ipvs", e))?;
        if ipvs.timeouts().ok() != Some(self.cfg.timeouts) {
            ipvs.set_timeouts(self.cfg.timeouts)
                .map_err(|e| Error::io("ipvs", e).context("setting the IPVS timeouts"))?;
        }
        Ok(())
    }

    fn excluded(&self, key: &ServiceKey) -> bool {
        self.cfg
            .exclude_cidrs
            .iter()
            .any(|c| c.contains(&key.addr.ip()))
    }

    /// Brings one virtual server to `want` (None: remove), given what the kernel holds.
    fn apply_server(
        &mut self,
        key: ServiceKey,
        want: Option<&WantedServer>,
        have: Option<&VirtualServer>,
        report: &mut SyncReport,
    ) -> Result<()> {
        let Some(want) = want else {
            if have.is_some() {
                self.ipvs
                    .delete_service(&key)
                    .map_err(|e| Error::io("ipvs", e).context(format!("{key:?}")))?;
                self.draining.retain(|d| d.service != key);
                report.changes += 1;
            }
            self.programmed.remove(&key);
            return Ok(());
        };
        let mut exists = have.is_some();
        match have {
            None => {
                match self.ipvs.add_service(&want.server) {
                    Ok(()) => {}
                    // Made by an earlier sync that failed later on: update it in place.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        self.ipvs.update_service(&want.server).map_err(|e| {
                            Error::io("ipvs", e).context(format!("updating virtual server {key:?}"))
                        })?;
                        exists = true;
                    }
                    Err(e) => {
                        return Err(
                            Error::io("ipvs", e).context(format!("adding virtual server {key:?}"))
                        );
                    }
                }
                report.changes += 1;
            }
            Some(h) if *h != want.server => {
                self.ipvs.update_service(&want.server).map_err(|e| {
                    Error::io("ipvs", e).context(format!("updating virtual server {key:?}"))
                })?;
                report.changes += 1;
            }
            Some(_) => {}
        }
        let dests: Vec<RealServer> = if exists {
            self.ipvs
                .destinations(&key)
                .map_err(|e| Error::io("ipvs", e).context(format!("{key:?}")))?
        } else {
            Vec::new()
        };
        for b in &want.backends {
            match dests.iter().find(|d| d.addr == *b) {
                None => {
                    match self.ipvs.add_destination(&key, *b, 1) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            self.ipvs.set_weight(&key, *b, 1).map_err(|e| {
                                Error::io("ipvs", e).context(format!("re-weighting {b} of {key:?}"))
                            })?;
                        }
                        Err(e) => {
                            return Err(
                                Error::io("ipvs", e).context(format!("adding {b} to {key:?}"))
                            );
                        }
                    }
                    report.changes += 1;
                }
                Some(d) if d.weight != 1 => {
                    // Back from draining.
                    self.ipvs.set_weight(&key, *b, 1).map_err(|e| {
                        Error::io("ipvs", e).context(format!("re-weighting {b} of {key:?}"))
                    })?;
                    report.changes += 1;
                }
                Some(_) => {}
            }
            self.draining.remove(&Draining {
                service: key,
                backend: *b,
            });
        }
        for d in dests.iter().filter(|d| !want.backends.contains(&d.addr)) {
            let graceful = key.protocol == 6 && d.active + d.inactive > 0;
            if graceful {
                if d.weight != 0 {
                    self.ipvs.set_weight(&key, d.addr, 0).map_err(|e| {
                        Error::io("ipvs", e).context(format!("draining {} of {key:?}", d.addr))
                    })?;
                    report.changes += 1;
                }
                self.draining.insert(Draining {
                    service: key,
                    backend: d.addr,
                });
            } else {
                self.ipvs.delete_destination(&key, d.addr).map_err(|e| {
                    Error::io("ipvs", e).context(format!("removing {} from {key:?}", d.addr))
                })?;
                self.draining.remove(&Draining {
                    service: key,
                    backend: d.addr,
                });
                report.changes += 1;
            }
        }
        self.programmed.insert(key, want.clone());
        Ok(())
    }

    /// Deletes draining real servers whose connections are gone.
    fn reap_drained(&mut self) {
        let draining: Vec<Draining> = self.draining.iter().copied().collect();
        for d in draining {
            let dests = match self.ipvs.destinations(&d.service) {
                Ok(v) => v,
                Err(_) => {
                    // Gone with its virtual server; else (a timeout) tried again next tick.
                    if !self.programmed.contains_key(&d.service) {
                        self.draining.remove(&d);
                    }
                    continue;
                }
            };
            match dests.iter().find(|r| r.addr == d.backend) {
                Some(r) if r.active + r.inactive > 0 => {}
                Some(_) => {
                    if self.ipvs.delete_destination(&d.service, d.backend).is_ok() {
                        self.drained += 1;
                        self.draining.remove(&d);
                        tracing::debug!(backend = %d.backend, "drained real server removed");
                    }
                }
                None => {
                    self.draining.remove(&d);
                }
            }
        }
    }

    fn sync(&mut self, desired: &DesiredState, keys: Option<&BTreeSet<FrontendKey>>) -> SyncReport {
        let mut report = SyncReport::default();
        let full = keys.is_none();
        if full {
            self.sysctls(&mut report);
        }
        let wanted = virtual_servers(desired, &self.cfg);
        // Addresses first: a virtual server is reachable once its address is local.
        let bound = if full {
            match ensure_dummy() {
                Ok((b, others)) => {
                    self.node_addresses = others;
                    Some(b)
                }
                Err(e) => {
                    report.errors.push(e);
                    None
                }
            }
        } else {
            Some(self.bound.clone())
        };
        // An external or LB IP that is a node address is not bound (upstream the same): the
        // node already owns it, and the filter must not treat it as a Service-only address.
        let mut want_bound = bound_addresses(desired);
        want_bound.retain(|ip| !self.node_addresses.contains(ip));
        if let Some(bound) = bound {
            let add: BTreeSet<IpAddr> = want_bound.difference(&bound).copied().collect();
            let del: BTreeSet<IpAddr> = bound.difference(&want_bound).copied().collect();
            match bind_addresses(&add, &BTreeSet::new()) {
                Ok(n) => {
                    report.changes += n;
                    if n > 0 {
                        report.detail.push(("addresses_bound", n));
                    }
                    self.bound = bound.union(&add).copied().collect();
                }
                Err(e) => report.errors.push(e),
            }
            // Removed addresses go after their virtual servers (below).
            self.unbind = del;
        }
        // ipsets and iptables before the virtual servers: masquerade is in place when a
        // new frontend starts answering.
        let mut ipvs_ips = self.bound.clone();
        ipvs_ips.retain(|ip| want_bound.contains(ip));
        match self.rules.sync(desired, &ipvs_ips, full) {
            Ok(n) => {
                report.changes += n;
                if n > 0 {
                    report.detail.push(("ipset_and_rule_lines", n));
                }
            }
            Err(e) => report.errors.push(e),
        }
        let have: BTreeMap<ServiceKey, VirtualServer> = if full {
            match self.ipvs.services() {
                Ok(v) => v.into_iter().map(|s| (s.key, s)).collect(),
                Err(e) => {
                    report
                        .errors
                        .push(Error::io("ipvs", e).context("listing virtual servers"));
                    return report;
                }
            }
        } else {
            self.programmed
                .iter()
                .map(|(k, w)| (*k, w.server.clone()))
                .collect()
        };
        let touched: BTreeSet<ServiceKey> = match keys {
            None => wanted.keys().chain(have.keys()).copied().collect(),
            Some(keys) => keys
                .iter()
                .map(service_key)
                .chain(
                    // Removed frontends the agent did not name (defensive).
                    self.programmed
                        .keys()
                        .filter(|k| !wanted.contains_key(k))
                        .copied(),
                )
                .collect(),
        };
        let mut failed = 0;
        for key in touched {
            if !wanted.contains_key(&key) && self.excluded(&key) {
                continue;
            }
            if let Err(e) = self.apply_server(key, wanted.get(&key), have.get(&key), &mut report) {
                if let Some(fk) = desired.frontends.keys().find(|k| service_key(k) == key) {
                    report.failed_frontends.push(*fk);
                }
                report.error(e, &mut failed);
            }
        }
        let unbind = std::mem::take(&mut self.unbind);
        match bind_addresses(&BTreeSet::new(), &unbind) {
            Ok(n) => {
                report.changes += n;
                for ip in &unbind {
                    self.bound.remove(ip);
                }
            }
            Err(e) => report.errors.push(e),
        }
        if report.errors.is_empty() {
            self.state.conntrack.after_sync(desired, &mut report);
        } else {
            self.needs_full = true;
        }
        report
    }
}

/// Removes what the ipvs mode (kpr's or kube-proxy's) left: every virtual server outside
/// `exclude`, `kube-ipvs0`, the `KUBE-*` ipsets and the rules that use them.
///
/// # Errors
/// Something could not be removed; what could was.
pub fn cleanup(exclude: &[IpNet]) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let dummy = Command::new("ip")
        .args(["link", "show", DUMMY])
        .output()
        .is_ok_and(|o| o.status.success());
    // Only where an ipvs mode ran: another user's IPVS (keepalived, say) on a node that never
    // ran one is left alone, and `ip_vs` is not loaded just to look.
    if dummy
        && let Ok(mut ipvs) = Ipvs::open()
        && let Ok(services) = ipvs.services()
    {
        for s in services {
            if exclude.iter().any(|c| c.contains(&s.key.addr.ip())) {
                continue;
            }
            if ipvs.delete_service(&s.key).is_ok() {
                report
                    .removed
                    .push(format!("ipvs virtual server {:?}", s.key));
            }
        }
    }
    if Command::new("ip")
        .args(["link", "show", DUMMY])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(Command::new("ip").args(["link", "del", DUMMY]), None)
            .map_err(|e| Error::io("ip link del", e).context(format!("removing {DUMMY}")))?;
        report.removed.push(format!("link {DUMMY}"));
    }
    report.removed.extend(rules::cleanup()?.removed);
    Ok(report)
}

/// What an ipvs mode (kpr's or kube-proxy's) left for another mode to remove: virtual
/// servers outside `exclude`, `kube-ipvs0`, the layout's jumps, and its own chains when
/// `chains`; nothing unless `kube-ipvs0` shows that an ipvs mode ran. The ipsets go separately
/// ([`rules::destroy_sets`]) once no rule uses them.
#[must_use]
pub fn cleanup_leftovers(exclude: &[IpNet], chains: bool) -> Vec<String> {
    let mut removed = Vec::new();
    let dummy = Command::new("ip")
        .args(["link", "show", DUMMY])
        .output()
        .is_ok_and(|o| o.status.success());
    if dummy {
        if let Ok(mut ipvs) = Ipvs::open()
            && let Ok(services) = ipvs.services()
        {
            for s in services {
                if !exclude.iter().any(|c| c.contains(&s.key.addr.ip()))
                    && ipvs.delete_service(&s.key).is_ok()
                {
                    removed.push(format!("ipvs virtual server {:?}", s.key));
                }
            }
        }
        if run(Command::new("ip").args(["link", "del", DUMMY]), None).is_ok() {
            removed.push(format!("link {DUMMY}"));
        }
        removed.extend(rules::remove_jumps_and_chains(chains));
    }
    removed
}

impl Renderer for IpvsRenderer {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ipvs
    }

    fn sync_full(&mut self, desired: &DesiredState) -> SyncReport {
        self.state.full_sync_started();
        self.needs_full = false;
        self.sync(desired, None)
    }

    fn resync(&mut self, desired: &DesiredState) -> SyncReport {
        if std::mem::take(&mut self.needs_full) || self.state.resync_is_full() {
            self.sync(desired, None)
        } else {
            let keys: BTreeSet<FrontendKey> = desired.frontends.keys().copied().collect();
            self.sync(desired, Some(&keys))
        }
    }

    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport {
        self.sync(desired, Some(keys))
    }

    fn tick(&mut self) {
        if !self.draining.is_empty() {
            self.reap_drained();
        }
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        self.programmed.clear();
        self.bound.clear();
        self.draining.clear();
        cleanup(&self.cfg.exclude_cidrs)
    }

    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    fn metrics(&self) -> Vec<ModeMetric> {
        vec![
            self.state.conntrack.metric(),
            ModeMetric {
                name: "ipvs_virtual_servers",
                help: "IPVS virtual servers kpr programmed.",
                kind: MetricKind::Gauge,
                value: self.programmed.len() as f64,
                labels: Vec::new(),
            },
            ModeMetric {
                name: "ipvs_real_servers_draining",
                help: "IPVS real servers at weight 0 waiting for their connections to end.",
                kind: MetricKind::Gauge,
                value: self.draining.len() as f64,
                labels: Vec::new(),
            },
            ModeMetric {
                name: "ipvs_real_servers_drained_total",
                help: "IPVS real servers deleted after their connections ended (graceful termination).",
                kind: MetricKind::Counter,
                value: self.drained as f64,
                labels: Vec::new(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    //! Address plan: node 192.168.0.2 ("node-a"), pod CIDR 10.0.0.0/8; ns1/svc1 ClusterIP
    //! 172.30.0.41:80, NodePort 3001, external IP 192.168.99.11, LB IP 1.2.3.4; endpoints
    //! 10.180.0.1 (node-a) and 10.180.2.1 (node-b).
    use super::*;
    use crate::model::{NodeInfo, ProxyConfig, compute};
    use crate::store::{Protocol, ServiceInfo, SliceInfo};
    use crate::testkit::{self, endpoint, service};

    fn desired(svcs: Vec<ServiceInfo>, slices: Vec<SliceInfo>) -> DesiredState {
        let node = NodeInfo {
            name: "node-a".into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            ..NodeInfo::default()
        };
        let config = ProxyConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::default()
        };
        compute(&testkit::store(svcs, slices), &node, &config)
    }

    fn svc1() -> crate::testkit::ServiceBuilder {
        service("ns1", "svc1")
            .cluster_ip("172.30.0.41")
            .port("p80", 80, Protocol::Tcp, 80)
            .node_port(3001)
            .external_ips(&["192.168.99.11"])
            .load_balancer(&["1.2.3.4"])
    }

    fn slice1(eps: &[(&str, &str)]) -> SliceInfo {
        let eps: Vec<_> = eps.iter().map(|(ip, node)| endpoint(ip, node)).collect();
        testkit::slice("ns1", "svc1-1", "svc1")
            .port("p80", 80, Protocol::Tcp)
            .endpoints(&eps)
            .build()
    }

    fn key(proto: u8, addr: &str) -> ServiceKey {
        ServiceKey {
            protocol: proto,
            addr: addr.parse().unwrap(),
        }
    }

    fn backends(v: &[&str]) -> BTreeSet<SocketAddr> {
        v.iter().map(|b| b.parse().unwrap()).collect()
    }

    #[test]
    fn one_virtual_server_per_frontend_with_its_class_backends() {
        let both = [("10.180.0.1", "node-a"), ("10.180.2.1", "node-b")];
        let cfg = IpvsConfig::default();
        // (case, eTP=Local, virtual server, real servers)
        let cases: [(&str, bool, &str, &[&str]); 6] = [
            (
                "ClusterIP: every endpoint",
                false,
                "172.30.0.41:80",
                &["10.180.0.1:80", "10.180.2.1:80"],
            ),
            (
                "NodePort on the node IP",
                false,
                "192.168.0.2:3001",
                &["10.180.0.1:80", "10.180.2.1:80"],
            ),
            (
                "external IP",
                false,
                "192.168.99.11:80",
                &["10.180.0.1:80", "10.180.2.1:80"],
            ),
            (
                "eTP=Local ClusterIP: still every endpoint",
                true,
                "172.30.0.41:80",
                &["10.180.0.1:80", "10.180.2.1:80"],
            ),
            (
                "eTP=Local LB IP: the local endpoint",
                true,
                "1.2.3.4:80",
                &["10.180.0.1:80"],
            ),
            (
                "eTP=Local NodePort: the local endpoint",
                true,
                "192.168.0.2:3001",
                &["10.180.0.1:80"],
            ),
        ];
        for (case, local, vs, want) in cases {
            let s = if local {
                svc1().etp_local(30000)
            } else {
                svc1()
            };
            let d = desired(vec![s.build()], vec![slice1(&both)]);
            let servers = virtual_servers(&d, &cfg);
            let got = &servers[&key(6, vs)];
            assert_eq!(got.backends, backends(want), "{case}");
            assert_eq!(got.server.scheduler, "rr", "{case}");
            assert_eq!(got.server.flags, 0, "{case}: no affinity, no persistence");
        }
    }

    #[test]
    fn affinity_is_persistence_and_addresses_exclude_nodeports() {
        let d = desired(
            vec![svc1().affinity(600).build()],
            vec![slice1(&[("10.180.0.1", "node-a")])],
        );
        let cfg = IpvsConfig {
            scheduler: "lc".into(),
            ..IpvsConfig::default()
        };
        let vs = &virtual_servers(&d, &cfg)[&key(6, "172.30.0.41:80")].server;
        assert_eq!((vs.flags, vs.timeout), (netlink::SVC_F_PERSISTENT, 600));
        assert_eq!(vs.scheduler, "lc");
        let bound: Vec<String> = bound_addresses(&d)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            bound,
            ["1.2.3.4", "172.30.0.41", "192.168.99.11"],
            "no node IP"
        );
    }

    #[test]
    fn ipset_members_follow_upstream() {
        let d = desired(
            vec![svc1().etp_local(30000).build()],
            vec![slice1(&[("10.180.2.1", "node-b")])],
        );
        let m = rules::members(&d, &bound_addresses(&d));
        let has = |set: &str, entry: &str| m[set].contains(entry);
        assert!(has("KUBE-CLUSTER-IP", "172.30.0.41,tcp:80"));
        assert!(has("KUBE-EXTERNAL-IP-LOCAL", "192.168.99.11,tcp:80"));
        assert!(!has("KUBE-EXTERNAL-IP", "192.168.99.11,tcp:80"));
        assert!(has("KUBE-LOAD-BALANCER", "1.2.3.4,tcp:80"));
        assert!(has("KUBE-LOAD-BALANCER-LOCAL", "1.2.3.4,tcp:80"));
        assert!(has("KUBE-NODE-PORT-TCP", "3001") && has("KUBE-NODE-PORT-LOCAL-TCP", "3001"));
        assert!(has("KUBE-HEALTH-CHECK-NODE-PORT", "30000"));
        assert!(has("KUBE-LOOP-BACK", "10.180.2.1,tcp:80,10.180.2.1"));
        assert!(has("KUBE-IPVS-IPS", "172.30.0.41"));
        // No local endpoint: outside clients of the eTP=Local frontends are dropped; the
        // ClusterIP still has its remote endpoint.
        assert!(has("KPR-DROP", "1.2.3.4,tcp:80"), "{:?}", m["KPR-DROP"]);
        assert!(!has("KPR-DROP", "172.30.0.41,tcp:80"));
        let none = desired(vec![svc1().build()], vec![]);
        let m = rules::members(&none, &bound_addresses(&none));
        assert!(
            m["KPR-REJECT"].contains("172.30.0.41,tcp:80"),
            "no endpoints: refused"
        );
    }
}
