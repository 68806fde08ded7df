//! Idempotent installation of everything leaktrace needs to build and test.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages and the file that shows each is installed.
const APT: &[(&str, &str)] = &[
    // Debian's rustc ships a prebuilt core for bpfel-unknown-none (docs/toolchain.md).
    ("rustc-web", "/usr/bin/rustc"),
    (
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none",
    ),
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    // Tests: list BPF programs and links after a killed tracer.
    ("bpftool", "/usr/sbin/bpftool"),
    // Tests: Debian's static, LTO-built, stripped python3.11, and its headers for the extension.
    ("python3.11", "/usr/bin/python3.11"),
    ("python3.11-dev", "/usr/include/python3.11/Python.h"),
    // Tests: a statically linked test program without symbols.
    ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
    ("gcc", "/usr/bin/gcc"),
    // Tests: the real consumers of each report format — a browser for the HTML report, `go tool
    // pprof` for pprof, `promtool` for the metrics endpoint, tmux to drive `leaktrace top`.
    ("chromium", "/usr/bin/chromium"),
    ("golang-go", "/usr/bin/go"),
    ("prometheus", "/usr/bin/promtool"),
    ("tmux", "/usr/bin/tmux"),
    // Setup: points Debian sid's CPython 3.14 and 3.15, unpacked beside sid's libc, at that libc.
    ("patchelf", "/usr/bin/patchelf"),
    // Tests: a real container runtime (OCI bundles run with runc) for targets in containers.
    ("runc", "/usr/sbin/runc"),
    // Tests: a Debian bullseye root (an older glibc) to run the wheel's binary in.
    ("debootstrap", "/usr/sbin/debootstrap"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The pyenv CPython the project is developed against.
pub const PYENV_PYTHON: &str = "3.11.7";

/// What the benchmarks compare against, beyond the test dependencies.
const APT_BENCH: &[(&str, &str)] = &[("valgrind", "/usr/bin/valgrind")];

pub fn setup(bench: bool) -> Result<()> {
    let extra = if bench { APT_BENCH } else { &[] };
    let missing: Vec<&str> = APT
        .iter()
        .chain(extra)
        .filter(|(_, marker)| !Path::new(marker).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    ensure_bpf_linker()?;
    mount_tracefs();
    let py = pyenv_python()?;
    ensure_module(&py, "numpy")?;
    crate::real_leaks::ensure_venvs(&py)?;
    if bench {
        ensure_module(&py, "memray")?;
    }
    Ok(())
}

/// Whether `python` can import `module`.
pub fn has_module(python: &Path, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs `module` from PyPI for `python` unless it imports already: real numpy for the
/// native-stack tests (a wheel built without frame pointers), memray for the benchmarks.
fn ensure_module(python: &Path, module: &str) -> Result<()> {
    if has_module(python, module) {
        return Ok(());
    }
    eprintln!("xtask setup: installing {module} for {}", python.display());
    run(Command::new(python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
        module,
    ]))
    .with_context(|| format!("pip install {module}"))
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    Path::new(&home).join(".cargo/bin")
}

fn ensure_bpf_linker() -> Result<()> {
    let bin = cargo_bin().join("bpf-linker");
    if let Ok(out) = Command::new(&bin).arg("--version").output() {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

/// Tracepoints need tracefs; a fresh machine does not mount it. Failure is not fatal: the
/// allocator probes do not need it.
fn mount_tracefs() {
    let dir = Path::new("/sys/kernel/tracing");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/kernel/tracing"))
        })
        .unwrap_or(false);
    if !mounted && dir.exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
}

/// The pyenv interpreter's real binary (not the shim).
pub fn pyenv_python() -> Result<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(format!(".pyenv/versions/{PYENV_PYTHON}/bin/python3.11"));
    if p.exists() {
        return Ok(p);
    }
    let pyenv = Path::new(&home).join(".pyenv/bin/pyenv");
    if !pyenv.exists() {
        bail!(
            "no pyenv at {}: the machine image provides CPython {PYENV_PYTHON} there",
            pyenv.display()
        );
    }
    eprintln!("xtask setup: building CPython {PYENV_PYTHON} with pyenv");
    run(Command::new(&pyenv)
        .args(["install", "-s", PYENV_PYTHON])
        .env("PYTHON_CONFIGURE_OPTS", "--enable-shared"))
    .context("pyenv install")?;
    Ok(p)
}
