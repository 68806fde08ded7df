//! The live-heap model in userspace: per-site counters read from the kernel each interval, the
//! site identities announced on the ring buffer, and the process-wide time series.

use std::collections::HashMap;

use leaktrace_ebpf::{AllocFn, SiteStats};
use serde::Serialize;

use crate::probes::loader::Counters;
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::{Frame, Symbolizer};

/// One allocation site: allocator function + caller (full stacks slot in here later).
#[derive(Clone, Debug)]
pub struct Site {
    pub id: u64,
    pub pid: u32,
    pub func: AllocFn,
    pub caller: u64,
    pub frame: Option<Frame>,
    /// The Python stack, innermost first (empty when there was none).
    pub python: Vec<PyFrame>,
    /// How the Python stack was obtained (`leaktrace_ebpf::py_status`); `None` if the site's
    /// announcement was lost.
    pub python_status: Option<u8>,
    pub python_truncated: bool,
    pub stats: SiteStats,
}

/// What the kernel said about a new site's Python stack, decoded.
#[derive(Clone, Debug, Default)]
pub struct PythonStack {
    pub frames: Vec<PyFrame>,
    pub status: u8,
    pub truncated: bool,
}

/// A point of the process-wide time series.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since tracing began.
    pub t: f64,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub drops: u64,
    pub rss_bytes: Option<u64>,
}

/// Every site seen, and the series.
#[derive(Default)]
pub struct Heap {
    sites: HashMap<u64, Site>,
    series: Vec<Sample>,
}

impl Heap {
    /// Registers a site announced by the kernel and places its caller in a mapped file now,
    /// while the process is alive (naming it waits for `symbolize_pending`).
    pub fn announce(
        &mut self,
        sym: &mut Symbolizer,
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
            frame: None,
            python: Vec::new(),
            python_status: None,
            python_truncated: false,
            stats: SiteStats::default(),
        });
        if site.frame.is_none() {
            site.frame = Some(sym.return_address(pid, caller));
        }
        if let Some(py) = python {
            site.python = py.frames;
            site.python_status = Some(py.status);
            site.python_truncated = py.truncated;
        }
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
                self.announce(sym, id, s.tgid, func, s.native[0], None);
            }
            if let Some(site) = self.sites.get_mut(&id) {
                site.stats = s;
            }
        }
    }

    /// Places callers whose module was not mapped when first seen (call while the process
    /// still has its maps).
    pub fn place_pending(&mut self, sym: &mut Symbolizer) {
        for site in self.sites.values_mut() {
            if site.frame.as_ref().is_none_or(|f| f.module.is_none()) {
                site.frame = Some(sym.return_address(site.pid, site.caller));
            }
        }
    }

    /// Names every site's caller (from the files: this works after the process is gone).
    pub fn symbolize(&mut self, sym: &mut Symbolizer) {
        self.place_pending(sym);
        for site in self.sites.values_mut() {
            if let Some(f) = site.frame.as_mut() {
                if f.function.is_none() {
                    sym.resolve(site.pid, f);
                }
            }
        }
    }

    /// Appends a point to the time series from the current counters.
    pub fn sample(&mut self, t: f64, counters: &Counters, rss_bytes: Option<u64>) -> Sample {
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
        };
        self.series.push(s);
        s
    }

    /// Drops every site of process `pid` (it exec'd into another program).
    pub fn forget_process(&mut self, pid: u32) {
        self.sites.retain(|_, s| s.pid != pid);
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
