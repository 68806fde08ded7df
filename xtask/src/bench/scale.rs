//! The tracer's own cost with many live allocations: its peak RSS, CPU and report time with
//! 10^4, 10^5 and 10^6 live tracked blocks.

use std::path::Path;

use anyhow::Result;

use super::tools::{self, Tool};
use crate::root;

pub fn run(env: &tools::Env<'_>, quick: bool, scratch: &Path) -> Result<()> {
    println!("\n### Tracer cost at scale (`bench/hold.py N`: N live 100-byte objects at exit)\n");
    println!(
        "| live blocks held | tracer peak RSS | tracer CPU (s) | report built in (s) | whole \
         command (s) | untraced (s) |"
    );
    println!("|---|---|---|---|---|---|");
    let script = root().join("bench/hold.py");
    let reps = if quick { 1 } else { 3 };
    for n in [10_000u64, 100_000, 1_000_000] {
        let dir = scratch.join(format!("hold{n}"));
        std::fs::create_dir_all(&dir)?;
        let mut best: Option<tools::Measure> = None;
        let mut untraced = f64::MAX;
        for _ in 0..reps {
            let u = tools::run(Tool::Untraced, env, &script, n, &dir, &[])?;
            untraced = untraced.min(u.wall_s);
            let m = tools::run(
                Tool::Leaktrace(&["--mode", "exact"]),
                env,
                &script,
                n,
                &dir,
                &[],
            )?;
            if best.as_ref().is_none_or(|b| m.wall_s < b.wall_s) {
                best = Some(m);
            }
        }
        let m = best.expect("at least one repetition");
        println!(
            "| {n} | {:.1} MB | {:.2} | {:.2} | {:.1} | {:.2} |",
            m.tracer_rss.unwrap_or(0) as f64 / 1e6,
            m.tracer_cpu_s.unwrap_or(0.0),
            m.report_s.unwrap_or(0.0),
            m.wall_s,
            untraced
        );
    }
    Ok(())
}
