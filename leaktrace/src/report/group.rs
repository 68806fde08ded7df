//! Which kernel sites are one report line: sites whose shown stacks are the same, and sites
//! whose stack copy never came folded into the fuller path they begin.

use std::collections::{HashMap, HashSet};

use super::{family_name, PythonStatus, SiteReport};
use crate::analysis::classify::{classify, Verdict};
use crate::heap::{Heap, Site};
use crate::stacks::merge::{merge, StackEntry};
use crate::stacks::native::UnwindEnd;
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::{Frame, FrameSource};

/// What makes two kernel sites the same in a report: process, allocator, and the frames the
/// report shows (every frame with `--native-frames all`) — native ones by return address, which
/// within one process is the same code. Two paths that differ only in hidden interpreter frames
/// (a call the adaptive interpreter specialized after a few runs) are one report line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StackKey {
    pid: u32,
    func: u8,
    frames: Vec<KeyFrame>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum KeyFrame {
    Native(u64),
    Python(PyFrame),
}

/// A site's merged stack (frames placed, not yet named).
fn merged(site: &Site, sym: &mut dyn FrameSource, interpreter: Option<&str>) -> Vec<StackEntry> {
    let native: Vec<Frame> = site
        .native
        .iter()
        .zip(&site.native_eval)
        .map(|(pc, eval)| Frame {
            eval: *eval,
            ..sym.return_address(site.pid, *pc)
        })
        .collect();
    merge(&native, &site.python, &site.python_entry, interpreter)
}

impl StackKey {
    fn of(site: &Site, stack: &[StackEntry], all: bool) -> StackKey {
        StackKey {
            pid: site.pid,
            func: site.func as u8,
            // Collected from a borrow: collecting from the owned stack would keep its (much
            // larger) buffer alive in every key.
            frames: stack
                .iter()
                .filter(|e| all || !e.hidden())
                .map(|e| match e {
                    StackEntry::Native { frame, .. } => KeyFrame::Native(frame.address),
                    StackEntry::Python { frame } => KeyFrame::Python(frame.clone()),
                })
                .collect(),
        }
    }
}

/// Kernel sites with the same stack, and what sorting them needs. Only the groups a report
/// keeps get their stacks merged again and named: a busy process has thousands.
pub(super) struct Group<'a> {
    pub(super) sites: Vec<&'a Site>,
    /// The fullest record, which stands for the group.
    pub(super) best: &'a Site,
    pub(super) unfreed_bytes: u64,
    pub(super) analysis: Verdict,
}

impl<'a> Group<'a> {
    /// `sampled`: the sites' figures move only when a sample lands (`classify::sampled`).
    fn of(sites: Vec<&'a Site>, sampled: bool) -> Self {
        let best = *sites
            .iter()
            .max_by_key(|s| {
                (
                    s.native_end == UnwindEnd::Complete,
                    s.native.len(),
                    s.python_status.is_some(),
                    std::cmp::Reverse(s.id),
                )
            })
            .expect("groups are not empty");
        // The kernel site holding the most speaks for the line; growth adds up.
        let main = sites
            .iter()
            .max_by_key(|s| (s.stats.live_bytes, std::cmp::Reverse(s.id)))
            .expect("groups are not empty");
        let mut analysis = classify(&main.trend, &main.stats);
        if sampled {
            analysis = crate::analysis::classify::sampled(analysis, &main.trend);
        }
        analysis.growth_bytes_per_s = sites.iter().map(|s| s.trend.slope()).sum::<f64>().round();
        Group {
            unfreed_bytes: sites
                .iter()
                .fold(0u64, |a, s| a.wrapping_add(s.stats.live_bytes)),
            sites,
            best,
            analysis,
        }
    }

    pub(super) fn sum(&self, f: fn(&Site) -> u64) -> u64 {
        self.sites
            .iter()
            .map(|s| f(s))
            .fold(0u64, u64::wrapping_add)
    }
}

impl SiteReport {
    /// One report line from a group of kernel sites with the same stack.
    pub(super) fn of(g: Group<'_>, sym: &mut dyn FrameSource, interpreter: Option<&str>) -> Self {
        let b = g.best;
        let stack = merged(b, sym, interpreter);
        SiteReport {
            id: format!("{:016x}", b.id),
            pid: b.pid,
            allocator: b.func.label().to_string(),
            family: family_name(b.func.family()).to_string(),
            unfreed_bytes: g.unfreed_bytes,
            unfreed_count: g.sum(|s| s.stats.live_count),
            allocs: g.sum(|s| s.stats.allocs),
            alloc_bytes: g.sum(|s| s.stats.alloc_bytes),
            frees: g.sum(|s| s.stats.frees),
            kernel_sites: g.sites.len(),
            caller: Frame {
                address: b.caller,
                ..Frame::default()
            },
            native_stack: stack
                .iter()
                .filter_map(|e| match e {
                    StackEntry::Native { frame, .. } => Some(frame.clone()),
                    StackEntry::Python { .. } => None,
                })
                .collect(),
            stack,
            native_unwind: b.native_end,
            python_stack: b.python.iter().rev().cloned().collect(),
            python_status: PythonStatus::from_kernel(b.python_status),
            python_truncated: b.python_truncated,
            analysis: g.analysis,
            types: Vec::new(),
            kernel_site_ids: g.sites.iter().map(|s| s.id).collect(),
        }
    }
}

/// A site's process, allocator and Python stack: what a partial stack must share with the
/// fuller one it folds into.
type PythonPath<'a> = (u32, u8, &'a [PyFrame]);

/// The distinct whole native paths of each Python stack, by their first frame, freed ones
/// included: a path whose blocks were all freed still shares the early blocks of a site whose
/// id was cut short.
fn whole_paths(heap: &Heap) -> HashMap<(PythonPath<'_>, u64), HashSet<&[u64]>> {
    let mut distinct: HashMap<(PythonPath<'_>, u64), HashSet<&[u64]>> = HashMap::new();
    for s in heap.sites().filter(|s| !s.native_end.is_partial()) {
        let Some(first) = s.native.first() else {
            continue;
        };
        distinct
            .entry(((s.pid, s.func as u8, s.python.as_slice()), *first))
            .or_default()
            .insert(s.native.as_slice());
    }
    distinct
}

/// How many of `paths` begin with `native`.
fn paths_beginning(
    paths: &HashMap<(PythonPath<'_>, u64), HashSet<&[u64]>>,
    python: PythonPath<'_>,
    native: &[u64],
) -> usize {
    let Some(first) = native.first() else {
        return 0;
    };
    paths
        .get(&(python, *first))
        .map_or(0, |p| p.iter().filter(|n| n.starts_with(native)).count())
}

/// The live sites of `heap` grouped into report lines (`all`: every native frame counts).
pub(super) fn group<'a>(
    heap: &'a Heap,
    sym: &mut dyn FrameSource,
    interpreter: Option<&str>,
    all: bool,
    sampled: bool,
) -> Vec<Group<'a>> {
    let mut groups: HashMap<StackKey, Vec<&Site>> = HashMap::new();
    for s in heap
        .sites()
        .filter(|s| s.stats.live_bytes > 0 && s.stats.live_bytes < (1 << 62))
    {
        let key = StackKey::of(s, &merged(s, sym, interpreter), all);
        groups.entry(key).or_default().push(s);
    }
    // The same grouping live and from a capture: nothing below may depend on hash order.
    for g in groups.values_mut() {
        g.sort_unstable_by_key(|s| s.id);
    }
    // A site whose stack copy never came knows only the frames the kernel walked: when a
    // site with the same Python stack extends them, it is the same call path, seen before
    // its rows were learned.
    // Candidates are looked up by process, allocator and Python stack: a scan of every group
    // for each partial one took minutes with hundreds of thousands of sites (PyTorch's import).
    let mut by_python: HashMap<PythonPath<'_>, Vec<(&StackKey, &'a Site)>> = HashMap::new();
    for (k, g) in &groups {
        if let Some(q) = g.first() {
            by_python
                .entry((q.pid, q.func as u8, q.python.as_slice()))
                .or_default()
                .push((k, *q));
        }
    }
    let paths = whole_paths(heap);
    let mut moves: Vec<(StackKey, StackKey)> = Vec::new();
    for (k, g) in &groups {
        if !g.iter().all(|s| s.native_end.is_partial()) {
            continue;
        }
        let Some(p) = g.first() else { continue };
        // A site whose id the kernel cut at an untaught frame and whose stack copies took
        // several paths (`unlearned`, `sampler_frames_only`) holds blocks of more than one
        // path: it stays apart.
        if g.iter().any(|s| s.native_end.shares_paths()) {
            continue;
        }
        let python = (p.pid, p.func as u8, p.python.as_slice());
        let candidates = by_python.get(&python);
        let fuller = || {
            candidates.into_iter().flatten().filter(|(o, q)| {
                *o != k && q.native.len() > p.native.len() && q.native.starts_with(&p.native)
            })
        };
        // Frames of an in-process sampler alone (captures written before the kernel said
        // which ids it cut) may stand for every sampled path under the Python stack: such a
        // site folds only into the one path through them.
        let sampler_only = sym.all_in_sampler(p.pid, &p.native);
        if sampler_only && paths_beginning(&paths, python, &p.native) != 1 {
            continue;
        }
        // The fullest path it begins, the lowest site id among equals.
        let target = fuller().max_by_key(|(_, q)| (q.native.len(), std::cmp::Reverse(q.id)));
        if let Some((t, _)) = target {
            moves.push((k.clone(), (*t).clone()));
        }
    }
    drop(by_python);
    // A target that is partial too goes on to its own target: follow the chain to its end (it
    // ends: each step is a longer native stack).
    let next: HashMap<StackKey, StackKey> = moves.iter().cloned().collect();
    for (k, mut t) in moves {
        while let Some(further) = next.get(&t) {
            t = further.clone();
        }
        let moved = groups.remove(&k).unwrap_or_default();
        groups.entry(t).or_default().extend(moved);
    }
    groups
        .into_values()
        .map(|mut g| {
            g.sort_unstable_by_key(|s| s.id);
            Group::of(g, sampled)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::native::NativeStack;
    use crate::stacks::symbolize::Symbolizer;
    use leaktrace_ebpf::{AllocFn, SiteStats};

    /// Sites whose stack copy never came (the kernel's few frames) fold into the site whose
    /// fuller stack they begin, through a chain of such sites; a site of another process or
    /// allocator does not.
    #[test]
    fn partial_stacks_fold_into_the_path_they_begin() {
        let mut heap = Heap::default();
        let mut sym = Symbolizer::new();
        let pid = 4_194_301;
        let sites: [(u64, AllocFn, &[u64], UnwindEnd); 4] = [
            (1, AllocFn::Malloc, &[0x10], UnwindEnd::NoStackCopy),
            (2, AllocFn::Malloc, &[0x10, 0x20], UnwindEnd::NoStackCopy),
            (3, AllocFn::Malloc, &[0x10, 0x20, 0x30], UnwindEnd::Complete),
            (4, AllocFn::Calloc, &[0x10], UnwindEnd::NoStackCopy),
        ];
        let mut stats = Vec::new();
        for (id, func, pcs, end) in sites {
            heap.announce(id, pid, func, pcs[0], None);
            let stack = NativeStack {
                pcs: pcs.to_vec(),
                eval: vec![false; pcs.len()],
                end,
            };
            heap.set_native(&mut sym, id, &stack);
            stats.push((
                id,
                SiteStats {
                    live_bytes: 100 * id,
                    live_count: 1,
                    tgid: pid,
                    func: func as u8,
                    caller: pcs[0],
                    ..SiteStats::default()
                },
            ));
        }
        heap.update(&mut sym, stats);
        let mut groups = group(&heap, &mut sym, None, false, false);
        groups.sort_by_key(|g| g.unfreed_bytes);
        let bytes: Vec<u64> = groups.iter().map(|g| g.unfreed_bytes).collect();
        assert_eq!(
            bytes,
            vec![400, 600],
            "1 and 2 fold into 3; calloc's stays apart"
        );
    }

    /// Places addresses below 0x100 in the preloaded sampler, the others in a program.
    struct SamplerBelow100;

    impl FrameSource for SamplerBelow100 {
        fn return_address(&mut self, _pid: u32, addr: u64) -> Frame {
            let module = if addr < 0x100 {
                "/var/lib/leaktrace/libleaktrace_preload-0.1.0-0.so"
            } else {
                "/usr/lib/program.so"
            };
            Frame {
                address: addr,
                module: Some(module.into()),
                ..Frame::default()
            }
        }
        fn resolve(&mut self, _pid: u32, _frame: &mut Frame) {}
    }

    /// A sampled site the kernel followed only through the sampler's frames stands for every
    /// path under its Python stack: it folds into the only one, and stays apart among several
    /// (not into the longest of them).
    #[test]
    fn a_partial_stack_of_sampler_frames_alone_folds_only_into_the_one_path() {
        let two_paths: &[(u64, &[u64], UnwindEnd)] = &[
            (1, &[0x10], UnwindEnd::NoStackCopy),
            (2, &[0x10, 0x20, 0x300, 0x400], UnwindEnd::Complete),
            (3, &[0x10, 0x20, 0x500, 0x600], UnwindEnd::Complete),
            (4, &[0x10, 0x20, 0x300], UnwindEnd::NoStackCopy),
        ];
        assert_eq!(
            sampled_groups(two_paths),
            vec![1000, 3000, 6000],
            "4 folds into 2; 1 stays apart"
        );
        assert_eq!(
            sampled_groups(&two_paths[..2]),
            vec![3000],
            "1 folds into 2"
        );
        let one_freed: &[(u64, &[u64], UnwindEnd)] = &[
            (1, &[0x10], UnwindEnd::NoStackCopy),
            (2, &[0x10, 0x20, 0x300, 0x400], UnwindEnd::Complete),
            (10, &[0x10, 0x20, 0x500, 0x600], UnwindEnd::Complete),
        ];
        assert_eq!(
            sampled_groups(one_freed),
            vec![1000, 2000],
            "a path whose blocks were all freed is a path too"
        );
    }

    /// A site whose id the kernel cut and whose copies took several paths (`unlearned`, or
    /// `sampler_frames_only`) never folds, not even into the one whole path known to begin
    /// with its frames: its blocks came by other paths too.
    #[test]
    fn a_site_known_to_mix_paths_never_folds() {
        let sites: &[(u64, &[u64], UnwindEnd)] = &[
            (1, &[0x110], UnwindEnd::Unlearned),
            (2, &[0x110, 0x120, 0x300, 0x400], UnwindEnd::Complete),
            (3, &[0x110, 0x120, 0x500, 0x600], UnwindEnd::Complete),
            (4, &[0x210], UnwindEnd::Unlearned),
            (5, &[0x210, 0x220], UnwindEnd::Complete),
            (6, &[0x10], UnwindEnd::SamplerFramesOnly),
            (7, &[0x10, 0x230], UnwindEnd::Complete),
        ];
        assert_eq!(
            sampled_groups(sites),
            vec![1000, 2000, 3000, 4000, 5000, 6000, 7000],
            "nothing folds"
        );
        let as_no_copy: Vec<(u64, &[u64], UnwindEnd)> = sites[..3]
            .iter()
            .map(|&(id, pcs, end)| match end {
                UnwindEnd::Unlearned => (id, pcs, UnwindEnd::NoStackCopy),
                other => (id, pcs, other),
            })
            .collect();
        assert_eq!(
            sampled_groups(&as_no_copy),
            vec![3000, 3000],
            "a site whose copy never came folds into the longest path it begins (lowest id)"
        );
    }

    /// The live bytes of the report lines of in-process sampled sites (pcs below 0x100 are the
    /// sampler's), smallest first; site `id` holds 1000 × `id` bytes, none from 10 on.
    fn sampled_groups(sites: &[(u64, &[u64], UnwindEnd)]) -> Vec<u64> {
        let mut heap = Heap::default();
        let mut sym = SamplerBelow100;
        let mut placing = Symbolizer::new();
        let pid = 4_194_301;
        let mut stats = Vec::new();
        for &(id, pcs, end) in sites {
            heap.announce(id, pid, AllocFn::UsdtAlloc, pcs[0], None);
            let stack = NativeStack {
                pcs: pcs.to_vec(),
                eval: vec![false; pcs.len()],
                end,
            };
            heap.set_native(&mut placing, id, &stack);
            let func = AllocFn::UsdtAlloc as u8;
            let live_bytes = if id < 10 { 1000 * id } else { 0 };
            let s = SiteStats {
                live_bytes,
                live_count: 1,
                tgid: pid,
                func,
                caller: pcs[0],
                ..SiteStats::default()
            };
            stats.push((id, s));
        }
        heap.update(&mut placing, stats);
        let mut groups = group(&heap, &mut sym, None, true, false);
        groups.sort_by_key(|g| g.unfreed_bytes);
        groups.iter().map(|g| g.unfreed_bytes).collect()
    }
}
