//! One workload of the cost benchmark: every configuration run `reps` times, alternating;
//! the cost table, the headline ratios, and what each tool found against the known leak.

use std::path::Path;

use anyhow::Result;

use super::accuracy::{self, Truth};
use super::tools::{self, Measure, Tool, CONFIGS};
use super::{mb, summarize, Summary, Workload};
use crate::root;

/// What every workload is run with.
pub struct Settings<'a> {
    pub env: &'a tools::Env<'a>,
    pub scratch: &'a Path,
    pub quick: bool,
    pub reps: usize,
    pub valgrind_reps: usize,
    pub have_memray: bool,
    pub have_valgrind: bool,
}

/// Measures `w` under every configuration and prints its tables; adds its headline ratios.
pub fn run(w: &Workload, st: &Settings<'_>, headline: &mut Vec<String>) -> Result<()> {
    let n = if st.quick {
        w.iterations / 4
    } else {
        w.iterations
    };
    let n_valgrind = (n / 20).max(200);
    let (runs, last) = measure(w, st, n, n_valgrind)?;
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
    print_costs(w, n, &sums);
    headline.extend(headlines(w, &sums));
    if let Some(truth) = &w.truth {
        print_accuracy(n, truth, &sums, &last, st.env)?;
    }
    Ok(())
}

/// Every configuration `reps` times, alternating: all runs, and each configuration's last.
#[allow(clippy::type_complexity)]
fn measure(
    w: &Workload,
    st: &Settings<'_>,
    n: u64,
    n_valgrind: u64,
) -> Result<(Vec<Vec<Measure>>, Vec<Option<Measure>>)> {
    let script = root().join(w.script);
    let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); CONFIGS.len()];
    let mut last: Vec<Option<Measure>> = vec![None; CONFIGS.len()];
    for rep in 0..st.reps {
        for (i, c) in CONFIGS.iter().enumerate() {
            let skip = match c.tool {
                Tool::Memray(_) => !st.have_memray,
                Tool::Valgrind => !st.have_valgrind || !w.valgrind || rep >= st.valgrind_reps,
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
            let dir = st.scratch.join(format!("c{i}"));
            std::fs::create_dir_all(&dir)?;
            let m = tools::run(c.tool, st.env, &script, iters, &dir, &[])?;
            runs[i].push(m.clone());
            last[i] = Some(m);
        }
    }
    Ok((runs, last))
}

/// The cost table: each configuration's loop time, ratios to untraced, memory and CPU.
fn print_costs(w: &Workload, n: u64, sums: &[Option<Summary>]) {
    let base = sums[0].as_ref().expect("untraced always runs");
    let per = |s: &Summary| s.loop_s / s.n as f64 * 1e9;
    println!("\n### {} — {} iterations\n", w.what, n);
    println!(
        "| configuration | loop median (s) | ns / iteration | ratio to untraced | loop CPU \
         ratio | target peak RSS | tracer CPU (s) | tracer peak RSS | whole command (s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (c, s) in CONFIGS.iter().zip(sums) {
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
}

/// The ratios the benchmark ends with: exact against the floor, memray and Valgrind.
fn headlines(w: &Workload, sums: &[Option<Summary>]) -> Vec<String> {
    let mut headline = Vec::new();
    let base = sums[0].as_ref().expect("untraced always runs");
    let per = |s: &Summary| s.loop_s / s.n as f64 * 1e9;
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
    if let (Some(p), Some(k), Some(idle)) = (slowdown(3), slowdown(8), slowdown(9)) {
        headline.push(format!(
            "{}: sampled {p:.2}× untraced with the in-process sampler, {k:.2}× with the \
             kernel's; the sampler preloaded and idle {idle:.3}×",
            w.script
        ));
    }
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
    headline
}

/// What each tool reported as leaked, against the workload's known leak.
fn print_accuracy(
    n: u64,
    truth: &Truth,
    sums: &[Option<Summary>],
    last: &[Option<Measure>],
    env: &tools::Env<'_>,
) -> Result<()> {
    println!(
        "\nWhat each tool reported as leaked (truth: {} B under `{}`, allocated in `{}`):\n",
        (truth.bytes)(n),
        truth.python_fn,
        truth.native_fn
    );
    println!("| tool | iterations | truth (B) | reported (B) | error | Python line named | native function named | note |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, c) in CONFIGS.iter().enumerate() {
        let (Some(m), Some(s)) = (&last[i], &sums[i]) else {
            continue;
        };
        if matches!(c.tool, Tool::Untraced | Tool::Preloaded) || c.name == "floor" {
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
    Ok(())
}
