//! The conformance runner: fixtures in the format of `shared/fixtures/FORMAT.md`, checked
//! against the model (`--level model`, no root needed).
//!
//! Each fixture is one node's view of a small cluster plus flows with expected outcomes. The
//! runner builds the store from the fixture's objects, computes the desired state with
//! [`model::compute`] — the very function the agent uses — and asks [`model::resolve`] what
//! happens to each flow. `steps` apply deletes, then applies, then check their own flows.
//! The datapath level (real packets through a netns topology per mode) plugs in behind the
//! same [`Level`] switch.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{self, Decision, Flow, NodeInfo, NodePortAddresses, ProxyConfig};
use crate::source::objects_from_values;
use crate::store::{Change, ObjectRef, Protocol, Store};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// The pure model: which backends, verdict and masquerade each flow gets.
    Model,
    /// Real connections through a netns topology per fixture, kpr's datapath in between
    /// (root).
    Datapath,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    Ebpf,
    Iptables,
    Nftables,
    Ipvs,
}

impl ProxyMode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fixture {
    pub id: String,
    #[serde(default)]
    pub source: String,
    pub node: FixtureNode,
    #[serde(default)]
    pub config: FixtureConfig,
    #[serde(default)]
    pub objects: Vec<serde_json::Value>,
    #[serde(default)]
    pub flows: Vec<FixtureFlow>,
    #[serde(default)]
    pub steps: Vec<FixtureStep>,
    #[serde(default)]
    pub modes: BTreeMap<String, BTreeMap<String, Expect>>,
}

#[derive(Debug, Deserialize)]
pub struct FixtureNode {
    pub name: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FixtureConfig {
    #[serde(default = "default_cluster_cidr", rename = "clusterCIDR")]
    pub cluster_cidr: String,
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub masquerade_all: bool,
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
    #[serde(default = "yes")]
    pub localhost_node_ports: bool,
}

fn default_cluster_cidr() -> String {
    "10.0.0.0/8".into()
}
const fn yes() -> bool {
    true
}

impl Default for FixtureConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: default_cluster_cidr(),
            service_cidrs: Vec::new(),
            masquerade_all: false,
            node_port_addresses: Vec::new(),
            localhost_node_ports: true,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct FixtureFlow {
    pub name: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    #[serde(default)]
    pub proto: Option<String>,
    pub expect: Expect,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Expect {
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    #[serde(default)]
    pub masq: Option<bool>,
    #[serde(default)]
    pub verdict: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct FixtureStep {
    #[serde(default)]
    pub apply: Vec<serde_json::Value>,
    #[serde(default)]
    pub delete: Vec<DeleteRef>,
    #[serde(default)]
    pub flows: Vec<FixtureFlow>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteRef {
    pub kind: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
}

fn default_namespace() -> String {
    "default".into()
}

/// One flow's result.
#[derive(Debug)]
pub struct FlowResult {
    pub fixture: String,
    pub flow: String,
    /// `None` when it passed; otherwise what went wrong (or, starting with "skipped:", why
    /// it could not be checked here).
    pub failure: Option<String>,
}

impl FlowResult {
    #[must_use]
    pub fn skipped(&self) -> bool {
        self.failure
            .as_deref()
            .is_some_and(|f| f.starts_with("skipped:"))
    }
}

/// All fixtures' results.
#[derive(Debug, Default)]
pub struct Report {
    pub results: Vec<FlowResult>,
    /// Fixtures that could not be loaded at all.
    pub broken: Vec<(PathBuf, String)>,
}

impl Report {
    #[must_use]
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }
    #[must_use]
    pub fn skipped(&self) -> usize {
        self.results.iter().filter(|r| r.skipped()).count()
    }
    #[must_use]
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed() - self.skipped() + self.broken.len()
    }
}

/// Parses a fixture's `nodePortAddresses` for `mode`.
fn node_port_addresses(values: &[String], mode: ProxyMode) -> Result<NodePortAddresses> {
    if values.is_empty() {
        return Ok(match mode {
            ProxyMode::Nftables => NodePortAddresses::Primary,
            _ => NodePortAddresses::All,
        });
    }
    if values.iter().any(|v| v == "primary") {
        return Ok(NodePortAddresses::Primary);
    }
    values
        .iter()
        .map(|v| {
            v.parse()
                .map_err(|_| Error::invalid(format!("nodePortAddresses entry {v:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>>>()
        .map(NodePortAddresses::Cidrs)
}

pub(crate) fn proxy_config(c: &FixtureConfig, mode: ProxyMode) -> Result<ProxyConfig> {
    let cluster_cidrs = if c.cluster_cidr.is_empty() {
        Vec::new()
    } else {
        c.cluster_cidr
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| Error::invalid(format!("clusterCIDR {s:?} is not a CIDR")))
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(ProxyConfig {
        cluster_cidrs,
        service_cidrs: c.service_cidrs.clone(),
        masquerade_all: c.masquerade_all,
        maglev_default: false,
        node_port_addresses: node_port_addresses(&c.node_port_addresses, mode)?,
        localhost_node_ports: c.localhost_node_ports,
    })
}

fn parse_backend(s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|_| Error::invalid(format!("backend {s:?} is not ip:port ([v6]:port)")))
}

/// Compares a decision with an expectation; `Err` says how they differ.
fn check(expect: &Expect, decision: &Decision, src: IpAddr) -> Result<(), String> {
    let got = describe(decision);
    if let Some(verdict) = &expect.verdict {
        let ok = matches!(
            (verdict.as_str(), decision),
            ("REJECT", Decision::Reject)
                | ("DROP", Decision::Drop)
                | ("NONE", Decision::None)
                | ("ACCEPT", Decision::Accept)
        );
        return if ok {
            Ok(())
        } else {
            Err(format!("expected {verdict}, got {got}"))
        };
    }
    let Some(want) = &expect.backends else {
        return Err("expect has neither backends nor verdict".into());
    };
    let want: BTreeSet<SocketAddr> = want
        .iter()
        .map(|b| parse_backend(b))
        .collect::<Result<_>>()
        .map_err(|e| e.to_string())?;
    let Decision::Backends(backends) = decision else {
        return Err(format!("expected backends {}, got {got}", fmt_set(&want)));
    };
    let have: BTreeSet<SocketAddr> = backends.iter().map(|(a, _)| *a).collect();
    if have != want {
        return Err(format!(
            "expected backends {}, got {}",
            fmt_set(&want),
            fmt_set(&have)
        ));
    }
    if let Some(masq) = expect.masq {
        for (addr, m) in backends {
            // A pod reaching itself is always masqueraded (hairpin), whatever the flow says.
            let expected = masq || addr.ip() == src;
            if *m != expected {
                return Err(format!(
                    "expected masq={expected} towards {addr}, got masq={m}"
                ));
            }
        }
    }
    Ok(())
}

fn fmt_set(s: &BTreeSet<SocketAddr>) -> String {
    let v: Vec<String> = s.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Backends(b) => {
            let v: Vec<String> = b
                .iter()
                .map(|(a, m)| format!("{a}{}", if *m { " (masq)" } else { "" }))
                .collect();
            format!("backends [{}]", v.join(", "))
        }
        Decision::Reject => "REJECT".into(),
        Decision::Drop => "DROP".into(),
        Decision::None => "NONE".into(),
        Decision::Accept => "ACCEPT".into(),
    }
}

fn apply_objects(store: &mut Store, values: &[serde_json::Value]) -> Result<()> {
    let objs = objects_from_values(values)?;
    for s in objs.services {
        store.apply(Change::ServiceUpsert(s));
    }
    for s in objs.slices {
        store.apply(Change::SliceUpsert(s));
    }
    Ok(())
}

/// Runs one fixture at model level.
///
/// # Errors
/// The fixture itself is malformed (bad objects, unknown delete kind, bad config).
pub fn run_fixture(fx: &Fixture, mode: ProxyMode) -> Result<Vec<FlowResult>> {
    let node = NodeInfo {
        name: fx.node.name.clone(),
        ips: fx.node.ips.clone(),
        labels: fx.node.labels.clone(),
    };
    let config = proxy_config(&fx.config, mode)?;
    let overrides = fx.modes.get(mode.as_str());
    let mut store = Store::default();
    apply_objects(&mut store, &fx.objects)?;
    let mut results = Vec::new();
    let mut check_flows = |store: &Store, flows: &[FixtureFlow]| -> Result<()> {
        let desired = model::compute(store, &node, &config);
        for f in flows {
            let protocol = Protocol::parse(f.proto.as_deref())
                .map_err(|e| e.context(format!("flow {:?}", f.name)))?;
            let flow = Flow {
                src: f.src,
                dst: f.dst,
                dport: f.dport,
                protocol,
            };
            let decision = model::resolve(&desired, &node, &config, &flow);
            let expect = overrides.and_then(|o| o.get(&f.name)).unwrap_or(&f.expect);
            results.push(FlowResult {
                fixture: fx.id.clone(),
                flow: f.name.clone(),
                failure: check(expect, &decision, f.src).err(),
            });
        }
        Ok(())
    };
    check_flows(&store, &fx.flows)?;
    for (i, step) in fx.steps.iter().enumerate() {
        for d in &step.delete {
            let id = ObjectRef::new(&d.namespace, &d.name);
            match d.kind.as_str() {
                "Service" => store.apply(Change::ServiceDelete(id)),
                "EndpointSlice" => store.apply(Change::SliceDelete(id)),
                other => {
                    return Err(Error::invalid(format!(
                        "step {}: cannot delete kind {other:?}",
                        i + 1
                    )));
                }
            };
        }
        apply_objects(&mut store, &step.apply).map_err(|e| e.context(format!("step {}", i + 1)))?;
        check_flows(&store, &step.flows)?;
    }
    Ok(results)
}

/// Loads every `*.yaml`/`*.yml`/`*.json` fixture in `dir` (sorted) and runs it.
///
/// # Errors
/// The directory cannot be read.
pub fn run_dir(dir: &Path, level: Level, mode: ProxyMode) -> Result<Report> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    paths.sort();
    let mut report = Report::default();
    for path in paths {
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_norway::from_str::<Fixture>(&t).map_err(|e| e.to_string()));
        let fx = match loaded {
            Ok(fx) => fx,
            Err(e) => {
                report.broken.push((path, e));
                continue;
            }
        };
        let index = report.results.len() + report.broken.len();
        let run = match level {
            Level::Model => run_fixture(&fx, mode),
            Level::Datapath => crate::conformance_datapath::run_fixture(&fx, mode, index),
        };
        match run {
            Ok(r) => report.results.extend(r),
            Err(e) => report.broken.push((path, e.to_string())),
        }
    }
    Ok(report)
}

/// The runner's output: one line per failing flow or broken fixture, then the summary.
#[must_use]
pub fn format_report(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (path, e) in &report.broken {
        let _ = writeln!(out, "FAIL {}: fixture not usable: {e}", path.display());
    }
    for r in &report.results {
        match &r.failure {
            Some(f) if r.skipped() => {
                let _ = writeln!(out, "SKIP {} / {:?}: {f}", r.fixture, r.flow);
            }
            Some(f) => {
                let _ = writeln!(out, "FAIL {} / {:?}: {f}", r.fixture, r.flow);
            }
            None => {}
        }
    }
    let _ = write!(
        out,
        "{} passed, {} failed",
        report.passed(),
        report.failed()
    );
    if report.skipped() > 0 {
        let _ = write!(out, ", {} skipped", report.skipped());
    }
    out.push('\n');
    out
}
