//! The tracepoint programs: page faults (growth mode), how a traced process dies (post-mortem
//! reports), and the processes it forks (`--follow-forks`). Each is filtered by `TARGETS` first,
//! so processes leaktrace does not trace pay one map lookup.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_send_signal_thread, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use leaktrace_ebpf::{
    death, AllocFn, Counter, DeathInfo, ForkEvent, FrameRegs, EVENT_EXEC, EVENT_FORK,
    TARGET_FOLLOW_FORKS, TARGET_FROZEN, TARGET_STOP_AT_FINALIZE,
};

use crate::{bump, record_alloc, retire_if_live, traced_tgid, DEATHS, EVENTS, SIGSTOP, TARGETS};

/// Tasks a followed process just created, until each first returns to user space
/// (tid → parent tgid): only then can the kernel tell a new process from a new thread.
#[map]
static FORKED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Error-code bit of a page fault caused by a write.
const PF_WRITE: u64 = 2;
/// First address past user space on x86-64.
const USER_END: u64 = 1 << 47;
const PAGE: u64 = 4096;

/// A page fault in user mode (`exceptions:page_fault_user`).
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    fault(&ctx);
    0
}

/// A page fault on a user address taken in the kernel (`exceptions:page_fault_kernel`): a
/// syscall such as `read` filling a fresh buffer.
#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    fault(&ctx);
    0
}

/// A write to a page not yet resident makes the process's memory grow by a page: recorded (by
/// sampling) as an allocation at the user stack that touched it.
#[inline(always)]
fn fault(ctx: &TracePointContext) {
    let Some((tgid, tid)) = traced_tgid() else {
        return;
    };
    // Layout of both events: address at 8, ip at 16, error_code at 24.
    let addr: u64 = unsafe { ctx.read_at(8) }.unwrap_or(u64::MAX);
    let error: u64 = unsafe { ctx.read_at(24) }.unwrap_or(0);
    // A read maps the shared zero page; only a write makes a private page resident.
    if error & PF_WRITE == 0 || addr >= USER_END {
        return;
    }
    // The user registers saved on entry to the kernel: the faulting instruction, or for a fault
    // inside a syscall, the instruction after it.
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
        AllocFn::PageFault,
        FrameRegs { pc, sp, bp },
    );
}

/// Pages scanned at most per `munmap` (1 GiB); the rest of a larger range stays counted.
const MAX_UNMAP_PAGES: u64 = 1 << 18;

/// `syscalls:sys_enter_munmap` (growth mode): pages given back to the kernel are no longer
/// growth. Every page of the range is looked up, since only sampled pages are recorded.
#[tracepoint]
pub fn unmap(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = traced_tgid() else {
        return 0;
    };
    let addr: u64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    let len: u64 = unsafe { ctx.read_at(24) }.unwrap_or(0);
    let mut scan = Unmap {
        tgid,
        first: addr & !(PAGE - 1),
    };
    let pages = ((len + PAGE - 1) / PAGE).min(MAX_UNMAP_PAGES);
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            pages as u32,
            unmap_step as *mut core::ffi::c_void,
            &mut scan as *mut Unmap as *mut core::ffi::c_void,
            0,
        )
    };
    0
}

#[repr(C)]
struct Unmap {
    tgid: u32,
    first: u64,
}

#[inline(never)]
extern "C" fn unmap_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the Unmap record `unmap` passed in.
    let s = unsafe { &*(ctx as *const Unmap) };
    retire_if_live(s.tgid, s.first + index * PAGE);
    0
}

/// The death record of a traced process, created on first use.
#[inline(always)]
fn death_of(tgid: u32) -> Option<&'static mut DeathInfo> {
    unsafe { TARGETS.get(&tgid) }?;
    if let Some(d) = DEATHS.get_ptr_mut(&tgid) {
        return Some(unsafe { &mut *d });
    }
    let _ = DEATHS.insert(&tgid, &DeathInfo::default(), 0);
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
    let pid: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    if let Some(d) = death_of(pid as u32) {
        d.flags |= death::OOM_VICTIM;
    }
    0
}

/// `signal:signal_generate`: who sent a traced process a signal that would end it.
#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let sig: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    let pid: i32 = unsafe { ctx.read_at(36) }.unwrap_or(0);
    let result: i32 = unsafe { ctx.read_at(44) }.unwrap_or(-1);
    // 0: TRACE_SIGNAL_DELIVERED (queued to the target).
    if result != 0 || !fatal_by_default(sig as u32) {
        return 0;
    }
    if let Some(d) = death_of(pid as u32) {
        d.sender_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        d.sent_signal = sig as u32;
        d.sender_comm = bpf_get_current_comm().unwrap_or_default();
    }
    0
}

/// `signal:signal_deliver`: a traced process takes a signal; with its default action (no
/// handler) a fatal one ends it.
#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let sig: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    let handler: u64 = unsafe { ctx.read_at(24) }.unwrap_or(1);
    // SIG_DFL is 0.
    if handler != 0 || !fatal_by_default(sig as u32) {
        return 0;
    }
    if let Some(d) = death_of(tgid) {
        d.flags |= death::SIGNALED;
        d.signal = sig as u32;
    }
    0
}

/// `syscalls:sys_enter_exit_group`: a traced process exits with a status.
#[tracepoint]
pub fn exit_group(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(flags) = (unsafe { TARGETS.get(&tgid) }) else {
        return 0;
    };
    if *flags & TARGET_FOLLOW_FORKS == 0 {
        return 0;
    }
    let child: i32 = unsafe { ctx.read_at(20) }.unwrap_or(0);
    let _ = FORKED.insert(&(child as u32), &tgid, 0);
    0
}

/// `syscalls:sys_exit_{clone,clone3,fork,vfork}`, also run by a new task on its first return to
/// user space: a new process of a followed parent is traced from its first instruction. It is
/// stopped and announced, and userspace attaches its probes and lets it go.
#[tracepoint]
pub fn fork_return(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(parent) = (unsafe { FORKED.get(&tid) }).copied() else {
        return 0;
    };
    let _ = FORKED.remove(&tid);
    if tid != tgid {
        return 0; // a new thread of a traced process, already covered
    }
    let Some(flags) = (unsafe { TARGETS.get(&parent) }).copied() else {
        return 0;
    };
    // Only `run`'s own child is stopped at shutdown (leaktrace is its tracer and takes that
    // stop); the child starts unfrozen whatever its parent's state.
    let flags = flags & !(TARGET_STOP_AT_FINALIZE | TARGET_FROZEN);
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
    if EVENTS.output::<ForkEvent>(&ev, 0).is_ok() {
        unsafe { bpf_send_signal_thread(SIGSTOP) };
    } else {
        bump(Counter::ForksMissed);
    }
    0
}

/// `sched:sched_process_exec`: a followed process replaced its program. Its records so far
/// stay; its new program is not traced (userspace drops it from `TARGETS`, except `run`'s own
/// child, whose exec leaktrace follows through ptrace).
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(flags) = (unsafe { TARGETS.get(&tgid) }) else {
        return 0;
    };
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
        bump(Counter::RingbufFull);
    }
    0
}
