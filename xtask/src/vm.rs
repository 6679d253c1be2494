//! `cargo xtask vm-test`: kpr on an older kernel. Boots Debian's 6.1 kernel
//! (`linux-image-amd64`) under qemu (KVM when `/dev/kvm` works, else TCG) and runs tests
//! inside it.
//!
//! The VM has **no network device** (`-nic none`). It sees this machine's root file system
//! read-only over virtio-9p (so the test binaries, `ip`, `nft`, `iptables` and the 6.1
//! modules under `/lib/modules` are the host's own files) with tmpfs on `/tmp` and `/run`,
//! and one writable 9p share for the script it runs and the results it writes. A small
//! initramfs (busybox-static and the modules the 9p root needs, resolved from
//! `modules.dep`) mounts all that and `chroot`s into the host's tree.
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The kernel series the VM tests are about (Debian 12's).
const SERIES: &str = "6.1.";

/// Modules the initramfs loads (with their dependencies) to mount the 9p root.
const BOOT_MODULES: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];

/// A kernel image and its modules.
pub struct Kernel {
    pub version: String,
    pub image: PathBuf,
    pub modules: PathBuf,
}

/// The newest installed 6.1 kernel.
pub fn find_kernel() -> Option<Kernel> {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| v.starts_with(SERIES) && Path::new("/lib/modules").join(v).exists())
        .collect();
    found.sort();
    let version = found.pop()?;
    Some(Kernel {
        image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
        modules: Path::new("/lib/modules").join(&version),
        version,
    })
}

/// `modules.dep` paths of `wanted` and their dependencies, dependencies first.
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep =
        std::fs::read_to_string(modules_dir.join("modules.dep")).context("reading modules.dep")?;
    let deps: std::collections::HashMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect();
    let name_of = |path: &str| {
        Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or("")
            .replace('-', "_")
    };
    let mut order: Vec<String> = Vec::new();
    fn visit(
        m: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        order: &mut Vec<String>,
    ) {
        if order.iter().any(|o| o == m) {
            return;
        }
        // modules.dep lists every (transitive) dependency, nearest first: load in reverse.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, order);
        }
        order.push(m.to_string());
    }
    for w in wanted {
        let Some(path) = deps.keys().find(|k| name_of(k) == *w) else {
            // Built in.
            continue;
        };
        visit(path, &deps, &mut order);
    }
    Ok(order)
}

/// A `newc` cpio archive of (path, mode, contents).
fn cpio(entries: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |name: &str, mode: u32, data: &[u8], ino: usize| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        put(name, *mode, data, i + 1);
    }
    put("TRAILER!!!", 0, &[], 0);
    out
}

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /mods/order); do $B insmod /mods/$m || echo "kpr-vm: insmod $m failed"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /newroot || { echo "kpr-vm: no host root"; $B poweroff -f; }
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /newroot/mnt || { echo "kpr-vm: no results share"; $B poweroff -f; }
$B umount /proc /sys /dev
# A repository under /tmp or /run (a CI clone) stays visible through the tmpfs mounts.
REPO=@REPO@
case "$REPO" in /tmp/*|/run/*) $B mkdir -p /repo && $B mount -o bind /newroot$REPO /repo ;; esac
$B mount -t tmpfs tmpfs /newroot/tmp
$B mount -t tmpfs tmpfs /newroot/run
case "$REPO" in /tmp/*|/run/*) $B mkdir -p /newroot$REPO && $B mount -o move /repo /newroot$REPO ;; esac
# switch_root (not chroot): the kernel's own helpers (modprobe for module autoloading) must
# see the host's tree too.
exec $B switch_root /newroot /bin/bash /mnt/vm-init.sh
"#;

/// Runs inside the VM as PID 1 (in the host's tree): the mounts a node has, the script, and
/// a power-off.
const VM_INIT: &str = r#"set -u
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs tmpfs /var/tmp 2>/dev/null || true
mkdir -p /run/netns /dev/pts /dev/shm
# Character devices appear with their module (no udev here).
modprobe tun
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
echo "kpr-vm: kernel $(uname -r), $(nproc) CPUs"
cd "$KPR_REPO"
bash /mnt/run.sh > /mnt/out.log 2>&1
echo $? > /mnt/rc
sync
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger
sleep 30
"#;

/// Whether KVM can run a stock kernel here. `/dev/kvm` must open, and it must not be PVM
/// (`kvm_pvm`, a nested hypervisor that runs only guests built for it: a stock kernel hangs
/// there after decompression), as on the development machines; TCG serves then.
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && !Path::new("/sys/module/kvm_pvm").exists()
}

/// What a VM run printed and returned.
pub struct VmRun {
    pub output: String,
    pub rc: i32,
    pub console: String,
    pub took: Duration,
}

/// Boots `kernel` and runs `script` (bash, from the repository root, as root) in it.
///
/// # Errors
/// qemu or the kernel is missing, the VM did not finish within `timeout`, or it wrote no
/// result.
pub fn run_script(kernel: &Kernel, script: &str, timeout: Duration) -> anyhow::Result<VmRun> {
    let work = std::env::temp_dir().join(format!("kpr-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let share = work.join("share");
    std::fs::create_dir_all(&share)?;
    let repo = crate::setup::root();
    std::fs::write(
        share.join("vm-init.sh"),
        format!("export KPR_REPO={}\n{VM_INIT}", repo.display()),
    )?;
    std::fs::write(share.join("run.sh"), script)?;

    // The initramfs.
    let order = module_load_order(&kernel.modules, &BOOT_MODULES)?;
    let mut entries: Vec<(String, u32, Vec<u8>)> = vec![
        ("bin".into(), 0o040_755, Vec::new()),
        ("mods".into(), 0o040_755, Vec::new()),
        (
            "bin/busybox".into(),
            0o100_755,
            std::fs::read("/bin/busybox").context("busybox-static is not installed")?,
        ),
        (
            "init".into(),
            0o100_755,
            INIT.replace("@REPO@", &repo.display().to_string())
                .into_bytes(),
        ),
    ];
    let mut order_file = String::new();
    for m in &order {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        entries.push((
            format!("mods/{name}"),
            0o100_644,
            std::fs::read(kernel.modules.join(m)).with_context(|| format!("module {m}"))?,
        ));
        let _ = writeln!(order_file, "{name}");
    }
    entries.push(("mods/order".into(), 0o100_644, order_file.into_bytes()));
    let initrd = work.join("initrd.cpio");
    std::fs::write(&initrd, cpio(&entries))?;

    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm_usable() {
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"]);
    } else {
        cmd.args(["-cpu", "max", "-accel", "tcg,thread=multi"]);
    }
    cmd.args([
        "-m",
        "2048",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .args(["-monitor", "none", "-serial", "stdio"])
    .arg("-kernel")
    .arg(&kernel.image)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=results,security_model=none",
        share.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let console = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        let mut e = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut e);
        s + &e
    });
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the VM did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = console.join().unwrap_or_default();
    let took = started.elapsed();
    let output = std::fs::read_to_string(share.join("out.log")).unwrap_or_default();
    let rc = std::fs::read_to_string(share.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let _ = std::fs::remove_dir_all(&work);
    let Some(rc) = rc else {
        bail!("the VM wrote no result; its console:\n{console}");
    };
    Ok(VmRun {
        output,
        rc,
        console,
        took,
    })
}

/// The test binaries the VM runs: the end-to-end and packet tests of the ebpf mode and of the
/// rule modes on a kernel without tcx, and the ipvs mode's (`ipvs_vm`, a `test = false`
/// target that `cargo test` on a host without IPVS does not run).
pub const VM_TESTS: [&str; 10] = [
    "tc_lifecycle",
    "tc_packets",
    "socket_lb",
    "socket_semantics",
    "tc_nodeport",
    "tc_production",
    "rule_modes",
    "conformance_datapath",
    "takeover",
    "ipvs_vm",
];

/// Builds the test binaries and returns (name, executable) of those in [`VM_TESTS`].
pub fn build_test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    // The workspace's tests, and the VM-only target `cargo test` leaves out by default.
    let mut stdout = String::new();
    for extra in [
        &["--workspace"][..],
        &["-p", "kpr-tests", "--test", "ipvs_vm"],
    ] {
        let out = Command::new("cargo")
            .args(["test", "--no-run", "--message-format=json"])
            .args(extra)
            .current_dir(crate::setup::root())
            .stderr(Stdio::inherit())
            .output()
            .context("cargo test --no-run")?;
        if !out.status.success() {
            bail!("building the test binaries failed");
        }
        stdout.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let mut found = Vec::new();
    for line in stdout.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = m["target"]["name"].as_str().unwrap_or("");
        if m["reason"] == "compiler-artifact"
            && m["target"]["kind"] == serde_json::json!(["test"])
            && VM_TESTS.contains(&name)
            && let Some(exe) = m["executable"].as_str()
        {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// The script that runs the VM suite: what the kernel offers (`kpr status`), then each test
/// binary (two threads: the VM has two CPUs).
fn suite_script(binaries: &[(String, PathBuf)]) -> String {
    let repo = crate::setup::root();
    // Waits are stretched under an emulated CPU.
    let scale = if kvm_usable() { 2 } else { 6 };
    let mut s = format!(
        "export KPR_BIN_DIR={}/target/debug RUST_BACKTRACE=0 KPR_TEST_TIME_SCALE={scale}\n\
         echo '== kpr status on' $(uname -r)\n./target/debug/kpr status\nrc=0\n",
        repo.display()
    );
    for (name, exe) in binaries {
        let _ = write!(
            s,
            "echo '== {name}'\n{} --test-threads=2 || rc=1\n",
            exe.display()
        );
    }
    s.push_str("exit $rc\n");
    s
}

/// Runs the VM suite; returns its output (cargo's `test result:` lines included) and
/// whether it passed.
pub fn run_suite() -> anyhow::Result<(String, bool)> {
    let kernel = find_kernel()
        .context("no 6.1 kernel: apt-get install linux-image-amd64 (cargo xtask setup does it)")?;
    let binaries = build_test_binaries()?;
    let r = run_script(&kernel, &suite_script(&binaries), Duration::from_secs(2400))?;
    let summary = format!(
        "kpr-vm: kernel {} ({}), {} test binaries, {:.0} s",
        kernel.version,
        if kvm_usable() { "KVM" } else { "TCG" },
        binaries.len(),
        r.took.as_secs_f64()
    );
    if r.rc != 0 && !r.output.contains("test result:") {
        eprintln!("kpr-vm console:\n{}", r.console);
    }
    Ok((format!("{}{summary}\n", r.output), r.rc == 0))
}

/// `cargo xtask vm-test [--script S]`: runs the VM suite (or a script) and prints its output.
pub fn run(script: Option<&str>) -> anyhow::Result<()> {
    if script.is_none() {
        let (out, ok) = run_suite()?;
        print!("{out}");
        if !ok {
            bail!("the VM suite failed");
        }
        return Ok(());
    }
    let kernel = find_kernel()
        .context("no 6.1 kernel: apt-get install linux-image-amd64 (cargo xtask setup does it)")?;
    let script = script.map_or_else(default_script, str::to_string);
    let r = run_script(&kernel, &script, Duration::from_secs(1500))?;
    print!("{}", r.output);
    std::io::stdout().flush()?;
    eprintln!(
        "kpr-vm: kernel {} ({}) ran for {:.0} s, exit {}",
        kernel.version,
        if kvm_usable() { "KVM" } else { "TCG" },
        r.took.as_secs_f64(),
        r.rc
    );
    if r.rc != 0 || std::env::var_os("KPR_VM_CONSOLE").is_some() {
        eprintln!("kpr-vm console:\n{}", r.console);
    }
    if r.rc != 0 {
        bail!("the VM suite failed");
    }
    Ok(())
}

fn default_script() -> String {
    "set -x\nuname -r\n./target/debug/kpr status\n".to_string()
}
