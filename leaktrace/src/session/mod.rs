//! One tracing session: find the target, plan and attach the probes, follow the kernel's counters
//! and announcements until the window ends, and build the report.

mod census;
mod control;
mod cut;
mod finish;
mod forks;
pub mod live;
mod phases;
mod setup;
mod signals;
mod start;
mod waiting;
mod watch;

use watch::Watch;

use cut::CopyVerdict;

use forks::Forked;
use live::Exporter;
pub use live::LiveView;
pub use phases::Phases;
pub use waiting::progress_line;

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use leaktrace_ebpf::{native_end, py_status, AllocFn, NewSiteEvent, SITE_COPY_MISSED};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::capture::writer::CaptureWriter;
use crate::error::Result;
use crate::events::{Event, EventReader, StackCopy};
use crate::heap::{Heap, PythonStack, Sample};
use crate::options::{TargetSpec, TraceMode, TraceOptions};
use crate::probes::loader::Tracer;
use crate::probes::plan::{Lifecycle, ProbePlan};
use crate::probes::tables::Counters;
use crate::process::spawn::{Control, SpawnEvent};
use crate::process::Process;
use crate::report::Report;
use crate::stacks::native::{NativeStack, UnwindEnd, Unwinder};
use crate::stacks::python::PythonProcess;
use crate::stacks::symbolize::{FrameSource, Symbolizer};

/// The result of a session.
pub struct Outcome {
    pub report: Report,
    /// Exit status leaktrace should end with.
    pub exit_code: i32,
    /// The probes, still attached but no longer counting anything that is reported: dropping
    /// them detaches (≈2 s for a full set, as the kernel removes uprobes one grace period at a
    /// time), so show the report first.
    pub probes: Tracer,
}

/// The spawner thread's control channel and its events.
type Child = Option<(Sender<Control>, UnboundedReceiver<SpawnEvent>)>;

/// The state a session accumulates while it runs.
struct Session<'a> {
    opts: &'a TraceOptions,
    tracer: Tracer,
    proc: Process,
    plan: ProbePlan,
    heap: Heap,
    sym: Symbolizer,
    unwinder: Unwinder,
    /// Sites whose id the kernel cut short, and what their copies showed.
    cut: cut::CutSites,
    start: Instant,
    /// Seconds into the trace when the interpreter began shutting down.
    finalized_at: Option<f64>,
    /// The target's memory when its interpreter began shutting down, where the figures freeze.
    at_finalize: Option<crate::report::AtFinalize>,
    /// Seconds into the trace when the interpreter started running the main module.
    main_at: Option<f64>,
    /// `run`: the child is paused at its lifecycle points; which pauses were taken.
    paused: Option<census::Pauses>,
    /// Why the report has no type census, when it has none for a reason worth saying.
    census_missing: Option<String>,
    notes_shown: HashSet<String>,
    /// The target's interpreter, when it is Python and its version is supported.
    py: Option<PythonProcess>,
    /// Whether the kernel has been given the walk parameters.
    py_ready: bool,
    /// When the kernel's thread → thread-state map was last refreshed.
    threads_refreshed: Option<Instant>,
    /// Processes forked by traced ones and followed (`--follow-forks`), by pid.
    forked: BTreeMap<u32, Forked>,
    /// Type censuses: when the main module starts, and at the end.
    census_base: Option<(f64, crate::analysis::census::Census)>,
    census_end: Option<crate::analysis::census::Census>,
    /// The capture being written (`-o`).
    capture: Option<CaptureWriter>,
    /// stderr is a terminal: show a progress line that rewrites itself.
    live_progress: bool,
    /// The metrics endpoint (`--prometheus`).
    exporter: Option<Exporter>,
    /// The kernel's counters as the last interval read them.
    counters: Counters,
    /// Tracing has ended: children announced from now on are let go, not probed.
    ending: bool,
    /// `--redirect-pymalloc` in force: put back when tracing ends (or on drop).
    redirect: Option<crate::probes::redirect::Applied>,
    /// `--control`: the interpreter's allocator tables, once a `redirect` request found them.
    tables: Option<crate::probes::redirect::Redirect>,
    /// The files the target mapped when its probes were planned, and those looked at since for
    /// heap-sampling USDTs: a library loaded later is looked at once.
    scanned: HashSet<String>,
    /// The in-process sampler's ceiling on samples a second and the highest mean interval its
    /// thinning amounted to, when it thinned.
    throttled: Option<crate::report::SampleCeiling>,
}

/// Traces `spec` until it exits, the window ends, or the user interrupts; with `live`, feeds
/// a live view each interval until it quits.
pub async fn trace_live(
    spec: TargetSpec,
    opts: &TraceOptions,
    mut live: Option<LiveView>,
) -> Result<Outcome> {
    let mut signals = watch::Signals::catch()?;
    let phase = Phases::new(opts.verbose);
    let (mut s, mut watch) = start::start(spec, opts, &mut live, &phase).await?;
    let ending = s.trace(&mut watch, &live, &mut signals).await?;
    s.finish(watch, ending, &phase)
}

impl Session<'_> {
    /// Takes in records from the kernel.
    fn absorb(&mut self, ev: Event<'_>) {
        match ev {
            Event::NewSite(ev) => self.new_site(&ev),
            Event::Stack(copy) => self.stack_copy(&copy),
            Event::Fork(f) => self.follow(f.parent, f.child),
            Event::Exec(e) => self.child_exec(e.child),
            Event::Finalize(f) if f.tgid == self.proc.pid => self.lifecycle(Lifecycle::Finalize),
            Event::MainStart(f) if f.tgid == self.proc.pid => self.lifecycle(Lifecycle::MainStart),
            // A followed child that exec'd has its interpreter by now: walk it (and raise its
            // sampler's semaphore) without waiting for the next tick.
            Event::MainStart(f) => self.child_main_started(f.tgid),
            Event::Finalize(_) => {}
        }
    }

    /// A new site: its Python stack decoded while the code objects live, the native frames the
    /// kernel walked (until a stack copy gives all of them).
    fn new_site(&mut self, ev: &NewSiteEvent) {
        let func = AllocFn::from_u8(ev.func).unwrap_or(AllocFn::Malloc);
        let depth = (ev.py_depth as usize).min(ev.py_frames.len());
        log::trace!(
            "new site {:#x}: py status {} depth {} frames {:x?}",
            ev.site_id,
            ev.py_status,
            depth,
            &ev.py_frames[..depth]
        );
        if ev.tgid != self.proc.pid {
            self.enable_child_python(ev.tgid);
        }
        // The record arrived: its status stands even when there is no interpreter to decode
        // frames with (not Python, or a version leaktrace cannot walk: the header says which).
        let python = Some(match self.python_of(ev.tgid) {
            Some(py) => PythonStack {
                frames: py.decode(&ev.py_frames[..depth]),
                entry: (0..depth)
                    .map(|i| ev.py_entry[i / 64] & (1 << (i % 64)) != 0)
                    .collect(),
                status: ev.py_status,
                truncated: ev.py_truncated != 0,
            },
            None => PythonStack {
                status: ev.py_status,
                ..PythonStack::default()
            },
        });
        if let Some(p) = &python {
            log::trace!("site {:#x} decoded: {:?}", ev.site_id, p.frames);
        }
        let pcs = &ev.native[..(ev.native_depth as usize).min(ev.native.len())];
        self.heap
            .announce(ev.site_id, ev.tgid, func, ev.native[0], python);
        if ev.native_end != native_end::UNKNOWN {
            self.unwinder.stats.kernel_walks += 1;
        }
        if !self.heap.has_full_native(ev.site_id) {
            // What the kernel followed; a stack copy, when one comes, replaces it, unless the
            // kernel cut the site's id short. A walk that stopped at the eval loop's return
            // address had folded all the id takes: the eval loop's row ends the id.
            let eval = self.unwinder.eval_frames(&mut self.sym, ev.tgid, pcs);
            let cut = ev.id_cut != 0 && eval.last() == Some(&false);
            let stack = NativeStack {
                pcs: pcs.to_vec(),
                eval,
                end: if cut {
                    UnwindEnd::Unlearned
                } else {
                    UnwindEnd::from_kernel(ev.native_end)
                },
            };
            if cut {
                self.cut.note(ev.site_id, ev.tgid, stack.clone());
            }
            self.heap.set_native(&mut self.sym, ev.site_id, &stack);
        }
        // A thread the kernel could not place, or an interpreter that just came up:
        // refresh soon rather than at the next tick.
        let stale = self
            .threads_refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_millis(50));
        let main = ev.tgid == self.proc.pid;
        if main && stale && (!self.py_ready || ev.py_status == py_status::NO_THREAD_STATE) {
            self.enable_python();
        }
    }

    /// A site's stack copy: unwound here, and the rows learned taught to the kernel.
    fn stack_copy(&mut self, copy: &StackCopy<'_>) {
        // A heap-sampling USDT's copy starts at the probe site, not at a return address.
        let at_probe = self.heap.func(copy.site_id) == Some(AllocFn::UsdtAlloc);
        let (stack, rows) =
            self.unwinder
                .unwind(&mut self.sym, copy.tgid, copy.regs, copy.data, at_probe);
        log::trace!(
            "site {:#x}: {} native frames ({:?}) from {} of {} stack bytes",
            copy.site_id,
            stack.pcs.len(),
            stack.end,
            copy.data.len(),
            copy.wanted
        );
        if let Err(e) = self.tracer.learn_rows(copy.tgid, &rows) {
            log::debug!("{e}");
        }
        // A site whose id the kernel cut at an untaught frame stands for every call path
        // through the frames it walked until their rows are learned: it shows its first copy's
        // path only while later copies agree (session/cut.rs). One cut inside the sampler's
        // own frames says so (the report shows its Python stack alone).
        let interpreter = self.plan.python.as_ref().map(|p| p.module.as_str());
        let sym = &mut self.sym;
        let key = || {
            let key = cut::path_key(&stack, |pc| {
                let module = sym.return_address(copy.tgid, pc).module;
                interpreter.is_some() && module.as_deref() == interpreter
            });
            log::trace!("site {:#x}: path {key:x?}", copy.site_id);
            key
        };
        match self.cut.copy(copy.site_id, key) {
            CopyVerdict::Show => self.heap.set_native(&mut self.sym, copy.site_id, &stack),
            CopyVerdict::Agrees | CopyVerdict::StillMixed => {}
            CopyVerdict::Mixed(kernel) => {
                log::debug!("site {:#x}: its copies took different paths", copy.site_id);
                self.show_kernel_frames(copy.tgid, copy.site_id, &kernel);
            }
        }
    }

    /// Shows the frames the kernel walked for a cut site that holds several paths, saying so
    /// in words when they are the in-process sampler's alone.
    fn show_kernel_frames(&mut self, pid: u32, id: u64, kernel: &NativeStack) {
        let sampler_only = self.heap.func(id) == Some(AllocFn::UsdtAlloc)
            && !kernel.pcs.is_empty()
            && FrameSource::all_in_sampler(&mut self.sym, pid, &kernel.pcs);
        self.heap.set_native(&mut self.sym, id, kernel);
        if sampler_only {
            self.heap.mark_sampler_frames_only(id);
        }
    }

    /// Cut sites whose later allocation's copy could not be sent (`SITE_COPY_MISSED`, read
    /// with the counters) cannot be shown as one path.
    fn judge_missed_copies(&mut self) {
        let heap = &self.heap;
        let missed = self
            .cut
            .take_missed(|id| heap.stats(id).announced & SITE_COPY_MISSED != 0);
        for (id, pid, kernel) in missed {
            log::debug!("site {id:#x}: a copy of a later allocation was not sent");
            self.show_kernel_frames(pid, id, &kernel);
        }
    }

    /// Reads all pending records and counters, and symbolizes what is new (the target's maps
    /// must still exist for sites in modules mapped since the last refresh).
    fn catch_up(&mut self, reader: &mut EventReader) -> Result<()> {
        reader.drain(|ev| self.absorb(ev));
        self.sym.refresh(self.proc.pid);
        self.heap.update(&mut self.sym, self.tracer.sites()?);
        self.judge_missed_copies();
        self.heap.place_pending(&mut self.sym);
        Ok(())
    }

    /// Reads the kernel's counters into the heap model and appends a time-series point.
    fn refresh(&mut self) -> Result<Sample> {
        self.enable_python();
        self.rescan_usdt();
        self.read_throttle();
        // Followed children's libraries, while they live: their sites are placed from them.
        let children: Vec<u32> = self.forked.keys().copied().collect();
        for pid in children {
            self.sym.refresh(pid);
            self.enable_child_python(pid);
        }
        self.heap.place_pending(&mut self.sym);
        self.heap.update(&mut self.sym, self.tracer.sites()?);
        self.judge_missed_copies();
        self.counters = self.tracer.counters()?;
        let t = self.start.elapsed().as_secs_f64();
        let arenas = self.py.as_ref().and_then(|py| py.arena_bytes());
        let point = self
            .heap
            .sample(t, &self.counters, self.proc.rss_bytes(), arenas);
        if let Some(w) = &mut self.capture {
            let failed = w.failure().is_some();
            w.tick(&self.heap, &mut self.sym, &point);
            if let (false, Some(e)) = (failed, w.failure()) {
                eprintln!("leaktrace: {e}; tracing goes on");
            }
        }
        Ok(point)
    }
}

/// Resolves when the live view asks to quit (never without one).
async fn quit_requested(quit: &mut Option<UnboundedReceiver<()>>) {
    match quit {
        Some(rx) => {
            if rx.recv().await.is_none() {
                // The view is gone without a word: stop asking.
                *quit = None;
            }
        }
        None => std::future::pending().await,
    }
}
