//! `leaktrace diff OLD.json NEW.json`: unfreed memory per stack in two reports — an old version
//! and a new one, before and after a fix — matched by their symbolized frames (function, file
//! and line; never addresses, which differ from run to run), sorted by growth.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::human_bytes;

/// One stack in either report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiffRow {
    /// The stack, outermost first, as shown frames.
    pub stack: Vec<String>,
    pub allocator: String,
    pub old_bytes: u64,
    pub old_count: u64,
    pub new_bytes: u64,
    pub new_count: u64,
    /// `new_bytes - old_bytes`.
    pub delta_bytes: i64,
    /// "grown", "shrunk", "same", "new" (absent from OLD) or "vanished" (absent from NEW).
    pub change: String,
}

/// The comparison of two reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Diff {
    pub old_unfreed_bytes: u64,
    pub new_unfreed_bytes: u64,
    /// Every stack, largest growth first.
    pub rows: Vec<DiffRow>,
}

/// Compares two JSON reports (schema 2).
pub fn diff(old: &Value, new: &Value) -> Result<Diff, String> {
    let mut rows: BTreeMap<(String, Vec<String>), DiffRow> = BTreeMap::new();
    for (report, is_new) in [(old, false), (new, true)] {
        let sites = report["sites"]
            .as_array()
            .ok_or("not a leaktrace JSON report (no \"sites\")")?;
        for s in sites {
            let allocator = s["allocator"].as_str().unwrap_or("?").to_string();
            let stack = stack_key(s);
            let row = rows
                .entry((allocator.clone(), stack.clone()))
                .or_insert_with(|| DiffRow {
                    stack,
                    allocator,
                    ..DiffRow::default()
                });
            let bytes = s["unfreed_bytes"].as_u64().unwrap_or(0);
            let count = s["unfreed_count"].as_u64().unwrap_or(0);
            if is_new {
                row.new_bytes += bytes;
                row.new_count += count;
            } else {
                row.old_bytes += bytes;
                row.old_count += count;
            }
        }
    }
    let mut rows: Vec<DiffRow> = rows
        .into_values()
        .map(|mut r| {
            r.delta_bytes = r.new_bytes as i64 - r.old_bytes as i64;
            r.change = match (r.old_count, r.new_count) {
                (0, _) => "new",
                (_, 0) => "vanished",
                _ if r.delta_bytes > 0 => "grown",
                _ if r.delta_bytes < 0 => "shrunk",
                _ => "same",
            }
            .into();
            r
        })
        .collect();
    rows.sort_by(|a, b| {
        b.delta_bytes
            .cmp(&a.delta_bytes)
            .then(a.stack.cmp(&b.stack))
    });
    let total = |r: &Value| r["totals"]["unfreed_bytes"].as_u64().unwrap_or(0);
    Ok(Diff {
        old_unfreed_bytes: total(old),
        new_unfreed_bytes: total(new),
        rows,
    })
}

/// A site's identity across runs, outermost first: its Python frames as `file:line in
/// function`, then the native frames below the innermost one as `function (file:line) in module`
/// (the module's file name, without its directory) — which line called which C code that
/// allocated. Native frames between and above Python frames are left out: how far they were
/// unwound varies from run to run, what they say does not.
fn stack_key(site: &Value) -> Vec<String> {
    let entries: Vec<Value> = site["stack"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !e["hidden"].as_bool().unwrap_or(false))
        .collect();
    let innermost_py = entries.iter().rposition(|e| e["kind"] == "python");
    entries
        .iter()
        .enumerate()
        .filter(|(i, e)| innermost_py.is_none_or(|p| e["kind"] == "python" || *i > p))
        .map(|(_, e)| e)
        .map(|e| {
            let line = e["line"]
                .as_u64()
                .map(|l| l.to_string())
                .unwrap_or_default();
            if e["kind"] == "python" {
                format!(
                    "{}:{line} in {}",
                    e["filename"].as_str().unwrap_or("?"),
                    e["function"].as_str().unwrap_or("?")
                )
            } else {
                let module = e["module"]
                    .as_str()
                    .map(|m| m.rsplit('/').next().unwrap_or(m))
                    .unwrap_or("?");
                let func = match e["function"].as_str() {
                    Some(f) => f.to_string(),
                    // Without a symbol, the offset in the file: the same build, the same place.
                    None => format!("{:#x}", e["file_offset"].as_u64().unwrap_or(0)),
                };
                match e["file"].as_str() {
                    Some(file) => format!("{func} ({file}:{line}) in {module}"),
                    None => format!("{func} in {module}"),
                }
            }
        })
        .collect()
}

/// The diff as text: the stacks that changed most, grown first.
pub fn render(d: &Diff, top: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "leaktrace diff — unfreed {} → {} ({:+} B)",
        human_bytes(d.old_unfreed_bytes),
        human_bytes(d.new_unfreed_bytes),
        d.new_unfreed_bytes as i64 - d.old_unfreed_bytes as i64
    );
    let count = |c: &str| d.rows.iter().filter(|r| r.change == c).count();
    let _ = writeln!(
        o,
        "  {} stacks grown, {} shrunk, {} new, {} vanished, {} unchanged\n",
        count("grown"),
        count("shrunk"),
        count("new"),
        count("vanished"),
        count("same")
    );
    let _ = writeln!(
        o,
        "{:>14} {:>14} {:>14}  {:<8} STACK (innermost last)",
        "OLD", "NEW", "CHANGE", ""
    );
    for r in d.rows.iter().filter(|r| r.change != "same").take(top) {
        let _ = writeln!(
            o,
            "{:>14} {:>14} {:>14}  {:<8} {}",
            format!("{} B", r.old_bytes),
            format!("{} B", r.new_bytes),
            format!("{:+} B", r.delta_bytes),
            r.change,
            r.allocator
        );
        for f in &r.stack {
            let _ = writeln!(o, "{:>56}{f}", "");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn site(bytes: u64, func: &str, line: u64, addr: u64) -> Value {
        json!({
            "allocator": "malloc", "unfreed_bytes": bytes, "unfreed_count": bytes / 100,
            "stack": [
                {"kind": "python", "filename": "app.py", "function": func, "line": line},
                {"kind": "native", "hidden": false, "address": addr, "function": "leak_malloc",
                 "module": "/x/leakyext.so", "file": "leakyext.c", "line": 22},
                {"kind": "native", "hidden": true, "address": addr + 7, "function": "_start"}
            ]
        })
    }

    #[test]
    fn matches_by_frames_not_addresses() {
        let old = json!({"totals": {"unfreed_bytes": 1500},
            "sites": [site(1000, "a", 3, 0x1000), site(500, "b", 9, 0x2000)]});
        let new = json!({"totals": {"unfreed_bytes": 5000},
            "sites": [site(1000, "a", 3, 0x7000), site(4000, "c", 12, 0x8000)]});
        let d = diff(&old, &new).unwrap();
        assert_eq!(d.rows.len(), 3);
        assert_eq!(d.rows[0].change, "new");
        assert_eq!(d.rows[0].delta_bytes, 4000);
        assert!(d.rows[0].stack[0].contains("app.py:12 in c"));
        assert_eq!(
            d.rows[1].change, "same",
            "the same stack at other addresses"
        );
        assert_eq!(d.rows[2].change, "vanished");
        assert_eq!(
            d.rows[0].stack.len(),
            2,
            "hidden frames are not part of the key"
        );
        assert!(render(&d, 10).contains("1 new, 1 vanished, 1 unchanged"));
        assert!(diff(&json!({}), &new).is_err());
    }
}
