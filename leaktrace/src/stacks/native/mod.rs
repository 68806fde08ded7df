//! Native stacks: unwinding each new site's stack copy with its modules' CFI, and teaching the
//! kernel the rows used, so it can tell call paths apart from then on.

pub mod cfi;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use leaktrace_ebpf::{native_end, unwind_flags, FrameRegs, UnwindRow};
use serde::Serialize;

use crate::process::maps::{host_path_of, Mapping};
use crate::stacks::symbolize::Symbolizer;
use cfi::{Lookup, ModuleCfi};

/// A row that ends the kernel's walk (the step fields are not used).
#[allow(non_snake_case)]
fn END_ROW(flags: u8) -> UnwindRow {
    UnwindRow {
        flags,
        ..UnwindRow::default()
    }
}

/// Frames unwound at most (a runaway recursion still ends).
const MAX_FRAMES: usize = 512;

/// Why an unwind ended.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum UnwindEnd {
    /// At the outermost frame (`_start`, a thread's entry): the stack is whole.
    Complete,
    /// The stack is deeper than the copy (`--stack-copy`).
    StackCopyTooShort,
    /// An address in no mapped file (JIT code, another tool's `[uprobes]` trampoline).
    UnknownModule,
    /// A module without CFI whose code does not keep frame pointers either.
    NoCfi,
    /// CFI a row cannot follow (a signal frame, a DWARF expression).
    #[serde(rename = "unsupported_cfi")]
    Unsupported,
    /// A step led nowhere sensible (corrupt stack or CFI).
    BadFrame,
    /// More frames than leaktrace follows.
    FrameLimit,
    /// The site's stack copy was never received: only the kernel's frames are known.
    NoStackCopy,
    /// A sample taken before leaktrace had learned to unwind past the in-process sampler's own
    /// frames: the kernel's walk ended inside them, so the site may stand for several call
    /// paths under its Python stack, and its copy (one of them) is not applied.
    SamplerFramesOnly,
    /// Allocated before leaktrace had learned to unwind past the last frame the kernel walked:
    /// the site's id covers only those frames, so it stands for every call path through them
    /// (under its Python stack) until their rows were learned. Its first stack copy has not
    /// come, or its copies showed different paths (or one could not be sent): no copy's path
    /// is shown.
    Unlearned,
}

impl UnwindEnd {
    /// How the kernel's own walk of a new site ended.
    pub fn from_kernel(end: u8) -> Self {
        match end {
            native_end::COMPLETE => UnwindEnd::Complete,
            native_end::LIMIT => UnwindEnd::FrameLimit,
            native_end::READ_ERROR => UnwindEnd::BadFrame,
            native_end::UNSUPPORTED => UnwindEnd::Unsupported,
            _ => UnwindEnd::NoStackCopy,
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            UnwindEnd::Complete => "complete",
            UnwindEnd::StackCopyTooShort => "stack_copy_too_short",
            UnwindEnd::UnknownModule => "unknown_module",
            UnwindEnd::NoCfi => "no_cfi",
            UnwindEnd::Unsupported => "unsupported_cfi",
            UnwindEnd::BadFrame => "bad_frame",
            UnwindEnd::FrameLimit => "frame_limit",
            UnwindEnd::NoStackCopy => "no_stack_copy",
            UnwindEnd::SamplerFramesOnly => "sampler_frames_only",
            UnwindEnd::Unlearned => "unlearned",
        }
    }

    /// Whether only what the kernel walked is known (no copy applied): such a site may fold
    /// into a fuller one (`report/group.rs`).
    pub fn is_partial(self) -> bool {
        matches!(
            self,
            UnwindEnd::NoStackCopy | UnwindEnd::SamplerFramesOnly | UnwindEnd::Unlearned
        )
    }

    /// Whether the site may hold blocks of several call paths that begin with its frames (its
    /// kernel walk stopped before the id was complete, and no copy showed it to be one path):
    /// it never folds into a fuller site.
    pub fn shares_paths(self) -> bool {
        matches!(self, UnwindEnd::SamplerFramesOnly | UnwindEnd::Unlearned)
    }

    /// Why the stack ends, in words, for the table.
    pub fn describe(self) -> &'static str {
        match self {
            UnwindEnd::SamplerFramesOnly => {
                "sampler_frames_only: sampled before leaktrace had learned to unwind past the \
                 sampler here; its call paths under this Python stack are not told apart"
            }
            UnwindEnd::Unlearned => {
                "unlearned: allocated before leaktrace had learned to unwind past the last frame \
                 shown; the call paths through it under this Python stack are not told apart"
            }
            other => other.name(),
        }
    }
}

/// One unwound native stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeStack {
    /// Return addresses, innermost (the allocation's caller) first.
    pub pcs: Vec<u64>,
    /// Whether each frame is the interpreter's eval loop.
    pub eval: Vec<bool>,
    pub end: UnwindEnd,
}

/// Totals over every unwind of a session, for the report.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct UnwindStats {
    /// New sites whose whole native stack the kernel walked with rows it had been taught: no
    /// stack copy was needed.
    pub kernel_walks: u64,
    /// Stack copies unwound in userspace.
    pub stacks: u64,
    /// Unwinds by how they ended.
    pub ends: BTreeMap<String, u64>,
    pub frames: u64,
    /// Userspace time spent unwinding, in total.
    pub unwind_us: u64,
    /// Bytes of stack copies received.
    pub copy_bytes: u64,
}

/// Unwinds stack copies; keeps every module's CFI it has read.
#[derive(Default)]
pub struct Unwinder {
    /// CFI per process, by the module's path as the process sees it (resolved through its
    /// root).
    modules: HashMap<u32, HashMap<String, Option<ModuleCfi>>>,
    /// Return addresses known to be in the eval loop or not.
    eval: HashMap<(u32, u64), bool>,
    pub stats: UnwindStats,
}

impl Unwinder {
    /// Unwinds process `pid`'s stack copy, whose first frame is the allocation's caller with
    /// registers `regs`. Also returns the rows of the first frames, for the kernel.
    ///
    /// `regs.pc` is a return address (the allocator's caller, after it returned) unless
    /// `at_probe`: then it is the probe site of a heap-sampling USDT, the instruction about to
    /// run, whose own row applies. (A probe's `nop` can be its function's first byte, where the
    /// byte before belongs to another function: that row made the first step fail, so the
    /// kernel could never follow a sampled site past it and every sample on a Python line fell
    /// into one site.)
    pub fn unwind(
        &mut self,
        sym: &mut Symbolizer,
        pid: u32,
        regs: FrameRegs,
        stack: &[u8],
        at_probe: bool,
    ) -> (NativeStack, Vec<(u64, UnwindRow)>) {
        let started = Instant::now();
        let mut out = NativeStack {
            pcs: Vec::new(),
            eval: Vec::new(),
            end: UnwindEnd::FrameLimit,
        };
        let mut rows = Vec::new();
        let mut r = regs;
        let mut past_copy = false;
        let mut read = |addr: u64| -> Option<u64> {
            let off = addr.checked_sub(regs.sp)? as usize;
            match stack.get(off..off + 8) {
                Some(b) => Some(u64::from_le_bytes(b.try_into().ok()?)),
                None => {
                    past_copy = true;
                    None
                }
            }
        };
        while out.pcs.len() < MAX_FRAMES {
            out.pcs.push(r.pc);
            let leaf = at_probe && out.pcs.len() == 1;
            let Some((row, guessed)) = self.row_at(sym, pid, (r.pc, leaf), &mut out, &mut rows)
            else {
                break;
            };
            match row.step(r, &mut read) {
                Some(up) if up.pc == 0 => {
                    out.end = UnwindEnd::Complete;
                    break;
                }
                Some(up) => r = up,
                None => {
                    out.end = if past_copy {
                        UnwindEnd::StackCopyTooShort
                    } else if guessed {
                        UnwindEnd::NoCfi
                    } else {
                        UnwindEnd::BadFrame
                    };
                    break;
                }
            }
        }
        self.count(&out, stack.len(), started);
        (out, rows)
    }

    /// The unwind row for return address `pc` (or, with `at`, for the instruction at `pc`) and
    /// whether it is a frame-pointer guess, or `None` when the walk ends there (`out.end` says
    /// why). Rows found are kept in `rows` to teach the kernel.
    fn row_at(
        &mut self,
        sym: &mut Symbolizer,
        pid: u32,
        (pc, at): (u64, bool),
        out: &mut NativeStack,
        rows: &mut Vec<(u64, UnwindRow)>,
    ) -> Option<(UnwindRow, bool)> {
        let Some(m) = sym.mapping(pid, pc) else {
            out.eval.push(false);
            out.end = UnwindEnd::UnknownModule;
            return None;
        };
        let Some(cfi) = self.module(pid, &m) else {
            out.eval.push(false);
            out.end = UnwindEnd::NoCfi;
            return None;
        };
        // A return address follows its call: the call's own row is at the byte before.
        let back = u64::from(!at);
        let svma = cfi.svma(m.file_offset(pc)).map(|a| a.saturating_sub(back));
        let eval = svma.is_some_and(|a| cfi.is_eval(a));
        out.eval.push(eval);
        let (row, guessed) = match svma.map(|a| cfi.lookup(a)) {
            Some(Lookup::Row(mut row)) => {
                if eval {
                    row.flags |= unwind_flags::STOP;
                }
                rows.push((pc, row));
                (row, false)
            }
            Some(Lookup::Outermost) => {
                rows.push((pc, END_ROW(unwind_flags::OUTERMOST)));
                out.end = UnwindEnd::Complete;
                return None;
            }
            Some(Lookup::Unsupported) => {
                rows.push((pc, END_ROW(unwind_flags::END)));
                out.end = UnwindEnd::Unsupported;
                return None;
            }
            // No CFI: the code may still keep frame pointers.
            Some(Lookup::NoCfi) | None => (UnwindRow::FRAME_POINTER, true),
        };
        Some((row, guessed))
    }

    /// Adds one unwind to the statistics `--verbose` and the report show.
    fn count(&mut self, out: &NativeStack, copy_bytes: usize, started: Instant) {
        let st = &mut self.stats;
        st.stacks += 1;
        *st.ends.entry(out.end.name().to_string()).or_default() += 1;
        st.frames += out.pcs.len() as u64;
        st.copy_bytes += copy_bytes as u64;
        st.unwind_us += started.elapsed().as_micros() as u64;
    }

    /// Which of `pcs` (return addresses of process `pid`) are in the interpreter's eval loop.
    pub fn eval_frames(&mut self, sym: &mut Symbolizer, pid: u32, pcs: &[u64]) -> Vec<bool> {
        pcs.iter().map(|pc| self.is_eval(sym, pid, *pc)).collect()
    }

    fn is_eval(&mut self, sym: &mut Symbolizer, pid: u32, pc: u64) -> bool {
        if let Some(e) = self.eval.get(&(pid, pc)) {
            return *e;
        }
        let Some(m) = sym.mapping(pid, pc) else {
            return false;
        };
        let off = m.file_offset(pc);
        let e = self.module(pid, &m).is_some_and(|cfi| {
            cfi.svma(off)
                .is_some_and(|a| cfi.is_eval(a.saturating_sub(1)))
        });
        self.eval.insert((pid, pc), e);
        e
    }

    fn module(&mut self, pid: u32, m: &Mapping) -> Option<&mut ModuleCfi> {
        let path = m.path.as_str();
        let modules = self.modules.entry(pid).or_default();
        if !modules.contains_key(path) {
            let cfi = ModuleCfi::load(&host_path_of(pid, m))
                .map_err(|e| log::debug!("no CFI for {path}: {e}"))
                .ok();
            modules.insert(path.to_string(), cfi);
        }
        modules.get_mut(path).and_then(|m| m.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site walked only through the sampler's frames is partial, like one whose copy never
    /// came, and the table says what that means.
    #[test]
    fn a_sampler_only_stack_is_partial_and_says_why() {
        assert!(UnwindEnd::SamplerFramesOnly.is_partial() && UnwindEnd::NoStackCopy.is_partial());
        assert!(!UnwindEnd::Complete.is_partial() && !UnwindEnd::StackCopyTooShort.is_partial());
        assert!(UnwindEnd::SamplerFramesOnly
            .describe()
            .starts_with("sampler_frames_only: sampled before"));
        assert_eq!(UnwindEnd::NoStackCopy.describe(), "no_stack_copy");
        let json = serde_json::to_string(&UnwindEnd::SamplerFramesOnly).unwrap();
        assert_eq!(json, "\"sampler_frames_only\"");
    }

    /// A site whose id the kernel cut at an untaught frame shares its paths, says so, and
    /// keeps its name through JSON (captures store it).
    #[test]
    fn an_unlearned_stack_shares_its_paths_and_round_trips() {
        assert!(UnwindEnd::Unlearned.is_partial() && UnwindEnd::Unlearned.shares_paths());
        assert!(UnwindEnd::SamplerFramesOnly.shares_paths());
        assert!(!UnwindEnd::NoStackCopy.shares_paths() && !UnwindEnd::Complete.shares_paths());
        assert!(UnwindEnd::Unlearned
            .describe()
            .starts_with("unlearned: allocated before"));
        let json = serde_json::to_string(&UnwindEnd::Unlearned).unwrap();
        assert_eq!(json, "\"unlearned\"");
        assert_eq!(
            serde_json::from_str::<UnwindEnd>(&json).unwrap(),
            UnwindEnd::Unlearned
        );
    }

    /// Copies this thread's stack and unwinds it from a known frame: the unwind must pass
    /// through the test's callers (its own stack is real, built without frame pointers).
    #[test]
    #[inline(never)]
    fn unwinds_this_threads_own_stack() {
        let (regs, copy) = capture();
        let mut sym = Symbolizer::new();
        let mut u = Unwinder::default();
        let (stack, rows) = u.unwind(&mut sym, std::process::id(), regs, &copy, false);
        assert!(stack.pcs.len() >= 3, "{stack:?}");
        assert!(!rows.is_empty());
        let names: Vec<String> = stack
            .pcs
            .iter()
            .map(|pc| {
                let mut f = sym.return_address(std::process::id(), *pc);
                sym.resolve(std::process::id(), &mut f);
                f.function.as_deref().unwrap_or_default().to_string()
            })
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("unwinds_this_threads_own_stack")),
            "{names:?}"
        );
        // The test harness started this thread: the unwind reaches its entry or the copy's end.
        assert!(
            matches!(
                stack.end,
                UnwindEnd::Complete | UnwindEnd::StackCopyTooShort
            ),
            "{:?} after {names:?}",
            stack.end
        );
    }

    /// The registers of a frame whose return address is in this test function, and the stack
    /// above it, as the kernel would send them.
    #[inline(never)]
    fn capture() -> (FrameRegs, Vec<u8>) {
        let (sp, bp): (u64, u64);
        // SAFETY: reads two registers.
        unsafe {
            std::arch::asm!("mov {}, rsp", "mov {}, rbp", out(reg) sp, out(reg) bp);
        }
        // Our caller's frame starts where our own return address sits: find it by scanning for
        // an address inside the caller.
        let caller = unwinds_this_threads_own_stack as *const () as usize as u64;
        let len = 256 << 10;
        // SAFETY: the live stack above `sp` is readable up to its top; copy what fits.
        let copy = read_own(sp, len);
        let words = copy
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        for (i, w) in words.enumerate() {
            if w > caller && w < caller + 4096 {
                let ra_at = sp + 8 * i as u64;
                let regs = FrameRegs {
                    pc: w,
                    sp: ra_at + 8,
                    bp,
                };
                return (regs, copy[(8 * i + 8)..].to_vec());
            }
        }
        panic!("no return address into the caller found");
    }

    fn read_own(sp: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let local = [std::io::IoSliceMut::new(&mut out)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: sp as usize,
            len,
        }];
        let pid = nix::unistd::Pid::this();
        let n = nix::sys::uio::process_vm_readv(pid, &mut { local }, &remote).unwrap_or(0);
        out.truncate(n & !7);
        out
    }
}
