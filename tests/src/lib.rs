//! Test support: the netns harness (re-exported from `kpr::testnet`, which the conformance
//! runner uses too) and the Kubernetes API server emulator.
pub mod emulator;

pub use kpr::testnet::*;

/// The conformance fixtures the tests run: `KPR_FIXTURES`, else the copy in this repository
/// (`tests/fixtures`, the format of `tests/fixtures/FORMAT.md`).
#[must_use]
pub fn fixtures_dir() -> std::path::PathBuf {
    std::env::var_os("KPR_FIXTURES").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        std::path::PathBuf::from,
    )
}
