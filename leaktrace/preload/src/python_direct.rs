//! Cheaper allocation wrappers for CPython's own pymalloc: the countdown inline, no reentry
//! guard, and nothing at all for requests pymalloc hands to malloc.
//!
//! The general wrappers (`src/python_hooks.rs`) count every domain request and hold the
//! sampler's reentry guard around the wrapped call, so that the libc hooks do not count
//! pymalloc's fallback to malloc a second time; and they reach the countdown through a call.
//! Where the allocator underneath is CPython's own pymalloc (`python::is_cpython_pymalloc`), its
//! behaviour makes that unnecessary: it hands every request over 512 bytes to
//! `PyMem_RawMalloc`, that is to malloc, where the libc hooks count and sample it, and serves
//! the others from its pools without malloc. So `malloc` and `calloc` here pass requests over
//! 512 bytes straight through, and count the others inline, in the sampler's thread-local state
//! (`src/tls.rs`), without a guard: about 3 % less of an allocation-heavy loop's time (paired
//! runs with the semaphore forced up and no tracer, against the general wrappers).
//!
//! A sampled block is made and kept exactly as by the general wrappers (inside pymalloc, with
//! its header, recorded for its free), and the domain's free and realloc are the general ones:
//! a sampled block then lives among the objects of its kind, where it would have been
//! unsampled. (Sampled blocks taken from malloc instead, which would have let free go
//! unwrapped, changed what the program keeps: CPython's method cache, keyed by address, held on
//! to ten times more sampled attribute names, which a real leak's estimate then counted.)
//!
//! A sampled request over 512 bytes (a small one plus its header) must reach malloc, and the
//! libc hooks note the block they pass through under the guard; if it does not, the allocator
//! is not pymalloc after all (an embedder can choose 3.13's mimalloc through its configuration),
//! and from then on requests over 512 bytes are counted here as the general wrappers do.

use core::ffi::c_void;
use core::sync::atomic::Ordering;

use libdd_profiling_heap_sampler::dd_alloc_req_t;

use crate::hooks;
use crate::python_hooks::{
    calloc_traced, inner_calloc, inner_malloc, keep_sample, malloc_traced, wrapped, Wrapped,
    PY_ALIGNMENT,
};
use crate::tag::tracer_attached;
use crate::tls::{self, Count};

/// pymalloc's `SMALL_REQUEST_THRESHOLD` in CPython 3.8 to 3.15: larger requests go to malloc.
pub const POOL_LIMIT: usize = 512;

/// How a wrapper handles a request while the semaphore is up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Straight to pymalloc: counted inline without a crossing, or left to the libc hooks.
    Through,
    /// The countdown crossed zero, or could not be counted inline: `traced` decides.
    Decide(Count),
    /// Over 512 bytes in a domain found not to be pymalloc: the general wrappers' path.
    General,
}

/// The route for a request of `size` bytes.
#[inline(always)]
fn route(d: &Wrapped, size: usize) -> Route {
    if !tracer_attached() {
        return Route::Through;
    }
    if size > POOL_LIMIT {
        return if d.stats.not_pymalloc.load(Ordering::Relaxed) {
            Route::General
        } else {
            Route::Through
        };
    }
    match tls::count(size) {
        Count::Below => Route::Through,
        counted => Route::Decide(counted),
    }
}

/// The sampling decision for a request of `size` bytes (at most `POOL_LIMIT`) whose countdown
/// crossed zero or could not be counted inline.
///
/// # Safety
///
/// `alloc` must call the wrapped allocator for `size` bytes (the caller's request) or for the
/// larger size of a sampled request, and return what it returned.
#[inline(never)]
unsafe fn traced(
    d: &Wrapped,
    size: usize,
    counted: Count,
    alloc: impl FnOnce(usize) -> *mut c_void,
) -> *mut c_void {
    let tl = tls::state();
    // Inside a sampled allocation's slow path (NotCounted again) nothing is sampled or counted.
    // SAFETY: this thread's state, now initialised.
    if counted == Count::NotCounted && unsafe { tls::count_on(tl, size) } != Count::Crossed {
        return alloc(size);
    }
    // SAFETY: tl is this thread's state with its guard clear; PY_ALIGNMENT is a power of two.
    let req: dd_alloc_req_t = unsafe { crate::throttle::requested_slow(tl, size, PY_ALIGNMENT) };
    if req.weight == 0 {
        return alloc(size);
    }
    // The guard that requested_slow opened keeps the libc hooks from sampling a malloc that
    // pymalloc makes for this block, and has them note it as their witness.
    let _ = hooks::take_witness();
    let raw = alloc(req.size);
    if req.size > POOL_LIMIT && !raw.is_null() && hooks::take_witness() != raw {
        d.stats.not_pymalloc.store(true, Ordering::Relaxed);
    }
    // SAFETY: `raw` is what the wrapped allocator returned for the sampled request.
    unsafe { keep_sample(d, raw, req) }
}

/// `malloc` of a domain that pymalloc serves.
pub unsafe extern "C" fn malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    // The closure below captures `d` alone, a pointer that travels in a register: capturing the
    // wrapped function and its context gave the untraced path a stack frame of its own.
    match route(d, size) {
        // SAFETY: the caller's request, forwarded unchanged.
        Route::Through => unsafe { inner_malloc(d, size) },
        // SAFETY: the closure asks pymalloc for the size it is given.
        Route::Decide(counted) => unsafe { traced(d, size, counted, move |n| inner_malloc(d, n)) },
        // SAFETY: an installed Wrapped.
        Route::General => unsafe { malloc_traced(d, size) },
    }
}

/// `calloc` of a domain that pymalloc serves.
pub unsafe extern "C" fn calloc(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    // An overflow goes through unchanged, for pymalloc to refuse.
    let Some(total) = nelem.checked_mul(elsize) else {
        // SAFETY: the caller's request, forwarded unchanged.
        return unsafe { inner_calloc(d, nelem, elsize, nelem.wrapping_mul(elsize)) };
    };
    // The slow paths are C functions of their own so that these calls are tail jumps and the
    // common path builds no closure (it stored nine words on the stack on every call).
    match route(d, total) {
        // SAFETY: the caller's request, forwarded unchanged.
        Route::Through => unsafe { inner_calloc(d, nelem, elsize, total) },
        // SAFETY: an installed Wrapped, and total = nelem * elsize.
        Route::Decide(counted) => unsafe { calloc_decide(d, nelem, elsize, counted) },
        // SAFETY: as above.
        Route::General => unsafe { calloc_traced(d, nelem, elsize) },
    }
}

/// `calloc` whose countdown crossed zero or could not be counted inline.
///
/// # Safety
///
/// `d` must be an installed `Wrapped`; `nelem * elsize` must not overflow.
#[inline(never)]
unsafe extern "C" fn calloc_decide(
    d: &Wrapped,
    nelem: usize,
    elsize: usize,
    counted: Count,
) -> *mut c_void {
    let total = nelem * elsize;
    // SAFETY: the closure asks pymalloc for the size it is given.
    unsafe {
        traced(d, total, counted, move |n| {
            inner_calloc(d, nelem, elsize, n)
        })
    }
}
