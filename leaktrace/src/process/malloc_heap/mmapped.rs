//! Chunks malloc gave their own mapping (`mmap_threshold` and more), found page by page in a
//! process's anonymous memory.

use super::*;

/// Finds the mmapped chunks in `[start, end)` (page-aligned) outside the heaps that start at
/// `heaps`: any page may start one, since the kernel merges a chunk's mapping with anonymous
/// neighbours; a chunk found is skipped whole.
pub(super) fn mmapped_in(
    mem: &Remote,
    (start, end): (u64, u64),
    heaps: &[u64],
    mut f: impl FnMut(Chunk),
) {
    let mut q = start;
    while q < end {
        let pages: Vec<(u64, usize)> = (q..end)
            .step_by(PAGE as usize)
            .take(PAGES_AT_ONCE)
            .map(|a| (a, HDR as usize))
            .collect();
        let batch_end = pages.last().map_or(end, |(a, _)| a + PAGE);
        let mut skip_to = q;
        for ((at, _), head) in pages.iter().zip(mem.read_many(&pages)) {
            if *at < skip_to {
                continue;
            }
            if let Some(heap) = heaps.iter().find(|h| (**h..*h + HEAP_MAX).contains(at)) {
                skip_to = heap + HEAP_MAX;
                continue;
            }
            if let Some(size) = head.and_then(|h| mmapped_size(&h, *at, end)) {
                f(Chunk {
                    addr: at + HDR,
                    size: size - HDR,
                });
                // The next chunk starts a page: sizes that leave the header out end short of one.
                skip_to = (at + size).next_multiple_of(PAGE);
            }
        }
        q = skip_to.max(batch_end);
    }
}

/// The size of the mmapped chunk whose header `h` starts the page at `at`, if it is one that
/// ends by `end`.
fn mmapped_size(h: &[u8], at: u64, end: u64) -> Option<u64> {
    let (prev_size, head) = (word(h, 0)?, word(h, 8)?);
    let size = head & !FLAGS;
    // Whole pages up to glibc 2.36; newer ones (Debian sid's 2.41) keep the page rounding but
    // leave the header out of the size.
    let fits = (PAGE - HDR..=end.saturating_sub(at)).contains(&size)
        && (size.is_multiple_of(PAGE) || (size + HDR).is_multiple_of(PAGE));
    (prev_size == 0 && head & FLAGS == IS_MMAPPED && fits).then_some(size)
}
