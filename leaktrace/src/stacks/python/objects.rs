//! What Python object a live block holds, read from outside: the object's type, checked to be a
//! real type object before its name is trusted.
//!
//! Under CPython's debug hooks (the default of a `--with-pydebug` build, or `PYTHONMALLOC=debug`)
//! every block starts with 16 bytes of its own: the size asked for, the API's id (`o` for the
//! object domain) and seven forbidden bytes (0xFD). A block that starts so is read from there.
//!
//! A block from the Python allocator starts with the object, or with its GC header
//! (`PyGC_Head`, 16 bytes) when its type is GC-tracked, preceded (3.11+) by two pointers when the
//! type manages its `__dict__` (3.12+ also its weak references): the object is at offset 0, 16
//! or 32. Each candidate's `ob_type` is read; it is accepted only if it is a type object (its own
//! type is `type` or a metaclass whose type is `type`), its flags put the object at exactly that
//! offset, and its instances fit in the block. Anything else is "not an object", never guessed.

use std::collections::HashMap;
use std::sync::Arc;

use super::dict_keys::{self, MA_KEYS, MA_VALUES};
use super::type_object::{
    TPFLAGS_HAVE_GC, TPFLAGS_HEAPTYPE, TPFLAGS_MANAGED_DICT, TPFLAGS_MANAGED_WEAKREF,
    TPFLAGS_READY, TPFLAGS_TYPE_SUBCLASS, TP_BASICSIZE, TP_DICT, TP_FLAGS, TP_ITEMSIZE, TP_NAME,
};
use crate::process::remote::{word, PageCache, Remote, USER_TOP};

/// Pages the type reader keeps (16 MiB).
const TYPE_PAGES: usize = 4096;

/// Entries of a class's dict read at most when looking for its `__module__`.
const MAX_CLASS_ENTRIES: u64 = 4096;
/// Bytes read at the start of each block: the debug hooks' pads (raw and object domain), then
/// the three candidates' `ob_refcnt` and `ob_type`.
pub const HEAD_READ: usize = 2 * DEBUG_PAD + 48;
/// What the debug hooks put before an object: size (8 bytes), API id, 7 forbidden bytes.
const DEBUG_PAD: usize = 16;
/// `PYMEM_FORBIDDENBYTE`.
const FORBIDDEN: u8 = 0xFD;

/// `head` without the debug hooks' pad when a block of the object domain carries one, and the
/// size left for the object (the hooks also put 8 forbidden bytes after it). A block the
/// object domain took from malloc (over 512 B) carries the raw domain's pad (`r`) first.
fn past_debug_pad(head: &[u8], size: u64) -> (&[u8], u64) {
    let pad = |h: &[u8], api: u8| {
        h.get(..DEBUG_PAD)
            .is_some_and(|p| p[8] == api && p[9..].iter().all(|b| *b == FORBIDDEN))
    };
    let pads = if pad(head, b'o') {
        1
    } else if pad(head, b'r') && head.get(DEBUG_PAD..).is_some_and(|h| pad(h, b'o')) {
        2
    } else {
        0
    };
    // Each pad also has 8 forbidden bytes after the object.
    let n = pads * DEBUG_PAD;
    (&head[n..], size.saturating_sub((n + 8 * pads) as u64))
}

/// A checked type.
#[derive(Clone, Debug)]
struct TypeInfo {
    name: Arc<str>,
    basicsize: u64,
    itemsize: u64,
    /// Bytes before the object: GC header and pre-header.
    presize: u64,
    /// Its instances are tracked by the cyclic collector (a `PyGC_Head` before each).
    gc: bool,
}

/// Flag bits the collector keeps in the low bits of `PyGC_Head`'s links (3.14's incremental
/// collector marks the old space in `_gc_next`; `_gc_prev` holds collection flags).
const GC_LINK_FLAGS: u64 = 7;
/// Objects of more items than this are taken for a torn read, not sized.
const MAX_ITEMS: u64 = 1 << 32;

/// A node of one of the collector's lists, read from outside (`TypeReader::gc_node`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcNode {
    /// A tracked object: its type's name, its size as `sys.getsizeof` gives it, and the next
    /// node's `PyGC_Head` address.
    Object {
        name: Arc<str>,
        bytes: u64,
        next: u64,
    },
    /// A readable node with no object after it: a list's head (a generation in the
    /// interpreter's state), or a stale link.
    Other {
        next: u64,
    },
    Unreadable,
}

/// Names the objects in blocks of one process, caching what it learns of each type.
pub struct TypeReader {
    mem: Remote,
    /// Candidate types are read through pages kept: a block that holds no object offers
    /// pointers to other objects (an int, a str) as candidates, thousands per page, and
    /// reading each alone would cost a system call per candidate.
    pages: PageCache,
    type_type: u64,
    /// 3.12+: weak references are managed in the pre-header too.
    managed_weakref: bool,
    version: (u8, u8),
    /// Name classes with their module (`app.models.User`), as `snapshot` shows them.
    pub qualify: bool,
    types: HashMap<u64, Option<TypeInfo>>,
}

/// What a block holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// The type's name, shared by every block of that type.
    Object(Arc<str>),
    NotAnObject,
    Unreadable,
}

impl TypeReader {
    /// A reader for process `pid`; `type_type` is the address of `PyType_Type` there.
    pub fn new(pid: u32, type_type: u64, version: (u8, u8)) -> Self {
        TypeReader {
            mem: Remote { pid },
            pages: PageCache::with_capacity(pid, TYPE_PAGES),
            type_type,
            managed_weakref: version >= (3, 12),
            version,
            qualify: false,
            types: HashMap::new(),
        }
    }

    /// Forgets the pages kept: a new walk reads the memory as it is now (types already
    /// checked stay known).
    pub fn forget_pages(&mut self) {
        self.pages.clear();
    }

    /// The kinds of many blocks, `(address, size)`, read in batches.
    pub fn classify(&mut self, blocks: &[(u64, u64)]) -> Vec<BlockKind> {
        self.each_head(blocks, |r, _, size, head| match head {
            None => BlockKind::Unreadable,
            Some(h) => r.kind(&h, size),
        })
    }

    /// `f(self, address, size, head)` of many blocks, their heads read in batches: in chunks,
    /// since the heads of a million blocks would otherwise all be held at once.
    fn each_head<T>(
        &mut self,
        blocks: &[(u64, u64)],
        mut f: impl FnMut(&mut Self, u64, u64, Option<Vec<u8>>) -> T,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(8192) {
            let ranges: Vec<(u64, usize)> = chunk
                .iter()
                .map(|(a, s)| (*a, (*s as usize).clamp(16, HEAD_READ)))
                .collect();
            let heads = self.mem.read_many(&ranges);
            for ((addr, size), head) in chunk.iter().zip(heads) {
                out.push(f(self, *addr, *size, head));
            }
        }
        out
    }

    /// The kinds of blocks whose bytes are at hand: `data` holds the memory from `base` on
    /// (a pool read whole), so nothing more is read but the types. With `links` (a pool's size,
    /// and a list), each GC-tracked object's `_gc_next` (the next node in its collector list,
    /// flags masked) is appended to the list unless it is in the same pool.
    pub fn classify_local(
        &mut self,
        base: u64,
        data: &[u8],
        blocks: &[(u64, u64)],
        mut links: Option<(u64, &mut Vec<u64>)>,
    ) -> Vec<BlockKind> {
        blocks
            .iter()
            .map(|(a, size)| {
                let start = a.wrapping_sub(base) as usize;
                let end = start.saturating_add((*size as usize).min(HEAD_READ));
                let Some(head) = data.get(start..end) else {
                    return BlockKind::Unreadable;
                };
                let (head, size) = past_debug_pad(head, *size);
                let Some((info, off)) = self.find(head, size) else {
                    return BlockKind::NotAnObject;
                };
                if let (true, Some((pool_size, next))) = (info.gc && off >= 16, links.as_mut()) {
                    let n = word(head, off - 16).unwrap_or(0) & !GC_LINK_FLAGS;
                    // A link is a user-space address; anything else is no link (a block that
                    // only looked like a GC object), not a node to read.
                    if n != 0 && n < USER_TOP && n.wrapping_sub(base) >= *pool_size {
                        next.push(n);
                    }
                }
                BlockKind::Object(info.name)
            })
            .collect()
    }

    /// The objects in many blocks, `(address, size)`: each one's type name and, for a type the
    /// collector tracks, the address of its `PyGC_Head`; `None` for a block holding none.
    pub fn objects(&mut self, blocks: &[(u64, u64)]) -> Vec<Option<(Arc<str>, Option<u64>)>> {
        self.each_head(blocks, |r, addr, size, head| {
            let head = head?;
            let (object, size) = past_debug_pad(&head, size);
            let (info, off) = r.find(object, size)?;
            let pads = (head.len() - object.len()) as u64;
            // The collector's header sits right before the object.
            let gc_head = info.gc.then(|| addr + pads + off - 16);
            Some((info.name, gc_head))
        })
    }

    fn kind(&mut self, head: &[u8], size: u64) -> BlockKind {
        let (head, size) = past_debug_pad(head, size);
        match self.find(head, size) {
            Some((info, _)) => BlockKind::Object(info.name),
            None => BlockKind::NotAnObject,
        }
    }

    /// The object a block holds and its offset in the block (0, 16 or 32).
    fn find(&mut self, head: &[u8], size: u64) -> Option<(TypeInfo, u64)> {
        // Types already known first: a GC object's header words at offset 0 point at other
        // objects, and reading each such pointer as a candidate type would cost a system call.
        for off in [0u64, 16, 32] {
            let Some(t) = word(head, off + 8) else { break };
            if let Some(Some(info)) = self.types.get(&t) {
                if info.presize == off && off + info.basicsize <= size.max(info.basicsize) {
                    return Some((info.clone(), off));
                }
            }
        }
        for off in [0u64, 16, 32] {
            let Some(t) = word(head, off + 8) else { break };
            if t == 0 || t % 8 != 0 {
                continue;
            }
            if let Some(info) = self.type_info(t) {
                if info.presize == off && off + info.basicsize <= size.max(info.basicsize) {
                    return Some((info, off));
                }
            }
        }
        None
    }

    /// The node of a collector list whose `PyGC_Head` is at `at`: the object after it, checked
    /// like any block's (its type must be a GC type), or what else is there.
    pub fn gc_node(&mut self, at: u64) -> GcNode {
        let Some(raw) = self.mem.read(at, 40) else {
            return GcNode::Unreadable;
        };
        let (Some(next), Some(t), Some(n)) = (word(&raw, 0), word(&raw, 24), word(&raw, 32)) else {
            return GcNode::Unreadable;
        };
        let next = next & !GC_LINK_FLAGS;
        let object = (t != 0 && t % 8 == 0)
            .then(|| self.type_info(t))
            .flatten()
            .filter(|info| info.gc);
        match object {
            // `ob_size` of a variable-size object; fixed-size ones have no items to count.
            Some(info) if info.itemsize == 0 || n < MAX_ITEMS => GcNode::Object {
                bytes: info.presize + info.basicsize + info.itemsize * n,
                name: info.name,
                next,
            },
            _ => GcNode::Other { next },
        }
    }

    /// The type at `t`, if it is one.
    fn type_info(&mut self, t: u64) -> Option<TypeInfo> {
        if let Some(known) = self.types.get(&t) {
            return known.clone();
        }
        let info = self.read_type(t);
        // Bound the cache: random words that are not types are remembered too.
        if self.types.len() < 1 << 16 {
            self.types.insert(t, info.clone());
        }
        info
    }

    fn read_type(&mut self, t: u64) -> Option<TypeInfo> {
        let raw = self.pages.read(t, (TP_FLAGS + 8) as usize)?;
        let meta = word(&raw, 8)?;
        // Any object's type has `type` as its type too: the metatype must be a metaclass (its
        // instances are types), or a str a dict keys table points at passes for a type.
        let is_type = meta == self.type_type
            || (meta != 0
                && meta.checked_add(8).and_then(|m| self.pages.u64(m)) == Some(self.type_type)
                && meta
                    .checked_add(TP_FLAGS)
                    .and_then(|f| self.pages.u64(f))
                    .is_some_and(|f| f & TPFLAGS_TYPE_SUBCLASS != 0));
        if !is_type {
            return None;
        }
        let basicsize = word(&raw, TP_BASICSIZE)?;
        let itemsize = word(&raw, TP_ITEMSIZE)?;
        let flags = word(&raw, TP_FLAGS)?;
        if flags & TPFLAGS_READY == 0 {
            return None;
        }
        if !(16..=1 << 20).contains(&basicsize) || itemsize > 1 << 16 {
            return None;
        }
        let name_ptr = word(&raw, TP_NAME)?;
        let name_raw = self
            .mem
            .read(name_ptr, 64)
            .or_else(|| self.mem.read(name_ptr, 16))?;
        let end = name_raw.iter().position(|b| *b == 0)?;
        let name = std::str::from_utf8(&name_raw[..end]).ok()?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
            return None;
        }
        // A type made by C code from a spec names its module already (`functools._lru_…`).
        let module = (self.qualify && flags & TPFLAGS_HEAPTYPE != 0 && !name.contains('.'))
            .then(|| heap_type_module(&mut self.pages, t, self.version))
            .flatten();
        let name = match module {
            Some(m) => format!("{m}.{name}"),
            None => name.to_string(),
        };
        let pre_flags = if self.managed_weakref {
            TPFLAGS_MANAGED_DICT | TPFLAGS_MANAGED_WEAKREF
        } else {
            TPFLAGS_MANAGED_DICT
        };
        let presize = if flags & TPFLAGS_HAVE_GC != 0 { 16 } else { 0 }
            + if flags & pre_flags != 0 { 16 } else { 0 };
        Some(TypeInfo {
            name: name.as_str().into(),
            basicsize,
            itemsize,
            presize,
            gc: flags & TPFLAGS_HAVE_GC != 0,
        })
    }
}

/// The `__module__` of the class at `t` (a heap type), read from its dict (combined: a class's
/// values are in its keys table), or `None` for `builtins` and anything unread.
pub fn heap_type_module(pages: &mut PageCache, t: u64, version: (u8, u8)) -> Option<String> {
    let dict = pages.u64(t.wrapping_add(TP_DICT))?;
    let (keys, values) = (
        pages.u64(dict.wrapping_add(MA_KEYS))?,
        pages.u64(dict.wrapping_add(MA_VALUES))?,
    );
    if values != 0 {
        return None;
    }
    let entries = dict_keys::entries(pages, keys, MAX_CLASS_ENTRIES)?;
    let ascii = |pages: &mut PageCache, s: u64| ascii_str(pages, s, version);
    let value = entries
        .iter()
        .find(|e| ascii(pages, e.key).is_some_and(|k| k == "__module__"))?
        .value;
    ascii(pages, value).filter(|m| m != "builtins" && !m.is_empty())
}

/// A compact ASCII str's text (256 characters at most).
fn ascii_str(pages: &mut PageCache, s: u64, version: (u8, u8)) -> Option<String> {
    // `PyASCIIObject`: length at 16, state at 32 (compact bit 5, ascii bit 6); the text follows
    // it (48 bytes on 3.11, which still had `wstr`; 40 after).
    let head = pages.read(s, 40)?;
    let (len, state) = (word(&head, 16)?, head[32]);
    if state & 0x60 != 0x60 || len > 256 {
        return None;
    }
    let data = s.checked_add(if version >= (3, 12) { 40 } else { 48 })?;
    String::from_utf8(pages.read(data, len as usize)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake type object in this process: `ob_type`, `tp_name`, sizes and flags at CPython's
    /// offsets.
    fn fake_type(meta: u64, name: &'static [u8], flags: u64) -> Box<[u64; 32]> {
        let mut t = Box::new([0u64; 32]);
        t[0] = 1;
        t[1] = meta;
        t[(TP_NAME / 8) as usize] = name.as_ptr() as u64;
        t[(TP_BASICSIZE / 8) as usize] = 48;
        t[(TP_FLAGS / 8) as usize] = flags;
        t
    }

    /// A type is one whose type is `type` or a metaclass: an instance of a type whose own type
    /// is `type` (a str a dict keys table points at) is not, however its words read.
    #[test]
    fn only_instances_of_metaclasses_pass_for_types() {
        let ready = TPFLAGS_READY;
        let mut type_type = fake_type(0, b"type\0", ready | TPFLAGS_TYPE_SUBCLASS);
        let tt = type_type.as_ptr() as u64;
        type_type[1] = tt;
        let meta = fake_type(tt, b"ABCMeta\0", ready | TPFLAGS_TYPE_SUBCLASS);
        let str_type = fake_type(tt, b"str\0", ready);
        let class = fake_type(meta.as_ptr() as u64, b"Model\0", ready);
        let plain = fake_type(tt, b"Plain\0", ready);
        let not_ready = fake_type(tt, b"Unready\0", 0);
        // A str whose hash and data happen to read as a name, sizes and flags.
        let a_str = fake_type(str_type.as_ptr() as u64, b"Bogus\0", ready);
        let mut r = TypeReader::new(std::process::id(), tt, (3, 12));
        let name = |r: &mut TypeReader, t: &[u64; 32]| {
            r.type_info(t.as_ptr() as u64).map(|i| i.name.to_string())
        };
        assert_eq!(name(&mut r, &plain).as_deref(), Some("Plain"));
        assert_eq!(name(&mut r, &class).as_deref(), Some("Model"));
        assert_eq!(name(&mut r, &str_type).as_deref(), Some("str"));
        assert_eq!(
            name(&mut r, &a_str),
            None,
            "an object of a type that is not a metaclass"
        );
        assert_eq!(
            name(&mut r, &not_ready),
            None,
            "a type PyType_Ready never saw"
        );
    }

    #[test]
    fn the_debug_hooks_pad_is_skipped_only_when_it_is_one() {
        let mut block = vec![0u8; 64];
        block[..8].copy_from_slice(&40u64.to_le_bytes());
        block[8] = b'o';
        block[9..16].fill(FORBIDDEN);
        block[24..32].copy_from_slice(&0x7f00_0000_1000u64.to_le_bytes());
        let (head, size) = past_debug_pad(&block, 64);
        assert_eq!((head.len(), size), (48, 40));
        assert_eq!(word(head, 8), Some(0x7f00_0000_1000));
        // The raw domain's pad ('r') alone, or one forbidden byte short: read as it is.
        block[8] = b'r';
        assert_eq!(past_debug_pad(&block, 64).0.len(), 64);
        // The raw domain's pad, then the object domain's: both skipped.
        let mut two = vec![0u8; 16];
        two[..8].copy_from_slice(&56u64.to_le_bytes());
        two[8] = b'r';
        two[9..16].fill(FORBIDDEN);
        two.extend_from_slice(&block[..16]);
        two[24] = b'o';
        two.extend_from_slice(&block[16..]);
        let (head, size) = past_debug_pad(&two, 80);
        assert_eq!((head.len(), size), (48, 32));
        assert_eq!(word(head, 8), Some(0x7f00_0000_1000));
        block[8] = b'o';
        block[15] = 0;
        assert_eq!(past_debug_pad(&block, 64).0.len(), 64);
    }
}
