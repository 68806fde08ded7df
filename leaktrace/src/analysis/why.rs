//! `snapshot --why TYPE|ADDRESS`: why objects are still alive — the shortest chains of
//! references from the roots to a few of them, as `objgraph.find_backref_chain()` shows from
//! inside, read from outside.
//!
//! Roots: every module in `sys.modules` (its globals), and each Python thread's frames (their
//! locals). From them, a breadth-first walk follows each object's references by its type's
//! layout (stacks/python/referents): the first objects of the type asked for that it reaches
//! have the shortest chains. Only the parent of each object reached is kept; the edges of a
//! chain (`.CACHE`, `[1234]`, `local body`) are read again when the chain is shown. Objects of
//! a C type whose layout leaktrace does not know are passed, counted and named — what they
//! hold is not guessed — so a chain through one is not found, and the output says so.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::process::remote::Remote;
use crate::stacks::python::referents::{Edge, KnownTypes, ObjectLayout, ObjectReader, Shape};
use crate::stacks::python::PythonProcess;
use crate::units::group;

/// Objects a search reaches at most (about 40 bytes of bookkeeping each).
const MAX_OBJECTS: usize = 20_000_000;
/// Marks a root's number in the parent map: no object lives at such an address.
const ROOT: u64 = 1 << 63;

/// What to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Objects whose type is named so (as the snapshot's table names it).
    Type(String),
    /// The object at this address (`id(obj)` in CPython).
    Address(u64),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return u64::from_str_radix(hex, 16)
                .map(Target::Address)
                .map_err(|_| format!("{s:?} is not a hexadecimal address"));
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Target::Address)
                .map_err(|_| format!("{s:?} is not an address"));
        }
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!("{s:?} is neither a type name nor an address"));
        }
        Ok(Target::Type(s.to_string()))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Type(t) => write!(f, "{t}"),
            Target::Address(a) => write!(f, "{a:#x}"),
        }
    }
}

/// The answer to `--why`.
#[derive(Debug, Serialize)]
pub struct Why {
    pub target: String,
    /// The chains found, shortest first.
    pub chains: Vec<Chain>,
    /// Roots the walk started from, and objects it reached (references to objects that refer
    /// to nothing, such as ints and strs, counted each time).
    pub roots: u64,
    pub objects_searched: u64,
    pub search_s: f64,
    /// Whether every object reachable from the roots was searched (else it stopped once it had
    /// enough chains, or at its bound).
    pub exhausted: bool,
    /// Objects passed whose type has C fields leaktrace does not read, by type.
    pub unknown_layouts: Vec<TypeCount>,
    /// References not followed because what they pointed to did not read as they should
    /// (torn reads of a running target).
    pub torn: u64,
}

/// A type and how many objects of it.
#[derive(Debug, Serialize)]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub name: String,
    pub objects: u64,
}

/// One chain: the root, then each reference to the object.
#[derive(Debug, Serialize)]
pub struct Chain {
    pub root: String,
    pub hops: Vec<Hop>,
}

/// One object on a chain and the reference that leads to it.
#[derive(Debug, Serialize)]
pub struct Hop {
    /// `.CACHE`, `[1234]`, `['key']`, `local body`; empty for the root object itself.
    pub via: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub address: u64,
    /// What names the object: a module's, a function's or a class's name, a frame's function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Where a walk starts: a module (the object itself), or a thread's frame (its locals).
enum Root {
    Module {
        name: String,
        module: u64,
    },
    Frame {
        thread: u32,
        frame: u64,
        function: String,
    },
}

impl Root {
    fn label(&self) -> String {
        match self {
            Root::Module { name, .. } => format!("module {name}"),
            Root::Frame {
                thread, function, ..
            } => format!("thread {thread}, frame {function}"),
        }
    }
}

/// Finds up to `samples` chains from the roots of `py` to objects matching `target`.
pub fn search(py: &PythonProcess, target: &Target, samples: usize) -> Result<Why> {
    let start = Instant::now();
    let mut reader = reader_for(py)?;
    let roots = roots(py, &mut reader);
    if roots.is_empty() {
        return Err(Error::PythonLayout(format!(
            "process {}: no sys.modules and no Python thread found to start from",
            py.pid
        )));
    }
    let mut walk = Walk {
        reader,
        parent: HashMap::new(),
        queue: VecDeque::new(),
        found: Vec::new(),
        unknown: HashMap::new(),
        leaves: 0,
        matches: HashMap::new(),
    };
    for (i, root) in roots.iter().enumerate() {
        match root {
            Root::Module { module, .. } => {
                walk.reach(*module, ROOT | i as u64, target);
            }
            Root::Frame { frame, .. } => {
                let mut locals = Vec::new();
                walk.reader.frame_locals(*frame, &mut locals);
                for (_, obj) in locals {
                    walk.reach(obj, ROOT | i as u64, target);
                }
            }
        }
    }
    walk.found.truncate(samples);
    let exhausted = walk.run(target, samples);
    let objects_searched = walk.parent.len() as u64 + walk.leaves;
    let chains = walk
        .found
        .clone()
        .into_iter()
        .map(|obj| walk.chain(obj, &roots))
        .collect();
    let mut unknown_layouts: Vec<TypeCount> = walk
        .unknown
        .into_iter()
        .map(|(name, objects)| TypeCount {
            name: name.to_string(),
            objects,
        })
        .collect();
    unknown_layouts.sort_by(|a, b| b.objects.cmp(&a.objects).then(a.name.cmp(&b.name)));
    Ok(Why {
        target: target.to_string(),
        chains,
        roots: roots.len() as u64,
        objects_searched,
        search_s: start.elapsed().as_secs_f64(),
        exhausted,
        unknown_layouts,
        torn: walk.reader.torn,
    })
}

/// Types every interpreter exports, by symbol, and the shape of their objects.
const REQUIRED: [(&str, Option<Shape>); 16] = [
    ("PyList_Type", Some(Shape::List)),
    ("PyTuple_Type", Some(Shape::Tuple)),
    ("PyDict_Type", Some(Shape::Dict)),
    ("PySet_Type", Some(Shape::Set)),
    ("PyFrozenSet_Type", Some(Shape::Set)),
    ("PyCell_Type", Some(Shape::Cell)),
    ("PyModule_Type", Some(Shape::Module)),
    ("PyType_Type", Some(Shape::Type)),
    ("PyFrame_Type", Some(Shape::Frame)),
    ("PyTraceBack_Type", Some(Shape::Traceback)),
    ("PyFunction_Type", Some(Shape::Function)),
    ("PyBaseObject_Type", None),
    ("PyUnicode_Type", None),
    ("PyLong_Type", None),
    ("PyCode_Type", None),
    ("PyExc_BaseException", None),
];
/// Generators and coroutines, bound methods and properties (whose declared members are all
/// they hold), C functions and descriptors: types a build may hide (then their objects count
/// as of unknown layout).
const OPTIONAL: [(&str, Shape); 14] = [
    ("PyGen_Type", Shape::Generator),
    ("PyCoro_Type", Shape::Generator),
    ("PyAsyncGen_Type", Shape::Generator),
    ("PyMethod_Type", Shape::Declared),
    ("PyProperty_Type", Shape::Declared),
    ("PyCFunction_Type", Shape::CFunction),
    ("PyCMethod_Type", Shape::CFunction),
    ("PyMethodDescr_Type", Shape::Descriptor),
    ("PyClassMethodDescr_Type", Shape::Descriptor),
    ("PyGetSetDescr_Type", Shape::Descriptor),
    ("PyMemberDescr_Type", Shape::Descriptor),
    ("PyWrapperDescr_Type", Shape::Descriptor),
    ("PyClassMethod_Type", Shape::ClassMethod),
    ("PyStaticMethod_Type", Shape::ClassMethod),
];

/// A reader of `py`'s objects, with the addresses of the types of known layout.
fn reader_for(py: &PythonProcess) -> Result<ObjectReader> {
    let layout = ObjectLayout::of(&py.layout).ok_or_else(|| {
        Error::PythonLayout(format!(
            "--why knows the object layouts of Python 3.11 to 3.15, not {}.{}",
            py.layout.version.0, py.layout.version.1
        ))
    })?;
    let names: Vec<&str> = REQUIRED
        .iter()
        .map(|(n, _)| *n)
        .chain(OPTIONAL.iter().map(|(n, _)| *n))
        .collect();
    let addrs = py.data_symbols(&names)?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .zip(&addrs)
        .filter(|(_, a)| a.is_none())
        .map(|((n, _), _)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Error::PythonLayout(format!(
            "the interpreter's file lacks {}",
            missing.join(", ")
        )));
    }
    let addr = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| addrs[i])
            .unwrap_or(0)
    };
    let mut by_address: HashMap<u64, Shape> = REQUIRED
        .iter()
        .filter_map(|(n, s)| s.map(|s| (addr(n), s)))
        .chain(OPTIONAL.iter().map(|(n, s)| (addr(n), *s)))
        .filter(|(a, _)| *a != 0)
        .collect();
    // `PyExc_BaseException` is a pointer to the type object.
    let exceptions = Remote { pid: py.pid }
        .u64(addr("PyExc_BaseException"))
        .filter(|t| *t != 0)
        .ok_or_else(|| Error::PythonLayout("cannot read PyExc_BaseException".into()))?;
    by_address.insert(exceptions, Shape::Exception);
    let known = KnownTypes {
        by_address,
        type_type: addr("PyType_Type"),
        object_type: addr("PyBaseObject_Type"),
        str_type: addr("PyUnicode_Type"),
        int_type: addr("PyLong_Type"),
        code_type: addr("PyCode_Type"),
    };
    Ok(ObjectReader::new(py.pid, py.layout.clone(), layout, known))
}

/// The modules in `sys.modules`, `__main__` first, then by name; then each thread's frames.
fn roots(py: &PythonProcess, reader: &mut ObjectReader) -> Vec<Root> {
    let mut roots = Vec::new();
    if let Some(modules) = py.modules_dict() {
        let mut items = Vec::new();
        reader.dict_items_of(modules, &mut items);
        let mut mods: Vec<Root> = items
            .into_iter()
            .filter_map(|(edge, module)| match reader.name(edge) {
                Edge::Value(key) => Some(Root::Module {
                    name: key.trim_matches('\'').to_string(),
                    module,
                }),
                _ => None,
            })
            .collect();
        mods.sort_by_key(|r| match r {
            Root::Module { name, .. } => (name != "__main__", name.clone()),
            Root::Frame { .. } => (true, String::new()),
        });
        roots.extend(mods);
    }
    for (thread, frames) in py.thread_frames() {
        for frame in frames {
            let function = reader
                .frame_code(frame)
                .and_then(|c| reader.code_name(c))
                .map_or_else(|| "?".to_string(), |n| n.to_string());
            roots.push(Root::Frame {
                thread,
                frame,
                function,
            });
        }
    }
    roots
}

/// A breadth-first walk of the object graph.
struct Walk {
    reader: ObjectReader,
    /// Each object reached → the object (or `ROOT | root number`) it was first reached from.
    parent: HashMap<u64, u64>,
    queue: VecDeque<u64>,
    found: Vec<u64>,
    /// Objects of types with C fields not read, by type name.
    unknown: HashMap<Arc<str>, u64>,
    /// References to leaves passed (each time).
    leaves: u64,
    /// Whether each type met is the one sought (`Target::Type`).
    matches: HashMap<u64, bool>,
}

/// Whether a type named `full` (`app.models.User`, `collections.deque`) is the one a user named
/// `asked`: the whole name, or its end after a dot (`User`, `models.User`).
pub(crate) fn names(full: &str, asked: &str) -> bool {
    full == asked
        || full
            .strip_suffix(asked)
            .is_some_and(|head| head.ends_with('.'))
}

impl Walk {
    /// Notes `obj` as reached from `from` the first time; whether it is one sought.
    fn reach(&mut self, obj: u64, from: u64, target: &Target) -> bool {
        if self.parent.len() >= MAX_OBJECTS || self.parent.contains_key(&obj) {
            return false;
        }
        // Checked when reached, not when expanded: the first reached are the nearest, and a
        // big container's items need not all be expanded before the first is known.
        let typed = self.reader.type_of(obj);
        let hit = match (target, &typed) {
            (Target::Address(a), _) => *a == obj,
            (Target::Type(name), Some((t, d))) => *self
                .matches
                .entry(*t)
                .or_insert_with(|| names(&d.name, name)),
            (Target::Type(_), None) => false,
        };
        let desc = typed.map(|(_, d)| d);
        // A leaf refers to nothing: unless sought, it need not be kept (most of a big heap's
        // objects are ints and strs).
        if !hit && desc.is_some_and(|d| d.shape == Shape::Leaf) {
            self.leaves += 1;
            return false;
        }
        self.parent.insert(obj, from);
        self.queue.push_back(obj);
        if hit {
            self.found.push(obj);
        }
        hit
    }

    /// Walks until `samples` objects matching `target` are found or nothing is left; whether
    /// everything reachable was searched.
    fn run(&mut self, target: &Target, samples: usize) -> bool {
        let mut edges = Vec::new();
        while let Some(obj) = self.queue.pop_front() {
            if self.found.len() >= samples {
                return false;
            }
            let Some((_, desc)) = self.reader.type_of(obj) else {
                self.reader.torn += 1;
                continue;
            };
            if desc.opaque || desc.shape == Shape::Unknown {
                *self.unknown.entry(desc.name.clone()).or_default() += 1;
            }
            edges.clear();
            self.reader.referents(obj, &desc, &mut edges);
            for (_, child) in edges.drain(..) {
                if self.reach(child, obj, target) && self.found.len() >= samples {
                    return false;
                }
            }
        }
        self.parent.len() < MAX_OBJECTS
    }

    /// The chain from a root to `obj`, its edges read again.
    fn chain(&mut self, obj: u64, roots: &[Root]) -> Chain {
        let mut path = vec![obj];
        let mut at = obj;
        while let Some(&p) = self.parent.get(&at) {
            if p & ROOT != 0 || path.len() > 100_000 {
                break;
            }
            path.push(p);
            at = p;
        }
        path.reverse();
        let root_no = self.parent.get(&path[0]).map_or(0, |p| p & !ROOT) as usize;
        let root = roots.get(root_no);
        let mut hops = Vec::new();
        for (i, &node) in path.iter().enumerate() {
            let via = match (i, root) {
                (0, Some(Root::Module { .. })) => String::new(),
                (0, Some(Root::Frame { frame, .. })) => {
                    let mut locals = Vec::new();
                    self.reader.frame_locals(*frame, &mut locals);
                    edge_to(&mut self.reader, &locals, node)
                }
                _ => {
                    let from = path[i - 1];
                    let mut edges = Vec::new();
                    if let Some((_, d)) = self.reader.type_of(from) {
                        self.reader.referents(from, &d, &mut edges);
                    }
                    edge_to(&mut self.reader, &edges, node)
                }
            };
            let desc = self.reader.type_of(node).map(|(_, d)| d);
            hops.push(Hop {
                via,
                type_name: desc.as_ref().map_or("?".into(), |d| d.name.to_string()),
                address: node,
                name: desc.and_then(|d| self.reader.describe(node, &d)),
            });
        }
        Chain {
            root: root.map_or_else(|| "?".into(), Root::label),
            hops,
        }
    }
}

/// How `edges` reach `to`, named (the object may have changed since the walk: then in words).
fn edge_to(reader: &mut ObjectReader, edges: &[(Edge, u64)], to: u64) -> String {
    match edges.iter().find(|(_, a)| *a == to) {
        Some((e, _)) => reader.name(e.clone()).to_string(),
        None => "(reference gone since)".into(),
    }
}

/// `--why`'s answer as text.
pub fn render(w: &Why) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nwhy {} is alive: the shortest reference chains from the roots ({} modules and thread \
         frames; {} objects searched in {:.2} s{})",
        w.target,
        group(w.roots),
        group(w.objects_searched),
        w.search_s,
        if w.exhausted {
            ", all that is reachable"
        } else {
            ""
        }
    );
    if w.chains.is_empty() {
        let _ = writeln!(
            o,
            "  none reachable: no {} is held by module globals, thread frames or what they \
             reach through known layouts (it may be held by C code, by an object of unknown \
             layout below, or be unreachable garbage of a reference cycle)",
            w.target
        );
    }
    for (n, c) in w.chains.iter().enumerate() {
        let last = c.hops.last();
        // A module root is the first object of its chain: named once, by the root.
        let hops: Vec<&Hop> = c.hops.iter().filter(|h| !h.via.is_empty()).collect();
        let _ = writeln!(
            o,
            "\n  {}. {} at {:#x}, {} from {}:",
            n + 1,
            last.map_or("?", |h| h.type_name.as_str()),
            last.map_or(0, |h| h.address),
            match hops.len() {
                1 => "1 reference".to_string(),
                k => format!("{k} references"),
            },
            c.root
        );
        let _ = writeln!(o, "       {}", c.root);
        for h in hops {
            let name = h
                .name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default();
            let _ = writeln!(o, "         {:<28} {}{name}", h.via, h.type_name);
        }
    }
    if !w.unknown_layouts.is_empty() {
        let list: Vec<String> = w
            .unknown_layouts
            .iter()
            .take(8)
            .map(|t| format!("{} ×{}", t.name, group(t.objects)))
            .collect();
        let more = match w.unknown_layouts.len().saturating_sub(list.len()) {
            0 => String::new(),
            n => format!(", and {n} more types (the JSON lists them all)"),
        };
        let _ = writeln!(
            o,
            "\n  not looked into (C types of unknown layout): {}{more}",
            list.join(", ")
        );
    }
    if w.torn > 0 {
        let _ = writeln!(
            o,
            "  {} references skipped: they did not read as what they should point to (the \
             target ran during the walk; --freeze stops it)",
            group(w.torn)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_named_whole_or_by_its_end() {
        assert!(names("app.models.User", "User"));
        assert!(names("app.models.User", "models.User"));
        assert!(names("app.models.User", "app.models.User"));
        assert!(!names("app.models.User", "ser"));
        assert!(!names("app.models.SuperUser", "User"));
        assert!(names("dict", "dict"));
        assert_eq!("0x10".parse(), Ok(Target::Address(16)));
        assert_eq!("16".parse(), Ok(Target::Address(16)));
        assert_eq!("User".parse(), Ok(Target::Type("User".into())));
        assert!("0xZZ".parse::<Target>().is_err());
        assert!("".parse::<Target>().is_err());
    }
}
