//! Production mode: sampled allocation tracing against the truth, growth mode (page faults, no
//! allocator probes), post-mortem reports of targets that die mid-trace, forked workers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Leaks `argv[2]` blocks of 10,000 bytes through the C extension, and churns Python objects
/// that are all freed.
const KNOWN_LEAK: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leakyext
def leak(n):
    for _ in range(n):
        leakyext.leak_malloc(10000)
def churn():
    for i in range(100000):
        x = {"k": [i, str(i)]}
leak(int(sys.argv[2]))
churn()
"#;

#[test]
fn sampled_estimate_is_within_20_percent_and_exact_within_1() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(KNOWN_LEAK);
    let truth = 4000u64 * 10_000;
    let args = [ext.to_str().unwrap(), "4000"];

    let exact = run_python(&[], &py, &s, &args);
    assert_eq!(exact.code, 0);
    assert_eq!(exact.json.as_ref().unwrap()["mode"], "exact");
    let site = exact.site("leak_malloc", "malloc");
    let err = u(&site, "unfreed_bytes").abs_diff(truth) as f64 / truth as f64;
    assert!(
        err <= 0.01,
        "exact: {} of {truth}",
        u(&site, "unfreed_bytes")
    );
    assert_eq!(u(&site, "unfreed_count"), 4000);

    // One sample per 64 KiB: each 10,000-byte block is sampled with p = 14 %, about 570 samples,
    // a standard deviation of 4 % on the estimate.
    // The kernel samples (every allocator call probed): tests/usdt.rs has the process sample.
    let sampled = run_python(
        &["--sample", "64KiB", "--sampler", "kernel"],
        &py,
        &s,
        &args,
    );
    assert_eq!(sampled.code, 0);
    let j = sampled.json.as_ref().unwrap();
    assert_eq!(j["mode"], "sampled");
    assert_eq!(j["sample_rate"], 65536);
    assert!(
        sampled.stdout.contains("unbiased estimates"),
        "{}",
        sampled.stdout
    );
    let site = sampled.site("leak_malloc", "malloc");
    let est = u(&site, "unfreed_bytes");
    let err = est.abs_diff(truth) as f64 / truth as f64;
    assert!(err <= 0.20, "sampled estimate {est} vs {truth}");
    let blocks = u(&site, "unfreed_count");
    assert!((3200..=4800).contains(&blocks), "sampled blocks {blocks}");
    // Sampling recorded a fraction of the allocations, and said how many it passed over.
    assert!(sampled.counter("allocs") < exact.counter("allocs") / 4);
    assert!(sampled.counter("unsampled") > exact.counter("allocs") / 2);
    // The churned objects were freed: no site near the leak's size comes from churn().
    let churn: u64 = sampled.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["python_stack"].to_string().contains("\"churn\""))
        .map(|s| u(s, "unfreed_bytes"))
        .sum();
    assert!(churn < truth / 20, "churn left {churn} bytes");
}

/// Grows a global list by about 1 MB a second (10 bytearrays of 100 kB) while a steady loop
/// allocates and frees.
const GROWER: &str = r#"
import sys, time
hold = []
def grow():
    hold.append(bytearray(100_000))
def steady():
    return sum(len(str(i)) for i in range(2000))
for _ in range(200):
    steady()
print("READY", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    grow()
    steady()
    time.sleep(0.1)
"#;

/// Serves requests that allocate and free, after a warm-up; never grows.
const STEADY: &str = r#"
import json, time
def handle(i):
    req = {"id": i, "items": [str(j) for j in range(50)], "blob": bytearray(20000)}
    return len(json.dumps({"id": req["id"], "n": len(req["items"])}))
for i in range(20000):
    handle(i)
print("READY", flush=True)
while True:
    for i in range(1000):
        handle(i)
    time.sleep(0.01)
"#;

#[test]
fn growth_mode_names_the_line_that_grows_and_nothing_in_a_steady_process() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(GROWER);
    let target = start_ready(&py, &s, &["30"]);
    let pid = target.id().to_string();
    let r = leaktrace(&[
        "attach", "-p", &pid, "--mode", "growth", "--sample", "64KiB", "-d", "4",
    ]);
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["mode"], "growth");
    // No allocator probe at all.
    assert!(
        j["probes"].as_array().unwrap().is_empty(),
        "{}",
        j["probes"]
    );
    let top = &j["sites"][0];
    assert_eq!(top["allocator"], "page fault");
    let py_stack = top["python_stack"].as_array().unwrap();
    let inner = py_stack.last().expect("a Python stack");
    assert_eq!(inner["function"], "grow", "{top}");
    assert_eq!(inner["line"], 5);
    // 4 s at ~1 MB/s, estimated from one sampled fault per 64 KiB.
    let grew = u(top, "unfreed_bytes");
    assert!((1_500_000..=8_000_000).contains(&grew), "grew {grew}");
    // RSS over time is in the series.
    let series = j["series"].as_array().unwrap();
    assert!(series.len() >= 3);
    let rss = |p: &serde_json::Value| p["rss_bytes"].as_u64().unwrap();
    assert!(rss(series.last().unwrap()) > rss(&series[0]) + 1_000_000);

    // Steady processes: a request loop, and a numpy loop whose big arrays make glibc grow and
    // trim its heap (and map and unmap) thousands of times a second.
    for (body, limit) in [(STEADY, 1_000_000), (NUMPY_STEADY, 4_000_000)] {
        let s = script(body);
        let steady = start_ready(&py, &s, &[]);
        let r = leaktrace(&[
            "attach",
            "-p",
            &steady.id().to_string(),
            "--mode",
            "growth",
            "-d",
            "3",
        ]);
        assert_eq!(r.code, 0);
        let grown: u64 = r.json.as_ref().unwrap()["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| u(s, "unfreed_bytes"))
            .sum();
        assert!(grown < limit, "a steady process grew {grown} bytes");
    }
}

/// Creates and drops numpy arrays of 100–800 kB forever, after a warm-up.
const NUMPY_STEADY: &str = r#"
import numpy as np
for i in range(500):
    a = np.ones(12_500 + (i % 8) * 12_500)
print("READY", flush=True)
i = 0
while True:
    a = np.ones(12_500 + (i % 8) * 12_500)
    b = a * 2.0
    del a, b
    i += 1
"#;

/// Leaks 100 kB blocks until killed.
const LEAK_UNTIL_KILLED: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
print("READY", flush=True)
def leak_forever():
    while True:
        leakyext.leak_malloc(100_000)
        time.sleep(0.005)
leak_forever()
"#;

#[test]
fn sigkill_mid_trace_gives_a_post_mortem_report() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(LEAK_UNTIL_KILLED);
    let target = start_ready(&py, &s, &[ext.to_str().unwrap()]);
    let pid = target.id();
    let tracer = Tracer::spawn(&["attach", "-p", &pid.to_string(), "--mode", "exact"]);
    // Killed 1.5 s after its probes are in: at 200 leaks a second, hundreds are live.
    std::thread::sleep(Duration::from_millis(1500));
    kill(pid, libc::SIGKILL);
    let r = tracer.finish();
    assert_eq!(r.code, 5, "the target died during the window");
    let j = r.json.as_ref().unwrap();
    let death = &j["target"]["death"];
    assert_eq!(death["cause"], "signal", "{death}");
    assert_eq!(death["signal"], "SIGKILL");
    // The test process sent it.
    let me = std::process::id();
    assert!(
        death["sender"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {me} ")),
        "{death}"
    );
    assert!(j["target"]["end"]
        .as_str()
        .unwrap()
        .contains("live when it died"));
    let site = r.site("leak_malloc", "malloc");
    assert!(u(&site, "unfreed_count") >= 50, "{site}");
    assert_eq!(
        u(&site, "unfreed_bytes"),
        u(&site, "unfreed_count") * 100_000
    );
}

/// A memory cgroup limited to `limit` bytes (v2 if mounted with the memory controller, else
/// v1), removed on drop.
struct MemCgroup(std::path::PathBuf);

impl MemCgroup {
    fn new(limit: u64) -> MemCgroup {
        let name = format!("leaktrace-test-{}", std::process::id());
        let v2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(std::path::Path::new)
            .find(|p| {
                std::fs::read_to_string(p.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
            });
        let (dir, file) = match v2 {
            Some(root) => {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                (root.join(&name), "memory.max")
            }
            None => (
                std::path::Path::new("/sys/fs/cgroup/memory").join(&name),
                "memory.limit_in_bytes",
            ),
        };
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating memory cgroup {}: {e}", dir.display()));
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        // No swap to escape to, where the knob exists.
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        MemCgroup(dir)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = wait_for(5, || std::fs::remove_dir(&self.0).is_ok());
    }
}

/// Touches every byte it leaks, so the cgroup's limit is reached and the OOM killer acts.
const LEAK_UNTIL_OOM: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
print("READY", flush=True)
while not os.path.exists(sys.argv[2]): time.sleep(0.01)
hold = []
def hoard():
    while True:
        hold.append(bytearray(1 << 20))
        time.sleep(0.002)
hoard()
"#;

#[test]
fn oom_kill_in_a_memory_cgroup_gives_a_post_mortem_report() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(LEAK_UNTIL_OOM);
    let cg = MemCgroup::new(150 << 20);
    // The target hoards once leaktrace has attached: `go` appears.
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The shell joins the cgroup and becomes the target (same pid).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" "$3" "$4" "$5""#)
        .arg("sh")
        .arg(&cg.0)
        .arg(&py)
        .arg(&*s)
        .arg(&ext)
        .arg(&go)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("READY"));
    let target = Target(child);
    let tracer = Tracer::spawn(&[
        "attach",
        "-p",
        &target.id().to_string(),
        "--mode",
        "exact",
        "-d",
        "60",
    ]);
    std::fs::write(&go, "").unwrap();
    let r = tracer.finish();
    assert_eq!(r.code, 5, "the target died during the window");
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["target"]["death"]["cause"], "oom_kill", "{}", j["target"]);
    assert!(r.stdout.contains("OOM killer"), "{}", r.stdout);
    // What was live at death: most of the cgroup's 150 MiB, at the line that hoards.
    let top = &j["sites"][0];
    assert!(u(top, "unfreed_bytes") > 80 << 20, "{top}");
    let inner = top["python_stack"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(inner["function"], "hoard", "{top}");
    assert_eq!(inner["line"], 10);
    drop(target);
    drop(cg);
}

/// Forks three workers, each leaking a different number of 1,000-byte blocks in its own
/// function, and runs a non-Python program (exec'd, so not followed).
const PRE_FORK: &str = r#"
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def worker_a():
    for _ in range(100): leakyext.leak_malloc(1000)
def worker_b():
    for _ in range(200): leakyext.leak_malloc(1000)
def worker_c():
    for _ in range(300): leakyext.leak_malloc(1000)
pids = []
for work in (worker_a, worker_b, worker_c):
    pid = os.fork()
    if pid == 0:
        work()
        time.sleep(0.2)
        os._exit(0)
    pids.append(pid)
subprocess.run(["true"])
for p in pids:
    os.waitpid(p, 0)
"#;

#[test]
fn follow_forks_finds_each_workers_leak() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(PRE_FORK);
    let r = run_python(&["--follow-forks"], &py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    let main = u64::from(r.json.as_ref().unwrap()["target"]["pid"].as_u64().unwrap() as u32);
    let mut found = std::collections::BTreeMap::new();
    for site in r.sites("leak_malloc") {
        let inner = site["python_stack"].as_array().unwrap().last().unwrap();
        let f = inner["function"].as_str().unwrap().to_string();
        found.insert(f, (u(site, "pid"), u(site, "unfreed_count")));
    }
    let mut pids = std::collections::BTreeSet::new();
    for (f, n) in [("worker_a", 100), ("worker_b", 200), ("worker_c", 300)] {
        let (pid, count) = found[f];
        assert_eq!(count, n, "{f}");
        assert_ne!(pid, main, "{f} ran in a child");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 3, "one process per worker");
    // Each worker is listed with its parent and its own totals; the exec'd `true` is not
    // followed past its exec.
    let procs = j["processes"].as_array().unwrap();
    for pid in &pids {
        let p = procs.iter().find(|p| u(p, "pid") == *pid).expect("listed");
        assert_eq!(p["parent"].as_u64(), Some(main));
        assert!(u(p, "unfreed_bytes") >= 100_000);
        assert_eq!(p["end"], "exited with code 0");
    }
    assert!(
        procs
            .iter()
            .any(|p| p["end"].as_str().unwrap().contains("exec'd")),
        "{procs:?}"
    );
    assert!(r.stdout.contains("processes traced"));
}

/// A pre-fork server: forks two workers, then says READY; each worker leaks in its own function
/// until killed.
const PRE_FORKED: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def serve_a():
    while True:
        leakyext.leak_malloc(2000)
        time.sleep(0.005)
def serve_b():
    while True:
        leakyext.leak_malloc(3000)
        time.sleep(0.005)
kids = []
for serve in (serve_a, serve_b):
    pid = os.fork()
    if pid == 0:
        serve()
    kids.append(pid)
time.sleep(0.3)
print("READY", flush=True)
try:
    while True:
        time.sleep(1)
finally:
    for k in kids:
        os.kill(k, 9)
"#;

#[test]
fn attach_follow_forks_adopts_workers_forked_before() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(PRE_FORKED);
    let master = start_ready(&py, &s, &[ext.to_str().unwrap()]);
    let r = leaktrace(&[
        "attach",
        "-p",
        &master.id().to_string(),
        "--follow-forks",
        "--mode",
        "exact",
        "-d",
        "2",
    ]);
    assert_eq!(r.code, 0);
    let mut workers = std::collections::BTreeSet::new();
    for (f, size) in [("serve_a", 2000), ("serve_b", 3000)] {
        let sites: Vec<&serde_json::Value> = r
            .sites("leak_malloc")
            .into_iter()
            .filter(|s| s["python_stack"].to_string().contains(&format!("\"{f}\"")))
            .collect();
        assert_eq!(sites.len(), 1, "{f}: {sites:?}");
        let n = u(sites[0], "unfreed_count");
        assert!(n >= 50, "{f}: {n} blocks in 2 s");
        assert_eq!(u(sites[0], "unfreed_bytes"), n * size);
        workers.insert(u(sites[0], "pid"));
    }
    assert_eq!(workers.len(), 2);
    assert!(!workers.contains(&u64::from(master.id())));
    let procs = r.json.as_ref().unwrap()["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "the master and its two workers: {procs:?}");
    // Kill the workers with the master: the test's Target only kills the master.
    for w in workers {
        kill(w as u32, libc::SIGKILL);
    }
}

/// A `multiprocessing` pool whose workers are exec'd interpreters (the `spawn` start method,
/// also how `forkserver` starts): each task leaks `n` 1,000-byte blocks.
const SPAWN_POOL: &str = r#"
import multiprocessing as mp, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def leak_in_worker(n):
    # Python stacks of an exec'd worker start once leaktrace has found its new interpreter
    # (docs/lifecycle.md); on a loaded machine that can take a few hundred milliseconds.
    time.sleep(0.5)
    for _ in range(n):
        leakyext.leak_malloc(1000)
    time.sleep(1)
    return n
if __name__ == "__main__":
    mp.set_start_method("spawn")
    with mp.Pool(2) as pool:
        print(pool.map(leak_in_worker, [100, 200, 300, 400]))
"#;

#[test]
fn follow_forks_follows_spawned_pool_workers_through_exec() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SPAWN_POOL);
    let r = run_python(&["--follow-forks"], &py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    let main = r.json.as_ref().unwrap()["target"]["pid"].as_u64().unwrap();
    let sites = r.sites("leak_malloc");
    let total: u64 = sites.iter().map(|s| u(s, "unfreed_count")).sum();
    assert_eq!(total, 1000, "every leaked block, across the workers");
    for site in &sites {
        assert_ne!(u(site, "pid"), main);
        let inner = site["python_stack"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(inner["function"], "leak_in_worker", "{site}");
    }
}
