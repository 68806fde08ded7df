//! Fault injection: leaktrace SIGKILLed at random instants — while it loads, attaches, holds a
//! new child, pauses its own child at a lifecycle point, traces, reports — across `run`,
//! `attach` and `--follow-forks`. Whatever the instant: no process is left stopped, no BPF
//! program stays loaded, and the target's output is the output it has untraced.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Writes its pid to `argv[1]/pid`, then forks 6 children 0.15 s apart; each allocates and
/// reports a checksum of what it made. Everything it prints goes to `argv[1]/out`, flushed per
/// line, so a partial run shows as a prefix.
const WORKLOAD: &str = r#"
import os, sys, time
d = sys.argv[1]
with open(os.path.join(d, "pid"), "w") as f:
    f.write(str(os.getpid()))
out = open(os.path.join(d, "out"), "a", buffering=1)
keep = []
for i in range(6):
    keep.append(bytearray(b"%d" % i) * 5000)
    pid = os.fork()
    if pid == 0:
        made = [bytes(range(i, i + 200)) * 10 for _ in range(50)]
        out.write("child %d %d\n" % (i, sum(len(m) for m in made)))
        out.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    out.write("parent %d %d\n" % (i, sum(len(k) for k in keep)))
    time.sleep(0.15)
out.write("done\n")
"#;

/// Our BPF programs still loaded (a link or a descriptor left behind holds them).
fn our_programs() -> Vec<String> {
    const OURS: &[&str] = &[
        "alloc_enter",
        "alloc_exit",
        "free_enter",
        "lifecycle_enter",
        "fork_return",
        "process_fork",
        "process_exec",
        "signal_generate",
        "signal_deliver",
        "exit_group",
        "oom_victim",
    ];
    let out = succeed(Command::new("bpftool").args(["prog", "list", "-j"]));
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        // The kernel keeps 15 characters of a name.
        .filter(|n| OURS.iter().any(|o| o.starts_with(n)))
        .map(str::to_string)
        .collect()
}

/// The state letter of `pid` (`None` once it is gone or a zombie).
fn state(pid: u32) -> Option<char> {
    stat_of(pid)
        .map(|(state, _)| state)
        .filter(|&c| c != 'Z' && c != 'X')
}

/// Every live process whose parent chain reaches `root` (and `root`): pid → state.
fn tree(root: u32) -> Vec<(u32, char)> {
    let parents: std::collections::HashMap<u32, (u32, char)> = processes()
        .into_iter()
        .map(|(pid, state, ppid)| (pid, (ppid, state)))
        .collect();
    parents
        .iter()
        .filter(|(&pid, _)| {
            let mut p = pid;
            for _ in 0..64 {
                if p == root {
                    return true;
                }
                match parents.get(&p) {
                    Some(&(pp, _)) if pp != 0 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .map(|(&pid, &(_, st))| (pid, st))
        .filter(|&(_, st)| st != 'Z')
        .collect()
}

/// Watches `root`'s tree until `root` is gone: no process in it may stay stopped 3 s.
fn watch_until_gone(root: u32, what: &str) {
    let mut stopped: std::collections::HashMap<u32, Instant> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(root).is_some() {
        assert!(
            Instant::now() < deadline,
            "{what}: the target never finished"
        );
        let now = tree(root);
        stopped.retain(|p, _| {
            now.iter()
                .any(|&(q, st)| q == *p && (st == 'T' || st == 't'))
        });
        for (p, st) in now {
            // A group stop (T) is a hold the guardian lifts at once. A ptrace stop (t) of
            // `run`'s child lasts until the killed tracer has finished dying, which takes
            // seconds here (its uprobe links go one RCU grace period at a time).
            let limit = if st == 'T' { 5 } else { 20 };
            if st == 'T' || st == 't' {
                let since = *stopped.entry(p).or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < Duration::from_secs(limit),
                    "{what}: process {p} (of target {root}) left stopped ({st})"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes `parent` started that are not leaktrace itself (its guardian, its detacher):
/// `run`'s command.
fn commands_started_by(parent: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|&(_, _, ppid)| ppid == parent)
        .map(|(pid, _, _)| pid)
        .filter(|&pid| comm(pid).is_some_and(|c| !c.starts_with("leaktrace")))
        .collect()
}

/// The workload's output untraced.
fn reference(py: &Path, s: &Path) -> String {
    let d = tempfile::tempdir().unwrap();
    succeed(Command::new(py).arg(s).arg(d.path()));
    std::fs::read_to_string(d.path().join("out")).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Run,
    RunFollowForks,
    Attach,
    AttachFollowForks,
}

/// One instant: starts the workload traced in `mode`, SIGKILLs leaktrace `after` its start,
/// and checks the target: never left stopped, its output unchanged.
fn kill_at(mode: Mode, after: Duration, py: &Path, s: &Path, expected: &str) {
    let d = tempfile::tempdir().unwrap();
    let what = format!("{mode:?}, SIGKILL after {:.3} s", after.as_secs_f64());
    let mut target = None;
    let mut lt = Command::new(leaktrace_bin());
    match mode {
        Mode::Run | Mode::RunFollowForks => {
            lt.arg("run");
            if matches!(mode, Mode::RunFollowForks) {
                lt.arg("--follow-forks");
            }
            lt.arg("--").arg(py).arg(s).arg(d.path());
        }
        Mode::Attach | Mode::AttachFollowForks => {
            let t = Command::new(py)
                .arg(s)
                .arg(d.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            assert!(wait_for(30, || d.path().join("pid").exists()));
            lt.args(["attach", "-p", &t.id().to_string()]);
            if matches!(mode, Mode::AttachFollowForks) {
                lt.arg("--follow-forks");
            }
            target = Some(Target(t));
        }
    }
    let mut lt = lt
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    // `run`'s child, which may not have reached the script yet (stopped at its entry point, or
    // paused where its main module starts): it must not be left stopped either.
    let started = commands_started_by(lt.id());
    kill(lt.id(), libc::SIGKILL);
    let _ = lt.wait();
    for child in started {
        watch_until_gone(child, &what);
    }
    let pid: Option<u32> = std::fs::read_to_string(d.path().join("pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    match pid {
        Some(pid) => watch_until_gone(pid, &what),
        // `run` killed before it started its child: nothing ran, nothing to harm.
        None => assert!(matches!(mode, Mode::Run | Mode::RunFollowForks), "{what}"),
    }
    if let Some(mut t) = target {
        let status = t.0.wait().unwrap();
        assert!(status.success(), "{what}: the target ended {status}");
    }
    let out = std::fs::read_to_string(d.path().join("out")).unwrap_or_default();
    if pid.is_some() {
        assert_eq!(out, expected, "{what}: the target's output changed");
    }
}

#[test]
fn sigkill_at_random_instants_never_harms_the_target() {
    let _g = serial();
    // `run` leaves its links to a detacher that releases them after it exits (one RCU grace
    // period each): the sessions of the tests before this one may still be going.
    assert!(
        wait_for(90, || our_programs().is_empty()),
        "another leaktrace is running: {:?}",
        our_programs()
    );
    let py = pyenv_python();
    let s = script(WORKLOAD);
    let expected = reference(&py, &s);
    assert!(expected.ends_with("done\n"), "{expected}");
    let modes = [
        Mode::Run,
        Mode::RunFollowForks,
        Mode::Attach,
        Mode::AttachFollowForks,
    ];
    // Stratified: instant i falls in the i-th slice of the timeline, at a random point in it,
    // so the whole timeline is covered and each run tries new points. The seed reproduces one.
    let seed: u64 = std::env::var("LEAKTRACE_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.unwrap_or_default().as_nanos() as u64 | 1
        });
    eprintln!("LEAKTRACE_FAULT_SEED={seed}");
    let mut x = seed;
    let mut next = move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const INSTANTS: u64 = 52;
    // From before the BPF object is loaded to after the workload's end (about 1 s traced).
    const SPAN_MS: u64 = 1800;
    let slice = SPAN_MS / INSTANTS;
    let instants: Vec<(Mode, Duration)> = (0..INSTANTS)
        .map(|i| {
            let mode = modes[i as usize % modes.len()];
            (mode, Duration::from_millis(i * slice + next() % slice))
        })
        .collect();
    // A killed leaktrace takes seconds to die (the kernel releases each uprobe link after an
    // RCU grace period): four sessions at a time keep the test short. Each checks its own
    // target; the programs are checked for all of them at the end.
    const AT_ONCE: usize = 4;
    std::thread::scope(|scope| {
        for k in 0..AT_ONCE {
            let (instants, py, s, expected) = (&instants, &py, &s, &expected);
            scope.spawn(move || {
                for &(mode, after) in instants.iter().skip(k).step_by(AT_ONCE) {
                    kill_at(mode, after, py, s, expected);
                }
            });
        }
    });
    assert!(
        wait_for(60, || our_programs().is_empty()),
        "BPF programs left loaded: {:?}",
        our_programs()
    );
}
