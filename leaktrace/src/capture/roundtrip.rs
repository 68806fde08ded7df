//! Capture round trips without root or a kernel: a heap model built by hand is written, read
//! back and reported; the same file cut anywhere or with a flipped byte reads as a capture or
//! fails cleanly.

#![cfg(test)]

use std::path::Path;

use leaktrace_ebpf::{AllocFn, Counter, SiteStats, NUM_COUNTERS};

use super::reader::Capture;
use super::writer::CaptureWriter;
use super::Header;
use crate::heap::Heap;
use crate::options::TraceMode;
use crate::probes::tables::Counters;
use crate::report::{Report, ReportMeta, ReportOptions};
use crate::stacks::native::{NativeStack, UnwindEnd};
use crate::stacks::symbolize::Symbolizer;

/// A pid no process has (above pid_max): frames stay unsymbolized, the same way on both sides.
const PID: u32 = 4_194_301;

const OPTS: ReportOptions = ReportOptions {
    top: 1000,
    min_size: 0,
    all_native_frames: false,
};

/// Three sites over five ticks: one grows every tick, one is flat, one is freed.
fn trace(path: &Path) -> (Report, Vec<u8>) {
    let mut heap = Heap::default();
    let mut sym = Symbolizer::new();
    let header = Header::new(
        PID,
        "python3 app.py",
        TraceMode::Exact,
        std::time::Duration::from_secs(1),
        Some("3.11.7".into()),
    );
    let mut w = CaptureWriter::create(path, header).unwrap();
    let sites: [(u64, AllocFn, &[u64]); 3] = [
        (11, AllocFn::Malloc, &[0x1010, 0x2020, 0x3030]),
        (22, AllocFn::Calloc, &[0x1110, 0x2020, 0x3030]),
        (33, AllocFn::Realloc, &[0x1210, 0x2120]),
    ];
    for (id, func, pcs) in sites {
        heap.announce(id, PID, func, pcs[0], None);
        let stack = NativeStack {
            pcs: pcs.to_vec(),
            eval: vec![false; pcs.len()],
            end: UnwindEnd::Complete,
        };
        heap.set_native(&mut sym, id, &stack);
    }
    let mut counters = Counters([0; NUM_COUNTERS as usize]);
    for tick in 1..=5u64 {
        let stats = |id: u64, func: AllocFn, live: u64, allocs: u64, frees: u64| SiteStats {
            live_bytes: live * 4096,
            live_count: live,
            allocs,
            alloc_bytes: allocs * 4096,
            frees,
            tgid: PID,
            func: func as u8,
            caller: id,
            ..SiteStats::default()
        };
        heap.update(
            &mut sym,
            vec![
                (11, stats(11, AllocFn::Malloc, 10 * tick, 10 * tick, 0)),
                (22, stats(22, AllocFn::Calloc, 7, 7 + tick, tick)),
                (33, stats(33, AllocFn::Realloc, 5 - tick, 5, tick)),
            ],
        );
        counters.0[Counter::Allocs as usize] = 22 + 11 * tick;
        counters.0[Counter::Frees as usize] = 2 * tick;
        let point = heap.sample(tick as f64, &counters, Some(1 << 24), None);
        w.tick(&heap, &mut sym, &point);
    }
    let mut meta = ReportMeta {
        duration_s: 5.0,
        counters: counters.named(),
        ..ReportMeta::default()
    };
    meta.target.pid = PID;
    meta.target.command = "python3 app.py".into();
    let live: Vec<[u64; 5]> = (0..3)
        .map(|i| [u64::from(PID), 0x5000 + i, 4096, 11, i])
        .collect();
    w.finish(&heap, &meta, &live).unwrap();
    let report = Report::build(&heap, &mut sym, meta, OPTS);
    (report, std::fs::read(path).unwrap())
}

#[test]
fn a_capture_reports_what_the_trace_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.ltc");
    let (live, _) = trace(&path);
    let mut cap = Capture::read(&path, None).unwrap();
    let offline = cap.report(OPTS);
    assert_eq!(
        serde_json::to_value(live.totals).unwrap(),
        serde_json::to_value(offline.totals).unwrap()
    );
    // The realloc site freed everything by the end: not a row.
    assert_eq!(live.sites.len(), 2);
    let rows = |r: &Report| -> Vec<(u64, u64, u64, u64)> {
        r.sites
            .iter()
            .map(|s| (s.unfreed_bytes, s.unfreed_count, s.allocs, s.frees))
            .collect()
    };
    assert_eq!(rows(&live), rows(&offline));
    assert_eq!(
        offline.sites[0].unfreed_bytes,
        50 * 4096,
        "the growing site first"
    );
    assert_eq!(
        live.sites[0].analysis.class, offline.sites[0].analysis.class,
        "the same verdict from the same series"
    );
    assert_eq!(cap.live.len(), 3);
}

#[test]
fn a_damaged_capture_reads_or_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.ltc");
    let (_, gz) = trace(&path);
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&gz[..]), &mut text).unwrap();
    let damaged = dir.path().join("d.ltc");
    let mut read = 0;
    for bytes in [&gz, &text] {
        let n = bytes.len();
        // Every cut at 64 points, and a flipped bit at 64 others.
        for i in 0..64 {
            let mut cut = bytes.to_vec();
            cut.truncate(n * i / 64);
            let mut flipped = bytes.to_vec();
            flipped[(n * i / 64 + 7) % n] ^= 1 << (i % 8);
            for b in [cut, flipped] {
                std::fs::write(&damaged, &b).unwrap();
                if let Ok(mut c) = Capture::read(&damaged, None) {
                    c.report(OPTS);
                    read += 1;
                }
            }
        }
    }
    assert!(read > 0, "some damage (a torn tail) is recovered from");
}
