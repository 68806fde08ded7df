//! Real leaks in released PyPI packages (bench/real_leaks/, venvs made by `cargo xtask setup`),
//! traced with the default options: each of the six found on its Python line with its bytes
//! (or, for a small leaked object, its type's count in the census), and nothing there on the
//! release that fixed it.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// The venv `cargo xtask setup` made for one version.
fn venv_python(package: &str, version: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home)
        .join(".cache/leaktrace/real-leaks")
        .join(format!("{package}-{version}/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// `leaktrace run` (default options) on a reproducer, with two ballast calls per iteration.
fn traced(package: &str, version: &str, script: &str, args: &[&str]) -> Run {
    traced_with(&[], package, version, script, args)
}

/// `traced` with more options for leaktrace.
fn traced_with(flags: &[&str], package: &str, version: &str, script: &str, args: &[&str]) -> Run {
    let py = venv_python(package, version);
    let script = workspace().join("bench/real_leaks").join(script);
    let mut argv = vec!["run", "--top", "1000"];
    argv.extend_from_slice(flags);
    argv.extend_from_slice(&["--", py.to_str().unwrap()]);
    argv.push(script.to_str().unwrap());
    argv.extend_from_slice(args);
    std::env::set_var("BALLAST", "2");
    let r = leaktrace(&argv);
    assert_eq!(r.code, 0);
    r
}

/// The sites whose Python stack passes through `script`'s line `line`.
fn at_line<'a>(r: &'a Run, script: &str, line: u64) -> Vec<&'a Value> {
    r.json.as_ref().unwrap()["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["python_stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["filename"].as_str().unwrap().ends_with(script) && f["line"] == line)
        })
        .collect()
}

fn sum(sites: &[&Value], key: &str) -> u64 {
    sites.iter().map(|s| s[key].as_u64().unwrap()).sum()
}

/// How many more objects of `ty` the census found than at the main module's start.
fn census_growth(r: &Run, ty: &str) -> i64 {
    r.json.as_ref().unwrap()["type_census"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == ty)
        .map_or(0, |t| t["growth_count"].as_i64().unwrap())
}

/// ujson < 5.12.0 leaks a malloc(DIGITS + 1) copy of every big integer it decodes.
#[test]
fn ujson_big_int_buffer() {
    let script = "ujson_bigint_native.py";
    let r = traced("ujson", "5.11.0", script, &["2000"]);
    let sites: Vec<&Value> = at_line(&r, script, 15)
        .into_iter()
        .filter(|s| {
            s["allocator"] == "malloc"
                && s["caller"]["module"]
                    .as_str()
                    .is_some_and(|m| m.contains("/ujson."))
        })
        .collect();
    // 2,000 iterations and 50 of warm-up, 4,001 bytes each, exactly.
    assert_eq!(sum(&sites, "unfreed_bytes"), 2050 * 4001, "{sites:#?}");
    assert_eq!(sum(&sites, "unfreed_count"), 2050);
    let fixed = traced("ujson", "5.12.0", script, &["2000"]);
    let left = sum(&at_line(&fixed, script, 15), "unfreed_bytes");
    assert!(left < 2050 * 4001 / 100, "{left} B at the line on 5.12.0");
}

/// cbor2 5.8.0 leaks its 64 KiB carry buffer (and the partial str) of each long string.
#[test]
fn cbor2_long_string_buffer() {
    let script = "cbor2_longstring_native.py";
    let r = traced("cbor2", "5.8.0", script, &["100", "split"]);
    let line = at_line(&r, script, 26);
    let buffers: Vec<&Value> = line
        .iter()
        .copied()
        .filter(|s| {
            s["caller"]["module"]
                .as_str()
                .is_some_and(|m| m.contains("/_cbor2."))
                && s["allocator"] == "malloc"
        })
        .collect();
    // 100 iterations and 5 of warm-up, one 65,536-byte buffer each.
    assert_eq!(sum(&buffers, "unfreed_bytes"), 105 * 65536, "{line:#?}");
    // The partial strings are named as such.
    assert!(line
        .iter()
        .any(|s| s["types"].to_string().contains("\"str\"")));
    let fixed = traced("cbor2", "5.9.0", script, &["100", "split"]);
    let left = sum(&at_line(&fixed, script, 26), "unfreed_bytes");
    assert!(left < 105 * 65536 / 100, "{left} B at the line on 5.9.0");
}

/// ciso8601 2.3.2 leaks a 48-byte timedelta per `astimezone`: pymalloc's, so the default
/// coverage sees it in the census (and in the arenas the line took), not call by call.
#[test]
fn ciso8601_timedelta_refcount() {
    let script = "ciso8601_fromutc_refcount.py";
    let n = 20_000i64;
    let r = traced("ciso8601", "2.3.2", script, &[&n.to_string()]);
    let grew = census_growth(&r, "datetime.timedelta");
    // The iterations and 50 of warm-up.
    assert!(
        (grew - (n + 50)).abs() <= (n + 50) / 100,
        "timedelta grew by {grew}"
    );
    let fixed = traced("ciso8601", "2.3.3", script, &[&n.to_string()]);
    let grew_fixed = census_growth(&fixed, "datetime.timedelta");
    assert!(grew_fixed.abs() <= n / 100, "{grew_fixed} on 2.3.3");
}

/// isal 1.5.1 leaks the decompressor `decompressobj` made before it rejected `wbits`.
#[test]
fn isal_decompressobj_refcount() {
    let script = "isal_decompressobj_refcount.py";
    let r = traced("isal", "1.5.1", script, &["100"]);
    let objects: Vec<&Value> = at_line(&r, script, 15)
        .into_iter()
        .filter(|s| s["types"].to_string().contains("isal_zlib.Decompress"))
        .collect();
    // 100 iterations and 5 of warm-up; each object holds ISA-L's inflate state inline.
    let count = sum(&objects, "unfreed_count");
    let bytes = sum(&objects, "unfreed_bytes");
    assert_eq!(count, 105, "{objects:#?}");
    let each = bytes as f64 / count as f64;
    assert!((each - 87_430.0).abs() < 874.0, "{each} B per object");
    let fixed = traced("isal", "1.5.2", script, &["100"]);
    let left = sum(&at_line(&fixed, script, 15), "unfreed_bytes");
    assert!(left < bytes / 100, "{left} B at the line on 1.5.2");
}

/// A ujson 5.12.0 reference-count leak of one `str` of `each` bytes per call on `script`'s
/// `line`: 2,000 iterations and 50 of warm-up found exactly, on sites whose blocks hold `str` and
/// whose native stack passes through ujson's `objToJSON` (the C code that made the str or called
/// the Python code that did); under 1 % of it on 5.12.1.
fn ujson_str_leak(script: &str, line: u64, each: u64) {
    let r = traced("ujson", "5.12.0", script, &["2000"]);
    let sites: Vec<&Value> = at_line(&r, script, line)
        .into_iter()
        .filter(|s| s["types"].to_string().contains("\"str\""))
        .filter(|s| {
            s["native_stack"].as_array().unwrap().iter().any(|f| {
                f["function"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("objToJSON"))
                    && f["module"].as_str().is_some_and(|m| m.contains("/ujson."))
            })
        })
        .collect();
    assert_eq!(sum(&sites, "unfreed_count"), 2050, "{sites:#?}");
    assert_eq!(sum(&sites, "unfreed_bytes"), 2050 * each);
    let fixed = traced("ujson", "5.12.1", script, &["2000"]);
    let left = sum(&at_line(&fixed, script, line), "unfreed_bytes");
    assert!(left < 2050 * each / 100, "{left} B at the line on 5.12.1");
}

/// ujson 5.12.0 leaks the non-ASCII str `default=` returned (ultrajson#631): one 2,001-char
/// latin-1 str per call, 2,074 B (compact header, characters, NUL).
#[test]
fn ujson_default_str_refcount() {
    ujson_str_leak("ujson_default_refcount.py", 22, 2074);
}

/// ujson 5.12.0 leaks the serialised document when `fp.write` raises in `dump`
/// (CVE-2026-44660): one 2,067-char ASCII str per call, 2,116 B.
#[test]
fn ujson_dump_document_refcount() {
    ujson_str_leak("ujson_dump_refcount.py", 20, 2116);
}

/// Sampled mode, the process sampling itself (leaktrace's preloaded sampler): the native leaks
/// are found on their line, in their extension, with estimated bytes near the truth, and not on
/// the fixed releases.
#[test]
fn native_leaks_in_sampled_mode() {
    let cases = [
        // (package, leaky, fixed, script, args, line, module, truth)
        (
            "ujson",
            "5.11.0",
            "5.12.0",
            "ujson_bigint_native.py",
            &["2000"][..],
            15,
            "/ujson.",
            2050 * 4001,
        ),
        (
            "cbor2",
            "5.8.0",
            "5.9.0",
            "cbor2_longstring_native.py",
            &["100", "split"][..],
            26,
            "/_cbor2.",
            105 * 65536,
        ),
        (
            "isal",
            "1.5.1",
            "1.5.2",
            "isal_decompressobj_refcount.py",
            &["100"][..],
            15,
            "isal_zlib",
            105 * 87_430,
        ),
    ];
    let flags = ["--mode", "sampled", "--sample", "64KiB"];
    for (package, leaky, fixed, script, args, line, module, truth) in cases {
        let r = traced_with(&flags, package, leaky, script, args);
        assert_eq!(r.json.as_ref().unwrap()["mode"], "sampled");
        assert!(
            r.counter("usdt_samples") > 0,
            "{package}: the process did not sample itself"
        );
        // The extension's frame is on the stack: the caller itself, or the caller of the
        // CPython constructor (`PyBytes_FromStringAndSize`) it made the leaked object with.
        let sites: Vec<&Value> = at_line(&r, script, line)
            .into_iter()
            .filter(|s| {
                s["native_stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["module"].as_str().is_some_and(|m| m.contains(module)))
            })
            .collect();
        let est = sum(&sites, "unfreed_bytes");
        // About 100-150 samples each: the estimate's standard deviation is under 10 %.
        let err = est.abs_diff(truth) as f64 / truth as f64;
        assert!(
            err <= 0.30,
            "{package} {leaky}: {est} B estimated, {truth} B leaked"
        );
        let r = traced_with(&flags, package, fixed, script, args);
        let left = sum(&at_line(&r, script, line), "unfreed_bytes");
        assert!(left < truth / 10, "{package} {fixed}: {left} B at the line");
    }
}
