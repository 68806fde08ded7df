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

/// A statically linked, stripped program has neither a libc to probe nor symbols.
#[test]
fn stripped_static_program_has_no_allocator_symbols() {
    let (_dir, bin) = compile_c(
        "#include <stdlib.h>\nint main(void){ return malloc(10) == 0; }\n",
        &["-static", "-s", "-O2"],
    );
    let r = leaktrace(&["run", "--", bin.to_str().unwrap()]);
    no_panic(&r);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(
        r.stderr.contains("found no allocator to probe"),
        "{}",
        r.stderr
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
}

/// A full site table keeps counting: new Python stacks fold into their native caller, the
/// leak that starts after the table filled is still found, and the report says so.
#[test]
fn full_site_table_folds_stacks_and_keeps_the_leak() {
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script("import sys\nsys.path.insert(0, sys.argv[1])\nimport json, leakyext\nfor i in range(2000): json.dumps({'k%d' % i: [i] * (i % 7)})\nfor i in range(500): leakyext.leak_malloc(1000)\n");
    let r = run_python(&["--max-sites", "3000"], &py, &s, &[ext.to_str().unwrap()]);
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
