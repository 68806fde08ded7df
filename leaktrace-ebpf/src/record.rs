//! Recording an admitted allocation: its site (found by walking its stack, created on first
//! use) and its live block, and announcing each new site to userspace once.

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_loop};
use leaktrace_ebpf::{
    native_end, py_status, site_id_add_pc, site_id_finish, site_id_start, AllocFn, Counter,
    FrameRegs, LiveAlloc, LiveKey, NewSiteEvent, PyFrameRec, SiteStats, UnwindKey,
    CONTROL_NO_NEW_BLOCKS, EVENT_NEW_SITE, MAX_NATIVE_WALK, MAX_PY_FRAMES, SITE_COPY_MISSED,
};

use crate::bump;
use crate::live::remove_stale;
use crate::maps::{
    Scratch, BPF_RB_AVAIL_DATA, CONTROL, EVENTS, LIVE, PYPROCS, REQUESTED, RING_BYTES, SCRATCH,
    SITES, SITES_SOFT_LIMIT, SITE_COUNT,
};
use crate::python::{check_step, python_stack, CheckCtx};
use crate::read_global;
use crate::site::{add, SharedSite};
use crate::unwind::{native_stack, native_stack_rest, send_stack};

/// Records an admitted allocation: its site (walking its stack) and its live block.
#[inline(always)]
pub(crate) fn record_alloc(
    tgid: u32,
    tid: u32,
    ptr: u64,
    size: u64,
    (weight, blocks): (u64, u64),
    func: AllocFn,
    caller: FrameRegs,
) {
    if CONTROL
        .get(0)
        .is_some_and(|c| *c & CONTROL_NO_NEW_BLOCKS != 0)
    {
        return;
    }
    let start = site_id_start(tgid, func as u8);
    let coarse = site_id_add_pc(start, caller.pc);
    let native = native_stack(tgid, caller, start);
    let id = site_id_finish(python_stack(tgid, tid, native));
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let scratch = unsafe { &mut *scratch };
    let id = coarsen_if_full(scratch, id, coarse);
    let Some(stats) = site_stats(id, tgid, func, caller.pc) else {
        return;
    };
    let site = SharedSite::new(stats);
    let cut = id_cut(scratch);
    if site.announced() & ANNOUNCED_STACK == 0 {
        announce(site, scratch, (tgid, tid, id), func, caller, cut);
    } else if cut && site.allocs().wrapping_add(1).is_power_of_two() {
        // A cut id may stand for several call paths: copies of its 2nd, 4th, 8th, ...
        // allocation let userspace see whether they all took the one path its first copy shows.
        if EVENTS.query(BPF_RB_AVAIL_DATA) > (RING_BYTES / 4) as u64
            || !send_stack(tgid, id, caller)
        {
            bump(Counter::StackDeferred);
            site.mark(SITE_COPY_MISSED);
        }
    }
    if !track_block(tgid, ptr, size, id, (weight, blocks), func) {
        return;
    }
    bump(Counter::Allocs);
    site.allocated(blocks, weight);
}

/// Whether the walk just made stopped at an untaught return address while still folding frames
/// into the site id, before the last frame the id takes: the id then lacks frames a whole walk
/// would have folded, and stands for every call path through those walked. (When that address is
/// the eval loop's, the id was whole after all: userspace tells.)
#[inline(always)]
fn id_cut(scratch: &Scratch) -> bool {
    // SAFETY: fields of this CPU's scratch slot, which the walk's callback wrote before.
    let (paused, end, n, hash_max) = unsafe {
        (
            core::ptr::read_volatile(&raw const scratch.native.paused),
            core::ptr::read_volatile(&raw const scratch.native.end),
            core::ptr::read_volatile(&raw const scratch.native.n),
            core::ptr::read_volatile(&raw const scratch.native.hash_max),
        )
    };
    paused == 0 && end == native_end::UNKNOWN && n < hash_max
}

/// The site id to account under: `id`, or, once `SITES` is past its soft limit and `id` is a
/// new site with more than its native caller, `coarse` (the caller alone), with the scratch
/// record cut down to match.
#[inline(always)]
fn coarsen_if_full(scratch: &mut Scratch, id: u64, coarse: u64) -> u64 {
    // SAFETY: an aligned u64 in .bss, read whole; other CPUs only ever add to it atomically.
    let sites = unsafe { core::ptr::read_volatile(&raw const SITE_COUNT) };
    let full = sites >= read_global(&SITES_SOFT_LIMIT);
    if !(full
        && (scratch.ev.py_depth > 0 || scratch.ev.native_depth > 1)
        && SITES.get_ptr_mut(&id).is_none())
    {
        return id;
    }
    // The site map is full: keep accounting under the native caller alone, without the rest of
    // the stack, rather than losing the allocation (or a leak that started late).
    bump(Counter::SitesCoarsened);
    scratch.ev.py_depth = 0;
    scratch.ev.native_depth = 1;
    scratch.ev.native_end = native_end::LIMIT;
    scratch.native.paused = 0;
    scratch.native.end = native_end::LIMIT;
    scratch.ev.py_status = py_status::OVERFLOW;
    site_id_finish(coarse)
}

/// The site's `SITES` value, created (and counted in `SITE_COUNT`) on its first allocation;
/// `None` when the map has no room for it.
#[inline(always)]
fn site_stats(id: u64, tgid: u32, func: AllocFn, caller_pc: u64) -> Option<*mut SiteStats> {
    if let Some(s) = SITES.get_ptr_mut(&id) {
        return Some(s);
    }
    let fresh = SiteStats {
        tgid,
        func: func as u8,
        caller: caller_pc,
        ..SiteStats::default()
    };
    // Another CPU may create the same site first: NOEXIST keeps its counters, and only the CPU
    // whose insert won counts the site.
    if SITES.insert(&id, &fresh, BPF_NOEXIST).is_ok() {
        add(&raw mut SITE_COUNT, 1);
    }
    match SITES.get_ptr_mut(&id) {
        Some(s) => Some(s),
        None => {
            bump(Counter::SitesFull);
            None
        }
    }
}

/// Adds the block to `LIVE` under its site; false (counted) when the map is full.
#[inline(always)]
fn track_block(
    tgid: u32,
    ptr: u64,
    size: u64,
    id: u64,
    (weight, blocks): (u64, u64),
    func: AllocFn,
) -> bool {
    // A page (growth mode) is keyed by its address like a block, so `munmap` can retire it.
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    let rec = LiveAlloc {
        size,
        // SAFETY: a helper with no arguments that only reads the clock.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        site_id: id,
        weight,
        count: blocks as u32,
        func: func as u8,
        _pad: [0; 3],
    };
    // One map operation in the common case: the address is new.
    LIVE.insert(&key, &rec, BPF_NOEXIST).is_ok() || insert_over_stale(&key, &rec)
}

/// Inserts `rec` where an address is still marked live (freed by a path leaktrace did not see,
/// which is retired first) or the map is full (counted); says whether it is in.
///
/// Out of line on purpose: inlined into `usdt_enter`, this path's code read a register a helper
/// call had clobbered and the verifier refused the program (docs/native-stacks.md).
#[inline(never)]
fn insert_over_stale(key: &LiveKey, rec: &LiveAlloc) -> bool {
    remove_stale(key);
    if LIVE.insert(key, rec, 0).is_err() {
        bump(Counter::LiveFull);
        return false;
    }
    true
}

/// Sends what userspace needs of a site not fully announced yet: its record (Python frames and
/// the native frames the kernel could follow) and, when the kernel could not follow them all,
/// a stack copy to learn from. A site announced while rows were missing is announced again
/// once they have been learned, so a burst of new sites needs few copies.
#[inline(always)]
fn announce(
    site: SharedSite,
    scratch: &mut Scratch,
    (tgid, tid, id): (u32, u32, u64),
    func: AllocFn,
    caller: FrameRegs,
    cut: bool,
) {
    scratch.ev.id_cut = u8::from(cut);
    let needs_copy = native_stack_rest();
    let stop_pc = {
        let n = scratch.ev.native_depth as usize;
        scratch.ev.native[n.wrapping_sub(1) & (MAX_NATIVE_WALK - 1)]
    };
    let resend = site.announced() & ANNOUNCED_SITE != 0;
    if !resend || !needs_copy {
        if send_site_record(scratch, tgid, tid, id, func) {
            site.mark(ANNOUNCED_SITE);
            if !needs_copy {
                site.mark(ANNOUNCED_STACK);
                return;
            }
        } else {
            bump(Counter::RingbufFull);
            return;
        }
    }
    // One copy teaches userspace every row up to where the walk stopped: while that copy is
    // on its way and userspace is behind, sites stopping at the same address wait instead of
    // sending their own (a site that never allocates again then keeps what the kernel walked).
    let key = UnwindKey {
        tgid,
        _pad: 0,
        pc: stop_pc,
    };
    // SAFETY: a helper with no arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let behind = EVENTS.query(BPF_RB_AVAIL_DATA) > (RING_BYTES / 4) as u64;
    // SAFETY: the u64 is read right away; an LRU slot reused concurrently still holds a u64.
    if let Some(t) = unsafe { REQUESTED.get(&key) } {
        if behind && now.wrapping_sub(*t) < REQUEST_TTL_NS {
            bump(Counter::StackDeferred);
            return;
        }
    }
    if send_stack(tgid, id, caller) {
        site.mark(ANNOUNCED_STACK);
        let _ = REQUESTED.insert(&key, &now, 0);
    } else {
        bump(Counter::StackDeferred);
    }
}

/// Sends a site's record: its Python frames (with a check of each code object) and the native
/// frames walked.
#[inline(always)]
fn send_site_record(scratch: &mut Scratch, tgid: u32, tid: u32, id: u64, func: AllocFn) -> bool {
    // SAFETY: plain integers, valid for any bytes; only `co_check` is copied out, at once.
    if let Some(off) = unsafe { PYPROCS.get(&tgid) } {
        let mut c = CheckCtx {
            co_check: off.co_check,
            n: core::cmp::min(scratch.ev.py_depth, MAX_PY_FRAMES as u32),
        };
        // SAFETY: `check_step` has bpf_loop's callback signature and `c` outlives the call.
        unsafe {
            bpf_loop(
                c.n,
                check_step as *mut core::ffi::c_void,
                &mut c as *mut CheckCtx as *mut core::ffi::c_void,
                0,
            )
        };
    }
    let ev = &mut scratch.ev;
    ev.kind = EVENT_NEW_SITE;
    ev.tgid = tgid;
    ev.tid = tid;
    ev.site_id = id;
    // SAFETY: a helper with no arguments that only reads the clock.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.func = func as u8;
    // Only the frames walked are sent: most stacks are far shallower than the limit.
    let header = core::mem::offset_of!(NewSiteEvent, py_frames);
    let frames = core::cmp::min(ev.py_depth as usize, MAX_PY_FRAMES);
    let len = header + frames * core::mem::size_of::<PyFrameRec>();
    let len = core::cmp::min(len, core::mem::size_of::<NewSiteEvent>());
    // SAFETY: `len` is within the event.
    let bytes = unsafe { core::slice::from_raw_parts(ev as *const NewSiteEvent as *const u8, len) };
    EVENTS.output::<[u8]>(bytes, 0).is_ok()
}

/// How long a stack copy sent to learn an address holds back others stopping there.
const REQUEST_TTL_NS: u64 = 1_000_000_000;
/// `SiteStats::announced` bits: the site record, and its stack copy, reached the ring buffer.
const ANNOUNCED_SITE: u8 = 1;
const ANNOUNCED_STACK: u8 = 2;
/// `bpf_map_update_elem` flag: create the element only if it does not exist yet.
const BPF_NOEXIST: u64 = 1;
