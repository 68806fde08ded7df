//! What a tracing session is asked to do: the target, the cost tier, and every option the
//! command line sets. `cli` builds these, `session` runs them and `capture` records them; none
//! of those three imports another for it.

use std::path::PathBuf;
use std::time::Duration;

use leaktrace_ebpf::DEFAULT_TABLE_ENTRIES;

use crate::probes::loader::LoadOptions;
use crate::probes::plan::Families;
use crate::report::ReportOptions;

/// Live heap a sampled session's default tables hold samples for.
const SAMPLED_HEAP_CAPACITY: u64 = 64 << 30;
/// The least default capacity of a sampled session's tables.
const SAMPLED_TABLE_MIN: u64 = 1 << 16;

/// What to trace.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// A running process.
    Pid(u32),
    /// A command to start under tracing.
    Command {
        argv: Vec<String>,
        pymalloc: PyMallocMode,
    },
}

/// The cost tier: what is traced, and how completely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMode {
    /// Every allocation and free.
    Exact,
    /// Allocations sampled by bytes, one per `rate` on average.
    Sampled { rate: u64 },
    /// Page faults (resident memory growth), sampled one per `rate` bytes.
    Growth { rate: u64 },
}

/// The cost tier without its rate: what reports and captures name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKind {
    #[default]
    Exact,
    Sampled,
    Growth,
}

impl std::fmt::Display for ModeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModeKind::Exact => "exact",
            ModeKind::Sampled => "sampled",
            ModeKind::Growth => "growth",
        })
    }
}

impl TraceMode {
    /// Bytes per sample, 0 for exact.
    pub fn rate(self) -> u64 {
        match self {
            TraceMode::Exact => 0,
            TraceMode::Sampled { rate } | TraceMode::Growth { rate } => rate,
        }
    }

    /// Bytes per sample, `None` for exact.
    pub fn sample_rate(self) -> Option<u64> {
        (self.rate() > 0).then_some(self.rate())
    }

    /// Default capacity of the kernel's `LIVE` and `SITES` tables (`--max-live`,
    /// `--max-sites`). A sampled session holds one entry per live sample, so its tables are
    /// sized for `SAMPLED_HEAP_CAPACITY` of live heap at its interval: creating, walking and
    /// freeing a hash map costs in proportion to its capacity, and a million-entry pair made a
    /// tenth of a sampled session's start-up (docs/lifecycle.md, "BPF maps and their sizes").
    pub fn default_table_entries(self) -> u32 {
        match self {
            TraceMode::Sampled { rate } if rate > 0 => (SAMPLED_HEAP_CAPACITY / rate)
                .clamp(SAMPLED_TABLE_MIN, u64::from(DEFAULT_TABLE_ENTRIES))
                .next_power_of_two() as u32,
            _ => DEFAULT_TABLE_ENTRIES,
        }
    }

    /// The tier, as reports name it.
    pub fn kind(self) -> ModeKind {
        match self {
            TraceMode::Exact => ModeKind::Exact,
            TraceMode::Sampled { .. } => ModeKind::Sampled,
            TraceMode::Growth { .. } => ModeKind::Growth,
        }
    }
}

/// How to trace.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub mode: TraceMode,
    pub families: Families,
    pub load: LoadOptions,
    /// `attach`: how long to trace before detaching.
    pub duration: Option<Duration>,
    /// Print a progress line on stderr this often.
    pub interval: Option<Duration>,
    pub verbose: bool,
    pub report: ReportOptions,
    pub json: Option<PathBuf>,
    /// Record a capture file here as tracing goes (`-o`).
    pub capture: Option<PathBuf>,
    /// Serve Prometheus metrics here (`--prometheus`).
    pub prometheus: Option<std::net::SocketAddr>,
    /// Queries on standard input, answers on standard output (`--control`, `session::control`).
    pub control: bool,
    /// `attach --redirect-pymalloc`: switch a stripped interpreter's allocator tables while
    /// attached (`probes::redirect`).
    pub redirect_pymalloc: bool,
    /// Who decides which allocation to sample in sampled mode.
    pub sampler: Sampler,
    /// `run --mode sampled`: the preloaded sampler's ceiling on samples a second
    /// (`--sample-limit`, 0 with `--sample` alone; `None` keeps the library's default).
    pub sample_limit: Option<u64>,
}

/// Who decides which allocation to sample in sampled mode (`--sampler`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Sampler {
    /// The process itself, through the heap-sampling USDTs: `run` starts the command with
    /// leaktrace's preloaded sampler, `attach` uses them where the process has them (a trap per
    /// sample); elsewhere the kernel samples.
    #[default]
    Process,
    /// The kernel, after a probe on every allocator call.
    Kernel,
}

impl TraceOptions {
    /// Whether the process samples itself: sampled mode, and the process sampler chosen.
    pub fn samples_in_process(&self) -> bool {
        matches!(self.mode, TraceMode::Sampled { .. }) && self.sampler == Sampler::Process
    }
}

/// What `run` does about Python's allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PyMallocMode {
    Auto,
    Keep,
    Malloc,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_tables_hold_64_gib_of_samples_within_bounds() {
        let sampled = |rate| TraceMode::Sampled { rate }.default_table_entries();
        assert_eq!(sampled(512 << 10), 1 << 17);
        // Past the ceiling (a small interval) and under the floor (a huge one).
        assert_eq!(sampled(4096), DEFAULT_TABLE_ENTRIES);
        assert_eq!(sampled(64 << 20), 1 << 16);
        // Not a power of two: rounded up, never down.
        assert_eq!(sampled(300 << 10), 1 << 18);
        assert_eq!(
            TraceMode::Exact.default_table_entries(),
            DEFAULT_TABLE_ENTRIES
        );
        let growth = TraceMode::Growth { rate: 512 << 10 };
        assert_eq!(growth.default_table_entries(), DEFAULT_TABLE_ENTRIES);
    }
}
