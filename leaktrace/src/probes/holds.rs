//! Processes the kernel stops for leaktrace, and the guarantee that none stays stopped.
//!
//! With `--follow-forks` the kernel stops a followed child with a real SIGSTOP at its fork and
//! at its exec (`TARGET_HELD`), so userspace can attach its probes before it runs; userspace
//! clears the flag and sends SIGCONT. Such a stop is not a ptrace stop: if nobody sends SIGCONT
//! the child stays stopped for good. So at the end of a session `CONTROL_HOLDS_OFF` is set
//! first (the kernel stops nothing more) and every process still held is let go, before the
//! slow detach of the probes; if leaktrace dies, its guardian (`guardian.rs`) does the same.
//!
//! `run`'s own child is paused the same way at its interpreter's lifecycle points, but as its
//! tracer leaktrace takes that stop, and a tracer's death drops it. A pause sent while a killed
//! leaktrace's tracing thread was already gone (its other threads still closing links) lands as
//! a real stop instead: the kernel marks each pause it sends (`TARGET_PAUSE_SENT`), leaktrace
//! clears the mark when it takes the stop, and the guardian continues a marked process found
//! stopped once nobody traces it.

use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData};

use super::loader::Tracer;
use leaktrace_ebpf::{map, CONTROL_HOLDS_OFF, CONTROL_NO_NEW_BLOCKS, TARGET_HELD};

use crate::error::{Error, Result};

/// After holds are switched off, a stop the kernel was already sending can still land: look
/// again after these pauses.
pub(super) const RELEASE_ROUNDS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];

/// Switches holds off: from now on the kernel stops no process for leaktrace.
pub fn holds_off<T: std::borrow::BorrowMut<MapData>>(control: &mut Array<T, u32>) -> Result<()> {
    set_control(control, CONTROL_HOLDS_OFF, "switching holds off")
}

/// Sets `bit` in the session's control word.
fn set_control<T: std::borrow::BorrowMut<MapData>>(
    control: &mut Array<T, u32>,
    bit: u32,
    what: &str,
) -> Result<()> {
    let now = control.get(&0, 0).unwrap_or(0);
    control
        .set(0, now | bit, 0)
        .map_err(|e| Error::Bpf(format!("{what}: {e}")))
}

/// Lets process `pid` go if the kernel holds it: clears its `TARGET_HELD` flag, then sends
/// SIGCONT. Returns whether it was held.
pub fn release<T: std::borrow::BorrowMut<MapData>>(
    targets: &mut BpfHashMap<T, u32, u32>,
    pid: u32,
) -> bool {
    let Ok(flags) = targets.get(&pid, 0) else {
        return false;
    };
    if flags & TARGET_HELD == 0 {
        return false;
    }
    // A held process runs no code, so no program updates its flags meanwhile.
    let _ = targets.insert(pid, flags & !TARGET_HELD, 0);
    // SAFETY: a plain syscall.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    true
}

/// Lets every held process go; returns how many were.
pub fn release_all<T: std::borrow::BorrowMut<MapData>>(
    targets: &mut BpfHashMap<T, u32, u32>,
) -> usize {
    let held = flagged(targets, TARGET_HELD);
    held.into_iter().filter(|p| release(targets, *p)).count()
}

/// The processes in `TARGETS` whose flags carry `flag`.
pub fn flagged<T: std::borrow::Borrow<MapData>>(
    targets: &BpfHashMap<T, u32, u32>,
    flag: u32,
) -> Vec<u32> {
    targets
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, flags)| flags & flag != 0)
        .map(|(pid, _)| pid)
        .collect()
}

/// Switches holds off and lets every held process go, looking again a few times for stops
/// that were already on their way.
pub fn end_holds<A, B>(targets: &mut BpfHashMap<A, u32, u32>, control: &mut Array<B, u32>)
where
    A: std::borrow::BorrowMut<MapData>,
    B: std::borrow::BorrowMut<MapData>,
{
    if let Err(e) = holds_off(control) {
        log::warn!("{e}");
    }
    for pause in RELEASE_ROUNDS {
        std::thread::sleep(pause);
        let n = release_all(targets);
        if n > 0 {
            log::debug!("let {n} held processes go");
        }
    }
}

impl Tracer {
    /// Lets process `pid` go if the kernel holds it stopped (a followed child at fork or exec).
    pub fn release(&mut self, pid: u32) {
        match self.targets_mut() {
            Ok(mut targets) => {
                release(&mut targets, pid);
            }
            Err(e) => log::warn!("cannot let process {pid} go: {e}"),
        }
    }

    /// The window closed on processes that run on: new blocks are no longer recorded, frees
    /// still are, for `settle`, so a block freed a moment after the window's end (allocated,
    /// used and freed around it) is not read as unfreed.
    pub fn stop_new_blocks(&mut self, settle: Duration) {
        let done = self
            .ebpf
            .map_mut(map::CONTROL)
            .ok_or_else(|| Error::Bpf(format!("no {} map", map::CONTROL)))
            .and_then(|m| {
                Array::<&mut MapData, u32>::try_from(m).map_err(|e| Error::Bpf(e.to_string()))
            })
            .and_then(|mut c| set_control(&mut c, CONTROL_NO_NEW_BLOCKS, "ending the window"));
        match done {
            Ok(()) => std::thread::sleep(settle),
            Err(e) => log::warn!("{e}"),
        }
    }

    /// The session is ending: the kernel stops no process any more, and every process it holds
    /// is let go. Done before the slow detach, while forks may still happen.
    pub fn end_holds(&mut self) {
        // Without `--follow-forks` nothing is held, and `run`'s pauses are leaktrace's own to
        // take while it lives: no rounds to wait through (0.31 s).
        if !self.follow_forks || self.holds_ended {
            return;
        }
        self.holds_ended = true;
        let [targets, control] = self.ebpf.maps_disjoint_mut([map::TARGETS, map::CONTROL]);
        let (Some(targets), Some(control)) = (targets, control) else {
            return;
        };
        match (
            BpfHashMap::<&mut MapData, u32, u32>::try_from(targets),
            Array::<&mut MapData, u32>::try_from(control),
        ) {
            (Ok(mut t), Ok(mut c)) => end_holds(&mut t, &mut c),
            _ => log::warn!(
                "cannot open {} and {} to let held children go",
                map::TARGETS,
                map::CONTROL
            ),
        }
    }

    /// Detaches in a process of its own, so that leaktrace can exit now: removing a uprobe
    /// waits for RCU grace periods (≈110 ms a link here, ≈2 s for a full set, more per followed
    /// child). Every process is first dropped from `TARGETS`, so until the kernel has removed the
    /// breakpoints a hit costs the trap alone and records nothing.
    pub fn detach_in_background(mut self) {
        self.end_holds();
        // In-process samplers stop firing now, not when the links are gone.
        self.lower_semaphores();
        if let Ok(mut targets) = self.targets_mut() {
            let all: Vec<u32> = targets.keys().filter_map(|k| k.ok()).collect();
            for pid in all {
                let _ = targets.remove(&pid);
            }
        }
        // The detacher waits for leaktrace's whole thread group, not for its own reparenting:
        // a child is reparented when the thread that forked it exits, and if another thread
        // (the naming thread) is still closing its descriptors then, that thread's close became
        // the last of every link and leaktrace's exit took the grace periods (≈3 s in 4 runs of
        // 10). A pidfd reads ready only once every thread has exited, descriptors closed.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: pidfd_open on our own pid, no pointers; -1 (an old kernel) falls back below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) } as libc::c_int;
        // SAFETY: the child of a multi-threaded process calls only async-signal-safe functions
        // (close, poll, getppid, nanosleep, _exit). It owns a copy of every descriptor and exits
        // only once leaktrace is gone (`wait_for_exit`): its exit is then the last close of each
        // link and takes the grace periods, and leaktrace's own exit closes nothing slow. It lets
        // go of standard input, output and error first, so whoever reads leaktrace's output sees
        // it end with leaktrace.
        let forked = unsafe { libc::fork() };
        if forked == 0 {
            // SAFETY: see above; this is the child, which never returns.
            unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
                wait_for_exit(parent, pidfd);
                libc::_exit(0)
            }
        }
        if pidfd >= 0 {
            // SAFETY: the descriptor opened above, used by nothing else in this process.
            unsafe { libc::close(pidfd) };
        }
        match forked {
            -1 => drop(self),
            _ => std::mem::forget(self),
        }
    }
}

/// In the detacher: returns once leaktrace (`parent`) has exited, every thread of it: through
/// its pidfd when there is one, else when the detacher has been reparented (which can come
/// before leaktrace's last thread has closed its descriptors).
///
/// # Safety
/// Called in a forked child of a multi-threaded process: only async-signal-safe calls.
unsafe fn wait_for_exit(parent: libc::pid_t, pidfd: libc::c_int) {
    if pidfd >= 0 {
        let mut ready = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd on the stack, valid for the call.
            let n = unsafe { libc::poll(&mut ready, 1, -1) };
            if n > 0 {
                return;
            }
            // SAFETY: errno is thread-local, readable in a signal-safe context.
            if n < 0 && unsafe { *libc::__errno_location() } != libc::EINTR {
                break;
            }
        }
    }
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    // SAFETY: getppid and nanosleep are async-signal-safe; `pause` lives on the stack.
    while unsafe { libc::getppid() } == parent {
        unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
    }
}
