//! What the sampler knows: whether a tracer is attached, and which blocks it tagged.

use core::ffi::c_void;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use libdd_profiling_heap_sampler::{dd_sample_flag_apply, dd_sample_flag_peek};

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

/// The sampler's header magic, learnt from the sampler itself at load (`learn_header_magic`),
/// so that a free (libc's or a Python domain's) can rule out almost every block with one compare
/// instead of a call. 0 until learnt, which sends every check to the sampler.
static MAGIC: AtomicU64 = AtomicU64::new(0);

/// Has the sampler stamp a header on a scratch buffer and keeps its magic word, checking that
/// the sampler recognises the header it stamped. Called by the constructor.
pub fn learn_header_magic() {
    #[repr(C, align(64))]
    struct Scratch([u8; 128]);
    let mut scratch = Scratch([0; 128]);
    let raw: *mut c_void = scratch.0.as_mut_ptr().cast();
    // SAFETY: apply writes a 16-byte header before raw + 16 (or raw + 32 if that would sit at
    // the start of a page), inside the 128-byte buffer, and returns that user pointer.
    let user = unsafe { dd_sample_flag_apply(raw, 16) };
    // SAFETY: the header lies within the buffer, 16 bytes before `user`.
    let magic = unsafe { user.cast::<u64>().sub(2).read_unaligned() };
    let (mut found, mut offset) = (null_mut(), 0usize);
    // SAFETY: `user` is in the live buffer; peek reads the header and fills the out-params.
    let recognised = unsafe { dd_sample_flag_peek(user, &mut found, &mut offset) };
    if recognised && found == raw && magic != 0 {
        MAGIC.store(magic, Ordering::Relaxed);
    }
}

/// False if the 16 bytes before `ptr` cannot be a sampler header: `ptr` in the first 16 bytes
/// of a page (the sampler never puts a header there, and the bytes before it may be unmapped),
/// or no magic word.
///
/// # Safety
///
/// `ptr` must be null or a live block.
#[inline(always)]
pub unsafe fn may_carry_header(ptr: *mut c_void) -> bool {
    let magic = MAGIC.load(Ordering::Relaxed);
    let addr = ptr as usize;
    if magic == 0 {
        return true;
    }
    if addr & 4095 < 16 {
        return false;
    }
    // SAFETY: 16 bytes before a live block that is not in the first 16 bytes of its page lie
    // in the same (mapped) page.
    unsafe { ptr.cast::<u64>().sub(2).read_unaligned() == magic }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_the_samplers_magic() {
        learn_header_magic();
        let magic = MAGIC.load(Ordering::Relaxed);
        assert_eq!(
            magic, 0xfab1_edde_c0de_dca7,
            "the x86-64 magic of sample_flag.h"
        );
        #[repr(C, align(4096))]
        struct Page([u64; 512]);
        let mut page = Page([0; 512]);
        page.0[8] = magic;
        let base: *mut c_void = page.0.as_mut_ptr().cast();
        // SAFETY: pointers into `page`, which is live.
        unsafe {
            assert!(may_carry_header(base.byte_add(80)), "magic 16 bytes before");
            assert!(!may_carry_header(base.byte_add(96)), "no magic");
            assert!(
                !may_carry_header(base.byte_add(8)),
                "first 16 bytes of a page"
            );
        }
    }
}
