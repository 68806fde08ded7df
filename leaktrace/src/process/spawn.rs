//! Starting a command under leaktrace: stopped until its probes are attached, and held at exit
//! until its last events are read.
//!
//! The child runs under ptrace only for two moments. At exec the C library and libpython are not
//! mapped yet, so the child is run to its entry point (a one-byte breakpoint at `AT_ENTRY`): the
//! dynamic loader has mapped every `DT_NEEDED` library by then. And `PTRACE_O_TRACEEXIT` stops it
//! at exit while its memory maps still exist, so the sites it announced last are symbolized
//! before it disappears. A wrapper that execs the real program (a pyenv shim, `env python3`) is
//! followed the same way: stopped at the new program's entry so its libraries get probed.
//!
//! The child never dies with leaktrace: there is no `PTRACE_O_EXITKILL`. When a tracer dies
//! the kernel resumes a tracee held in any of these stops and drops the signal that stopped it
//! (checked on this kernel for SIGSTOP, SIGTRAP and others), so a killed leaktrace leaves its
//! child running, untraced. Every ptrace request must come from the thread that spawned the
//! child, hence one dedicated thread talking to the async session through channels.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Error, Result};

/// What the spawner thread tells the session.
#[derive(Debug)]
pub enum SpawnEvent {
    /// The child is stopped at its entry point with its libraries mapped.
    Ready(u32),
    /// The child exec'd a new program and is stopped at its entry point. Reply `Control::Go`.
    Exec,
    /// The child stopped with SIGSTOP: leaktrace's own pause at interpreter shutdown, or a real
    /// job-control stop. Reply `Control::Release` (the pause is swallowed) or
    /// `Control::Deliver` (a real stop: pass it on).
    Stopped,
    /// The child is taking a signal (passed on to it at once; no reply).
    Signal(Signal),
    /// The child is about to exit; its maps are still readable. Reply `Control::Release`.
    Exiting,
    /// The child is gone.
    Exited(ExitKind),
    /// Starting the child failed.
    Failed(Error),
}

/// How the child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => {
                let name = Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by {name}")
            }
        }
    }
}

/// What the session tells the spawner thread.
#[derive(Debug)]
pub enum Control {
    /// Probes are attached: let the child run.
    Go,
    /// Final events are read: let the child go on.
    Release,
    /// The stop was not leaktrace's: deliver the signal.
    Deliver,
    /// Setup failed: kill the child.
    Abort,
}

/// Spawns `argv` (with `env` added to leaktrace's environment) on a new thread; events arrive
/// on `events`.
pub fn spawn(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    events: UnboundedSender<SpawnEvent>,
) -> mpsc::Sender<Control> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("leaktrace-spawn".into())
        .spawn(move || {
            if let Err(e) = run(&argv, env, &events, &rx) {
                let _ = events.send(SpawnEvent::Failed(e));
            }
        })
        .expect("spawning a thread");
    tx
}

fn spawn_error(argv: &[String], detail: impl std::fmt::Display) -> Error {
    Error::Spawn {
        cmd: argv.join(" "),
        source: std::io::Error::other(detail.to_string()),
    }
}

fn run(
    argv: &[String],
    env: Vec<(String, String)>,
    events: &UnboundedSender<SpawnEvent>,
    rx: &mpsc::Receiver<Control>,
) -> Result<(), Error> {
    let pid = start_traced(argv, env)?;
    let _ = events.send(SpawnEvent::Ready(pid.as_raw() as u32));
    match rx.recv() {
        Ok(Control::Go) => {}
        _ => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Ok(());
        }
    }
    let _ = ptrace::cont(pid, None);
    follow(pid, argv, events, rx);
    Ok(())
}

/// Starts `argv` under ptrace and runs it to its executable's entry point, where it stops with
/// every library mapped.
fn start_traced(argv: &[String], env: Vec<(String, String)>) -> Result<Pid, Error> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| ptrace::traceme().map_err(std::io::Error::from));
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        cmd: argv.join(" "),
        source,
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    // The child stops with SIGTRAP once execve succeeded.
    match waitpid(pid, None) {
        Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {}
        other => {
            return Err(spawn_error(
                argv,
                format!("unexpected state after exec: {other:?}"),
            ))
        }
    }
    ptrace::setoptions(
        pid,
        ptrace::Options::PTRACE_O_TRACEEXIT | ptrace::Options::PTRACE_O_TRACEEXEC,
    )
    .map_err(|e| spawn_error(argv, format!("ptrace options: {e}")))?;
    if let Err(e) = run_to_entry(pid) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        // The why, without the "internal error" label: a command that exits before its entry
        // point is the command's doing.
        let why = match e {
            Error::Internal(why) => why,
            other => other.to_string(),
        };
        return Err(spawn_error(argv, why));
    }
    Ok(pid)
}

/// Follows the running child through its ptrace stops until it is gone, telling the session
/// what happens and doing what it answers.
fn follow(
    pid: Pid,
    argv: &[String],
    events: &UnboundedSender<SpawnEvent>,
    rx: &mpsc::Receiver<Control>,
) {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                let _ = events.send(SpawnEvent::Exited(ExitKind::Code(code)));
                return;
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                let _ = events.send(SpawnEvent::Exited(ExitKind::Signal(sig as i32)));
                return;
            }
            Ok(WaitStatus::PtraceEvent(_, _, ev))
                if ev == ptrace::Event::PTRACE_EVENT_EXIT as i32 =>
            {
                let _ = events.send(SpawnEvent::Exiting);
                // Whatever the answer (or none, if the session is gone), let it finish.
                let _ = rx.recv();
                let _ = ptrace::cont(pid, None);
            }
            Ok(WaitStatus::PtraceEvent(_, _, ev))
                if ev == ptrace::Event::PTRACE_EVENT_EXEC as i32 =>
            {
                // A wrapper (a pyenv shim, `env`, a shell) exec'd the real program: its libraries
                // are new, so stop it again at its entry and let the session probe them.
                if run_to_entry(pid).is_ok() {
                    let _ = events.send(SpawnEvent::Exec);
                    let _ = rx.recv();
                }
                let _ = ptrace::cont(pid, None);
            }
            Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {
                let _ = events.send(SpawnEvent::Stopped);
                let deliver = matches!(rx.recv(), Ok(Control::Deliver));
                let _ = ptrace::cont(pid, deliver.then_some(Signal::SIGSTOP));
            }
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal for the child: deliver it.
                let _ = events.send(SpawnEvent::Signal(sig));
                let _ = ptrace::cont(pid, Some(sig));
            }
            Ok(_) => {
                let _ = ptrace::cont(pid, None);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                let _ = events.send(SpawnEvent::Failed(spawn_error(
                    argv,
                    format!("waitpid: {e}"),
                )));
                return;
            }
        }
    }
}

/// Reads `AT_ENTRY` from the child's auxiliary vector.
fn entry_point(pid: Pid) -> Result<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| Error::Internal(format!("auxv: {e}")))?;
    auxv.chunks_exact(16)
        .map(|c| {
            (
                u64::from_ne_bytes(c[..8].try_into().unwrap()),
                u64::from_ne_bytes(c[8..].try_into().unwrap()),
            )
        })
        .find(|(k, _)| *k == libc::AT_ENTRY)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Internal("no AT_ENTRY in auxv".into()))
}

/// Runs the stopped child until its executable's entry point, then puts the code back.
fn run_to_entry(pid: Pid) -> Result<()> {
    let entry = entry_point(pid)?;
    let addr = entry as ptrace::AddressType;
    let orig =
        ptrace::read(pid, addr).map_err(|e| Error::Internal(format!("reading entry: {e}")))?;
    let trapped = (orig & !0xff) | 0xcc;
    ptrace::write(pid, addr, trapped as _)
        .map_err(|e| Error::Internal(format!("writing entry: {e}")))?;
    ptrace::cont(pid, None).map_err(|e| Error::Internal(format!("cont: {e}")))?;
    loop {
        match waitpid(pid, None).map_err(|e| Error::Internal(format!("waitpid: {e}")))? {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => {
                let mut regs =
                    ptrace::getregs(pid).map_err(|e| Error::Internal(format!("getregs: {e}")))?;
                if regs.rip != entry + 1 {
                    ptrace::cont(pid, None).map_err(|e| Error::Internal(format!("cont: {e}")))?;
                    continue;
                }
                ptrace::write(pid, addr, orig as _)
                    .map_err(|e| Error::Internal(format!("restoring entry: {e}")))?;
                regs.rip = entry;
                ptrace::setregs(pid, regs).map_err(|e| Error::Internal(format!("setregs: {e}")))?;
                return Ok(());
            }
            WaitStatus::Stopped(_, sig) => {
                ptrace::cont(pid, Some(sig)).map_err(|e| Error::Internal(format!("cont: {e}")))?;
            }
            WaitStatus::Exited(_, code) => {
                return Err(Error::Internal(format!(
                    "exited with code {code} before reaching main"
                )))
            }
            WaitStatus::Signaled(_, sig, _) => {
                return Err(Error::Internal(format!(
                    "killed by {sig} before reaching main"
                )))
            }
            WaitStatus::PtraceEvent(..) => {
                ptrace::cont(pid, None).map_err(|e| Error::Internal(format!("cont: {e}")))?;
            }
            _ => {}
        }
    }
}
