//! Where inside an allocator function to put its probe.
//!
//! A uprobe replaces one instruction with `int3`. After the handler runs, the kernel must execute
//! the displaced instruction: a few it *emulates* (x86 `push reg`, `nop`, relative jumps and
//! calls — `arch/x86/kernel/uprobes.c`), everything else it *single-steps* out of line, which
//! costs a second trap. Measured here: libc `free`+0 (`test`, single-stepped) ≈17 µs per hit,
//! `free`+9 (`push`, emulated) ≈0.5 µs. So the probe goes on the first emulated instruction that
//! every call still passes through with the argument registers and the return address intact:
//! - the instructions skipped may not write an argument register the probe reads, nor `rsp`, nor
//!   memory through `rsp` (the return probe hijacks the return address at `[rsp]`, and the
//!   entry probe reads the caller from there);
//! - no branch may be skipped — except a free's own `test ptr,ptr; je`, since free(NULL) frees
//!   nothing;
//! - no branch in the function may land inside the skipped range or on the probe, or the probe
//!   would fire twice (or never) for one call.
//!
//! When no such instruction exists the probe stays at +0.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};
use leaktrace_ebpf::{AllocFn, Shape};

/// How far into a function the chooser looks for a cheaper probe point.
const SCAN_BYTES: usize = 64;

/// The chosen probe offset and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    /// Byte offset from the function's start.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (cheap) or single-steps it.
    pub emulated: bool,
    /// The instruction at the probe, for `--verbose`.
    pub instruction: String,
}

const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

fn arg_count(shape: Shape) -> usize {
    match shape {
        Shape::Malloc | Shape::Free => 1,
        Shape::Calloc | Shape::Realloc | Shape::Memalign => 2,
        Shape::ReallocArray | Shape::PosixMemalign => 3,
    }
}

/// Whether the kernel emulates the instruction starting at `code` instead of single-stepping it.
pub fn is_emulated(code: &[u8]) -> bool {
    match code {
        // push r64, and push r8–r15 with a bare REX.B prefix.
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => true,
        // nop
        [0x90, ..] => true,
        _ => false,
    }
}

/// Chooses the probe offset in `code`, the function's bytes starting at `ip`.
pub fn choose(code: &[u8], ip: u64, func: AllocFn) -> Placement {
    let at = |offset: u64| Placement {
        offset,
        emulated: is_emulated(&code[offset as usize..]),
        instruction: disassemble_one(&code[offset as usize..], ip + offset),
    };
    if code.is_empty() {
        return Placement {
            offset: 0,
            emulated: false,
            instruction: String::new(),
        };
    }
    let Some(candidate) = scan(code, ip, func) else {
        return at(0);
    };
    if candidate != 0 && branch_lands_in(code, ip, 1..=candidate) {
        return at(0);
    }
    at(candidate)
}

/// Walks the first instructions; returns the offset of the first emulated one reachable under
/// the rules in the module docs.
fn scan(code: &[u8], ip: u64, func: AllocFn) -> Option<u64> {
    let first = func.first_arg();
    let needed = &ARG_REGS[first..first + arg_count(func.shape())];
    let ptr_reg = ARG_REGS[func.ptr_arg()];
    let window = &code[..code.len().min(SCAN_BYTES)];
    let mut decoder = Decoder::with_ip(64, window, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut prev: Option<Instruction> = None;
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return None;
        }
        let offset = instr.ip() - ip;
        if is_emulated(&code[offset as usize..]) {
            return Some(offset);
        }
        match instr.flow_control() {
            FlowControl::Next => {}
            FlowControl::ConditionalBranch
                if func.null_is_noop()
                    && matches!(instr.mnemonic(), Mnemonic::Je)
                    && prev.is_some_and(|p| tests_register(&p, ptr_reg)) => {}
            _ => return None,
        }
        let used = info.info(&instr);
        for r in used.used_registers() {
            let writes = !matches!(
                r.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
            );
            let full = r.register().full_register();
            if writes && (full == Register::RSP || needed.contains(&full)) {
                return None;
            }
        }
        for m in used.used_memory() {
            let writes = matches!(
                m.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            if writes && m.base().full_register() == Register::RSP {
                return None;
            }
        }
        prev = Some(instr);
    }
    None
}

fn tests_register(i: &Instruction, reg: Register) -> bool {
    i.mnemonic() == Mnemonic::Test
        && i.op_count() == 2
        && i.op0_kind() == OpKind::Register
        && i.op1_kind() == OpKind::Register
        && i.op0_register() == reg
        && i.op1_register() == reg
}

/// Whether any direct branch or call in the function targets an offset in `range`.
fn branch_lands_in(code: &[u8], ip: u64, range: std::ops::RangeInclusive<u64>) -> bool {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if matches!(
            instr.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            let target = instr.near_branch_target();
            if target >= ip && range.contains(&(target - ip)) {
                return true;
            }
        }
    }
    false
}

fn disassemble_one(code: &[u8], ip: u64) -> String {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    if !decoder.can_decode() {
        return String::new();
    }
    format!("{}", decoder.decode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::elf::ElfFile;
    use std::path::Path;

    fn place(elf: &ElfFile, func: AllocFn) -> Option<Placement> {
        let syms = elf.functions(&[func.symbol()]).unwrap();
        let s = syms.get(func.symbol())?;
        let code = elf.bytes_at(s.vaddr, s.size.max(16)).unwrap();
        Some(choose(&code, s.vaddr, func))
    }

    #[test]
    fn push_at_entry_is_kept() {
        // push %r12; push %rbp; mov %rdi,%rbx
        let p = choose(
            &[0x41, 0x54, 0x55, 0x48, 0x89, 0xfb],
            0x1000,
            AllocFn::Malloc,
        );
        assert_eq!((p.offset, p.emulated), (0, true));
    }

    #[test]
    fn skips_lea_that_keeps_arguments() {
        // _PyObject_Malloc: lea -0x1(%rsi),%rax; push %rbx
        let p = choose(
            &[0x48, 0x8d, 0x46, 0xff, 0x53],
            0x1000,
            AllocFn::PyObjectMallocImpl,
        );
        assert_eq!((p.offset, p.emulated), (4, true));
    }

    #[test]
    fn stops_when_the_size_register_is_overwritten() {
        // mov %rsi,%rdi (writes rdi = malloc's size); push %rbx
        let p = choose(&[0x48, 0x89, 0xf7, 0x53], 0x1000, AllocFn::Malloc);
        assert_eq!(p.offset, 0);
        assert!(!p.emulated);
    }

    #[test]
    fn stops_at_stack_pointer_changes() {
        // sub $0x18,%rsp; push %rbx
        let p = choose(&[0x48, 0x83, 0xec, 0x18, 0x53], 0x1000, AllocFn::Malloc);
        assert_eq!(p.offset, 0);
    }

    #[test]
    fn free_may_skip_its_null_check_but_malloc_may_not() {
        // test %rdi,%rdi; je +0x10; push %rbp
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x55];
        assert_eq!(choose(&code, 0x1000, AllocFn::Free).offset, 5);
        assert_eq!(choose(&code, 0x1000, AllocFn::Malloc).offset, 0);
        // A je after a test of another register is a real branch.
        let other = [0x48, 0x85, 0xf6, 0x74, 0x10, 0x55];
        assert_eq!(choose(&other, 0x1000, AllocFn::Free).offset, 0);
    }

    #[test]
    fn refuses_a_point_that_a_branch_lands_on() {
        // lea -0x1(%rsi),%rax; push %rbx; jmp back to the push (offset 4)
        let code = [0x48, 0x8d, 0x46, 0xff, 0x53, 0xeb, 0xfd];
        assert_eq!(choose(&code, 0x1000, AllocFn::PyObjectMallocImpl).offset, 0);
    }

    fn system_libc() -> Option<ElfFile> {
        [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(|p| ElfFile::open(p).unwrap())
    }

    /// On the real libc every probe lands on an emulated instruction or on +0, and never on a
    /// point that would miss the arguments. Debian 12's glibc 2.36: `free` after its NULL check.
    #[test]
    fn real_libc_placements() {
        let elf = system_libc().expect("libc");
        for f in AllocFn::ALL
            .iter()
            .filter(|f| f.family() == leaktrace_ebpf::Family::Libc)
        {
            let Some(p) = place(&elf, *f) else { continue };
            assert!(p.offset == 0 || p.emulated, "{f:?}: {p:?}");
            assert!(p.offset < SCAN_BYTES as u64);
        }
        let free = place(&elf, AllocFn::Free).unwrap();
        assert!(
            free.emulated,
            "free should be probed past its NULL check: {free:?}"
        );
        assert!(free.offset > 0);
        let malloc = place(&elf, AllocFn::Malloc).unwrap();
        assert!(malloc.emulated, "{malloc:?}");
    }

    /// pyenv's 3.11 libpython keeps `.symtab`: `_PyObject_Malloc` starts with `lea` and
    /// `_PyObject_Free` with `test`; both get a later, emulated probe point.
    #[test]
    fn real_libpython_placements() {
        let home = std::env::var("HOME").unwrap_or_default();
        let lib = Path::new(&home).join(".pyenv/versions/3.11.7/lib/libpython3.11.so.1.0");
        if !lib.exists() {
            eprintln!("skipping: {} not present", lib.display());
            return;
        }
        let elf = ElfFile::open(&lib).unwrap();
        for f in [
            AllocFn::PyObjectMallocImpl,
            AllocFn::PyObjectCallocImpl,
            AllocFn::PyObjectReallocImpl,
            AllocFn::PyObjectFreeImpl,
        ] {
            let p = place(&elf, f).expect("symbol in .symtab");
            assert!(p.emulated, "{f:?}: {p:?}");
        }
        assert!(place(&elf, AllocFn::PyObjectMallocImpl).unwrap().offset > 0);
        assert!(place(&elf, AllocFn::PyObjectFreeImpl).unwrap().offset > 0);
    }
}
