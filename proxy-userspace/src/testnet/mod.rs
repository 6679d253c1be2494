//! Throwaway "clusters" made of network namespaces and veth
//! pairs, a child cgroup for the client processes, a private bpffs directory, and the kpr
//! agent as a child process. Every resource is a guard that undoes itself in `Drop`, so a
//! failing test leaves nothing behind.
//!
//! Network safety: the node namespace has no uplink and no default route. Pods route only to
//! the node namespace. A packet to an address nobody in the topology owns (a Service VIP that
//! was not translated, say) dies in the node namespace with "network unreachable"; nothing
//! the harness runs is ever sent from, or to, the host's own namespace.
pub mod rng;
pub mod tun;
pub mod workload;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Panics with a clear message unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (network namespaces, cgroups, BPF): run `cargo xtask test` as root"
    );
}

/// Runs a command, panicking with its output on failure.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name unique to this process and call, short enough for netns and cgroup names.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "kt{}-{}-{tag}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup v2 mount point (from /proc/self/mountinfo).
pub fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    for line in info.lines() {
        let mut halves = line.split(" - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return PathBuf::from(mp);
        }
    }
    panic!("no cgroup v2 filesystem is mounted")
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs() {
    let mounted = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
        });
    if !mounted {
        fs::create_dir_all("/sys/fs/bpf").ok();
        sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Self {
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Self {
            name: name.to_string(),
        }
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }
    /// Sets sysctls (`key=value`) inside this namespace.
    pub fn sysctl(&self, settings: &[&str]) {
        let mut full = vec![
            "ip",
            "netns",
            "exec",
            self.name.as_str(),
            "sysctl",
            "-q",
            "-w",
        ];
        full.extend_from_slice(settings);
        sh(&full);
    }

    /// `ip -n <ns> <args...>`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child cgroup (v2) for the client processes, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Kill anything still inside, then remove the directory.
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: sending a signal to a pid we placed in our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process killed on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A pod: its own network namespace with one veth to the node namespace.
pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    pub ns: NetNs,
}

/// `ip/32` or `ip/128`.
fn host_prefix(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// `args` plus `nodad` for an IPv6 address (usable at once).
fn with_nodad<'a>(ip: IpAddr, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if ip.is_ipv6() {
        v.push("nodad");
    }
    v
}

/// No duplicate address detection on `dev` in `ns` (addresses usable at once).
fn no_dad(ns: &NetNs, dev: &str) {
    ns.sysctl(&[&format!("net.ipv6.conf.{dev}.accept_dad=0")]);
}

/// The throwaway cluster: one node namespace, pods around it, a client cgroup, a bpffs dir.
pub struct Topology {
    /// Children first: they must die before the cgroup and namespaces go.
    children: Vec<ChildGuard>,
    pub pods: Vec<Pod>,
    pub node: NetNs,
    pub cgroup: Cgroup,
    pub bpffs: PathBuf,
    pub prefix: String,
    pub workdir: PathBuf,
}

/// The `kpr` binary: this process when it is `kpr` (the conformance runner), else the one
/// `cargo build` put next to the test executable.
pub fn kpr_bin() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && exe.file_name().is_some_and(|n| n == "kpr")
    {
        return exe;
    }
    target_bin("kpr")
}

/// Flags for an agent in the host namespace: no TC programs on the host's interfaces, no
/// removal of other modes' leftovers (the host's iptables and nftables are never touched), and
/// health/metrics servers on ephemeral loopback ports (agents of parallel tests share the
/// host namespace).
fn host_safe(mut cmd: Command) -> Command {
    cmd.args([
        "--tc-interfaces",
        "none",
        "--cleanup-other-modes",
        "false",
        "--fallback-renderer",
        "none",
    ]);
    // Servers on loopback only (ephemeral ports), unless the test chose an address itself.
    for flag in ["--healthz-bind-address", "--metrics-bind-address"] {
        let given = cmd.get_args().any(|a| a == flag);
        if !given {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    cmd
}

/// The capabilities every agent the tests start keeps (its bounding set; the agent runs as
/// root without the others, as in kpr's DaemonSet): `KPR_AGENT_CAPS` (comma-separated names
/// such as `net_admin,bpf`, or `all`), else [`crate::caps::AGENT`].
fn agent_capabilities() -> Option<Vec<u32>> {
    let names = std::env::var("KPR_AGENT_CAPS").ok();
    match names.as_deref() {
        Some("all") => None,
        Some(list) => Some(
            list.split(',')
                .filter(|n| !n.is_empty())
                .map(|n| {
                    crate::caps::number(n)
                        .unwrap_or_else(|| panic!("KPR_AGENT_CAPS: unknown capability {n}"))
                })
                .collect(),
        ),
        None => Some(crate::caps::AGENT.iter().map(|(_, n)| *n).collect()),
    }
}

/// `kpr` as the tests start an agent: with only [`agent_capabilities`].
fn agent_process() -> Command {
    let mut cmd = Command::new(kpr_bin());
    if let Some(keep) = agent_capabilities() {
        // SAFETY: only prctl(2) calls between fork and exec (async-signal-safe syscalls).
        unsafe {
            cmd.pre_exec(move || {
                crate::caps::limit_bounding_set(&keep);
                Ok(())
            });
        }
    }
    cmd
}

/// How much longer than on this machine the tests' waits may take: `KPR_TEST_TIME_SCALE`
/// (default 1), set by `cargo xtask vm-test` for an emulated (TCG) CPU.
#[must_use]
pub fn time_scale() -> u32 {
    std::env::var("KPR_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// `d` times [`time_scale`].
#[must_use]
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Where `cargo build` put the binaries (next to the test executable's `deps/`).
pub fn target_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("KPR_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`, done by `cargo xtask test`)",
        bin.display()
    );
    bin
}

impl Topology {
    /// A node namespace with forwarding on and no route out (its default route ends in a
    /// sink veth whose peer is down), a client cgroup, a bpffs dir.
    pub fn new(tag: &str) -> Self {
        require_root();
        ensure_bpffs();
        let prefix = unique(tag);
        let node = NetNs::new(&format!("{prefix}-node"));
        node.sysctl(&["net.ipv4.ip_forward=1"]);
        // The pods' gateway, as Calico does it: the node-side veths carry no address; the node
        // owns 169.254.1.1 (link scope, on lo) and answers ARP for it on every veth. So the
        // node's own traffic to pods, and masquerade towards them, leave with a node IP.
        node.ip(&[
            "addr",
            "add",
            "169.254.1.1/32",
            "dev",
            "lo",
            "scope",
            "link",
        ]);
        // A default route into a sink: a veth whose peer (in the same namespace) stays down,
        // so it drops everything it is given and nothing leaves the namespace, yet traffic to
        // addresses nobody owns is *forwarded* (through the FORWARD hook, where rule-based
        // modes REJECT) as on a real node, instead of failing the route lookup. (This kernel
        // has no dummy devices.)
        node.ip(&[
            "link", "add", "sink0", "type", "veth", "peer", "name", "sink1",
        ]);
        node.ip(&["link", "set", "sink0", "up"]);
        node.ip(&["route", "add", "default", "dev", "sink0"]);
        node.ip(&["-6", "route", "add", "default", "dev", "sink0"]);
        node.sysctl(&["net.ipv6.conf.all.forwarding=1"]);
        // ICMP errors (REJECT) without the 1/s rate limit, so every attempt hears its answer.
        node.sysctl(&["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"]);
        let cgroup = Cgroup::new(&prefix);
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{prefix}"));
        let workdir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&workdir).expect("workdir");
        Self {
            children: Vec::new(),
            pods: Vec::new(),
            node,
            cgroup,
            bpffs,
            prefix,
            workdir,
        }
    }

    /// Adds a pod with `ip` (IPv4 or IPv6), routed through the node namespace. Its gateway is
    /// 169.254.1.1 (on the node's `lo`) or fe80::1 (on the node's end of the veth).
    pub fn add_pod(&mut self, name: &str, ip: impl Into<IpAddr>) -> usize {
        let ip: IpAddr = ip.into();
        let ns = NetNs::new(&format!("{}-{name}", self.prefix));
        let idx = self.pods.len();
        let host_if = format!("p{idx}");
        self.node.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        if ip.is_ipv6() {
            no_dad(&self.node, &host_if);
            no_dad(&ns, "eth0");
            self.node
                .ip(&["-6", "addr", "add", "fe80::1/64", "dev", &host_if, "nodad"]);
        }
        self.node.ip(&["link", "set", &host_if, "up"]);
        self.node
            .ip(&["route", "add", &host_prefix(ip), "dev", &host_if]);
        ns.ip(&with_nodad(
            ip,
            &["addr", "add", &host_prefix(ip), "dev", "eth0"],
        ));
        ns.ip(&["link", "set", "eth0", "up"]);
        let gw = if ip.is_ipv6() {
            "fe80::1"
        } else {
            "169.254.1.1"
        };
        if ip.is_ipv4() {
            ns.ip(&["route", "add", gw, "dev", "eth0"]);
        }
        ns.ip(&["route", "add", "default", "via", gw, "dev", "eth0"]);
        self.pods.push(Pod {
            name: name.to_string(),
            ip,
            ns,
        });
        idx
    }

    /// Adds a host outside the cluster: its own namespace with `client_ip`, linked to the node
    /// namespace, where the node owns `node_ip` on that link. The outside host's default route
    /// points at the node (which has no route out), so nothing it sends can leave the topology.
    pub fn add_external(
        &mut self,
        name: &str,
        client_ip: impl Into<IpAddr>,
        node_ip: impl Into<IpAddr>,
    ) -> usize {
        let (client_ip, node_ip): (IpAddr, IpAddr) = (client_ip.into(), node_ip.into());
        let ns = NetNs::new(&format!("{}-{name}", self.prefix));
        let idx = self.pods.len();
        let node_if = format!("x{idx}");
        let n = node_ip.to_string();
        self.node.ip(&[
            "link", "add", &node_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        if client_ip.is_ipv6() {
            no_dad(&self.node, &node_if);
            no_dad(&ns, "eth0");
        }
        self.node.ip(&with_nodad(
            node_ip,
            &["addr", "add", &host_prefix(node_ip), "dev", &node_if],
        ));
        self.node.ip(&["link", "set", &node_if, "up"]);
        self.node
            .ip(&["route", "add", &host_prefix(client_ip), "dev", &node_if]);
        ns.ip(&with_nodad(
            client_ip,
            &["addr", "add", &host_prefix(client_ip), "dev", "eth0"],
        ));
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", &n, "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", &n, "dev", "eth0"]);
        self.pods.push(Pod {
            name: name.to_string(),
            ip: client_ip,
            ns,
        });
        idx
    }

    /// Runs the test client in `pod` *outside* the client cgroup (no socket load balancing:
    /// what an outside host sees).
    pub fn outside_client(&self, pod: &str, args: &[&str]) -> Vec<serde_json::Value> {
        self.run_workload(pod, args, false)
    }

    /// Runs a workload in `pod` and parses its JSON lines.
    fn run_workload(&self, pod: &str, args: &[&str], in_cgroup: bool) -> Vec<serde_json::Value> {
        let out = self
            .workload_in(pod, args, in_cgroup)
            .output()
            .expect("run client");
        assert!(
            out.status.success(),
            "client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad client line {l:?}: {e}"))
            })
            .collect()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// A command that runs inside `pod`'s namespace, in the client cgroup when `client`.
    pub fn command_in(&self, pod: &str, program: &Path, args: &[&str], client: bool) -> Command {
        self.command_in_ns(&self.pod(pod).ns.path(), program, args, client)
    }

    /// `kpr workload <args>` inside `pod`'s namespace.
    pub fn workload_in(&self, pod: &str, args: &[&str], client: bool) -> Command {
        let mut full = vec!["workload"];
        full.extend_from_slice(args);
        self.command_in(pod, &kpr_bin(), &full, client)
    }

    /// A command inside the namespace at `ns_path`, in the client cgroup when `client`.
    pub fn command_in_ns(
        &self,
        ns_path: &Path,
        program: &Path,
        args: &[&str],
        client: bool,
    ) -> Command {
        let ns_path = ns_path.to_path_buf();
        let procs = self.cgroup.path.join("cgroup.procs");
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: only async-signal-safe calls (open, write, setns, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if client {
                    fs::write(&procs, b"0")?;
                }
                let f = fs::File::open(&ns_path)?;
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts test servers in a pod on each `ip:port`, waiting until they listen.
    pub fn serve(&mut self, pod: &str, ports: &[u16]) {
        let ip = self.pod(pod).ip;
        let addrs: Vec<String> = ports
            .iter()
            .map(|p| std::net::SocketAddr::new(ip, *p).to_string())
            .collect();
        let mut args = vec!["serve"];
        args.extend(addrs.iter().map(String::as_str));
        let mut child = self
            .workload_in(pod, &args, false)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("server start line");
        assert!(
            line.contains("serving"),
            "server in {pod} did not start: {line}"
        );
        self.children.push(ChildGuard(child));
    }

    /// Runs the test client in `pod` (inside the client cgroup) and parses its JSON lines.
    pub fn client(&self, pod: &str, args: &[&str]) -> Vec<serde_json::Value> {
        self.run_workload(pod, args, true)
    }

    /// Starts a long-running client; its stdout is piped.
    pub fn spawn_client(&mut self, pod: &str, args: &[&str]) -> Child {
        self.workload_in(pod, args, true)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client")
    }

    /// The `kpr run` command for this topology. The agent runs in the host namespace (it only
    /// touches BPF maps and the test cgroup) with `--tc-interfaces none`: TC programs are never
    /// attached to the host's own interfaces.
    pub fn agent_command(&self, manifests: &Path, extra: &[&str]) -> Command {
        host_safe(self.agent_command_base(manifests, extra))
    }

    /// `kpr run --kubeconfig` in the host namespace, with the same host-safe flags as
    /// [`Topology::agent_command`] (no TC programs, loopback-only servers).
    pub fn agent_command_api(&self, kubeconfig: &Path, extra: &[&str]) -> Command {
        host_safe(
            self.agent_command_with_source(
                &["--kubeconfig".as_ref(), kubeconfig.as_os_str()],
                extra,
            ),
        )
    }

    /// `kpr run` inside the node namespace, with the TC programs on every interface there
    /// (and nowhere else).
    pub fn agent_command_in_node(&self, manifests: &Path, extra: &[&str]) -> Command {
        self.in_node_namespace(self.agent_command_base(manifests, extra))
    }

    /// `kpr run --kubeconfig` inside the node namespace, as [`Self::agent_command_in_node`]
    /// (the API server must listen inside the node namespace too).
    pub fn agent_command_api_in_node(&self, kubeconfig: &Path, extra: &[&str]) -> Command {
        self.in_node_namespace(
            self.agent_command_with_source(
                &["--kubeconfig".as_ref(), kubeconfig.as_os_str()],
                extra,
            ),
        )
    }

    /// `cmd` run inside the node namespace with TC programs on every interface there.
    fn in_node_namespace(&self, mut cmd: Command) -> Command {
        cmd.args(["--tc-interfaces", "all"]);
        let ns_path = self.node.path();
        // SAFETY: only async-signal-safe calls (open, setns, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let f = fs::File::open(&ns_path)?;
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    fn agent_command_base(&self, manifests: &Path, extra: &[&str]) -> Command {
        self.agent_command_with_source(&["--manifests".as_ref(), manifests.as_os_str()], extra)
    }

    /// The agent started the way kubeadm starts kube-proxy: flags at the top level, no `run`
    /// (host-safe flags added, as for [`Topology::agent_command`]).
    /// kube-proxy's command line as kubeadm runs it (`--config`, `--hostname-override`), with
    /// no source flag: the config's `clientConnection.kubeconfig` names the API server.
    pub fn agent_command_kubeadm(&self, extra: &[&str]) -> Command {
        let mut cmd = agent_process();
        cmd.arg(format!("--bpf-fs-path={}", self.bpffs.display()))
            .arg(format!("--cgroup-path={}", self.cgroup.path.display()))
            .arg("--allow-child-cgroup")
            .args(extra);
        host_safe(cmd)
    }

    pub fn agent_command_kube_proxy_style(&self, manifests: &Path, extra: &[&str]) -> Command {
        let mut cmd = agent_process();
        cmd.arg(format!("--manifests={}", manifests.display()))
            .arg(format!("--bpf-fs-path={}", self.bpffs.display()))
            .arg(format!("--cgroup-path={}", self.cgroup.path.display()))
            .arg("--allow-child-cgroup")
            .args(extra);
        host_safe(cmd)
    }

    /// An agent of `mode` in the node namespace, as the rule-mode and takeover tests run it:
    /// node IP 192.168.0.2, pod CIDR 10.0.0.0/8, no health or metrics servers.
    pub fn start_mode_agent_in_node(&self, manifests: &Path, mode: &str) -> ChildGuard {
        self.start_mode_agent_in_node_with(manifests, mode, &[])
    }

    /// [`Self::start_mode_agent_in_node`] with `extra` flags.
    pub fn start_mode_agent_in_node_with(
        &self,
        manifests: &Path,
        mode: &str,
        extra: &[&str],
    ) -> ChildGuard {
        self.start_agent_in_node(manifests, &Self::mode_agent_flags(mode, extra))
    }

    /// The flags [`Self::start_mode_agent_in_node_with`] gives an agent of `mode`.
    #[must_use]
    pub fn mode_agent_flags<'a>(mode: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--proxy-mode",
            mode,
            "--node-ip",
            "192.168.0.2",
            "--cluster-cidr",
            "10.0.0.0/8",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Runs `program args` inside the node namespace; its stdout.
    pub fn in_node(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path().display()))
            .arg(program)
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every one of a dozen TCP connections from `pod` to `vip` reaches one of
    /// `backends`, and each of them is reached.
    pub fn wait_reaches(&self, pod: &str, vip: &str, backends: &[&str]) {
        let want: std::collections::BTreeSet<String> =
            backends.iter().map(|b| (*b).to_string()).collect();
        let start = Instant::now();
        loop {
            let lines = self.client(pod, &["tcp", vip, "12"]);
            let got: std::collections::BTreeSet<String> = lines
                .iter()
                .filter_map(|l| l["backend"].as_str().map(str::to_string))
                .collect();
            if got == want && lines.iter().all(|l| l["error"].is_null()) {
                return;
            }
            assert!(
                start.elapsed() < scaled(Duration::from_secs(30)),
                "{vip} should reach {want:?}, got {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Spawns an agent command built by the caller (log in the workdir, killed on drop).
    pub fn spawn(&self, cmd: Command) -> ChildGuard {
        self.spawn_agent(cmd)
    }

    fn agent_command_with_source(&self, source: &[&std::ffi::OsStr], extra: &[&str]) -> Command {
        let mut cmd = agent_process();
        cmd.arg("run")
            .args(source)
            .arg("--bpf-fs-path")
            .arg(&self.bpffs)
            .arg("--cgroup-path")
            .arg(&self.cgroup.path)
            .arg("--allow-child-cgroup")
            .args(["--min-sync-period", "20ms"])
            .args(extra);
        if !extra.contains(&"--hostname-override") {
            cmd.args(["--hostname-override", "test-node"]);
        }
        cmd
    }

    /// Starts the agent; its log goes to `<workdir>/agent-N.log`.
    pub fn start_agent(&self, manifests: &Path) -> ChildGuard {
        self.spawn_agent(self.agent_command(manifests, &[]))
    }

    /// `start_agent` with extra flags.
    pub fn start_agent_with(&self, manifests: &Path, extra: &[&str]) -> ChildGuard {
        self.spawn_agent(self.agent_command(manifests, extra))
    }

    /// Starts the agent inside the node namespace (TC programs on the node's interfaces).
    pub fn start_agent_in_node(&self, manifests: &Path, extra: &[&str]) -> ChildGuard {
        self.spawn_agent(self.agent_command_in_node(manifests, extra))
    }

    fn spawn_agent(&self, mut cmd: Command) -> ChildGuard {
        static N: AtomicU32 = AtomicU32::new(0);
        let log = self
            .workdir
            .join(format!("agent-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let f = fs::File::create(&log).expect("agent log");
        let child = cmd
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn kpr run");
        ChildGuard(child)
    }

    /// Runs `kpr <args>` against this topology's bpffs dir.
    pub fn kpr(&self, args: &[&str]) -> std::process::Output {
        Command::new(kpr_bin())
            .args(args)
            .arg("--bpf-fs-path")
            .arg(&self.bpffs)
            .output()
            .expect("run kpr")
    }

    /// Frontends as `kpr services -o json` reports them.
    pub fn services_json(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.kpr(&["services", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `cond` holds for the datapath's frontends, or panics after `timeout`
    /// (times [`time_scale`]).
    pub fn wait_for_services(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        let timeout = timeout * time_scale();
        let start = Instant::now();
        loop {
            if let Some(rows) = self.services_json()
                && cond(&rows)
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; datapath holds: {:?}\nagent logs in {}",
                self.services_json(),
                self.workdir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The backends of `frontend` (e.g. "10.96.0.10:80") with `proto`, as the datapath holds them.
pub fn backends_of(rows: &[serde_json::Value], frontend: &str, proto: &str) -> Option<Vec<String>> {
    rows.iter()
        .find(|r| r["frontend"] == frontend && r["protocol"] == proto && r["scope"] == "internal")
        .map(|r| {
            let mut v: Vec<String> = r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect();
            v.sort();
            v
        })
}

impl Topology {
    /// The rule-mode tests' cluster: a client pod 10.0.0.2, backends 10.180.0.1 ("a") and
    /// 10.180.0.2 ("b") serving port 80, and `manifests` written to `<workdir>/manifests`.
    pub fn client_and_two_backends(tag: &str, manifests: &str) -> (Self, PathBuf) {
        let mut t = Self::new(tag);
        t.add_pod("client", std::net::Ipv4Addr::new(10, 0, 0, 2));
        t.add_pod("a", std::net::Ipv4Addr::new(10, 180, 0, 1));
        t.add_pod("b", std::net::Ipv4Addr::new(10, 180, 0, 2));
        t.serve("a", &[80]);
        t.serve("b", &[80]);
        let dir = t.workdir.join("manifests");
        fs::create_dir_all(&dir).expect("manifests dir");
        write_manifest(&dir, "all.yaml", manifests);
        (t, dir)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.children.clear();
        // Unpin everything this topology's agent pinned: links detach, maps are freed.
        let _ = fs::remove_dir_all(&self.bpffs);
        if std::env::var_os("KPR_KEEP_LOGS").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.workdir);
        }
    }
}

/// Writes a manifest file atomically (write + rename), so the agent never reads half a file.
pub fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).expect("write manifest");
    fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

/// A ClusterIP Service manifest with one TCP and one UDP port.
pub fn service_yaml(name: &str, vip: &str, port: u16, target: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: tcp, port: {port}, targetPort: {target}, protocol: TCP}}\n  - {{name: udp, port: {port}, targetPort: {target}, protocol: UDP}}\n"
    )
}

/// An EndpointSlice manifest for `service_yaml`'s Service with `ips` ready.
pub fn slice_yaml(name: &str, ips: &[Ipv4Addr], target: u16) -> String {
    let eps: String = ips
        .iter()
        .map(|ip| {
            format!(
                "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: test-node}}\n"
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "  []\n".to_string()
    } else {
        eps
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: default, name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- {{name: tcp, port: {target}, protocol: TCP}}\n- {{name: udp, port: {target}, protocol: UDP}}\n"
    )
}

/// Reading a piped child's JSON lines to the end.
pub trait JsonLines {
    fn wait_with_output_lines(self) -> Vec<serde_json::Value>;
}

impl JsonLines for Child {
    fn wait_with_output_lines(self) -> Vec<serde_json::Value> {
        let out = self.wait_with_output().expect("wait for client");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
