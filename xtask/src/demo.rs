//! `cargo xtask demo`: a throwaway cluster made of network namespaces — two client pods, three
//! backend pods, one Service — load-balanced by kpr's eBPF datapath, then scaled down by
//! editing the Service's EndpointSlice file. Everything is torn down at the end, also on error.
use std::io::IsTerminal as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use kpr_testnet::{Topology, backends_of, service_yaml, slice_yaml, write_manifest};

use crate::setup::root;

const VIP: &str = "10.96.0.10";
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 1, 2),
    Ipv4Addr::new(10, 0, 1, 3),
    Ipv4Addr::new(10, 0, 1, 4),
];

struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn step(&self, s: &str) {
        println!("\n{}", self.paint("1;34", &format!("==> {s}")));
    }
    fn ok(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

fn requests(t: &Topology, st: &Style, n: usize) {
    for i in 0..n {
        let client = if i % 2 == 0 { "client1" } else { "client2" };
        let line = t.client(client, &["tcp", &format!("{VIP}:80"), "1"]);
        let l = &line[0];
        match (l["backend"].as_str(), l["peer"].as_str()) {
            (Some(b), Some(p)) => println!(
                "  {client} ({}) -> {VIP}:80   answered by {}   {}",
                t.pod(client).ip,
                st.ok(b),
                st.dim(&format!("(getpeername: {p})"))
            ),
            _ => println!("  {client} -> {VIP}:80   failed: {l}"),
        }
    }
}

fn kpr_services(t: &Topology) -> String {
    let out = t.kpr(&["services"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run() -> anyhow::Result<()> {
    let st = Style {
        on: std::io::stdout().is_terminal(),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    st.step("Building kpr (eBPF programs + agent)");
    let status = Command::new("cargo")
        .args(["build", "--workspace", "--bins"])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("build failed");
    }
    // SAFETY: setting a variable before any thread reads it.
    unsafe { std::env::set_var("KPR_BIN_DIR", root().join("target/debug")) };

    st.step("Creating a throwaway cluster (network namespaces, no route out)");
    let mut t = Topology::new("demo");
    t.add_pod("client1", Ipv4Addr::new(10, 0, 0, 2));
    t.add_pod("client2", Ipv4Addr::new(10, 0, 0, 3));
    for (i, ip) in BACKENDS.iter().enumerate() {
        let name = format!("backend{i}");
        t.add_pod(&name, *ip);
        t.serve(&name, &[8080]);
        println!("  pod {name:<9} {ip}  (serves TCP+UDP :8080, answers with its own address)");
    }
    println!("  pod client1   10.0.0.2");
    println!(
        "  pod client2   10.0.0.3   (both in cgroup {})",
        t.cgroup.path.display()
    );

    st.step(&format!(
        "Starting `kpr run` with a Service {VIP}:80 -> 3 endpoints :8080"
    ));
    let dir = t.workdir.join("manifests");
    std::fs::create_dir_all(&dir)?;
    write_manifest(&dir, "service.yaml", &service_yaml("web", VIP, 80, 8080));
    write_manifest(
        &dir,
        "endpointslice.yaml",
        &slice_yaml("web", &BACKENDS, 8080),
    );
    println!("  manifests in {}", dir.display());
    let _agent = t.start_agent(&dir);
    t.wait_for_services("the Service", Duration::from_secs(15), |rows| {
        backends_of(rows, &format!("{VIP}:80"), "TCP").is_some_and(|b| b.len() == 3)
    });

    st.step("10 requests to the ClusterIP (translated at connect(), no per-packet NAT)");
    requests(&t, &st, 10);

    st.step("`kpr services` (read from the pinned BPF maps)");
    print!("{}", kpr_services(&t));

    st.step("Scaling down: the EndpointSlice file now lists only 10.0.1.2");
    write_manifest(
        &dir,
        "endpointslice.yaml",
        &slice_yaml("web", &BACKENDS[..1], 8080),
    );
    t.wait_for_services("the scale-down", Duration::from_secs(15), |rows| {
        backends_of(rows, &format!("{VIP}:80"), "TCP").is_some_and(|b| b.len() == 1)
    });
    requests(&t, &st, 6);
    print!("{}", kpr_services(&t));

    st.step("Scaling to zero: connections are refused at once");
    write_manifest(&dir, "endpointslice.yaml", &slice_yaml("web", &[], 8080));
    t.wait_for_services("zero endpoints", Duration::from_secs(15), |rows| {
        backends_of(rows, &format!("{VIP}:80"), "TCP").is_some_and(|b| b.is_empty())
    });
    let l = t.client("client1", &["tcp", &format!("{VIP}:80"), "1"]);
    println!(
        "  client1 -> {VIP}:80   {}",
        st.ok(l[0]["error"].as_str().unwrap_or("?"))
    );

    st.step("Tearing down (namespaces, cgroup, pinned programs and maps)");
    drop(t);
    println!("  {}", st.ok("done"));
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
