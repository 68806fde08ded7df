//! A session's start: checks that fail before anything is touched, the BPF object, the target
//! (found, or started under ptrace), its probes, and the capture's header.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::unbounded_channel;

use super::live::{Exporter, LiveView};
use super::waiting::{open_pidfd, python_malloc_env};
use super::{census, cut, signals, Child, Phases, Session, Watch};
use crate::capture::{writer::CaptureWriter, Header};
use crate::error::{Error, Result};
use crate::events::EventReader;
use crate::heap::Heap;
use crate::options::{TargetSpec, TraceMode, TraceOptions};
use crate::probes::loader::{check_privileges, Tracer};
use crate::probes::plan::ProbePlan;
use crate::probes::tables::Counters;
use crate::process::spawn::{spawn, Control, SpawnEvent};
use crate::process::Process;
use crate::stacks::native::Unwinder;
use crate::stacks::symbolize::Symbolizer;

/// Everything up to the moment the target runs traced: the session, and what its loop watches.
pub(super) async fn start<'a>(
    spec: TargetSpec,
    opts: &'a TraceOptions,
    live: &mut Option<LiveView>,
    phase: &Phases,
) -> Result<(Session<'a>, Watch)> {
    if let TargetSpec::Pid(pid) = spec {
        Process::open(pid)?;
    }
    check_privileges()?;
    // An output that cannot be written is found before anything starts, not after the trace.
    for path in [&opts.capture, &opts.json].into_iter().flatten() {
        std::fs::File::create(path).map_err(|e| Error::Write {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }
    let exporter = match opts.prometheus {
        Some(addr) => Some(Exporter::start(addr).await?),
        None => None,
    };
    let quit = live.as_mut().map(|l| {
        let (_, rx) = unbounded_channel();
        std::mem::replace(&mut l.quit, rx)
    });
    // The object loads before `run`'s command starts. Starting the command first, to overlap its
    // exec with the load, was measured (2026-12-02, six alternating pairs each mode): the load
    // phase grew by what the attach phase lost in sampled mode, and by more in exact mode.
    let mut tracer = Tracer::load(opts.load)?;
    phase.done("load the BPF object");
    log::debug!("BPF object loaded");
    let reader = EventReader::new(tracer.take_events()?)?;
    let (pid, child) = start_target(&spec, opts).await?;
    log::debug!("target {pid} ready");
    let mut s = Session::new(
        opts,
        tracer,
        Process { pid },
        child.is_some(),
        live.is_none(),
    );
    // In `run`, leaktrace is the child's tracer: it can pause the interpreter when the main
    // module starts (the census baseline) and at shutdown (the end census, and every Python
    // stack decoded before finalization frees code), and swallow those stops.
    // The process is made a target only once every probe is in: an attached process runs on
    // while probes go in one by one (seconds on a loaded host), and a malloc probe live before
    // free's would take blocks freed meanwhile for leaks. `run`'s child is stopped either way.
    let pause = s.paused.is_some();
    let setup = s
        .setup_probes()
        .and_then(|_| s.tracer.add_target(pid, pause));
    if let Err(e) = setup {
        abort(child).await;
        return Err(e);
    }
    log::debug!("probes attached");
    phase.done("start the target, plan and attach the probes");
    if opts.load.follow_forks && child.is_none() {
        s.adopt_descendants();
    }
    let command = s.proc.cmdline();
    s.sym.refresh(pid);
    let pidfd = match child {
        None => open_pidfd(pid),
        Some(_) => None,
    };
    // The capture's header is written while `run`'s child still waits, so that a capture that
    // cannot be written stops the session before the program ran, not after it started.
    if let Err(e) = s.start_capture(&command) {
        abort(child).await;
        return Err(e);
    }
    if let Some((ctl, _)) = &child {
        let _ = ctl.send(Control::Go);
    }
    s.start = Instant::now();
    s.exporter = exporter;
    let watch = Watch {
        reader,
        child,
        pidfd,
        quit,
        command,
        interrupts: signals::Interrupts::default(),
        control: opts.control.then(super::control::requests),
    };
    Ok((s, watch))
}

/// The target: the process `attach` names, or `run`'s command started and stopped at its
/// entry point.
async fn start_target(spec: &TargetSpec, opts: &TraceOptions) -> Result<(u32, Child)> {
    match spec {
        TargetSpec::Pid(pid) => Ok((*pid, None)),
        TargetSpec::Command { argv, pymalloc } => {
            let pymalloc_env = python_malloc_env(argv, *pymalloc, opts.families.python_calls());
            if let Some((k, v)) = &pymalloc_env {
                eprintln!(
                    "leaktrace: {} has no pymalloc symbols; starting it with {k}={v} so every Python \
                     allocation is seen (--pymalloc keep to leave it)",
                    argv[0]
                );
            }
            let mut env: Vec<(String, String)> = pymalloc_env.into_iter().collect();
            env.extend(sampler_env(opts));
            let (tx, mut rx) = unbounded_channel();
            let ctl = spawn(argv.clone(), env, tx);
            match rx.recv().await {
                Some(SpawnEvent::Ready(pid)) => Ok((pid, Some((ctl, rx)))),
                Some(SpawnEvent::Failed(e)) => Err(e),
                other => Err(Error::Internal(format!("starting {argv:?}: {other:?}"))),
            }
        }
    }
}

/// `run --mode sampled`: the command samples itself through the preloaded sampler, so its
/// allocator calls cost no trap. Where the library cannot be written the kernel samples.
fn sampler_env(opts: &TraceOptions) -> Vec<(String, String)> {
    let TraceMode::Sampled { rate } = opts.mode else {
        return Vec::new();
    };
    if !opts.samples_in_process() {
        return Vec::new();
    }
    if rate < crate::preload::MIN_RATE {
        eprintln!(
            "leaktrace: the in-process sampler samples at most once per {} KiB (asked: {rate} B); \
             --sampler kernel samples finer",
            crate::preload::MIN_RATE >> 10
        );
    }
    if let Err(why) = crate::preload::host_can_load() {
        eprintln!("leaktrace: the in-process sampler is not used ({why}); the kernel samples");
        return Vec::new();
    }
    match crate::preload::install(None) {
        Ok(path) => crate::preload::environment(&path, rate, opts.sample_limit),
        Err(e) => {
            eprintln!("leaktrace: the in-process sampler is not used ({e}); the kernel samples");
            Vec::new()
        }
    }
}

/// `run`: the child never reaches its program when the session cannot start. Returns once
/// the spawning thread has killed and reaped it (it drops its end of `rx` then): were leaktrace
/// to exit first, the kernel would detach the stopped child and let it run untraced.
async fn abort(child: Child) {
    if let Some((ctl, mut rx)) = child {
        let _ = ctl.send(Control::Abort);
        while rx.recv().await.is_some() {}
    }
}

impl Session<'_> {
    /// `attach --follow-forks`: workers the target forked before leaktrace came are followed
    /// like new ones.
    fn adopt_descendants(&mut self) {
        for (pid, parent) in self.proc.descendants() {
            if self.tracer.add_target(pid, false).is_ok() {
                self.follow_child(parent, pid, false);
            }
        }
    }

    /// `-o`: the capture's header, written before tracing begins.
    fn start_capture(&mut self, command: &str) -> Result<()> {
        let opts = self.opts;
        let Some(path) = &opts.capture else {
            return Ok(());
        };
        let interval = opts.interval.unwrap_or(Duration::from_secs(1));
        let interpreter = self.plan.python.as_ref().map(|p| p.module.clone());
        let mut header = Header::new(self.proc.pid, command, opts.mode, interval, interpreter);
        // A process that samples itself does so at its own interval.
        header.sample_rate = self.sample_rate();
        self.capture = Some(CaptureWriter::create(path, header)?);
        Ok(())
    }
}

impl<'a> Session<'a> {
    /// A session on `proc`, before anything is attached.
    fn new(
        opts: &'a TraceOptions,
        tracer: Tracer,
        proc: Process,
        own_child: bool,
        no_view: bool,
    ) -> Self {
        Session {
            opts,
            tracer,
            proc,
            plan: ProbePlan::empty(),
            heap: Heap::default(),
            sym: Symbolizer::new(),
            unwinder: Unwinder::default(),
            cut: cut::CutSites::default(),
            start: Instant::now(),
            finalized_at: None,
            at_finalize: None,
            main_at: None,
            paused: own_child.then(census::Pauses::default),
            census_missing: None,
            notes_shown: HashSet::new(),
            py: None,
            py_ready: false,
            threads_refreshed: None,
            forked: BTreeMap::new(),
            census_base: None,
            census_end: None,
            capture: None,
            live_progress: opts.interval.is_none() && no_view && std::io::stderr().is_terminal(),
            exporter: None,
            counters: Counters::default(),
            ending: false,
            redirect: None,
            tables: None,
            scanned: HashSet::new(),
            throttled: None,
        }
    }
}
