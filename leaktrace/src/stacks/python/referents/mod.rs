//! What a Python object refers to, read from outside by its type's layout: the edges a search
//! for "why is this object alive" follows (analysis/why.rs).
//!
//! An object's type is read once per type and given a [`Shape`]: the first type of known layout
//! on its `tp_base` chain (list, tuple, dict, set, cell, module, type, frame, traceback,
//! function, exception, `functools.lru_cache`'s wrapper and list element), plus what any type
//! declares itself: its object members (`tp_members` of type `T_OBJECT`/`T_OBJECT_EX`: a
//! class's `__slots__`, a method's `__func__` and `__self__`, a function's `__closure__`) and,
//! for classes, the instance `__dict__` (managed by the interpreter, or at `tp_dictoffset`).
//! A type outside the collector (`Py_TPFLAGS_HAVE_GC` unset: str, bytes, int, float) holds no
//! reference the collector would follow, and is a leaf. A collector type of no known shape and
//! no object member is a C type of unknown layout: counted by the caller, never guessed.
//!
//! Layouts (x86-64, default builds) from CPython's headers of each version, checked in the
//! interpreters themselves with ctypes (docs/snapshot.md lists them).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

mod dicts;
mod frames;
mod types;

use super::layout::PyLayout;
use super::type_object::{
    TPFLAGS_HAVE_GC, TPFLAGS_HEAPTYPE, TPFLAGS_INLINE_VALUES, TPFLAGS_MANAGED_DICT, TP_BASE,
    TP_BASICSIZE, TP_DICT, TP_DICTOFFSET, TP_FLAGS, TP_MEMBERS, TP_NAME,
};
use crate::process::remote::{word, PageCache, USER_TOP};

/// Whether `v` can be an object's address: aligned, in user space.
fn pointer(v: u64) -> bool {
    v != 0 && v.is_multiple_of(8) && v < USER_TOP
}

/// Bytes of a type object read at once: up to `tp_dictoffset`.
const TYPE_READ: usize = 296;

/// `PyMemberDef`: name, type, offset, flags, doc; the member types that hold an object.
const MEMBER_SIZE: usize = 40;
const T_OBJECT: u32 = 6;
const T_OBJECT_EX: u32 = 16;
/// Members read per type at most, and bases followed at most.
const MAX_MEMBERS: usize = 1024;
const MAX_BASES: usize = 64;

/// Items read from one container at most (16 Mi: 128 MiB of pointers): more is a torn read,
/// not a container.
const MAX_ITEMS: u64 = 1 << 24;

/// What an edge from an object to one it refers to is, as a user reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Edge {
    /// A module global, a class attribute, an instance attribute (its `__dict__` or a slot).
    Attribute(Arc<str>),
    /// A list's or tuple's item.
    Index(u64),
    /// A dict's value under a key, the key shown as Python would (`'name'`, `42`), or its type.
    Value(String),
    /// A dict's key.
    Key,
    /// A set's member.
    Member,
    /// A named field of a C object: `__traceback__`, `tb_frame`, `cell_contents`, `cache`.
    Field(&'static str),
    /// A frame's local variable (or cell, or free variable).
    Local(Arc<str>),
    /// A dict's value under the key at `key`, not yet named (`ObjectReader::name`):
    /// as an attribute when `attrs`.
    Unnamed { key: u64, attrs: bool },
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edge::Attribute(name) => write!(f, ".{name}"),
            Edge::Index(i) => write!(f, "[{i}]"),
            Edge::Value(key) => write!(f, "[{key}]"),
            Edge::Key => write!(f, "(a key)"),
            Edge::Member => write!(f, "(a member)"),
            Edge::Field(name) => write!(f, ".{name}"),
            Edge::Local(name) => write!(f, "local {name}"),
            Edge::Unnamed { key, .. } => write!(f, "[key at {key:#x}]"),
        }
    }
}

/// The layouts leaktrace reads an object's references by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Holds no reference the collector follows (str, bytes, int, float, None).
    Leaf,
    /// A collector type of no known layout and no declared object member.
    Unknown,
    /// Only what the type declares: members, instance dict (plain classes, C types with
    /// members, bound methods, properties).
    Declared,
    /// `list`: its items.
    List,
    /// `tuple`: its items.
    Tuple,
    /// `dict` and its subclasses: values under their keys, and keys.
    Dict,
    /// `set`, `frozenset`: members.
    Set,
    /// A closure's cell.
    Cell,
    /// A module: its globals.
    Module,
    /// A class: its attributes.
    Type,
    /// A frame object: its locals and the frame it was called from.
    Frame,
    /// A traceback entry: the next one and its frame.
    Traceback,
    /// A Python function: defaults, `__dict__` (the rest are members).
    Function,
    /// `BaseException` and subclasses: args, traceback, context, cause, notes, `__dict__`.
    Exception,
    /// `functools.lru_cache`'s wrapper: its cache dict.
    LruCache,
    /// A bounded `lru_cache`'s list element: key and result.
    LruElem,
    /// A generator, coroutine or async generator: the locals of the frame it carries, while it
    /// has not finished.
    Generator,
    /// asyncio's C `Task`: the coroutine it runs (its future's fields are not read).
    AsyncTask,
    /// A C function or method (`builtin_function_or_method`): `m_self` at 24.
    CFunction,
    /// A method, member, getset or wrapper descriptor: `d_type` at 16.
    Descriptor,
    /// `classmethod`, `staticmethod`: the callable at 16, a `__dict__` at 24.
    ClassMethod,
}

/// One type, read once.
#[derive(Debug)]
pub struct TypeDesc {
    /// Classes with their module (`app.SessionRecord`), C types by `tp_name` (`numpy.ndarray`).
    pub name: Arc<str>,
    /// How its instances are read.
    pub shape: Shape,
    /// Part of its layout is a C type leaktrace does not know: what it refers to there is not
    /// read.
    pub opaque: bool,
    flags: u64,
    basicsize: u64,
    dictoffset: i64,
    /// Object members of the type and its bases: (name, offset in the instance).
    members: Vec<(Arc<str>, u64)>,
    /// `PyHeapTypeObject.ht_cached_keys`: the keys of instances' split or inline values.
    cached_keys: u64,
}

/// Where the version keeps what the shapes read.
#[derive(Clone, Debug)]
pub struct ObjectLayout {
    version: (u8, u8),
    /// `PyHeapTypeObject.ht_cached_keys`.
    ht_cached_keys: u64,
    /// `functools` `lru_cache_object.cache`.
    lru_cache: u64,
    /// `PyFunctionObject`: `func_defaults`, `func_kwdefaults`, `func_dict`.
    func_defaults: u64,
    func_kwdefaults: u64,
    func_dict: u64,
    /// `_PyInterpreterFrame`: its code and its `localsplus`; `PyCodeObject.co_localsplusnames`;
    /// tag bits of a frame's references (3.14's `_PyStackRef`).
    fr_code: u64,
    fr_localsplus: u64,
    co_localsplusnames: u64,
    /// 3.14's frames hold `_PyStackRef`s, not plain pointers.
    stack_refs: bool,
    /// `PyTupleObject.ob_item`: 3.14 put `ob_hash` before it.
    tuple_items: u64,
    /// `PyGenObject.gi_iframe`: the frame a generator carries (3.11 still had `gi_code`).
    gen_iframe: u64,
    /// `_asyncio.Task`'s size and `task_coro`'s offset (`Modules/_asynciomodule.c`; found with
    /// ctypes in each version): a Task of another size is not read.
    pub(super) task_coro: (u64, u64),
}

impl ObjectLayout {
    /// The layout for `layout`'s version, `None` for one leaktrace does not know.
    pub fn of(layout: &PyLayout) -> Option<Self> {
        let (ht_cached_keys, lru_cache) = match layout.version {
            (3, 11) => (HT_CACHED_KEYS_311, LRU_CACHE),
            (3, 12) | (3, 13) => (HT_CACHED_KEYS_312, LRU_CACHE),
            (3, 14) => (HT_CACHED_KEYS_312, LRU_CACHE),
            (3, 15) => (HT_CACHED_KEYS_315, LRU_CACHE),
            _ => return None,
        };
        Some(ObjectLayout {
            version: layout.version,
            ht_cached_keys,
            lru_cache,
            func_defaults: 56,
            func_kwdefaults: 64,
            func_dict: 88,
            fr_code: layout.fr_code,
            fr_localsplus: layout.fr_localsplus,
            co_localsplusnames: layout.co_localsplusnames,
            stack_refs: layout.version >= (3, 14),
            tuple_items: if layout.version >= (3, 14) { 32 } else { 24 },
            gen_iframe: if layout.version >= (3, 12) { 72 } else { 80 },
            task_coro: match layout.version {
                (3, 13) => (144, 120),
                (3, 14) | (3, 15) => (168, 128),
                _ => (176, 136),
            },
        })
    }

    /// Whether a generator whose `gi_frame_state` is `state` still holds its frame's locals:
    /// created, suspended or running, not finished. 3.11–3.14 number those states below 0
    /// (created, suspended) and 0 (running); 3.15 renumbers them from 0 (created) to 4
    /// (running), 5 (cleared).
    fn generator_frame_live(&self, state: i8) -> bool {
        if self.version >= (3, 15) {
            (0..=4).contains(&state)
        } else {
            state <= 0
        }
    }
}

/// `PyHeapTypeObject.ht_cached_keys`: `sizeof(PyTypeObject)` (408 on 3.11, 416 on 3.12 to 3.14,
/// 424 on 3.15, which adds `_tp_iteritem` at its end) plus the method suites and three names
/// before it (464). 3.15's checked with gdb on Debian's 3.15.2 debug file.
const HT_CACHED_KEYS_311: u64 = 872;
const HT_CACHED_KEYS_312: u64 = 880;
const HT_CACHED_KEYS_315: u64 = 888;
/// `lru_cache_object.cache` in `Modules/_functoolsmodule.c`: after the root list element (56
/// bytes), the wrapper function and `typed`.
const LRU_CACHE: u64 = 72;
/// `PyFunctionObject.func_qualname` (3.11–3.15).
const FUNC_QUALNAME: u64 = 40;

/// Addresses of the types of known shape in one process.
#[derive(Clone, Debug, Default)]
pub struct KnownTypes {
    /// Type object address → the shape of its instances.
    pub by_address: HashMap<u64, Shape>,
    /// `PyType_Type`: an object is a type when its type is this or a subclass of it.
    pub type_type: u64,
    /// `PyBaseObject_Type`: a class built on it alone has no C layout beyond slots and dict.
    pub object_type: u64,
    /// `PyUnicode_Type`: dict keys shown by value.
    pub str_type: u64,
    /// `PyLong_Type`: dict keys shown by value.
    pub int_type: u64,
    /// `PyCode_Type`: what a frame runs.
    pub code_type: u64,
}

/// Reads objects and their references in one process.
pub struct ObjectReader {
    /// The target's memory, a page at a time.
    pub mem: PageCache,
    layout: ObjectLayout,
    py: PyLayout,
    known: KnownTypes,
    types: HashMap<u64, Option<Arc<TypeDesc>>>,
    /// Local names of code objects, by code address.
    locals: HashMap<u64, Arc<[Arc<str>]>>,
    /// str values read (dict keys, names), by address.
    strings: HashMap<u64, Arc<str>>,
    /// References read as torn (bad sizes, unreadable tables), for the caller to show.
    pub torn: u64,
}

impl ObjectReader {
    /// A reader of process `pid`.
    pub fn new(pid: u32, py: PyLayout, layout: ObjectLayout, known: KnownTypes) -> Self {
        ObjectReader {
            mem: PageCache::new(pid),
            layout,
            py,
            known,
            types: HashMap::new(),
            locals: HashMap::new(),
            strings: HashMap::new(),
            torn: 0,
        }
    }

    /// The type of the object at `obj`, if `obj` holds one (its `ob_type` is a type).
    pub fn type_of(&mut self, obj: u64) -> Option<(u64, Arc<TypeDesc>)> {
        if !pointer(obj) {
            return None;
        }
        let t = self.mem.u64(obj + 8)?;
        self.type_desc(t).map(|d| (t, d))
    }

    /// The type at `t`, read once.
    pub fn type_desc(&mut self, t: u64) -> Option<Arc<TypeDesc>> {
        if let Some(known) = self.types.get(&t) {
            return known.clone();
        }
        let desc = self.read_type(t).map(Arc::new);
        if self.types.len() < 1 << 16 {
            self.types.insert(t, desc.clone());
        }
        desc
    }

    /// Appends what the object at `obj`, of type `desc`, refers to.
    pub fn referents(&mut self, obj: u64, desc: &TypeDesc, out: &mut Vec<(Edge, u64)>) {
        let first = out.len();
        self.by_shape(obj, desc, out);
        self.declared(obj, desc, first, out);
    }

    /// What the layout of `desc`'s shape holds.
    fn by_shape(&mut self, obj: u64, desc: &TypeDesc, out: &mut Vec<(Edge, u64)>) {
        match desc.shape {
            Shape::Leaf | Shape::Unknown | Shape::Declared => {}
            Shape::List => {
                // `ob_size` at 16, `ob_item` at 24, `allocated` at 32: a size past the
                // allocation is a torn read.
                if let (Some(items), Some(head)) = (self.u64_at(obj + 24), self.mem.read(obj, 40)) {
                    let (n, allocated) =
                        (word(&head, 16).unwrap_or(0), word(&head, 32).unwrap_or(0));
                    if n <= allocated {
                        self.array(items, n, out, Edge::Index);
                    } else {
                        self.tear(line!(), file!());
                    }
                }
            }
            Shape::Tuple => {
                let n = self.mem.u64(obj + 16).unwrap_or(0);
                self.array(obj + self.layout.tuple_items, n, out, Edge::Index);
            }
            Shape::Dict => self.dict_items(obj, false, out),
            Shape::Set => self.set_members(obj, out),
            Shape::Cell => self.field(obj + 16, "cell_contents", out),
            Shape::Module => {
                if let Some(d) = self.u64_at(obj + 16) {
                    self.dict_items(d, true, out);
                }
            }
            Shape::Type => {
                if let Some(d) = self.u64_at(obj + TP_DICT) {
                    self.dict_items(d, true, out);
                }
            }
            Shape::Frame => {
                self.field(obj + 16, "f_back", out);
                if let Some(f) = self.u64_at(obj + 24) {
                    self.frame_locals(f, out);
                }
            }
            Shape::Traceback => {
                self.field(obj + 16, "tb_next", out);
                self.field(obj + 24, "tb_frame", out);
            }
            Shape::Function => {
                let l = self.layout.clone();
                self.field(obj + l.func_defaults, "__defaults__", out);
                self.field(obj + l.func_kwdefaults, "__kwdefaults__", out);
                if let Some(d) = self.u64_at(obj + l.func_dict) {
                    self.dict_items(d, true, out);
                }
            }
            Shape::Exception => {
                if let Some(d) = self.u64_at(obj + 16) {
                    self.dict_items(d, true, out);
                }
                for (off, name) in [
                    (24, "args"),
                    (32, "__notes__"),
                    (40, "__traceback__"),
                    (48, "__context__"),
                    (56, "__cause__"),
                ] {
                    self.field(obj + off, name, out);
                }
            }
            Shape::CFunction => self.field(obj + 24, "__self__", out),
            Shape::Descriptor => self.field(obj + 16, "__objclass__", out),
            Shape::ClassMethod => {
                self.field(obj + 16, "__func__", out);
                if let Some(d) = self.u64_at(obj + 24) {
                    self.dict_items(d, true, out);
                }
            }
            Shape::LruCache => self.field(obj + self.layout.lru_cache, "cache", out),
            Shape::LruElem => {
                self.field(obj + 40, "key", out);
                self.field(obj + 48, "result", out);
            }
            Shape::AsyncTask => self.field(obj + self.layout.task_coro.1, "coro", out),
            Shape::Generator => {
                // `gi_frame_state`, 5 bytes before the frame.
                let frame = obj + self.layout.gen_iframe;
                let state = self.mem.read(frame - 5, 1).map(|b| b[0] as i8);
                if state.is_some_and(|s| self.layout.generator_frame_live(s)) {
                    self.frame_locals(frame, out);
                }
            }
        }
    }

    /// What every type may add to its shape: object members (slots included) not read
    /// already since `first`, and a class instance's `__dict__`.
    fn declared(&mut self, obj: u64, desc: &TypeDesc, first: usize, out: &mut Vec<(Edge, u64)>) {
        for (name, off) in &desc.members {
            if let Some(v) = self.u64_at(obj + off) {
                if !out[first..].iter().any(|(_, r)| *r == v) {
                    out.push((Edge::Attribute(name.clone()), v));
                }
            }
        }
        // A class's instances, and C objects whose type declares a `__dict__` slot
        // (`types.SimpleNamespace`); known shapes read their own dicts.
        let declares = matches!(desc.shape, Shape::Declared | Shape::Unknown);
        let own_dict = matches!(
            desc.shape,
            Shape::Type | Shape::Module | Shape::Function | Shape::Exception | Shape::ClassMethod
        );
        if (desc.flags & TPFLAGS_HEAPTYPE != 0 || declares) && !own_dict {
            self.instance_dict(obj, desc, out);
        }
    }

    /// What names an object on a chain: a module's, function's or class's name, or the
    /// function a frame object runs.
    pub fn describe(&mut self, obj: u64, desc: &TypeDesc) -> Option<String> {
        let name = match desc.shape {
            Shape::Module => {
                let d = self.u64_at(obj + 16)?;
                let mut items = Vec::new();
                self.dict_items(d, true, &mut items);
                let n = items.into_iter().find_map(|(e, v)| match e {
                    Edge::Unnamed { key, .. } => {
                        (self.str_value(key)?.as_ref() == "__name__").then_some(v)
                    }
                    _ => None,
                })?;
                self.str_value(n)?
            }
            Shape::Function => {
                let q = self.u64_at(obj + FUNC_QUALNAME)?;
                self.str_value(q)?
            }
            Shape::Type => {
                let n = self.mem.u64(obj + TP_NAME)?;
                self.c_string(n)?
            }
            Shape::Frame => {
                let f = self.u64_at(obj + 24)?;
                let code = self.frame_code(f)?;
                self.code_name(code)?
            }
            _ => return None,
        };
        Some(name.to_string())
    }

    /// The items of the dict at `d`: each value under its key (unnamed), and each key.
    pub fn dict_items_of(&mut self, d: u64, out: &mut Vec<(Edge, u64)>) {
        self.dict_items(d, false, out);
    }

    /// `edge` with its dict key read and named as Python writes it.
    pub fn name(&mut self, edge: Edge) -> Edge {
        match edge {
            Edge::Unnamed { key, attrs } => self.key_edge(key, attrs),
            named => named,
        }
    }

    /// A set's members: `PySetObject.mask` at 32, `table` at 40; entries of (key, hash). The
    /// deleted-entry marker is an object of its own, a leaf.
    fn set_members(&mut self, obj: u64, out: &mut Vec<(Edge, u64)>) {
        let (Some(mask), Some(table)) = (self.mem.u64(obj + 32), self.u64_at(obj + 40)) else {
            self.tear(line!(), file!());
            return;
        };
        let n = mask.saturating_add(1);
        if n > MAX_ITEMS || !n.is_power_of_two() {
            self.tear(line!(), file!());
            return;
        }
        let Some(raw) = self.mem.read(table, n as usize * 16) else {
            self.tear(line!(), file!());
            return;
        };
        for i in 0..n {
            match word(&raw, i * 16) {
                Some(k) if pointer(k) => out.push((Edge::Member, k)),
                _ => {}
            }
        }
    }

    /// Counts a reference that did not read as it should (`line` says which check, in the
    /// trace log).
    fn tear(&mut self, line: u32, file: &str) {
        log::trace!("reference skipped at {file}:{line}");
        self.torn += 1;
    }

    /// A pointer field, if it holds one.
    fn u64_at(&mut self, at: u64) -> Option<u64> {
        self.mem.u64(at).filter(|v| pointer(*v))
    }

    fn field(&mut self, at: u64, name: &'static str, out: &mut Vec<(Edge, u64)>) {
        if let Some(v) = self.u64_at(at) {
            out.push((Edge::Field(name), v));
        }
    }

    /// `n` object pointers at `at`, each an edge made by `edge` from its index.
    fn array(&mut self, at: u64, n: u64, out: &mut Vec<(Edge, u64)>, edge: impl Fn(u64) -> Edge) {
        if n > MAX_ITEMS {
            self.tear(line!(), file!());
            return;
        }
        let Some(raw) = self.mem.read(at, n as usize * 8) else {
            if n > 0 {
                self.tear(line!(), file!());
            }
            return;
        };
        for i in 0..n {
            match word(&raw, i * 8) {
                Some(v) if pointer(v) => out.push((edge(i), v)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::python::layout::builtin;

    /// 3.15 renumbered generator frame states: 0 is created there, running before it.
    #[test]
    fn generator_frame_states_follow_the_version() {
        let mut l = ObjectLayout::of(&builtin(3, 12).unwrap()).unwrap();
        // 3.12: created -3, suspended -2, running 0, completed 1, cleared 4.
        assert!([-3, -2, 0].iter().all(|s| l.generator_frame_live(*s)));
        assert!([1, 4].iter().all(|s| !l.generator_frame_live(*s)));
        l.version = (3, 15);
        // 3.15: created 0, suspended 1 to 3, running 4, cleared 5.
        assert!((0..=4).all(|s| l.generator_frame_live(s)));
        assert!(!l.generator_frame_live(5));
    }
}
