//! Capture files as crash recovery relies on them: a capture renders the report the live trace
//! printed, site for site, and the reader survives any damage (truncation anywhere, flipped
//! bits, in the gzipped file and in its text) with an error or a report: never a panic or a
//! hang.

mod common;

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::*;
use leaktrace::capture::render::{render, Format, RenderOptions};
use leaktrace::report::ReportOptions;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Many sites with churn (random sizes, some freed), and a forked child that leaks as well.
const CHURN_AND_FORK: &str = r#"
import os, random, time
random.seed(7)
keep = {}
def work(i):
    k = random.randrange(3000)
    keep[k] = bytearray(random.randrange(600, 20000))
    if i % 3 == 0:
        keep.pop(random.randrange(3000), None)
t0 = time.time()
i = 0
while time.time() - t0 < 2.5:
    work(i)
    i += 1
    if i % 1000 == 0:
        time.sleep(0.01)
    if i == 3000:
        pid = os.fork()
        if pid == 0:
            held = [bytearray(70000) for _ in range(30)]
            time.sleep(0.3)
            os._exit(0)
        os.waitpid(pid, 0)
"#;

/// A real capture of `CHURN_AND_FORK` and the live report's JSON.
fn capture(dir: &std::path::Path) -> (std::path::PathBuf, Value) {
    let py = pyenv_python();
    let s = script(CHURN_AND_FORK);
    let cap = dir.join("trace.ltc");
    let live = run_python(
        &["--follow-forks", "-o", cap.to_str().unwrap()],
        &py,
        &s,
        &[],
    );
    assert_eq!(live.code, 0, "{}", live.stderr);
    (cap, live.json.expect("live JSON"))
}

fn options(format: Format) -> RenderOptions {
    RenderOptions {
        format,
        report: ReportOptions {
            top: 1_000_000,
            min_size: 0,
            all_native_frames: false,
        },
        growth_since: None,
        until: None,
        verbose: false,
    }
}

#[test]
fn a_capture_renders_the_live_report_site_for_site() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (cap, live) = capture(dir.path());
    let off: Value = serde_json::from_slice(&render(&cap, options(Format::Json)).unwrap()).unwrap();
    let sites = live["sites"].as_array().unwrap();
    assert!(
        sites.len() > 50,
        "a workload of many sites: {}",
        sites.len()
    );
    assert!(
        sites.iter().any(|s| s["pid"] != live["target"]["pid"]),
        "the forked child's sites"
    );
    for key in [
        "target",
        "processes",
        "totals",
        "counters",
        "dropped",
        "suspects",
        "suspect_bytes",
        "type_census",
    ] {
        assert_eq!(off[key], live[key], "{key} differs offline");
    }
    let off_sites = off["sites"].as_array().unwrap();
    assert_eq!(off_sites.len(), sites.len());
    for (a, b) in sites.iter().zip(off_sites) {
        assert_eq!(a, b, "a site differs offline");
    }
}

/// One damaged copy of the capture: which form is damaged, where it is cut, which bits flip.
#[derive(Debug, Clone)]
struct Damage {
    gzipped: bool,
    cut: Option<f64>,
    flips: Vec<(f64, u8)>,
    format: Format,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        any::<bool>(),
        proptest::option::of(0.0..1.0f64),
        proptest::collection::vec((0.0..1.0f64, 0u8..8), 0..6),
        prop_oneof![
            Just(Format::Json),
            Just(Format::Table),
            Just(Format::Csv),
            Just(Format::Pprof),
        ],
    )
        .prop_map(|(gzipped, cut, flips, format)| Damage {
            gzipped,
            cut,
            flips,
            format,
        })
}

fn apply(d: &Damage, gz: &[u8], text: &[u8]) -> Vec<u8> {
    let mut bytes = if d.gzipped {
        gz.to_vec()
    } else {
        text.to_vec()
    };
    for &(at, bit) in &d.flips {
        let i = ((bytes.len() as f64) * at) as usize;
        if let Some(b) = bytes.get_mut(i) {
            *b ^= 1 << bit;
        }
    }
    if let Some(at) = d.cut {
        bytes.truncate(((bytes.len() as f64) * at) as usize);
    }
    bytes
}

#[test]
fn the_capture_reader_survives_truncation_and_bit_flips() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = capture(dir.path());
    let gz = std::fs::read(&cap).unwrap();
    let mut text = Vec::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut text)
        .unwrap();
    let damaged = dir.path().join("damaged.ltc");
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let (rendered, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let result = runner.run(&damage(), |d| {
        let mut f = std::fs::File::create(&damaged).unwrap();
        f.write_all(&apply(&d, &gz, &text)).unwrap();
        drop(f);
        let started = Instant::now();
        let out = catch_unwind(AssertUnwindSafe(|| render(&damaged, options(d.format))));
        prop_assert!(out.is_ok(), "the reader panicked on {d:?}");
        prop_assert!(
            started.elapsed() < Duration::from_secs(10),
            "{d:?} took {:?}",
            started.elapsed()
        );
        match out.unwrap() {
            Ok(_) => rendered.set(rendered.get() + 1),
            Err(e) => {
                // A plain message naming the file, with a documented exit code.
                prop_assert!(e.to_string().contains("damaged.ltc"), "{e}");
                prop_assert!([1, 2].contains(&e.exit_code()), "{e}");
                refused.set(refused.get() + 1);
            }
        }
        Ok(())
    });
    let (rendered, refused) = (rendered.get(), refused.get());
    eprintln!("damaged captures: {rendered} rendered, {refused} refused");
    result.unwrap();
    // Both paths were taken: damage the reader recovers from, and damage it refuses.
    assert!(
        rendered > 0 && refused > 0,
        "{rendered} rendered, {refused} refused"
    );
}
