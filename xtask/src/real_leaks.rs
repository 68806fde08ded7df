//! Real leaks in released PyPI packages, each with the release that fixed it: the workloads of
//! `cargo xtask bench --only real-leaks` and of `tests/real_leaks.rs`. Each version lives in its
//! own venv under `~/.cache/leaktrace/real-leaks/PKG-VERSION`, installed from its manylinux
//! wheel; `--system-site-packages` lets memray (installed for the interpreter) run there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run;

/// One leak: where it is, how to run it, and what it leaks.
pub struct RealLeak {
    pub name: &'static str,
    pub package: &'static str,
    pub leaky: &'static str,
    pub fixed: &'static str,
    /// Reproducer in `bench/real_leaks/`, then its arguments (N first).
    pub script: &'static str,
    pub args: &'static [&'static str],
    pub kind: &'static str,
    /// The reproducer's leaking line.
    pub line: u64,
    /// Where it was fixed upstream.
    pub reference: &'static str,
}

pub const LEAKS: &[RealLeak] = &[
    RealLeak {
        name: "ujson big-int decode",
        package: "ujson",
        leaky: "5.11.0",
        fixed: "5.12.0",
        script: "ujson_bigint_native.py",
        line: 15,
        args: &["5000"],
        kind: "native buffer: Object_newIntegerFromString's digit copy, malloc(4001)",
        reference: "ujson 5.12.0 (JSONtoObj.c frees the buffer; ultrajson#747 quotes the code)",
    },
    RealLeak {
        name: "cbor2 long string",
        package: "cbor2",
        leaky: "5.8.0",
        fixed: "5.9.0",
        script: "cbor2_longstring_native.py",
        line: 26,
        args: &["100", "split"],
        kind: "native buffer (64 KiB carry buffer) and a str per call: decode_definite_long_string",
        reference: "cbor2 5.9.0 changelog, agronholm/cbor2#290",
    },
    RealLeak {
        name: "ciso8601 fromutc",
        package: "ciso8601",
        leaky: "2.3.2",
        fixed: "2.3.3",
        script: "ciso8601_fromutc_refcount.py",
        line: 16,
        args: &["200000"],
        kind: "reference count: a 48-byte timedelta per call (FixedOffset_fromutc)",
        reference: "ciso8601 2.3.3 changelog, closeio/ciso8601#172",
    },
    RealLeak {
        name: "isal decompressobj",
        package: "isal",
        leaky: "1.5.1",
        fixed: "1.5.2",
        script: "isal_decompressobj_refcount.py",
        line: 15,
        args: &["250"],
        kind: "reference count: an 87 KB decompressor per bad-wbits call",
        reference: "python-isal 1.5.2 changelog",
    },
    RealLeak {
        name: "ujson default= str",
        package: "ujson",
        leaky: "5.12.0",
        fixed: "5.12.1",
        script: "ujson_default_refcount.py",
        line: 22,
        args: &["5000"],
        kind: "reference count: the str default= returned (PyUnicodeToUTF8)",
        reference: "ultrajson#631, fixed by ultrajson#714 in 5.12.1",
    },
    RealLeak {
        name: "ujson dump write error",
        package: "ujson",
        leaky: "5.12.0",
        fixed: "5.12.1",
        script: "ujson_dump_refcount.py",
        line: 20,
        args: &["5000"],
        kind: "reference count: the serialised document when fp.write raises (objToJSONFile)",
        reference: "CVE-2026-44660, fixed in ujson 5.12.1",
    },
];

/// The venv of one version.
pub fn venv(package: &str, version: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    Path::new(&home)
        .join(".cache/leaktrace/real-leaks")
        .join(format!("{package}-{version}"))
}

/// The venv's interpreter.
pub fn venv_python(package: &str, version: &str) -> PathBuf {
    venv(package, version).join("bin/python")
}

/// Creates every venv that is missing or holds another version (idempotent: a second run only
/// asks each venv its package's version).
pub fn ensure_venvs(python: &Path) -> Result<()> {
    let mut wanted: Vec<(&str, &str)> = LEAKS
        .iter()
        .flat_map(|l| [(l.package, l.leaky), (l.package, l.fixed)])
        .collect();
    wanted.sort();
    wanted.dedup();
    for (pkg, ver) in wanted {
        let py = venv_python(pkg, ver);
        let have = Command::new(&py)
            .args([
                "-c",
                &format!("import importlib.metadata as m; print(m.version('{pkg}'))"),
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if have.as_deref() == Some(ver) {
            continue;
        }
        eprintln!("xtask setup: {pkg}=={ver} in {}", venv(pkg, ver).display());
        run(Command::new(python)
            .args(["-m", "venv", "--clear", "--system-site-packages"])
            .arg(venv(pkg, ver)))?;
        run(Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            &format!("{pkg}=={ver}"),
        ]))
        .with_context(|| format!("pip install {pkg}=={ver}"))?;
    }
    Ok(())
}
