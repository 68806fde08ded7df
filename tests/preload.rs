//! The preloaded sampler inside real interpreters, sampling with no tracer attached (the
//! semaphore forced up, so every path a traced process takes runs, and the USDTs stay `nop`s):
//! the program's output must not change, and each CPython allocator must get the wrappers made
//! for it.

mod common;

use std::process::Command;

use common::*;

/// Threads, a fork, a subinterpreter, and objects of every size class and over 512 bytes,
/// grown by realloc (`bytearray +=`), hashed into the output so that any corrupted block shows.
const WORKLOAD: &str = r#"
import sys, os, threading, hashlib, json
def work(seed, n):
    h = hashlib.sha256()
    kept = []
    for i in range(n):
        d = {"k%d" % j: ("v%d" % (i * j + seed)) * (j % 7) for j in range(12)}
        l = list(d.values()); l.extend(map(str, range(i % 40)))
        s = ",".join(l)
        b = bytearray(s.encode()); b += b"x" * (i % 700)
        h.update(bytes(b)); h.update(json.dumps(d).encode())
        if i % 97 == 0:
            kept.append(s[:50])
    return h.hexdigest(), len(kept)
res = {}
ts = [threading.Thread(target=lambda k=k: res.__setitem__(k, work(k, 2000))) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
out = [work(9, 3000)]
pid = os.fork()
if pid == 0:
    print("child", work(7, 2000), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
try:
    import _interpreters as si
except ImportError:
    try:
        import _xxsubinterpreters as si
    except ImportError:
        si = None
if si is not None:
    i = si.create()
    si.run_string(i, "x = [str(n) * 3 for n in range(20000)]; y = {n: str(n) for n in range(5000)}")
    si.destroy(i)
    out.append("subinterpreter")
print(sorted(res.items()), out)
"#;

/// Runs WORKLOAD with `PYTHONMALLOC=pymalloc_env`, alone or under the preload with its
/// semaphore forced up at 64 KiB; returns stdout, and the preload's report line.
fn run(py: &std::path::Path, pymalloc_env: &str, preload: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(py);
    cmd.env("PYTHONMALLOC", pymalloc_env);
    match preload {
        None => {
            cmd.args(["-c", WORKLOAD]);
        }
        Some(lib) => {
            let forced = format!(
                "import ctypes; ctypes.CDLL(None).leaktrace_preload_force_active(True)\n{WORKLOAD}"
            );
            cmd.env("LD_PRELOAD", lib)
                .env("LEAKTRACE_SAMPLE_PYTHON", "1")
                .env("LEAKTRACE_SAMPLE_BYTES", "64k")
                .env("LEAKTRACE_PRELOAD_STATS", "1")
                .args(["-c", &forced]);
        }
    }
    let out = succeed(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = stderr
        .lines()
        .find(|l| l.starts_with("leaktrace-preload: python allocators"))
        .unwrap_or_default()
        .to_string();
    (String::from_utf8(out.stdout).unwrap(), report)
}

#[test]
fn forced_sampling_changes_no_output_and_picks_the_wrappers_per_allocator() {
    let dir = tempfile::tempdir().unwrap();
    let lib = String::from_utf8(
        succeed(
            Command::new(leaktrace_bin())
                .args(["preload", "--dir"])
                .arg(dir.path()),
        )
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    for py in pythons() {
        for pymalloc_env in ["", "malloc", "debug"] {
            let (plain, _) = run(&py.path, pymalloc_env, None);
            let (sampled, report) = run(&py.path, pymalloc_env, Some(&lib));
            let what = format!(
                "{} {:?} PYTHONMALLOC={pymalloc_env:?}",
                py.version, py.build
            );
            assert_eq!(plain, sampled, "{what}: output changed under the sampler");
            assert!(plain.contains("subinterpreter"), "{what}: {plain}");
            // What the wrappers sampled, per domain: "obj wrapped at exit, sampled N, ...".
            let obj = report.split("; obj ").nth(1).unwrap_or_default();
            let sampled_n: u64 = obj
                .split(", sampled ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            // pymalloc serves objects only without `malloc`; a debug build or `debug` puts
            // CPython's debug hooks over it, which get the general wrappers.
            let pymalloc = pymalloc_env.is_empty() && py.build != Build::Debug;
            match pymalloc_env {
                "malloc" => assert!(obj.starts_with("not wrapped"), "{what}: {report}"),
                _ => {
                    assert!(obj.starts_with("wrapped at exit"), "{what}: {report}");
                    assert!(sampled_n > 100, "{what}: {report}");
                    assert_eq!(obj.contains("(as pymalloc)"), pymalloc, "{what}: {report}");
                    assert!(
                        !obj.contains("found not to be pymalloc"),
                        "{what}: {report}"
                    );
                }
            }
        }
    }
}
