//! Capture files and every report format, each checked by its real consumer: headless
//! Chromium for the HTML report and the flamegraph, `go tool pprof` for pprof, Python's csv
//! module for CSV, `promtool` for the metrics endpoint, tmux for `leaktrace top`.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The bundled leaking example: a C-extension leak under `handle_upload` and a Python-level one
/// under `remember`, served for `seconds`.
fn example(py: &Path, seconds: &str) -> Vec<String> {
    vec![
        py.to_str().unwrap().into(),
        workspace()
            .join("examples/leaky_service.py")
            .to_str()
            .unwrap()
            .into(),
        ext_dir(py).to_str().unwrap().into(),
        seconds.into(),
    ]
}

fn report(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(leaktrace_bin())
        .arg("report")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Where tests leave what a person may want to look at (the HTML report's screenshot).
fn artifacts() -> PathBuf {
    let d = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Headless Chromium on a file, with a fresh profile; `extra` says what to make of it.
fn chromium(file: &Path, extra: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    succeed(
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("file://{}", file.display())),
    )
}

/// The page's DOM after its scripts ran.
fn chromium_dom(file: &Path) -> String {
    String::from_utf8_lossy(&chromium(file, &["--dump-dom"]).stdout).into_owned()
}

fn chromium_screenshot(file: &Path, png: &Path) {
    chromium(
        file,
        &[
            "--hide-scrollbars",
            "--window-size=1280,2000",
            &format!("--screenshot={}", png.display()),
        ],
    );
}

#[test]
fn a_capture_renders_every_format_for_its_real_consumer() {
    let _g = serial();
    let py = pyenv_python();
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("trace.ltc");
    let argv = example(&py, "6");
    let mut args = vec!["run", "--top", "20", "-o", cap.to_str().unwrap(), "--"];
    args.extend(argv.iter().map(|s| s.as_str()));
    let live = leaktrace(&args);
    assert_eq!(live.code, 0);
    assert!(
        live.stderr.contains("capture written to"),
        "{}",
        live.stderr
    );
    let live = live.json.unwrap();
    let c = cap.to_str().unwrap();

    // JSON rendered offline is the report the trace printed.
    let (code, json, err) = report(&[c, "-f", "json"]);
    assert_eq!(code, 0, "{err}");
    let off: Value = serde_json::from_str(&json).unwrap();
    for key in [
        "totals",
        "suspects",
        "suspect_bytes",
        "sites",
        "type_census",
        "target",
    ] {
        assert_eq!(off[key], live[key], "{key} differs offline");
    }
    let leak = &off["sites"][0];
    assert_eq!(leak["caller"]["function"], "leak_malloc", "{leak}");
    assert_eq!(leak["analysis"]["class"], "leak");
    let leak_bytes = leak["unfreed_bytes"].as_u64().unwrap();
    assert!(leak_bytes >= 8192 * 100, "{leak_bytes}");

    // Table.
    let (code, table, _) = report(&[c]);
    assert_eq!(code, 0);
    assert!(
        table.contains("LEAK SUSPECT") && table.contains("handle_upload"),
        "{table}"
    );

    // Flamegraph: a browser loads it; the leak is a frame with its bytes.
    let svg = dir.path().join("unfreed.svg");
    assert_eq!(
        report(&[c, "-f", "flamegraph", "-o", svg.to_str().unwrap()]).0,
        0
    );
    let dom = chromium_dom(&svg);
    assert!(dom.contains("<svg"), "{}", &dom[..dom.len().min(500)]);
    assert!(
        dom.contains("leak_malloc (leakyext.c:22) [leakyext"),
        "no leak_malloc frame in the flamegraph"
    );
    assert!(dom.contains("handle_upload (leaky_service.py:30)"));
    // Growth over the service's last 2 s before shutdown (it leaks at a steady rate from its
    // start to its end): the same stacks, fewer bytes.
    let finalized = live["finalized_s"].as_f64().expect("shutdown time");
    let since = format!("{:.2}", finalized - 2.0);
    let grown = dir.path().join("growth.svg");
    assert_eq!(
        report(&[
            c,
            "-f",
            "flamegraph",
            "--growth-since",
            &since,
            "-o",
            grown.to_str().unwrap()
        ])
        .0,
        0
    );
    let g = std::fs::read_to_string(&grown).unwrap();
    // `<title>leak_malloc (leakyext.c:22) [leakyext…so] (13,516,800 bytes, 88.32%)</title>`
    let bytes_of = |svg: &str| -> u64 {
        let t = &svg[svg.find("<title>leak_malloc (").expect("leak frame")..];
        let t = &t[..t.find(" bytes,").unwrap()];
        t.rsplit('(')
            .next()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap()
    };
    assert_eq!(
        bytes_of(&std::fs::read_to_string(&svg).unwrap()),
        leak_bytes
    );
    let gained = bytes_of(&g);
    assert!(
        gained > 0 && gained < leak_bytes,
        "{gained} of {leak_bytes}"
    );
    assert!(g.contains("Bytes gained from "));

    // HTML: the suspect's function and the chart are in the page a browser built.
    let html = dir.path().join("report.html");
    assert_eq!(
        report(&[c, "-f", "html", "-o", html.to_str().unwrap()]).0,
        0
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("<script src") && !page.contains("<link "),
        "everything inline: no network needed"
    );
    let dom = chromium_dom(&html);
    assert!(dom.contains("id=\"chart\""));
    assert!(
        dom.matches("class=\"series\"").count() >= 3,
        "RSS, live and a suspect"
    );
    assert!(dom.contains("handle_upload → leak_malloc"));
    assert!(dom.contains("<tr class=\"suspect\">"));
    assert!(dom.contains("id=\"census\"") && dom.contains(">bytes<"));
    let png = artifacts().join("html-report.png");
    let _ = std::fs::remove_file(&png);
    chromium_screenshot(&html, &png);
    let shot = std::fs::read(&png).unwrap();
    assert!(shot.starts_with(b"\x89PNG") && shot.len() > 20_000);

    // pprof: go tool pprof reads it and names the leaking function first.
    let prof = dir.path().join("leak.pb.gz");
    assert_eq!(
        report(&[c, "-f", "pprof", "-o", prof.to_str().unwrap()]).0,
        0
    );
    let out = succeed(
        Command::new("go")
            .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
            .arg(&prof),
    );
    let top = String::from_utf8_lossy(&out.stdout);
    let first = top
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or("");
    assert!(first.trim_end().ends_with("leak_malloc"), "{top}");
    let out = succeed(
        Command::new("go")
            .args(["tool", "pprof", "-traces"])
            .arg(&prof),
    );
    let traces = String::from_utf8_lossy(&out.stdout);
    assert!(
        traces.contains("handle_upload") && traces.contains("<module>"),
        "{traces}"
    );

    // CSV: Python's csv module reads it; the leak's column grows to its unfreed bytes.
    let (code, csv, _) = report(&[c, "-f", "csv", "--top", "3"]);
    assert_eq!(code, 0);
    let check = r#"
import csv, io, sys
rows = list(csv.DictReader(io.StringIO(sys.stdin.read())))
col = [k for k in rows[0] if "handle_upload" in k and "leak_malloc" in k][0]
vals = [int(r[col]) for r in rows]
assert vals == sorted(vals), vals
assert all(int(r["rss_bytes"]) > 0 for r in rows[:-1])
print(len(rows), vals[-1])
"#;
    let mut child = Command::new(&py)
        .args(["-c", check])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(csv.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{csv}");
    let n: Vec<u64> = said
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(n[0] as usize, off["series"].as_array().unwrap().len());
    assert_eq!(n[1], leak_bytes);
}

/// Leaks 8 KB in the C extension 50 times a second, forever.
const FOREVER: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import leakyext
def handle():
    leakyext.leak_malloc(8192)
print("READY", flush=True)
while True:
    handle()
    time.sleep(0.02)
"#;

#[test]
fn a_capture_survives_a_killed_tracer() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(FOREVER);
    let t = start_ready(&py, &s, &[ext_dir(&py).to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cut.ltc");
    let tracer = Tracer::spawn(&[
        "attach",
        "-p",
        &t.id().to_string(),
        "--mode",
        "exact",
        "-o",
        cap.to_str().unwrap(),
    ]);
    // Past the first capture flush (every second), whatever the attach took.
    std::thread::sleep(Duration::from_millis(2500));
    kill(tracer.id(), libc::SIGKILL);
    let _ = tracer.finish();
    let (code, table, err) = report(&[cap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("the capture stops at"), "{table}");
    assert!(
        table.contains("leak_malloc") && table.contains("in handle"),
        "{table}"
    );
    // The header reads as a sentence and says what is known: a Python target, its allocations.
    assert!(
        table.contains("target state unknown: the capture stops at"),
        "{table}"
    );
    assert!(!table.contains("not a Python process"), "{table}");
    assert!(!table.contains(" 0 allocations"), "{table}");
}

#[test]
fn report_rejects_what_is_not_a_capture() {
    // A capture that cannot be written stops `run` before the command starts.
    let out = Command::new(leaktrace_bin())
        .args(["run", "-o", "/nonexistent-dir/x.ltc", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write /nonexistent-dir/x.ltc"));
    let (code, _, err) = report(&["/nonexistent.ltc"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent.ltc"), "{err}");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "{\"schema_version\": 2}\n").unwrap();
    let (code, _, err) = report(&[f.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("not a leaktrace capture"), "{err}");
    let (code, _, err) = report(&[f.path().to_str().unwrap(), "-f", "svg"]);
    assert_eq!(code, 2, "{err}");
}

/// An HTTP GET over loopback: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Written in pieces, as clients may.
    for piece in ["GET ", path, " HTTP/1.1\r\n", "Host: ", addr, "\r\n\r\n"] {
        s.write_all(piece.as_bytes()).unwrap();
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn prometheus_metrics_pass_promtool() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(FOREVER);
    let t = start_ready(&py, &s, &[ext_dir(&py).to_str().unwrap()]);
    let addr = "127.0.0.1:19464";
    let tracer = Tracer::spawn(&[
        "attach",
        "-p",
        &t.id().to_string(),
        "-d",
        "8",
        "--prometheus",
        addr,
    ]);
    // At 50 leaks a second, well over the 100 the scrape is checked for.
    std::thread::sleep(Duration::from_secs(4));
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    // promtool stops reading at the first error: what it says is the test's finding.
    let _ = check.stdin.take().unwrap().write_all(body.as_bytes());
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = format!("pid=\"{}\"", t.id());
    let leak = body
        .lines()
        .find(|l| {
            l.starts_with("leaktrace_stack_live_bytes{") && l.contains("in handle → leak_malloc")
        })
        .unwrap_or_else(|| panic!("no leak stack:\n{body}"));
    assert!(leak.contains(&pid) && leak.contains("rank=\"1\""), "{leak}");
    let bytes: f64 = leak.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes >= 8192.0 * 100.0, "{leak}");
    for name in [
        "leaktrace_rss_bytes",
        "leaktrace_live_bytes",
        "leaktrace_dropped_events_total",
        "leaktrace_tracer_cpu_seconds_total",
        "leaktrace_tracer_resident_bytes",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
    let stacks = body
        .lines()
        .filter(|l| l.starts_with("leaktrace_stack_live_bytes{"))
        .count();
    assert!((1..=10).contains(&stacks), "bounded: {stacks}");
    let (status, _) = http_get(addr, "/other");
    assert!(status.contains("404"), "{status}");
    assert_eq!(tracer.finish().code, 0);
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn top_view_sorts_and_quits_under_tmux() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(FOREVER);
    let t = start_ready(&py, &s, &[ext_dir(&py).to_str().unwrap()]);
    let session = format!("leaktrace-test-{}", std::process::id());
    let done = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let cmd = format!(
        "{} top -p {}; echo EXIT=$? > {}; sleep 60",
        leaktrace_bin().display(),
        t.id(),
        done.display()
    );
    tmux(&["kill-session", "-t", &session]);
    succeed(Command::new("tmux").args([
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "40",
        &cmd,
    ]));
    let pane = || tmux(&["capture-pane", "-p", "-t", &session]);
    let shown = wait_for(20, || {
        let p = pane();
        p.contains("stacks by live bytes") && p.contains("handle → leak_malloc")
    });
    let by_bytes = pane();
    assert!(shown, "{by_bytes}");
    assert!(
        by_bytes.contains("UNFREED") && by_bytes.contains("GROWTH"),
        "{by_bytes}"
    );
    tmux(&["send-keys", "-t", &session, "s"]);
    assert!(
        wait_for(5, || pane().contains("stacks by growth rate")),
        "{}",
        pane()
    );
    tmux(&["send-keys", "-t", &session, "q"]);
    let quit = wait_for(20, || {
        std::fs::read_to_string(&done).is_ok_and(|s| s.contains("EXIT="))
    });
    let after = pane();
    tmux(&["kill-session", "-t", &session]);
    assert!(quit, "{after}");
    assert_eq!(std::fs::read_to_string(&done).unwrap().trim(), "EXIT=0");
    // Quitting detaches and prints the report of what was seen.
    assert!(
        after.contains("detached (quit from the live view)"),
        "{after}"
    );
    // Without a terminal, `top` says so.
    let out = Command::new(leaktrace_bin())
        .args(["top", "-p", &t.id().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("terminal"));
}
