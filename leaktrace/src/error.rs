//! Errors a user can meet, each with its own exit code.

use std::path::PathBuf;

/// An error leaktrace reports to the user; `exit_code` maps it to the process's exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "leaktrace needs root, or CAP_SYS_ADMIN + CAP_SYS_PTRACE, to load BPF programs and attach \
         uprobes ({0}); run it with sudo. CAP_BPF + CAP_PERFMON load the programs, but kernels \
         may refuse a uprobe without CAP_SYS_ADMIN (6.18 does)"
    )]
    NoPrivileges(String),
    #[error("no process with PID {0} (is it still running?)")]
    NoSuchProcess(u32),
    #[error("process {pid} cannot be traced: {why}")]
    NotAProcess { pid: u32, why: String },
    #[error(
        "the kernel refuses leaktrace access to process {pid} ({path}: {source}): it may run in \
         another user namespace or be marked not dumpable; leaktrace needs the access a debugger \
         has (ptrace) to the target"
    )]
    Denied {
        pid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} exited while leaktrace was attaching: {detail}")]
    TargetExited { pid: u32, detail: String },
    #[error("process {0} is not a Python process (no libpython and no Python interpreter symbols in its mappings){1}")]
    NotPython(u32, &'static str),
    #[error("found no allocator to probe in process {pid}: {detail}")]
    NoAllocatorSymbols { pid: u32, detail: String },
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed ELF file {path}: {detail}")]
    Elf { path: PathBuf, detail: String },
    /// An output file (`--json`, `-o`, `report -o`) could not be written.
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    /// An input that should be a capture or a JSON report is not one.
    #[error("{path}: {detail}")]
    BadInput { path: PathBuf, detail: String },
    /// The target's interpreter cannot be read (unknown version, implausible layout).
    #[error("Python stacks unavailable: {0}")]
    PythonLayout(String),
    /// Something leaktrace itself failed at (a signal handler, ptrace, a renderer).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("BPF: {0}")]
    Bpf(String),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The process exit status for this error. 2 is clap's usage error; 1 is anything unforeseen.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Write { .. } | Error::BadInput { .. } => 2,
            Error::PythonLayout(_) => 6,
            Error::Internal(_) => 1,
            Error::NoPrivileges(_) | Error::Denied { .. } => 3,
            Error::NoSuchProcess(_) | Error::NotAProcess { .. } => 4,
            Error::TargetExited { .. } => 5,
            Error::NotPython(..) => 6,
            Error::NoAllocatorSymbols { .. } => 7,
            Error::Bpf(_) => 8,
            Error::Spawn { .. } => 9,
            Error::Read { .. } | Error::Elf { .. } => 1,
        }
    }
}

/// Exit status when `attach` ends because the target exited before the window closed (the
/// report of what was seen is still printed).
pub const EXIT_TARGET_EXITED_DURING_TRACE: i32 = 5;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
