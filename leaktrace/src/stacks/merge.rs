//! One stack from the program's entry to the allocator: the Python frames each run of the eval
//! loop executed, put where that run's native `_PyEval_EvalFrameDefault` frame is.

use serde::Serialize;

use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::Frame;

/// One frame of a merged stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StackEntry {
    Python {
        #[serde(flatten)]
        frame: PyFrame,
    },
    Native {
        #[serde(flatten)]
        frame: Frame,
        /// Interpreter plumbing between Python frames, or start-up code outside them: left out
        /// of the table unless `--native-frames all`.
        hidden: bool,
    },
}

impl StackEntry {
    /// Whether reports show the frame by default.
    pub fn hidden(&self) -> bool {
        matches!(self, StackEntry::Native { hidden: true, .. })
    }
}

/// Merges a native stack and a Python stack (both innermost first; `entry[i]` marks the Python
/// frame that began a run of the eval loop) into one stack, outermost first.
///
/// The k-th eval-loop frame from the top of the native stack ran the k-th group of Python
/// frames. Groups left over (a native unwind that stopped early) go at the outer end.
/// `interpreter` is the module holding the interpreter: its frames outside the innermost
/// Python frame are hidden, as is everything outside the outermost one.
pub fn merge(
    native: &[Frame],
    python: &[PyFrame],
    entry: &[bool],
    interpreter: Option<&str>,
) -> Vec<StackEntry> {
    let mut groups: Vec<&[PyFrame]> = Vec::new();
    let mut start = 0;
    for i in 0..python.len() {
        if entry.get(i).copied().unwrap_or(false) {
            groups.push(&python[start..=i]);
            start = i + 1;
        }
    }
    if start < python.len() {
        groups.push(&python[start..]);
    }
    let mut out: Vec<StackEntry> = Vec::new();
    let mut next = groups.iter();
    for f in native {
        if f.eval {
            if let Some(g) = next.next() {
                out.extend(g.iter().map(|p| StackEntry::Python { frame: p.clone() }));
            }
        }
        out.push(StackEntry::Native {
            frame: f.clone(),
            hidden: false,
        });
    }
    for g in next {
        out.extend(g.iter().map(|p| StackEntry::Python { frame: p.clone() }));
    }
    let is_py = |e: &StackEntry| matches!(e, StackEntry::Python { .. });
    let is_interp = |e: &StackEntry| match e {
        StackEntry::Native { frame, .. } => {
            frame.eval || (interpreter.is_some() && frame.module.as_deref() == interpreter)
        }
        StackEntry::Python { .. } => false,
    };
    if let (Some(inner), Some(outer)) = (out.iter().position(is_py), out.iter().rposition(is_py)) {
        // Below the innermost Python frame, the interpreter's call plumbing into an extension
        // (vectorcall, which changes as calls get specialized) is hidden too; an allocation the
        // interpreter itself makes keeps its frames.
        let into_ext = out[..inner]
            .iter()
            .rposition(|e| !is_interp(e))
            .unwrap_or(inner);
        let interp: Vec<bool> = out.iter().map(is_interp).collect();
        for (i, e) in out.iter_mut().enumerate() {
            if let StackEntry::Native { hidden, .. } = e {
                *hidden = i > outer || (interp[i] && i > into_ext);
            }
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str, module: &str, eval: bool) -> Frame {
        Frame {
            function: Some(name.into()),
            module: Some(module.into()),
            eval,
            ..Frame::default()
        }
    }

    fn p(name: &str) -> PyFrame {
        PyFrame {
            filename: "app.py".into(),
            function: name.into(),
            line: Some(1),
        }
    }

    fn names(s: &[StackEntry], all: bool) -> Vec<String> {
        s.iter()
            .filter(|e| all || !e.hidden())
            .map(|e| match e {
                StackEntry::Python { frame } => format!("py:{}", frame.function),
                StackEntry::Native { frame, .. } => frame.function.as_deref().unwrap().to_string(),
            })
            .collect()
    }

    #[test]
    fn python_frames_replace_their_eval_loops() {
        // Innermost first: malloc's caller in an extension, called from Python code run by the
        // inner eval loop, which was called back from a C function under the outer eval loop.
        let native = [
            n("chain3", "/ext.so", false),
            n("leak", "/ext.so", false),
            n("cfunction_call", "/libpython.so", false),
            n("_PyEval_EvalFrameDefault", "/libpython.so", true),
            n("callback", "/ext.so", false),
            n("_PyEval_EvalFrameDefault", "/libpython.so", true),
            n("Py_RunMain", "/libpython.so", false),
            n("__libc_start_main", "/libc.so", false),
        ];
        let python = [p("inner"), p("cb_target"), p("outer"), p("<module>")];
        // `cb_target` began the inner run; `<module>` the outer one.
        let entry = [false, true, false, true];
        let m = merge(&native, &python, &entry, Some("/libpython.so"));
        assert_eq!(
            names(&m, false),
            [
                "py:<module>",
                "py:outer",
                "callback",
                "py:cb_target",
                "py:inner",
                "leak",
                "chain3"
            ]
        );
        assert_eq!(names(&m, true).len(), native.len() + python.len());
        assert_eq!(names(&m, true)[0], "__libc_start_main");
    }

    #[test]
    fn interpreter_allocations_keep_their_frames() {
        // list.append growing its list: every native frame is the interpreter's own.
        let native = [
            n("list_resize", "/libpython.so", false),
            n("_PyList_AppendTakeRef", "/libpython.so", false),
            n("_PyEval_EvalFrameDefault", "/libpython.so", true),
        ];
        let m = merge(&native, &[p("f")], &[true], Some("/libpython.so"));
        assert_eq!(
            names(&m, false),
            ["py:f", "_PyList_AppendTakeRef", "list_resize"]
        );
    }

    #[test]
    fn leftover_python_frames_go_outside_a_short_native_stack() {
        let native = [n("leak", "/ext.so", false)];
        let python = [p("f"), p("<module>")];
        let m = merge(&native, &python, &[false, true], None);
        assert_eq!(names(&m, false), ["py:<module>", "py:f", "leak"]);
        let only_py = merge(&[], &python, &[false, false], None);
        assert_eq!(names(&only_py, false), ["py:<module>", "py:f"]);
    }
}
