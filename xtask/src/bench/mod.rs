//! `cargo xtask bench`: what tracing costs and how accurate it is, side by side with the tools
//! users would pick instead — the untraced run, the probe floor (the same uprobes with programs
//! that return at once), leaktrace's three modes, `memray run --native` and Valgrind's memcheck.
//!
//! Each workload's loop times itself (`bench/_bench.py`: wall and CPU seconds of the loop alone,
//! peak RSS), so start-up and reports are not counted in the loop figures; the whole command's
//! wall time is shown beside them. Configurations alternate within each repetition; medians are
//! reported. It prints numbers, never a verdict.

mod accuracy;
mod cycles;
mod fixed;
mod interpreters;
mod plugin;
mod real;
mod sampling;
mod scale;
mod snapshot;
mod soak;
mod tools;
mod workload;

use std::path::Path;

use anyhow::{Context, Result};

use crate::ext::build_extension;
use crate::{root, setup};
use accuracy::Truth;
use fixed::probes_gone;
use tools::{Measure, Tool};

struct Workload {
    script: &'static str,
    what: &'static str,
    iterations: u64,
    /// Small enough for Valgrind (which runs it with a twentieth of the iterations).
    valgrind: bool,
    truth: Option<Truth>,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        script: "bench/malloc_free.py",
        what: "libc malloc+free pair (C extension ok(64), loop allocates nothing else)",
        iterations: 400_000,
        valgrind: true,
        truth: None,
    },
    Workload {
        script: "bench/pymalloc_pair.py",
        what: "pymalloc alloc+free pair (object()), 1 Python frame",
        iterations: 1_000_000,
        valgrind: true,
        truth: None,
    },
    Workload {
        script: "bench/pymalloc_deep.py",
        what: "pymalloc alloc+free pair (object()), 20 Python frames deep",
        iterations: 1_000_000,
        valgrind: false,
        truth: None,
    },
    Workload {
        script: "bench/alloc_heavy.py",
        what: "allocation-heavy pure-Python loop (dicts, lists, tuples, str made and dropped)",
        iterations: 300_000,
        valgrind: true,
        truth: None,
    },
    Workload {
        script: "bench/web_handler.py",
        what: "JSON request handler (parse, build, serialize; keeps one response in 200)",
        iterations: 100_000,
        valgrind: true,
        truth: None,
    },
    Workload {
        script: "bench/numpy_loop.py",
        what: "numpy loop (arrays of 8–800 kB created, combined, dropped)",
        iterations: 20_000,
        valgrind: false,
        truth: None,
    },
    Workload {
        script: "bench/ext_leak.py",
        what: "slow leak in the test C extension (4 KiB every 100 iterations, amid churn)",
        iterations: 200_000,
        valgrind: true,
        truth: Some(Truth {
            python_fn: "leak_slowly",
            native_fn: "leak_malloc",
            bytes: |n| n.div_ceil(100) * 4096,
        }),
    },
    Workload {
        script: "bench/numpy_leak.py",
        what: "leaking numpy workload (one 80 kB array in 50 kept in a global list)",
        iterations: 20_000,
        valgrind: false,
        truth: Some(Truth {
            python_fn: "keep",
            native_fn: "default_malloc",
            bytes: |n| n.div_ceil(50) * 80_000,
        }),
    },
];

/// The other build a bench part runs beside this one: `LEAKTRACE_COMPARE=/path/to/leaktrace`.
fn compare_build() -> Option<std::path::PathBuf> {
    std::env::var_os("LEAKTRACE_COMPARE").map(std::path::PathBuf::from)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Medians of a configuration's runs.
struct Summary {
    n: u64,
    loop_s: f64,
    cpu_s: f64,
    rss: u64,
    wall_s: f64,
    tracer_cpu_s: Option<f64>,
    tracer_rss: Option<u64>,
}

fn summarize(n: u64, runs: &[Measure]) -> Option<Summary> {
    if runs.is_empty() {
        return None;
    }
    let med = |f: fn(&Measure) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let opt = |f: fn(&Measure) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    Some(Summary {
        n,
        loop_s: med(|m| m.loop_s),
        cpu_s: med(|m| m.loop_cpu_s),
        rss: med(|m| m.target_rss as f64) as u64,
        wall_s: med(|m| m.wall_s),
        tracer_cpu_s: opt(|m| m.tracer_cpu_s),
        tracer_rss: opt(|m| m.tracer_rss.map(|r| r as f64)).map(|r| r as u64),
    })
}

pub fn bench(leaktrace: &Path, quick: bool, only: Option<&str>) -> Result<()> {
    let wanted = |part: &str| only.is_none_or(|o| part.contains(o));
    let python = setup::pyenv_python()?;
    let ext = build_extension(&python)?;
    let reps = if quick { 3 } else { 5 };
    let valgrind_reps = if quick { 1 } else { 2 };
    let have_memray = setup::has_module(&python, "memray");
    let have_valgrind = Path::new("/usr/bin/valgrind").exists();
    println!(
        "`cargo xtask bench{}` — {} repetitions ({} under Valgrind), configurations alternating; \
         CPython {} (pyenv); {}; {} cores",
        if quick { " --quick" } else { "" },
        reps,
        valgrind_reps,
        setup::PYENV_PYTHON,
        kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !have_memray || !have_valgrind {
        println!(
            "\n(missing: {}{}— `cargo xtask setup --bench` installs them)",
            if have_memray { "" } else { "memray " },
            if have_valgrind { "" } else { "valgrind " }
        );
    }
    let scratch = tempdir()?;
    let env = tools::Env {
        leaktrace,
        python: &python,
        ext: &ext,
    };
    let settings = workload::Settings {
        env: &env,
        scratch: &scratch,
        quick,
        reps,
        valgrind_reps,
        have_memray,
        have_valgrind,
    };
    let mut headline = Vec::new();
    for w in WORKLOADS.iter().filter(|w| wanted(w.script)) {
        workload::run(w, &settings, &mut headline)?;
    }
    if wanted("tracemalloc") {
        tracemalloc_comparison(&env, quick, &scratch)?;
    }
    if wanted("scale") {
        scale::run(&env, quick, &scratch)?;
    }
    if wanted("real-leaks") {
        real::run(leaktrace, reps, &scratch)?;
    }
    if wanted("fixed-cost") {
        fixed::fixed_cost(leaktrace, &python, reps, &scratch)?;
    }
    if wanted("interpreters") {
        interpreters::run(leaktrace, &ext, reps, quick, &scratch)?;
    }
    if wanted("pytest-plugin") {
        plugin::run_plugin(leaktrace, &python, &ext, reps, &scratch)?;
    }
    if wanted("sampling-cost") {
        sampling::run(&env, quick, &scratch)?;
    }
    if wanted("preload-cycles") {
        cycles::run(leaktrace, &python, &scratch)?;
    }
    if wanted("snapshot") {
        let py312 = crate::pythons::listed()
            .into_iter()
            .find(|p| p.version == "3.12")
            .context("tests/fixtures/pythons.txt lists no 3.12")?;
        snapshot::run(leaktrace, &py312.path, reps, &scratch)?;
    }
    // Half an hour: only when asked for by name.
    if only == Some("soak") {
        soak::run(leaktrace, &python, &scratch)?;
    }
    println!("\n### Headline ratios\n");
    for h in headline {
        println!("- {h}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Per-line unfreed bytes of the Python allocator: leaktrace exact against tracemalloc, on the
/// JSON handler (deterministic: both runs make the same objects).
fn tracemalloc_comparison(env: &tools::Env<'_>, quick: bool, scratch: &Path) -> Result<()> {
    let n = if quick { 25_000 } else { 100_000 };
    let script = root().join("bench/web_handler.py");
    let dir = scratch.join("tracemalloc");
    std::fs::create_dir_all(&dir)?;
    let tm = dir.join("tracemalloc.json");
    let vars = [("BENCH_TRACEMALLOC", tm.to_str().unwrap_or(""))];
    tools::run(Tool::Untraced, env, &script, n, &dir, &vars)?;
    let m = tools::run(
        Tool::Leaktrace(&["--mode", "exact", "--top", "100000"]),
        env,
        &script,
        n,
        &dir,
        &[],
    )?;
    // The handler's objects are made in its lines and in the json package it calls: the
    // innermost Python frame of an allocation is where both tools put it.
    let mine = |f: &str| f.ends_with("web_handler.py") || f.contains("/json/");
    let ours = accuracy::leaktrace_lines(m.output.as_deref().unwrap_or(&dir), mine)?;
    let theirs = accuracy::tracemalloc_lines(&tm, mine)?;
    println!("\n### Python allocator attribution: leaktrace exact against tracemalloc\n");
    println!(
        "`bench/web_handler.py` {n} iterations; unfreed bytes per line of the handler and the json \
         package at the end (tracemalloc's snapshot as the loop ends, leaktrace's at interpreter \
         shutdown; lines of imports made before tracemalloc started are left out):\n"
    );
    println!("| line | tracemalloc (B) | leaktrace exact (B) | difference |");
    println!("|---|---|---|---|");
    let mut keys: Vec<&String> = theirs.keys().chain(ours.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (t, o) = (
            theirs.get(k).copied().unwrap_or(0),
            ours.get(k).copied().unwrap_or(0),
        );
        // Lines tracemalloc never saw ran before it started (the imports before
        // `bench/_bench.py`'s): only leaktrace, tracing from the first instruction, has them.
        if t == 0 {
            continue;
        }
        let short = k.rsplit('/').next().unwrap_or(k);
        println!(
            "| {short} | {t} | {o} | {:+.1} % |",
            (o as f64 - t as f64) / t.max(1) as f64 * 100.0
        );
    }
    Ok(())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("leaktrace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("kernel {}", s.trim()))
        .unwrap_or_default()
}
