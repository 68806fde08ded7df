//! Sampled mode through the heap-sampling USDTs: the process samples itself (leaktrace's
//! preloaded sampler, built on `libdd-profiling-heap-sampler`) and only sampled allocations and
//! their frees trap; `attach` finds the probes in a service started with the preload.

mod common;

use std::process::Command;

use common::*;

/// Leaks `argv[2]` blocks of 10,000 bytes through the C extension, churns blocks of the same
/// size that are all freed, and Python objects.
const LEAK_AND_CHURN: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leakyext
def leak(n):
    for _ in range(n):
        leakyext.leak_malloc(10000)
def churn():
    for i in range(20000):
        leakyext.ok(10000)
        x = {"k": [i, str(i)] * 20}
leak(int(sys.argv[2]))
churn()
"#;

#[test]
fn run_sampled_preloads_the_sampler_and_estimates_the_leak() {
    let _g = serial();
    for py in pythons().into_iter().map(|p| p.path) {
        eprintln!("=== {}", py.display());
        run_sampled_on(&py);
    }
}

fn run_sampled_on(py: &std::path::Path) {
    let ext = ext_dir(py);
    let s = script(LEAK_AND_CHURN);
    let truth = 4000u64 * 10_000;
    let args = [ext.to_str().unwrap(), "4000"];
    // One sample per 64 KiB of allocation: about 610 samples in the leak, a standard deviation
    // of 4 % on the estimate.
    let r = run_python(&["--sample", "64KiB", "--verbose"], py, &s, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["mode"], "sampled");
    assert!(
        r.stderr.contains("sampled inside the process by")
            && r.stderr.contains("libleaktrace_preload"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("ddheap:alloc") && r.stderr.contains("ddheap:free"));
    // No trap on the C library's allocator: it is not probed.
    let points = probe_points(&r.stderr);
    assert!(
        points.iter().all(|(f, _, _)| f != "malloc" && f != "free"),
        "{points:?}"
    );
    let site = r.site("leak_malloc", "malloc");
    let est = u(&site, "unfreed_bytes");
    let err = est.abs_diff(truth) as f64 / truth as f64;
    assert!(
        err <= 0.15,
        "estimate {est} vs {truth}; counters {}",
        j["counters"]
    );
    assert!(
        site["python_stack"].to_string().contains("\"leak\""),
        "{site}"
    );
    // Blocks of the same size that were freed leave nothing: each sampled one's free fired.
    let churned: u64 = r.sites("ok").iter().map(|s| u(s, "unfreed_bytes")).sum();
    assert_eq!(
        churned, 0,
        "freed blocks reported unfreed; counters {}",
        j["counters"]
    );
    assert!(
        r.counter("usdt_samples") >= 300,
        "{}",
        r.counter("usdt_samples")
    );
    assert_eq!(r.counter("usdt_bad_arg"), 0);
}

/// Leaks 10,000 bytes every 2 ms through the C extension until killed.
const SERVICE: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
print("READY", flush=True)
while True:
    leakyext.leak_malloc(10000)
    leakyext.ok(10000)
    time.sleep(0.002)
"#;

#[test]
fn attach_finds_a_preloaded_services_probes_and_lowers_its_semaphore() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = succeed(
        Command::new(leaktrace_bin())
            .args(["preload", "--dir"])
            .arg(dir.path()),
    );
    let lib = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        lib.starts_with(dir.path().to_str().unwrap()) && lib.ends_with(".so"),
        "{lib}"
    );
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SERVICE);
    let target = start_ready_with(&py, &s, &[ext.to_str().unwrap()], &[("LD_PRELOAD", &lib)]);
    let pid = target.0.id();
    let pids = pid.to_string();
    for round in 0..5 {
        let r = leaktrace(&[
            "attach",
            "-p",
            &pids,
            "--mode",
            "sampled",
            "--sample",
            "64KiB",
            "-d",
            "1.5",
            "--verbose",
        ]);
        assert_eq!(r.code, 0, "round {round}: {}", r.stderr);
        let site = r.site("leak_malloc", "malloc");
        // ~1.5 s at up to 5 MB/s; the machine may be slower.
        assert!(u(&site, "unfreed_bytes") > 500_000, "round {round}: {site}");
        let sem = semaphore_of(&r.stderr);
        assert_eq!(
            read_u16(pid, sem),
            0,
            "round {round}: semaphore left raised"
        );
        assert!(alive(pid));
    }
}

/// The semaphore address `--verbose` printed for the `alloc` probe.
fn semaphore_of(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("ddheap:alloc") && l.contains("semaphore 0x"))
        .unwrap_or_else(|| panic!("no semaphore line:\n{stderr}"));
    let hex = line.split("semaphore 0x").nth(1).unwrap();
    let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).unwrap()
}

fn read_u16(pid: u32, addr: u64) -> u16 {
    u16::from_le_bytes(mem_bytes(pid, addr, 2).try_into().unwrap())
}
