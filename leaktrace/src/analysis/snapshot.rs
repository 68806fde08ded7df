//! `leaktrace snapshot`: the live small Python objects of a running process by type, read from
//! outside — pymalloc's pools found in its memory and walked (stacks/python/pools.rs), every
//! block's type checked (stacks/python/objects.rs) — and the objects the cyclic collector tracks
//! outside the pools, found by following its lists out of them (stacks/python/gc_lists.rs). No
//! probe, no ptrace, nothing loaded into the target: objects allocated before leaktrace came are
//! counted too. Objects over 512 B that the collector does not track (str, bytes, int) live in
//! malloc's heap: its chunks are walked from outside too (process/malloc_heap.rs), glibc's only.

use std::fmt::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::census::{Census, HeapObjects, TypeCensus};
use super::why::{self, Target, Why};
use crate::error::{Error, Result};
use crate::process::freeze::Frozen;
use crate::process::python;
use crate::process::Process;
use crate::stacks::python::objects::TypeReader;
use crate::stacks::python::PythonProcess;
use crate::units::group;

/// One snapshot, or the growth between the first and the last of several.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub pid: u32,
    /// `3.11.7` (or `3.12` when the interpreter's file gives no patch level).
    pub python: String,
    /// How many snapshots were taken, and the seconds from the first to the last.
    pub snapshots: u32,
    pub span_s: f64,
    /// Seconds the last walk took (the target ran meanwhile, unless frozen).
    pub walk_s: f64,
    /// `--freeze`: the longest time the target was held stopped for a walk; `None` without
    /// it, or when the target was stopped already by someone else (then left as it was).
    pub frozen_s: Option<f64>,
    /// pymalloc pools walked in the last snapshot.
    pub pools: u64,
    /// Objects the collector tracks outside the pools (over 512 B, or from another allocator),
    /// found through its lists in the last snapshot; they are in the census too.
    pub outside_pools: OutsidePools,
    /// Objects the collector does not track over 512 B, found in malloc's heaps in the last
    /// snapshot; they are in the census too.
    pub malloc_heap: HeapObjects,
    pub census: TypeCensus,
    /// leaktrace's own peak resident set, in bytes, when the snapshot was done.
    pub peak_rss_bytes: Option<u64>,
    /// `--why`: reference chains from the roots to a few objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<Why>,
}

/// What following the collector's lists out of the pools found (stacks/python/gc_lists.rs).
#[derive(Debug, Default, Serialize)]
pub struct OutsidePools {
    pub objects: u64,
    pub bytes: u64,
    /// List heads passed through (a handful per interpreter).
    pub list_heads: u64,
    /// Nodes that could not be read or were no object (torn reads of a running target).
    pub skipped: u64,
}

/// Takes `count` snapshots of `pid`, `interval` apart: counts per type in the last, growth
/// since the first.
/// With `freeze`, the target is stopped for each walk (process/freeze.rs).
/// With `why`, the last snapshot also searches for the reference chains to a few objects of
/// that type or address (analysis/why.rs), in the same pause when frozen.
pub fn take(
    pid: u32,
    count: u32,
    interval: Duration,
    freeze: bool,
    why: Option<(&Target, usize)>,
) -> Result<Snapshot> {
    let proc = Process::open(pid)?;
    // Whatever failed while the process went away failed because it did.
    take_from(&proc, count, interval, freeze, why).map_err(|e| match proc.alive() {
        true => e,
        false => Error::NoSuchProcess(pid),
    })
}

fn take_from(
    proc: &Process,
    count: u32,
    interval: Duration,
    freeze: bool,
    why: Option<(&Target, usize)>,
) -> Result<Snapshot> {
    let pid = proc.pid;
    let modules = proc.module_map()?;
    let info = python::detect(pid, &modules, proc.exe().as_deref()).ok_or(Error::NotPython(
        pid,
        ": a snapshot reads Python objects; `leaktrace attach` traces any process's allocations",
    ))?;
    let py = PythonProcess::new(pid, &info, &modules)?;
    let type_type = py
        .type_type
        .ok_or_else(|| Error::PythonLayout(format!("{}: no PyType_Type symbol", info.module)))?;
    let mut reader = TypeReader::new(pid, type_type, py.layout.version);
    reader.qualify = true;
    let start = Instant::now();
    let mut first: Option<Census> = None;
    let mut last = Walked::default();
    let mut last_start = start;
    let mut frozen_s: Option<f64> = None;
    let mut answer = None;
    for i in 0..count.max(1) {
        if i > 0 {
            std::thread::sleep(interval);
        }
        if !proc.alive() {
            return Err(Error::NoSuchProcess(pid));
        }
        let held = if freeze { Frozen::stop(pid)? } else { None };
        last_start = Instant::now();
        last = walk(&mut reader, pid);
        if let (Some((target, samples)), true) = (why, i + 1 == count.max(1)) {
            answer = Some(why::search(&py, target, samples)?);
        }
        if let Some(h) = held {
            let s = h.thaw();
            frozen_s = Some(frozen_s.map_or(s, |m: f64| m.max(s)));
        }
        if first.is_none() {
            first = Some(last.census.clone());
        }
    }
    // A process that exited during the walk left only part of its heap to read.
    if !proc.alive() {
        return Err(Error::NoSuchProcess(pid));
    }
    // From the first walk's start to the last's: growth per second, the search left out.
    let span_s = (last_start - start).as_secs_f64();
    let since = (count > 1).then(|| format!("the first snapshot, {span_s:.1} s before"));
    let base = first.as_ref().filter(|_| count > 1).map(|c| (0.0, c));
    Ok(Snapshot {
        pid,
        python: version_of(&info),
        snapshots: count.max(1),
        span_s,
        walk_s: last.walk_s,
        frozen_s,
        pools: last.pools,
        outside_pools: last.outside,
        census: TypeCensus::of(&last.census, base, since),
        malloc_heap: last.heap,
        peak_rss_bytes: Process::open(std::process::id())
            .ok()
            .and_then(|me| me.peak_rss_bytes()),
        why: answer,
    })
}

/// One walk of the target's heap.
#[derive(Default)]
struct Walked {
    census: Census,
    pools: u64,
    walk_s: f64,
    outside: OutsidePools,
    heap: HeapObjects,
}

/// Counts `pid`'s live objects: pymalloc's pools, the collector's lists out of them, malloc's
/// heaps.
fn walk(reader: &mut TypeReader, pid: u32) -> Walked {
    let t = Instant::now();
    let mut census = Census::default();
    let (pools, found) = census.add_pools_and_gc(reader, pid);
    let heap = census.add_malloc_heap(reader, pid, &found.nodes);
    Walked {
        census,
        pools,
        walk_s: t.elapsed().as_secs_f64(),
        outside: OutsidePools {
            objects: found.objects.len() as u64,
            bytes: found.objects.iter().map(|(_, b)| b).sum(),
            list_heads: found.heads,
            skipped: found.skipped,
        },
        heap,
    }
}

/// `3.11.7`, or `3.12` when the interpreter's file gives no patch level (255).
fn version_of(info: &python::PythonInfo) -> String {
    match info.version {
        Some((a, b, c)) if c != 255 => format!("{a}.{b}.{c}"),
        Some((a, b, _)) => format!("{a}.{b}"),
        None => "3".into(),
    }
}

/// The snapshot as a table: the `top` types, by growth when there is one, else by bytes.
pub fn render(s: &Snapshot, top: usize) -> String {
    let c = &s.census;
    let mut o = String::new();
    let stopped = match s.frozen_s {
        Some(f) => format!("with the target stopped for {f:.2} s (--freeze)"),
        None => "without stopping the target".into(),
    };
    let out = &s.outside_pools;
    let _ = writeln!(
        o,
        "leaktrace snapshot — pid {} (Python {}): {} live objects — those in {} pymalloc pools \
         (≤ 512 B), and {} the collector tracks outside them ({} B) — read in {:.2} s {stopped}",
        s.pid,
        s.python,
        group(c.objects),
        group(s.pools),
        group(out.objects),
        group(out.bytes),
        s.walk_s
    );
    let h = &s.malloc_heap;
    let _ = writeln!(
        o,
        "  and {} objects over 512 B that the collector does not track (str, bytes, int), \
         {} B, in malloc's heap ({} chunks in {} arenas and {} mmapped); {} blocks hold no \
         object, {} pools skipped as torn, {} collector-list nodes skipped (unreadable, or \
         stale links), {} malloc heaps left part-way",
        group(h.objects),
        group(h.bytes),
        group(h.chunks),
        group(h.arenas),
        group(h.mmapped),
        group(c.not_objects),
        group(c.torn_pools),
        group(out.skipped),
        group(h.torn)
    );
    let growth = s.snapshots > 1;
    if growth {
        let _ = writeln!(
            o,
            "  growth over {} snapshots, {:.1} s apart in all",
            s.snapshots, s.span_s
        );
    }
    let _ = writeln!(o);
    if growth {
        let _ = writeln!(
            o,
            "{:>12} {:>12} {:>14}  TYPE",
            "GROWTH", "OBJECTS", "BYTES"
        );
    } else {
        let _ = writeln!(o, "{:>12} {:>14}  TYPE", "OBJECTS", "BYTES");
    }
    let mut types: Vec<_> = c.types.iter().collect();
    if !growth {
        types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    }
    for t in types.into_iter().take(top) {
        if growth {
            let _ = writeln!(o, "{}", t.growth_row());
        } else {
            let _ = writeln!(
                o,
                "{:>12} {:>14}  {}",
                group(t.count),
                group(t.bytes),
                t.name
            );
        }
    }
    if let Some(w) = &s.why {
        o.push_str(&why::render(w));
        // A type name the census never saw is more likely misspelt than held by C code.
        let a_type = w
            .target
            .parse::<Target>()
            .is_ok_and(|t| matches!(t, Target::Type(_)));
        if w.chains.is_empty() && a_type && !c.types.iter().any(|t| why::names(&t.name, &w.target))
        {
            let _ = writeln!(
                o,
                "  (and no object of type {} is in this snapshot's census at all: is the name \
                 written as the TYPE column writes it?)",
                w.target
            );
        }
    }
    o
}
