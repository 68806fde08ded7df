//! Native addresses → module, function, file:line, with blazesym.
//!
//! Addresses are first normalized to (file, file offset) through a snapshot of the process's
//! mappings, taken while it lives, so a report written after the target died still names
//! functions: the files outlive the process.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::process::debug_file::debug_dirs;
use crate::process::maps::{host_path, Mapping, ModuleMap};
use crate::process::Process;

mod namer;

use namer::{Job, Key, Named, Namer};

/// A symbolized native frame. Names are shared: a report repeats the same frames thousands of
/// times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The runtime address (a return address for callers).
    pub address: u64,
    /// The mapped file, as the process sees it.
    pub module: Option<Arc<str>>,
    pub file_offset: Option<u64>,
    pub function: Option<Arc<str>>,
    /// Offset of `address` from the start of `function`; 0 when not known.
    pub function_offset: u64,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    /// Functions inlined at this address, outermost first.
    pub inlined: Vec<Arc<str>>,
    /// The interpreter's eval loop: where Python frames go when stacks are merged.
    #[serde(skip)]
    pub eval: bool,
}

/// CPython's allocator layer: the functions between an object's constructor and libc's malloc
/// or pymalloc's arena (Objects/obmalloc.c). A report's site is the first frame outside them,
/// so an allocation reads the same whether the Python allocator was probed call by call or
/// reached through libc.
const PYTHON_ALLOCATOR_LAYER: &[&str] = &[
    "PyObject_Malloc",
    "PyObject_Calloc",
    "PyObject_Realloc",
    "PyMem_Malloc",
    "PyMem_Calloc",
    "PyMem_Realloc",
    "PyMem_RawMalloc",
    "PyMem_RawCalloc",
    "PyMem_RawRealloc",
    "_PyObject_Malloc",
    "_PyObject_Calloc",
    "_PyObject_Realloc",
    "_PyMem_RawMalloc",
    "_PyMem_RawCalloc",
    "_PyMem_RawRealloc",
    "_PyObject_ArenaMmap",
    "_PyMem_ArenaAlloc",
    "pymalloc_alloc",
    "pymalloc_realloc",
    "allocate_from_new_pool",
    "new_arena",
    "arena_map_mark_used",
];

impl Frame {
    /// Whether the frame is in an in-process heap sampler (leaktrace's preload library, or
    /// Datadog's sampler functions linked into any producer of the heap-sampling USDTs): the
    /// layer between the program's allocator call and the USDT, never the site.
    pub fn in_sampler(&self) -> bool {
        let module = self
            .module
            .as_deref()
            .and_then(|m| m.rsplit('/').next())
            .is_some_and(|m| m.starts_with("libleaktrace_preload"));
        module
            || self
                .function
                .as_deref()
                .is_some_and(|f| f.starts_with("dd_allocation_") || f.starts_with("dd_probe_"))
    }

    /// Whether the frame is in CPython's allocator layer (`obmalloc.c`), not a caller of it.
    /// The function the code belongs to decides, not what was inlined into it: under LTO a
    /// constructor (`PyUnicode_New`) has `PyObject_Malloc` inlined at its call, and stays the
    /// site.
    pub fn in_python_allocator(&self) -> bool {
        if self
            .function
            .as_deref()
            .is_some_and(|f| PYTHON_ALLOCATOR_LAYER.contains(&f))
        {
            return true;
        }
        // Where the location is the function's own (nothing inlined), its file says it too.
        self.inlined.is_empty()
            && self
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("/obmalloc.c") || f == "obmalloc.c")
    }

    /// `leak_malloc+0x1f (leaky.c:12) in leaky.so`, or `0x7f…` when nothing is known.
    pub fn display(&self) -> String {
        let mut s = match &self.function {
            Some(f) if self.function_offset == 0 => f.to_string(),
            Some(f) => format!("{f}+{:#x}", self.function_offset),
            None => match self.file_offset {
                Some(off) => format!("{:#x}", off),
                None => format!("{:#x}", self.address),
            },
        };
        if let Some(inl) = self.inlined.last() {
            s = format!("{inl} (inlined in {s})");
        }
        if let (Some(file), Some(line)) = (&self.file, self.line) {
            let short = file.rsplit('/').next().unwrap_or(file);
            s.push_str(&format!(" ({short}:{line})"));
        }
        match &self.module {
            Some(m) => format!("{s} in {}", m.rsplit('/').next().unwrap_or(m)),
            None => format!("{s} in [unknown module]"),
        }
    }
}

/// Where a report's native frames get their names: the live symbolizer while tracing, or the
/// frames a capture file recorded when rendering it later.
pub trait FrameSource {
    /// The frame of a return address, placed in its file (not necessarily named yet).
    fn return_address(&mut self, pid: u32, addr: u64) -> Frame;
    /// Names a frame `return_address` gave: function, file and line.
    fn resolve(&mut self, pid: u32, frame: &mut Frame);
    /// Says that `frame` will be resolved soon, so its naming can start before (a report's
    /// frames are then named back to back instead of one wait each).
    fn expect(&mut self, _pid: u32, _frame: &Frame) {}

    /// Whether every one of `pcs` (return addresses of process `pid`) is in an in-process
    /// sampler's own code: a walk that saw only those frames says nothing of the program's path.
    fn all_in_sampler(&mut self, pid: u32, pcs: &[u64]) -> bool {
        pcs.iter()
            .all(|pc| self.return_address(pid, *pc).in_sampler())
    }
}

impl FrameSource for Symbolizer {
    fn return_address(&mut self, pid: u32, addr: u64) -> Frame {
        Symbolizer::return_address(self, pid, addr)
    }
    fn resolve(&mut self, pid: u32, frame: &mut Frame) {
        Symbolizer::resolve(self, pid, frame)
    }
    fn expect(&mut self, pid: u32, frame: &Frame) {
        if let (Some(module), Some(off)) = (frame.module.clone(), frame.file_offset) {
            self.queue(pid, (module, off));
        }
    }
}

/// blazesym's own default debug directories, kept when more are added.
const DEFAULT_DEBUG_DIRS: &[&str] = &["/usr/lib/debug", "/lib/debug"];

/// Symbolizes addresses of traced processes, caching mappings and results. Frames are named on
/// a thread of its own (`namer`), queued by `expect` or when resolved.
pub struct Symbolizer {
    namer: Namer,
    modules: HashMap<u32, ModuleMap>,
    /// (pid, address) → placed frame.
    cache: HashMap<(u32, u64), Frame>,
    /// (module, file offset) → names.
    resolved: HashMap<Key, Named>,
    /// (pid, module) → the path it opens as (`host_path` reads the process's maps).
    hosts: HashMap<(u32, String), PathBuf>,
    /// Files only reachable through `/proc/PID/…` (a container's, a deleted one), held open by
    /// (device, inode) so the naming thread can open them after the process is gone.
    held: HashMap<(u64, u64), File>,
    /// Where blazesym looks for stripped files' debug files: the host's, and each install tree's
    /// met so far (`debug_file::debug_dirs`).
    debug_dirs: Arc<[PathBuf]>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches (and its naming thread started).
    pub fn new() -> Self {
        Self {
            namer: Namer::start(),
            modules: HashMap::new(),
            cache: HashMap::new(),
            resolved: HashMap::new(),
            hosts: HashMap::new(),
            held: HashMap::new(),
            debug_dirs: DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// Adds the debug directories of the install tree `host` belongs to.
    fn learn_debug_dirs(&mut self, host: &Path) {
        let mut dirs = self.debug_dirs.to_vec();
        for d in debug_dirs(host) {
            if !dirs.contains(&d) {
                dirs.insert(0, d);
            }
        }
        if dirs.len() != self.debug_dirs.len() {
            self.debug_dirs = dirs.into();
        }
    }

    /// Forgets process `pid`'s mappings and placed addresses (it exec'd another program).
    pub fn forget_process(&mut self, pid: u32) {
        self.modules.remove(&pid);
        self.cache.retain(|(p, _), _| *p != pid);
        self.hosts.retain(|(p, _), _| *p != pid);
    }

    /// Re-reads process `pid`'s mappings (modules loaded since the last look).
    pub fn refresh(&mut self, pid: u32) {
        let p = Process { pid };
        if let Ok(mm) = p.module_map() {
            if !mm.mappings().is_empty() {
                self.modules.insert(pid, mm);
            }
        }
    }

    /// The file mapping of `addr` in process `pid`, re-reading the maps when it is not in the
    /// last snapshot (a module loaded since).
    pub fn mapping(&mut self, pid: u32, addr: u64) -> Option<Mapping> {
        if self.modules.get(&pid).and_then(|m| m.find(addr)).is_none() {
            self.refresh(pid);
        }
        self.modules.get(&pid).and_then(|m| m.find(addr)).cloned()
    }

    /// Places a return address of process `pid` in its mapped file and remembers it, for
    /// `return_address` to give back after the process is gone; false if it is in no mapped file
    /// (yet).
    pub fn place(&mut self, pid: u32, addr: u64) -> bool {
        self.cache.contains_key(&(pid, addr)) || self.return_address(pid, addr).module.is_some()
    }

    /// Places a return address of process `pid` in its mapped file. Call while the process
    /// lives; `resolve` gives its names later, from the file alone.
    pub fn return_address(&mut self, pid: u32, addr: u64) -> Frame {
        if let Some(f) = self.cache.get(&(pid, addr)) {
            return f.clone();
        }
        let mapping = self.mapping(pid, addr);
        let mut frame = Frame {
            address: addr,
            ..Frame::default()
        };
        if let Some(m) = mapping {
            let module: Arc<str> = Arc::from(m.path.as_str());
            let off = m.file_offset(addr);
            frame.module = Some(module.clone());
            frame.file_offset = Some(off);
            // Only cache what is final: an address whose module was not mapped yet may be later.
            self.cache.insert((pid, addr), frame.clone());
        }
        frame
    }

    /// Queues the frame at `key` of process `pid` to be named (the call instruction before the
    /// return address is looked up, so the line is the call's).
    fn queue(&mut self, pid: u32, key: Key) {
        if self.resolved.contains_key(&key) {
            return;
        }
        let host = self.host(pid, &key.0);
        self.namer.queue(Job {
            lookup: key.1.saturating_sub(1),
            key,
            host,
            debug_dirs: self.debug_dirs.clone(),
        });
    }

    /// The path that opens module `path` of process `pid` from here.
    fn host(&mut self, pid: u32, path: &str) -> PathBuf {
        let key = (pid, path.to_string());
        if let Some(h) = self.hosts.get(&key) {
            return h.clone();
        }
        let h = match self.modules.get(&pid) {
            Some(mm) => mm.host_path(pid, path),
            None => host_path(pid, path),
        };
        self.learn_debug_dirs(&h);
        let h = self.durable(h, path);
        self.hosts.insert(key, h.clone());
        h
    }

    /// A path to `host` that still opens once the process has exited: a module's path is kept
    /// for every later report (an `attach` interval's, then the last after the target exited),
    /// when `/proc/PID/root/…` no longer resolves. The name as it stands where it is the same
    /// file (device and inode), else a descriptor held open here.
    fn durable(&mut self, host: PathBuf, path: &str) -> PathBuf {
        if !host.starts_with("/proc") {
            return host;
        }
        let Ok(md) = std::fs::metadata(&host) else {
            return host;
        };
        let same = |p: &Path| {
            std::fs::metadata(p).is_ok_and(|o| (o.dev(), o.ino()) == (md.dev(), md.ino()))
        };
        if same(Path::new(path)) {
            return PathBuf::from(path);
        }
        let fd = match self.held.entry((md.dev(), md.ino())) {
            Entry::Occupied(held) => held.get().as_raw_fd(),
            Entry::Vacant(slot) => match File::open(&host) {
                Ok(f) => slot.insert(f).as_raw_fd(),
                Err(_) => return host,
            },
        };
        PathBuf::from(format!("/proc/self/fd/{fd}"))
    }

    /// Fills in function, file and line of a frame placed by `return_address`, waiting for the
    /// naming thread if it has not got to it yet.
    pub fn resolve(&mut self, pid: u32, frame: &mut Frame) {
        let (Some(module), Some(off)) = (frame.module.clone(), frame.file_offset) else {
            return;
        };
        let key = (module, off);
        if !self.resolved.contains_key(&key) {
            self.namer.collect(&mut self.resolved);
        }
        if !self.resolved.contains_key(&key) {
            self.queue(pid, key.clone());
            // The thread is gone: the frame stays unnamed, and is not waited for again.
            if self.namer.wait_for(&key, &mut self.resolved).is_none() {
                self.resolved.insert(key.clone(), Named::default());
            }
        }
        if let Some(named) = self.resolved.get(&key) {
            named.apply(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function() -> u64 {
        marker_function as *const () as usize as u64
    }

    #[test]
    fn symbolizes_own_function_and_survives_unknown_addresses() {
        let mut s = Symbolizer::new();
        let pid = std::process::id();
        // Pretend the return address is a few bytes into the function.
        let mut f = s.return_address(pid, marker_function() + 4);
        assert!(f.function.is_none(), "placing does not symbolize");
        s.resolve(pid, &mut f);
        assert!(f.module.is_some());
        assert!(
            f.function
                .as_deref()
                .unwrap_or("")
                .contains("marker_function"),
            "{f:?}"
        );
        assert!(f.display().contains("marker_function"));
        let mut unknown = s.return_address(pid, 0x10);
        s.resolve(pid, &mut unknown);
        assert!(unknown.module.is_none());
        assert!(unknown.display().contains("unknown module"));
    }

    /// A module's path is worked out once, while the target may still live, and used later by
    /// the naming thread: it must still open then, not be `/proc/PID/root/…` of a process that
    /// is gone.
    #[test]
    fn a_placed_module_still_opens_after_its_process_exits() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // cat echoing a line has exec'd: its maps are cat's, not the forked test's.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"up\n").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = child.id();
        let maps = crate::process::maps::parse_maps(
            &std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
        );
        let exe = maps.iter().find(|m| m.path.ends_with("/cat")).unwrap();
        let mut s = Symbolizer::new();
        let host = s.host(pid, &exe.path);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            std::fs::File::open(&host).is_ok(),
            "{} does not open after the process exited",
            host.display()
        );
    }

    /// A file only reachable through `/proc` (here a deleted one, as a container's is once the
    /// container is gone) is held open, and named through the descriptor.
    #[test]
    fn a_file_reachable_only_through_proc_is_held_open() {
        let me = std::process::id();
        let mapped = crate::test_support::DeletedMapping::new(b"still here");
        let mut s = Symbolizer::new();
        s.refresh(me);
        let module = s.mapping(me, mapped.at).unwrap().path;
        let host = s.host(me, &module);
        drop(mapped);
        assert!(host.starts_with("/proc/self/fd"), "{}", host.display());
        assert_eq!(std::fs::read(&host).unwrap(), b"still here");
    }

    /// A program whose `outer` has `inner` inlined, and `inner` calls `grab`, which prints its
    /// return address (inside `outer`'s copy of `inner`) and waits.
    const INLINED: &str = r#"#include <stdio.h>
__attribute__((noinline)) void grab(void) {
    printf("%p\n", __builtin_return_address(0));
    fflush(stdout);
    getchar();
}
static inline __attribute__((always_inline)) void inner(int n) {
    if (n > 0)
        grab(); /* line 9: where the code is */
}
__attribute__((noinline)) void outer(int n) {
    inner(n); /* line 12: the call into inner */
    __asm__ volatile("" ::: "memory");
}
int main(int argc, char **argv) { (void)argv; outer(argc); return 0; }
"#;

    #[test]
    fn an_inlined_frame_has_the_inlined_functions_line() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        let (_dir, exe) = crate::test_support::compile_c(INLINED, &["-O2", "-g"]);
        let mut child = Command::new(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ret = u64::from_str_radix(line.trim().trim_start_matches("0x"), 16).unwrap();
        let mut s = Symbolizer::new();
        let mut f = s.return_address(child.id(), ret);
        s.resolve(child.id(), &mut f);
        let _ = child.stdin.take().unwrap().write_all(b"\n");
        let _ = child.wait();
        assert_eq!(f.function.as_deref(), Some("outer"), "{f:?}");
        assert_eq!(f.inlined, vec![Arc::<str>::from("inner")], "{f:?}");
        assert_eq!(
            f.line,
            Some(9),
            "the line in inner, not outer's call: {f:?}"
        );
        assert!(
            f.display().starts_with("inner (inlined in outer+"),
            "{}",
            f.display()
        );
    }
}
