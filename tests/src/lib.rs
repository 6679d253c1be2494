//! Test support: the netns harness (re-exported from `kpr::testnet`, which the conformance
//! runner uses too) and the Kubernetes API server emulator.
pub mod emulator;

pub use kpr::testnet::*;
