//! The API source against the in-repo API server emulator, through kube-rs's real client over
//! HTTP on loopback: initial sync, add/update/delete, label selectors, dropped watches, 410
//! relists, 500s, an unreachable server, malformed objects.
use std::time::Duration;

use kpr::source::api::{ApiConfig, client, spawn};
use kpr::source::convert::ProxySelector;
use kpr::store::{Change, ObjectRef, Store};
use kpr_testnet::emulator::{Emulator, Kind, endpoint_slice, node, service};
use serde_json::json;
use tokio::sync::mpsc;

struct Harness {
    emu: Emulator,
    rx: mpsc::Receiver<Change>,
    store: Store,
    node: Option<kpr::store::NodeInfo>,
    resets: usize,
}

impl Harness {
    async fn start(emu: Emulator, proxy_name: Option<&str>) -> Self {
        let cfg = ApiConfig {
            kubeconfig: None,
            master: Some(emu.url()),
            selector: ProxySelector {
                service_proxy_name: proxy_name.map(str::to_string),
            },
            node_name: "test-node".into(),
        };
        let c = client(&cfg).await.expect("client");
        let (tx, rx) = mpsc::channel(1024);
        spawn(&c, &cfg, &tx);
        Self {
            emu,
            rx,
            store: Store::default(),
            node: None,
            resets: 0,
        }
    }

    /// Applies incoming changes until `cond` holds (or panics after 10 s).
    async fn until(&mut self, what: &str, cond: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(c)) => self.apply(c),
                Ok(None) => panic!("source ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; store has {} services, {} slices",
                    self.store.service_count(),
                    self.store.slice_count()
                ),
            }
        }
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Node(n) => self.node = Some(n),
            Change::ResetServices(_) | Change::ResetSlices(_) => {
                self.resets += 1;
                self.store.apply(c);
            }
            other => {
                self.store.apply(other);
            }
        }
    }

    /// Drains for `d`, returning how many changes arrived.
    async fn quiet_for(&mut self, d: Duration) -> usize {
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(c)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.apply(c);
            n += 1;
        }
        n
    }

    fn has_service(&self, name: &str) -> bool {
        self.store
            .services()
            .any(|s| s.id == ObjectRef::new("default", name))
    }

    fn endpoints_of(&self, svc: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .store
            .slices_for(&ObjectRef::new("default", svc))
            .flat_map(|s| s.endpoints.iter().map(|e| e.addresses[0].to_string()))
            .collect();
        v.sort();
        v
    }
}

async fn seeded() -> Emulator {
    let emu = Emulator::start().await;
    emu.apply(service("default", "web", "10.96.0.10", 80, json!({})));
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2", "10.0.1.3"],
        8080,
    ));
    emu.apply(node("test-node", "192.168.0.2", "zone-a"));
    emu
}

#[tokio::test]
async fn initial_sync_and_changes_reach_the_store() {
    let mut h = Harness::start(seeded().await, None).await;
    h.until("initial list", |h| {
        h.has_service("web") && h.endpoints_of("web").len() == 2 && h.node.is_some()
    })
    .await;
    let n = h.node.clone().unwrap();
    assert_eq!(
        n.ips,
        vec!["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(n.zone(), Some("zone-a"));

    h.emu
        .apply(service("default", "api", "10.96.0.11", 443, json!({})));
    h.until("added Service", |h| h.has_service("api")).await;
    h.emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.2"],
        8080,
    ));
    h.until("updated slice", |h| {
        h.endpoints_of("web") == vec!["10.0.1.2"]
    })
    .await;
    h.emu.delete(Kind::Service, "default", "api");
    h.until("deleted Service", |h| !h.has_service("api")).await;
    h.emu.delete(Kind::EndpointSlice, "default", "web-1");
    h.until("deleted slice", |h| h.endpoints_of("web").is_empty())
        .await;
}

#[tokio::test]
async fn label_selector_follows_upstream() {
    let emu = seeded().await;
    emu.apply(service(
        "default",
        "other-proxy",
        "10.96.0.20",
        80,
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ));
    emu.apply(service(
        "default",
        "headless",
        "10.96.0.21",
        80,
        json!({"service.kubernetes.io/headless": ""}),
    ));
    emu.apply(service(
        "default",
        "mine",
        "10.96.0.22",
        80,
        json!({"service.kubernetes.io/service-proxy-name": "kpr"}),
    ));
    let mut h = Harness::start(emu.clone(), None).await;
    h.until("initial list", |h| h.has_service("web")).await;
    h.quiet_for(Duration::from_millis(300)).await;
    assert!(!h.has_service("other-proxy") && !h.has_service("headless") && !h.has_service("mine"));

    let mut claimed = Harness::start(emu, Some("kpr")).await;
    claimed
        .until("claimed Service", |h| h.has_service("mine"))
        .await;
    claimed.quiet_for(Duration::from_millis(300)).await;
    assert!(
        !claimed.has_service("web"),
        "with a service-proxy-name only claimed Services are served"
    );
}

#[tokio::test]
async fn dropped_watches_and_410_relist_without_losing_state() {
    let mut h = Harness::start(seeded().await, None).await;
    h.until("initial list", |h| {
        h.has_service("web") && h.endpoints_of("web").len() == 2
    })
    .await;

    h.emu.drop_watches();
    h.emu.apply(service(
        "default",
        "after-drop",
        "10.96.0.12",
        80,
        json!({}),
    ));
    h.until("change after a dropped watch", |h| {
        h.has_service("after-drop")
    })
    .await;
    assert!(h.has_service("web"), "nothing lost across the reconnect");

    let resets_before = h.resets;
    h.emu.compact();
    h.emu.drop_watches();
    h.emu
        .apply(service("default", "after-410", "10.96.0.13", 80, json!({})));
    h.until("relist after 410", |h| {
        h.has_service("after-410") && h.resets > resets_before
    })
    .await;
    assert!(h.has_service("web") && h.has_service("after-drop"));
    assert_eq!(h.endpoints_of("web").len(), 2);
}

#[tokio::test]
async fn server_errors_and_an_unreachable_server_change_nothing() {
    let emu = seeded().await;
    emu.fail_next(4);
    let mut h = Harness::start(emu, None).await;
    h.until("list after injected 500s", |h| {
        h.has_service("web") && h.endpoints_of("web").len() == 2
    })
    .await;

    h.emu.set_hang(true);
    h.emu.drop_watches();
    let changes = h.quiet_for(Duration::from_millis(1500)).await;
    assert_eq!(
        changes, 0,
        "an unreachable API server must not produce changes"
    );
    assert!(h.has_service("web") && h.endpoints_of("web").len() == 2);

    h.emu.set_hang(false);
    h.emu
        .apply(service("default", "back", "10.96.0.14", 80, json!({})));
    h.until("changes after the server is back", |h| {
        h.has_service("back")
    })
    .await;
    assert!(h.has_service("web"));
}

#[tokio::test]
async fn malformed_objects_are_skipped() {
    let emu = seeded().await;
    emu.apply_raw(Kind::Service, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": "bad-ip"}, "spec": {"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}}));
    emu.apply_raw(Kind::Service, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": "bad-type"}, "spec": {"ports": "not-a-list"}}));
    let mut h = Harness::start(emu, None).await;
    h.until("initial list", |h| h.has_service("web")).await;
    assert!(!h.has_service("bad-ip") && !h.has_service("bad-type"));
    h.emu.apply_raw(Kind::EndpointSlice, json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"namespace": "default", "name": "web-x", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["nope"]}]}));
    h.emu
        .apply(service("default", "good", "10.96.0.15", 80, json!({})));
    h.until("a good object after a malformed one", |h| {
        h.has_service("good")
    })
    .await;
    assert_eq!(
        h.endpoints_of("web").len(),
        2,
        "the malformed slice was skipped"
    );
}
