//! The session's type censuses and the interpreter's lifecycle points they hang on: the baseline
//! when the main module starts (`run`: the child is paused there, so nothing the program made is
//! in it and nothing of start-up is outside it, however long start-up took), and the end census at
//! interpreter shutdown, while every object is intact.

use leaktrace_ebpf::{AllocFn, TARGET_FROZEN, TARGET_MAIN_STARTED, TARGET_PAUSE_SENT};

use super::{Session, TraceMode};
use crate::analysis::census::Census;
use crate::error::Result;
use crate::events::EventReader;
use crate::probes::plan::Lifecycle;
use crate::report::AtFinalize;
use crate::stacks::python::objects::TypeReader;

impl Session<'_> {
    /// Counts the target's live Python objects by type (`None` for growth mode, a process that
    /// is not Python, or an interpreter without `PyType_Type`).
    pub(super) fn take_census(&mut self) -> Option<Census> {
        if let TraceMode::Growth { .. } = self.opts.mode {
            return None;
        }
        let py = self.py.as_ref()?;
        let started = std::time::Instant::now();
        let mut reader = TypeReader::new(self.proc.pid, py.type_type?, py.layout.version);
        let live = match self.tracer.live_blocks(self.proc.pid) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("reading live blocks for the type census: {e}");
                return None;
            }
        };
        let (arenas, blocks): (Vec<_>, Vec<_>) = live
            .into_iter()
            .partition(|b| b.func == Some(AllocFn::PyArenaAlloc));
        let blocks: Vec<(u64, u64, u64)> =
            blocks.iter().map(|b| (b.addr, b.size, b.site)).collect();
        let mut census = Census::take(&mut reader, &blocks);
        if !self.opts.families.python_calls() {
            // Small objects are not traced one by one: find them in pymalloc's pools, each
            // credited to the traced arena it lies in (site 0: an arena made before tracing).
            let mut arenas: Vec<(u64, u64, u64)> =
                arenas.iter().map(|a| (a.addr, a.size, a.site)).collect();
            arenas.sort_unstable();
            let site_of = |pool: u64| {
                let i = arenas.partition_point(|a| a.0 <= pool);
                i.checked_sub(1)
                    .map(|i| arenas[i])
                    .filter(|a| pool < a.0 + a.1)
                    .map_or(0, |a| a.2)
            };
            census.add_pools(&mut reader, self.proc.pid, site_of);
        }
        if self.opts.verbose {
            eprintln!(
                "leaktrace: type census: {} objects read in {:.3} s",
                census.by_type.values().map(|(n, _)| n).sum::<u64>(),
                started.elapsed().as_secs_f64()
            );
        }
        Some(census)
    }

    /// The target's RSS and pymalloc arenas now.
    fn memory_now(&self) -> AtFinalize {
        AtFinalize {
            rss_bytes: self.proc.rss_bytes(),
            arena_bytes: self.py.as_ref().and_then(|py| py.arena_bytes()),
        }
    }

    /// The target's interpreter reached a lifecycle point (its record on the ring buffer).
    pub(super) fn lifecycle(&mut self, kind: Lifecycle) {
        let t = self.start.elapsed().as_secs_f64();
        match kind {
            Lifecycle::MainStart => {
                self.main_at.get_or_insert(t);
            }
            Lifecycle::Finalize => {
                if self.finalized_at.is_some() {
                    return;
                }
                self.finalized_at = Some(t);
                self.at_finalize = Some(self.memory_now());
                self.read_throttle();
                if self.opts.verbose {
                    eprintln!("leaktrace: interpreter shutdown began; accounting frozen");
                }
                if self.paused.is_none() && self.census_end.is_none() {
                    // `attach` cannot pause the interpreter: read the objects now, while
                    // shutdown runs its atexit handlers and before it frees module globals.
                    self.census_end = self.take_census();
                    if self.census_end.is_none() {
                        self.census_missing = Some(
                            "no type census: the interpreter was gone before its objects could be \
                             read"
                                .into(),
                        );
                    }
                }
            }
        }
    }

    /// `run`'s child stopped with SIGSTOP: whether the stop is leaktrace's own pause at a
    /// lifecycle point. If it is, what that point needs is done while the child waits: at the
    /// main module's start, the baseline census alone (start-up's new sites are read as tracing
    /// goes on, not while the program waits); at shutdown, every pending record is read and
    /// named while the code objects exist, then the end census.
    pub(super) fn take_pause(&mut self, reader: &mut EventReader) -> Result<bool> {
        let Some(mut taken) = self.paused else {
            return Ok(false);
        };
        let flags = self.tracer.flags(self.proc.pid);
        let t = self.start.elapsed().as_secs_f64();
        // Each point pauses once, in order; its flag is set even when its record was lost.
        if !taken.main && (self.main_at.is_some() || flags & TARGET_MAIN_STARTED != 0) {
            taken.main = true;
            self.paused = Some(taken);
            let at = *self.main_at.get_or_insert(t);
            self.census_base = self.take_census().map(|c| (at, c));
        } else if !taken.finalize && (self.finalized_at.is_some() || flags & TARGET_FROZEN != 0) {
            taken.finalize = true;
            self.paused = Some(taken);
            self.finalized_at.get_or_insert(t);
            if self.at_finalize.is_none() {
                self.at_finalize = Some(self.memory_now());
            }
            self.read_throttle();
            // Stopped where shutdown begins: every object is still intact.
            self.catch_up(reader)?;
            self.census_end = self.take_census();
        } else {
            return Ok(false);
        }
        // Taken (collected by the tracing thread, so a tracer's death now drops the signal):
        // nothing is left for the guardian to lift. Only the paused thread is stopped; no
        // program clears or sets this mark meanwhile.
        if let Err(e) = self.tracer.clear_flags(self.proc.pid, TARGET_PAUSE_SENT) {
            log::warn!("{e}");
        }
        Ok(true)
    }

    /// What the census's growth is measured from, in words.
    pub(super) fn census_baseline(&self) -> String {
        match (&self.census_base, self.paused.is_some()) {
            (Some(_), false) => "when tracing began (small objects: every one then, found in \
                                 pymalloc's pools; larger ones: those allocated since)"
                .into(),
            (Some((t, _)), true) => format!(
                "when the main module started ({t:.1} s into the trace, after the interpreter's \
                 start-up)"
            ),
            (None, false) => {
                "when tracing began (attach counts the objects allocated since)".into()
            }
            (None, true) => "none: the interpreter never entered Py_RunMain (an embedded \
                             interpreter?), so growth counts everything since it started"
                .into(),
        }
    }
}

/// Which of `run`'s pauses have been taken.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Pauses {
    main: bool,
    finalize: bool,
}
