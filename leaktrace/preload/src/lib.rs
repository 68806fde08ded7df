//! # leaktrace-preload
//!
//! An `LD_PRELOAD` library that samples a process's heap from inside the process, so that a
//! tracer sees about one allocation per `LEAKTRACE_SAMPLE_BYTES` allocated instead of uprobing
//! every malloc and free.
//!
//! ```text
//! LD_PRELOAD=/path/to/libleaktrace_preload.so LEAKTRACE_SAMPLE_BYTES=256k python3 app.py
//! ```
//!
//! It interposes `malloc`, `calloc`, `realloc`, `reallocarray`, `free`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` and `malloc_usable_size` (and `setlocale`,
//! for CPython: see below), runs each through Datadog's `libdd-profiling-heap-sampler` (with
//! `live-heap`), and reaches glibc through its `__libc_*` entry points. CPython's own
//! allocators are wrapped as well. glibc only: those entry points, and the chunk layout that
//! `src/tag.rs` relies on, are glibc's. Load it with `LD_PRELOAD`, not `dlopen`: blocks allocated
//! before it loads are fine, but its thread-local state must be static TLS.
//!
//! ## Sampling
//!
//! While no tracer is attached the only cost is a test of the USDT semaphore on each allocation
//! and a 16-byte header check on each free, realloc and `malloc_usable_size`. Once a tracer
//! attaches to either probe below and raises the semaphore (the kernel does it for tracers that
//! pass it a `ref_ctr_offset`; leaktrace writes it itself), the sampler picks
//! allocations with a Poisson process over bytes: on average one every `LEAKTRACE_SAMPLE_BYTES`
//! bytes, each weighted with the bytes it stands for.
//!
//! `LEAKTRACE_SAMPLE_BYTES` is read once, at load: a decimal byte count, optionally suffixed `k`/`K`
//! (KiB) or `m`/`M` (MiB). Unset, empty or `0` keeps the sampler's default of 512 KiB. The sampler
//! raises anything under 64 KiB to 64 KiB, silently. A value it cannot parse is reported on
//! stderr and ignored.
//!
//! `LEAKTRACE_SAMPLE_LIMIT` (a decimal count, default 4000, `0` for none) is the most samples a
//! second the process takes: above it samples are thinned, each kept one weighing for those
//! dropped, until allocation slows; the estimates stay unbiased (`src/throttle.rs`).
//!
//! ## USDT probes
//!
//! Provider `ddheap`, both probes sharing one semaphore:
//!
//! * `ddheap:alloc(void *ptr, u64 size, u64 weight)`: a sampled allocation; `ptr` is the pointer
//!   the program sees, `size` what it asked for, `weight` the bytes the sample stands for.
//! * `ddheap:free(void *ptr)`: a sampled block is freed, or realloc moved it (the new block is
//!   not sampled).
//!
//! On x86-64 a sampled block carries a 16-byte header just before `ptr`, which is why every
//! function taking a pointer back is interposed too. A tracer can recognise the library by its
//! exported `leaktrace_preload_version`; tests can raise the semaphore without a tracer through
//! `leaktrace_preload_force_active`.
//!
//! ## CPython's allocator domains
//!
//! pymalloc carves Python's small objects out of its own arenas, so they never reach malloc.
//! With `LEAKTRACE_SAMPLE_PYTHON=1` (which `leaktrace run --mode sampled` sets; off by default,
//! because on LTO builds any wrapper defeats `PyObject_Malloc`'s devirtualised fast path, 4-8 ns
//! per allocation even untraced), in a CPython process (3.8 to 3.15 with a GIL, found through the
//! exported
//! `PyMem_SetAllocator`, whether libpython is shared or linked into the executable), the
//! constructor also wraps the `PYMEM_DOMAIN_MEM` and `PYMEM_DOMAIN_OBJ` allocators before the
//! interpreter starts, and samples them the same way, with the same probes and header.
//! `PYMEM_DOMAIN_RAW` is malloc (or debug hooks over it), which the libc hooks already sample.
//!
//! * Over CPython's own pymalloc (`src/python_direct.rs`) only requests of up to 512 bytes are
//!   counted here, inline and without a guard; pymalloc passes larger ones to malloc, where the
//!   libc hooks count them.
//! * Over anything else (debug hooks, an embedder's allocator: `src/python_hooks.rs`), an
//!   allocation is sampled, and its bytes counted, once: while a domain allocation is inside
//!   the wrapped allocator, the libc hooks pass the malloc calls it makes straight through.
//! * pymalloc blocks have no glibc chunk header to tell a sampler header from a program's
//!   bytes, so a domain free trusts a header only for blocks it recorded when sampling them.
//! * Untraced, a domain wrapper costs a load and a branch (the semaphore, or for frees and
//!   reallocs the count of live sampled blocks) and one more indirect call.
//! * CPython installs fresh allocators over the wrappers for `PYTHONMALLOC`, `-X dev` and
//!   `PYTHONDEVMODE`, and from 3.12 when an embedder initialises it again after finalising
//!   it. Both happen while no interpreter exists, just before CPython sets the locale, so the
//!   library interposes `setlocale` (a load and a branch in other processes) and wraps again
//!   from there. `src/python.rs` has the details, and what else can undo the wrapping.
//!
//! The exported `leaktrace_preload_python_domains` (a `u32`) has bit `1 << domain` set for each
//! domain wrapped (2 for MEM, 4 for OBJ); `LEAKTRACE_PRELOAD_STATS=1` prints on stderr at exit
//! what happened and how many blocks each domain (and the libc hooks) sampled.

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
compile_error!("leaktrace-preload interposes glibc's allocator on x86-64 Linux only");

use core::ffi::c_char;
use core::sync::atomic::{AtomicU64, Ordering};

mod env;
mod hooks;
mod python;
mod python_blocks;
mod python_direct;
mod python_hooks;
mod real;
mod tag;
mod throttle;
mod tls;

use env::SampleBytes;

/// NUL-terminated "leaktrace-preload <version>", kept in one place for the exported getter.
const VERSION: &str = concat!("leaktrace-preload ", env!("CARGO_PKG_VERSION"), "\0");

/// Returns a static NUL-terminated version string, so a tracer can tell this library apart.
#[no_mangle]
pub extern "C" fn leaktrace_preload_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// Whether a tracer listens now (the `ddheap` semaphore is raised): what a program or a test can
/// ask before it relies on being sampled.
#[no_mangle]
pub extern "C" fn leaktrace_preload_traced() -> bool {
    // SAFETY: a single read of the 16-bit semaphore in our own data section.
    unsafe { libdd_profiling_heap_sampler::dd_heap_profiler_attached() }
}

/// Test-only: sets the `ddheap` semaphore as if a tracer were (or were no longer) attached.
///
/// This overwrites the counter the kernel keeps for attached tracers rather than adding to it,
/// so never call it while a real tracer is attached.
#[no_mangle]
pub extern "C" fn leaktrace_preload_force_active(on: bool) {
    // SAFETY: a single store of a 16-bit semaphore in our own data section.
    unsafe { libdd_profiling_heap_sampler::dd_test_set_profiler_active(on) }
}

/// The mean sampling interval in bytes this library's sampler was started with (after
/// `LEAKTRACE_SAMPLE_BYTES` and the sampler's own floor), for a tracer to read from the
/// process's memory: an attached tracer cannot change it, so its report says what it is.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_sample_bytes: AtomicU64 = AtomicU64::new(0);

/// Runs when the library loads: before the program's constructors, after those of libraries
/// that ld.so initialises first.
extern "C" fn init() {
    let errno = real::save_errno();
    match env::read_sample_bytes() {
        SampleBytes::Default => {}
        // SAFETY: a relaxed atomic store; the sampler clamps the value itself.
        SampleBytes::Bytes(n) => unsafe {
            libdd_profiling_heap_sampler::dd_set_default_sampling_interval(n)
        },
        SampleBytes::Invalid => env::warn_invalid_sample_bytes(),
    }
    adopt_interval_on_this_thread();
    // SAFETY: a relaxed atomic load in the sampler.
    let interval = unsafe { libdd_profiling_heap_sampler::dd_sampling_interval_effective() };
    leaktrace_preload_sample_bytes.store(interval, Ordering::Relaxed);
    let limit = env::read_sample_limit().unwrap_or_else(|| {
        env::warn_invalid_sample_limit();
        throttle::DEFAULT_LIMIT
    });
    throttle::init(limit, interval);
    tag::learn_header_magic();
    real::warm_up();
    // SAFETY: the constructor, run once, before the program (and so the interpreter) starts.
    unsafe { python::install() };
    python::register_report();
    real::restore_errno(errno);
}

/// Gives this thread the configured interval if it has already sampled.
///
/// A thread copies the interval into its state when it first samples. A tracer attached to the
/// library's path before the process started raises the semaphore at mmap time, and constructors
/// that run before ours allocate (libstdc++'s emergency exception pool, for one), so the main
/// thread can already hold the 512 KiB default when `init` runs.
fn adopt_interval_on_this_thread() {
    // SAFETY: reads this thread's TLS state pointer; it never allocates.
    let tl = unsafe { libdd_profiling_heap_sampler::dd_tl_state_get() };
    if !tl.is_null() {
        // SAFETY: tl points at this thread's own initialised state, which only this thread
        // touches (an eBPF tracer may write the same field, and either value is valid).
        unsafe {
            (*tl).sampling_interval = libdd_profiling_heap_sampler::dd_sampling_interval_effective()
        };
    }
}

/// The constructor, placed where the dynamic loader runs it at load time.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
