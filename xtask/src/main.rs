//! `cargo xtask setup | build | demo | test | bench`: the project's own setup and checks.
//!
//! `setup` installs what building and testing need on a fresh Debian 12 machine, idempotently
//! and in well under a second when everything is present (docs/toolchain.md has the recipe).

mod bench;
mod ext;
mod pythons;
mod real_leaks;
mod setup;
mod wheel;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and test dependencies that are missing.
    Setup {
        /// Also install what the benchmarks compare against.
        #[arg(long)]
        bench: bool,
    },
    /// Build the BPF object and the leaktrace binary (release).
    Build,
    /// Trace the bundled leaking example and print the report.
    Demo,
    /// Print the CPython interpreters the tests run on, one per line: `VERSION PATH`.
    Pythons,
    /// Build the manylinux wheel (the binary and the pytest plugin) into target/wheels/.
    Wheel,
    /// Run every test: unit tests and the integration tests against the real kernel.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the cost of tracing against the untraced run and the probe floor.
    Bench {
        /// A short run (fewer iterations and repetitions).
        #[arg(long)]
        quick: bool,
        /// Run only the parts whose name contains TEXT: a workload's script name
        /// (`numpy_leak`), `tracemalloc`, `scale`, `real-leaks`, `pytest-plugin`, `sampling-cost`
        /// (sampled mode's paired ratios), `preload-cycles`, `snapshot`, `fixed-cost` or
        /// `interpreters` (the default `run` on each interpreter the tests use)
        /// (`snapshot`, `fixed-cost`, `interpreters` and `sampling-cost` take
        /// `LEAKTRACE_COMPARE=BIN`: another
        /// build's rows beside this one's); `soak` (30 minutes
        /// of `attach --mode sampled`; `LEAKTRACE_SOAK_MINUTES` sets the length) runs only when
        /// named.
        #[arg(long, value_name = "TEXT")]
        only: Option<String>,
    },
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

/// The cargo that runs xtask.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds the release binary and returns its path.
pub fn build() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "leaktrace",
        "--bin",
        "leaktrace",
    ]))?;
    Ok(root().join("target/release/leaktrace"))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { bench } => setup::setup(bench).and_then(|()| pythons::ensure()),
        Cmd::Pythons => pythons::print(),
        Cmd::Build => build().map(|p| println!("built {}", p.display())),
        Cmd::Wheel => {
            setup::setup(false)?;
            wheel::build().map(|p| println!("built {}", p.display()))
        }
        Cmd::Demo => {
            setup::setup(false)?;
            let bin = build()?;
            let python = setup::pyenv_python()?;
            let ext = ext::build_extension(&python)?;
            let script = root().join("examples/leaky_service.py");
            let out = root().join("target/demo");
            std::fs::create_dir_all(&out)?;
            let capture = out.join("leaky_service.ltc");
            println!(
                "$ sudo leaktrace run --top 10 -o {} -- {} {} {}\n",
                capture.display(),
                python.display(),
                script.display(),
                ext.display()
            );
            run(Command::new(&bin)
                .args(["run", "--top", "10", "-o"])
                .arg(&capture)
                .arg("--")
                .arg(python)
                .arg(script)
                .arg(ext))?;
            // The same trace, looked at other ways, from the capture.
            for (format, file) in [("html", "report.html"), ("flamegraph", "unfreed.svg")] {
                run(Command::new(&bin)
                    .args(["report", "-f", format, "-o"])
                    .arg(out.join(file))
                    .arg(&capture))?;
                println!("{format}: {}", out.join(file).display());
            }
            Ok(())
        }
        Cmd::Test { args } => {
            setup::setup(false)?;
            pythons::ensure()?;
            let bullseye = wheel::ensure_bullseye()?;
            // The wheel as users install it: its tests install it into fresh venvs.
            let whl = wheel::build()?;
            let bin = build()?;
            let mut c = cargo();
            c.args(["test", "--workspace"])
                .args(&args)
                .env("LEAKTRACE_BIN", bin)
                .env("LEAKTRACE_WHEEL", whl)
                .env("LEAKTRACE_AUDITWHEEL", wheel::auditwheel())
                .env("LEAKTRACE_BULLSEYE", bullseye);
            run(&mut c)?;
            // Each test fails on a missing interpreter unless skipped: these are the ones run.
            println!("CPython interpreters under test:");
            pythons::print()
        }
        Cmd::Bench { quick, only } => {
            setup::setup(true)?;
            let bin = build()?;
            bench::bench(&bin, quick, only.as_deref())
        }
    }
}
