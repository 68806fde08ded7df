//! The report: what was allocated and never freed, grouped by site, with everything needed to
//! judge it (what was probed, coverage, drops). Rendered as a table or JSON.

pub mod table;

use std::collections::BTreeMap;

use leaktrace_ebpf::{Counter, Family};
use serde::Serialize;

use crate::heap::{Heap, Sample};
use crate::probes::loader::Counters;
use crate::probes::plan::{ProbePlan, PythonCoverage};
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::Frame;

/// Version of the JSON schema (docs/json-schema.md).
pub const SCHEMA_VERSION: u32 = 1;

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub target: TargetInfo,
    /// "exact": every allocation of the probed functions is tracked.
    pub mode: String,
    pub duration_s: f64,
    pub probes: Vec<ProbeInfo>,
    pub python_coverage: PythonCoverage,
    pub notes: Vec<String>,
    pub counters: BTreeMap<String, u64>,
    /// Sum of the drop counters: allocations or announcements leaktrace lost.
    pub dropped: u64,
    pub totals: Totals,
    /// Sites with unfreed bytes, largest first (after `--min-size` and `--top`).
    pub sites: Vec<SiteReport>,
    /// Number of sites with unfreed bytes left out by `--top`.
    pub sites_omitted: usize,
    /// Sites whose announcement (with the Python stack) never arrived: counted, but shown
    /// without their stack.
    pub sites_without_stack: usize,
    pub series: Vec<Sample>,
}

/// What was traced.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub command: String,
    pub python: Option<String>,
    pub python_module: Option<String>,
    pub libc: Option<String>,
    /// How tracing ended: "exited with code 0", "killed by SIGKILL", "detached", ...
    pub end: String,
}

/// One probed function.
#[derive(Clone, Debug, Serialize)]
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
    /// The caller of the allocator: where the allocation was made.
    pub caller: Frame,
    /// The Python stack, outermost first and innermost last (empty when there was none).
    pub python_stack: Vec<PyFrame>,
    /// "ok", "not_python", "no_thread_state", "read_error", "overflow" (the site table was full:
    /// counted under the native caller alone), or "unknown" (announcement lost).
    pub python_status: String,
    /// The Python stack was cut at `--python-depth`: outer frames are missing.
    pub python_truncated: bool,
}

/// Report options.
#[derive(Clone, Copy, Debug)]
pub struct ReportOptions {
    pub top: usize,
    pub min_size: u64,
}

fn python_status_name(s: Option<u8>) -> &'static str {
    use leaktrace_ebpf::py_status::*;
    match s {
        Some(OK) => "ok",
        Some(NOT_PYTHON) => "not_python",
        Some(NO_THREAD_STATE) => "no_thread_state",
        Some(READ_ERROR) => "read_error",
        Some(OVERFLOW) => "overflow",
        _ => "unknown",
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Libc => "libc",
        Family::Python => "python",
    }
}

impl Report {
    /// Builds the report from the heap model and what was probed.
    pub fn build(
        heap: &Heap,
        plan: &ProbePlan,
        counters: &Counters,
        target: TargetInfo,
        duration_s: f64,
        opts: ReportOptions,
    ) -> Report {
        let mut sites: Vec<SiteReport> = heap
            .sites()
            .filter(|s| s.stats.live_bytes > 0 && s.stats.live_bytes < (1 << 62))
            .filter(|s| s.stats.live_bytes >= opts.min_size)
            .map(|s| SiteReport {
                id: format!("{:016x}", s.id),
                pid: s.pid,
                allocator: s.func.symbol().to_string(),
                family: family_name(s.func.family()).to_string(),
                unfreed_bytes: s.stats.live_bytes,
                unfreed_count: s.stats.live_count,
                allocs: s.stats.allocs,
                alloc_bytes: s.stats.alloc_bytes,
                frees: s.stats.frees,
                caller: s.frame.clone().unwrap_or(Frame {
                    address: s.caller,
                    ..Frame::default()
                }),
                python_stack: s.python.iter().rev().cloned().collect(),
                python_status: python_status_name(s.python_status).into(),
                python_truncated: s.python_truncated,
            })
            .collect();
        sites.sort_by(|a, b| b.unfreed_bytes.cmp(&a.unfreed_bytes).then(a.id.cmp(&b.id)));
        let totals = Totals {
            unfreed_bytes: sites.iter().map(|s| s.unfreed_bytes).sum(),
            unfreed_count: sites.iter().map(|s| s.unfreed_count).sum(),
            allocs: counters.get(Counter::Allocs),
            frees: counters.get(Counter::Frees),
        };
        let omitted = sites.len().saturating_sub(opts.top);
        let sites_without_stack = sites
            .iter()
            .filter(|s| s.python_status == "unknown")
            .count();
        sites.truncate(opts.top);
        Report {
            schema_version: SCHEMA_VERSION,
            target,
            mode: "exact".into(),
            duration_s,
            probes: plan
                .points
                .iter()
                .map(|p| ProbeInfo {
                    function: p.func.symbol().into(),
                    family: family_name(p.func.family()).into(),
                    module: p.module.clone(),
                    offset: p.placement.offset,
                    emulated: p.placement.emulated,
                    symbol_table: format!("{:?}", p.table).to_lowercase(),
                })
                .collect(),
            python_coverage: plan.python_coverage,
            notes: plan.notes.clone(),
            counters: Counter::ALL
                .iter()
                .map(|c| (c.name().to_string(), counters.get(*c)))
                .collect(),
            dropped: counters.drops(),
            totals,
            sites,
            sites_omitted: omitted,
            sites_without_stack,
            series: heap.series().to_vec(),
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

/// `1234567` → `1.2 MB` (decimal units, as `ls -h --si`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(4_096_000), "4.1 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
    }
}
