//! `leaktrace run` on real interpreters with a real leaky C extension: every allocator, every
//! site, exact counts.

mod common;

use common::*;

const EXT_WORKLOAD: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leakyext
for i in range(1000): leakyext.leak_malloc(4096)
for i in range(1000): leakyext.ok(7777)
for i in range(500): leakyext.leak_pyobj()
for i in range(10): leakyext.leak_pymem_large(100000)
for i in range(3): leakyext.leak_realloc(300000)
leakyext.leak_each(12345)
for i in range(7): leakyext.leak_chain(5000)
"#;

fn bytes(s: &serde_json::Value) -> u64 {
    s["unfreed_bytes"].as_u64().unwrap()
}
fn count(s: &serde_json::Value) -> u64 {
    s["unfreed_count"].as_u64().unwrap()
}

/// On every interpreter with a symbol table: pyenv's 3.11–3.13 and the debug builds of 3.14 and
/// 3.15, whose debug hooks are the outermost Python allocator.
#[test]
fn extension_leaks_are_found_exactly_on_every_interpreter_with_symbols() {
    for py in pythons().into_iter().filter(|p| p.build != Build::Stripped) {
        eprintln!("=== {}", py.path.display());
        let pyalloc = if py.build == Build::Debug {
            "_PyMem_DebugMalloc"
        } else {
            "_PyObject_Malloc"
        };
        extension_leaks_on(&py.path, pyalloc);
    }
}

fn extension_leaks_on(py: &std::path::Path, pyalloc: &str) {
    let ext = ext_dir(py);
    let s = script(EXT_WORKLOAD);
    let r = run_python(&["--python-allocators"], py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["python_coverage"], "pymalloc_impl");
    assert_eq!(j["dropped"], 0);

    // 1,000 × malloc(4096), never freed: one site, in leak_malloc, with its source line.
    let m = &r.site("leak_malloc", "malloc");
    assert_eq!((bytes(m), count(m)), (4_096_000, 1000));
    assert_eq!(m["family"], "libc");
    assert!(m["caller"]["module"].as_str().unwrap().contains("leakyext"));
    assert!(m["caller"]["file"]
        .as_str()
        .unwrap()
        .ends_with("leakyext.c"));
    assert!(m["caller"]["line"].as_u64().unwrap() > 0);
    assert!(r.stdout.contains("leak_malloc"), "the table names the site");

    // ok() frees what it allocates: no unfreed site, though its 1,000 frees were seen.
    assert!(r.sites("ok").is_empty(), "{:#?}", r.sites("ok"));
    assert!(r.counter("frees") >= 1000);

    // Objects from the Python allocator kept alive by a leaked reference.
    let o = &r.site("leak_pyobj", pyalloc);
    assert_eq!(count(o), 500);
    assert_eq!(o["family"], "python");

    // Nesting: PyObject_Malloc(100000) is served by malloc inside pymalloc; counted once, by the
    // outermost allocator, and no libpython malloc site holds those bytes.
    let big = &r.site("leak_pymem_large", pyalloc);
    assert_eq!((bytes(big), count(big)), (1_000_000, 10));
    let inner: Vec<_> = r
        .sites("_PyObject_Malloc")
        .into_iter()
        .filter(|s| s["allocator"] == "malloc")
        .collect();
    assert!(
        inner.is_empty(),
        "pymalloc's inner malloc calls were counted too: {inner:#?}"
    );

    // realloc moves blocks: the final size is charged to the realloc site, nothing to malloc(100).
    let re = &r.site("leak_realloc", "realloc");
    assert_eq!((bytes(re), count(re)), (900_000, 3));
    assert!(r
        .sites("leak_realloc")
        .iter()
        .all(|s| s["allocator"] == "realloc"));

    // Every other allocator, once each. reallocarray tail-calls realloc: counted once.
    for alloc in ["calloc", "reallocarray", "posix_memalign", "valloc"] {
        let s = &r.site("leak_each", alloc);
        assert_eq!((bytes(s), count(s)), (12_345, 1), "{alloc}");
    }
    // aligned_alloc and memalign: one function in bookworm's glibc (two call sites, one
    // probe), two in sid's 2.43 (which the 3.14 and 3.15 builds run on). Either way, both blocks.
    let aligned: Vec<_> = r
        .sites("leak_each")
        .into_iter()
        .filter(|s| s["allocator"] == "memalign" || s["allocator"] == "aligned_alloc")
        .collect();
    assert_eq!(aligned.len(), 2, "{aligned:#?}");
    assert!(aligned.iter().all(|s| (bytes(s), count(s)) == (12_345, 1)));
    assert!(r
        .sites("leak_each")
        .iter()
        .all(|s| s["allocator"] != "realloc"));

    // Three levels deep: the site is the innermost caller (full stacks are their own issue).
    let c = &r.site("chain_level3", "malloc");
    assert_eq!((bytes(c), count(c)), (7 * 5002, 7));
}

#[test]
fn pure_python_leak_is_reported_as_of_interpreter_shutdown() {
    for py in pythons_with_symbols() {
        eprintln!("=== {}", py.display());
        pure_python_leak_on(&py);
    }
}

fn pure_python_leak_on(py: &std::path::Path) {
    let s = script(
        r#"
keep = []
def handler():
    for i in range(2000):
        keep.append(bytearray(5000))
def churn():
    for i in range(20000):
        x = bytearray(3000)
handler()
churn()
"#,
    );
    let r = leaktrace(&[
        "run",
        "--top",
        "100000",
        "--",
        py.to_str().unwrap(),
        s.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    assert!(j["target"]["end"]
        .as_str()
        .unwrap()
        .contains("Py_FinalizeEx"));
    // The global list's 2,000 buffers are the top sites, under handler's line; churn's buffers
    // are all freed. One line can make them through more than one native path: 3.15 calls
    // `bytearray` through the generic call path for the first few hundred calls of a loop, then
    // through the specialized one, and each path is a site of its own (on a debug build, a path
    // met while the kernel was still learning it is its frames walked so far, `unlearned`).
    let sites = j["sites"].as_array().unwrap();
    let kept: Vec<&serde_json::Value> = sites
        .iter()
        .filter(|s| {
            let py = &s["python_stack"];
            // The list's own array grows by realloc: not one of the buffers.
            s["allocator"] == "malloc"
                && py
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f["function"] == "handler"))
        })
        .collect();
    let (kept_bytes, kept_count): (u64, u64) = kept
        .iter()
        .fold((0, 0), |(b, c), s| (b + bytes(s), c + count(s)));
    let said = || {
        let each: Vec<_> = sites
            .iter()
            .map(|s| (count(s), &s["caller"]["function"], &s["python_stack"]))
            .filter(|(n, ..)| *n >= 5)
            .collect();
        format!("{kept_bytes} B in {kept_count} blocks; sites of 5 blocks or more: {each:?}")
    };
    assert!((2000..2010).contains(&kept_count), "{}", said());
    // Each block: the 5,000 bytes, the bytes object's header, and on a debug build the debug
    // hooks' bytes around it.
    assert!(
        (5_000..5_100).contains(&(kept_bytes / kept_count)),
        "{}",
        said()
    );
    let top = &sites[0];
    assert!(kept.iter().any(|s| s["id"] == top["id"]), "{top:#}");
    // 5,000-byte buffers are over pymalloc's 512: by default they are seen as the malloc calls
    // they become, the site named after the constructor, not CPython's allocator layer.
    assert_eq!(top["family"], "libc");
    let site = top["caller"]["function"].as_str().unwrap_or("");
    assert!(
        !site.contains("Malloc") && !site.contains("Realloc") && !site.is_empty(),
        "{top:#}"
    );
}

/// The default coverage: libc call by call, pymalloc by arena. Native buffers and objects over
/// 512 B are exact; the 500 small objects `leak_pyobj` keeps are in the type census, counted
/// from pymalloc's pools, and their arenas are the only Python-allocator sites.
#[test]
fn default_coverage_is_exact_for_libc_and_counts_small_objects_by_type() {
    for py in pythons().into_iter().filter(|p| p.build != Build::Stripped) {
        eprintln!("=== {}", py.path.display());
        default_coverage_on(&py.path, py.build);
    }
}

fn default_coverage_on(py: &std::path::Path, build: Build) {
    let ext = ext_dir(py);
    let s = script(EXT_WORKLOAD);
    let r = run_python(&[], py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["python_coverage"], "arenas");
    assert_eq!(j["dropped"], 0);
    let m = &r.site("leak_malloc", "malloc");
    assert_eq!((bytes(m), count(m)), (4_096_000, 1000));
    // PyObject_Malloc(100000) reaches malloc: exact, named after leakyext, not _PyObject_Malloc.
    let big: Vec<_> = r
        .sites("leak_pymem_large")
        .into_iter()
        .filter(|s| s["allocator"] == "malloc")
        .collect();
    assert_eq!(big.len(), 1, "{big:#?}");
    // Under a debug build's hooks malloc gets each block with the hooks' bytes (two layers, mem
    // and raw, 24 bytes each): the bytes malloc really handed out.
    let pad = if build == Build::Debug { 48 } else { 0 };
    assert_eq!((bytes(big[0]), count(big[0])), (10 * (100_000 + pad), 10));
    assert!(
        big[0]["caller"]["function"]
            .as_str()
            .is_some_and(|f| f.contains("leak_pymem_large")),
        "{:#}",
        big[0]["caller"]
    );
    let re = &r.site("leak_realloc", "realloc");
    assert_eq!((bytes(re), count(re)), (900_000, 3));
    for s in j["sites"].as_array().unwrap() {
        assert!(
            s["family"] == "libc" || s["family"] == "pymalloc_arena",
            "{s:#}"
        );
    }
    // leak_pyobj's objects: a type of the extension's, counted exactly from the pools.
    let types = j["type_census"]["types"].as_array().unwrap();
    let leaked = types
        .iter()
        .find(|t| t["growth_count"] == 500)
        .unwrap_or_else(|| panic!("no type grew by 500: {types:#?}"));
    eprintln!("leak_pyobj's type: {leaked}");
    assert!(r.stdout.contains("pymalloc arena"));
}

#[test]
fn libc_only_and_python_only_select_families() {
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(EXT_WORKLOAD);
    let args = |flag: &'static str| {
        vec!["run", flag, "--top", "1000", "--"]
            .into_iter()
            .map(String::from)
            .chain([
                py.to_string_lossy().into(),
                s.to_string_lossy().into(),
                ext.to_string_lossy().into(),
            ])
            .collect::<Vec<String>>()
    };
    let libc = args("--libc-only");
    // --libc-only: no arena either.
    let r = leaktrace(&libc.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, 0);
    let sites = r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .clone();
    assert!(sites.iter().all(|s| s["family"] == "libc"));
    assert_eq!(bytes(&r.site("leak_malloc", "malloc")), 4_096_000);
    // Without the pymalloc probes, the large PyObject_Malloc blocks show up as malloc, named
    // after the function that asked pymalloc for them.
    let big: u64 = r
        .sites("leak_pymem_large")
        .iter()
        .filter(|s| s["allocator"] == "malloc")
        .map(|s| bytes(s))
        .sum();
    assert_eq!(big, 1_000_000);

    let pyonly = args("--python-only");
    let r = leaktrace(&pyonly.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, 0);
    let sites = r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .clone();
    assert!(sites.iter().all(|s| s["family"] == "python"));
    assert_eq!(count(&r.site("leak_pyobj", "_PyObject_Malloc")), 500);
    assert!(r.sites("leak_malloc").is_empty());
}

/// Debian's python3.11 is static, LTO-built and stripped: no `_PyObject_Malloc` symbol. The
/// exported API is probed instead and the report says coverage is partial.
#[test]
fn stripped_debian_python_falls_back_to_exported_api() {
    let py = debian_python();
    let ext = ext_dir(&py);
    let s = script(EXT_WORKLOAD);
    let r = run_python(
        &["--pymalloc", "keep", "--python-allocators"],
        &py,
        &s,
        &[ext.to_str().unwrap()],
    );
    assert_eq!(r.code, 0);
    let j = r.json.as_ref().unwrap();
    assert_eq!(j["python_coverage"], "exported_api_only");
    assert!(j["notes"][0].as_str().unwrap().contains("stripped"));
    assert!(r.stdout.contains("PARTIAL"));
    let probes: Vec<&str> = j["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["function"].as_str().unwrap())
        .collect();
    assert!(
        probes.contains(&"PyObject_Malloc") && probes.contains(&"PyMem_Malloc"),
        "{probes:?}"
    );
    assert_eq!(j["target"]["python_module"], "/usr/bin/python3.11");
    assert_eq!(bytes(&r.site("leak_malloc", "malloc")), 4_096_000);
    // The extension calls the exported PyObject_Malloc, which the fallback probes.
    assert_eq!(count(&r.site("leak_pyobj", "PyObject_Malloc")), 500);
}

/// A program that is not Python: libc tracing works and the report says so.
#[test]
fn non_python_program_is_traced_through_libc() {
    let (_dir, bin) = compile_c(
        r#"
#include <stdlib.h>
#include <string.h>
void *volatile sink;
__attribute__((noinline)) void leak_in_c(int n) { char *p = malloc(n); memset(p, 1, n); sink = p; }
int main(void) {
    for (int i = 0; i < 300; i++) leak_in_c(1000);
    for (int i = 0; i < 300; i++) { char *p = malloc(2000); sink = p; free(p); }
    return 3;
}
"#,
        &["-O2", "-g"],
    );
    let r = leaktrace(&["run", "--", bin.to_str().unwrap()]);
    assert_eq!(
        r.code, 3,
        "run reports, then ends with the child's own exit code"
    );
    let j = r.json.as_ref().unwrap();
    assert!(j["target"]["end"]
        .as_str()
        .unwrap()
        .contains("exited with code 3"));
    assert!(j["target"]["python"].is_null());
    assert!(r.stderr.contains("not a Python process"));
    let s = &r.site("leak_in_c", "malloc");
    assert_eq!((bytes(s), count(s)), (300_000, 300));
}
