//! leaktrace's BPF programs: one generic entry path, one return path and one free path for every
//! allocator function; the attach cookie (an `AllocFn`) says which function a probe sits on.
//!
//! The kernel side stays small: it keeps the table of live blocks (`LIVE`) and per-site counters
//! (`SITES`), announces each new site once on the ring buffer, and counts every drop. Policy —
//! what to probe, where, and how to report — lives in userspace.
#![no_std]
#![no_main]
// Atomic adds on map values (BPF_ATOMIC); `core::sync::atomic` has no 64-bit RMW on bpf.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_loop, bpf_send_signal_thread},
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use leaktrace_ebpf::{
    native_end, py_status, site_id_add_pc, site_id_finish, site_id_start, AllocFn, Counter,
    DeathInfo, FrameRegs, LifecycleEvent, LiveAlloc, LiveKey, NewSiteEvent, Pending, PyFrameRec,
    PyOffsets, Shape, SiteStats, StackEvent, UnwindKey, UnwindRow, CONTROL_HOLDS_OFF,
    EVENT_FINALIZE, EVENT_MAIN, EVENT_NEW_SITE, MAX_NATIVE_FRAMES, MAX_NATIVE_WALK, MAX_PY_FRAMES,
    NUM_COUNTERS, PY_FRAME_READ, TARGET_FROZEN, TARGET_MAIN_STARTED, TARGET_PAUSE,
};

/// Allocations smaller than this are not tracked (`--min-size`).
#[no_mangle]
static MIN_SIZE: u64 = 0;
/// When non-zero every program returns at once: the cost floor of the probes themselves.
#[no_mangle]
static FLOOR_MODE: u8 = 0;
/// Sites created so far (in `.bss`, counted with atomic adds).
#[no_mangle]
static mut SITE_COUNT: u64 = 0;
/// Past this many sites, new Python stacks are folded into their native caller: the rest of
/// `SITES` is kept for those coarse sites, so no allocation goes uncounted.
#[no_mangle]
static SITES_SOFT_LIMIT: u64 = (1 << 20) - (1 << 18);

/// Bytes of user stack copied for each new site (`--stack-copy`), at most `MAX_STACK_COPY`.
#[no_mangle]
static STACK_COPY: u32 = 16 << 10;

/// Native return addresses folded into a site id, at most `MAX_NATIVE_FRAMES`.
#[no_mangle]
static NATIVE_DEPTH: u32 = MAX_NATIVE_FRAMES as u32;

/// Python frames recorded per site, at most `MAX_PY_FRAMES` (`--python-depth`).
#[no_mangle]
static PY_MAX_DEPTH: u32 = 64;

/// Processes being traced (tgid → flags). The probes are scoped to the target's pid as well; this
/// map lets one loaded object serve several processes (forked workers).
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Per-thread allocator call in flight (tid → pending call).
#[map]
static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(16384, 0);

/// Every live traced block. Not preallocated: memory grows with use, up to the bound userspace
/// sets (`--max-live`).
#[map]
static LIVE: HashMap<LiveKey, LiveAlloc> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Per-site counters and identity, updated with atomic adds from every CPU. Not preallocated:
/// memory grows with the number of distinct sites, up to the bound userspace sets.
#[map]
static SITES: HashMap<u64, SiteStats> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// New-site announcements, each with its Python stack (≈240 bytes + 24 per frame) and its stack
/// copy (`--stack-copy`, 16 KiB by default). Sized for the burst of new sites while a program
/// imports its modules; a site whose announcement does not fit is announced again later.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES as u32, 0);
const RING_BYTES: usize = 32 << 20;

/// Unwind rows of return addresses userspace has learned from new sites' stack copies
/// ((tgid, return address) → row): how far the kernel can follow a call path into the site id.
/// Least recently used rows make room; a path whose rows were evicted is learned again.
#[map]
static UNWIND: LruHashMap<UnwindKey, UnwindRow> = LruHashMap::with_max_entries(1 << 17, 0);

/// Return addresses whose rows a stack copy was sent to learn, and when
/// ((tgid, return address) → ns).
#[map]
static REQUESTED: LruHashMap<UnwindKey, u64> = LruHashMap::with_max_entries(1 << 14, 0);

/// Room for one stack copy per CPU (indexed by CPU number; userspace sizes it to the CPUs).
#[map]
static STACKBUF: Array<StackEvent> = Array::with_max_entries(1, 0);

/// How to walk each Python process's frames (tgid → offsets), set by userspace.
#[map]
static PYPROCS: HashMap<u32, PyOffsets> = HashMap::with_max_entries(1024, 0);

/// Thread states of Python threads (tid → `PyThreadState*`): how a thread that allocates
/// without holding the GIL is found. Filled by the kernel's own search of the interpreter's
/// thread list (and refreshed by userspace); least recently used entries make room.
#[map]
static THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1 << 16, 0);

/// Per-CPU room for building a new-site record and reading one frame: too big for the stack.
#[repr(C)]
pub struct Scratch {
    ev: NewSiteEvent,
    frame: [u8; PY_FRAME_READ],
    walk: WalkCtx,
    native: NativeWalk,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// How traced processes ended (tgid → death), for the post-mortem report.
#[map]
static DEATHS: HashMap<u32, DeathInfo> = HashMap::with_max_entries(1024, 0);

/// The session's control word (`CONTROL_*` bits), set by userspace at the session's end and by
/// leaktrace's guardian process if leaktrace dies.
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the kernel may still stop a process for userspace: not once the session is ending.
#[inline(always)]
fn holds_allowed() -> bool {
    CONTROL.get(0).is_none_or(|c| *c & CONTROL_HOLDS_OFF == 0)
}

/// Event and drop counters, per CPU (summed by userspace).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn bump(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's own counter slot, live for the program's run; no other CPU writes it.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn read_global<T: Copy>(g: &T) -> T {
    // A plain read of a `static` is constant-folded to its default; the loader overrides it.
    // SAFETY: `g` is a reference, so the pointer is valid, aligned and initialized for `T`.
    unsafe { core::ptr::read_volatile(g) }
}

#[inline(always)]
fn traced_tgid() -> Option<(u32, u32)> {
    if read_global(&FLOOR_MODE) != 0 {
        return None;
    }
    let (tgid, tid) = ids::current()?;
    // SAFETY: the u32 is read right away; a slot reused after a concurrent remove still holds one.
    let flags = unsafe { TARGETS.get(&tgid) }?;
    if *flags & TARGET_FROZEN != 0 {
        return None;
    }
    Some((tgid, tid))
}

/// The first four integer arguments, shifted so index 0 is the function's first real argument.
///
/// Each register is loaded from its fixed `pt_regs` slot up front: an index chosen at run time
/// would make the compiler offset the context pointer, which the verifier rejects.
#[inline(always)]
fn args(ctx: &ProbeContext, first: usize) -> [u64; 3] {
    let regs = ctx.regs;
    // SAFETY: `regs` is the probe's context; volatile keeps each load at its constant offset.
    let (rdi, rsi, rdx, rcx) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*regs).rdi),
            core::ptr::read_volatile(&raw const (*regs).rsi),
            core::ptr::read_volatile(&raw const (*regs).rdx),
            core::ptr::read_volatile(&raw const (*regs).rcx),
        )
    };
    if first == 0 {
        [rdi, rsi, rdx]
    } else {
        [rsi, rdx, rcx]
    }
}

/// Entry of every allocating function.
#[uprobe]
pub fn alloc_enter(ctx: ProbeContext) -> u32 {
    let Some((_tgid, tid)) = traced_tgid() else {
        return 0;
    };
    // SAFETY: `ctx.as_ptr()` is this uprobe's own context, which is what the helper takes.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(func) = AllocFn::from_u8(cookie as u8) else {
        return 0;
    };
    // SAFETY: `ctx.regs` is the probe's `pt_regs`, valid for the program's whole run.
    let sp = unsafe { (*ctx.regs).rsp };

    if let Some(p) = PENDING.get_ptr_mut(&tid) {
        // SAFETY: a live map value keyed by this thread's tid: only this thread's probes touch it.
        let p = unsafe { &mut *p };
        if p.depth > 0 {
            // Called from inside an allocator already on this thread: the outer call owns it. A
            // tail call (reallocarray → realloc) enters at the same stack pointer, but finds its
            // return address replaced by the outer return probe's trampoline.
            let nested = sp < p.sp
                || (sp == p.sp
                    // SAFETY: a checked user read (a fault is an error); any 8 bytes are a u64.
                    && unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0) != p.caller);
            if nested {
                p.depth += 1;
                return 0;
            }
            // The outer call's return never fired (longjmp, a probe attached mid-call).
            bump(Counter::MissedReturn);
        }
    }

    let a = args(&ctx, func.first_arg());
    let mut pending = Pending {
        sp,
        func: func as u8,
        depth: 1,
        // Placement guarantees the return address is still on top of the stack here.
        // SAFETY: a checked user read (a fault is an error); any 8 bytes are a valid u64.
        caller: unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0),
        ..Pending::default()
    };
    match func.shape() {
        Shape::Malloc => pending.size = a[0],
        Shape::Calloc => pending.size = a[0].wrapping_mul(a[1]),
        Shape::Realloc => {
            pending.old_ptr = a[0];
            pending.size = a[1];
        }
        Shape::ReallocArray => {
            pending.old_ptr = a[0];
            pending.size = a[1].wrapping_mul(a[2]);
        }
        Shape::Memalign => pending.size = a[1],
        Shape::PosixMemalign => {
            pending.out_ptr = a[0];
            pending.size = a[2];
        }
        Shape::Free => return 0,
    }
    // The thread's entry from its previous call is overwritten in place: cheaper than a hash
    // insert, which takes a new element and frees the old one on every call.
    match PENDING.get_ptr_mut(&tid) {
        // SAFETY: this thread's own entry; only this thread writes it.
        Some(p) => unsafe { *p = pending },
        None => {
            if PENDING.insert(&tid, &pending, 0).is_err() {
                bump(Counter::PendingFull);
            }
        }
    }
    0
}

/// Return of every allocating function.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let Some((tgid, tid)) = traced_tgid() else {
        return 0;
    };
    let Some(p) = PENDING.get_ptr_mut(&tid) else {
        bump(Counter::ReturnWithoutEntry);
        return 0;
    };
    // SAFETY: a live map value keyed by this thread's tid: only this thread's probes touch it.
    let p = unsafe { &mut *p };
    if p.depth == 0 {
        bump(Counter::ReturnWithoutEntry);
        return 0;
    }
    p.depth -= 1;
    if p.depth > 0 {
        return 0;
    }
    let Some(func) = AllocFn::from_u8(p.func) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    let ptr = match func.shape() {
        Shape::PosixMemalign => {
            if ret != 0 {
                0
            } else {
                // SAFETY: a checked user read of the out-pointer; a bad address is an error.
                unsafe { bpf_probe_read_user(p.out_ptr as *const u64) }.unwrap_or(0)
            }
        }
        _ => ret,
    };
    if matches!(func.shape(), Shape::Realloc | Shape::ReallocArray) && p.old_ptr != 0 {
        // realloc frees the old block when it moves it, and realloc(p, 0) frees it outright; a
        // failed realloc (NULL for a non-zero size) leaves it live.
        if ptr != 0 || p.size == 0 {
            remove_live(tgid, p.old_ptr);
        }
    }
    if ptr == 0 {
        if p.size != 0 {
            bump(Counter::FailedAllocs);
        }
        return 0;
    }
    let Some(weight) = admit(p.size) else {
        return 0;
    };
    let regs = ctx.regs;
    // SAFETY: the probe's context; after the return, these are the caller's registers.
    let (sp, bp) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*regs).rsp),
            core::ptr::read_volatile(&raw const (*regs).rbp),
        )
    };
    let caller = FrameRegs {
        pc: p.caller,
        sp,
        bp,
    };
    record_alloc(tgid, tid, ptr, p.size, weight, func, caller);
    0
}

/// Entry of every freeing function. Frees are never gated by nesting: removing a block twice is
/// harmless, missing a removal is not.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let Some((tgid, _tid)) = traced_tgid() else {
        return 0;
    };
    // SAFETY: `ctx.as_ptr()` is this uprobe's own context, which is what the helper takes.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(func) = AllocFn::from_u8(cookie as u8) else {
        return 0;
    };
    let ptr = args(&ctx, func.ptr_arg())[0];
    if ptr != 0 {
        remove_live(tgid, ptr);
    }
    0
}

/// Entry of an interpreter lifecycle function; the attach cookie is the event kind:
/// `Py_RunMain` (`EVENT_MAIN`: start-up is over, the main module is about to run) or
/// `Py_FinalizeEx` (`EVENT_FINALIZE`: shutdown begins, the process's accounting freezes).
/// Userspace is told, and `run`'s child is paused there.
#[uprobe]
pub fn lifecycle_enter(ctx: ProbeContext) -> u32 {
    let tgid = ids::current_tgid();
    let Some(flags) = TARGETS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: a uprobe context.
    let kind = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    if kind != EVENT_MAIN && kind != EVENT_FINALIZE {
        return 0;
    }
    // SAFETY: a live map value.
    let pause = unsafe {
        // Flags too, read by userspace when the ring buffer had no room for the record.
        *flags |= if kind == EVENT_FINALIZE {
            TARGET_FROZEN
        } else {
            TARGET_MAIN_STARTED
        };
        *flags & TARGET_PAUSE != 0
    };
    let ev = LifecycleEvent {
        kind,
        tgid,
        // SAFETY: a helper with no arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    if EVENTS.output::<LifecycleEvent>(&ev, 0).is_err() {
        bump(Counter::RingbufFull);
    }
    if pause && holds_allowed() {
        // Delivered on the way back to user space, before the next line of Python runs. To this
        // thread, which leaktrace traces and whose stop it swallows: a process-wide SIGSTOP could
        // be taken by an untraced thread (numpy's BLAS workers) and stop it for good.
        // SAFETY: a helper signalling the current thread.
        unsafe { bpf_send_signal_thread(SIGSTOP) };
    }
    0
}

const SIGSTOP: u32 = 19;

mod ids;
mod live;
mod python;
mod sampler;
mod site;
mod tracepoints;
mod unwind;
use live::{remove_live, remove_stale};
use python::{check_step, python_stack, CheckCtx, WalkCtx};
use sampler::admit;
use site::{add, SharedSite};
use unwind::{native_stack, native_stack_rest, send_stack, NativeWalk};

/// Records an admitted allocation: its site (walking its stack) and its live block.
#[inline(always)]
fn record_alloc(
    tgid: u32,
    tid: u32,
    ptr: u64,
    size: u64,
    (weight, blocks): (u64, u64),
    func: AllocFn,
    caller: FrameRegs,
) {
    let start = site_id_start(tgid, func as u8);
    let coarse = site_id_add_pc(start, caller.pc);
    let native = native_stack(tgid, caller, start);
    let mut id = site_id_finish(python_stack(tgid, tid, native));
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: an aligned u64 in .bss, read whole; other CPUs only ever add to it atomically.
    let sites = unsafe { core::ptr::read_volatile(&raw const SITE_COUNT) };
    let full = sites >= read_global(&SITES_SOFT_LIMIT);
    if full
        && (scratch.ev.py_depth > 0 || scratch.ev.native_depth > 1)
        && SITES.get_ptr_mut(&id).is_none()
    {
        // The site map is full: keep accounting under the native caller alone, without the
        // rest of the stack, rather than losing the allocation (or a leak that started late).
        bump(Counter::SitesCoarsened);
        id = site_id_finish(coarse);
        scratch.ev.py_depth = 0;
        scratch.ev.native_depth = 1;
        scratch.ev.native_end = native_end::LIMIT;
        scratch.native.paused = 0;
        scratch.native.end = native_end::LIMIT;
        scratch.ev.py_status = py_status::OVERFLOW;
    }
    let stats = match SITES.get_ptr_mut(&id) {
        Some(s) => s,
        None => {
            let fresh = SiteStats {
                tgid,
                func: func as u8,
                caller: caller.pc,
                ..SiteStats::default()
            };
            if SITES.insert(&id, &fresh, BPF_NOEXIST).is_ok() {
                add(&raw mut SITE_COUNT, 1);
            }
            match SITES.get_ptr_mut(&id) {
                Some(s) => s,
                None => {
                    bump(Counter::SitesFull);
                    return;
                }
            }
        }
    };
    let site = SharedSite::new(stats);
    if site.announced() & ANNOUNCED_STACK == 0 {
        announce(site, scratch, tgid, tid, id, func, caller);
    }

    // A page (growth mode) is keyed by its address like a block, so `munmap` can retire it.
    {
        let key = LiveKey {
            tgid,
            _pad: 0,
            addr: ptr,
        };
        // An address still marked live was freed by a path leaktrace did not see; retire it.
        remove_stale(&key);
        let rec = LiveAlloc {
            size,
            // SAFETY: a helper with no arguments that only reads the clock.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            site_id: id,
            weight,
            count: blocks as u32,
            func: func as u8,
            _pad: [0; 3],
        };
        if LIVE.insert(&key, &rec, 0).is_err() {
            bump(Counter::LiveFull);
            return;
        }
    }
    bump(Counter::Allocs);
    site.allocated(blocks, weight);
}

/// Sends what userspace needs of a site not fully announced yet: its record (Python frames and
/// the native frames the kernel could follow) and, when the kernel could not follow them all,
/// a stack copy to learn from. A site announced while rows were missing is announced again
/// once they have been learned, so a burst of new sites needs few copies.
#[inline(always)]
fn announce(
    site: SharedSite,
    scratch: &mut Scratch,
    tgid: u32,
    tid: u32,
    id: u64,
    func: AllocFn,
    caller: FrameRegs,
) {
    let needs_copy = native_stack_rest();
    let stop_pc = {
        let n = scratch.ev.native_depth as usize;
        scratch.ev.native[n.wrapping_sub(1) & (MAX_NATIVE_WALK - 1)]
    };
    let resend = site.announced() & ANNOUNCED_SITE != 0;
    if !resend || !needs_copy {
        if send_site_record(scratch, tgid, tid, id, func) {
            site.mark(ANNOUNCED_SITE);
            if !needs_copy {
                site.mark(ANNOUNCED_STACK);
                return;
            }
        } else {
            bump(Counter::RingbufFull);
            return;
        }
    }
    // One copy teaches userspace every row up to where the walk stopped: while that copy is
    // on its way and userspace is behind, sites stopping at the same address wait instead of
    // sending their own (a site that never allocates again then keeps what the kernel walked).
    let key = UnwindKey {
        tgid,
        _pad: 0,
        pc: stop_pc,
    };
    // SAFETY: a helper with no arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let behind = EVENTS.query(BPF_RB_AVAIL_DATA) > (RING_BYTES / 4) as u64;
    // SAFETY: the u64 is read right away; an LRU slot reused concurrently still holds a u64.
    if let Some(t) = unsafe { REQUESTED.get(&key) } {
        if behind && now.wrapping_sub(*t) < REQUEST_TTL_NS {
            bump(Counter::StackDeferred);
            return;
        }
    }
    if send_stack(tgid, id, caller) {
        site.mark(ANNOUNCED_STACK);
        let _ = REQUESTED.insert(&key, &now, 0);
    } else {
        bump(Counter::StackDeferred);
    }
}

/// Sends a site's record: its Python frames (with a check of each code object) and the native
/// frames walked.
#[inline(always)]
fn send_site_record(scratch: &mut Scratch, tgid: u32, tid: u32, id: u64, func: AllocFn) -> bool {
    // SAFETY: plain integers, valid for any bytes; only `co_check` is copied out, at once.
    if let Some(off) = unsafe { PYPROCS.get(&tgid) } {
        let mut c = CheckCtx {
            co_check: off.co_check,
            n: core::cmp::min(scratch.ev.py_depth, MAX_PY_FRAMES as u32),
        };
        // SAFETY: `check_step` has bpf_loop's callback signature and `c` outlives the call.
        unsafe {
            bpf_loop(
                c.n,
                check_step as *mut core::ffi::c_void,
                &mut c as *mut CheckCtx as *mut core::ffi::c_void,
                0,
            )
        };
    }
    let ev = &mut scratch.ev;
    ev.kind = EVENT_NEW_SITE;
    ev.tgid = tgid;
    ev.tid = tid;
    ev.site_id = id;
    // SAFETY: a helper with no arguments that only reads the clock.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.func = func as u8;
    // Only the frames walked are sent: most stacks are far shallower than the limit.
    let header = core::mem::offset_of!(NewSiteEvent, py_frames);
    let frames = core::cmp::min(ev.py_depth as usize, MAX_PY_FRAMES);
    let len = header + frames * core::mem::size_of::<PyFrameRec>();
    let len = core::cmp::min(len, core::mem::size_of::<NewSiteEvent>());
    // SAFETY: `len` is within the event.
    let bytes = unsafe { core::slice::from_raw_parts(ev as *const NewSiteEvent as *const u8, len) };
    EVENTS.output::<[u8]>(bytes, 0).is_ok()
}

/// How long a stack copy sent to learn an address holds back others stopping there.
const REQUEST_TTL_NS: u64 = 1_000_000_000;

const PAGE: usize = 4096;
/// `SiteStats::announced` bits: the site record, and its stack copy, reached the ring buffer.
const ANNOUNCED_SITE: u8 = 1;
const ANNOUNCED_STACK: u8 = 2;
/// `bpf_ringbuf_query`: bytes written and not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// A stack copy is not attempted unless the ring buffer keeps this much room for site records.
const RING_RESERVE: u64 = 4 << 20;

#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    // SAFETY: a checked user read: a bad address returns an error; any 8 bytes are a valid u64.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
