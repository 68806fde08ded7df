//! Processes the kernel stops for leaktrace, and the guarantee that none stays stopped.
//!
//! With `--follow-forks` the kernel stops a followed child with a real SIGSTOP at its fork and
//! at its exec (`TARGET_HELD`), so userspace can attach its probes before it runs; userspace
//! clears the flag and sends SIGCONT. Such a stop is not a ptrace stop: if nobody sends SIGCONT
//! the child stays stopped for good. So:
//! - at the end of a session, `CONTROL_HOLDS_OFF` is set first (the kernel stops nothing more)
//!   and every process still held is let go, before the slow detach of the probes;
//! - a guardian process, started with the map descriptors it needs, wakes when leaktrace's end
//!   of either of two pipes closes, and does the same. A dying process's descriptors are
//!   released one by one, each uprobe link waiting for an RCU grace period (seconds in all), in
//!   an order that is the kernel's to choose (on 6.18 a pipe end at leaktrace's lowest
//!   descriptor was released last: a guardian woken by it alone woke 150 s late). One pipe end
//!   sits at the lowest descriptor leaktrace opens, the other at the highest it may, so
//!   whichever the kernel releases first wakes the guardian at the start of leaktrace's exit,
//!   SIGKILL included. It runs in its own session, so a terminal's Ctrl-C does not reach it.
//!
//! `run`'s own child is paused the same way at its interpreter's lifecycle points, but as its
//! tracer leaktrace takes that stop, and a tracer's death drops it. A pause sent while a killed
//! leaktrace's tracing thread was already gone (its other threads still closing links) lands as
//! a real stop instead: the kernel marks each pause it sends (`TARGET_PAUSE_SENT`), leaktrace
//! clears the mark when it takes the stop, and the guardian continues a marked process found
//! stopped once nobody traces it. So `run` starts a guardian too.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};

use super::loader::Tracer;
use leaktrace_ebpf::{map, CONTROL_HOLDS_OFF, TARGET_HELD, TARGET_PAUSE_SENT};

use crate::error::{Error, Result};

/// The hidden subcommand that runs the guardian.
pub const GUARDIAN_ARG: &str = "__guardian";

/// Where the guardian finds its two pipes and the two maps.
const GUARDIAN_FDS: [RawFd; 4] = [3, 4, 5, 6];

/// After holds are switched off, a stop the kernel was already sending can still land: look
/// again after these pauses.
const RELEASE_ROUNDS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];

/// Switches holds off: from now on the kernel stops no process for leaktrace.
pub fn holds_off<T: std::borrow::BorrowMut<MapData>>(control: &mut Array<T, u32>) -> Result<()> {
    let now = control.get(&0, 0).unwrap_or(0);
    control
        .set(0, now | CONTROL_HOLDS_OFF, 0)
        .map_err(|e| Error::Bpf(format!("switching holds off: {e}")))
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
    let held: Vec<u32> = targets
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, flags)| flags & TARGET_HELD != 0)
        .map(|(pid, _)| pid)
        .collect();
    held.into_iter().filter(|p| release(targets, *p)).count()
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

/// The descriptor of a hash or array map.
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    match map {
        Map::HashMap(d) | Map::Array(d) => Some(d.fd().as_fd()),
        _ => None,
    }
}

/// A pipe whose write end is leaktrace's: the guardian wakes when it closes.
pub struct WakePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl WakePipe {
    /// A pipe at the lowest free descriptors: open it before any probe is attached.
    pub fn low() -> Result<Self> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Bpf(format!("creating the guardian's pipe: {e}")))?;
        Ok(Self { read, write })
    }

    /// A pipe whose write end sits at the highest descriptor this process may open.
    pub fn high() -> Result<Self> {
        let pipe = Self::low()?;
        // SAFETY: getrlimit writes the struct it is given.
        let limit = unsafe {
            let mut r: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            r.rlim_cur
        };
        let top = limit.saturating_sub(1).min(i32::MAX as u64) as i32;
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
        let fd = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
        if fd < 0 {
            // Taken or over the limit: the low end still wakes the guardian, later.
            return Ok(pipe);
        }
        // SAFETY: a descriptor just returned to us, owned by nobody else.
        let write = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            read: pipe.read,
            write,
        })
    }
}

/// leaktrace's ends of the guardian's pipes: when either closes, the guardian lets every held
/// process go.
pub struct Guardian {
    _wake: [OwnedFd; 2],
}

impl Guardian {
    /// Starts the guardian with the two pipes (`low` opened before any probe) and the two maps.
    pub fn start(low: WakePipe, high: WakePipe, targets: &Map, control: &Map) -> Result<Self> {
        let fds = [
            low.read.as_raw_fd(),
            high.read.as_raw_fd(),
            map_fd(targets)
                .ok_or_else(|| Error::Bpf(format!("{} is not a hash map", map::TARGETS)))?
                .as_raw_fd(),
            map_fd(control)
                .ok_or_else(|| Error::Bpf(format!("{} is not an array", map::CONTROL)))?
                .as_raw_fd(),
        ];
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg(GUARDIAN_ARG)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                // Move the descriptors out of the way first: a source may sit on a target.
                let mut high = [0; 4];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (src, dst) in high.iter().zip(GUARDIAN_FDS) {
                    // dup2 clears close-on-exec on the copy.
                    if libc::dup2(*src, dst) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::Bpf(format!("starting leaktrace's guardian: {e}")))?;
        log::debug!("guardian {} started", child.id());
        Ok(Self {
            _wake: [low.write, high.write],
        })
    }
}

/// The guardian itself: waits for leaktrace's end of the pipe to close, then switches holds off
/// and lets every held process go.
pub fn guardian_main() -> Result<()> {
    // SAFETY: these descriptors were put there by `Guardian::start` and are owned by nobody
    // else in this process.
    let [low, high, targets_fd, control_fd] =
        GUARDIAN_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let open = |fd: OwnedFd, name: &str| -> Result<Map> {
        MapData::from_fd(fd)
            .and_then(Map::from_map_data)
            .map_err(|e| Error::Bpf(format!("guardian: opening {name}: {e}")))
    };
    let mut targets: BpfHashMap<MapData, u32, u32> =
        BpfHashMap::try_from(open(targets_fd, map::TARGETS)?)
            .map_err(|e| Error::Bpf(format!("guardian: {}: {e}", map::TARGETS)))?;
    let mut control: Array<MapData, u32> = Array::try_from(open(control_fd, map::CONTROL)?)
        .map_err(|e| Error::Bpf(format!("guardian: {}: {e}", map::CONTROL)))?;
    // Blocks until either pipe's writer is gone: leaktrace is exiting or let go of the session.
    // Nothing is ever written, so readiness means a hang-up.
    let mut fds = [low.as_raw_fd(), high.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    end_holds(&mut targets, &mut control);
    // No pause is sent any more, and one in flight has set its flag by now.
    let paused: Vec<u32> = targets
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, flags)| flags & TARGET_PAUSE_SENT != 0)
        .map(|(pid, _)| pid)
        .collect();
    for pid in paused {
        lift_stray_pause(pid);
    }
    Ok(())
}

/// `run`'s child was sent a lifecycle pause that leaktrace never took. Sent to a thread whose
/// tracer is still there, the stop is the tracer's, and its death lets the thread go. Sent just
/// as the tracing thread died (a SIGKILLed leaktrace's threads die one by one, and the last one
/// wakes the guardian), it lands as a real stop that nobody would lift. So: wait until the
/// process is nobody's tracee, then continue it if it stopped, looking again a few times for a
/// signal still on its way.
fn lift_stray_pause(pid: u32) {
    let deadline = std::time::Instant::now() + UNTRACED_WAIT;
    loop {
        match status_of(pid) {
            None => return,
            Some(s) if s.tracer == 0 => break,
            Some(_) if std::time::Instant::now() >= deadline => return,
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    for pause in RELEASE_ROUNDS {
        std::thread::sleep(pause);
        match status_of(pid) {
            None => return,
            Some(s) if s.stopped => {
                // SAFETY: a plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            Some(_) => {}
        }
    }
}

/// How long the guardian waits for a dying leaktrace to stop tracing `run`'s child: its
/// threads exit one by one, each after its share of the slow link releases.
const UNTRACED_WAIT: Duration = Duration::from_secs(120);

/// What the guardian needs of `/proc/PID/status`.
struct TraceStatus {
    /// In a group stop (`T`), not a tracer's stop (`t`).
    stopped: bool,
    /// The tracer's pid, 0 when untraced.
    tracer: u32,
}

/// Process `pid`'s stop state and tracer; `None` once it is gone or a zombie.
fn status_of(pid: u32) -> Option<TraceStatus> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let state = field("State:")?.chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    Some(TraceStatus {
        stopped: state == 'T',
        tracer: field("TracerPid:")?.parse().ok()?,
    })
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

    /// The session is ending: the kernel stops no process any more, and every process it holds
    /// is let go. Done before the slow detach, while forks may still happen.
    pub fn end_holds(&mut self) {
        if self.guardian.is_none() || self.holds_ended {
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
        // SAFETY: the child of a multi-threaded process calls only async-signal-safe functions
        // (close, getppid, nanosleep, _exit). It owns a copy of every descriptor and exits only
        // once leaktrace is gone (it is reparented only after leaktrace's exit released every
        // file): its exit is then the last close of each link and takes the grace periods, and
        // leaktrace's own exit closes nothing slow. It lets go of standard input, output and
        // error first, so whoever reads leaktrace's output sees it end with leaktrace.
        let parent = std::process::id() as libc::pid_t;
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 10_000_000,
                };
                while libc::getppid() == parent {
                    libc::nanosleep(&pause, std::ptr::null_mut());
                }
                libc::_exit(0)
            },
            -1 => drop(self),
            _ => std::mem::forget(self),
        }
    }
}
