//! The allocator underneath: glibc's `__libc_*` entry points, and what they leave out.

use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

// glibc exports these under GLIBC_2.2.5 precisely so that a malloc interposer can reach the real
// allocator without dlsym, whose first call may itself allocate and so recurse into our hooks.
extern "C" {
    pub fn __libc_malloc(size: usize) -> *mut c_void;
    pub fn __libc_calloc(nmemb: usize, size: usize) -> *mut c_void;
    pub fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    pub fn __libc_free(ptr: *mut c_void);
    pub fn __libc_memalign(alignment: usize, size: usize) -> *mut c_void;
    pub fn __libc_valloc(size: usize) -> *mut c_void;
    pub fn __libc_pvalloc(size: usize) -> *mut c_void;
}

type UsableSizeFn = unsafe extern "C" fn(*mut c_void) -> usize;

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
static REAL_USABLE_SIZE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// Fills the caches below from the ELF constructor, so hooks normally find them warm.
pub fn warm_up() {
    page_size();
    real_usable_size_fn();
}

/// The system page size, asked of sysconf once.
pub fn page_size() -> usize {
    let cached = PAGE_SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let errno = save_errno();
    // SAFETY: sysconf has no preconditions and does not allocate.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    restore_errno(errno);
    // x86-64 Linux cannot fail this, but a bogus 0 would make pvalloc loop on rounding.
    let size = if raw > 0 { raw as usize } else { 4096 };
    PAGE_SIZE.store(size, Ordering::Relaxed);
    size
}

/// glibc's own malloc_usable_size; it has no `__libc_` alias, so it is found with dlsym.
pub fn real_usable_size_fn() -> Option<UsableSizeFn> {
    let mut f = REAL_USABLE_SIZE.load(Ordering::Acquire);
    if f.is_null() {
        let errno = save_errno();
        // SAFETY: RTLD_NEXT with a NUL-terminated name is valid from a shared object; dlsym may
        // call malloc, which our malloc serves without reaching this function again.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
        restore_errno(errno);
        if f.is_null() {
            return None;
        }
        REAL_USABLE_SIZE.store(f, Ordering::Release);
    }
    // SAFETY: f is the address dlsym gave for malloc_usable_size, whose C signature is
    // `size_t (void *)`.
    Some(unsafe { core::mem::transmute::<*mut c_void, UsableSizeFn>(f) })
}

/// The calling thread's errno.
pub fn save_errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

/// Puts back an errno saved with [`save_errno`], or sets one the C standard asks for.
pub fn restore_errno(value: i32) {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() = value }
}
