//! What the library's own tests share: small C programs built on the spot.

use std::path::PathBuf;
use std::process::Command;

/// Builds `source` with the system's C compiler and `flags`; the program lives as long as the
/// returned directory.
pub fn compile_c(source: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join("prog.c"), dir.path().join("prog"));
    std::fs::write(&src, source).unwrap();
    let cc = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status();
    assert!(
        cc.is_ok_and(|s| s.success()),
        "cc (build-essential) is needed"
    );
    (dir, exe)
}

/// Debian's python3.14 as `cargo xtask setup` unpacks it: stripped, LTO and PGO built, its debug
/// file installed in its own tree. Missing, the test fails: setup was not run.
pub fn debian_python314() -> PathBuf {
    debian_python("3.14")
}

/// Debian sid's release build of `version` (3.14 or 3.15) as `cargo xtask setup` unpacks it.
pub fn debian_python(version: &str) -> PathBuf {
    let p = PathBuf::from(format!(
        "/opt/leaktrace/python{version}/usr/bin/python{version}"
    ));
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// A page of a file mapped into this process and then deleted, as a container's file is once
/// only its mapping reaches it; unmapped when dropped.
pub struct DeletedMapping {
    /// Where the page is mapped.
    pub at: u64,
    /// The file's name before it was deleted.
    pub name: String,
}

impl DeletedMapping {
    /// Maps a new file holding `contents`, then deletes it.
    pub fn new(contents: &[u8]) -> Self {
        use std::os::fd::AsRawFd;
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), contents).unwrap();
        let f = std::fs::File::open(file.path()).unwrap();
        // SAFETY: a fresh private read-only mapping of a file we opened, unmapped on drop.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let name = file.path().to_str().unwrap().to_string();
        file.close().unwrap();
        Self {
            at: at as u64,
            name,
        }
    }
}

impl Drop for DeletedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, used by nothing else once this is dropped.
        unsafe { libc::munmap(self.at as *mut libc::c_void, 4096) };
    }
}
