//! The iptables mode: the desired state as iptables rules in upstream kube-proxy's layout
//! ([`rules`]), applied with one `iptables-restore --noflush` per family and sync.
//!
//! - **Backend**: iptables-nft or iptables-legacy, whichever already holds `KUBE-*` chains
//!   (so a node that ran kube-proxy keeps one backend), else the one `iptables` points at.
//! - **Partial syncs** (upstream's KEP-3453): kpr remembers the rules it wrote per chain and
//!   rewrites only chains whose rules changed; chains that are no longer wanted are flushed
//!   and deleted in the same transaction. A full sync re-reads the kernel first (`iptables-save`),
//!   so chains changed or left behind by someone else are rewritten or removed.
//! - The jumps from the built-in chains are ensured with `-C`/`-I` at each full sync.
//! - `/run/xtables.lock` is honoured (`-w`).
use std::collections::BTreeSet;
use std::process::Command;

pub mod rules;

use self::rules::{JUMPS, Ruleset};
use super::plan::Family;
use super::{CleanupReport, MetricKind, ModeMetric, ProxyMode, Renderer, SyncReport};
use crate::model::{DesiredState, FrontendKey};
use crate::{Error, Result};

/// Which iptables binaries to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    /// The binary for `tool` (`iptables`, `iptables-restore`, `iptables-save`) of `family`.
    #[must_use]
    pub fn command(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => tool.to_string(),
            Family::V6 => tool.replacen("iptables", "ip6tables", 1),
        };
        let (head, tail) = base
            .split_once('-')
            .map_or((base.as_str(), ""), |(h, t)| (h, t));
        let variant = match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        };
        if tail.is_empty() {
            format!("{head}-{variant}")
        } else {
            format!("{head}-{variant}-{tail}")
        }
    }

    /// The backend to use: the one holding `KUBE-*` chains, else the system default.
    #[must_use]
    pub fn detect() -> Self {
        let has_kube = |b: Self| {
            Command::new(b.command(Family::V4, "iptables-save"))
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(":KUBE-"))
        };
        if has_kube(Self::Nft) {
            return Self::Nft;
        }
        if has_kube(Self::Legacy) {
            return Self::Legacy;
        }
        let default_is_legacy = Command::new("iptables")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("legacy"));
        if default_is_legacy {
            Self::Legacy
        } else {
            Self::Nft
        }
    }
}

use super::run_tool as run;

/// The `KUBE-*` chains the kernel holds (filter and nat), with their rules, and the whole
/// `iptables-save` text (whose built-in chains show the jumps).
pub(crate) fn read_kernel(backend: Backend, family: Family) -> Result<(Ruleset, String)> {
    let mut rs = Ruleset::default();
    let mut all = String::new();
    for table in ["filter", "nat"] {
        let save = backend.command(family, "iptables-save");
        let text = run(Command::new(&save).args(["-t", table]), None)
            .map_err(|e| Error::io(&save, e).context(format!("reading the {table} table")))?;
        let chains = if table == "filter" {
            &mut rs.filter
        } else {
            &mut rs.nat
        };
        *chains = parse_save(&text);
        all.push_str(&text);
    }
    Ok((rs, all))
}

/// The `KUBE-*` chains of one table in `iptables-save` output, with their rules.
#[must_use]
pub fn parse_save(text: &str) -> rules::Chains {
    let mut chains = rules::Chains::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if name.starts_with("KUBE-") {
                chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if let Some(rules) = chains.get_mut(chain) {
                rules.push(line.to_string());
            }
        }
    }
    chains
}

/// The iptables mode for the families this node has.
pub struct IptablesRenderer {
    backend: Backend,
    families: Vec<Family>,
    /// What kpr wrote last, per family (the diff base of partial syncs).
    written: Vec<(Family, Ruleset)>,
    restores: u64,
    state: super::RuleModeState,
}

impl IptablesRenderer {
    /// Finds the backend and the families whose tools work here.
    ///
    /// # Errors
    /// No working `iptables-restore` at all.
    pub fn start() -> Result<Self> {
        let backend = Backend::detect();
        let families = working_families(backend);
        if families.is_empty() {
            return Err(Error::Unsupported(format!(
                "no working {} (install iptables)",
                backend.command(Family::V4, "iptables-save")
            )));
        }
        tracing::info!(?backend, ?families, "iptables mode");
        Ok(Self {
            backend,
            families,
            written: Vec::new(),
            restores: 0,
            state: super::RuleModeState::default(),
        })
    }

    fn ensure_jumps(&self, family: Family, current: &str) -> Result<()> {
        ensure_jumps(self.backend, family, &JUMPS, current)
    }

    fn restore(&mut self, family: Family, input: &str) -> Result<()> {
        let restore = self.backend.command(family, "iptables-restore");
        run(
            Command::new(&restore).args(["-w", "5", "--noflush", "--counters"]),
            Some(input),
        )
        .map_err(|e| Error::io(&restore, e).context("applying the rules"))?;
        self.restores += 1;
        Ok(())
    }

    fn sync(&mut self, desired: &DesiredState, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        // upstream: localhost NodePorts need route_localnet.
        if full
            && desired.localhost_node_ports
            && let Err(e) = super::enable_route_localnet()
        {
            report.errors.push(e);
        }
        for family in self.families.clone() {
            let new = rules::build(desired, family);
            let (old, saved) = if full {
                match read_kernel(self.backend, family) {
                    Ok((k, text)) => {
                        // Chains this sync deletes may still be jumped to from the built-in
                        // chains (an ipvs mode's or kube-proxy's layout): unhook them first.
                        unhook_gone(self.backend, family, &text, &k, &new);
                        (k, Some(text))
                    }
                    Err(e) => {
                        report.errors.push(e);
                        continue;
                    }
                }
            } else {
                let written = self
                    .written
                    .iter()
                    .find(|(f, _)| *f == family)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                (written, None)
            };
            let Some(input) = rules::restore_input(&old, &new) else {
                self.remember(family, new);
                if let Some(text) = &saved
                    && let Err(e) = self.ensure_jumps(family, text)
                {
                    report.errors.push(e);
                }
                continue;
            };
            let chains = input.lines().filter(|l| l.starts_with(':')).count();
            match self.restore(family, &input) {
                Ok(()) => {
                    report.changes += chains;
                    report.detail.push((
                        if family == Family::V4 {
                            "ipv4_chains_written"
                        } else {
                            "ipv6_chains_written"
                        },
                        chains,
                    ));
                    self.remember(family, new);
                    // The chains exist now: hook them in.
                    if let Some(text) = &saved
                        && let Err(e) = self.ensure_jumps(family, text)
                    {
                        report.errors.push(e);
                    }
                }
                Err(e) => {
                    // The next sync starts from what the kernel holds.
                    self.written.retain(|(f, _)| *f != family);
                    report.errors.push(e);
                }
            }
        }
        if report.errors.is_empty() {
            self.state.conntrack.after_sync(desired, &mut report);
        }
        report
    }

    fn remember(&mut self, family: Family, rs: Ruleset) {
        self.written.retain(|(f, _)| *f != family);
        self.written.push((family, rs));
    }
}

/// The families whose `iptables-save` of `backend` works here.
#[must_use]
pub(crate) fn working_families(backend: Backend) -> Vec<Family> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| {
            Command::new(backend.command(*f, "iptables-save"))
                .args(["-t", "nat"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect()
}

/// Inserts the `jumps` from the built-in chains that `current` (iptables-save text of before
/// the sync: jumps are not touched by a restore) lacks. They are inserted at the top in
/// reverse, so they end up in `jumps` order.
///
/// # Errors
/// `iptables -I` failed.
pub(crate) fn ensure_jumps(
    backend: Backend,
    family: Family,
    jumps: &[(&str, &str, &str)],
    current: &str,
) -> Result<()> {
    let iptables = backend.command(family, "iptables");
    for (table, chain, spec) in jumps.iter().rev() {
        let args = shell_words(spec);
        let present = current.contains(&format!("-A {chain} {spec}"))
            || Command::new(&iptables)
                .args(["-w", "-t", table, "-C", chain])
                .args(&args)
                .output()
                .is_ok_and(|o| o.status.success());
        if !present {
            run(
                Command::new(&iptables)
                    .args(["-w", "-t", table, "-I", chain, "1"])
                    .args(&args),
                None,
            )
            .map_err(|e| Error::io(&iptables, e).context(format!("jump {table}/{chain}")))?;
        }
    }
    Ok(())
}

/// Deletes the rules of built-in chains (in `saved`, iptables-save text of both tables) that
/// jump to a `KUBE-*` chain of `kernel` that `new` does not have, so the restore can delete it.
pub(crate) fn unhook_gone(
    backend: Backend,
    family: Family,
    saved: &str,
    kernel: &rules::Ruleset,
    new: &rules::Ruleset,
) {
    let iptables = backend.command(family, "iptables");
    let mut table = "";
    for line in saved.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "nat" {
                "nat"
            } else if t == "filter" {
                "filter"
            } else {
                ""
            };
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let (old, new) = match table {
            "filter" => (&kernel.filter, &new.filter),
            "nat" => (&kernel.nat, &new.nat),
            _ => continue,
        };
        let mut words = shell_words(rule);
        let chain = words.remove(0);
        if chain.starts_with("KUBE-") {
            continue;
        }
        let target = words
            .iter()
            .position(|w| w == "-j" || w == "-g")
            .and_then(|i| words.get(i + 1));
        if let Some(t) = target
            && old.contains_key(t)
            && !new.contains_key(t)
        {
            let _ = Command::new(&iptables)
                .args(["-w", "-t", table, "-D", &chain])
                .args(&words)
                .output();
        }
    }
}

/// Splits a rule spec into arguments, keeping double-quoted strings whole.
pub(crate) fn shell_words(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Removes every `KUBE-*` chain and the jumps to them from both backends and families
/// (kube-proxy's iptables state and kpr's alike). Leaves everything else alone; does nothing
/// where no `KUBE-*` chain exists.
///
/// # Errors
/// A table could not be rewritten.
pub fn cleanup() -> Result<CleanupReport> {
    cleanup_keeping(&[], &[], &[])
}

/// [`cleanup`] but for the chains named in `keep_filter` / `keep_nat` and the jumps in
/// `keep_jumps` (the ipvs mode keeps its own layout while the iptables mode's chains go).
///
/// # Errors
/// A table could not be rewritten.
pub fn cleanup_keeping(
    keep_filter: &[&str],
    keep_nat: &[&str],
    keep_jumps: &[(&str, &str, &str)],
) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [Family::V4, Family::V6] {
            let Ok((mut kernel, _)) = read_kernel(backend, family) else {
                continue;
            };
            for c in keep_filter {
                kernel.filter.remove(*c);
            }
            for c in keep_nat {
                kernel.nat.remove(*c);
            }
            if kernel.filter.is_empty() && kernel.nat.is_empty() {
                continue;
            }
            let iptables = backend.command(family, "iptables");
            // Both layouts' jumps (iptables and ipvs mode): a chain still jumped to cannot go.
            for (table, chain, spec) in JUMPS.iter().chain(&crate::render::ipvs::rules::JUMPS) {
                if keep_jumps.contains(&(*table, *chain, *spec)) {
                    continue;
                }
                let _ = Command::new(&iptables)
                    .args(["-w", "-t", table, "-D", chain])
                    .args(shell_words(spec))
                    .output();
            }
            if let Some(input) = rules::restore_input(&kernel, &Ruleset::default()) {
                let restore = backend.command(family, "iptables-restore");
                run(
                    Command::new(&restore).args(["-w", "5", "--noflush"]),
                    Some(&input),
                )
                .map_err(|e| Error::io(&restore, e).context("removing KUBE-* chains"))?;
            }
            for c in kernel.filter.keys().chain(kernel.nat.keys()) {
                report.removed.push(format!("{iptables} {c}"));
            }
        }
    }
    Ok(report)
}

impl Renderer for IptablesRenderer {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
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
        // The rule set is rebuilt from the desired state, but only chains whose rules
        // changed are written: the touched Services' chains and the dispatch chains.
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
                name: "iptables_restores_total",
                help: "iptables-restore runs (one per family and sync that changed something).",
                kind: MetricKind::Counter,
                #[expect(clippy::cast_precision_loss, reason = "a counter far below 2^52")]
                value: self.restores as f64,
                labels: Vec::new(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_commands() {
        assert_eq!(
            Backend::Nft.command(Family::V4, "iptables-restore"),
            "iptables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.command(Family::V6, "iptables-save"),
            "ip6tables-legacy-save"
        );
        assert_eq!(
            Backend::Nft.command(Family::V6, "iptables"),
            "ip6tables-nft"
        );
    }

    #[test]
    fn rule_specs_split_like_a_shell() {
        assert_eq!(
            shell_words("-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
            [
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }
}
