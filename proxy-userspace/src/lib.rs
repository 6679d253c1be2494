//! kpr: a kube-proxy replacement with an eBPF datapath.
//!
//! Data flows one way: a source ([`source`]) turns manifests (or the API) into change events
//! for the [`store`]; the pure [`model`] turns the store into the desired state; a renderer
//! (for the eBPF mode, [`ebpf::render`]) applies only the difference to the kernel.
pub mod agent;
pub mod cli;
pub mod conformance;
pub mod conformance_datapath;
pub mod ebpf;
pub mod kube_source;
pub mod model;
pub mod serve;
pub mod source;
pub mod store;
pub mod testnet;
pub mod trace;

use std::path::PathBuf;

/// Everything that can go wrong in kpr's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object or file that does not say what kpr needs, with the reason.
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a BPF operation.
    #[error("BPF: {0}")]
    Bpf(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }

    #[must_use]
    pub fn context(self, context: impl Into<String>) -> Self {
        Self::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn bpf(msg: impl std::fmt::Display) -> Self {
        Self::Bpf(msg.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
