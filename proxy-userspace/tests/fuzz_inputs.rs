//! Fuzzing the inputs (issue 13): API objects and manifests into store, model and every
//! renderer's pure rule builders, and KubeProxyConfiguration text into the config parser and
//! the command line it fills. A seeded mutation fuzzer (deterministic, so a failure prints the
//! input that caused it and reruns the same way): the seeds are the conformance fixtures'
//! objects and kubeadm's config; each execution mutates one seed a few times.
//!
//! Properties: nothing panics; an invalid object is rejected with a reason (a non-empty
//! message); an accepted object goes through the model and the iptables, nftables, ipvs and
//! eBPF map builders. `KPR_FUZZ_EXECS` sets the executions per target (default: a quick run
//! for CI; `cargo xtask reliability` runs many more) and each target prints one
//! `KPR-FIGURE` line for RELIABILITY.md.
use std::panic::{AssertUnwindSafe, catch_unwind};

use kpr::model::{NodeInfo, ProxyConfig, compute};
use kpr::render::plan::Family;
use kpr::source::convert::Objects;
use kpr::source::convert::{ProxySelector, object};
use kpr::store::{Change, Store};
use serde_json::{Value, json};

/// xorshift64*: small, seeded, good enough to pick mutations.
use kpr_testnet::rng::FuzzRng as Rng;

fn executions() -> usize {
    std::env::var("KPR_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Values that break parsers: wrong types, out-of-range numbers, malformed addresses.
fn nasty(rng: &mut Rng) -> Value {
    let pool = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(65536),
        json!(4_294_967_296_u64),
        json!(1.5),
        json!(""),
        json!("x".repeat(300)),
        json!("not-an-ip"),
        json!("10.0.0.1/33"),
        json!("::"),
        json!("0.0.0.0"),
        json!("255.255.255.255"),
        json!("fe80::1%eth0"),
        json!("1.2.3.4"),
        json!("TCP"),
        json!("SCTP"),
        json!("ICMP"),
        json!("ClientIP"),
        json!("Local"),
        json!("LoadBalancer"),
        json!([]),
        json!({}),
        json!([Value::Null]),
        json!({"ip": "1.2.3.4"}),
    ];
    pool[rng.below(pool.len())].clone()
}

/// One random mutation somewhere in `v`.
fn mutate(v: &mut Value, rng: &mut Rng) {
    // Walk down a random path, then act.
    let mut cur = v;
    for _ in 0..8 {
        let next_is_leaf = match cur {
            Value::Object(m) if !m.is_empty() => false,
            Value::Array(a) if !a.is_empty() => false,
            _ => true,
        };
        if next_is_leaf || rng.below(3) == 0 {
            break;
        }
        cur = match cur {
            Value::Object(m) => {
                let k = m
                    .keys()
                    .nth(rng.below(m.len()))
                    .cloned()
                    .unwrap_or_default();
                m.get_mut(&k).expect("key")
            }
            Value::Array(a) => {
                let i = rng.below(a.len());
                &mut a[i]
            }
            _ => unreachable!(),
        };
    }
    match (rng.below(5), &mut *cur) {
        (0, Value::Object(m)) if !m.is_empty() => {
            let k = m
                .keys()
                .nth(rng.below(m.len()))
                .cloned()
                .unwrap_or_default();
            m.remove(&k);
        }
        (1, Value::Array(a)) if !a.is_empty() => {
            let x = a[rng.below(a.len())].clone();
            a.push(x);
        }
        (2, Value::Array(a)) if !a.is_empty() => {
            a.remove(rng.below(a.len()));
        }
        (3, Value::Object(m)) => {
            m.insert("extra".into(), nasty(rng));
        }
        _ => *cur = nasty(rng),
    }
}

/// The objects of every fixture (the seeds) and each fixture's node.
fn seeds() -> (Vec<Value>, Vec<NodeInfo>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut objects = Vec::new();
    let mut nodes = Vec::new();
    for e in std::fs::read_dir(&dir).expect("fixtures") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let fx: Value = serde_norway::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        objects.extend(fx["objects"].as_array().cloned().unwrap_or_default());
        for s in fx["steps"].as_array().into_iter().flatten() {
            objects.extend(s["apply"].as_array().cloned().unwrap_or_default());
        }
        nodes.push(NodeInfo {
            name: fx["node"]["name"].as_str().unwrap_or("test-node").into(),
            ips: fx["node"]["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str()?.parse().ok())
                .collect(),
            ..NodeInfo::default()
        });
    }
    assert!(objects.len() > 10, "seed corpus: {}", objects.len());
    (objects, nodes)
}

/// Everything an accepted object goes through.
fn through_every_renderer(objs: &Objects, node: &NodeInfo) {
    let mut store = Store::default();
    store.apply(Change::Reset {
        services: objs.services.clone(),
        slices: objs.slices.clone(),
    });
    let config = ProxyConfig {
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..ProxyConfig::default()
    };
    let desired = compute(&store, node, &config);
    for family in [Family::V4, Family::V6] {
        let _ = kpr::render::iptables::rules::build(&desired, family);
        let _ = kpr::render::nftables::rules::build(&desired, family);
        let _ = kpr::render::ipvs::rules::build(&desired, family);
    }
    let cfg = kpr::render::ipvs::IpvsConfig::default();
    let _ = kpr::render::ipvs::virtual_servers(&desired, &cfg);
    let _ =
        kpr::render::ipvs::rules::members(&desired, &kpr::render::ipvs::bound_addresses(&desired));
    let mut snapshot = kpr::render::ebpf::maps::MapsSnapshot::default();
    let _ = kpr::render::ebpf::maps::MapDiff::default().sync(&desired, &mut snapshot, &[]);
}

#[test]
fn mutated_api_objects_never_panic_and_are_rejected_with_a_reason() {
    let (corpus, nodes) = seeds();
    let n = executions();
    let mut rng = Rng(0x6b70_7221);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let selector = ProxySelector::default();
    for i in 0..n {
        let mut v = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(3) {
            mutate(&mut v, &mut rng);
        }
        let node = &nodes[rng.below(nodes.len())];
        let input = v.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut objs = Objects::default();
            match object(v, &selector, &mut objs) {
                Ok(()) => {
                    through_every_renderer(&objs, node);
                    true
                }
                Err(e) => {
                    assert!(
                        !e.to_string().trim().is_empty(),
                        "a rejection names its reason"
                    );
                    false
                }
            }
        }));
        match outcome {
            Ok(true) => accepted += 1,
            Ok(false) => rejected += 1,
            Err(_) => panic!("execution {i} panicked on this object:\n{input:#}"),
        }
    }
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "fuzz: API objects -> store, model, every renderer's builders",
               "executions": n, "corpus": corpus.len(), "accepted": accepted,
               "rejected_with_reason": rejected, "panics": 0})
    );
    assert!(
        accepted > 0 && rejected > 0,
        "both paths exercised: {accepted} / {rejected}"
    );
}

/// Line-level text mutations of a YAML document.
fn mutate_text(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let tokens = [
        "",
        "-1",
        "0",
        "99999999999999999999",
        "1.5",
        "\"\"",
        "[]",
        "{}",
        "null",
        "true",
        "\"10.0.0.0/33\"",
        "\"abc\"",
        "\"1h2x\"",
        "\"-5s\"",
        "[\"::/0\", \"x\"]",
        "ipvs",
        "kernelspace",
        "\"mh\"",
        "\"999999h\"",
        ": :",
        "- - -",
        "\t",
        "'",
        "&a",
        "*a",
    ];
    for _ in 0..=rng.below(3) {
        if lines.is_empty() {
            break;
        }
        let i = rng.below(lines.len());
        match rng.below(5) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 => {
                let l = &mut lines[i];
                if let Some(pos) = l.find(": ") {
                    l.truncate(pos + 2);
                    l.push_str(tokens[rng.below(tokens.len())]);
                }
            }
            3 => {
                let l = &mut lines[i];
                let cut = rng.below(l.len() + 1);
                l.truncate(cut);
            }
            _ => {
                let indent = " ".repeat(rng.below(6));
                lines.insert(i, format!("{indent}{}", tokens[rng.below(tokens.len())]));
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_kube_proxy_configurations_never_panic() {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let seed = kpr::config::KUBEADM_EXAMPLE;
    let n = executions();
    let mut rng = Rng(0x636f_6e66);
    let (mut parsed, mut refused, mut applied) = (0usize, 0usize, 0usize);
    let matches = kpr::cli::Cli::command()
        .try_get_matches_from(["kube-proxy"])
        .expect("parses");
    let base = *kpr::cli::Cli::from_arg_matches(&matches).expect("cli").run;
    for i in 0..n {
        let text = mutate_text(seed, &mut rng);
        let outcome = catch_unwind(AssertUnwindSafe(|| match kpr::config::parse(&text) {
            Ok(loaded) => {
                let mut args = base.clone();
                let r = kpr::config::apply(&loaded.config, &mut args, &|_| false);
                if let Err(e) = &r {
                    assert!(!e.to_string().trim().is_empty());
                }
                (true, r.is_ok())
            }
            Err(e) => {
                assert!(
                    !e.to_string().trim().is_empty(),
                    "a refusal names its reason"
                );
                (false, false)
            }
        }));
        match outcome {
            Ok((true, ok)) => {
                parsed += 1;
                applied += usize::from(ok);
            }
            Ok((false, _)) => refused += 1,
            Err(_) => panic!("execution {i} panicked on this configuration:\n{text}"),
        }
    }
    println!(
        "KPR-FIGURE {}",
        json!({"scenario": "fuzz: KubeProxyConfiguration text -> parse, apply to the command line",
               "executions": n, "corpus": 1, "parsed": parsed, "applied": applied,
               "refused_with_reason": refused, "panics": 0})
    );
    assert!(
        parsed > 0 && refused > 0,
        "both paths exercised: {parsed} / {refused}"
    );
}
