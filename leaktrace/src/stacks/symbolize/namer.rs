//! Naming frames on a thread of its own. A report queues every frame it will show before it
//! resolves the first, so the thread reads and inflates debug information (libc's compressed
//! debug file, libpython's DWARF) while the report is being built.
//!
//! Frames are not named as soon as they are placed, while the target runs: that was measured
//! (BENCHMARKS.md, 2026-12-03) to shorten a sampled `run`'s report by 40–50 ms, at 35–40 MB
//! more peak memory (every sampled stack's modules read, not the reported ones'), and a
//! production tracer that reads all of a large library's DWARF (PyTorch's) because one sample
//! went through it is worse off.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer as Blazesym};

use super::Frame;

/// A frame's place: its module as the process names it, and the offset in that file.
pub(super) type Key = (Arc<str>, u64);

/// What symbolization tells of a frame.
#[derive(Clone, Debug, Default)]
pub(super) struct Named {
    function: Option<Arc<str>>,
    function_offset: u64,
    file: Option<Arc<str>>,
    line: Option<u32>,
    inlined: Vec<Arc<str>>,
}

impl Named {
    /// Writes the names into a frame placed at the same spot.
    pub(super) fn apply(&self, frame: &mut Frame) {
        frame.function.clone_from(&self.function);
        frame.function_offset = self.function_offset;
        frame.file.clone_from(&self.file);
        frame.line = self.line;
        frame.inlined.clone_from(&self.inlined);
    }
}

/// One frame to name: where to open its file, with which debug directories.
pub(super) struct Job {
    pub key: Key,
    pub host: PathBuf,
    pub debug_dirs: Arc<[PathBuf]>,
    /// The file offset looked up: the call instruction's, just before the return address.
    pub lookup: u64,
}

/// The naming thread and what it sent back. blazesym's symbolizer is not `Send`, so it lives on
/// that thread, which builds it.
pub(super) struct Namer {
    jobs: Option<Sender<Job>>,
    named: Receiver<(Key, Named)>,
    /// Frames sent to the thread.
    queued: HashSet<Key>,
    /// The thread is gone (it could not start, or blazesym panicked): frames stay unnamed.
    gone: bool,
}

impl Namer {
    /// Starts the naming thread.
    pub(super) fn start() -> Self {
        let (jobs, rx) = channel::<Job>();
        let (tx, named) = channel();
        let started = std::thread::Builder::new()
            .name("leaktrace-names".into())
            .spawn(move || serve(rx, tx));
        if let Err(e) = &started {
            log::warn!("no thread to name native frames: {e}");
        }
        Self {
            jobs: started.is_ok().then_some(jobs),
            named,
            queued: HashSet::new(),
            gone: started.is_err(),
        }
    }

    /// Queues a frame to be named, once.
    pub(super) fn queue(&mut self, job: Job) {
        if self.gone || !self.queued.insert(job.key.clone()) {
            return;
        }
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            self.thread_gone();
        }
    }

    /// Moves every name the thread has sent so far into `into`.
    pub(super) fn collect(&mut self, into: &mut HashMap<Key, Named>) {
        while let Ok((k, n)) = self.named.try_recv() {
            into.insert(k, n);
        }
    }

    /// Waits until the queued frame at `key` is named, keeping its names and those that come
    /// before them in `into`; `None` if the thread is gone.
    pub(super) fn wait_for(&mut self, key: &Key, into: &mut HashMap<Key, Named>) -> Option<()> {
        if into.contains_key(key) {
            return Some(());
        }
        while !self.gone {
            match self.named.recv() {
                Ok((k, n)) => {
                    let found = k == *key;
                    into.insert(k, n);
                    if found {
                        return Some(());
                    }
                }
                Err(_) => self.thread_gone(),
            }
        }
        None
    }

    fn thread_gone(&mut self) {
        if !self.gone {
            log::warn!("the thread naming native frames ended: frames from now on stay unnamed");
        }
        self.gone = true;
        self.jobs = None;
    }
}

/// The naming thread: names each job in turn until the symbolizer is dropped.
fn serve(jobs: Receiver<Job>, named: Sender<(Key, Named)>) {
    let mut dirs: Option<Arc<[PathBuf]>> = None;
    let mut blazesym = Blazesym::new();
    for job in jobs {
        // blazesym's debug directories are fixed when it is built.
        if dirs.as_ref() != Some(&job.debug_dirs) {
            blazesym = Blazesym::builder()
                .set_debug_dirs(Some(&*job.debug_dirs))
                .build();
            dirs = Some(job.debug_dirs.clone());
        }
        let n = name(&blazesym, &job.host, job.lookup);
        if named.send((job.key, n)).is_err() {
            return;
        }
    }
}

/// Function, file and line at `lookup` in the file at `host` (nothing where it cannot be read).
fn name(blazesym: &Blazesym, host: &Path, lookup: u64) -> Named {
    let mut named = Named::default();
    let src = Source::Elf(Elf::new(host));
    let Ok(syms) = blazesym.symbolize(&src, Input::FileOffset(&[lookup])) else {
        return named;
    };
    let Some(Symbolized::Sym(sym)) = syms.first() else {
        return named;
    };
    named.function = Some(Arc::from(&*sym.name));
    // blazesym gives a function whose code lies in several ranges (split into hot and `.cold`
    // parts, as distributions' LTO builds do) start address 0, and so an offset that is the
    // address itself: that offset is not known.
    named.function_offset = if sym.addr == 0 {
        0
    } else {
        sym.offset as u64 + 1
    };
    // The line is where the code is: in the innermost inlined function when there is one
    // (blazesym gives `sym.code_info` as the outer function's call into the inlined chain, and
    // each inlined function's own location in its entry), so it goes with the name the report
    // shows first.
    let code_info = match sym.inlined.last() {
        Some(inner) => inner.code_info.as_ref(),
        None => sym.code_info.as_deref(),
    };
    if let Some(ci) = code_info {
        let file = match &ci.dir {
            Some(d) => d.join(&*ci.file).to_string_lossy().into_owned(),
            None => ci.file.to_string_lossy().into_owned(),
        };
        named.file = Some(file.into());
        named.line = ci.line;
    }
    named.inlined = sym.inlined.iter().map(|i| Arc::from(&*i.name)).collect();
    named
}
