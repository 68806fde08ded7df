//! Builds the BPF object from `leaktrace-ebpf` so the binary can embed it.
//!
//! The BPF side is compiled by Debian's rustc, which ships a prebuilt `core` for
//! `bpfel-unknown-none` (rustup cannot download `rust-src` here), and linked by bpf-linker
//! (docs/toolchain.md). It gets its own target directory because a different compiler builds it.
//! `cargo xtask setup` installs both. Set `LEAKTRACE_BPF_OBJECT` to embed a prebuilt object.
//!
//! It also builds the in-process sampler (`leaktrace/preload`, a cdylib) that `leaktrace preload`
//! writes out: embedded, so the one binary (or wheel) carries it. Set `LEAKTRACE_PRELOAD_LIB` to
//! embed a prebuilt one.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    build_preload(&workspace, &out_dir);
    build_bpf(&workspace, &out_dir);
}

/// The sampler library, built by the host compiler in a target directory of its own (the outer
/// build holds the workspace's).
fn build_preload(workspace: &Path, out_dir: &Path) {
    let dest = out_dir.join("libleaktrace_preload.so");
    println!("cargo:rerun-if-env-changed=LEAKTRACE_PRELOAD_LIB");
    if let Ok(prebuilt) = env::var("LEAKTRACE_PRELOAD_LIB") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &dest).unwrap_or_else(|e| panic!("copying {prebuilt}: {e}"));
        return;
    }
    let crate_dir = workspace.join("leaktrace").join("preload");
    for p in ["src", "Cargo.toml", "build.rs"] {
        println!("cargo:rerun-if-changed={}", crate_dir.join(p).display());
    }
    // Its release profile is set there.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );
    let target_dir = workspace.join("target").join("preload");
    let mut cmd = nested_cargo(workspace, &target_dir);
    // Frame pointers through the sampler's frames: the kernel's unwinder walks a sampled
    // allocation's stack from the USDT, inside them, before it has rows for this library.
    cmd.args(["-p", "leaktrace-preload"])
        .env("RUSTFLAGS", "-C force-frame-pointers=yes")
        .env("CFLAGS", "-fno-omit-frame-pointer");
    let status = cmd.status().expect("running cargo for the preload library");
    assert!(status.success(), "building the preload library failed");
    let lib = target_dir.join("release/libleaktrace_preload.so");
    std::fs::copy(&lib, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", lib.display()));
}

/// `cargo build --release --target-dir TARGET_DIR` in the workspace, without the outer build's
/// wrappers and flags (clippy-driver, coverage, host RUSTFLAGS) and target choices, which are
/// not for the nested builds.
fn nested_cargo(workspace: &Path, target_dir: &Path) -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--target-dir"])
        .arg(target_dir);
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn build_bpf(workspace: &Path, out_dir: &Path) {
    let dest = out_dir.join("leaktrace.bpf.o");
    println!("cargo:rerun-if-env-changed=LEAKTRACE_BPF_OBJECT");

    if let Ok(prebuilt) = env::var("LEAKTRACE_BPF_OBJECT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &dest).unwrap_or_else(|e| panic!("copying {prebuilt}: {e}"));
        return;
    }

    let ebpf = workspace.join("leaktrace-ebpf");
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    let rustc = env::var("LEAKTRACE_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    if !Path::new(&rustc).exists() || !has_bpf_linker() {
        panic!(
            "\n\nleaktrace's BPF programs need Debian's rustc ({rustc}) with the bpfel target and \
             bpf-linker.\nRun `cargo xtask setup` once (it installs rustc-web, \
             libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker).\n\n"
        );
    }
    let target_dir = workspace.join("target").join("bpf");
    let mut cmd = nested_cargo(workspace, &target_dir);
    cmd.args([
        "--target",
        "bpfel-unknown-none",
        "-p",
        "leaktrace-ebpf",
        "--bin",
        "leaktrace-ebpf",
        "--features",
        "bpf-bin",
        "--ignore-rust-version",
    ])
    .env("RUSTC", &rustc)
    .env("RUSTC_BOOTSTRAP", "1")
    .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
    .env("CARGO_PROFILE_RELEASE_DEBUG", "2");
    // BTF with func_info: the kernel requires it for bpf_loop's callback.
    cmd.env(
        "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
        "-C link-arg=--btf",
    );
    if let Ok(path) = env::var("PATH") {
        let home = env::var("HOME").unwrap_or_default();
        cmd.env("PATH", format!("{home}/.cargo/bin:{path}"));
    }
    let status = cmd.status().expect("running cargo for the BPF object");
    assert!(status.success(), "building the BPF object failed");
    let obj = target_dir.join("bpfel-unknown-none/release/leaktrace-ebpf");
    std::fs::copy(&obj, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}

fn has_bpf_linker() -> bool {
    let home = env::var("HOME").unwrap_or_default();
    Path::new(&home).join(".cargo/bin/bpf-linker").exists()
        || env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .any(|d| Path::new(d).join("bpf-linker").exists())
}
