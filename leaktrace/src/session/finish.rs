//! A session's end: holds off, the last records and census, how the target ended in words,
//! the capture's last records, the report and its JSON.

use std::time::Instant;

use super::watch::{Ending, Watch};
use super::{Outcome, Phases, Session};
use crate::error::{Error, Result};
use crate::options::TraceMode;
use crate::process::death::{Cause, Death};
use crate::process::Process;
use crate::report::{human_bytes, Report, ReportMeta, TargetInfo, TracerCost};

impl Session<'_> {
    /// Stops tracing and builds the report.
    pub(super) fn finish(
        mut self,
        mut w: Watch,
        ending: Ending,
        phase: &Phases,
    ) -> Result<Outcome> {
        // Nothing may be held stopped once nobody listens for forks.
        self.ending = true;
        self.tracer.end_holds();
        if let Some(mut r) = self.redirect.take() {
            // pymalloc's own functions first: hot once the tables are back, and single-stepped
            // probes there would slow the target until the background detach ends.
            let table_points: Vec<_> = self
                .plan
                .points
                .iter()
                .filter(|p| p.table == crate::process::elf::SymbolTable::AllocatorTable)
                .map(|p| (p.host_path.clone(), p.file_offset))
                .collect();
            if let Some((path, _)) = table_points.first() {
                let offsets: Vec<u64> = table_points.iter().map(|(_, o)| *o).collect();
                self.tracer.detach_points(self.proc.pid, path, &offsets);
            }
            let left = r.restore();
            if left > 0 {
                self.plan.notes.push(format!(
                    "{left} allocator slot(s) switched by --redirect-pymalloc were not put back: \
                     the program changed them (or exited); its allocations stay correct, through \
                     the raw allocator"
                ));
            }
        }
        let duration = self.start.elapsed().as_secs_f64();
        if self.proc.alive() {
            // The window ends on a running program: the blocks it is about to free are not
            // leaks. 20 ms is thousands of times the malloc-to-free span of a short-lived block.
            self.tracer
                .stop_new_blocks(std::time::Duration::from_millis(20));
        }
        phase.done("trace");
        let ended = Instant::now();
        if self.live_progress {
            eprint!("\r\x1b[K");
        }
        log::debug!("tracing ended: {}", ending.why);
        let not_python = crate::probes::plan::NOT_PYTHON;
        if self.plan.notes.iter().any(|n| n == not_python)
            && self.notes_shown.insert(not_python.into())
        {
            // `run`'s command, never Python, not even after an exec (session/setup.rs).
            eprintln!("leaktrace: {not_python}");
        }
        self.catch_up(&mut w.reader)?;
        self.refresh()?;
        self.heap.place_pending(&mut self.sym);
        if self.census_end.is_none() && self.finalized_at.is_none() && self.proc.alive() {
            self.census_end = self.take_census();
        }
        let mut meta = self.meta(w, &ending, duration)?;
        self.finish_capture(&mut meta);
        let opts = self.opts;
        let mut report = Report::build(&self.heap, &mut self.sym, meta, opts.report);
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
            exit_code: ending.exit_code,
            probes: self.tracer,
        })
    }

    /// Everything the report says besides its sites.
    fn meta(&mut self, w: Watch, ending: &Ending, duration: f64) -> Result<ReportMeta> {
        let opts = self.opts;
        let pid = self.proc.pid;
        let counters = self.tracer.counters()?;
        let death = ending
            .died
            .and_then(|waited| Death::of(self.tracer.death(pid), waited));
        let target = TargetInfo {
            pid,
            command: w.command,
            python: self.plan.python.as_ref().map(|p| p.version_string()),
            python_module: self.plan.python.as_ref().map(|p| p.module.clone()),
            libc: self.plan.libc.clone(),
            end: self.end_in_words(&death, &ending.why),
            death,
        };
        let mut meta = ReportMeta {
            processes: self.processes(&target),
            target,
            mode: opts.mode.kind(),
            sample_rate: self.sample_rate(),
            sample_ceiling: self.throttled,
            duration_s: duration,
            probes: ReportMeta::probes_of(&self.plan),
            python_coverage: self.plan.python_coverage,
            notes: self.plan.notes.clone(),
            counters: counters.named(),
            native_unwind: self.unwinder.stats.clone(),
            interpreter: self.plan.python.as_ref().map(|p| p.module.clone()),
            finalized_at: self.finalized_at,
            main_at: self.main_at,
            at_finalize: self.at_finalize,
            census_baseline: Some(self.census_baseline()),
            census_base: self.census_base.take(),
            census_end: self.census_end.take(),
        };
        if meta.census_end.is_none()
            && self.py.is_some()
            && !matches!(opts.mode, TraceMode::Growth { .. })
        {
            meta.notes
                .push(self.census_missing.take().unwrap_or_else(|| {
                    "no type census: the target was gone before its objects could be read".into()
                }));
        }
        meta.notes.extend(w.interrupts.note());
        meta.notes.extend(self.throttle_note());
        if let Some(why) = &self.tracer.deaths_unavailable {
            meta.notes
                .push(format!("how the target dies cannot be named: {why}"));
        }
        Ok(meta)
    }

    /// How the target ended, and what the figures mean for it.
    fn end_in_words(&self, death: &Option<Death>, why: &str) -> String {
        let end = match (death, self.finalized_at) {
            (Some(d), None) if d.cause != Cause::Exit => {
                format!("{}; figures are what was live when it died", d.describe())
            }
            (Some(d), _) => d.describe(),
            (None, _) => why.to_string(),
        };
        match self.finalized_at {
            Some(t) => format!(
                "{end}; figures are as of interpreter shutdown (Py_FinalizeEx at {t:.1} s), before \
                 teardown freed module globals"
            ),
            None => end,
        }
    }

    /// Writes the capture's last records (`-o`); a failure becomes a note.
    fn finish_capture(&mut self, meta: &mut ReportMeta) {
        let Some(w) = self.capture.take() else {
            return;
        };
        let live = self.tracer.live_table().unwrap_or_else(|e| {
            log::warn!("reading live blocks for the capture: {e}");
            Vec::new()
        });
        let path = self
            .opts
            .capture
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        match w.finish(&self.heap, meta, &live) {
            Ok(size) => eprintln!(
                "leaktrace: capture written to {} ({}); render it with `leaktrace report {}`",
                path.display(),
                human_bytes(size),
                path.display()
            ),
            Err(e) => {
                eprintln!("leaktrace: {e}");
                meta.notes.push(e.to_string());
            }
        }
    }
}
