//! Building the leaky test extension (tests/fixtures/leakyext.c) for an interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::root;

/// Builds the test extension for `python` into target/ and returns its directory.
pub fn build_extension(python: &Path) -> Result<PathBuf> {
    let q = |code: &str| -> Result<String> {
        let out = Command::new(python).args(["-c", code]).output()?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let include = q("import sysconfig; print(sysconfig.get_paths()['include'])")?;
    let suffix = q("import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")?;
    let dir = root().join("target/leakyext");
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-g", "-fomit-frame-pointer"])
        .arg(format!("-I{include}"))
        .arg(root().join("tests/fixtures/leakyext.c"))
        .arg("-o")
        .arg(dir.join(format!("leakyext{suffix}")))
        .status()?;
    if !status.success() {
        bail!("compiling the test extension failed");
    }
    Ok(dir)
}
