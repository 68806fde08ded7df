//! `--only soak`: a long `attach --mode sampled` on a busy service (`bench/soak_service.py`),
//! as a production service would be traced. Every 30 s: the tracer's RSS and CPU, the
//! service's throughput against its untraced rate. The length is `LEAKTRACE_SOAK_MINUTES`
//! (30 by default); it runs only when asked for by name.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::root;

/// Requests served so far, from the service's counts file (its last line).
pub(super) fn served(counts: &Path) -> Option<(f64, u64)> {
    let text = std::fs::read_to_string(counts).ok()?;
    // The last line may be half written: the last whole one.
    text.lines().rev().find_map(|line| {
        let mut f = line.split_whitespace();
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// Requests per second over `window`.
pub(super) fn rate(counts: &Path, window: Duration) -> Result<f64> {
    let (t0, n0) = served(counts).context("the service reports no counts")?;
    std::thread::sleep(window);
    let (t1, n1) = served(counts).context("the service stopped reporting")?;
    Ok((n1 - n0) as f64 / (t1 - t0).max(1e-9))
}

/// (resident bytes, CPU seconds) of `pid`.
pub(super) fn usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; f starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux x86-64 (the ABI fixes it, whatever the kernel's HZ).
    Some((rss_kb * 1024, ticks as f64 / 100.0))
}

pub(super) struct Killed(pub(super) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(leaktrace: &Path, python: &Path, scratch: &Path) -> Result<()> {
    let minutes: u64 = std::env::var("LEAKTRACE_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let dir = scratch.join("soak");
    std::fs::create_dir_all(&dir)?;
    let counts = dir.join("counts");
    let service = Killed(
        Command::new(python)
            .arg(root().join("bench/soak_service.py"))
            .arg(&counts)
            .stdout(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(3));
    let untraced = rate(&counts, Duration::from_secs(20))?;
    let json = dir.join("report.json");
    let capture = dir.join("soak.ltc");
    let started = Instant::now();
    let mut tracer = Killed(
        Command::new(leaktrace)
            .args([
                "attach",
                "-p",
                &service.0.id().to_string(),
                "--mode",
                "sampled",
            ])
            .args(["--duration", &(minutes * 60).to_string(), "--json"])
            .arg(&json)
            .arg("-o")
            .arg(&capture)
            .stdout(Stdio::null())
            // A file, not a pipe nobody reads for half an hour.
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()?,
    );
    println!(
        "\n### Soak: `attach --mode sampled` for {minutes} min on a busy service \
         (`bench/soak_service.py`, untraced {untraced:.0} requests/s)\n"
    );
    let rss_series = sample_every_30s(&counts, &mut tracer, started, minutes, untraced)?;
    let status = tracer.0.wait()?;
    if !status.success() {
        let err = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        bail!("leaktrace attach failed ({status}): {err}");
    }
    summarize(&json, &capture, &rss_series)?;
    Ok(())
}

/// The table's rows, one per 30 s until the window's last half minute: the tracer's RSS
/// (returned, in order) and CPU, and the service's rate.
fn sample_every_30s(
    counts: &Path,
    tracer: &mut Killed,
    started: Instant,
    minutes: u64,
    untraced: f64,
) -> Result<Vec<u64>> {
    let lt = tracer.0.id();
    println!("| minute | tracer RSS | tracer CPU over the window | service requests/s | × untraced rate |");
    println!("|---|---|---|---|---|");
    let (mut last_cpu, mut last_t) = (0.0, Instant::now());
    let mut rss_series = Vec::new();
    while started.elapsed() < Duration::from_secs((minutes * 60).saturating_sub(30)) {
        let r = rate(counts, Duration::from_secs(30))?;
        let Some((rss, cpu)) = usage(lt) else {
            bail!("leaktrace ended early: {:?}", tracer.0.try_wait());
        };
        let window = last_t.elapsed().as_secs_f64();
        println!(
            "| {:.1} | {:.1} MB | {:.1} % | {r:.0} | {:.3} |",
            started.elapsed().as_secs_f64() / 60.0,
            rss as f64 / 1e6,
            (cpu - last_cpu) / window * 100.0,
            r / untraced
        );
        rss_series.push(rss);
        (last_cpu, last_t) = (cpu, Instant::now());
    }
    Ok(rss_series)
}

/// The line under the table: RSS at the start and the end, the capture's size, the drops and
/// whether the slow leak was named.
fn summarize(json: &Path, capture: &Path, rss_series: &[u64]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    // The leaking line: `LEAKED.append(bytearray(1024))`.
    const LEAK_LINE: u64 = 27;
    let named = v["sites"].as_array().is_some_and(|sites| {
        sites.iter().take(5).any(|s| {
            s["python_stack"].as_array().is_some_and(|frames| {
                frames.iter().any(|f| {
                    f["filename"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("soak_service.py"))
                        && f["line"] == LEAK_LINE
                })
            })
        })
    });
    let (first, last) = (
        rss_series
            .get(rss_series.len().min(2).saturating_sub(1))
            .copied()
            .unwrap_or(0),
        rss_series.last().copied().unwrap_or(0),
    );
    println!(
        "\ntracer RSS {:.1} MB after the first minute, {:.1} MB at the end; capture {:.0} kB; \
         drops {}; the slow leak (soak_service.py:27) among the top 5 sites: {}",
        first as f64 / 1e6,
        last as f64 / 1e6,
        std::fs::metadata(capture).map_or(0, |m| m.len()) as f64 / 1e3,
        v["dropped"],
        if named { "yes" } else { "no" }
    );
    Ok(())
}
