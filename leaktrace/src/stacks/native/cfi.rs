//! One module's call-frame information (`.eh_frame` through `.eh_frame_hdr`'s search table,
//! then `.debug_frame`), reduced to the `UnwindRow`s that both the kernel and userspace step
//! with.

use std::collections::HashMap;
use std::path::Path;

use gimli::{
    BaseAddresses, CfaRule, DebugFrame, EhFrame, EhFrameHdr, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use leaktrace_ebpf::{UnwindRow, CFA_BP, CFA_SP};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::error::{Error, Result};

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
        let data = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
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
        let mut eval = Vec::new();
        for sym in obj.symbols().chain(obj.dynamic_symbols()) {
            let Ok(name) = sym.name() else { continue };
            if is_eval_symbol(name) && sym.size() > 0 {
                eval.push((sym.address(), sym.address() + sym.size()));
            }
        }
        Ok(Self {
            eh_frame,
            eh_frame_hdr,
            debug_frame,
            text_svma: addr(".text"),
            got_svma: addr(".got"),
            segments,
            eval,
            rows: HashMap::new(),
        })
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
        if let Some(eh) = &self.eh_frame {
            let mut frame = EhFrame::new(&eh.bytes, LittleEndian);
            frame.set_address_size(8);
            let via_table = self.eh_frame_hdr.as_ref().and_then(|hdr| {
                let parsed = EhFrameHdr::new(&hdr.bytes, LittleEndian)
                    .parse(&bases, 8)
                    .ok()?;
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
