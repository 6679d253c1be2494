//! End to end for the TC datapath under production conditions (namespaces, real sockets):
//! established connections survive their backend's removal (graceful termination), a program
//! attached after kpr in the tcx chain still sees the traffic, and NodePort works to a
//! backend behind an L3 device (TUN, no Ethernet header), masquerade and replies included.
//!
//! Address plan (all inside the test's namespaces):
//!   outside host 203.0.113.2, linked to the node, which owns 192.168.0.2 on that link
//!   backends     10.180.0.1 and 10.180.0.2 (pods on this node, veth)
//!   backend      10.181.0.1 behind the node's tun0 (an L3 link relayed to its own namespace)
//!   Service np   NodePort 3001 (TCP), eTP=Cluster
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use kpr::render::ebpf::datapath::{PinLayout, load_object};
use kpr_testnet::tun::TunLink;
use kpr_testnet::{ChildGuard, NetNs, Pod, Topology, backends_of, write_manifest};

/// Service np on NodePort 3001 with `endpoints`: (address, ready, terminating).
fn np(endpoints: &[(&str, bool, bool)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, ready, terminating)| {
            format!(
                "- {{addresses: [{ip}], conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}, nodeName: test-node}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: np}}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.41\n  ports: [{{name: t, port: 80, targetPort: 80, nodePort: 3001, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: np-1, labels: {{kubernetes.io/service-name: np}}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: t, port: 80, protocol: TCP}}]\n"
    )
}

/// The outside host, two backend pods and an agent in the node namespace serving `yaml`.
fn cluster(tag: &str, yaml: &str) -> (Topology, ChildGuard) {
    let mut t = Topology::new(tag);
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    for (name, ip) in [("b1", [10, 180, 0, 1]), ("b2", [10, 180, 0, 2])] {
        t.add_pod(name, Ipv4Addr::from(ip));
        t.serve(name, &[80]);
    }
    let agent = start(&t, yaml);
    (t, agent)
}

fn start(t: &Topology, yaml: &str) -> ChildGuard {
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write_manifest(&dir, "all.yaml", yaml);
    let agent = t.start_agent_in_node(
        &dir,
        &["--node-ip", "192.168.0.2", "--conntrack-max", "65536"],
    );
    t.wait_for_services("frontends", Duration::from_secs(15), |rows| {
        backends_of(rows, "192.168.0.2:3001", "TCP").is_some()
    });
    // The TC programs attach on the next interface scan (every 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    agent
}

#[test]
fn established_connections_survive_their_backends_removal() {
    let (t, _agent) = cluster("grace", &np(&[("10.180.0.1", true, false)]));
    // A long-lived connection from outside, one request every 100 ms for 5 s.
    let mut hold = t
        .workload_in("outside", &["hold", "192.168.0.2:3001", "5", "100"], false)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the long-lived client");
    let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("10.180.0.1:80"), "connected to b1: {first}");
    // A rolling update: b1 terminates (still serving its connections), b2 takes over.
    write_manifest(
        &t.workdir.join("manifests"),
        "all.yaml",
        &np(&[("10.180.0.1", false, true), ("10.180.0.2", true, false)]),
    );
    t.wait_for_services("b2 only", Duration::from_secs(10), |rows| {
        backends_of(rows, "192.168.0.2:3001", "TCP")
            .is_some_and(|b| b == vec!["10.180.0.2:80".to_string()])
    });
    // New connections go to b2...
    let new = t.outside_client("outside", &["tcp", "192.168.0.2:3001", "3"]);
    for l in &new {
        assert_eq!(
            l["backend"], "10.180.0.2:80",
            "new flows avoid the terminating pod: {l}"
        );
    }
    // ... while the established one keeps talking to b1 until it ends.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = hold.wait();
    assert!(rest.len() >= 30, "the connection kept going: {rest:?}");
    for l in &rest {
        assert!(
            l.contains("\"echo\":\"10.180.0.1:80 ping"),
            "every request answered by b1: {l}"
        );
    }
}

/// Attaches `kpr_tc_observe` last in the tcx ingress chain of `ifname` in `ns`; returns its
/// link (attached while held) and the object holding its counter.
fn observe(
    ns: &NetNs,
    ifname: &str,
    pins: &std::path::Path,
) -> (aya::Ebpf, aya::programs::tc::SchedClassifierLink) {
    use aya::programs::SchedClassifier;
    use aya::programs::links::LinkOrder;
    use aya::programs::tc::TcAttach;
    let mut ebpf = load_object(&PinLayout::new(pins)).expect("load the object");
    let prog: &mut SchedClassifier = ebpf
        .program_mut("kpr_tc_observe")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("load kpr_tc_observe");
    let path = ns.path();
    let name = std::ffi::CString::new(ifname).unwrap();
    // The ifindex and the attachment belong to the namespace: a thread enters it.
    let ifindex = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns on this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
            0
        );
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })
    .join()
    .unwrap();
    assert_ne!(ifindex, 0, "{ifname} exists in the node namespace");
    let nsf = std::fs::File::open(ns.path()).unwrap();
    let prog_fd_link = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this scoped thread only.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&nsf), libc::CLONE_NEWNET) },
                0
            );
            // After kpr's program: last in the tcx chain, or (kernels without tcx) a clsact
            // filter at a lower priority than kpr's.
            let attach = if kpr::render::probe::tcx_supported() {
                TcAttach::Tcx {
                    attach_type: aya::programs::TcAttachType::Ingress,
                    order: LinkOrder::last(),
                }
            } else {
                TcAttach::Netlink {
                    parent: aya::programs::tc::TcHandle::from(aya::programs::TcAttachType::Ingress),
                    options: aya::programs::tc::NlOptions {
                        priority: kpr::render::ebpf::datapath::TC_FILTER_PRIORITY + 1,
                        ..Default::default()
                    },
                }
            };
            let id = prog.attach(ifindex, attach).expect("attach after kpr");
            prog.take_link(id).unwrap()
        })
        .join()
        .unwrap()
    });
    (ebpf, prog_fd_link)
}

fn observed(ebpf: &aya::Ebpf) -> u64 {
    let m: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(ebpf.map("KPR_OBSERVED").unwrap()).unwrap();
    m.get(&0, 0).unwrap().iter().sum()
}

#[test]
fn a_program_after_kpr_in_the_tc_chain_still_sees_traffic() {
    let (t, _agent) = cluster("tcxnext", &np(&[("10.180.0.1", true, false)]));
    let (ebpf, _link) = observe(&t.node, "x0", &t.bpffs.join("observer"));
    let before = observed(&ebpf);
    // Translated traffic (NodePort) works with the observer attached, and it sees it.
    for l in t.outside_client("outside", &["tcp", "192.168.0.2:3001", "3"]) {
        assert_eq!(l["backend"], "10.180.0.1:80", "{l}");
    }
    let after_service = observed(&ebpf);
    assert!(
        after_service >= before + 9,
        "3 connections' packets passed kpr on to the next program: {before} -> {after_service}"
    );
    // Traffic kpr does not own (the node's own closed port) goes on too.
    for l in t.outside_client("outside", &["tcp", "192.168.0.2:9", "2"]) {
        assert_eq!(l["error"], "ECONNREFUSED", "{l}");
    }
    let after_other = observed(&ebpf);
    assert!(
        after_other >= after_service + 2,
        "pass-through packets reach the next program: {after_service} -> {after_other}"
    );
    // The conntrack map has the size asked for.
    let ct = t
        .bpffs
        .join(format!("v{}/maps/KPR_CT", proxy_common::MAP_LAYOUT_VERSION));
    let show = kpr_testnet::sh(&["bpftool", "map", "show", "pinned", ct.to_str().unwrap()]);
    assert!(show.contains("max_entries 65536"), "{show}");
    // The datapath counted the NodePort's flows and packets (kpr services).
    let rows = t.services_json().expect("kpr services");
    let np = rows
        .iter()
        .find(|r| r["frontend"] == "192.168.0.2:3001" && r["scope"] == "external")
        .expect("the NodePort's external entry");
    assert!(np["flows"].as_u64() >= Some(3), "{np}");
    assert!(np["packets"].as_u64() >= Some(9), "{np}");
    assert!(np["bytes"].as_u64() > Some(0), "{np}");
}

#[test]
fn nodeport_to_a_backend_behind_an_l3_device() {
    let mut t = Topology::new("l3dev");
    t.add_external(
        "outside",
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(192, 168, 0, 2),
    );
    // The backend's namespace, reached from the node only through tun0 <-> tunb0.
    let ns = NetNs::new(&format!("{}-tunb", t.prefix));
    let _link = TunLink::new(&t.node, "tun0", &ns, "tunb0");
    t.node.ip(&["link", "set", "tun0", "up"]);
    t.node.ip(&["route", "add", "10.181.0.1/32", "dev", "tun0"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["addr", "add", "10.181.0.1/32", "dev", "tunb0"]);
    ns.ip(&["link", "set", "tunb0", "up"]);
    ns.ip(&["route", "add", "default", "dev", "tunb0"]);
    t.pods.push(Pod {
        name: "tunback".into(),
        ip: Ipv4Addr::new(10, 181, 0, 1).into(),
        ns,
    });
    t.serve("tunback", &[80]);
    let yaml = np(&[]).replace(
        "endpoints:\nports",
        "endpoints:\n- {addresses: [10.181.0.1], conditions: {ready: true}, nodeName: node2}\nports",
    );
    let _agent = start(&t, &yaml);
    let out = t.outside_client("outside", &["tcp", "192.168.0.2:3001", "3"]);
    for l in &out {
        assert_eq!(
            l["backend"], "10.181.0.1:80",
            "reached through the L3 device: {l}"
        );
        assert_eq!(
            l["seen_src"], "192.168.0.2",
            "masqueraded on the L3 device (egress program without Ethernet header): {l}"
        );
        assert_eq!(
            l["peer"], "192.168.0.2:3001",
            "the reply came back translated: {l}"
        );
    }
}
