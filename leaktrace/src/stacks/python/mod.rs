//! Python stacks: telling the kernel how to walk a CPython process's frames, keeping it told
//! which thread state belongs to which thread, and decoding the frames it records.

pub mod code;
pub mod debug_offsets;
pub mod dict_keys;
pub mod gc_lists;
pub mod layout;
pub mod objects;
pub mod pools;
pub mod referents;
pub mod type_object;

use std::sync::Arc;

use leaktrace_ebpf::{PyFrameRec, PyOffsets};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::process::elf::ElfFile;
use crate::process::maps::ModuleMap;
use crate::process::python::PythonInfo;
use crate::process::remote::Remote;
use code::CodeCache;
use debug_offsets::DEBUG_OFFSETS_READ;
use layout::PyLayout;

/// One decoded Python frame. Names are shared with the code object they came from: thousands
/// of sites repeat the same few hundred frames.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct PyFrame {
    pub filename: Arc<str>,
    /// The qualified name (`Class.method`), `<module>` for module code.
    pub function: Arc<str>,
    /// The line being executed; `None` when the instruction has no line (or before the first).
    pub line: Option<u32>,
}

impl PyFrame {
    /// A frame that could not be read.
    pub fn unknown() -> Self {
        Self {
            filename: "<unknown>".into(),
            function: "<unknown>".into(),
            line: None,
        }
    }

    /// `app.py:12 in handle`.
    pub fn display(&self) -> String {
        match self.line {
            Some(l) => format!("{}:{} in {}", self.filename, l, self.function),
            None => format!("{} in {}", self.filename, self.function),
        }
    }
}

/// Most threads and interpreters walked in a thread-list refresh (guards against a corrupt list).
const MAX_THREADS: usize = 4096;
const MAX_INTERPRETERS: usize = 64;

/// One traced CPython process.
pub struct PythonProcess {
    pub pid: u32,
    pub layout: PyLayout,
    /// Absolute address of `_PyRuntime` in the process.
    runtime: u64,
    mem: Remote,
    codes: CodeCache,
    /// Absolute address of `PyType_Type`, the type of types: how an object's type is checked.
    pub type_type: Option<u64>,
    /// Absolute address of obmalloc's `narenas_currently_allocated` (a static up to 3.11; 3.12
    /// moved it into interpreter state that `_Py_DebugOffsets` does not describe).
    arenas: Option<u64>,
    /// The process's PID namespace `(st_dev, inode)` when it is not leaktrace's.
    pidns: Option<(u64, u64)>,
    /// The interpreter's file as leaktrace reads it, and how far it is mapped from its
    /// link-time addresses: for finding more of its symbols later.
    image: std::path::PathBuf,
    bias: u64,
}

/// Bytes per pymalloc arena on 64-bit builds (`ARENA_BITS` 20 since 3.10).
const ARENA_SIZE: u64 = 1 << 20;

impl PythonProcess {
    /// Finds `_PyRuntime` and the version's layout (built-in for 3.11/3.12, the target's own
    /// `_Py_DebugOffsets` for 3.13+).
    pub fn new(pid: u32, info: &PythonInfo, modules: &ModuleMap) -> Result<Self> {
        let unsupported = Error::PythonLayout;
        let elf = ElfFile::open(&info.host_path)?;
        let (major, minor) = match info.version {
            Some((a, b, _)) => (a, b),
            None => return Err(unsupported("unknown Python version".into())),
        };
        let sym = elf
            .data_symbol("_PyRuntime")
            .ok_or_else(|| unsupported(format!("{} has no _PyRuntime symbol", info.module)))?;
        let bias = modules
            .load_bias(&info.module, elf.first_load_vaddr())
            .ok_or_else(|| unsupported(format!("{} is not mapped", info.module)))?;
        let runtime = sym.wrapping_add(bias);
        let type_type = elf.data_symbol("PyType_Type").map(|a| a.wrapping_add(bias));
        let arenas = elf
            .data_symbol("narenas_currently_allocated")
            .filter(|_| (major, minor) <= (3, 11))
            .map(|a| a.wrapping_add(bias));
        let mem = Remote { pid };
        let layout = match layout::builtin(major, minor) {
            Some(l) => l,
            None if (major, minor) >= (3, 13) => {
                let raw = mem
                    .read(runtime, DEBUG_OFFSETS_READ)
                    .ok_or_else(|| unsupported("cannot read _PyRuntime".into()))?;
                debug_offsets::from_debug_offsets(&raw)?
            }
            None => {
                return Err(unsupported(format!(
                    "Python {major}.{minor} is not supported (3.11 and later are)"
                )))
            }
        };
        Ok(Self {
            pid,
            layout,
            runtime,
            mem,
            codes: CodeCache::default(),
            type_type,
            arenas,
            pidns: crate::process::foreign_pidns(pid),
            image: info.host_path.clone(),
            bias,
        })
    }

    /// Memory held in pymalloc's arenas now, when the interpreter says where it counts them.
    pub fn arena_bytes(&self) -> Option<u64> {
        let n = self.mem.u64(self.arenas?)?;
        // A count no process could hold means the read went wrong.
        (n < 1 << 24).then_some(n * ARENA_SIZE)
    }

    /// The main interpreter, once the runtime has one.
    fn main_interpreter(&self) -> Option<u64> {
        match self.layout.rt_main_interpreter {
            Some(off) => Some(self.runtime + off),
            None => self
                .mem
                .u64(self.runtime + self.layout.rt_interpreters_head)
                .filter(|p| *p != 0),
        }
    }

    /// The walk parameters for the kernel; `None` until the interpreter exists (a process
    /// traced from its first instruction has not run `Py_Initialize` yet).
    pub fn bpf_offsets(&self) -> Option<PyOffsets> {
        let l = &self.layout;
        let holder_addr = match (l.rt_tstate_current, l.is_gil_holder) {
            (Some(off), _) => self.runtime + off,
            (None, Some(off)) => self.main_interpreter()?.wrapping_add(off),
            (None, None) => 0,
        };
        let narrow = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
        Some(PyOffsets {
            holder_addr,
            code_mask: l.code_mask,
            ts_native_thread_id: narrow(l.ts_native_thread_id),
            ts_cframe: l.ts_cframe.map(narrow).unwrap_or(u16::MAX),
            frame_ptr: narrow(l.frame_ptr),
            fr_code: narrow(l.fr_code),
            fr_previous: narrow(l.fr_previous),
            fr_instr: narrow(l.fr_instr),
            fr_owner: narrow(l.fr_owner),
            owner_skip_min: l.owner_skip_min,
            _pad: 0,
            is_threads_head: narrow(l.is_threads_head),
            ts_next: narrow(l.ts_next),
            interp_head_addr: self.runtime + l.rt_interpreters_head,
            co_check: narrow(l.co_linetable),
            fr_is_entry: l.fr_is_entry.map(narrow).unwrap_or(u16::MAX),
            _pad2: [0; 4],
            pidns_dev: self.pidns.map_or(0, |n| n.0),
            pidns_ino: self.pidns.map_or(0, |n| n.1),
        })
    }

    /// The addresses of the data symbols `names` in the target (`None` for one it lacks).
    pub fn data_symbols(&self, names: &[&str]) -> Result<Vec<Option<u64>>> {
        let elf = ElfFile::open(&self.image)?;
        Ok(elf
            .data_symbols(names)
            .into_iter()
            .map(|a| a.map(|a| a.wrapping_add(self.bias)))
            .collect())
    }

    /// The main interpreter's `sys.modules` dict.
    pub fn modules_dict(&self) -> Option<u64> {
        // `interpreters.main` follows `interpreters.head` (the newest interpreter) in every
        // version from 3.11 to 3.15.
        let main = self.runtime + self.layout.rt_interpreters_head + 8;
        let interp = self.mem.u64(main).filter(|i| *i != 0)?;
        self.mem
            .u64(interp.checked_add(self.layout.is_modules)?)
            .filter(|d| *d != 0)
    }

    /// Each Python thread's interpreter frames, innermost first, without the interpreter's
    /// own (shim) frames: (thread id, frame addresses).
    pub fn thread_frames(&self) -> Vec<(u32, Vec<u64>)> {
        const MAX_FRAMES: usize = 4096;
        let l = &self.layout;
        // Whatever is read may be torn: offsets are added without overflow, and what is no
        // address reads as nothing.
        let read = |a: u64, off: u64| self.mem.u64(a.wrapping_add(off)).filter(|v| *v != 0);
        let first = |ts: u64| match l.ts_cframe {
            Some(c) => read(ts, c).and_then(|cf| read(cf, l.frame_ptr)),
            None => read(ts, l.frame_ptr),
        };
        self.thread_states()
            .into_iter()
            .map(|(tid, ts)| {
                let mut frames = Vec::new();
                let mut f = first(ts);
                while let Some(frame) = f.filter(|_| frames.len() < MAX_FRAMES) {
                    let owner = self
                        .mem
                        .read(frame.wrapping_add(l.fr_owner), 1)
                        .map_or(0, |b| b[0]);
                    if owner < l.owner_skip_min {
                        frames.push(frame);
                    }
                    f = read(frame, l.fr_previous);
                }
                (tid, frames)
            })
            .collect()
    }

    /// Every Python thread of every interpreter: (thread id as leaktrace's PID namespace
    /// numbers it, `PyThreadState*`).
    pub fn thread_states(&self) -> Vec<(u32, u64)> {
        let own = self.interpreter_thread_states();
        if self.pidns.is_none() {
            return own;
        }
        // A container's interpreter knows its threads by the container's ids.
        let ids = crate::process::ns_thread_ids(self.mem.pid);
        own.into_iter()
            .filter_map(|(tid, t)| ids.get(&tid).map(|host| (*host, t)))
            .collect()
    }

    /// Every Python thread of every interpreter: (`native_thread_id`, `PyThreadState*`).
    fn interpreter_thread_states(&self) -> Vec<(u32, u64)> {
        let l = &self.layout;
        let mut out = Vec::new();
        let mut interp = self
            .mem
            .u64(self.runtime + l.rt_interpreters_head)
            .unwrap_or(0);
        for _ in 0..MAX_INTERPRETERS {
            if interp == 0 {
                break;
            }
            let mut t = self
                .mem
                .u64(interp.wrapping_add(l.is_threads_head))
                .unwrap_or(0);
            while t != 0 && out.len() < MAX_THREADS {
                let Some(tid) = self.mem.u64(t.wrapping_add(l.ts_native_thread_id)) else {
                    break;
                };
                if tid != 0 {
                    out.push((tid as u32, t));
                }
                t = self.mem.u64(t.wrapping_add(l.ts_next)).unwrap_or(0);
            }
            interp = self.mem.u64(interp.wrapping_add(l.is_next)).unwrap_or(0);
        }
        out
    }

    /// Decodes frames recorded by the kernel (innermost first) while the process lives.
    pub fn decode(&mut self, frames: &[PyFrameRec]) -> Vec<PyFrame> {
        let layout = self.layout.clone();
        frames
            .iter()
            .map(
                |f| match self.codes.get(&self.mem, &layout, f.code, f.check) {
                    // The code object at that address is not the one the frame ran (it was freed
                    // and the memory reused): better unknown than misnamed.
                    Some(info) if f.check != 0 && f.check != info.check => {
                        log::trace!(
                            "frame code {:#x}: check {:#x} != {:#x} ({})",
                            f.code,
                            f.check,
                            info.check,
                            info.qualname
                        );
                        PyFrame::unknown()
                    }
                    Some(info) => {
                        let start = f.code.wrapping_add(layout.co_code_adaptive);
                        // prev_instr is one unit before the start until the first instruction runs.
                        let lasti = f.instr.wrapping_sub(start) as i64 / 2;
                        if lasti >= 0 && !info.contains(lasti as u64) {
                            return PyFrame::unknown();
                        }
                        let line = u64::try_from(lasti)
                            .ok()
                            .and_then(|lasti| info.line(lasti))
                            .or(Some(info.firstlineno));
                        PyFrame {
                            filename: info.filename.clone(),
                            function: info.qualname.clone(),
                            line,
                        }
                    }
                    None => PyFrame::unknown(),
                },
            )
            .collect()
    }
}
