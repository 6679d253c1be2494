//! kpr: a kube-proxy replacement with an eBPF datapath.
//!
//! Data flows one way: sources ([`source`]: manifests, the API, and the conversion of API
//! types) turn the world into change events for the [`store`] (compact, no API types); the
//! pure [`model`] turns the store into the desired state; one renderer per mode ([`render`])
//! applies only the difference to the kernel. The [`agent`] runs that loop for one renderer;
//! [`serve`] (HTTP endpoints), [`cli`], [`conformance`] and [`testnet`] stand beside it.
pub mod agent;
pub mod caps;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod events;
pub mod metrics;
pub mod model;
pub mod render;
pub mod serve;
pub mod source;
pub mod store;
pub mod sysctl;
pub mod testkit;
pub mod testnet;

use std::path::PathBuf;

/// Everything that can go wrong in kpr's library code. Kernel errors keep their source
/// (aya's typed errors, the `io::Error` of a syscall), so a caller can tell a full map from a
/// missing one without reading the message.
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
    /// A BPF map operation failed (the kernel's errno included: "No space left", say).
    #[error("{op} {map}: {}{}", with_causes(source), full_hint(source))]
    Map {
        map: String,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A map (or the id space kpr keeps for it) has no room for another entry.
    #[error("{map} is full: {detail}")]
    MapFull { map: String, detail: String },
    /// A BPF program could not be loaded, attached, replaced or run.
    #[error("{op} {program}: {source}")]
    Program {
        program: String,
        op: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The eBPF object (or one of its maps) could not be loaded.
    #[error("loading the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    /// A pinned object could not be pinned or opened.
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// A link could not be opened, updated or converted.
    #[error("{op} {what}: {source}")]
    Link {
        what: String,
        op: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A document that does not parse or does not have the shape of its kind (YAML, JSON,
    /// an API object), with the parser's error.
    #[error("{what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The API server configuration or client could not be set up.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// This build or kernel cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
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

    pub fn decode(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Decode {
            what: what.into(),
            source: Box::new(source),
        }
    }

    pub fn api(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }

    pub fn map(map: impl Into<String>, op: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map: map.into(),
            op,
            source,
        }
    }

    pub fn program(
        program: impl Into<String>,
        op: &'static str,
        source: aya::programs::ProgramError,
    ) -> Self {
        Self::Program {
            program: program.into(),
            op,
            source,
        }
    }

    pub fn link(
        what: impl Into<String>,
        op: &'static str,
        source: aya::programs::links::LinkError,
    ) -> Self {
        Self::Link {
            what: what.into(),
            op,
            source,
        }
    }

    /// The map that had no room (as [`Error::is_map_full`]), by name.
    #[must_use]
    pub fn full_map(&self) -> Option<&str> {
        match self {
            Self::MapFull { map, .. } => Some(map),
            Self::Context { source, .. } => source.full_map(),
            Self::Map { map, .. } if self.is_map_full() => Some(map),
            _ => None,
        }
    }

    /// True when a map had no room: kpr's own id spaces, or the kernel refusing an insert
    /// with E2BIG or ENOSPC (through any context).
    #[must_use]
    pub fn is_map_full(&self) -> bool {
        match self {
            Self::MapFull { .. } => true,
            Self::Context { source, .. } => source.is_map_full(),
            Self::Map {
                source: aya::maps::MapError::SyscallError(e),
                ..
            } => matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// " (the map is full)" when the kernel refused with E2BIG or ENOSPC (what a full hash map
/// says, in words an operator would not guess).
fn full_hint(e: &aya::maps::MapError) -> &'static str {
    match e {
        aya::maps::MapError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
        {
            " (the map is full)"
        }
        _ => "",
    }
}

/// `e` and each error it was caused by, joined by ": ".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
