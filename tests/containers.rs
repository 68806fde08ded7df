//! Targets in containers: a process in its own PID namespace (`unshare --pid --fork
//! --mount-proc`, as a container runtime starts one), attached from the host by its host PID.
//! The interpreter knows its threads by the container's ids, the kernel by the host's.

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
