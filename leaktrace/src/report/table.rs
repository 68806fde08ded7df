//! The default terminal report: a header saying what was traced and how completely, then sites
//! ranked by unfreed bytes.

use std::fmt::Write;

use super::{human_bytes, HeapVsRss, PythonStatus, Report, SiteReport};
use crate::analysis::census::TypeCensus;
use crate::options::ModeKind;
use crate::probes::plan::PythonCoverage;
use crate::stacks::merge::StackEntry;
use crate::stacks::native::UnwindEnd;

/// Frames shown per site without `--verbose` (the innermost ones).
const MAX_FRAMES_SHOWN: usize = 16;

/// Renders the report as text.
pub fn render(r: &Report, verbose: bool, all_native: bool) -> String {
    let mut o = String::new();
    let growth = r.mode == ModeKind::Growth;
    header(&mut o, r, verbose, growth);
    if r.sites.is_empty() {
        let _ = writeln!(
            o,
            "{}",
            if growth {
                "No memory growth seen."
            } else {
                "No unfreed allocations."
            }
        );
        return o;
    }
    sites_table(&mut o, r, verbose, all_native, growth);
    if r.sites_omitted > 0 {
        let _ = writeln!(o, "… and {} more sites (raise --top)", r.sites_omitted);
    }
    if let Some(c) = &r.type_census {
        census_table(&mut o, c);
    }
    o
}

/// The header: what was traced and how, the totals, and everything lost, then a blank line.
fn header(o: &mut String, r: &Report, verbose: bool, growth: bool) {
    target_lines(o, r, growth);
    if verbose {
        probe_lines(o, r);
    }
    for n in &r.notes {
        let _ = writeln!(o, "  note: {n}");
    }
    totals_lines(o, r, growth);
    memory_lines(o, &r.heap_vs_rss);
    if !growth {
        let _ = writeln!(
            o,
            "  leak suspects (stacks still growing at the end of the trace; docs/analysis.md): \
             {} ({} unfreed)",
            r.suspects,
            human_bytes(r.suspect_bytes)
        );
    }
    drops_line(o, r);
    if let (true, Some(c)) = (verbose, &r.tracer) {
        let _ = writeln!(
            o,
            "  leaktrace itself: {:.2} s CPU, {} peak RSS; report built in {:.2} s",
            c.cpu_seconds,
            human_bytes(c.peak_rss_bytes),
            c.report_seconds
        );
    }
    let _ = writeln!(o);
}

/// The target, how it was traced (mode, sampling, Python coverage) and its libc.
fn target_lines(o: &mut String, r: &Report, growth: bool) {
    let t = &r.target;
    let _ = writeln!(o, "leaktrace report — pid {} ({})", t.pid, t.command);
    let _ = writeln!(
        o,
        "  traced {:.1} s in {} mode; target {}",
        r.duration_s, r.mode, t.end
    );
    match r.sample_rate {
        Some(rate) => sampling_line(o, r, rate, growth),
        None if r.mode == ModeKind::Sampled => {
            let _ = writeln!(
                o,
                "  sampled mode: by the process's own sampler, at an interval it does not say; \
                 bytes are the weights it gives its samples"
            );
        }
        None => {}
    }
    match (&t.python, &t.python_module) {
        (Some(v), Some(m)) if growth => {
            let _ = writeln!(o, "  python {v} in {m}");
        }
        (Some(v), Some(m)) => {
            let cov = coverage_words(r.python_coverage);
            let _ = writeln!(o, "  python {v} in {m}; python allocator coverage: {cov}");
        }
        _ => {
            let _ = writeln!(o, "  not a Python process: libc allocations only");
        }
    }
    if let Some(l) = &t.libc {
        let _ = writeln!(o, "  libc: {l}");
    }
}

/// What one sample stands for in sampled and growth modes.
fn sampling_line(o: &mut String, r: &Report, rate: u64, growth: bool) {
    let passed = r.counters.get("unsampled").copied().unwrap_or(0);
    if growth {
        let _ = writeln!(
            o,
            "  growth mode: pages first written, sampled one per ~{} (by bytes), less pages \
             unmapped since; figures are estimates of memory grown, by stack",
            human_bytes(rate)
        );
    } else {
        let _ = writeln!(
            o,
            "  sampled mode: one allocation per ~{} allocated (Poisson, by bytes); bytes and \
             blocks are unbiased estimates ({passed} allocations passed over)",
            human_bytes(rate)
        );
    }
}

/// How much of the Python allocator the probes see, in words.
fn coverage_words(c: PythonCoverage) -> &'static str {
    match c {
        PythonCoverage::PymallocImpl => "complete (pymalloc implementation probed)",
        PythonCoverage::ExportedApiOnly => "PARTIAL (exported API only; LTO-inlined calls unseen)",
        PythonCoverage::RawMalloc => {
            "complete (PYTHONMALLOC=malloc: every Python allocation goes through libc)"
        }
        PythonCoverage::Arenas => {
            "objects over 512 B call by call (through libc), smaller ones by pymalloc arena \
             (1 MiB) and by type in the census; --python-allocators traces every call"
        }
        PythonCoverage::LargeObjectsOnly => {
            "objects over 512 B call by call (through libc), smaller ones only by type in \
             the census (arenas not found); --python-allocators traces every call"
        }
        PythonCoverage::Redirected => {
            "complete while attached (--redirect-pymalloc: pymalloc's allocations sent to libc's \
             malloc, restored at detach)"
        }
        PythonCoverage::SampledInProcess => {
            "sampled inside the process (the preloaded sampler wraps CPython's object and mem \
             allocators), every size"
        }
        PythonCoverage::None => "none (--libc-only)",
    }
}

/// Every probe placed (`--verbose`).
fn probe_lines(o: &mut String, r: &Report) {
    let _ = writeln!(o, "  probes:");
    for p in &r.probes {
        let _ = writeln!(
            o,
            "    {:<16} +{:<3} {:<10} [{}] {}",
            p.function,
            p.offset,
            if p.emulated { "emulated" } else { "stepped" },
            p.symbol_table,
            p.module
        );
    }
}

/// What was traced and what is left unfreed, overall and per process when there are several.
fn totals_lines(o: &mut String, r: &Report, growth: bool) {
    if growth {
        let _ = writeln!(
            o,
            "  {} page faults sampled; {} grown in {} pages",
            r.totals.allocs,
            human_bytes(r.totals.unfreed_bytes),
            r.totals.unfreed_count
        );
    } else {
        let _ = writeln!(
            o,
            "  {} allocations and {} frees traced; {} unfreed in {} blocks",
            r.totals.allocs,
            r.totals.frees,
            human_bytes(r.totals.unfreed_bytes),
            r.totals.unfreed_count
        );
    }
    if r.processes.len() > 1 {
        let _ = writeln!(o, "  {} processes traced:", r.processes.len());
        for p in &r.processes {
            let from = p
                .parent
                .map(|pp| format!(", forked by {pp}"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "    pid {:<7} {:>10} unfreed in {} blocks — {}{from}; {}",
                p.pid,
                human_bytes(p.unfreed_bytes),
                p.unfreed_count,
                p.command,
                p.end
            );
        }
    }
}

/// RSS against the live traced heap, and the warning when they disagree.
fn memory_lines(o: &mut String, h: &HeapVsRss) {
    if let (Some(a), Some(b)) = (h.rss_first, h.rss_last) {
        let arenas = match (h.arenas_first, h.arenas_last) {
            (Some(x), Some(y)) => {
                format!("; pymalloc arenas {} → {}", human_bytes(x), human_bytes(y))
            }
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "  memory: RSS {} → {}; live traced {} → {}{arenas}",
            human_bytes(a),
            human_bytes(b),
            human_bytes(h.live_first),
            human_bytes(h.live_last)
        );
    }
    if let Some(n) = &h.note {
        let _ = writeln!(o, "  HEAP VS RSS: {n}");
    }
}

/// "drops: none", or every loss by reason: a report that lost data must say so.
fn drops_line(o: &mut String, r: &Report) {
    if r.dropped == 0 {
        let _ = writeln!(o, "  drops: none");
        return;
    }
    let mut list: Vec<String> = r
        .counters
        .iter()
        .filter(|(k, v)| **v > 0 && is_drop_name(k))
        .map(|(k, v)| match remedy(k) {
            Some(flag) => format!("{k} {v}: raise {flag}"),
            None => format!("{k} {v}"),
        })
        .collect();
    if r.sites_without_stack > 0 {
        let full = r
            .counters
            .get(leaktrace_ebpf::Counter::RingbufFull.name())
            .copied()
            .unwrap_or(0);
        list.push(format!(
            "{} sites with unfreed bytes lost their stack record: the ring buffer was \
             full {full} times",
            r.sites_without_stack
        ));
    }
    let _ = writeln!(o, "  DROPS: {} ({})", r.dropped, list.join(", "));
}

/// The option that makes room for what a full table dropped.
fn remedy(counter: &str) -> Option<&'static str> {
    use leaktrace_ebpf::Counter;
    [
        (Counter::LiveFull, "--max-live"),
        (Counter::SitesFull, "--max-sites"),
    ]
    .into_iter()
    .find_map(|(c, flag)| (c.name() == counter).then_some(flag))
}

/// The column headings, then each site with its verdict and stack.
fn sites_table(o: &mut String, r: &Report, verbose: bool, all_native: bool, growth: bool) {
    let _ = writeln!(
        o,
        "{:>14} {:>9} {:>9} {:>9}  {:<16} SITE (caller of the allocator)",
        if growth { "GREW" } else { "UNFREED" },
        if growth { "PAGES" } else { "BLOCKS" },
        "ALLOCS",
        "FREES",
        "ALLOCATOR"
    );
    let several = r.processes.len() > 1;
    let estimated = r.mode == ModeKind::Sampled;
    for s in &r.sites {
        site_row(o, s, several, estimated);
        stack_lines(o, s, verbose, all_native);
    }
}

/// A site's figures and caller, its verdict, and the types its blocks hold (`estimated`: counts
/// scaled from the sampled blocks).
fn site_row(o: &mut String, s: &SiteReport, several: bool, estimated: bool) {
    let pid = if several {
        format!(" [pid {}]", s.pid)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "{:>14} {:>9} {:>9} {:>9}  {:<16} {}{pid}",
        format!("{} B", group(s.unfreed_bytes)),
        group(s.unfreed_count),
        group(s.allocs),
        group(s.frees),
        s.allocator,
        s.caller.display()
    );
    let a = &s.analysis;
    let _ = writeln!(
        o,
        "{:>16}{} ({:.2}): {}",
        "",
        if a.is_suspect() {
            "LEAK SUSPECT".to_string()
        } else {
            a.class.name().to_string()
        },
        a.confidence,
        a.evidence
    );
    if !s.types.is_empty() {
        let held: Vec<String> = s
            .types
            .iter()
            .map(|(name, n)| format!("{name} ×{}", group(*n)))
            .collect();
        let what = if estimated {
            "holds (estimated)"
        } else {
            "holds"
        };
        let _ = writeln!(o, "{:>16}{what}: {}", "", held.join(", "));
    }
}

/// A site's stack, innermost frames last, and why it may be incomplete.
fn stack_lines(o: &mut String, s: &SiteReport, verbose: bool, all_native: bool) {
    let frames: Vec<&StackEntry> = s
        .stack
        .iter()
        .filter(|e| all_native || !e.hidden())
        .collect();
    // The innermost frames matter most: cut from the outer end.
    let shown = if verbose {
        frames.len()
    } else {
        frames.len().min(MAX_FRAMES_SHOWN)
    };
    if s.python_truncated || frames.len() > shown {
        let _ = writeln!(o, "{:>60}", "… outer frames omitted (--verbose shows all)");
    }
    for e in &frames[frames.len() - shown..] {
        let text = match e {
            StackEntry::Python { frame } => frame.display(),
            StackEntry::Native { frame, .. } => frame.display(),
        };
        let _ = writeln!(o, "{:>58}  {}", "", text);
    }
    if s.native_unwind != UnwindEnd::Complete && !s.stack.is_empty() {
        let _ = writeln!(
            o,
            "{:>58}  (native stack incomplete: {})",
            "",
            s.native_unwind.describe()
        );
    }
    if s.python_status == PythonStatus::Overflow {
        let _ = writeln!(
            o,
            "{:>58}  (Python stacks merged: the site table was full; raise --max-sites)",
            ""
        );
    }
    if frames.is_empty() && s.python_status == PythonStatus::NoThreadState {
        let _ = writeln!(
            o,
            "{:>58}  (no Python stack: the thread held no Python thread state)",
            ""
        );
    }
}

/// The live Python objects by type: the twelve that grew most, and the free-list caveat.
fn census_table(o: &mut String, c: &TypeCensus) {
    let since = match (&c.baseline, c.baseline_t) {
        (Some(words), _) => format!("growth since {words}"),
        (None, Some(t)) => format!("growth since {t:.1} s"),
        (None, None) => "no baseline: growth is the whole count".into(),
    };
    let _ = writeln!(
        o,
        "\nLive Python objects by type ({} objects; {since}; {} blocks hold no object, {} \
         unreadable{}):",
        group(c.objects),
        group(c.not_objects),
        group(c.unreadable),
        if c.torn_pools > 0 {
            format!(
                ", {} pymalloc pools skipped as torn (read while the target ran)",
                group(c.torn_pools)
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "{:>12} {:>12} {:>14}  TYPE",
        "GROWTH", "OBJECTS", "BYTES"
    );
    for ty in c.types.iter().take(12) {
        let _ = writeln!(o, "{}", ty.growth_row());
    }
    let recycled = ["dict", "list", "tuple", "float"];
    if c.types
        .iter()
        .take(12)
        .any(|t| recycled.contains(&t.name.as_str()))
    {
        let _ = writeln!(
            o,
            "  (dicts, lists, tuples and floats that CPython's free lists hand out again never \
             reach the allocator: up to ~80 of each are not counted; docs/analysis.md)"
        );
    }
}

fn is_drop_name(name: &str) -> bool {
    leaktrace_ebpf::Counter::ALL
        .iter()
        .any(|c| c.is_drop() && c.name() == name)
}

pub use crate::units::group;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(4_096_000), "4,096,000");
    }
}
