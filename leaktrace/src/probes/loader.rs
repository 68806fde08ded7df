//! Loading the BPF object and attaching its programs to a probe plan, with aya.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;

use super::guardian::{self, Guardian};
use super::plan::ProbePlan;
use crate::error::{Error, Result};
use aya::maps::MapData;
use aya::programs::uprobe::UProbeLinkId;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::{RawTracePoint, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use leaktrace_ebpf::{
    global, map, program, sites_soft_limit, Shape, DEATH_TRACEPOINTS, DEFAULT_PY_DEPTH,
    DEFAULT_STACK_COPY, DEFAULT_TABLE_ENTRIES, FORK_CHILD_PID_OFFSET, FORK_TRACEPOINTS,
    GROWTH_RAW_TRACEPOINTS, GROWTH_TRACEPOINTS,
};

/// The BPF object built from `leaktrace-ebpf` (see build.rs).
pub(crate) static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace.bpf.o"));

/// Knobs fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Allocations below this size are not tracked.
    pub min_size: u64,
    /// Empty programs: measures the cost of the probes alone.
    pub floor: bool,
    /// Capacity of the live-allocation map.
    pub max_live: u32,
    /// Capacity of the per-site map.
    pub max_sites: u32,
    /// Python frames recorded per site.
    pub python_depth: u32,
    /// Bytes of user stack copied for each new site.
    pub stack_copy: u32,
    /// Native return addresses the kernel folds into a site id.
    pub native_depth: u32,
    /// One sample per this many bytes on average (sampled and growth modes); 0: every one.
    pub sample_rate: u64,
    /// Growth mode: page faults instead of allocator probes.
    pub growth: bool,
    /// Trace the processes targets fork.
    pub follow_forks: bool,
    /// `run`'s child is paused at its interpreter's lifecycle points (`TARGET_PAUSE`).
    pub lifecycle_pauses: bool,
    /// Processes that sample themselves are traced through their USDTs, whose semaphores
    /// leaktrace raises (and its guardian lowers should leaktrace die).
    pub in_process_sampling: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            min_size: 0,
            floor: false,
            max_live: DEFAULT_TABLE_ENTRIES,
            max_sites: DEFAULT_TABLE_ENTRIES,
            python_depth: DEFAULT_PY_DEPTH,
            stack_copy: DEFAULT_STACK_COPY,
            native_depth: leaktrace_ebpf::MAX_NATIVE_FRAMES as u32,
            sample_rate: 0,
            growth: false,
            follow_forks: false,
            lifecycle_pauses: false,
            in_process_sampling: false,
        }
    }
}

/// One attached uprobe link: which program, and where (process, device, inode, file offset).
pub(super) struct Link {
    prog: &'static str,
    id: UProbeLinkId,
    at: (u32, u64, u64, u64),
}

/// The loaded programs and maps. Dropping it detaches every probe.
pub struct Tracer {
    pub(super) ebpf: Ebpf,
    pub(super) attached: usize,
    /// (process, device, inode, file offset) of every probe attached: uprobes live on files, so a
    /// program that execs into another one mapping the same libc keeps them, and they are not
    /// added twice.
    pub(super) points: HashSet<(u32, u64, u64, u64)>,
    /// Thread ids put in `THREADS`, per process, to retire the ones that went away.
    pub(super) threads: std::collections::HashMap<u32, HashSet<u32>>,
    /// Every link attached, by program, so they can be detached together (see `detach`).
    pub(super) links: Vec<Link>,
    /// Unwind rows already given to the kernel: most call paths share their outer frames.
    pub(super) taught: HashSet<(u32, u64)>,
    /// Whether forked children are followed (`TARGET_FOLLOW_FORKS` on every target).
    pub(super) follow_forks: bool,
    /// Why the kernel cannot say how a traced process died, if it cannot.
    pub deaths_unavailable: Option<String>,
    /// With `--follow-forks`: the process that lets held children go if leaktrace dies.
    pub(super) guardian: Option<Guardian>,
    /// Holds are off and every held process was let go (`end_holds`).
    pub(super) holds_ended: bool,
    /// The heap-sampling USDT sites attached and the semaphores raised for them.
    pub(super) usdt: super::usdt_attach::UsdtState,
    /// The kernel sampler's table is still to be filled before the first allocator probe: a
    /// session sampled inside the process may never attach one, and filling it is 4,354 map
    /// updates.
    pub(super) sampling_table_due: bool,
}

pub(super) fn bpf_err(what: &str, e: impl std::error::Error) -> Error {
    // aya's errors put the system call's errno in a source, not in their own text.
    let mut text = e.to_string();
    let mut errno = None;
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            errno = errno.or(io.raw_os_error());
        }
        source = s.source();
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match errno {
        // For root, EACCES is the verifier's answer, not a missing privilege.
        Some(libc::EPERM | libc::EACCES) if !root => Error::NoPrivileges(format!("{what}: {text}")),
        _ => Error::Bpf(format!("{what}: {text}")),
    }
}

/// The program `name` of the object, as its kind `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| bpf_err(name, e))
}

/// Checks for the capabilities leaktrace needs before touching BPF, for a clear message.
pub fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_PTRACE: u32 = 19;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let has = |c: u32| cap_eff & (1 << c) != 0;
    let bpf_ok = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if bpf_ok && has(CAP_SYS_PTRACE) {
        Ok(())
    } else {
        Err(Error::NoPrivileges(format!(
            "running as uid {} with effective capabilities {cap_eff:#x}",
            // SAFETY: as above.
            unsafe { libc::geteuid() }
        )))
    }
}

/// The BPF object with the globals and map sizes of `opts` set, loaded into the kernel (its
/// programs are not yet).
fn load_object(opts: &LoadOptions) -> Result<Ebpf> {
    let floor = u8::from(opts.floor);
    let max_sites = opts.max_sites.max(8);
    let soft_limit = sites_soft_limit(max_sites);
    // Read from the kernel's own description of the record (it moved between kernels); without
    // tracefs, `--follow-forks` fails to attach and says why.
    let fork_child_pid = super::tracefs::field_offset("sched", "sched_process_fork", "child_pid")
        .unwrap_or(FORK_CHILD_PID_OFFSET);
    let cpus = aya::util::nr_cpus()
        .map_err(|(what, e)| Error::Bpf(format!("counting CPUs ({what}): {e}")))?;
    let (pidns_dev, pidns_ino) = crate::process::own_pidns().unwrap_or((0, 0));
    EbpfLoader::new()
        .override_global(global::TRACER_PIDNS_DEV, &pidns_dev, true)
        .override_global(global::TRACER_PIDNS_INO, &pidns_ino, true)
        .override_global(global::STACK_COPY, &opts.stack_copy, true)
        .override_global(global::NATIVE_DEPTH, &opts.native_depth, true)
        .map_max_entries(map::STACKBUF, cpus.max(1) as u32)
        .override_global(global::MIN_SIZE, &opts.min_size, true)
        .override_global(global::FLOOR_MODE, &floor, true)
        .override_global(global::PY_MAX_DEPTH, &opts.python_depth, true)
        .override_global(global::SITES_SOFT_LIMIT, &soft_limit, true)
        .override_global(global::FORK_CHILD_PID_OFFSET, &fork_child_pid, true)
        .override_global(global::SAMPLE_RATE, &opts.sample_rate, true)
        .map_max_entries(map::LIVE, opts.max_live.max(1))
        .map_max_entries(map::SITES, max_sites)
        .load(BPF_OBJECT)
        .map_err(|e| bpf_err("loading the BPF object", e))
}

/// The sampler's table of exponential gaps (sampled and growth modes).
fn fill_sampling_table(ebpf: &mut Ebpf) -> Result<()> {
    let mut table: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
        ebpf.map_mut(map::SAMPLING)
            .ok_or_else(|| Error::Bpf(format!("map {} missing from the object", map::SAMPLING)))?,
    )
    .map_err(|e| bpf_err(map::SAMPLING, e))?;
    for (i, v) in super::sampling::table().into_iter().enumerate() {
        table
            .set(i as u32, v, 0)
            .map_err(|e| bpf_err("filling the sampler's table", e))?;
    }
    Ok(())
}

impl Tracer {
    /// Loads the BPF object and its programs (nothing is attached yet).
    pub fn load(opts: LoadOptions) -> Result<Self> {
        // Opened before any probe's descriptor (see `holds`).
        let wake = (opts.follow_forks || opts.lifecycle_pauses || opts.in_process_sampling)
            .then(guardian::WakePipe::low)
            .transpose()?;
        let mut ebpf = load_object(&opts)?;
        // Uprobe programs are loaded when first attached (`attach_point`): a session sampled
        // inside the process never attaches the allocator programs, and their verification was
        // a tenth of its start-up. Each one is known to the object now.
        for name in program::UPROBES {
            let _: &mut UProbe = program(&mut ebpf, name)?;
        }
        // Growth mode samples pages in its tracepoints from the start; sampled mode only
        // through allocator uprobes, which a process with the heap-sampling USDTs never gets.
        let sampling_table_due = opts.sample_rate > 0 && opts.in_process_sampling && !opts.growth;
        if opts.sample_rate > 0 && !sampling_table_due {
            fill_sampling_table(&mut ebpf)?;
        }
        let mut tracer = Self {
            ebpf,
            attached: 0,
            points: HashSet::new(),
            threads: Default::default(),
            links: Vec::new(),
            taught: HashSet::new(),
            follow_forks: opts.follow_forks,
            deaths_unavailable: None,
            guardian: None,
            holds_ended: false,
            usdt: Default::default(),
            sampling_table_due,
        };
        if let Some(wake) = wake {
            // Followed children are held with a real SIGSTOP. `run`'s own child is paused
            // through ptrace, which its tracer's death undoes, except for a pause still on its
            // way when the tracing thread went: the guardian lifts that one too. And a raised
            // semaphore would keep a service sampling for nobody: the guardian lowers it.
            tracer.guardian = Some(Guardian::start(
                wake,
                guardian::WakePipe::high()?,
                tracer.map(map::TARGETS)?,
                tracer.map(map::CONTROL)?,
                opts.follow_forks,
            )?);
        }
        tracer.attach_session_tracepoints(&opts)?;
        Ok(tracer)
    }

    /// The tracepoints a session needs besides its uprobes: deaths, growth, forks.
    fn attach_session_tracepoints(&mut self, opts: &LoadOptions) -> Result<()> {
        // Without these only `run` can name a cause of death (it waits for its child): say so,
        // but trace anyway.
        if let Err(e) = self.attach_tracepoints(&DEATH_TRACEPOINTS) {
            self.deaths_unavailable = Some(e.to_string());
        }
        if opts.growth {
            self.attach_tracepoints(&GROWTH_TRACEPOINTS)?;
            for name in GROWTH_RAW_TRACEPOINTS {
                let prog: &mut RawTracePoint = program(&mut self.ebpf, name)?;
                prog.load()
                    .map_err(|e| bpf_err(&format!("loading {name}"), e))?;
                prog.attach(name)
                    .map_err(|e| bpf_err(&format!("attaching {name}"), e))?;
            }
        }
        if opts.follow_forks {
            self.attach_tracepoints(&FORK_TRACEPOINTS)?;
        }
        Ok(())
    }

    /// Loads and attaches tracepoint programs (a program may serve several events).
    fn attach_tracepoints(&mut self, list: &[(&str, &str, &str)]) -> Result<()> {
        super::tracefs::require()?;
        for (name, category, event) in list {
            let prog: &mut TracePoint = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|e| bpf_err(&format!("loading {name}"), e))?;
            }
            prog.attach(category, event)
                .map_err(|e| bpf_err(&format!("attaching {name} to {category}:{event}"), e))?;
        }
        Ok(())
    }

    /// Attaches every point of the plan not attached yet, scoped to process `pid`.
    pub fn attach(&mut self, plan: &ProbePlan, pid: u32) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess(pid))?);
        for p in &plan.points {
            let progs: &[&'static str] = if p.func.shape() == Shape::Free {
                &[program::FREE_ENTER]
            } else {
                &[program::ALLOC_ENTER, program::ALLOC_EXIT]
            };
            let what = || format!("{}+{} in {}", p.func.symbol(), p.placement.offset, p.module);
            let at = (&p.host_path, p.file_offset, p.func as u64);
            self.attach_point(pid, scope, progs, at, what)?;
        }
        for f in &plan.lifecycle {
            let what = || format!("{} in {}", f.kind.symbol(), f.module);
            let at = (&f.host_path, f.file_offset, u64::from(f.kind.event_kind()));
            self.attach_point(pid, scope, &[program::LIFECYCLE_ENTER], at, what)?;
        }
        self.attach_usdt(&plan.usdt, pid, scope)
    }

    /// Attaches programs `progs` at (file, offset), with `cookie`, unless this process has them
    /// there already (uprobes live on files: a program that execs into another one mapping the
    /// same libc keeps them).
    pub(super) fn attach_point(
        &mut self,
        pid: u32,
        scope: UProbeScope,
        progs: &[&'static str],
        (path, file_offset, cookie): (&std::path::PathBuf, u64, u64),
        what: impl Fn() -> String,
    ) -> Result<()> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        if !self
            .points
            .insert((pid, meta.dev(), meta.ino(), file_offset))
        {
            return Ok(());
        }
        if self.sampling_table_due && progs.iter().any(|p| program::KERNEL_SAMPLER.contains(p)) {
            fill_sampling_table(&mut self.ebpf)?;
            self.sampling_table_due = false;
        }
        for name in progs {
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .expect("checked in Tracer::load")
                .try_into()
                .map_err(|e| bpf_err(name, e))?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|e| bpf_err(&format!("loading {name}"), e))?;
            }
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(file_offset),
                cookie: Some(cookie),
            };
            let id = prog.attach(point, path, scope).map_err(|e| {
                let alive = crate::process::Process { pid }.alive();
                if alive {
                    bpf_err(&format!("attaching {name} to {}", what()), e)
                } else {
                    Error::TargetExited {
                        pid,
                        detail: "before its probes were attached".into(),
                    }
                }
            })?;
            self.links.push(Link {
                prog: name,
                id,
                at: (pid, meta.dev(), meta.ino(), file_offset),
            });
            self.attached += 1;
        }
        Ok(())
    }

    /// Detaches every probe. Removing a uprobe waits for the kernel (≈60 ms each here, and the
    /// kernel serializes them: dropping links from parallel threads measured no faster).
    pub fn detach(&mut self) {
        // The samplers stop firing before their probes go.
        self.lower_semaphores();
        self.detach_where(|_| true);
    }

    /// Detaches the probes of process `pid` at these offsets of file `path` now (each one a
    /// grace period): `--redirect-pymalloc`'s probes on pymalloc's own functions, which turn hot
    /// once the tables are put back.
    pub fn detach_points(&mut self, pid: u32, path: &std::path::Path, offsets: &[u64]) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let here = |(p, dev, ino, off): (u32, u64, u64, u64)| {
            p == pid && dev == meta.dev() && ino == meta.ino() && offsets.contains(&off)
        };
        self.detach_where(|l| here(l.at));
        self.points.retain(|at| !here(*at));
    }

    fn detach_where(&mut self, pick: impl Fn(&Link) -> bool) {
        let (gone, kept): (Vec<Link>, Vec<Link>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|l| pick(l));
        self.links = kept;
        let mut owned = Vec::new();
        for l in gone {
            let prog: Option<&mut UProbe> = self
                .ebpf
                .program_mut(l.prog)
                .and_then(|p| p.try_into().ok());
            if let Some(link) = prog.and_then(|p| p.take_link(l.id).ok()) {
                owned.push(link);
            }
        }
        drop(owned);
    }

    /// Number of uprobe links attached.
    pub fn attached(&self) -> usize {
        self.attached
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.end_holds();
        self.detach();
        log::debug!("links detached");
    }
}
