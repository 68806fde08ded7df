//! leaktrace's BPF programs: one generic entry path, one return path and one free path for every
//! allocator function; the attach cookie (an `AllocFn`) says which function a probe sits on.
//!
//! The kernel side stays small: it keeps the table of live blocks (`LIVE`) and per-site counters
//! (`SITES`), announces each new site once on the ring buffer, and counts every drop. Policy —
//! what to probe, where, and how to report — lives in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use leaktrace_ebpf::{
    site_id, AllocFn, Counter, FinalizeEvent, LiveAlloc, LiveKey, NewSiteEvent, Pending, Shape,
    SiteStats, EVENT_FINALIZE, EVENT_NEW_SITE, MAX_NATIVE_FRAMES, NUM_COUNTERS, TARGET_FROZEN,
};

/// Allocations smaller than this are not tracked (`--min-size`).
#[no_mangle]
static MIN_SIZE: u64 = 0;
/// When non-zero every program returns at once: the cost floor of the probes themselves.
#[no_mangle]
static FLOOR_MODE: u8 = 0;

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

/// Per-site counters and identity, per CPU so updates need no atomics: userspace sums the CPUs'
/// copies with wrapping arithmetic (a block freed on another CPU than it was allocated on makes
/// one copy "negative"), and takes the identity from the copy that created the site.
#[map]
static SITES: PerCpuHashMap<u64, SiteStats> =
    PerCpuHashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// New-site announcements.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

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
    record_alloc(tgid, ptr, p.size, func, p.caller);
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
    unsafe { *flags |= TARGET_FROZEN };
    let ev = FinalizeEvent {
        kind: EVENT_FINALIZE,
        tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    if EVENTS.output::<FinalizeEvent>(&ev, 0).is_err() {
        bump(Counter::RingbufFull);
    }
    0
}

#[inline(always)]
fn record_alloc(tgid: u32, ptr: u64, size: u64, func: AllocFn, caller: u64) {
    if size < read_global(&MIN_SIZE) {
        bump(Counter::BelowMinSize);
        return;
    }
    let native = [caller; MAX_NATIVE_FRAMES];
    let id = site_id(tgid, func as u8, &native);
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
                announce_site(tgid, id, func, &native);
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
    let s = unsafe { &mut *stats };
    s.allocs += 1;
    s.alloc_bytes = s.alloc_bytes.wrapping_add(size);
    s.live_count = s.live_count.wrapping_add(1);
    s.live_bytes = s.live_bytes.wrapping_add(size);
}

#[inline(always)]
fn announce_site(tgid: u32, id: u64, func: AllocFn, native: &[u64; MAX_NATIVE_FRAMES]) {
    match EVENTS.reserve::<NewSiteEvent>(0) {
        Some(mut entry) => {
            entry.write(NewSiteEvent {
                kind: EVENT_NEW_SITE,
                tgid,
                site_id: id,
                ts_ns: unsafe { bpf_ktime_get_ns() },
                func: func as u8,
                _pad: [0; 7],
                native: *native,
            });
            entry.submit(0);
        }
        None => bump(Counter::RingbufFull),
    }
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
        s.live_count = s.live_count.wrapping_sub(1);
        s.live_bytes = s.live_bytes.wrapping_sub(rec.size);
        if freed {
            s.frees += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
