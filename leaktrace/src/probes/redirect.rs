//! `attach --redirect-pymalloc`: every Python allocation of a stripped, LTO-built interpreter
//! seen without a restart.
//!
//! Such an interpreter copies pymalloc's fast path into its callers, each guarded by "is the
//! allocator table's malloc slot still pymalloc's own function?". Pointing the object and mem
//! tables' *malloc* and *calloc* slots at the raw allocator's functions makes every guard fail,
//! so every allocation goes through the table to libc's malloc, which is probed. *realloc* and
//! *free* stay pymalloc's: they hand addresses pymalloc did not allocate to the raw allocator, so
//! blocks from before and after the switch are freed correctly. shared/DESIGN.md records the
//! measurements behind this (CPython's own tests pass with the switch flipped mid-run); the
//! slots are put back when the session ends.
//!
//! Without symbols, the tables are found in the code of the exported `PyMem_RawMalloc`,
//! `PyMem_Malloc` and `PyObject_Malloc`: each loads its table's malloc slot (RIP-relative) and
//! compares it with its default function. The tables are checked in the target before anything
//! is written (no hooks, no `PYTHONMALLOC`, tracemalloc not started); anything else is refused.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::error::{Error, Result};
use crate::process::elf::ElfFile;
use crate::process::remote::{word, Remote};

/// `PyMemAllocatorEx`: ctx, malloc, calloc, realloc, free; 8 bytes each.
const SLOTS: usize = 5;
const MALLOC: usize = 1;
const CALLOC: usize = 2;
const REALLOC: usize = 3;
const FREE: usize = 4;
/// Bytes of each exported function read for its table load and compare.
const SCAN: u64 = 64;

/// One allocator table in the target: where it is and what it held.
#[derive(Clone, Copy, Debug)]
struct Table {
    /// Runtime address of its `ctx` slot.
    at: u64,
    slots: [u64; SLOTS],
}

/// The tables of one process, checked and ready to be switched (`apply`).
#[derive(Clone, Debug)]
pub struct Redirect {
    pid: u32,
    /// (slot address, pymalloc's value, the raw allocator's value).
    writes: Vec<(u64, u64, u64)>,
    /// pymalloc's malloc, calloc, realloc and free, as file virtual addresses: still called
    /// directly by a few paths (realloc of a NULL block), so they are probed too.
    pub pymalloc: [u64; 4],
}

/// A redirect in force; dropping it (or `restore`) puts pymalloc's functions back.
#[derive(Debug)]
pub struct Applied {
    pid: u32,
    writes: Vec<(u64, u64, u64)>,
}

/// Finds and checks the allocator tables of the interpreter in `elf`, mapped in `pid` with
/// `bias` added to its virtual addresses.
pub fn find(pid: u32, elf: &ElfFile, bias: u64) -> Result<Redirect> {
    let refuse = |why: String| Error::Usage(format!("--redirect-pymalloc: {why}"));
    // One read of the symbol tables for the three entry points and the two defaults.
    let syms = elf
        .functions(&[
            "PyMem_RawMalloc",
            "PyMem_Malloc",
            "PyObject_Malloc",
            "_PyMem_RawMalloc",
            "_PyObject_Malloc",
        ])
        .unwrap_or_default();
    let [raw, mem, obj] = [
        ("PyMem_RawMalloc", "_PyMem_RawMalloc"),
        ("PyMem_Malloc", "_PyObject_Malloc"),
        ("PyObject_Malloc", "_PyObject_Malloc"),
    ]
    .map(|(entry, default)| {
        let default = syms.get(default).map(|f| f.vaddr);
        locate(pid, elf, bias, syms.get(entry)?.vaddr, default)
    });
    let (Some(raw), Some(mem), Some(obj)) = (raw, mem, obj) else {
        return Err(refuse(
            "the allocator tables were not found in the code of PyMem_RawMalloc, PyMem_Malloc and \
             PyObject_Malloc"
                .into(),
        ));
    };
    let read = |(at, default): (u64, u64)| -> Result<(Table, u64)> {
        read_table(pid, at)
            .map(|slots| (Table { at, slots }, default))
            .ok_or_else(|| refuse(format!("cannot read the allocator table at {at:#x}")))
    };
    let ((raw_t, raw_default), (mem_t, _), (obj_t, pymalloc)) =
        (read(raw)?, read(mem)?, read(obj)?);
    if raw_t.slots[MALLOC] != raw_default || raw_t.slots[0] != 0 {
        return Err(refuse(
            "the raw allocator is hooked (tracemalloc, PYTHONMALLOC=debug or -X dev)".into(),
        ));
    }
    if obj_t.slots[MALLOC] != pymalloc || mem_t.slots[MALLOC] != pymalloc {
        return Err(refuse(format!(
            "the object allocator is not pymalloc's (PYTHONMALLOC={}, or hooked): nothing to \
             redirect",
            if obj_t.slots[MALLOC] == raw_t.slots[MALLOC] {
                "malloc: every allocation already reaches libc"
            } else {
                "debug, tracemalloc or another hook"
            }
        )));
    }
    if obj_t.slots != mem_t.slots || obj_t.slots[0] != 0 {
        return Err(refuse(
            "the mem and object tables differ: not the layout the redirect was proven on".into(),
        ));
    }
    let mut writes = Vec::new();
    for t in [obj_t, mem_t] {
        for slot in [MALLOC, CALLOC] {
            writes.push((t.at + 8 * slot as u64, t.slots[slot], raw_t.slots[slot]));
        }
    }
    let fns = [MALLOC, CALLOC, REALLOC, FREE].map(|s| obj_t.slots[s].wrapping_sub(bias));
    Ok(Redirect {
        pid,
        writes,
        pymalloc: fns,
    })
}

impl Redirect {
    /// Points the malloc and calloc slots at the raw allocator. Each slot is one aligned 8-byte
    /// write; a slot that no longer holds pymalloc's value (the program changed its allocator
    /// since the check) stops the redirect, and what was written is put back.
    pub fn apply(&self) -> Result<Applied> {
        let mut done = Applied {
            pid: self.pid,
            writes: Vec::new(),
        };
        let mem = Remote { pid: self.pid };
        for &(at, pymalloc, raw) in &self.writes {
            if mem.u64(at) != Some(pymalloc) {
                return Err(Error::Usage(format!(
                    "--redirect-pymalloc: the allocator slot at {at:#x} changed while attaching"
                )));
            }
            write_word(self.pid, at, raw)?;
            done.writes.push((at, pymalloc, raw));
        }
        Ok(done)
    }
}

impl Applied {
    /// Puts pymalloc's functions back where a slot still holds what `apply` wrote. Returns how
    /// many slots could not be (the program changed them since, or it is gone).
    pub fn restore(&mut self) -> usize {
        let mem = Remote { pid: self.pid };
        let mut left = 0;
        for (at, pymalloc, raw) in std::mem::take(&mut self.writes) {
            let restored = mem.u64(at) == Some(raw) && write_word(self.pid, at, pymalloc).is_ok();
            left += usize::from(!restored);
        }
        left
    }

    /// The slots rewritten: (address, pymalloc's value, the raw allocator's value).
    pub fn slots(&self) -> &[(u64, u64, u64)] {
        &self.writes
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The runtime address of the table the exported allocator entry point at file virtual address
/// `entry` calls through, and the runtime address of the function its malloc slot holds by
/// default (`default`, from the symbol table, is needed only for the second shape).
///
/// Two shapes are known. An LTO build inlines pymalloc behind a guard that compares the slot
/// with pymalloc's function (`guarded_slot`: both come from the code). Otherwise the entry point
/// tail-calls through the slot (`jump_slot`), and the default function is the one the symbol
/// table names: `_PyMem_RawMalloc` for the raw table, `_PyObject_Malloc` for the others.
fn locate(
    pid: u32,
    elf: &ElfFile,
    bias: u64,
    entry: u64,
    default: Option<u64>,
) -> Option<(u64, u64)> {
    let code = elf.bytes_at(entry, SCAN)?;
    // Addresses from the code and the target's memory: checked, never trusted to fit.
    if let Some((slot, f)) = guarded_slot(&code, entry) {
        return Some((
            slot.checked_sub(8)?.checked_add(bias)?,
            f.checked_add(bias)?,
        ));
    }
    let slot = match jump_slot(&code, entry)? {
        Slot::Direct(vaddr) => vaddr.checked_add(bias)?,
        Slot::Through { pointer, disp } => Remote { pid }
            .u64(pointer.checked_add(bias)?)?
            .checked_add(disp)?,
    };
    Some((slot.checked_sub(8)?, default?.checked_add(bias)?))
}

/// Where a tail call through an allocator slot finds the slot.
#[derive(Debug, PartialEq)]
enum Slot {
    /// At this file virtual address (`jmp [rip+X]`: the table is a global, 3.11).
    Direct(u64),
    /// `disp` bytes past the address stored at file virtual address `pointer` (`mov rax,
    /// [rip+GOT]; jmp [rax+disp]`: the table is inside `_PyRuntime`, 3.12+).
    Through { pointer: u64, disp: u64 },
}

/// In the first instructions of an exported allocator entry point: the slot it jumps (or
/// calls) through.
fn jump_slot(code: &[u8], ip: u64) -> Option<Slot> {
    let mut loads: Vec<(Register, u64)> = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut i = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut i);
        let mnemonic = i.mnemonic();
        if mnemonic == Mnemonic::Mov
            && i.op_count() == 2
            && i.op0_kind() == OpKind::Register
            && i.op0_register().size() == 8
            && i.op1_kind() == OpKind::Memory
            && i.is_ip_rel_memory_operand()
        {
            loads.push((i.op0_register(), i.ip_rel_memory_address()));
        }
        if matches!(mnemonic, Mnemonic::Jmp | Mnemonic::Call) && i.op0_kind() == OpKind::Memory {
            if i.is_ip_rel_memory_operand() {
                return Some(Slot::Direct(i.ip_rel_memory_address()));
            }
            let base = i.memory_base();
            let pointer = loads.iter().rev().find(|l| l.0 == base)?.1;
            if i.memory_index() != Register::None {
                return None;
            }
            return Some(Slot::Through {
                pointer,
                disp: i.memory_displacement64(),
            });
        }
        if i.is_invalid() || mnemonic == Mnemonic::Ret || mnemonic == Mnemonic::Jmp {
            break;
        }
    }
    None
}

/// In the first instructions of an exported allocator entry point: the table slot it loads
/// (RIP-relative, 8 bytes) and the function it compares the loaded value with (an immediate in
/// a non-PIE executable, a RIP-relative `lea` in a shared library).
fn guarded_slot(code: &[u8], ip: u64) -> Option<(u64, u64)> {
    let mut loads: Vec<(Register, u64)> = Vec::new();
    let mut leas: Vec<(Register, u64)> = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut i = Instruction::default();
    let known = |v: &[(Register, u64)], r: Register| v.iter().rev().find(|x| x.0 == r).map(|x| x.1);
    while decoder.can_decode() {
        decoder.decode_out(&mut i);
        let rip_rel = i.op_count() == 2
            && i.op1_kind() == OpKind::Memory
            && i.is_ip_rel_memory_operand()
            && i.op0_kind() == OpKind::Register
            && i.op0_register().size() == 8;
        match i.mnemonic() {
            Mnemonic::Mov if rip_rel => loads.push((i.op0_register(), i.ip_rel_memory_address())),
            Mnemonic::Lea if rip_rel => leas.push((i.op0_register(), i.ip_rel_memory_address())),
            Mnemonic::Cmp if i.op0_kind() == OpKind::Register => {
                let reg = i.op0_register();
                let value = match i.op1_kind() {
                    OpKind::Immediate32to64 => Some(i.immediate32to64() as u64),
                    OpKind::Immediate32 => Some(u64::from(i.immediate32())),
                    OpKind::Register => known(&leas, i.op1_register()),
                    _ => None,
                };
                if let (Some(slot), Some(f)) = (known(&loads, reg), value) {
                    return Some((slot, f));
                }
            }
            _ => {}
        }
        if i.is_invalid() || i.mnemonic() == Mnemonic::Ret || i.mnemonic() == Mnemonic::Jmp {
            break;
        }
    }
    None
}

/// The allocator table (`SLOTS` words) at `at` in process `pid`.
fn read_table(pid: u32, at: u64) -> Option<[u64; SLOTS]> {
    let raw = Remote { pid }.read(at, 8 * SLOTS)?;
    let mut slots = [0u64; SLOTS];
    for (k, slot) in slots.iter_mut().enumerate() {
        *slot = word(&raw, 8 * k as u64)?;
    }
    Some(slots)
}

/// One aligned 8-byte write into process `pid`: the kernel copies it with one store, so the
/// program's threads see the old value or the new one (shared/DESIGN.md: no torn value in 5 M
/// writes).
fn write_word(pid: u32, at: u64, value: u64) -> Result<()> {
    Remote { pid }.write(at, &value.to_le_bytes()).map_err(|e| {
        Error::Internal(format!(
            "--redirect-pymalloc: cannot write the allocator slot at {at:#x} of process {pid}: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry of Debian 12's python3.11 `PyObject_Malloc` (non-PIE: the compare takes an
    /// immediate).
    #[test]
    fn finds_the_slot_and_function_of_a_non_pie_guard() {
        let ip = 0x4fb350;
        let code = [
            0x53, // push rbx
            0x48, 0x85, 0xff, // test rdi,rdi
            0x0f, 0x88, 0x69, 0xad, 0xf2, 0xff, // js ...
            0x48, 0x8b, 0x05, 0xe7, 0xeb, 0x45, 0x00, // mov rax,[rip+0x45ebe7]
            0x48, 0x89, 0xfb, // mov rbx,rdi
            0x48, 0x8b, 0x3d, 0xd5, 0xeb, 0x45, 0x00, // mov rdi,[rip+0x45ebd5]
            0x48, 0x3d, 0x50, 0xb4, 0x4f, 0x00, // cmp rax,0x4fb450
        ];
        assert_eq!(guarded_slot(&code, ip), Some((0x959f48, 0x4fb450)));
    }

    /// pyenv's 3.11 (no LTO): `PyObject_Malloc` tail-calls through the global table's slot.
    #[test]
    fn finds_a_direct_jump_slot() {
        let ip = 0x1af1e0;
        let code = [
            0x48, 0x89, 0xfe, // mov rsi,rdi
            0x48, 0x85, 0xff, // test rdi,rdi
            0x78, 0x10, // js +0x10
            0x48, 0x8b, 0x3d, 0x71, 0xd0, 0x2a, 0x00, // mov rdi,[rip+0x2ad071] -> 0x45c260
            0xff, 0x25, 0x73, 0xd0, 0x2a, 0x00, // jmp [rip+0x2ad073] -> 0x45c268
        ];
        assert_eq!(jump_slot(&code, ip), Some(Slot::Direct(0x45c268)));
    }

    /// pyenv's 3.12 (no LTO): the table is inside `_PyRuntime`, reached through the GOT.
    #[test]
    fn finds_a_jump_through_a_pointer() {
        let ip = 0x1cf430;
        let code = [
            0x48, 0x89, 0xfe, // mov rsi,rdi
            0x48, 0x85, 0xff, // test rdi,rdi
            0x78, 0x18, // js +0x18
            0x48, 0x8b, 0x05, 0xc1, 0x48, 0x37, 0x00, // mov rax,[rip+0x3748c1] -> 0x543d00
            0x48, 0x8b, 0xb8, 0xb0, 0x00, 0x00, 0x00, // mov rdi,[rax+0xb0]
            0xff, 0xa0, 0xb8, 0x00, 0x00, 0x00, // jmp [rax+0xb8]
        ];
        assert_eq!(
            jump_slot(&code, ip),
            Some(Slot::Through {
                pointer: 0x543d00,
                disp: 0xb8
            })
        );
        // A guard-shaped entry has no jump through memory.
        assert_eq!(jump_slot(&code[..15], ip), None);
    }

    /// A shared library compares with a register loaded by a RIP-relative `lea`.
    #[test]
    fn finds_the_function_through_a_lea() {
        let ip = 0x1000;
        let code = [
            0x48, 0x8b, 0x05, 0xf9, 0x0f, 0x00, 0x00, // mov rax,[rip+0xff9] -> 0x2000
            0x48, 0x8d, 0x15, 0xf2, 0x00, 0x00, 0x00, // lea rdx,[rip+0xf2] -> 0x1100
            0x48, 0x39, 0xd0, // cmp rax,rdx
        ];
        assert_eq!(guarded_slot(&code, ip), Some((0x2000, 0x1100)));
        // No compare: nothing.
        assert_eq!(guarded_slot(&code[..14], ip), None);
    }
}
