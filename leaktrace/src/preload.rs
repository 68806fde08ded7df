//! The in-process heap sampler (crate `leaktrace-preload`), embedded in the binary and written
//! out as a shared library for `LD_PRELOAD`. A process that loads it samples its own allocations
//! (a thread-local byte countdown) and fires the `ddheap` heap-sampling USDTs only for the
//! sampled ones, so tracing it costs a trap per sample instead of one per call. Its semaphore
//! stays at zero until a tracer attaches: then it costs a load and a branch per call.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The library's bytes, built by build.rs from `leaktrace/preload`.
static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libleaktrace_preload.so"));

/// The sampler's smallest mean interval: it raises anything smaller to this.
pub const MIN_RATE: u64 = 64 << 10;

/// The environment variable the library reads its mean sampling interval from (bytes).
pub const SAMPLE_ENV: &str = "LEAKTRACE_SAMPLE_BYTES";
/// The environment variable the library reads its ceiling on samples a second from (0: none).
pub const SAMPLE_LIMIT_ENV: &str = "LEAKTRACE_SAMPLE_LIMIT";
/// Set to `1`, the library samples CPython's object and mem domains too (pymalloc's objects).
pub const SAMPLE_PYTHON_ENV: &str = "LEAKTRACE_SAMPLE_PYTHON";

/// Writes the library into `dir` (default: `/var/lib/leaktrace` for root, the user's cache
/// directory otherwise) under a name that changes with its content, so a path handed to a
/// service keeps meaning the same bytes, and returns the path. Nothing is written when the file
/// is already there.
pub fn install(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = dir.map_or_else(default_dir, Path::to_path_buf);
    let path = dir.join(format!(
        "libleaktrace_preload-{}-{:016x}.so",
        env!("CARGO_PKG_VERSION"),
        fnv1a(LIBRARY)
    ));
    if std::fs::read(&path).is_ok_and(|b| b == LIBRARY) {
        return Ok(path);
    }
    let write_err = |p: &Path, e: std::io::Error| Error::Write {
        path: p.to_path_buf(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
    // Written aside and renamed: a process loading the path never maps a half-written file.
    let tmp = dir.join(format!(".libleaktrace_preload.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(LIBRARY)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(&path, e));
    }
    Ok(path)
}

/// The environment a command is started with so it samples itself: the library last in
/// `LD_PRELOAD` (an allocator the user preloads, jemalloc or tcmalloc, keeps `malloc`, and the
/// sampler sees none of its calls), the interval, and the ceiling on samples a second when one is
/// asked for (the library's own default otherwise).
pub fn environment(path: &Path, rate: u64, limit: Option<u64>) -> Vec<(String, String)> {
    let lib = path.display().to_string();
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(old) if !old.trim().is_empty() => format!("{old} {lib}"),
        _ => lib,
    };
    let limit = limit.map(|n| (SAMPLE_LIMIT_ENV.to_string(), n.to_string()));
    [
        ("LD_PRELOAD".into(), preload),
        (SAMPLE_ENV.into(), rate.to_string()),
        // Traced from its first instruction, the command pays for the Python domains' wrappers
        // only while it is traced; a deployed service opts in itself (docs/sampling.md).
        (SAMPLE_PYTHON_ENV.into(), "1".into()),
    ]
    .into_iter()
    .chain(limit)
    .collect()
}

/// The oldest glibc the library loads under (its newest symbol version, `GLIBC_2.34`).
pub const MIN_GLIBC: (u32, u32) = (2, 34);

/// Whether a program started here can load the library: this host's C library is glibc of at
/// least `MIN_GLIBC` (a program with a C library of its own, older, would fail to start).
pub fn host_can_load() -> std::result::Result<(), String> {
    // SAFETY: gnu_get_libc_version takes nothing and returns a static NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let text = text.to_string_lossy();
    let mut parts = text.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= MIN_GLIBC {
        Ok(())
    } else {
        Err(format!(
            "it needs glibc {}.{} or newer, this host has {text}",
            MIN_GLIBC.0, MIN_GLIBC.1
        ))
    }
}

fn default_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/leaktrace");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("leaktrace")
}

/// FNV-1a: a content tag for the file name, not a defence against anything.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_under_a_content_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = install(Some(dir.path())).unwrap();
        let b = install(Some(dir.path())).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), LIBRARY);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let elf = crate::process::elf::ElfFile::open(&a).unwrap();
        let (notes, bad) = elf.sdt_notes();
        assert_eq!(bad, 0);
        let names: Vec<_> = notes
            .iter()
            .map(|n| format!("{}:{}", n.provider, n.name))
            .collect();
        assert!(names.contains(&"ddheap:alloc".to_string()), "{names:?}");
        assert!(names.contains(&"ddheap:free".to_string()), "{names:?}");
        assert!(notes.iter().all(|n| n.semaphore != 0));
    }

    #[test]
    fn this_host_can_load_it() {
        host_can_load().unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_a_write_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = install(Some(&file.path().join("sub"))).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
    }
}
