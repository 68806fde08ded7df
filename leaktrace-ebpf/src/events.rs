//! The ring-buffer records (`EVENTS`) other than the stack copy (`native`): each starts with
//! its `EVENT_*` kind, so userspace can tell them apart before it reads the rest.

use crate::{PyFrameRec, MAX_NATIVE_WALK, MAX_PY_FRAMES};

/// Ring-buffer record kinds (the first `u32` of every record): a new site.
pub const EVENT_NEW_SITE: u32 = 1;
/// The interpreter of a traced process began shutting down (`Py_FinalizeEx`).
pub const EVENT_FINALIZE: u32 = 2;
/// The interpreter of a traced process finished starting up (the `site` import and `.pth`
/// files included) and is about to run the main module, `-c` or `-m` (`Py_RunMain`).
pub const EVENT_MAIN: u32 = 6;

/// A traced process forked a child, which is stopped until its probes are attached
/// (`--follow-forks`).
pub const EVENT_FORK: u32 = 4;

/// A followed child exec'd another program (`--follow-forks`); it is no longer traced.
pub const EVENT_EXEC: u32 = 5;

/// Ring-buffer record sent when a traced process forks a child that leaktrace follows
/// (`EVENT_FORK`, parent and child), or when a followed child execs (`EVENT_EXEC`, child only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkEvent {
    pub kind: u32,
    pub parent: u32,
    pub child: u32,
    pub _pad: u32,
}

/// Ring-buffer record sent at an interpreter's lifecycle points (`EVENT_MAIN`,
/// `EVENT_FINALIZE`): the type census's baseline is taken when the main module starts, and from
/// finalization on allocations and frees are no longer counted, so the report shows what the
/// program still held when it finished, before the interpreter's teardown freed module globals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LifecycleEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
}

/// Ring-buffer record sent once per new site, so userspace decodes and symbolizes it while the
/// process lives.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NewSiteEvent {
    pub kind: u32,
    pub tgid: u32,
    pub site_id: u64,
    pub ts_ns: u64,
    pub func: u8,
    /// One of `py_status`.
    pub py_status: u8,
    /// The walk stopped at the depth limit: outer frames are missing.
    pub py_truncated: u8,
    pub _pad: u8,
    /// Thread that first allocated from this site.
    pub tid: u32,
    /// The native return addresses the kernel walked, innermost (the caller) first: the ones
    /// folded into the site id, then, for a new site, as many more as it had rows for.
    pub native: [u64; MAX_NATIVE_WALK],
    /// Number of valid entries in `native`.
    pub native_depth: u32,
    /// How the walk ended (`native_end`).
    pub native_end: u8,
    /// 1 when the walk stopped at an untaught return address before the site id was complete:
    /// the id then stands for every call path through the frames walked (until their rows are
    /// learned), and a stack copy shows only one of them.
    pub id_cut: u8,
    pub _pad3: [u8; 2],
    /// Number of valid entries in `py_frames`, innermost first.
    pub py_depth: u32,
    /// Bit i set: `py_frames[i]` is the outermost frame of one run of the eval loop (an entry
    /// frame), so the next frame out belongs to an eval loop further down the native stack.
    pub py_entry: [u64; MAX_PY_FRAMES / 64],
    pub py_frames: [PyFrameRec; MAX_PY_FRAMES],
}

impl Default for NewSiteEvent {
    fn default() -> Self {
        Self {
            kind: 0,
            tgid: 0,
            site_id: 0,
            ts_ns: 0,
            func: 0,
            py_status: 0,
            py_truncated: 0,
            _pad: 0,
            tid: 0,
            native: [0; MAX_NATIVE_WALK],
            native_depth: 0,
            native_end: 0,
            id_cut: 0,
            _pad3: [0; 2],
            py_depth: 0,
            py_entry: [0; MAX_PY_FRAMES / 64],
            py_frames: [PyFrameRec::default(); MAX_PY_FRAMES],
        }
    }
}
