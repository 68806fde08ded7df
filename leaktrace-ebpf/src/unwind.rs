//! The kernel side of native stacks: following a call path with the unwind rows userspace
//! taught (`UNWIND`) into the site id, walking a new site's stack on as far as rows are known,
//! and sending a stack copy when they are not.

use aya_ebpf::helpers::generated::{bpf_get_smp_processor_id, bpf_loop};
use leaktrace_ebpf::{
    native_end, site_id_add_pc, unwind_flags, FrameRegs, StackEvent, UnwindKey, EVENT_STACK,
    MAX_NATIVE_FRAMES, MAX_NATIVE_WALK, MAX_STACK_COPY, STACK_EVENT_HEADER,
};

use crate::maps::{
    BPF_RB_AVAIL_DATA, EVENTS, NATIVE_DEPTH, RING_BYTES, RING_RESERVE, SCRATCH, STACKBUF,
    STACK_COPY, UNWIND,
};
use crate::{read_global, read_user_u64};

/// Stack copies are read a page at a time, so one ends where the stack's mapping does instead
/// of failing whole.
const PAGE: usize = 4096;

/// Bytes of user stack the native walk reads at once. Each `bpf_probe_read_user` pays a fixed
/// cost (the nofault copy's checks) far above copying 8 bytes; a walk from an allocator's
/// caller to the eval loop reads two words per frame over a few hundred bytes of stack, so one
/// read of a window serves most frames (measured in docs/native-stacks.md).
const WINDOW: usize = 1024;

/// The part of the user stack the walk has read: `len` bytes from `base` (0 until read).
#[repr(C)]
pub struct StackWindow {
    base: u64,
    len: u64,
    buf: [u8; WINDOW],
}

impl StackWindow {
    /// The u64 at `addr`: from the window when it holds all 8 bytes, else read again from
    /// `addr` on (a window, or the part of one up to the page end, which is where a stack's
    /// mapping can end), else read alone. Returns what a direct read would, one read fewer.
    #[inline(always)]
    fn read(&mut self, addr: u64) -> Option<u64> {
        if let Some(v) = self.cached(addr) {
            return Some(v);
        }
        self.fill(addr);
        self.cached(addr).or_else(|| read_user_u64(addr))
    }

    #[inline(always)]
    fn cached(&self, addr: u64) -> Option<u64> {
        let off = addr.wrapping_sub(self.base);
        if self.len < 8 || off > self.len - 8 {
            return None;
        }
        let o = off as usize;
        if o > WINDOW - 8 {
            return None;
        }
        // SAFETY: `o + 8 <= WINDOW`, checked above, so the read stays inside `buf`.
        Some(unsafe { core::ptr::read_unaligned(self.buf.as_ptr().add(o) as *const u64) })
    }

    #[inline(always)]
    fn fill(&mut self, addr: u64) {
        self.base = addr;
        self.len = 0;
        // SAFETY: a checked user read of exactly the buffer's length; a fault is an error.
        if unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf(addr as *const u8, &mut self.buf) }
            .is_ok()
        {
            self.len = WINDOW as u64;
            return;
        }
        let to_page_end = PAGE - (addr as usize & (PAGE - 1));
        if !(8..WINDOW).contains(&to_page_end) {
            return;
        }
        // SAFETY: `to_page_end < WINDOW` bytes into the buffer, checked above; a fault is an
        // error.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                self.buf.as_mut_ptr() as *mut core::ffi::c_void,
                to_page_end as u32,
                addr as *const core::ffi::c_void,
            )
        };
        if rc == 0 {
            self.len = to_page_end as u64;
        }
    }
}

/// State of the kernel's native walk, shared with its `bpf_loop` callback through the scratch
/// map (see `WalkCtx` for why not the stack).
#[repr(C)]
pub struct NativeWalk {
    regs: FrameRegs,
    h: u64,
    tgid: u32,
    pub(crate) n: u32,
    /// Frames folded into the site id at most.
    pub(crate) hash_max: u32,
    /// Still folding frames into the site id.
    hashing: u8,
    /// The id is complete and the walk can go on (for a new site's record).
    pub(crate) paused: u8,
    /// `native_end`, once the walk ended.
    pub(crate) end: u8,
    _pad: u8,
}

/// One native frame: record the return address (folding it into the site id while `hashing`),
/// then move to the caller if userspace has taught the kernel this address's row. Returns 1 to
/// stop.
#[inline(never)]
extern "C" fn native_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot.
    let scratch = unsafe { &mut *scratch };
    let c = &mut scratch.native;
    let end = |c: &mut NativeWalk, e: u8| {
        c.end = e;
        1
    };
    if c.n as usize >= MAX_NATIVE_WALK {
        return end(c, native_end::LIMIT);
    }
    if c.regs.pc == 0 {
        return end(c, native_end::COMPLETE);
    }
    if c.hashing != 0 {
        c.h = site_id_add_pc(c.h, c.regs.pc);
    }
    scratch.ev.native[(c.n as usize) & (MAX_NATIVE_WALK - 1)] = c.regs.pc;
    c.n += 1;
    let key = UnwindKey {
        tgid: c.tgid,
        _pad: 0,
        pc: c.regs.pc,
    };
    // SAFETY: plain integers; an LRU slot reused concurrently only misleads the checked walk.
    let Some(row) = (unsafe { UNWIND.get(&key) }) else {
        return end(c, native_end::UNKNOWN);
    };
    if row.flags & unwind_flags::OUTERMOST != 0 {
        return end(c, native_end::COMPLETE);
    }
    if row.flags & unwind_flags::END != 0 {
        return end(c, native_end::UNSUPPORTED);
    }
    let pause = c.hashing != 0 && (row.flags & unwind_flags::STOP != 0 || c.n >= c.hash_max);
    let window = &mut scratch.window;
    match row.step(c.regs, |a| window.read(a)) {
        Some(up) => c.regs = up,
        None => return end(c, native_end::READ_ERROR),
    }
    if pause {
        // The id is complete: the Python frames identify the path from the eval loop out.
        c.hashing = 0;
        c.paused = 1;
        return 1;
    }
    0
}

/// Runs the native walk from where it stands, through the scratch map.
#[inline(always)]
fn native_walk_run() -> Option<NativeWalk> {
    // SAFETY: `native_step` has bpf_loop's callback signature and takes no context pointer.
    unsafe {
        bpf_loop(
            MAX_NATIVE_WALK as u32,
            native_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let s = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, read back after the callback wrote it.
    let c = unsafe { core::ptr::read_volatile(&raw const (*s).native) };
    // SAFETY: as above; the callback has returned, and the slot is written through `s` only.
    unsafe {
        (*s).ev.native_depth = c.n;
        (*s).ev.native_end = c.end;
    }
    Some(c)
}

/// Folds the allocation's native call path into the site hash `h`, as far as rows are known
/// and up to the eval loop, recording the return addresses in `scratch.ev`.
#[inline(always)]
pub(crate) fn native_stack(tgid: u32, caller: FrameRegs, h: u64) -> u64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return h;
    };
    let walk = NativeWalk {
        regs: caller,
        h,
        tgid,
        n: 0,
        hash_max: core::cmp::min(read_global(&NATIVE_DEPTH), MAX_NATIVE_FRAMES as u32),
        hashing: 1,
        paused: 0,
        end: native_end::UNKNOWN,
        _pad: 0,
    };
    // SAFETY: this CPU's scratch slot, through the raw pointer only (the callback writes it).
    // The window another walk left on this CPU is of another stack.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).native, walk);
        core::ptr::write_volatile(&raw mut (*s).window.len, 0);
    }
    native_walk_run().map(|c| c.h).unwrap_or(h)
}

/// For a new site's record: walks on past the eval loop as far as rows are known, so a site
/// whose every frame the kernel can follow needs no stack copy. Returns whether it does.
#[inline(always)]
pub(crate) fn native_stack_rest() -> bool {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's scratch slot.
    let paused = unsafe { core::ptr::read_volatile(&raw const (*s).native.paused) };
    if paused != 0 {
        // SAFETY: the same slot, through the raw pointer `s` (the walk's callback writes it too).
        unsafe { core::ptr::write_volatile(&raw mut (*s).native.paused, 0) };
        if native_walk_run().is_none() {
            return true;
        }
    }
    // SAFETY: the same slot, read back after the walk's callback has returned.
    let end = unsafe { core::ptr::read_volatile(&raw const (*s).native.end) };
    end == native_end::UNKNOWN
}

/// Sends the caller's registers and the top of its stack for a new site, so userspace can
/// unwind it fully. The copy goes page by page and ends where the stack's mapping does.
#[inline(always)]
pub(crate) fn send_stack(tgid: u32, site_id: u64, regs: FrameRegs) -> bool {
    // SAFETY: a helper with no arguments; migration is disabled, so the id stays this CPU's.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ev) = STACKBUF.get_ptr_mut(cpu) else {
        return false;
    };
    // SAFETY: this CPU's slot of the map.
    let ev = unsafe { &mut *ev };
    ev.kind = EVENT_STACK;
    ev.tgid = tgid;
    ev.site_id = site_id;
    ev.pc = regs.pc;
    ev.sp = regs.sp;
    ev.bp = regs.bp;
    let wanted = core::cmp::min(read_global(&STACK_COPY) as usize, MAX_STACK_COPY - PAGE);
    ev.wanted = wanted as u32;
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    if pending + (STACK_EVENT_HEADER + wanted) as u64 + RING_RESERVE > RING_BYTES as u64 {
        // Userspace is behind: try again at the site's next allocation.
        return false;
    }
    let mut off: usize = 0;
    let mut i = 0;
    while i < MAX_STACK_COPY / PAGE {
        if off >= wanted || off > MAX_STACK_COPY - PAGE {
            break;
        }
        let addr = regs.sp + off as u64;
        let to_page_end = PAGE - (addr as usize & (PAGE - 1));
        let n = core::cmp::min(to_page_end, wanted - off);
        if n == 0 || n > PAGE {
            break;
        }
        // SAFETY: `off + n` ≤ the buffer's length, checked above.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                ev.data.as_mut_ptr().add(off) as *mut core::ffi::c_void,
                n as u32,
                addr as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            break;
        }
        off += n;
        i += 1;
    }
    ev.len = off as u32;
    let len = core::cmp::min(STACK_EVENT_HEADER + off, core::mem::size_of::<StackEvent>());
    // SAFETY: `len` is within the record.
    let bytes = unsafe { core::slice::from_raw_parts(ev as *const StackEvent as *const u8, len) };
    EVENTS.output::<[u8]>(bytes, 0).is_ok()
}
