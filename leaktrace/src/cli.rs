//! Command-line interface (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::capture::render::{Format, RenderOptions};
use crate::error::Error;
use crate::options::{PyMallocMode, Sampler, TraceMode, TraceOptions};
use crate::probes::loader::LoadOptions;
use crate::probes::plan::Families;
use crate::report::ReportOptions;

/// Find memory leaks in running Python processes — C extensions included — with eBPF.
#[derive(Debug, Parser)]
#[command(name = "leaktrace", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a command under tracing; report what it left unfreed when it exits (or at Ctrl-C).
    Run {
        #[command(flatten)]
        opts: CommonOpts,
        /// Python allocator for the command: with `--python-allocators`, `auto` starts a Python
        /// whose pymalloc functions are not in a symbol table (stripped, LTO builds such as
        /// Debian's) with PYTHONMALLOC=malloc, so every allocation is seen; `keep` never changes
        /// it; `malloc` always sets it.
        #[arg(long, value_enum, default_value_t = PyMallocMode::Auto)]
        pymalloc: PyMallocMode,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Trace a running process for a window, report what was allocated and not freed, detach.
    Attach {
        /// The process to trace.
        #[arg(short, long)]
        pid: u32,
        /// Seconds to trace (default: until Ctrl-C or the target exits).
        #[arg(short, long, value_name = "SECONDS")]
        duration: Option<f64>,
        #[command(flatten)]
        opts: CommonOpts,
    },
    /// A live terminal view of a running process: top stacks by live bytes or growth rate,
    /// refreshed each interval (`s` sorts, `q` quits and prints the report).
    Top {
        /// The process to watch.
        #[arg(short, long)]
        pid: u32,
        #[command(flatten)]
        opts: CommonOpts,
    },
    /// Render a capture (`-o FILE`) as a table, JSON, flamegraph, HTML, pprof or CSV.
    Report(ReportArgs),
    /// Count a running process's live Python objects by type, from outside, those made before
    /// too (all of 512 B or less, and larger ones the collector tracks): no probe, no pause.
    /// With `--count`, growth per type.
    Snapshot(SnapshotArgs),
    /// Write the in-process heap sampler library and print its path, for services started with
    /// `LD_PRELOAD=$(leaktrace preload)`: it costs a branch per allocation until leaktrace
    /// attaches in sampled mode, then fires the heap-sampling USDTs on sampled allocations only.
    Preload {
        /// Directory to write it to (default: /var/lib/leaktrace as root, else
        /// ~/.cache/leaktrace).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Compare two JSON reports (`--json`), e.g. of an old and a new version: unfreed memory
    /// per stack in each, matched by symbolized frames, largest growth first.
    Diff {
        /// The report to compare against.
        old: PathBuf,
        /// The newer report.
        new: PathBuf,
        /// Show the N stacks that changed most.
        #[arg(long, default_value_t = 20, value_name = "N")]
        top: usize,
        /// Also write the comparison as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// Options of `leaktrace snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The process to read.
    #[arg(short, long)]
    pub pid: u32,
    /// Snapshots to take; with more than one, growth per type from the first to the last.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub count: u32,
    /// Seconds between snapshots.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_interval)]
    pub interval: f64,
    /// Types listed in the table.
    #[arg(long, default_value_t = 30, value_name = "N", value_parser = at_least_one)]
    pub top: usize,
    /// Also write the snapshot as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Stop the target (SIGSTOP) for each walk, so that the counts are one moment of its heap;
    /// it is continued after the walk, or by a watcher process if leaktrace dies. The pause is
    /// printed. Without it the target is never stopped.
    #[arg(long)]
    pub freeze: bool,
    /// Why objects are alive: the shortest reference chains from the roots (modules, thread
    /// frames) to a few objects of this type (as the table names it) or to the object at this
    /// address (`id(obj)`, decimal or 0x…).
    #[arg(long, value_name = "TYPE|ADDRESS")]
    pub why: Option<crate::analysis::why::Target>,
    /// How many objects `--why` explains.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = at_least_one)]
    pub why_samples: usize,
}

/// A snapshot interval: from 0.01 s to a day.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("expected seconds from 0.01 to 86400, not {s:?}")),
    }
}

/// Options of `leaktrace report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The capture (`run -o FILE`, `attach -o FILE`).
    pub capture: PathBuf,
    /// What to write.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stacks listed in the table, JSON and HTML, and columns of the CSV (flamegraphs and pprof
    /// hold every stack).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub top: usize,
    /// Leave out stacks holding less than SIZE.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    pub min_size: u64,
    /// Native frames shown (as for `run`).
    #[arg(long, value_enum, default_value_t = NativeFrames::Auto)]
    pub native_frames: NativeFrames,
    /// Flamegraph of the bytes each stack gained from SECONDS into the trace to its end.
    #[arg(long, value_name = "SECONDS")]
    pub growth_since: Option<f64>,
    /// The report as of SECONDS into the trace.
    #[arg(long, value_name = "SECONDS")]
    pub until: Option<f64>,
    /// More detail (the table's probe list).
    #[arg(short, long)]
    pub verbose: bool,
}

impl ReportArgs {
    /// The rendering these flags ask for.
    pub fn render_options(&self) -> RenderOptions {
        RenderOptions {
            format: self.format,
            report: ReportOptions {
                top: self.top,
                min_size: self.min_size,
                all_native_frames: self.native_frames == NativeFrames::All,
            },
            growth_since: self.growth_since,
            until: self.until,
            verbose: self.verbose,
        }
    }
}

/// How much to trace, and at what cost (see the README's "Which mode when").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Every allocation and free: exact figures, about 1–2 µs per allocator call.
    Exact,
    /// Allocations sampled by bytes (Poisson): unbiased estimates at a fraction of the cost.
    Sampled,
    /// No allocator probes: pages the process touches for the first time, by stack.
    Growth,
}

/// `attach` windows up to this long default to exact mode; longer or open-ended ones sample.
pub const EXACT_ATTACH_WINDOW_S: f64 = 60.0;
/// Default bytes per sample in sampled mode (tcmalloc's heap-profiling default).
pub const DEFAULT_SAMPLE_RATE: u64 = 512 << 10;
/// Default bytes per sample in growth mode: one page fault in 64. A numpy loop that makes
/// 100,000 pages resident a second spent 5 % more time at one in 16 (each sampled fault walks
/// the stack), 1–2 % at one in 64.
pub const DEFAULT_GROWTH_RATE: u64 = 256 << 10;

/// Which native frames reports show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeFrames {
    Auto,
    All,
}

/// The longest `--duration` or `--interval` accepted, in seconds.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, not {s:?}")),
    }
}

/// Options shared by `run` and `attach`.
#[derive(Debug, Args)]
pub struct CommonOpts {
    /// Show the N sites with the most unfreed bytes.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = at_least_one)]
    pub top: usize,
    /// Ignore allocations smaller than this (bytes; k/M/G and KiB/MiB/GiB suffixes accepted).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    pub min_size: u64,
    /// Print a progress line on stderr every S seconds.
    #[arg(long, value_name = "SECONDS")]
    pub interval: Option<f64>,
    /// Trace only libc's allocator.
    #[arg(long, conflicts_with_all = ["python_only", "python_allocators"])]
    pub libc_only: bool,
    /// Trace only the Python allocator, every call (fails on non-Python targets).
    #[arg(long)]
    pub python_only: bool,
    /// Trace every call of Python's allocator too (pymalloc: objects of 512 B or less). By
    /// default those are seen as the 1 MiB arenas they fill and counted by type in the census,
    /// which costs nothing per object; this shows each object's own stack and exact bytes, at
    /// one trap per call (several times slower on object-heavy programs).
    #[arg(long)]
    pub python_allocators: bool,
    /// `attach` to a stripped, LTO-built interpreter (Debian's, Ubuntu's `/usr/bin/python3.x`):
    /// see every Python allocation without a restart, by pointing the interpreter's object and
    /// mem allocator tables' malloc and calloc at the raw allocator while attached (restored at
    /// detach; the target runs slower meanwhile, as under PYTHONMALLOC=malloc). Implies
    /// `--python-allocators`.
    #[arg(long, conflicts_with_all = ["libc_only"])]
    pub redirect_pymalloc: bool,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Record a capture to FILE as tracing goes (a crash loses at most the last interval);
    /// `leaktrace report FILE` renders it later, elsewhere, in any format.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub capture: Option<PathBuf>,
    /// Show probe placements and more detail.
    #[arg(short, long)]
    pub verbose: bool,
    /// Capacity of the kernel's live-allocation table; allocations beyond it are counted as
    /// dropped. Default 1,048,576; in sampled mode, enough samples for 64 GiB of live heap at
    /// the interval (131,072 at 512 KiB), 65,536 at least.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_live: Option<u32>,
    /// Capacity of the kernel's site table (distinct allocator × caller × Python stack); when it
    /// is full, new stacks are counted under their native caller alone, and that is shown.
    /// Default as `--max-live`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sites: Option<u32>,
    /// Python frames to record per site (1–128); deeper stacks are cut and marked.
    #[arg(long, default_value_t = leaktrace_ebpf::DEFAULT_PY_DEPTH, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=leaktrace_ebpf::MAX_PY_FRAMES as i64))]
    pub python_depth: u32,
    /// Bytes of the allocating thread's stack copied for each new site, for unwinding its native
    /// frames (512 B – 60 KiB); a stack deeper than the copy is reported as truncated.
    #[arg(long, value_name = "SIZE", value_parser = parse_stack_copy, default_value = "16KiB")]
    pub stack_copy: u32,
    /// Native return addresses that tell two call paths apart in the kernel (1–16).
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub native_depth: u32,
    /// Native frames shown: `auto` hides the interpreter's own frames between Python frames
    /// (and the program's start-up frames); `all` shows every frame.
    #[arg(long, value_enum, default_value_t = NativeFrames::Auto)]
    pub native_frames: NativeFrames,
    /// What to trace: `exact` (every allocation; the default for `run` and for `attach` windows
    /// of up to 60 s), `sampled` (Poisson sampling by bytes; the default for longer or
    /// open-ended `attach`), or `growth` (no allocator probes: which stacks touch new pages).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// One sample per SIZE bytes on average, for sampled mode (default 512KiB; implies
    /// `--mode sampled` when no mode is given) and growth mode (default 256KiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_sample_rate)]
    pub sample: Option<u64>,
    /// Sampled mode: `process` has the process sample itself (`run` preloads leaktrace's
    /// sampler; `attach` uses a process's heap-sampling USDTs, `otel_memory` or `ddheap`, when
    /// it has them), so only sampled allocations trap; `kernel` probes every allocator call and
    /// samples in the kernel.
    #[arg(long, value_enum, default_value_t = Sampler::Process)]
    pub sampler: Sampler,
    /// `run --mode sampled`: the most samples a second the preloaded sampler takes (default
    /// 4000, or none when `--sample` is given; 0 for none). Above it the sampler keeps one
    /// sample in k, each counting for k, until allocation slows; estimates stay unbiased, and
    /// the report says how far it went. A sampler already running keeps its own
    /// (`LEAKTRACE_SAMPLE_LIMIT`).
    #[arg(long, value_name = "N")]
    pub sample_limit: Option<u64>,
    /// Also trace the processes the target forks (pre-fork servers, multiprocessing pools):
    /// each is stopped at its first instruction until its probes are attached.
    #[arg(long)]
    pub follow_forks: bool,
    /// CI gate: exit with status 10, listing the stacks, when leak suspects hold more than SIZE
    /// (`10MB`, `512KiB`, bytes). A trace too short to classify (under three intervals; see
    /// `--interval`) counts everything unfreed.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub fail_over: Option<u64>,
    /// Stacks the gate ignores: a file of glob patterns, one per line, matched against each
    /// frame (`*leakyext.c*`, `leak:known_cache`, `*/vendor/*`).
    #[arg(long, value_name = "FILE", requires = "fail_over")]
    pub suppressions: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics while tracing (e.g. 127.0.0.1:9464):
    /// RSS, live bytes and objects per top-10 stack, drops, leaktrace's own CPU and memory.
    #[arg(long, value_name = "ADDR")]
    pub prometheus: Option<std::net::SocketAddr>,
    /// `attach`: answer queries while tracing, for tools that drive leaktrace (the pytest
    /// plugin): one request a line on standard input (`mark`, `live SINCE_NS [TOP]`,
    /// `redirect`, `restore`, `stop`), one JSON line each on standard output; the final report
    /// goes to standard error; end of input ends the session (docs/control.md).
    #[arg(long)]
    pub control: bool,
    /// Benchmark only: attach the same probes with programs that return at once.
    #[arg(long, hide = true)]
    pub probe_floor: bool,
}

impl CommonOpts {
    /// The mode these flags ask for; `attach` is true for `attach` (open-ended windows sample).
    pub fn trace_mode(&self, attach: bool, duration: Option<f64>) -> Result<TraceMode, Error> {
        let mode = match (self.mode, self.sample) {
            (Some(m), _) => m,
            (None, Some(_)) => ModeArg::Sampled,
            (None, None) if attach && duration.is_none_or(|d| d > EXACT_ATTACH_WINDOW_S) => {
                ModeArg::Sampled
            }
            (None, None) => ModeArg::Exact,
        };
        Ok(match mode {
            ModeArg::Exact if self.sample.is_some() => {
                return Err(Error::Usage(
                    "--sample needs --mode sampled or growth, not exact".into(),
                ))
            }
            ModeArg::Exact => TraceMode::Exact,
            ModeArg::Sampled => TraceMode::Sampled {
                rate: self.sample.unwrap_or(DEFAULT_SAMPLE_RATE),
            },
            ModeArg::Growth => TraceMode::Growth {
                rate: self.sample.unwrap_or(DEFAULT_GROWTH_RATE),
            },
        })
    }

    /// Converts the flags into session options.
    pub fn trace_options(
        &self,
        attach: bool,
        duration: Option<f64>,
    ) -> Result<TraceOptions, Error> {
        let mode = self.trace_mode(attach, duration)?;
        if self.redirect_pymalloc && !attach {
            return Err(Error::Usage(
                "--redirect-pymalloc is for attach: run starts a stripped interpreter with \
                 PYTHONMALLOC=malloc instead (--pymalloc auto)"
                    .into(),
            ));
        }
        if self.sample_limit.is_some()
            && (attach
                || !matches!(mode, TraceMode::Sampled { .. })
                || self.sampler != Sampler::Process)
        {
            return Err(Error::Usage(
                "--sample-limit is for run --mode sampled, whose preloaded sampler it sets; a \
                 sampler already running keeps the ceiling it started with (LEAKTRACE_SAMPLE_LIMIT \
                 in its environment)"
                    .into(),
            ));
        }
        // Bounded so that no value can overflow a deadline or flood the terminal.
        let secs = |v: f64, what: &str, min: f64| match Duration::try_from_secs_f64(v) {
            Ok(d) if v >= min && v <= MAX_SECONDS => Ok(d),
            _ => Err(Error::Usage(format!(
                "{what} must be a number of seconds from {min} to {MAX_SECONDS} (a year), not {v}"
            ))),
        };
        Ok(TraceOptions {
            families: if self.libc_only {
                Families::LibcOnly
            } else if self.python_only {
                Families::PythonOnly
            } else if self.python_allocators || self.redirect_pymalloc {
                Families::LibcAndPythonCalls
            } else {
                Families::LibcAndArenas
            },
            load: LoadOptions {
                min_size: self.min_size,
                floor: self.probe_floor,
                max_live: self.max_live.unwrap_or(mode.default_table_entries()),
                max_sites: self.max_sites.unwrap_or(mode.default_table_entries()),
                python_depth: self.python_depth,
                stack_copy: self.stack_copy,
                native_depth: self.native_depth,
                sample_rate: mode.rate(),
                growth: matches!(mode, TraceMode::Growth { .. }),
                follow_forks: self.follow_forks,
                lifecycle_pauses: !attach,
                in_process_sampling: matches!(mode, TraceMode::Sampled { .. })
                    && self.sampler == Sampler::Process,
            },
            mode,
            sampler: self.sampler,
            // An interval asked for is a density asked for: no ceiling raises it unless one is
            // asked for too.
            sample_limit: self.sample_limit.or(self.sample.map(|_| 0)),
            duration: duration.map(|d| secs(d, "--duration", 0.01)).transpose()?,
            interval: self
                .interval
                .map(|d| secs(d, "--interval", 0.1))
                .transpose()?,
            verbose: self.verbose,
            report: ReportOptions {
                top: self.top,
                min_size: self.min_size,
                all_native_frames: self.native_frames == NativeFrames::All,
            },
            json: self.json.clone(),
            capture: self.capture.clone(),
            prometheus: self.prometheus,
            control: self.control,
            redirect_pymalloc: self.redirect_pymalloc,
        })
    }
}

/// Parses `4096`, `4k`, `4KB`, `4KiB`, `1.5M`, `2GiB` into bytes (k/M/G are decimal, KiB/MiB/GiB binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    Ok((v * mult).round() as u64)
}

fn parse_sample_rate(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if (1..=leaktrace_ebpf::SAMPLE_MAX_RATE).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "--sample must be between 1 B and {} GiB",
            leaktrace_ebpf::SAMPLE_MAX_RATE >> 30
        ))
    }
}

fn parse_stack_copy(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    let max = (leaktrace_ebpf::MAX_STACK_COPY - 4096) as u64;
    if (512..=max).contains(&v) {
        Ok(v as u32)
    } else {
        Err(format!(
            "--stack-copy must be between 512 B and {} KiB",
            max / 1024
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4000));
        assert_eq!(parse_size("512KiB"), Ok(524_288));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn cli_parses_run_and_attach() {
        let c = Cli::try_parse_from([
            "leaktrace",
            "run",
            "--top",
            "5",
            "--",
            "python3",
            "-c",
            "pass",
        ])
        .unwrap();
        match c.command {
            Command::Run {
                opts,
                command,
                pymalloc,
            } => {
                assert_eq!(pymalloc, PyMallocMode::Auto);
                assert_eq!(opts.top, 5);
                assert_eq!(command, ["python3", "-c", "pass"]);
            }
            _ => panic!(),
        }
        assert!(Cli::try_parse_from(["leaktrace", "attach"]).is_err());
        let mode = |args: &[&str]| {
            let c = Cli::try_parse_from(args).unwrap();
            match c.command {
                Command::Run { opts, .. } => opts.trace_mode(false, None).ok(),
                Command::Attach { opts, duration, .. } => opts.trace_mode(true, duration).ok(),
                Command::Top { opts, .. } => opts.trace_mode(true, None).ok(),
                Command::Diff { .. }
                | Command::Report(_)
                | Command::Snapshot(_)
                | Command::Preload { .. } => panic!("not a tracing command"),
            }
        };
        assert_eq!(mode(&["leaktrace", "run", "x"]), Some(TraceMode::Exact));
        assert_eq!(
            mode(&["leaktrace", "attach", "-p", "1", "-d", "30"]),
            Some(TraceMode::Exact)
        );
        assert_eq!(
            mode(&["leaktrace", "attach", "-p", "1"]),
            Some(TraceMode::Sampled { rate: 512 << 10 })
        );
        assert_eq!(
            mode(&["leaktrace", "run", "--sample", "64KiB", "x"]),
            Some(TraceMode::Sampled { rate: 64 << 10 })
        );
        assert_eq!(
            mode(&["leaktrace", "attach", "-p", "1", "--mode", "growth"]),
            Some(TraceMode::Growth { rate: 256 << 10 })
        );
        assert!(mode(&["leaktrace", "run", "--mode", "exact", "--sample", "1k", "x"]).is_none());
        assert!(Cli::try_parse_from([
            "leaktrace",
            "attach",
            "-p",
            "1",
            "--libc-only",
            "--python-only"
        ])
        .is_err());
    }
}
