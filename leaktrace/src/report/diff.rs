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

/// One type of the two reports' censuses.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeDiff {
    #[serde(rename = "type")]
    pub name: String,
    pub old_count: u64,
    pub new_count: u64,
    pub delta_count: i64,
    pub delta_bytes: i64,
}

/// The comparison of two reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Diff {
    pub old_unfreed_bytes: u64,
    pub new_unfreed_bytes: u64,
    /// Every stack of an allocator seen call by call, largest growth first.
    pub rows: Vec<DiffRow>,
    /// pymalloc's arenas by the stack that took each (the default coverage), apart: which
    /// call happens to take a new 1 MiB arena differs from run to run, so these rows move by
    /// whole arenas between stacks. `types` says what the arenas hold.
    pub arena_rows: Vec<DiffRow>,
    /// Live Python objects per type in each report's census, largest change first (types in
    /// only one report's top list count as 0 in the other).
    pub types: Vec<TypeDiff>,
    /// Both sides are snapshots (`leaktrace snapshot --json`): types only, no stacks.
    pub snapshots: bool,
}

/// What reports name pymalloc's arena allocations: the label the report itself gave them.
fn arena_label() -> &'static str {
    leaktrace_ebpf::AllocFn::PyArenaAlloc.label()
}

/// Compares two JSON reports (schema 2).
pub fn diff(old: &Value, new: &Value) -> crate::error::Result<Diff> {
    let mut rows: BTreeMap<(String, Vec<String>), DiffRow> = BTreeMap::new();
    for (report, is_new) in [(old, false), (new, true)] {
        // A snapshot (`leaktrace snapshot --json`) has a census and no sites.
        let sites = match (report["sites"].as_array(), census_of(report)) {
            (Some(sites), _) => sites.as_slice(),
            (None, Some(_)) => &[],
            (None, None) => {
                return Err(crate::error::Error::Usage(
                    "not a leaktrace JSON report or snapshot (no \"sites\", no \"census\")".into(),
                ))
            }
        };
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
    let (arena_rows, rows): (Vec<DiffRow>, Vec<DiffRow>) =
        rows.into_iter().partition(|r| r.allocator == arena_label());
    let total = |r: &Value| r["totals"]["unfreed_bytes"].as_u64().unwrap_or(0);
    Ok(Diff {
        old_unfreed_bytes: total(old),
        new_unfreed_bytes: total(new),
        rows,
        arena_rows,
        types: type_diff(old, new),
        snapshots: old["sites"].is_null() && new["sites"].is_null(),
    })
}

/// A report's type census, or a snapshot's.
fn census_of(report: &Value) -> Option<&Value> {
    [&report["type_census"], &report["census"]]
        .into_iter()
        .find(|c| c["types"].is_array())
}

/// The censuses' types compared, largest change in count first.
fn type_diff(old: &Value, new: &Value) -> Vec<TypeDiff> {
    let mut by: BTreeMap<String, TypeDiff> = BTreeMap::new();
    for (report, is_new) in [(old, false), (new, true)] {
        let types = census_of(report).and_then(|c| c["types"].as_array().cloned());
        for t in types.unwrap_or_default() {
            let Some(name) = t["type"].as_str() else {
                continue;
            };
            let row = by.entry(name.to_string()).or_insert_with(|| TypeDiff {
                name: name.to_string(),
                ..TypeDiff::default()
            });
            let (count, bytes) = (
                t["count"].as_u64().unwrap_or(0),
                t["bytes"].as_u64().unwrap_or(0) as i64,
            );
            if is_new {
                row.new_count = count;
                row.delta_bytes += bytes;
            } else {
                row.old_count = count;
                row.delta_bytes -= bytes;
            }
        }
    }
    let mut v: Vec<TypeDiff> = by
        .into_values()
        .map(|mut t| {
            t.delta_count = t.new_count as i64 - t.old_count as i64;
            t
        })
        .filter(|t| t.delta_count != 0)
        .collect();
    v.sort_by(|a, b| {
        b.delta_count
            .abs()
            .cmp(&a.delta_count.abs())
            .then(a.name.cmp(&b.name))
    });
    v
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
                    installed_path(e["filename"].as_str().unwrap_or("?")),
                    e["function"].as_str().unwrap_or("?")
                )
            } else {
                let module = e["module"].as_str().map_or("?".into(), module_name);
                // The innermost inlined function, whose line `line` is, names the frame.
                let inlined = e["inlined"].as_array().and_then(|i| i.last());
                let func = match (inlined.and_then(Value::as_str), e["function"].as_str()) {
                    (Some(inner), Some(outer)) => format!("{inner} (inlined in {outer})"),
                    (None, Some(f)) => f.to_string(),
                    // Without a symbol, the offset in the file: the same build, the same place.
                    _ => format!("{:#x}", e["file_offset"].as_u64().unwrap_or(0)),
                };
                match e["file"].as_str() {
                    Some(file) => format!("{func} ({}:{line}) in {module}", base_name(file)),
                    None => format!("{func} in {module}"),
                }
            }
        })
        .collect()
}

// Two reports of one program usually come from two environments (the old release in one venv,
// the new in another; two build trees): a frame is keyed by what names it in either.

/// A Python file as installed: the part after `site-packages/` (or `dist-packages/`), so one
/// package's frames match across virtual environments; any other path as it is.
fn installed_path(path: &str) -> &str {
    ["/site-packages/", "/dist-packages/"]
        .iter()
        .find_map(|d| path.rfind(d).map(|i| &path[i + d.len()..]))
        .unwrap_or(path)
}

/// A path's last component.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A module's file name without the hash auditwheel gives each library it vendors into a wheel
/// (`libfreetype-5d47eaee.so.6.20.2` → `libfreetype.so.6.20.2`), which changes from release to
/// release of the same library.
fn module_name(path: &str) -> String {
    let name = base_name(path);
    if let Some(dash) = name.find('-') {
        let (stem, rest) = name.split_at(dash);
        let hash = &rest[1..];
        // Eight ASCII hex digits first, so byte 8 is a character boundary in any name.
        let hex = hash.len() > 8 && hash.as_bytes()[..8].iter().all(u8::is_ascii_hexdigit);
        if hex && hash[8..].starts_with(".so") {
            return format!("{stem}{}", &hash[8..]);
        }
    }
    name.to_string()
}

/// The diff as text: the stacks that changed most, grown first.
pub fn render(d: &Diff, top: usize) -> String {
    let mut o = String::new();
    if d.snapshots {
        let _ = writeln!(o, "leaktrace diff of two snapshots");
        types(&mut o, &d.types, top);
        return o;
    }
    let _ = writeln!(
        o,
        "leaktrace diff — unfreed {} → {} ({:+} B)",
        human_bytes(d.old_unfreed_bytes),
        human_bytes(d.new_unfreed_bytes),
        d.new_unfreed_bytes as i64 - d.old_unfreed_bytes as i64
    );
    let count = |c: &str| {
        d.rows
            .iter()
            .chain(&d.arena_rows)
            .filter(|r| r.change == c)
            .count()
    };
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
    rows(&mut o, &d.rows, top);
    if d.arena_rows.iter().any(|r| r.change != "same") {
        let _ = writeln!(
            o,
            "\npymalloc arenas by the stack that took each (1 MiB apiece; which call takes a new \
             arena varies from run to run: the types below say what they hold)"
        );
        rows(&mut o, &d.arena_rows, top);
    }
    types(&mut o, &d.types, top);
    o
}

/// The types whose count changed, at most `top`.
fn types(o: &mut String, types: &[TypeDiff], top: usize) {
    if !types.is_empty() {
        let _ = writeln!(o, "\nLive Python objects by type (type census):");
        let _ = writeln!(o, "{:>12} {:>12} {:>12}  TYPE", "OLD", "NEW", "CHANGE");
        for t in types.iter().take(top) {
            let _ = writeln!(
                o,
                "{:>12} {:>12} {:>12}  {}",
                t.old_count,
                t.new_count,
                format!("{:+}", t.delta_count),
                t.name
            );
        }
    }
}

/// The `top` rows that changed most either way (a fix shows as a stack that shrank or
/// vanished), in the order given: grown first.
fn rows(o: &mut String, rows: &[DiffRow], top: usize) {
    let mut changed: Vec<&DiffRow> = rows.iter().filter(|r| r.change != "same").collect();
    if changed.len() > top {
        let mut by_size: Vec<u64> = changed
            .iter()
            .map(|r| r.delta_bytes.unsigned_abs())
            .collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        let least = by_size[top - 1];
        let mut room = top;
        changed.retain(|r| {
            let keep = room > 0 && r.delta_bytes.unsigned_abs() >= least;
            room -= usize::from(keep);
            keep
        });
    }
    for r in changed {
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
    fn the_top_rows_are_the_largest_changes_either_way() {
        let old = json!({"totals": {"unfreed_bytes": 9_600_000},
            "sites": [site(9_600_000, "leak", 22, 1)]});
        let new = json!({"totals": {"unfreed_bytes": 600},
            "sites": [site(300, "a", 3, 1), site(200, "b", 4, 1), site(100, "c", 5, 1)]});
        let text = render(&diff(&old, &new).unwrap(), 2);
        // Two growths of 300 and 200 B are shown with the fix that freed 9.6 MB, not before it.
        assert!(text.contains("-9600000 B"), "{text}");
        assert!(text.contains("app.py:3 in a"), "{text}");
        assert!(!text.contains("app.py:4 in b"), "{text}");
    }

    #[test]
    fn an_inlined_frame_is_named_by_the_function_its_line_is_in() {
        let s = json!({"allocator": "malloc", "unfreed_bytes": 24000, "unfreed_count": 1,
            "stack": [{"kind": "native", "hidden": false, "address": 1, "function": "text_layout",
                "inlined": ["text_layout_fallback"], "module": "/x/_imagingft.so",
                "file": "/src/_imagingft.c", "line": 442}]});
        assert_eq!(
            stack_key(&s),
            ["text_layout_fallback (inlined in text_layout) (_imagingft.c:442) in _imagingft.so"]
        );
    }

    #[test]
    fn matches_one_package_across_environments() {
        let at = |venv: &str, lib: &str, build: &str| {
            json!({
                "allocator": "malloc", "unfreed_bytes": 2400, "unfreed_count": 1,
                "stack": [
                    {"kind": "python", "function": "FreeTypeFont.getlength", "line": 390,
                     "filename": format!("/{venv}/lib/python3.12/site-packages/PIL/ImageFont.py")},
                    {"kind": "native", "hidden": false, "address": 1, "function": "ft_alloc",
                     "module": format!("/{venv}/lib/python3.12/site-packages/pillow.libs/{lib}"),
                     "file": format!("/{build}/src/base/ftsystem.c"), "line": 102}
                ]
            })
        };
        let old = json!({"totals": {"unfreed_bytes": 2400},
            "sites": [at("pil-11.2.1", "libfreetype-5d47eaee.so.6.20.2", "tmp/b1")]});
        let new = json!({"totals": {"unfreed_bytes": 2400},
            "sites": [at("pil-11.3.0", "libfreetype-0a1b2c3d.so.6.20.2", "tmp/b2")]});
        let d = diff(&old, &new).unwrap();
        assert_eq!(d.rows.len(), 1, "{:?}", d.rows);
        assert_eq!(d.rows[0].change, "same");
        assert_eq!(
            d.rows[0].stack,
            [
                "PIL/ImageFont.py:390 in FreeTypeFont.getlength",
                "ft_alloc (ftsystem.c:102) in libfreetype.so.6.20.2"
            ]
        );
        assert_eq!(
            module_name("/x/_cbor2.cpython-311-x86_64-linux-gnu.so"),
            "_cbor2.cpython-311-x86_64-linux-gnu.so"
        );
        assert_eq!(installed_path("app.py"), "app.py");
        // Byte 8 falls inside a character here: no slicing there.
        assert_eq!(module_name("/x/lib-aéééé.so"), "lib-aéééé.so");
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

    #[test]
    fn arenas_and_types_are_compared_apart() {
        let mut arena = site(1 << 20, "a", 3, 0x1000);
        arena["allocator"] = json!(arena_label());
        let census = |n: u64| {
            json!({"types": [
            {"type": "Rec", "count": n, "bytes": n * 48},
            {"type": "str", "count": 10, "bytes": 500}]})
        };
        let old = json!({"totals": {"unfreed_bytes": 1000}, "sites": [site(1000, "a", 3, 0x1000)],
            "type_census": census(5)});
        let new = json!({"totals": {"unfreed_bytes": 1049576},
            "sites": [site(1000, "a", 3, 0x1000), arena], "type_census": census(20005)});
        let d = diff(&old, &new).unwrap();
        assert_eq!(d.rows.len(), 1, "the exact stack alone");
        assert_eq!(d.rows[0].change, "same");
        assert_eq!(d.arena_rows.len(), 1);
        assert_eq!(d.arena_rows[0].change, "new");
        assert_eq!(d.types.len(), 1, "unchanged types are left out");
        assert_eq!(
            (d.types[0].name.as_str(), d.types[0].delta_count),
            ("Rec", 20000)
        );
        assert_eq!(d.types[0].delta_bytes, 960_000);
        let text = render(&d, 10);
        assert!(text.contains("pymalloc arenas by the stack"), "{text}");
        assert!(text.contains("+20000  Rec"), "{text}");
    }
}
