//! The per-process flags of `TARGETS` and the session's control word (`CONTROL`): how userspace
//! tells the kernel whom to trace and when to stop holding processes, and how the kernel reports
//! back where each process is.

/// Value of `TARGETS` (keyed by tgid): per-process tracing flags.
pub const TARGET_TRACED: u32 = 1;
/// Set by the kernel when the process's interpreter began finalizing: accounting stops.
pub const TARGET_FROZEN: u32 = 2;
/// Pause the process (SIGSTOP to the thread) at its interpreter's lifecycle points (main
/// module start, shutdown), so userspace takes the type census there and decodes every Python
/// stack while the code objects still exist. Only for `run`'s own child: leaktrace is its ptrace
/// tracer and swallows that stop. A tracer's death resumes a tracee in a signal stop and drops
/// the signal; a stop still on its way when the tracer goes is lifted by the guardian
/// (`TARGET_PAUSE_SENT`).
pub const TARGET_PAUSE: u32 = 4;
/// Children the process forks are traced too (`--follow-forks`).
pub const TARGET_FOLLOW_FORKS: u32 = 8;
/// A child followed since its fork: stopped again at exec, so userspace decides whether to
/// follow the new program before it runs.
pub const TARGET_FORKED_CHILD: u32 = 16;
/// The kernel stopped this process with a real SIGSTOP (a followed child at its fork or exec)
/// and userspace has not let it go yet: whoever ends the session clears it and sends SIGCONT.
pub const TARGET_HELD: u32 = 32;

/// Set by the kernel when the process's interpreter entered `Py_RunMain`: its start-up is over.
pub const TARGET_MAIN_STARTED: u32 = 64;

/// Set by the kernel when it sends a lifecycle pause (`TARGET_PAUSE`); cleared by userspace when
/// it takes that stop. Still set when leaktrace dies: the SIGSTOP may land after its tracer has
/// gone and become a real stop, which the guardian undoes.
pub const TARGET_PAUSE_SENT: u32 = 128;

/// Set when the session ends (or leaktrace dies, by its guardian): the kernel stops no process
/// any more, so nothing can be held with no one left to let it go.
pub const CONTROL_HOLDS_OFF: u32 = 1;

/// Set when the window closes on a process that runs on: new blocks are no longer recorded while
/// frees still are, for the moment userspace waits before its last read, so a block the program
/// frees a moment after the window's end is not reported unfreed.
pub const CONTROL_NO_NEW_BLOCKS: u32 = 2;
