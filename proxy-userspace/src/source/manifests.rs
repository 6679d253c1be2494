//! The manifests source: a directory of v1 Service, discovery.k8s.io/v1 EndpointSlice and v1
//! Node manifests (YAML, several documents per file, or JSON; `kind: List` too), reloaded when
//! a file changes.
//!
//! A file is the unit of acceptance: when any document in it is invalid, the whole file is
//! rejected with the file name and reason, and what that file last said stays in effect, so
//! one bad edit never disturbs what is programmed. After the first load, each poll compares
//! the objects of the whole directory with the previous poll's and sends one change per
//! object that differs (upsert or delete), the same events the API source sends, so one edit
//! costs the agent work proportional to that object. Upstream's label selector applies, and a
//! Node manifest named like this node is honoured as the API source honours the Node object.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::convert::{self, Objects, ProxySelector};
use crate::store::{Change, NodeInfo, ObjectRef, ServiceInfo, SliceInfo};
use crate::{Error, Result};

/// Parses one manifest file's text (YAML or JSON, possibly several YAML documents).
///
/// # Errors
/// The first invalid document, with its index.
pub fn parse_manifest(text: &str, selector: &ProxySelector) -> Result<Objects> {
    let mut out = Objects::default();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = <serde_norway::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| Error::decode(format!("document {}: YAML", i + 1), e))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .map_err(|e| Error::decode(format!("document {}", i + 1), e))?;
        convert::object(json, selector, &mut out)
            .map_err(|e| e.context(format!("document {}", i + 1)))?;
    }
    Ok(out)
}

/// A fingerprint of one file, to notice edits.
type Stamp = (SystemTime, u64);

/// Everything the directory says, by object.
#[derive(Clone, Debug, Default, PartialEq)]
struct DirectoryView {
    services: BTreeMap<ObjectRef, ServiceInfo>,
    slices: BTreeMap<ObjectRef, SliceInfo>,
    node: Option<NodeInfo>,
}

/// The changes that turn `old` into `new`, one per object.
fn diff<V: Clone + PartialEq>(
    old: &BTreeMap<ObjectRef, V>,
    new: &BTreeMap<ObjectRef, V>,
    upsert: fn(V) -> Change,
    delete: fn(ObjectRef) -> Change,
    out: &mut Vec<Change>,
) {
    for (id, v) in new {
        if old.get(id) != Some(v) {
            out.push(upsert(v.clone()));
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        out.push(delete(id.clone()));
    }
}

/// Watches a manifests directory by polling (cheap for the few files such a directory holds,
/// and it works on every filesystem).
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    selector: ProxySelector,
    /// Node manifests with this name describe this node.
    node_name: String,
    stamps: BTreeMap<PathBuf, Stamp>,
    last_good: BTreeMap<PathBuf, Objects>,
    /// What the last poll sent; `None` before the first.
    sent: Option<DirectoryView>,
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct PollResult {
    /// The changes since the last poll: a `Reset` (and the node) on the first, then one per
    /// object that changed.
    pub changes: Vec<Change>,
    /// Files rejected, with the reason.
    pub errors: Vec<Error>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestSource {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, selector: ProxySelector, node_name: &str) -> Self {
        Self {
            dir: dir.into(),
            selector,
            node_name: node_name.to_string(),
            stamps: BTreeMap::new(),
            last_good: BTreeMap::new(),
            sent: None,
        }
    }

    fn scan(&self) -> Result<BTreeMap<PathBuf, Stamp>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut out = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                out.insert(
                    path,
                    (
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                    ),
                );
            }
        }
        Ok(out)
    }

    fn view(&self) -> DirectoryView {
        let mut view = DirectoryView::default();
        for objs in self.last_good.values() {
            for s in &objs.services {
                view.services.insert(s.id.clone(), s.clone());
            }
            for s in &objs.slices {
                view.slices.insert(s.id.clone(), s.clone());
            }
            if let Some(n) = objs.nodes.iter().find(|n| n.name == self.node_name) {
                view.node = Some(n.clone());
            }
        }
        view
    }

    /// Rescans the directory; reloads the files that changed.
    pub fn poll(&mut self) -> PollResult {
        let mut result = PollResult::default();
        let stamps = match self.scan() {
            Ok(s) => s,
            Err(e) => {
                // The directory itself is unreadable: keep everything as it is.
                result.errors.push(e);
                return result;
            }
        };
        if stamps == self.stamps && self.sent.is_some() {
            return result;
        }
        self.last_good.retain(|p, _| stamps.contains_key(p));
        for (path, stamp) in &stamps {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .and_then(|t| parse_manifest(&t, &self.selector));
            match parsed {
                Ok(objs) => {
                    self.last_good.insert(path.clone(), objs);
                }
                Err(e) => {
                    let kept = self.last_good.get(path).map_or(0, Objects::len);
                    result.errors.push(e.context(format!(
                        "manifest {} rejected (keeping its previous {kept} objects)",
                        path.display()
                    )));
                }
            }
        }
        self.stamps = stamps;
        let view = self.view();
        match &self.sent {
            None => {
                result.changes.push(Change::Reset {
                    services: view.services.values().cloned().collect(),
                    slices: view.slices.values().cloned().collect(),
                });
                if let Some(n) = &view.node {
                    result.changes.push(Change::Node(n.clone()));
                }
            }
            Some(old) => {
                diff(
                    &old.services,
                    &view.services,
                    Change::ServiceUpsert,
                    Change::ServiceDelete,
                    &mut result.changes,
                );
                diff(
                    &old.slices,
                    &view.slices,
                    Change::SliceUpsert,
                    Change::SliceDelete,
                    &mut result.changes,
                );
                if let Some(n) = &view.node
                    && old.node.as_ref() != Some(n)
                {
                    result.changes.push(Change::Node(n.clone()));
                }
            }
        }
        self.sent = Some(view);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = r"
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: demo, name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
  - addresses: [10.0.1.2]
    conditions: {ready: true}
ports: [{name: http, port: 8080, protocol: TCP}]
";

    #[test]
    fn parses_service_and_slice_from_one_file() {
        let objs = parse_manifest(SVC, &ProxySelector::default()).expect("valid manifest");
        assert_eq!(objs.services.len(), 1);
        assert_eq!(objs.slices.len(), 1);
        assert_eq!(objs.services[0].cluster_ips[0].to_string(), "10.96.0.10");
        assert_eq!(
            objs.slices[0].endpoints[0].addresses[0].to_string(),
            "10.0.1.2"
        );
    }

    #[test]
    fn parses_json_list() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"x"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
        let objs = parse_manifest(json, &ProxySelector::default()).expect("valid list");
        assert_eq!(objs.services.len(), 1);
    }

    #[test]
    fn rejects_bad_documents_with_a_reason() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n",
                "not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 70000}]}\n",
                "out of range",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
                "unsupported object v1 Pod",
            ),
            ("kind: [unclosed\n", "YAML"),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n",
                "kubernetes.io/service-name",
            ),
        ];
        for (text, want) in cases {
            let err = parse_manifest(text, &ProxySelector::default())
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "error {err:?} should mention {want:?}");
        }
    }

    /// A scratch manifests directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("kpr-src-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
        /// Writes a file so that its mtime/size fingerprint surely changes.
        fn write(&self, name: &str, text: &str) {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            let later = SystemTime::now()
                + std::time::Duration::from_secs(1 + u64::try_from(text.len()).unwrap() % 7);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(later)
                .unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn source(dir: &Dir) -> ManifestSource {
        ManifestSource::new(&dir.0, ProxySelector::default(), "node-a")
    }

    #[test]
    fn a_rejected_file_keeps_its_previous_objects() {
        let dir = Dir::new("reject");
        dir.write("web.yaml", SVC);
        let mut src = source(&dir);
        let first = src.poll();
        assert!(first.errors.is_empty());
        let [Change::Reset { services, slices }] = first.changes.as_slice() else {
            panic!("first poll must load the file: {:?}", first.changes)
        };
        assert_eq!((services.len(), slices.len()), (1, 1));
        dir.write(
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: bogus}\n",
        );
        let second = src.poll();
        assert_eq!(second.errors.len(), 1, "{:?}", second.errors);
        assert!(second.errors[0].to_string().contains("web.yaml"));
        assert!(
            second.changes.is_empty(),
            "the previous objects stay: {:?}",
            second.changes
        );
    }

    #[test]
    fn an_edit_sends_one_change_per_object_that_differs() {
        let dir = Dir::new("edit");
        dir.write("web.yaml", SVC);
        let mut src = source(&dir);
        assert_eq!(src.poll().changes.len(), 1, "the first poll is one Reset");
        assert!(src.poll().changes.is_empty(), "nothing changed");
        // Scale the slice: only the slice changes.
        dir.write("web.yaml", &SVC.replace("[10.0.1.2]", "[10.0.1.3]"));
        let changes = src.poll().changes;
        let [Change::SliceUpsert(slice)] = changes.as_slice() else {
            panic!("one slice upsert: {changes:?}")
        };
        assert_eq!(slice.endpoints[0].addresses[0].to_string(), "10.0.1.3");
        // A second file adds a Service; removing the first deletes both of its objects.
        dir.write(
            "other.yaml",
            &SVC.replace("web", "api")
                .replace("10.96.0.10", "10.96.0.11"),
        );
        let changes = src.poll().changes;
        assert!(
            matches!(changes.as_slice(), [Change::ServiceUpsert(s), Change::SliceUpsert(_)] if &*s.id.name == "api"),
            "{changes:?}"
        );
        std::fs::remove_file(dir.0.join("web.yaml")).unwrap();
        let changes = src.poll().changes;
        assert!(
            matches!(changes.as_slice(), [Change::ServiceDelete(s), Change::SliceDelete(l)] if &*s.name == "web" && &*l.name == "web-1"),
            "{changes:?}"
        );
    }

    #[test]
    fn labelled_services_are_left_out_and_this_nodes_manifest_is_honoured() {
        let dir = Dir::new("node");
        dir.write(
            "objects.yaml",
            &format!(
                "{SVC}---\n{}---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: z1}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.0.2}}]}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-b}}\n",
                SVC.replace("name: web}", "name: claimed, labels: {service.kubernetes.io/service-proxy-name: other}}")
                    .split("---")
                    .next()
                    .unwrap()
            ),
        );
        let changes = source(&dir).poll().changes;
        let [Change::Reset { services, .. }, Change::Node(node)] = changes.as_slice() else {
            panic!("a Reset and this node: {changes:?}")
        };
        let names: Vec<&str> = services.iter().map(|s| &*s.id.name).collect();
        assert_eq!(names, ["web"], "the claimed Service is not ours");
        assert_eq!((node.name.as_str(), node.zone()), ("node-a", Some("z1")));
        assert_eq!(
            node.ips,
            vec!["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
    }
}
