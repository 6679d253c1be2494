//! The conformance runner's datapath level: real connections through a netns topology built
//! from each fixture's address plan, with kpr's agent programming the datapath of one mode
//! (ebpf, iptables or nftables).
//!
//! Per fixture: a node namespace that owns the node IPs (both families); one pod namespace per
//! endpoint address (serving TCP and UDP on every endpoint port) and per pod-address flow
//! source, all routed through the node; one outside namespace per outside source address,
//! linked to the node; the client cgroup for pod and node clients (socket load balancing);
//! `kpr run --proxy-mode <mode>` inside the node namespace. Objects are written to a manifests
//! directory; before checking flows the runner waits until the kernel holds exactly what the
//! model asks for (maps, or chains and rule counts, or the nftables table). Each flow then
//! makes real connections and checks which backends answered and which source address they
//! saw.
//!
//! Known, intended difference for the ebpf mode: a pod reaching itself through a Service
//! (hairpin) is not masqueraded, since socket-level load balancing rewrites no packet; such
//! flows check the backend only.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use super::fixture::{Expect, Fixture, FixtureFlow, FlowResult, objects as convert, proxy_config};
use crate::model::{NodeInfo, ProxyConfig, SourceClass, classify_source, compute};
use crate::render::ProxyMode;
use crate::render::ebpf::datapath::PinLayout;
use crate::render::ebpf::maps::{FrontendView, MapDiff, MapsSnapshot, view};
use crate::render::ebpf::pinned::PinnedMaps;
use crate::render::iptables::Backend;
use crate::render::plan::Family;
use crate::store::{Change, Store};
use crate::testnet::{ChildGuard, Topology};
use crate::{Error, Result};

/// Whether this kernel can create SCTP sockets.
fn kernel_has_sctp() -> bool {
    // SAFETY: socket/close with constant arguments.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP);
        if fd >= 0 {
            libc::close(fd);
            true
        } else {
            false
        }
    }
}

/// The objects in effect, by (kind, namespace, name), as manifests.
type Objects = BTreeMap<(String, String, String), serde_json::Value>;

fn object_key(v: &serde_json::Value) -> (String, String, String) {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    let ns = s("/metadata/namespace");
    (
        s("/kind"),
        if ns.is_empty() { "default".into() } else { ns },
        s("/metadata/name"),
    )
}

/// This node as a v1 Node manifest (name, labels, InternalIPs): the agent reads its labels
/// (topology zone) from the manifests directory as it would from the API.
fn node_manifest(node: &NodeInfo) -> serde_json::Value {
    let addresses: Vec<serde_json::Value> = node
        .ips
        .iter()
        .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": node.labels},
        "status": {"addresses": addresses},
    })
}

fn write_objects(dir: &Path, objects: &Objects) -> Result<()> {
    for entry in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let _ = std::fs::remove_file(entry.path());
    }
    for (i, obj) in objects.values().enumerate() {
        let tmp = dir.join(format!(".{i}.tmp"));
        std::fs::write(&tmp, obj.to_string()).map_err(|e| Error::io(&tmp, e))?;
        let path = dir.join(format!("{i:03}.json"));
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// (frontend, protocol, scope, verdict, backends): what must match between the model and maps.
type Row = (String, String, String, String, Vec<String>);

fn rows(views: Vec<FrontendView>) -> BTreeSet<Row> {
    views
        .into_iter()
        .map(|v| {
            let mut b = v.backends;
            b.sort();
            (v.frontend, v.protocol, v.scope, v.verdict, b)
        })
        .collect()
}

/// What the kernel must hold before flows are checked, per mode.
#[derive(Debug, PartialEq, Eq)]
enum Programmed {
    /// The eBPF maps' frontends.
    Maps(BTreeSet<Row>),
    /// (table, chain) -> number of rules, for the iptables modes (rule text is normalised
    /// by iptables-save, counts are not).
    Chains(BTreeMap<(String, String), usize>),
    /// kpr's nftables table: chain -> rules, set -> elements.
    Nft(BTreeMap<String, usize>),
    /// IPVS: virtual server (`proto addr:port`) -> real servers taking new connections.
    Ipvs(BTreeMap<String, BTreeSet<SocketAddr>>),
}

/// The virtual servers of `ipvsadm -Sn` output, with their real servers of non-zero weight
/// (read with the independent tool, not kpr's own netlink code).
fn parse_ipvsadm(text: &str) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    let mut out: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(kind), Some(flag), Some(addr)) = (w.first(), w.get(1), w.get(2)) else {
            continue;
        };
        let proto = match *flag {
            "-t" => "TCP",
            "-u" => "UDP",
            "--sctp-service" => "SCTP",
            _ => continue,
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let key = format!("{proto} {addr}");
        match *kind {
            "-A" => {
                out.entry(key).or_default();
            }
            "-a" => {
                let real = w
                    .iter()
                    .position(|t| *t == "-r")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let weight = w
                    .iter()
                    .position(|t| *t == "-w")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|x| x.parse::<u32>().ok())
                    .unwrap_or(1);
                if let Some(r) = real
                    && weight > 0
                {
                    out.entry(key).or_default().insert(r);
                }
            }
            _ => {}
        }
    }
    out
}

fn chain_counts(filter: &ChainsOf, nat: &ChainsOf) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for (table, chains) in [("filter", filter), ("nat", nat)] {
        for (c, rules) in chains {
            out.insert((table.to_string(), c.clone()), rules.len());
        }
    }
    out
}

type ChainsOf = crate::render::iptables::rules::Chains;

fn expected(
    mode: ProxyMode,
    objects: &Objects,
    node: &NodeInfo,
    config: &ProxyConfig,
) -> Result<Programmed> {
    let values: Vec<serde_json::Value> = objects.values().cloned().collect();
    let objs = convert(&values)?;
    let mut store = Store::default();
    store.apply(Change::Reset {
        services: objs.services,
        slices: objs.slices,
    });
    let desired = compute(&store, node, config);
    match mode {
        ProxyMode::Iptables => {
            let mut counts = BTreeMap::new();
            for family in [Family::V4, Family::V6] {
                let rs = crate::render::iptables::rules::build(&desired, family);
                for ((table, chain), n) in chain_counts(&rs.filter, &rs.nat) {
                    counts.insert((format!("{family:?} {table}"), chain), n);
                }
            }
            Ok(Programmed::Chains(counts))
        }
        ProxyMode::Nftables => {
            let mut counts = BTreeMap::new();
            for family in [Family::V4, Family::V6] {
                let t = crate::render::nftables::rules::build(&desired, family);
                for (k, n) in crate::render::nftables::counts_of(&t) {
                    counts.insert(format!("{family:?} {k}"), n);
                }
            }
            Ok(Programmed::Nft(counts))
        }
        ProxyMode::Ipvs => {
            let cfg = crate::render::ipvs::IpvsConfig::default();
            Ok(Programmed::Ipvs(
                crate::render::ipvs::virtual_servers(&desired, &cfg)
                    .into_iter()
                    .map(|(k, w)| {
                        let proto = match k.protocol {
                            6 => "TCP",
                            17 => "UDP",
                            _ => "SCTP",
                        };
                        (format!("{proto} {}", k.addr), w.backends)
                    })
                    .collect(),
            ))
        }
        ProxyMode::Ebpf => {
            let mut snapshot = MapsSnapshot::default();
            let (_, errors) = MapDiff::default().sync(&desired, &mut snapshot, &[]);
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
            Ok(Programmed::Maps(rows(view(&snapshot))))
        }
    }
}

/// What the node's kernel holds now, in the form of `want`.
fn programmed(plan: &Plan, layout: &PinLayout, want: &Programmed) -> Option<Programmed> {
    match want {
        Programmed::Maps(_) => {
            let maps = PinnedMaps::open(layout).ok()?;
            Some(Programmed::Maps(rows(view(&maps.snapshot().ok()?))))
        }
        Programmed::Chains(_) => {
            let save = |family: Family, table: &str| -> Option<ChainsOf> {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", plan.topology.node.path().display()))
                    .args([
                        &Backend::detect().command(family, "iptables-save"),
                        "-t",
                        table,
                    ])
                    .output()
                    .ok()?;
                Some(crate::render::iptables::parse_save(
                    &String::from_utf8_lossy(&out.stdout),
                ))
            };
            let mut counts = BTreeMap::new();
            for family in [Family::V4, Family::V6] {
                let (filter, nat) = (save(family, "filter")?, save(family, "nat")?);
                for ((table, chain), n) in chain_counts(&filter, &nat) {
                    counts.insert((format!("{family:?} {table}"), chain), n);
                }
            }
            Some(Programmed::Chains(counts))
        }
        Programmed::Nft(_) => {
            let mut counts = BTreeMap::new();
            for (family, fam) in [(Family::V4, "ip"), (Family::V6, "ip6")] {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", plan.topology.node.path().display()))
                    .args([
                        "nft",
                        "-j",
                        "list",
                        "table",
                        fam,
                        crate::render::nftables::rules::TABLE,
                    ])
                    .output()
                    .ok()?;
                for (k, n) in
                    crate::render::nftables::counts_of_json(&String::from_utf8_lossy(&out.stdout))
                {
                    counts.insert(format!("{family:?} {k}"), n);
                }
            }
            Some(Programmed::Nft(counts))
        }
        Programmed::Ipvs(_) => {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", plan.topology.node.path().display()))
                .args(["ipvsadm", "-Sn"])
                .output()
                .ok()?;
            Some(Programmed::Ipvs(parse_ipvsadm(&String::from_utf8_lossy(
                &out.stdout,
            ))))
        }
    }
}

fn wait_programmed(plan: &Plan, layout: &PinLayout, want: &Programmed) -> Result<()> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(20) * crate::testnet::time_scale() {
        last = programmed(plan, layout, want);
        if last.as_ref() == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::invalid(format!(
        "the datapath never held the model's state: want {want:?}, have {last:?}"
    )))
}

/// Where a flow's client runs.
enum Client {
    /// A pod namespace (in the client cgroup).
    Pod(String),
    /// The node namespace, bound to the source address (in the client cgroup).
    Node(IpAddr),
    /// An outside host's namespace (not in the cgroup).
    Outside(String),
}

struct Plan {
    topology: Topology,
    clients: BTreeMap<IpAddr, Client>,
    node: NodeInfo,
    config: ProxyConfig,
}

/// Every endpoint address of the fixture (objects and steps) with the ports it serves.
fn endpoint_ports(fx: &Fixture) -> BTreeMap<IpAddr, BTreeSet<u16>> {
    let mut out: BTreeMap<IpAddr, BTreeSet<u16>> = BTreeMap::new();
    let all = fx
        .objects
        .iter()
        .chain(fx.steps.iter().flat_map(|s| s.apply.iter()));
    for obj in all.filter(|o| o["kind"] == "EndpointSlice") {
        let ports: Vec<u16> = obj["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
            .collect();
        for ep in obj["endpoints"].as_array().into_iter().flatten() {
            if let Some(ip) = ep["addresses"][0]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
            {
                out.entry(ip).or_default().extend(ports.iter().copied());
            }
        }
    }
    out
}

fn build(fx: &Fixture, mode: ProxyMode, index: usize) -> Result<Plan> {
    let node = fx.node_info();
    let config = proxy_config(&fx.config, mode)?;
    let mut t = Topology::new(&format!("cf{index}"));
    for ip in &node.ips {
        let prefix = format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
        t.node.ip(&["addr", "add", &prefix, "dev", "lo"]);
    }
    // The node address an outside client of each family talks to.
    let primary = |v4: bool| node.ips.iter().find(|ip| ip.is_ipv4() == v4).copied();
    let mut clients = BTreeMap::new();
    let endpoints = endpoint_ports(fx);
    for (i, (ip, ports)) in endpoints.iter().enumerate() {
        let name = format!("e{i}");
        t.add_pod(&name, *ip);
        let ports: Vec<u16> = ports.iter().copied().collect();
        t.serve(&name, &ports);
        clients.insert(*ip, Client::Pod(name));
    }
    let sources: BTreeSet<IpAddr> = fx.all_flows().map(|f| f.src).collect();
    for (i, src) in sources.iter().enumerate() {
        if clients.contains_key(src) {
            continue;
        }
        let client = match classify_source(*src, &node, &config) {
            SourceClass::Node => Client::Node(*src),
            SourceClass::Pod => {
                let name = format!("c{i}");
                t.add_pod(&name, *src);
                Client::Pod(name)
            }
            SourceClass::External => {
                // Without a node address of its family, the flow has no client (a failure).
                let Some(node_ip) = primary(src.is_ipv4()) else {
                    continue;
                };
                let name = format!("o{i}");
                t.add_external(&name, *src, node_ip);
                Client::Outside(name)
            }
        };
        clients.insert(*src, client);
    }
    Ok(Plan {
        topology: t,
        clients,
        node,
        config,
    })
}

fn attempts(expect: &Expect) -> usize {
    match &expect.backends {
        Some(b) => (b.len() * 12).max(3),
        None => 2,
    }
}

fn run_flow(plan: &Plan, flow: &FixtureFlow, expect: &Expect) -> Option<String> {
    let Some(client) = plan.clients.get(&flow.src) else {
        return Some(format!(
            "no client could be placed at {} in the test topology",
            flow.src
        ));
    };
    let proto = flow.proto.as_deref().unwrap_or("TCP");
    let mode = match proto {
        "UDP" => "udp",
        "SCTP" => "sctp",
        _ => "tcp",
    };
    let dst = SocketAddr::new(flow.dst, flow.dport).to_string();
    let n = attempts(expect).to_string();
    let t = &plan.topology;
    let out = match client {
        Client::Pod(pod) => t.workload_in(pod, &[mode, &dst, &n], true).output(),
        Client::Outside(pod) => t.workload_in(pod, &[mode, &dst, &n], false).output(),
        Client::Node(ip) => {
            let ip = ip.to_string();
            let args = ["workload", mode, &dst, &n, "0", &ip];
            t.command_in_ns(&t.node.path(), &crate::testnet::kpr_bin(), &args, true)
                .output()
        }
    };
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return Some(format!(
                "client failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Err(e) => return Some(format!("client did not run: {e}")),
    };
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    judge(plan, flow, expect, &lines)
}

fn judge(
    plan: &Plan,
    flow: &FixtureFlow,
    expect: &Expect,
    lines: &[serde_json::Value],
) -> Option<String> {
    let errors: Vec<&str> = lines.iter().filter_map(|l| l["error"].as_str()).collect();
    let answered: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["backend"].as_str().is_some_and(|b| !b.is_empty()))
        .collect();
    if let Some(verdict) = &expect.verdict {
        let ok = match verdict.as_str() {
            "REJECT" => errors.len() == lines.len() && errors.iter().all(|e| *e == "ECONNREFUSED"),
            "DROP" => errors.len() == lines.len() && errors.iter().all(|e| *e == "ETIMEDOUT"),
            // Untranslated: nothing answered, or only the destination itself (the node's own
            // listener, see `node_listeners`).
            "NONE" => {
                let dst = SocketAddr::new(flow.dst, flow.dport).to_string();
                answered
                    .iter()
                    .all(|l| l["backend"].as_str() == Some(dst.as_str()))
            }
            "ACCEPT" => errors.is_empty() && answered.is_empty(),
            other => return Some(format!("unknown verdict {other}")),
        };
        return (!ok).then(|| format!("expected {verdict}, got {lines:?}"));
    }
    let want: BTreeSet<String> = expect
        .backends
        .iter()
        .flatten()
        .filter_map(|b| b.parse::<SocketAddr>().ok().map(|a| a.to_string()))
        .collect();
    if !errors.is_empty() {
        return Some(format!(
            "expected backends {want:?}, some attempts failed: {errors:?}"
        ));
    }
    let got: BTreeSet<String> = answered
        .iter()
        .filter_map(|l| l["backend"].as_str().map(str::to_string))
        .collect();
    if got != want {
        return Some(format!("expected backends {want:?}, reached {got:?}"));
    }
    if let Some(masq) = expect.masq {
        for l in &answered {
            let seen: Option<IpAddr> = l["seen_src"].as_str().and_then(|s| s.parse().ok());
            let backend_ip = l["backend"]
                .as_str()
                .and_then(|b| b.parse::<SocketAddr>().ok())
                .map(|a| a.ip());
            if backend_ip == Some(flow.src) {
                continue; // hairpin: see the module docs
            }
            let is_node = seen.is_some_and(|s| plan.node.ips.contains(&s));
            let ok = if masq {
                is_node
            } else {
                seen == Some(flow.src)
            };
            if !ok {
                return Some(format!(
                    "expected the backend to see {} as source, it saw {:?}",
                    if masq {
                        "a node IP".to_string()
                    } else {
                        flow.src.to_string()
                    },
                    l["seen_src"]
                ));
            }
        }
    }
    None
}

/// Runs one fixture against the real datapath of `mode`.
///
/// # Errors
/// The mode is not implemented at this level, or the topology could not be built.
pub fn run_fixture(fx: &Fixture, mode: ProxyMode, index: usize) -> Result<Vec<FlowResult>> {
    let sctp = kernel_has_sctp();
    let plan = build(fx, mode, index)?;
    let dir = plan.topology.workdir.join("manifests");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut objects: Objects = fx
        .objects
        .iter()
        .chain(std::iter::once(&node_manifest(&plan.node)))
        .map(|o| (object_key(o), o.clone()))
        .collect();
    write_objects(&dir, &objects)?;
    let mut args: Vec<String> = vec![
        "--hostname-override".into(),
        plan.node.name.clone(),
        "--node-ip".into(),
        plan.node
            .ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ];
    if !plan.config.cluster_cidrs.is_empty() {
        args.push("--cluster-cidr".into());
        args.push(
            plan.config
                .cluster_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if plan.config.masquerade_all {
        args.push("--masquerade-all".into());
    }
    if !fx.config.node_port_addresses.is_empty() {
        args.push("--nodeport-addresses".into());
        args.push(fx.config.node_port_addresses.join(","));
    }
    args.push(format!(
        "--iptables-localhost-nodeports={}",
        fx.config.localhost_node_ports
    ));
    if !plan.config.service_cidrs.is_empty() {
        args.push("--service-cidr".into());
        args.push(
            plan.config
                .service_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    args.push("--proxy-mode".into());
    args.push(mode.as_str().into());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let _listeners = node_listeners(fx, mode, &plan)?;
    let _agent: ChildGuard = plan.topology.start_agent_in_node(&dir, &arg_refs);
    let layout = PinLayout::new(&plan.topology.bpffs);
    let overrides = fx.modes.get(mode.as_str());
    let mut results = Vec::new();
    let mut check = |objects: &Objects, flows: &[FixtureFlow]| -> Result<()> {
        wait_programmed(
            &plan,
            &layout,
            &expected(mode, objects, &plan.node, &plan.config)?,
        )?;
        // The TC programs attach on the agent's interface scan (every 2 s).
        std::thread::sleep(Duration::from_millis(100));
        if mode == ProxyMode::Ebpf && flows.iter().any(|f| f.proto.as_deref() == Some("SCTP")) {
            // SCTP frontends are the nftables fallback's, written right after the maps.
            std::thread::sleep(Duration::from_millis(300) * crate::testnet::time_scale());
        }
        for f in flows {
            let expect = overrides.and_then(|o| o.get(&f.name)).unwrap_or(&f.expect);
            let failure = if f.proto.as_deref() == Some("SCTP") && !sctp {
                Some("skipped: this kernel has no SCTP".to_string())
            } else {
                run_flow(&plan, f, expect)
            };
            results.push(FlowResult {
                fixture: fx.id.clone(),
                flow: f.name.clone(),
                failure,
            });
        }
        Ok(())
    };
    if mode == ProxyMode::Ebpf {
        wait_for_tc(&plan.topology);
    }
    check(&objects, &fx.flows)?;
    for step in &fx.steps {
        for d in &step.delete {
            objects.remove(&(d.kind.clone(), d.namespace.clone(), d.name.clone()));
        }
        for o in &step.apply {
            objects.insert(object_key(o), o.clone());
        }
        write_objects(&dir, &objects)?;
        check(&objects, &step.flows)?;
    }
    Ok(results)
}

/// Listeners of the node's own at the node addresses of REJECT and NONE flows: a REJECT must
/// then come from kpr (the node's stack would have accepted the connection), and a NONE flow
/// is answered by the node itself, untranslated (see `judge`).
fn node_listeners(fx: &Fixture, mode: ProxyMode, plan: &Plan) -> Result<Option<ChildGuard>> {
    let overrides = fx.modes.get(mode.as_str());
    let mut addrs: BTreeSet<SocketAddr> = BTreeSet::new();
    for f in fx.all_flows() {
        let expect = overrides.and_then(|o| o.get(&f.name)).unwrap_or(&f.expect);
        let verdict = expect.verdict.as_deref();
        let proto = f.proto.as_deref().unwrap_or("TCP");
        if plan.node.ips.contains(&f.dst)
            && matches!(verdict, Some("REJECT" | "NONE"))
            && matches!(proto, "TCP" | "UDP")
        {
            addrs.insert(SocketAddr::new(f.dst, f.dport));
        }
    }
    if addrs.is_empty() {
        return Ok(None);
    }
    let t = &plan.topology;
    let mut args = vec!["workload".to_string(), "serve".to_string()];
    args.extend(addrs.iter().map(ToString::to_string));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = t
        .command_in_ns(&t.node.path(), &crate::testnet::kpr_bin(), &arg_refs, false)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("kpr workload serve", e))?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
        &mut line,
    )
    .map_err(|e| Error::io("kpr workload serve", e))?;
    if !line.contains("serving") {
        return Err(Error::invalid(format!(
            "the node's listeners on {addrs:?} did not start: {line}"
        )));
    }
    Ok(Some(ChildGuard(child)))
}

/// Waits until the agent has pinned a TC link for every node interface.
fn wait_for_tc(t: &Topology) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) * crate::testnet::time_scale() {
        let links = std::fs::read_dir(
            t.bpffs
                .join(format!("v{}", proxy_common::MAP_LAYOUT_VERSION)),
        )
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
        .count();
        // ingress + egress per pod/outside link
        if links >= 2 * t.pods.len() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
