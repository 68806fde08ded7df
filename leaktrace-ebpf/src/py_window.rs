//! The Python walk's reads, batched: a thread state read whole, and frames read through a window
//! of the thread's data stack.
//!
//! Each `bpf_probe_read_user` pays a fixed cost far above its copy (on this project's machines
//! about 100 ns: the nofault copy's checks and its speculation barrier). Measured on cbor2's
//! leak (docs/native-stacks.md, "What a walk costs"), the Python half of a site walk was 40 % of
//! `alloc_exit`'s time for two reads of the thread state, two to reach the first frame, and one
//! per frame. Since 3.11 the interpreter pushes frames on a per-thread data stack, a caller's
//! frame just below its callee's, so one read ending at the innermost frame holds its callers
//! too; and every `PyThreadState` field the walk needs lies in the struct's first 256 bytes.
//! The bytes are the ones separate reads would have returned (the thread is stopped in the
//! probe), so the walk, the site ids and the stacks are unchanged.

use leaktrace_ebpf::PY_FRAME_READ;

use crate::read_user_u64;

/// Bytes of data stack read at once, at most (never across the page below a frame's own).
pub(crate) const PY_WINDOW: usize = 2048;

/// Bytes of a `PyThreadState` read at once: `native_thread_id`, `cframe` and `current_frame`
/// all lie below 0xc0 in 3.11 to 3.15 (3.15 moved `native_thread_id` to 0xb8), and the struct is
/// larger than this in every version.
pub(crate) const TS_READ: usize = 256;

const PAGE: u64 = 4096;

/// A thread state's first `TS_READ` bytes, as one read found them.
#[repr(C)]
pub struct TstateBytes {
    addr: u64,
    ok: u64,
    buf: [u8; TS_READ],
}

impl TstateBytes {
    /// Reads the thread state at `tstate`; a failed read leaves the fields to be read one by one.
    #[inline(always)]
    pub(crate) fn load(&mut self, tstate: u64) {
        self.addr = tstate;
        // SAFETY: a checked user read of exactly the buffer's length; a fault is an error.
        let read = unsafe {
            aya_ebpf::helpers::bpf_probe_read_user_buf(tstate as *const u8, &mut self.buf)
        };
        self.ok = read.is_ok() as u64;
    }

    /// The u64 at offset `off` of the thread state loaded last: from the bytes read, or read
    /// alone when they do not hold it.
    #[inline(always)]
    pub(crate) fn field(&self, off: u16) -> Option<u64> {
        let o = off as usize;
        if self.ok == 0 || o > TS_READ - 8 {
            return read_user_u64(self.addr + off as u64);
        }
        // SAFETY: `o + 8 <= TS_READ`, checked above.
        Some(unsafe { core::ptr::read_unaligned(self.buf.as_ptr().add(o) as *const u64) })
    }
}

/// The part of a thread's data stack the frame walk has read: `len` bytes from `base`.
#[repr(C)]
pub struct PyWindow {
    base: u64,
    len: u64,
    buf: [u8; PY_WINDOW],
}

impl PyWindow {
    /// Forgets what was read (a new walk: the stack has changed since).
    #[inline(always)]
    pub(crate) fn reset(&mut self) {
        self.len = 0;
    }

    /// Where the `PY_FRAME_READ` bytes at `addr` start in the window, reading it first when it
    /// does not hold them: up to `PY_WINDOW` bytes ending with them, no lower than the start of
    /// `addr`'s page (a data-stack chunk's first page may have nothing mapped below it).
    #[inline(always)]
    pub(crate) fn frame_at(&mut self, addr: u64) -> Option<usize> {
        if let Some(o) = self.holds(addr) {
            return Some(o);
        }
        let top = addr.checked_add(PY_FRAME_READ as u64)?;
        let base = core::cmp::max(top.saturating_sub(PY_WINDOW as u64), addr & !(PAGE - 1));
        let len = (top - base) as usize;
        self.len = 0;
        if !(PY_FRAME_READ..=PY_WINDOW).contains(&len) {
            return None;
        }
        // SAFETY: `len <= PY_WINDOW` bytes into the buffer, checked above; a fault is an error.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                self.buf.as_mut_ptr() as *mut core::ffi::c_void,
                len as u32,
                base as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            return None;
        }
        self.base = base;
        self.len = len as u64;
        self.holds(addr)
    }

    #[inline(always)]
    fn holds(&self, addr: u64) -> Option<usize> {
        let off = addr.wrapping_sub(self.base);
        let need = PY_FRAME_READ as u64;
        if self.len < need || off > self.len - need {
            return None;
        }
        let o = off as usize;
        (o <= PY_WINDOW - PY_FRAME_READ).then_some(o)
    }

    /// The u64 at offset `field` of the frame at window offset `o` (0 outside the frame's
    /// `PY_FRAME_READ` bytes).
    #[inline(always)]
    pub(crate) fn u64_at(&self, o: usize, field: u16) -> u64 {
        let f = (field as usize) & 0x7f;
        if f > PY_FRAME_READ - 8 {
            return 0;
        }
        let i = o + f;
        if i > PY_WINDOW - 8 {
            return 0;
        }
        // SAFETY: `i + 8 <= PY_WINDOW`, checked above.
        unsafe { core::ptr::read_unaligned(self.buf.as_ptr().add(i) as *const u64) }
    }

    /// The byte at offset `field` of the frame at window offset `o` (0 outside the frame).
    #[inline(always)]
    pub(crate) fn byte_at(&self, o: usize, field: u16) -> u8 {
        let f = (field as usize) & 0x7f;
        if f >= PY_FRAME_READ {
            return 0;
        }
        let i = o + f;
        if i >= PY_WINDOW {
            return 0;
        }
        self.buf[i]
    }
}
