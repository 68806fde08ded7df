//! The tcaches of a process's threads, read from outside: which chunks that look in use are
//! in fact freed and held for reuse.

use std::collections::HashSet;

use super::*;
use crate::process::remote::USER_TOP;

/// What the threads' tcaches hold: the chunks they list and the key their entries carry.
#[derive(Default)]
pub(super) struct Tcaches {
    pub(super) listed: HashSet<u64>,
    pub(super) key: Option<u64>,
    pub(super) torn: u64,
}

/// One version's `tcache_perthread_struct`: its bins, the chunk holding it, and whether its
/// `u16` array counts the entries held (up to 2.41: `counts`, at most 7 a bin) or the room
/// left (2.42+: `num_slots`, with 12 more bins for larger chunks).
struct Layout {
    bins: usize,
    chunk: u64,
    counts: bool,
}

const LAYOUTS: [Layout; 2] = [
    Layout {
        bins: 64,
        chunk: 0x290,
        counts: true,
    },
    Layout {
        bins: 76,
        chunk: 0x300,
        counts: false,
    },
];

/// Entries followed in one bin at most.
const MAX_ENTRIES: u16 = 1024;

/// Whether a chunk of `size` bytes (header included) may hold a thread's tcache.
pub(super) fn may_be_tcache(size: u64) -> bool {
    LAYOUTS.iter().any(|l| l.chunk == size)
}

/// Reads the tcaches among `candidates` (user addresses and chunk sizes of chunks of a
/// tcache's size). A chunk whose heads are no aligned pointers is someone's data, not a tcache;
/// one whose lists do not hold together was torn by the running target.
pub(super) fn read_tcaches(mem: &Remote, candidates: &[(u64, u64)]) -> Tcaches {
    let mut out = Tcaches::default();
    for &(addr, size) in candidates {
        let Some(layout) = LAYOUTS.iter().find(|l| l.chunk == size) else {
            continue;
        };
        // The struct uses the next chunk's `prev_size` too (76 bins fill 760 bytes of 0x300).
        let Some(data) = mem.read(addr, (size - 8) as usize) else {
            continue;
        };
        let Some(bins) = tcache_bins(&data, layout) else {
            continue;
        };
        // Safe-linking (2.32+) mangles each `next`; older lists hold it plain.
        let entries = tcache_entries(mem, &bins, layout, true)
            .or_else(|| tcache_entries(mem, &bins, layout, false));
        match entries {
            Some((entries, key)) => {
                out.listed.extend(entries);
                out.key = out.key.or(key);
            }
            None if any_head_fits(mem, &bins) => out.torn += 1,
            // Someone's data that only looks like a tcache: with 2.42+'s `num_slots` the
            // counts say nothing, and a chunk of aligned pointers passes for heads (sid's
            // 3.14.10 has one, of 0x300 bytes, pointing into a mapping outside the heap).
            None => {}
        }
    }
    out
}

/// Whether any head of the first 64 bins points at a chunk of its bin's size: what a tcache
/// torn by the running target still has, and a chunk of someone's pointers does not.
fn any_head_fits(mem: &Remote, bins: &[(u64, u16, u64)]) -> bool {
    bins.iter()
        .filter(|(i, _, _)| *i < 64)
        .any(|&(i, _, head)| {
            mem.read(head.wrapping_sub(8), 8)
                .and_then(|b| word(&b, 0))
                .is_some_and(|w| w & !FLAGS == MIN_CHUNK + HDR * i)
        })
}

/// The non-empty bins `(index, count, head)` of what may be a `tcache_perthread_struct`, or
/// `None` when it cannot be one. With `num_slots` the count is unknown (0): lists are followed
/// to their end.
fn tcache_bins(body: &[u8], layout: &Layout) -> Option<Vec<(u64, u16, u64)>> {
    let mut bins = Vec::new();
    for i in 0..layout.bins {
        let count = u16::from_le_bytes(body.get(2 * i..2 * i + 2)?.try_into().ok()?);
        let head = word(body, (2 * layout.bins + 8 * i) as u64)?;
        let disagree = layout.counts && (count == 0) != (head == 0);
        if disagree || !head.is_multiple_of(HDR) || head >= USER_TOP {
            return None;
        }
        if head != 0 {
            bins.push((i as u64, if layout.counts { count } else { 0 }, head));
        }
    }
    Some(bins)
}

/// Follows each bin's list: the entries and the key they all carry, or `None` when a list does
/// not hold its count (when known) of chunks of its bin's size (the first 64 bins: 32 bytes
/// and 16 more a bin).
fn tcache_entries(
    mem: &Remote,
    bins: &[(u64, u16, u64)],
    layout: &Layout,
    mangled: bool,
) -> Option<(Vec<u64>, Option<u64>)> {
    let mut entries = Vec::new();
    let mut key = None;
    for &(i, count, head) in bins {
        let size = (i < 64).then_some(MIN_CHUNK + HDR * i);
        let mut e = head;
        let mut n = 0;
        while e != 0 && n < count.max(if layout.counts { 0 } else { MAX_ENTRIES }) {
            if !e.is_multiple_of(HDR) || e >= USER_TOP {
                return None;
            }
            let b = mem.read(e - 8, 24)?;
            let (head_word, next, k) = (word(&b, 0)?, word(&b, 8)?, word(&b, 16)?);
            let len = head_word & !FLAGS;
            let fits = size.map_or(len >= MIN_CHUNK && head_word & IS_MMAPPED == 0, |s| {
                len == s
            });
            if !fits || k == 0 || *key.get_or_insert(k) != k {
                return None;
            }
            entries.push(e);
            e = if mangled { next ^ (e >> 12) } else { next };
            n += 1;
        }
        if e != 0 || (layout.counts && n != count) {
            return None;
        }
    }
    Some((entries, key))
}
