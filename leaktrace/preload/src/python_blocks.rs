//! The blocks the CPython domain wrappers sampled, kept so that their frees know them for sure.
//!
//! glibc's chunk layout lets `src/tag.rs` tell a sampler header from look-alike bytes, but a
//! pymalloc block has no such layout: the 16 bytes in front of it are the end of the previous
//! block in the pool, which a Python program fills at will (a `bytes` object can end in the
//! sampler's magic and a valid offset). Taking such a block for a sampled one would zero 16
//! bytes of its neighbour and hand pymalloc a pointer into the middle of a block. So a domain
//! free trusts a header only if the block is also in this set. Blocks the libc hooks sampled
//! reach the domain frees too (pymalloc passes requests over 512 bytes to malloc) and must go
//! on to libc untouched; they are not in the set either.
//!
//! The set is a fixed open-addressing table of user pointers, lock-free so that it needs no
//! allocation, no lock to hold across a fork, and nothing from the interpreter. Only sampled
//! allocations, their frees and blocks whose header looks sampled ever reach it.

use core::sync::atomic::{AtomicUsize, Ordering};

/// log2 of the number of slots: 2^17 slots of 8 bytes, 1 MiB of `.bss` that costs nothing until
/// samples touch it, and room for about 100,000 live samples (6 GiB of Python heap at the
/// 64 KiB floor, 48 GiB at the default 512 KiB).
const SLOTS_LOG2: u32 = 17;
const SLOTS: usize = 1 << SLOTS_LOG2;
const MASK: usize = SLOTS - 1;

/// How far from its home slot a block may land. Bounded so that a full table costs a fixed
/// number of probes; a block that finds no slot is simply not kept as a sample.
const MAX_PROBES: usize = 64;

/// A slot that never held a block: a lookup can stop here.
const EMPTY: usize = 0;
/// A slot whose block was freed: inserts reuse it, lookups walk past it. Block addresses are
/// 16-aligned, so neither marker is one.
const FREED: usize = 1;

static TABLE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(EMPTY) }; SLOTS];

/// The number of blocks in the table, on a cache line of its own: every domain free reads it,
/// and only sampled allocations and their frees write it.
#[repr(align(64))]
struct Count(AtomicUsize);

static LIVE: Count = Count(AtomicUsize::new(0));

/// The slot a block's probe sequence starts at (Fibonacci hashing of the 16-byte granule).
#[inline(always)]
fn home(block: usize) -> usize {
    ((block >> 4) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as usize >> (64 - SLOTS_LOG2)
}

/// Whether any sampled domain block may be live, so that a free can skip the header check.
///
/// A block is added before its pointer is returned, and the program hands a pointer to the
/// thread that frees it through some synchronisation (the GIL, at least), so that thread sees
/// the count that included it.
#[inline(always)]
pub fn any() -> bool {
    LIVE.0.load(Ordering::Relaxed) != 0
}

/// Records a sampled block; false if its neighbourhood of the table is full.
pub fn insert(block: usize) -> bool {
    let start = home(block);
    for i in 0..MAX_PROBES {
        let slot = &TABLE[(start + i) & MASK];
        let mut seen = slot.load(Ordering::Acquire);
        loop {
            if seen == block {
                // A record that outlived its block (freed behind the wrappers' back, e.g. by a
                // C extension calling libc free on a PyMem block): one record per address.
                return true;
            }
            if seen != EMPTY && seen != FREED {
                break;
            }
            match slot.compare_exchange(seen, block, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    LIVE.0.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(now) => seen = now,
            }
        }
    }
    false
}

/// Whether `block` is recorded.
pub fn contains(block: usize) -> bool {
    find(block).is_some()
}

/// Forgets `block`; false if it was not recorded.
pub fn remove(block: usize) -> bool {
    let Some(slot) = find(block) else {
        return false;
    };
    // Only the thread freeing a block removes it, so nobody else can clear this slot first.
    if slot
        .compare_exchange(block, FREED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    LIVE.0.fetch_sub(1, Ordering::Relaxed);
    true
}

/// The number of blocks recorded, for the statistics.
pub fn live() -> usize {
    LIVE.0.load(Ordering::Relaxed)
}

/// The slot that holds `block`, if any.
fn find(block: usize) -> Option<&'static AtomicUsize> {
    let start = home(block);
    for i in 0..MAX_PROBES {
        let slot = &TABLE[(start + i) & MASK];
        match slot.load(Ordering::Acquire) {
            v if v == block => return Some(slot),
            EMPTY => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    // The table is one static, so the tests take turns and each uses addresses of its own.
    static TURN: Mutex<()> = Mutex::new(());

    /// `n` block addresses from `base` up that all start probing at the same slot.
    fn colliding(base: usize, n: usize) -> Vec<usize> {
        let slot = home(base);
        (0..)
            .map(|i| base + i * 16)
            .filter(|&b| home(b) == slot)
            .take(n)
            .collect()
    }

    #[test]
    fn insert_find_remove() {
        let _turn = TURN.lock().unwrap();
        let a = 0x7f00_0000_1010;
        assert!(!contains(a));
        assert!(insert(a));
        assert!(contains(a));
        assert!(any());
        assert!(
            insert(a),
            "a second record of the same address is refused quietly"
        );
        assert!(remove(a));
        assert!(!contains(a));
        assert!(!remove(a));
    }

    #[test]
    fn colliding_blocks_probe_past_freed_slots() {
        let _turn = TURN.lock().unwrap();
        let blocks = colliding(0x5500_0000_0000, 8);
        for &b in &blocks {
            assert!(insert(b));
        }
        assert!(remove(blocks[2]));
        assert!(contains(blocks[7]), "a lookup walks past a freed slot");
        assert!(!contains(blocks[2]));
        assert!(insert(blocks[2]), "and an insert reuses it");
        for &b in &blocks {
            assert!(remove(b));
        }
    }

    #[test]
    fn a_full_neighbourhood_refuses() {
        let _turn = TURN.lock().unwrap();
        let blocks = colliding(0x6600_0000_0000, MAX_PROBES + 1);
        for &b in &blocks[..MAX_PROBES] {
            assert!(insert(b));
        }
        assert!(!insert(blocks[MAX_PROBES]));
        assert!(!contains(blocks[MAX_PROBES]));
        for &b in &blocks[..MAX_PROBES] {
            assert!(remove(b));
        }
    }
}
