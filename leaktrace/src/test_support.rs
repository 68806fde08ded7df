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
