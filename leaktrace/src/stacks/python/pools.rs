//! pymalloc's pools read from outside: which small blocks hold something now.
//!
//! The default coverage sees small Python objects only as the arenas pymalloc takes from the
//! system (`_PyObject_ArenaMmap`, 1 MiB), and `attach` not even those made before it began. To
//! count those objects by type, the type census finds pymalloc's pools in the process's
//! anonymous memory and walks them (Objects/obmalloc.c, 64-bit, 3.10–3.15: 16 KiB pools in 1 MiB
//! arenas):
//! - the first pool starts at the arena's first pool-aligned address;
//! - a pool starts with `struct pool_header` (48 bytes: `ref.count` at 0, `freeblock` at 8,
//!   `szidx` at 36, `nextoffset` at 40, `maxnextoffset` at 44); its blocks are
//!   `(szidx + 1) * 16` bytes from offset 48;
//! - blocks below `nextoffset` were handed out once; those on the `freeblock` list are free
//!   again; a pool whose `ref.count` is 0 holds nothing.
//!
//! A pool is recognised by its header alone — `maxnextoffset` is exactly the pool size less one
//! block, `nextoffset` a whole number of blocks past the header, the count no more than that,
//! the free list inside the pool — and confirmed by its walk: the pool's own count must equal
//! the blocks the walk finds in use, or the pool is skipped as torn (the target may run while
//! it is read) and counted as such. Only whole, aligned pools inside anonymous private
//! read-write mappings of at least an arena's size are looked at.

use crate::process::remote::Remote;

/// pymalloc's alignment and the largest block it serves (`SMALL_REQUEST_THRESHOLD`).
const ALIGNMENT: u64 = 16;
const MAX_BLOCK: u64 = 512;
/// `sizeof(struct pool_header)`, rounded up to `ALIGNMENT`.
const POOL_OVERHEAD: u64 = 48;

/// pymalloc's pool size in the builds leaktrace reads (the radix-tree build, 3.10+ on 64-bit).
pub const POOL_SIZE: u64 = 1 << 14;
/// Its arena size: no mapping smaller than this holds an arena.
pub const ARENA_SIZE: u64 = 1 << 20;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
}

/// What a scan of a process's pools found.
#[derive(Debug, Default)]
pub struct ScanTotals {
    pub pools: u64,
    pub torn_pools: u64,
}

/// Whether the 48 bytes at the start of an aligned 16 KiB block look like a pool in use.
fn looks_like_pool(h: &[u8], at: u64) -> bool {
    let (Some(count), Some(free), Some(szidx), Some(next), Some(maxnext)) = (
        u32_at(h, 0),
        u64_at(h, 8),
        u32_at(h, 36),
        u32_at(h, 40),
        u32_at(h, 44),
    ) else {
        return false;
    };
    let size = (szidx as u64 + 1) * ALIGNMENT;
    let (next, maxnext) = (next as u64, maxnext as u64);
    size <= MAX_BLOCK
        && count > 0
        && maxnext == POOL_SIZE - size
        && next >= POOL_OVERHEAD + size
        && next <= POOL_SIZE
        && (next - POOL_OVERHEAD).is_multiple_of(size)
        && count as u64 <= (next - POOL_OVERHEAD) / size
        && (free == 0 || (free > at && free < at + POOL_SIZE))
}

/// Finds the pools in use in `regions` (`(start, end)` of anonymous private read-write
/// mappings) and hands each, read whole, to `f(pool address, its bytes, its used blocks)`.
pub fn scan(
    mem: &Remote,
    regions: &[(u64, u64)],
    mut f: impl FnMut(u64, &[u8], &[(u64, u64)]),
) -> ScanTotals {
    let mut totals = ScanTotals::default();
    for &(start, end) in regions.iter().filter(|(s, e)| e - s >= ARENA_SIZE) {
        let first = start.next_multiple_of(POOL_SIZE);
        let candidates: Vec<u64> = (first..end)
            .step_by(POOL_SIZE as usize)
            .filter(|a| a + POOL_SIZE <= end)
            .collect();
        for chunk in candidates.chunks(4096) {
            let heads: Vec<(u64, usize)> =
                chunk.iter().map(|a| (*a, POOL_OVERHEAD as usize)).collect();
            let pools: Vec<u64> = chunk
                .iter()
                .zip(mem.read_many(&heads))
                .filter(|(a, h)| h.as_deref().is_some_and(|h| looks_like_pool(h, **a)))
                .map(|(a, _)| *a)
                .collect();
            // Read whole in batches of 64 pools (1 MiB).
            for batch in pools.chunks(64) {
                let ranges: Vec<(u64, usize)> =
                    batch.iter().map(|a| (*a, POOL_SIZE as usize)).collect();
                for (at, data) in batch.iter().zip(mem.read_many(&ranges)) {
                    let Some(data) = data else {
                        totals.torn_pools += 1;
                        continue;
                    };
                    match pool_blocks(&data, *at) {
                        PoolWalk::Empty => {}
                        PoolWalk::Torn => totals.torn_pools += 1,
                        PoolWalk::Used(blocks) => {
                            totals.pools += 1;
                            f(*at, &data, &blocks);
                        }
                    }
                }
            }
        }
    }
    totals
}

enum PoolWalk {
    Empty,
    Torn,
    Used(Vec<(u64, u64)>),
}

/// The used blocks of the pool held in `p` (at address `at`).
fn pool_blocks(p: &[u8], at: u64) -> PoolWalk {
    let header = || -> Option<(u32, u64, u64, u64)> {
        Some((
            u32_at(p, 0)?,
            u64_at(p, 8)?,
            (u32_at(p, 36)? as u64 + 1) * ALIGNMENT,
            u32_at(p, 40)? as u64,
        ))
    };
    let Some((count, freeblock, size, next)) = header() else {
        return PoolWalk::Torn;
    };
    if count == 0 {
        return PoolWalk::Empty;
    }
    let len = p.len() as u64;
    if size > MAX_BLOCK || next < POOL_OVERHEAD || next > len + size {
        return PoolWalk::Torn;
    }
    let carved = (next.min(len) - POOL_OVERHEAD) / size;
    let mut free = vec![false; carved as usize];
    let mut f = freeblock;
    let mut steps = 0;
    while f != 0 {
        let rel = f.wrapping_sub(at);
        if rel < POOL_OVERHEAD || rel >= len || !(rel - POOL_OVERHEAD).is_multiple_of(size) {
            return PoolWalk::Torn;
        }
        let i = ((rel - POOL_OVERHEAD) / size) as usize;
        // The block carved last may be the free list's head before `nextoffset` moves past it.
        if i < free.len() {
            if free[i] {
                return PoolWalk::Torn; // a cycle
            }
            free[i] = true;
        }
        steps += 1;
        if steps > carved + 1 {
            return PoolWalk::Torn;
        }
        let Some(next_free) = u64_at(p, rel as usize) else {
            return PoolWalk::Torn;
        };
        f = next_free;
    }
    let blocks: Vec<(u64, u64)> = (0..carved)
        .filter(|i| !free[*i as usize])
        .map(|i| (at + POOL_OVERHEAD + i * size, size))
        .collect();
    if blocks.len() as u64 != count as u64 {
        return PoolWalk::Torn;
    }
    PoolWalk::Used(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 0x7f00_0000_4000;

    /// A pool of 32-byte blocks: 5 carved, the 2nd and 4th freed.
    fn pool() -> Vec<u8> {
        let mut p = vec![0u8; POOL_SIZE as usize];
        let block = |i: u64| AT + POOL_OVERHEAD + i * 32;
        p[0..4].copy_from_slice(&3u32.to_le_bytes());
        p[8..16].copy_from_slice(&block(1).to_le_bytes());
        p[36..40].copy_from_slice(&1u32.to_le_bytes());
        p[40..44].copy_from_slice(&((POOL_OVERHEAD + 5 * 32) as u32).to_le_bytes());
        p[44..48].copy_from_slice(&((POOL_SIZE - 32) as u32).to_le_bytes());
        let mut link = |i: u64, to: u64| {
            let o = (block(i) - AT) as usize;
            p[o..o + 8].copy_from_slice(&to.to_le_bytes());
        };
        link(1, block(3));
        link(3, 0);
        p
    }

    fn used(p: &[u8]) -> Option<Vec<(u64, u64)>> {
        match pool_blocks(p, AT) {
            PoolWalk::Used(b) => Some(b),
            _ => None,
        }
    }

    #[test]
    fn used_blocks_are_the_carved_ones_off_the_free_list() {
        let p = pool();
        assert!(looks_like_pool(&p[..48], AT));
        let b = |i: u64| (AT + 48 + i * 32, 32);
        assert_eq!(used(&p), Some(vec![b(0), b(2), b(4)]));
    }

    #[test]
    fn a_pool_whose_count_disagrees_is_torn() {
        let mut p = pool();
        p[0..4].copy_from_slice(&4u32.to_le_bytes());
        assert!(
            looks_like_pool(&p[..48], AT),
            "the header alone is plausible"
        );
        assert!(matches!(pool_blocks(&p, AT), PoolWalk::Torn));
    }

    #[test]
    fn what_is_not_a_pool_is_not_taken_for_one() {
        let mut p = pool();
        p[8..16].copy_from_slice(&0xdead_beefu64.to_le_bytes());
        assert!(
            !looks_like_pool(&p[..48], AT),
            "a free list outside the pool"
        );
        assert!(matches!(pool_blocks(&p, AT), PoolWalk::Torn));
        let mut q = pool();
        q[44..48].copy_from_slice(&1000u32.to_le_bytes());
        assert!(
            !looks_like_pool(&q[..48], AT),
            "maxnextoffset is not the pool's"
        );
        assert!(!looks_like_pool(&[0u8; 48], AT), "an empty page");
        // An empty pool holds nothing.
        let mut e = pool();
        e[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(pool_blocks(&e, AT), PoolWalk::Empty));
    }
}
