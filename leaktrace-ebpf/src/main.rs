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
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_loop, bpf_send_signal},
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use leaktrace_ebpf::{
    py_status, site_id, site_id_finish, AllocFn, Counter, FinalizeEvent, LiveAlloc, LiveKey,
    NewSiteEvent, Pending, PyFrameRec, PyOffsets, Shape, SiteStats, EVENT_FINALIZE, EVENT_NEW_SITE,
    MAX_NATIVE_FRAMES, MAX_PY_FRAMES, NUM_COUNTERS, PY_FRAME_READ, TARGET_FROZEN,
    TARGET_STOP_AT_FINALIZE,
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

/// New-site announcements, each with its Python stack (56 bytes + 16 per frame). Sized for the
/// burst of new sites while a program imports its modules.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

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
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Event and drop counters, per CPU (summed by userspace).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn bump(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        unsafe { *p += 1 };
    }
}

/// `*p += v` atomically (a BPF_ATOMIC add: sites are updated from every CPU at once).
#[inline(always)]
fn add(p: &mut u64, v: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // SAFETY: `p` points into a live map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

#[inline(always)]
fn read_global<T: Copy>(g: &T) -> T {
    // A plain read of a `static` is constant-folded to its default; the loader overrides it.
    unsafe { core::ptr::read_volatile(g) }
}

#[inline(always)]
fn traced_tgid() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if read_global(&FLOOR_MODE) != 0 {
        return None;
    }
    let flags = unsafe { TARGETS.get(&tgid) }?;
    if *flags & TARGET_FROZEN != 0 {
        return None;
    }
    Some((tgid, pid_tgid as u32))
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
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(func) = AllocFn::from_u8(cookie as u8) else {
        return 0;
    };
    let sp = unsafe { (*ctx.regs).rsp };

    if let Some(p) = PENDING.get_ptr_mut(&tid) {
        let p = unsafe { &mut *p };
        if p.depth > 0 {
            // Called from inside an allocator already on this thread: the outer call owns it. A
            // tail call (reallocarray → realloc) enters at the same stack pointer, but finds its
            // return address replaced by the outer return probe's trampoline.
            let nested = sp < p.sp
                || (sp == p.sp
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
    if PENDING.insert(&tid, &pending, 0).is_err() {
        bump(Counter::PendingFull);
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
    record_alloc(tgid, tid, ptr, p.size, func, p.caller);
    0
}

/// Entry of every freeing function. Frees are never gated by nesting: removing a block twice is
/// harmless, missing a removal is not.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let Some((tgid, _tid)) = traced_tgid() else {
        return 0;
    };
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

/// Entry of `Py_FinalizeEx`: freeze the process's accounting and tell userspace.
#[uprobe]
pub fn finalize_enter(_ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(flags) = TARGETS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: a live map value.
    let stop = unsafe {
        *flags |= TARGET_FROZEN;
        *flags & TARGET_STOP_AT_FINALIZE != 0
    };
    let ev = FinalizeEvent {
        kind: EVENT_FINALIZE,
        tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    if EVENTS.output::<FinalizeEvent>(&ev, 0).is_err() {
        bump(Counter::RingbufFull);
    }
    if stop {
        // Delivered on the way back to user space, before finalization frees anything.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
    0
}

const SIGSTOP: u32 = 19;

mod python;
use python::{check_step, python_stack, CheckCtx};

#[inline(always)]
fn record_alloc(tgid: u32, tid: u32, ptr: u64, size: u64, func: AllocFn, caller: u64) {
    if size < read_global(&MIN_SIZE) {
        bump(Counter::BelowMinSize);
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let scratch = unsafe { &mut *scratch };
    let native = [caller; MAX_NATIVE_FRAMES];
    let base = site_id(tgid, func as u8, &native);
    let mut id = site_id_finish(python_stack(tgid, tid, scratch, base));
    let count = unsafe { core::ptr::read_volatile(&raw const SITE_COUNT) };
    let full = count >= read_global(&SITES_SOFT_LIMIT);
    if full && scratch.ev.py_depth > 0 && SITES.get_ptr_mut(&id).is_none() {
        // The site map is full: keep accounting under the native caller alone, without the
        // Python stack, rather than losing the allocation (or a leak that started late).
        bump(Counter::SitesCoarsened);
        id = site_id_finish(base);
        scratch.ev.py_depth = 0;
        scratch.ev.py_status = py_status::OVERFLOW;
    }
    let stats = match SITES.get_ptr_mut(&id) {
        Some(s) => s,
        None => {
            let fresh = SiteStats {
                tgid,
                func: func as u8,
                native,
                ..SiteStats::default()
            };
            if SITES.insert(&id, &fresh, BPF_NOEXIST).is_ok() {
                // SAFETY: a global in .bss, updated atomically.
                add(unsafe { &mut *(&raw mut SITE_COUNT) }, 1);
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
    // SAFETY: a live map value.
    let site = unsafe { &mut *stats };
    if site.announced == 0 {
        // New, or its announcement found the ring buffer full: the frames just walked are
        // this site's, so (re)send them, with a check of each code object.
        if let Some(off) = unsafe { PYPROCS.get(&tgid) } {
            let mut c = CheckCtx {
                co_check: off.co_check,
                n: core::cmp::min(scratch.ev.py_depth, MAX_PY_FRAMES as u32),
            };
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
        ev.ts_ns = unsafe { bpf_ktime_get_ns() };
        ev.func = func as u8;
        ev.native = native;
        // Only the frames walked are sent: most stacks are far shallower than the limit.
        let header = core::mem::offset_of!(NewSiteEvent, py_frames);
        let frames = core::cmp::min(ev.py_depth as usize, MAX_PY_FRAMES);
        let len = header + frames * core::mem::size_of::<PyFrameRec>();
        let len = core::cmp::min(len, core::mem::size_of::<NewSiteEvent>());
        // SAFETY: `len` is within the event.
        let bytes =
            unsafe { core::slice::from_raw_parts(ev as *const NewSiteEvent as *const u8, len) };
        if EVENTS.output::<[u8]>(bytes, 0).is_ok() {
            site.announced = 1;
        } else {
            bump(Counter::RingbufFull);
        }
    }

    let key = LiveKey {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    // An address still marked live was freed by a path leaktrace did not see; retire it first.
    remove_stale(&key);
    let rec = LiveAlloc {
        size,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        site_id: id,
        func: func as u8,
        _pad: [0; 7],
    };
    if LIVE.insert(&key, &rec, 0).is_err() {
        bump(Counter::LiveFull);
        return;
    }
    bump(Counter::Allocs);
    add(&mut site.allocs, 1);
    add(&mut site.alloc_bytes, size);
    add(&mut site.live_count, 1);
    add(&mut site.live_bytes, size);
}

#[inline(always)]
fn remove_stale(key: &LiveKey) {
    if let Some(old) = unsafe { LIVE.get(key) } {
        let old = *old;
        if LIVE.remove(key).is_ok() {
            bump(Counter::StaleReplaced);
            retire(&old, false);
        }
    }
}

#[inline(always)]
fn remove_live(tgid: u32, addr: u64) {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    let Some(rec) = (unsafe { LIVE.get(&key) }) else {
        bump(Counter::FreesUnknown);
        return;
    };
    let rec = *rec;
    // Only the thread whose delete succeeds accounts the free.
    if LIVE.remove(&key).is_ok() {
        bump(Counter::Frees);
        retire(&rec, true);
    }
}

#[inline(always)]
fn retire(rec: &LiveAlloc, freed: bool) {
    if let Some(s) = SITES.get_ptr_mut(&rec.site_id) {
        let s = unsafe { &mut *s };
        add(&mut s.live_count, 1u64.wrapping_neg());
        add(&mut s.live_bytes, rec.size.wrapping_neg());
        if freed {
            add(&mut s.frees, 1);
        }
    }
}

#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
