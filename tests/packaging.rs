//! The wheel as users meet it (`pip install leaktrace`): installed into fresh venvs of this
//! machine's interpreters, its command traces a leak and its pytest plugin fails exactly the
//! leaking tests; its binary runs on an older userland (Debian bullseye, glibc 2.31) too.
//! `cargo xtask test` builds the wheel (`LEAKTRACE_WHEEL`) and the bullseye root
//! (`LEAKTRACE_BULLSEYE`) first.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn wheel() -> PathBuf {
    let w = std::env::var_os("LEAKTRACE_WHEEL")
        .map(PathBuf::from)
        .expect(
        "LEAKTRACE_WHEEL is not set: `cargo xtask test` builds the wheel (`cargo xtask wheel`) \
         and sets it",
    );
    assert!(
        w.exists(),
        "{} missing: run `cargo xtask wheel`",
        w.display()
    );
    w
}

/// A fresh venv of `python` with the wheel and pytest installed (pytest from PyPI).
fn venv_with_wheel(python: &Path, dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    succeed(Command::new(python).args(["-m", "venv"]).arg(&venv));
    let pip = venv.join("bin/pip");
    succeed(
        Command::new(&pip)
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(wheel())
            .arg("pytest>=8"),
    );
    venv
}

/// The installed command, its version from the workspace.
fn installed(venv: &Path) -> PathBuf {
    let bin = venv.join("bin/leaktrace");
    let out = succeed(Command::new(&bin).arg("--version"));
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("leaktrace {}", env!("CARGO_PKG_VERSION")),
        "installed command's version"
    );
    bin
}

/// The line of `tests/fixtures/pytest_suite/test_leaks.py` marked with `tag`.
fn suite_line(tag: &str) -> usize {
    let text = include_str!("fixtures/pytest_suite/test_leaks.py");
    1 + text
        .lines()
        .position(|l| l.contains(tag))
        .unwrap_or_else(|| panic!("{tag} not in the suite"))
}

/// Runs the fixture suite with the venv's pytest; what it printed.
fn pytest(venv: &Path, suite: &Path, ext: &Path, args: &[&str], uid: Option<u32>) -> Output {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(venv.join("bin/python"));
            c
        }
        None => Command::new(venv.join("bin/python")),
    };
    cmd.args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
        .args(args)
        .arg(suite)
        .current_dir(suite)
        .env("PYTHONPATH", ext)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The installed command is the one under test, not the workspace's.
        .env_remove("LEAKTRACE_BIN");
    cmd.output().expect("running pytest")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The failure section pytest printed for `test`.
fn failure_of<'a>(output: &'a str, test: &str) -> &'a str {
    let head = format!(" {test} ");
    let start = output
        .find(&head)
        .unwrap_or_else(|| panic!("no failure section for {test}:\n{output}"));
    let rest = &output[start + head.len()..];
    let end = rest
        .find("\n____")
        .or_else(|| rest.find("\n===="))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// auditwheel (PyPI's own checker, installed by `cargo xtask wheel`) reads the binary's
/// versioned glibc symbols: the tag must hold, glibc 2.17 (CentOS 7) and later.
#[test]
fn auditwheel_confirms_the_manylinux2014_tag() {
    let auditwheel = std::env::var_os("LEAKTRACE_AUDITWHEEL")
        .map(PathBuf::from)
        .expect("LEAKTRACE_AUDITWHEEL is not set: `cargo xtask test` sets it");
    let out = succeed(Command::new(auditwheel).arg("show").arg(wheel()));
    let said = text(&out).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        said.contains(r#"is consistent with the following platform tag: "manylinux_2_17_x86_64""#),
        "{said}"
    );
    assert!(
        wheel()
            .to_string_lossy()
            .ends_with("manylinux_2_17_x86_64.whl"),
        "the file's tag"
    );
}

#[test]
fn the_wheel_installs_into_fresh_venvs_traces_and_its_plugin_fails_the_leaking_tests() {
    let _one = serial();
    let targets: Vec<Python> = pythons()
        .into_iter()
        .filter(|p| p.version == "3.11" || p.version == "3.12")
        .collect();
    assert!(
        targets.iter().any(|p| p.version == "3.11") && targets.iter().any(|p| p.version == "3.12"),
        "the wheel is tested on 3.11 and 3.12 (tests/fixtures/pythons.txt)"
    );
    for py in &targets {
        let dir = tempfile::tempdir().unwrap();
        let venv = venv_with_wheel(&py.path, dir.path());
        let bin = installed(&venv);
        let ext = ext_dir(&py.path);

        // The installed command traces a leak in a C extension, named with its Python line.
        let prog = dir.path().join("leak.py");
        std::fs::write(
            &prog,
            "import leakyext\nfor _ in range(250):\n    leakyext.leak_malloc(8000)\n",
        )
        .unwrap();
        let json = dir.path().join("r.json");
        let out = Command::new(&bin)
            .args(["run", "--json"])
            .arg(&json)
            .arg("--")
            .arg(venv.join("bin/python"))
            .arg(&prog)
            .env("PYTHONPATH", &ext)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            py.path.display(),
            text(&out)
        );
        let r = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
            json: serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).ok(),
        };
        let site = r.site("leak_malloc", "malloc");
        assert_eq!(site["unfreed_bytes"], 2_000_000, "{}", py.path.display());
        assert!(
            site["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["line"] == 3
                    && f["filename"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("leak.py"))),
            "{}: the site names leak.py:3: {site}",
            py.path.display()
        );

        // The plugin: exactly the two leaking tests fail, each naming its line.
        let suite = dir.path().join("suite");
        std::fs::create_dir(&suite).unwrap();
        std::fs::write(
            suite.join("test_leaks.py"),
            include_str!("fixtures/pytest_suite/test_leaks.py"),
        )
        .unwrap();
        let out = pytest(&venv, &suite, &ext, &["--leaktrace"], None);
        let all = text(&out);
        let who = py.path.display();
        assert!(
            all.contains("test_leaks.py::test_clean PASSED"),
            "{who}:\n{all}"
        );
        assert!(all.contains("2 failed, 1 passed"), "{who}:\n{all}");
        let c = failure_of(&all, "test_c_extension_leak");
        assert!(
            c.contains(&format!("test_leaks.py:{}", suite_line("LEAK-C")))
                && c.contains("leak_malloc"),
            "{who}: the C leak's failure names its line and function:\n{c}"
        );
        assert!(
            c.contains("2,048,000 B in 250 blocks from malloc"),
            "{who}:\n{c}"
        );
        let p = failure_of(&all, "test_python_objects_leak");
        assert!(
            p.contains(&format!("test_leaks.py:{}", suite_line("LEAK-PY"))),
            "{who}: the Python leak's failure names its line:\n{p}"
        );
        assert!(
            all.contains("leaktrace: attached in")
                && all.contains("3 marked test(s) checked, 2 over"),
            "{who}: the summary line:\n{all}"
        );

        assert!(
            !all.contains("cannot be redirected"),
            "{who}: small objects through the redirect, not the fallback:\n{all}"
        );
        if py.version == "3.12" {
            lost_tracer(&venv, dir.path(), &ext);
        }

        // Without --leaktrace the marker does nothing.
        let out = pytest(&venv, &suite, &ext, &[], None);
        assert!(text(&out).contains("3 passed"), "{who}:\n{}", text(&out));

        // Without the privileges eBPF needs, the marked tests are skipped, saying why (as
        // nobody, with Debian's interpreter: pyenv's live in root's home).
        if py.build == Build::Stripped {
            for d in [dir.path(), suite.as_path()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            let out = pytest(&venv, &suite, &ext, &["--leaktrace", "-rs"], Some(65534));
            let all = text(&out);
            assert!(all.contains("3 skipped"), "{who} as nobody:\n{all}");
            assert!(
                all.contains("leaktrace needs root"),
                "{who} as nobody: the skip says what is missing:\n{all}"
            );
        }
    }
}

/// leaktrace killed under a marked test: that test fails saying so, the next marked one is
/// skipped saying why, an unmarked one runs; nothing is left running.
fn lost_tracer(venv: &Path, dir: &Path, ext: &Path) {
    let suite = dir.join("lost");
    std::fs::create_dir(&suite).unwrap();
    std::fs::write(
        suite.join("test_lost.py"),
        include_str!("fixtures/pytest_lost/test_lost.py"),
    )
    .unwrap();
    let out = pytest(venv, &suite, ext, &["--leaktrace", "-rs"], None);
    let all = text(&out);
    assert!(all.contains("test_tracer_killed_under_it FAILED"), "{all}");
    assert!(all.contains("test_marked_after SKIPPED"), "{all}");
    assert!(all.contains("test_unmarked_after PASSED"), "{all}");
    assert!(
        failure_of(&all, "test_tracer_killed_under_it")
            .contains("leaktrace stopped during the session"),
        "{all}"
    );
}

#[test]
fn the_wheel_installs_and_runs_on_debian_bullseye() {
    let _one = serial();
    let rootfs = PathBuf::from(std::env::var_os("LEAKTRACE_BULLSEYE").expect(
        "LEAKTRACE_BULLSEYE is not set: `cargo xtask test` makes the bullseye root and sets it",
    ));
    assert!(
        rootfs.join("usr/bin/python3").exists(),
        "{} has no python3",
        rootfs.display()
    );
    // Inside the root, in a directory of this test's own: the wheel as downloaded.
    let inside = format!("/opt/leaktrace-test-{}", std::process::id());
    let here = rootfs.join(inside.trim_start_matches('/'));
    std::fs::create_dir_all(&here).unwrap();
    let whl = wheel();
    let name = whl.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::copy(&whl, here.join(&name)).unwrap();
    std::fs::write(
        here.join("leak.py"),
        "import ctypes\nlibc = ctypes.CDLL('libc.so.6')\nlibc.malloc.restype = ctypes.c_void_p\n\
         kept = [libc.malloc(8000) for _ in range(250)]\n",
    )
    .unwrap();
    // A mount namespace of its own: /proc, /sys and tracefs inside the root, gone with it.
    // Bullseye's own pip (20.3, from its python3-venv) installs the wheel into a venv of its
    // Python 3.9, offline, and the installed command traces a program there.
    let r = rootfs.display();
    let script = format!(
        "set -e; mount -t proc proc {r}/proc; mount -t sysfs sys {r}/sys; \
         mount -t tracefs tracefs {r}/sys/kernel/tracing; mount --bind /dev {r}/dev; \
         chroot {r} python3 -m venv {inside}/venv; \
         chroot {r} {inside}/venv/bin/pip install -q --no-index --disable-pip-version-check \
         {inside}/{name}; \
         exec chroot {r} {inside}/venv/bin/leaktrace run --json {inside}/r.json -- python3 \
         {inside}/leak.py"
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let report = std::fs::read_to_string(here.join("r.json"));
    let _ = std::fs::remove_dir_all(&here);
    assert!(out.status.success(), "in bullseye: {}", text(&out));
    let json: serde_json::Value = serde_json::from_str(&report.unwrap()).unwrap();
    assert!(
        json["target"]["libc"]
            .as_str()
            .is_some_and(|l| l.contains("libc-2.31")),
        "bullseye's glibc 2.31 is the target's: {}",
        json["target"]
    );
    assert_eq!(json["target"]["python"], "3.9", "bullseye's python3");
    let leak = json["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["allocator"] == "malloc" && s["unfreed_bytes"] == 2_000_000)
        .unwrap_or_else(|| panic!("no 2,000,000 B malloc site: {}", text(&out)));
    assert_eq!(leak["unfreed_count"], 250);
    // Python 3.9's frames are not walked (3.11+), and that is said; nothing is lost.
    assert_eq!(json["dropped"], 0, "{}", text(&out));
    assert!(
        json["notes"].as_array().unwrap().iter().any(|n| n
            .as_str()
            .unwrap_or("")
            .contains("Python 3.9 is not supported")),
        "the report says why there are no Python frames: {}",
        json["notes"]
    );
}
