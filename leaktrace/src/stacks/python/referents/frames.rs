//! A frame's local variables, read from its `_PyInterpreterFrame`: the code object's
//! `co_localsplusnames` names the slots of `localsplus` (locals, cells, free variables), in
//! the order the frame holds them. The frame of a running thread and the frame object a
//! traceback keeps (its data copied into the object when the function returned) are read alike.

use std::sync::Arc;

use super::{pointer, Edge, ObjectReader, Shape};
use crate::process::remote::word;

/// Local slots read from one frame at most.
const MAX_LOCALS: u64 = 1 << 16;

impl ObjectReader {
    /// The locals of the interpreter frame at `frame`, each an edge named by its variable.
    pub fn frame_locals(&mut self, frame: u64, out: &mut Vec<(Edge, u64)>) {
        let Some(code) = self.frame_code(frame) else {
            self.tear(line!(), file!());
            return;
        };
        let Some(names) = self.local_names(code) else {
            self.tear(line!(), file!());
            return;
        };
        let at = frame.wrapping_add(self.layout.fr_localsplus);
        let Some(raw) = self.mem.read(at, names.len() * 8) else {
            self.tear(line!(), file!());
            return;
        };
        for (i, name) in names.iter().enumerate() {
            let v = self.object_ref(word(&raw, i as u64 * 8).unwrap_or(0));
            if pointer(v) {
                out.push((Edge::Local(name.clone()), v));
            }
        }
    }

    /// The code object an interpreter frame runs.
    pub fn frame_code(&mut self, frame: u64) -> Option<u64> {
        let raw = self.mem.u64(frame.wrapping_add(self.layout.fr_code))?;
        let code = self.object_ref(raw);
        // A shim frame runs `None`, not code.
        let code_type = self.known.code_type;
        matches!(self.type_of(code), Some((t, _)) if t == code_type).then_some(code)
    }

    /// The object a frame's slot refers to: on 3.14 a `_PyStackRef`, whose low bit marks a
    /// borrowed reference and whose low bits 3 an int kept in the word itself (no object).
    fn object_ref(&self, v: u64) -> u64 {
        match self.layout.stack_refs {
            true if v & 3 == 3 => 0,
            true => v & !1,
            false => v,
        }
    }

    /// A code object's `co_qualname`, for naming a frame.
    pub fn code_name(&mut self, code: u64) -> Option<Arc<str>> {
        let q = self.mem.u64(code + self.py.co_qualname)?;
        self.str_value(q)
    }

    /// The names of a code object's local slots, read once per code object.
    fn local_names(&mut self, code: u64) -> Option<Arc<[Arc<str>]>> {
        if let Some(n) = self.locals.get(&code) {
            return Some(n.clone());
        }
        let tuple = self.mem.u64(code + self.layout.co_localsplusnames)?;
        if !matches!(self.type_of(tuple), Some((_, t)) if t.shape == Shape::Tuple) {
            return None;
        }
        let n = self.mem.u64(tuple + 16)?;
        if n > MAX_LOCALS {
            return None;
        }
        let raw = self
            .mem
            .read(tuple + self.layout.tuple_items, n as usize * 8)?;
        let names: Arc<[Arc<str>]> = (0..n)
            .map(|i| {
                word(&raw, i * 8)
                    .and_then(|s| self.str_value(s))
                    .unwrap_or_else(|| "?".into())
            })
            .collect();
        if self.locals.len() < 1 << 16 {
            self.locals.insert(code, names.clone());
        }
        Some(names)
    }
}
