//! `leaktrace snapshot` of a big heap: a pyenv 3.12 process holding 1,000,000 instances with a
//! `__dict__` (two attributes each), 20,000 str of 608 characters (malloc's heap) and a few
//! objects held behind chains; the walk, the whole command, the pause with `--freeze`, and
//! `--why` that finds a chain at once or searches everything reachable. With
//! `LEAKTRACE_COMPARE=/path/to/leaktrace`, that build's plain snapshot alternates with this one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::median;

const HEAP: &str = r#"
import time
class Rec:
    def __init__(self, i): self.i = i; self.name = "r"
class Held:
    pass
LIST = [Rec(i) for i in range(1000000)]
BIG = ["%07d" % i + "y" * 600 for i in range(20000)]
CACHE = {"k": [Held()]}
print("READY", flush=True)
time.sleep(3600)
"#;

/// One command's figures over the repetitions.
#[derive(Default)]
struct Row {
    whole: Vec<f64>,
    walk: Vec<f64>,
    paused: Vec<f64>,
    rss_mb: Vec<f64>,
    note: String,
}

/// One command of the part: its label, the binary, the arguments after `snapshot -p PID`.
type Config = (String, PathBuf, Vec<&'static str>);

/// Runs the part and prints its table.
pub fn run(leaktrace: &Path, python: &Path, reps: usize, scratch: &Path) -> Result<()> {
    let script = scratch.join("snapshot_heap.py");
    std::fs::write(&script, HEAP)?;
    let mut target = Command::new(python)
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()?;
    let ready = BufReader::new(target.stdout.take().context("stdout")?)
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.contains("READY"));
    if !ready {
        let _ = target.kill();
        bail!("the snapshot bench's target never became ready");
    }
    let pid = target.id().to_string();
    let configs = configs(leaktrace);
    let mut rows: Vec<Row> = configs.iter().map(|_| Row::default()).collect();
    let json = scratch.join("snapshot.json");
    let measured = (0..reps).try_for_each(|_| {
        configs
            .iter()
            .zip(&mut rows)
            .try_for_each(|(config, row)| measure(config, &pid, &json, row))
    });
    let _ = target.kill();
    let _ = target.wait();
    measured?;
    print_rows(python, reps, configs, rows);
    Ok(())
}

/// The commands compared, alternating: this build's, and with `LEAKTRACE_COMPARE` another's.
fn configs(leaktrace: &Path) -> Vec<Config> {
    let mut configs: Vec<Config> = vec![
        ("`snapshot`".into(), leaktrace.into(), vec![]),
        (
            "`snapshot --freeze`".into(),
            leaktrace.into(),
            vec!["--freeze"],
        ),
        (
            "`snapshot --why Held`".into(),
            leaktrace.into(),
            vec!["--why", "Held"],
        ),
        (
            "`snapshot --why NoSuchType` (everything reachable)".into(),
            leaktrace.into(),
            vec!["--why", "NoSuchType"],
        ),
    ];
    if let Some(old) = super::compare_build() {
        configs.insert(0, (format!("`snapshot`, {}", old.display()), old, vec![]));
    }
    configs
}

/// Runs one command once and adds its figures to `row`.
fn measure((_, bin, args): &Config, pid: &str, json: &Path, row: &mut Row) -> Result<()> {
    let _ = std::fs::remove_file(json);
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["snapshot", "-p", pid, "--json"])
        .arg(json)
        .args(args)
        .output()?;
    row.whole.push(t.elapsed().as_secs_f64());
    if !out.status.success() {
        bail!("{bin:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    row.walk.push(v["walk_s"].as_f64().unwrap_or(0.0));
    if let Some(p) = v["frozen_s"].as_f64() {
        row.paused.push(p);
    }
    if let Some(r) = v["peak_rss_bytes"].as_f64() {
        row.rss_mb.push(r / 1e6);
    }
    // Builds before module-qualified names said `Rec`.
    let rec = v["census"]["types"]
        .as_array()
        .and_then(|t| {
            t.iter()
                .find(|t| t["type"] == "__main__.Rec" || t["type"] == "Rec")
        })
        .map_or(0, |t| t["count"].as_u64().unwrap_or(0));
    row.note = match v["why"]["objects_searched"].as_u64() {
        Some(n) => format!("`Rec` {rec}; {n} objects searched"),
        None => format!("`Rec` {rec}"),
    };
    Ok(())
}

/// The part's table, medians of the repetitions.
fn print_rows(python: &Path, reps: usize, configs: Vec<Config>, rows: Vec<Row>) {
    println!(
        "\n### `snapshot` of 1,000,000 dict-holding objects, CPython {} (`--only snapshot`), \
         medians of {reps}\n",
        python.display()
    );
    println!("| command | walk | target stopped | whole command | leaktrace peak RSS | found |");
    println!("|---|---|---|---|---|---|");
    for ((label, _, _), mut row) in configs.into_iter().zip(rows) {
        let paused = if row.paused.is_empty() {
            "never".to_string()
        } else {
            format!("{:.2} s", median(&mut row.paused))
        };
        let rss = if row.rss_mb.is_empty() {
            "—".to_string()
        } else {
            format!("{:.0} MB", median(&mut row.rss_mb))
        };
        println!(
            "| {label} | {:.2} s | {paused} | {:.2} s | {rss} | {} |",
            median(&mut row.walk),
            median(&mut row.whole),
            row.note
        );
    }
}
