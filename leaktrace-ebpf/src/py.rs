//! The Python part of the ABI: how the kernel is told to walk an interpreter's frames, and what
//! it records of each frame.

/// Most Python frames a site records (`--python-depth` may ask for fewer).
pub const MAX_PY_FRAMES: usize = 128;

/// Bytes of a `_PyInterpreterFrame` read in one go: every field the walk needs lies within them
/// on 3.11–3.15 (x86_64).
pub const PY_FRAME_READ: usize = 80;

/// How a site's Python stack was obtained (`NewSiteEvent::py_status`).
pub mod py_status {
    /// The process is not Python, or its interpreter is not set up for walking (yet).
    pub const NOT_PYTHON: u8 = 0;
    /// Frames were walked (possibly zero: native code outside any Python call).
    pub const OK: u8 = 1;
    /// No thread state for this thread: it runs no Python code, or released the GIL while
    /// another thread holds it and leaktrace has not mapped it yet.
    pub const NO_THREAD_STATE: u8 = 2;
    /// Reading the interpreter's memory failed mid-walk.
    pub const READ_ERROR: u8 = 3;
    /// The site map was full: the allocation is counted under its native caller alone.
    pub const OVERFLOW: u8 = 4;
}

/// One Python frame as the kernel records it; userspace decodes the code object and line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrameRec {
    /// Address of the code object (`f_code` / `f_executable`, tag bits masked).
    pub code: u64,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13+): the instruction being executed.
    pub instr: u64,
    /// The code object's `co_linetable` pointer (fixed for its life, different for every code
    /// object), read when the site is announced, while the code object surely exists:
    /// userspace decodes the frame only if the object at that address still holds it (its
    /// memory may since have been reused). Not part of the site id.
    pub check: u64,
}

/// Where to find the interpreter's state in one process, for the BPF frame walk (`PYPROCS`,
/// keyed by tgid). Userspace fills it from built-in tables (3.11, 3.12) or from the target's
/// `_Py_DebugOffsets` (3.13+); `u16::MAX` marks a field a version does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// Absolute address of a pointer to the thread state that holds the GIL
    /// (3.11: `_PyRuntime.gilstate.tstate_current`; 3.12+: the main interpreter's
    /// `_gil.last_holder`). 0 when unknown.
    pub holder_addr: u64,
    /// Tag bits to clear from the frame's code pointer (3.14's `_PyStackRef`).
    pub code_mask: u64,
    /// `PyThreadState.native_thread_id`.
    pub ts_native_thread_id: u16,
    /// `PyThreadState.cframe` (3.11, 3.12), or `u16::MAX`.
    pub ts_cframe: u16,
    /// `_PyCFrame.current_frame` (with `ts_cframe`), or `PyThreadState.current_frame` (3.13+).
    pub frame_ptr: u16,
    /// `_PyInterpreterFrame.f_code` / `f_executable`.
    pub fr_code: u16,
    /// `_PyInterpreterFrame.previous`.
    pub fr_previous: u16,
    /// `_PyInterpreterFrame.prev_instr` / `instr_ptr`.
    pub fr_instr: u16,
    /// `_PyInterpreterFrame.owner`.
    pub fr_owner: u16,
    /// Frames whose owner is at least this are interpreter-internal (C-stack shim or entry
    /// frames on 3.12+) and skipped; 255 on 3.11, which has no such frames.
    pub owner_skip_min: u8,
    pub _pad: u8,
    /// `PyInterpreterState.threads.head`.
    pub is_threads_head: u16,
    /// `PyThreadState.next`.
    pub ts_next: u16,
    /// Absolute address of `_PyRuntime.interpreters.head`: where the kernel starts its own
    /// search of the thread list for a thread it has not seen.
    pub interp_head_addr: u64,
    /// `PyCodeObject.co_linetable`: where a frame's `check` is read.
    pub co_check: u16,
    /// `_PyInterpreterFrame.is_entry` (3.11), or `u16::MAX`: later versions mark the end of an
    /// eval-loop run with a skipped shim frame instead.
    pub fr_is_entry: u16,
    pub _pad2: [u8; 4],
    /// The target's PID namespace (`st_dev` and inode of `/proc/PID/ns/pid`) when it is not
    /// leaktrace's own, else 0: `PyThreadState.native_thread_id` holds the thread's id in that
    /// namespace (a container's), which the kernel must compare against, not the host's.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}
