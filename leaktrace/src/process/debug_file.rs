//! Separate debug files: where a stripped binary's full symbol table lives once its distribution's
//! debug package is installed (Debian's `-dbg` and `-dbgsym`, Fedora's `-debuginfo`).
//!
//! Found the way gdb finds them: by build ID under `.build-id/`, then by the `.gnu_debuglink`
//! name next to the binary and under the debug directory. A candidate is taken only when it is
//! the binary's own: the same build ID or, for a binary without one, the debug link's CRC.
//!
//! The debug directory is looked for in the tree the binary was installed in (the nearest
//! ancestor directory with a `lib/debug`), then on the host. The tree's own is what an install
//! under a prefix (`/opt/…/usr/bin/python3`) and a container's root
//! (`/proc/PID/root/usr/bin/python3`) keep their debug packages in; the host's `/usr/lib/debug`
//! is what `/usr/bin/python3` resolves to anyway.

use std::path::{Path, PathBuf};

use object::Object;

/// The host's debug directory.
const HOST_DEBUG_DIR: &str = "/usr/lib/debug";

/// The debug directories to search for `binary`, nearest first: its install tree's
/// `lib/debug`, then the host's.
pub fn debug_dirs(binary: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(own) = binary
        .ancestors()
        .skip(1)
        .map(|a| a.join("lib/debug"))
        .find(|d| d.is_dir())
    {
        dirs.push(own);
    }
    let host = PathBuf::from(HOST_DEBUG_DIR);
    if host.is_dir() && !dirs.iter().any(|d| same_dir(d, &host)) {
        dirs.push(host);
    }
    dirs
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A separate debug file, mapped.
pub struct DebugFile {
    pub path: PathBuf,
    pub data: memmap2::Mmap,
}

impl DebugFile {
    /// The debug file of `binary` (whose parsed image is `obj`), if one is installed and is the
    /// binary's own. `None` for a binary that has its own `.symtab`: nothing to add.
    pub fn find(binary: &Path, obj: &object::File<'_>) -> Option<DebugFile> {
        if obj.section_by_name(".symtab").is_some() {
            return None;
        }
        let build_id = obj.build_id().ok().flatten();
        let link = obj.gnu_debuglink().ok().flatten();
        if build_id.is_none() && link.is_none() {
            return None;
        }
        candidates(binary, build_id, link.map(|(name, _)| name))
            .into_iter()
            .find_map(|path| {
                let f = open(&path)?;
                f.belongs(build_id, link.map(|(_, crc)| crc)).then_some(f)
            })
    }

    /// Parses the mapped file.
    pub fn object(&self) -> Option<object::File<'_>> {
        object::File::parse(&*self.data).ok()
    }

    /// Whether this file is the debug file of a binary with this build ID (or, without one, this
    /// debug-link CRC).
    fn belongs(&self, build_id: Option<&[u8]>, crc: Option<u32>) -> bool {
        match build_id {
            Some(want) => self
                .object()
                .and_then(|o| o.build_id().ok().flatten().map(|b| b == want))
                .unwrap_or(false),
            None => crc.is_some_and(|c| crc32fast::hash(&self.data) == c),
        }
    }
}

fn open(path: &Path) -> Option<DebugFile> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: a private, read-only mapping of a file that package managers replace by rename,
    // never truncate in place (the same hazard and the same answer as `ElfFile::open`).
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    Some(DebugFile {
        path: path.to_path_buf(),
        data,
    })
}

/// Where gdb would look, in its order: by build ID in each debug directory, then the debug
/// link's name beside the binary, in its `.debug/`, and under each debug directory at the
/// binary's own directory.
fn candidates(binary: &Path, build_id: Option<&[u8]>, link: Option<&[u8]>) -> Vec<PathBuf> {
    let dirs = debug_dirs(binary);
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() > 1) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let rel = format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..]);
        out.extend(dirs.iter().map(|d| d.join(&rel)));
    }
    let name = link
        .and_then(|l| std::str::from_utf8(l).ok())
        .filter(|n| !n.is_empty() && !n.contains('/'));
    if let (Some(name), Some(dir)) = (name, binary.parent()) {
        out.push(dir.join(name));
        out.push(dir.join(".debug").join(name));
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        out.extend(dirs.iter().map(|d| d.join(rel).join(name)));
    }
    out.retain(|p| p != binary);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary installed under a prefix finds the prefix's debug directory before the host's,
    /// and its build ID names the file under `.build-id/`.
    #[test]
    fn the_install_tree_debug_dir_comes_first() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin/python3");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib/debug")).unwrap();
        let dirs = debug_dirs(&bin);
        assert_eq!(dirs[0], root.path().join("usr/lib/debug"));
        let c = candidates(&bin, Some(&[0xab, 0xcd, 0xef]), Some(b"python3.debug"));
        assert_eq!(
            c[0],
            root.path().join("usr/lib/debug/.build-id/ab/cdef.debug")
        );
        assert!(c.contains(&root.path().join("usr/bin/.debug/python3.debug")));
    }

    /// A file that is not the binary's own (another build ID) is not taken, nor is a binary
    /// with its own symbol table given one.
    #[test]
    fn only_the_binarys_own_debug_file_is_taken() {
        let exe = std::env::current_exe().unwrap();
        let f = open(&exe).unwrap();
        let obj = f.object().unwrap();
        let id = obj.build_id().ok().flatten();
        if let Some(id) = id {
            assert!(f.belongs(Some(id), None));
            let mut other = id.to_vec();
            other[0] ^= 0xff;
            assert!(!f.belongs(Some(&other), None));
        }
        assert!(!f.belongs(None, Some(crc32fast::hash(&f.data) ^ 1)));
        assert!(f.belongs(None, Some(crc32fast::hash(&f.data))));
        // The test binary has its own `.symtab`.
        assert!(DebugFile::find(&exe, &obj).is_none());
    }
}
