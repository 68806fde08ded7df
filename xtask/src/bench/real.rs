//! `--only real-leaks`: the real leaks of `crate::real_leaks`, each run untraced, under
//! leaktrace's default options, under `--python-allocators` (every Python-allocator call), and
//! under `memray run --native`, configurations alternating; whole-command seconds, and what
//! leaktrace's default run found on the leaking line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::median;
use crate::real_leaks::{venv_python, RealLeak, LEAKS};
use crate::root;

/// Wall seconds of `cmd`, which must succeed.
fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Unfreed bytes on the leaking line, and the sites that hold them, from a JSON report.
fn found(json: &Path, leak: &RealLeak) -> Option<(u64, usize)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).ok()?).ok()?;
    let sites: Vec<&Value> = v["sites"]
        .as_array()?
        .iter()
        .filter(|s| {
            s["python_stack"].as_array().is_some_and(|p| {
                p.iter().any(|f| {
                    f["filename"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(leak.script))
                        && f["line"] == leak.line
                })
            })
        })
        .collect();
    Some((
        sites
            .iter()
            .filter_map(|s| s["unfreed_bytes"].as_u64())
            .sum(),
        sites.len(),
    ))
}

pub fn run(leaktrace: &Path, reps: usize, scratch: &Path) -> Result<()> {
    println!("\n### Real leaks in released packages (`--only real-leaks`), medians of {reps}\n");
    println!(
        "Whole command, seconds (ratio to untraced). `BALLAST` left at each reproducer's \
         default. \"on the line\": what leaktrace's default run held on the leaking line (the \
         leaky release; the fixed release's figure after the arrow).\n"
    );
    println!(
        "| leak | untraced | leaktrace (default) | leaktrace --python-allocators | memray run \
         --native | on the line, default: leaky → fixed |"
    );
    println!("|---|---|---|---|---|---|");
    let json = scratch.join("real.json");
    let bin = scratch.join("real.memray");
    for leak in LEAKS {
        let script = root().join("bench/real_leaks").join(leak.script);
        let py = venv_python(leak.package, leak.leaky);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); 4];
        for _ in 0..reps {
            times[0].push(timed(Command::new(&py).arg(&script).args(leak.args))?);
            for (i, extra) in [(1, None), (2, Some("--python-allocators"))] {
                let mut c = Command::new(leaktrace);
                c.arg("run").args(extra).arg("--json").arg(&json).arg("--");
                times[i].push(timed(c.arg(&py).arg(&script).args(leak.args))?);
            }
            let _ = std::fs::remove_file(&bin);
            times[3].push(timed(
                Command::new(&py)
                    .args(["-m", "memray", "run", "--native", "-q", "-o"])
                    .arg(&bin)
                    .arg(&script)
                    .args(leak.args),
            )?);
        }
        // The last default run's report is overwritten by --python-allocators: one more each.
        let line = |version: &str| -> Result<String> {
            let py = venv_python(leak.package, version);
            timed(
                Command::new(leaktrace)
                    .args(["run", "--top", "1000", "--json"])
                    .arg(&json)
                    .arg("--")
                    .arg(&py)
                    .arg(&script)
                    .args(leak.args),
            )?;
            Ok(found(&json, leak).map_or("—".into(), |(b, n)| format!("{b} B in {n} sites")))
        };
        let (leaky, fixed) = (line(leak.leaky)?, line(leak.fixed)?);
        let m: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        let cell = |x: f64| format!("{x:.2} s ({:.1}×)", x / m[0]);
        println!(
            "| {} {} → {} ({}) | {:.2} s | {} | {} | {} | {leaky} → {fixed} |",
            leak.package,
            leak.leaky,
            leak.fixed,
            leak.kind,
            m[0],
            cell(m[1]),
            cell(m[2]),
            cell(m[3]),
        );
    }
    println!("\nReferences:");
    for leak in LEAKS {
        println!("- {}: {}", leak.name, leak.reference);
    }
    Ok(())
}
