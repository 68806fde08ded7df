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

/// Leaks `argv[2]` blocks of 10,000 bytes at a pace well under the sampler's ceiling, churns
/// 64 KiB blocks through the C extension as fast as it can for one second, pauses, and leaks as
/// many blocks again, at the same pace, from another function.
const LEAK_THEN_FLOOD: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def leak(n):
    for i in range(n):
        leakyext.leak_malloc(10000)
        if i % 20 == 0:
            time.sleep(0.002)
def flood():
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        for _ in range(1000):
            leakyext.ok(65536)
def leak_after(n):
    leak(n)
leak(int(sys.argv[2]))
flood()
time.sleep(0.3)
leak_after(int(sys.argv[2]))
"#;

#[test]
fn the_samplers_ceiling_holds_under_a_flood_and_keeps_the_estimates() {
    let _g = serial();
    let py = pythons().into_iter().next().unwrap().path;
    let ext = ext_dir(&py);
    let s = script(LEAK_THEN_FLOOD);
    let truth = 4000u64 * 10_000;
    // At 64 KiB the flood alone is well over 100,000 samples a second. The leaks' ~1,500 a
    // second stay under 2,000.
    let r = run_python(
        &["--sample", "64KiB", "--sample-limit", "2000"],
        &py,
        &s,
        &[ext.to_str().unwrap(), "4000"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json.as_ref().unwrap();
    let notes = j["notes"].to_string();
    assert!(
        notes.contains("at most 2000 samples a second")
            && notes.contains("as if its mean interval were up to"),
        "{notes}"
    );
    assert_eq!(j["sample_ceiling"]["samples_per_s"], 2000);
    assert!(
        u(&j["sample_ceiling"], "interval_max") > 64 << 10,
        "{}",
        j["sample_ceiling"]
    );
    let seconds = j["duration_s"].as_f64().unwrap();
    let samples = r.counter("usdt_samples");
    // The ceiling, plus one window's budget of slack per second for the windows a burst ends
    // early; without it the flood alone would take over 100,000.
    assert!(
        (samples as f64) < 2000.0 * seconds * 1.3 + 800.0,
        "{samples} samples in {seconds} s"
    );
    // Paced under the ceiling, each leak was sampled at 64 KiB: ~610 samples, 4 % deviation;
    // the one after the flood too: the pause ends the flood's thinning at its first draws.
    let sites = r.sites("leak_malloc");
    let (after, before): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = sites
        .iter()
        .partition(|s| s["python_stack"].to_string().contains("leak_after"));
    for (when, sites) in [("before", before), ("after", after)] {
        let est: u64 = sites.iter().map(|s| u(s, "unfreed_bytes")).sum();
        assert!(
            est.abs_diff(truth) as f64 / truth as f64 <= 0.15,
            "{when} the flood: estimate {est} vs {truth}; {samples} samples; {notes}"
        );
    }
    let churned: u64 = r.sites("ok").iter().map(|s| u(s, "unfreed_bytes")).sum();
    assert_eq!(churned, 0, "the flood's freed blocks reported unfreed");
}

/// A `multiprocessing` pool whose workers are exec'd interpreters (`spawn`): each task leaks
/// `n` blocks of 10,000 bytes. The preload comes with the environment; each new image starts
/// with its sampler's semaphore at 0.
const SAMPLED_SPAWN_POOL: &str = r#"
import multiprocessing as mp, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def leak_in_worker(n):
    # The semaphore is raised once leaktrace has found the new interpreter (docs/sampling.md):
    # wait for it, as a test must, however loaded the machine.
    import ctypes
    traced = ctypes.CDLL(None).leaktrace_preload_traced
    traced.restype = ctypes.c_bool
    deadline = time.monotonic() + 30
    while not traced() and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(n):
        leakyext.leak_malloc(10000)
    time.sleep(1)
    return n
if __name__ == "__main__":
    mp.set_start_method("spawn")
    with mp.Pool(2) as pool:
        print(pool.map(leak_in_worker, [1000, 1000, 1000, 1000]))
"#;

#[test]
fn run_sampled_follows_spawned_workers_into_their_new_images() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SAMPLED_SPAWN_POOL);
    let flags = ["--follow-forks", "--sample", "64KiB"];
    let r = run_python(&flags, &py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let main = r.json.as_ref().unwrap()["target"]["pid"].as_u64().unwrap();
    let sites = r.sites("leak_malloc");
    assert!(sites.iter().all(|s| u(s, "pid") != main));
    // About 610 samples over the four tasks: a standard deviation of 4 % on the total.
    let est: u64 = sites.iter().map(|s| u(s, "unfreed_bytes")).sum();
    let truth = 4000u64 * 10_000;
    assert!(
        est.abs_diff(truth) as f64 / truth as f64 <= 0.15,
        "estimate {est} vs {truth}"
    );
    assert!(r.counter("usdt_samples") > 300);
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
    let lib = install_preload(dir.path());
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

#[test]
fn a_killed_leaktrace_leaves_no_semaphore_raised() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let lib = install_preload(dir.path());
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SERVICE);
    let target = start_ready_with(&py, &s, &[ext.to_str().unwrap()], &[("LD_PRELOAD", &lib)]);
    let pid = target.id();
    let pids = pid.to_string();
    for round in 0..3 {
        let tracer = Tracer::spawn(&[
            "attach", "-p", &pids, "--mode", "sampled", "--sample", "64KiB", "-d", "60",
        ]);
        let sem = semaphore_of(&tracer.said());
        assert_eq!(read_u16(pid, sem), 1, "round {round}: not raised");
        kill(tracer.id(), libc::SIGKILL);
        let _ = tracer.finish();
        // Its guardian lowers it, as leaktrace's own end would have.
        assert!(
            wait_for(60, || read_u16(pid, sem) == 0),
            "round {round}: semaphore left at {}",
            read_u16(pid, sem)
        );
        assert!(alive(pid));
    }
}

/// `leaktrace preload --dir DIR`: the library's path.
fn install_preload(dir: &std::path::Path) -> String {
    let out = succeed(
        Command::new(leaktrace_bin())
            .args(["preload", "--dir"])
            .arg(dir),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
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

/// Loads a second copy of the sampler with `dlopen` once told to (as a C extension with a
/// sampler of its own is loaded by `import`), then, told again, leaks 500 blocks of 100,000
/// bytes through it and churns as many, and says it is done.
const LOADS_A_SAMPLER_LATER: &str = r#"
import ctypes, os, sys, time
d, lib_path = sys.argv[1], sys.argv[2]
def wait(name):
    while not os.path.exists(os.path.join(d, name)):
        time.sleep(0.02)
print("READY", flush=True)
wait("load")
lib = ctypes.CDLL(lib_path)
lib.malloc.restype = ctypes.c_void_p
lib.malloc.argtypes = [ctypes.c_size_t]
lib.free.argtypes = [ctypes.c_void_p]
wait("go")
def leak_late(n):
    return [lib.malloc(100000) for _ in range(n)]
def churn_late(n):
    for _ in range(n):
        lib.free(lib.malloc(100000))
kept = leak_late(500)
churn_late(500)
open(os.path.join(d, "done"), "w").close()
while True:
    time.sleep(1)
"#;

#[test]
fn attach_finds_a_sampler_the_program_loads_later() {
    let _g = serial();
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (preloaded, later) = (
        install_preload(first.path()),
        install_preload(second.path()),
    );
    let work = tempfile::tempdir().unwrap();
    let py = pyenv_python();
    let s = script(LOADS_A_SAMPLER_LATER);
    let target = start_ready_with(
        &py,
        &s,
        &[work.path().to_str().unwrap(), &later],
        &[
            ("LD_PRELOAD", &preloaded),
            ("LEAKTRACE_SAMPLE_BYTES", "64k"),
            // The leak comes in a burst the default ceiling would thin out (~760 samples in a
            // few ms): the estimate's precision below is the interval's.
            ("LEAKTRACE_SAMPLE_LIMIT", "0"),
        ],
    );
    let pids = target.id().to_string();
    let tracer = Tracer::spawn(&[
        "attach", "-p", &pids, "--mode", "sampled", "--sample", "1MiB", "-d", "60",
    ]);
    let touch = |name: &str| std::fs::write(work.path().join(name), b"").unwrap();
    touch("load");
    assert!(
        tracer.wait_said("samples inside the process too: its USDTs are attached", 30),
        "the library loaded later was not attached"
    );
    touch("go");
    assert!(wait_for(30, || work.path().join("done").exists()));
    kill(tracer.id(), libc::SIGINT);
    let r = tracer.finish();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(second.path().to_str().unwrap()),
        "{}",
        r.stderr
    );
    let by_function = |name: &str| -> u64 {
        let sites = r.json.as_ref().unwrap()["sites"].as_array().unwrap();
        sites
            .iter()
            .filter(|s| {
                s["python_stack"]
                    .to_string()
                    .contains(&format!("\"{name}\""))
            })
            .map(|s| u(s, "unfreed_bytes"))
            .sum()
    };
    // The process samples at the interval it was started with, not the one asked for.
    assert_eq!(r.json.as_ref().unwrap()["sample_rate"], 65536);
    assert!(r
        .stderr
        .contains("the interval its sampler was started with"));
    // About 760 samples: a standard deviation of 3.6 % on the estimate.
    let truth = 500u64 * 100_000;
    let est = by_function("leak_late");
    assert!(
        est.abs_diff(truth) as f64 / truth as f64 <= 0.15,
        "estimate {est} vs {truth}"
    );
    assert_eq!(by_function("churn_late"), 0);
    assert_eq!(r.counter("usdt_bad_arg"), 0);
    assert!(alive(target.id()));
}

/// A producer of the OpenTelemetry contract that is not leaktrace's: a C program with
/// `otel_memory` notes written the way `sys/sdt.h` writes them, which fires `alloc(ptr, size,
/// weight)` with weight = size for every allocation while its semaphore is raised. Told to
/// (`DIR/go`), it leaks 1,000 blocks of 4,096 bytes in `leaky_path` and churns as many in
/// `churn_path`, then says it is done (`DIR/done`). With `-DRO_SEMAPHORE` its semaphores are
/// read-only: nobody can raise them.
const OTEL_PRODUCER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef RO_SEMAPHORE
/* Not volatile, which would make its section writable: read through a volatile pointer. */
#define SEMAPHORE const unsigned short
#else
#define SEMAPHORE __attribute__((section(".probes"))) unsigned short
#endif
#define RAISED(s) (*(volatile const unsigned short *)&(s))
SEMAPHORE otel_memory_alloc_semaphore = 0;
SEMAPHORE otel_memory_free_semaphore = 0;

#define SDT_BASE                                                                   \
    ".ifndef _.stapsdt.base\n"                                                     \
    ".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n"        \
    ".weak _.stapsdt.base\n.hidden _.stapsdt.base\n"                               \
    "_.stapsdt.base: .space 1\n.size _.stapsdt.base, 1\n.popsection\n.endif\n"
#define SDT_NOTE(name, semaphore, args)                                            \
    "990: nop\n"                                                                   \
    ".pushsection .note.stapsdt,\"\",\"note\"\n.balign 4\n"                        \
    ".4byte 992f-991f, 994f-993f, 3\n991: .asciz \"stapsdt\"\n992: .balign 4\n"    \
    "993: .8byte 990b\n.8byte _.stapsdt.base\n.8byte " semaphore "\n"              \
    ".asciz \"otel_memory\"\n.asciz \"" name "\"\n.asciz \"" args "\"\n"           \
    "994: .balign 4\n.popsection\n" SDT_BASE

__attribute__((noinline)) void *sampled_malloc(size_t n) {
    void *p = malloc(n);
    if (RAISED(otel_memory_alloc_semaphore))
        __asm__ __volatile__(SDT_NOTE("alloc", "otel_memory_alloc_semaphore", "8@%0 8@%1 8@%2")
                             :: "r"(p), "r"(n), "r"(n));
    return p;
}

__attribute__((noinline)) void sampled_free(void *p) {
    if (RAISED(otel_memory_free_semaphore))
        __asm__ __volatile__(SDT_NOTE("free", "otel_memory_free_semaphore", "8@%0") :: "r"(p));
    free(p);
}

#define N 1000
static void *kept[N];

__attribute__((noinline)) void leaky_path(void) {
    for (int i = 0; i < N; i++)
        kept[i] = sampled_malloc(4096);
}

__attribute__((noinline)) void churn_path(void) {
    for (int i = 0; i < N; i++)
        sampled_free(sampled_malloc(4096));
}

static void wait_for(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    while (access(path, F_OK) != 0)
        usleep(20000);
}

int main(int argc, char **argv) {
    (void)argc;
    printf("READY\n");
    fflush(stdout);
    wait_for(argv[1], "go");
    /* A first round, every block freed, then a pause: the tracer learns to unwind the
       producer's frames from these stacks, so the counted round below is walked whole. */
    leaky_path();
    for (int i = 0; i < N; i++)
        sampled_free(kept[i]);
    churn_path();
    sleep(1);
    leaky_path();
    churn_path();
    char path[4096];
    snprintf(path, sizeof path, "%s/done", argv[1]);
    fclose(fopen(path, "w"));
    for (;;)
        sleep(1);
}
"#;

/// Builds the foreign producer with `flags`, attaches to it in sampled mode, tells it to run
/// its allocations, and ends the session once it is done: the producer, and the run.
fn trace_producer(flags: &[&str]) -> (Target, Run) {
    let mut all = vec!["-O1", "-g", "-fno-omit-frame-pointer"];
    all.extend_from_slice(flags);
    let (_dir, bin) = compile_c(OTEL_PRODUCER, &all);
    let work = tempfile::tempdir().unwrap();
    let target = start_ready_cmd(Command::new(&bin).arg(work.path()));
    let pids = target.id().to_string();
    let tracer = Tracer::spawn(&["attach", "-p", &pids, "--mode", "sampled", "-d", "60"]);
    std::fs::write(work.path().join("go"), b"").unwrap();
    assert!(wait_for(30, || work.path().join("done").exists()));
    kill(tracer.id(), libc::SIGINT);
    let r = tracer.finish();
    assert_eq!(r.code, 0, "{}", r.stderr);
    (target, r)
}

/// The unfreed bytes and blocks of the sites whose stacks mention `function`.
fn unfreed_in(r: &Run, function: &str) -> (u64, u64) {
    let sites = r.json.as_ref().unwrap()["sites"].as_array().unwrap();
    sites
        .iter()
        .filter(|s| s.to_string().contains(function))
        .fold((0, 0), |(b, n), s| {
            (b + u(s, "unfreed_bytes"), n + u(s, "unfreed_count"))
        })
}

#[test]
fn attach_consumes_a_foreign_otel_memory_producer() {
    let _g = serial();
    let (target, r) = trace_producer(&[]);
    assert!(r.stderr.contains("(otel_memory)"), "{}", r.stderr);
    // Its interval is its own: the header does not claim one.
    assert!(r.json.as_ref().unwrap()["sample_rate"].is_null());
    assert!(
        r.stdout.contains("by the process's own sampler"),
        "{}",
        r.stdout
    );
    // Weight = size for every block: the figures are exact.
    assert_eq!(
        unfreed_in(&r, "leaky_path"),
        (4_096_000, 1000),
        "{}",
        r.stdout
    );
    assert_eq!(unfreed_in(&r, "churn_path").0, 0);
    // Two rounds (the first to learn the producer's frames) of 1000 leaky and 1000 churn.
    assert_eq!(r.counter("usdt_samples"), 4000);
    assert!(alive(target.id()));
}

#[test]
fn a_semaphore_that_cannot_be_raised_is_said_and_the_allocator_is_probed_instead() {
    let _g = serial();
    let (target, r) = trace_producer(&["-DRO_SEMAPHORE"]);
    assert!(
        r.stdout.contains("semaphore at 0x") && r.stdout.contains("it cannot be raised"),
        "{}",
        r.stdout
    );
    // The kernel samples the C library instead, at the session's interval: about 8 samples of
    // the 4 MB leak at 512 KiB (none at all has odds of e^-8).
    assert_eq!(r.json.as_ref().unwrap()["sample_rate"], 524288);
    assert!(r.stdout.contains("leaky_path"), "{}", r.stdout);
    assert_eq!(r.counter("usdt_samples"), 0);
    assert!(alive(target.id()));
}
