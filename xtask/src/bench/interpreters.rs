//! The default `run` on every interpreter the tests use (`tests/fixtures/pythons.txt`), on the
//! JSON handler: the loop and the whole command, untraced and traced. Each interpreter brings its
//! own C library (Debian sid's 3.14 runs on sid's glibc 2.42, the others on the host's 2.36), so
//! this is where a probe point that only one libc gets wrong shows. `LEAKTRACE_COMPARE` adds
//! another build's column, alternating with this one.

use std::path::Path;

use anyhow::{bail, Result};

use super::fixed::settled;
use super::tools::{self, Measure, Tool};
use super::{compare_build, summarize};
use crate::{pythons, root};

/// Runs the table; `ext` is the bench extension's folder (the handler does not load it).
pub fn run(leaktrace: &Path, ext: &Path, reps: usize, quick: bool, scratch: &Path) -> Result<()> {
    let compare = compare_build();
    let mut builds = vec![("this build".to_string(), leaktrace.to_path_buf())];
    if let Some(other) = compare {
        builds.push((other.display().to_string(), other));
    }
    let n = if quick { 5_000 } else { 20_000 };
    let script = root().join("bench/web_handler.py");
    println!(
        "\n### `leaktrace run` (default options) on each interpreter (`--only interpreters`), \
         JSON handler × {n}, medians of {reps}\n"
    );
    print!("| interpreter | untraced |");
    for (label, _) in &builds {
        print!(" leaktrace, {label} |");
    }
    println!("\n|---|---|{}", "---|".repeat(builds.len()));
    for py in pythons::listed() {
        if !py.path.exists() {
            bail!(
                "{} {} is missing at {}: run `cargo xtask setup`",
                py.version,
                py.build,
                py.path.display()
            );
        }
        let mut untraced = Vec::new();
        let mut traced: Vec<Vec<Measure>> = builds.iter().map(|_| Vec::new()).collect();
        for _ in 0..reps {
            untraced.push(tools::run(
                Tool::Untraced,
                &env(leaktrace, &py.path, ext),
                &script,
                n,
                scratch,
                &[],
            )?);
            for (i, (_, bin)) in builds.iter().enumerate() {
                settled()?;
                traced[i].push(tools::run(
                    Tool::Leaktrace(&[]),
                    &env(bin, &py.path, ext),
                    &script,
                    n,
                    scratch,
                    &[],
                )?);
            }
        }
        // Every configuration ran `reps` ≥ 1 times: each has a summary.
        let Some(u) = summarize(n, &untraced) else {
            bail!("no untraced run of {}", py.path.display());
        };
        print!(
            "| {} {} | {:.2} s · {:.3} s |",
            py.version, py.build, u.wall_s, u.loop_s
        );
        for t in traced.iter().filter_map(|runs| summarize(n, runs)) {
            print!(
                " {:.2} s ({:.1}×) · {:.3} s ({:.1}×) |",
                t.wall_s,
                t.wall_s / u.wall_s,
                t.loop_s,
                t.loop_s / u.loop_s
            );
        }
        println!();
    }
    Ok(())
}

fn env<'a>(leaktrace: &'a Path, python: &'a Path, ext: &'a Path) -> tools::Env<'a> {
    tools::Env {
        leaktrace,
        python,
        ext,
    }
}
