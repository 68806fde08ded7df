//! The allocator installed in CPython's `PYMEM_DOMAIN_MEM` and `PYMEM_DOMAIN_OBJ`.
//!
//! Each domain gets the same four functions; their `ctx` is the [`Wrapped`] that holds the
//! allocator they wrap, the way CPython's own debug hooks are built. They run each request
//! through the sampler like the libc hooks do, with three differences:
//!
//! * While a domain allocation is inside the wrapped allocator, the libc hooks pass straight
//!   through (see [`alloc_traced`]), so that pymalloc's fallback to malloc for requests over
//!   512 bytes, or the debug hooks' blocks, are neither sampled nor counted a second time.
//! * A free trusts a sampler header only for blocks recorded in `src/python_blocks.rs`.
//! * `realloc(p, 0)` keeps a block, as CPython's allocators do, instead of freeing it.
//!
//! Nothing here may allocate: these functions sit under every Python object.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use libdd_profiling_heap_sampler::{
    dd_alloc_req_t, dd_allocation_created, dd_allocation_freed, dd_allocation_realloc_commit,
    dd_allocation_realloc_prepare,
};

use crate::python_blocks;
use crate::python_direct;
use crate::tag::{classify, may_carry_header, tracer_attached, Tag};
use crate::tls::{self, Count};

/// `void *malloc(void *ctx, size_t size)`.
pub type MallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
/// `void *calloc(void *ctx, size_t nelem, size_t elsize)`.
pub type CallocFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
/// `void *realloc(void *ctx, void *ptr, size_t new_size)`.
pub type ReallocFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
/// `void free(void *ctx, void *ptr)`.
pub type FreeFn = unsafe extern "C" fn(*mut c_void, *mut c_void);

/// CPython's `PyMemAllocatorEx` (3.5 and later), as `PyMem_GetAllocator` fills it in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PyMemAllocatorEx {
    /// First argument of every function below.
    pub ctx: *mut c_void,
    /// Allocates a block.
    pub malloc: Option<MallocFn>,
    /// Allocates a zeroed block.
    pub calloc: Option<CallocFn>,
    /// Resizes a block; a null pointer allocates one.
    pub realloc: Option<ReallocFn>,
    /// Frees a block; a null pointer is ignored.
    pub free: Option<FreeFn>,
}

impl PyMemAllocatorEx {
    /// All fields null, for `PyMem_GetAllocator` to fill in.
    pub const EMPTY: Self = Self {
        ctx: null_mut(),
        malloc: None,
        calloc: None,
        realloc: None,
        free: None,
    };

    /// Whether every function is there; only then can it be wrapped.
    pub fn is_complete(&self) -> bool {
        self.malloc.is_some()
            && self.calloc.is_some()
            && self.realloc.is_some()
            && self.free.is_some()
    }

    /// Whether this is one of our wrappers. (One non-generic function has one address.)
    pub fn is_ours(&self) -> bool {
        let malloc = self.words()[1];
        malloc == py_malloc as MallocFn as usize
            || malloc == python_direct::malloc as MallocFn as usize
    }

    /// Whether both describe the same allocator: the same context and function addresses.
    pub fn same_as(&self, other: &Self) -> bool {
        self.words() == other.words()
    }

    /// The four functions' addresses (null for a missing one).
    pub fn functions(&self) -> [*const c_void; 4] {
        let w = self.words();
        [w[1], w[2], w[3], w[4]].map(|a| a as *const c_void)
    }

    /// The context and the functions as addresses (0 for none), which is how they compare:
    /// they come from C.
    fn words(&self) -> [usize; 5] {
        [
            self.ctx as usize,
            self.malloc.map_or(0, |f| f as usize),
            self.calloc.map_or(0, |f| f as usize),
            self.realloc.map_or(0, |f| f as usize),
            self.free.map_or(0, |f| f as usize),
        ]
    }
}

/// A domain's wrapped allocator and what its wrappers did.
///
/// Statics of this type are filled in once, by the thread that installs them and before
/// `PyMem_SetAllocator` publishes them; after that they are only read, and may be installed
/// again around the same allocator.
#[repr(C, align(64))]
pub struct Wrapped {
    /// The allocator underneath, complete (checked before installing).
    inner: UnsafeCell<PyMemAllocatorEx>,
    /// Whether it is CPython's own pymalloc, wrapped by `src/python_direct.rs`.
    direct: UnsafeCell<bool>,
    /// Counters, on their own cache line: `inner` is read on every call.
    pub stats: Stats,
}

/// What one domain's wrappers did, for the optional report at exit.
#[repr(C, align(64))]
pub struct Stats {
    /// Allocations sampled.
    pub sampled: AtomicU64,
    /// Sampled blocks freed (or moved by realloc, which ends their sample).
    pub released: AtomicU64,
    /// Samples given back at once because the block table was full there.
    pub dropped: AtomicU64,
    /// Set when the wrappers for pymalloc found that a request over 512 bytes did not reach
    /// malloc, and so count such requests themselves from then on (`src/python_direct.rs`).
    pub not_pymalloc: AtomicBool,
}

// SAFETY: `inner` is written only before the wrappers are published (see `Wrapped::set`) and
// read-only afterwards; the counters are atomics.
unsafe impl Sync for Wrapped {}

impl Wrapped {
    /// An unused slot.
    pub const fn new() -> Self {
        Self {
            inner: UnsafeCell::new(PyMemAllocatorEx::EMPTY),
            direct: UnsafeCell::new(false),
            stats: Stats {
                sampled: AtomicU64::new(0),
                released: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                not_pymalloc: AtomicBool::new(false),
            },
        }
    }

    /// Whether this slot has never wrapped anything.
    pub fn is_unused(&self) -> bool {
        self.inner().malloc.is_none()
    }

    /// Whether this slot wraps exactly `allocator`.
    pub fn wraps(&self, allocator: &PyMemAllocatorEx) -> bool {
        self.inner().same_as(allocator)
    }

    /// Stores the allocator to wrap and returns the allocator to install in its place;
    /// `direct` says that it is CPython's own pymalloc (see `src/python_direct.rs`).
    ///
    /// # Safety
    ///
    /// `inner` must be complete, and nothing may be using this slot: it must be unused.
    pub unsafe fn set(&'static self, inner: PyMemAllocatorEx, direct: bool) -> PyMemAllocatorEx {
        // SAFETY: by the caller's guarantee nothing reads `inner` or `direct` concurrently.
        unsafe {
            *self.inner.get() = inner;
            *self.direct.get() = direct;
        }
        self.installer()
    }

    /// The allocator that installs this slot's wrappers.
    pub fn installer(&'static self) -> PyMemAllocatorEx {
        let ctx = core::ptr::from_ref(self).cast_mut().cast();
        if self.is_direct() {
            return PyMemAllocatorEx {
                ctx,
                malloc: Some(python_direct::malloc),
                calloc: Some(python_direct::calloc),
                realloc: Some(py_realloc),
                free: Some(py_free),
            };
        }
        PyMemAllocatorEx {
            ctx,
            malloc: Some(py_malloc),
            calloc: Some(py_calloc),
            realloc: Some(py_realloc),
            free: Some(py_free),
        }
    }

    /// Whether this slot wraps CPython's own pymalloc with `src/python_direct.rs`.
    pub fn is_direct(&self) -> bool {
        // SAFETY: written once before publication, read-only since (see `set`).
        unsafe { *self.direct.get() }
    }

    /// The wrapped allocator.
    #[inline(always)]
    pub(crate) fn inner(&self) -> &PyMemAllocatorEx {
        // SAFETY: written once before publication, read-only since (see `set`).
        unsafe { &*self.inner.get() }
    }
}

/// The `Wrapped` behind a wrapper's `ctx`.
///
/// # Safety
///
/// `ctx` must be the ctx that `Wrapped::set` returned, which CPython passes back unchanged.
#[inline(always)]
pub(crate) unsafe fn wrapped<'a>(ctx: *mut c_void) -> &'a Wrapped {
    // SAFETY: the caller guarantees ctx points at a static Wrapped.
    unsafe { &*ctx.cast::<Wrapped>() }
}

/// The alignment every CPython domain gives its blocks on x86-64 (pymalloc's ALIGNMENT, and
/// malloc's); a sampled block's user pointer must keep it.
pub(crate) const PY_ALIGNMENT: usize = 16;

/// The request for `size` bytes that is not sampled.
fn plain(size: usize) -> dd_alloc_req_t {
    dd_alloc_req_t {
        size,
        user_size: size,
        alignment: PY_ALIGNMENT,
        weight: 0,
    }
}

/// A domain allocation while a tracer is attached: the sampling decision, the allocator, and
/// for a sampled block the header, the probe and the block table.
///
/// While the wrapped allocator runs, the sampler's reentry guard is set, so that the libc hooks
/// neither sample nor count the malloc calls it makes (pymalloc's requests over 512 bytes, the
/// debug hooks' blocks): those bytes were counted here, once. The guard is what
/// `dd_allocation_requested` already tests, so the libc hooks pay nothing for it. A sampled
/// request leaves it set from `dd_allocation_requested_slow` to `dd_allocation_created`; this
/// sets it around unsampled requests too.
///
/// # Safety
///
/// `alloc` must call the wrapped allocator for the request's `size` (or an equivalent
/// request) and return what it returned.
#[inline(never)]
pub(crate) unsafe fn alloc_traced(
    d: &Wrapped,
    size: usize,
    alloc: impl FnOnce(&dd_alloc_req_t) -> *mut c_void,
) -> *mut c_void {
    // This thread's sampler state. Only this thread writes the fields used here (an eBPF tracer
    // may change `sampling_interval`), and they are accessed through the raw pointer because
    // the libc hooks change them, through their own, inside `alloc`.
    let tl = tls::state();
    // Sizes come from CPython, which refuses any over PY_SSIZE_T_MAX.
    // SAFETY: see above.
    let req = match unsafe { tls::count_on(tl, size) } {
        // Inside a sampled allocation's slow path, or under another layer that counted these
        // bytes: neither sample nor count, as dd_allocation_requested would.
        Count::NotCounted => return alloc(&plain(size)),
        Count::Below => plain(size),
        // SAFETY: tl is this thread's state with its guard clear; PY_ALIGNMENT is a power of
        // two.
        Count::Crossed => unsafe { crate::throttle::requested_slow(tl, size, PY_ALIGNMENT) },
    };
    if req.weight == 0 {
        // SAFETY: see above; no sampled request is open, so the guard was clear.
        unsafe { (*tl).reentry_guard = true };
        let raw = alloc(&req);
        // SAFETY: see above.
        unsafe { (*tl).reentry_guard = false };
        return raw;
    }
    // requested_slow left the guard set; keep_sample's created clears it.
    let raw = alloc(&req);
    // SAFETY: `raw` is what the allocator returned for `req`.
    unsafe { keep_sample(d, raw, req) }
}

/// Ends a sampled domain allocation: stamps the header on `raw` and fires ddheap:alloc (which
/// closes the sampler's reentry guard), and records the block for its free.
///
/// # Safety
///
/// `raw` must be what the wrapped allocator returned (maybe NULL) for `req`, a sampled request
/// from `dd_allocation_requested_slow` on this thread.
pub(crate) unsafe fn keep_sample(
    d: &Wrapped,
    raw: *mut c_void,
    req: dd_alloc_req_t,
) -> *mut c_void {
    // SAFETY: as the caller guarantees; created stamps the header, fires ddheap:alloc and
    // closes the guard.
    let user = unsafe { dd_allocation_created(raw, req) };
    if user.is_null() {
        return user;
    }
    if python_blocks::insert(user as usize) {
        d.stats.sampled.fetch_add(1, Ordering::Relaxed);
        return user;
    }
    // No room to remember it, and a free must not trust an unrecorded header: end the sample
    // now (the tracer sees an allocation and its free) and hand out the block unsampled; it
    // is `req.size` bytes, more than asked for.
    d.stats.dropped.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `user` carries the header created just stamped; freed clears it and fires
    // ddheap:free, and returns `raw`.
    unsafe { dd_allocation_freed(user, 0, 0) }.ptr
}

// The four entry points keep their untraced paths free of stack frames: a test, the loads of
// the wrapped function and its context, and a tail call. Everything else is out of line.

/// `malloc` of the wrapped domains.
unsafe extern "C" fn py_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    if !tracer_attached() {
        // SAFETY: the caller's request, forwarded unchanged.
        return unsafe { inner_malloc(d, size) };
    }
    // SAFETY: an installed Wrapped.
    unsafe { malloc_traced(d, size) }
}

/// malloc while a tracer is attached; also `src/python_direct.rs`'s path for a domain found not
/// to be pymalloc. (The slow paths here use the C convention so that the calls to them are tail
/// jumps: across Rust's convention LLVM kept a frame for them.)
///
/// # Safety
///
/// `d` must be an installed `Wrapped`.
#[inline(never)]
pub(crate) unsafe extern "C" fn malloc_traced(d: &Wrapped, size: usize) -> *mut c_void {
    // SAFETY: the closure calls the wrapped malloc with the request's size.
    unsafe { alloc_traced(d, size, move |req| inner_malloc(d, req.size)) }
}

/// `calloc` of the wrapped domains.
unsafe extern "C" fn py_calloc(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    if !tracer_attached() {
        // SAFETY: the caller's request, unchanged.
        return unsafe { inner_calloc(d, nelem, elsize, nelem.wrapping_mul(elsize)) };
    }
    // SAFETY: as above.
    unsafe { calloc_traced(d, nelem, elsize) }
}

/// calloc while a tracer is attached; also `src/python_direct.rs`'s path for a domain found not
/// to be pymalloc.
///
/// # Safety
///
/// `d` must be an installed `Wrapped`.
#[inline(never)]
pub(crate) unsafe extern "C" fn calloc_traced(
    d: &Wrapped,
    nelem: usize,
    elsize: usize,
) -> *mut c_void {
    let Some(total) = nelem.checked_mul(elsize) else {
        // An overflow, for the wrapped allocator to refuse.
        // SAFETY: the caller's request, forwarded unchanged.
        return unsafe { inner_calloc(d, nelem, elsize, nelem.wrapping_mul(elsize)) };
    };
    // SAFETY: the closure calls the wrapped calloc for the request.
    unsafe {
        alloc_traced(d, total, move |req| {
            inner_calloc(d, nelem, elsize, req.size)
        })
    }
}

/// The wrapped allocator's malloc.
///
/// # Safety
///
/// `d` must be an installed `Wrapped` (only complete allocators are).
#[inline(always)]
pub(crate) unsafe fn inner_malloc(d: &Wrapped, size: usize) -> *mut c_void {
    let inner = d.inner();
    // SAFETY: only complete allocators are wrapped.
    unsafe { inner.malloc.unwrap_unchecked()(inner.ctx, size) }
}

/// The wrapped allocator's calloc for `n` bytes: the caller's `nelem` × `elsize` when `n` is
/// their (wrapping) product, else one zeroed block of `n` (a sampled request grown by its
/// header, which no longer factors as nelem × elsize; calloc(1, n) zeroes every byte the caller
/// will see).
///
/// # Safety
///
/// `d` must be an installed `Wrapped` (only complete allocators are).
#[inline(always)]
pub(crate) unsafe fn inner_calloc(
    d: &Wrapped,
    nelem: usize,
    elsize: usize,
    n: usize,
) -> *mut c_void {
    let inner = d.inner();
    // SAFETY: only complete allocators are wrapped.
    let calloc = unsafe { inner.calloc.unwrap_unchecked() };
    if n == nelem.wrapping_mul(elsize) {
        // SAFETY: the caller's request, unchanged.
        unsafe { calloc(inner.ctx, nelem, elsize) }
    } else {
        // SAFETY: a sampled block's size, zeroed whole.
        unsafe { calloc(inner.ctx, 1, n) }
    }
}

/// The wrapped allocator's realloc.
///
/// # Safety
///
/// `d` must be an installed `Wrapped` (only complete allocators are); `ptr` null or a block of
/// the wrapped allocator.
#[inline(always)]
unsafe fn inner_realloc(d: &Wrapped, ptr: *mut c_void, size: usize) -> *mut c_void {
    let inner = d.inner();
    // SAFETY: only complete allocators are wrapped.
    unsafe { inner.realloc.unwrap_unchecked()(inner.ctx, ptr, size) }
}

/// The wrapped allocator's free.
///
/// # Safety
///
/// `d` must be an installed `Wrapped` (only complete allocators are); `ptr` null or a block of
/// the wrapped allocator.
#[inline(always)]
unsafe fn inner_free(d: &Wrapped, ptr: *mut c_void) {
    let inner = d.inner();
    // SAFETY: only complete allocators are wrapped.
    unsafe { inner.free.unwrap_unchecked()(inner.ctx, ptr) }
}

/// `realloc` of the wrapped domains.
unsafe extern "C" fn py_realloc(ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    if ptr.is_null() {
        // realloc(NULL, n) is a malloc, sampled like one.
        if tracer_attached() {
            // SAFETY: an installed Wrapped.
            return unsafe { realloc_new(d, size) };
        }
    } else {
        // A block is sampled only if some are live.
        // SAFETY: the C contract makes `ptr` a live block of this domain; may_carry_header
        // reads only the 16 bytes in the block's own page.
        let tagged = python_blocks::any() && unsafe { may_carry_header(ptr) };
        if tagged {
            // SAFETY: as above.
            return unsafe { realloc_tagged(d, ptr, size) };
        }
    }
    // Like the libc hook, an unsampled block stays unsampled and is not counted.
    // SAFETY: the caller's request, forwarded unchanged.
    unsafe { inner_realloc(d, ptr, size) }
}

/// realloc of a null pointer while a tracer is attached: a malloc, sampled like one.
///
/// # Safety
///
/// `d` must be an installed `Wrapped`.
#[inline(never)]
unsafe extern "C" fn realloc_new(d: &Wrapped, size: usize) -> *mut c_void {
    // SAFETY: the closure calls the wrapped realloc with the request's size.
    unsafe { alloc_traced(d, size, move |req| inner_realloc(d, null_mut(), req.size)) }
}

/// realloc of a block that carries the sampler's magic while sampled blocks are live.
///
/// # Safety
///
/// `d` must be an installed `Wrapped`; `ptr` a live block of its domain.
#[cold]
#[inline(never)]
unsafe extern "C" fn realloc_tagged(d: &Wrapped, ptr: *mut c_void, size: usize) -> *mut c_void {
    // The magic alone is not proof: a pymalloc block's neighbour can end in the same bytes
    // (src/python_blocks.rs), so the block must also be recorded.
    // SAFETY: reads only the 16 bytes in the block's own page (see may_carry_header).
    if matches!(unsafe { classify(ptr) }, Tag::Sampled { .. })
        && python_blocks::contains(ptr as usize)
    {
        // SAFETY: a live block these wrappers sampled.
        return unsafe { realloc_sampled(d, ptr, size) };
    }
    // SAFETY: the caller's request, forwarded unchanged.
    unsafe { inner_realloc(d, ptr, size) }
}

/// Resizes a sampled block, which ends its sample (docs/realloc.md in the sampler).
///
/// # Safety
///
/// `ptr` must be a live block these wrappers sampled and recorded.
#[cold]
#[inline(never)]
unsafe fn realloc_sampled(d: &Wrapped, ptr: *mut c_void, size: usize) -> *mut c_void {
    // CPython's domains refuse sizes over PY_SSIZE_T_MAX; refusing here keeps prepare() off its
    // overflow path. And realloc(p, 0) keeps a block in CPython, where prepare() would treat
    // it as free(p): ask for one byte instead, as PyMem_RawRealloc does.
    if size > isize::MAX as usize {
        return null_mut();
    }
    let size = size.max(1);
    // SAFETY: `ptr` is a live sampled block and size is non-zero, so prepare returns the raw
    // block and its size plus the header offset, without touching the guard; the wrapped
    // realloc gets exactly those, and commit gets its result with the same prep.
    let out = unsafe {
        let prep = dd_allocation_realloc_prepare(ptr, size);
        let new_raw = inner_realloc(d, prep.raw_ptr, prep.raw_size);
        dd_allocation_realloc_commit(ptr, new_raw, prep)
    };
    // On failure the old block is still live, still sampled (commit put its header back) and
    // still recorded.
    if !out.is_null() && python_blocks::remove(ptr as usize) {
        d.stats.released.fetch_add(1, Ordering::Relaxed);
    }
    out
}

/// `free` of the wrapped domains.
///
/// The header test is inline, so that the common free (no sampler magic in front of the block)
/// is a tail call into the wrapped allocator with no stack frame; only a block that carries the
/// magic pays the out-of-line check.
unsafe extern "C" fn py_free(ctx: *mut c_void, ptr: *mut c_void) {
    // SAFETY: CPython passes back the ctx we installed.
    let d = unsafe { wrapped(ctx) };
    // SAFETY: the C contract makes `ptr` null or a live block of this domain; may_carry_header
    // reads only the 16 bytes in the block's own page.
    if python_blocks::any() && unsafe { may_carry_header(ptr) } {
        // SAFETY: as above.
        return unsafe { free_tagged(d, ptr) };
    }
    // SAFETY: the caller's block, unchanged.
    unsafe { inner_free(d, ptr) }
}

/// free of a block that carries the sampler's magic while sampled blocks are live: ends the
/// block's sample if it is one of ours, and frees the pointer the wrapped allocator handed out.
///
/// # Safety
///
/// `d` must be an installed `Wrapped`; `ptr` a live block of its domain.
#[cold]
#[inline(never)]
unsafe fn free_tagged(d: &Wrapped, mut ptr: *mut c_void) {
    // SAFETY: see may_carry_header; reads only the 16 bytes in the block's own page.
    if matches!(unsafe { classify(ptr) }, Tag::Sampled { .. })
        && python_blocks::remove(ptr as usize)
    {
        d.stats.released.fetch_add(1, Ordering::Relaxed);
        // SAFETY: a recorded block with its header: freed fires ddheap:free, clears the header
        // and returns the raw pointer.
        ptr = unsafe { dd_allocation_freed(ptr, 0, 0) }.ptr;
    }
    // SAFETY: `ptr` is the caller's block, or the raw block under our header.
    unsafe { inner_free(d, ptr) }
}
