//! The names userspace finds the kernel side's maps, programs and globals by, the tracepoints
//! each tracepoint program is written for (it reads that event's record layout), and the sizes
//! both sides rely on. The BPF side names maps, programs and globals by their Rust identifiers;
//! `leaktrace`'s `probes::names` test checks every name here against the built object.

/// Maps userspace opens, by name.
pub mod map {
    /// Traced processes (tgid → `TARGET_*` flags).
    pub const TARGETS: &str = "TARGETS";
    /// The session's control word (`Array<u32>`, one entry, `CONTROL_*` bits).
    pub const CONTROL: &str = "CONTROL";
    /// Every live traced block (`LiveKey` → `LiveAlloc`).
    pub const LIVE: &str = "LIVE";
    /// Per-site identity and counters (site id → `SiteStats`).
    pub const SITES: &str = "SITES";
    /// The ring buffer of announcements (new sites, stack copies, lifecycle, forks).
    pub const EVENTS: &str = "EVENTS";
    /// Unwind rows learned from stack copies (`UnwindKey` → `UnwindRow`).
    pub const UNWIND: &str = "UNWIND";
    /// How to walk each Python process's frames (tgid → `PyOffsets`).
    pub const PYPROCS: &str = "PYPROCS";
    /// Python thread states (tid → `PyThreadState*`).
    pub const THREADS: &str = "THREADS";
    /// How traced processes ended (tgid → `DeathInfo`).
    pub const DEATHS: &str = "DEATHS";
    /// The drop and event counters (per CPU, indexed by `Counter`).
    pub const COUNTERS: &str = "COUNTERS";
    /// The sampler's table of exponential gaps.
    pub const SAMPLING: &str = "SAMPLING";
    /// One stack copy per CPU; userspace sizes it to the CPUs.
    pub const STACKBUF: &str = "STACKBUF";
    /// Growth mode: each traced process's last program break (tgid → address).
    pub const BRKS: &str = "BRKS";
    /// The heap-sampling USDT sites attached (attach cookie → `UsdtSpec`).
    pub const USDT_SPECS: &str = "USDT_SPECS";
}

/// Programs, by name.
pub mod program {
    /// Entry of every allocating function (uprobe; the cookie is the `AllocFn`).
    pub const ALLOC_ENTER: &str = "alloc_enter";
    /// Return of every allocating function (uretprobe).
    pub const ALLOC_EXIT: &str = "alloc_exit";
    /// Entry of every freeing function (uprobe).
    pub const FREE_ENTER: &str = "free_enter";
    /// Entry of an interpreter lifecycle function (uprobe; the cookie is the event kind).
    pub const LIFECYCLE_ENTER: &str = "lifecycle_enter";
    /// A heap-sampling USDT (`alloc` or `free`; the cookie keys `USDT_SPECS`).
    pub const USDT_ENTER: &str = "usdt_enter";
    /// The programs that draw from the kernel's byte sampler: its `SAMPLING` table is filled
    /// before one is first attached.
    pub const KERNEL_SAMPLER: [&str; 1] = [ALLOC_EXIT];
    /// The uprobe programs, each loaded when a session first attaches it.
    pub const UPROBES: [&str; 5] = [
        ALLOC_ENTER,
        ALLOC_EXIT,
        FREE_ENTER,
        LIFECYCLE_ENTER,
        USDT_ENTER,
    ];
}

/// Globals userspace sets before loading (`EbpfLoader::override_global`).
pub mod global {
    /// Allocations smaller than this are not tracked (`u64`).
    pub const MIN_SIZE: &str = "MIN_SIZE";
    /// Non-zero: every program returns at once, the probes' cost floor (`u8`).
    pub const FLOOR_MODE: &str = "FLOOR_MODE";
    /// Sites past which new Python stacks fold into their native caller (`u64`).
    pub const SITES_SOFT_LIMIT: &str = "SITES_SOFT_LIMIT";
    /// Bytes of user stack copied per new site (`u32`).
    pub const STACK_COPY: &str = "STACK_COPY";
    /// Native return addresses folded into a site id (`u32`).
    pub const NATIVE_DEPTH: &str = "NATIVE_DEPTH";
    /// Python frames recorded per site (`u32`).
    pub const PY_MAX_DEPTH: &str = "PY_MAX_DEPTH";
    /// Mean bytes between samples; 0 traces every allocation (`u64`).
    pub const SAMPLE_RATE: &str = "SAMPLE_RATE";
    /// leaktrace's PID namespace (nsfs device, `u64`), when it is not the initial one.
    pub const TRACER_PIDNS_DEV: &str = "TRACER_PIDNS_DEV";
    /// leaktrace's PID namespace (inode, `u64`), 0 for the initial one.
    pub const TRACER_PIDNS_INO: &str = "TRACER_PIDNS_INO";
    /// Offset of `child_pid` in `sched_process_fork`'s record on this kernel (`u32`).
    pub const FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
}

/// A tracepoint program and the event it reads: (program, category, event).
pub type Tracepoint = (&'static str, &'static str, &'static str);

/// How traced processes die.
pub const DEATH_TRACEPOINTS: [Tracepoint; 4] = [
    ("oom_victim", "oom", "mark_victim"),
    ("signal_generate", "signal", "signal_generate"),
    ("signal_deliver", "signal", "signal_deliver"),
    ("exit_group", "syscalls", "sys_enter_exit_group"),
];
/// Growth mode: memory given back.
pub const GROWTH_TRACEPOINTS: [Tracepoint; 3] = [
    ("unmap", "syscalls", "sys_enter_munmap"),
    ("madvise", "syscalls", "sys_enter_madvise"),
    ("brk_exit", "syscalls", "sys_exit_brk"),
];
/// Growth mode's page-fault programs, attached as raw tracepoints (program = tracepoint).
pub const GROWTH_RAW_TRACEPOINTS: [&str; 2] = ["page_fault_user", "page_fault_kernel"];
/// `--follow-forks`: the fork, exec, and a new task's first return to user space.
pub const FORK_TRACEPOINTS: [Tracepoint; 6] = [
    ("process_fork", "sched", "sched_process_fork"),
    ("process_exec", "sched", "sched_process_exec"),
    ("fork_return", "syscalls", "sys_exit_clone"),
    ("fork_return", "syscalls", "sys_exit_clone3"),
    ("fork_return", "syscalls", "sys_exit_fork"),
    ("fork_return", "syscalls", "sys_exit_vfork"),
];

/// `child_pid`'s offset in `sched_process_fork` with `__data_loc` names (6.18), the default
/// when the format file cannot be read.
pub const FORK_CHILD_PID_OFFSET: u32 = 20;

/// Capacity of `UNWIND` (rows): userspace stops teaching rows past half of it.
pub const UNWIND_ROWS: u32 = 1 << 17;
/// Default capacity of `LIVE` and `SITES` (`--max-live`, `--max-sites`).
pub const DEFAULT_TABLE_ENTRIES: u32 = 1 << 20;
/// Default bytes of user stack copied per new site (`--stack-copy`).
pub const DEFAULT_STACK_COPY: u32 = 16 << 10;
/// Default Python frames per site (`--python-depth`).
pub const DEFAULT_PY_DEPTH: u32 = 64;

/// The share of `SITES` kept for stacks folded into their native caller: a quarter. Past
/// `sites_soft_limit(max)` sites, new Python stacks are folded.
pub const fn sites_soft_limit(max_sites: u32) -> u64 {
    (max_sites - max_sites / 4) as u64
}
