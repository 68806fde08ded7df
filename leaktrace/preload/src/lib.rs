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
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` and `malloc_usable_size`, runs each through
//! Datadog's `libdd-profiling-heap-sampler` (with `live-heap`), and reaches glibc through its
//! `__libc_*` entry points. glibc only: those entry points, and the chunk layout that
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

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
compile_error!("leaktrace-preload interposes glibc's allocator on x86-64 Linux only");

use core::ffi::c_char;

mod env;
mod hooks;
mod real;
mod tag;

use env::SampleBytes;

/// NUL-terminated "leaktrace-preload <version>", kept in one place for the exported getter.
const VERSION: &str = concat!("leaktrace-preload ", env!("CARGO_PKG_VERSION"), "\0");

/// Returns a static NUL-terminated version string, so a tracer can tell this library apart.
#[no_mangle]
pub extern "C" fn leaktrace_preload_version() -> *const c_char {
    VERSION.as_ptr().cast()
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
    real::warm_up();
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
