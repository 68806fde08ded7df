//! The ids the programs key by and report: a task's tgid and tid as leaktrace knows them.
//!
//! leaktrace may run inside a PID namespace (a privileged container, a sidecar). It names its
//! targets by the ids it sees there, while `bpf_get_current_pid_tgid` gives the initial
//! namespace's. Userspace sets leaktrace's own namespace here when it is not the initial one,
//! and the programs then translate in the kernel.

use aya_ebpf::bindings::bpf_pidns_info;
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, generated::bpf_get_ns_current_pid_tgid};

use crate::read_global;

/// nsfs device of leaktrace's PID namespace; read only when `TRACER_PIDNS_INO` is set.
#[no_mangle]
static TRACER_PIDNS_DEV: u64 = 0;
/// Inode of leaktrace's PID namespace, or 0 when it is the initial one (no translation).
#[no_mangle]
static TRACER_PIDNS_INO: u64 = 0;

/// Whether ids are translated (leaktrace is in a PID namespace of its own).
#[inline(always)]
pub fn translated() -> bool {
    read_global(&TRACER_PIDNS_INO) != 0
}

/// The current task's (tgid, tid) in leaktrace's PID namespace; `None` for a task whose
/// innermost namespace is another one (the helper does not translate from a namespace below:
/// userspace refuses such targets).
#[inline(always)]
pub fn current() -> Option<(u32, u32)> {
    let ino = read_global(&TRACER_PIDNS_INO);
    if ino == 0 {
        let v = bpf_get_current_pid_tgid();
        return Some(((v >> 32) as u32, v as u32));
    }
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most `size_of::<bpf_pidns_info>()` bytes into `ns`.
    let rc = unsafe {
        bpf_get_ns_current_pid_tgid(
            read_global(&TRACER_PIDNS_DEV),
            ino,
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    (rc == 0).then_some((ns.tgid, ns.pid))
}

/// The current task's tgid in leaktrace's PID namespace, or 0 when it is not visible there.
#[inline(always)]
pub fn current_tgid() -> u32 {
    current().map_or(0, |(tgid, _)| tgid)
}

/// The current task's tid in the initial PID namespace: the id tracepoints give for other tasks.
#[inline(always)]
pub fn global_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// The current task's tgid in the initial PID namespace.
#[inline(always)]
pub fn global_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}
