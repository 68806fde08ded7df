//! Probing a process: planning and attaching the probes for its current mappings, and giving
//! the kernel the Python walk parameters once its interpreter exists.

use std::time::Instant;

use super::{Session, TraceMode};
use crate::error::Result;
use crate::probes::loader::Tracer;
use crate::probes::plan::{plan, ProbePlan};
use crate::probes::usdt;
use crate::process::Process;
use crate::report::SampleCeiling;
use crate::stacks::python::PythonProcess;
use crate::units::human_bytes;

impl Session<'_> {
    /// Plans the probes for the process's current mappings and attaches the new ones.
    pub(super) fn setup_probes(&mut self) -> Result<()> {
        let pid = self.proc.pid;
        let modules = self.proc.module_map()?;
        self.scanned = modules.files().into_iter().map(String::from).collect();
        let mut plan = plan(
            pid,
            &modules,
            self.proc.exe().as_deref(),
            self.opts.families,
            self.opts.redirect_pymalloc && self.redirect.is_none(),
            self.opts.samples_in_process(),
        )?;
        if !plan.usdt.is_empty() {
            let note = interval_note(self.opts.mode.sample_rate(), plan.usdt_interval);
            plan.notes.extend(note);
        }
        if let TraceMode::Growth { .. } = self.opts.mode {
            // Page faults stand in for the allocator: nothing to probe, nothing to freeze at
            // shutdown. The plan still says where the interpreter is, for Python stacks.
            plan.points.clear();
            plan.lifecycle.clear();
            seed_brk(&mut self.tracer, pid);
        }
        self.py = None;
        self.py_ready = false;
        if let Some(info) = &plan.python {
            match PythonProcess::new(pid, info, &modules) {
                Ok(py) => self.py = Some(py),
                Err(e) => {
                    let note = e.to_string();
                    if self.notes_shown.insert(note.clone()) {
                        eprintln!("leaktrace: {note}");
                    }
                    self.plan.notes.push(note);
                }
            }
        }
        if self.paused.is_none() && self.census_base.is_none() && !self.opts.families.python_calls()
        {
            // `attach`: small objects are counted from pymalloc's pools, so every one already
            // there is in this baseline; taken before the probes go in, so that nothing made
            // after them is taken for old.
            self.census_base = self.take_census().map(|c| (0.0, c));
        }
        self.tracer.attach(&plan, pid)?;
        plan.notes.extend(self.tracer.take_usdt_problems());
        if let Some(r) = &plan.redirect {
            // After the probes: no allocation goes unseen between the switch and them.
            let applied = r.apply()?;
            if self.opts.verbose {
                for (at, from, to) in applied.slots() {
                    eprintln!("leaktrace: redirected allocator slot {at:#x}: {from:#x} -> {to:#x}");
                }
            }
            self.redirect = Some(applied);
        }
        if self.opts.verbose {
            self.print_plan(&plan);
        }
        for n in &plan.notes {
            // `run`'s command may be a launcher that execs the interpreter (pyenv's shims, `env
            // python3`): whether it was Python is for the report to say, at the end.
            let launcher = self.paused.is_some() && n == crate::probes::plan::NOT_PYTHON;
            if !launcher && self.notes_shown.insert(n.clone()) {
                eprintln!("leaktrace: {n}");
            }
        }
        let mut notes = std::mem::take(&mut self.plan.notes);
        if plan.python.is_some() {
            // The program before an exec (`env python3 …`) was not Python; this one is.
            notes.retain(|n| n != crate::probes::plan::NOT_PYTHON);
        }
        self.plan = plan;
        self.plan.notes.extend(notes);
        self.enable_python();
        Ok(())
    }

    /// A library the target loaded since its probes were planned may carry the heap-sampling
    /// USDTs (a C extension with a sampler of its own). Where this session samples through them,
    /// its sites are attached too. Where the kernel samples, they are named and not used: the C
    /// library's probes already count what that library allocates through it.
    pub(super) fn rescan_usdt(&mut self) {
        if !self.opts.samples_in_process() || self.ending {
            return;
        }
        let pid = self.proc.pid;
        let Ok(modules) = self.proc.module_map() else {
            return;
        };
        let new: Vec<&str> = modules
            .files()
            .into_iter()
            .filter(|f| !self.scanned.contains(*f))
            .collect();
        if new.is_empty() {
            return;
        }
        self.scanned.extend(new.iter().map(|f| f.to_string()));
        let (points, mut notes) = usdt::choose_in(pid, &modules, &new);
        if !points.is_empty() {
            let t = self.start.elapsed().as_secs_f64();
            let who = usdt::producers(&points);
            if self.plan.usdt.is_empty() {
                notes.push(format!(
                    "{who}, loaded {t:.1} s into the session, fires the heap-sampling USDTs: not \
                     used, as this session has sampled in the kernel since it began (attach \
                     again to sample through them)"
                ));
            } else {
                match self.tracer.attach_late_usdt(&points, pid) {
                    Ok(()) => {
                        notes.push(format!(
                            "{who}, loaded {t:.1} s into the session, samples inside the process \
                             too: its USDTs are attached"
                        ));
                        self.plan.usdt.extend(points);
                        if self.plan.usdt_exports.is_none() {
                            self.plan.usdt_exports =
                                usdt::producer_symbols(pid, &modules, &self.plan.usdt);
                        }
                    }
                    Err(e) => notes.push(format!(
                        "{who}, loaded {t:.1} s into the session: its USDTs could not be attached \
                         ({e})"
                    )),
                }
                notes.extend(self.tracer.take_usdt_problems());
            }
        }
        for n in notes {
            if self.notes_shown.insert(n.clone()) {
                eprintln!("leaktrace: {n}");
            }
            self.plan.notes.push(n);
        }
    }

    /// Reads how far the process's own sampler thinned its samples to stay under its ceiling on
    /// samples a second (while the process still has its maps), for the report to say.
    pub(super) fn read_throttle(&mut self) {
        let Some(symbols) = self.plan.usdt_exports.filter(|_| self.proc.alive()) else {
            return;
        };
        let ex = symbols.read();
        let (Some(limit), Some(base)) = (ex.limit, ex.interval) else {
            return;
        };
        // The lifetime high counts once it passed what an earlier session had left; the
        // interval in force counts as read.
        let new_high = ex
            .interval_max
            .filter(|m| self.plan.usdt_interval_max.is_none_or(|before| *m > before));
        let highest = new_high.max(ex.interval_now).unwrap_or(0);
        if limit > 0 && highest > base {
            let highest = self
                .throttled
                .map_or(highest, |t| t.interval_max.max(highest));
            self.throttled = Some(SampleCeiling {
                samples_per_s: limit,
                interval_max: highest,
            });
        }
    }

    /// What the report says when the sampler's ceiling thinned its samples.
    pub(super) fn throttle_note(&self) -> Option<String> {
        let SampleCeiling {
            samples_per_s: limit,
            interval_max: max,
        } = self.throttled?;
        Some(format!(
            "the process's sampler takes at most {limit} sample{} a second: while allocation \
             was fastest it kept a share of its samples, as if its mean interval were up to ~{}; \
             estimates stay unbiased, with fewer samples behind them (--sample-limit, \
             LEAKTRACE_SAMPLE_LIMIT; 0 for no ceiling)",
            if limit == 1 { "" } else { "s" },
            human_bytes(max)
        ))
    }

    /// The mean interval the report's estimates come from: the process's own where it samples
    /// itself (unknown when its producer does not say), else the session's.
    pub(super) fn sample_rate(&self) -> Option<u64> {
        if self.plan.usdt.is_empty() {
            self.opts.mode.sample_rate()
        } else {
            self.plan.usdt_interval
        }
    }

    /// `--verbose`: every point probed, how, and what was not.
    fn print_plan(&self, plan: &ProbePlan) {
        let pid = self.proc.pid;
        eprintln!(
            "leaktrace: pid {pid}: {} uprobes attached",
            self.tracer.attached()
        );
        for p in &plan.points {
            eprintln!(
                "leaktrace:   {:<18} +{:<3} {:<9} {:<28} [{:?}] {} @{:#x}",
                p.func.symbol(),
                p.placement.offset,
                if p.placement.emulated {
                    "emulated"
                } else {
                    "stepped"
                },
                p.placement.instruction,
                p.table,
                p.module,
                p.file_offset
            );
        }
        for u in &plan.usdt {
            let kind = if u.spec.kind == leaktrace_ebpf::USDT_KIND_ALLOC {
                "alloc"
            } else {
                "free"
            };
            eprintln!(
                "leaktrace:   {}:{kind:<8} USDT, semaphore {} {} @{:#x}",
                u.provider,
                u.semaphore.map_or("none".into(), |a| format!("{a:#x}")),
                u.module,
                u.file_offset
            );
        }
        for missing in &plan.missing {
            eprintln!("leaktrace:   {} not found (not probed)", missing.symbol());
        }
        for (alias, probed) in &plan.aliases {
            eprintln!(
                "leaktrace:   {} is {} (same address, probed once)",
                alias.symbol(),
                probed.symbol()
            );
        }
    }

    /// Gives the kernel the Python walk parameters once the interpreter exists, and refreshes
    /// its map of which thread state belongs to which thread.
    pub(super) fn enable_python(&mut self) {
        let pid = self.proc.pid;
        let Some(py) = &self.py else { return };
        if !self.py_ready {
            let Some(off) = py.bpf_offsets() else { return };
            match self.tracer.set_python(pid, &off) {
                Ok(()) => {
                    self.py_ready = true;
                    if self.opts.verbose {
                        eprintln!(
                            "leaktrace: walking Python {}.{} frames (holder at {:#x})",
                            py.layout.version.0, py.layout.version.1, off.holder_addr
                        );
                    }
                }
                Err(e) => {
                    eprintln!("leaktrace: Python stacks unavailable: {e}");
                    self.py = None;
                    return;
                }
            }
        }
        if let Err(e) = self.tracer.set_threads(pid, &py.thread_states()) {
            log::warn!("refreshing Python threads: {e}");
        }
        self.threads_refreshed = Some(Instant::now());
    }
}

/// Growth mode: tells the kernel where process `pid`'s heap ends, so the first `brk` that
/// shrinks it after attaching gives its pages back.
pub(super) fn seed_brk(tracer: &mut Tracer, pid: u32) {
    let heap_end = Process { pid }
        .maps()
        .ok()
        .and_then(|m| m.into_iter().find(|m| m.path == "[heap]"))
        .map(|m| m.end);
    if let Some(end) = heap_end {
        if let Err(e) = tracer.set_brk(pid, end) {
            log::debug!("{e}");
        }
    }
}

/// What the report says when the process samples itself at an interval other than the one
/// asked for (`--sample`): a running sampler keeps the interval it was started with.
fn interval_note(asked: Option<u64>, found: Option<u64>) -> Option<String> {
    match found {
        Some(n) if asked != Some(n) => Some(format!(
            "the process samples one allocation per ~{} on average, the interval its sampler \
             was started with (LEAKTRACE_SAMPLE_BYTES{}); --sample cannot change it once it runs",
            human_bytes(n),
            if n == crate::preload::MIN_RATE && asked.is_some_and(|a| a < n) {
                ", raised to the sampler's floor"
            } else {
                ""
            }
        )),
        Some(_) => None,
        None => Some(
            "the process's sampler chooses its own interval: --sample does not apply, and the \
             estimates carry the weights it gives"
                .into(),
        ),
    }
}
