//! The tracepoint programs: page faults (growth mode), how a traced process dies (post-mortem
//! reports), and the processes it forks (`--follow-forks`). Each is filtered by `TARGETS` first,
//! so processes leaktrace does not trace pay one map lookup.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_comm, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_send_signal_thread, bpf_task_pt_regs},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use leaktrace_ebpf::{
    death, AllocFn, Counter, DeathInfo, ForkEvent, FrameRegs, EVENT_EXEC, EVENT_FORK,
    TARGET_FOLLOW_FORKS, TARGET_FORKED_CHILD, TARGET_FROZEN, TARGET_HELD, TARGET_PAUSE,
    TARGET_PAUSE_SENT,
};

use crate::live::retire_if_live;
use crate::maps::{DEATHS, EVENTS, TARGETS};
use crate::record::record_alloc;
use crate::sampler::admit;
use crate::{bump, holds_allowed, ids, read_global, traced_tgid, SIGSTOP};

/// Tasks a followed process just created, until each first returns to user space
/// (tid → parent tgid): only then can the kernel tell a new process from a new thread.
#[map]
static FORKED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Fatal signals sent while leaktrace translates ids (it runs in a PID namespace of its own):
/// the tracepoints that see them name the target by its initial-namespace pid, which cannot be
/// translated there. Kept here (that pid → who sent what) until the target itself takes the
/// signal, in its own context, where its id is known.
#[map]
static SIGNALLED: LruHashMap<u32, SignalFrom> = LruHashMap::with_max_entries(256, 0);

/// A fatal signal on its way to a process (see `SIGNALLED`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SignalFrom {
    sender_tgid: u32,
    signal: u32,
    /// `death::OOM_VICTIM` when the OOM killer chose the process.
    flags: u32,
    _pad: u32,
    comm: [u8; 16],
}

/// Offset of `child_pid` in `sched_process_fork`'s record, which moved when the kernel began
/// naming processes there with `__data_loc` strings; userspace reads it from tracefs.
#[no_mangle]
static FORK_CHILD_PID_OFFSET: u32 = leaktrace_ebpf::FORK_CHILD_PID_OFFSET;

/// Error-code bit of a page fault caused by a write.
const PF_WRITE: u64 = 2;
/// First address past user space on x86-64.
const USER_END: u64 = 1 << 47;
const PAGE: u64 = 4096;

/// A page fault in user mode (`exceptions:page_fault_user`, attached raw: the kernel then
/// hands over its arguments without formatting a trace record, which costs more than the
/// program on every fault).
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> u32 {
    fault(&ctx);
    0
}

/// A page fault on a user address taken in the kernel (`exceptions:page_fault_kernel`): a
/// syscall such as `read` filling a fresh buffer.
#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> u32 {
    fault(&ctx);
    0
}

/// A write to a page not yet resident makes the process's memory grow by a page: recorded (by
/// sampling) as an allocation at the user stack that touched it.
#[inline(always)]
fn fault(ctx: &RawTracePointContext) {
    let Some((tgid, tid)) = traced_tgid() else {
        return;
    };
    // TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code).
    let addr: u64 = ctx.arg(0);
    let error: u64 = ctx.arg(2);
    // A read maps the shared zero page; only a write makes a private page resident.
    if error & PF_WRITE == 0 || addr >= USER_END {
        return;
    }
    let Some(weight) = admit(PAGE) else {
        return;
    };
    // The user registers saved on entry to the kernel: the faulting instruction, or for a fault
    // inside a syscall, the instruction after it.
    // SAFETY: the current task is the trusted BTF pointer the helper takes; no deref here.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    // SAFETY: the task's saved user registers; each field is read with a checked kernel read.
    let (pc, sp, bp) = unsafe {
        (
            bpf_probe_read_kernel(&raw const (*regs).rip).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*regs).rsp).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*regs).rbp).unwrap_or(0),
        )
    };
    if pc == 0 || sp == 0 {
        return;
    }
    record_alloc(
        tgid,
        tid,
        addr & !(PAGE - 1),
        PAGE,
        weight,
        AllocFn::PageFault,
        FrameRegs { pc, sp, bp },
    );
}

/// Pages scanned at most per released range (1 GiB); the rest of a larger range stays counted.
const MAX_RELEASE_PAGES: u64 = 1 << 18;

/// The program break of each traced process as last seen (tgid → brk), seeded by userspace from
/// the `[heap]` mapping: a `brk` below it gives pages back.
#[map]
static BRKS: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// `syscalls:sys_enter_munmap` (growth mode): unmapped pages are no longer growth.
#[tracepoint]
pub fn unmap(ctx: TracePointContext) -> u32 {
    release_range(&ctx);
    0
}

/// `syscalls:sys_enter_madvise` (growth mode): pages an allocator hands back with
/// `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE` (glibc's arena trimming, jemalloc, mimalloc).
#[tracepoint]
pub fn madvise(ctx: TracePointContext) -> u32 {
    // SAFETY: a checked kernel read of `behavior`, at offset 32 of sys_enter_madvise's record.
    let behavior: u64 = unsafe { ctx.read_at(32) }.unwrap_or(0);
    // MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_DONTNEED_LOCKED.
    if matches!(behavior, 4 | 8 | 9 | 24) {
        release_range(&ctx);
    }
    0
}

/// Releases the range of a `munmap` or `madvise` (address at 16, length at 24) of a traced
/// process.
#[inline(always)]
fn release_range(ctx: &TracePointContext) {
    let Some((tgid, _)) = traced_tgid() else {
        return;
    };
    // SAFETY: a checked kernel read of the address, at offset 16 of munmap's and madvise's records.
    let addr: u64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    // SAFETY: likewise the length, at offset 24; any 8 bytes are a valid u64.
    let len: u64 = unsafe { ctx.read_at(24) }.unwrap_or(0);
    release(tgid, addr, len);
}

/// `syscalls:sys_exit_brk` (growth mode): a lower break gives the heap's top pages back
/// (glibc's trimming of the main arena).
#[tracepoint]
pub fn brk_exit(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = traced_tgid() else {
        return 0;
    };
    // SAFETY: a checked kernel read of `ret`, at offset 16 of sys_exit_brk's record.
    let new: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if new <= 0 {
        return 0;
    }
    let new = new as u64;
    if let Some(old) = BRKS.get_ptr_mut(&tgid) {
        // SAFETY: a live map value.
        let old = unsafe { &mut *old };
        if new < *old {
            release(tgid, new, *old - new);
        }
        *old = new;
    } else {
        let _ = BRKS.insert(&tgid, &new, 0);
    }
    0
}

/// Retires every recorded page in `[addr, addr + len)`: each page is looked up, since only
/// sampled pages are recorded.
#[inline(always)]
fn release(tgid: u32, addr: u64, len: u64) {
    let first = (addr + PAGE - 1) & !(PAGE - 1);
    let end = addr.saturating_add(len);
    if end <= first {
        return;
    }
    let mut scan = Release { tgid, first };
    let pages = ((end - first) / PAGE).min(MAX_RELEASE_PAGES);
    // SAFETY: `release_step` has bpf_loop's callback signature and `scan` outlives the call.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            pages as u32,
            release_step as *mut core::ffi::c_void,
            &mut scan as *mut Release as *mut core::ffi::c_void,
            0,
        )
    };
}

#[repr(C)]
struct Release {
    tgid: u32,
    first: u64,
}

#[inline(never)]
extern "C" fn release_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the Release record `release` passed in.
    let s = unsafe { &*(ctx as *const Release) };
    retire_if_live(s.tgid, s.first + index * PAGE);
    0
}

/// The death record of a traced process, created on first use.
#[inline(always)]
fn death_of(tgid: u32) -> Option<&'static mut DeathInfo> {
    // SAFETY: only whether the key exists is used; the value is never read.
    unsafe { TARGETS.get(&tgid) }?;
    if let Some(d) = DEATHS.get_ptr_mut(&tgid) {
        // SAFETY: a live map value of plain integers; other CPUs may store to it too (benign).
        return Some(unsafe { &mut *d });
    }
    let _ = DEATHS.insert(&tgid, &DeathInfo::default(), 0);
    // SAFETY: as above, the entry just inserted.
    DEATHS.get_ptr_mut(&tgid).map(|d| unsafe { &mut *d })
}

/// Signals whose default action ends the process.
#[inline(always)]
fn fatal_by_default(sig: u32) -> bool {
    // SIGHUP..SIGTERM except SIGKILL-irrelevant ones; SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP,
    // SIGTTIN, SIGTTOU, SIGURG and SIGWINCH stop, continue or are ignored.
    matches!(sig, 1..=16 | 24..=27 | 29..=31)
}

/// `oom:mark_victim`: the OOM killer chose a process (runs in the killer's context).
#[tracepoint]
pub fn oom_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: a checked kernel read of `pid`, at offset 8 of oom:mark_victim's record.
    let pid: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    if ids::translated() {
        // The killer sent its SIGKILL just before: keep that record, with the mark added.
        // SAFETY: a value of an LRU map, copied at once.
        let mut from = unsafe { SIGNALLED.get(&(pid as u32)) }
            .copied()
            .unwrap_or(SignalFrom {
                sender_tgid: 0,
                signal: 0,
                flags: 0,
                _pad: 0,
                comm: [0; 16],
            });
        from.flags |= death::OOM_VICTIM;
        let _ = SIGNALLED.insert(&(pid as u32), &from, 0);
    } else if let Some(d) = death_of(pid as u32) {
        d.flags |= death::OOM_VICTIM;
    }
    0
}

/// `signal:signal_generate`: who sent a traced process a signal that would end it.
#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    // SAFETY: a checked kernel read of `sig`, at offset 8 of signal_generate's record.
    let sig: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    // SAFETY: a checked kernel read of `pid`, at offset 36 of the same record.
    let pid: i32 = unsafe { ctx.read_at(36) }.unwrap_or(0);
    // SAFETY: a checked kernel read of `result`, at offset 44 of the same record.
    let result: i32 = unsafe { ctx.read_at(44) }.unwrap_or(-1);
    // 0: TRACE_SIGNAL_DELIVERED (queued to the target).
    if result != 0 || !fatal_by_default(sig as u32) {
        return 0;
    }
    let sender_tgid = ids::current_tgid();
    let comm = bpf_get_current_comm().unwrap_or_default();
    if ids::translated() {
        // SAFETY: a value of an LRU map, read at once.
        let flags = unsafe { SIGNALLED.get(&(pid as u32)) }.map_or(0, |f| f.flags);
        let from = SignalFrom {
            sender_tgid,
            signal: sig as u32,
            flags,
            _pad: 0,
            comm,
        };
        let _ = SIGNALLED.insert(&(pid as u32), &from, 0);
    } else if let Some(d) = death_of(pid as u32) {
        d.sender_tgid = sender_tgid;
        d.sent_signal = sig as u32;
        d.sender_comm = comm;
    }
    0
}

/// `signal:signal_deliver`: a traced process takes a signal; with its default action (no
/// handler) a fatal one ends it.
#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    let tgid = ids::current_tgid();
    // SAFETY: a checked kernel read of `sig`, at offset 8 of signal_deliver's record.
    let sig: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    // SAFETY: a checked kernel read of `sa_handler`, at offset 24 of the same record.
    let handler: u64 = unsafe { ctx.read_at(24) }.unwrap_or(1);
    // Taken for every signal delivered, handled or not, so no record outlives its signal.
    let from = if ids::translated() {
        take_signalled()
    } else {
        None
    };
    // SIG_DFL is 0.
    if handler != 0 || !fatal_by_default(sig as u32) {
        return 0;
    }
    if let Some(d) = death_of(tgid) {
        d.flags |= death::SIGNALED;
        d.signal = sig as u32;
        if let Some(from) = from {
            d.flags |= from.flags;
            d.sender_tgid = from.sender_tgid;
            d.sent_signal = from.signal;
            d.sender_comm = from.comm;
        }
    }
    0
}

/// The `SIGNALLED` record of the signal this thread is taking, removed: `tgkill` names this
/// thread, `kill` its process (the leader's pid).
#[inline(always)]
fn take_signalled() -> Option<SignalFrom> {
    for key in [ids::global_tid(), ids::global_tgid()] {
        // SAFETY: a value of an LRU map, copied at once.
        if let Some(from) = unsafe { SIGNALLED.get(&key) }.copied() {
            let _ = SIGNALLED.remove(&key);
            return Some(from);
        }
    }
    None
}

/// `syscalls:sys_enter_exit_group`: a traced process exits with a status.
#[tracepoint]
pub fn exit_group(ctx: TracePointContext) -> u32 {
    let tgid = ids::current_tgid();
    // SAFETY: a checked kernel read of `error_code`, at offset 16 of sys_enter_exit_group's record.
    let code: u64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    if let Some(d) = death_of(tgid) {
        d.flags |= death::EXITED;
        d.exit_code = code as i32;
    }
    0
}

/// `sched:sched_process_fork` (in the parent): remember tasks that followed processes create.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let tgid = ids::current_tgid();
    // SAFETY: the u32 is read right away; a slot reused after a concurrent remove still holds one.
    let Some(flags) = (unsafe { TARGETS.get(&tgid) }) else {
        return 0;
    };
    if *flags & TARGET_FOLLOW_FORKS == 0 {
        return 0;
    }
    // The child's pid in the initial namespace, as `fork_return` looks it up.
    let at = read_global(&FORK_CHILD_PID_OFFSET) as usize;
    // SAFETY: a checked kernel read (bpf_probe_read_kernel) of `child_pid`, at the offset this
    // kernel's format file gives.
    let child: i32 = unsafe { ctx.read_at(at) }.unwrap_or(0);
    let _ = FORKED.insert(&(child as u32), &tgid, 0);
    0
}

/// `syscalls:sys_exit_{clone,clone3,fork,vfork}`, also run by a new task on its first return to
/// user space: a new process of a followed parent is traced from its first instruction. It is
/// stopped and announced, and userspace attaches its probes and lets it go.
#[tracepoint]
pub fn fork_return(_ctx: TracePointContext) -> u32 {
    let global = ids::global_tid();
    // SAFETY: the u32 is copied at once; a slot reused after a concurrent remove still holds a u32.
    let Some(parent) = (unsafe { FORKED.get(&global) }).copied() else {
        return 0;
    };
    let _ = FORKED.remove(&global);
    let Some((tgid, tid)) = ids::current() else {
        return 0;
    };
    if tid != tgid {
        return 0; // a new thread of a traced process, already covered
    }
    // SAFETY: the u32 is copied at once; a slot reused after a concurrent remove still holds a u32.
    let Some(flags) = (unsafe { TARGETS.get(&parent) }).copied() else {
        return 0;
    };
    // Only `run`'s own child is paused at its lifecycle points (leaktrace is its tracer and
    // takes that stop); the child starts unfrozen whatever its parent's state. It is held
    // (stopped) until userspace has attached its probes, unless the session is ending: nobody
    // would let it go.
    let hold = holds_allowed();
    let inherited_not = TARGET_PAUSE | TARGET_PAUSE_SENT | TARGET_FROZEN | TARGET_HELD;
    let mut flags = (flags & !inherited_not) | TARGET_FORKED_CHILD;
    if hold {
        flags |= TARGET_HELD;
    }
    if TARGETS.insert(&tgid, &flags, 0).is_err() {
        bump(Counter::ForksMissed);
        return 0;
    }
    let ev = ForkEvent {
        kind: EVENT_FORK,
        parent,
        child: tgid,
        _pad: 0,
    };
    if EVENTS.output::<ForkEvent>(&ev, 0).is_err() {
        bump(Counter::ForksMissed);
        // Nobody will hear of it: not held.
        if let Some(f) = TARGETS.get_ptr_mut(&tgid) {
            // SAFETY: a live map value.
            unsafe { *f &= !TARGET_HELD };
        }
    } else if hold {
        // SAFETY: a helper signalling the current thread.
        unsafe { bpf_send_signal_thread(SIGSTOP) };
    }
    0
}

/// `sched:sched_process_exec`: a followed process replaced its program. A followed child is
/// stopped before the new program's first instruction (its dynamic loader) and announced:
/// userspace follows it if it is the same Python, and lets it go. (`run`'s own child is followed
/// through ptrace instead.)
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = ids::current_tgid();
    let Some(flags) = TARGETS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: a live map value.
    let flags = unsafe { &mut *flags };
    if *flags & TARGET_FOLLOW_FORKS == 0 {
        return 0;
    }
    let ev = ForkEvent {
        kind: EVENT_EXEC,
        parent: 0,
        child: tgid,
        _pad: 0,
    };
    if EVENTS.output::<ForkEvent>(&ev, 0).is_err() {
        bump(Counter::ForksMissed);
    } else if *flags & TARGET_FORKED_CHILD != 0 && holds_allowed() {
        *flags |= TARGET_HELD;
        // SAFETY: a helper signalling the current thread.
        unsafe { bpf_send_signal_thread(SIGSTOP) };
    }
    0
}
