//! The map keys and values both sides read and write: a call in flight (`PENDING`), a live
//! block (`LIVE`), a site's counters (`SITES`) and how a process died (`DEATHS`).

/// Per-thread state between an allocator's entry and its return (`PENDING`, keyed by tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// Stack pointer at the outermost entry; a deeper call has a lower one.
    pub sp: u64,
    /// Requested size in bytes (nmemb * size for calloc).
    pub size: u64,
    /// The block a realloc moves, or 0.
    pub old_ptr: u64,
    /// Where posix_memalign stores the new pointer.
    pub out_ptr: u64,
    /// Return address of the outermost allocator call: the allocation site.
    pub caller: u64,
    /// Nesting depth of allocator calls on this thread.
    pub depth: u32,
    /// `AllocFn` of the outermost call.
    pub func: u8,
    pub _pad: [u8; 3],
}

/// Key of `LIVE`: one allocated block of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Value of `DEATHS` (keyed by tgid): how a traced process ended, as the kernel saw it, so a
/// process leaktrace attached to (and cannot wait for) still has its cause of death named.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeathInfo {
    /// `death::*` bits.
    pub flags: u32,
    /// The fatal signal delivered (with its default action), or 0.
    pub signal: u32,
    /// `exit_group`'s status, when `death::EXITED`.
    pub exit_code: i32,
    /// The last process that sent the target a signal whose default action ends it, and which
    /// signal (matched against `signal` by userspace: a handled signal is not the cause).
    pub sender_tgid: u32,
    pub sent_signal: u32,
    pub _pad: u32,
    pub sender_comm: [u8; 16],
}

/// `DeathInfo::flags`.
pub mod death {
    /// The OOM killer chose the process (`oom:mark_victim`).
    pub const OOM_VICTIM: u32 = 1;
    /// The process called `exit_group`.
    pub const EXITED: u32 = 2;
    /// A signal whose default action ends the process was delivered to it.
    pub const SIGNALED: u32 = 4;
}

/// Value of `LIVE`: what is known about a block that has not been freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveAlloc {
    pub size: u64,
    /// `bpf_ktime_get_ns()` at allocation.
    pub ts_ns: u64,
    pub site_id: u64,
    /// Bytes the block stands for: its size, or more when it was sampled (`sample_weight`).
    pub weight: u64,
    /// Blocks it stands for: 1, or more when it was sampled (`sample_count`).
    pub count: u32,
    pub func: u8,
    pub _pad: [u8; 3],
}

/// Value of `SITES`, keyed by site id: the site's identity and its counters, updated with
/// atomic adds by the kernel (frees add the two's complement) and read by userspace every
/// interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SiteStats {
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocs: u64,
    pub alloc_bytes: u64,
    pub frees: u64,
    /// Identity (kept here too so a site whose ring-buffer record was lost is still reportable).
    pub tgid: u32,
    pub func: u8,
    /// Bit 0: the site's record (with its Python stack) reached the ring buffer; bit 1: its
    /// stack copy did. Until both have, every allocation from the site tries again. Bit 2
    /// (`SITE_COPY_MISSED`): a copy due for a cut site's later allocation could not be sent.
    pub announced: u8,
    pub _pad: [u8; 2],
    /// The allocation's return address.
    pub caller: u64,
    /// Frees of blocks older than `OLD_BLOCK_NS`: a cache evicting, a queue draining. A leak's
    /// blocks are never freed, however old.
    pub frees_old: u64,
}

/// `SiteStats::announced` bit: a site whose id the kernel cut short (`NewSiteEvent::id_cut`)
/// allocated again while its rows were still unknown, and the stack copy that would have shown
/// that allocation's path could not be sent (the ring buffer was behind): userspace cannot tell
/// that the site holds one path only.
pub const SITE_COPY_MISSED: u8 = 4;

/// Age past which a freed block counts in `SiteStats::frees_old`.
pub const OLD_BLOCK_NS: u64 = 5_000_000_000;
