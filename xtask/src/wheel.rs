//! `cargo xtask wheel`: the manylinux wheel users install with `pip install leaktrace` — the
//! `leaktrace` binary (BPF object embedded) and the pytest plugin — and the old userland its
//! tests run it on.
//!
//! maturin packs the binary (`bindings = "bin"`, leaktrace/pyproject.toml) and zig links it
//! against glibc 2.17's symbols, so the wheel is tagged manylinux2014 and runs on any x86_64
//! glibc host from CentOS 7 on. Both come from PyPI into a venv of their own; the BPF object is
//! built first by the workspace's own recipe (Debian's rustc, bpf-linker), because zig's linker
//! is for the host binary only.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// Where maturin, zig and auditwheel live (a venv, outside the work tree).
const TOOLS: &str = "/opt/leaktrace/wheel-tools";
/// What is installed there.
const TOOL_REQS: &[&str] = &["maturin>=1.9,<2", "ziglang>=0.13", "auditwheel>=6"];
/// The glibc floor: manylinux2014 is glibc 2.17.
const COMPATIBILITY: &str = "manylinux2014";
/// A Debian bullseye root (glibc 2.31, Python 3.9): the tests run the wheel's binary there.
pub const BULLSEYE: &str = "/opt/leaktrace/bullseye";

/// Installs maturin, zig and auditwheel into `TOOLS` unless they are there.
fn ensure_tools() -> Result<PathBuf> {
    let bin = Path::new(TOOLS).join("bin");
    if bin.join("maturin").exists() && bin.join("auditwheel").exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing maturin, zig and auditwheel from PyPI into {TOOLS}");
    run(Command::new("python3").args(["-m", "venv", TOOLS]))?;
    run(Command::new(bin.join("pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(TOOL_REQS))?;
    Ok(bin)
}

/// auditwheel, as `ensure_tools` installs it (the tests ask it for the wheel's tag).
pub fn auditwheel() -> PathBuf {
    Path::new(TOOLS).join("bin/auditwheel")
}

/// Builds the wheel into `target/wheels/` (the only one there) and returns its path.
pub fn build() -> Result<PathBuf> {
    let tools = ensure_tools()?;
    // The release build makes the BPF object (leaktrace/build.rs); the wheel embeds that one.
    crate::build()?;
    let object = root().join("target/bpf/bpfel-unknown-none/release/leaktrace-ebpf");
    if !object.exists() {
        bail!("the BPF object {} was not built", object.display());
    }
    let out = root().join("target/wheels");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new(tools.join("maturin"))
        .current_dir(root())
        .args(["build", "--release", "--strip", "--zig", "--compatibility"])
        .arg(COMPATIBILITY)
        .arg("-m")
        .arg(root().join("leaktrace/Cargo.toml"))
        .arg("-o")
        .arg(&out)
        // Its own target directory: the zig-linked build must not replace target/release.
        .env("CARGO_TARGET_DIR", root().join("target/wheel"))
        .env("LEAKTRACE_BPF_OBJECT", &object)
        .env("PATH", path))?;
    let wheel = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("maturin wrote no wheel")?;
    // auditwheel reads the binary's versioned glibc symbols and names the tag they allow.
    run(Command::new(tools.join("auditwheel"))
        .arg("show")
        .arg(&wheel))?;
    Ok(wheel)
}

/// What the bullseye root holds besides the minimal base: its Python, and venv with the pip it
/// bundles (the tests install the wheel with bullseye's own pip).
const BULLSEYE_PACKAGES: &str = "python3,python3-venv";

/// Makes the Debian bullseye root the tests run the wheel in (debootstrap, once; again when
/// `BULLSEYE_PACKAGES` changed), with its Python 3.9 as a target.
pub fn ensure_bullseye() -> Result<PathBuf> {
    let rootfs = Path::new(BULLSEYE);
    let marker = rootfs.join(".leaktrace-packages");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == BULLSEYE_PACKAGES) {
        return Ok(rootfs.to_path_buf());
    }
    eprintln!("xtask setup: debootstrap Debian bullseye (glibc 2.31, Python 3.9) into {BULLSEYE}");
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs).context("removing an older bullseye root")?;
    }
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={BULLSEYE_PACKAGES}"),
        ])
        .args(["bullseye", BULLSEYE, "http://deb.debian.org/debian"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    std::fs::write(&marker, BULLSEYE_PACKAGES)?;
    Ok(rootfs.to_path_buf())
}
