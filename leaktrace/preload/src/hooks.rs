//! The interposed allocator entry points.
//!
//! Each one asks the sampler whether to sample (allocation side) or whether the pointer was
//! sampled (free side), and forwards to glibc's `__libc_*` functions with the sizes and pointers
//! the sampler hands back. Nothing here may allocate through Rust's global allocator or call into
//! anything that might: every hook can be reached from inside malloc.

use core::cell::Cell;
use core::ffi::{c_int, c_void};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use libdd_profiling_heap_sampler::{
    dd_alloc_req_t, dd_allocation_created, dd_allocation_freed, dd_allocation_realloc_commit,
    dd_allocation_realloc_prepare,
};

use crate::real::{
    __libc_calloc, __libc_free, __libc_malloc, __libc_memalign, __libc_pvalloc, __libc_realloc,
    __libc_valloc, page_size, real_usable_size_fn, restore_errno,
};
use crate::tag::{classify, may_carry_header, tracer_attached, Tag};
use crate::tls::{self, Count};

/// glibc's MALLOC_ALIGNMENT on x86-64, and what the sampler assumes for realloc(NULL, n); a
/// sampled malloc must land its user pointer on the same boundary plain malloc would.
const MALLOC_ALIGNMENT: usize = 16;

/// Runs the sampler's requested/created pair around one call to the real allocator.
///
/// `alloc` gets the request so that it can pass `req.size`, which the sampler enlarges for a
/// sampled block's header; it must also be called (and its NULL passed on) when the allocator
/// fails, because `created` closes the reentry guard that `requested` opened.
#[inline(always)]
unsafe fn sampled(
    size: usize,
    alignment: usize,
    alloc: impl FnOnce(&dd_alloc_req_t) -> *mut c_void,
) -> *mut c_void {
    match route(size) {
        None => alloc(&plain(size, alignment)),
        // SAFETY: as the caller guarantees.
        Some(counted) => unsafe { sampled_counted(size, alignment, counted, alloc) },
    }
}

/// The inline half of dd_allocation_requested (allocation_requested.h): `None` when the request
/// goes to glibc as it is, which is what `requested` answers when the semaphore is down (without
/// its two out-of-line calls: requested and created are inline only for C callers, and Rust
/// reaches them through bindgen's wrappers) or when the countdown did not cross zero. Otherwise
/// what the countdown said, for `sampled_counted`.
#[inline(always)]
fn route(size: usize) -> Option<Count> {
    if !tracer_attached() {
        return None;
    }
    match tls::count(size) {
        Count::Below => None,
        counted => Some(counted),
    }
}

/// `sampled` once `route` has sent the request on: the slow path on a crossing, or, when the
/// thread could not count (state not initialised, or its reentry guard set), `request`.
///
/// # Safety
///
/// As for `sampled`; `counted` must be what `route` answered for this request on this thread.
#[inline(always)]
unsafe fn sampled_counted(
    size: usize,
    alignment: usize,
    counted: Count,
    alloc: impl FnOnce(&dd_alloc_req_t) -> *mut c_void,
) -> *mut c_void {
    let req = match counted {
        // SAFETY: the state that counted the crossing is initialised and its guard was clear;
        // every caller passes a power-of-two alignment.
        Count::Crossed => unsafe { crate::throttle::requested_slow(tls::state(), size, alignment) },
        Count::Below | Count::NotCounted => request(size, alignment),
    };
    let raw = alloc(&req);
    if !is_sampled(&req) {
        if req.weight == GUARDED {
            WITNESS.set(raw);
        }
        return raw;
    }
    if !raw.is_null() {
        SAMPLED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: `raw` is what the real allocator returned for `req` (possibly NULL), and `req` is
    // passed back unchanged, as created requires; it closes the guard the slow path opened.
    unsafe { dd_allocation_created(raw, req) }
}

/// dd_allocation_requested (allocation_requested.h) once the semaphore is known to be up,
/// inline: the reentry guard, then the countdown; only a crossing leaves for the sampler's slow
/// path, which opens the guard when it samples.
#[inline(always)]
fn request(size: usize, alignment: usize) -> dd_alloc_req_t {
    let tl = tls::state();
    // SAFETY: this thread's initialised state.
    match unsafe { tls::count_on(tl, size) } {
        Count::NotCounted => dd_alloc_req_t {
            weight: GUARDED,
            ..plain(size, alignment)
        },
        Count::Below => plain(size, alignment),
        // SAFETY: tl is this thread's state with its guard clear; every caller passes a
        // power-of-two alignment.
        Count::Crossed => unsafe { crate::throttle::requested_slow(tl, size, alignment) },
    }
}

/// The weight `request` gives a request it passes through because the thread's reentry guard
/// is set; like 0, it means "not sampled" (`is_sampled`).
const GUARDED: u64 = u64::MAX;

thread_local! {
    /// The last block this thread's libc hooks handed out while its reentry guard was set:
    /// how `src/python_direct.rs` checks that a block it had pymalloc allocate came from malloc.
    static WITNESS: Cell<*mut c_void> = const { Cell::new(null_mut()) };
}

/// Takes the block the libc hooks last handed out on this thread under the reentry guard.
pub fn take_witness() -> *mut c_void {
    WITNESS.replace(null_mut())
}

/// The request the sampler makes of an allocation it does not sample: the caller's own.
#[inline(always)]
fn plain(size: usize, alignment: usize) -> dd_alloc_req_t {
    dd_alloc_req_t {
        size,
        user_size: size,
        alignment,
        weight: 0,
    }
}

/// How many allocations the libc hooks sampled, for the report that `LEAKTRACE_PRELOAD_STATS`
/// asks for; counted on the sampled path only, and realloc(NULL, n) is not counted.
pub static SAMPLED: AtomicU64 = AtomicU64::new(0);

/// Whether the sampler chose this request (a zero weight means it did not).
#[inline(always)]
fn is_sampled(req: &dd_alloc_req_t) -> bool {
    req.weight != 0 && req.weight != GUARDED
}

/// Interposed `malloc(3)`.
///
/// Its slow path is a C function of its own, so that both ways out are tail jumps and the
/// common one (semaphore down, or the countdown not crossed) keeps no stack frame. `calloc`
/// does the same.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    match route(size) {
        // SAFETY: __libc_malloc accepts any size.
        None => unsafe { __libc_malloc(size) },
        // SAFETY: what route answered for this request.
        Some(counted) => unsafe { malloc_slow(size, counted) },
    }
}

/// `malloc` that `route` sent on.
///
/// # Safety
///
/// `counted` must be what `route` answered for this request on this thread.
#[inline(never)]
unsafe extern "C" fn malloc_slow(size: usize, counted: Count) -> *mut c_void {
    // SAFETY: MALLOC_ALIGNMENT is a power of two; __libc_malloc accepts any size.
    unsafe {
        sampled_counted(size, MALLOC_ALIGNMENT, counted, |req| {
            __libc_malloc(req.size)
        })
    }
}

/// Interposed `calloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn calloc(nmemb: usize, size: usize) -> *mut c_void {
    let Some(total) = nmemb.checked_mul(size) else {
        restore_errno(libc::ENOMEM);
        return null_mut();
    };
    match route(total) {
        // SAFETY: the caller's request, whose product does not overflow.
        None => unsafe { __libc_calloc(nmemb, size) },
        // SAFETY: what route answered for this request.
        Some(counted) => unsafe { calloc_slow(nmemb, size, counted) },
    }
}

/// `calloc` that `route` sent on.
///
/// # Safety
///
/// `nmemb * size` must not overflow; `counted` must be what `route` answered for this request
/// on this thread.
#[inline(never)]
unsafe extern "C" fn calloc_slow(nmemb: usize, size: usize, counted: Count) -> *mut c_void {
    // A sampled request has grown by the header, so it can no longer be expressed as the
    // caller's nmemb * size; calloc(1, bumped) still zeroes every byte the caller will see.
    // SAFETY: as for malloc; both __libc_calloc calls take sizes whose product cannot overflow.
    unsafe {
        sampled_counted(nmemb * size, MALLOC_ALIGNMENT, counted, |req| {
            if is_sampled(req) {
                __libc_calloc(1, req.size)
            } else {
                __libc_calloc(nmemb, size)
            }
        })
    }
}

/// Interposed `free(3)`.
///
/// The header test is inline, so that freeing a block without the sampler's magic in front of
/// it (nearly every block) is a tail call into glibc with no stack frame and no call into the
/// sampler.
#[no_mangle]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: the C contract makes `ptr` null or a live block from this allocator.
    if unsafe { may_carry_header(ptr) } {
        // SAFETY: as above.
        return unsafe { free_tagged(ptr) };
    }
    // SAFETY: no sampler header: glibc's own pointer (or null), as given.
    unsafe { __libc_free(ptr) }
}

/// `free` of a block with the sampler's magic in front of it (or of any block before the
/// magic is learnt). C convention, so that `free`'s call is a tail jump.
///
/// # Safety
///
/// `ptr` must be a live block from this allocator.
#[cold]
#[inline(never)]
unsafe extern "C" fn free_tagged(ptr: *mut c_void) {
    // SAFETY: the caller's guarantee.
    match unsafe { classify(ptr) } {
        Tag::Sampled { .. } => {
            // SAFETY: classify just confirmed a sampler header on this live block; freed reports
            // the free, clears the header and hands back glibc's own pointer.
            let out = unsafe { dd_allocation_freed(ptr, 0, 0) };
            // SAFETY: out.ptr is the pointer glibc returned when the block was allocated.
            unsafe { __libc_free(out.ptr) }
        }
        // SAFETY: an untagged or look-alike pointer is glibc's own (or null), as given.
        Tag::Untagged | Tag::Forged => unsafe { __libc_free(ptr) },
    }
}

/// Interposed `realloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // prepare() passes an untagged block straight through (docs/realloc.md), so only a null
    // pointer (a malloc that may be sampled) or a sampled block needs the sampler's help; the
    // look-alikes that prepare() would mistake for sampled blocks go straight to glibc.
    if !ptr.is_null() {
        // SAFETY: the C contract makes a non-null `ptr` a live block from this allocator.
        let untagged = unsafe {
            !may_carry_header(ptr) || matches!(classify(ptr), Tag::Untagged | Tag::Forged)
        };
        if untagged {
            // SAFETY: `ptr` is glibc's own pointer.
            return unsafe { __libc_realloc(ptr, size) };
        }
    }
    // SAFETY: `ptr` is null or a live sampled block; prepare computes the glibc pointer and
    // size, and commit gets the real realloc's result together with the same prep.
    unsafe {
        let prep = dd_allocation_realloc_prepare(ptr, size);
        let new_raw = __libc_realloc(prep.raw_ptr, prep.raw_size);
        dd_allocation_realloc_commit(ptr, new_raw, prep)
    }
}

/// Interposed `reallocarray(3)`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, nmemb: usize, size: usize) -> *mut c_void {
    match nmemb.checked_mul(size) {
        // SAFETY: forwarded with the caller's own guarantee about `ptr`.
        Some(total) => unsafe { realloc(ptr, total) },
        None => {
            restore_errno(libc::ENOMEM);
            null_mut()
        }
    }
}

/// Allocates `size` bytes aligned to `alignment` through the sampler.
///
/// # Safety
///
/// `alignment` must be a power of two.
#[inline(always)]
unsafe fn aligned_sampled(alignment: usize, size: usize) -> *mut c_void {
    // SAFETY: the caller guarantees a power-of-two alignment, which both the sampler and
    // __libc_memalign accept.
    unsafe { sampled(size, alignment, |req| __libc_memalign(alignment, req.size)) }
}

/// Interposed `posix_memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(
    memptr: *mut *mut c_void,
    alignment: usize,
    size: usize,
) -> c_int {
    if !alignment.is_power_of_two()
        || !alignment.is_multiple_of(core::mem::size_of::<*mut c_void>())
    {
        return libc::EINVAL;
    }
    // SAFETY: the alignment was just checked to be a power of two.
    let user = unsafe { aligned_sampled(alignment, size) };
    if user.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the C contract makes `memptr` a valid place to store the result.
    unsafe { *memptr = user };
    0
}

/// Shared body of aligned_alloc and memalign, which are one function in glibc 2.36.
///
/// # Safety
///
/// None beyond the C contract; any alignment is accepted.
#[inline(always)]
unsafe fn memalign_like(alignment: usize, size: usize) -> *mut c_void {
    if alignment.is_power_of_two() {
        // SAFETY: the alignment is a power of two.
        unsafe { aligned_sampled(alignment, size) }
    } else {
        // The sampler's header arithmetic assumes a power of two, so glibc gets these alone:
        // memalign rounds them up. So does aligned_alloc up to glibc 2.37 (it is memalign there);
        // from 2.38 glibc's aligned_alloc fails them with EINVAL, which this path does not copy.
        // SAFETY: __libc_memalign accepts any alignment.
        unsafe { __libc_memalign(alignment, size) }
    }
}

/// Interposed `aligned_alloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
    // SAFETY: no preconditions beyond the C contract.
    unsafe { memalign_like(alignment, size) }
}

/// Interposed `memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn memalign(alignment: usize, size: usize) -> *mut c_void {
    // SAFETY: no preconditions beyond the C contract.
    unsafe { memalign_like(alignment, size) }
}

/// A page-aligned allocation of `sampled_size` bytes as the sampler sees it: a sampled one from
/// `__libc_memalign`, an unsampled one from glibc's own function (`plain`), as the caller asked.
///
/// # Safety
///
/// `plain` must be a call into glibc's allocator for the caller's request.
#[inline(always)]
unsafe fn page_aligned(sampled_size: usize, plain: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let page = page_size();
    // The sampler refuses alignments above 1 KiB, so a page-aligned block is never tagged; the
    // sampled branch is here so that a future sampler that does tag them stays correct.
    // SAFETY: the page size is a power of two; __libc_memalign accepts any size.
    unsafe {
        sampled(sampled_size, page, |req| {
            if is_sampled(req) {
                __libc_memalign(page, req.size)
            } else {
                plain()
            }
        })
    }
}

/// Interposed `valloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: __libc_valloc accepts any size.
    unsafe { page_aligned(size, || __libc_valloc(size)) }
}

/// Interposed `pvalloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    let Some(rounded) = size.checked_add(page - 1).map(|s| s & !(page - 1)) else {
        // glibc reports this overflow itself (ENOMEM); let it.
        // SAFETY: __libc_pvalloc accepts any size.
        return unsafe { __libc_pvalloc(size) };
    };
    // SAFETY: __libc_pvalloc accepts any size; the sampler sees the size the caller will
    // really get.
    unsafe { page_aligned(rounded, || __libc_pvalloc(size)) }
}

/// Interposed `malloc_usable_size(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    // glibc always exports malloc_usable_size; without it there is nothing truthful to say.
    let Some(real) = real_usable_size_fn() else {
        return 0;
    };
    // SAFETY: the C contract makes `ptr` a live block from this allocator.
    match unsafe { classify(ptr) } {
        // The caller may use the bytes from `ptr` to the end of glibc's block, which starts
        // `offset` bytes earlier.
        // SAFETY: `raw` is the live block glibc returned.
        Tag::Sampled { raw, offset } => unsafe { real(raw) }.saturating_sub(offset),
        // SAFETY: `ptr` is glibc's own live block.
        Tag::Untagged | Tag::Forged => unsafe { real(ptr) },
    }
}
