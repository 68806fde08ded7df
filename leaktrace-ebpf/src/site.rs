//! A site's counters in `SITES`, which every CPU updates at once: reached through a raw
//! pointer, never a `&mut`, and changed by atomic adds.

use leaktrace_ebpf::SiteStats;

/// `*p += v` atomically (a BPF_ATOMIC add).
#[inline(always)]
pub fn add(p: *mut u64, v: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // SAFETY: callers pass a pointer into a live map value or a global; the add is atomic, so
    // concurrent adds from other CPUs are not lost.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// One `SITES` value, shared with every other CPU.
#[derive(Clone, Copy)]
pub struct SharedSite(*mut SiteStats);

impl SharedSite {
    /// Wraps a pointer `SITES.get_ptr_mut` returned.
    #[inline(always)]
    pub fn new(p: *mut SiteStats) -> Self {
        Self(p)
    }

    /// The `ANNOUNCED_*` bits.
    #[inline(always)]
    pub fn announced(self) -> u8 {
        // SAFETY: a live map value (BPF map values are not freed while a program runs);
        // volatile, because other CPUs write it.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).announced) }
    }

    /// Allocations counted so far.
    #[inline(always)]
    pub fn allocs(self) -> u64 {
        // SAFETY: as in `announced`.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).allocs) }
    }

    /// Sets `bits` in `announced`. A plain read-modify-write: two CPUs announcing the same new
    /// site at once may lose a bit, and the site is then announced again, which userspace
    /// takes as a duplicate.
    #[inline(always)]
    pub fn mark(self, bits: u8) {
        let now = self.announced();
        // SAFETY: as in `announced`.
        unsafe { core::ptr::write_volatile(&raw mut (*self.0).announced, now | bits) };
    }

    /// Counts `blocks` allocated blocks of `bytes` in all, still live.
    #[inline(always)]
    pub fn allocated(self, blocks: u64, bytes: u64) {
        // SAFETY: field pointers into a live map value, only used for atomic adds.
        unsafe {
            add(&raw mut (*self.0).allocs, blocks);
            add(&raw mut (*self.0).alloc_bytes, bytes);
            add(&raw mut (*self.0).live_count, blocks);
            add(&raw mut (*self.0).live_bytes, bytes);
        }
    }

    /// Counts `blocks` blocks of `bytes` that left the live table; `freed` when the program
    /// freed them (not when a stale entry was replaced), `old` when they were older than
    /// `OLD_BLOCK_NS`.
    #[inline(always)]
    pub fn released(self, blocks: u64, bytes: u64, freed: bool, old: bool) {
        // SAFETY: field pointers into a live map value, only used for atomic adds.
        unsafe {
            add(&raw mut (*self.0).live_count, blocks.wrapping_neg());
            add(&raw mut (*self.0).live_bytes, bytes.wrapping_neg());
            if freed {
                add(&raw mut (*self.0).frees, blocks);
                if old {
                    add(&raw mut (*self.0).frees_old, blocks);
                }
            }
        }
    }
}
