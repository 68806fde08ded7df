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
