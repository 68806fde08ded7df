//! One module's call-frame information (`.eh_frame` through `.eh_frame_hdr`'s search table,
//! then `.debug_frame`), reduced to the `UnwindRow`s that both the kernel and userspace step
//! with.

use std::collections::HashMap;
use std::path::Path;

use gimli::{
    BaseAddresses, CfaRule, DebugFrame, EhFrame, EhFrameHdr, EndianSlice, LittleEndian,
    ParsedEhFrameHdr, RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
use leaktrace_ebpf::{UnwindRow, CFA_BP, CFA_SP};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::error::{Error, Result};
use crate::process::debug_file::DebugFile;

/// What a module's CFI says about one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// How to reach the caller.
    Row(UnwindRow),
    /// The return address is undefined here: the outermost frame (`_start`, a thread's start).
    Outermost,
    /// The module has no CFI for the address.
    NoCfi,
    /// CFI that a row cannot express (a DWARF expression: signal frames, PLT stubs).
    Unsupported,
}

/// A section's bytes and its address in the file's own address space (SVMA).
struct Section {
    svma: u64,
    bytes: Vec<u8>,
}

/// The unwind tables of one ELF file, with a cache of rows already looked up.
pub struct ModuleCfi {
    eh_frame: Option<Section>,
    eh_frame_hdr: Option<Section>,
    debug_frame: Option<Section>,
    text_svma: u64,
    got_svma: u64,
    /// PT_LOAD segments: (file offset, file size, SVMA).
    segments: Vec<(u64, u64, u64)>,
    /// SVMA ranges of the interpreter's eval loop (`_PyEval_EvalFrameDefault` and its cold part).
    eval: Vec<(u64, u64)>,
    rows: HashMap<u64, Lookup>,
}

impl ModuleCfi {
    /// Reads the unwind sections of the ELF file at `path`; only they are kept in memory.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, true)
    }

    /// `load`, with or without looking for the file's separate debug file.
    fn load_with(path: &Path, debug_file: bool) -> Result<Self> {
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        // Mapped, not read: only the headers, the symbol tables and the frame sections are
        // touched, where reading copied the whole file (23 MB for a libpython with its DWARF)
        // into fresh pages on every session start (a tenth of a sampled session's CPU).
        // SAFETY: a private, read-only mapping of a file that package managers replace by
        // rename, never truncate in place (the same hazard and answer as `ElfFile::open`).
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?;
        let obj = object::File::parse(&*data).map_err(|e| Error::Elf {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let section = |name: &str| {
            let s = obj.section_by_name(name)?;
            let bytes = s.uncompressed_data().ok()?.into_owned();
            (!bytes.is_empty()).then_some(Section {
                svma: s.address(),
                bytes,
            })
        };
        let eh_frame = section(".eh_frame");
        let eh_frame_hdr = section(".eh_frame_hdr");
        let debug_frame = section(".debug_frame");
        let addr = |name: &str| obj.section_by_name(name).map(|s| s.address()).unwrap_or(0);
        let segments = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, size, s.address())
            })
            .collect();
        // A stripped interpreter names only the eval loop's hot part (`.dynsym`); its `.cold`
        // part, which holds most opcodes' code in Debian's 3.14, is named in the debug file.
        let debug = debug_file.then(|| DebugFile::find(path, &obj)).flatten();
        let debug_obj = debug.as_ref().and_then(DebugFile::object);
        let mut eval = Vec::new();
        let own = obj.symbols().chain(obj.dynamic_symbols());
        for sym in own.chain(debug_obj.iter().flat_map(|o| o.symbols())) {
            let Ok(name) = sym.name() else { continue };
            if is_eval_symbol(name) && sym.size() > 0 {
                eval.push((sym.address(), sym.address() + sym.size()));
            }
        }
        // Without a full symbol table, a split-off part of the loop has no name to be found by.
        let unnamed = obj.section_by_name(".symtab").is_none() && debug.is_none();
        let mut cfi = Self {
            eh_frame,
            eh_frame_hdr,
            debug_frame,
            text_svma: addr(".text"),
            got_svma: addr(".got"),
            segments,
            eval,
            rows: HashMap::new(),
        };
        if unnamed {
            if let Some(&(start, end)) = cfi.eval.first() {
                let code = obj
                    .sections()
                    .find_map(|s| s.data_range(start, end - start).ok().flatten());
                let cold = code
                    .map(|c| cfi.unnamed_parts(start, c))
                    .unwrap_or_default();
                cfi.eval.extend(cold);
            }
        }
        Ok(cfi)
    }

    /// The code ranges outside a function that its code at `start` (`code`) jumps into
    /// mid-frame: the parts the compiler split off (`.cold`), found where no symbol names them
    /// (a stripped build without its debug file; Debian's 3.14 keeps most of the eval loop's
    /// opcodes there). A range counts when it has an FDE of its own whose first row is not a
    /// function's entry (the return address is not at the top of the stack): a jump to another
    /// function's entry is a tail call, and lands where the CFA is `rsp + 8`.
    fn unnamed_parts(&mut self, start: u64, code: &[u8]) -> Vec<(u64, u64)> {
        let end = start + code.len() as u64;
        let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        let mut targets: Vec<u64> = Vec::new();
        for ins in &mut decoder {
            let branch = matches!(
                ins.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
            );
            if branch && ins.op0_kind() == OpKind::NearBranch64 {
                let t = ins.near_branch_target();
                if !(start..end).contains(&t) {
                    targets.push(t);
                }
            }
        }
        targets.sort_unstable();
        targets.dedup();
        let mut parts: Vec<(u64, u64)> = Vec::new();
        for t in targets {
            if parts.iter().any(|(a, b)| (*a..*b).contains(&t)) {
                continue;
            }
            let Some((a, b)) = self.fde_range(t) else {
                continue;
            };
            let entry = matches!(
                self.lookup(a),
                Lookup::Row(r) if r.cfa_reg == CFA_SP && r.cfa_off == 8
            );
            if !entry {
                parts.push((a, b));
            }
        }
        parts
    }

    /// The address range of the `.eh_frame` FDE that covers `svma`.
    fn fde_range(&self, svma: u64) -> Option<(u64, u64)> {
        let bases = self.bases();
        let frame = self.eh_frame()?;
        let fde = self
            .eh_frame_hdr(&bases)?
            .table()?
            .fde_for_address(&frame, &bases, svma, EhFrame::cie_from_offset)
            .ok()?;
        Some((fde.initial_address(), fde.end_address()))
    }

    /// The SVMA of a file offset (through the segment that loads it).
    pub fn svma(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(off, size, _)| *off <= file_offset && file_offset < off + size)
            .map(|(off, _, vaddr)| vaddr + (file_offset - off))
    }

    /// Whether `svma` lies in the interpreter's eval loop.
    pub fn is_eval(&self, svma: u64) -> bool {
        self.eval.iter().any(|(a, b)| *a <= svma && svma < *b)
    }

    /// The row in force at `svma` (for a return address, look up the call: address − 1).
    pub fn lookup(&mut self, svma: u64) -> Lookup {
        if let Some(l) = self.rows.get(&svma) {
            return *l;
        }
        let l = self.find(svma);
        self.rows.insert(svma, l);
        l
    }

    /// `.eh_frame`, ready to read (64-bit addresses).
    fn eh_frame(&self) -> Option<EhFrame<EndianSlice<'_, LittleEndian>>> {
        let eh = self.eh_frame.as_ref()?;
        let mut frame = EhFrame::new(&eh.bytes, LittleEndian);
        frame.set_address_size(8);
        Some(frame)
    }

    /// `.eh_frame_hdr`, parsed: its binary-search table of FDEs.
    fn eh_frame_hdr(
        &self,
        bases: &BaseAddresses,
    ) -> Option<ParsedEhFrameHdr<EndianSlice<'_, LittleEndian>>> {
        let hdr = self.eh_frame_hdr.as_ref()?;
        EhFrameHdr::new(&hdr.bytes, LittleEndian)
            .parse(bases, 8)
            .ok()
    }

    fn bases(&self) -> BaseAddresses {
        let mut b = BaseAddresses::default()
            .set_text(self.text_svma)
            .set_got(self.got_svma);
        if let Some(s) = &self.eh_frame {
            b = b.set_eh_frame(s.svma);
        }
        if let Some(s) = &self.eh_frame_hdr {
            b = b.set_eh_frame_hdr(s.svma);
        }
        b
    }

    fn find(&self, svma: u64) -> Lookup {
        let bases = self.bases();
        let mut ctx = Box::new(UnwindContext::new());
        if let Some(frame) = self.eh_frame() {
            let via_table = self.eh_frame_hdr(&bases).and_then(|parsed| {
                let table = parsed.table()?;
                Some(
                    table
                        .unwind_info_for_address(
                            &frame,
                            &bases,
                            &mut ctx,
                            svma,
                            EhFrame::cie_from_offset,
                        )
                        .map(row_of),
                )
            });
            let found = match via_table {
                Some(r) => r,
                None => frame
                    .unwind_info_for_address(&bases, &mut ctx, svma, EhFrame::cie_from_offset)
                    .map(row_of),
            };
            if let Ok(l) = found {
                return l;
            }
        }
        if let Some(dbg) = &self.debug_frame {
            let mut frame = DebugFrame::new(&dbg.bytes, LittleEndian);
            frame.set_address_size(8);
            if let Ok(l) = frame
                .unwind_info_for_address(&bases, &mut ctx, svma, DebugFrame::cie_from_offset)
                .map(row_of)
            {
                return l;
            }
        }
        Lookup::NoCfi
    }
}

/// `_PyEval_EvalFrameDefault` (and `.cold`, `.part` clones the compiler split off).
pub fn is_eval_symbol(name: &str) -> bool {
    name.strip_prefix("_PyEval_EvalFrameDefault")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

fn row_of(row: &UnwindTableRow<usize>) -> Lookup {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return Lookup::Outermost,
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(_) => return Lookup::Unsupported,
    }
    let (cfa_reg, cfa_off) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (CFA_SP, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (CFA_BP, *offset)
        }
        _ => return Lookup::Unsupported,
    };
    let bp_off = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) | Some(RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(n)) if n != 0 => match i16::try_from(n) {
            Ok(n) => n,
            Err(_) => return Lookup::Unsupported,
        },
        Some(_) => return Lookup::Unsupported,
    };
    let Ok(cfa_off) = i32::try_from(cfa_off) else {
        return Lookup::Unsupported;
    };
    Lookup::Row(UnwindRow {
        cfa_off,
        bp_off,
        cfa_reg,
        flags: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a stripped interpreter whose eval loop the compiler split (Debian's 3.14: a hot part
    /// of 1,184 bytes, its opcodes in `.cold`), the parts found by following the hot part's jumps
    /// cover what the debug file's `.cold` symbol names, and the eval loop's first frames are
    /// recognized either way.
    #[test]
    fn a_split_eval_loop_is_found_without_its_debug_file() {
        let py = crate::test_support::debian_python314();
        let named = ModuleCfi::load_with(&py, true).unwrap();
        let found = ModuleCfi::load_with(&py, false).unwrap();
        assert!(
            named.eval.len() >= 2,
            "no .cold symbol in the debug file: {:?}",
            named.eval
        );
        for (a, b) in &named.eval {
            assert!(
                found.eval.iter().any(|(x, y)| x <= a && b <= y),
                "{a:#x}..{b:#x} not found: {:x?}",
                found.eval
            );
        }
        let named_bytes: u64 = named.eval.iter().map(|(a, b)| b - a).sum();
        let found_bytes: u64 = found.eval.iter().map(|(a, b)| b - a).sum();
        assert!(
            found_bytes < 2 * named_bytes,
            "{found_bytes} against {named_bytes}"
        );
    }

    /// This test binary's own CFI: its functions have rows, and an address that is no code has
    /// none.
    #[test]
    fn reads_rows_from_a_real_binary() {
        let exe = std::env::current_exe().unwrap();
        let mut cfi = ModuleCfi::load(&exe).unwrap();
        let here = reads_rows_from_a_real_binary as *const () as usize as u64;
        // This PIE's load bias: find the mapping of `here` in our own maps.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let m = crate::process::maps::parse_maps(&maps)
            .into_iter()
            .find(|m| m.contains(here))
            .unwrap();
        let svma = cfi.svma(m.file_offset(here)).unwrap();
        match cfi.lookup(svma + 1) {
            Lookup::Row(r) => {
                assert!(r.cfa_off >= 8, "{r:?}");
            }
            other => panic!("no row for this function: {other:?}"),
        }
        assert_eq!(cfi.lookup(0), Lookup::NoCfi);
        assert!(!cfi.is_eval(svma));
        assert!(is_eval_symbol("_PyEval_EvalFrameDefault"));
        assert!(is_eval_symbol("_PyEval_EvalFrameDefault.cold"));
        assert!(!is_eval_symbol("_PyEval_EvalFrameDefaultX"));
    }
}
