//! The deploy/ manifests parse into Kubernetes' own types (k8s-openapi) and ask for what the
//! datapath needs and no more: host network, the host's bpffs (Bidirectional propagation for
//! the privileged container that may mount it, HostToContainer for kpr's unprivileged agent), the host's root cgroup, hostPID, Linux nodes only, a kubeconfig that reaches
//! the API server without a ClusterIP, and RBAC verbs matching what the agent reads.
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::ClusterRole;

fn docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// The checks every kpr DaemonSet must pass: `privileged` for kubeadm's shape, else kpr's
/// own (an unprivileged agent after a privileged `--init-only` init container).
fn check_daemonset(ds: &DaemonSet, container: &str, privileged: bool) {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true), "host network");
    assert_eq!(
        spec.host_pid,
        Some(true),
        "hostPID (UDP socket termination)"
    );
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == container)
        .expect("the container");
    assert_eq!(
        c.security_context.as_ref().and_then(|s| s.privileged),
        Some(privileged)
    );
    let cmd = c.command.as_ref().expect("a command").join(" ");
    assert!(
        cmd.starts_with("/usr/local/bin/kube-proxy --config="),
        "{cmd}"
    );
    let mounts = c.volume_mounts.as_ref().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mounted");
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some(if privileged {
            "Bidirectional"
        } else {
            "HostToContainer"
        })
    );
    if !privileged {
        let init = &spec.init_containers.as_ref().expect("an init container")[0];
        assert_eq!(
            init.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );
        let init_cmd = init.command.as_ref().expect("a command").join(" ");
        assert!(init_cmd.ends_with("--init-only"), "{init_cmd}");
        assert!(
            init.volume_mounts.as_ref().unwrap().iter().any(|m| {
                m.mount_path == "/sys/fs/bpf"
                    && m.mount_propagation.as_deref() == Some("Bidirectional")
            }),
            "the init container mounts the host's bpffs if it has none"
        );
    }
    let volumes = spec.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path(&bpffs.name).as_deref(), Some("/sys/fs/bpf"));
    let cgroup = mounts
        .iter()
        .find(|m| m.mount_path == "/host/cgroup")
        .expect("host cgroup mounted");
    assert_eq!(host_path(&cgroup.name).as_deref(), Some("/sys/fs/cgroup"));
}

#[test]
fn the_standalone_daemonset() {
    let d = docs("deploy/kpr.yaml");
    let ds: Vec<DaemonSet> = of_kind(&d, "DaemonSet");
    assert_eq!(ds.len(), 1);
    check_daemonset(&ds[0], "kpr", false);
    let spec = ds[0].spec.template.spec.as_ref().unwrap();
    assert_eq!(
        spec.node_selector
            .as_ref()
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let req = spec.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("memory"))
        .map(|q| q.0.clone());
    assert_eq!(req.as_deref(), Some("128Mi"), "requests match measured RSS");
    // The configuration parses as kpr reads it, with the kpr section.
    let cms: Vec<ConfigMap> = of_kind(&d, "ConfigMap");
    let data = cms[0].data.as_ref().unwrap();
    let cfg = kpr::config::parse(&data["config.conf"]).expect("config.conf");
    assert!(cfg.unknown.is_empty(), "{:?}", cfg.unknown);
    assert_eq!(
        cfg.config.kpr.unwrap().cgroup_path.as_deref(),
        Some("/host/cgroup")
    );
    // The API server is reached without a Service.
    let kubeconfig = &data["kubeconfig.conf"];
    assert!(kubeconfig.contains("server: https://CONTROL_PLANE_ENDPOINT:6443"));
    assert!(!kubeconfig.contains("10.96.0.1") && !kubeconfig.contains("kubernetes.default"));
    // RBAC: read Services, EndpointSlices and Nodes; write Events; nothing else.
    let roles: Vec<ClusterRole> = of_kind(&d, "ClusterRole");
    let rules = roles[0].rules.as_ref().unwrap();
    let verbs_for = |res: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r.resources
                    .as_ref()
                    .is_some_and(|x| x.iter().any(|y| y == res))
            })
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    for res in ["services", "endpointslices", "nodes"] {
        let v = verbs_for(res);
        assert!(
            v.contains(&"list".into()) && v.contains(&"watch".into()),
            "{res}: {v:?}"
        );
        assert!(!v.iter().any(|x| x == "delete" || x == "*"), "{res}: {v:?}");
    }
    assert!(verbs_for("events").contains(&"create".into()));
    assert!(
        rules.iter().all(|r| !r.verbs.iter().any(|v| v == "*")),
        "no wildcard verbs"
    );
}

#[test]
fn the_kubeadm_image_swap() {
    // kubeadm's DaemonSet with the patch applied by hand (what kustomize renders).
    let base: DaemonSet = of_kind(
        &docs("deploy/kubeadm/kube-proxy-daemonset.yaml"),
        "DaemonSet",
    )
    .remove(0);
    let patch: DaemonSet =
        of_kind(&docs("deploy/kubeadm/patch-daemonset.yaml"), "DaemonSet").remove(0);
    let mut ds = base.clone();
    let spec = ds.spec.template.spec.as_mut().unwrap();
    let p = patch.spec.template.spec.unwrap();
    spec.host_pid = p.host_pid;
    let c = &mut spec.containers[0];
    let pc = &p.containers[0];
    c.command.clone_from(&pc.command);
    c.volume_mounts
        .get_or_insert_with(Vec::new)
        .extend(pc.volume_mounts.clone().unwrap());
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(p.volumes.clone().unwrap());
    check_daemonset(&ds, "kube-proxy", true);
    // kubeadm's own arguments are kept as they were.
    let base_cmd = base.spec.template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    let cmd = ds.spec.template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(&cmd[..base_cmd.len()], &base_cmd[..]);
    // And kubeadm's own config.conf parses, with nothing unknown.
    let cfg = kpr::config::parse(kpr::config::KUBEADM_EXAMPLE).unwrap();
    assert!(cfg.unknown.is_empty());
}
