//! `snapshot --freeze`: the target stopped (SIGSTOP) for the length of a walk, so that what is
//! read is one moment of its heap, and let go (SIGCONT) even if leaktrace dies meanwhile.
//!
//! Before the stop, a watcher process is forked holding the read end of a pipe whose write end
//! only leaktrace holds, and a pidfd of the target (so a recycled pid is never signalled). When
//! the pipe closes — leaktrace thawed the target and dropped the guard, exited, or was killed —
//! the watcher sends SIGCONT through the pidfd and exits. A target that was already stopped
//! (by a debugger, by job control) is left as it is: neither stopped nor continued.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::Process;

/// How long the target may take to stop once signalled.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A target held stopped; dropping it lets the target go.
pub struct Frozen {
    pidfd: Option<OwnedFd>,
    /// The write end of the watcher's pipe: closing it wakes the watcher.
    pipe: Option<OwnedFd>,
    watcher: libc::pid_t,
    since: Instant,
}

impl Frozen {
    /// Stops `pid` and waits until every thread has stopped. `Ok(None)` when the target was
    /// stopped already, by someone else.
    pub fn stop(pid: u32) -> Result<Option<Frozen>> {
        let proc = Process { pid };
        if matches!(proc.state(), Some('T' | 't')) {
            return Ok(None);
        }
        let pidfd = super::pidfd_open(pid).ok_or(Error::NoSuchProcess(pid))?;
        let mut ends = [0 as RawFd; 2];
        // SAFETY: `ends` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::Internal(format!(
                "pipe2: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: pipe2 just returned these two descriptors, owned by nobody else.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // SAFETY: `snapshot` runs before any thread is started (no runtime yet), so the child
        // may run ordinary code; it only reads, signals and exits.
        let watcher = unsafe { libc::fork() };
        if watcher == 0 {
            drop(write);
            watch(read.as_raw_fd(), pidfd.as_raw_fd());
        }
        drop(read);
        if watcher < 0 {
            return Err(Error::Internal(format!(
                "fork: {}",
                std::io::Error::last_os_error()
            )));
        }
        let frozen = Frozen {
            pidfd: Some(pidfd),
            pipe: Some(write),
            watcher,
            since: Instant::now(),
        };
        frozen.signal(libc::SIGSTOP)?;
        let deadline = Instant::now() + STOP_WAIT;
        while !proc.all_threads_stopped() {
            if !proc.alive() {
                return Err(Error::NoSuchProcess(pid));
            }
            if Instant::now() > deadline {
                // Dropping `frozen` lets it go.
                return Err(Error::Internal(format!(
                    "process {pid} did not stop within {} s of SIGSTOP",
                    STOP_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Some(frozen))
    }

    /// Lets the target go; returns the seconds it was held.
    pub fn thaw(mut self) -> f64 {
        self.release()
    }

    fn release(&mut self) -> f64 {
        let _ = self.signal(libc::SIGCONT);
        // The watcher wakes on the closed pipe, continues the target once more (harmless) and
        // exits; it is reaped here so no zombie is left.
        self.pipe = None;
        if self.watcher > 0 {
            // SAFETY: waiting for our own child; a null status pointer is allowed.
            unsafe { libc::waitpid(self.watcher, std::ptr::null_mut(), 0) };
            self.watcher = 0;
        }
        self.pidfd = None;
        self.since.elapsed().as_secs_f64()
    }

    fn signal(&self, sig: i32) -> Result<()> {
        match &self.pidfd {
            Some(fd) if !send_signal(fd.as_raw_fd(), sig) => Err(Error::Internal(format!(
                "pidfd_send_signal: {}",
                std::io::Error::last_os_error()
            ))),
            _ => Ok(()),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.pidfd.is_some() {
            self.release();
        }
    }
}

/// The watcher: blocks until the pipe closes, continues the target, exits.
fn watch(pipe: RawFd, pidfd: RawFd) -> ! {
    let mut b = [0u8; 1];
    // SAFETY: reading into a local buffer from a descriptor this process owns.
    while unsafe { libc::read(pipe, b.as_mut_ptr().cast(), 1) } > 0 {}
    send_signal(pidfd, libc::SIGCONT);
    // SAFETY: exiting without running the parent's destructors, which are not this process's.
    unsafe { libc::_exit(0) }
}

/// Sends `sig` through a pidfd; whether the kernel took it.
fn send_signal(pidfd: RawFd, sig: i32) -> bool {
    // SAFETY: a pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}
