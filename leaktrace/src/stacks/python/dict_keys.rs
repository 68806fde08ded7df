//! A dict's keys table (`PyDictKeysObject`, 3.11–3.15) read from outside: one reader for the
//! census (a class's `__module__`) and the reference reader (every dict).
//!
//! `dk_log2_size` at 8, `dk_log2_index_bytes` at 9, `dk_kind` at 10, `dk_nentries` at 24, then
//! `1 << dk_log2_index_bytes` bytes of indices, then the entries: (hash, key, value) for the
//! general kind (0), (key, value) for str-keyed ones (1, 2).

use crate::process::remote::{word, PageCache};

/// `PyDictObject.ma_keys` and `ma_values`.
pub const MA_KEYS: u64 = 32;
pub const MA_VALUES: u64 = 40;
const DK_HEAD: usize = 32;
const DK_KIND_GENERAL: u8 = 0;

/// One entry of a keys table: the key, and the value when the table holds it (a split
/// table's values are elsewhere).
pub struct Entry {
    pub key: u64,
    pub value: u64,
}

/// The entries of the keys table at `keys`, checked for plausible sizes; `None` past `max`
/// entries or when the header cannot be one.
pub fn entries(pages: &mut PageCache, keys: u64, max: u64) -> Option<Vec<Entry>> {
    let head = pages.read(keys, DK_HEAD)?;
    let (log2_size, log2_index_bytes, kind) = (head[8], head[9], head[10]);
    let n = word(&head, 24)?;
    // Indices are 1, 2, 4 or 8 bytes each: `log2_index_bytes` is `log2_size` plus 0 to 3.
    let index_width = log2_index_bytes.checked_sub(log2_size);
    if log2_size > 30
        || !matches!(index_width, Some(0..=3))
        || kind > 2
        || n > (1u64 << log2_size)
        || n > max
    {
        return None;
    }
    let (size, key_at) = if kind == DK_KIND_GENERAL {
        (24, 8)
    } else {
        (16, 0)
    };
    if n == 0 {
        return Some(Vec::new());
    }
    let start = keys.checked_add(DK_HEAD as u64 + (1u64 << log2_index_bytes))?;
    let raw = pages.read(start, (n * size) as usize)?;
    Some(
        (0..n)
            .map(|i| Entry {
                key: word(&raw, i * size + key_at).unwrap_or(0),
                value: word(&raw, i * size + key_at + 8).unwrap_or(0),
            })
            .collect(),
    )
}
