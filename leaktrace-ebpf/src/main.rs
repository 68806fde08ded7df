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
        generated::{bpf_get_attach_cookie, bpf_send_signal_thread},
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use leaktrace_ebpf::{
    AllocFn, Counter, FrameRegs, LifecycleEvent, Pending, Shape, CONTROL_HOLDS_OFF, EVENT_FINALIZE,
    EVENT_MAIN, TARGET_FROZEN, TARGET_MAIN_STARTED, TARGET_PAUSE, TARGET_PAUSE_SENT,
};

mod ids;
mod live;
mod maps;
mod py_window;
mod python;
mod record;
mod sampler;
mod site;
mod tracepoints;
mod unwind;
mod usdt_probe;
use live::remove_live;
use maps::{CONTROL, COUNTERS, EVENTS, FLOOR_MODE, PENDING, TARGETS};
use record::record_alloc;
use sampler::admit;

/// Whether the kernel may still stop a process for userspace: not once the session is ending.
#[inline(always)]
fn holds_allowed() -> bool {
    CONTROL.get(0).is_none_or(|c| *c & CONTROL_HOLDS_OFF == 0)
}

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

    // Looked up once: the thread's entry is checked for nesting, then overwritten in place.
    let entry = PENDING.get_ptr_mut(&tid);
    if let Some(p) = entry {
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
    match entry {
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
        if unsafe { bpf_send_signal_thread(SIGSTOP) } == 0 {
            // Marked only when sent (it lands after this program returns): the guardian
            // continues a marked process it finds stopped.
            // SAFETY: a live map value.
            unsafe { *flags |= TARGET_PAUSE_SENT };
        }
    }
    0
}

const SIGSTOP: u32 = 19;

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
