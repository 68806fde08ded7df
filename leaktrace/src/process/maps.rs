//! `/proc/PID/maps`: which files a process has mapped where.

use std::path::{Path, PathBuf};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    pub inode: u64,
    /// The path as the process sees it (empty for anonymous memory, `[heap]`-style for specials).
    pub path: String,
}

impl Mapping {
    /// Whether this maps a regular file (not anonymous memory or a `[special]` region).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// Whether `addr` falls inside the mapping.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The file offset that `addr` corresponds to.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Parses the text of a maps file. Lines that do not parse are skipped (the kernel's format is
/// stable; a `(deleted)` suffix is kept as part of the path).
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        inode,
        path,
    })
}

/// A snapshot of a process's file mappings, for turning addresses into (file, offset).
#[derive(Clone, Debug, Default)]
pub struct ModuleMap {
    mappings: Vec<Mapping>,
}

impl ModuleMap {
    /// How far `module` is mapped from its link-time addresses: where its mapping of file
    /// offset 0 starts, less its first loadable segment's page (`first_load_vaddr`). A file's
    /// pages can be mapped twice (RELRO and data share a page), so an address is never found
    /// through a file offset.
    pub fn load_bias(&self, module: &str, first_load_vaddr: Option<u64>) -> Option<u64> {
        let first = self
            .mappings()
            .iter()
            .filter(|m| m.path == module)
            .min_by_key(|m| m.offset)?;
        if first.offset != 0 {
            return None;
        }
        Some(first.start.wrapping_sub(first_load_vaddr? & !0xfff))
    }

    /// Wraps parsed mappings (sorted by address).
    pub fn new(mut mappings: Vec<Mapping>) -> Self {
        mappings.retain(Mapping::is_file);
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    /// The file mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    /// All file mappings.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// `host_path` from these mappings, without reading `/proc/PID/maps` again.
    pub fn host_path(&self, pid: u32, path: &str) -> PathBuf {
        match self.mappings.iter().find(|m| m.path == path) {
            Some(m) => host_path_of(pid, m),
            None => host_path(pid, path),
        }
    }

    /// Distinct mapped file paths, in address order.
    pub fn files(&self) -> Vec<&str> {
        let mut seen = Vec::<&str>::new();
        for m in &self.mappings {
            if !seen.contains(&m.path.as_str()) {
                seen.push(&m.path);
            }
        }
        seen
    }
}

/// A path leaktrace can open for a file `pid` maps, named as `/proc/PID/maps` names it.
///
/// That name is not always relative to the process's root: the kernel writes it relative to
/// the *reader's* root when it can reach the file from there (a chroot in leaktrace's mount
/// namespace: `/srv/root/usr/lib/libc.so.6`), else relative to the root of the process's mount
/// namespace (a chroot inside a container's). So the candidates are tried in turn and the first
/// that is the mapped inode wins: through `/proc/PID/root` (containers), the mapping itself
/// (`/proc/PID/map_files`, which also opens a deleted file), the name as it stands. When nothing
/// can be checked (the process or its mapping is gone), the first of those that exists.
pub fn host_path(pid: u32, path: &str) -> PathBuf {
    let mapping = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .and_then(|text| parse_maps(&text).into_iter().find(|m| m.path == path));
    match mapping {
        Some(m) => host_path_of(pid, &m),
        None => or_as_named(via_root(pid, path), path),
    }
}

/// `host_path` for a mapping already read: no second read of `/proc/PID/maps`.
pub fn host_path_of(pid: u32, m: &Mapping) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let via_root = via_root(pid, &m.path);
    let via_mapping = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
    [via_root.clone(), via_mapping, PathBuf::from(&m.path)]
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|md| md.ino() == m.inode))
        .unwrap_or_else(|| or_as_named(via_root, &m.path))
}

/// `via_root` when it exists, else the name as it stands (the process is gone).
fn or_as_named(via_root: PathBuf, path: &str) -> PathBuf {
    if via_root.exists() {
        via_root
    } else {
        PathBuf::from(path)
    }
}

/// `path` as the process sees it, through its root.
fn via_root(pid: u32, path: &str) -> PathBuf {
    Path::new("/proc")
        .join(pid.to_string())
        .join("root")
        .join(path.trim_start_matches('/'))
}

/// The anonymous private read-write mappings of `pid`, where pymalloc's arenas are: `(start,
/// end)`.
pub fn anonymous_regions(pid: u32) -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let (_off, _dev, inode) = (f.next()?, f.next()?, f.next()?);
            let path = f.next().unwrap_or("");
            let anonymous = inode == "0" && (path.is_empty() || path.starts_with("[anon"));
            if !perms.starts_with("rw") || !perms.ends_with('p') || !anonymous {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1311 /usr/bin/python3.11
55d0c0a01000-55d0c0c00000 r-xp 00001000 fe:01 1311 /usr/bin/python3.11
55d0c1b8a000-55d0c1bab000 rw-p 00000000 00:00 0                          [heap]
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d228000-7f1e2d24e000 r--p 00000000 fe:01 2049 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2d24e000-7f1e2d3a3000 r-xp 00026000 fe:01 2049 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2d400000-7f1e2d401000 r-xp 00000000 fe:01 4000 /tmp/my lib (deleted)
7ffd5c9d1000-7ffd5c9f2000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_files_specials_and_spaces() {
        let maps = parse_maps(SAMPLE);
        assert_eq!(maps.len(), 8);
        assert_eq!(maps[1].offset, 0x1000);
        assert_eq!(maps[1].perms, "r-xp");
        assert_eq!(maps[2].path, "[heap]");
        assert!(!maps[2].is_file());
        assert_eq!(maps[3].path, "");
        assert_eq!(maps[6].path, "/tmp/my lib (deleted)");
        assert_eq!(maps[4].path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    }

    #[test]
    fn finds_addresses_and_file_offsets() {
        let mm = ModuleMap::new(parse_maps(SAMPLE));
        let m = mm.find(0x7f1e2d24e010).unwrap();
        assert!(m.path.ends_with("/libc.so.6"));
        assert_eq!(m.file_offset(0x7f1e2d24e010), 0x26010);
        assert!(mm.find(0x55d0c1b8a100).is_none(), "heap is not a file");
        assert!(mm.find(0x1000).is_none());
        assert!(mm.find(0x7f1e2d3a3000).is_none(), "end is exclusive");
        assert_eq!(mm.files().len(), 3);
    }

    #[test]
    fn host_paths_go_through_proc_root() {
        let me = std::process::id();
        let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let libc = maps.iter().find(|m| m.path.contains("libc.so")).unwrap();
        let expect = PathBuf::from(format!("/proc/{me}/root")).join(&libc.path[1..]);
        assert_eq!(host_path(me, &libc.path), expect);
    }

    #[test]
    fn a_deleted_mapped_file_opens_through_its_mapping() {
        let me = std::process::id();
        let mapped = crate::test_support::DeletedMapping::new(b"still here");
        let p = host_path(me, &format!("{} (deleted)", mapped.name));
        let read = std::fs::read(&p);
        drop(mapped);
        assert!(p.to_str().unwrap().contains("/map_files/"), "{p:?}");
        assert_eq!(read.unwrap(), b"still here");
    }

    #[test]
    fn a_gone_process_names_the_file_as_given() {
        // PIDs above pid_max never exist.
        assert_eq!(
            host_path(u32::MAX, "/usr/lib/libc.so.6"),
            PathBuf::from("/usr/lib/libc.so.6")
        );
    }
}
