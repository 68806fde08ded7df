//! Loading the BPF object and attaching its programs to a probe plan, with aya.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::UProbeLinkId;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::{RawTracePoint, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use leaktrace_ebpf::{
    global, map, program, sites_soft_limit, AllocFn, Counter, DeathInfo, LiveAlloc, LiveKey,
    PyOffsets, Shape, SiteStats, UnwindKey, UnwindRow, DEATH_TRACEPOINTS, DEFAULT_PY_DEPTH,
    DEFAULT_STACK_COPY, DEFAULT_TABLE_ENTRIES, FORK_CHILD_PID_OFFSET, FORK_TRACEPOINTS,
    GROWTH_RAW_TRACEPOINTS, GROWTH_TRACEPOINTS, NUM_COUNTERS, TARGET_FOLLOW_FORKS,
    TARGET_FORKED_CHILD, TARGET_HELD, TARGET_PAUSE, TARGET_TRACED, UNWIND_ROWS,
};

use super::holds::{self, Guardian};
use super::plan::ProbePlan;
use crate::error::{Error, Result};

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
        }
    }
}

/// Counter values summed over CPUs, indexed by `Counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; NUM_COUNTERS as usize]);

impl Counters {
    /// One counter's value.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// Every counter by name, as reports list them.
    pub fn named(&self) -> std::collections::BTreeMap<String, u64> {
        Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), self.get(*c)))
            .collect()
    }

    /// Total of all drop counters.
    pub fn drops(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| self.get(*c))
            .sum()
    }
}

/// The loaded programs and maps. Dropping it detaches every probe.
pub struct Tracer {
    pub(super) ebpf: Ebpf,
    attached: usize,
    /// (process, device, inode, file offset) of every probe attached: uprobes live on files, so a
    /// program that execs into another one mapping the same libc keeps them, and they are not
    /// added twice.
    points: HashSet<(u32, u64, u64, u64)>,
    /// Thread ids put in `THREADS`, per process, to retire the ones that went away.
    threads: std::collections::HashMap<u32, HashSet<u32>>,
    /// Every link attached, by program, so they can be detached together (see `detach`).
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Unwind rows already given to the kernel: most call paths share their outer frames.
    taught: HashSet<(u32, u64)>,
    /// Whether forked children are followed (`TARGET_FOLLOW_FORKS` on every target).
    pub(super) follow_forks: bool,
    /// Why the kernel cannot say how a traced process died, if it cannot.
    pub deaths_unavailable: Option<String>,
    /// With `--follow-forks`: the process that lets held children go if leaktrace dies.
    guardian: Option<Guardian>,
    /// Holds are off and every held process was let go (`end_holds`).
    pub(super) holds_ended: bool,
}

fn bpf_err(what: &str, e: impl std::error::Error) -> Error {
    // aya's errors put the system call's errno in a source, not in their own text.
    let mut text = e.to_string();
    let mut errno = None;
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            errno = errno.or(io.raw_os_error());
        }
        source = s.source();
    }
    match errno {
        Some(libc::EPERM | libc::EACCES) => Error::NoPrivileges(format!("{what}: {text}")),
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

/// One block of the kernel's live table.
#[derive(Clone, Copy, Debug)]
pub struct LiveBlock {
    pub addr: u64,
    pub size: u64,
    pub site: u64,
    /// The function that allocated it (`None`: an unknown value).
    pub func: Option<AllocFn>,
}

impl Tracer {
    /// Loads the BPF object and its programs (nothing is attached yet).
    pub fn load(opts: LoadOptions) -> Result<Self> {
        // Opened before any probe's descriptor (see `holds`).
        let wake = opts.follow_forks.then(holds::WakePipe::low).transpose()?;
        let floor = u8::from(opts.floor);
        let max_sites = opts.max_sites.max(8);
        let soft_limit = sites_soft_limit(max_sites);
        // Read from the kernel's own description of the record (it moved between kernels); without
        // tracefs, `--follow-forks` fails to attach and says why.
        let fork_child_pid =
            super::tracefs::field_offset("sched", "sched_process_fork", "child_pid")
                .unwrap_or(FORK_CHILD_PID_OFFSET);
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| Error::Bpf(format!("counting CPUs ({what}): {e}")))?;
        let (pidns_dev, pidns_ino) = crate::process::own_pidns().unwrap_or((0, 0));
        let mut ebpf = EbpfLoader::new()
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
            .map_err(|e| bpf_err("loading the BPF object", e))?;
        for name in program::UPROBES {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| bpf_err(name, e))?;
            prog.load()
                .map_err(|e| bpf_err(&format!("loading {name}"), e))?;
        }
        if opts.sample_rate > 0 {
            let mut table: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
                ebpf.map_mut(map::SAMPLING)
                    .ok_or_else(|| Error::Bpf("map SAMPLING missing from the object".into()))?,
            )
            .map_err(|e| bpf_err(map::SAMPLING, e))?;
            for (i, v) in super::sampling::table().into_iter().enumerate() {
                table
                    .set(i as u32, v, 0)
                    .map_err(|e| bpf_err("filling the sampler's table", e))?;
            }
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
        };
        if let Some(wake) = wake {
            // Only followed children are held with a real SIGSTOP (`run`'s own child is held
            // through ptrace, which its tracer's death undoes).
            tracer.guardian = Some(Guardian::start(
                wake,
                holds::WakePipe::high()?,
                tracer.map(map::TARGETS)?,
                tracer.map(map::CONTROL)?,
            )?);
        }
        // Without these only `run` can name a cause of death (it waits for its child): say so,
        // but trace anyway.
        if let Err(e) = tracer.attach_tracepoints(&DEATH_TRACEPOINTS) {
            tracer.deaths_unavailable = Some(e.to_string());
        }
        if opts.growth {
            tracer.attach_tracepoints(&GROWTH_TRACEPOINTS)?;
            for name in GROWTH_RAW_TRACEPOINTS {
                let prog: &mut RawTracePoint = program(&mut tracer.ebpf, name)?;
                prog.load()
                    .map_err(|e| bpf_err(&format!("loading {name}"), e))?;
                prog.attach(name)
                    .map_err(|e| bpf_err(&format!("attaching {name}"), e))?;
            }
        }
        if opts.follow_forks {
            tracer.attach_tracepoints(&FORK_TRACEPOINTS)?;
        }
        Ok(tracer)
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

    /// How process `tgid` died, as far as the kernel saw.
    pub fn death(&self, tgid: u32) -> Option<DeathInfo> {
        let map = self.map(map::DEATHS).ok()?;
        let deaths = BpfHashMap::<&MapData, u32, DeathInfo>::try_from(map).ok()?;
        deaths.get(&tgid, 0).ok()
    }

    /// Marks a process as traced (the programs ignore every other process); `pause`: stop it
    /// at its interpreter's lifecycle points (`run`'s child, which leaktrace ptraces).
    pub fn add_target(&mut self, tgid: u32, pause: bool) -> Result<()> {
        let mut flags = TARGET_TRACED;
        if pause {
            flags |= TARGET_PAUSE;
        }
        if self.follow_forks {
            flags |= TARGET_FOLLOW_FORKS;
        }
        let mut targets = self.targets_mut()?;
        // A child the kernel already took in (forked while leaktrace was setting up) keeps what
        // the kernel knows of it: held, and followed since its fork.
        let kept = targets.get(&tgid, 0).unwrap_or(0) & (TARGET_HELD | TARGET_FORKED_CHILD);
        targets
            .insert(tgid, flags | kept, 0)
            .map_err(|e| bpf_err("adding the target", e))
    }

    /// Stops tracing process `tgid` (a followed child that exec'd): its probes stay attached
    /// until leaktrace detaches, but the programs ignore it.
    pub fn remove_target(&mut self, tgid: u32) -> Result<()> {
        self.targets_mut()?
            .remove(&tgid)
            .map_err(|e| bpf_err("removing a target", e))
    }

    /// Tells the kernel process `tgid`'s program break (growth mode: a lower one later gives
    /// pages back).
    pub fn set_brk(&mut self, tgid: u32, brk: u64) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.map_mut(map::BRKS)?).map_err(|e| bpf_err(map::BRKS, e))?;
        m.insert(tgid, brk, 0)
            .map_err(|e| bpf_err("setting the program break", e))
    }

    /// The map of traced processes (tgid → `TARGET_*` flags), for changing.
    pub(super) fn targets_mut(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>> {
        BpfHashMap::try_from(self.map_mut(map::TARGETS)?).map_err(|e| bpf_err(map::TARGETS, e))
    }

    /// Process `tgid`'s `TARGET_*` flags (0 when it is not traced). Read from the map, so they
    /// hold even when the ring buffer had no room to announce what set them.
    pub fn flags(&self, tgid: u32) -> u32 {
        let Ok(map) = self.map(map::TARGETS) else {
            return 0;
        };
        let Ok(targets) = BpfHashMap::<&MapData, u32, u32>::try_from(map) else {
            return 0;
        };
        targets.get(&tgid, 0).unwrap_or(0)
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
        Ok(())
    }

    /// Attaches programs `progs` at (file, offset), with `cookie`, unless this process has them
    /// there already (uprobes live on files: a program that execs into another one mapping the
    /// same libc keeps them).
    fn attach_point(
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
        for name in progs {
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .expect("loaded in Tracer::load")
                .try_into()
                .map_err(|e| bpf_err(name, e))?;
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
            self.links.push((name, id));
            self.attached += 1;
        }
        Ok(())
    }

    /// Tells the kernel how to walk process `tgid`'s Python frames.
    pub fn set_python(&mut self, tgid: u32, offsets: &PyOffsets) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, u32, PyOffsets> =
            BpfHashMap::try_from(self.map_mut(map::PYPROCS)?)
                .map_err(|e| bpf_err(map::PYPROCS, e))?;
        m.insert(tgid, *offsets, 0)
            .map_err(|e| bpf_err("setting Python offsets", e))
    }

    /// Replaces process `tgid`'s thread → thread-state entries.
    pub fn set_threads(&mut self, tgid: u32, threads: &[(u32, u64)]) -> Result<()> {
        let known = self.threads.entry(tgid).or_default().clone();
        let now: HashSet<u32> = threads.iter().map(|(t, _)| *t).collect();
        // aya's HashMap serves LRU hash maps too.
        let mut m: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.map_mut(map::THREADS)?)
                .map_err(|e| bpf_err(map::THREADS, e))?;
        for gone in known.difference(&now) {
            let _ = m.remove(gone);
        }
        for (tid, tstate) in threads {
            // A full map only costs stacks for threads that allocate without the GIL.
            let _ = m.insert(*tid, *tstate, 0);
        }
        self.threads.insert(tgid, now);
        Ok(())
    }

    /// Forgets everything recorded for process `tgid` (it exec'd: its old address space is gone).
    pub fn forget_process(&mut self, tgid: u32) -> Result<()> {
        {
            let mut live: BpfHashMap<&mut MapData, LiveKey, LiveAlloc> =
                BpfHashMap::try_from(self.map_mut(map::LIVE)?)
                    .map_err(|e| bpf_err(map::LIVE, e))?;
            let keys: Vec<LiveKey> = live
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.tgid == tgid)
                .collect();
            for k in keys {
                let _ = live.remove(&k);
            }
        }
        let mut sites: BpfHashMap<&mut MapData, u64, SiteStats> =
            BpfHashMap::try_from(self.map_mut(map::SITES)?).map_err(|e| bpf_err(map::SITES, e))?;
        let doomed: Vec<u64> = sites
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.tgid == tgid)
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            let _ = sites.remove(&k);
        }
        {
            let mut rows: BpfHashMap<&mut MapData, UnwindKey, UnwindRow> =
                BpfHashMap::try_from(self.map_mut(map::UNWIND)?)
                    .map_err(|e| bpf_err(map::UNWIND, e))?;
            let keys: Vec<UnwindKey> = rows
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.tgid == tgid)
                .collect();
            for k in keys {
                let _ = rows.remove(&k);
            }
            self.taught.retain(|(t, _)| *t != tgid);
        }
        let mut py: BpfHashMap<&mut MapData, u32, PyOffsets> =
            BpfHashMap::try_from(self.map_mut(map::PYPROCS)?)
                .map_err(|e| bpf_err(map::PYPROCS, e))?;
        let _ = py.remove(&tgid);
        self.set_threads(tgid, &[])
    }

    /// Teaches the kernel the unwind rows of return addresses of process `tgid`, so it can
    /// follow those call paths into site ids.
    pub fn learn_rows(&mut self, tgid: u32, rows: &[(u64, UnwindRow)]) -> Result<()> {
        // The kernel's map is LRU: past half its size, forget what was taught so rows the kernel
        // evicted are taught again.
        if self.taught.len() >= UNWIND_ROWS as usize / 2 {
            self.taught.clear();
        }
        let taught = &mut self.taught;
        let map = self
            .ebpf
            .map_mut(map::UNWIND)
            .ok_or_else(|| Error::Bpf("map UNWIND missing from the object".into()))?;
        let mut m: BpfHashMap<&mut MapData, UnwindKey, UnwindRow> =
            BpfHashMap::try_from(map).map_err(|e| bpf_err(map::UNWIND, e))?;
        for (pc, row) in rows {
            if !taught.insert((tgid, *pc)) {
                continue;
            }
            let key = UnwindKey {
                tgid,
                _pad: 0,
                pc: *pc,
            };
            m.insert(key, *row, 0)
                .map_err(|e| bpf_err("teaching unwind rows", e))?;
        }
        Ok(())
    }

    /// Detaches every probe. Removing a uprobe waits for the kernel (≈60 ms each here, and the
    /// kernel serializes them: dropping links from parallel threads measured no faster).
    pub fn detach(&mut self) {
        let mut owned = Vec::new();
        for (name, id) in self.links.drain(..) {
            let prog: Option<&mut UProbe> =
                self.ebpf.program_mut(name).and_then(|p| p.try_into().ok());
            if let Some(link) = prog.and_then(|p| p.take_link(id).ok()) {
                owned.push(link);
            }
        }
        drop(owned);
    }

    /// Number of uprobe links attached.
    pub fn attached(&self) -> usize {
        self.attached
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    /// Takes the ring buffer of new-site records (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map::EVENTS)
            .ok_or_else(|| Error::Bpf("ring buffer EVENTS already taken".into()))?;
        RingBuf::try_from(map).map_err(|e| bpf_err(map::EVENTS, e))
    }

    /// Event and drop counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(map::COUNTERS)?)
            .map_err(|e| bpf_err(map::COUNTERS, e))?;
        let mut out = Counters::default();
        for c in Counter::ALL {
            let vals = arr
                .get(&(c as u32), 0)
                .map_err(|e| bpf_err("reading COUNTERS", e))?;
            out.0[c as usize] = vals.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(out)
    }

    /// The live blocks of process `tgid`: (address, size, site id).
    pub fn live_blocks(&self, tgid: u32) -> Result<Vec<LiveBlock>> {
        let map: BpfHashMap<&MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.map(map::LIVE)?).map_err(|e| bpf_err(map::LIVE, e))?;
        Ok(map
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, v)| LiveBlock {
                addr: k.addr,
                size: v.size,
                site: v.site_id,
                func: AllocFn::from_u8(v.func),
            })
            .collect())
    }

    /// Every live block of every traced process: (process, address, size, site id, allocation
    /// time in the kernel's monotonic nanoseconds).
    pub fn live_table(&self) -> Result<Vec<[u64; 5]>> {
        let map: BpfHashMap<&MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.map(map::LIVE)?).map_err(|e| bpf_err(map::LIVE, e))?;
        Ok(map
            .iter()
            .filter_map(|item| item.ok())
            .map(|(k, v)| [k.tgid as u64, k.addr, v.size, v.site_id, v.ts_ns])
            .collect())
    }

    /// Every site with its counters.
    pub fn sites(&self) -> Result<Vec<(u64, SiteStats)>> {
        let map: BpfHashMap<&MapData, u64, SiteStats> =
            BpfHashMap::try_from(self.map(map::SITES)?).map_err(|e| bpf_err(map::SITES, e))?;
        // A site removed between the key walk and the lookup is simply skipped.
        Ok(map.iter().filter_map(|item| item.ok()).collect())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.end_holds();
        self.detach();
        log::debug!("links detached");
    }
}
