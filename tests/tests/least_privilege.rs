//! Least privilege (issue 13): every agent the tests start runs as root with only the
//! capabilities of `kpr::caps::AGENT` (the testnet harness limits their bounding set), which
//! are exactly what kpr's DaemonSet grants its unprivileged agent container; a missing one is
//! refused at start with its name; the ClusterRole allows exactly the API calls the agent
//! makes; nothing pinned in the bpffs is writable by others. Prints one `KPR-FIGURE` line.
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use kpr_testnet::emulator::endpoint_slice;
use kpr_testnet::{Topology, backends_of};
use serde::Deserialize as _;
use serde_json::{Value, json};

fn deploy_documents() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kpr.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/kpr.yaml");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect()
}

fn kind<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn the_daemonset_grants_exactly_the_capabilities_the_tests_run_agents_with() {
    let docs = deploy_documents();
    let spec = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let agent = &spec["containers"][0]["securityContext"];
    assert_eq!(agent["privileged"], false, "{agent}");
    assert_eq!(agent["allowPrivilegeEscalation"], false, "{agent}");
    assert_eq!(agent["capabilities"]["drop"], json!(["ALL"]), "{agent}");
    let granted: BTreeSet<String> = agent["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let used: BTreeSet<String> = kpr::caps::AGENT
        .iter()
        .map(|(n, _)| n.to_ascii_uppercase())
        .collect();
    assert_eq!(granted, used);
    // What needs full privileges runs once, in the init container (upstream's --init-only).
    let init = &spec["initContainers"][0];
    assert!(
        init["command"]
            .as_array()
            .is_some_and(|c| c.iter().any(|a| a == "--init-only")),
        "{init}"
    );
    assert_eq!(init["securityContext"]["privileged"], true);
    assert!(
        spec["containers"][0]["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .all(|m| m["mountPropagation"] != "Bidirectional"),
        "Bidirectional propagation needs a privileged container"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_with_its_capabilities_only_and_rbac_covers_exactly_its_calls() {
    kpr_testnet::require_root();
    let (emu, t, kubeconfig) = kpr_testnet::api_cluster("leastpriv").await;
    let mut agent = kpr_testnet::start_api_agent(&t, &kubeconfig, "1");
    t.wait_for_services("web", Duration::from_secs(30), |r| {
        backends_of(r, "10.96.0.10:80", "TCP").is_some()
    });
    t.wait_reaches(
        "client",
        "10.96.0.10:80",
        &["10.0.1.2:8080", "10.0.1.3:8080"],
    );
    // A change, and a connected UDP socket terminated (the capability-hungriest path is
    // covered by socket_lb's test under the same limits).
    emu.apply(endpoint_slice(
        "default",
        "web",
        "web-1",
        &["10.0.1.3"],
        8080,
    ));
    t.wait_reaches("client", "10.96.0.10:80", &["10.0.1.3:8080"]);
    // The agent's effective capabilities, as the kernel reports them.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff");
    // (This machine's own bounding set may lack some: CAP_SYS_RESOURCE, here.)
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    let want: u64 = kpr::caps::AGENT.iter().map(|(_, n)| 1u64 << n).sum::<u64>() & own;
    assert_eq!(
        eff,
        want,
        "the agent holds exactly the DaemonSet's capabilities: {}",
        status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // RBAC: every call the agent made is allowed by deploy/kpr.yaml's ClusterRole, and every
    // rule there is one the agent uses.
    let start = Instant::now();
    while !emu
        .api_calls()
        .iter()
        .any(|(_, r, v)| r == "events" && v == "create")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no Event recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = emu.api_calls();
    let docs = deploy_documents();
    let mut allowed = BTreeSet::new();
    for rule in kind(&docs, "ClusterRole")["rules"]
        .as_array()
        .expect("rules")
    {
        for g in rule["apiGroups"].as_array().expect("groups") {
            for r in rule["resources"].as_array().expect("resources") {
                for v in rule["verbs"].as_array().expect("verbs") {
                    allowed.insert((
                        g.as_str().unwrap_or_default().to_string(),
                        r.as_str().unwrap_or_default().to_string(),
                        v.as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        }
    }
    let resource_calls: BTreeSet<_> = calls
        .iter()
        .filter(|(g, _, _)| g != "(non-resource)")
        .cloned()
        .collect();
    let denied: Vec<_> = resource_calls.difference(&allowed).collect();
    assert!(
        denied.is_empty(),
        "calls the ClusterRole does not allow: {denied:?}"
    );
    // An Event repeated within its series is PATCHed (kube-rs's Recorder): allowed though a
    // short test may not repeat one.
    let series = (
        "events.k8s.io".to_string(),
        "events".to_string(),
        "patch".to_string(),
    );
    let unused: Vec<_> = allowed
        .iter()
        .filter(|a| !resource_calls.contains(*a) && **a != series)
        .collect();
    assert!(
        unused.is_empty(),
        "ClusterRole rules the agent never uses: {unused:?}"
    );

    // Nothing pinned is writable by anyone but its owner (root).
    let mut checked = 0;
    let mut loose = Vec::new();
    let mut stack = vec![t.bpffs.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = e.metadata().expect("metadata");
            checked += 1;
            if meta.permissions().mode() & 0o022 != 0 {
                loose.push(format!(
                    "{} {:o}",
                    e.path().display(),
                    meta.permissions().mode()
                ));
            }
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    agent.kill9();
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "least privilege: capabilities, RBAC, bpffs permissions", "mode": "ebpf",
               "capabilities": kpr::caps::AGENT.iter().map(|(n, _)| n.to_ascii_uppercase()).collect::<Vec<_>>(),
               "api_calls": resource_calls.len(), "calls_denied_by_rbac": denied.len(), "rbac_rules_unused": unused.len(),
               "pinned_paths_checked": checked, "group_or_world_writable": loose.len()})
    );
    assert!(checked > 10, "the bpffs holds the datapath");
    assert!(loose.is_empty(), "{loose:?}");
}

#[test]
fn an_agent_without_cap_bpf_is_refused_with_the_capabilitys_name() {
    let t = Topology::new("nocapbpf");
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cmd = t.agent_command(&dir, &["--proxy-mode", "ebpf"]);
    let keep: Vec<u32> = kpr::caps::AGENT
        .iter()
        .filter(|(n, _)| *n != "bpf")
        .map(|(_, n)| *n)
        .collect();
    // SAFETY: only prctl(2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            kpr::caps::limit_bounding_set(&keep);
            Ok(())
        });
    }
    let out = cmd.output().expect("kpr");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("CAP_BPF"), "{err}");
}
