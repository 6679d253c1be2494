//! Kubernetes Events (events.k8s.io/v1), as upstream kube-proxy records them: the Node's
//! `Starting` when the agent starts, `FailedToStartServiceHealthcheck` on a Service whose
//! healthCheckNodePort cannot be listened on; and kpr's own `FailedToProgramService` on a
//! Service the datapath refused (a full map, say).
//!
//! Events go out from one background task (kube-rs's `Recorder`, which folds repeats into an
//! event series) so that recording never delays a sync; without an API server (the manifests
//! source) nothing is recorded. A failure to record is logged at debug level: Events are
//! best effort, as upstream's.
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::store::ObjectRef;

/// What an Event is about.
#[derive(Clone, Debug)]
pub enum Regarding {
    Node(String),
    Service(ObjectRef),
}

impl Regarding {
    fn reference(&self) -> ObjectReference {
        match self {
            // upstream's node reference: UID = the node name, no namespace (its Events go to
            // "default").
            Self::Node(name) => ObjectReference {
                kind: Some("Node".into()),
                api_version: Some("v1".into()),
                name: Some(name.clone()),
                uid: Some(name.clone()),
                ..ObjectReference::default()
            },
            Self::Service(s) => ObjectReference {
                kind: Some("Service".into()),
                api_version: Some("v1".into()),
                namespace: Some(s.namespace.to_string()),
                name: Some(s.name.to_string()),
                ..ObjectReference::default()
            },
        }
    }
}

struct Pending {
    regarding: Regarding,
    event: Event,
}

static SINK: OnceLock<mpsc::UnboundedSender<Pending>> = OnceLock::new();
static NODE: OnceLock<String> = OnceLock::new();

/// Starts recording through `client`, as controller `kube-proxy` (what dashboards and
/// `kubectl get events --field-selector reportingController=kube-proxy` look for), instance
/// `node`. Later calls do nothing.
pub fn start(client: kube::Client, node: &str) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
    if SINK.set(tx).is_err() {
        return;
    }
    let _ = NODE.set(node.to_string());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "kube-proxy".into(),
            instance: Some(node.to_string()),
        },
    );
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if let Err(e) = recorder.publish(&p.event, &p.regarding.reference()).await {
                tracing::debug!(reason = %p.event.reason, "recording an Event: {e}");
            }
        }
    });
}

/// Records an Event about this node (no-op without an API server).
pub fn record_on_node(warning: bool, reason: &str, action: &str, note: impl Into<String>) {
    if let Some(node) = NODE.get() {
        record(Regarding::Node(node.clone()), warning, reason, action, note);
    }
}

/// Records an Event (no-op without an API server).
pub fn record(
    regarding: Regarding,
    warning: bool,
    reason: &str,
    action: &str,
    note: impl Into<String>,
) {
    let Some(tx) = SINK.get() else {
        return;
    };
    let note: String = note.into();
    // The API server refuses notes over 1 kB.
    let note = if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &note[..cut])
    } else {
        note
    };
    let _ = tx.send(Pending {
        regarding,
        event: Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        },
    });
}
