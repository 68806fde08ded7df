//! The tcaches of a process's threads, read from outside: which chunks that look in use are
//! in fact freed and held for reuse.

use std::collections::HashSet;

use super::*;

/// What the threads' tcaches hold: the chunks they list and the key their entries carry.
#[derive(Default)]
pub(super) struct Tcaches {
    pub(super) listed: HashSet<u64>,
    pub(super) key: Option<u64>,
    pub(super) torn: u64,
}

/// Reads the tcaches among `candidates` (user addresses of chunks of a tcache's size). A chunk
/// whose counts and heads disagree is someone's data, not a tcache; one whose lists do not
/// match its counts was torn by the running target.
pub(super) fn read_tcaches(mem: &Remote, candidates: &[u64]) -> Tcaches {
    let mut out = Tcaches::default();
    let body = (TCACHE_CHUNK - HDR) as usize;
    let ranges: Vec<(u64, usize)> = candidates.iter().map(|a| (*a, body)).collect();
    for data in mem.read_many(&ranges).into_iter().flatten() {
        let Some(bins) = tcache_bins(&data) else {
            continue;
        };
        match tcache_entries(mem, &bins) {
            Some((entries, key)) => {
                out.listed.extend(entries);
                out.key = out.key.or(key);
            }
            None => out.torn += 1,
        }
    }
    out
}

/// The non-empty bins `(index, count, head)` of what may be a `tcache_perthread_struct`, or
/// `None` when it cannot be one.
fn tcache_bins(body: &[u8]) -> Option<Vec<(u64, u16, u64)>> {
    let mut bins = Vec::new();
    for i in 0..TCACHE_BINS {
        let count = u16::from_le_bytes(body.get(2 * i..2 * i + 2)?.try_into().ok()?);
        let head = word(body, (2 * TCACHE_BINS + 8 * i) as u64)?;
        if (count == 0) != (head == 0) || !head.is_multiple_of(HDR) {
            return None;
        }
        if count > 0 {
            bins.push((i as u64, count, head));
        }
    }
    Some(bins)
}

/// Follows each bin's list: the entries and the key they all carry, or `None` when a list does
/// not hold its count of chunks of its bin's size.
fn tcache_entries(mem: &Remote, bins: &[(u64, u16, u64)]) -> Option<(Vec<u64>, Option<u64>)> {
    let mut entries = Vec::new();
    let mut key = None;
    for &(i, count, head) in bins {
        let size = MIN_CHUNK + HDR * i;
        let mut e = head;
        for _ in 0..count {
            if e == 0 || !e.is_multiple_of(HDR) {
                return None;
            }
            let b = mem.read(e - 8, 24)?;
            let (head_word, next, k) = (word(&b, 0)?, word(&b, 8)?, word(&b, 16)?);
            if head_word & !FLAGS != size || k == 0 || *key.get_or_insert(k) != k {
                return None;
            }
            entries.push(e);
            e = next ^ (e >> 12);
        }
        if e != 0 {
            return None;
        }
    }
    Some((entries, key))
}
