//! A scratch TC datapath: this build's object loaded with its maps pinned in a private bpffs
//! directory that is removed on drop (also when loading fails), the TC programs loaded but
//! attached nowhere, and BPF_PROG_TEST_RUN to push packets through them. `kpr trace` runs
//! packets on one (with a copy of the live state); the packet tests and benchmarks use it too.
use std::path::{Path, PathBuf};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};

use super::datapath::{PinLayout, TC_PROGRAMS, load_object, program};
use super::pinned::PinnedMaps;
use crate::{Error, Result};

/// A bpffs directory removed (with everything pinned in it) on drop.
#[derive(Debug)]
pub struct ScratchPins(PathBuf);

impl ScratchPins {
    /// `<dir>/<tag>-<pid>`.
    #[must_use]
    pub fn new(dir: &Path, tag: &str) -> Self {
        Self(dir.join(format!("{tag}-{}", std::process::id())))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return code (`TC_ACT_*`).
    pub action: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Average time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// The TC programs of this build, loaded over scratch maps.
pub struct ScratchDatapath {
    pub ebpf: aya::Ebpf,
    pub maps: PinnedMaps,
    pub layout: PinLayout,
    // Dropped last: the directory goes once nothing holds its pins.
    pins: ScratchPins,
}

impl ScratchDatapath {
    /// Loads the object with maps pinned under `pins` and loads the TC programs.
    ///
    /// # Errors
    /// The kernel refused the object or the verifier a program.
    pub fn load(pins: ScratchPins) -> Result<Self> {
        let layout = PinLayout::new(pins.path());
        let mut ebpf = load_object(&layout)?;
        for (name, _) in TC_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| Error::program(name, "loading (verifier)", e))?;
        }
        let maps = PinnedMaps::open(&layout)?;
        Ok(Self {
            ebpf,
            maps,
            layout,
            pins,
        })
    }

    /// Where the maps are pinned.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// Runs `packet` through `prog` (`kpr_tc_ingress` or `kpr_tc_egress`) `repeat` times.
    ///
    /// # Errors
    /// The program is missing or the kernel refused the test run.
    pub fn run_repeat(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<RunResult> {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .ok_or_else(|| {
                Error::Unsupported(format!("program {prog} is missing from the object"))
            })?
            .try_into()
            .map_err(|e| Error::program(prog, "typing", e))?;
        let mut out = vec![0u8; packet.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .map_err(|e| Error::program(prog, "BPF_PROG_TEST_RUN", e))?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            action: r.return_value,
            packet: out,
            duration: r.duration,
        })
    }

    /// Runs `packet` through `prog` once.
    ///
    /// # Errors
    /// As [`Self::run_repeat`].
    pub fn run(&self, prog: &str, packet: &[u8]) -> Result<RunResult> {
        self.run_repeat(prog, packet, 1)
    }
}
