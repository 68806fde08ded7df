//! The ABI shared by leaktrace's BPF programs and its userspace loader.
//!
//! Everything the kernel side and userspace exchange — map keys and values, ring-buffer records,
//! the attach cookie that tells a generic probe which allocator function it sits on, and the
//! indices of the drop counters — is defined here once, `#[repr(C)]`, so both sides agree by
//! construction. The crate is `no_std` so the BPF programs (`src/main.rs`) can use it; with the
//! `user` feature it also implements `aya::Pod` for the host.
#![no_std]

mod counters;
mod names;
mod native;
mod py;
mod sample;
pub use counters::*;
pub use names::*;
pub use native::*;
pub use py::*;
pub use sample::*;

/// The allocator entry points leaktrace probes. The discriminant is the uprobe's attach cookie.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocFn {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    Free = 9,
    /// `_PyObject_Malloc(ctx, size)`: pymalloc's implementation, reached through the allocator table.
    PyObjectMallocImpl = 10,
    PyObjectCallocImpl = 11,
    PyObjectReallocImpl = 12,
    PyObjectFreeImpl = 13,
    /// Exported API, used when the pymalloc functions are not in a symbol table.
    PyObjectMalloc = 14,
    PyObjectCalloc = 15,
    PyObjectRealloc = 16,
    PyObjectFree = 17,
    PyMemMalloc = 18,
    PyMemCalloc = 19,
    PyMemRealloc = 20,
    PyMemFree = 21,
    /// Not a function: a page of memory touched for the first time (growth mode, from the
    /// page-fault tracepoints), so the process's resident memory grew.
    PageFault = 22,
    /// pymalloc's arena allocator (`_PyObject_ArenaMmap(ctx, size)` up to 3.11,
    /// `_PyMem_ArenaAlloc(ctx, size)` from 3.12): one 1 MiB arena, reached through the
    /// allocator table. The default coverage sees small Python objects this way: one call per
    /// 1 MiB of pymalloc's growth, instead of one per object.
    PyArenaAlloc = 23,
    /// `_PyObject_ArenaMunmap(ctx, ptr, size)` / `_PyMem_ArenaFree(ctx, ptr, size)`.
    PyArenaFree = 24,
}

/// How a function takes and returns its memory; decides which registers a probe reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `p = f(size)`
    Malloc,
    /// `p = f(nmemb, size)`
    Calloc,
    /// `p = f(old, size)`
    Realloc,
    /// `p = f(old, nmemb, size)`
    ReallocArray,
    /// `p = f(align, size)`
    Memalign,
    /// `rc = f(&p, align, size)`
    PosixMemalign,
    /// `f(p)`
    Free,
}

/// Which allocator a function belongs to, as shown in reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Libc,
    Python,
    /// Resident pages (growth mode).
    Pages,
    /// pymalloc's arenas: the memory small Python objects live in, 1 MiB at a time.
    Arena,
}

impl AllocFn {
    /// Every function, in discriminant order.
    pub const ALL: [AllocFn; 25] = [
        AllocFn::Malloc,
        AllocFn::Calloc,
        AllocFn::Realloc,
        AllocFn::Reallocarray,
        AllocFn::PosixMemalign,
        AllocFn::AlignedAlloc,
        AllocFn::Memalign,
        AllocFn::Valloc,
        AllocFn::Pvalloc,
        AllocFn::Free,
        AllocFn::PyObjectMallocImpl,
        AllocFn::PyObjectCallocImpl,
        AllocFn::PyObjectReallocImpl,
        AllocFn::PyObjectFreeImpl,
        AllocFn::PyObjectMalloc,
        AllocFn::PyObjectCalloc,
        AllocFn::PyObjectRealloc,
        AllocFn::PyObjectFree,
        AllocFn::PyMemMalloc,
        AllocFn::PyMemCalloc,
        AllocFn::PyMemRealloc,
        AllocFn::PyMemFree,
        AllocFn::PageFault,
        AllocFn::PyArenaAlloc,
        AllocFn::PyArenaFree,
    ];

    /// Decodes an attach cookie or a stored discriminant.
    #[inline(always)]
    pub fn from_u8(v: u8) -> Option<AllocFn> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The symbol this function is found under.
    pub fn symbol(self) -> &'static str {
        match self {
            AllocFn::Malloc => "malloc",
            AllocFn::Calloc => "calloc",
            AllocFn::Realloc => "realloc",
            AllocFn::Reallocarray => "reallocarray",
            AllocFn::PosixMemalign => "posix_memalign",
            AllocFn::AlignedAlloc => "aligned_alloc",
            AllocFn::Memalign => "memalign",
            AllocFn::Valloc => "valloc",
            AllocFn::Pvalloc => "pvalloc",
            AllocFn::Free => "free",
            AllocFn::PyObjectMallocImpl => "_PyObject_Malloc",
            AllocFn::PyObjectCallocImpl => "_PyObject_Calloc",
            AllocFn::PyObjectReallocImpl => "_PyObject_Realloc",
            AllocFn::PyObjectFreeImpl => "_PyObject_Free",
            AllocFn::PyObjectMalloc => "PyObject_Malloc",
            AllocFn::PyObjectCalloc => "PyObject_Calloc",
            AllocFn::PyObjectRealloc => "PyObject_Realloc",
            AllocFn::PyObjectFree => "PyObject_Free",
            AllocFn::PyMemMalloc => "PyMem_Malloc",
            AllocFn::PyMemCalloc => "PyMem_Calloc",
            AllocFn::PyMemRealloc => "PyMem_Realloc",
            AllocFn::PyMemFree => "PyMem_Free",
            AllocFn::PageFault => "page fault",
            AllocFn::PyArenaAlloc => "_PyObject_ArenaMmap",
            AllocFn::PyArenaFree => "_PyObject_ArenaMunmap",
        }
    }

    /// The name the function has in other CPython versions (3.12 renamed the arena functions).
    pub fn other_symbol(self) -> Option<&'static str> {
        match self {
            AllocFn::PyArenaAlloc => Some("_PyMem_ArenaAlloc"),
            AllocFn::PyArenaFree => Some("_PyMem_ArenaFree"),
            _ => None,
        }
    }

    /// The name reports give the allocator: its symbol, or what it stands for when the symbol
    /// differs between versions.
    pub fn label(self) -> &'static str {
        match self {
            AllocFn::PyArenaAlloc => "pymalloc arena",
            AllocFn::PyArenaFree => "pymalloc arena free",
            _ => self.symbol(),
        }
    }

    /// The argument/return convention of the function.
    #[inline(always)]
    pub fn shape(self) -> Shape {
        match self {
            AllocFn::Malloc
            | AllocFn::Valloc
            | AllocFn::Pvalloc
            | AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectMalloc
            | AllocFn::PyMemMalloc
            | AllocFn::PyArenaAlloc
            | AllocFn::PageFault => Shape::Malloc,
            AllocFn::Calloc
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectCalloc
            | AllocFn::PyMemCalloc => Shape::Calloc,
            AllocFn::Realloc
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectRealloc
            | AllocFn::PyMemRealloc => Shape::Realloc,
            AllocFn::Reallocarray => Shape::ReallocArray,
            AllocFn::AlignedAlloc | AllocFn::Memalign => Shape::Memalign,
            AllocFn::PosixMemalign => Shape::PosixMemalign,
            AllocFn::Free
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyObjectFree
            | AllocFn::PyMemFree
            | AllocFn::PyArenaFree => Shape::Free,
        }
    }

    /// The index of the first real argument: pymalloc's implementation functions take the
    /// allocator context first (`_PyObject_Malloc(void *ctx, size_t size)`).
    #[inline(always)]
    pub fn first_arg(self) -> usize {
        match self {
            AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyArenaAlloc
            | AllocFn::PyArenaFree => 1,
            _ => 0,
        }
    }

    /// Which allocator the function belongs to.
    pub fn family(self) -> Family {
        match self {
            AllocFn::Malloc
            | AllocFn::Calloc
            | AllocFn::Realloc
            | AllocFn::Reallocarray
            | AllocFn::PosixMemalign
            | AllocFn::AlignedAlloc
            | AllocFn::Memalign
            | AllocFn::Valloc
            | AllocFn::Pvalloc
            | AllocFn::Free => Family::Libc,
            AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyObjectMalloc
            | AllocFn::PyObjectCalloc
            | AllocFn::PyObjectRealloc
            | AllocFn::PyObjectFree
            | AllocFn::PyMemMalloc
            | AllocFn::PyMemCalloc
            | AllocFn::PyMemRealloc
            | AllocFn::PyMemFree => Family::Python,
            AllocFn::PageFault => Family::Pages,
            AllocFn::PyArenaAlloc | AllocFn::PyArenaFree => Family::Arena,
        }
    }

    /// Whether calls of this function with a NULL pointer do nothing, so a probe may sit after the
    /// function's own NULL check.
    pub fn null_is_noop(self) -> bool {
        self.shape() == Shape::Free
    }

    /// The argument index holding the pointer that a free releases or a realloc moves.
    #[inline(always)]
    pub fn ptr_arg(self) -> usize {
        self.first_arg()
    }
}

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
    /// stack copy did. Until both have, every allocation from the site tries again.
    pub announced: u8,
    pub _pad: [u8; 2],
    /// The allocation's return address.
    pub caller: u64,
    /// Frees of blocks older than `OLD_BLOCK_NS`: a cache evicting, a queue draining. A leak's
    /// blocks are never freed, however old.
    pub frees_old: u64,
}

/// Age past which a freed block counts in `SiteStats::frees_old`.
pub const OLD_BLOCK_NS: u64 = 5_000_000_000;

/// A traced process forked a child, which is stopped until its probes are attached
/// (`--follow-forks`).
pub const EVENT_FORK: u32 = 4;

/// A followed child exec'd another program (`--follow-forks`); it is no longer traced.
pub const EVENT_EXEC: u32 = 5;

/// Ring-buffer record sent when a traced process forks a child that leaktrace follows
/// (`EVENT_FORK`, parent and child), or when a followed child execs (`EVENT_EXEC`, child only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkEvent {
    pub kind: u32,
    pub parent: u32,
    pub child: u32,
    pub _pad: u32,
}

/// Ring-buffer record kinds (the first `u32` of every record): a new site.
pub const EVENT_NEW_SITE: u32 = 1;
/// The interpreter of a traced process began shutting down (`Py_FinalizeEx`).
pub const EVENT_FINALIZE: u32 = 2;
/// The interpreter of a traced process finished starting up (the `site` import and `.pth`
/// files included) and is about to run the main module, `-c` or `-m` (`Py_RunMain`).
pub const EVENT_MAIN: u32 = 6;

/// Ring-buffer record sent at an interpreter's lifecycle points (`EVENT_MAIN`,
/// `EVENT_FINALIZE`): the type census's baseline is taken when the main module starts, and from
/// finalization on allocations and frees are no longer counted, so the report shows what the
/// program still held when it finished, before the interpreter's teardown freed module globals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LifecycleEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
}

/// Ring-buffer record sent once per new site, so userspace decodes and symbolizes it while the
/// process lives.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NewSiteEvent {
    pub kind: u32,
    pub tgid: u32,
    pub site_id: u64,
    pub ts_ns: u64,
    pub func: u8,
    /// One of `py_status`.
    pub py_status: u8,
    /// The walk stopped at the depth limit: outer frames are missing.
    pub py_truncated: u8,
    pub _pad: u8,
    /// Thread that first allocated from this site.
    pub tid: u32,
    /// The native return addresses the kernel walked, innermost (the caller) first: the ones
    /// folded into the site id, then, for a new site, as many more as it had rows for.
    pub native: [u64; MAX_NATIVE_WALK],
    /// Number of valid entries in `native`.
    pub native_depth: u32,
    /// How the walk ended (`native_end`).
    pub native_end: u8,
    pub _pad3: [u8; 3],
    /// Number of valid entries in `py_frames`, innermost first.
    pub py_depth: u32,
    /// Bit i set: `py_frames[i]` is the outermost frame of one run of the eval loop (an entry
    /// frame), so the next frame out belongs to an eval loop further down the native stack.
    pub py_entry: [u64; MAX_PY_FRAMES / 64],
    pub py_frames: [PyFrameRec; MAX_PY_FRAMES],
}

impl Default for NewSiteEvent {
    fn default() -> Self {
        Self {
            kind: 0,
            tgid: 0,
            site_id: 0,
            ts_ns: 0,
            func: 0,
            py_status: 0,
            py_truncated: 0,
            _pad: 0,
            tid: 0,
            native: [0; MAX_NATIVE_WALK],
            native_depth: 0,
            native_end: 0,
            _pad3: [0; 3],
            py_depth: 0,
            py_entry: [0; MAX_PY_FRAMES / 64],
            py_frames: [PyFrameRec::default(); MAX_PY_FRAMES],
        }
    }
}

/// Value of `TARGETS` (keyed by tgid): per-process tracing flags.
pub const TARGET_TRACED: u32 = 1;
/// Set by the kernel when the process's interpreter began finalizing: accounting stops.
pub const TARGET_FROZEN: u32 = 2;
/// Pause the process (SIGSTOP to the thread) at its interpreter's lifecycle points (main
/// module start, shutdown), so userspace takes the type census there and decodes every Python
/// stack while the code objects still exist. Only for `run`'s own child: leaktrace is its ptrace
/// tracer and swallows that stop (a tracer's death resumes a tracee in a signal stop and drops
/// the signal, so the pause never outlives leaktrace).
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

/// Set when the session ends (or leaktrace dies, by its guardian): the kernel stops no process
/// any more, so nothing can be held with no one left to let it go.
pub const CONTROL_HOLDS_OFF: u32 = 1;

/// The start of a site id: a 64-bit mix of the process and the allocator function. Native
/// return addresses are folded in with `site_id_add_pc`, Python frames with
/// `site_id_add_frame`.
#[inline(always)]
pub fn site_id_start(tgid: u32, func: u8) -> u64 {
    mix64(((tgid as u64) << 8) | func as u64)
}

/// Folds one native return address into a site id.
#[inline(always)]
pub fn site_id_add_pc(h: u64, pc: u64) -> u64 {
    mix64(h ^ pc)
}

/// Folds one Python frame into a site id: the same call path gives the same id, any other
/// code object or instruction gives another.
#[inline(always)]
pub fn site_id_add_frame(h: u64, f: &PyFrameRec) -> u64 {
    mix64(mix64(h ^ f.code) ^ f.instr)
}

/// Site ids are never 0 (0 means "no site").
#[inline(always)]
pub fn site_id_finish(h: u64) -> u64 {
    if h == 0 {
        1
    } else {
        h
    }
}

/// splitmix64's finalizer: cheap in BPF, good avalanche.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for LiveKey {}
    unsafe impl aya::Pod for LiveAlloc {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for NewSiteEvent {}
    unsafe impl aya::Pod for LifecycleEvent {}
    unsafe impl aya::Pod for DeathInfo {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for PyOffsets {}
    unsafe impl aya::Pod for PyFrameRec {}
    unsafe impl aya::Pod for UnwindKey {}
    unsafe impl aya::Pod for UnwindRow {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn alloc_fn_roundtrips_through_cookie() {
        for f in AllocFn::ALL {
            assert_eq!(AllocFn::from_u8(f as u8), Some(f));
        }
        assert_eq!(AllocFn::from_u8(AllocFn::ALL.len() as u8), None);
    }

    #[test]
    fn counters_are_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn python_frames_change_the_site_id() {
        let base = site_id_add_pc(site_id_start(1, 0), 0x1000);
        let a = PyFrameRec {
            code: 0x10,
            instr: 0x20,
            check: 0,
        };
        let b = PyFrameRec {
            code: 0x10,
            instr: 0x22,
            check: 0,
        };
        // The check bytes are not part of the identity.
        let a_checked = PyFrameRec { check: 7, ..a };
        assert_eq!(
            site_id_add_frame(base, &a),
            site_id_add_frame(base, &a_checked)
        );
        assert_ne!(site_id_add_frame(base, &a), site_id_add_frame(base, &b));
        assert_ne!(site_id_add_frame(base, &a), base);
        let ab = site_id_add_frame(site_id_add_frame(base, &a), &b);
        let ba = site_id_add_frame(site_id_add_frame(base, &b), &a);
        assert_ne!(ab, ba, "frame order matters");
        assert_eq!(site_id_finish(0), 1);
    }

    #[test]
    fn site_ids_separate_processes_functions_and_callers() {
        let id = |tgid, func, pcs: &[u64]| {
            pcs.iter()
                .fold(site_id_start(tgid, func), |h, pc| site_id_add_pc(h, *pc))
        };
        let a = id(1, 0, &[0x1000, 0x2000]);
        assert_ne!(a, id(2, 0, &[0x1000, 0x2000]));
        assert_ne!(a, id(1, 1, &[0x1000, 0x2000]));
        assert_ne!(a, id(1, 0, &[0x1001, 0x2000]));
        assert_ne!(a, id(1, 0, &[0x1000, 0x2001]), "a different outer caller");
        assert_ne!(a, id(1, 0, &[0x2000, 0x1000]));
        assert_eq!(a, id(1, 0, &[0x1000, 0x2000]));
    }

    #[test]
    fn unwind_step_follows_sp_and_frame_pointer_rows() {
        // A stack at 0x1000: [0x1000] local, [0x1008] saved rbp, [0x1010] return address.
        let mem = |a: u64| match a {
            0x1008 => Some(0x2000),
            0x1010 => Some(0xdead),
            _ => None,
        };
        let r = FrameRegs {
            pc: 1,
            sp: 0x1000,
            bp: 0x7777,
        };
        // CFA = rsp + 24, rbp saved at CFA-16.
        let row = UnwindRow {
            cfa_off: 24,
            bp_off: -16,
            cfa_reg: CFA_SP,
            flags: 0,
        };
        let up = row.step(r, mem).unwrap();
        assert_eq!((up.pc, up.sp, up.bp), (0xdead, 0x1018, 0x2000));
        // The same frame through its frame pointer (rbp = 0x1008).
        let fp = UnwindRow::FRAME_POINTER
            .step(FrameRegs { bp: 0x1008, ..r }, mem)
            .unwrap();
        assert_eq!((fp.pc, fp.sp, fp.bp), (0xdead, 0x1018, 0x2000));
        // A row that would move the stack pointer down is refused, as is an unreadable slot.
        let back = UnwindRow { cfa_off: -8, ..row };
        assert!(back.step(r, mem).is_none());
        let far = UnwindRow {
            cfa_off: 64,
            bp_off: 0,
            ..row
        };
        assert!(far.step(r, mem).is_none());
    }

    #[test]
    fn pymalloc_impl_functions_take_ctx_first() {
        assert_eq!(AllocFn::PyObjectMallocImpl.first_arg(), 1);
        assert_eq!(AllocFn::PyObjectMalloc.first_arg(), 0);
        assert_eq!(AllocFn::PyObjectFreeImpl.family(), Family::Python);
        assert_eq!(AllocFn::Free.family(), Family::Libc);
        assert_eq!(AllocFn::PyArenaAlloc.first_arg(), 1);
        assert_eq!(AllocFn::PyArenaFree.ptr_arg(), 1);
        assert_eq!(AllocFn::PyArenaFree.family(), Family::Arena);
    }
}
