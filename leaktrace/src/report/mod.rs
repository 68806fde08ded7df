//! The report: what was allocated and never freed, grouped by site, with everything needed to
//! judge it (what was probed, coverage, drops). Rendered as a table or JSON.

pub mod csv;
pub mod diff;
pub mod flamegraph;
pub mod frames;
pub mod gate;
mod group;
pub mod html;
mod memory;
pub mod pprof;
pub mod prometheus;
pub mod table;
pub mod top;

use std::collections::{BTreeMap, HashMap};

use leaktrace_ebpf::{AllocFn, Counter, Family};
use serde::{Deserialize, Serialize};

use crate::analysis::census::{Census, TypeCensus};
use crate::analysis::classify::Verdict;
use crate::heap::{Heap, Sample};
use crate::options::ModeKind;
use crate::probes::plan::{ProbePlan, PythonCoverage};
use crate::process::death::Death;
use crate::stacks::merge::StackEntry;
use crate::stacks::native::{UnwindEnd, UnwindStats};
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::{Frame, FrameSource};
pub use crate::units::human_bytes;
use group::Group;
use memory::series_before_shutdown;
pub use memory::{AtFinalize, HeapVsRss};

/// Version of the JSON schema (docs/json-schema.md).
pub const SCHEMA_VERSION: u32 = 2;

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub target: TargetInfo,
    /// Every process traced, the target first, each with its unfreed totals (sites say which
    /// process they belong to; `totals` is all processes merged).
    pub processes: Vec<ProcessInfo>,
    /// "exact" (every allocation of the probed functions is tracked), "sampled" (figures are
    /// estimates from allocations sampled one per `sample_rate` bytes) or "growth" (pages the
    /// process touched for the first time, sampled likewise: memory grown, not unfreed).
    pub mode: ModeKind,
    /// Bytes per sample in sampled and growth modes.
    pub sample_rate: Option<u64>,
    /// In-process sampling: the sampler's ceiling on samples a second and the highest mean
    /// interval its thinning amounted to, when it thinned (`sample_rate` is the interval drawn at).
    pub sample_ceiling: Option<SampleCeiling>,
    pub duration_s: f64,
    /// Seconds into the trace when the interpreter finished starting up and began running the
    /// main module (`run` of a Python program).
    pub main_started_s: Option<f64>,
    /// Seconds into the trace when the interpreter began shutting down; figures freeze there.
    pub finalized_s: Option<f64>,
    pub probes: Vec<ProbeInfo>,
    pub python_coverage: PythonCoverage,
    pub notes: Vec<String>,
    pub counters: BTreeMap<String, u64>,
    /// Everything leaktrace lost: the drop counters, plus the sites whose stack record never
    /// arrived (their bytes are counted, their stack is not known).
    pub dropped: u64,
    pub totals: Totals,
    /// Sites with unfreed bytes, largest first (after `--min-size` and `--top`).
    pub sites: Vec<SiteReport>,
    /// Sites classified as leaks with confidence ≥ 0.9 (listed first), and their unfreed bytes.
    pub suspects: usize,
    pub suspect_bytes: u64,
    /// Number of sites with unfreed bytes left out by `--top`.
    pub sites_omitted: usize,
    /// Sites whose announcement (with the Python stack) never arrived: counted, but shown
    /// without their stack.
    pub sites_without_stack: usize,
    /// How the native stacks of all new sites unwound.
    pub native_unwind: UnwindStats,
    pub series: Vec<Sample>,
    /// RSS against live traced bytes over the trace.
    pub heap_vs_rss: HeapVsRss,
    /// Live Python objects by type, and their growth since the main module started (`run`) or
    /// tracing began (`attach`).
    pub type_census: Option<TypeCensus>,
    /// What tracing cost leaktrace itself (absent in reports rendered from a capture).
    pub tracer: Option<TracerCost>,
}

/// leaktrace's own CPU and memory over the trace.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TracerCost {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    /// Seconds from the end of tracing to the report being built (reading what is left,
    /// naming frames, the census, grouping stacks).
    pub report_seconds: f64,
}

/// One traced process: the target, or a child it forked (`--follow-forks`), with its share of
/// the unfreed memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The traced process that forked it (None for the target).
    pub parent: Option<u32>,
    pub command: String,
    /// How it ended, or that it still runs.
    pub end: String,
    pub unfreed_bytes: u64,
    pub unfreed_count: u64,
}

/// What was traced.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub command: String,
    pub python: Option<String>,
    pub python_module: Option<String>,
    pub libc: Option<String>,
    /// How tracing ended: "exited with code 0", "killed by SIGKILL", "detached", ...
    pub end: String,
    /// How the target died, when it died while traced.
    pub death: Option<Death>,
}

/// The in-process sampler held its samples a second under a ceiling by thinning them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleCeiling {
    /// The most samples a second the process takes.
    pub samples_per_s: u64,
    /// The highest mean interval (bytes) its thinning amounted to: the interval times the
    /// largest one-in-k.
    pub interval_max: u64,
}

/// Everything a report says besides its sites: what was traced, how, and how it ended. A
/// capture file stores it at the end, so a report can be rebuilt from the capture elsewhere.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReportMeta {
    pub target: TargetInfo,
    pub processes: Vec<ProcessInfo>,
    pub mode: ModeKind,
    pub sample_rate: Option<u64>,
    #[serde(default)]
    pub sample_ceiling: Option<SampleCeiling>,
    pub duration_s: f64,
    pub probes: Vec<ProbeInfo>,
    pub python_coverage: PythonCoverage,
    pub notes: Vec<String>,
    pub counters: BTreeMap<String, u64>,
    pub native_unwind: UnwindStats,
    /// The interpreter's module, where Python frames are merged into native stacks.
    pub interpreter: Option<String>,
    /// Seconds into the trace when the interpreter began shutting down: RSS after it says
    /// nothing about the figures, which freeze there.
    pub finalized_at: Option<f64>,
    /// The target's RSS and pymalloc arenas read when its interpreter began shutting down,
    /// where the figures freeze (the series' next point comes after teardown).
    #[serde(default)]
    pub at_finalize: Option<AtFinalize>,
    /// Seconds into the trace when the interpreter began running the main module.
    #[serde(default)]
    pub main_at: Option<f64>,
    /// What the census's growth is measured from, in words (the main module's start, the
    /// start of an `attach`).
    #[serde(default)]
    pub census_baseline: Option<String>,
    /// Type censuses when the main module started (with its time) and at the end.
    pub census_base: Option<(f64, Census)>,
    pub census_end: Option<Census>,
}

impl ReportMeta {
    /// The probes of a plan, as reports list them.
    pub fn probes_of(plan: &ProbePlan) -> Vec<ProbeInfo> {
        plan.points
            .iter()
            .map(|p| ProbeInfo {
                function: p.func.label().into(),
                family: family_name(p.func.family()).into(),
                module: p.module.clone(),
                offset: p.placement.offset,
                emulated: p.placement.emulated,
                symbol_table: p.table.name().into(),
            })
            .collect()
    }

    fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }

    fn drops(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| self.counter(*c))
            .sum()
    }
}

/// One probed function.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeInfo {
    pub function: String,
    pub family: String,
    pub module: String,
    pub offset: u64,
    pub emulated: bool,
    pub symbol_table: String,
}

/// Process-wide totals of live traced memory.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Totals {
    pub unfreed_bytes: u64,
    pub unfreed_count: u64,
    pub allocs: u64,
    pub frees: u64,
}

/// How the kernel's walk of a site's Python stack went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PythonStatus {
    Ok,
    NotPython,
    NoThreadState,
    ReadError,
    /// The site table was full: counted under the native caller alone.
    Overflow,
    /// The site's announcement was lost.
    Unknown,
}

impl PythonStatus {
    /// From the kernel's `py_status` code (`None`: never announced).
    pub fn from_kernel(s: Option<u8>) -> Self {
        use leaktrace_ebpf::py_status::*;
        match s {
            Some(OK) => PythonStatus::Ok,
            Some(NOT_PYTHON) => PythonStatus::NotPython,
            Some(NO_THREAD_STATE) => PythonStatus::NoThreadState,
            Some(READ_ERROR) => PythonStatus::ReadError,
            Some(OVERFLOW) => PythonStatus::Overflow,
            _ => PythonStatus::Unknown,
        }
    }
}

/// One site's unfreed memory.
#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    /// Hex site id.
    pub id: String,
    pub pid: u32,
    pub allocator: String,
    pub family: String,
    pub unfreed_bytes: u64,
    pub unfreed_count: u64,
    pub allocs: u64,
    pub alloc_bytes: u64,
    pub frees: u64,
    /// Kernel sites folded into this one: the same stack, seen before and after the kernel
    /// learned how to follow all of it.
    pub kernel_sites: usize,
    /// The caller of the allocator: where the allocation was made.
    pub caller: Frame,
    /// The merged stack, outermost first and the allocator's caller last: Python frames in
    /// place of the eval loop that ran them.
    pub stack: Vec<StackEntry>,
    /// The native stack, outermost first.
    pub native_stack: Vec<Frame>,
    /// How the native unwind ended: `complete` (it reached the program's or thread's entry),
    /// or why it stopped (`stack_copy_too_short`, `no_cfi`, ...).
    pub native_unwind: UnwindEnd,
    /// The Python stack, outermost first and innermost last (empty when there was none).
    pub python_stack: Vec<PyFrame>,
    /// How the kernel's Python walk went.
    pub python_status: PythonStatus,
    /// The Python stack was cut at `--python-depth`: outer frames are missing.
    pub python_truncated: bool,
    /// Leak, cache, steady or startup, from the trend of its live bytes.
    pub analysis: Verdict,
    /// The Python types its live blocks hold, most first (the top three, with counts; empty when
    /// no census was taken). In sampled mode the counts are estimates: each sampled block's
    /// object counts for the blocks the site's estimate gives each sample.
    pub types: Vec<(String, u64)>,
    /// The kernel sites this line stands for.
    #[serde(skip)]
    pub kernel_site_ids: Vec<u64>,
}

/// Report options.
#[derive(Clone, Copy, Debug)]
pub struct ReportOptions {
    pub top: usize,
    pub min_size: u64,
    /// Show every native frame (the interpreter's own too).
    pub all_native_frames: bool,
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Libc => "libc",
        Family::Python => "python",
        Family::Pages => "pages",
        Family::Arena => "pymalloc_arena",
    }
}

impl SiteReport {
    /// Names the site after the first native frame outside CPython's allocator layer (the
    /// constructor that asked for the memory, not `_PyObject_Malloc`) and hides the layer's
    /// frames below it unless every frame is shown.
    fn hide_python_allocator_layer(&mut self) {
        let Some(innermost) = self.native_stack.last() else {
            return;
        };
        let site = self
            .native_stack
            .iter()
            .rposition(|f| !f.in_python_allocator() && !f.in_sampler())
            .unwrap_or(self.native_stack.len() - 1);
        if self.allocator == AllocFn::UsdtAlloc.label() {
            // A sampled allocation's allocator is the function the sampler stood in for (its
            // `malloc`, `calloc`, …): the first frame of the layer.
            let hook = self
                .native_stack
                .get(site + 1)
                .and_then(|f| f.function.as_deref());
            if let Some(allocator) = hook.and_then(sampler_hook_allocator) {
                self.allocator = allocator.to_string();
            }
        }
        self.caller = self.native_stack.get(site).unwrap_or(innermost).clone();
        let layer = self.native_stack.len() - 1 - site;
        let mut left = layer;
        for e in self.stack.iter_mut().rev() {
            if left == 0 {
                break;
            }
            if let StackEntry::Native { hidden, .. } = e {
                *hidden = true;
                left -= 1;
            }
        }
    }
}

/// The allocator a sampled allocation's first sampler frame stands in for: the libc function
/// an interposed hook is named after (`malloc`, or its out-of-line `malloc_slow`, which the hook
/// reaches by a tail jump and so leaves alone on the stack), or `PyObject_Malloc` for the
/// preload's wrappers of CPython's domains (`python_hooks`, `python_direct`).
fn sampler_hook_allocator(hook: &str) -> Option<&str> {
    let (module, name) = hook.rsplit_once("::").unwrap_or(("", hook));
    if module.ends_with("python_hooks") || module.ends_with("python_direct") {
        return Some("PyObject_Malloc");
    }
    let name = name.strip_suffix("_slow").unwrap_or(name);
    AllocFn::ALL
        .iter()
        .map(|f| f.symbol())
        .find(|symbol| *symbol == name)
}

/// The groups of kernel sites holding at least `--min-size`, leak suspects first, then by
/// unfreed bytes.
fn ranked_groups<'a>(
    heap: &'a Heap,
    sym: &mut dyn FrameSource,
    interpreter: Option<&str>,
    opts: ReportOptions,
    sampled: bool,
) -> Vec<Group<'a>> {
    let mut all: Vec<Group<'_>> =
        group::group(heap, sym, interpreter, opts.all_native_frames, sampled)
            .into_iter()
            .filter(|g| g.unfreed_bytes >= opts.min_size)
            .collect();
    all.sort_by(|a, b| {
        (b.analysis.is_suspect(), b.unfreed_bytes)
            .cmp(&(a.analysis.is_suspect(), a.unfreed_bytes))
            .then(a.best.id.cmp(&b.best.id))
    });
    all
}

/// Unfreed totals over every group (not only those reported), with the counters' allocations
/// and frees.
fn totals_of(all: &[Group<'_>], meta: &ReportMeta) -> Totals {
    Totals {
        unfreed_bytes: all.iter().map(|g| g.unfreed_bytes).sum(),
        unfreed_count: all.iter().map(|g| g.sum(|s| s.stats.live_count)).sum(),
        allocs: meta.counter(Counter::Allocs),
        frees: meta.counter(Counter::Frees),
    }
}

/// The reported groups as sites, their stacks merged and their frames named.
fn named_sites(
    kept: Vec<Group<'_>>,
    sym: &mut dyn FrameSource,
    interpreter: Option<&str>,
) -> Vec<SiteReport> {
    let mut sites: Vec<SiteReport> = kept
        .into_iter()
        .map(|g| SiteReport::of(g, sym, interpreter))
        .collect();
    for s in &sites {
        let in_stack = s.stack.iter().filter_map(|e| match e {
            StackEntry::Native { frame, .. } => Some(frame),
            _ => None,
        });
        for f in in_stack.chain(&s.native_stack) {
            sym.expect(s.pid, f);
        }
    }
    for s in sites.iter_mut() {
        for e in s.stack.iter_mut() {
            if let StackEntry::Native { frame, .. } = e {
                sym.resolve(s.pid, frame);
            }
        }
        for f in s.native_stack.iter_mut() {
            sym.resolve(s.pid, f);
        }
        s.hide_python_allocator_layer();
    }
    sites
}

impl Report {
    /// Builds the report from the heap model and what was traced. Kernel sites with the same
    /// stack are reported as one; only the sites reported are named.
    pub fn build(
        heap: &Heap,
        sym: &mut dyn FrameSource,
        meta: ReportMeta,
        opts: ReportOptions,
    ) -> Report {
        let interpreter = meta.interpreter.as_deref();
        let sampled = meta.mode == ModeKind::Sampled;
        let mut all = ranked_groups(heap, sym, interpreter, opts, sampled);
        let suspects = all.iter().filter(|g| g.analysis.is_suspect()).count();
        let suspect_bytes = all
            .iter()
            .filter(|g| g.analysis.is_suspect())
            .map(|g| g.unfreed_bytes)
            .sum();
        let totals = totals_of(&all, &meta);
        let sites_without_stack = all
            .iter()
            .filter(|g| g.best.python_status.is_none())
            .count();
        // Every leak suspect is listed (they come first), whatever `--top` says; only the
        // sites reported are merged and named.
        let keep = opts.top.max(suspects);
        let omitted = all.len().saturating_sub(keep);
        all.truncate(keep);
        let sites = named_sites(all, sym, interpreter);
        let before = series_before_shutdown(heap, &meta);
        let mut report = Report {
            schema_version: SCHEMA_VERSION,
            dropped: meta.drops() + sites_without_stack as u64,
            processes: meta.processes,
            target: meta.target,
            mode: meta.mode,
            sample_rate: meta.sample_rate,
            sample_ceiling: meta.sample_ceiling,
            duration_s: meta.duration_s,
            main_started_s: meta.main_at,
            finalized_s: meta.finalized_at,
            probes: meta.probes,
            python_coverage: meta.python_coverage,
            notes: meta.notes,
            counters: meta.counters,
            totals,
            sites,
            suspects,
            suspect_bytes,
            sites_omitted: omitted,
            sites_without_stack,
            native_unwind: meta.native_unwind,
            series: heap.series().to_vec(),
            heap_vs_rss: HeapVsRss::of(&before),
            type_census: None,
            tracer: None,
        };
        if let Some(end) = &meta.census_end {
            let base = meta.census_base.as_ref().map(|(t, c)| (*t, c));
            report.census_into(end, base, meta.census_baseline.clone());
        }
        report
    }

    /// Puts a census into the report: overall, and the top types of each site shown.
    fn census_into(&mut self, end: &Census, base: Option<(f64, &Census)>, since: Option<String>) {
        self.type_census = Some(TypeCensus::of(end, base, since));
        let sampled = self.mode == ModeKind::Sampled;
        for site in self.sites.iter_mut() {
            let mut types: HashMap<&str, u64> = HashMap::new();
            let mut read = 0;
            for id in &site.kernel_site_ids {
                read += end.blocks_by_site.get(id).copied().unwrap_or(0);
                for (name, n) in end.by_site.get(id).into_iter().flatten() {
                    *types.entry(name).or_default() += n;
                }
            }
            // Sampled: the blocks read are the samples; each stands for its share of the
            // site's estimated blocks (never less than itself).
            let scale = if sampled && read > 0 {
                (site.unfreed_count as f64 / read as f64).max(1.0)
            } else {
                1.0
            };
            let mut v: Vec<(String, u64)> = types
                .into_iter()
                .map(|(k, n)| (k.to_string(), (n as f64 * scale).round() as u64))
                .collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(3);
            site.types = v;
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

#[cfg(test)]
mod tests;
