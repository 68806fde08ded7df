//! ELF files: function symbols, their code bytes, and virtual address → file offset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use super::debug_file::DebugFile;
use crate::error::{Error, Result};

/// Which table a symbol came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolTable {
    /// `.symtab`: the full table, local (static) functions included; stripped builds lack it.
    Symtab,
    /// The `.symtab` of the binary's separate debug file (a stripped build whose debug package
    /// is installed).
    #[serde(rename = "debug_file")]
    DebugFile,
    /// `.dynsym`: exported symbols only.
    Dynsym,
    /// Neither: a stripped interpreter's pymalloc function, named by its allocator table
    /// (`--redirect-pymalloc`).
    #[serde(rename = "allocator_table")]
    AllocatorTable,
}

impl SymbolTable {
    /// The name reports give it (the same as its serialized form).
    pub fn name(self) -> &'static str {
        match self {
            SymbolTable::Symtab => "symtab",
            SymbolTable::DebugFile => "debug_file",
            SymbolTable::Dynsym => "dynsym",
            SymbolTable::AllocatorTable => "allocator_table",
        }
    }
}

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FnSymbol {
    pub name: String,
    pub vaddr: u64,
    pub size: u64,
    pub table: SymbolTable,
}

/// An ELF file mapped into memory, with its separate debug file when it is stripped and one is
/// installed.
pub struct ElfFile {
    path: PathBuf,
    data: memmap2::Mmap,
    /// Looked for at the first symbol lookup: most opens only read sections or notes.
    debug: OnceLock<Option<DebugFile>>,
}

impl ElfFile {
    /// Maps and validates an ELF file.
    pub fn open(path: &Path) -> Result<Self> {
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        // SAFETY: a private, read-only mapping. The one hazard is the file shrinking while it is
        // mapped (SIGBUS on a read past its new end): package managers and linkers replace a
        // library by renaming a new file over it, which leaves this mapping on the old one.
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?;
        let f = Self {
            path: path.to_path_buf(),
            data,
            debug: OnceLock::new(),
        };
        f.parse()?;
        Ok(f)
    }

    /// Calls `f` on every symbol: `.symtab`, the debug file's `.symtab`, then `.dynsym`, until
    /// it returns true.
    fn each_symbol(&self, mut f: impl FnMut(SymbolTable, &object::Symbol<'_, '_>) -> bool) {
        let Ok(obj) = self.parse() else { return };
        for s in obj.symbols() {
            if f(SymbolTable::Symtab, &s) {
                return;
            }
        }
        let debug = self.debug.get_or_init(|| DebugFile::find(&self.path, &obj));
        if let Some(dbg) = debug.as_ref().and_then(DebugFile::object) {
            for s in dbg.symbols() {
                if f(SymbolTable::DebugFile, &s) {
                    return;
                }
            }
        }
        for s in obj.dynamic_symbols() {
            if f(SymbolTable::Dynsym, &s) {
                return;
            }
        }
    }

    /// The path it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parse(&self) -> Result<object::File<'_>> {
        object::File::parse(&*self.data).map_err(|e| Error::Elf {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Looks up defined function symbols by name, preferring `.symtab` (the file's own, then its
    /// debug file's) over `.dynsym` (versioned dynamic names such as `malloc@@GLIBC_2.2.5`
    /// match `malloc`).
    pub fn functions(&self, names: &[&str]) -> Result<HashMap<String, FnSymbol>> {
        self.parse()?;
        let mut found: HashMap<String, FnSymbol> = HashMap::new();
        self.each_symbol(|table, sym| {
            if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
                return false;
            }
            let Ok(raw) = sym.name() else { return false };
            let name = raw.split('@').next().unwrap_or(raw);
            if names.contains(&name) && !found.contains_key(name) {
                found.insert(
                    name.to_string(),
                    FnSymbol {
                        name: name.to_string(),
                        vaddr: sym.address(),
                        size: sym.size(),
                        table,
                    },
                );
            }
            false
        });
        Ok(found)
    }

    /// Whether any symbol (of any kind, any table) has one of these names.
    pub fn has_any_symbol(&self, names: &[&str]) -> bool {
        let mut any = false;
        self.each_symbol(|_, s| {
            any = s.name().map(|n| names.contains(&n)).unwrap_or(false);
            any
        });
        any
    }

    /// The link-time address of a data symbol (e.g. `_PyRuntime`), from any table.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        self.data_symbols(&[name])[0]
    }

    /// The addresses of several data symbols, in one pass over the symbol tables.
    pub fn data_symbols(&self, names: &[&str]) -> Vec<Option<u64>> {
        let mut out = vec![None; names.len()];
        self.each_symbol(|_, s| {
            if s.is_undefined() || s.address() == 0 {
                return false;
            }
            if let Some(i) = s
                .name()
                .ok()
                .and_then(|n| names.iter().position(|w| *w == n))
            {
                out[i].get_or_insert(s.address());
            }
            false
        });
        out
    }

    /// The lowest virtual address of a loadable segment (0 for shared objects and PIE).
    pub fn first_load_vaddr(&self) -> Option<u64> {
        let obj = self.parse().ok()?;
        obj.segments().map(|s| s.address()).min()
    }

    /// The bytes of a data object named `name` (e.g. `_Py_Version`), from the file image.
    pub fn object_bytes(&self, name: &str, len: u64) -> Option<Vec<u8>> {
        let mut at = None;
        self.each_symbol(|_, s| {
            if s.name() == Ok(name) && !s.is_undefined() {
                at = Some(s.address());
            }
            at.is_some()
        });
        self.bytes_at(at?, len)
    }

    /// `len` bytes at virtual address `vaddr`, if a section with file data holds them.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<Vec<u8>> {
        let obj = self.parse().ok()?;
        obj.sections()
            .find_map(|s| s.data_range(vaddr, len).ok().flatten())
            .map(<[u8]>::to_vec)
    }

    /// The SystemTap SDT notes (`.note.stapsdt`), addresses adjusted for prelinking by the
    /// `.stapsdt.base` section as SystemTap specifies. Malformed notes are counted, not fatal.
    pub fn sdt_notes(&self) -> (Vec<SdtNote>, usize) {
        let Ok(obj) = self.parse() else {
            return (Vec::new(), 0);
        };
        let Some(section) = obj.section_by_name(".note.stapsdt") else {
            return (Vec::new(), 0);
        };
        let Ok(data) = section.data() else {
            return (Vec::new(), 1);
        };
        let base = obj.section_by_name(".stapsdt.base").map(|s| s.address());
        let mut bad = 0;
        let notes = sdt_note_descs(data)
            .filter_map(|desc| {
                let n = SdtNote::parse(desc, base);
                bad += usize::from(n.is_none());
                n
            })
            .collect();
        (notes, bad)
    }

    /// Converts a virtual address to the file offset the kernel's uprobe API wants.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        let obj = self.parse().ok()?;
        obj.segments().find_map(|seg| {
            let (off, filesz) = seg.file_range();
            let start = seg.address();
            (start <= vaddr && vaddr < start + filesz).then(|| off + (vaddr - start))
        })
    }

    /// The libpython this executable links, found the way the dynamic loader would look for it
    /// in the common cases (its RUNPATH/RPATH with `$ORIGIN`, then the system directories).
    pub fn needed_libpython(&self) -> Option<PathBuf> {
        use object::read::elf::Dyn as _;
        let obj = object::read::elf::ElfFile64::<object::Endianness>::parse(&*self.data).ok()?;
        let endian = obj.endian();
        let mut needed = None;
        let mut paths = Vec::new();
        let dynamic = obj
            .elf_section_table()
            .dynamic(endian, &*self.data)
            .ok()??;
        let (entries, strtab_index) = dynamic;
        let strings = obj
            .elf_section_table()
            .strings(endian, &*self.data, strtab_index)
            .ok()?;
        for d in entries {
            let tag = d.d_tag(endian) as u32;
            let val = d.d_val(endian) as u32;
            let Ok(name) = strings.get(val) else { continue };
            let name = String::from_utf8_lossy(name).into_owned();
            match tag {
                object::elf::DT_NEEDED if name.starts_with("libpython3") => needed = Some(name),
                object::elf::DT_RUNPATH | object::elf::DT_RPATH => {
                    paths.extend(name.split(':').map(str::to_string))
                }
                _ => {}
            }
        }
        let needed = needed?;
        let origin = self
            .path
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        paths.extend(
            [
                "/usr/local/lib",
                "/usr/lib/x86_64-linux-gnu",
                "/lib/x86_64-linux-gnu",
                "/usr/lib",
                "/lib",
            ]
            .map(String::from),
        );
        paths
            .iter()
            .map(|d| Path::new(&d.replace("$ORIGIN", &origin)).join(&needed))
            .find(|p| p.exists())
    }
}

/// One SystemTap SDT probe site, as its note describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdtNote {
    pub provider: String,
    pub name: String,
    /// Virtual address of the probe's instruction (a `nop`).
    pub pc: u64,
    /// Virtual address of the provider's semaphore (a 16-bit use count), 0 if it has none.
    pub semaphore: u64,
    /// The argument specs, e.g. `8@%rdi -4@-20(%rbp)`.
    pub args: String,
}

/// The note type SystemTap's `sys/sdt.h` (version 3) writes.
const NT_STAPSDT: u32 = 3;

impl SdtNote {
    /// Parses a note's descriptor: three addresses, then three NUL-terminated strings.
    fn parse(desc: &[u8], base_section: Option<u64>) -> Option<SdtNote> {
        let word = |i: usize| {
            Some(u64::from_le_bytes(
                desc.get(8 * i..8 * i + 8)?.try_into().ok()?,
            ))
        };
        let (pc, base, semaphore) = (word(0)?, word(1)?, word(2)?);
        let mut strings = desc.get(24..)?.split(|b| *b == 0);
        let mut text = || {
            std::str::from_utf8(strings.next()?)
                .ok()
                .map(str::to_string)
        };
        let (provider, name, args) = (text()?, text()?, text()?);
        if provider.is_empty() || name.is_empty() {
            return None;
        }
        // Prelink moved the file: every address moves with `.stapsdt.base`.
        let shift = base_section.map_or(0, |b| b.wrapping_sub(base));
        Some(SdtNote {
            provider,
            name,
            pc: pc.wrapping_add(shift),
            semaphore: if semaphore == 0 {
                0
            } else {
                semaphore.wrapping_add(shift)
            },
            args,
        })
    }
}

/// The descriptors of the `stapsdt` notes of type 3 in a note section's bytes (4-byte aligned
/// name and descriptor, as every ELF64 note section on x86-64).
fn sdt_note_descs(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || loop {
        let word = |d: &[u8], i: usize| -> Option<usize> {
            Some(u32::from_le_bytes(d.get(4 * i..4 * i + 4)?.try_into().ok()?) as usize)
        };
        let (namesz, descsz, kind) = (word(data, 0)?, word(data, 1)?, word(data, 2)?);
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = name_end.checked_add(3)? & !3;
        let desc_end = desc_start.checked_add(descsz)?;
        let next = desc_end.checked_add(3)? & !3;
        let name = data.get(12..name_end)?;
        let desc = data.get(desc_start..desc_end)?;
        data = data.get(next.min(data.len())..)?;
        if kind as u32 == NT_STAPSDT && name == b"stapsdt\0" {
            return Some(desc);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF note: sizes, type, owner and descriptor, each padded to 4 bytes.
    fn note(owner: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((owner.len() as u32).to_le_bytes());
        v.extend((desc.len() as u32).to_le_bytes());
        v.extend(kind.to_le_bytes());
        v.extend(owner);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn sdt_desc(pc: u64, base: u64, sem: u64, strings: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        for w in [pc, base, sem] {
            d.extend(w.to_le_bytes());
        }
        for s in strings {
            d.extend(s.as_bytes());
            d.push(0);
        }
        d
    }

    #[test]
    fn sdt_notes_are_read_and_corrupt_ones_skipped() {
        let good = sdt_desc(0x1000, 0x5000, 0x9000, &["otel_memory", "alloc", "8@%rdi"]);
        let mut section = note(b"stapsdt\0", NT_STAPSDT, &good);
        // Another owner's note, a note of another type, and descriptors cut short.
        section.extend(note(b"GNU\0", NT_STAPSDT, &good));
        section.extend(note(b"stapsdt\0", 1, &good));
        section.extend(note(b"stapsdt\0", NT_STAPSDT, &good[..20]));
        section.extend(note(b"stapsdt\0", NT_STAPSDT, &sdt_desc(1, 2, 3, &["p"])));
        section.extend(note(
            b"stapsdt\0",
            NT_STAPSDT,
            &sdt_desc(1, 2, 3, &["", "x", ""]),
        ));
        let descs: Vec<&[u8]> = sdt_note_descs(&section).collect();
        assert_eq!(descs.len(), 4, "only stapsdt notes of type 3");
        let parsed: Vec<Option<SdtNote>> = descs
            .iter()
            .map(|d| SdtNote::parse(d, Some(0x5100)))
            .collect();
        let first = parsed[0].as_ref().unwrap();
        assert_eq!(
            (first.provider.as_str(), first.name.as_str()),
            ("otel_memory", "alloc")
        );
        // Prelinked 0x100 further: both addresses follow `.stapsdt.base`.
        assert_eq!((first.pc, first.semaphore), (0x1100, 0x9100));
        assert!(parsed[1..].iter().all(Option::is_none), "{parsed:?}");
        // A note whose sizes run past the section ends the walk instead of reading beyond it.
        let mut bad = note(b"stapsdt\0", NT_STAPSDT, &good);
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(sdt_note_descs(&bad).count(), 0);
        assert_eq!(sdt_note_descs(&[1, 2, 3]).count(), 0);
    }

    fn libc() -> PathBuf {
        for p in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ] {
            if Path::new(p).exists() {
                return PathBuf::from(p);
            }
        }
        panic!("no libc.so.6 on this machine");
    }

    #[test]
    fn finds_libc_allocators_in_dynsym() {
        let elf = ElfFile::open(&libc()).unwrap();
        let f = elf.functions(&["malloc", "free", "no_such_fn"]).unwrap();
        assert_eq!(f.len(), 2);
        let m = &f["malloc"];
        assert!(m.size > 0);
        // Function bytes are readable and map to a file offset in the executable segment.
        assert!(elf.bytes_at(m.vaddr, 16).is_some());
        assert!(elf.file_offset(m.vaddr).is_some());
    }

    #[test]
    fn rejects_non_elf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"not an elf").unwrap();
        assert!(matches!(ElfFile::open(&p), Err(Error::Elf { .. })));
        assert!(matches!(
            ElfFile::open(&dir.path().join("missing")),
            Err(Error::Read { .. })
        ));
    }
}
