//! The guardian: a process of leaktrace's own that does what leaktrace's end would have done
//! when leaktrace dies before it can (SIGKILL, the OOM killer): lets held processes go
//! (`holds.rs`), continues a `run` child stopped by a pause that outlived its tracer, and lowers
//! the heap-sampling semaphores leaktrace raised, so a service does not go on sampling for
//! nobody.
//!
//! It is started with the map descriptors it needs and wakes when leaktrace's end of either of
//! two pipes closes. A dying process's descriptors are released one by one, each uprobe link
//! waiting for an RCU grace period (seconds in all), in an order that is the kernel's to choose
//! (on 6.18 a pipe end at leaktrace's lowest descriptor was released last: a guardian woken by
//! it alone woke 150 s late). One pipe end sits at the lowest descriptor leaktrace opens, the
//! other at the highest it may, so whichever the kernel releases first wakes the guardian at the
//! start of leaktrace's exit. It runs in its own session, so a terminal's Ctrl-C does not reach
//! it. The low pipe also carries a journal: a record each time leaktrace raises a semaphore or
//! stops holding one raised.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use leaktrace_ebpf::{map, TARGET_PAUSE_SENT};

use super::holds::{end_holds, flagged, holds_off, RELEASE_ROUNDS};
use super::usdt_attach::Raised;
use crate::error::{Error, Result};

/// The hidden subcommand that runs the guardian.
pub const GUARDIAN_ARG: &str = "__guardian";
/// The guardian's second argument when the kernel may hold followed children.
const HOLDS_ARG: &str = "holds";
/// The guardian's second argument when it may not.
const NO_HOLDS_ARG: &str = "no-holds";

/// Where the guardian finds its two pipes and the two maps.
const GUARDIAN_FDS: [RawFd; 4] = [3, 4, 5, 6];

/// A journal record: `+` or `-`, then the semaphore's pid (u32), address (u64) and file inode
/// (u64), little-endian.
const RECORD: usize = 21;

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

/// leaktrace's ends of the guardian's pipes: when either closes, the guardian does what
/// leaktrace would have done at its end. The low one also carries the semaphore journal.
pub struct Guardian {
    journal: OwnedFd,
    _high: OwnedFd,
}

impl Guardian {
    /// Starts the guardian with the two pipes (`low` opened before any probe) and the two maps.
    ///
    /// `holds` says whether the kernel may hold followed children (`--follow-forks`): only
    /// then must the guardian look again for a hold still on its way (0.31 s) at the end.
    pub fn start(
        low: WakePipe,
        high: WakePipe,
        targets: &Map,
        control: &Map,
        holds: bool,
    ) -> Result<Self> {
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
            .arg(if holds { HOLDS_ARG } else { NO_HOLDS_ARG })
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
        // A full pipe (the guardian not reading) must never block a session: a record that
        // does not fit is dropped, and that semaphore is left to leaktrace alone.
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(low.write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        Ok(Self {
            journal: low.write,
            _high: high.write,
        })
    }

    /// Tells the guardian that leaktrace raised (`true`) semaphore `r`, or no longer holds it
    /// raised (lowered, or gone with an exec).
    pub fn note_semaphore(&self, raised: bool, r: Raised) {
        let (pid, addr) = (r.pid, r.addr);
        let mut rec = [0u8; RECORD];
        rec[0] = if raised { b'+' } else { b'-' };
        rec[1..5].copy_from_slice(&pid.to_le_bytes());
        rec[5..13].copy_from_slice(&addr.to_le_bytes());
        rec[13..].copy_from_slice(&r.inode.to_le_bytes());
        // SAFETY: writes RECORD bytes from a live buffer; a pipe write of under PIPE_BUF bytes
        // is whole or nothing.
        let n = unsafe { libc::write(self.journal.as_raw_fd(), rec.as_ptr().cast(), RECORD) };
        if n != RECORD as isize {
            log::debug!("semaphore {addr:#x} of {pid}: not journaled for the guardian");
        }
    }
}

/// The guardian itself: follows the journal until leaktrace's end of either pipe is gone, then
/// switches holds off and lets every held process go, lowers the semaphores still raised, and
/// lifts a lifecycle pause that outlived its tracer.
pub fn guardian_main() -> Result<()> {
    // Named for `ps` and `top` (exec'd through /proc/self/exe, it would read "exe").
    // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"leaktrace-guard".as_ptr()) };
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
    let raised = follow_journal(low, &high);
    // Without holds, leaving the release rounds out spares every `run` 0.31 s at its end:
    // the guardian keeps leaktrace's standard error open, and so the end of its output.
    if std::env::args().nth(2).as_deref() == Some(NO_HOLDS_ARG) {
        if let Err(e) = holds_off(&mut control) {
            log::warn!("guardian: {e}");
        }
    } else {
        end_holds(&mut targets, &mut control);
    }
    for (r, n) in raised {
        if let Err(e) = r.lower(n) {
            log::debug!(
                "guardian: semaphore {:#x} of {} not lowered: {e}",
                r.addr,
                r.pid
            );
        }
    }
    // No pause is sent any more, and one in flight has set its flag by now.
    for pid in flagged(&targets, TARGET_PAUSE_SENT) {
        lift_stray_pause(pid);
    }
    Ok(())
}

/// Reads the journal until either pipe's writer is gone (leaktrace is exiting, or let go of
/// the session); returns the semaphores leaktrace still held raised, with how many times.
fn follow_journal(low: OwnedFd, high: &OwnedFd) -> HashMap<Raised, u16> {
    let mut raised: HashMap<Raised, u16> = HashMap::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut journal = std::fs::File::from(low);
    let mut buf = [0u8; 4096];
    let mut fds = [journal.as_raw_fd(), high.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 || fds[1].revents != 0 {
            // The high end went first: what the journal still holds was written before.
            // SAFETY: F_SETFL on a descriptor we own.
            unsafe { libc::fcntl(journal.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            while let Ok(n @ 1..) = journal.read(&mut buf) {
                absorb(&mut raised, &mut pending, &buf[..n]);
            }
            return raised;
        }
        match journal.read(&mut buf) {
            Ok(0) => return raised,
            Ok(n) => absorb(&mut raised, &mut pending, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return raised,
        }
    }
}

/// Applies the whole records in `pending` + `bytes` to `raised`, keeping a partial one.
fn absorb(raised: &mut HashMap<Raised, u16>, pending: &mut Vec<u8>, bytes: &[u8]) {
    pending.extend_from_slice(bytes);
    let whole = pending.len() / RECORD * RECORD;
    for rec in pending[..whole].chunks_exact(RECORD) {
        let r = Raised {
            pid: u32::from_le_bytes(rec[1..5].try_into().unwrap_or_default()),
            addr: u64::from_le_bytes(rec[5..13].try_into().unwrap_or_default()),
            inode: u64::from_le_bytes(rec[13..].try_into().unwrap_or_default()),
        };
        let n = raised.entry(r).or_default();
        match rec[0] {
            b'+' => *n = n.saturating_add(1),
            _ => *n = n.saturating_sub(1),
        }
        if *n == 0 {
            raised.remove(&r);
        }
    }
    pending.drain(..whole);
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
