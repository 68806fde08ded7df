//! What the sampler knows: whether a tracer is attached, and which blocks it tagged.

use core::ffi::c_void;

use libdd_profiling_heap_sampler::dd_sample_flag_peek;

/// Layout of a USDT semaphore (libbpf's `struct usdt_sema`), which the kernel counts up for each
/// attached tracer.
#[repr(C)]
struct UsdtSema {
    active: u16,
}

extern "C" {
    /// The `ddheap` provider's one semaphore, defined by the sampler's probes.c through usdt.h's
    /// `USDT_DEFINE_SEMA(ddheap_alloc)`; a rename there fails our link (see build.rs).
    static __usdt_sema_ddheap_alloc: UsdtSema;
}

/// Whether any tracer is attached to a `ddheap` probe, read exactly as the sampler's own inline
/// fast path reads it.
#[inline(always)]
pub fn tracer_attached() -> bool {
    // SAFETY: the semaphore is a static in our own data section; the kernel (or the test hook)
    // changes it behind the compiler's back, hence the volatile read.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(__usdt_sema_ddheap_alloc.active)) > 0 }
}

/// What the 16 bytes in front of a user pointer say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// No sampler header: the pointer is glibc's own.
    Untagged,
    /// A header the sampler wrote; `raw` is what glibc returned and `offset` is `user - raw`.
    Sampled { raw: *mut c_void, offset: usize },
    /// The magic is there but the offset is one the sampler never writes: glibc data that
    /// happens to look like a header, which must not be "untagged".
    Forged,
}

/// Every offset the sampler stamps is `max(alignment, 16)` or twice that, with `alignment` a
/// power of two, so it is a multiple of 16.
const OFFSET_GRANULE: usize = 16;

/// Reads the header in front of `user` without changing it.
///
/// The sampler trusts magic plus an offset in 16..=2048. On glibc the 16 bytes in front of an
/// untagged block are the previous chunk's last 8 user bytes and this chunk's size word, and a
/// small chunk's size word (0x21, 0x31, ...) is in that range: a program that stores the magic
/// at the end of one block would make the sampler "untag" the next one, zero its size word and
/// free a bogus pointer. glibc's size word is odd whenever the previous chunk can hold user data
/// (PREV_INUSE), so requiring a multiple of 16 removes every such look-alike.
///
/// # Safety
///
/// `user` must be null or a pointer the allocator handed out and that is still live.
#[inline(always)]
pub unsafe fn classify(user: *mut c_void) -> Tag {
    let mut raw = core::ptr::null_mut();
    let mut offset = 0usize;
    // SAFETY: the caller guarantees `user` is live or null; peek reads the 16 bytes before it
    // only when they lie in the same page (so never before a page start), and writes the two
    // out-parameters, which are valid locals.
    if !unsafe { dd_sample_flag_peek(user, &mut raw, &mut offset) } {
        return Tag::Untagged;
    }
    if !offset.is_multiple_of(OFFSET_GRANULE) {
        return Tag::Forged;
    }
    Tag::Sampled { raw, offset }
}
