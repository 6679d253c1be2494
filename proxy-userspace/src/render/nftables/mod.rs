//! The nftables mode: one table of kpr's own per family (`ip kpr`, `ip6 kpr`, see [`rules`]),
//! written with one `nft -f -` transaction per family and sync (atomic: a lookup sees the old
//! table or the new one).
//!
//! Incremental syncs diff against what kpr wrote last: only changed chains are flushed and
//! rewritten and only changed map elements added or deleted, so one Service change is a few
//! lines of transaction whatever the number of Services. A full sync first lists the
//! kernel's chains and sets, rewrites every chain and map, and deletes what kpr no longer
//! wants (or what someone else added to kpr's table); affinity sets keep their entries.
use std::collections::BTreeSet;
use std::process::Command;

pub mod rules;

use self::rules::{Set, TABLE, Table};
use super::plan::Family;
use super::{CleanupReport, MetricKind, ModeMetric, ProxyMode, Renderer, SyncReport};
use crate::model::{DesiredState, FrontendKey};
use crate::{Error, Result};

fn nft(args: &[&str], input: Option<&str>) -> std::io::Result<String> {
    super::run_tool(Command::new("nft").args(args), input)
}

const fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The names of the chains and sets in kpr's table of `family`, as the kernel holds them
/// (contents unknown), or `None` when there is no such table. Lists chains, sets and maps
/// separately: listing the whole table (every rule) costs ten times more.
fn read_kernel(family: Family) -> Option<Table> {
    let fam = family_name(family);
    let tables = nft(&["list", "tables", fam], None).ok()?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table {fam} {TABLE}"))
    {
        return None;
    }
    let mut t = Table {
        family: fam,
        ..Table::default()
    };
    for what in ["chains", "sets", "maps"] {
        let text = nft(&["-j", "list", what, fam], None).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        for item in json["nftables"].as_array().into_iter().flatten() {
            let chain = &item["chain"];
            if chain["table"] == TABLE
                && let Some(name) = chain["name"].as_str()
            {
                t.chains.insert(name.to_string(), vec!["<unknown>".into()]);
                if let Some(hook) = chain["hook"].as_str() {
                    t.base.insert(name.to_string(), format!("<{hook}>"));
                }
            }
            for kind in ["set", "map"] {
                let set = &item[kind];
                if set["table"] == TABLE
                    && let Some(name) = set["name"].as_str()
                {
                    t.sets.insert(
                        name.to_string(),
                        Set {
                            is_map: kind == "map",
                            decl: "<unknown>".into(),
                            elements: Default::default(),
                        },
                    );
                }
            }
        }
    }
    Some(t)
}

/// What kpr's table of `family` holds, as counts: chain -> rules, set/map -> elements
/// (affinity sets, which fill themselves, left out). For tests and the conformance runner.
#[must_use]
pub fn kernel_counts(family: Family) -> Option<std::collections::BTreeMap<String, usize>> {
    let text = nft(&["-j", "list", "table", family_name(family), TABLE], None).ok()?;
    Some(counts_of_json(&text))
}

/// [`kernel_counts`] of `nft -j list table` output.
#[must_use]
pub fn counts_of_json(text: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return out;
    };
    for item in json["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item["chain"]["name"].as_str() {
            out.entry(format!("chain {name}")).or_insert(0);
        }
        if let Some(chain) = item["rule"]["chain"].as_str() {
            *out.entry(format!("chain {chain}")).or_insert(0) += 1;
        }
        for kind in ["set", "map"] {
            let s = &item[kind];
            if let Some(name) = s["name"].as_str() {
                let dynamic = s["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "dynamic"));
                if !dynamic {
                    let n = s["elem"].as_array().map_or(0, Vec::len);
                    out.insert(format!("set {name}"), n);
                }
            }
        }
    }
    out
}

/// [`kernel_counts`] of a table kpr would write.
#[must_use]
pub fn counts_of(t: &Table) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for (name, rules) in &t.chains {
        out.insert(format!("chain {name}"), rules.len());
    }
    for (name, set) in &t.sets {
        if !set.decl.contains("dynamic") {
            out.insert(format!("set {name}"), set.elements.len());
        }
    }
    out
}

/// The nftables mode.
pub struct NftablesRenderer {
    families: Vec<Family>,
    written: Vec<(Family, Table)>,
    transactions: u64,
    state: super::RuleModeState,
}

impl NftablesRenderer {
    /// Checks that `nft` works here.
    ///
    /// # Errors
    /// No working `nft` (or no nf_tables in the kernel).
    pub fn start() -> Result<Self> {
        nft(&["list", "tables"], None).map_err(|e| {
            Error::Unsupported(format!("nft does not work here ({e}); install nftables"))
        })?;
        Ok(Self {
            families: vec![Family::V4, Family::V6],
            written: Vec::new(),
            transactions: 0,
            state: super::RuleModeState::default(),
        })
    }

    fn sync(&mut self, desired: &DesiredState, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        if full
            && desired.localhost_node_ports
            && let Err(e) = super::enable_route_localnet()
        {
            report.errors.push(e);
        }
        for family in self.families.clone() {
            let new = rules::build(desired, family);
            let old = if full {
                read_kernel(family)
            } else {
                self.written
                    .iter()
                    .find(|(f, _)| *f == family)
                    .map(|(_, t)| t.clone())
                    .or_else(|| read_kernel(family))
            };
            let Some(tx) = rules::transaction(old.as_ref(), &new) else {
                self.remember(family, new);
                continue;
            };
            let lines = tx.lines().count();
            match nft(&["-f", "-"], Some(&tx)) {
                Ok(_) => {
                    self.transactions += 1;
                    report.changes += lines;
                    report.detail.push((
                        if family == Family::V4 {
                            "ipv4_nft_lines"
                        } else {
                            "ipv6_nft_lines"
                        },
                        lines,
                    ));
                    self.remember(family, new);
                }
                Err(e) => {
                    self.written.retain(|(f, _)| *f != family);
                    report.errors.push(
                        Error::io("nft -f -", e)
                            .context(format!("applying the {} table", family_name(family))),
                    );
                }
            }
        }
        if report.errors.is_empty() {
            self.state.conntrack.after_sync(desired, &mut report);
        }
        report
    }

    fn remember(&mut self, family: Family, t: Table) {
        self.written.retain(|(f, _)| *f != family);
        self.written.push((family, t));
    }
}

/// Deletes kpr's nftables tables and kube-proxy's (`kube-proxy` in `ip` and `ip6`); does
/// nothing where they do not exist.
///
/// # Errors
/// A table exists but could not be deleted.
pub fn cleanup() -> Result<CleanupReport> {
    cleanup_tables(&[TABLE, "kube-proxy"])
}

/// Deletes the nftables `tables` of both families where they exist.
///
/// # Errors
/// A table could not be deleted.
pub fn cleanup_tables(tables: &[&str]) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    for fam in ["ip", "ip6"] {
        for table in tables {
            if nft(&["list", "table", fam, table], None).is_err() {
                continue;
            }
            nft(&["delete", "table", fam, table], None)
                .map_err(|e| Error::io("nft delete table", e).context(format!("{fam} {table}")))?;
            report.removed.push(format!("nftables table {fam} {table}"));
        }
    }
    Ok(report)
}

impl NftablesRenderer {
    /// Deletes kpr's own tables (not kube-proxy's) and forgets what was written: the ebpf
    /// mode's fallback when no frontend needs it.
    ///
    /// # Errors
    /// A table could not be deleted.
    pub fn cleanup_own_tables(&mut self) -> Result<CleanupReport> {
        self.written.clear();
        cleanup_tables(&[TABLE])
    }
}

impl Renderer for NftablesRenderer {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }

    fn sync_full(&mut self, desired: &DesiredState) -> SyncReport {
        self.state.full_sync_started();
        self.sync(desired, true)
    }

    fn resync(&mut self, desired: &DesiredState) -> SyncReport {
        let full = self.state.resync_is_full();
        self.sync(desired, full)
    }

    fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        _keys: &BTreeSet<FrontendKey>,
    ) -> SyncReport {
        self.sync(desired, false)
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        self.written.clear();
        cleanup()
    }

    fn metrics(&self) -> Vec<ModeMetric> {
        vec![
            self.state.conntrack.metric(),
            ModeMetric {
                name: "nftables_transactions_total",
                help: "nft transactions applied (one per family and sync that changed something).",
                kind: MetricKind::Counter,
                #[expect(clippy::cast_precision_loss, reason = "a counter far below 2^52")]
                value: self.transactions as f64,
                labels: Vec::new(),
            },
        ]
    }
}
