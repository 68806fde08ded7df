//! The traced process: its existence, its mappings, and which of its files hold the allocators.

pub mod death;
pub mod debug_file;
pub mod elf;
pub mod freeze;
pub mod malloc_heap;
pub mod maps;
pub mod python;
pub mod remote;
pub mod spawn;

use std::path::PathBuf;

use crate::error::{Error, Result};
use maps::{parse_maps, ModuleMap};

/// A process leaktrace traces, addressed by PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
}

impl Process {
    /// Checks that the process exists.
    pub fn open(pid: u32) -> Result<Self> {
        let p = Self { pid };
        if pid == 0 || !p.proc_dir().exists() {
            return Err(Error::NoSuchProcess(pid));
        }
        let stat = std::fs::read_to_string(p.proc_dir().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state (3rd field), …, flags (9th).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let not = |why: &str| {
            Err(Error::NotAProcess {
                pid,
                why: why.into(),
            })
        };
        if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
            return not("it is a zombie: it has exited and its parent has not reaped it yet");
        }
        const PF_KTHREAD: u64 = 0x0020_0000;
        let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
        if flags & PF_KTHREAD != 0 {
            return not("it is a kernel thread, with no user-space memory to trace");
        }
        if own_pidns().is_some() && foreign_pidns(pid).is_some() {
            // The kernel names a task by its ids in its own innermost namespace only: from a
            // namespace above it, leaktrace could attach its probes but never see an event.
            return not(
                "it runs in a PID namespace below leaktrace's own, and leaktrace inside a PID \
                 namespace traces the processes of that namespace only: run leaktrace in the \
                 target's namespace or on the host",
            );
        }
        Ok(p)
    }

    fn proc_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}", self.pid))
    }

    /// Whether the process still runs: not a zombie, and not exiting (a killed process tears
    /// its memory down while its state still reads `R` or `D`; the kernel's `PF_EXITING` flag,
    /// set before that, tells reads that failed for that reason from reads that failed).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(self.proc_dir().join("stat")) else {
            return false;
        };
        let exiting = flags_in(&stat).is_none_or(|f| f & PF_EXITING != 0);
        state_in(&stat).is_some_and(|s| s != 'Z' && s != 'X') && !exiting
    }

    /// The process's state letter (`R`, `S`, `T`, `Z`…), `None` once it is gone.
    pub fn state(&self) -> Option<char> {
        state_in(&std::fs::read_to_string(self.proc_dir().join("stat")).ok()?)
    }

    /// Whether every thread of the process is stopped (`T`, or `t` under a tracer).
    pub fn all_threads_stopped(&self) -> bool {
        let Ok(tasks) = std::fs::read_dir(self.proc_dir().join("task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| state_in(&s))
                .is_some_and(|c| c == 'T' || c == 't')
        })
    }

    /// The process's current mappings.
    pub fn maps(&self) -> Result<Vec<maps::Mapping>> {
        let path = self.proc_dir().join("maps");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                Error::Denied {
                    pid: self.pid,
                    path,
                    source,
                }
            } else if self.alive() {
                Error::Read { path, source }
            } else {
                Error::TargetExited {
                    pid: self.pid,
                    detail: "its memory maps are gone".into(),
                }
            }
        })?;
        let maps = parse_maps(&text);
        if maps.is_empty() && !self.alive() {
            return Err(Error::TargetExited {
                pid: self.pid,
                detail: "its memory maps are gone".into(),
            });
        }
        Ok(maps)
    }

    /// A snapshot of the file mappings, for address → (file, offset) lookups.
    pub fn module_map(&self) -> Result<ModuleMap> {
        Ok(ModuleMap::new(self.maps()?))
    }

    /// The executable's path as the process sees it.
    pub fn exe(&self) -> Option<String> {
        std::fs::read_link(self.proc_dir().join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The command line, space-joined.
    pub fn cmdline(&self) -> String {
        std::fs::read(self.proc_dir().join("cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    /// The processes descending from this one now (children, their children, …), each with its
    /// parent, from `/proc/*/stat`; threads are not processes and are not listed.
    pub fn descendants(&self) -> Vec<(u32, u32)> {
        let mut parent_of: Vec<(u32, u32)> = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
        let mut found = vec![(self.pid, 0)];
        let mut i = 0;
        while i < found.len() {
            let p = found[i].0;
            let children: Vec<(u32, u32)> = parent_of
                .iter()
                .filter(|(c, pp)| *pp == p && !found.iter().any(|(f, _)| f == c))
                .copied()
                .collect();
            found.extend(children);
            i += 1;
        }
        found.remove(0);
        found
    }

    /// Resident set size in bytes, from `/proc/PID/statm`.
    pub fn rss_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(self.proc_dir().join("statm")).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * page_size())
    }

    /// Peak resident set size in bytes (`VmHWM`).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(self.proc_dir().join("status")).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time (user + system) the process has used, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.proc_dir().join("stat")).ok()?;
        // Fields after the command (which may hold spaces), from field 3 on.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(ticks as f64 / hz)
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// A pidfd of `pid`: signals sent through it never reach a process that reused the pid.
pub fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor the kernel just created for us, owned by nobody else.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `PF_EXITING` in include/linux/sched.h: set by `do_exit` before the memory goes (and after a
/// ptraced child's `PTRACE_EVENT_EXIT` stop, where `run` still reads it).
const PF_EXITING: u64 = 0x4;

/// The ninth field of `/proc/PID/stat`, the task's `PF_*` flags.
fn flags_in(stat: &str) -> Option<u64> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

/// The state letter of a `stat` line: it follows the parenthesised command, which may itself
/// contain ')'.
fn state_in(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The PID namespace of `pid` as `(st_dev, inode)` of `/proc/PID/ns/pid`, when it is not
/// leaktrace's own (a container's, seen from the host).
pub fn foreign_pidns(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then(|| (theirs.dev(), theirs.ino()))
}

/// Inode of the initial PID namespace (the kernel's `PROC_PID_INIT_INO`).
const INITIAL_PIDNS_INO: u64 = 0xEFFF_FFFC;

/// leaktrace's own PID namespace (nsfs device, inode) when it is not the initial one: the
/// kernel then has to translate the ids it sees into the ones leaktrace knows targets by.
pub fn own_pidns() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (ours.ino() != INITIAL_PIDNS_INO).then(|| (ours.dev(), ours.ino()))
}

/// The threads of `pid`: id in its innermost PID namespace → id in leaktrace's (`NSpid`).
pub fn ns_thread_ids(pid: u32) -> std::collections::HashMap<u32, u32> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let Some(line) = status.lines().find(|l| l.starts_with("NSpid:")) else {
            continue;
        };
        let ids: Vec<u32> = line[6..]
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let (Some(ours), Some(inner)) = (ids.first(), ids.last()) {
            out.insert(*inner, *ours);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_with_libc_mapped() {
        let me = Process::open(std::process::id()).unwrap();
        assert!(me.alive());
        let mm = me.module_map().unwrap();
        assert!(mm.files().iter().any(|f| f.contains("libc")));
        assert!(me.rss_bytes().unwrap() > 0);
        assert!(!me.cmdline().is_empty());
    }

    #[test]
    fn exiting_flag_is_read_from_the_ninth_field() {
        let stat = "42 (a) b) R 1 42 42 0 -1 4194564 0 0";
        assert_eq!(state_in(stat), Some('R'));
        assert_eq!(flags_in(stat).map(|f| f & PF_EXITING), Some(4));
        assert_eq!(flags_in("42 (a) S 1 42 42 0 -1 4194560 0"), Some(4194560));
    }

    #[test]
    fn missing_pid_is_a_clear_error() {
        // PID max is at most 2^22 on Linux; this one cannot exist.
        assert!(matches!(
            Process::open(0x7fff_fff0),
            Err(Error::NoSuchProcess(_))
        ));
        assert!(matches!(Process::open(0), Err(Error::NoSuchProcess(0))));
    }
}
