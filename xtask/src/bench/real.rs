//! `--only real-leaks`: the real leaks of `crate::real_leaks`, each run untraced, under
//! leaktrace's default options, under `--python-allocators` (every Python-allocator call), and
//! under `memray run --native`, configurations alternating; whole-command seconds, and what
//! leaktrace's default run found on the leaking line. `LEAKTRACE_COMPARE=/path/to/leaktrace`
//! adds that build's default run, in the same rotation.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::fixed::settled;
use super::{median, probes_gone};
use crate::real_leaks::{venv_python, RealLeak, LEAKS};
use crate::root;

/// Wall seconds of `cmd`, which must succeed, and the loop's own seconds as the reproducer
/// printed them (`loop_time_s=` on its RESULT line, `bench/real_leaks/_leakcommon.py`).
fn timed(cmd: &mut Command) -> Result<(f64, f64)> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    let whole = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let loop_s = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("loop_time_s="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{cmd:?} printed no loop_time_s: {stdout}"))?;
    Ok((whole, loop_s))
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
    let compare = super::compare_build();
    println!("\n### Real leaks in released packages (`--only real-leaks`), medians of {reps}\n");
    println!(
        "Whole command, then the reproducer's loop alone (its `loop_time_s`), seconds (ratio to \
         untraced). `BALLAST` left at each reproducer's default. \"on the line\": what \
         leaktrace's default run held on the leaking line (the leaky release; the fixed \
         release's figure after the arrow).\n"
    );
    let compared = compare
        .as_ref()
        .map_or(String::new(), |c| format!(" {} (default) |", c.display()));
    println!(
        "| leak | untraced | leaktrace (default) |{compared} leaktrace --python-allocators | \
         memray run --native | on the line, default: leaky → fixed |"
    );
    println!(
        "|---|---|---|{}---|---|---|",
        "---|".repeat(compare.is_some() as usize)
    );
    let json = scratch.join("real.json");
    let bin = scratch.join("real.memray");
    for leak in LEAKS {
        let script = root().join("bench/real_leaks").join(leak.script);
        let py = venv_python(leak.package, leak.leaky);
        // untraced, default, --python-allocators, memray, the compared build's default.
        let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 5];
        // Each run starts once the previous session's processes are gone, and each leaktrace
        // run once the kernel has settled after it (`fixed::settled`): what a session leaves
        // the kernel to finish is its own cost, not the next run's.
        for _ in 0..reps {
            probes_gone()?;
            times[0].push(timed(Command::new(&py).arg(&script).args(leak.args))?);
            let builds = [
                (1, leaktrace, None),
                (2, leaktrace, Some("--python-allocators")),
            ];
            let other = compare.as_deref().map(|c| (4, c, None));
            for (i, bin, extra) in builds.into_iter().chain(other) {
                settled()?;
                let mut c = Command::new(bin);
                c.arg("run").args(extra).arg("--json").arg(&json).arg("--");
                times[i].push(timed(c.arg(&py).arg(&script).args(leak.args))?);
            }
            probes_gone()?;
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
        // Medians of the whole command and of the loop, each on its own.
        let m: Vec<(f64, f64)> = times
            .iter()
            .map(|t| {
                let (mut w, mut l): (Vec<f64>, Vec<f64>) = t.iter().copied().unzip();
                (median(&mut w), median(&mut l))
            })
            .collect();
        let cell = |(w, l): (f64, f64)| {
            format!(
                "{w:.2} s ({:.1}×) · {l:.2} s ({:.1}×)",
                w / m[0].0,
                l / m[0].1
            )
        };
        let compared = match compare {
            Some(_) => format!(" {} |", cell(m[4])),
            None => String::new(),
        };
        println!(
            "| {} {} → {} ({}) | {:.2} s · {:.2} s | {} |{compared} {} | {} | {leaky} → {fixed} |",
            leak.package,
            leak.leaky,
            leak.fixed,
            leak.kind,
            m[0].0,
            m[0].1,
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
