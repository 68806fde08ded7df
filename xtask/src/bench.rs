//! `cargo xtask bench`: the cost of tracing, per allocator call, against the untraced run and
//! against the floor (the same probes with programs that return at once).
//!
//! Each workload's loop times itself (`LOOP_SECONDS=`), so the tracer's start-up and report are
//! not counted. Configurations alternate within each repetition; medians are reported.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::ext::build_extension;
use crate::{root, setup};

struct Workload {
    script: &'static str,
    what: &'static str,
    iterations: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        script: "bench/malloc_free.py",
        what: "libc malloc+free pair (C extension ok(64), loop allocates nothing else)",
        iterations: 400_000,
    },
    Workload {
        script: "bench/pymalloc_pair.py",
        what: "pymalloc alloc+free pair (object()), 1 Python frame",
        iterations: 1_000_000,
    },
    Workload {
        script: "bench/pymalloc_deep.py",
        what: "pymalloc alloc+free pair (object()), 20 Python frames deep",
        iterations: 1_000_000,
    },
    Workload {
        script: "bench/alloc_heavy.py",
        what: "allocation-heavy pure-Python loop (dicts, lists, tuples, str made and dropped)",
        iterations: 300_000,
    },
    Workload {
        script: "bench/numpy_loop.py",
        what: "numpy loop (arrays of 8–800 kB created, combined, dropped)",
        iterations: 20_000,
    },
];

const CONFIGS: &[(&str, &[&str])] = &[
    ("untraced", &[]),
    ("floor", &["--probe-floor"]),
    ("exact", &[]),
    ("sampled 512 KiB", &["--mode", "sampled"]),
    ("growth", &["--mode", "growth"]),
];

fn loop_seconds(out: &[u8]) -> Option<f64> {
    String::from_utf8_lossy(out)
        .lines()
        .find_map(|l| l.strip_prefix("LOOP_SECONDS="))
        .and_then(|v| v.trim().parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn bench(leaktrace: &Path, quick: bool) -> Result<()> {
    let python = setup::pyenv_python()?;
    let ext = build_extension(&python)?;
    let reps = if quick { 3 } else { 7 };
    println!("## Cost per traced allocator call\n");
    println!(
        "`cargo xtask bench{}` — {} repetitions, configurations alternating; CPython {} (pyenv); {}",
        if quick { " --quick" } else { "" },
        reps,
        setup::PYENV_PYTHON,
        kernel()
    );
    for w in WORKLOADS {
        let n = if quick {
            w.iterations / 4
        } else {
            w.iterations
        };
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
        for _ in 0..reps {
            for (i, (name, flags)) in CONFIGS.iter().enumerate() {
                let script = root().join(w.script);
                let mut cmd = if *name == "untraced" {
                    let mut c = Command::new(&python);
                    c.arg(&script);
                    c
                } else {
                    let mut c = Command::new(leaktrace);
                    c.arg("run")
                        .args(*flags)
                        .arg("--")
                        .arg(&python)
                        .arg(&script);
                    c
                };
                cmd.arg(&ext).arg(n.to_string());
                let out = cmd.output().with_context(|| format!("running {name}"))?;
                let secs = loop_seconds(&out.stdout).with_context(|| {
                    format!(
                        "{name}: no LOOP_SECONDS in output: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
                times[i].push(secs);
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        let per = |s: f64| s / n as f64 * 1e9;
        println!("\n### {} — {} iterations\n", w.what, n);
        println!("| configuration | loop median (s) | ns / iteration | added ns / iteration | ratio to untraced |");
        println!("|---|---|---|---|---|");
        for (i, (name, _)) in CONFIGS.iter().enumerate() {
            println!(
                "| {name} | {:.3} | {:.0} | {:.0} | {:.2}× |",
                med[i],
                per(med[i]),
                per(med[i]) - per(med[0]),
                med[i] / med[0]
            );
        }
        let floor_added = per(med[1]) - per(med[0]);
        let exact_added = per(med[2]) - per(med[0]);
        let sampled_added = per(med[3]) - per(med[0]);
        if floor_added > 0.0 {
            println!(
                "\nadded cost over the floor's: exact {:.2}×, sampled {:.2}×",
                exact_added / floor_added,
                sampled_added / floor_added
            );
        }
    }
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("kernel {}", s.trim()))
        .unwrap_or_default()
}
