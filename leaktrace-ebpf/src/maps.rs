//! The programs' shared state, named by userspace: the globals it sets at load (`#[no_mangle]`
//! keeps their symbols) and the maps it opens (`#[map]` names each after its static). The names
//! are part of the ABI (`leaktrace_ebpf::map` and `global`, checked against the built object),
//! so none may change.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leaktrace_ebpf::{
    DeathInfo, LiveAlloc, LiveKey, NewSiteEvent, Pending, PyOffsets, SiteStats, StackEvent,
    UnwindKey, UnwindRow, UsdtSpec, MAX_NATIVE_FRAMES, NUM_COUNTERS, USDT_SPEC_ENTRIES,
};

use crate::py_window::{PyWindow, TstateBytes};
use crate::python::WalkCtx;
use crate::unwind::{NativeWalk, StackWindow};

/// Allocations smaller than this are not tracked (`--min-size`).
#[no_mangle]
pub(crate) static MIN_SIZE: u64 = 0;
/// When non-zero every program returns at once: the cost floor of the probes themselves.
#[no_mangle]
pub(crate) static FLOOR_MODE: u8 = 0;
/// Sites created so far (in `.bss`, counted with atomic adds).
#[no_mangle]
pub(crate) static mut SITE_COUNT: u64 = 0;
/// Past this many sites, new Python stacks are folded into their native caller: the rest of
/// `SITES` is kept for those coarse sites, so no allocation goes uncounted.
#[no_mangle]
pub(crate) static SITES_SOFT_LIMIT: u64 =
    leaktrace_ebpf::sites_soft_limit(leaktrace_ebpf::DEFAULT_TABLE_ENTRIES);

/// Bytes of user stack copied for each new site (`--stack-copy`), at most `MAX_STACK_COPY`.
#[no_mangle]
pub(crate) static STACK_COPY: u32 = leaktrace_ebpf::DEFAULT_STACK_COPY;

/// Native return addresses folded into a site id, at most `MAX_NATIVE_FRAMES`.
#[no_mangle]
pub(crate) static NATIVE_DEPTH: u32 = MAX_NATIVE_FRAMES as u32;

/// Python frames recorded per site, at most `MAX_PY_FRAMES` (`--python-depth`).
#[no_mangle]
pub(crate) static PY_MAX_DEPTH: u32 = leaktrace_ebpf::DEFAULT_PY_DEPTH;

/// Processes being traced (tgid → flags). The probes are scoped to the target's pid as well; this
/// map lets one loaded object serve several processes (forked workers).
#[map]
pub(crate) static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Per-thread allocator call in flight (tid → pending call).
#[map]
pub(crate) static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(16384, 0);

/// Every live traced block. Not preallocated: memory grows with use, up to the bound userspace
/// sets (`--max-live`).
#[map]
pub(crate) static LIVE: HashMap<LiveKey, LiveAlloc> =
    HashMap::with_max_entries(leaktrace_ebpf::DEFAULT_TABLE_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-site counters and identity, updated with atomic adds from every CPU. Not preallocated:
/// memory grows with the number of distinct sites, up to the bound userspace sets.
#[map]
pub(crate) static SITES: HashMap<u64, SiteStats> =
    HashMap::with_max_entries(leaktrace_ebpf::DEFAULT_TABLE_ENTRIES, BPF_F_NO_PREALLOC);

/// New-site announcements, each with its Python stack (a 1,088-byte header and 24 B per frame
/// walked, 4,160 B at most) and its stack
/// copy (`--stack-copy`, 16 KiB by default). Sized for the burst of new sites while a program
/// imports its modules; a site whose announcement does not fit is announced again later.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES as u32, 0);
/// Size of `EVENTS`, which the senders budget against.
pub(crate) const RING_BYTES: usize = 32 << 20;

/// Unwind rows of return addresses userspace has learned from new sites' stack copies
/// ((tgid, return address) → row): how far the kernel can follow a call path into the site id.
/// Least recently used rows make room; a path whose rows were evicted is learned again.
#[map]
pub(crate) static UNWIND: LruHashMap<UnwindKey, UnwindRow> =
    LruHashMap::with_max_entries(leaktrace_ebpf::UNWIND_ROWS, 0);

/// Return addresses whose rows a stack copy was sent to learn, and when
/// ((tgid, return address) → ns).
#[map]
pub(crate) static REQUESTED: LruHashMap<UnwindKey, u64> = LruHashMap::with_max_entries(1 << 14, 0);

/// Room for one stack copy per CPU (indexed by CPU number; userspace sizes it to the CPUs).
#[map]
pub(crate) static STACKBUF: Array<StackEvent> = Array::with_max_entries(1, 0);

/// How to walk each Python process's frames (tgid → offsets), set by userspace.
#[map]
pub(crate) static PYPROCS: HashMap<u32, PyOffsets> = HashMap::with_max_entries(1024, 0);

/// Thread states of Python threads (tid → `PyThreadState*`): how a thread that allocates
/// without holding the GIL is found. Filled by the kernel's own search of the interpreter's
/// thread list (and refreshed by userspace); least recently used entries make room.
#[map]
pub(crate) static THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1 << 16, 0);

/// The heap-sampling USDT sites attached: attach cookie → where the probe's arguments are.
#[map]
pub(crate) static USDT_SPECS: HashMap<u64, UsdtSpec> =
    HashMap::with_max_entries(USDT_SPEC_ENTRIES, 0);

/// Per-CPU room for building a new-site record and for what the walks read: too big for the
/// stack.
#[repr(C)]
pub(crate) struct Scratch {
    pub(crate) ev: NewSiteEvent,
    pub(crate) tstate: TstateBytes,
    pub(crate) pywin: PyWindow,
    pub(crate) walk: WalkCtx,
    pub(crate) native: NativeWalk,
    pub(crate) window: StackWindow,
}

#[map]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// How traced processes ended (tgid → death), for the post-mortem report.
#[map]
pub(crate) static DEATHS: HashMap<u32, DeathInfo> = HashMap::with_max_entries(1024, 0);

/// The session's control word (`CONTROL_*` bits), set by userspace at the session's end and by
/// leaktrace's guardian process if leaktrace dies.
#[map]
pub(crate) static CONTROL: Array<u32> = Array::with_max_entries(1, 0);

/// Event and drop counters, per CPU (summed by userspace).
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// `bpf_map_create` flag: allocate elements on insert instead of all at creation.
const BPF_F_NO_PREALLOC: u32 = 1;
/// `bpf_ringbuf_query`: bytes written and not yet consumed.
pub(crate) const BPF_RB_AVAIL_DATA: u64 = 0;
/// A stack copy is not attempted unless the ring buffer keeps this much room for site records.
pub(crate) const RING_RESERVE: u64 = 4 << 20;
