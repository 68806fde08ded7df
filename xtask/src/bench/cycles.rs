//! `--only preload-cycles`: a busy service started with leaktrace's in-process sampler
//! (`LD_PRELOAD=$(leaktrace preload)`, `bench/soak_service.py`), attached in sampled mode and
//! detached 100 times. Each session must end normally; the service must stay up, keep its
//! throughput (preloaded and idle, against the same service untraced) and its memory (against a
//! control: the same service, preloaded, run alongside and never attached), and have its
//! sampler's semaphore back at 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::soak::{rate, usage, Killed};
use crate::root;

const CYCLES: usize = 100;

/// The service's and the control's resident memory at one moment, in bytes.
type RssPair = (u64, u64);

pub fn run(leaktrace: &Path, python: &Path, scratch: &Path) -> Result<()> {
    let dir = scratch.join("cycles");
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(leaktrace).arg("preload").output()?;
    if !out.status.success() {
        bail!(
            "leaktrace preload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lib = String::from_utf8(out.stdout)?.trim().to_string();
    let window = Duration::from_secs(10);
    let plain = service(python, &dir.join("plain"), None)?;
    let plain_rate = rate(&dir.join("plain"), window)?;
    drop(plain);
    let counts = dir.join("counts");
    let svc = service(python, &counts, Some(&lib))?;
    let pid = svc.0.id();
    let idle_rate = rate(&counts, window)?;
    // Started now, so both have served the same time when their memory is compared.
    let control = service(python, &dir.join("control"), Some(&lib))?;
    let control_pid = control.0.id();
    let (rss, semaphore) = cycle(leaktrace, pid, control_pid)?;
    drop(control);
    // The last sessions' background detachers still hold probes for a few seconds.
    super::probes_gone()?;
    let after_rate = rate(&counts, window)?;
    let sem = semaphore.context("no ddheap semaphore in --verbose: the sampler was not used")?;
    let raised = read_u16(pid, sem)?;
    println!("\n### The in-process sampler, attached and detached {CYCLES} times\n");
    println!(
        "`bench/soak_service.py` started with `LD_PRELOAD=$(leaktrace preload)`; each cycle is"
    );
    println!("`leaktrace attach -p PID --mode sampled -d 0.3`.\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| requests/s untraced, no preload | {plain_rate:.0} |");
    println!(
        "| requests/s preloaded, idle | {idle_rate:.0} ({:.3}× untraced) |",
        plain_rate / idle_rate
    );
    println!(
        "| requests/s preloaded, after {CYCLES} cycles | {after_rate:.0} ({:.3}× untraced) |",
        plain_rate / after_rate
    );
    println!(
        "| service RSS after 10 cycles / after {CYCLES} | {:.1} MB / {:.1} MB |",
        rss[0].0 as f64 / 1e6,
        rss[1].0 as f64 / 1e6
    );
    println!(
        "| control (preloaded, never attached, run alongside) RSS at the same moments | \
         {:.1} MB / {:.1} MB |",
        rss[0].1 as f64 / 1e6,
        rss[1].1 as f64 / 1e6
    );
    println!("| sessions that ended normally | {CYCLES} of {CYCLES} |");
    println!("| semaphore after the last detach | {raised} |");
    if raised != 0 {
        bail!("the sampler's semaphore was left at {raised}");
    }
    Ok(())
}

/// Attaches to `pid` and detaches `CYCLES` times; returns the service's and the control's RSS
/// after 10 cycles and after the last, and the semaphore address `--verbose` named.
fn cycle(leaktrace: &Path, pid: u32, control_pid: u32) -> Result<(Vec<RssPair>, Option<u64>)> {
    let mut rss = Vec::new();
    let mut semaphore = None;
    for i in 0..CYCLES {
        let o = Command::new(leaktrace)
            .args([
                "attach",
                "-p",
                &pid.to_string(),
                "--mode",
                "sampled",
                "-d",
                "0.3",
            ])
            .args(["--verbose", "--top", "3"])
            .stdout(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(0) {
            bail!(
                "cycle {i}: leaktrace exited {:?}: {stderr}",
                o.status.code()
            );
        }
        semaphore = semaphore.or_else(|| semaphore_of(&stderr));
        if i == 9 || i == CYCLES - 1 {
            rss.push((
                usage(pid).context("the service is gone")?.0,
                usage(control_pid).context("the control is gone")?.0,
            ));
        }
    }
    Ok((rss, semaphore))
}

fn service(python: &Path, counts: &Path, preload: Option<&str>) -> Result<Killed> {
    let mut c = Command::new(python);
    c.arg(root().join("bench/soak_service.py"))
        .arg(counts)
        .stdout(Stdio::null());
    if let Some(lib) = preload {
        c.env("LD_PRELOAD", lib);
    }
    let k = Killed(c.spawn()?);
    std::thread::sleep(Duration::from_secs(3));
    Ok(k)
}

/// The semaphore `--verbose` prints for the `ddheap:alloc` probe.
fn semaphore_of(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("ddheap:alloc"))?;
    let hex = line.split("semaphore 0x").nth(1)?;
    let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).ok()
}

fn read_u16(pid: u32, addr: u64) -> Result<u16> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    f.seek(SeekFrom::Start(addr))?;
    let mut b = [0u8; 2];
    f.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}
