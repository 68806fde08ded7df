//! Following the processes a traced one forks (`--follow-forks`): a new child is stopped by the
//! kernel before its first instruction, probed here, and let go; a child that execs the same
//! program is followed through the exec. Also the per-process summary of the report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::setup::seed_brk;
use super::{Session, TraceMode};
use crate::error::Result;
use crate::probes::plan::plan;
use crate::probes::usdt;
use crate::process::death::Death;
use crate::process::python::PythonInfo;
use crate::process::Process;
use crate::report::{ProcessInfo, TargetInfo};
use crate::stacks::python::PythonProcess;

/// A process a traced one forked, traced too (`--follow-forks`).
pub(super) struct Forked {
    parent: u32,
    command: String,
    /// The program it runs (device, inode): an exec of the same program is followed.
    exe: Option<(u64, u64)>,
    /// Where its interpreter lives, when it is Python.
    python_info: Option<PythonInfo>,
    /// Its interpreter (the parent's, copied by fork; after an exec, found once its libraries
    /// are mapped).
    py: Option<PythonProcess>,
    /// The kernel has its Python walk parameters.
    py_ready: bool,
    /// When its interpreter was last looked for (after an exec).
    py_tried: Option<Instant>,
    /// Why it could not be followed, if it could not.
    failed: Option<String>,
    /// It exec'd (the same program) since its fork.
    execd: bool,
}

/// (device, inode) of the program process `pid` runs.
pub(super) fn exe_id(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((m.dev(), m.ino()))
}

impl Session<'_> {
    /// The interpreter whose memory holds process `tgid`'s code objects: its own, or for a
    /// forked child gone before its record was read, its parent's (the code objects it had from
    /// before the fork are at the same addresses there; each is checked before it is trusted).
    pub(super) fn python_of(&mut self, tgid: u32) -> Option<&mut PythonProcess> {
        let main = self.proc.pid;
        if tgid == main {
            return self.py.as_mut();
        }
        match self.forked.get_mut(&tgid) {
            Some(f) if !f.execd && f.parent == main && !(Process { pid: tgid }).alive() => {
                self.py.as_mut()
            }
            Some(f) => f.py.as_mut(),
            None => None,
        }
    }

    /// Starts tracing a child a traced process forked: the kernel stopped it before its first
    /// instruction and marked it traced; attach its probes (the parent's plan, at the child's
    /// pid), give the kernel its interpreter, and let it run. It is let go whatever happens.
    pub(super) fn follow(&mut self, parent: u32, pid: u32) {
        self.follow_child(parent, pid, true);
    }

    /// `follow`, saying whether the child was forked after leaktrace raised its parent's sampler
    /// semaphores (a new fork) or before (a worker `attach --follow-forks` adopts): only the
    /// first holds a raised copy.
    pub(super) fn follow_child(&mut self, parent: u32, pid: u32, forked_since_attach: bool) {
        let proc = Process { pid };
        if self.ending {
            // Announced as tracing ended: attaching its probes would only keep it waiting.
            self.tracer.release(pid);
            return;
        }
        let mut python_info = None;
        let result = (|| -> Result<Option<PythonProcess>> {
            let modules = proc.module_map()?;
            // A child inherits its parent's redirected tables; only the parent's are switched.
            let mut plan = plan(
                pid,
                &modules,
                proc.exe().as_deref(),
                self.opts.families,
                false,
                self.opts.samples_in_process(),
            )?;
            if let TraceMode::Growth { .. } = self.opts.mode {
                plan.points.clear();
                plan.lifecycle.clear();
                seed_brk(&mut self.tracer, pid);
            }
            // A child forked since is its parent's copy, semaphores raised by leaktrace too.
            if forked_since_attach {
                self.tracer.inherit_semaphores(parent, pid);
            }
            self.tracer.attach(&plan, pid)?;
            let Some(info) = &plan.python else {
                return Ok(None);
            };
            python_info = Some(info.clone());
            let py = PythonProcess::new(pid, info, &modules)?;
            if let Some(off) = py.bpf_offsets() {
                self.tracer.set_python(pid, &off)?;
                self.tracer.set_threads(pid, &py.thread_states())?;
            }
            Ok(Some(py))
        })();
        // Read while it still waits: once let go, it may exec something else at once.
        let command = proc.cmdline();
        let exe = exe_id(pid);
        self.sym.refresh(pid);
        // The kernel holds a new child in a stop (unless holds were off): let it go. A process
        // that was there before leaktrace came was never held, and is not touched.
        self.tracer.release(pid);
        let (py, failed) = match result {
            Ok(py) => (py, None),
            Err(e) => {
                eprintln!("leaktrace: forked child {pid} runs untraced: {e}");
                (None, Some(format!("not traced: {e}")))
            }
        };
        if self.opts.verbose {
            eprintln!("leaktrace: following pid {pid}, forked by {parent}");
        }
        let py_ready = py.is_some();
        self.forked.insert(
            pid,
            Forked {
                parent,
                command,
                exe,
                python_info,
                py,
                py_ready,
                py_tried: None,
                failed,
                execd: false,
            },
        );
    }

    /// A followed child exec'd: it waits in the stop the kernel gave it, before the new
    /// program's loader runs. The same program (a `multiprocessing` spawn or forkserver worker,
    /// a re-exec'd server) is followed: the probes on its files stay attached for its pid and the
    /// kernel installs them as the loader maps each library; its interpreter is found once it
    /// exists. Anything else is let go untraced. The child is let go whatever happens.
    pub(super) fn child_exec(&mut self, pid: u32) {
        // The target itself is not held at exec (`run` follows its exec through ptrace).
        let Some(f) = self.forked.get_mut(&pid) else {
            self.tracer.release(pid);
            return;
        };
        {
            let new = Process { pid }.cmdline();
            let same = f.failed.is_none() && f.exe.is_some() && exe_id(pid) == f.exe;
            if same {
                // The old image and everything recorded in it are gone.
                if let Err(e) = self.tracer.forget_process(pid) {
                    log::debug!("{e}");
                }
                self.heap.forget_process(pid);
                self.sym.forget_process(pid);
                f.execd = true;
                f.command = new;
                f.py = None;
                f.py_ready = false;
                f.py_tried = None;
            } else {
                if f.failed.is_none() {
                    f.failed = Some(format!("exec'd {new}; traced until then"));
                }
                // Let go while its hold is still recorded in `TARGETS`, then forget it (and the
                // semaphores raised in its old image: not lowered in the new one).
                self.tracer.release(pid);
                self.tracer.forget_semaphores(pid);
                if let Err(e) = self.tracer.remove_target(pid) {
                    log::debug!("{e}");
                }
                return;
            }
        }
        self.tracer.release(pid);
    }

    /// A followed child's interpreter entered `Py_RunMain`: it exists, look now (not throttled).
    pub(super) fn child_main_started(&mut self, pid: u32) {
        if let Some(f) = self.forked.get_mut(&pid) {
            f.py_tried = None;
        }
        self.enable_child_python(pid);
    }

    /// After an exec: finds a followed child's interpreter once its libraries are mapped, and
    /// gives the kernel its walk parameters once the interpreter exists (tried at most every
    /// 20 ms).
    pub(super) fn enable_child_python(&mut self, pid: u32) {
        let Some(f) = self.forked.get_mut(&pid) else {
            return;
        };
        if f.py_ready || f.failed.is_some() {
            return;
        }
        if f.py_tried
            .is_some_and(|t| t.elapsed() < Duration::from_millis(20))
        {
            return;
        }
        f.py_tried = Some(Instant::now());
        if f.py.is_none() {
            let Some(info) = &f.python_info else { return };
            let Ok(modules) = Process { pid }.module_map() else {
                return;
            };
            match PythonProcess::new(pid, info, &modules) {
                Ok(py) => f.py = Some(py),
                Err(e) => {
                    log::debug!("pid {pid}: {e}");
                    return;
                }
            }
            if f.execd && self.opts.samples_in_process() {
                // The new image's sampler starts with its semaphore at 0; the USDT probes on
                // its file stayed attached for this pid. Raised again once its libraries are
                // mapped (found with the interpreter), it samples from then on.
                let (points, _) = usdt::choose(pid, &modules);
                if let Err(e) = self.tracer.attach_late_usdt(&points, pid) {
                    log::debug!("pid {pid}: {e}");
                }
            }
        }
        let Some(py) = &f.py else { return };
        if let Some(off) = py.bpf_offsets() {
            if self.tracer.set_python(pid, &off).is_ok() {
                let _ = self.tracer.set_threads(pid, &py.thread_states());
                f.py_ready = true;
            }
        }
    }

    /// The traced processes with their unfreed totals: the target, then the children followed.
    pub(super) fn processes(&self, target: &TargetInfo) -> Vec<ProcessInfo> {
        let mut totals: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for site in self.heap.sites() {
            let t = totals.entry(site.pid).or_default();
            // Sites whose blocks were all freed read 0; a transient negative reads huge.
            if site.stats.live_bytes < (1 << 62) {
                t.0 += site.stats.live_bytes;
                t.1 += site.stats.live_count;
            }
        }
        let total = |pid: u32| totals.get(&pid).copied().unwrap_or_default();
        let main = ProcessInfo {
            pid: target.pid,
            parent: None,
            command: target.command.clone(),
            end: target.end.clone(),
            unfreed_bytes: total(target.pid).0,
            unfreed_count: total(target.pid).1,
        };
        let children = self.forked.iter().map(|(pid, f)| {
            let proc = Process { pid: *pid };
            let end = match (&f.failed, Death::of(self.tracer.death(*pid), None)) {
                (Some(why), _) => why.clone(),
                (None, Some(d)) => d.describe(),
                (None, None) if proc.alive() => "still running".into(),
                (None, None) => "exited".into(),
            };
            ProcessInfo {
                pid: *pid,
                parent: Some(f.parent),
                command: f.command.clone(),
                end,
                unfreed_bytes: total(*pid).0,
                unfreed_count: total(*pid).1,
            }
        });
        std::iter::once(main).chain(children).collect()
    }
}
