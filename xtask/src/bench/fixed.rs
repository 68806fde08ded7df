//! The fixed cost of a session, outside any tracing: `run -- python3 -c pass` against the
//! untraced command, and `attach` to an idle process for a 1 s window, each split into the
//! phases leaktrace prints with `--verbose`. `LEAKTRACE_COMPARE=/path/to/leaktrace` adds the
//! same rows for another build (an older one), alternating with this one, for before/after
//! figures measured in one run. Each command starts once the kernel has finished removing the
//! previous one's probes (they are removed in the background after leaktrace returns), so no
//! build pays for the one before it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::median;

/// One build's measurements: whole-command seconds, and seconds per phase.
#[derive(Default)]
struct Rows {
    whole: Vec<f64>,
    phases: BTreeMap<String, Vec<f64>>,
    peak_rss_mb: Vec<f64>,
}

impl Rows {
    fn add(&mut self, whole: f64, stderr: &str) {
        self.whole.push(whole);
        for line in stderr.lines() {
            let Some(rest) = line.strip_prefix("leaktrace: phase: ") else {
                continue;
            };
            let Some((name, secs)) = rest.rsplit_once(": ") else {
                continue;
            };
            if let Ok(s) = secs.trim_end_matches(" s").parse::<f64>() {
                self.phases.entry(name.to_string()).or_default().push(s);
            }
        }
    }

    fn print(&mut self, label: &str, untraced: Option<f64>) {
        let whole = median(&mut self.whole);
        let over = untraced.map_or(String::new(), |u| {
            format!(" ({:+.2} s over untraced)", whole - u)
        });
        let rss = if self.peak_rss_mb.is_empty() {
            String::new()
        } else {
            format!(
                ", leaktrace peak RSS {:.0} MB",
                median(&mut self.peak_rss_mb)
            )
        };
        println!("| {label} | {whole:.2} s{over}{rss} |");
        for (name, v) in self.phases.iter_mut() {
            println!("|   {name} | {:.3} s |", median(v));
        }
    }
}

/// Runs `cmd`, returning wall seconds, stderr and the peak RSS of its waited-for children.
fn timed(cmd: &mut Command) -> Result<(f64, String)> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() && out.status.code() != Some(5) {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// leaktrace's peak RSS from its `--json` report, in MB.
fn peak_rss_mb(json: &Path) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).ok()?).ok()?;
    Some(v["tracer"]["peak_rss_bytes"].as_f64()? / 1e6)
}

pub fn fixed_cost(leaktrace: &Path, python: &Path, reps: usize, scratch: &Path) -> Result<()> {
    let compare = super::compare_build();
    let mut builds: Vec<(String, &Path)> = vec![("this build".into(), leaktrace)];
    if let Some(other) = compare.as_deref() {
        builds.push((format!("{}", other.display()), other));
    }
    println!("\n### Fixed cost (`--only fixed-cost`), medians of {reps}\n");
    println!("| what | seconds |\n|---|---|");
    let json = scratch.join("fixed.json");
    let mut untraced = Vec::new();
    let mut run_rows: Vec<Rows> = builds.iter().map(|_| Rows::default()).collect();
    let mut attach_rows: Vec<Rows> = builds.iter().map(|_| Rows::default()).collect();
    for _ in 0..reps {
        untraced.push(timed(Command::new(python).args(["-c", "pass"]))?.0);
        for (i, (_, bin)) in builds.iter().enumerate() {
            probes_gone()?;
            let (t, err) = timed(
                Command::new(bin)
                    .args(["run", "--verbose", "--json"])
                    .arg(&json)
                    .arg("--")
                    .arg(python)
                    .args(["-c", "pass"]),
            )?;
            run_rows[i].add(t, &err);
            if let Some(mb) = peak_rss_mb(&json) {
                run_rows[i].peak_rss_mb.push(mb);
            }
        }
        for (i, (_, bin)) in builds.iter().enumerate() {
            probes_gone()?;
            let (t, err) = attach_idle(bin, python, &json)?;
            attach_rows[i].add(t, &err);
            if let Some(mb) = peak_rss_mb(&json) {
                attach_rows[i].peak_rss_mb.push(mb);
            }
        }
    }
    let u = median(&mut untraced);
    println!("| `python3 -c pass`, untraced | {u:.3} s |");
    for (i, (label, _)) in builds.iter().enumerate() {
        run_rows[i].print(
            &format!("`leaktrace run -- python3 -c pass`, {label}"),
            Some(u),
        );
    }
    for (i, (label, _)) in builds.iter().enumerate() {
        attach_rows[i].print(
            &format!("`leaktrace attach -d 1` to an idle interpreter, {label} (window included)"),
            None,
        );
    }
    Ok(())
}

/// Waits until no leaktrace process is left, the background detacher included (it exits once
/// the kernel has removed its links, and so every breakpoint). Returns the seconds waited.
pub(super) fn probes_gone() -> Result<f64> {
    let t = Instant::now();
    while leaktrace_running() {
        if t.elapsed().as_secs() > 60 {
            bail!("a leaktrace process is still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Waits until no leaktrace process is left, then 4 s more. For about 3 s after a session's last
/// process exits, the next session's load and attach take up to 2.3 s longer (measured
/// 2026-11-30 with the same build back to back: 2.2 s more with no gap, 0.9 s after 1 s, 0.5 s
/// after 2 s, none after 4 s; the machine idle meanwhile, so the kernel is waiting out the last
/// session's teardown, not working): a run's cost, timed alone, must not include its
/// predecessor's.
pub(super) fn settled() -> Result<()> {
    probes_gone()?;
    std::thread::sleep(std::time::Duration::from_secs(4));
    Ok(())
}

/// Whether a process named `leaktrace` runs (zombies, already done with their files, aside).
fn leaktrace_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // `PID (COMM) STATE …`: the name may hold spaces, the state follows the last ')'.
        stat.split_once(" (")
            .and_then(|(_, rest)| rest.rsplit_once(") "))
            .is_some_and(|(comm, rest)| comm == "leaktrace" && !rest.starts_with('Z'))
    })
}

/// `attach -d 1` to an interpreter that sleeps: wall seconds and stderr, with a last line
/// giving when the kernel had removed every breakpoint, counted from the command's start.
fn attach_idle(bin: &Path, python: &Path, json: &Path) -> Result<(f64, String)> {
    let mut idle = Command::new(python)
        .args([
            "-c",
            "import time; print('READY', flush=True); time.sleep(3600)",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(idle.stdout.take().context("stdout")?).read_line(&mut line)?;
    let result = timed(
        Command::new(bin)
            .args([
                "attach",
                "-d",
                "1",
                "--mode",
                "exact",
                "--verbose",
                "--json",
            ])
            .arg(json)
            .args(["-p", &idle.id().to_string()]),
    );
    let gone = probes_gone();
    let _ = idle.kill();
    let _ = idle.wait();
    let (secs, mut err) = result?;
    err.push_str(&format!(
        "leaktrace: phase: every breakpoint removed, from the command's start: {:.3} s\n",
        secs + gone?
    ));
    Ok((secs, err))
}
