//! Dicts read from outside: combined and split tables, an instance's `__dict__` wherever the
//! version keeps it (managed before the object, inline after it on 3.13+, or at
//! `tp_dictoffset`), and their keys shown as a user would write them.
//!
//! `PyDictObject` (3.11–3.15): `ma_used` at 16, `ma_keys` at 32, `ma_values` at 40; the keys
//! table is read by stacks/python/dict_keys.rs.
//! A split table's values are an array of pointers: at `ma_values` on 3.11 and 3.12, after a
//! 4-byte header padded to 8 (`capacity`, `size`, `embedded`, `valid`) on 3.13+.

use std::sync::Arc;

use super::{
    pointer, Edge, ObjectReader, Shape, TypeDesc, TPFLAGS_INLINE_VALUES, TPFLAGS_MANAGED_DICT,
};
use crate::process::remote::word;
use crate::stacks::python::dict_keys::{self, Entry, MA_KEYS, MA_VALUES};

/// Where the managed `__dict__` (or 3.12's tagged dict-or-values) sits before an object, and
/// 3.11's values pointer.
const MANAGED_DICT: u64 = 24;
const MANAGED_VALUES_311: u64 = 32;
/// Entries read from one table at most.
const MAX_ENTRIES: u64 = 1 << 24;

impl ObjectReader {
    /// Where a split table's values begin, from its `PyDictValues` pointer.
    fn values_start(&self) -> u64 {
        if self.layout.version >= (3, 13) {
            8
        } else {
            0
        }
    }

    /// The items of the dict at `d`: each value as an edge named by its key (`.name` when
    /// `attrs`, as for a module's globals; `['name']` else), and each key unless `attrs`.
    pub(super) fn dict_items(&mut self, d: u64, attrs: bool, out: &mut Vec<(Edge, u64)>) {
        if !matches!(self.type_of(d), Some((_, t)) if t.shape == Shape::Dict) {
            self.tear(line!(), file!());
            return;
        }
        let (Some(keys), values) = (self.mem.u64(d + MA_KEYS), self.mem.u64(d + MA_VALUES)) else {
            self.tear(line!(), file!());
            return;
        };
        let values = values.unwrap_or(0);
        let split = values != 0;
        let start = values.wrapping_add(self.values_start());
        self.items(keys, split.then_some(start), attrs, out);
    }

    /// The items of the keys table at `keys`, values from the table or from a split array.
    fn items(&mut self, keys: u64, split: Option<u64>, attrs: bool, out: &mut Vec<(Edge, u64)>) {
        let Some(entries) = self.entries(keys) else {
            self.tear(line!(), file!());
            return;
        };
        let values = match split {
            Some(at) => match self.mem.read(at, entries.len() * 8) {
                Some(v) => Some(v),
                None if entries.is_empty() => Some(Vec::new()),
                None => {
                    self.tear(line!(), file!());
                    return;
                }
            },
            None => None,
        };
        for (i, e) in entries.iter().enumerate() {
            let value = match &values {
                Some(v) => word(v, i as u64 * 8).unwrap_or(0),
                None => e.value,
            };
            if e.key == 0 || !pointer(value) {
                continue;
            }
            // Named only when a chain shows it (`ObjectReader::name`): a walk passes millions.
            out.push((Edge::Unnamed { key: e.key, attrs }, value));
            if !attrs {
                out.push((Edge::Key, e.key));
            }
        }
    }

    /// The entries of a keys table (stacks/python/dict_keys.rs).
    fn entries(&mut self, keys: u64) -> Option<Vec<Entry>> {
        dict_keys::entries(&mut self.mem, keys, MAX_ENTRIES)
    }

    /// An instance's attributes, wherever its `__dict__` or values are.
    pub(super) fn instance_dict(&mut self, obj: u64, desc: &TypeDesc, out: &mut Vec<(Edge, u64)>) {
        if desc.flags & TPFLAGS_MANAGED_DICT == 0 {
            // A negative offset counts from the end of a variable-size object: not followed.
            if desc.dictoffset > 0 {
                if let Some(d) = obj
                    .checked_add(desc.dictoffset as u64)
                    .and_then(|at| self.mem.u64(at))
                    .filter(|d| pointer(*d))
                {
                    self.dict_items(d, true, out);
                }
            }
            return;
        }
        let Some(slot) = obj.checked_sub(MANAGED_DICT).and_then(|a| self.mem.u64(a)) else {
            return;
        };
        let values = match self.layout.version {
            (3, 11) if slot == 0 => obj
                .checked_sub(MANAGED_VALUES_311)
                .and_then(|a| self.mem.u64(a))
                .filter(|v| pointer(*v)),
            // 3.12 keeps the values pointer less one: its low bit set tells it from a dict.
            (3, 12) if slot & 1 == 1 => Some(slot + 1),
            // The inline values' header (`capacity`, `size`, `embedded`, `valid`): only
            // valid ones hold the attributes.
            (3, 13..) if slot == 0 && desc.flags & TPFLAGS_INLINE_VALUES != 0 => {
                let header = obj + desc.basicsize;
                let valid = self.mem.read(header, 4).is_some_and(|h| h[3] != 0);
                valid.then(|| header + self.values_start())
            }
            _ => None,
        };
        match values {
            Some(v) if desc.cached_keys != 0 => self.items(desc.cached_keys, Some(v), true, out),
            Some(_) => self.tear(line!(), file!()),
            None if pointer(slot) => self.dict_items(slot, true, out),
            None => {}
        }
    }

    /// The edge to a dict's value under `key`: `.name` or `['name']` for a str, `[42]` for a
    /// small int, `[<tuple key>]` for anything else.
    pub(super) fn key_edge(&mut self, key: u64, attrs: bool) -> Edge {
        let Some((t, _)) = self.type_of(key) else {
            return Edge::Value("<unreadable key>".into());
        };
        if t == self.known.str_type {
            if let Some(s) = self.str_value(key) {
                return if attrs {
                    Edge::Attribute(s)
                } else {
                    Edge::Value(format!("{:?}", s.as_ref()).replacen('"', "'", 2))
                };
            }
        }
        if t == self.known.int_type {
            if let Some(n) = self.small_int(key) {
                return Edge::Value(n.to_string());
            }
        }
        let name = self
            .type_desc(t)
            .map_or_else(|| "?".into(), |d| d.name.clone());
        Edge::Value(format!("<{name} key>"))
    }

    /// A str's value (compact forms, up to 200 characters).
    pub(super) fn str_value(&mut self, at: u64) -> Option<Arc<str>> {
        if let Some(s) = self.strings.get(&at) {
            return Some(s.clone());
        }
        let py = &self.py;
        let (state_at, len_at) = (py.unicode_state, py.unicode_length);
        let (ascii_size, compact_size) = (py.unicode_ascii_size, py.unicode_compact_size);
        let head = self.mem.read(at, compact_size as usize)?;
        let state = u32::from_le_bytes(head.get(state_at as usize..)?.get(..4)?.try_into().ok()?);
        let len = word(&head, len_at)?;
        let (kind, compact, ascii) = ((state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1);
        if compact == 0 || len > 200 || !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        let data = at + if ascii == 1 { ascii_size } else { compact_size };
        let raw = self.mem.read(data, (len * kind as u64) as usize)?;
        let s: String = raw
            .chunks_exact(kind as usize)
            .map(|c| {
                let mut b = [0u8; 4];
                b[..c.len()].copy_from_slice(c);
                char::from_u32(u32::from_le_bytes(b)).unwrap_or('\u{fffd}')
            })
            .collect();
        let s: Arc<str> = s.into();
        if self.strings.len() < 1 << 16 {
            self.strings.insert(at, s.clone());
        }
        Some(s)
    }

    /// An int of at most two 30-bit digits.
    fn small_int(&mut self, at: u64) -> Option<i64> {
        let raw = self.mem.read(at + 16, 16)?;
        let tag = word(&raw, 0)? as i64;
        // 3.12+ keeps the digit count and sign in `lv_tag`; 3.11 a signed `ob_size`.
        let (digits, negative) = if self.layout.version >= (3, 12) {
            ((tag as u64 >> 3) as i64, tag & 3 == 2)
        } else {
            (tag.unsigned_abs() as i64, tag < 0)
        };
        if digits > 2 {
            return None;
        }
        let d = |i: usize| u32::from_le_bytes(raw[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        let mut v = 0i64;
        for i in (0..digits as usize).rev() {
            v = (v << 30) | d(i) as i64;
        }
        Some(if negative { -v } else { v })
    }
}
