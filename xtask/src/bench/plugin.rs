//! What `pytest --leaktrace` adds to a test session: the fixture suite of three marked tests
//! (tests/fixtures/pytest_suite: a C-extension leak, a Python-object leak, a clean test), run
//! with and without the plugin, alternating, in a venv of the pyenv interpreter with pytest.
//! The plugin and binary are this tree's (the wheel carries the same two files).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use super::{median, probes_gone};
use crate::{root, run};

pub fn run_plugin(
    leaktrace: &Path,
    python: &Path,
    ext: &Path,
    reps: usize,
    scratch: &Path,
) -> Result<()> {
    let venv = root().join("target/bench/pytest-venv");
    if !venv.join("bin/pytest").exists() {
        run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "pytest>=8",
        ]))?;
    }
    let suite = scratch.join("pytest_suite");
    std::fs::create_dir_all(&suite)?;
    std::fs::copy(
        root().join("tests/fixtures/pytest_suite/test_leaks.py"),
        suite.join("test_leaks.py"),
    )?;
    // `ext` is the folder the test extension was built into.
    let pythonpath = format!(
        "{}:{}",
        root().join("leaktrace/python").display(),
        ext.display()
    );
    let session = |traced: bool| -> Result<f64> {
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "leaktrace.pytest_plugin",
        ])
        .arg(&suite)
        .current_dir(&suite)
        .env("PYTHONPATH", &pythonpath)
        .env("PYTHONDONTWRITEBYTECODE", "1");
        if traced {
            cmd.arg("--leaktrace")
                .arg(format!("--leaktrace-bin={}", leaktrace.display()));
        }
        let t = Instant::now();
        let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if traced {
            "2 failed, 1 passed"
        } else {
            "3 passed"
        };
        anyhow::ensure!(
            text.contains(want),
            "pytest (traced: {traced}) did not end with {want}:\n{text}"
        );
        Ok(secs)
    };
    let (mut plain, mut traced) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        plain.push(session(false)?);
        probes_gone()?;
        traced.push(session(true)?);
    }
    let (p, t) = (median(&mut plain), median(&mut traced));
    println!("\n### pytest plugin (`--only pytest-plugin`), medians of {reps}\n");
    println!("| session (3 marked tests, tests/fixtures/pytest_suite) | seconds |\n|---|---|");
    println!("| `pytest` | {p:.2} s |");
    println!("| `pytest --leaktrace` | {t:.2} s ({:+.2} s) |", t - p);
    Ok(())
}
