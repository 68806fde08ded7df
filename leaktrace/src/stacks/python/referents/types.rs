//! Types read from outside, once each: checked to be types, given the shape of the first
//! type of known layout on their `tp_base` chain, their object members collected, and marked
//! opaque when a static type of unknown layout adds C fields on the way.

use std::sync::Arc;

use super::{
    pointer, ObjectReader, Shape, TypeDesc, MAX_BASES, MAX_MEMBERS, MEMBER_SIZE, TPFLAGS_HAVE_GC,
    TPFLAGS_HEAPTYPE, TP_BASE, TP_BASICSIZE, TP_DICTOFFSET, TP_FLAGS, TP_MEMBERS, TP_NAME,
    TYPE_READ, T_OBJECT, T_OBJECT_EX,
};
use crate::process::remote::word;
use crate::stacks::python::objects::heap_type_module;

impl ObjectReader {
    /// Whether `t` is a type object: its own type is `type` or a subclass of it.
    fn is_type(&mut self, t: u64) -> bool {
        if !pointer(t) {
            return false;
        }
        let Some(mut meta) = self.mem.u64(t + 8) else {
            return false;
        };
        for _ in 0..MAX_BASES {
            if meta == self.known.type_type {
                return true;
            }
            match self.mem.u64(meta.wrapping_add(TP_BASE)) {
                Some(b) if pointer(b) => meta = b,
                _ => return false,
            }
        }
        false
    }

    pub(super) fn read_type(&mut self, t: u64) -> Option<TypeDesc> {
        if !self.is_type(t) {
            return None;
        }
        let raw = self.mem.read(t, TYPE_READ)?;
        let name = self.c_string(word(&raw, TP_NAME)?)?;
        let flags = word(&raw, TP_FLAGS)?;
        // Classes with their module, as the snapshot's table names them.
        let name = match (flags & TPFLAGS_HEAPTYPE != 0 && !name.contains('.'))
            .then(|| heap_type_module(&mut self.mem, t, self.layout.version))
            .flatten()
        {
            Some(module) => format!("{module}.{name}").into(),
            None => name,
        };
        let basicsize = word(&raw, TP_BASICSIZE)?;
        if !(16..=1 << 20).contains(&basicsize) {
            return None;
        }
        let Bases {
            members,
            known,
            first_static,
            c_heap,
        } = self.bases(t);
        let gc = flags & TPFLAGS_HAVE_GC != 0;
        // A static type between the class and the known base adds C fields when it is larger
        // than that base (`OSError` over `BaseException`; not `ValueError`).
        // A static base outside the collector (`int` under an `IntEnum`) holds no references.
        let size_of = |r: &mut Self, t: u64| r.mem.u64(t + TP_BASICSIZE).unwrap_or(0);
        let collected =
            |r: &mut Self, t: u64| r.mem.u64(t + TP_FLAGS).unwrap_or(0) & TPFLAGS_HAVE_GC != 0;
        let opaque = match (first_static, known) {
            _ if !gc => false,
            _ if c_heap => true,
            (None, _) => false,
            (Some(s), _) if s == self.known.object_type || !collected(self, s) => false,
            (Some(s), Some((k, _))) => s != k && size_of(self, s) > size_of(self, k),
            (Some(_), None) => true,
        };
        let known = known.map(|(_, s)| s);
        let shape = match known {
            Some(s) => s,
            None if !gc => Shape::Leaf,
            None if opaque && members.is_empty() && flags & TPFLAGS_HEAPTYPE == 0 => Shape::Unknown,
            None => Shape::Declared,
        };
        let cached_keys = if flags & TPFLAGS_HEAPTYPE != 0 {
            self.mem.u64(t + self.layout.ht_cached_keys).unwrap_or(0)
        } else {
            0
        };
        log::trace!("type {t:#x} {name}: {shape:?}, opaque {opaque}, members {members:?}");
        Some(TypeDesc {
            name,
            shape,
            opaque,
            flags,
            basicsize,
            dictoffset: word(&raw, TP_DICTOFFSET)? as i64,
            members,
            cached_keys,
        })
    }

    /// What `t`'s `tp_base` chain says: the object members of every type on it, the first type
    /// of known shape (the layout; heap types add slots and a dict) and the first static type
    /// (one before the known one has fields leaktrace does not read: opaque).
    fn bases(&mut self, t: u64) -> Bases {
        let mut members = Vec::new();
        let mut known = None;
        let mut first_static = None;
        let mut c_heap = false;
        let mut at = t;
        for _ in 0..MAX_BASES {
            if at == 0 {
                break;
            }
            self.add_members(at, &mut members);
            let heap = self.mem.u64(at + TP_FLAGS).unwrap_or(0) & TPFLAGS_HEAPTYPE != 0;
            if !heap && first_static.is_none() {
                first_static = Some(at);
            }
            if known.is_none() {
                known = self.base_shape(at).map(|s| (at, s));
                // A heap type made by C code from a spec names its module (`_asyncio.Task`),
                // which a class statement cannot: it has C fields of its own.
                if known.is_none() && heap && !c_heap {
                    let name = self.mem.u64(at + TP_NAME).and_then(|n| self.c_string(n));
                    c_heap = name.is_some_and(|n| n.contains('.'));
                }
            }
            // A base that is no pointer ends the chain (a torn read).
            at = self
                .mem
                .u64(at + TP_BASE)
                .filter(|b| pointer(*b))
                .unwrap_or(0);
        }
        Bases {
            members,
            known,
            first_static,
            c_heap,
        }
    }

    /// The shape of type `b`: by its address, or, for the functools and asyncio types the
    /// interpreter does not export, by its name (once per type).
    fn base_shape(&mut self, b: u64) -> Option<Shape> {
        if let Some(s) = self.known.by_address.get(&b) {
            return Some(*s);
        }
        let at = self.mem.u64(b + TP_NAME)?;
        let name = self.c_string(at)?;
        match name.as_ref() {
            "functools._lru_cache_wrapper" => Some(Shape::LruCache),
            "functools._lru_list_elem" => Some(Shape::LruElem),
            "_asyncio.Task" => {
                let size = self.mem.u64(b + TP_BASICSIZE)?;
                (size == self.layout.task_coro.0).then_some(Shape::AsyncTask)
            }
            _ => None,
        }
    }

    /// Appends type `t`'s own object members (a subclass lists only its own).
    fn add_members(&mut self, t: u64, out: &mut Vec<(Arc<str>, u64)>) {
        let Some(mut m) = self.mem.u64(t + TP_MEMBERS).filter(|m| *m != 0) else {
            return;
        };
        for _ in 0..MAX_MEMBERS {
            let Some(raw) = self.mem.read(m, MEMBER_SIZE) else {
                return;
            };
            let (Some(name), Some(kind), Some(offset)) =
                (word(&raw, 0), word(&raw, 8), word(&raw, 16))
            else {
                return;
            };
            if name == 0 {
                return;
            }
            let kind = kind as u32;
            if (kind == T_OBJECT || kind == T_OBJECT_EX) && offset < 1 << 20 {
                if let Some(n) = self.c_string(name) {
                    if !out.iter().any(|(_, o)| *o == offset) {
                        out.push((n, offset));
                    }
                }
            }
            m += MEMBER_SIZE as u64;
        }
    }

    /// A NUL-terminated ASCII name (`tp_name`, a member's name).
    pub(super) fn c_string(&mut self, at: u64) -> Option<Arc<str>> {
        let mut raw = Vec::new();
        for chunk in 0..4u64 {
            let bytes = self.mem.read(at.checked_add(chunk * 64)?, 64).or_else(|| {
                // The name may end near the end of a mapping.
                self.mem.read(at.checked_add(chunk * 64)?, 16)
            })?;
            if let Some(end) = bytes.iter().position(|b| *b == 0) {
                raw.extend_from_slice(&bytes[..end]);
                let s = std::str::from_utf8(&raw).ok()?;
                return (!s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()))
                    .then(|| s.into());
            }
            raw.extend_from_slice(&bytes);
        }
        None
    }
}

/// What a type's `tp_base` chain says (`ObjectReader::bases`).
struct Bases {
    /// Object members of every type on the chain: (name, offset in the instance).
    members: Vec<(Arc<str>, u64)>,
    /// The first type of known shape, and that shape.
    known: Option<(u64, Shape)>,
    /// The first static (non-heap) type.
    first_static: Option<u64>,
    /// A heap type made by C code comes before the known one (or there is none).
    c_heap: bool,
}
