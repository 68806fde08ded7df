//! ELF files: function symbols, their code bytes, and virtual address → file offset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::error::{Error, Result};

/// Which table a symbol came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolTable {
    /// `.symtab`: the full table, local (static) functions included; stripped builds lack it.
    Symtab,
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

/// An ELF file read into memory.
pub struct ElfFile {
    path: PathBuf,
    data: Vec<u8>,
}

impl ElfFile {
    /// Reads and validates an ELF file.
    pub fn open(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let f = Self {
            path: path.to_path_buf(),
            data,
        };
        f.parse()?;
        Ok(f)
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

    /// Looks up defined function symbols by name, preferring `.symtab` over `.dynsym`
    /// (versioned dynamic names such as `malloc@@GLIBC_2.2.5` match `malloc`).
    pub fn functions(&self, names: &[&str]) -> Result<HashMap<String, FnSymbol>> {
        let obj = self.parse()?;
        let mut found: HashMap<String, FnSymbol> = HashMap::new();
        for (table, syms) in [
            (SymbolTable::Symtab, obj.symbols()),
            (SymbolTable::Dynsym, obj.dynamic_symbols()),
        ] {
            for sym in syms {
                if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
                    continue;
                }
                let Ok(raw) = sym.name() else { continue };
                let name = raw.split('@').next().unwrap_or(raw);
                if !names.contains(&name) || found.contains_key(name) {
                    continue;
                }
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
        }
        Ok(found)
    }

    /// Whether any symbol (of any kind, either table) has one of these names.
    pub fn has_any_symbol(&self, names: &[&str]) -> bool {
        let Ok(obj) = self.parse() else { return false };
        obj.symbols()
            .chain(obj.dynamic_symbols())
            .any(|s| s.name().map(|n| names.contains(&n)).unwrap_or(false))
    }

    /// The link-time address of a data symbol (e.g. `_PyRuntime`), from either table.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        let obj = self.parse().ok()?;
        obj.symbols()
            .chain(obj.dynamic_symbols())
            .find(|s| s.name() == Ok(name) && !s.is_undefined() && s.address() != 0)
            .map(|s| s.address())
    }

    /// The addresses of several data symbols, in one pass over the symbol tables.
    pub fn data_symbols(&self, names: &[&str]) -> Vec<Option<u64>> {
        let mut out = vec![None; names.len()];
        let Ok(obj) = self.parse() else {
            return out;
        };
        for s in obj.symbols().chain(obj.dynamic_symbols()) {
            if s.is_undefined() || s.address() == 0 {
                continue;
            }
            if let Some(i) = s
                .name()
                .ok()
                .and_then(|n| names.iter().position(|w| *w == n))
            {
                out[i].get_or_insert(s.address());
            }
        }
        out
    }

    /// The lowest virtual address of a loadable segment (0 for shared objects and PIE).
    pub fn first_load_vaddr(&self) -> Option<u64> {
        let obj = self.parse().ok()?;
        obj.segments().map(|s| s.address()).min()
    }

    /// The bytes of a data object named `name` (e.g. `_Py_Version`), from the file image.
    pub fn object_bytes(&self, name: &str, len: u64) -> Option<Vec<u8>> {
        let obj = self.parse().ok()?;
        let sym = obj
            .symbols()
            .chain(obj.dynamic_symbols())
            .find(|s| s.name() == Ok(name) && !s.is_undefined())?;
        self.bytes_at(sym.address(), len)
    }

    /// `len` bytes at virtual address `vaddr`, if a section with file data holds them.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<Vec<u8>> {
        let obj = self.parse().ok()?;
        obj.sections()
            .find_map(|s| s.data_range(vaddr, len).ok().flatten())
            .map(<[u8]>::to_vec)
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

#[cfg(test)]
mod tests {
    use super::*;

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
