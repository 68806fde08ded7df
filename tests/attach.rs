//! `leaktrace attach` to processes that already run: a window of tracing, a target that exits
//! mid-trace, clean detach on SIGINT and after SIGKILL of leaktrace.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Tests here count BPF programs system-wide; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Leaks 1,000 bytes every 5 ms (about 200 blocks a second) until killed, or for `argv[2]`
/// seconds.
const SLOW_LEAKER: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
limit = float(sys.argv[2]) if len(sys.argv) > 2 else 1e9
print("READY", flush=True)
t0 = time.time()
while time.time() - t0 < limit:
    leakyext.leak_malloc(1000)
    leakyext.ok(500)
    time.sleep(0.005)
"#;

fn bytes(s: &serde_json::Value) -> u64 {
    s["unfreed_bytes"].as_u64().unwrap()
}

/// Allocates and frees 500 bytes as fast as it can, until killed.
const TIGHT_CHURN: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leakyext
print("READY", flush=True)
while True:
    leakyext.ok(500)
"#;

#[test]
fn a_window_that_ends_mid_churn_reports_nothing_unfreed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(TIGHT_CHURN);
    let target = start_ready(&py, &s, &[ext.to_str().unwrap()]);
    let pid = target.id().to_string();
    // Each window ends between some malloc and its free. Read at once, that block looked
    // unfreed in 2 windows of 10; frees are now followed a moment past the end.
    for round in 0..10 {
        let r = leaktrace(&["attach", "-p", &pid, "--duration", "0.3"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let unfreed: u64 = r.sites("ok").iter().map(|s| bytes(s)).sum();
        assert_eq!(
            unfreed, 0,
            "round {round}: a block freed at once reported unfreed"
        );
        assert!(u(&r.json.as_ref().unwrap()["totals"], "allocs") > 0);
    }
}

#[test]
fn attach_for_a_window_then_detach_leaves_target_running() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for py in pythons().into_iter().map(|p| p.path) {
        eprintln!("=== {}", py.display());
        attach_for_a_window_then_detach_leaves_target_running_on(&py);
    }
}

fn attach_for_a_window_then_detach_leaves_target_running_on(py: &std::path::Path) {
    let ext = ext_dir(py);
    let s = script(SLOW_LEAKER);
    let target = start_ready(py, &s, &[ext.to_str().unwrap()]);
    let pid = target.id().to_string();
    let r = leaktrace(&["attach", "-p", &pid, "--duration", "2", "--verbose"]);
    assert_eq!(r.code, 0, "a window that ends normally exits 0");
    let site = &r.site("leak_malloc", "malloc");
    let n = site["unfreed_count"].as_u64().unwrap();
    // ~2 s at up to 200 leaks a second; Python and the machine may be slower.
    assert!((50..=500).contains(&n), "{n} leaks seen in 2 s");
    assert_eq!(bytes(site), n * 1000);
    assert!(r.sites("ok").is_empty());
    assert!(r.json.as_ref().unwrap()["target"]["end"]
        .as_str()
        .unwrap()
        .contains("detached"));

    // Detached: the target runs on, and its code gets every byte back (leaktrace returned
    // before the kernel's grace periods; its detacher ends them).
    assert!(alive(target.id()));
    let points = probe_points(&r.stderr);
    // libc's nine allocator functions at least (a stripped interpreter adds nothing).
    assert!(points.len() >= 9, "{points:?}");
    assert_code_restored(target.id(), &points, "after the window ended");
}

/// Waits until the kernel has removed every breakpoint leaktrace placed (its detacher takes a
/// grace period per link, ≈2 s for a full set) and no leaktrace program is left.
fn assert_code_restored(pid: u32, points: &[(String, String, u64)], when: &str) {
    let clean = wait_for(20, || {
        probe_bytes(pid, points).iter().all(|(_, m, f)| m == f)
            && bpf_programs_named("alloc_enter") == 0
    });
    assert!(
        clean,
        "probes remain {when}: {:?}",
        probe_bytes(pid, points)
    );
}

#[test]
fn target_exiting_mid_trace_still_gets_a_report() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SLOW_LEAKER);
    let target = start_ready(&py, &s, &[ext.to_str().unwrap(), "1.5"]);
    let pid = target.id().to_string();
    let started = std::time::Instant::now();
    let r = leaktrace(&["attach", "-p", &pid, "--duration", "60"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "leaktrace noticed the exit late"
    );
    assert_eq!(
        r.code, 5,
        "the target's exit during the window has its own exit code"
    );
    let j = r.json.as_ref().unwrap();
    assert!(j["target"]["end"].as_str().unwrap().contains("exited"));
    let site = &r.site("leak_malloc", "malloc");
    assert!(site["unfreed_count"].as_u64().unwrap() >= 20);
    // Symbolized while the process lived, though it is gone now.
    assert!(site["caller"]["module"]
        .as_str()
        .unwrap()
        .contains("leakyext"));
    let _ = target;
}

/// Runs `leaktrace attach --verbose` in the background and returns it once its probes are
/// attached, with the probe points it reported.
fn attach_in_background(pid: u32) -> (std::process::Child, Vec<(String, String, u64)>) {
    let mut lt = Command::new(leaktrace_bin())
        .args([
            "attach",
            "-p",
            &pid.to_string(),
            "--mode",
            "exact",
            "--verbose",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lt.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut text = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        text.push_str(&l);
        text.push('\n');
        // Placements are printed after attaching; the last one ends the block.
        if l.contains(" free ") && l.contains("@0x") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let points = probe_points(&text);
    assert!(!points.is_empty(), "no probe points in: {text}");
    (lt, points)
}

fn bpf_programs_named(name: &str) -> usize {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .matches(&format!(" name {name} "))
        .count()
}

#[test]
fn sigint_detaches_cleanly_and_reports() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SLOW_LEAKER);
    let target = start_ready(&py, &s, &[ext.to_str().unwrap()]);
    let (lt, points) = attach_in_background(target.id());
    // While attached, the probes are in the target's code: this check can fail.
    let during = probe_bytes(target.id(), &points);
    assert!(during.iter().all(|(_, mem, _)| *mem == 0xcc), "{during:?}");
    std::thread::sleep(Duration::from_millis(800));
    kill(lt.id(), libc::SIGINT);
    let out = lt.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("leak_malloc"), "{stdout}");
    assert!(stdout.contains("detached on Ctrl-C"));
    assert!(alive(target.id()));
    assert_code_restored(target.id(), &points, "after SIGINT");
}

#[test]
fn sigkill_of_leaktrace_leaves_no_probe_behind() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(SLOW_LEAKER);
    let target = start_ready(&py, &s, &[ext.to_str().unwrap()]);
    let (mut lt, points) = attach_in_background(target.id());
    assert!(probe_bytes(target.id(), &points)
        .iter()
        .all(|(_, m, _)| *m == 0xcc));
    assert!(bpf_programs_named("alloc_enter") >= 1);
    kill(lt.id(), libc::SIGKILL);
    lt.wait().unwrap();
    // The kernel releases links, programs and breakpoints with the last file descriptor.
    assert_code_restored(target.id(), &points, "after SIGKILL");
    if let Ok(ev) = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events") {
        assert!(ev.trim().is_empty(), "uprobe_events: {ev}");
    }
    assert!(alive(target.id()), "the target survives its tracer's death");
}

/// Prints READY, waits for the file `argv[1]`, then keeps 3,000 instances of a class and exits;
/// its shutdown takes a moment, as a service's does (attach reads the census while it runs: it
/// cannot pause a process it did not start).
const EXITS_ON_CUE: &str = r#"
import atexit, os, sys, time
class Kept:
    pass
atexit.register(time.sleep, 0.3)
print("READY", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
kept = [Kept() for _ in range(3000)]
"#;

#[test]
fn a_target_exiting_inside_the_window_still_gets_its_type_census() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let py = pyenv_python();
    let s = script(EXITS_ON_CUE);
    let dir = tempfile::tempdir().unwrap();
    let cue = dir.path().join("go");
    let target = start_ready(&py, &s, &[cue.to_str().unwrap()]);
    let (lt, _) = attach_in_background(target.id());
    // Tracing is under way (the probes are placed): let the target make its objects and exit.
    std::fs::write(&cue, "").unwrap();
    let out = lt.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "the target exited in the window"
    );
    let _ = target;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("growth since when tracing began"),
        "no census in:\n{table}"
    );
    let row = table
        .lines()
        .find(|l| l.trim_end().ends_with(" Kept"))
        .unwrap_or_else(|| panic!("no Kept row in:\n{table}"));
    assert!(row.trim_start().starts_with("+3000 "), "{row}");
}

/// Waits for `go` to exist, leaks 2,000,000 B from a C extension and 2,000 small Python
/// objects, says DONE, then idles.
const ON_CUE: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
go = sys.argv[2]
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
for _ in range(250):
    leakyext.leak_malloc(8000)  # LINE-C
kept = [bytes(60) + i.to_bytes(4, "little") for i in range(2000)]  # LINE-PY
print("DONE", flush=True)
time.sleep(60)
"#;

/// leaktrace's side of `--control`, as a client sees it.
struct Control {
    stdin: std::process::ChildStdin,
    answers: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Control {
    fn read(&mut self) -> serde_json::Value {
        let line = self.answers.next().expect("an answer").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn ask(&mut self, req: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.stdin, "{req}").unwrap();
        self.read()
    }
}

/// `attach --control`: a client's requests answered while tracing goes on (what the pytest
/// plugin uses), on the interpreters with symbols and on Debian's stripped one; the session
/// ends when the client's input does, and the target goes on.
#[test]
fn control_answers_mark_live_redirect_and_ends_with_its_input() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let line = |tag: &str| 1 + ON_CUE.lines().position(|l| l.contains(tag)).unwrap() as u64;
    for py in pythons() {
        let who = py.path.display().to_string();
        let ext = ext_dir(&py.path);
        let s = script(ON_CUE);
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let mut target = Command::new(&py.path)
            .arg(&*s)
            .arg(&ext)
            .arg(&go)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(target.stdout.take().unwrap()).lines();
        assert!(out.next().unwrap().unwrap().contains("READY"), "{who}");
        let pid = target.id();
        let mut lt = Command::new(leaktrace_bin())
            .args([
                "attach",
                "-p",
                &pid.to_string(),
                "--mode",
                "exact",
                "--control",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut c = Control {
            stdin: lt.stdin.take().unwrap(),
            answers: BufReader::new(lt.stdout.take().unwrap()).lines(),
        };
        let ready = c.read();
        assert_eq!(ready["ready"]["pid"], pid, "{who}: {ready}");
        let bad = c.ask("live soon");
        assert!(
            bad["error"].as_str().unwrap().contains("SINCE_NS"),
            "{who}: {bad}"
        );
        // Every Python object through the probed malloc from here on, until `restore`.
        let redirected = c.ask("redirect");
        if py.build == Build::Debug {
            // A debug build's allocator is hooked by default: refused, saying so (the pytest
            // plugin then traces every Python-allocator call instead).
            let why = redirected["error"].as_str().unwrap_or_default();
            assert!(why.contains("hooked"), "{who}: {redirected}");
            drop(c);
            let _ = lt.wait();
            let _ = target.kill();
            let _ = target.wait();
            continue;
        }
        assert_eq!(redirected["redirected"], 4, "{who}: {redirected}");
        let mark = c.ask("mark")["mark_ns"].as_u64().unwrap();
        std::fs::write(&go, "").unwrap();
        assert!(out.next().unwrap().unwrap().contains("DONE"), "{who}");
        assert_eq!(c.ask("restore")["restored"], true, "{who}");
        let live = c.ask(&format!("live {mark} 5"))["live"].clone();
        let bytes = live["bytes"].as_u64().unwrap();
        assert!(
            (2_000_000 + 2_000 * 90..2_000_000 + 2_000 * 200 + 100_000).contains(&bytes),
            "{who}: live since the mark: {bytes} B"
        );
        let sites = live["report"]["sites"].as_array().unwrap();
        let names_line = |s: &serde_json::Value, n: u64| {
            s["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["line"] == n)
        };
        // One stack, or two when the interpreter specialized the call midway (its eval loop
        // then calls from another address).
        let c_leak: u64 = sites
            .iter()
            .filter(|s| s["caller"]["function"] == "leak_malloc" && names_line(s, line("LINE-C")))
            .map(|s| s["unfreed_bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(
            c_leak, 2_000_000,
            "{who}: the C extension's leak, with its line: {live}"
        );
        let objects: u64 = sites
            .iter()
            .filter(|s| names_line(s, line("LINE-PY")))
            .map(|s| s["unfreed_count"].as_u64().unwrap())
            .sum();
        assert!(
            objects >= 2_000,
            "{who}: the small objects, through the redirect, with their line: {live}"
        );
        // Nothing was allocated before the mark's epoch: a later mark sees none of it.
        let later = c.ask("mark")["mark_ns"].as_u64().unwrap();
        let none = c.ask(&format!("live {later} 5"))["live"]["bytes"]
            .as_u64()
            .unwrap();
        assert!(none < 2_000_000, "{who}: {none} B live since a later mark");
        drop(c);
        let waited = wait_for(20, || !matches!(lt.try_wait(), Ok(None)));
        assert!(waited, "{who}: leaktrace did not end with its input");
        let status = lt.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut lt.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{who}: {err}");
        assert!(
            err.contains("leaktrace report"),
            "{who}: the report goes to stderr: {err}"
        );
        assert!(alive(pid), "{who}: the target goes on");
        let _ = target.kill();
        let _ = target.wait();
    }
}
