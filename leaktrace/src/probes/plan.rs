//! Which functions of which files to probe in a process, and at what file offsets.

use std::collections::HashMap;
use std::path::PathBuf;

use leaktrace_ebpf::AllocFn;

pub use super::coverage::PythonCoverage;
use super::placement::{choose, Placement};
use super::redirect::{self, Redirect};
use crate::error::{Error, Result};
use crate::process::elf::{ElfFile, FnSymbol, SymbolTable};
use crate::process::maps::ModuleMap;
use crate::process::python::{self, PythonInfo};

/// The note of a plan that found no interpreter; a later plan of the same target (after an
/// exec into Python) drops it.
pub const NOT_PYTHON: &str =
    "not a Python process (no libpython, no interpreter symbols): tracing libc allocations only";
/// Which allocator families to trace, and how closely (docs/coverage.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Families {
    /// libc's allocator call by call, pymalloc arena by arena: every block over 512 B and every
    /// native buffer exactly, small Python objects by the arenas they fill (and by type in the
    /// census), at one trap per libc call and none per small object.
    #[default]
    LibcAndArenas,
    /// libc's allocator and every call of Python's (`--python-allocators`).
    LibcAndPythonCalls,
    /// libc's allocator alone (`--libc-only`).
    LibcOnly,
    /// Every call of Python's allocator alone (`--python-only`).
    PythonOnly,
}

impl Families {
    fn libc(self) -> bool {
        self != Families::PythonOnly
    }

    /// Whether every call of Python's allocator is probed.
    pub fn python_calls(self) -> bool {
        matches!(self, Families::LibcAndPythonCalls | Families::PythonOnly)
    }
}

/// One function to probe.
#[derive(Clone, Debug)]
pub struct ProbePoint {
    pub func: AllocFn,
    /// The file as the process sees it.
    pub module: String,
    pub host_path: PathBuf,
    pub table: SymbolTable,
    pub placement: Placement,
    /// File offset of the probe (symbol + placement), what the kernel attaches to.
    pub file_offset: u64,
}

/// A point in the interpreter's life that leaktrace acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// `Py_RunMain`: start-up (the `site` import, `.pth` files) is over and the main module,
    /// `-c` or `-m` is about to run. The type census's baseline is taken here.
    MainStart,
    /// `Py_FinalizeEx`: shutdown begins; accounting freezes.
    Finalize,
}

impl Lifecycle {
    /// The function probed.
    pub fn symbol(self) -> &'static str {
        match self {
            Lifecycle::MainStart => "Py_RunMain",
            Lifecycle::Finalize => "Py_FinalizeEx",
        }
    }

    /// The ring-buffer record kind the kernel sends there (the probe's cookie).
    pub fn event_kind(self) -> u32 {
        match self {
            Lifecycle::MainStart => leaktrace_ebpf::EVENT_MAIN,
            Lifecycle::Finalize => leaktrace_ebpf::EVENT_FINALIZE,
        }
    }
}

/// Where one lifecycle function of the interpreter is probed.
#[derive(Clone, Debug)]
pub struct LifecyclePoint {
    pub kind: Lifecycle,
    pub module: String,
    pub host_path: PathBuf,
    pub file_offset: u64,
}

/// Everything to probe in one process, and what could not be.
#[derive(Clone, Debug)]
pub struct ProbePlan {
    pub points: Vec<ProbePoint>,
    pub python: Option<PythonInfo>,
    pub python_coverage: PythonCoverage,
    /// Where the interpreter starts running the main module and where it starts shutting down,
    /// those found.
    pub lifecycle: Vec<LifecyclePoint>,
    /// The libc (or static executable) whose allocator is probed.
    pub libc: Option<String>,
    /// Functions that share an address with one already probed: (alias, probed as).
    pub aliases: Vec<(AllocFn, AllocFn)>,
    /// Functions not found (e.g. `pvalloc` in newer glibc).
    pub missing: Vec<AllocFn>,
    /// Things the user should know about coverage.
    pub notes: Vec<String>,
    /// `--redirect-pymalloc`: the allocator tables to switch once the probes are in.
    pub redirect: Option<Redirect>,
    /// Heap-sampling USDT sites (sampled mode on a process that samples itself): the libc
    /// allocator is then not probed call by call.
    pub usdt: Vec<super::usdt::UsdtPoint>,
    /// The mean interval in bytes the process's sampler was started with, where it says
    /// (leaktrace's preload); `None` for another producer, whose interval is its own.
    pub usdt_interval: Option<u64>,
    /// The highest interval its ceiling had raised it to when the plan was made (an earlier
    /// session's), which this session's report does not claim.
    pub usdt_interval_max: Option<u64>,
    /// Where leaktrace's preload keeps its exports in the process, when it is the producer.
    pub usdt_exports: Option<super::usdt::ProducerSymbols>,
}

const LIBC_FNS: &[AllocFn] = &[
    AllocFn::Malloc,
    AllocFn::Calloc,
    AllocFn::Realloc,
    AllocFn::Reallocarray,
    AllocFn::PosixMemalign,
    AllocFn::Memalign,
    AllocFn::AlignedAlloc,
    AllocFn::Valloc,
    AllocFn::Pvalloc,
    AllocFn::Free,
];

const PY_IMPL_FNS: &[AllocFn] = &[
    AllocFn::PyObjectMallocImpl,
    AllocFn::PyObjectCallocImpl,
    AllocFn::PyObjectReallocImpl,
    AllocFn::PyObjectFreeImpl,
];

/// CPython's debug hooks, probed beside pymalloc's functions where the symbol table has them: when
/// the hooks are on they are the outer call, so blocks are the program's own pointers and sizes
/// (as tracemalloc counts them); when off they are never called.
const PY_DEBUG_FNS: &[AllocFn] = &[
    AllocFn::PyDebugMalloc,
    AllocFn::PyDebugCalloc,
    AllocFn::PyDebugRealloc,
    AllocFn::PyDebugFree,
];

const PY_ARENA_FNS: &[AllocFn] = &[AllocFn::PyArenaAlloc, AllocFn::PyArenaFree];

const PY_EXPORTED_FNS: &[AllocFn] = &[
    AllocFn::PyObjectMalloc,
    AllocFn::PyObjectCalloc,
    AllocFn::PyObjectRealloc,
    AllocFn::PyObjectFree,
    AllocFn::PyMemMalloc,
    AllocFn::PyMemCalloc,
    AllocFn::PyMemRealloc,
    AllocFn::PyMemFree,
];

/// Whether a mapped file is the C library.
fn is_libc(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so")
        || (base.starts_with("libc-") && base.contains(".so"))
        || base.starts_with("ld-musl")
}

/// Whether the process runs with `PYTHONMALLOC=malloc` (or `malloc_debug`): Python's object
/// and memory domains then call libc's malloc directly.
fn python_malloc_is_raw(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|b| *b == 0)
                .any(|kv| kv == b"PYTHONMALLOC=malloc" || kv == b"PYTHONMALLOC=malloc_debug")
        })
        .unwrap_or(false)
}

/// Whether a Python interpreter binary would leave leaktrace with partial coverage: it holds
/// the interpreter (or links a libpython) whose pymalloc functions are not in a symbol table.
/// `run --pymalloc auto` then starts it with `PYTHONMALLOC=malloc`.
pub fn needs_raw_malloc(exe: &std::path::Path) -> bool {
    let Ok(elf) = ElfFile::open(exe) else {
        return false;
    };
    let impl_names: Vec<&str> = PY_IMPL_FNS.iter().map(|f| f.symbol()).collect();
    let has_impls = |e: &ElfFile| {
        e.functions(&impl_names)
            .map(|f| all_in_own_symtab(&f, impl_names.len()))
            .unwrap_or(false)
    };
    if elf.has_any_symbol(&["_PyRuntime", "Py_Initialize"])
        && elf.data_symbol("_PyRuntime").is_some()
    {
        return !has_impls(&elf);
    }
    match elf.needed_libpython() {
        Some(lib) => ElfFile::open(&lib).map(|l| !has_impls(&l)).unwrap_or(false),
        None => false,
    }
}

/// Whether all `n` of pymalloc's functions were found, in the binary's own `.symtab`. A stripped
/// build's debug file names them too, but distributions build stripped interpreters with LTO,
/// which copies pymalloc's fast path into its callers: probes on the functions would miss most
/// calls while the coverage said complete.
fn all_in_own_symtab(found: &HashMap<String, FnSymbol>, n: usize) -> bool {
    found.len() == n && found.values().all(|f| f.table == SymbolTable::Symtab)
}

/// Builds the probe plan for process `pid` from its current mappings.
pub fn plan(
    pid: u32,
    modules: &ModuleMap,
    exe: Option<&str>,
    families: Families,
    redirect: bool,
    usdt: bool,
) -> Result<ProbePlan> {
    let python = python::detect(pid, modules, exe);
    let mut plan = ProbePlan {
        python: python.clone(),
        ..ProbePlan::empty()
    };
    if families == Families::PythonOnly && python.is_none() {
        return Err(Error::NotPython(
            pid,
            "; drop --python-only to trace its libc allocations",
        ));
    }
    let mut producer = super::usdt::ProducerExports::default();
    if usdt && families.libc() {
        (plan.usdt, plan.notes) = super::usdt::choose(pid, modules);
        plan.usdt_exports = super::usdt::producer_symbols(pid, modules, &plan.usdt);
        producer = plan.usdt_exports.map(|s| s.read()).unwrap_or_default();
        plan.usdt_interval = producer.interval;
        plan.usdt_interval_max = producer.interval_max;
    }
    if families.libc() && plan.usdt.is_empty() {
        plan_libc(&mut plan, pid, modules, exe)?;
    }
    if let Some(py) = &python {
        plan_lifecycle(&mut plan, py)?;
    }
    let raw_malloc = python.is_some() && python_malloc_is_raw(pid);
    match (&python, families) {
        (_, Families::LibcOnly) => {}
        (Some(_), _) if producer.samples_python => {
            plan.python_coverage = PythonCoverage::SampledInProcess;
        }
        (Some(py), _) if raw_malloc && families != Families::PythonOnly => {
            // Every Python allocation reaches malloc; the exported entry points still name
            // Python allocations where they are called, when they are asked for.
            if families.python_calls() {
                let elf = ElfFile::open(&py.host_path)?;
                add_points(&mut plan, &elf, &py.module, PY_EXPORTED_FNS)?;
            }
            plan.python_coverage = PythonCoverage::RawMalloc;
        }
        (Some(py), _) if families.python_calls() => {
            plan_python_calls(&mut plan, py, families, redirect.then_some((pid, modules)))?
        }
        (Some(py), _) => plan_arenas(&mut plan, py)?,
        (None, Families::LibcAndArenas | Families::LibcAndPythonCalls) => {
            plan.notes.push(NOT_PYTHON.into())
        }
        (None, _) => {}
    }

    let allocating = |p: &ProbePoint| p.func.shape() != leaktrace_ebpf::Shape::Free;
    if plan.usdt.is_empty() && !plan.points.iter().any(allocating) {
        return Err(nothing_to_probe(&plan, pid, exe, families));
    }
    Ok(plan)
}

/// libc's allocator family, from the mapped C library; a static executable carries its own.
fn plan_libc(plan: &mut ProbePlan, pid: u32, modules: &ModuleMap, exe: Option<&str>) -> Result<()> {
    // A static executable carries its own malloc: fall back to the executable.
    let libc = modules
        .files()
        .into_iter()
        .find(|f| is_libc(f))
        .map(str::to_string)
        .or_else(|| exe.map(str::to_string));
    if let Some(libc) = libc {
        let elf = ElfFile::open(&modules.host_path(pid, &libc))?;
        let before = plan.points.len();
        add_points(plan, &elf, &libc, LIBC_FNS)?;
        if plan.points.len() > before {
            plan.libc = Some(libc);
        }
    }
    Ok(())
}

/// The interpreter's lifecycle points: the main module's start and shutdown.
fn plan_lifecycle(plan: &mut ProbePlan, py: &PythonInfo) -> Result<()> {
    let elf = ElfFile::open(&py.host_path)?;
    let kinds = [Lifecycle::MainStart, Lifecycle::Finalize];
    let found = elf.functions(&kinds.map(Lifecycle::symbol))?;
    for kind in kinds {
        let Some(f) = found.get(kind.symbol()) else {
            continue;
        };
        if let Some(file_offset) = elf.file_offset(f.vaddr) {
            plan.lifecycle.push(LifecyclePoint {
                kind,
                module: py.module.clone(),
                host_path: py.host_path.clone(),
                file_offset,
            });
        }
    }
    Ok(())
}

/// Why there is no allocating function to probe.
fn nothing_to_probe(plan: &ProbePlan, pid: u32, exe: Option<&str>, families: Families) -> Error {
    let detail = match (&plan.libc, families) {
        (_, Families::PythonOnly) => "the Python allocator functions were not found".to_string(),
        (None, _) => format!(
            "no C library is mapped and {} has no malloc symbol (statically linked and stripped?)",
            exe.unwrap_or("the executable")
        ),
        (Some(l), _) => format!("{l} exports no malloc"),
    };
    Error::NoAllocatorSymbols { pid, detail }
}

/// Every call of Python's allocator: pymalloc's implementation functions when the symbol table
/// has them, else the exported API (partial under LTO).
/// `redirect`: `--redirect-pymalloc`, with the process and its mappings.
fn plan_python_calls(
    plan: &mut ProbePlan,
    py: &PythonInfo,
    families: Families,
    redirect: Option<(u32, &ModuleMap)>,
) -> Result<()> {
    let elf = ElfFile::open(&py.host_path)?;
    let impls = elf.functions(&PY_IMPL_FNS.iter().map(|f| f.symbol()).collect::<Vec<_>>())?;
    if all_in_own_symtab(&impls, PY_IMPL_FNS.len()) {
        add_points(plan, &elf, &py.module, PY_IMPL_FNS)?;
        if redirect.is_some() {
            plan.notes.push(
                "--redirect-pymalloc not needed: pymalloc's functions are in the symbol table, \
                 and probed"
                    .into(),
            );
        }
        let debug = elf.functions(&PY_DEBUG_FNS.iter().map(|f| f.symbol()).collect::<Vec<_>>())?;
        if debug.len() == PY_DEBUG_FNS.len() {
            add_points(plan, &elf, &py.module, PY_DEBUG_FNS)?;
        }
        plan.python_coverage = PythonCoverage::PymallocImpl;
        return Ok(());
    }
    if let Some((pid, modules)) = redirect {
        return plan_redirect(plan, py, &elf, pid, modules);
    }
    add_points(plan, &elf, &py.module, PY_EXPORTED_FNS)?;
    plan.python_coverage = PythonCoverage::ExportedApiOnly;
    let restart = if families == Families::PythonOnly {
        ""
    } else {
        " (`run` starts such an interpreter with PYTHONMALLOC=malloc, which sees them all)"
    };
    plan.notes.push(format!(
        "{} has no symbol table (stripped): probing the exported PyObject_*/PyMem_* API; \
         allocations that LTO inlined into the interpreter are not seen, so Python-allocator \
         figures are partial{restart}",
        py.module
    ));
    Ok(())
}

/// The default: pymalloc's arena functions, one call per 1 MiB arena. They are called through
/// the allocator table, so even an LTO build keeps them as functions; a stripped one has no name
/// for them.
fn plan_arenas(plan: &mut ProbePlan, py: &PythonInfo) -> Result<()> {
    let elf = ElfFile::open(&py.host_path)?;
    let before = plan.points.len();
    add_points(plan, &elf, &py.module, PY_ARENA_FNS)?;
    let found = &plan.points[before..];
    if found.iter().any(|p| p.func == AllocFn::PyArenaAlloc)
        && found.iter().any(|p| p.func == AllocFn::PyArenaFree)
    {
        plan.python_coverage = PythonCoverage::Arenas;
        return Ok(());
    }
    plan.points.truncate(before);
    plan.missing
        .retain(|f| f.family() != leaktrace_ebpf::Family::Arena);
    plan.python_coverage = PythonCoverage::LargeObjectsOnly;
    plan.notes.push(format!(
        "{} has no symbol table (stripped): pymalloc's arenas are not probed, so Python objects \
         of 512 B or less are seen only in the type census (--python-allocators traces them)",
        py.module
    ));
    Ok(())
}

/// `--redirect-pymalloc` on a stripped interpreter: the tables, checked, and pymalloc's four
/// functions probed at the addresses the tables hold.
fn plan_redirect(
    plan: &mut ProbePlan,
    py: &PythonInfo,
    elf: &ElfFile,
    pid: u32,
    modules: &ModuleMap,
) -> Result<()> {
    let r = tables_in(elf, pid, py, modules)?;
    for (func, vaddr) in PY_IMPL_FNS.iter().zip(r.pymalloc) {
        add_point(
            plan,
            elf,
            &py.module,
            *func,
            vaddr,
            0,
            SymbolTable::AllocatorTable,
        )?;
    }
    plan.python_coverage = PythonCoverage::Redirected;
    plan.redirect = Some(r);
    Ok(())
}

/// The allocator tables of the interpreter `py` in process `pid`, found and checked, ready to
/// be switched (`--redirect-pymalloc`, and `--control`'s `redirect` on any build).
pub fn allocator_tables(pid: u32, py: &PythonInfo, modules: &ModuleMap) -> Result<Redirect> {
    tables_in(&ElfFile::open(&py.host_path)?, pid, py, modules)
}

fn tables_in(elf: &ElfFile, pid: u32, py: &PythonInfo, modules: &ModuleMap) -> Result<Redirect> {
    let bias = modules
        .load_bias(&py.module, elf.first_load_vaddr())
        .ok_or_else(|| {
            Error::Usage(format!(
                "--redirect-pymalloc: {} is not mapped as its ELF headers say",
                py.module
            ))
        })?;
    redirect::find(pid, elf, bias)
}

fn add_points(plan: &mut ProbePlan, elf: &ElfFile, module: &str, funcs: &[AllocFn]) -> Result<()> {
    let names: Vec<&str> = funcs
        .iter()
        .flat_map(|f| std::iter::once(f.symbol()).chain(f.other_symbol()))
        .collect();
    let syms = elf.functions(&names)?;
    let mut by_addr: HashMap<u64, AllocFn> = HashMap::new();
    for &func in funcs {
        let sym = syms
            .get(func.symbol())
            .or_else(|| func.other_symbol().and_then(|o| syms.get(o)));
        let Some(sym) = sym else {
            plan.missing.push(func);
            continue;
        };
        if let Some(&first) = by_addr.get(&sym.vaddr) {
            plan.aliases.push((func, first));
            continue;
        }
        by_addr.insert(sym.vaddr, func);
        add_point(plan, elf, module, func, sym.vaddr, sym.size, sym.table)?;
    }
    Ok(())
}

/// Places a probe on `func` at `vaddr` (`size` bytes long, 0 when unknown).
fn add_point(
    plan: &mut ProbePlan,
    elf: &ElfFile,
    module: &str,
    func: AllocFn,
    vaddr: u64,
    size: u64,
    table: SymbolTable,
) -> Result<()> {
    let len = if size > 0 { size } else { 64 };
    let code = elf.bytes_at(vaddr, len).unwrap_or_default();
    let placement = choose(&code, vaddr, func);
    let file_offset = elf
        .file_offset(vaddr + placement.offset)
        .ok_or_else(|| Error::Elf {
            path: elf.path().to_path_buf(),
            detail: format!(
                "{} at {:#x} is in no loadable segment",
                func.symbol(),
                vaddr
            ),
        })?;
    plan.points.push(ProbePoint {
        func,
        module: module.to_string(),
        host_path: elf.path().to_path_buf(),
        table,
        placement,
        file_offset,
    });
    Ok(())
}

impl ProbePlan {
    /// A plan with nothing in it (before the target is known).
    pub fn empty() -> Self {
        Self {
            points: Vec::new(),
            python: None,
            python_coverage: PythonCoverage::None,
            lifecycle: Vec::new(),
            libc: None,
            aliases: Vec::new(),
            missing: Vec::new(),
            notes: Vec::new(),
            redirect: None,
            usdt: Vec::new(),
            usdt_interval: None,
            usdt_interval_max: None,
            usdt_exports: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Process;

    #[test]
    fn libc_names() {
        assert!(is_libc("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_libc("/lib/libc-2.31.so"));
        assert!(is_libc("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_libc("/usr/lib/libcrypto.so.3"));
        assert!(!is_libc("/usr/lib/libcap.so.2"));
    }

    /// This test binary is not Python: libc is planned, memalign/aligned_alloc collapse into one
    /// probe, and --python-only is refused.
    #[test]
    fn plans_libc_for_a_non_python_process() {
        let me = Process::open(std::process::id()).unwrap();
        let mm = me.module_map().unwrap();
        let plan = plan(
            me.pid,
            &mm,
            me.exe().as_deref(),
            Families::default(),
            false,
            false,
        )
        .unwrap();
        assert!(plan.python.is_none());
        assert!(plan.points.iter().any(|p| p.func == AllocFn::Malloc));
        assert!(plan.points.iter().any(|p| p.func == AllocFn::Free));
        assert!(plan
            .notes
            .iter()
            .any(|n| n.contains("not a Python process")));
        let addrs: std::collections::HashSet<u64> =
            plan.points.iter().map(|p| p.file_offset).collect();
        assert_eq!(addrs.len(), plan.points.len(), "no address is probed twice");
        assert!(matches!(
            super::plan(
                me.pid,
                &mm,
                me.exe().as_deref(),
                Families::PythonOnly,
                false,
                false
            ),
            Err(Error::NotPython(..))
        ));
    }
}
