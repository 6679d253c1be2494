//! Loading, attaching, pinning, adopting and removing kpr's eBPF programs and maps.
//!
//! Layout under the bpffs path (default `/sys/fs/bpf/kpr`):
//! ```text
//! v<MAP_LAYOUT_VERSION>/maps/KPR_SERVICES ...        pinned maps (shared by every program)
//! v<MAP_LAYOUT_VERSION>/prog-<object hash>/connect4  pinned cgroup links, one per hook
//! ```
//! A restarted agent whose object hash matches adopts the pinned links and maps without
//! loading anything. A new kpr binary (another hash) loads its programs and swaps them into
//! the existing links atomically (`BPF_LINK_UPDATE`), so the datapath never has a gap.
use std::fs;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::maps::MapData;
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::links::LinkOrder;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttach};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType};
use proxy_common::{MAP_LAYOUT_VERSION, map_names};

use crate::render::CleanupReport;
use crate::{Error, Result};

/// The eBPF object built from `proxy-ebpf`, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpr-ebpf"));

/// The socket-LB programs: (program name in the object, pin name of its link).
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    ("kpr_connect4", "connect4"),
    ("kpr_connect6", "connect6"),
    ("kpr_sendmsg4", "sendmsg4"),
    ("kpr_sendmsg6", "sendmsg6"),
    ("kpr_recvmsg4", "recvmsg4"),
    ("kpr_recvmsg6", "recvmsg6"),
    ("kpr_getpeername4", "getpeername4"),
    ("kpr_getpeername6", "getpeername6"),
];

/// The socket-release program (least-connection counts of sockets): (program, link pin).
pub const SOCK_RELEASE: (&str, &str) = ("kpr_sock_release", "sock_release");

/// The TC programs: (program name in the object, pin name of the program). Ingress and
/// egress for Ethernet devices, then for L3 devices (no link-layer header: tun, ipip,
/// WireGuard).
pub const TC_PROGRAMS: [(&str, &str); 4] = [
    ("kpr_tc_ingress", "tc_ingress"),
    ("kpr_tc_egress", "tc_egress"),
    ("kpr_tc_ingress_l3", "tc_ingress_l3"),
    ("kpr_tc_egress_l3", "tc_egress_l3"),
];

/// The index into [`TC_PROGRAMS`] of the program for `direction` on an interface.
fn tc_program_index(direction: &str, l3: bool) -> usize {
    usize::from(direction == "egress") + if l3 { 2 } else { 0 }
}

/// Whether interface `name` of the current network namespace has no Ethernet header (its
/// ARP hardware type is not ARPHRD_ETHER): asked with SIOCGIFHWADDR on a socket of this
/// namespace (sysfs may show another namespace's devices).
#[must_use]
pub fn is_l3_device(name: &str) -> bool {
    const ARPHRD_ETHER: u16 = 1;
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &raw mut req) };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    // SAFETY: the union member SIOCGIFHWADDR writes.
    rc == 0 && unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } != ARPHRD_ETHER
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `tc-<ifindex>-<ifname>-<direction>` -> direction.
fn tc_link_direction(pin_name: &str) -> Option<&'static str> {
    if !pin_name.starts_with("tc-") {
        return None;
    }
    if pin_name.ends_with("-ingress") {
        Some("ingress")
    } else if pin_name.ends_with("-egress") {
        Some("egress")
    } else {
        None
    }
}

/// The network interfaces of the current network namespace: (ifindex, name).
#[must_use]
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Which interfaces get the TC programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcInterfaces {
    /// Every interface of the agent's network namespace but loopback (rescanned, so pod
    /// interfaces created later are covered).
    All,
    /// Only these names.
    Named(Vec<String>),
    /// No TC programs (socket load balancing only).
    None,
}

/// This build's TC programs, from their pins under `dir`, in [`TC_PROGRAMS`] order.
fn pinned_tc_programs(dir: &Path) -> Result<Vec<SchedClassifier>> {
    TC_PROGRAMS
        .iter()
        .map(|(_, pin)| {
            let path = dir.join(pin);
            SchedClassifier::from_pin(&path)
                .map_err(|e| Error::program(path.display().to_string(), "opening", e))
        })
        .collect()
}

impl TcInterfaces {
    /// Whether interface `name` gets the TC programs.
    #[must_use]
    pub fn selects(&self, name: &str) -> bool {
        match self {
            Self::All => name != "lo",
            Self::Named(names) => names.iter().any(|n| n == name),
            Self::None => false,
        }
    }
}

/// The priority and handle of kpr's cls_bpf filters on kernels without tcx: fixed, so that a
/// restarted or upgraded agent replaces its filters in place (atomically) instead of adding
/// new ones, and `kpr cleanup` finds them.
pub const TC_FILTER_PRIORITY: u16 = 0x2a;
pub const TC_FILTER_HANDLE: u32 = 0x6b70;

/// Interfaces whose clsact filters this process already attached (or replaced).
static TC_FILTERED: std::sync::Mutex<Vec<(u32, String)>> = std::sync::Mutex::new(Vec::new());

fn tc_parent(attach_type: TcAttachType) -> aya::programs::tc::TcHandle {
    aya::programs::tc::TcHandle::from(attach_type)
}

/// Kernels without tcx (before 6.6): a `clsact` qdisc on each selected interface, and this
/// build's programs as direct-action cls_bpf filters at kpr's priority and handle. A filter
/// already there (an earlier agent's, or an older build's) is replaced in place; filters are
/// not bpf links, so nothing is pinned: they live as long as the interface (or until
/// `kpr cleanup`). Returns the interfaces newly attached.
fn sync_tc_filters(layout: &PinLayout, select: &TcInterfaces) -> Result<Vec<String>> {
    use aya::programs::tc::{NlOptions, SchedClassifierLink, TcHandle, qdisc_add_clsact};
    let dir = layout.links_dir(&object_hash());
    let ifaces = interfaces();
    let mut done = TC_FILTERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    done.retain(|d| ifaces.contains(d));
    let mut programs = pinned_tc_programs(&dir)?;
    let mut attached = Vec::new();
    for (idx, name) in ifaces {
        let wanted = select.selects(&name);
        if !wanted || done.contains(&(idx, name.clone())) {
            continue;
        }
        // EEXIST: the qdisc is there already.
        let _ = qdisc_add_clsact(idx);
        let l3 = is_l3_device(&name);
        let mut ok = true;
        for (direction, attach_type) in [
            ("ingress", TcAttachType::Ingress),
            ("egress", TcAttachType::Egress),
        ] {
            let prog = &mut programs[tc_program_index(direction, l3)];
            let handle = TcHandle::from(TC_FILTER_HANDLE);
            // Replace kpr's filter if there is one, else create it.
            let replaced = SchedClassifierLink::attached(
                idx,
                tc_parent(attach_type),
                TC_FILTER_PRIORITY,
                handle,
                None,
            )
            .map_err(|e| e.to_string())
            .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            let id = match replaced {
                Ok(id) => Ok(id),
                Err(_) => prog.attach(
                    idx,
                    TcAttach::Netlink {
                        parent: tc_parent(attach_type),
                        options: NlOptions {
                            priority: TC_FILTER_PRIORITY,
                            handle,
                            classid: None,
                        },
                    },
                ),
            };
            match id.and_then(|id| prog.take_link(id)) {
                // The filter stays when this process lets go of it.
                Ok(link) => std::mem::forget(link),
                Err(e) => {
                    ok = false;
                    tracing::warn!("TC {direction} on {name}: attaching a clsact filter: {e}");
                }
            }
        }
        if ok {
            attached.push(format!("{name} (clsact)"));
            done.push((idx, name));
        }
    }
    Ok(attached)
}

/// Removes kpr's clsact filters from every interface of this namespace (kernels without tcx).
pub fn remove_tc_filters() -> Vec<String> {
    use aya::programs::links::Link as _;
    use aya::programs::tc::{SchedClassifierLink, TcHandle};
    let mut removed = Vec::new();
    for (idx, name) in interfaces() {
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok(link) = SchedClassifierLink::attached(
                idx,
                tc_parent(attach_type),
                TC_FILTER_PRIORITY,
                TcHandle::from(TC_FILTER_HANDLE),
                None,
            ) && link.detach().is_ok()
            {
                removed.push(format!("clsact filter on {name}"));
            }
        }
    }
    TC_FILTERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    removed
}

/// Attaches this build's pinned TC programs (ingress and egress, tcx) to every selected
/// interface that lacks them, pins the links, and forgets links of interfaces that are gone.
/// Returns the interfaces newly attached.
///
/// # Errors
/// The pinned programs cannot be opened. Per-interface failures are logged and skipped.
pub fn sync_tc_links(layout: &PinLayout, select: &TcInterfaces) -> Result<Vec<String>> {
    if *select == TcInterfaces::None {
        return Ok(Vec::new());
    }
    if !crate::render::probe::tcx_supported() {
        return sync_tc_filters(layout, select);
    }
    let dir = layout.links_dir(&object_hash());
    let ifaces = interfaces();
    // Links of vanished interfaces: unpin (the kernel already detached them).
    for entry in fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if tc_link_direction(&name).is_none() {
            continue;
        }
        let alive = ifaces
            .iter()
            .any(|(idx, ifname)| name.starts_with(&format!("tc-{idx}-{ifname}-")));
        if !alive {
            let _ = fs::remove_file(entry.path());
        }
    }
    let mut programs = pinned_tc_programs(&dir)?;
    let mut attached = Vec::new();
    for (idx, name) in ifaces {
        let wanted = select.selects(&name);
        if !wanted {
            continue;
        }
        let l3 = is_l3_device(&name);
        for (direction, attach_type) in [
            ("ingress", TcAttachType::Ingress),
            ("egress", TcAttachType::Egress),
        ] {
            let prog = &mut programs[tc_program_index(direction, l3)];
            let pin = dir.join(format!("tc-{idx}-{name}-{direction}"));
            if pin.exists() {
                continue;
            }
            let result = prog
                .attach(
                    idx,
                    TcAttach::Tcx {
                        attach_type,
                        order: LinkOrder::default(),
                    },
                )
                .and_then(|id| prog.take_link(id))
                .map_err(|e| Error::program(format!("TC {direction} on {name}"), "attaching", e))
                .and_then(|link| {
                    FdLink::try_from(link).map_err(|e| Error::link(&name, "taking the link", e))
                })
                .and_then(|fd| {
                    fd.pin(&pin).map(|_| ()).map_err(|source| Error::Pin {
                        path: pin.clone(),
                        source,
                    })
                });
            match result {
                Ok(()) => attached.push(format!("{name}/{direction}")),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
    Ok(attached)
}

/// Attaches the socket-release program to `cgroup` (or swaps it into an older build's link).
fn attach_sock_release(
    ebpf: &mut aya::Ebpf,
    links_dir: &Path,
    old_dirs: &[PathBuf],
    cgroup_file: &fs::File,
    cgroup: &Path,
) -> Result<()> {
    let (prog_name, pin) = SOCK_RELEASE;
    let target = links_dir.join(pin);
    if target.exists() {
        return Ok(());
    }
    let prog: &mut CgroupSock = program(ebpf, prog_name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| Error::program(prog_name, "loading (verifier)", e))?;
    }
    // aya cannot swap a cgroup_sock link's program in place: attach this build's (cgroup
    // links always allow several programs), then drop an older build's link.
    let old = old_dirs.iter().map(|d| d.join(pin)).find(|p| p.exists());
    let link_id = prog
        .attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
        .map_err(|e| {
            Error::program(prog_name, "attaching", e)
                .context(format!("cgroup {}", cgroup.display()))
        })?;
    let link = prog
        .take_link(link_id)
        .map_err(|e| Error::program(prog_name, "taking the link", e))?;
    FdLink::try_from(link)
        .map_err(|e| Error::link(prog_name, "converting to a bpf_link", e))?
        .pin(&target)
        .map_err(|source| Error::Pin {
            path: target.clone(),
            source,
        })?;
    if let Some(old) = old {
        let _ = fs::remove_file(old);
    }
    Ok(())
}

/// FNV-1a of the embedded object: names the directory of this build's links.
#[must_use]
pub fn object_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in EBPF_OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Where things are pinned.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
    /// The directory under `root` this build's maps and links live in: `v<layout version>`,
    /// or [`STAGING_DIR`] while maps of new sizes are filled.
    dir: String,
}

/// Where a resize builds the maps of their new sizes before they replace the live ones.
pub const STAGING_DIR: &str = "resizing";

impl PinLayout {
    #[must_use]
    pub fn new(bpf_fs_path: &Path) -> Self {
        Self {
            root: bpf_fs_path.to_path_buf(),
            dir: format!("v{MAP_LAYOUT_VERSION}"),
        }
    }
    /// The layout a resize fills before swapping it in (see [`finish_resize`]).
    #[must_use]
    pub fn staging(bpf_fs_path: &Path) -> Self {
        Self {
            root: bpf_fs_path.to_path_buf(),
            dir: STAGING_DIR.into(),
        }
    }
    #[must_use]
    pub fn is_staging(&self) -> bool {
        self.dir == STAGING_DIR
    }
    #[must_use]
    pub fn versioned(&self) -> PathBuf {
        self.root.join(&self.dir)
    }
    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    #[must_use]
    pub fn links_dir(&self, hash: &str) -> PathBuf {
        self.versioned().join(format!("prog-{hash}"))
    }
    /// The directories of other map layout versions (`v<N>` but this build's).
    #[must_use]
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let mine = self.versioned();
        fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p != &mine
                    && p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix('v'))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .collect()
    }

    /// Link directories of other builds.
    fn other_link_dirs(&self, hash: &str) -> Vec<PathBuf> {
        let mine = format!("prog-{hash}");
        fs::read_dir(self.versioned())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("prog-") && n != mine
            })
            .map(|e| e.path())
            .collect()
    }
}

/// Mounts a bpffs at /sys/fs/bpf when `path` is below it and nothing is mounted there yet
/// (what a DaemonSet's host mount or systemd normally provides).
fn mount_bpffs_if_missing(path: &Path) {
    let bpf = Path::new("/sys/fs/bpf");
    if !path.starts_with(bpf) || statfs_magic(bpf) == Some(BPF_FS_MAGIC) {
        return;
    }
    let _ = fs::create_dir_all(bpf);
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::warn!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether the nearest existing ancestor of `path` is on a bpffs.
fn bpffs_below(path: &Path) -> bool {
    let probe = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    statfs_magic(probe) == Some(BPF_FS_MAGIC)
}

/// Fails unless `cgroup` is a cgroup v2 root (a root has no `cgroup.type`): the socket
/// programs act only below the cgroup they attach to, so a container's own cgroup would
/// leave every pod without ClusterIPs.
///
/// # Errors
/// Not a cgroup v2 directory, or not a root one.
pub fn check_root_cgroup(cgroup: &Path) -> Result<()> {
    check_cgroup_v2(cgroup)?;
    if cgroup.join("cgroup.type").exists() {
        return Err(Error::invalid(format!(
            "--cgroup-path {} is not the node's root cgroup (it has cgroup.type): processes outside it, pods included, would not be load-balanced. Mount the host's /sys/fs/cgroup (hostPath) and point --cgroup-path at it, or pass --allow-child-cgroup",
            cgroup.display()
        )));
    }
    Ok(())
}

/// `cgroup` is a cgroup v2 directory.
///
/// # Errors
/// It is not (nothing mounted there, or cgroup v1).
pub fn check_cgroup_v2(cgroup: &Path) -> Result<()> {
    if !cgroup.join("cgroup.procs").exists() {
        return Err(Error::invalid(format!(
            "--cgroup-path {} is not a cgroup v2 directory (no cgroup.procs): mount the host's /sys/fs/cgroup",
            cgroup.display()
        )));
    }
    Ok(())
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs with a valid C string and an out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return None;
    }
    Some(st.f_type)
}

/// Fails with a clear message unless `path` is on a bpffs.
fn check_bpffs(path: &Path, may_mount: bool) -> Result<()> {
    if !may_mount && !bpffs_below(path) {
        return Err(Error::invalid(format!(
            "{} is not on a BPF filesystem. kpr's pinned programs and maps must outlive the agent: mount the host's /sys/fs/bpf (in a DaemonSet: a hostPath volume with mountPropagation: Bidirectional), or pass --allow-private-bpffs to let kpr mount one itself (the datapath is then torn down whenever the agent's mount namespace goes)",
            path.display()
        )));
    }
    mount_bpffs_if_missing(path);
    let probe = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if statfs_magic(probe) != Some(BPF_FS_MAGIC) {
        return Err(Error::invalid(format!(
            "{} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
            probe.display()
        )));
    }
    Ok(())
}

/// Loads the eBPF object with its maps pinned (or reused) under `layout`, without loading
/// or attaching any program.
///
/// # Errors
/// The kernel refused a map.
pub fn load_object(layout: &PinLayout) -> Result<aya::Ebpf> {
    check_object()?;
    let dir = layout.maps_dir();
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Object(Box::new(e)))
}

/// Fails clearly when this binary was built without the eBPF object.
fn check_object() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        return Err(Error::Unsupported(
            "this kpr was built without its eBPF programs (bpf-linker was missing): run `cargo xtask setup` and rebuild".into(),
        ));
    }
    Ok(())
}

/// The program `name` of the object, as its concrete type.
pub(crate) fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Unsupported(format!("program {name} is missing from the object")))?
        .try_into()
        .map_err(|e| Error::program(name, "typing", e))
}

/// How `ensure_loaded` found the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Links of this very build were pinned: nothing was loaded.
    Adopted,
    /// Programs were loaded and attached for the first time.
    Attached,
    /// Programs of another build were replaced in place.
    Upgraded,
    /// A build with another map layout is running: this build's maps and programs are loaded
    /// but not attached; [`StagedUpgrade::complete`] swaps them in once the maps are filled.
    Staged,
}

/// This build's programs, verified, and its maps, pinned (empty until the first sync), while
/// the links of a build with another map layout keep serving from that build's maps.
pub struct StagedUpgrade {
    ebpf: aya::Ebpf,
    cgroup: PathBuf,
}

impl StagedUpgrade {
    /// Swaps this build's programs into the running links (cgroup and TC, atomically per
    /// link), carries the conntrack entries over (before and after the swap, so flows in
    /// flight keep their translation), and removes the older layout's pins.
    ///
    /// # Errors
    /// A program could not be attached; the older layout keeps serving what it can.
    pub fn complete(mut self, layout: &PinLayout) -> Result<()> {
        let older = layout.other_layouts();
        let carried = carry_conntrack(layout, &older);
        let cgroup_file = fs::File::open(&self.cgroup)
            .map_err(|e| Error::io(&self.cgroup, e).context("opening the cgroup to attach to"))?;
        let old_dirs: Vec<PathBuf> = older.iter().flat_map(|v| link_dirs_in(v)).collect();
        attach_all(
            &mut self.ebpf,
            layout,
            &self.cgroup,
            &cgroup_file,
            &old_dirs,
        )?;
        let carried_after = carry_conntrack(layout, &older);
        for v in &older {
            let _ = fs::remove_dir_all(v);
        }
        tracing::info!(
            from = ?older.iter().map(|v| v.display().to_string()).collect::<Vec<_>>(),
            conntrack_entries = carried + carried_after,
            "this build's programs replaced those of another map layout; its pins are removed"
        );
        Ok(())
    }
}

/// The `prog-*` link directories under a layout version directory.
fn link_dirs_in(version_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(version_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("prog-"))
        .map(|e| e.path())
        .collect()
}

/// Copies the per-flow state of older layouts' maps into this layout's: conntrack (TC flows),
/// socket reverse NAT (connected UDP sockets' replies), session affinity and least-conn
/// counts, each when its entry format is the same size (a layout change elsewhere); entries
/// already there are kept. Returns how many conntrack entries were copied.
fn carry_conntrack(layout: &PinLayout, older: &[PathBuf]) -> usize {
    use proxy_common::{
        AffinityKey, AffinityValue, CtKey, CtValue, SockRevNatKey, SockRevNatValue,
    };
    let copied = carry::<CtKey, CtValue>(layout, older, map_names::CONNTRACK);
    carry::<SockRevNatKey, SockRevNatValue>(layout, older, map_names::SOCK_REVNAT);
    carry::<AffinityKey, AffinityValue>(layout, older, map_names::AFFINITY);
    carry::<u32, u32>(layout, older, map_names::BACKEND_CONNS);
    copied
}

/// Copies the entries of map `name` (a hash or LRU hash map) from `older` layouts into
/// `layout`'s; returns how many were copied.
fn carry<K: aya::Pod, V: aya::Pod>(layout: &PinLayout, older: &[PathBuf], name: &str) -> usize {
    use aya::maps::HashMap as BpfHashMap;
    let open = |path: &Path| -> std::result::Result<BpfHashMap<MapData, K, V>, String> {
        let data = MapData::from_pin(path).map_err(|e| e.to_string())?;
        let map = aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())?;
        // A map of another entry format is refused here (sizes differ).
        BpfHashMap::try_from(map).map_err(|e| e.to_string())
    };
    let Ok(mut new) = open(&layout.map(name)) else {
        return 0;
    };
    let mut copied = 0;
    for v in older {
        let path = v.join("maps").join(name);
        if !path.exists() {
            continue;
        }
        let old = match open(&path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    "the entries of {} cannot be carried over ({e}): its flows restart",
                    path.display()
                );
                continue;
            }
        };
        for (k, val) in old.iter().flatten() {
            // BPF_NOEXIST: an entry this build's programs already made wins.
            if new.insert(&k, &val, 1).is_ok() {
                copied += 1;
            }
        }
    }
    copied
}

/// Entries of the maps whose sizes the operator sets, applied when the maps are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `KPR_SERVICES` (one entry per frontend and scope); `KPR_REVNAT` gets half.
    pub services: u32,
    /// `KPR_BACKENDS` (one entry per backend address); `KPR_SLOTS` gets twice as many.
    pub backends: u32,
    /// `KPR_CT`.
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        #[expect(clippy::cast_possible_truncation, reason = "constants below 2^32")]
        Self {
            services: proxy_common::map_sizes::SERVICES as u32,
            backends: proxy_common::map_sizes::BACKENDS as u32,
            conntrack: proxy_common::map_sizes::CONNTRACK as u32,
        }
    }
}

impl MapSizes {
    /// Each sized map's `max_entries`.
    #[must_use]
    pub fn entries(&self) -> [(&'static str, u32); 5] {
        [
            (map_names::SERVICES, self.services.max(16)),
            (map_names::REVNAT, (self.services / 2).max(16)),
            (map_names::BACKENDS, self.backends.max(16)),
            (
                map_names::BACKEND_SLOTS,
                self.backends.saturating_mul(2).max(32),
            ),
            (map_names::CONNTRACK, self.conntrack.max(1024)),
        ]
    }

    /// The sizes of the maps pinned under `layout` (None: not pinned, or unreadable).
    #[must_use]
    pub fn pinned(layout: &PinLayout) -> Option<Self> {
        let size = |name: &str| -> Option<u32> {
            MapData::from_pin(layout.map(name))
                .ok()?
                .info()
                .ok()
                .map(|i| i.max_entries())
        };
        Some(Self {
            services: size(map_names::SERVICES)?,
            backends: size(map_names::BACKENDS)?,
            conntrack: size(map_names::CONNTRACK)?,
        })
    }
}

/// Makes the filled staging layout the live one: `complete` has swapped its programs into
/// the links and removed the older pins; the staging directory takes the live one's name.
///
/// # Errors
/// The rename failed (the staging layout keeps serving under its own name; the next start
/// finishes the rename).
pub fn finish_resize(root: &Path) -> Result<PinLayout> {
    let live = PinLayout::new(root);
    let staging = PinLayout::staging(root);
    if live.versioned().exists() {
        let _ = fs::remove_dir_all(live.versioned());
    }
    fs::rename(staging.versioned(), live.versioned())
        .map_err(|e| Error::io(staging.versioned(), e).context("making the resized maps live"))?;
    Ok(live)
}

/// At start: a resize interrupted before its swap leaves a staging directory beside the live
/// one (removed: the live one serves); one interrupted after its swap leaves only the
/// staging directory, holding the links (renamed into place).
pub fn recover_resize(root: &Path) {
    let live = PinLayout::new(root);
    let staging = PinLayout::staging(root);
    if !staging.versioned().exists() {
        return;
    }
    let live_links = !link_dirs_in(&live.versioned()).is_empty();
    let staged_links = link_dirs_in(&staging.versioned())
        .iter()
        .any(|d| fs::read_dir(d).into_iter().flatten().next().is_some());
    if live_links || !staged_links {
        tracing::warn!("removing the maps of an interrupted resize (the live maps serve)");
        let _ = fs::remove_dir_all(staging.versioned());
    } else {
        tracing::warn!("finishing an interrupted resize: its maps hold the links");
        if let Err(e) = finish_resize(root) {
            tracing::error!("{e}");
        }
    }
}

/// Makes sure this build's programs are attached to `cgroup` with pinned links and the maps
/// are pinned; adopts what is already there.
///
/// # Errors
/// No bpffs, an unusable cgroup path, or the kernel refused to load or attach.
pub fn ensure_loaded(layout: &PinLayout, cgroup: &Path) -> Result<LoadOutcome> {
    ensure_loaded_sized(layout, cgroup, MapSizes::default(), true)
}

/// [`ensure_loaded`] with maps of `sizes`. The sizes apply when the maps are created; pinned
/// maps of other sizes are kept (the renderer grows them without breaking flows).
///
/// # Errors
/// As [`ensure_loaded`].
pub fn ensure_loaded_sized(
    layout: &PinLayout,
    cgroup: &Path,
    sizes: MapSizes,
    may_mount_bpffs: bool,
) -> Result<LoadOutcome> {
    match ensure_loaded_staged(layout, cgroup, sizes, may_mount_bpffs)? {
        (_, Some(staged)) => {
            staged.complete(layout)?;
            Ok(LoadOutcome::Upgraded)
        }
        (outcome, None) => Ok(outcome),
    }
}

/// [`ensure_loaded_sized`], except that a build with another map layout is not replaced at
/// once: this build's maps would be empty until the first sync. Its programs are verified
/// and its maps pinned, and the caller completes the [`StagedUpgrade`] once it filled them.
///
/// # Errors
/// As [`ensure_loaded`].
pub fn ensure_loaded_staged(
    layout: &PinLayout,
    cgroup: &Path,
    sizes: MapSizes,
    may_mount_bpffs: bool,
) -> Result<(LoadOutcome, Option<StagedUpgrade>)> {
    check_bpffs(&layout.root, may_mount_bpffs)?;
    if !layout.is_staging() {
        recover_resize(&layout.root);
    }
    ensure_loaded_inner(layout, cgroup, sizes)
}

fn ensure_loaded_inner(
    layout: &PinLayout,
    cgroup: &Path,
    sizes: MapSizes,
) -> Result<(LoadOutcome, Option<StagedUpgrade>)> {
    check_object()?;
    let hash = object_hash();
    let links_dir = layout.links_dir(&hash);
    let maps_present = map_names::ALL.iter().all(|m| layout.map(m).exists());
    let links_present = SOCK_PROGRAMS
        .iter()
        .chain(TC_PROGRAMS.iter())
        .chain(std::iter::once(&SOCK_RELEASE))
        .all(|(_, pin)| links_dir.join(pin).exists());
    if maps_present && links_present {
        return Ok((LoadOutcome::Adopted, None));
    }
    for dir in [layout.maps_dir(), links_dir.clone()] {
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let cgroup_file = fs::File::open(cgroup).map_err(|e| {
        Error::io(cgroup, e).context("opening the cgroup to attach to (--cgroup-path)")
    })?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(layout.maps_dir());
    for (name, entries) in sizes.entries() {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Object(Box::new(e)))?;
    let older = layout.other_layouts();
    if older.iter().any(|v| !link_dirs_in(v).is_empty()) {
        // Verify every program now: a refusal leaves the running build alone.
        for (name, _) in SOCK_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load()
                .map_err(|e| Error::program(name, "loading (verifier)", e))?;
        }
        let p: &mut CgroupSock = program(&mut ebpf, SOCK_RELEASE.0)?;
        p.load()
            .map_err(|e| Error::program(SOCK_RELEASE.0, "loading (verifier)", e))?;
        for (name, _) in TC_PROGRAMS {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load()
                .map_err(|e| Error::program(name, "loading (verifier)", e))?;
        }
        return Ok((
            LoadOutcome::Staged,
            Some(StagedUpgrade {
                ebpf,
                cgroup: cgroup.to_path_buf(),
            }),
        ));
    }
    let old_dirs = layout.other_link_dirs(&hash);
    let upgraded = attach_all(&mut ebpf, layout, cgroup, &cgroup_file, &old_dirs)?;
    Ok((
        if upgraded {
            LoadOutcome::Upgraded
        } else {
            LoadOutcome::Attached
        },
        None,
    ))
}

/// Attaches this build's programs (loading those not loaded yet) with pinned links: swapped
/// into the links of `old_dirs` (other builds) where there are some, else attached to the
/// cgroup; TC links of other builds get this build's programs. Removes `old_dirs`. Returns
/// whether another build's links were taken over.
fn attach_all(
    ebpf: &mut aya::Ebpf,
    layout: &PinLayout,
    cgroup: &Path,
    cgroup_file: &fs::File,
    old_dirs: &[PathBuf],
) -> Result<bool> {
    let links_dir = layout.links_dir(&object_hash());
    let mut upgraded = false;
    for (prog_name, pin) in SOCK_PROGRAMS {
        let target = links_dir.join(pin);
        if target.exists() {
            continue;
        }
        let prog: &mut CgroupSockAddr = program(ebpf, prog_name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| Error::program(prog_name, "loading (verifier)", e))?;
        }
        let old = old_dirs.iter().map(|d| d.join(pin)).find(|p| p.exists());
        let link_id = if let Some(old) = &old {
            let what = old.display().to_string();
            let pinned = PinnedLink::from_pin(old).map_err(|e| Error::link(&what, "opening", e))?;
            let fd_link: FdLink = pinned.into();
            let link = CgroupSockAddrLink::try_from(fd_link)
                .map_err(|e| Error::link(&what, "typing", e))?;
            upgraded = true;
            prog.attach_to_link(link)
                .map_err(|e| Error::program(prog_name, "replacing in place", e))?
        } else {
            prog.attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| {
                    Error::program(prog_name, "attaching", e)
                        .context(format!("cgroup {}", cgroup.display()))
                })?
        };
        let link = prog
            .take_link(link_id)
            .map_err(|e| Error::program(prog_name, "taking the link", e))?;
        let fd_link = FdLink::try_from(link)
            .map_err(|e| Error::link(prog_name, "converting to a bpf_link", e))?;
        fd_link.pin(&target).map_err(|source| Error::Pin {
            path: target.clone(),
            source,
        })?;
        if let Some(old) = old {
            let _ = fs::remove_file(old);
        }
    }
    attach_sock_release(ebpf, &links_dir, old_dirs, cgroup_file, cgroup)?;
    for (prog_name, pin) in TC_PROGRAMS {
        let target = links_dir.join(pin);
        if target.exists() {
            continue;
        }
        let prog: &mut SchedClassifier = program(ebpf, prog_name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| Error::program(prog_name, "loading (verifier)", e))?;
        }
        prog.pin(&target).map_err(|source| Error::Pin {
            path: target.clone(),
            source,
        })?;
    }
    // TC links of an older build: swap this build's programs in, keep them attached.
    for old in old_dirs {
        for entry in fs::read_dir(old).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(attach) = tc_link_direction(&name) else {
                continue;
            };
            let target = links_dir.join(&name);
            let l3 = name
                .strip_prefix("tc-")
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(_, rest)| rest.rsplit_once('-'))
                .is_some_and(|(ifname, _)| is_l3_device(ifname));
            let prog_pin = links_dir.join(TC_PROGRAMS[tc_program_index(attach, l3)].1);
            let migrated = (|| -> Result<()> {
                let mut prog = SchedClassifier::from_pin(&prog_pin)
                    .map_err(|e| Error::program(prog_pin.display().to_string(), "opening", e))?;
                let fd_link: FdLink = PinnedLink::from_pin(entry.path())
                    .map_err(|e| Error::link(&name, "opening", e))?
                    .into();
                let link = SchedClassifierLink::try_from(fd_link)
                    .map_err(|e| Error::link(&name, "typing", e))?;
                let id = prog
                    .attach_to_link(link)
                    .and_then(|id| prog.take_link(id))
                    .map_err(|e| Error::program(&name, "replacing in place", e))?;
                FdLink::try_from(id)
                    .map_err(|e| Error::link(&name, "converting to a bpf_link", e))?
                    .pin(&target)
                    .map_err(|source| Error::Pin {
                        path: target.clone(),
                        source,
                    })?;
                Ok(())
            })();
            if let Err(e) = migrated {
                tracing::warn!(
                    "could not upgrade TC link {name} in place ({e}); it will be re-attached"
                );
            }
            upgraded = true;
        }
    }
    for d in old_dirs {
        let _ = fs::remove_dir_all(d);
    }
    Ok(upgraded)
}

/// Removes every link, map and directory kpr pinned under `root`. Unpinning a link detaches
/// its program; unpinning the last reference to a map frees it.
///
/// # Errors
/// A pin could not be removed.
pub fn cleanup(root: &Path) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    if !crate::render::probe::tcx_supported() {
        // Filters are not pinned: they go by priority and handle.
        report.removed.extend(remove_tc_filters());
    }
    if !root.exists() {
        return Ok(report);
    }
    fn walk(dir: &Path, report: &mut CleanupReport) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if ft.is_dir() {
                walk(&path, report)?;
                fs::remove_dir(&path).map_err(|e| Error::io(&path, e))?;
            } else {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
            report.removed.push(path.display().to_string());
        }
        Ok(())
    }
    walk(root, &mut report)?;
    fs::remove_dir(root).map_err(|e| Error::io(root, e))?;
    report.removed.push(root.display().to_string());
    Ok(report)
}
