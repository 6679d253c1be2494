//! The desired state kept between syncs and updated per changed Service: the model's
//! incremental form. `compute` stays the definition; this cache must always equal it (a test
//! checks that after every kind of change).
use std::collections::{BTreeSet, HashMap};

use super::{DesiredState, FrontendKey, NodeInfo, ObjectRef, ProxyConfig};
use crate::store::{Dirty, Store};

/// The desired state, kept between syncs and updated per changed Service, so one Service
/// change costs work proportional to that Service, not to the cluster.
#[derive(Debug, Default)]
pub struct DesiredCache {
    pub state: DesiredState,
    keys_by_service: HashMap<ObjectRef, Vec<FrontendKey>>,
    primed: bool,
}

impl DesiredCache {
    /// Brings `state` up to date. Returns the frontend keys that may have changed, or `None`
    /// when everything was recomputed (the caller then syncs in full).
    pub fn update(
        &mut self,
        store: &Store,
        dirty: &Dirty,
        node: &NodeInfo,
        config: &ProxyConfig,
    ) -> Option<BTreeSet<FrontendKey>> {
        if dirty.all || !self.primed {
            self.state = super::compute(store, node, config);
            self.keys_by_service.clear();
            for (k, fe) in &self.state.frontends {
                self.keys_by_service
                    .entry(fe.service.clone())
                    .or_default()
                    .push(*k);
            }
            self.primed = true;
            return None;
        }
        let node_port_ips = super::node_port_ips(node, config);
        let mut touched = BTreeSet::new();
        for id in &dirty.services {
            for k in self.keys_by_service.remove(id).unwrap_or_default() {
                if self
                    .state
                    .frontends
                    .get(&k)
                    .is_some_and(|fe| &fe.service == id)
                {
                    self.state.frontends.remove(&k);
                }
                touched.insert(k);
            }
            self.state.health_checks.remove(id);
            let Some(svc) = store.service(id) else {
                continue;
            };
            let (frontends, health) =
                super::compute_service(store, svc, node, config, &node_port_ips);
            let keys: Vec<FrontendKey> = frontends.iter().map(|(k, _)| *k).collect();
            touched.extend(keys.iter().copied());
            self.state.frontends.extend(frontends);
            if let Some(h) = health {
                self.state.health_checks.insert(id.clone(), h);
            }
            self.keys_by_service.insert(id.clone(), keys);
        }
        Some(touched)
    }
}

#[cfg(test)]
mod tests {
    use super::DesiredCache;
    use crate::model::{NodeInfo, ProxyConfig, compute};
    use crate::store::{Change, ObjectRef, Protocol, ServiceInfo, SliceInfo, Store};
    use crate::testkit::{self, endpoint, service};

    fn svc(name: &str, ip: &str, np: Option<u16>) -> ServiceInfo {
        let b = service("ns", name)
            .cluster_ip(ip)
            .port("p", 80, Protocol::Tcp, 80);
        match np {
            Some(p) => b.node_port(p).build(),
            None => b.build(),
        }
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> SliceInfo {
        let eps: Vec<_> = ips.iter().map(|ip| endpoint(ip, "n2")).collect();
        testkit::slice("ns", name, svc)
            .port("p", 8080, Protocol::Tcp)
            .endpoints(&eps)
            .build()
    }

    #[test]
    fn incremental_updates_equal_a_full_recompute() {
        let mut node = NodeInfo {
            name: "n".into(),
            ips: vec!["192.168.0.2".parse().unwrap()],
            labels: Default::default(),
            lb_ineligible: false,
            pod_cidrs: Vec::new(),
        };
        let config = ProxyConfig::default();
        let mut store = Store::default();
        let mut cache = DesiredCache::default();
        store.apply(Change::Reset {
            services: vec![
                svc("a", "10.96.0.1", None),
                svc("b", "10.96.0.2", Some(30001)),
            ],
            slices: vec![
                slice("a-1", "a", &["10.0.0.1"]),
                slice("b-1", "b", &["10.0.0.2", "10.0.0.3"]),
            ],
        });
        let dirty = store.take_dirty();
        assert!(
            cache.update(&store, &dirty, &node, &config).is_none(),
            "first update is full"
        );
        let steps: Vec<Change> = vec![
            Change::SliceUpsert(slice("a-1", "a", &["10.0.0.9"])),
            Change::ServiceUpsert(svc("c", "10.96.0.3", Some(30003))),
            // a slice moves from one Service to another
            Change::SliceUpsert(slice("b-1", "c", &["10.0.0.4"])),
            Change::ServiceDelete(ObjectRef::new("ns", "a")),
            Change::SliceDelete(ObjectRef::new("ns", "a-1")),
        ];
        for (i, change) in steps.into_iter().enumerate() {
            store.apply(change);
            let dirty = store.take_dirty();
            assert!(!dirty.all);
            let touched = cache
                .update(&store, &dirty, &node, &config)
                .expect("incremental");
            // Deleting the slice of an already deleted Service changes no frontend.
            assert_eq!(touched.is_empty(), i == 4, "step {i}: {touched:?}");
            assert_eq!(
                cache.state,
                compute(&store, &node, &config),
                "after step {i}"
            );
        }
        // A node change recomputes everything.
        node.ips.push("192.168.1.2".parse().unwrap());
        store.mark_all_dirty();
        let dirty = store.take_dirty();
        assert!(cache.update(&store, &dirty, &node, &config).is_none());
        assert_eq!(cache.state, compute(&store, &node, &config));
    }
}
