//! Decoding code objects from target memory: file, qualified name, first line, and the line of
//! an instruction from the 3.11+ location table (`Objects/locations.md` in CPython).

use std::collections::HashMap;
use std::sync::Arc;

use super::layout::PyLayout;
use crate::process::remote::{word, Remote};

/// What a code object says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    pub filename: Arc<str>,
    pub qualname: Arc<str>,
    pub firstlineno: u32,
    /// Length of the bytecode in code units (`Py_SIZE` of a code object).
    pub code_units: u64,
    /// The `co_linetable` pointer, compared with what the kernel read when the site was new.
    pub check: u64,
    linetable: Vec<u8>,
    /// Pointers that identify this code object, re-checked on every cache hit: a freed code
    /// object's address may be reused by another.
    fingerprint: [u64; 4],
}

impl CodeInfo {
    /// The source line of the instruction at `lasti` (in code units), if it has one.
    pub fn line(&self, lasti: u64) -> Option<u32> {
        line_for(&self.linetable, self.firstlineno, lasti)
    }

    /// Whether an instruction index lies in this code object's bytecode: a frame recorded for
    /// another code object that has since been freed, its address reused by this one, usually
    /// points elsewhere.
    pub fn contains(&self, lasti: u64) -> bool {
        lasti < self.code_units
    }
}

/// `PyVarObject.ob_size`: for a code object, its bytecode length in code units.
const OB_SIZE: u64 = 16;

/// Reads a `str` object (compact forms; every code object's strings are compact).
pub fn read_str(mem: &Remote, layout: &PyLayout, addr: u64) -> Option<String> {
    let head = mem.read(addr, layout.unicode_compact_size as usize)?;
    let state = u32::from_le_bytes(
        head.get(layout.unicode_state as usize..)?
            .get(..4)?
            .try_into()
            .ok()?,
    );
    let len = word(&head, layout.unicode_length)? as usize;
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || len > 1 << 20 {
        return None;
    }
    let data = if ascii {
        addr.wrapping_add(layout.unicode_ascii_size)
    } else {
        addr.wrapping_add(layout.unicode_compact_size)
    };
    let raw = mem.read(data, len * kind.max(1) as usize)?;
    match kind {
        1 => Some(raw.iter().map(|&b| b as char).collect()),
        2 => Some(String::from_utf16_lossy(
            &raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )),
        4 => Some(
            raw.chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes(c.try_into().unwrap())).unwrap_or('\u{fffd}')
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Reads a `bytes` object's contents.
pub fn read_bytes(mem: &Remote, layout: &PyLayout, addr: u64) -> Option<Vec<u8>> {
    let len = mem.u64(addr.wrapping_add(layout.bytes_size))? as usize;
    if len > 1 << 24 {
        return None;
    }
    if len == 0 {
        return Some(Vec::new());
    }
    mem.read(addr.wrapping_add(layout.bytes_sval), len)
}

/// Code objects of one process, decoded once and re-validated on use.
#[derive(Default)]
pub struct CodeCache {
    cache: HashMap<u64, CodeInfo>,
}

impl CodeCache {
    /// The decoded code object at `addr`, or `None` if it cannot be read as one. `check` is the
    /// `co_linetable` pointer the kernel read from the code object the frame ran (0 if none): a
    /// cached entry with the same one is that object, and needs no read of the target.
    pub fn get(
        &mut self,
        mem: &Remote,
        layout: &PyLayout,
        addr: u64,
        check: u64,
    ) -> Option<&CodeInfo> {
        if check != 0 && self.cache.get(&addr).is_some_and(|c| c.check == check) {
            return self.cache.get(&addr);
        }
        // From `ob_size` (PyVarObject, offset 16) to the last string pointer.
        let lo = OB_SIZE.min(layout.co_firstlineno).min(layout.co_filename);
        let hi = layout
            .co_linetable
            .max(layout.co_qualname)
            .max(layout.co_firstlineno)
            + 8;
        let Some(head) = mem.read(addr.wrapping_add(lo), (hi - lo) as usize) else {
            log::trace!("code {addr:#x}: unreadable");
            return None;
        };
        let field = |off: u64| word(&head, off - lo);
        let fingerprint = [
            field(layout.co_filename)?,
            field(layout.co_qualname)?,
            field(layout.co_linetable)?,
            field(layout.co_name)?,
        ];
        let fresh = self
            .cache
            .get(&addr)
            .is_none_or(|c| c.fingerprint != fingerprint);
        if fresh {
            let firstlineno = u32::from_le_bytes(
                head.get((layout.co_firstlineno - lo) as usize..)?
                    .get(..4)?
                    .try_into()
                    .ok()?,
            );
            let filename = read_str(mem, layout, fingerprint[0]);
            let qualname = read_str(mem, layout, fingerprint[1])
                .or_else(|| read_str(mem, layout, fingerprint[3]));
            let linetable = read_bytes(mem, layout, fingerprint[2]);
            log::trace!(
                "code {addr:#x}: {fingerprint:x?} → {filename:?} {qualname:?} {:?}",
                linetable.as_ref().map(|l| l.len())
            );
            let info = CodeInfo {
                filename: filename?.into(),
                qualname: qualname?.into(),
                firstlineno,
                code_units: field(OB_SIZE)?,
                check: fingerprint[2],
                linetable: linetable?,
                fingerprint,
            };
            self.cache.insert(addr, info);
        }
        self.cache.get(&addr)
    }
}

fn varint(it: &mut impl Iterator<Item = u8>) -> Option<u64> {
    let mut b = it.next()?;
    let mut v = (b & 63) as u64;
    let mut shift = 0;
    while b & 64 != 0 {
        b = it.next()?;
        shift += 6;
        if shift > 60 {
            return None; // corrupt: no line delta is that large
        }
        v |= ((b & 63) as u64) << shift;
    }
    Some(v)
}

fn svarint(it: &mut impl Iterator<Item = u8>) -> Option<i64> {
    let v = varint(it)?;
    Some(if v & 1 == 1 {
        -((v >> 1) as i64)
    } else {
        (v >> 1) as i64
    })
}

/// Walks a 3.11+ location table to the entry covering code unit `lasti`.
pub fn line_for(table: &[u8], firstlineno: u32, lasti: u64) -> Option<u32> {
    let mut it = table.iter().copied().peekable();
    let mut line = firstlineno as i64;
    let mut unit: u64 = 0;
    while let Some(first) = it.next() {
        if first & 0x80 == 0 {
            return None; // not the start of an entry: a corrupt table
        }
        let code = (first >> 3) & 15;
        let length = (first & 7) as u64 + 1;
        let this_line = match code {
            15 => None,
            14 => {
                line = line.checked_add(svarint(&mut it)?)?;
                varint(&mut it)?; // end line delta
                varint(&mut it)?; // column + 1
                varint(&mut it)?; // end column + 1
                Some(line)
            }
            13 => {
                line = line.checked_add(svarint(&mut it)?)?;
                Some(line)
            }
            10..=12 => {
                line = line.checked_add((code - 10) as i64)?;
                it.next()?;
                it.next()?;
                Some(line)
            }
            _ => {
                it.next()?;
                Some(line)
            }
        };
        if lasti < unit.saturating_add(length) {
            return this_line.and_then(|l| u32::try_from(l).ok());
        }
        unit = unit.saturating_add(length);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table written by hand: entries of each form, checked against what CPython's own
    /// `co_lines()` reports for the same bytes (see the test below, run on a real interpreter).
    #[test]
    fn decodes_each_entry_form() {
        // 2 units, no-column form (13), line +1; then 3 units one-line form (11) line +1, cols;
        // then 1 unit short form (0), same line; then 2 units long form (14) line -2; then 1
        // unit "no location" (15).
        let table = [
            0x80 | (13 << 3) | 1,
            0x02, // svarint +1
            0x80 | (11 << 3) | 2,
            5,
            9, // +1, columns
            0x80,
            0x12, // short form, same line
            0x80 | (14 << 3) | 1,
            0x05,
            0x00,
            0x01,
            0x03, // -2, end-line, col, end-col
            0x80 | (15 << 3),
        ];
        let l = |u| line_for(&table, 10, u);
        assert_eq!((l(0), l(1)), (Some(11), Some(11)));
        assert_eq!((l(2), l(4)), (Some(12), Some(12)));
        assert_eq!(l(5), Some(12));
        assert_eq!((l(6), l(7)), (Some(10), Some(10)));
        assert_eq!(l(8), None);
        assert_eq!(l(9), None, "past the end");
    }

    /// Garbage read from a freed code object must never panic.
    #[test]
    fn survives_corrupt_tables() {
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80)
            .collect();
        for lasti in [0, 1, 100, 5000] {
            let _ = line_for(&junk, u32::MAX, lasti);
        }
        assert_eq!(varint(&mut [0xffu8; 20].into_iter()), None);
        assert_eq!(line_for(&[0x00], 1, 0), None, "not an entry start");
    }

    #[test]
    fn varints() {
        let mut it = [0x41u8, 0x02].into_iter();
        assert_eq!(varint(&mut it), Some(1 | (2 << 6)));
        assert_eq!(svarint(&mut [0x03u8].into_iter()), Some(-1));
        assert_eq!(svarint(&mut [0x04u8].into_iter()), Some(2));
    }

    /// Against CPython itself: every instruction's line from `co_lines()` must match.
    #[test]
    fn matches_cpython_co_lines() {
        let home = std::env::var("HOME").unwrap_or_default();
        for py in [
            "3.11.7/bin/python3.11",
            "3.12.1/bin/python3.12",
            "3.13.0/bin/python3.13",
        ] {
            let exe = std::path::Path::new(&home).join(".pyenv/versions").join(py);
            if !exe.exists() {
                eprintln!("skipping {}", exe.display());
                continue;
            }
            let prog = r#"
import sys
def f(a, b):
    x = [a,
         b]
    if a:
        y = {k: v for k, v in zip(x, x)}
    return (a +
            b)
c = f.__code__
print(c.co_firstlineno)
print(c.co_linetable.hex())
for start, end, line in c.co_lines():
    for u in range(start // 2, end // 2):
        print(u, line if line is not None else -1)
"#;
            let out = std::process::Command::new(&exe)
                .args(["-c", prog])
                .output()
                .unwrap();
            assert!(out.status.success());
            let text = String::from_utf8(out.stdout).unwrap();
            let mut lines = text.lines();
            let first: u32 = lines.next().unwrap().parse().unwrap();
            let hex = lines.next().unwrap();
            let table: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let mut checked = 0;
            for l in lines {
                let (u, want) = l.split_once(' ').unwrap();
                let (u, want): (u64, i64) = (u.parse().unwrap(), want.parse().unwrap());
                let got = line_for(&table, first, u).map(i64::from).unwrap_or(-1);
                assert_eq!(got, want, "{py}: unit {u}");
                checked += 1;
            }
            assert!(checked > 10);
        }
    }
}
