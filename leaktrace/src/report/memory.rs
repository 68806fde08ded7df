//! The target's memory over the trace: RSS and the live traced heap at its start and at the
//! point where the figures freeze, and whether they disagree.

use serde::Serialize;

use super::{human_bytes, ReportMeta};
use crate::heap::{Heap, Sample};

/// RSS and the live traced heap over the trace, and whether they disagree.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeapVsRss {
    pub rss_first: Option<u64>,
    pub rss_last: Option<u64>,
    pub live_first: u64,
    pub live_last: u64,
    /// pymalloc's arenas (Python ≤ 3.11, where their count is a static leaktrace can read).
    pub arenas_first: Option<u64>,
    pub arenas_last: Option<u64>,
    /// Said when RSS grew well beyond the live bytes: the usual false "leak".
    pub note: Option<String>,
}

impl HeapVsRss {
    /// Compares the first and last points of the series.
    pub fn of(series: &[Sample]) -> Self {
        // The last point may come after the process died (no RSS): compare points that have it.
        let with_rss = || series.iter().filter(|s| s.rss_bytes.is_some());
        let (Some(first), Some(last)) = (with_rss().next(), with_rss().next_back()) else {
            return Self::default();
        };
        let mut h = HeapVsRss {
            rss_first: first.rss_bytes,
            rss_last: last.rss_bytes,
            live_first: first.live_bytes,
            live_last: last.live_bytes,
            arenas_first: first.arena_bytes,
            arenas_last: last.arena_bytes,
            note: None,
        };
        if let (Some(a), Some(b)) = (first.rss_bytes, last.rss_bytes) {
            let d_rss = b as i64 - a as i64;
            let d_live = (last.live_bytes as i64 - first.live_bytes as i64).max(0);
            // Allocator metadata and interpreter state make RSS grow a little faster than the
            // heap; a gap of half again plus 4 MiB is something else.
            if d_rss > 4 << 20 && d_rss > d_live + d_live / 2 + (4 << 20) {
                let arenas = match (first.arena_bytes, last.arena_bytes) {
                    (Some(a), Some(b)) if b > a => format!(
                        "; pymalloc's arenas grew {} (to {}): freed Python objects whose \
                         arenas a few live ones keep from being released",
                        human_bytes(b - a),
                        human_bytes(b)
                    ),
                    _ => String::new(),
                };
                h.note = Some(format!(
                    "RSS grew {} while live traced memory grew {}: the difference is not held by \
                     any stack — heap fragmentation (freed blocks the allocator cannot give \
                     back), pymalloc arenas kept by a few live objects, allocator caches, or \
                     memory not allocated through malloc or the Python allocator (mmap){arenas}",
                    human_bytes(d_rss as u64),
                    human_bytes(d_live as u64)
                ));
            }
        }
        h
    }
}

/// What was read of the target's memory when its interpreter began shutting down.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct AtFinalize {
    pub rss_bytes: Option<u64>,
    pub arena_bytes: Option<u64>,
}

/// The series up to the interpreter's shutdown, if it began, ending with the point at shutdown
/// when its memory was read then (a run shorter than one interval has no other point there).
pub(super) fn series_before_shutdown(heap: &Heap, meta: &ReportMeta) -> Vec<Sample> {
    // Shutdown teardown frees what the figures freeze at shutdown: RSS after it says nothing.
    let mut before: Vec<Sample> = heap
        .series()
        .iter()
        .filter(|p| meta.finalized_at.is_none_or(|t| p.t <= t))
        .copied()
        .collect();
    // The live figures froze at shutdown, so the last point's are those of that moment.
    if let (Some(t), Some(end), Some(last)) =
        (meta.finalized_at, meta.at_finalize, heap.series().last())
    {
        before.push(Sample {
            t,
            rss_bytes: end.rss_bytes,
            arena_bytes: end.arena_bytes,
            ..*last
        });
    }
    before
}
