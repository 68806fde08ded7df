//! The heap-sampling USDT contract, consumer side: which mapped files of a process carry
//! `otel_memory` / `ddheap` `alloc` and `free` probes, where each probe's arguments live, and the
//! providers' semaphores that turn the in-process sampler on while leaktrace listens.

use std::path::PathBuf;

use leaktrace_ebpf::{
    usdt_arg, UsdtArg, UsdtSpec, PT_REGS_X86_64, USDT_ALLOC, USDT_FREE, USDT_KIND_ALLOC,
    USDT_KIND_FREE, USDT_MAX_ARGS, USDT_PROVIDERS,
};

use crate::process::elf::{ElfFile, SdtNote};
use crate::process::maps::ModuleMap;

/// One probe site to attach: a `nop` in a mapped file, with its arguments' spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtPoint {
    /// `otel_memory` or `ddheap`.
    pub provider: String,
    /// The file as the process sees it.
    pub module: String,
    /// The same file as leaktrace sees it.
    pub host_path: PathBuf,
    pub file_offset: u64,
    pub spec: UsdtSpec,
    /// Where the provider's semaphore is in the process, if it has one.
    pub semaphore: Option<u64>,
}

/// Every heap-sampling probe in the files process `pid` maps, and the count of notes that could
/// not be used (malformed, or arguments leaktrace cannot read), each with why.
pub fn find(pid: u32, modules: &ModuleMap) -> (Vec<UsdtPoint>, Vec<String>) {
    find_in(pid, modules, &modules.files())
}

/// `find`, over `files` of those process `pid` maps.
fn find_in(pid: u32, modules: &ModuleMap, files: &[&str]) -> (Vec<UsdtPoint>, Vec<String>) {
    let mut points = Vec::new();
    let mut problems = Vec::new();
    for &module in files {
        let host_path = modules.host_path(pid, module);
        let Ok(elf) = ElfFile::open(&host_path) else {
            continue;
        };
        let (notes, bad) = elf.sdt_notes();
        if bad > 0 {
            problems.push(format!("{module}: {bad} malformed SDT notes skipped"));
        }
        for note in notes.iter().filter(|n| is_heap_probe(n)) {
            match point(pid, modules, module, &elf, note) {
                Ok(p) => points.push(p),
                Err(why) => problems.push(format!(
                    "{module}: {}:{} not used: {why}",
                    note.provider, note.name
                )),
            }
        }
    }
    (points, problems)
}

/// The sites to use: those of files that fire both `alloc` and `free` (without `free` a live
/// heap cannot be kept: a sampler built without live-heap tracking only counts allocations),
/// with notes on what was found and not used.
pub fn choose(pid: u32, modules: &ModuleMap) -> (Vec<UsdtPoint>, Vec<String>) {
    let (points, notes) = find(pid, modules);
    let (points, mut notes) = whole_producers(points, notes);
    let users = producers(&points);
    if !users.is_empty() {
        notes.push(format!(
            "allocations are sampled inside the process by {users} (heap-sampling USDT): the C \
             library's allocator is not probed call by call"
        ));
    }
    (points, notes)
}

/// The sites of `files`, mapped since the session began (a library the program loaded with
/// `dlopen`), that can be used: those of files firing both probes, with notes as `choose`.
pub fn choose_in(pid: u32, modules: &ModuleMap, files: &[&str]) -> (Vec<UsdtPoint>, Vec<String>) {
    let (points, notes) = find_in(pid, modules, files);
    whole_producers(points, notes)
}

/// The producers among `points`, named for a note: "FILE (provider), …".
pub fn producers(points: &[UsdtPoint]) -> String {
    let mut users: Vec<String> = points
        .iter()
        .map(|p| format!("{} ({})", p.module, p.provider))
        .collect();
    users.dedup();
    users.join(", ")
}

/// Keeps the sites of files that fire both `alloc` and `free`, with a note for each file left.
fn whole_producers(
    mut points: Vec<UsdtPoint>,
    mut notes: Vec<String>,
) -> (Vec<UsdtPoint>, Vec<String>) {
    let fires = |module: &str, kind: u32| {
        points
            .iter()
            .any(|p| p.module == module && p.spec.kind == kind)
    };
    let whole: Vec<bool> = points
        .iter()
        .map(|p| fires(&p.module, USDT_KIND_ALLOC) && fires(&p.module, USDT_KIND_FREE))
        .collect();
    let mut keep = whole.iter();
    points.retain(|p| {
        let whole = *keep.next().unwrap_or(&false);
        if !whole && p.spec.kind == USDT_KIND_ALLOC {
            notes.push(format!(
                "{}: its {} sampler fires no `free` probe (built without live-heap tracking?): \
                 not used, the allocator is probed instead",
                p.module, p.provider
            ));
        }
        whole
    });
    (points, notes)
}

/// What leaktrace's preload says of itself, read from the process's memory (its constructor
/// has set both by the time the program's entry point is reached); another producer says
/// nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProducerExports {
    /// It samples CPython's allocator domains too (`leaktrace_preload_python_domains`).
    pub samples_python: bool,
    /// The mean interval it samples at (`leaktrace_preload_sample_bytes`).
    pub interval: Option<u64>,
    /// Its ceiling on samples a second, 0 for none (`leaktrace_preload_sample_limit`).
    pub limit: Option<u64>,
    /// The highest mean interval that ceiling raised it to (`leaktrace_preload_interval_max`).
    pub interval_max: Option<u64>,
    /// The mean interval threads take at their next sample (`leaktrace_preload_interval_now`).
    pub interval_now: Option<u64>,
}

/// Where leaktrace's preload keeps its exports in one process: resolved once from its ELF, read
/// whenever the tracer wants them (the interval in force changes as the process runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerSymbols {
    pid: u32,
    python_domains: Option<u64>,
    sample_bytes: Option<u64>,
    sample_limit: Option<u64>,
    interval_max: Option<u64>,
    interval_now: Option<u64>,
}

impl ProducerSymbols {
    /// The exports' values now (what cannot be read is `None`).
    pub fn read(&self) -> ProducerExports {
        let remote = crate::process::remote::Remote { pid: self.pid };
        let word = |at: Option<u64>| {
            remote
                .read(at?, 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let domains = self.python_domains.and_then(|at| remote.read(at, 4));
        ProducerExports {
            samples_python: domains.is_some_and(|b| b.iter().any(|x| *x != 0)),
            interval: word(self.sample_bytes).filter(|n| *n > 0),
            limit: word(self.sample_limit),
            interval_max: word(self.interval_max).filter(|n| *n > 0),
            interval_now: word(self.interval_now).filter(|n| *n > 0),
        }
    }
}

/// The exports of the first of the chosen producers' files that has them, each file's ELF
/// read once.
pub fn producer_symbols(
    pid: u32,
    modules: &ModuleMap,
    points: &[UsdtPoint],
) -> Option<ProducerSymbols> {
    let mut files: Vec<(&str, &std::path::Path)> = points
        .iter()
        .map(|p| (p.module.as_str(), p.host_path.as_path()))
        .collect();
    files.dedup();
    files.into_iter().find_map(|(module, host)| {
        let elf = ElfFile::open(host).ok()?;
        let bias = modules.load_bias(module, elf.first_load_vaddr())?;
        let at = |symbol: &str| Some(elf.data_symbol(symbol)?.wrapping_add(bias));
        let symbols = ProducerSymbols {
            pid,
            python_domains: at("leaktrace_preload_python_domains"),
            sample_bytes: at("leaktrace_preload_sample_bytes"),
            sample_limit: at("leaktrace_preload_sample_limit"),
            interval_max: at("leaktrace_preload_interval_max"),
            interval_now: at("leaktrace_preload_interval_now"),
        };
        (symbols.python_domains.is_some() || symbols.sample_bytes.is_some()).then_some(symbols)
    })
}

fn is_heap_probe(n: &SdtNote) -> bool {
    USDT_PROVIDERS.contains(&n.provider.as_str()) && (n.name == USDT_ALLOC || n.name == USDT_FREE)
}

fn point(
    pid: u32,
    modules: &ModuleMap,
    module: &str,
    elf: &ElfFile,
    note: &SdtNote,
) -> Result<UsdtPoint, String> {
    let (kind, wanted) = if note.name == USDT_ALLOC {
        (USDT_KIND_ALLOC, 3)
    } else {
        (USDT_KIND_FREE, 1)
    };
    let args = parse_args(&note.args)?;
    if args.len() < wanted {
        return Err(format!("{} arguments, {wanted} expected", args.len()));
    }
    let mut spec = UsdtSpec {
        kind,
        ..UsdtSpec::default()
    };
    for (slot, a) in spec.args.iter_mut().zip(args) {
        *slot = a;
    }
    let file_offset = elf
        .file_offset(note.pc)
        .ok_or_else(|| format!("its address {:#x} is in no loaded segment", note.pc))?;
    let semaphore = match note.semaphore {
        0 => None,
        vaddr => Some(
            runtime_address(modules, module, elf, vaddr)
                .map_err(|why| format!("its semaphore at {vaddr:#x} {why} in process {pid}"))?,
        ),
    };
    Ok(UsdtPoint {
        provider: note.provider.clone(),
        module: module.to_string(),
        host_path: modules.host_path(pid, module),
        file_offset,
        spec,
        semaphore,
    })
}

/// Where a file's virtual address `vaddr` is in the process, if a writable mapping of the file
/// holds it (the semaphore is data; a read-only page there would mean the address is wrong).
/// Where a semaphore at `vaddr` of `module` is in the process; it must be writable there, or
/// nobody could raise it (the producer would never fire, so the allocator is probed instead).
fn runtime_address(
    modules: &ModuleMap,
    module: &str,
    elf: &ElfFile,
    vaddr: u64,
) -> Result<u64, &'static str> {
    let bias = modules
        .load_bias(module, elf.first_load_vaddr())
        .ok_or("is not mapped")?;
    let at = vaddr.wrapping_add(bias);
    let mapping = modules
        .mappings()
        .iter()
        .find(|m| m.path == module && m.contains(at))
        .ok_or("is not mapped")?;
    if mapping.perms.starts_with("rw") {
        Ok(at)
    } else {
        Err("is in read-only memory: it cannot be raised")
    }
}

/// Parses a note's argument list (`8@%rdi -4@-20(%rbp) 8@$5`), x86-64 operands.
pub fn parse_args(text: &str) -> Result<Vec<UsdtArg>, String> {
    let args: Vec<UsdtArg> = text
        .split_whitespace()
        .map(parse_arg)
        .collect::<Result<_, _>>()?;
    if args.len() > USDT_MAX_ARGS {
        // Only the first three are read; more are allowed and ignored.
        return Ok(args.into_iter().take(USDT_MAX_ARGS).collect());
    }
    Ok(args)
}

fn parse_arg(spec: &str) -> Result<UsdtArg, String> {
    let bad = |why: &str| format!("argument `{spec}`: {why}");
    let (size, operand) = spec.split_once('@').ok_or_else(|| bad("no size@"))?;
    let size: i64 = size.parse().map_err(|_| bad("size is not a number"))?;
    if ![1, 2, 4, 8].contains(&size.abs()) {
        return Err(bad("size is not 1, 2, 4 or 8"));
    }
    let mut arg = UsdtArg {
        size: size.unsigned_abs() as u8,
        signed: u8::from(size < 0),
        ..UsdtArg::default()
    };
    if let Some(imm) = operand.strip_prefix('$') {
        arg.kind = usdt_arg::CONST;
        arg.val = parse_int(imm).ok_or_else(|| bad("bad constant"))?;
    } else if let Some(reg) = operand.strip_prefix('%') {
        arg.kind = usdt_arg::REG;
        arg.reg_off = reg_offset(reg).ok_or_else(|| bad("unknown register"))?;
    } else if let Some((disp, rest)) = operand.split_once('(') {
        let reg = rest
            .strip_suffix(')')
            .and_then(|r| r.strip_prefix('%'))
            .ok_or_else(|| bad("unsupported memory operand"))?;
        arg.kind = usdt_arg::REG_DEREF;
        arg.reg_off = reg_offset(reg).ok_or_else(|| bad("unknown register"))?;
        arg.val = if disp.is_empty() {
            0
        } else {
            parse_int(disp).ok_or_else(|| bad("bad displacement"))?
        };
    } else {
        return Err(bad("unsupported operand"));
    }
    Ok(arg)
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    let v = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// The `pt_regs` slot of a register named in any width (`rdi`, `edi`, `di`, `dil`, `r8d`).
fn reg_offset(name: &str) -> Option<u32> {
    const ALIASES: [(&str, &[&str]); 16] = [
        ("rax", &["eax", "ax", "al"]),
        ("rbx", &["ebx", "bx", "bl"]),
        ("rcx", &["ecx", "cx", "cl"]),
        ("rdx", &["edx", "dx", "dl"]),
        ("rsi", &["esi", "si", "sil"]),
        ("rdi", &["edi", "di", "dil"]),
        ("rbp", &["ebp", "bp", "bpl"]),
        ("rsp", &["esp", "sp", "spl"]),
        ("r8", &["r8d", "r8w", "r8b"]),
        ("r9", &["r9d", "r9w", "r9b"]),
        ("r10", &["r10d", "r10w", "r10b"]),
        ("r11", &["r11d", "r11w", "r11b"]),
        ("r12", &["r12d", "r12w", "r12b"]),
        ("r13", &["r13d", "r13w", "r13b"]),
        ("r14", &["r14d", "r14w", "r14b"]),
        ("r15", &["r15d", "r15w", "r15b"]),
    ];
    let full = ALIASES
        .iter()
        .find(|(full, short)| *full == name || short.contains(&name))
        .map(|(full, _)| *full)
        // `%rip`-relative operands are refused: at the probe the saved rip is the `nop`
        // itself, not the next instruction the operand is relative to.
        ?;
    PT_REGS_X86_64
        .iter()
        .find(|(n, _)| *n == full)
        .map(|(_, off)| *off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_register_memory_and_constant_operands() {
        let a = parse_args("8@%rdi -4@-20(%rbp) 8@$5 -8@%r12 2@(%rax) 4@0x10(%r8d)").unwrap();
        assert_eq!(a.len(), 3, "three kept");
        assert_eq!(
            (a[0].kind, a[0].size, a[0].signed, a[0].reg_off),
            (usdt_arg::REG, 8, 0, 112)
        );
        assert_eq!(
            (a[1].kind, a[1].size, a[1].signed, a[1].reg_off, a[1].val),
            (usdt_arg::REG_DEREF, 4, 1, 32, -20)
        );
        assert_eq!((a[2].kind, a[2].val), (usdt_arg::CONST, 5));
        assert_eq!(parse_arg("-8@%r12").unwrap().reg_off, 24);
        assert_eq!(parse_arg("2@(%rax)").unwrap().val, 0);
        assert_eq!(parse_arg("4@0x10(%r8d)").unwrap().val, 16);
        assert_eq!(parse_arg("1@%sil").unwrap().reg_off, 104);
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for bad in [
            "8%rdi",
            "3@%rdi",
            "8@%xmm0",
            "8@foo",
            "8@-8(%rbp,%rax,8)",
            "x@%rdi",
        ] {
            assert!(parse_arg(bad).is_err(), "{bad}");
        }
    }

    /// Debian's python3.11 is built with SystemTap probes: real notes, semaphores and operands
    /// such as `-4@112(%rsp)`.
    #[test]
    fn reads_the_sdt_notes_of_a_real_binary() {
        let elf = ElfFile::open(std::path::Path::new("/usr/bin/python3.11"))
            .expect("Debian's python3.11 (README: the tests need it)");
        let (notes, bad) = elf.sdt_notes();
        assert_eq!(bad, 0);
        let audit = notes
            .iter()
            .find(|n| n.name == "audit")
            .expect("python:audit");
        assert_eq!(audit.provider, "python");
        assert_ne!(audit.semaphore, 0);
        assert!(elf.file_offset(audit.pc).is_some());
        for n in &notes {
            parse_args(&n.args).unwrap_or_else(|e| panic!("{}:{} {e}", n.provider, n.name));
        }
        assert!(notes.len() >= 8, "{notes:?}");
    }
}
