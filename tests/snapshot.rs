//! `leaktrace snapshot`: a running interpreter's small objects counted by type from outside,
//! those it made before leaktrace came included, against what the program itself counts.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Makes 20,000 instances with a `__dict__`, 30,000 with `__slots__` and 25,000 small tuples,
/// and objects over 512 B the collector tracks — 3,000 `Wide` instances (80 slots: 672 B) and
/// 1,000 tuples of 100 references (856 B) — prints how many `gc.get_objects()` sees of the first
/// two, then adds 1,000 `Grows` every 0.1 s.
const HOLDS: &str = r#"
import gc, sys, time
class Plain:
    def __init__(self, i): self.i = i
class Slotted:
    __slots__ = ("i",)
    def __init__(self, i): self.i = i
class Grows:
    __slots__ = ()
class Wide:
    __slots__ = tuple("a%d" % i for i in range(80))
plain = [Plain(i) for i in range(20000)]
slotted = [Slotted(i) for i in range(30000)]
pairs = [(i, -i) for i in range(25000)]
wide = [Wide() for _ in range(3000)]
big_tuples = [tuple([plain[i]] * 100) for i in range(1000)]
gc.collect()
n = lambda t: sum(1 for o in gc.get_objects() if type(o) is t)
print("COUNTS", n(Plain), n(Slotted), flush=True)
print("READY", flush=True)
grows = []
while True:
    grows.extend(Grows() for _ in range(1000))
    time.sleep(0.1)
"#;

fn snapshot(args: &[&str]) -> (i32, String, Value) {
    let json = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let out = Command::new(leaktrace_bin())
        .arg("snapshot")
        .args(args)
        .arg("--json")
        .arg(&*json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
        .unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), stdout, v)
}

fn count(v: &Value, ty: &str, key: &str) -> i64 {
    v["census"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == ty)
        .map_or(0, |t| t[key].as_i64().unwrap())
}

#[test]
fn counts_every_small_object_by_type_and_its_growth() {
    for py in pythons().into_iter().map(|p| p.path) {
        let s = script(HOLDS);
        let target = start_ready(&py, &s, &[]);
        let pid = target.id().to_string();
        let (code, table, v) = snapshot(&["-p", &pid]);
        assert_eq!(code, 0, "{}", py.display());
        // Made before leaktrace came: every one, as the program's own gc.get_objects() sees them.
        assert_eq!(count(&v, "Plain", "count"), 20_000, "{}", py.display());
        assert_eq!(count(&v, "Slotted", "count"), 30_000, "{}", py.display());
        // Not tracked by the GC, and counted all the same.
        assert!(count(&v, "tuple", "count") >= 25_000, "{}", py.display());
        // Over 512 B, outside the pools: found through the collector's lists, sized as
        // sys.getsizeof does (16 + 80 × 8 + the GC header; 40 + 100 × 8 + the GC header).
        assert_eq!(count(&v, "Wide", "count"), 3_000, "{}", py.display());
        assert_eq!(count(&v, "Wide", "bytes"), 3_000 * 672, "{}", py.display());
        let outside = &v["outside_pools"];
        assert!(
            outside["objects"].as_u64().unwrap() >= 4_000,
            "{}: {outside}",
            py.display()
        );
        assert!(table.contains("Wide"), "{table}");
        assert!(table.contains("Slotted"), "{table}");
        // Three snapshots 0.5 s apart: about 1,000 Grows per 0.1 s in between.
        let (code, table, v) = snapshot(&["-p", &pid, "--count", "3", "--interval", "0.5"]);
        assert_eq!(code, 0);
        let grew = count(&v, "Grows", "growth_count");
        let span = v["span_s"].as_f64().unwrap();
        let expected = span * 10_000.0;
        assert!(
            (grew as f64) > expected * 0.5 && (grew as f64) < expected * 1.5 + 2000.0,
            "{}: Grows +{grew} in {span:.2} s",
            py.display()
        );
        assert_eq!(count(&v, "Slotted", "growth_count"), 0);
        assert!(table.contains("GROWTH"), "{table}");
        drop(target);
    }
}

#[test]
fn refuses_what_it_cannot_read() {
    let (code, _, _) = snapshot(&["-p", "999999999"]);
    assert_eq!(code, 4, "no such process");
    // This test binary is not Python.
    let (code, _, _) = snapshot(&["-p", &std::process::id().to_string()]);
    assert_eq!(code, 6, "not a Python process");
    let out = Command::new(leaktrace_bin())
        .args(["snapshot", "-p", "1", "--interval", "0"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad interval is a usage error"
    );
}

/// `--freeze`: the target is stopped for the walk only, the pause is said, the counts are
/// exact; and a snapshot killed while the target is stopped still lets it go (its watcher).
#[test]
fn freeze_stops_the_target_for_the_walk_only() {
    let py = pyenv_python();
    let s = script(HOLDS);
    let target = start_ready(&py, &s, &[]);
    let pid = target.id();
    let (code, table, v) = snapshot(&["-p", &pid.to_string(), "--freeze"]);
    assert_eq!(code, 0);
    let frozen = v["frozen_s"].as_f64().expect("frozen_s");
    assert!(frozen > 0.0 && frozen < 1.0, "paused {frozen} s");
    assert!(table.contains("with the target stopped for"), "{table}");
    assert_eq!(count(&v, "Plain", "count"), 20_000);
    assert!(wait_for(2, || stat_of(pid).is_some_and(|(st, _)| st != 'T')));

    // Walk after walk; SIGKILL leaktrace the moment the target is seen stopped.
    let mut lt = Command::new(leaktrace_bin())
        .args(["snapshot", "-p", &pid.to_string(), "--freeze"])
        .args(["--count", "10000", "--interval", "0.01"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(20, || stat_of(pid).is_some_and(|(st, _)| st == 'T')),
        "the target was never seen stopped"
    );
    kill(lt.id(), libc::SIGKILL);
    lt.wait().unwrap();
    assert!(
        wait_for(2, || stat_of(pid).is_some_and(|(st, _)| st != 'T')),
        "the target stayed stopped after its snapshot was killed"
    );
    // And it runs: its Grows keep coming.
    let (code, _, a) = snapshot(&["-p", &pid.to_string()]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, _, b) = snapshot(&["-p", &pid.to_string()]);
    assert_eq!(code, 0);
    assert!(count(&b, "Grows", "count") > count(&a, "Grows", "count"));
}
