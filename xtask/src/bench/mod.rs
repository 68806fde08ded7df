//! `cargo xtask bench`: what tracing costs and how accurate it is, side by side with the tools
//! users would pick instead — the untraced run, the probe floor (the same uprobes with programs
//! that return at once), leaktrace's three modes, `memray run --native` and Valgrind's memcheck.
//!
//! Each workload's loop times itself (`bench/_bench.py`: wall and CPU seconds of the loop alone,
//! peak RSS), so start-up and reports are not counted in the loop figures; the whole command's
//! wall time is shown beside them. Configurations alternate within each repetition; medians are
//! reported. It prints numbers, never a verdict.

mod accuracy;
mod fixed;
mod real;
mod scale;
mod soak;
mod tools;

use std::path::Path;

use anyhow::Result;

use crate::ext::build_extension;
use crate::{root, setup};
use accuracy::Truth;
use tools::{Measure, Tool, CONFIGS};

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
    let mut headline = Vec::new();
    for w in WORKLOADS.iter().filter(|w| wanted(w.script)) {
        let n = if quick {
            w.iterations / 4
        } else {
            w.iterations
        };
        let n_valgrind = (n / 20).max(200);
        let script = root().join(w.script);
        let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); CONFIGS.len()];
        let mut last: Vec<Option<Measure>> = vec![None; CONFIGS.len()];
        for rep in 0..reps {
            for (i, c) in CONFIGS.iter().enumerate() {
                let skip = match c.tool {
                    Tool::Memray(_) => !have_memray,
                    Tool::Valgrind => !have_valgrind || !w.valgrind || rep >= valgrind_reps,
                    _ => false,
                };
                if skip {
                    continue;
                }
                let iters = if c.tool == Tool::Valgrind {
                    n_valgrind
                } else {
                    n
                };
                let dir = scratch.join(format!("c{i}"));
                std::fs::create_dir_all(&dir)?;
                let m = tools::run(c.tool, &env, &script, iters, &dir, &[])?;
                runs[i].push(m.clone());
                last[i] = Some(m);
            }
        }
        let sums: Vec<Option<Summary>> = CONFIGS
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let iters = if c.tool == Tool::Valgrind {
                    n_valgrind
                } else {
                    n
                };
                summarize(iters, &runs[i])
            })
            .collect();
        let base = sums[0].as_ref().expect("untraced always runs");
        let per = |s: &Summary| s.loop_s / s.n as f64 * 1e9;
        println!("\n### {} — {} iterations\n", w.what, n);
        println!(
            "| configuration | loop median (s) | ns / iteration | ratio to untraced | loop CPU \
             ratio | target peak RSS | tracer CPU (s) | tracer peak RSS | whole command (s) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (c, s) in CONFIGS.iter().zip(&sums) {
            let Some(s) = s else { continue };
            let name = if s.n != n {
                format!("{} ({} iterations)", c.name, s.n)
            } else {
                c.name.to_string()
            };
            let cpu_ratio = (s.cpu_s / s.n as f64) / (base.cpu_s / base.n as f64);
            println!(
                "| {name} | {:.3} | {:.0} | {:.2}× | {:.2}× | {} | {} | {} | {:.1} |",
                s.loop_s,
                per(s),
                per(s) / per(base),
                cpu_ratio,
                mb(s.rss),
                s.tracer_cpu_s.map_or("—".into(), |c| format!("{c:.2}")),
                s.tracer_rss.map_or("—".into(), mb),
                s.wall_s
            );
        }
        let added = |i: usize| sums[i].as_ref().map(|s| per(s) - per(base));
        if let (Some(floor), Some(exact), Some(sampled)) = (added(1), added(2), added(3)) {
            if floor > 0.0 {
                println!(
                    "\nadded cost over the floor's: exact {:.2}×, sampled {:.2}×",
                    exact / floor,
                    sampled / floor
                );
                headline.push(format!(
                    "{}: exact {:.2}× the floor's added cost",
                    w.script,
                    exact / floor
                ));
            }
        }
        let slowdown = |i: usize| sums[i].as_ref().map(|s| per(s) / per(base));
        if let (Some(e), Some(m), Some(mp)) = (slowdown(2), slowdown(5), slowdown(6)) {
            headline.push(format!(
                "{}: exact {e:.2}× untraced; memray --native {m:.2}×, with \
                 --trace-python-allocators {mp:.2}×",
                w.script
            ));
        }
        if let (Some(e), Some(v)) = (slowdown(2), slowdown(7)) {
            headline.push(format!(
                "{}: Valgrind {v:.1}× untraced, exact {e:.2}× — Valgrind's added slowdown is \
                 {:.1}× exact's",
                w.script,
                (v - 1.0) / (e - 1.0).max(1e-9)
            ));
        }
        if let Some(truth) = &w.truth {
            println!("\nWhat each tool reported as leaked (truth: {} B under `{}`, allocated in `{}`):\n",
                (truth.bytes)(n), truth.python_fn, truth.native_fn);
            println!("| tool | iterations | truth (B) | reported (B) | error | Python line named | native function named | note |");
            println!("|---|---|---|---|---|---|---|---|");
            for (i, c) in CONFIGS.iter().enumerate() {
                let (Some(m), Some(s)) = (&last[i], &sums[i]) else {
                    continue;
                };
                if matches!(c.tool, Tool::Untraced) || c.name == "floor" {
                    continue;
                }
                let Some(f) = accuracy::found(c.tool, m, env.python, truth)? else {
                    continue;
                };
                let t = (truth.bytes)(s.n);
                let err = (f.bytes as f64 - t as f64) / t as f64 * 100.0;
                let yn = |b: bool| if b { "yes" } else { "no" };
                println!(
                    "| {} | {} | {t} | {} | {err:+.1} % | {} | {} | {} |",
                    c.name,
                    s.n,
                    f.bytes,
                    yn(f.python_named),
                    yn(f.native_named),
                    f.note
                );
            }
        }
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
