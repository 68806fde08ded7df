//! One tracing session: find the target, plan and attach the probes, follow the kernel's counters
//! and announcements until the window ends, and build the report.

mod census;
mod forks;
pub mod live;
mod phases;
mod setup;
mod signals;
mod waiting;

use forks::Forked;
use live::Exporter;
pub use live::LiveView;
use nix::sys::signal::Signal;
pub use phases::Phases;
use signals::Interrupt;
pub use waiting::progress_line;
use waiting::{child_event, open_pidfd, pid_exit, python_malloc_env, reply, sleep_until};

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use leaktrace_ebpf::{native_end, py_status, AllocFn};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::capture::{writer::CaptureWriter, Header};
use crate::error::{Error, Result, EXIT_TARGET_EXITED_DURING_TRACE};
use crate::events::{parse, Event, EventReader};
use crate::heap::{Heap, PythonStack, Sample};
use crate::options::{TargetSpec, TraceMode, TraceOptions};
use crate::probes::loader::{check_privileges, Counters, Tracer};
use crate::probes::plan::{Lifecycle, ProbePlan};
use crate::process::death::{Cause, Death};
use crate::process::spawn::{spawn, Control, ExitKind, SpawnEvent};
use crate::process::Process;
use crate::report::{Report, ReportMeta, TargetInfo, TracerCost};
use crate::stacks::native::{NativeStack, UnwindEnd, Unwinder};
use crate::stacks::python::PythonProcess;
use crate::stacks::symbolize::Symbolizer;

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
    start: Instant,
    /// Seconds into the trace when the interpreter began shutting down.
    finalized_at: Option<f64>,
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
}

/// Traces `spec` until it exits, the window ends, or the user interrupts; with `view`, feeds
/// a live view each interval until it quits.
pub async fn trace_live(
    spec: TargetSpec,
    opts: &TraceOptions,
    mut live: Option<LiveView>,
) -> Result<Outcome> {
    if let TargetSpec::Pid(pid) = spec {
        Process::open(pid)?;
    }
    check_privileges()?;
    // A capture that cannot be written is a usage error found before anything starts.
    if let Some(path) = &opts.capture {
        std::fs::File::create(path).map_err(|e| Error::Write {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }
    let exporter = match opts.prometheus {
        Some(addr) => Some(Exporter::start(addr).await?),
        None => None,
    };
    let mut quit = live.as_mut().map(|l| {
        let (_, rx) = unbounded_channel();
        std::mem::replace(&mut l.quit, rx)
    });
    let phase = Phases::new(opts.verbose);
    let mut tracer = Tracer::load(opts.load)?;
    phase.done("load the BPF object");
    log::debug!("BPF object loaded");
    let mut reader = EventReader::new(tracer.take_events()?)?;

    let (pid, mut child): (u32, Child) = match &spec {
        TargetSpec::Pid(pid) => (*pid, None),
        TargetSpec::Command { argv, pymalloc } => {
            let env = python_malloc_env(argv, *pymalloc, opts.families.python_calls());
            if let Some((k, v)) = &env {
                eprintln!(
                    "leaktrace: {} has no pymalloc symbols; starting it with {k}={v} so every Python \
                     allocation is seen (--pymalloc keep to leave it)",
                    argv[0]
                );
            }
            let (tx, mut rx) = unbounded_channel();
            let ctl = spawn(argv.clone(), env, tx);
            match rx.recv().await {
                Some(SpawnEvent::Ready(pid)) => (pid, Some((ctl, rx))),
                Some(SpawnEvent::Failed(e)) => return Err(e),
                other => return Err(Error::Internal(format!("starting {argv:?}: {other:?}"))),
            }
        }
    };
    log::debug!("target {pid} ready");
    let proc = Process { pid };
    let mut s = Session {
        opts,
        tracer,
        proc,
        plan: ProbePlan::empty(),
        heap: Heap::default(),
        sym: Symbolizer::new(),
        unwinder: Unwinder::default(),
        start: Instant::now(),
        finalized_at: None,
        main_at: None,
        paused: child.is_some().then(census::Pauses::default),
        census_missing: None,
        notes_shown: HashSet::new(),
        py: None,
        py_ready: false,
        threads_refreshed: None,
        forked: BTreeMap::new(),
        census_base: None,
        census_end: None,
        capture: None,
        live_progress: opts.interval.is_none() && live.is_none() && std::io::stderr().is_terminal(),
        exporter: None,
        counters: Counters::default(),
        ending: false,
    };
    // In `run`, leaktrace is the child's tracer: it can pause the interpreter when the main
    // module starts (the census baseline) and at shutdown (the end census, and every Python
    // stack decoded before finalization frees code), and swallow those stops.
    let setup = s
        .tracer
        .add_target(pid, s.paused.is_some())
        .and_then(|_| s.setup_probes());
    if let Err(e) = setup {
        if let Some((ctl, _)) = &child {
            let _ = ctl.send(Control::Abort);
        }
        return Err(e);
    }
    log::debug!("probes attached");
    phase.done("start the target, plan and attach the probes");
    if opts.load.follow_forks && child.is_none() {
        // Workers the target forked before leaktrace came are followed like new ones.
        for (pid, parent) in s.proc.descendants() {
            if s.tracer.add_target(pid, false).is_ok() {
                s.follow(parent, pid);
            }
        }
    }
    let mut command = s.proc.cmdline();
    s.sym.refresh(pid);
    let pidfd = match child {
        None => open_pidfd(pid),
        Some(_) => None,
    };
    if let Some((ctl, _)) = &child {
        let _ = ctl.send(Control::Go);
    }
    s.start = Instant::now();
    s.exporter = exporter;
    if let Some(path) = &opts.capture {
        let interval = opts.interval.unwrap_or(Duration::from_secs(1));
        let interpreter = s.plan.python.as_ref().map(|p| p.module.clone());
        let header = Header::new(pid, &command, opts.mode, interval, interpreter);
        match CaptureWriter::create(path, header) {
            Ok(w) => s.capture = Some(w),
            Err(e) => {
                if let Some((ctl, _)) = &child {
                    let _ = ctl.send(Control::Abort);
                }
                return Err(e);
            }
        }
    }

    let mut tick = tokio::time::interval(opts.interval.unwrap_or(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut interrupts = signals::Interrupts::default();
    let handler = |e: std::io::Error| Error::Internal(format!("installing a signal handler: {e}"));
    let mut sigint = signal(SignalKind::interrupt()).map_err(handler)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(handler)?;
    let mut exit_code = 0;
    // Set when the target died: `run`'s wait status, if it had one.
    let mut died: Option<Option<ExitKind>> = None;
    let end: String = loop {
        tokio::select! {
            first = reader.next_record() => {
                if let Some(ev) = parse(&first) {
                    s.absorb(ev);
                }
                reader.drain(|ev| s.absorb(ev));
            }
            _ = tick.tick() => {
                let sample = s.refresh()?;
                s.publish(&sample, &live);
                if opts.interval.is_some() {
                    eprintln!("{}", progress_line(&sample));
                } else if s.live_progress {
                    eprint!("\r\x1b[K{}", progress_line(&sample));
                }
                if pidfd.is_none() && child.is_none() && !s.proc.alive() {
                    exit_code = EXIT_TARGET_EXITED_DURING_TRACE;
                    died = Some(None);
                    break "exited during tracing".to_string();
                }
            }
            _ = sleep_until(deadline) => {
                break "still running; detached at the end of the window".to_string();
            }
            _ = sigint.recv() => {
                if let Interrupt::Detach(why) = interrupts.received(Signal::SIGINT, child.is_some()) {
                    break why;
                }
            }
            _ = sigterm.recv() => {
                if let Interrupt::Detach(why) = interrupts.received(Signal::SIGTERM, child.is_some()) {
                    break why;
                }
            }
            _ = sleep_until(interrupts.due()) => interrupts.pass_on(pid),
            _ = quit_requested(&mut quit) => break "still running; detached (quit from the live view)".to_string(),
            _ = pid_exit(&pidfd) => {
                exit_code = EXIT_TARGET_EXITED_DURING_TRACE;
                died = Some(None);
                break "exited during tracing".to_string();
            }
            ev = child_event(&mut child) => match ev {
                Some(SpawnEvent::Exiting) => {
                    // Its maps are still there: read everything it announced and symbolize it.
                    log::debug!("target exiting; catching up");
                    s.catch_up(&mut reader)?;
                    log::debug!("caught up");
                    reply(&child, Control::Release);
                }
                Some(SpawnEvent::Stopped) => {
                    // Ours if the interpreter just reached a lifecycle point (the kernel set its
                    // flag before stopping it); anyone else's is passed on.
                    let ours = s.take_pause(&mut reader)?;
                    reply(&child, if ours { Control::Release } else { Control::Deliver });
                }
                Some(SpawnEvent::Exec) => {
                    // A wrapper exec'd the real program: the old address space and everything
                    // recorded in it are gone; probe the new program's libraries.
                    s.catch_up(&mut reader)?;
                    s.tracer.forget_process(pid)?;
                    s.heap.forget_process(pid);
                    s.sym.forget_process(pid);
                    s.sym.refresh(pid);
                    command = s.proc.cmdline();
                    // A new interpreter starts and ends afresh: its pauses are still to come.
                    s.paused = Some(census::Pauses::default());
                    (s.main_at, s.finalized_at, s.census_base) = (None, None, None);
                    let replanned = s.tracer.add_target(pid, true).and_then(|_| s.setup_probes());
                    reply(&child, Control::Go);
                    replanned?;
                }
                Some(SpawnEvent::Signal(sig)) => interrupts.child_took(sig),
                Some(SpawnEvent::Exited(kind)) => {
                    died = Some(Some(kind));
                    break kind.to_string();
                }
                Some(SpawnEvent::Failed(e)) => return Err(e),
                Some(SpawnEvent::Ready(_)) | None => break "lost track of the child".to_string(),
            },
        }
    };
    // Nothing may be held stopped once nobody listens for forks.
    s.ending = true;
    s.tracer.end_holds();
    let duration = s.start.elapsed().as_secs_f64();
    phase.done("trace");
    let ended = Instant::now();
    if s.live_progress {
        eprint!("\r\x1b[K");
    }
    log::debug!("tracing ended: {end}");
    s.catch_up(&mut reader)?;
    s.refresh()?;
    s.heap.place_pending(&mut s.sym);
    if s.census_end.is_none() && s.finalized_at.is_none() && s.proc.alive() {
        s.census_end = s.take_census();
    }
    let counters = s.tracer.counters()?;
    let death = died.and_then(|waited| Death::of(s.tracer.death(pid), waited));
    let end = match (&death, s.finalized_at) {
        (Some(d), None) if d.cause != Cause::Exit => {
            format!("{}; figures are what was live when it died", d.describe())
        }
        (Some(d), _) => d.describe(),
        (None, _) => end,
    };
    let end = match s.finalized_at {
        Some(t) => format!(
            "{end}; figures are as of interpreter shutdown (Py_FinalizeEx at {t:.1} s), before \
             teardown freed module globals"
        ),
        None => end,
    };
    let target = TargetInfo {
        pid,
        command,
        python: s.plan.python.as_ref().map(|p| p.version_string()),
        python_module: s.plan.python.as_ref().map(|p| p.module.clone()),
        libc: s.plan.libc.clone(),
        end,
        death,
    };
    let mut meta = ReportMeta {
        processes: s.processes(&target),
        target,
        mode: opts.mode.kind(),
        sample_rate: opts.mode.sample_rate(),
        duration_s: duration,
        probes: ReportMeta::probes_of(&s.plan),
        python_coverage: s.plan.python_coverage,
        notes: s.plan.notes.clone(),
        counters: counters.named(),
        native_unwind: s.unwinder.stats.clone(),
        interpreter: s.plan.python.as_ref().map(|p| p.module.clone()),
        finalized_at: s.finalized_at,
        main_at: s.main_at,
        census_baseline: Some(s.census_baseline()),
        census_base: s.census_base.take(),
        census_end: s.census_end.take(),
    };
    if meta.census_end.is_none() && s.py.is_some() && !matches!(opts.mode, TraceMode::Growth { .. })
    {
        meta.notes.push(s.census_missing.take().unwrap_or_else(|| {
            "no type census: the target was gone before its objects could be read".into()
        }));
    }
    meta.notes.extend(interrupts.note());
    if let Some(why) = &s.tracer.deaths_unavailable {
        meta.notes
            .push(format!("how the target dies cannot be named: {why}"));
    }
    if let Some(w) = s.capture.take() {
        let live = s.tracer.live_table().unwrap_or_else(|e| {
            log::warn!("reading live blocks for the capture: {e}");
            Vec::new()
        });
        let path = opts.capture.as_deref().unwrap_or(std::path::Path::new(""));
        match w.finish(&s.heap, &meta, &live) {
            Ok(size) => eprintln!(
                "leaktrace: capture written to {} ({}); render it with `leaktrace report {}`",
                path.display(),
                crate::report::human_bytes(size),
                path.display()
            ),
            Err(e) => {
                eprintln!("leaktrace: {e}");
                meta.notes.push(e.to_string());
            }
        }
    }
    let mut report = Report::build(&s.heap, &mut s.sym, meta, opts.report);
    let me = Process {
        pid: std::process::id(),
    };
    report.tracer = Some(TracerCost {
        cpu_seconds: me.cpu_seconds().unwrap_or(0.0),
        peak_rss_bytes: me.peak_rss_bytes().unwrap_or(0),
        report_seconds: ended.elapsed().as_secs_f64(),
    });
    log::debug!("report built");
    phase.done("read the last records, the census and build the report");
    if let Some(path) = &opts.json {
        std::fs::write(path, report.to_json()).map_err(|e| Error::Write {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(Outcome {
        report,
        exit_code,
        probes: s.tracer,
    })
}

impl Session<'_> {
    /// Takes in records from the kernel.
    fn absorb(&mut self, ev: Event<'_>) {
        {
            match ev {
                Event::NewSite(ev) => {
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
                    let py = self.python_of(ev.tgid);
                    let python = py.map(|py| PythonStack {
                        frames: py.decode(&ev.py_frames[..depth]),
                        entry: (0..depth)
                            .map(|i| ev.py_entry[i / 64] & (1 << (i % 64)) != 0)
                            .collect(),
                        status: ev.py_status,
                        truncated: ev.py_truncated != 0,
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
                        // What the kernel followed; a stack copy, when one comes, replaces it.
                        let stack = NativeStack {
                            pcs: pcs.to_vec(),
                            eval: self.unwinder.eval_frames(&mut self.sym, ev.tgid, pcs),
                            end: UnwindEnd::from_kernel(ev.native_end),
                        };
                        self.heap.set_native(&mut self.sym, ev.site_id, &stack);
                    }
                    // A thread the kernel could not place, or an interpreter that just came up:
                    // refresh soon rather than at the next tick.
                    let stale = self
                        .threads_refreshed
                        .is_none_or(|t| t.elapsed() > Duration::from_millis(50));
                    let main = ev.tgid == self.proc.pid;
                    if main
                        && stale
                        && (!self.py_ready || ev.py_status == py_status::NO_THREAD_STATE)
                    {
                        self.enable_python();
                    }
                }
                Event::Stack(copy) => {
                    let (stack, rows) =
                        self.unwinder
                            .unwind(&mut self.sym, copy.tgid, copy.regs, copy.data);
                    log::trace!(
                        "site {:#x}: {} native frames ({:?}) from {} of {} stack bytes",
                        copy.site_id,
                        stack.pcs.len(),
                        stack.end,
                        copy.data.len(),
                        copy.wanted
                    );
                    self.heap.set_native(&mut self.sym, copy.site_id, &stack);
                    if let Err(e) = self.tracer.learn_rows(copy.tgid, &rows) {
                        log::debug!("{e}");
                    }
                }
                Event::Fork(f) => self.follow(f.parent, f.child),
                Event::Exec(e) => self.child_exec(e.child),
                Event::Finalize(f) if f.tgid == self.proc.pid => {
                    self.lifecycle(Lifecycle::Finalize)
                }
                Event::MainStart(f) if f.tgid == self.proc.pid => {
                    self.lifecycle(Lifecycle::MainStart)
                }
                Event::Finalize(_) | Event::MainStart(_) => {}
            }
        }
    }

    /// Reads all pending records and counters, and symbolizes what is new (the target's maps
    /// must still exist for sites in modules mapped since the last refresh).
    fn catch_up(&mut self, reader: &mut EventReader) -> Result<()> {
        reader.drain(|ev| self.absorb(ev));
        self.sym.refresh(self.proc.pid);
        self.heap.update(&mut self.sym, self.tracer.sites()?);
        self.heap.place_pending(&mut self.sym);
        Ok(())
    }

    /// Reads the kernel's counters into the heap model and appends a time-series point.
    fn refresh(&mut self) -> Result<Sample> {
        self.enable_python();
        // Followed children's libraries, while they live: their sites are placed from them.
        let children: Vec<u32> = self.forked.keys().copied().collect();
        for pid in children {
            self.sym.refresh(pid);
            self.enable_child_python(pid);
        }
        self.heap.place_pending(&mut self.sym);
        self.heap.update(&mut self.sym, self.tracer.sites()?);
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
