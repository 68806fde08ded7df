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
        assert_eq!(
            count(&v, "__main__.Plain", "count"),
            20_000,
            "{}",
            py.display()
        );
        assert_eq!(
            count(&v, "__main__.Slotted", "count"),
            30_000,
            "{}",
            py.display()
        );
        // Not tracked by the GC, and counted all the same.
        assert!(count(&v, "tuple", "count") >= 25_000, "{}", py.display());
        // Over 512 B, outside the pools: found through the collector's lists, sized as
        // sys.getsizeof does (16 + 80 × 8 + the GC header; 40 + 100 × 8 + the GC header).
        assert_eq!(
            count(&v, "__main__.Wide", "count"),
            3_000,
            "{}",
            py.display()
        );
        assert_eq!(
            count(&v, "__main__.Wide", "bytes"),
            3_000 * 672,
            "{}",
            py.display()
        );
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
        let grew = count(&v, "__main__.Grows", "growth_count");
        let span = v["span_s"].as_f64().unwrap();
        let expected = span * 10_000.0;
        assert!(
            (grew as f64) > expected * 0.5 && (grew as f64) < expected * 1.5 + 2000.0,
            "{}: Grows +{grew} in {span:.2} s",
            py.display()
        );
        assert_eq!(count(&v, "__main__.Slotted", "growth_count"), 0);
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
    assert_eq!(count(&v, "__main__.Plain", "count"), 20_000);
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
    assert!(count(&b, "__main__.Grows", "count") > count(&a, "__main__.Grows", "count"));
}

/// A service holding objects four ways: a cached exception whose traceback grows on every
/// raise and keeps each request's bytes, an object held by a closure, results held by an
/// unbounded `lru_cache`, and a thread's local. It writes the address of the first request's
/// bytes to the file named by its argument.
const HELD: &str = r#"
import functools, sys, threading, time
class SessionRecord:
    def __init__(self, i): self.i = i
class CachedResult:
    __slots__ = ("key", "data")
    def __init__(self, key): self.key = key; self.data = [key] * 4
class Held:
    pass
def make_handler():
    record = SessionRecord(7)
    def handler():
        return record
    return handler
HANDLER = make_handler()
@functools.lru_cache(maxsize=None)
def lookup(key):
    return CachedResult(key)
ERR = None
def handle(body):
    global ERR
    try:
        if ERR is None:
            raise ValueError("bad request")
        raise ERR
    except ValueError as e:
        ERR = e
def serve(i):
    request = b"request-%d-" % i + b"x" * 2000
    handle(request)
    return id(request)
for k in range(50):
    lookup(k)
first = [serve(i) for i in range(5)][0]
with open(sys.argv[1], "w") as f:
    f.write(str(first))
class Conn:
    pass
class Token:
    pass
class Secret:
    pass
class Pool:
    __slots__ = ("conns",)
class Service:
    registry = set()
    def __init__(self):
        self.pool = Pool()
        self.pool.conns = [Conn()]
        self.secret = Secret()
    def ping(self):
        return self
SERVICE = Service()
Service.registry.add(Token())
HOOK = Service().ping
class Buffer:
    pass
def reader():
    buf = Buffer()
    while True:
        yield buf
PIPE = reader()
next(PIPE)
def worker():
    mine = Held()
    while True:
        time.sleep(1)
threading.Thread(target=worker, daemon=True).start()
time.sleep(0.2)
print("READY", flush=True)
time.sleep(600)
"#;

/// The first chain of `--why`'s answer: its root, and each hop's reference and type (the
/// module a chain starts from is the root, not a hop).
fn first_chain(v: &Value) -> (String, Vec<(String, String)>) {
    let chain = &v["why"]["chains"][0];
    let hops = chain["hops"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter(|h| h["via"] != "")
        .map(|h| {
            (
                h["via"].as_str().unwrap().to_string(),
                h["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (chain["root"].as_str().unwrap_or("").to_string(), hops)
}

fn hops(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// `--why`: the shortest chain from a root to each held object names the root and every hop,
/// on every interpreter.
#[test]
fn why_names_the_root_and_every_hop() {
    for py in pythons().into_iter().map(|p| p.path) {
        let s = script(HELD);
        let ids = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let target = start_ready(&py, &s, &[ids.to_str().unwrap()]);
        let pid = target.id().to_string();
        let first: u64 = std::fs::read_to_string(&ids).unwrap().parse().unwrap();
        let at = format!("{first:#x}");
        let why = |what: &str| {
            let (code, table, v) = snapshot(&["-p", &pid, "--why", what, "--top", "3"]);
            assert_eq!(code, 0, "{} --why {what}: {table}", py.display());
            assert_eq!(
                v["why"]["torn"],
                0,
                "{}: an idle target reads whole",
                py.display()
            );
            (table, first_chain(&v))
        };
        let main = "module __main__".to_string();
        // The oldest request: four raises ago, so four `tb_next` down the traceback.
        let (table, chain) = why(&at);
        let mut expect = vec![(".ERR", "ValueError"), (".__traceback__", "traceback")];
        expect.extend([(".tb_next", "traceback"); 4]);
        expect.extend([(".tb_frame", "frame"), ("local body", "bytes")]);
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        assert!(table.contains(&format!("bytes at {at}")), "{table}");
        // A name the census never saw is said to be so, not only unreachable; a real one is not.
        let (code, table, _) = snapshot(&["-p", &pid, "--why", "NoSuchType"]);
        assert_eq!(code, 0, "{table}");
        assert!(table.contains("no object of type NoSuchType"), "{table}");
        let (_, _, v) = snapshot(&["-p", &pid, "--why", "SessionRecord"]);
        let root = &v["why"]["chains"][0]["hops"][0];
        assert_eq!(
            (&root["type"], &root["name"]),
            (&"module".into(), &"__main__".into())
        );
        let (_, chain) = why("SessionRecord");
        let expect = [
            (".HANDLER", "function"),
            (".__closure__", "tuple"),
            ("[0]", "cell"),
            (".cell_contents", "__main__.SessionRecord"),
        ];
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        let (table, chain) = why("CachedResult");
        let expect = [
            (".lookup", "functools._lru_cache_wrapper"),
            (".cache", "dict"),
            ("[0]", "__main__.CachedResult"),
        ];
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        assert!(
            table.contains("3. __main__.CachedResult at"),
            "three samples: {table}"
        );
        let (_, (root, chain)) = why("Held");
        assert!(
            root.starts_with("thread ") && root.ends_with(", frame worker"),
            "{root}"
        );
        assert_eq!(
            chain,
            hops(&[("local mine", "__main__.Held")]),
            "{}",
            py.display()
        );
        // An instance's attribute (its managed dict, or 3.13+'s inline values), then a slot.
        let (_, chain) = why("Conn");
        let expect = [
            (".SERVICE", "__main__.Service"),
            (".pool", "__main__.Pool"),
            (".conns", "list"),
            ("[0]", "__main__.Conn"),
        ];
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        // A class attribute, then a set's member.
        let (_, chain) = why("Token");
        let expect = [
            (".Service", "type"),
            (".registry", "set"),
            ("(a member)", "__main__.Token"),
        ];
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        // A bound method's `__self__` (the other Service is nearer through SERVICE: asked
        // for two, the second comes through the method).
        let (_, _, v) = snapshot(&["-p", &pid, "--why", "Secret", "--why-samples", "2"]);
        let vias: Vec<&str> = v["why"]["chains"][1]["hops"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|h| h["via"].as_str().filter(|s| !s.is_empty()))
            .collect();
        assert_eq!(vias, [".HOOK", ".__self__", ".secret"], "{}", py.display());
        // A suspended generator's local.
        let (_, chain) = why("Buffer");
        let expect = [(".PIPE", "generator"), ("local buf", "__main__.Buffer")];
        assert_eq!(chain, (main.clone(), hops(&expect)), "{}", py.display());
        // Nothing of that name: said, not an error.
        let (table, _) = why("NoSuchType");
        assert!(table.contains("none reachable"), "{table}");
    }
}

/// A program whose lists and dict were corrupted on purpose: `--why` still answers, counts
/// what it could not read, and never crashes.
#[test]
fn why_survives_corrupt_containers() {
    let body = r#"
import ctypes, gc, time
gc.disable()
class Marker:
    pass
huge = [1, 2, 3]
ctypes.c_ssize_t.from_address(id(huge) + 16).value = 1 << 40
nowhere = [4, 5]
ctypes.c_void_p.from_address(id(nowhere) + 24).value = 0x10
broken = {"a": 1}
ctypes.c_void_p.from_address(id(broken) + 32).value = 0xdead0000
HOLD = [Marker()]
print("READY", flush=True)
time.sleep(600)
"#;
    for py in [pyenv_python(), debian_python()] {
        let s = script(body);
        let target = start_ready(&py, &s, &[]);
        let (code, table, v) = snapshot(&["-p", &target.id().to_string(), "--why", "Marker"]);
        assert_eq!(code, 0, "{table}");
        assert_eq!(
            first_chain(&v).1,
            hops(&[(".HOLD", "list"), ("[0]", "__main__.Marker")])
        );
        assert!(v["why"]["torn"].as_u64().unwrap() >= 3, "{table}");
        assert!(table.contains("references skipped"), "{table}");
    }
    // A bad --why is a usage error.
    let out = Command::new(leaktrace_bin())
        .args(["snapshot", "-p", "1", "--why", "0xZZ"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Objects over 512 B that the collector does not track live in malloc's heap: on a signal the
/// target makes 5,000 str of 1,006 characters, 40 bytes of 300 KiB (mmapped chunks each), 300
/// tuples of 100 Nones (untracked by the collection that follows) and, in a thread of its own
/// (another malloc arena), 2,000 ints of 4,319 bits; the snapshots before and after differ by
/// those.
const LARGE: &str = r#"
import gc, signal, sys, threading, time
held = []
def ints():
    held.extend(10 ** 1300 + i for i in range(2000))
def grow(*_):
    held.extend("s%05d" % i + "x" * 1000 for i in range(5000))
    held.extend(bytes(300 * 1024) for _ in range(40))
    # Tuples of None only: the collector stops tracking them at its next pass.
    held.extend(tuple([None] * 100) for i in range(300))
    gc.collect()
    t = threading.Thread(target=ints)
    t.start()
    t.join()
    with open(sys.argv[1], "w") as f:
        f.write("done")
signal.signal(signal.SIGUSR1, grow)
gc.collect()
print("READY", flush=True)
while True:
    time.sleep(0.05)
"#;

#[test]
fn counts_objects_over_512_bytes_in_mallocs_heap() {
    for py in pythons().into_iter().map(|p| p.path) {
        let s = script(LARGE);
        let done = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        std::fs::remove_file(&done).unwrap();
        let target = start_ready(&py, &s, &[done.to_str().unwrap()]);
        let pid = target.id();
        let (code, _, before) = snapshot(&["-p", &pid.to_string()]);
        assert_eq!(code, 0);
        kill(pid, libc::SIGUSR1);
        assert!(wait_for(20, || done.exists()), "{}", py.display());
        let (code, table, after) = snapshot(&["-p", &pid.to_string()]);
        assert_eq!(code, 0);
        let grew = |ty| count(&after, ty, "count") - count(&before, ty, "count");
        let near = |n: i64, want: i64| (n - want).abs() <= want / 100;
        assert!(
            near(grew("str"), 5000),
            "{}: str {} {table}",
            py.display(),
            grew("str")
        );
        assert_eq!(grew("bytes"), 40, "{}: {table}", py.display());
        let tuples = grew("tuple");
        assert!(
            (300..310).contains(&tuples),
            "{}: tuple {tuples}",
            py.display()
        );
        assert!(
            near(grew("int"), 2000),
            "{}: int {}",
            py.display(),
            grew("int")
        );
        let heap = &after["malloc_heap"];
        assert!(
            heap["arenas"].as_u64().unwrap() >= 2,
            "{}: {heap}",
            py.display()
        );
        assert!(
            heap["mmapped"].as_u64().unwrap() >= 40,
            "{}: {heap}",
            py.display()
        );
        assert_eq!(heap["torn"], 0, "{}: {heap}", py.display());
        // Two snapshots compared by `leaktrace diff`: types only.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        std::fs::write(&a, before.to_string()).unwrap();
        std::fs::write(&b, after.to_string()).unwrap();
        let out = Command::new(leaktrace_bin())
            .arg("diff")
            .args([&a, &b])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(
            text.starts_with("leaktrace diff of two snapshots"),
            "{text}"
        );
        assert!(text.contains("+40  bytes"), "{text}");
    }
}

/// A target that exits while `--why` walks it: an error or an answer, never a crash.
#[test]
fn why_survives_the_target_exiting_mid_walk() {
    let body = r#"
import time
class Rec:
    def __init__(self, i): self.i = i; self.name = "r"
LIST = [Rec(i) for i in range(600000)]
print("READY", flush=True)
time.sleep(600)
"#;
    let s = script(body);
    for delay_ms in [50u64, 200, 400] {
        let target = start_ready(&pyenv_python(), &s, &[]);
        let pid = target.id();
        let lt = Command::new(leaktrace_bin())
            .args(["snapshot", "-p", &pid.to_string(), "--why", "NoSuchType"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        kill(pid, libc::SIGKILL);
        let out = lt.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0) | Some(4)),
            "killed after {delay_ms} ms: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        drop(target);
    }
}

/// An asyncio service: an object held only by a suspended task's local is found through the
/// task (`_asyncio.Task`'s coroutine) and its coroutine's frame, on every interpreter.
#[test]
fn why_follows_asyncio_tasks_into_their_coroutines() {
    let body = r#"
import asyncio
class Session:
    pass
async def handler():
    s = Session()
    await asyncio.sleep(600)
async def main():
    t = asyncio.create_task(handler())
    await asyncio.sleep(0)
    print("READY", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"#;
    for py in pythons().into_iter().map(|p| p.path) {
        let s = script(body);
        let target = start_ready(&py, &s, &[]);
        let pid = target.id().to_string();
        let (code, table, v) = snapshot(&["-p", &pid, "--why", "Session"]);
        assert_eq!(code, 0, "{}: {table}", py.display());
        let (root, chain) = first_chain(&v);
        assert!(root.starts_with("thread "), "{}: {root}", py.display());
        let tail = &chain[chain.len().saturating_sub(3)..];
        let expect = [
            ("local t", "_asyncio.Task"),
            (".coro", "coroutine"),
            ("local s", "__main__.Session"),
        ];
        assert_eq!(tail, hops(&expect), "{}: {table}", py.display());
    }
}
