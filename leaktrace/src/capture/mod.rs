//! Capture files: a trace recorded as it goes, to render later, elsewhere, in any format.
//!
//! A capture is gzipped JSON Lines, one record per line, appended and sync-flushed every
//! interval, so a crash of the target or of leaktrace loses at most the last interval (`zcat`
//! reads what was flushed of a cut file). Frames are named while
//! the process lives and written once; sites refer to them. docs/capture-format.md documents
//! every record.

pub mod reader;
pub mod render;
mod roundtrip;
pub mod writer;

use serde::{Deserialize, Serialize};

use crate::options::{ModeKind, TraceMode};
use crate::report::ReportMeta;
use crate::stacks::native::UnwindEnd;
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::Frame;

/// The `format` field of the header: what makes a file a capture.
pub const FORMAT: &str = "leaktrace-capture";
/// Version of the record layout; readers refuse newer ones.
pub const VERSION: u32 = 1;
/// Live blocks per `live` record.
pub const LIVE_CHUNK: usize = 8192;

/// One line of a capture: `{"kind": {fields}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// The first line: what is traced, and how.
    Header(Header),
    /// A native frame of process `pid` (its return address in `f`), named; written again with
    /// the same id when its module is mapped after it was first seen.
    Frame {
        id: u32,
        pid: u32,
        /// The interpreter's eval loop: where Python frames go.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        eval: bool,
        f: Frame,
    },
    /// A node of the native call tree: `frame` called from node `parent` (0: the root).
    /// Sites name their innermost node; stacks share their common outer frames.
    Node { id: u32, parent: u32, frame: u32 },
    /// A Python frame, numbered for Python call-tree nodes to refer to.
    Py { id: u32, f: PyFrame },
    /// A node of the Python call tree: `py` called from `parent` (0: the root); `entry`: the
    /// frame began a run of the eval loop.
    PyNode {
        id: u32,
        parent: u32,
        py: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        entry: bool,
    },
    /// An allocation site, written once it holds memory (again when its stack becomes more
    /// complete).
    Site(SiteRecord),
    /// One interval: the process-wide point, and the counters of sites that changed.
    Tick(Tick),
    /// At the end: counters that changed since they were last written (no point of the series).
    Counts { sites: Vec<SiteCounts> },
    /// Live blocks at the end of the trace: `[pid, address, size, site id, allocated at (ns,
    /// kernel monotonic clock)]`.
    Live { blocks: Vec<[u64; 5]> },
    /// The last line of a capture that ended normally: how tracing ended, counters, censuses.
    End(Box<ReportMeta>),
}

/// The first line of a capture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// The leaktrace that wrote it.
    pub leaktrace: String,
    /// When tracing began (seconds since the Unix epoch).
    pub started_unix_s: f64,
    pub pid: u32,
    pub command: String,
    pub mode: ModeKind,
    pub sample_rate: Option<u64>,
    pub interval_s: f64,
    /// The interpreter's module, where Python frames go in native stacks.
    pub interpreter: Option<String>,
}

impl Header {
    /// The header of a capture of process `pid` starting now.
    pub fn new(
        pid: u32,
        command: &str,
        mode: TraceMode,
        interval: std::time::Duration,
        interpreter: Option<String>,
    ) -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            leaktrace: env!("CARGO_PKG_VERSION").into(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            pid,
            command: command.into(),
            mode: mode.kind(),
            sample_rate: mode.sample_rate(),
            interval_s: interval.as_secs_f64(),
            interpreter,
        }
    }
}

/// An allocation site as recorded: its stacks by their innermost call-tree nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteRecord {
    pub id: u64,
    pub pid: u32,
    /// The allocator (`leaktrace_ebpf::AllocFn` as a number).
    pub func: u8,
    /// The innermost native node (the allocator's caller).
    pub native: u32,
    pub end: UnwindEnd,
    /// The innermost Python node (0: no Python stack).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub python: u32,
    pub status: Option<u8>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Counters of one site in a tick: `[site id, live bytes, live count, allocations, bytes
/// allocated, frees, frees of blocks older than 5 s]`.
pub type SiteCounts = [u64; 7];

/// One interval.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since tracing began.
    pub t: f64,
    pub rss: Option<u64>,
    /// pymalloc's arenas, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arenas: Option<u64>,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub drops: u64,
    /// Sites whose counters changed since the previous tick.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteCounts>,
}
