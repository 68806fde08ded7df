//! Metrics in Prometheus' text exposition format (0.0.4, what `promtool check metrics` reads): RSS, live bytes and objects, the top stacks
//! (a bounded number, labelled by their innermost frames), drop counters, and the tracer's own
//! CPU and memory.

use std::collections::HashMap;

use leaktrace_ebpf::Counter;
use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use super::frames::short_name;
use super::Report;
use crate::heap::Sample;

/// Stacks exported, at most: each is a label set, and a scrape target's series must stay few.
pub const TOP_STACKS: usize = 10;

/// leaktrace's own cost, as the metrics show it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracerUsage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

impl TracerUsage {
    /// This process's CPU time and RSS, from /proc.
    pub fn of_self() -> Self {
        let me = crate::process::Process {
            pid: std::process::id(),
        };
        Self {
            cpu_seconds: me.cpu_seconds().unwrap_or(0.0),
            resident_bytes: me.rss_bytes().unwrap_or(0),
        }
    }
}

/// The exposition of a report (its first `TOP_STACKS` sites) at point `p`.
pub fn encode_metrics(r: &Report, p: &Sample, usage: TracerUsage) -> String {
    let labels = HashMap::from([("pid".to_string(), r.target.pid.to_string())]);
    let reg = Registry::new_custom(Some("leaktrace".into()), Some(labels)).expect("a valid prefix");
    process_metrics(&reg, r, p);
    drop_metrics(&reg, r);
    stack_metrics(&reg, r);
    tracer_metrics(&reg, usage);
    TextEncoder::new()
        .encode_to_string(&reg.gather())
        .unwrap_or_default()
}

/// Registers a metric.
fn put(reg: &Registry, c: Box<dyn Collector>) {
    // Names and label names are fixed and valid: registering cannot fail.
    reg.register(c).expect("valid metric");
}

/// A gauge set to `v`.
fn gauge(name: &str, help: &str, v: i64) -> Box<IntGauge> {
    let g = IntGauge::new(name, help).expect("valid name");
    g.set(v);
    Box::new(g)
}

/// A counter at `v`.
fn counter(name: &str, help: &str, v: u64) -> Box<IntCounter> {
    let c = IntCounter::new(name, help).expect("valid name");
    c.inc_by(v);
    Box::new(c)
}

/// The traced process at point `p`: its memory, live traced bytes and blocks, suspects, and
/// the allocations and frees seen.
fn process_metrics(reg: &Registry, r: &Report, p: &Sample) {
    if let Some(rss) = p.rss_bytes {
        put(
            reg,
            gauge(
                "rss_bytes",
                "Resident memory of the traced process",
                rss as i64,
            ),
        );
    }
    if let Some(a) = p.arena_bytes {
        put(
            reg,
            gauge(
                "pymalloc_arena_bytes",
                "Memory in pymalloc's arenas",
                a as i64,
            ),
        );
    }
    put(
        reg,
        gauge(
            "live_bytes",
            "Traced memory allocated and not yet freed",
            p.live_bytes as i64,
        ),
    );
    put(
        reg,
        gauge(
            "live_objects",
            "Traced blocks allocated and not yet freed",
            p.live_count as i64,
        ),
    );
    put(
        reg,
        gauge(
            "leak_suspects",
            "Stacks classified as leaks with confidence of at least 0.9",
            r.suspects as i64,
        ),
    );
    put(
        reg,
        counter("allocations_total", "Allocations traced", p.allocs),
    );
    put(reg, counter("frees_total", "Frees traced", p.frees));
}

/// Every drop counter, zero or not, labelled by reason.
fn drop_metrics(reg: &Registry, r: &Report) {
    let drops = IntCounterVec::new(
        Opts::new(
            "dropped_events_total",
            "Allocations or announcements lost, by reason",
        ),
        &["reason"],
    )
    .expect("valid name");
    for c in Counter::ALL.iter().filter(|c| c.is_drop()) {
        let v = r.counters.get(c.name()).copied().unwrap_or(0);
        drops.with_label_values(&[c.name()]).inc_by(v);
    }
    // Sites whose stack record the full ring buffer swallowed: a loss the report counts in
    // `dropped`, so the metrics count it too.
    drops
        .with_label_values(&["sites_without_stack"])
        .inc_by(r.sites_without_stack as u64);
    put(reg, Box::new(drops));
}

/// Live bytes, blocks and growth of the first `TOP_STACKS` sites, labelled by rank, short
/// name and verdict.
fn stack_metrics(reg: &Registry, r: &Report) {
    let stack_labels = ["rank", "stack", "verdict"];
    let vec = |name: &str, help: &str| {
        GaugeVec::new(Opts::new(name, help), &stack_labels).expect("valid name")
    };
    let bytes = vec(
        "stack_live_bytes",
        "Unfreed memory of the top stacks (suspects first, then by bytes)",
    );
    let objects = vec("stack_live_objects", "Unfreed blocks of the top stacks");
    let growth = vec(
        "stack_growth_bytes_per_second",
        "Least-squares growth of the top stacks' live bytes",
    );
    for (i, s) in r.sites.iter().take(TOP_STACKS).enumerate() {
        let rank = (i + 1).to_string();
        let values = [rank.as_str(), &short_name(s), s.analysis.class.name()];
        bytes.with_label_values(&values).set(s.unfreed_bytes as f64);
        objects
            .with_label_values(&values)
            .set(s.unfreed_count as f64);
        growth
            .with_label_values(&values)
            .set(s.analysis.growth_bytes_per_s);
    }
    put(reg, Box::new(bytes));
    put(reg, Box::new(objects));
    put(reg, Box::new(growth));
}

/// What leaktrace itself costs: its CPU time and resident memory.
fn tracer_metrics(reg: &Registry, usage: TracerUsage) {
    let cpu =
        prometheus::Counter::new("tracer_cpu_seconds_total", "CPU time leaktrace itself used")
            .expect("valid name");
    cpu.inc_by(usage.cpu_seconds);
    put(reg, Box::new(cpu));
    put(
        reg,
        gauge(
            "tracer_resident_bytes",
            "Resident memory of leaktrace itself",
            usage.resident_bytes as i64,
        ),
    );
}
