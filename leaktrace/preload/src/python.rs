//! Sampling CPython's own allocator domains, whose small objects never reach malloc.
//!
//! pymalloc serves `PyMem_Malloc` and `PyObject_Malloc` requests of up to 512 bytes from
//! 1 MiB arenas, so the libc hooks never see a Python object leak. The constructor therefore
//! wraps `PYMEM_DOMAIN_MEM` and `PYMEM_DOMAIN_OBJ` with `src/python_hooks.rs`, through the C
//! API, before the interpreter starts (which CPython's docs allow). `PYMEM_DOMAIN_RAW` is left
//! alone: it is malloc (the libc hooks sample it), or in a debug build debug hooks over malloc,
//! whose blocks the libc hooks sample as well.
//!
//! CPython sometimes installs fresh allocators over ours:
//!
//! * `PYTHONMALLOC`, `-X dev` and `PYTHONDEVMODE` make pre-initialisation install a new set
//!   before any `MEM` or `OBJ` block exists.
//! * From 3.12 on, `Py_Initialize` after `Py_FinalizeEx` (embedders that cycle) resets the
//!   whole runtime state to its static defaults, allocators included. From 3.13 pymalloc's
//!   arenas outlive the reset, so a block sampled in one cycle and freed in the next would
//!   reach plain pymalloc with a pointer into the middle of its block.
//!
//! Both happen while no interpreter exists, and pre-initialisation then calls setlocale, to set
//! or read `LC_CTYPE` (3.13 does even with an isolated configuration). So the library
//! interposes `setlocale(3)`, and after glibc's, on the thread that loaded it, while no
//! interpreter exists, wraps whatever replaced its wrappers. Nothing can allocate in these domains without an interpreter, and
//! every wrapper installation shares one table of sampled blocks, so any of them frees any
//! sampled block correctly. A domain that is plain malloc, as `PYTHONMALLOC=malloc` makes it,
//! is not wrapped: the libc hooks already see it. (An audit hook would not do: CPython frees
//! hooks added before start-up with whatever `RAW` allocator is current at exit, which aborts
//! once `-X dev` has installed its debug hooks.)
//!
//! An embedder that sets its own allocator replaces ours; one that wraps it keeps it. Only
//! CPython 3.8 to 3.15 with a GIL is wrapped: the free-threaded build's garbage collector walks
//! mimalloc's heaps and would misread a block that starts with a sampler header, and a later
//! version is wrapped once it has been checked. `LEAKTRACE_PRELOAD_STATS=1` prints what
//! happened, and what each domain sampled, on stderr at exit.

use core::cell::UnsafeCell;
use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use crate::python_blocks;
use crate::python_hooks::{PyMemAllocatorEx, Wrapped};

/// CPython's `PYMEM_DOMAIN_RAW`.
const DOMAIN_RAW: c_int = 0;
/// The domains we wrap: `PYMEM_DOMAIN_MEM` and `PYMEM_DOMAIN_OBJ`.
const DOMAINS: [c_int; 2] = [1, 2];

/// The oldest and newest CPython versions (minor, for major 3) checked with these wrappers.
const OLDEST_MINOR: u32 = 8;
const NEWEST_MINOR: u32 = 15;

/// Bit `1 << domain` is set for each CPython domain (1 = MEM, 2 = OBJ) that this library last
/// wrapped, for a tracer (read from the process's memory) or a test (ctypes) to check.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_python_domains: AtomicU32 = AtomicU32::new(0);

type AllocatorFn = unsafe extern "C" fn(c_int, *mut PyMemAllocatorEx);
type VersionFn = unsafe extern "C" fn() -> *const c_char;
type MainInterpreterFn = unsafe extern "C" fn() -> *mut c_void;
type SetlocaleFn = unsafe extern "C" fn(c_int, *const c_char) -> *mut c_char;

/// The CPython functions we call, found with dlsym.
#[derive(Clone, Copy)]
struct Api {
    get: AllocatorFn,
    set: AllocatorFn,
    /// `PyInterpreterState_Main`: null until the main interpreter exists, and again after it
    /// is deleted; it only reads the runtime state.
    main_interpreter: MainInterpreterFn,
}

impl Api {
    /// Whether an interpreter exists, and so whether anything may be allocating in MEM or OBJ.
    fn interpreter_exists(&self) -> bool {
        // SAFETY: PyInterpreterState_Main reads one pointer of the static runtime state.
        !unsafe { (self.main_interpreter)() }.is_null()
    }

    /// The allocator a domain holds now.
    fn current(&self, domain: c_int) -> PyMemAllocatorEx {
        let mut current = PyMemAllocatorEx::EMPTY;
        // SAFETY: PyMem_GetAllocator fills in the struct it is given (under its own lock from
        // 3.13).
        unsafe { (self.get)(domain, &mut current) };
        current
    }
}

/// Written once by the constructor, before setlocale or the report can read it.
struct CtorOnly<T>(UnsafeCell<Option<T>>);

// SAFETY: the only write happens in the library constructor, before any other thread can run
// our code (see `install`); everything after only reads.
unsafe impl<T: Sync> Sync for CtorOnly<T> {}

static API: CtorOnly<Api> = CtorOnly(UnsafeCell::new(None));

fn api() -> Option<Api> {
    // SAFETY: see CtorOnly.
    unsafe { *API.0.get() }
}

/// How many distinct allocators per domain we can wrap in a process's lifetime: the one at
/// load and those `PYTHONMALLOC` installs (re-initialisation reinstalls one of these, whose
/// slot is reused).
const GENERATIONS: usize = 8;

/// One wrapper state per domain and wrapped allocator; see `slot_for`.
static SLOTS: [[Wrapped; 2]; GENERATIONS] =
    [const { [Wrapped::new(), Wrapped::new()] }; GENERATIONS];

/// Whether setlocale should look for replaced wrappers (set once the constructor wrapped).
static ARMED: AtomicBool = AtomicBool::new(false);

/// Taken while setlocale checks or swaps allocators.
static BUSY: AtomicBool = AtomicBool::new(false);

/// The thread that ran the constructor (`pthread_self`), the only one that may re-wrap.
static LOADER_THREAD: AtomicUsize = AtomicUsize::new(0);

/// glibc's setlocale, found with dlsym(RTLD_NEXT).
static REAL_SETLOCALE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// Why the domains are (not) wrapped, for the report; see `Outcome`.
static OUTCOME: AtomicU8 = AtomicU8::new(Outcome::NotPython as u8);

/// How often setlocale wrapped domains again, and how often it found no slot left.
static REWRAPS: AtomicU32 = AtomicU32::new(0);
static OUT_OF_SLOTS: AtomicU32 = AtomicU32::new(0);

/// What the constructor found.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Outcome {
    NotAsked,
    NotPython,
    Unsupported,
    AlreadyRunning,
    Wrapped,
}

impl Outcome {
    fn from_u8(v: u8) -> Self {
        [
            Outcome::NotAsked,
            Outcome::NotPython,
            Outcome::Unsupported,
            Outcome::AlreadyRunning,
            Outcome::Wrapped,
        ]
        .into_iter()
        .find(|o| *o as u8 == v)
        .unwrap_or(Outcome::NotAsked)
    }

    fn describe(self) -> &'static str {
        match self {
            Outcome::NotAsked => "LEAKTRACE_SAMPLE_PYTHON is not 1: not wrapped",
            Outcome::NotPython => "no CPython allocator API in the process: not wrapped",
            Outcome::Unsupported => {
                "unsupported CPython version or free-threaded build: not wrapped"
            }
            Outcome::AlreadyRunning => "an interpreter already existed at load: not wrapped",
            Outcome::Wrapped => "wrapped at load",
        }
    }
}

/// Looks up `name` among the symbols the process exports.
fn lookup(name: &CStr) -> *mut c_void {
    // SAFETY: RTLD_DEFAULT with a NUL-terminated name; dlsym may malloc, which our hooks serve.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

/// Finds the allocator API if this process is a CPython we know how to wrap.
fn find_api() -> Result<Api, Outcome> {
    let (get, set) = (lookup(c"PyMem_GetAllocator"), lookup(c"PyMem_SetAllocator"));
    let (version, main) = (lookup(c"Py_GetVersion"), lookup(c"PyInterpreterState_Main"));
    if get.is_null() || set.is_null() || version.is_null() || main.is_null() {
        return Err(Outcome::NotPython);
    }
    // SAFETY: each address is the exported function of that name, whose C signature the type
    // spells (Python's stable ABI).
    let (get, set, version, main_interpreter) = unsafe {
        (
            core::mem::transmute::<*mut c_void, AllocatorFn>(get),
            core::mem::transmute::<*mut c_void, AllocatorFn>(set),
            core::mem::transmute::<*mut c_void, VersionFn>(version),
            core::mem::transmute::<*mut c_void, MainInterpreterFn>(main),
        )
    };
    // SAFETY: Py_GetVersion formats compile-time strings into a static buffer; it needs no
    // initialised interpreter.
    let text = unsafe { version() };
    if text.is_null() {
        return Err(Outcome::Unsupported);
    }
    // SAFETY: Py_GetVersion returns a NUL-terminated string in static storage.
    if !supported_version(unsafe { CStr::from_ptr(text) }.to_bytes()) {
        return Err(Outcome::Unsupported);
    }
    Ok(Api {
        get,
        set,
        main_interpreter,
    })
}

/// Whether `Py_GetVersion()` names a version these wrappers were checked on, with a GIL.
fn supported_version(text: &[u8]) -> bool {
    fn number(s: &[u8]) -> Option<(u32, &[u8])> {
        let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 4 {
            return None;
        }
        let n = s[..digits]
            .iter()
            .fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
        Some((n, &s[digits..]))
    }
    let Some((3, rest)) = number(text) else {
        return false;
    };
    let Some((minor, _)) = rest.strip_prefix(b".").and_then(number) else {
        return false;
    };
    // 3.13's "experimental free-threading build", 3.14's "free-threading build".
    let free_threaded = text.windows(14).any(|w| w == b"free-threading");
    (OLDEST_MINOR..=NEWEST_MINOR).contains(&minor) && !free_threaded
}

/// Called by the library constructor: wraps the domains if this is a CPython we support.
///
/// # Safety
///
/// Only from the constructor, once, while the process runs no other thread of ours.
pub unsafe fn install() {
    if !crate::env::python_domains_wanted() {
        return OUTCOME.store(Outcome::NotAsked as u8, Ordering::Relaxed);
    }
    let api = match find_api() {
        Ok(api) => api,
        Err(outcome) => return OUTCOME.store(outcome as u8, Ordering::Relaxed),
    };
    if api.interpreter_exists() {
        // Swapping an allocator under a running interpreter races its other threads.
        return OUTCOME.store(Outcome::AlreadyRunning as u8, Ordering::Relaxed);
    }
    // SAFETY: the single write CtorOnly allows.
    unsafe { *API.0.get() = Some(api) };
    real_setlocale();
    // SAFETY: pthread_self has no preconditions.
    LOADER_THREAD.store(unsafe { libc::pthread_self() } as usize, Ordering::Relaxed);
    // SAFETY: no interpreter exists, and this is the constructor: nothing else touches the
    // allocators.
    unsafe { wrap_domains(&api) };
    OUTCOME.store(Outcome::Wrapped as u8, Ordering::Relaxed);
    ARMED.store(true, Ordering::Release);
}

/// Installs wrappers around whatever MEM and OBJ hold now, unless they are ours or plain
/// malloc, and records which domains are wrapped; true if it installed any.
///
/// # Safety
///
/// No interpreter may exist (nothing allocates in these domains then), and no other thread
/// may be in this function.
unsafe fn wrap_domains(api: &Api) -> bool {
    let raw = api.current(DOMAIN_RAW);
    let (mut mask, mut installed) = (0, false);
    for (i, &domain) in DOMAINS.iter().enumerate() {
        let current = api.current(domain);
        if current.is_ours() {
            mask |= 1 << domain;
            continue;
        }
        // Plain malloc (PYTHONMALLOC=malloc) is the libc hooks' already.
        if !current.is_complete() || current.same_as(&raw) {
            continue;
        }
        let Some(slot) = slot_for(i, &current) else {
            OUT_OF_SLOTS.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut ours = if slot.is_unused() {
            let direct = is_cpython_pymalloc(api, &current, &raw);
            // SAFETY: complete, and an unused slot is used by nothing.
            unsafe { slot.set(current, direct) }
        } else {
            slot.installer()
        };
        // SAFETY: PyMem_SetAllocator copies the struct; the caller rules out concurrent use.
        unsafe { (api.set)(domain, &mut ours) };
        mask |= 1 << domain;
        installed = true;
    }
    leaktrace_preload_python_domains.store(mask, Ordering::Relaxed);
    installed
}

/// Whether `current` is CPython's own pymalloc over CPython's own malloc, which
/// `src/python_direct.rs` wraps more cheaply: no context in either domain (CPython's debug
/// hooks keep one), every function in the object that exports `PyMem_SetAllocator` (no
/// embedder's allocator), and `PYTHONMALLOC` naming no other allocator (3.13's mimalloc is
/// CPython's too). An embedder that picks mimalloc through its configuration passes these
/// checks; the wrappers find out at a sample over 512 bytes and count those requests again.
fn is_cpython_pymalloc(api: &Api, current: &PyMemAllocatorEx, raw: &PyMemAllocatorEx) -> bool {
    if !current.ctx.is_null() || !raw.ctx.is_null() || !pymalloc_by_environment() {
        return false;
    }
    let home = object_of(api.set as *const c_void);
    home.is_some()
        && current
            .functions()
            .into_iter()
            .chain(raw.functions())
            .all(|f| object_of(f) == home)
}

/// Whether `PYTHONMALLOC` is unset, empty or `pymalloc`.
fn pymalloc_by_environment() -> bool {
    // SAFETY: getenv with a NUL-terminated name; only reads the environment.
    let v = unsafe { libc::getenv(c"PYTHONMALLOC".as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    v.is_null() || matches!(unsafe { CStr::from_ptr(v) }.to_bytes(), b"" | b"pymalloc")
}

/// The base address of the loaded object that holds `f`, if any.
fn object_of(f: *const c_void) -> Option<usize> {
    // SAFETY: an all-zero Dl_info is valid; dladdr only fills it in.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr reads the loader's tables for any address and writes `info`.
    let found = unsafe { libc::dladdr(f, &mut info) } != 0;
    (found && !info.dli_fbase.is_null()).then_some(info.dli_fbase as usize)
}

/// The slot to wrap `current` in domain `i` with: the one already wrapping that very
/// allocator (CPython reinstalled a default we wrapped before), else an unused one.
fn slot_for(i: usize, current: &PyMemAllocatorEx) -> Option<&'static Wrapped> {
    let mut slots = SLOTS.iter().map(|generation| &generation[i]);
    slots
        .clone()
        .find(|slot| slot.wraps(current))
        .or_else(|| slots.find(|slot| slot.is_unused()))
}

/// glibc's setlocale, looked up on first use (normally by the constructor).
fn real_setlocale() -> Option<SetlocaleFn> {
    let mut f = REAL_SETLOCALE.load(Ordering::Acquire);
    if f.is_null() {
        // SAFETY: RTLD_NEXT with a NUL-terminated name from a shared object; dlsym may malloc,
        // which our hooks serve.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"setlocale".as_ptr()) };
        if f.is_null() {
            return None;
        }
        REAL_SETLOCALE.store(f, Ordering::Release);
    }
    // SAFETY: f is glibc's setlocale, `char *setlocale(int, const char *)`.
    Some(unsafe { core::mem::transmute::<*mut c_void, SetlocaleFn>(f) })
}

/// Interposed `setlocale(3)`: glibc's, then, in a CPython process we wrapped, the check for
/// allocators that CPython replaced (see the module doc). Elsewhere it costs a load and a
/// branch; in CPython, after start-up, a call that finds the interpreter.
#[no_mangle]
pub unsafe extern "C" fn setlocale(category: c_int, locale: *const c_char) -> *mut c_char {
    let out = match real_setlocale() {
        // SAFETY: the caller's arguments, forwarded unchanged.
        Some(real) => unsafe { real(category, locale) },
        None => core::ptr::null_mut(),
    };
    if ARMED.load(Ordering::Acquire) {
        let errno = crate::real::save_errno();
        rewrap_if_replaced();
        crate::real::restore_errno(errno);
    }
    out
}

/// Wraps MEM and OBJ again if something replaced our wrappers while no interpreter exists.
fn rewrap_if_replaced() {
    // The interpreter starts on the thread that loaded us in the `python` program and in most
    // embedders; another thread's setlocale could race that one's start-up, so it is ignored.
    // SAFETY: pthread_self has no preconditions.
    if unsafe { libc::pthread_self() } as usize != LOADER_THREAD.load(Ordering::Relaxed) {
        return;
    }
    if BUSY
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    if let Some(api) = api() {
        // SAFETY: no interpreter exists, so nothing allocates in these domains, and BUSY keeps
        // other callers out.
        if !api.interpreter_exists() && unsafe { wrap_domains(&api) } {
            REWRAPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    BUSY.store(false, Ordering::Release);
}

/// Registers the report at exit if `LEAKTRACE_PRELOAD_STATS` is set and non-empty.
pub fn register_report() {
    // SAFETY: getenv with a NUL-terminated name, in the constructor.
    let v = unsafe { libc::getenv(c"LEAKTRACE_PRELOAD_STATS".as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    if !v.is_null() && unsafe { *v } != 0 {
        // SAFETY: `report` is a static function; atexit failing only loses the report.
        let _ = unsafe { libc::atexit(report) };
    }
}

/// Prints on stderr what happened to the domains and what each one sampled.
extern "C" fn report() {
    let mut line = Line::new();
    line.push(b"leaktrace-preload: python allocators: ");
    line.push(
        Outcome::from_u8(OUTCOME.load(Ordering::Relaxed))
            .describe()
            .as_bytes(),
    );
    line.push(b", wrapped again ");
    line.push_u64(REWRAPS.load(Ordering::Relaxed).into());
    line.push(b" times");
    if OUT_OF_SLOTS.load(Ordering::Relaxed) != 0 {
        line.push(b", out of slots ");
        line.push_u64(OUT_OF_SLOTS.load(Ordering::Relaxed).into());
    }
    for (i, &domain) in DOMAINS.iter().enumerate() {
        let count = |f: fn(&Wrapped) -> &AtomicU64| -> u64 {
            SLOTS.iter().map(|g| f(&g[i]).load(Ordering::Relaxed)).sum()
        };
        line.push(if domain == 1 { b"; mem " } else { b"; obj " });
        line.push(installed_now(domain).as_bytes());
        line.push(b", sampled ");
        line.push_u64(count(|w| &w.stats.sampled));
        line.push(b", released ");
        line.push_u64(count(|w| &w.stats.released));
        line.push(b", dropped ");
        line.push_u64(count(|w| &w.stats.dropped));
        let slots = || SLOTS.iter().map(|g| &g[i]);
        if slots().any(Wrapped::is_direct) {
            line.push(b" (as pymalloc)");
        }
        if slots().any(|w| w.stats.not_pymalloc.load(Ordering::Relaxed)) {
            line.push(b", found not to be pymalloc");
        }
    }
    line.push(b"; live ");
    line.push_u64(python_blocks::live() as u64);
    line.push(b"; libc hooks sampled ");
    line.push_u64(crate::hooks::SAMPLED.load(Ordering::Relaxed));
    line.push(b"\n");
    line.write_to_stderr();
}

/// Whether `domain` holds one of our wrappers at exit.
fn installed_now(domain: c_int) -> &'static str {
    let Some(api) = api() else {
        return "not wrapped";
    };
    let wrapped = leaktrace_preload_python_domains.load(Ordering::Relaxed) & (1 << domain) != 0;
    match (api.current(domain).is_ours(), wrapped) {
        (true, _) => "wrapped at exit",
        (false, true) => "wrapped, replaced by exit",
        (false, false) => "not wrapped",
    }
}

/// A line of text built on the stack, because the report runs inside exit() where stdio may
/// allocate or be closed.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    /// Appends what fits.
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn write_to_stderr(&self) {
        // SAFETY: a valid buffer of `len` bytes; a failed write only loses the report.
        let _ = unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::supported_version;

    #[test]
    fn versions() {
        assert!(supported_version(
            b"3.11.7 (main, Jan  1 2024, 00:00:00) [GCC 12.2.0]"
        ));
        assert!(supported_version(b"3.8.18 (default)"));
        assert!(supported_version(b"3.14.0 (main) [GCC 15]"));
        assert!(!supported_version(b"3.7.16 (default)"));
        assert!(supported_version(
            b"3.15.2 (main, Oct 26 2026) [GCC 16.2.0]"
        ));
        assert!(!supported_version(b"3.16.0a1 (main)"));
        assert!(!supported_version(b"2.7.18 (default)"));
        assert!(!supported_version(
            b"3.13.0 experimental free-threading build (main)"
        ));
        assert!(!supported_version(b"3.14.0 free-threading build (main)"));
        assert!(!supported_version(b"garbage"));
        assert!(!supported_version(b"3."));
    }
}
