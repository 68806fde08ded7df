//! Containers: a target in its own PID namespace (`unshare --pid --fork --mount-proc`, as a
//! container runtime starts one) attached from the host by its host PID, and leaktrace itself
//! running inside a PID namespace (a privileged container, a sidecar). The interpreter knows its
//! threads by the container's ids, the kernel by the host's.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Keeps a bytearray per tick on line 6, from two threads, for at most a minute.
const IN_A_CONTAINER: &str = r#"
import threading, time
keep = []
def tick():
    for _ in range(6000):
        keep.append(bytearray(3000))
        time.sleep(0.01)
threading.Thread(target=tick, daemon=True).start()
print("READY", flush=True)
tick()
"#;

/// The host PID of the interpreter `unshare` started (its only child).
fn child_of(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "unshare started no child");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn attach_by_host_pid_names_python_frames_in_a_pid_namespace() {
    let py = pyenv_python();
    let s = script(IN_A_CONTAINER);
    let mut unshare = Command::new("unshare")
        // The interpreter is the namespace's init: it dies with unshare, as the test ends.
        .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(&py)
        .arg(&*s)
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) is needed for the container tests");
    let mut lines = BufReader::new(unshare.stdout.take().unwrap()).lines();
    assert!(
        lines.next().is_some_and(|l| l.unwrap().contains("READY")),
        "the target never became ready"
    );
    std::thread::spawn(move || for _ in lines {});
    let target = Target(unshare);
    let pid = child_of(target.id());
    // Inside, the interpreter is pid 1: the namespaces differ.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");

    let r = leaktrace(&[
        "attach",
        "-p",
        &pid.to_string(),
        "-d",
        "2",
        "--mode",
        "exact",
    ]);
    assert_eq!(r.code, 0);
    let path = s.to_str().unwrap();
    let sites = r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .clone();
    let on_line: Vec<_> = sites
        .iter()
        .filter(|site| {
            site["python_stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["filename"] == path && f["line"] == 6 && f["function"] == "tick")
        })
        .collect();
    assert!(
        !on_line.is_empty(),
        "no site under tick() line 6: Python frames missing in the namespace"
    );
    // Both threads: the main one (tick called at module level) and the started one.
    let outer: std::collections::HashSet<String> = on_line
        .iter()
        .map(|site| site["python_stack"][0]["function"].to_string())
        .collect();
    assert!(outer.len() >= 2, "one thread's stacks only: {outer:?}");
    assert!(alive(pid), "the target runs on after the window");
}

/// Leaks 2,000 bytearrays of 5,000 bytes on line 6, forks a child that keeps 30 of 70,000 on
/// line 10, then is sent SIGTERM by a shell it started.
const LEAK_FORK_AND_DIE: &str = r#"
import os, subprocess, time
keep = []
def grow():
    for _ in range(2000):
        keep.append(bytearray(5000))
grow()
pid = os.fork()
if pid == 0:
    held = [bytearray(70000) for _ in range(30)]
    time.sleep(0.3)
    os._exit(0)
os.waitpid(pid, 0)
subprocess.Popen(["sh", "-c", "sleep 0.3; kill -TERM %d" % os.getpid()])
time.sleep(30)
"#;

#[test]
fn run_inside_a_pid_namespace_traces_its_child_forks_and_death() {
    let py = pyenv_python();
    let s = script(LEAK_FORK_AND_DIE);
    let r = leaktrace_under(
        &["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"],
        &[
            "run",
            "--follow-forks",
            "--top",
            "1000",
            "--",
            py.to_str().unwrap(),
            s.to_str().unwrap(),
        ],
    );
    let json = r.json.as_ref().expect("a JSON report from inside the namespace");
    // Inside, `unshare`'s child is 1 and leaktrace's own child a small number.
    let pid = json["target"]["pid"].as_u64().unwrap();
    assert!(pid < 100, "the target's pid is the namespace's: {pid}");
    let path = s.to_str().unwrap();
    let on_line = |line: u64| -> Vec<&serde_json::Value> {
        json["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|site| {
                // The bytearrays' buffers, not the list growing beside them.
                site["caller"]["function"] == "PyByteArray_Resize"
                    && site["python_stack"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|f| f["filename"] == path && f["line"] == line)
            })
            .collect()
    };
    let sum = |sites: &[&serde_json::Value], key: &str| -> u64 {
        sites.iter().map(|s| s[key].as_u64().unwrap()).sum()
    };
    let grown = on_line(6);
    assert_eq!(sum(&grown, "unfreed_count"), 2000, "{}", r.stdout);
    assert_eq!(sum(&grown, "unfreed_bytes"), 2000 * 5001);
    let child = on_line(10);
    assert_eq!(sum(&child, "unfreed_count"), 30, "the forked child: {}", r.stdout);
    assert!(child.iter().all(|s| s["pid"].as_u64() != Some(pid)));
    let death = &json["target"]["death"];
    assert_eq!(death["cause"], "signal", "{death}");
    assert_eq!(death["signal"], "SIGTERM", "{death}");
    assert!(
        death["sender"].as_str().is_some_and(|s| s.contains("(sh)")),
        "the sender, as the namespace knows it: {death}"
    );
}
