//! Analysis on real processes: leak, cache, steady and start-up told apart; `diff` of two runs;
//! the `--fail-over` CI gate with suppressions; RSS against the live heap.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;

/// Four behaviours in four functions, for `argv[1]` seconds: a global list growing ~1 MB/s, a
/// bounded `lru_cache` fed distinct keys (fills in ~6 s, then holds), an unbounded one (grows
/// for good), and a loop that allocates and frees.
const SERVICE: &str = r#"
import functools, sys, time
hold = []
def grow_list():
    hold.append(bytearray(50_000))
@functools.lru_cache(maxsize=256)
def bounded(k):
    return "b" * 1000 + str(k)
@functools.lru_cache(maxsize=None)
def unbounded(k):
    return "u" * 1000 + str(k)
def churn():
    return sum(len(bytearray(2000)) for _ in range(50))
end = time.time() + float(sys.argv[1])
k = 0
while time.time() < end:
    for _ in range(2):
        bounded(k)
        unbounded(k)
        k += 1
    grow_list()
    churn()
    time.sleep(0.05)
"#;

/// The site holding the most under Python function `f` (innermost Python frame).
fn top_site_in<'a>(r: &'a Run, f: &str) -> Option<&'a Value> {
    r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["python_stack"]
                .as_array()
                .and_then(|p| p.last())
                .is_some_and(|fr| fr["function"] == f)
        })
        .max_by_key(|s| s["unfreed_bytes"].as_u64().unwrap())
}

#[test]
fn four_behaviours_are_told_apart() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(SERVICE);
    let started = std::time::Instant::now();
    let r = run_python(&[], &py, &s, &["20"]);
    eprintln!("traced in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(r.code, 0);
    let class = |f: &str| {
        let site = top_site_in(&r, f).unwrap_or_else(|| panic!("no site under {f}"));
        let a = &site["analysis"];
        eprintln!("{f}: {a}");
        (
            a["class"].as_str().unwrap().to_string(),
            a["confidence"].as_f64().unwrap(),
        )
    };
    let (c, conf) = class("grow_list");
    assert_eq!(c, "leak");
    assert!(conf >= 0.95, "grow_list confidence {conf}");
    let (c, conf) = class("unbounded");
    assert_eq!(c, "leak");
    assert!(conf >= 0.95, "unbounded confidence {conf}");
    assert_eq!(class("bounded").0, "cache");
    // The loop frees what it allocates: nothing of it is a suspect.
    let j = r.json.as_ref().unwrap();
    for s in j["sites"].as_array().unwrap() {
        let fr = s["python_stack"].as_array().and_then(|p| p.last()).cloned();
        if fr.is_some_and(|f| f["function"] == "churn") {
            assert_ne!(s["analysis"]["class"], "leak", "{s}");
        }
    }
    // Suspects come first, and exactly the two unbounded behaviours are among them.
    let suspects: Vec<&Value> = j["sites"]
        .as_array()
        .unwrap()
        .iter()
        .take_while(|s| {
            s["analysis"]["class"] == "leak" && s["analysis"]["confidence"].as_f64().unwrap() >= 0.9
        })
        .collect();
    assert!(!suspects.is_empty());
    for s in &suspects {
        let fns: Vec<&str> = s["python_stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        assert!(
            !fns.contains(&"bounded") && !fns.contains(&"churn"),
            "suspect outside the two leaks: {fns:?}"
        );
    }
    assert!(r.stdout.contains("LEAK SUSPECT"));
}

/// Leaks through the C extension in `base`, and with argument `more`, also in `extra`.
const TWO_VERSIONS: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leakyext
def base():
    for _ in range(300):
        leakyext.leak_malloc(1000)
def extra():
    for _ in range(200):
        leakyext.leak_malloc(5000)
base()
if len(sys.argv) > 2:
    extra()
"#;

#[test]
fn diff_shows_exactly_the_new_leak() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(TWO_VERSIONS);
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.json");
    let new = dir.path().join("new.json");
    for (path, extra) in [(&old, false), (&new, true)] {
        let mut args = vec![ext.to_str().unwrap()];
        if extra {
            args.push("more");
        }
        let r = run_python(&[], &py, &s, &args);
        assert_eq!(r.code, 0);
        std::fs::write(
            path,
            serde_json::to_string(r.json.as_ref().unwrap()).unwrap(),
        )
        .unwrap();
    }
    let out_json = dir.path().join("diff.json");
    let out = std::process::Command::new(leaktrace_bin())
        .arg("diff")
        .arg(&old)
        .arg(&new)
        .arg("--json")
        .arg(&out_json)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(0));
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    let rows = d["rows"].as_array().unwrap();
    // The largest growth is the new leak: 200 × 5,000 bytes under extra().
    let top = &rows[0];
    assert_eq!(top["change"], "new", "{top}");
    assert_eq!(top["delta_bytes"], 1_000_000);
    assert!(top["stack"].to_string().contains(" in extra"), "{top}");
    // base()'s leak is the same in both: matched although every address differs.
    let base: Vec<&Value> = rows
        .iter()
        .filter(|r| r["stack"].to_string().contains(" in base"))
        .collect();
    assert_eq!(base.len(), 1, "{base:?}");
    assert_eq!(base[0]["change"], "same");
    assert_eq!(base[0]["old_bytes"], 300_000);
    // Nothing else grew by more than start-up noise. The interpreter's interned-string table
    // resizes once (a single ~200 KB block) under whichever start-up import crosses the
    // threshold, which can differ between two runs, so noise is bounded well below the leak.
    for r in &rows[1..] {
        assert!(r["delta_bytes"].as_i64().unwrap() < 300_000, "{r}");
    }
    // pymalloc's arenas are compared apart: which call takes a new one varies between runs.
    assert!(rows.iter().all(|r| r["allocator"] != "pymalloc arena"));
    assert!(d["arena_rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["allocator"] == "pymalloc arena"));
    assert!(text.contains("new"));
    // Bad input: a clear error, not a panic.
    let bad = std::process::Command::new(leaktrace_bin())
        .args(["diff", "/nonexistent.json"])
        .arg(&new)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot read"));
}

/// Leaks 1 MB a second in `leak_more` for `argv[2]` seconds, or (argument `clean`) allocates
/// and frees only.
const GATED: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def leak_more():
    leakyext.leak_malloc(100_000)
def clean():
    leakyext.ok(100_000)
work = clean if sys.argv[3] == "clean" else leak_more
end = time.time() + float(sys.argv[2])
while time.time() < end:
    work()
    time.sleep(0.1)
"#;

#[test]
fn fail_over_gates_leaking_runs_and_honours_suppressions() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(GATED);
    let e = ext.to_str().unwrap();
    let r = run_python(&["--fail-over", "2MB"], &py, &s, &[e, "5", "leak"]);
    assert_eq!(r.code, 10, "a leak over the limit fails the run");
    assert!(r.stderr.contains("FAILED"), "{}", r.stderr);
    assert!(
        r.stderr.contains("leak_more"),
        "the offending stack is named: {}",
        r.stderr
    );

    let r = run_python(&["--fail-over", "2MB"], &py, &s, &[e, "5", "clean"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("passed"));

    let dir = tempfile::tempdir().unwrap();
    let sup = dir.path().join("leaks.supp");
    std::fs::write(&sup, "# known and accepted\nleak:leak_more\n").unwrap();
    let r = run_python(
        &[
            "--fail-over",
            "2MB",
            "--suppressions",
            sup.to_str().unwrap(),
        ],
        &py,
        &s,
        &[e, "5", "leak"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("suppressed"), "{}", r.stderr);

    let r = leaktrace(&["run", "--fail-over", "lots", "--", "true"]);
    assert_eq!(r.code, 2, "a bad size is a usage error");
}

/// Fills the heap with small objects, then frees every other one: live bytes halve, RSS does
/// not.
const FRAGMENT: &str = r#"
import time
time.sleep(1.2)
blocks = [bytes(300) for _ in range(300_000)]
time.sleep(1.2)
del blocks[::2]
time.sleep(2.5)
"#;

#[test]
fn fragmentation_shows_as_rss_above_live_bytes() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(FRAGMENT);
    // Every object traced (the default coverage counts pymalloc's arenas themselves as live).
    let r = run_python(&["--python-allocators"], &py, &s, &[]);
    assert_eq!(r.code, 0);
    let h = &r.json.as_ref().unwrap()["heap_vs_rss"];
    assert!(
        h["note"]
            .as_str()
            .is_some_and(|n| n.contains("fragmentation")),
        "{h}"
    );
    let rss = h["rss_last"].as_u64().unwrap() - h["rss_first"].as_u64().unwrap();
    let live = h["live_last"].as_u64().unwrap() - h["live_first"].as_u64().unwrap();
    assert!(rss > live * 3 / 2, "rss +{rss}, live +{live}");
    assert!(r.stdout.contains("HEAP VS RSS"));
    // pymalloc's arenas, read from the interpreter: every arena the blocks filled is still
    // held by the half that lives — what RSS shows, not what is live.
    let arenas = h["arenas_last"].as_u64().unwrap() - h["arenas_first"].as_u64().unwrap();
    assert!(
        arenas > live * 3 / 2 && arenas > 80 << 20,
        "arenas +{arenas}, live +{live}"
    );
    assert!(h["note"].as_str().unwrap().contains("arenas grew"), "{h}");
    assert!(r.stdout.contains("pymalloc arenas"), "{}", r.stdout);
}

/// A run shorter than one interval has a single point before shutdown: the header compared it
/// with itself (`RSS 9.0 MB → 9.0 MB` beside 14.8 MB unfreed) until the memory was read at
/// shutdown too.
#[test]
fn a_short_runs_memory_line_ends_at_shutdown() {
    let _g = serial();
    let py = pyenv_python();
    let s =
        script("import time\ntime.sleep(0.3)\nkeep = [bytearray(1 << 16) for _ in range(320)]\n");
    let r = run_python(&[], &py, &s, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json.as_ref().unwrap();
    let h = &j["heap_vs_rss"];
    let (rss0, rss1) = (
        h["rss_first"].as_u64().unwrap(),
        h["rss_last"].as_u64().unwrap(),
    );
    let (live0, live1) = (
        h["live_first"].as_u64().unwrap(),
        h["live_last"].as_u64().unwrap(),
    );
    // 20 MiB kept: live traced and RSS both grew by about that much.
    assert!(live1 >= live0 + (19 << 20), "{h}");
    assert!(rss1 >= rss0 + (15 << 20), "{h}");
    assert!(
        live1 <= j["totals"]["unfreed_bytes"].as_u64().unwrap(),
        "{h}"
    );
}

/// Makes `argv[1]` objects of each of several types — dicts, instances with and without
/// `__slots__`, lists, bytes, str, and `array.array` (a C extension's type) — and keeps them in a
/// global list (`keep`) or drops each at once (`drop`).
const MAKES_OBJECTS: &str = r#"
import array, sys
class Plain:
    def __init__(self, i):
        self.i = i
class Slotted:
    __slots__ = ("i",)
    def __init__(self, i):
        self.i = i
n, keep = int(sys.argv[1]), sys.argv[2] == "keep"
hold = []
makers = [
    lambda i: {"k": i},
    Plain,
    Slotted,
    lambda i: [i, i],
    lambda i: b"x" * (i % 50 + 20),
    lambda i: str(i) * 3 + "s",
    lambda i: array.array("i", [i]),
]
for make in makers:
    for i in range(n):
        obj = make(i)
        if keep:
            hold.append(obj)
del obj
"#;

/// A slow start-up that keeps objects: `sitecustomize` runs during the interpreter's start-up
/// (as `.pth` files and `site` do), before the main module.
const SLOW_STARTUP: &str = r#"
import builtins, time
class StartupOnly:
    pass
builtins._kept_at_startup = [StartupOnly() for _ in range(10000)] + [{} for _ in range(10000)]
time.sleep(1.5)
"#;

/// The type census's growth for each type, by name.
fn census_growth(r: &Run) -> HashMap<String, (i64, i64)> {
    r.json.as_ref().unwrap()["type_census"]["types"]
        .as_array()
        .unwrap_or_else(|| panic!("no type census:\n{}", r.stdout))
        .iter()
        .map(|t| {
            (
                t["type"].as_str().unwrap().to_string(),
                (
                    t["growth_count"].as_i64().unwrap(),
                    t["count"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn type_census_growth_is_what_the_program_made_after_start_up() {
    let _g = serial();
    let s = script(MAKES_OBJECTS);
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("sitecustomize.py"), SLOW_STARTUP).unwrap();
    let n = 20_000i64;
    for py in pythons().into_iter().map(|p| p.path) {
        let traced = |mode: &str| {
            // `env` execs the interpreter: leaktrace follows it through the exec.
            let python_path = format!("PYTHONPATH={}", site.path().display());
            let r = leaktrace(&[
                "run",
                "--top",
                "1000",
                "--",
                "env",
                &python_path,
                py.to_str().unwrap(),
                s.to_str().unwrap(),
                &n.to_string(),
                mode,
            ]);
            assert_eq!(r.code, 0, "{}", py.display());
            assert!(
                r.stdout
                    .contains("growth since when the main module started"),
                "{}",
                r.stdout
            );
            (census_growth(&r), r)
        };
        let ((keep, kept_run), (drop, _)) = (traced("keep"), traced("drop"));
        let grew = |c: &HashMap<String, (i64, i64)>, ty: &str| c.get(ty).map_or(0, |g| g.0);
        // Start-up's objects are live at the end (the census counts them) but are not the
        // program's growth, however long start-up took. The census keeps 200 types, those that
        // grew most, then the largest: StartupOnly's 10,000 are among them.
        let held: i64 = kept_run.json.as_ref().unwrap()["type_census"]["types"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["type"] == "StartupOnly")
            .map(|t| t["count"].as_i64().unwrap())
            .sum();
        assert_eq!(held, 10_000, "{}: StartupOnly held", py.display());
        assert_eq!(
            grew(&keep, "StartupOnly"),
            0,
            "{}: StartupOnly",
            py.display()
        );
        // Types only the program makes: exactly what it kept.
        for ty in ["Plain", "Slotted", "array.array"] {
            assert_eq!(grew(&keep, ty), n, "{}: {ty}", py.display());
            assert_eq!(grew(&drop, ty), 0, "{}: {ty} dropped", py.display());
        }
        // Types the interpreter makes too (compiling the script, importing `array`): kept minus
        // dropped is what the program kept, less what CPython's free lists served without the
        // allocator (docs/analysis.md).
        for ty in ["dict", "list", "bytes", "str"] {
            let (k, d) = (grew(&keep, ty), grew(&drop, ty));
            assert!(
                (k - d - n).abs() <= n / 100,
                "{}: {ty} grew by {k} kept and {d} dropped, expected {n} more kept ± 1 %",
                py.display()
            );
            assert!(
                d.abs() < 2_000,
                "{}: {ty} grew by {d} dropped",
                py.display()
            );
        }
        assert!(
            grew(&keep, "dict") < n + 2_000,
            "{}: start-up's dicts counted as growth",
            py.display()
        );
    }
}

#[test]
fn type_census_sites_say_what_they_hold() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(MAKES_OBJECTS);
    // Each object's own site: every Python-allocator call traced.
    let r = run_python(&["--python-allocators"], &py, &s, &["2000", "keep"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Live Python objects by type"));
    let j = r.json.as_ref().unwrap();
    for ty in ["Plain", "array.array"] {
        assert!(
            j["sites"].as_array().unwrap().iter().any(|s| s["types"]
                .as_array()
                .is_some_and(|t| t.first().is_some_and(|f| f[0] == ty))),
            "no site holds {ty} instances"
        );
    }
}
