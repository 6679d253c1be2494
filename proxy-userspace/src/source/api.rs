//! The Kubernetes API source: kube-rs watchers on Services, EndpointSlices and this node.
//!
//! Objects are watched untyped (`DynamicObject`) and converted one by one, so a malformed
//! object is logged and skipped instead of failing the whole list. Each watcher relists with
//! backoff after errors; a relist replaces that kind's objects in the store at once
//! (`InitDone`). While the API server is unreachable nothing is sent, so the programmed
//! datapath stays as it was.
use std::path::PathBuf;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::mpsc;

use super::convert::{self, ProxySelector};
use crate::store::{Change, NodeInfo, ObjectRef, ServiceInfo, SliceInfo};
use crate::{Error, Result};

/// Where and how to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct ApiConfig {
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub selector: ProxySelector,
    pub node_name: String,
}

/// Builds a client from `--kubeconfig` / `--master`, or in-cluster / default config.
///
/// # Errors
/// No usable configuration.
pub async fn client(cfg: &ApiConfig) -> Result<kube::Client> {
    let mut config = match (&cfg.kubeconfig, &cfg.master) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::api(format!("kubeconfig {}", path.display()), e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::api(format!("kubeconfig {}", path.display()), e))?
        }
        (None, Some(master)) => kube::Config::new(
            master
                .parse()
                .map_err(|e| Error::api(format!("--master {master:?}"), e))?,
        ),
        (None, None) => kube::Config::infer().await.map_err(|e| {
            Error::invalid(format!(
                "no API server configuration (in-cluster, KUBECONFIG or ~/.kube/config): {e}; \
                 pass --kubeconfig, --master or --manifests"
            ))
        })?,
    };
    if let (Some(_), Some(master)) = (&cfg.kubeconfig, &cfg.master) {
        config.cluster_url = master
            .parse()
            .map_err(|e| Error::api(format!("--master {master:?}"), e))?;
    }
    kube::Client::try_from(config).map_err(|e| Error::api("API client", e))
}

fn decode<T: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<T> {
    let value =
        serde_json::to_value(obj).map_err(|e| Error::decode("re-encoding a watched object", e))?;
    serde_json::from_value(value).map_err(|e| {
        Error::decode(
            format!(
                "{}/{}",
                obj.metadata.namespace.as_deref().unwrap_or(""),
                obj.metadata.name.as_deref().unwrap_or("?")
            ),
            e,
        )
    })
}

fn to_service(obj: &DynamicObject) -> Result<ServiceInfo> {
    convert::service(&decode::<Service>(obj)?)
}

fn to_slice(obj: &DynamicObject) -> Result<SliceInfo> {
    convert::endpoint_slice(&decode::<EndpointSlice>(obj)?)
}

fn to_node(obj: &DynamicObject) -> Result<NodeInfo> {
    Ok(convert::node(&decode::<Node>(obj)?))
}

/// How one kind's events become store changes.
struct KindOps<T> {
    what: &'static str,
    convert: fn(&DynamicObject) -> Result<T>,
    upsert: fn(T) -> Change,
    delete: fn(ObjectRef) -> Change,
    reset: fn(Vec<T>) -> Change,
}

async fn watch_kind<T: Send + 'static>(
    api: Api<DynamicObject>,
    config: watcher::Config,
    ops: KindOps<T>,
    tx: mpsc::Sender<Change>,
) {
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut buffer: Vec<T> = Vec::new();
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => {
                buffer.clear();
                None
            }
            Ok(watcher::Event::InitApply(obj)) => {
                match (ops.convert)(&obj) {
                    Ok(v) => buffer.push(v),
                    Err(e) => tracing::error!("skipping malformed {}: {e}", ops.what),
                }
                None
            }
            Ok(watcher::Event::InitDone) => {
                tracing::info!(kind = ops.what, objects = buffer.len(), "listed");
                Some((ops.reset)(std::mem::take(&mut buffer)))
            }
            Ok(watcher::Event::Apply(obj)) => match (ops.convert)(&obj) {
                Ok(v) => Some((ops.upsert)(v)),
                Err(e) => {
                    tracing::error!("skipping malformed {}: {e}", ops.what);
                    None
                }
            },
            Ok(watcher::Event::Delete(obj)) => {
                Some((ops.delete)(convert::object_ref(&obj.metadata)))
            }
            Err(e) => {
                tracing::warn!(kind = ops.what, "watch failed, retrying with backoff: {e}");
                None
            }
        };
        if let Some(c) = change
            && tx.send(c).await.is_err()
        {
            return;
        }
    }
}

/// Starts the watchers; changes arrive on `tx`.
pub fn spawn(client: &kube::Client, cfg: &ApiConfig, tx: &mpsc::Sender<Change>) {
    let selector = cfg.selector.label_selector();
    let svc_api =
        Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<Service>(&()));
    let slice_api =
        Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<EndpointSlice>(&()));
    let node_api = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<Node>(&()));
    tokio::spawn(watch_kind(
        svc_api,
        watcher::Config::default().labels(&selector),
        KindOps {
            what: "Service",
            convert: to_service,
            upsert: Change::ServiceUpsert,
            delete: Change::ServiceDelete,
            reset: Change::ResetServices,
        },
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        slice_api,
        watcher::Config::default().labels(&selector),
        KindOps {
            what: "EndpointSlice",
            convert: to_slice,
            upsert: Change::SliceUpsert,
            delete: Change::SliceDelete,
            reset: Change::ResetSlices,
        },
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        node_api,
        watcher::Config::default().fields(&format!("metadata.name={}", cfg.node_name)),
        KindOps {
            what: "Node",
            convert: to_node,
            upsert: Change::Node,
            // A deleted (or missing) Node changes nothing: the agent keeps what it knew.
            delete: |_| Change::Node(NodeInfo::default()),
            reset: |mut nodes: Vec<NodeInfo>| match nodes.pop() {
                Some(n) => Change::Node(n),
                None => Change::Node(NodeInfo::default()),
            },
        },
        tx.clone(),
    ));
}
