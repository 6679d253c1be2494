//! The conformance runner: fixtures in the format of `shared/fixtures/FORMAT.md` (a copy of
//! the ones the tests use is in `tests/fixtures/`; any directory in that format works).
//!
//! Each fixture is one node's view of a small cluster plus flows with expected outcomes,
//! checked at one of two levels: [`model`] (the pure model, no root) or [`datapath`] (real
//! connections through a netns topology with the agent in between, root). `steps` apply
//! deletes, then applies, then check their own flows. [`fixture`] holds the format.
pub mod datapath;
pub mod fixture;
pub mod model;

use std::path::{Path, PathBuf};

pub use fixture::{FlowResult, Report};

use crate::render::ProxyMode;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// The pure model: which backends, verdict and masquerade each flow gets.
    Model,
    /// Real connections through a netns topology per fixture, kpr's datapath in between
    /// (root).
    Datapath,
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
    if paths.is_empty() {
        report.broken.push((
            dir.to_path_buf(),
            "no fixture (*.yaml, *.yml, *.json) in this directory".into(),
        ));
    }
    for path in paths {
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_norway::from_str::<fixture::Fixture>(&t).map_err(|e| e.to_string())
            });
        let fx = match loaded {
            Ok(fx) => fx,
            Err(e) => {
                report.broken.push((path, e));
                continue;
            }
        };
        let index = report.results.len() + report.broken.len();
        let run = match level {
            Level::Model => model::run_fixture(&fx, mode),
            Level::Datapath => datapath::run_fixture(&fx, mode, index),
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
