//! The node's netfilter conntrack settings, as upstream kube-proxy sets them at start
//! (`cmd/kube-proxy/app/conntrack.go`, `server_linux.go`): `nf_conntrack_max` from
//! `conntrack.maxPerCore` x CPUs (at least `conntrack.min`; 0 leaves it alone) with the hash
//! size raised to a quarter of it, and the TCP/UDP timeouts and `tcpBeLiberal` when set.
//! Each value is written only when the kernel holds another one.
//!
//! kpr applies them in the modes whose datapath is netfilter's conntrack (iptables, nftables);
//! in the ebpf mode the same settings configure kpr's own conntrack map and the node's are
//! left as they are.
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to set (upstream's `KubeProxyConntrackConfiguration`); zero means "leave it".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackSysctls {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_be_liberal: bool,
    pub udp: Duration,
    pub udp_stream: Duration,
}

/// One setting that was written, or could not be.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub name: &'static str,
    pub value: u64,
    /// `None`: written; else why not.
    pub error: Option<String>,
}

impl ConntrackSysctls {
    /// `nf_conntrack_max` to set for `cpus` CPUs (0: leave it), as upstream's
    /// `getConntrackMax`.
    #[must_use]
    pub fn max(&self, cpus: u32) -> u64 {
        if self.max_per_core == 0 {
            return 0;
        }
        (u64::from(self.max_per_core) * u64::from(cpus)).max(u64::from(self.min))
    }

    /// The (sysctl path under `/proc/sys`, value) pairs these settings want.
    fn wanted(&self, cpus: u32) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        let max = self.max(cpus);
        if max > 0 {
            out.push(("net/netfilter/nf_conntrack_max", max));
        }
        for (name, d) in [
            (
                "net/netfilter/nf_conntrack_tcp_timeout_established",
                self.tcp_established,
            ),
            (
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
                self.tcp_close_wait,
            ),
            ("net/netfilter/nf_conntrack_udp_timeout", self.udp),
            (
                "net/netfilter/nf_conntrack_udp_timeout_stream",
                self.udp_stream,
            ),
        ] {
            if !d.is_zero() {
                out.push((name, d.as_secs()));
            }
        }
        if self.tcp_be_liberal {
            out.push(("net/netfilter/nf_conntrack_tcp_be_liberal", 1));
        }
        out
    }

    /// Writes what differs under `proc_sys` (`/proc/sys`) and, for the maximum, the hash
    /// size under `sys_module` (`/sys/module`). Never fails as a whole: each refusal (a
    /// read-only `nf_conntrack_max` outside the host's network namespace, a read-only /sys
    /// in a container) is reported in the result.
    #[must_use]
    pub fn apply(&self, proc_sys: &Path, sys_module: &Path, cpus: u32) -> Vec<Applied> {
        let mut out = Vec::new();
        for (name, value) in self.wanted(cpus) {
            let path = proc_sys.join(name);
            let current = read_u64(&path);
            if current == Some(value) {
                continue;
            }
            let error = std::fs::write(&path, format!("{value}\n"))
                .err()
                .map(|e| format!("{}: {e}", path.display()));
            out.push(Applied {
                name: short(name),
                value,
                error,
            });
            if name.ends_with("nf_conntrack_max") {
                // Upstream: the hash table gets a bucket per 4 entries, only ever grown.
                let hash = sys_module.join("nf_conntrack/parameters/hashsize");
                let want = value / 4;
                if read_u64(&hash).is_some_and(|h| h < want) {
                    out.push(Applied {
                        name: "nf_conntrack hashsize",
                        value: want,
                        error: std::fs::write(&hash, format!("{want}\n"))
                            .err()
                            .map(|e| format!("{}: {e}", hash.display())),
                    });
                }
            }
        }
        out
    }

    /// [`Self::apply`] on this node, each outcome logged. Returns false while a setting's
    /// file is missing (`nf_conntrack` not loaded yet: the first rules that match on
    /// conntrack load it, and the agent applies the settings again after its next sync).
    pub fn apply_to_node(&self) -> bool {
        let mut complete = true;
        let cpus =
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
        for a in self.apply(
            &PathBuf::from("/proc/sys"),
            &PathBuf::from("/sys/module"),
            cpus,
        ) {
            match a.error {
                None => tracing::info!(
                    setting = a.name,
                    value = a.value,
                    "conntrack setting written"
                ),
                Some(e) if e.contains("No such file") => {
                    complete = false;
                    tracing::info!(
                        setting = a.name,
                        value = a.value,
                        "conntrack setting not there yet (nf_conntrack is not loaded): applied after the next sync"
                    );
                }
                Some(e) => tracing::warn!(
                    setting = a.name,
                    value = a.value,
                    "cannot set the conntrack setting: {e} (outside the host's network namespace nf_conntrack_max and the hash size are read-only)"
                ),
            }
        }
        complete
    }
}

fn short(name: &'static str) -> &'static str {
    name.rsplit('/').next().unwrap_or(name)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree(values: &[(&str, &str)]) -> Tree {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "kpr-sysctl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        for (p, v) in values {
            let p = d.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        Tree(d)
    }

    #[test]
    fn the_maximum_scales_with_cpus_but_not_below_min() {
        let c = ConntrackSysctls {
            max_per_core: 32768,
            min: 131_072,
            ..Default::default()
        };
        assert_eq!(c.max(2), 131_072, "min wins on a small node");
        assert_eq!(c.max(8), 262_144);
        assert_eq!(
            ConntrackSysctls::default().max(64),
            0,
            "0 per core: leave it"
        );
    }

    #[test]
    fn only_what_differs_is_written_and_the_hash_size_only_grows() {
        let proc = tree(&[
            ("net/netfilter/nf_conntrack_max", "65536\n"),
            (
                "net/netfilter/nf_conntrack_tcp_timeout_established",
                "86400\n",
            ),
            ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", "60\n"),
            ("net/netfilter/nf_conntrack_tcp_be_liberal", "0\n"),
        ]);
        let sys = tree(&[("nf_conntrack/parameters/hashsize", "16384\n")]);
        let c = ConntrackSysctls {
            max_per_core: 32768,
            min: 131_072,
            tcp_established: Duration::from_secs(86400),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_be_liberal: true,
            ..Default::default()
        };
        let done = c.apply(proc.path(), sys.path(), 4);
        let names: Vec<_> = done.iter().map(|a| (a.name, a.value)).collect();
        assert_eq!(
            names,
            [
                ("nf_conntrack_max", 131_072),
                ("nf_conntrack hashsize", 32_768),
                ("nf_conntrack_tcp_timeout_close_wait", 3600),
                ("nf_conntrack_tcp_be_liberal", 1),
            ]
        );
        assert!(done.iter().all(|a| a.error.is_none()));
        let read = |p: &str| std::fs::read_to_string(proc.path().join(p)).unwrap();
        assert_eq!(
            read("net/netfilter/nf_conntrack_tcp_timeout_close_wait").trim(),
            "3600"
        );
        // A second run has nothing to do.
        assert!(c.apply(proc.path(), sys.path(), 4).is_empty());
    }

    #[test]
    fn a_refused_write_is_reported_not_fatal() {
        let proc = tree(&[]);
        let sys = tree(&[]);
        let c = ConntrackSysctls {
            tcp_close_wait: Duration::from_secs(3600),
            ..Default::default()
        };
        let done = c.apply(proc.path(), sys.path(), 1);
        assert_eq!(done.len(), 1);
        assert!(done[0].error.as_deref().unwrap().contains("close_wait"));
    }
}
