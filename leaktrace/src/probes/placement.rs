//! Where inside an allocator function to put its probe.
//!
//! A uprobe replaces one instruction with `int3`. After the handler runs, the kernel must execute
//! the displaced instruction: a few it *emulates* (x86 `push reg`, `nop`, and relative jumps,
//! conditional jumps and calls — `arch/x86/kernel/uprobes.c`, `branch_setup_xol_ops`), everything
//! else it *single-steps* out of line, which costs a second trap. Measured here: libc `free`+0
//! (`test`, single-stepped) ≈17 µs per hit, `free`+9 (`push`, emulated) ≈0.5 µs. So the probe
//! goes on the first emulated instruction that every call still passes through with the argument
//! registers and the return address intact:
//! - the instructions skipped may not write an argument register the probe reads, nor `rsp`, nor
//!   memory through `rsp` (the return probe hijacks the return address at `[rsp]`, and the
//!   entry probe reads the caller from there);
//! - no branch may be skipped — except a free's own `test ptr,ptr; je`, since free(NULL) frees
//!   nothing. A branch may be the probe point itself: the handler runs before it is taken, and
//!   glibc 2.42's `malloc` and `free` begin with `test rdi,rdi` and a conditional jump, with no
//!   `push` before their first branch;
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
/// Branches count only without prefixes: the kernel refuses the operand-size override (`0x66`),
/// and a byte match cannot tell the others apart from the start of another instruction.
pub fn is_emulated(code: &[u8]) -> bool {
    match code {
        // push r64, and push r8–r15 with a bare REX.B prefix.
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => true,
        // nop
        [0x90, ..] => true,
        // jcc rel8, call rel32, jmp rel32, jmp rel8, and jcc rel32.
        [0x70..=0x7f, ..] | [0xe8 | 0xe9 | 0xeb, ..] | [0x0f, 0x80..=0x8f, ..] => true,
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
/// the rules in the module docs. A free's NULL check is passed over when a later point qualifies,
/// so that free(NULL) does not trap; otherwise its (emulated) jump is the point.
fn scan(code: &[u8], ip: u64, func: AllocFn) -> Option<u64> {
    let first = func.first_arg();
    let needed = &ARG_REGS[first..first + arg_count(func.shape())];
    let ptr_reg = ARG_REGS[func.ptr_arg()];
    let window = &code[..code.len().min(SCAN_BYTES)];
    let mut decoder = Decoder::with_ip(64, window, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut prev: Option<Instruction> = None;
    let mut null_check: Option<u64> = None;
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return null_check;
        }
        let offset = instr.ip() - ip;
        let skips_null = func.null_is_noop()
            && instr.flow_control() == FlowControl::ConditionalBranch
            && matches!(instr.mnemonic(), Mnemonic::Je)
            && prev.is_some_and(|p| tests_register(&p, ptr_reg));
        let emulated = is_emulated(&code[offset as usize..]);
        if skips_null {
            if emulated {
                null_check.get_or_insert(offset);
            }
        } else if emulated {
            return Some(offset);
        } else if instr.flow_control() != FlowControl::Next {
            return null_check;
        }
        if writes_guarded_state(&mut info, &instr, needed) {
            return null_check;
        }
        prev = Some(instr);
    }
    null_check
}

/// Whether `instr` writes an argument register in `needed`, `rsp`, or memory through `rsp`.
fn writes_guarded_state(
    info: &mut InstructionInfoFactory,
    instr: &Instruction,
    needed: &[Register],
) -> bool {
    let used = info.info(instr);
    let reg_write = used.used_registers().iter().any(|r| {
        let writes = !matches!(
            r.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
        );
        let full = r.register().full_register();
        writes && (full == Register::RSP || needed.contains(&full))
    });
    let stack_write = used.used_memory().iter().any(|m| {
        matches!(
            m.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) && m.base().full_register() == Register::RSP
    });
    reg_write || stack_write
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
        // For malloc the je is a real branch: the probe goes on it (emulated), not past it.
        let malloc = choose(&code, 0x1000, AllocFn::Malloc);
        assert_eq!((malloc.offset, malloc.emulated), (3, true));
        // A je after a test of another register is a real branch, for free too.
        let other = [0x48, 0x85, 0xf6, 0x74, 0x10, 0x55];
        assert_eq!(choose(&other, 0x1000, AllocFn::Free).offset, 3);
    }

    #[test]
    fn a_null_check_with_nothing_cheaper_after_it_is_the_point() {
        // test %rdi,%rdi; je +0x10; mov %rdi,%rax; ret
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89, 0xf8, 0xc3];
        let p = choose(&code, 0x1000, AllocFn::Free);
        assert_eq!((p.offset, p.emulated), (3, true));
    }

    #[test]
    fn glibc_2_42_entries_are_probed_on_their_first_jump() {
        // malloc: test %rdi,%rdi; js +0x50; lea 0x17(%rdi),%rax
        let malloc = [0x48, 0x85, 0xff, 0x78, 0x50, 0x48, 0x8d, 0x47, 0x17];
        let p = choose(&malloc, 0x1000, AllocFn::Malloc);
        assert_eq!((p.offset, p.emulated), (3, true));
        // free: test %rdi,%rdi; je rel32; test $0xf,%dil; jne rel32 — past the NULL check.
        let free = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xe7, 0, 0, 0, 0x40, 0xf6, 0xc7, 0x0f, 0x0f, 0x85, 0xcd,
            0, 0, 0,
        ];
        let p = choose(&free, 0x1000, AllocFn::Free);
        assert_eq!((p.offset, p.emulated), (13, true));
        // A prefixed branch is single-stepped by the kernel: not a point.
        assert!(!is_emulated(&[0x66, 0xe9, 0, 0]));
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

    /// Debian sid's glibc 2.42 (the libc `cargo xtask setup` unpacks beside its python3.14):
    /// `malloc` and `free` open with a test and a conditional jump and no `push` before it, which
    /// left every probe single-stepped at +0 before jumps counted as points.
    #[test]
    fn glibc_2_42_placements() {
        let py = crate::test_support::debian_python314();
        let libc = py
            .ancestors()
            .nth(3)
            .unwrap()
            .join("usr/lib/x86_64-linux-gnu/libc.so.6");
        let elf = ElfFile::open(&libc).unwrap();
        for f in [
            AllocFn::Malloc,
            AllocFn::Calloc,
            AllocFn::Realloc,
            AllocFn::Free,
        ] {
            let p = place(&elf, f).expect("libc exports it");
            assert!(p.emulated, "{f:?}: {p:?}");
        }
        assert!(
            place(&elf, AllocFn::Free).unwrap().offset > 3,
            "past free's NULL check"
        );
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
