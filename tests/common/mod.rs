//! Helpers shared by the integration tests: real interpreters, the leaky test extension built for
//! each, running the real `leaktrace` binary, and reading a process's code to see whether a
//! uprobe's breakpoint is still there.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The leaktrace binary under test: `LEAKTRACE_BIN` (`cargo xtask test` points it at the release
/// build users run), else the one cargo built for the tests.
/// Runs `cmd` to completion and returns its output, failing the test with its stderr if it
/// could not start or did not succeed.
pub fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} could not start: {e} (`cargo xtask setup` installs what tests run)")
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    // Tests that trace for seconds on a 2-core machine run one at a time: timing stays sane.
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn leaktrace_bin() -> PathBuf {
    std::env::var_os("LEAKTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_leaktrace")))
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// How an interpreter was built: what leaktrace can find in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// A full symbol table (pyenv's builds).
    Symbols,
    /// Dynamic symbols only, LTO (Debian's release builds).
    Stripped,
    /// `--with-pydebug`, with symbols (Debian's python3.Xd).
    Debug,
}

/// One interpreter the tests run on (tests/fixtures/pythons.txt).
#[derive(Clone, Debug)]
pub struct Python {
    /// `3.14`, as listed.
    pub version: String,
    pub build: Build,
    pub path: PathBuf,
}

/// Every interpreter of tests/fixtures/pythons.txt, the list `cargo xtask setup` provides and
/// `cargo xtask pythons` prints. A missing one fails the test unless `LEAKTRACE_SKIP_PYTHONS`
/// names its version; each skipped one is said on stderr.
pub fn pythons() -> Vec<Python> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let skip = std::env::var("LEAKTRACE_SKIP_PYTHONS").unwrap_or_default();
    let skip: Vec<&str> = skip.split([',', ' ']).filter(|s| !s.is_empty()).collect();
    let mut v = Vec::new();
    for line in include_str!("../fixtures/pythons.txt").lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [version, build, path] = f[..] else {
            panic!("bad line in tests/fixtures/pythons.txt: {line}");
        };
        let path = match path.strip_prefix("~/") {
            Some(rest) => Path::new(&home).join(rest),
            None => PathBuf::from(path),
        };
        if skip.contains(&version) {
            eprintln!("note: {} skipped (LEAKTRACE_SKIP_PYTHONS)", path.display());
            continue;
        }
        assert!(
            path.exists(),
            "{} (CPython {version}) missing: run `cargo xtask setup`, or set \
             LEAKTRACE_SKIP_PYTHONS={version}",
            path.display()
        );
        let build = match build {
            "symbols" => Build::Symbols,
            "stripped" => Build::Stripped,
            "debug" => Build::Debug,
            other => panic!("unknown build {other} in tests/fixtures/pythons.txt"),
        };
        v.push(Python {
            version: version.to_string(),
            build,
            path,
        });
    }
    v
}

/// The interpreters with a symbol table: pyenv's 3.11–3.13 and Debian's debug 3.14 and 3.15.
pub fn pythons_with_symbols() -> Vec<PathBuf> {
    pythons()
        .into_iter()
        .filter(|p| p.build != Build::Stripped)
        .map(|p| p.path)
        .collect()
}

/// pyenv's CPython 3.11.7 (shared libpython, full symbol table): the real binary, not the shim.
pub fn pyenv_python() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".pyenv/versions/3.11.7/bin/python3.11");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// Debian's python3.11: a static, LTO-built, stripped executable.
pub fn debian_python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3.11");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// Builds tests/fixtures/leakyext.c for `python` (once per test binary) and returns the
/// directory to put on `sys.path`.
pub fn ext_dir(python: &Path) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<PathBuf, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(d) = built.get(python) {
        return d.clone();
    }
    let q = |code: &str| -> String {
        let out = succeed(Command::new(python).args(["-c", code]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let include = q("import sysconfig; print(sysconfig.get_paths()['include'])");
    let suffix = q("import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))");
    let exe = std::env::current_exe().unwrap();
    let tag = format!(
        "{}-{}",
        exe.file_name().unwrap().to_string_lossy(),
        python.to_string_lossy().replace('/', "_")
    );
    let dir = workspace().join("target/test-ext").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    succeed(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-g", "-fomit-frame-pointer"])
            .arg(format!("-I{include}"))
            // Debian's multiarch pyconfig.h includes <x86_64-linux-gnu/python3.X/pyconfig.h>,
            // which is found from the directory above on a relocated tree too.
            .arg(format!("-I{include}/.."))
            .arg(workspace().join("tests/fixtures/leakyext.c"))
            .arg("-o")
            .arg(dir.join(format!("leakyext{suffix}"))),
    );
    built.insert(python.to_path_buf(), dir.clone());
    dir
}

/// Compiles a C program with gcc and `flags`; the binary lives as long as the returned directory.
pub fn compile_c(source: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("prog.c");
    std::fs::write(&src, source).unwrap();
    let bin = dir.path().join("prog");
    succeed(
        Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(&src),
    );
    (dir, bin)
}

/// Writes a script to a temporary file that lives as long as the returned guard.
pub fn script(body: &str) -> tempfile::TempPath {
    let f = tempfile::Builder::new().suffix(".py").tempfile().unwrap();
    std::fs::write(f.path(), body).unwrap();
    f.into_temp_path()
}

/// A finished leaktrace run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub json: Option<Value>,
}

impl Run {
    /// Sites whose caller is `function` (exactly, or as an inlined function at the call).
    pub fn sites(&self, function: &str) -> Vec<&Value> {
        self.json.as_ref().expect("report JSON")["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["caller"]["function"] == function
                    || s["caller"]["inlined"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|i| i == function))
            })
            .collect()
    }

    /// The sites whose caller is `function` and allocator is `allocator`, merged into one: the
    /// same native call site reached from different Python stacks is several sites.
    pub fn site(&self, function: &str, allocator: &str) -> Value {
        let all: Vec<&Value> = self
            .sites(function)
            .into_iter()
            .filter(|s| s["allocator"] == allocator)
            .collect();
        assert!(
            !all.is_empty(),
            "no {allocator} site in {function}:\n{}",
            self.stdout
        );
        let mut merged = all[0].clone();
        for key in [
            "unfreed_bytes",
            "unfreed_count",
            "allocs",
            "alloc_bytes",
            "frees",
        ] {
            let sum: u64 = all.iter().map(|s| s[key].as_u64().unwrap()).sum();
            merged[key] = sum.into();
        }
        merged
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.json.as_ref().unwrap()["counters"][name]
            .as_u64()
            .unwrap()
    }
}

/// Runs leaktrace with `args`, asking for a JSON report.
pub fn leaktrace(args: &[&str]) -> Run {
    leaktrace_under(&[], args)
}

/// Runs leaktrace with `args` under a wrapper command (`unshare …`), asking for a JSON report.
pub fn leaktrace_under(wrapper: &[&str], args: &[&str]) -> Run {
    let json = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (head, tail) = match args.iter().position(|a| *a == "--") {
        Some(i) => (&args[..i], &args[i..]),
        None => (args, &[][..]),
    };
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(leaktrace_bin());
            c
        }
        None => Command::new(leaktrace_bin()),
    };
    let out = cmd
        .args(head)
        .arg("--json")
        .arg(&*json)
        .args(tail)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        json: serde_json::from_str(&text).ok(),
    };
    eprintln!(
        "--- leaktrace {args:?} → {}\n{}\n{}",
        run.code, run.stdout, run.stderr
    );
    run
}

/// A leaktrace running in the background, started by [`Tracer::spawn`].
pub struct Tracer {
    child: Child,
    json: tempfile::TempPath,
    stderr: std::thread::JoinHandle<String>,
    /// What it printed on stderr so far.
    said: std::sync::Arc<std::sync::Mutex<String>>,
}

/// What leaktrace prints with `--verbose` once every probe is attached: tracing is under way.
const ATTACHED: &str = "phase: start the target, plan and attach the probes";

impl Tracer {
    /// Starts `leaktrace ARGS --verbose --json FILE` and returns once its probes are attached,
    /// so a test's next step (a kill, a scrape) falls inside the window however slowly the
    /// kernel attached them.
    pub fn spawn(args: &[&str]) -> Tracer {
        let json = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let mut child = Command::new(leaktrace_bin())
            .args(args)
            .arg("--verbose")
            .arg("--json")
            .arg(&*json)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let so_far = said.clone();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if l.contains(ATTACHED) {
                    let _ = tx.send(());
                }
                text.push_str(&l);
                text.push('\n');
                let mut s = so_far.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
            text
        });
        // Either it attached, or it ended (the sender dropped) and `finish` shows why.
        let _ = rx.recv_timeout(Duration::from_secs(60));
        Tracer {
            child,
            json,
            stderr,
            said,
        }
    }

    /// What it printed on stderr so far.
    pub fn said(&self) -> String {
        self.said.lock().unwrap().clone()
    }

    /// Waits up to `secs` for a line of its stderr to contain `needle`.
    pub fn wait_said(&self, needle: &str, secs: u64) -> bool {
        wait_for(secs, || self.said.lock().unwrap().contains(needle))
    }

    /// The tracer's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the tracer to end and returns its run.
    pub fn finish(self) -> Run {
        let out = self.child.wait_with_output().unwrap();
        let stderr = self.stderr.join().unwrap();
        let text = std::fs::read_to_string(&self.json).unwrap_or_default();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
            json: serde_json::from_str(&text).ok(),
        };
        eprintln!(
            "--- leaktrace → {}\n{}\n{}",
            run.code, run.stdout, run.stderr
        );
        run
    }
}

/// A child process killed when the test ends, pass or fail.
pub struct Target(pub Child);

impl Target {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `leaktrace run FLAGS… -- PYTHON SCRIPT ARGS…`, with every site in the report unless FLAGS
/// set `--top`.
pub fn run_python(flags: &[&str], python: &Path, script: &Path, args: &[&str]) -> Run {
    let mut argv: Vec<&str> = vec!["run"];
    argv.extend_from_slice(flags);
    if !flags.contains(&"--top") {
        argv.extend_from_slice(&["--top", "1000000"]);
    }
    argv.push("--");
    argv.push(python.to_str().unwrap());
    argv.push(script.to_str().unwrap());
    argv.extend_from_slice(args);
    leaktrace(&argv)
}

/// Starts `python script args…` and waits until it prints a line containing `READY`.
pub fn start_ready(python: &Path, script: &Path, args: &[&str]) -> Target {
    start_ready_with(python, script, args, &[])
}

/// `start_ready` with variables added to the environment.
pub fn start_ready_with(
    python: &Path,
    script: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Target {
    start_ready_cmd(
        Command::new(python)
            .arg(script)
            .args(args)
            .envs(env.iter().copied()),
    )
}

/// Starts `cmd` and waits until it prints a line containing `READY`.
pub fn start_ready_cmd(cmd: &mut Command) -> Target {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "target never became ready");
        match lines.next() {
            Some(Ok(l)) if l.contains("READY") => break,
            Some(_) => continue,
            None => panic!("target exited before READY"),
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Target(child)
}

/// Whether a process is still running (not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_of(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The state letter and parent pid of `pid`, from `/proc/PID/stat`.
pub fn stat_of(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?))
}

/// The command name of `pid` (`/proc/PID/comm`, without its newline).
pub fn comm(pid: u32) -> Option<String> {
    let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(c.trim_end().to_string())
}

/// Every process now: (pid, state letter, parent pid).
pub fn processes() -> Vec<(u32, char, u32)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(|pid| stat_of(pid).map(|(state, ppid)| (pid, state, ppid)))
        .collect()
}

/// The first byte of `symbol` in `module` as mapped in process `pid`, next to the byte in the
/// file. A uprobe shows as 0xCC in memory; detaching must restore the original byte. `offset` is
/// added to the symbol (probes may sit past the first instruction).
pub fn code_byte(pid: u32, module_suffix: &str, file_offset: u64) -> (u8, u8) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[5].ends_with(module_suffix) || !f[1].contains('x') {
            continue;
        }
        let (s, e) = f[0].split_once('-').unwrap();
        let start = u64::from_str_radix(s, 16).unwrap();
        let end = u64::from_str_radix(e, 16).unwrap();
        let off = u64::from_str_radix(f[2], 16).unwrap();
        if file_offset < off || file_offset >= off + (end - start) {
            continue;
        }
        let addr = start + (file_offset - off);
        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, addr).unwrap();
        let file = std::fs::read(f[5]).unwrap();
        return (b[0], file[file_offset as usize]);
    }
    panic!("{module_suffix} offset {file_offset:#x} not mapped in {pid}");
}

/// The probe points leaktrace reported with `--verbose`: (function, module, file offset).
pub fn probe_points(stderr: &str) -> Vec<(String, String, u64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("leaktrace:   ")?;
            let (head, off) = l.rsplit_once(" @0x")?;
            let func = head.split_whitespace().next()?.to_string();
            let module = head.rsplit_once(' ')?.1.to_string();
            Some((func, module, u64::from_str_radix(off, 16).ok()?))
        })
        .collect()
}

/// Sends a signal to a process.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until `cond` holds or `secs` pass.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// The byte at each probe point in the target's memory, with the file's byte: equal pairs mean
/// no breakpoint is left there.
pub fn probe_bytes(pid: u32, points: &[(String, String, u64)]) -> Vec<(String, u8, u8)> {
    points
        .iter()
        .map(|(f, module, off)| {
            let (mem, file) = code_byte(pid, module, *off);
            (f.clone(), mem, file)
        })
        .collect()
}

/// `len` bytes at `at` in process `pid`, through /proc/PID/mem.
pub fn mem_bytes(pid: u32, at: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

/// The unsigned integer field `k` of a JSON object.
pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}
