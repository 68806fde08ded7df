//! The CPython interpreters the tests run on (`tests/fixtures/pythons.txt`, shared with the
//! tests), and the installation of those the machine image lacks.
//!
//! CPython 3.14 and 3.15 come from Debian sid's binary packages: this machine reaches Debian's
//! archive but not python.org, and sid's source packages are not served here (tried: `apt-get
//! source` and the pool's `.orig.tar.xz` both answer 404). sid's interpreters need glibc 2.38 and
//! bookworm has 2.36, so sid's libc6 and the libraries the interpreter and its extension modules
//! load are unpacked beside each, and every ELF file there is pointed at them (`patchelf`: the
//! program interpreter and the run path). The process is then a real Debian build, with sid's
//! libc: leaktrace probes whichever libc the target maps. No free-threaded (3.14t) build is
//! packaged by Debian, and none can be built without CPython's source.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// The shared list: `VERSION  BUILD  PATH` lines.
const LIST: &str = include_str!("../../tests/fixtures/pythons.txt");

/// Where sid's interpreters and their libraries are unpacked: one root per version.
const SID_ROOTS: &str = "/opt/leaktrace/python";

/// The versions taken from sid.
const SID_VERSIONS: &[&str] = &["3.14", "3.15"];

/// sid's packages unpacked with each version (`{v}` is the version): the interpreter (release
/// and debug builds), its headers, and the libraries it and its extension modules need at a
/// version bookworm lacks.
const SID_PACKAGES: &[&str] = &[
    "python{v}-minimal",
    "libpython{v}-minimal",
    "libpython{v}-stdlib",
    "python{v}",
    "libpython{v}",
    "python{v}-dev",
    "libpython{v}-dev",
    "python{v}-dbg",
    "libpython{v}-dbg",
    "libc6",
    "libgcc-s1",
    "libssl3t64",
    "libffi8",
    "libmpdec4",
    "libsqlite3-0",
    "libexpat1",
    "zlib1g",
    "libzstd1",
    "liblzma5",
    "libbz2-1.0",
    "libuuid1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8t64",
    "libcrypt1",
    "libb2-1",
    "libgomp1",
];

/// The root sid's `version` is unpacked under.
fn sid_root(version: &str) -> PathBuf {
    PathBuf::from(format!("{SID_ROOTS}{version}"))
}

/// One interpreter of the list.
pub struct Python {
    /// `3.14`: the version the list asks for.
    pub version: String,
    /// `symbols`, `stripped` or `debug`.
    pub build: String,
    pub path: PathBuf,
}

/// The interpreters the tests run on, `~` expanded.
pub fn listed() -> Vec<Python> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    LIST.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (version, build, path) = (f.next()?, f.next()?, f.next()?);
            let path = match path.strip_prefix("~/") {
                Some(rest) => Path::new(&home).join(rest),
                None => PathBuf::from(path),
            };
            Some(Python {
                version: version.into(),
                build: build.into(),
                path,
            })
        })
        .collect()
}

/// Versions `LEAKTRACE_SKIP_PYTHONS` (comma- or space-separated) asks the tests to skip.
pub fn skipped() -> Vec<String> {
    std::env::var("LEAKTRACE_SKIP_PYTHONS")
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The exact version an interpreter reports, or why it cannot run.
pub fn exact_version(python: &Path) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", "import platform; print(platform.python_version())"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} fails: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `cargo xtask pythons`: one line per interpreter the tests use, `VERSION PATH`; fails naming
/// each one that is missing and not skipped.
pub fn print() -> Result<()> {
    let skip = skipped();
    let mut missing = Vec::new();
    for p in listed() {
        if skip.contains(&p.version) {
            println!(
                "{} {} (skipped: LEAKTRACE_SKIP_PYTHONS)",
                p.version,
                p.path.display()
            );
            continue;
        }
        match exact_version(&p.path) {
            Ok(v) => println!("{v} {}", p.path.display()),
            Err(e) => missing.push(format!("{} ({}): {e:#}", p.version, p.build)),
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing interpreters (`cargo xtask setup` installs them; LEAKTRACE_SKIP_PYTHONS=VERSION \
             skips one):\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// Provides every listed interpreter: pyenv's and Debian's come with the machine image (a clear
/// error if not), 3.14 and 3.15 are unpacked from sid once and kept outside the work tree.
pub fn ensure() -> Result<()> {
    let skip = skipped();
    for p in listed() {
        if skip.contains(&p.version) || exact_version(&p.path).is_ok() {
            continue;
        }
        if let Some(v) = SID_VERSIONS
            .iter()
            .find(|v| p.path.starts_with(sid_root(v)))
        {
            install_sid(v)?;
            exact_version(&p.path)?;
        } else {
            bail!(
                "{} is missing: the machine image provides CPython {} there (or set \
                 LEAKTRACE_SKIP_PYTHONS={})",
                p.path.display(),
                p.version,
                p.version
            );
        }
    }
    Ok(())
}

/// Downloads sid's packages with apt (signatures and hashes checked against Debian's keyring),
/// unpacks them into a fresh root for `version` and points every ELF file there at sid's loader and
/// libraries.
fn install_sid(version: &str) -> Result<()> {
    let root = sid_root(version);
    eprintln!(
        "xtask setup: unpacking CPython {version} from Debian sid into {}",
        root.display()
    );
    let work = Path::new("/opt/leaktrace/sid-apt");
    let debs = work.join("debs");
    for d in [work.join("lists/partial"), debs.clone()] {
        std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    std::fs::write(
        work.join("sid.sources"),
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.arg("-qq")
            .arg("-o")
            .arg("Dir::Etc::sourcelist=/dev/null")
            .arg("-o")
            .arg(format!("Dir::Etc::sourceparts={}", work.display()))
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                work.join("lists").display()
            ))
            .arg("-o")
            .arg("APT::Sandbox::User=root")
            .args(args)
            .current_dir(&debs);
        c
    };
    run(&mut apt(&["update"])).context("apt-get update (sid's package lists)")?;
    for old in std::fs::read_dir(&debs)? {
        std::fs::remove_file(old?.path())?;
    }
    let mut download = apt(&["download"]);
    download.args(SID_PACKAGES.iter().map(|p| p.replace("{v}", version)));
    run(&mut download).with_context(|| format!("apt-get download (sid's CPython {version})"))?;
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    for deb in std::fs::read_dir(&debs)? {
        let deb = deb?.path();
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    relink(&root)
}

/// Points the interpreters, their extension modules and the unpacked libraries at sid's
/// loader and libraries; sid's libc and loader themselves are left as they are.
fn relink(root: &Path) -> Result<()> {
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    let loader = root.join("usr/lib64/ld-linux-x86-64.so.2");
    if !loader.exists() {
        bail!("sid's libc6 has no {}", loader.display());
    }
    let mut elves = Vec::new();
    collect_elves(&root.join("usr/bin"), &mut elves)?;
    collect_elves(&root.join("usr/lib"), &mut elves)?;
    for f in elves {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libc.so") || name.starts_with("ld-linux") {
            continue;
        }
        let mut c = Command::new("patchelf");
        c.arg("--set-rpath").arg(&lib);
        if f.starts_with(root.join("usr/bin")) {
            c.arg("--set-interpreter").arg(&loader);
        }
        run(c.arg(&f)).with_context(|| format!("patchelf {}", f.display()))?;
    }
    Ok(())
}

/// Regular files under `dir` that begin with the ELF magic and are dynamically linked.
fn collect_elves(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        let kind = e.file_type()?;
        if kind.is_dir() {
            collect_elves(&path, out)?;
        } else if kind.is_file() && is_dynamic_elf(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_dynamic_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_elf = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    // Object files and static archives have no dynamic section for patchelf to edit.
    is_elf
        && Command::new("patchelf")
            .arg("--print-rpath")
            .arg(path)
            .output()
            .is_ok_and(|o| o.status.success())
}
