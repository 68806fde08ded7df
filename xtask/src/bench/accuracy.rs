//! What each tool says was leaked, against the known truth of the leaking workloads, and
//! leaktrace's per-line Python figures against tracemalloc's.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use super::tools::{Measure, Tool};
use crate::root;

/// A leak a workload makes on purpose.
pub struct Truth {
    /// The Python function the leaking calls are made from.
    pub python_fn: &'static str,
    /// The native function that allocates (a substring of its name).
    pub native_fn: &'static str,
    /// Bytes leaked for `n` iterations.
    pub bytes: fn(u64) -> u64,
}

/// What one tool reported about the leak.
pub struct Found {
    pub bytes: u64,
    /// Whether the report names the Python function (with its line), and the native one.
    pub python_named: bool,
    pub native_named: bool,
    /// Valgrind's classification, when it was Valgrind.
    pub note: String,
}

/// Reads what `tool` reported in `m.output` about `truth`.
pub fn found(tool: Tool, m: &Measure, python: &Path, truth: &Truth) -> Result<Option<Found>> {
    let Some(out) = &m.output else {
        return Ok(None);
    };
    Ok(Some(match tool {
        Tool::Untraced | Tool::Preloaded => return Ok(None),
        Tool::Leaktrace(_) => {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(out)?)?;
            let mut f = Found {
                bytes: 0,
                python_named: false,
                native_named: false,
                note: String::new(),
            };
            for s in v["sites"].as_array().into_iter().flatten() {
                let py = s["python_stack"].as_array().cloned().unwrap_or_default();
                if py.iter().any(|p| p["function"] == truth.python_fn) {
                    f.bytes += s["unfreed_bytes"].as_u64().unwrap_or(0);
                    f.python_named = true;
                    f.native_named |= s["native_stack"].as_array().into_iter().flatten().any(|n| {
                        n["function"]
                            .as_str()
                            .is_some_and(|x| x.contains(truth.native_fn))
                    });
                }
            }
            f
        }
        Tool::Memray(_) => {
            let get = helper(
                python,
                "memray_leaks.py",
                &[
                    out.as_os_str(),
                    truth.python_fn.as_ref(),
                    truth.native_fn.as_ref(),
                ],
            )?;
            let bytes = get("BYTES=");
            Found {
                bytes,
                python_named: bytes > 0,
                native_named: get("NATIVE_NAMED=") == 1,
                note: String::new(),
            }
        }
        Tool::Valgrind => {
            let get = helper(
                python,
                "valgrind_leaks.py",
                &[out.as_os_str(), truth.native_fn.as_ref()],
            )?;
            let (d, p, r) = (get("DEFINITELY="), get("POSSIBLY="), get("REACHABLE="));
            Found {
                bytes: d + p + r,
                // Valgrind sees no Python frames.
                python_named: false,
                native_named: d + p + r > 0,
                note: format!("definitely {d}, possibly {p}, still reachable {r}"),
            }
        }
    }))
}

/// Runs `bench/tools/SCRIPT ARGS` and gives a reader of the `KEY=<number>` words it printed
/// (0 for a key it did not print).
fn helper(python: &Path, script: &str, args: &[&OsStr]) -> Result<impl Fn(&str) -> u64> {
    let o = Command::new(python)
        .arg(root().join("bench/tools").join(script))
        .args(args)
        .output()
        .with_context(|| script.to_string())?;
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    Ok(move |key: &str| {
        said.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// leaktrace's unfreed bytes per Python line (innermost frame, Python allocator) in the files
/// `keep` accepts, from its JSON report.
pub fn leaktrace_lines(json: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, u64>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    let mut lines = BTreeMap::new();
    for s in v["sites"].as_array().into_iter().flatten() {
        if s["family"] != "python" {
            continue;
        }
        let Some(inner) = s["python_stack"].as_array().and_then(|p| p.last()) else {
            continue;
        };
        let file = inner["filename"].as_str().unwrap_or("");
        if !keep(file) {
            continue;
        }
        let key = format!("{file}:{}", inner["line"]);
        *lines.entry(key).or_default() += s["unfreed_bytes"].as_u64().unwrap_or(0);
    }
    Ok(lines)
}

/// tracemalloc's per-line figures written by `bench/_bench.py`, for the files `keep` accepts.
pub fn tracemalloc_lines(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, u64>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(v.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.rsplit_once(':').is_some_and(|(f, _)| keep(f)))
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
        .collect())
}
