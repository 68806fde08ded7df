//! What the session loop waits on — the child `run` started, the pidfd of an attached process,
//! the window's deadline — and the environment `run` starts its child with.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use tokio::io::unix::AsyncFd;

use super::Child;
use crate::heap::Sample;
use crate::options::PyMallocMode;
use crate::probes::plan::needs_raw_malloc;
use crate::process::spawn::{Control, SpawnEvent};
use crate::report::human_bytes;

pub(super) fn reply(child: &Child, c: Control) {
    if let Some((ctl, _)) = child {
        let _ = ctl.send(c);
    }
}

/// The environment `run` adds for Python's allocator, if any: `auto` restarts a stripped
/// interpreter on libc's allocator only when every Python allocation was asked for
/// (`--python-allocators`), since that sends each small object through a probed malloc.
pub(super) fn python_malloc_env(
    argv: &[String],
    mode: PyMallocMode,
    python_calls: bool,
) -> Option<(String, String)> {
    if std::env::var_os("PYTHONMALLOC").is_some() {
        return None; // the user's own choice stands
    }
    let set = match mode {
        PyMallocMode::Keep => false,
        PyMallocMode::Malloc => true,
        PyMallocMode::Auto => {
            python_calls && resolve_command(&argv[0]).is_some_and(|p| needs_raw_malloc(&p))
        }
    };
    set.then(|| ("PYTHONMALLOC".to_string(), "malloc".to_string()))
}

/// The file `execvp` would run for `cmd`.
fn resolve_command(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        return std::fs::canonicalize(cmd).ok();
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// The `--interval` progress line.
pub fn progress_line(s: &Sample) -> String {
    format!(
        "[{:>7.1}s] live {} in {} blocks | {} allocs, {} frees | rss {} | drops {}",
        s.t,
        human_bytes(s.live_bytes),
        s.live_count,
        s.allocs,
        s.frees,
        s.rss_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
        s.drops
    )
}

pub(super) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(super) fn open_pidfd(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    let owned = crate::process::pidfd_open(pid)?;
    // SAFETY: the AsyncFd owns the fd.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
}

/// Resolves when the pidfd says the process exited; never without a pidfd.
pub(super) async fn pid_exit(pidfd: &Option<AsyncFd<OwnedFd>>) {
    match pidfd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

pub(super) async fn child_event(child: &mut Child) -> Option<SpawnEvent> {
    match child {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}
