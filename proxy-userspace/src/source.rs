//! Sources turn the outside world into store change events.
//!
//! [`ManifestSource`] reads a directory of v1 Service and discovery.k8s.io/v1 EndpointSlice
//! manifests (YAML, several documents per file, or JSON; `kind: List` too) and reloads it when
//! a file changes. A file is the unit of acceptance: when any document in it is invalid, the
//! whole file is rejected with the file name and reason, and what that file last said stays in
//! effect, so one bad edit never disturbs what is programmed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::store::{Change, ServiceInfo, SliceInfo};
use crate::{Error, Result};

/// The objects one file contributes.
#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
}

fn parse_object(value: serde_json::Value, out: &mut FileObjects) -> Result<()> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    match (api_version, kind) {
        (_, "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                parse_object(item, out)?;
            }
            Ok(())
        }
        ("v1", "Service") => {
            let svc: Service = serde_json::from_value(value)
                .map_err(|e| Error::invalid(format!("not a valid v1 Service: {e}")))?;
            out.services.push(ServiceInfo::from_api(&svc)?);
            Ok(())
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = serde_json::from_value(value).map_err(|e| {
                Error::invalid(format!(
                    "not a valid discovery.k8s.io/v1 EndpointSlice: {e}"
                ))
            })?;
            out.slices.push(SliceInfo::from_api(&slice)?);
            Ok(())
        }
        ("", _) | (_, "") => Err(Error::invalid("document has no apiVersion or kind")),
        (api_version, kind) => Err(Error::invalid(format!(
            "unsupported object {api_version} {kind} (expected v1 Service or discovery.k8s.io/v1 EndpointSlice)"
        ))),
    }
}

/// Converts already-parsed manifests (e.g. a fixture's `objects`) into store objects.
///
/// # Errors
/// The first invalid object, with its index.
pub fn objects_from_values(values: &[serde_json::Value]) -> Result<FileObjects> {
    let mut out = FileObjects::default();
    for (i, v) in values.iter().enumerate() {
        parse_object(v.clone(), &mut out).map_err(|e| e.context(format!("object {}", i + 1)))?;
    }
    Ok(out)
}

/// Parses one manifest file's text (YAML or JSON, possibly several YAML documents).
///
/// # Errors
/// The first invalid document, with its index.
pub fn parse_manifest(text: &str) -> Result<FileObjects> {
    let mut out = FileObjects::default();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = <serde_norway::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| Error::invalid(format!("document {}: YAML: {e}", i + 1)))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .map_err(|e| Error::invalid(format!("document {}: {e}", i + 1)))?;
        parse_object(json, &mut out).map_err(|e| e.context(format!("document {}", i + 1)))?;
    }
    Ok(out)
}

/// A fingerprint of one file, to notice edits.
type Stamp = (SystemTime, u64);

/// Watches a manifests directory by polling (cheap for the few files such a directory holds,
/// and it works on every filesystem).
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    last_good: BTreeMap<PathBuf, FileObjects>,
}

/// What one poll found.
#[derive(Debug)]
pub struct PollResult {
    /// `Some` when anything changed: the whole new content.
    pub change: Option<Change>,
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
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            stamps: BTreeMap::new(),
            last_good: BTreeMap::new(),
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

    /// Rescans the directory; reloads the files that changed.
    pub fn poll(&mut self) -> PollResult {
        let mut errors = Vec::new();
        let stamps = match self.scan() {
            Ok(s) => s,
            Err(e) => {
                // The directory itself is unreadable: keep everything as it is.
                return PollResult {
                    change: None,
                    errors: vec![e],
                };
            }
        };
        if stamps == self.stamps {
            return PollResult {
                change: None,
                errors,
            };
        }
        self.last_good.retain(|p, _| stamps.contains_key(p));
        for (path, stamp) in &stamps {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .and_then(|t| parse_manifest(&t));
            match parsed {
                Ok(objs) => {
                    self.last_good.insert(path.clone(), objs);
                }
                Err(e) => {
                    let kept = self
                        .last_good
                        .get(path)
                        .map_or(0, |o| o.services.len() + o.slices.len());
                    errors.push(e.context(format!(
                        "manifest {} rejected (keeping its previous {kept} objects)",
                        path.display()
                    )));
                }
            }
        }
        self.stamps = stamps;
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for objs in self.last_good.values() {
            services.extend(objs.services.iter().cloned());
            slices.extend(objs.slices.iter().cloned());
        }
        PollResult {
            change: Some(Change::Reset { services, slices }),
            errors,
        }
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
        let objs = parse_manifest(SVC).expect("valid manifest");
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
        let objs = parse_manifest(json).expect("valid list");
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
            let err = parse_manifest(text).expect_err(text).to_string();
            assert!(err.contains(want), "error {err:?} should mention {want:?}");
        }
    }

    #[test]
    fn a_rejected_file_keeps_its_previous_objects() {
        let dir = std::env::temp_dir().join(format!("kpr-src-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("web.yaml");
        std::fs::write(&file, SVC).unwrap();
        let mut src = ManifestSource::new(&dir);
        let first = src.poll();
        assert!(first.errors.is_empty());
        let Some(Change::Reset { services, .. }) = first.change else {
            panic!("first poll must load the file")
        };
        assert_eq!(services.len(), 1);
        // Make sure the mtime/size fingerprint changes.
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: bogus}\n",
        )
        .unwrap();
        let second = src.poll();
        assert_eq!(second.errors.len(), 1, "{:?}", second.errors);
        assert!(second.errors[0].to_string().contains("web.yaml"));
        let Some(Change::Reset { services, slices }) = second.change else {
            panic!("a poll after an edit reports the content")
        };
        assert_eq!(
            (services.len(), slices.len()),
            (1, 1),
            "previous objects kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
