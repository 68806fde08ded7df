//! The live-heap model in userspace: per-site counters read from the kernel each interval, the
//! site identities announced on the ring buffer, and the process-wide time series.

use std::collections::HashMap;

use leaktrace_ebpf::{AllocFn, SiteStats};
use serde::Serialize;

pub mod trend;

use crate::probes::tables::Counters;
use crate::stacks::native::{NativeStack, UnwindEnd};
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::Symbolizer;
use trend::Trend;

/// One allocation site: allocator function, native call path and Python stack.
#[derive(Clone, Debug)]
pub struct Site {
    pub id: u64,
    pub pid: u32,
    pub func: AllocFn,
    pub caller: u64,
    /// The native stack's return addresses, innermost (the allocator's caller) first. Each is
    /// placed in its file by the symbolizer while the process lives (`Symbolizer::place`), so a
    /// site keeps only addresses: thousands of sites share a few thousand frames.
    pub native: Vec<u64>,
    /// Whether each native frame is the interpreter's eval loop.
    pub native_eval: Vec<bool>,
    /// Some native frame was in no mapped file when placed (a module mapped later).
    pub unplaced: bool,
    /// How the native unwind ended.
    pub native_end: UnwindEnd,
    /// The Python stack, innermost first (empty when there was none).
    pub python: Vec<PyFrame>,
    /// Whether each Python frame began a run of the eval loop.
    pub python_entry: Vec<bool>,
    /// How the Python stack was obtained (`leaktrace_ebpf::py_status`); `None` if the site's
    /// announcement was lost.
    pub python_status: Option<u8>,
    pub python_truncated: bool,
    pub stats: SiteStats,
    /// Its live bytes over the trace, one observation per interval.
    pub trend: Trend,
}

/// What the kernel said about a new site's Python stack, decoded.
#[derive(Clone, Debug, Default)]
pub struct PythonStack {
    pub frames: Vec<PyFrame>,
    pub entry: Vec<bool>,
    pub status: u8,
    pub truncated: bool,
}

/// A point of the process-wide time series.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct Sample {
    /// Seconds since tracing began.
    pub t: f64,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub drops: u64,
    pub rss_bytes: Option<u64>,
    /// Memory in pymalloc's arenas (Python targets whose arena count leaktrace can read).
    #[serde(default)]
    pub arena_bytes: Option<u64>,
}

/// Every site seen, and the series.
#[derive(Default)]
pub struct Heap {
    sites: HashMap<u64, Site>,
    series: Vec<Sample>,
}

impl Heap {
    /// Registers a site announced by the kernel (its native stack comes with `set_native`).
    pub fn announce(
        &mut self,
        id: u64,
        pid: u32,
        func: AllocFn,
        caller: u64,
        python: Option<PythonStack>,
    ) {
        let site = self.sites.entry(id).or_insert_with(|| Site {
            id,
            pid,
            func,
            caller,
            native: Vec::new(),
            native_eval: Vec::new(),
            unplaced: false,
            native_end: UnwindEnd::NoStackCopy,
            python: Vec::new(),
            python_entry: Vec::new(),
            python_status: None,
            python_truncated: false,
            stats: SiteStats::default(),
            trend: Trend::default(),
        });
        if let Some(py) = python {
            site.python = py.frames;
            site.python_entry = py.entry;
            site.python_status = Some(py.status);
            site.python_truncated = py.truncated;
        }
    }

    /// The process and native return addresses a site holds (the kernel's walk until a copy
    /// replaces them).
    pub fn native_of(&self, id: u64) -> Option<(u32, &[u64])> {
        self.sites.get(&id).map(|s| (s.pid, s.native.as_slice()))
    }

    /// The allocator function a site was announced with.
    pub fn func(&self, id: u64) -> Option<AllocFn> {
        self.sites.get(&id).map(|s| s.func)
    }

    /// Whether the site already has a native stack from a copy or a whole kernel walk.
    pub fn has_full_native(&self, id: u64) -> bool {
        self.sites
            .get(&id)
            .is_some_and(|s| !s.native_end.is_partial())
    }

    /// Marks a site whose kernel walk ended inside the in-process sampler's frames
    /// (`UnwindEnd::SamplerFramesOnly`, which says so in words).
    pub fn mark_sampler_frames_only(&mut self, id: u64) {
        if let Some(site) = self.sites.get_mut(&id) {
            if site.native_end.shares_paths() {
                site.native_end = UnwindEnd::SamplerFramesOnly;
            }
        }
    }

    /// Gives a site its native stack (unwound from a stack copy, or walked by the kernel) and
    /// places its frames while the process is alive.
    pub fn set_native(&mut self, sym: &mut Symbolizer, id: u64, stack: &NativeStack) {
        let Some(site) = self.sites.get_mut(&id) else {
            return;
        };
        site.native.clone_from(&stack.pcs);
        site.native_eval.clone_from(&stack.eval);
        site.native_end = stack.end;
        site.unplaced = !site.native.iter().all(|pc| sym.place(site.pid, *pc));
    }

    /// Replaces the counters with a fresh read of the kernel's site map. Sites whose
    /// announcement was lost (ring buffer full) are registered from the map's own identity.
    pub fn update(&mut self, sym: &mut Symbolizer, stats: Vec<(u64, SiteStats)>) {
        for (id, s) in stats {
            if s.tgid == 0 {
                continue;
            }
            if !self.sites.contains_key(&id) {
                let func = AllocFn::from_u8(s.func).unwrap_or(AllocFn::Malloc);
                self.announce(id, s.tgid, func, s.caller, None);
                let caller = NativeStack {
                    pcs: vec![s.caller],
                    eval: vec![false],
                    end: UnwindEnd::NoStackCopy,
                };
                self.set_native(sym, id, &caller);
            }
            if let Some(site) = self.sites.get_mut(&id) {
                site.stats = s;
            }
        }
    }

    /// Places frames whose module was not mapped when first seen (call while the process
    /// still has its maps).
    pub fn place_pending(&mut self, sym: &mut Symbolizer) {
        for site in self.sites.values_mut().filter(|s| s.unplaced) {
            site.unplaced = !site.native.iter().all(|pc| sym.place(site.pid, *pc));
        }
    }

    /// Appends a point to the time series from the current counters.
    pub fn sample(
        &mut self,
        t: f64,
        counters: &Counters,
        rss_bytes: Option<u64>,
        arena_bytes: Option<u64>,
    ) -> Sample {
        let (live_bytes, live_count) = self.sites.values().fold((0u64, 0u64), |(b, c), s| {
            (
                b.wrapping_add(s.stats.live_bytes),
                c.wrapping_add(s.stats.live_count),
            )
        });
        let s = Sample {
            t,
            live_bytes,
            live_count,
            allocs: counters.get(leaktrace_ebpf::Counter::Allocs),
            frees: counters.get(leaktrace_ebpf::Counter::Frees),
            drops: counters.drops(),
            rss_bytes,
            arena_bytes,
        };
        self.push_sample(s);
        s
    }

    /// Appends a point to the series, and each site's live bytes at that moment to its trend
    /// (a capture replays its recorded points through here).
    pub fn push_sample(&mut self, s: Sample) {
        for site in self.sites.values_mut() {
            let live = site.stats.live_bytes;
            // A negative count read mid-update (a free seen before its allocation's add) waits
            // for the next interval.
            if live < (1 << 62) && (site.trend.n > 0 || live > 0) {
                site.trend.observe(s.t, live);
            }
        }
        self.series.push(s);
    }

    /// Puts back a site recorded in a capture (replacing an earlier record of it, keeping its
    /// counters and trend).
    pub fn restore(&mut self, mut site: Site) {
        if let Some(old) = self.sites.get(&site.id) {
            site.stats = old.stats;
            site.trend = old.trend;
        }
        self.sites.insert(site.id, site);
    }

    /// A site's counters (zero for a site never seen).
    pub fn stats(&self, id: u64) -> SiteStats {
        self.sites.get(&id).map(|s| s.stats).unwrap_or_default()
    }

    /// Sets a site's counters (from a capture).
    pub fn set_stats(&mut self, id: u64, stats: SiteStats) {
        if let Some(site) = self.sites.get_mut(&id) {
            site.stats = stats;
        }
    }

    /// Drops every site of process `pid` (it exec'd into another program).
    pub fn forget_process(&mut self, pid: u32) {
        self.sites.retain(|_, s| s.pid != pid);
    }

    /// The sites of `live` (site id → live bytes and blocks, e.g. those allocated since a
    /// moment), each with those figures as its counters: a heap of its own to report on.
    pub fn restricted(&self, live: &HashMap<u64, (u64, u64)>) -> Heap {
        let sites = live
            .iter()
            .filter_map(|(id, &(bytes, blocks))| {
                let mut site = self.sites.get(id)?.clone();
                site.stats = SiteStats {
                    live_bytes: bytes,
                    live_count: blocks,
                    allocs: blocks,
                    alloc_bytes: bytes,
                    frees: 0,
                    frees_old: 0,
                    ..site.stats
                };
                site.trend = Trend::default();
                Some((*id, site))
            })
            .collect();
        Heap {
            sites,
            series: Vec::new(),
        }
    }

    /// All sites.
    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.sites.values()
    }

    /// The time series so far.
    pub fn series(&self) -> &[Sample] {
        &self.series
    }
}
