//! Bad input gets a clear message and its own exit code, never a panic.

mod common;

use std::process::Command;

use common::*;

fn no_panic(r: &Run) {
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn missing_pid() {
    let r = leaktrace(&["attach", "-p", "4194300", "--duration", "1"]);
    no_panic(&r);
    assert_eq!(r.code, 4);
    assert!(
        r.stderr.contains("no process with PID 4194300"),
        "{}",
        r.stderr
    );
}

/// A PID that names no live user-space process — a kernel thread, a zombie — is refused with
/// exit 4 and says why.
#[test]
fn kernel_threads_and_zombies_are_refused_with_a_reason() {
    // kthreadd is PID 2 in every PID namespace that has kernel threads.
    let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    assert_eq!(comm.trim(), "kthreadd", "this machine's PID 2");
    let r = leaktrace(&["attach", "-p", "2", "-d", "1"]);
    no_panic(&r);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("kernel thread"), "{}", r.stderr);

    // A child that exited and is not reaped while the parent sleeps.
    let mut parent = Command::new("python3")
        .args([
            "-c",
            "import os, time\npid = os.fork()\nif pid == 0: os._exit(0)\nprint(pid, flush=True)\ntime.sleep(30)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let zombie = line.trim().to_string();
    assert!(wait_for(10, || !alive(zombie.parse().unwrap())));
    let r = leaktrace(&["attach", "-p", &zombie, "-d", "1"]);
    let _ = parent.kill();
    let _ = parent.wait();
    no_panic(&r);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("zombie"), "{}", r.stderr);
}

#[test]
fn missing_privileges() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(leaktrace_bin())
        .args(["attach", "-p", "1", "--duration", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

/// CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE without root: the programs load, the kernel refuses
/// the uprobe. The message gives the system call, its errno and what is missing.
#[test]
fn capabilities_without_sys_admin() {
    // A copy nobody can execute (the build folder's parents may be private).
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("leaktrace");
    std::fs::copy(leaktrace_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let caps = "+bpf,+perfmon,+sys_ptrace";
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(&bin)
        .args(["run", "--", "/bin/true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.code() == Some(0) {
        // A kernel that lets CAP_PERFMON create uprobes: nothing to explain.
        return;
    }
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("perf_event_open"), "{stderr}");
    assert!(
        stderr.contains("os error 13") || stderr.contains("os error 1)"),
        "{stderr}"
    );
    assert!(stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
}

#[test]
fn command_that_does_not_exist() {
    let r = leaktrace(&["run", "--", "/nonexistent/leaky-program"]);
    no_panic(&r);
    assert_eq!(r.code, 9);
    assert!(
        r.stderr.contains("cannot start /nonexistent/leaky-program"),
        "{}",
        r.stderr
    );
}

#[test]
fn python_only_on_a_non_python_process() {
    let r = leaktrace(&["run", "--python-only", "--", "/bin/true"]);
    no_panic(&r);
    assert_eq!(r.code, 6);
    assert!(r.stderr.contains("not a Python process"), "{}", r.stderr);
}

/// `snapshot` checks its output before the walk, and says what it can do instead for a process
/// that is not Python.
#[test]
fn snapshot_refuses_an_unwritable_output_and_a_non_python_process_up_front() {
    let mut py = std::process::Command::new(pyenv_python())
        .args(["-c", "import time; time.sleep(30)"])
        .spawn()
        .unwrap();
    let pid = py.id().to_string();
    let out = std::process::Command::new(leaktrace_bin())
        .args(["snapshot", "-p", &pid, "--json", "/nonexistent-dir/s.json"])
        .output()
        .unwrap();
    let _ = py.kill();
    let _ = py.wait();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot write /nonexistent-dir/s.json"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "no walk before the check: {stdout}");
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let r = leaktrace(&["snapshot", "-p", &sleeper.id().to_string()]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("not a Python process"), "{}", r.stderr);
    assert!(!r.stderr.contains("--python-only"), "{}", r.stderr);
}

/// A statically linked, stripped program has neither a libc to probe nor symbols. Its session
/// cannot start, so the program never runs: it is killed at its entry point and reaped before
/// leaktrace exits (were leaktrace first, the kernel would detach it and let it run).
#[test]
fn stripped_static_program_has_no_allocator_symbols() {
    let (dir, bin) = compile_c(
        "#include <stdio.h>\n#include <stdlib.h>\n\
         int main(int argc, char **argv){ FILE *f = fopen(argv[1], \"w\"); \
         if (f) fclose(f); return malloc(10) == 0; }\n",
        &["-static", "-s", "-O2"],
    );
    let marker = dir.path().join("ran");
    let r = leaktrace(&["run", "--", bin.to_str().unwrap(), marker.to_str().unwrap()]);
    no_panic(&r);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(
        r.stderr.contains("found no allocator to probe"),
        "{}",
        r.stderr
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !marker.exists(),
        "the program ran although its session never started"
    );
}

/// A full live-allocation table drops allocations, and says so.
#[test]
fn full_live_map_is_counted_and_shown() {
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script("import sys\nsys.path.insert(0, sys.argv[1])\nimport leakyext\nfor i in range(3000): leakyext.leak_malloc(64)\n");
    let r = run_python(&["--max-live", "500"], &py, &s, &[ext.to_str().unwrap()]);
    no_panic(&r);
    assert_eq!(r.code, 0);
    assert!(r.counter("live_map_full") > 0);
    assert!(r.json.as_ref().unwrap()["dropped"].as_u64().unwrap() > 0);
    assert!(r.stdout.contains("DROPS:"), "{}", r.stdout);
    assert!(r.stdout.contains("live_map_full"));
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = Command::new(leaktrace_bin())
        .args(["attach", "-p", "1", "--interval", "-3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(leaktrace_bin())
        .args(["run", "--min-size", "3 parsecs", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(leaktrace_bin())
        .args(["attach"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Values that overflow a deadline, flood the terminal or leave no room: usage errors with
    // a message, never a panic (exit 101).
    for args in [
        &["attach", "-p", "1", "--duration", "1e30"][..],
        &["attach", "-p", "1", "--duration", "18446744073709551616"],
        &["attach", "-p", "1", "--interval", "1e30"],
        &["attach", "-p", "1", "--interval", "1e-9"],
        &["attach", "-p", "1", "--max-live", "0"],
        &["attach", "-p", "1", "--max-sites", "0"],
        &["attach", "-p", "1", "--top", "0"],
        // The ceiling is set in the environment of the process `run` starts, in sampled mode.
        &[
            "attach",
            "-p",
            "1",
            "--mode",
            "sampled",
            "--sample-limit",
            "100",
        ],
        &["run", "--sample-limit", "100", "--", "true"],
        &[
            "run",
            "--mode",
            "sampled",
            "--sampler",
            "kernel",
            "--sample-limit",
            "1",
            "--",
            "true",
        ],
        &[
            "run",
            "--mode",
            "sampled",
            "--sample-limit",
            "-1",
            "--",
            "true",
        ],
    ] {
        let out = Command::new(leaktrace_bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A full site table keeps counting: new Python stacks fold into their native caller, the
/// leak that starts after the table filled is still found, and the report says so.
#[test]
fn full_site_table_folds_stacks_and_keeps_the_leak() {
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script("import sys\nsys.path.insert(0, sys.argv[1])\nimport json, leakyext\nfor i in range(2000): json.dumps({'k%d' % i: [i] * (i % 7)})\nfor i in range(500): leakyext.leak_malloc(1000)\n");
    let r = run_python(&["--max-sites", "300"], &py, &s, &[ext.to_str().unwrap()]);
    no_panic(&r);
    assert_eq!(r.code, 0);
    assert!(r.counter("sites_coarsened") > 0, "{}", r.stdout);
    let leak = r.site("leak_malloc", "malloc");
    assert_eq!(
        leak["unfreed_bytes"],
        500 * 1000,
        "every leaked block is counted"
    );
    assert!(r.stdout.contains("DROPS:") && r.stdout.contains("sites_coarsened"));
}
