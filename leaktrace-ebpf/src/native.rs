//! The native-stack part of the ABI: the unwind rows userspace derives from a module's CFI, the
//! one step both sides take with them, and the stack copy sent for each new site.
//!
//! The kernel walks a site's native frames only as far as rows are known, to give each call
//! path its own site id; userspace learns the rows (from `.eh_frame`/`.debug_frame`) from the
//! stack copy of every new site and unwinds that copy fully with the same step.

/// Native return addresses the kernel folds into a site id at most.
pub const MAX_NATIVE_FRAMES: usize = 16;

/// Native return addresses the kernel records for a new site, when it knows the rows to follow
/// them: with every row learned, a new site needs no stack copy at all.
pub const MAX_NATIVE_WALK: usize = 128;

/// Largest user-stack copy a new site can carry (`--stack-copy`).
pub const MAX_STACK_COPY: usize = 1 << 16;

/// Ring-buffer record kind: the user-stack copy of a new site.
pub const EVENT_STACK: u32 = 3;

/// The canonical frame address is `rsp + cfa_off`.
pub const CFA_SP: u8 = 0;
/// The canonical frame address is `rbp + cfa_off` (a function that keeps a frame pointer).
pub const CFA_BP: u8 = 1;

/// Flags of an `UnwindRow`.
pub mod unwind_flags {
    /// The frame belongs to the interpreter's eval loop: the kernel stops folding native frames
    /// into the site id here, since the Python frames identify the path from there on.
    pub const STOP: u8 = 1;
    /// The outermost frame (its caller's return address is undefined): the stack is whole.
    pub const OUTERMOST: u8 = 2;
    /// CFI no row can follow (a signal frame): the walk ends, and a copy would not help.
    pub const END: u8 = 4;
}

/// How the kernel's walk of a new site's native stack ended (`NewSiteEvent::native_end`).
pub mod native_end {
    /// At a return address userspace has not taught: the site's stack copy follows.
    pub const UNKNOWN: u8 = 0;
    /// At the outermost frame: `native` is the whole stack.
    pub const COMPLETE: u8 = 1;
    /// `MAX_NATIVE_WALK` frames recorded.
    pub const LIMIT: u8 = 2;
    /// Reading the stack failed.
    pub const READ_ERROR: u8 = 3;
    /// At CFI no row can follow.
    pub const UNSUPPORTED: u8 = 4;
}

/// Key of `UNWIND`: a return address in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindKey {
    pub tgid: u32,
    pub _pad: u32,
    pub pc: u64,
}

/// How to find the caller of the frame a return address points into: the CFI row at that
/// address, reduced to what x86-64 code needs (rsp/rbp-based CFA, return address at CFA−8,
/// rbp saved at a CFA offset or untouched).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    pub cfa_off: i32,
    /// Where the caller's rbp is saved, relative to the CFA; 0 when rbp is unchanged.
    pub bp_off: i16,
    /// `CFA_SP` or `CFA_BP`.
    pub cfa_reg: u8,
    /// `unwind_flags`.
    pub flags: u8,
}

/// Registers of one frame during an unwind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameRegs {
    /// A return address (the frame's resume point), or the pc of the first frame.
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
}

impl UnwindRow {
    /// The rule of code that keeps a frame pointer: `push rbp; mov rbp, rsp`.
    pub const FRAME_POINTER: UnwindRow = UnwindRow {
        cfa_off: 16,
        bp_off: -16,
        cfa_reg: CFA_BP,
        flags: 0,
    };

    /// The caller's registers, reading the stack through `read`; `None` when a read fails or
    /// the result cannot be a caller (a stack only grows down).
    #[inline(always)]
    pub fn step(
        &self,
        r: FrameRegs,
        mut read: impl FnMut(u64) -> Option<u64>,
    ) -> Option<FrameRegs> {
        let base = if self.cfa_reg == CFA_BP { r.bp } else { r.sp };
        let cfa = base.wrapping_add(self.cfa_off as i64 as u64);
        if cfa <= r.sp {
            return None;
        }
        let pc = read(cfa - 8)?;
        let bp = if self.bp_off != 0 {
            read(cfa.wrapping_add(self.bp_off as i64 as u64))?
        } else {
            r.bp
        };
        Some(FrameRegs { pc, sp: cfa, bp })
    }
}

/// The user-stack copy of a new site, taken at the outermost allocator's return: `pc` is the
/// allocation's return address, `sp` and `bp` the caller's registers, and `data` the `len`
/// bytes from `sp` up (the record carries only those).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackEvent {
    pub kind: u32,
    pub tgid: u32,
    pub site_id: u64,
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes copied (a shorter copy than asked for when the stack ends sooner).
    pub len: u32,
    /// Bytes asked for (`--stack-copy`).
    pub wanted: u32,
    pub data: [u8; MAX_STACK_COPY],
}

/// Bytes of a `StackEvent` before `data`.
pub const STACK_EVENT_HEADER: usize = core::mem::offset_of!(StackEvent, data);
