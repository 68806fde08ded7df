//! Python stacks read by the kernel from real interpreters: the right file, function and line
//! for each site, callers kept apart, threads, the depth limit, and tracemalloc as ground truth.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use serde_json::Value;

/// Every interpreter of tests/fixtures/pythons.txt: 3.11 to 3.15, with symbols, stripped and
/// debug builds.
fn interpreters() -> Vec<PathBuf> {
    pythons().into_iter().map(|p| p.path).collect()
}

/// Known functions allocating on known lines: a global cache grown by a list, a dict, bytearrays
/// and strings, and one helper reached from two callers.
const KNOWN_LINES: &str = r#"
cache = []
def make_buffer(n):
    return bytearray(n)                                      # line 4
def from_upload():
    for i in range(300):
        cache.append(make_buffer(4000))                      # line 7
def from_download():
    for i in range(200):
        cache.append(make_buffer(4000))                      # line 10
def grow_strings():
    cache.append(["s%07d" % i * 20 for i in range(3000)])    # line 12
def grow_dict():
    cache.append({i: i * 2.5 for i in range(20000)})         # line 14
from_upload()
from_download()
grow_strings()
grow_dict()
"#;

fn frames(site: &Value) -> Vec<(String, String, u64)> {
    site["python_stack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["filename"].as_str().unwrap().to_string(),
                f["function"].as_str().unwrap().to_string(),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Sites whose innermost Python frame is `function` at `line` of the script. A comprehension
/// is its own function before 3.12 (`grow.<locals>.<listcomp>`): it counts as its enclosing one.
fn sites_at<'a>(r: &'a Run, script: &str, function: &str, line: u64) -> Vec<&'a Value> {
    let comprehension = format!("{function}.<locals>.<");
    r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            frames(s).last().is_some_and(|(f, func, l)| {
                f == script && (func == function || func.starts_with(&comprehension)) && *l == line
            })
        })
        .collect()
}

fn total(sites: &[&Value]) -> u64 {
    sites
        .iter()
        .map(|s| s["unfreed_bytes"].as_u64().unwrap())
        .sum()
}

#[test]
fn names_file_function_and_line_on_every_interpreter() {
    let s = script(KNOWN_LINES);
    let path = s.to_str().unwrap().to_string();
    for py in interpreters() {
        eprintln!("=== {}", py.display());
        // Every Python-allocator call, each with its own line.
        let r = leaktrace(&[
            "run",
            "--python-allocators",
            "--top",
            "100000",
            "--",
            py.to_str().unwrap(),
            &path,
        ]);
        assert_eq!(r.code, 0);
        let j = r.json.as_ref().unwrap();
        let exported_only = j["python_coverage"] == "exported_api_only";

        // The two callers of make_buffer are two sites, each with its own caller line.
        let helper = sites_at(&r, &path, "make_buffer", 4);
        let callers: HashMap<u64, u64> = helper
            .iter()
            .filter_map(|s| {
                let f = frames(s);
                let outer = &f[f.len() - 2];
                let fn_name = outer.1.as_str();
                (fn_name == "from_upload" || fn_name == "from_download")
                    .then(|| (outer.2, s["unfreed_count"].as_u64().unwrap()))
            })
            .fold(HashMap::new(), |mut m, (line, n)| {
                *m.entry(line).or_default() += n;
                m
            });
        assert!(
            callers.contains_key(&7) && callers.contains_key(&10),
            "{}: {callers:?}",
            py.display()
        );
        if !exported_only {
            // Every buffer: 300 from one caller, 200 from the other (Python's own allocator).
            assert!(
                callers[&7] >= 300 && callers[&10] >= 200,
                "{}: {callers:?}",
                py.display()
            );
            let from_upload = frames(helper[0]);
            assert_eq!(from_upload.first().map(|f| f.1.as_str()), Some("<module>"));
        }

        // Strings and the dict land on their lines, in their functions.
        let strings = total(&sites_at(&r, &path, "grow_strings", 12));
        let dict = total(&sites_at(&r, &path, "grow_dict", 14));
        assert!(
            strings > 0 && dict > 0,
            "{}: strings {strings} dict {dict}",
            py.display()
        );
        if !exported_only {
            // 3,000 strings of ~160 characters; a dict of 20,000 floats.
            assert!(strings >= 3000 * 160, "{}: {strings}", py.display());
            assert!(dict >= 20000 * 24, "{}: {dict}", py.display());
        }
        // No frame of the script is ever unreadable.
        for site in j["sites"].as_array().unwrap() {
            for f in frames(site) {
                if f.0 == path {
                    assert_ne!(f.1, "<unknown>");
                }
            }
        }
    }
}

/// A workload with big allocations on known lines; with `tracemalloc` it measures them from
/// inside and writes {line: bytes} for lines holding ≥ 100 KB to the file named by argv[1].
fn tracemalloc_workload(tracemalloc: bool) -> String {
    let start = if tracemalloc {
        "tracemalloc.start(1)"
    } else {
        "pass"
    };
    format!("\nimport json, sys, tracemalloc\n{start}\nkeep = []\n") + WORKLOAD_TAIL
}

const WORKLOAD_TAIL: &str = r#"def records():
    for i in range(4000):
        keep.append({"id": i, "name": "user%d" % i})        # line 7
def blobs():
    for i in range(150):
        keep.append(bytes(2000 + i))                          # line 10
def text():
    keep.append(["x" * 100 + str(i) for i in range(5000)])    # line 12
def matrix():
    keep.append([[0.5 * j for j in range(50)] for i in range(400)])  # line 14
records(); blobs(); text(); matrix()
lines = {}
if tracemalloc.is_tracing():
    for st in tracemalloc.take_snapshot().statistics("lineno"):
        fr = st.traceback[0]
        if fr.filename == __file__ and st.size >= 100_000:
            lines[fr.lineno] = st.size
json.dump(lines, open(sys.argv[1], "w"))
"#;

/// Unfreed bytes per innermost line of `path`, from sites of the given families.
fn bytes_per_line(r: &Run, path: &str, families: &[&str]) -> HashMap<u64, u64> {
    let mut ours: HashMap<u64, u64> = HashMap::new();
    for site in r.json.as_ref().unwrap()["sites"].as_array().unwrap() {
        if !families.iter().any(|f| site["family"] == *f) {
            continue;
        }
        if let Some((file, _, line)) = frames(site).last() {
            if file == path {
                *ours.entry(*line).or_default() += site["unfreed_bytes"].as_u64().unwrap();
            }
        }
    }
    ours
}

/// Within 5% on every line tracemalloc saw holding ≥ 100 KB; prints both.
fn assert_matches(truth: &HashMap<String, u64>, ours: &HashMap<u64, u64>) {
    assert!(
        truth.len() >= 3,
        "tracemalloc found too few big lines: {truth:?}"
    );
    eprintln!("line  tracemalloc  leaktrace  diff");
    for (line, tm) in truth {
        let lt = ours
            .get(&line.parse::<u64>().unwrap())
            .copied()
            .unwrap_or(0);
        let diff = (lt as f64 - *tm as f64) / *tm as f64;
        eprintln!("{line:>4} {tm:>12} {lt:>10} {:+.2}%", diff * 100.0);
        assert!(
            diff.abs() <= 0.05,
            "line {line}: tracemalloc {tm}, leaktrace {lt}"
        );
    }
}

/// tracemalloc's figures from inside `python`, untraced, for the workload.
fn tracemalloc_truth(python: &std::path::Path) -> HashMap<String, u64> {
    let out = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let s = script(&tracemalloc_workload(true));
    let st = std::process::Command::new(python)
        .arg(&*s)
        .arg(&*out)
        .status()
        .unwrap();
    assert!(st.success());
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// The per-line bytes tracemalloc (inside the target) reports still allocated at the end,
/// against leaktrace's Python-allocator bytes for the same innermost lines, in the same run.
/// On every interpreter with a symbol table (3.11–3.13, and the debug builds of 3.14 and 3.15).
#[test]
fn python_allocator_bytes_per_line_match_tracemalloc() {
    let out = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let s = script(&tracemalloc_workload(true));
    let path = s.to_str().unwrap().to_string();
    for py in pythons_with_symbols() {
        eprintln!("=== {}", py.display());
        let r = run_python(&["--python-allocators"], &py, &s, &[out.to_str().unwrap()]);
        assert_eq!(r.code, 0);
        let truth: HashMap<String, u64> =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        // tracemalloc's own bookkeeping goes through libc: compare Python's allocator only.
        assert_matches(&truth, &bytes_per_line(&r, &path, &["python"]));
    }
}

/// Debian's stripped, LTO-built python3.11 inlines pymalloc into its callers: the exported API
/// sees a fraction. `run` starts it with PYTHONMALLOC=malloc (`--pymalloc auto`), and every
/// allocation is seen through libc: the figures tracemalloc measures on pyenv's 3.11.
#[test]
fn stripped_interpreter_is_complete_under_pymalloc_auto() {
    for py in pythons().into_iter().filter(|p| p.build == Build::Stripped) {
        eprintln!("=== {}", py.path.display());
        stripped_is_complete(&py.path);
    }
}

/// `python`'s own tracemalloc figures, untraced, against leaktrace's under `--pymalloc auto`;
/// then partial coverage under `--pymalloc keep`.
fn stripped_is_complete(py: &std::path::Path) {
    let truth = tracemalloc_truth(py);
    let out = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let s = script(&tracemalloc_workload(false));
    let path = s.to_str().unwrap().to_string();
    let r = run_python(&["--python-allocators"], py, &s, &[out.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json.as_ref().unwrap()["python_coverage"], "raw_malloc");
    assert!(r.stderr.contains("PYTHONMALLOC=malloc"));
    assert!(r.stdout.contains("complete (PYTHONMALLOC=malloc"));
    assert_matches(&truth, &bytes_per_line(&r, &path, &["python", "libc"]));

    // Left alone, the exported API misses most of it.
    let r = run_python(
        &["--pymalloc", "keep", "--python-allocators"],
        py,
        &s,
        &[out.to_str().unwrap()],
    );
    assert_eq!(
        r.json.as_ref().unwrap()["python_coverage"],
        "exported_api_only"
    );
    let seen: u64 = bytes_per_line(&r, &path, &["python", "libc"])
        .values()
        .sum();
    let all: u64 = truth.values().sum();
    eprintln!("--pymalloc keep: {seen} of {all} bytes seen");
    assert!(
        seen < all * 9 / 10,
        "expected partial coverage: {seen} of {all}"
    );
}

/// `attach --redirect-pymalloc` to a stripped interpreter that is already running: every
/// Python allocation of the window seen (per-line bytes against the interpreter's own
/// tracemalloc, ≥ 99 % in all), pymalloc's table slots put back at detach, and the target
/// running on.
#[test]
fn stripped_interpreter_is_complete_under_attach_redirect() {
    let _g = serial();
    for py in pythons().into_iter().filter(|p| p.build == Build::Stripped) {
        eprintln!("=== {}", py.path.display());
        redirect_is_complete(&py.path);
    }
}

fn redirect_is_complete(py: &std::path::Path) {
    use std::io::{BufRead, BufReader};
    let truth = tracemalloc_truth(py);
    // Four lines before the workload, as in tracemalloc_workload: the same line numbers.
    let s = script(
        &(String::from(
            "import json, os, sys, time, tracemalloc\n\
             print(\"READY\", flush=True)\n\
             while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n\
             keep = []\n",
        ) + WORKLOAD_TAIL
            + "print(\"DONE\", flush=True)\n\
               while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n\
               x = [str(i) * 3 for i in range(200000)]\n\
               print(\"AFTER\", sum(map(len, x)), flush=True)\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (out, go, after) = (
        dir.path().join("o"),
        dir.path().join("go"),
        dir.path().join("after"),
    );
    let mut child = std::process::Command::new(py)
        .arg(&*s)
        .args([&out, &go, &after])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let target = Target(child);
    let mut next = || lines.next().unwrap().unwrap();
    assert_eq!(next(), "READY");
    let pid = target.id().to_string();
    let tracer = Tracer::spawn(&[
        "attach",
        "-p",
        &pid,
        "--redirect-pymalloc",
        "--mode",
        "exact",
        "--top",
        "100000",
    ]);
    std::fs::write(&go, "").unwrap();
    assert_eq!(next(), "DONE");
    kill(tracer.id(), libc::SIGINT);
    let r = tracer.finish();
    assert_eq!(r.code, 0);
    assert_eq!(r.json.as_ref().unwrap()["python_coverage"], "redirected");
    let path = s.to_str().unwrap().to_string();
    let ours = bytes_per_line(&r, &path, &["python", "libc"]);
    assert_matches(&truth, &ours);
    let (seen, all): (u64, u64) = truth
        .iter()
        .map(|(l, tm)| (ours.get(&l.parse().unwrap()).copied().unwrap_or(0), *tm))
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    eprintln!("attach --redirect-pymalloc: {seen} of {all} bytes");
    assert!(seen * 100 >= all * 99, "{seen} of {all}");

    // Each slot holds pymalloc's function again, and the target runs on.
    let slots: Vec<(u64, u64)> = r
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("leaktrace: redirected allocator slot "))
        .map(|l| {
            let (at, rest) = l.split_once(": ").unwrap();
            let from = rest.split(" -> ").next().unwrap();
            let hex = |h: &str| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap();
            (hex(at), hex(from))
        })
        .collect();
    assert_eq!(slots.len(), 4, "{}", r.stderr);
    for (at, pymalloc) in slots {
        assert_eq!(
            word_at(target.id(), at),
            pymalloc,
            "slot {at:#x} not restored"
        );
    }
    std::fs::write(&after, "").unwrap();
    assert_eq!(
        next(),
        format!(
            "AFTER {}",
            (0..200_000)
                .map(|i: u64| 3 * i.to_string().len() as u64)
                .sum::<u64>()
        )
    );
}

/// A table already hooked (tracemalloc started from the command line) is refused with the
/// reason and exit 2, and nothing is written.
#[test]
fn redirect_refuses_hooked_tables() {
    let _g = serial();
    let py = debian_python();
    let s = script("import time\nprint('READY', flush=True)\ntime.sleep(60)\n");
    let mut child = std::process::Command::new(&py)
        .args(["-X", "tracemalloc=1"])
        .arg(&*s)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let target = Target(child);
    let pid = target.id().to_string();
    let r = leaktrace(&["attach", "-p", &pid, "--redirect-pymalloc", "-d", "1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("hooked (tracemalloc"), "{}", r.stderr);
    assert!(alive(target.id()));
}

/// The 8 bytes at `at` in process `pid`.
fn word_at(pid: u32, at: u64) -> u64 {
    u64::from_le_bytes(mem_bytes(pid, at, 8).try_into().unwrap())
}

#[test]
fn each_thread_gets_its_own_stack() {
    for py in interpreters() {
        eprintln!("=== {}", py.display());
        each_thread_on(&py);
    }
}

fn each_thread_on(py: &std::path::Path) {
    let ext = ext_dir(py);
    let s = script(
        r#"
import sys, threading
sys.path.insert(0, sys.argv[1])
import leakyext
keep = []
def worker_a():
    for i in range(2000):
        keep.append(bytearray(3000))          # line 8
        leakyext.leak_malloc_nogil(1111)      # line 9
def worker_b():
    for i in range(2000):
        keep.append(str(i) * 300)             # line 12
        leakyext.leak_malloc_nogil(2222)      # line 13
ta = threading.Thread(target=worker_a); tb = threading.Thread(target=worker_b)
ta.start(); tb.start(); ta.join(); tb.join()
"#,
    );
    let path = s.to_str().unwrap().to_string();
    let r = run_python(&[], py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    let a = total(&sites_at(&r, &path, "worker_a", 8));
    let b = total(&sites_at(&r, &path, "worker_b", 12));
    assert!(a >= 2000 * 3000, "worker_a's buffers: {a}");
    assert!(b >= 2000 * 300, "worker_b's strings: {b}");
    // malloc made with the GIL released, while the other thread may hold it: the thread is
    // found through the kernel's map of thread states, not the GIL holder.
    let na = total(&sites_at(&r, &path, "worker_a", 9));
    let nb = total(&sites_at(&r, &path, "worker_b", 13));
    assert!(
        na >= 2000 * 1111 * 95 / 100,
        "worker_a's native leaks: {na}"
    );
    assert!(
        nb >= 2000 * 2222 * 95 / 100,
        "worker_b's native leaks: {nb}"
    );
    // Nothing was attributed to the other thread's lines.
    for site in sites_at(&r, &path, "worker_a", 9) {
        assert_eq!(site["unfreed_bytes"].as_u64().unwrap() % 1111, 0);
    }
    for site in sites_at(&r, &path, "worker_b", 13) {
        assert_eq!(site["unfreed_bytes"].as_u64().unwrap() % 2222, 0);
    }
}

#[test]
fn deep_recursion_is_cut_at_the_depth_limit_and_marked() {
    for py in interpreters() {
        eprintln!("=== {}", py.display());
        deep_recursion_on(&py);
    }
}

fn deep_recursion_on(py: &std::path::Path) {
    let s = script(
        r#"
keep = []
def dive(n):
    if n == 0:
        keep.append(bytearray(123456))   # line 5
        return
    dive(n - 1)                          # line 7
dive(40)
# The module's code object dies as the script ends: a site named after that is `<unknown>`
# there (docs/lifecycle.md; a debug build scribbles freed memory, so it always loses that race).
import time; time.sleep(0.2)
"#,
    );
    let path = s.to_str().unwrap().to_string();
    let r = run_python(&["--python-depth", "16"], py, &s, &[]);
    assert_eq!(r.code, 0);
    // The 123,456-byte buffer (the bytearray object and the list's growth are sites too).
    let buffer = |r: &Run| -> Vec<Value> {
        sites_at(r, &path, "dive", 5)
            .into_iter()
            .filter(|s| s["unfreed_bytes"].as_u64().unwrap() >= 123_456)
            .cloned()
            .collect()
    };
    let site = buffer(&r);
    assert_eq!(site.len(), 1, "{:#?}", r.json.as_ref().unwrap()["sites"]);
    let f = frames(&site[0]);
    assert_eq!(f.len(), 16, "cut at the limit");
    assert_eq!(site[0]["python_truncated"], true);
    assert!(f[..15]
        .iter()
        .all(|(_, func, line)| func == "dive" && *line == 7));
    assert!(r.stdout.contains("outer frames omitted"));

    // With room to spare the whole stack is there, down to <module>.
    let r = run_python(&["--python-depth", "64"], py, &s, &[]);
    let site = buffer(&r);
    let f = frames(&site[0]);
    assert_eq!(site[0]["python_truncated"], false);
    assert_eq!(f.len(), 42);
    assert_eq!(f[0].1, "<module>");
}
