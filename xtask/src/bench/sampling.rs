//! `cargo xtask bench --only sampling-cost`: the production-sampling targets of issue 17 measured
//! the way a noisy two-core VM allows. The three workloads the target names run untraced, with
//! the sampler preloaded and idle, and under `run --mode sampled` (in-process and kernel
//! sampler), many times. Each repetition runs every configuration back to back in an order that
//! rotates, and each traced run is divided by the untraced run of its own repetition: the host's
//! slow minutes then slow both sides of a ratio. Reported: the median of those paired ratios with
//! their quartiles, the ratio of the fastest loops (the host's noise only ever adds time, so the
//! minimum is the steadiest figure of what the code costs, as `timeit` reports), and the whole
//! command's extra wall time. With
//! `LEAKTRACE_COMPARE=/path/to/leaktrace`, another build's `run --mode sampled` takes its turn too.

use std::path::Path;

use anyhow::Result;

use super::median;
use super::tools::{self, Env, Measure, Tool};
use crate::root;

/// The workloads of issue 17's target, with their iterations.
const WORKLOADS: &[(&str, u64)] = &[
    ("bench/alloc_heavy.py", 1_000_000),
    ("bench/web_handler.py", 100_000),
    ("bench/numpy_loop.py", 20_000),
];

/// The configurations: the first is the untraced reference.
const CONFIGS: &[(&str, Tool)] = &[
    ("untraced", Tool::Untraced),
    ("sampler preloaded, no tracer (idle)", Tool::Preloaded),
    (
        "run --mode sampled (in-process sampler)",
        Tool::Leaktrace(&["--mode", "sampled"]),
    ),
    (
        "run --mode sampled --sampler kernel",
        Tool::Leaktrace(&["--mode", "sampled", "--sampler", "kernel"]),
    ),
];

/// Another build's `run --mode sampled`, with `LEAKTRACE_COMPARE=/path/to/leaktrace`.
const COMPARED: (&str, Tool) = (
    "run --mode sampled, LEAKTRACE_COMPARE build",
    Tool::Leaktrace(&["--mode", "sampled"]),
);

/// The configurations measured: `CONFIGS`, then the compared build's, if any.
fn configs() -> Vec<(&'static str, Tool)> {
    let mut all = CONFIGS.to_vec();
    if super::compare_build().is_some() {
        all.push(COMPARED);
    }
    all
}

/// Runs every workload `reps` times under every configuration and prints one table each.
pub fn run(env: &Env<'_>, quick: bool, scratch: &Path) -> Result<()> {
    let reps = if quick { 5 } else { 11 };
    let configs = configs();
    println!(
        "\n## Sampling cost: paired ratios ({reps} repetitions, each configuration divided by \
         the untraced run of its own repetition; order rotates)\n"
    );
    for &(script, iterations) in WORKLOADS {
        let n = if quick { iterations / 4 } else { iterations };
        let runs = measure(env, &configs, &root().join(script), n, reps, scratch)?;
        print_table(script, n, &configs, &runs);
    }
    Ok(())
}

/// `runs[config][rep]`, each repetition's configurations run in a rotated order.
fn measure(
    env: &Env<'_>,
    configs: &[(&str, Tool)],
    script: &Path,
    n: u64,
    reps: usize,
    scratch: &Path,
) -> Result<Vec<Vec<Measure>>> {
    let compare = super::compare_build();
    let other = Env {
        leaktrace: compare.as_deref().unwrap_or(env.leaktrace),
        python: env.python,
        ext: env.ext,
    };
    let mut runs: Vec<Vec<Measure>> = vec![Vec::with_capacity(reps); configs.len()];
    for rep in 0..reps {
        for k in 0..configs.len() {
            let i = (rep + k) % configs.len();
            let env = if i >= CONFIGS.len() { &other } else { env };
            let dir = scratch.join(format!("sampling{i}"));
            std::fs::create_dir_all(&dir)?;
            // A run's background detacher still removes its probes for seconds after the
            // command returned (the kernel sampler's, one grace period per link), and the
            // kernel finishes a session's teardown for about 3 s more: a traced run starts once
            // that is over (`fixed::settled`), as in the real-leak bench, so that each command
            // is charged its own start-up and not its predecessor's teardown.
            match configs[i].1 {
                Tool::Leaktrace(_) => super::fixed::settled()?,
                _ => {
                    super::fixed::probes_gone()?;
                }
            }
            runs[i].push(tools::run(configs[i].1, env, script, n, &dir, &[])?);
        }
    }
    Ok(runs)
}

/// Median and quartiles of `v`.
fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), median(&mut v.clone()), at(0.75))
}

fn print_table(script: &str, n: u64, configs: &[(&str, Tool)], runs: &[Vec<Measure>]) {
    println!("`{script}` ({n} iterations)\n");
    println!(
        "| configuration | loop s (median) | loop ratio, paired (median) | quartiles | \
         fastest loop ratio | command wall s (median) | wall − untraced wall, paired (median) | of which outside \
         the loop |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let base = &runs[0];
    let fastest = |rs: &[Measure]| rs.iter().map(|m| m.loop_s).fold(f64::INFINITY, f64::min);
    for ((name, _), rs) in configs.iter().zip(runs) {
        let paired = |f: fn(&Measure) -> f64, op: fn(f64, f64) -> f64| -> Vec<f64> {
            rs.iter().zip(base).map(|(m, b)| op(f(m), f(b))).collect()
        };
        let (q1, ratio, q3) = quartiles(paired(|m| m.loop_s, |a, b| a / b));
        let extra = median(&mut paired(|m| m.wall_s, |a, b| a - b));
        let outside = median(&mut paired(|m| m.wall_s - m.loop_s, |a, b| a - b));
        let best = fastest(rs) / fastest(base);
        println!(
            "| {name} | {:.3} | {ratio:.3}× | {q1:.3}–{q3:.3} | {best:.3}× | {:.3} | \
             {extra:+.3} | {outside:+.3} |",
            median(&mut rs.iter().map(|m| m.loop_s).collect::<Vec<_>>()),
            median(&mut rs.iter().map(|m| m.wall_s).collect::<Vec<_>>()),
        );
    }
    println!();
}
