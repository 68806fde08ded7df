//! The kernel side of Python stacks: finding the thread's `PyThreadState` and walking its
//! `_PyInterpreterFrame` chain, with the parameters userspace put in `PYPROCS`.

use aya_ebpf::bindings::bpf_pidns_info;
use aya_ebpf::helpers::generated::{bpf_get_ns_current_pid_tgid, bpf_loop};
use leaktrace_ebpf::{py_status, site_id_add_frame, PyFrameRec, PyOffsets, MAX_PY_FRAMES};

use crate::maps::{PYPROCS, PY_MAX_DEPTH, SCRATCH, THREADS};
use crate::py_window::TstateBytes;
use crate::{read_global, read_user_u64};

/// The thread state of thread `tid`: the GIL holder if that is this thread, else the one
/// userspace mapped from the interpreter's thread list. Both are checked against the tid, so a
/// stale pointer is never walked as this thread's. `ts` is left holding the one returned.
#[inline(always)]
fn find_tstate(off: &PyOffsets, tid: u32, ts: &mut TstateBytes) -> Option<u64> {
    // The id the interpreter knows this thread by: the host's, or the container's.
    let own = if off.pidns_ino != 0 {
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: the helper writes `size_of::<bpf_pidns_info>()` bytes into `ns`.
        let rc = unsafe {
            bpf_get_ns_current_pid_tgid(
                off.pidns_dev,
                off.pidns_ino,
                &mut ns,
                core::mem::size_of::<bpf_pidns_info>() as u32,
            )
        };
        if rc != 0 {
            return None;
        }
        ns.pid
    } else {
        tid
    };
    let mut matches = |t: u64| {
        if t == 0 {
            return false;
        }
        ts.load(t);
        ts.field(off.ts_native_thread_id).map(|v| v as u32) == Some(own)
    };
    if off.holder_addr != 0 {
        if let Some(t) = read_user_u64(off.holder_addr) {
            if matches(t) {
                return Some(t);
            }
        }
    }
    // SAFETY: the u64 is copied at once and checked against the tid before use (LRU reuse).
    if let Some(t) = unsafe { THREADS.get(&tid) } {
        let t = *t;
        if matches(t) {
            return Some(t);
        }
    }
    // Not known yet (a thread started since userspace last looked): search the main
    // interpreter's thread list, and remember the answer.
    let head = read_user_u64(off.interp_head_addr)?;
    let first = read_user_u64(head + off.is_threads_head as u64)?;
    let mut search = ThreadSearch {
        tstate: first,
        tid: own,
        native_off: off.ts_native_thread_id,
        next_off: off.ts_next,
        found: 0,
    };
    // SAFETY: `thread_search_step` has bpf_loop's callback signature; `search` outlives the call.
    unsafe {
        bpf_loop(
            MAX_THREAD_SEARCH,
            thread_search_step as *mut core::ffi::c_void,
            &mut search as *mut ThreadSearch as *mut core::ffi::c_void,
            0,
        )
    };
    if search.found == 0 {
        return None;
    }
    let _ = THREADS.insert(&tid, &search.found, 0);
    ts.load(search.found);
    Some(search.found)
}

/// Threads searched at most per lookup.
const MAX_THREAD_SEARCH: u32 = 1024;

#[repr(C)]
struct ThreadSearch {
    tstate: u64,
    tid: u32,
    native_off: u16,
    next_off: u16,
    found: u64,
}

#[inline(never)]
extern "C" fn thread_search_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the ThreadSearch find_tstate passed in.
    let c = unsafe { &mut *(ctx as *mut ThreadSearch) };
    if c.tstate == 0 {
        return 1;
    }
    if read_user_u64(c.tstate + c.native_off as u64).map(|v| v as u32) == Some(c.tid) {
        c.found = c.tstate;
        return 1;
    }
    match read_user_u64(c.tstate + c.next_off as u64) {
        Some(next) => c.tstate = next,
        None => return 1,
    }
    0
}

#[repr(C)]
pub(crate) struct CheckCtx {
    pub(crate) co_check: u16,
    pub(crate) n: u32,
}

/// Reads the check bytes of frame `index`'s code object into the new-site record.
#[inline(never)]
pub(crate) extern "C" fn check_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the CheckCtx record_alloc passed in.
    let c = unsafe { &*(ctx as *const CheckCtx) };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot.
    let scratch = unsafe { &mut *scratch };
    let i = (index as usize) & (MAX_PY_FRAMES - 1);
    let f = &mut scratch.ev.py_frames[i];
    f.check = read_user_u64(f.code + c.co_check as u64).unwrap_or(0);
    0
}

/// State of one frame walk, shared with the `bpf_loop` callback (which keeps the verifier's
/// work independent of the depth: a plain loop of 2 × 128 iterations is too much for it). It
/// lives in the per-CPU scratch map, not on the stack: the verifier tracks stack values exactly
/// and would check the callback once per iteration, map values it treats as data.
#[repr(C)]
pub(crate) struct WalkCtx {
    off: PyOffsets,
    frame: u64,
    h: u64,
    n: u32,
    max: u32,
    status: u8,
    truncated: u8,
}

/// One step of the walk: record the current frame unless it is an interpreter-internal one,
/// and move to the previous. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot.
    let scratch = unsafe { &mut *scratch };
    let c = &mut scratch.walk;
    if c.frame == 0 {
        return 1;
    }
    if c.n >= c.max {
        c.truncated = 1;
        return 1;
    }
    let Some(o) = scratch.pywin.frame_at(c.frame) else {
        c.status = py_status::READ_ERROR;
        return 1;
    };
    let win = &scratch.pywin;
    let code = win.u64_at(o, c.off.fr_code) & c.off.code_mask;
    let owner = win.byte_at(o, c.off.fr_owner);
    let previous = win.u64_at(o, c.off.fr_previous);
    if code != 0 && owner < c.off.owner_skip_min {
        let rec = PyFrameRec {
            code,
            instr: win.u64_at(o, c.off.fr_instr),
            check: 0,
        };
        c.h = site_id_add_frame(c.h, &rec);
        let i = (c.n as usize) & (MAX_PY_FRAMES - 1);
        scratch.ev.py_frames[i] = rec;
        if c.off.fr_is_entry != u16::MAX && win.byte_at(o, c.off.fr_is_entry) != 0 {
            mark_entry(&mut scratch.ev.py_entry, i);
        }
        c.n += 1;
    } else if owner >= c.off.owner_skip_min && c.n > 0 {
        // The shim below an eval-loop run: the frame recorded last was that run's first.
        mark_entry(
            &mut scratch.ev.py_entry,
            ((c.n - 1) as usize) & (MAX_PY_FRAMES - 1),
        );
    }
    c.frame = previous;
    0
}

#[inline(always)]
fn mark_entry(bits: &mut [u64; MAX_PY_FRAMES / 64], i: usize) {
    bits[(i / 64) & 1] |= 1 << (i % 64);
}

/// Walks this thread's Python frames into `scratch.ev`, folding each into the site hash `h`.
#[inline(always)]
pub(crate) fn python_stack(tgid: u32, tid: u32, h: u64) -> u64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return h;
    };
    // SAFETY: this CPU's scratch slot, reached through the raw pointer only: the walk's
    // callback writes it too.
    unsafe {
        (*s).ev.py_depth = 0;
        (*s).ev.py_truncated = 0;
        (*s).ev.py_entry = [0; MAX_PY_FRAMES / 64];
    }
    // SAFETY: as above: `s` is this CPU's scratch slot, written through the raw pointer only.
    let status = move |v: u8| unsafe { (*s).ev.py_status = v };
    // SAFETY: plain integers set by userspace; each use is bounds-masked or a checked user read.
    let Some(off) = (unsafe { PYPROCS.get(&tgid) }) else {
        status(py_status::NOT_PYTHON);
        return h;
    };
    // SAFETY: as above: this CPU's slot, through the raw pointer; nothing else holds it now.
    let ts = unsafe { &mut (*s).tstate };
    if find_tstate(off, tid, ts).is_none() {
        status(py_status::NO_THREAD_STATE);
        return h;
    }
    let first = if off.ts_cframe != u16::MAX {
        ts.field(off.ts_cframe)
            .and_then(|cf| read_user_u64(cf + off.frame_ptr as u64))
    } else {
        ts.field(off.frame_ptr)
    };
    let Some(frame) = first else {
        status(py_status::READ_ERROR);
        return h;
    };
    // SAFETY: as above.
    unsafe { (*s).pywin.reset() };
    let walk = WalkCtx {
        off: *off,
        frame,
        h,
        n: 0,
        max: core::cmp::min(read_global(&PY_MAX_DEPTH), MAX_PY_FRAMES as u32),
        status: py_status::OK,
        truncated: 0,
    };
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*s).walk, walk) };
    // Shim and entry frames are skipped but still take a step: allow twice the frames kept.
    // SAFETY: `walk_step` has bpf_loop's callback signature and takes no context pointer.
    unsafe {
        bpf_loop(
            2 * MAX_PY_FRAMES as u32,
            walk_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: as above; read back what the callback left.
    let mut c = unsafe { core::ptr::read_volatile(&raw const (*s).walk) };
    if c.frame != 0 && c.status == py_status::OK {
        c.truncated = 1;
    }
    // SAFETY: as above: this CPU's slot, through the raw pointer; the callback has returned.
    unsafe {
        (*s).ev.py_status = c.status;
        (*s).ev.py_truncated = c.truncated;
        (*s).ev.py_depth = c.n;
    }
    c.h
}
