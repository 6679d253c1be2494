//! The fixture format of `shared/fixtures/FORMAT.md`, and what a run reports. Shared by the
//! model level and the datapath level.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::{NodeInfo, NodePortAddresses, ProxyConfig};
use crate::render::ProxyMode;
use crate::source::convert::{self, Objects, ProxySelector};
use crate::{Error, Result};

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

/// The model's configuration for a fixture under `mode` (with the mode's upstream defaults).
///
/// # Errors
/// A CIDR that does not parse.
pub fn proxy_config(c: &FixtureConfig, mode: ProxyMode) -> Result<ProxyConfig> {
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
    let mut config = ProxyConfig {
        cluster_cidrs,
        service_cidrs: c.service_cidrs.clone(),
        masquerade_all: c.masquerade_all,
        lb_algorithm: crate::store::LbAlgorithm::Random,
        node_port_addresses: NodePortAddresses::parse(&c.node_port_addresses)?,
        localhost_node_ports: c.localhost_node_ports,
        cluster_ip_checks: false,
        ..ProxyConfig::default()
    };
    crate::render::apply_mode_defaults(mode, &mut config, !c.node_port_addresses.is_empty());
    Ok(config)
}

pub fn parse_backend(s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|_| Error::invalid(format!("backend {s:?} is not ip:port ([v6]:port)")))
}

impl Fixture {
    /// This fixture's node, as the model takes it.
    #[must_use]
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            name: self.node.name.clone(),
            ips: self.node.ips.clone(),
            labels: self.node.labels.clone(),
            ..NodeInfo::default()
        }
    }

    /// The flows of the fixture and of every step, in order.
    pub fn all_flows(&self) -> impl Iterator<Item = &FixtureFlow> {
        self.flows
            .iter()
            .chain(self.steps.iter().flat_map(|s| s.flows.iter()))
    }
}

/// Converts a fixture's manifests (upstream's label selector applies, as in the agent).
///
/// # Errors
/// The first invalid object, with its index.
pub fn objects(values: &[serde_json::Value]) -> Result<Objects> {
    convert::objects(values, &ProxySelector::default())
}
