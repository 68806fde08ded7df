//! This thread's sampler state, reached without a function call.
//!
//! The sampler keeps its per-thread countdown in `dd_tl_state_storage`, a C `_Thread_local`.
//! Rust reaches it through `dd_tl_state_get_or_init`, an out-of-line wrapper around an inline C
//! function, which itself asks ld.so's TLS descriptor for the address: two calls on every
//! allocation while a tracer listens, about a third of the active sampler's cost on an
//! allocation-heavy Python loop (`perf`: `dd_tl_state_get_or_init__extern` 1.7 %,
//! `_dl_tlsdesc_return` 1.5 % of all samples, against 5 % for the whole library). Stable Rust
//! has no `#[thread_local]` for a C variable, so the address is computed here the way C does it
//! under the initial-exec model: the thread pointer (`%fs:0`) plus the variable's offset, which
//! ld.so writes into a GOT slot when it loads the library.
//!
//! Initial-exec needs the variable in static TLS. A preloaded library gets it; one loaded with
//! `dlopen` takes it from glibc's surplus (the state is 24 bytes), as the sampler's own TLS
//! descriptors already do for it.

use core::arch::asm;

use libdd_profiling_heap_sampler::{dd_tl_state_init, dd_tl_state_t};

extern "C" {
    /// The sampler's per-thread state, defined `_Thread_local` in its `tl_state.c`.
    static dd_tl_state_storage: dd_tl_state_t;
}

/// This thread's sampler state, initialised on first use.
///
/// Initialisation may allocate (the sampler seeds its generator and sets up its flags with
/// the reentry guard already set), which only ever happens once per thread.
#[inline(always)]
pub fn state() -> *mut dd_tl_state_t {
    let state = address();
    // SAFETY: `state` is this thread's live copy; only this thread reads `initialized`.
    if !unsafe { (*state).initialized } {
        // SAFETY: initialises this thread's copy once; it guards its own reentry.
        unsafe { dd_tl_state_init() };
    }
    state
}

/// Where this thread's sampler state lives, initialised or not.
#[inline(always)]
pub fn address() -> *mut dd_tl_state_t {
    let state: *mut dd_tl_state_t;
    // SAFETY: reads the thread pointer, which the x86-64 TLS ABI keeps at %fs:0, and the GOT
    // slot that ld.so filled with the variable's offset from it (R_X86_64_TPOFF64); their sum is
    // this thread's copy. Neither read has side effects or touches the stack.
    unsafe {
        asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + {storage}@GOTTPOFF]",
            p = out(reg) state,
            storage = sym dd_tl_state_storage,
            options(nostack, readonly, pure),
        );
    }
    state
}

/// Counts `size` bytes on this thread's countdown if the thread can sample now, without a
/// call: `Below` is the common answer, and the only one after which the caller has nothing
/// more to do.
#[inline(always)]
pub fn count(size: usize) -> Count {
    let tl = address();
    // SAFETY: this thread's own copy, initialised or still zero (static TLS starts zeroed);
    // only this thread reads `initialized`.
    if !unsafe { (*tl).initialized } {
        return Count::NotCounted;
    }
    // SAFETY: as above, and initialised.
    unsafe { count_on(tl, size) }
}

/// The counting half of `dd_allocation_requested` (allocation_requested.h) on a thread's
/// initialised state: nothing while its reentry guard is set (`NotCounted`), else `size`
/// bytes off the countdown.
///
/// # Safety
///
/// `tl` must be this thread's initialised state (`state()`). Only this thread writes the fields
/// used here; an eBPF tracer may change `sampling_interval`, which this does not read.
#[inline(always)]
pub unsafe fn count_on(tl: *mut dd_tl_state_t, size: usize) -> Count {
    // SAFETY: by the caller's guarantee.
    unsafe {
        if (*tl).reentry_guard {
            return Count::NotCounted;
        }
        (*tl).remaining_bytes = (*tl).remaining_bytes.wrapping_add(size as i64);
        if (*tl).remaining_bytes < 0 {
            Count::Below
        } else {
            Count::Crossed
        }
    }
}

/// What `count` did. (A byte, so that it can pass to a C-convention slow path.)
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Count {
    /// Counted; no sample is due.
    Below,
    /// Counted, and the countdown crossed zero: the sampler's slow path decides.
    Crossed,
    /// Not counted: the reentry guard is set, or (`count` only) the state is not initialised.
    NotCounted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_same_state_as_the_sampler() {
        // SAFETY: the sampler's own accessor, for comparison; it never allocates here.
        let theirs = unsafe { libdd_profiling_heap_sampler::dd_tl_state_get_or_init() };
        assert_eq!(state(), theirs);
        let other = std::thread::spawn(|| {
            // SAFETY: as above, on another thread.
            let theirs = unsafe { libdd_profiling_heap_sampler::dd_tl_state_get_or_init() };
            (state() as usize, theirs as usize)
        })
        .join()
        .unwrap();
        assert_eq!(other.0, other.1);
        assert_ne!(other.0, state() as usize);
    }
}
