//! Containers: a target in its own PID namespace (`unshare --pid --fork --mount-proc`, as a
//! container runtime starts one) attached from the host by its host PID, and leaktrace itself
//! running inside a PID namespace (a privileged container, a sidecar). The interpreter knows its
//! threads by the container's ids, the kernel by the host's. And targets whose files are named
//! from another root: a `chroot` inside a mount namespace, and a `pivot_root` into a root built
//! here, with the interpreter at a path the host does not have. And a real runtime: an OCI
//! container run by runc, attached from the host.

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
    let _g = serial();
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
    let out = unshare.stdout.take().unwrap();
    // Killed when the test ends, pass or fail.
    let target = Target(unshare);
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.next().is_some_and(|l| l.unwrap().contains("READY")),
        "the target never became ready"
    );
    std::thread::spawn(move || for _ in lines {});
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
    let _g = serial();
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
    let json = r
        .json
        .as_ref()
        .expect("a JSON report from inside the namespace");
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
    assert_eq!(
        sum(&child, "unfreed_count"),
        30,
        "the forked child: {}",
        r.stdout
    );
    assert!(child.iter().all(|s| s["pid"].as_u64() != Some(pid)));
    let death = &json["target"]["death"];
    assert_eq!(death["cause"], "signal", "{death}");
    assert_eq!(death["signal"], "SIGTERM", "{death}");
    assert!(
        death["sender"].as_str().is_some_and(|s| s.contains("(sh)")),
        "the sender, as the namespace knows it: {death}"
    );
}

/// Starts `PYTHON SCRIPT` (the interpreter's prefix bind-mounted at /opt/lt-python) in a new mount
/// and PID namespace whose root is a tmpfs at `$1` holding the host's /usr and /etc, entered
/// with `chroot` or `pivot_root` (`$4`). Args: ROOT PREFIX SCRIPT MODE.
const ENTER_ROOT: &str = r#"set -e
R=$1
mount --make-rprivate /
mount -t tmpfs tmpfs "$R"
mkdir -p "$R/usr" "$R/etc" "$R/proc" "$R/tmp" "$R/dev" "$R/opt/lt-python" "$R/old"
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"; ln -s usr/bin "$R/bin"
mount --bind /usr "$R/usr"; mount --bind /etc "$R/etc"; mount --rbind /dev "$R/dev"
mount --bind "$2" "$R/opt/lt-python"
cp "$3" "$R/tmp/app.py"
export LD_LIBRARY_PATH=/opt/lt-python/lib
if [ "$4" = chroot ]; then
    mount -t proc proc "$R/proc"
    exec chroot "$R" /opt/lt-python/bin/python3 /tmp/app.py
fi
cd "$R"
pivot_root . old
mount -t proc proc /proc
umount -l /old
exec /opt/lt-python/bin/python3 /tmp/app.py
"#;

/// Keeps a 4,000-byte bytearray every 2 ms on line 6, for at most a minute.
const KEEP_GROWING: &str = r#"
import time
keep = []
print("READY", flush=True)
for _ in range(30000):
    keep.append(bytearray(4000))
    time.sleep(0.002)
"#;

/// `attach -d 2` to `pid`, whose interpreter is the one bound at /opt/lt-python: the report's
/// JSON, once it is checked that leaktrace found that interpreter.
fn attach_to_lt_python(pid: u32) -> serde_json::Value {
    let r = leaktrace(&[
        "attach",
        "-p",
        &pid.to_string(),
        "-d",
        "2",
        "--mode",
        "exact",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let json = r.json.unwrap();
    assert!(
        json["target"]["python_module"]
            .as_str()
            .is_some_and(|m| m.ends_with("/opt/lt-python/lib/libpython3.11.so.1.0")),
        "the interpreter at /opt/lt-python: {}",
        json["target"]
    );
    json
}

fn attach_inside_another_root(mode: &str) {
    let _g = serial();
    let py = pyenv_python();
    let prefix = py.parent().unwrap().parent().unwrap();
    let root = tempfile::tempdir().unwrap();
    let enter = script(ENTER_ROOT);
    let app = script(KEEP_GROWING);
    let mut unshare = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--kill-child", "sh"])
        .arg(&*enter)
        .arg(root.path())
        .arg(prefix)
        .arg(&*app)
        .arg(mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) is needed for the container tests");
    let out = unshare.stdout.take().unwrap();
    // Killed when the test ends, pass or fail.
    let target = Target(unshare);
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.next().is_some_and(|l| l.unwrap().contains("READY")),
        "the target never became ready in its {mode} root"
    );
    std::thread::spawn(move || for _ in lines {});
    let pid = child_of(target.id());
    // The host has no /opt/lt-python: its files are found through the target's root or mappings.
    assert!(
        !std::path::Path::new("/opt/lt-python").exists(),
        "/opt/lt-python exists on this host: the test would not show where files are read from"
    );

    let json = attach_to_lt_python(pid);
    let kept: u64 = json["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|site| {
            site["caller"]["function"] == "PyByteArray_Resize"
                && site["python_stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["filename"] == "/tmp/app.py" && f["line"] == 6)
        })
        .map(|site| site["unfreed_count"].as_u64().unwrap())
        .sum();
    // 2 s at one per 2 ms (plus sleep overshoot): hundreds, named down to the line.
    assert!(
        kept >= 200,
        "{kept} blocks under app.py:6 in the {mode} root"
    );
    assert!(alive(pid), "the target runs on after the window");
}

#[test]
fn attach_to_a_chrooted_target_in_its_own_mount_namespace() {
    attach_inside_another_root("chroot");
}

#[test]
fn attach_to_a_target_that_pivoted_into_another_root() {
    attach_inside_another_root("pivot");
}

/// A container runc runs: `rootfs` holds only mount points; the host's /usr and /etc and the
/// interpreter's prefix (at /opt/lt-python) are bound read-only, the script is copied in.
struct RuncContainer {
    id: String,
    bundle: tempfile::TempDir,
    _run: Target,
}

impl RuncContainer {
    fn start(prefix: &std::path::Path, script: &str) -> (Self, std::process::ChildStdout) {
        let bundle = tempfile::tempdir().unwrap();
        let rootfs = bundle.path().join("rootfs");
        for d in [
            "usr",
            "etc",
            "proc",
            "dev",
            "sys",
            "tmp",
            "opt/python",
            "app",
        ] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        for (link, to) in [
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("bin", "usr/bin"),
        ] {
            std::os::unix::fs::symlink(to, rootfs.join(link)).unwrap();
        }
        std::fs::write(rootfs.join("app/app.py"), script).unwrap();
        succeed(Command::new("runc").arg("spec").current_dir(bundle.path()));
        let path = bundle.path().join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(["/opt/lt-python/bin/python3", "/app/app.py"]);
        spec["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push("LD_LIBRARY_PATH=/opt/lt-python/lib".into());
        let mounts = spec["mounts"].as_array_mut().unwrap();
        for (src, dst) in [
            ("/usr", "/usr"),
            ("/etc", "/etc"),
            (prefix.to_str().unwrap(), "/opt/lt-python"),
        ] {
            mounts.push(serde_json::json!({
                "destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"]
            }));
        }
        std::fs::write(&path, spec.to_string()).unwrap();
        let id = format!("leaktrace-test-{}", std::process::id());
        let mut run = Command::new("runc")
            .args(["run", &id])
            .current_dir(bundle.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("runc is needed for the container tests (cargo xtask setup installs it)");
        let out = run.stdout.take().unwrap();
        (
            Self {
                id,
                bundle,
                _run: Target(run),
            },
            out,
        )
    }

    /// The container's init process, by its host PID.
    fn pid(&self) -> u32 {
        let out = succeed(Command::new("runc").args(["state", &self.id]));
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        state["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .current_dir(self.bundle.path())
            .output();
    }
}

#[test]
fn attach_by_host_pid_to_a_runc_container() {
    let _g = serial();
    let py = pyenv_python();
    let prefix = py.parent().unwrap().parent().unwrap();
    let (container, out) = RuncContainer::start(prefix, IN_A_CONTAINER);
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.next().is_some_and(|l| l.unwrap().contains("READY")),
        "the container's target never became ready"
    );
    std::thread::spawn(move || for _ in lines {});
    let pid = container.pid();
    let json = attach_to_lt_python(pid);
    // Both threads' stacks, down to the line, as on the host.
    let outer: std::collections::HashSet<String> = json["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|site| {
            site["python_stack"].as_array().unwrap().iter().any(|f| {
                f["filename"] == "/app/app.py" && f["line"] == 6 && f["function"] == "tick"
            })
        })
        .map(|site| site["python_stack"][0]["function"].to_string())
        .collect();
    assert!(outer.len() >= 2, "one thread's stacks only: {outer:?}");
    assert!(alive(pid), "the container runs on after the window");
}
