//! The allocator functions leaktrace probes, and what a probe needs to know of each: which
//! registers hold its size and pointers, and which allocator it belongs to.

/// The allocator entry points leaktrace probes. The discriminant is the uprobe's attach cookie.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocFn {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    Free = 9,
    /// `_PyObject_Malloc(ctx, size)`: pymalloc's implementation, reached through the allocator table.
    PyObjectMallocImpl = 10,
    PyObjectCallocImpl = 11,
    PyObjectReallocImpl = 12,
    PyObjectFreeImpl = 13,
    /// Exported API, used when the pymalloc functions are not in a symbol table.
    PyObjectMalloc = 14,
    PyObjectCalloc = 15,
    PyObjectRealloc = 16,
    PyObjectFree = 17,
    PyMemMalloc = 18,
    PyMemCalloc = 19,
    PyMemRealloc = 20,
    PyMemFree = 21,
    /// Not a function: a page of memory touched for the first time (growth mode, from the
    /// page-fault tracepoints), so the process's resident memory grew.
    PageFault = 22,
    /// pymalloc's arena allocator (`_PyObject_ArenaMmap(ctx, size)` up to 3.11,
    /// `_PyMem_ArenaAlloc(ctx, size)` from 3.12): one 1 MiB arena, reached through the
    /// allocator table. The default coverage sees small Python objects this way: one call per
    /// 1 MiB of pymalloc's growth, instead of one per object.
    PyArenaAlloc = 23,
    /// `_PyObject_ArenaMunmap(ctx, ptr, size)` / `_PyMem_ArenaFree(ctx, ptr, size)`.
    PyArenaFree = 24,
    /// `_PyMem_DebugMalloc(ctx, size)`: CPython's debug hooks (a debug build's default,
    /// `PYTHONMALLOC=debug`, `-X dev`) in front of pymalloc for the object and mem domains. It
    /// takes and returns what the program asked for; the pymalloc call it makes inside (16 bytes
    /// before, 8 after) is nested and left to it. Never called when the hooks are off.
    PyDebugMalloc = 25,
    PyDebugCalloc = 26,
    PyDebugRealloc = 27,
    PyDebugFree = 28,
    /// Not a function: an allocation the process sampled itself and announced on a
    /// heap-sampling USDT (`otel_memory:alloc`, `ddheap:alloc`), with its weight.
    UsdtAlloc = 29,
}

/// How a function takes and returns its memory; decides which registers a probe reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `p = f(size)`
    Malloc,
    /// `p = f(nmemb, size)`
    Calloc,
    /// `p = f(old, size)`
    Realloc,
    /// `p = f(old, nmemb, size)`
    ReallocArray,
    /// `p = f(align, size)`
    Memalign,
    /// `rc = f(&p, align, size)`
    PosixMemalign,
    /// `f(p)`
    Free,
}

/// Which allocator a function belongs to, as shown in reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Libc,
    Python,
    /// Resident pages (growth mode).
    Pages,
    /// pymalloc's arenas: the memory small Python objects live in, 1 MiB at a time.
    Arena,
}

impl AllocFn {
    /// Every function, in discriminant order.
    pub const ALL: [AllocFn; 30] = [
        AllocFn::Malloc,
        AllocFn::Calloc,
        AllocFn::Realloc,
        AllocFn::Reallocarray,
        AllocFn::PosixMemalign,
        AllocFn::AlignedAlloc,
        AllocFn::Memalign,
        AllocFn::Valloc,
        AllocFn::Pvalloc,
        AllocFn::Free,
        AllocFn::PyObjectMallocImpl,
        AllocFn::PyObjectCallocImpl,
        AllocFn::PyObjectReallocImpl,
        AllocFn::PyObjectFreeImpl,
        AllocFn::PyObjectMalloc,
        AllocFn::PyObjectCalloc,
        AllocFn::PyObjectRealloc,
        AllocFn::PyObjectFree,
        AllocFn::PyMemMalloc,
        AllocFn::PyMemCalloc,
        AllocFn::PyMemRealloc,
        AllocFn::PyMemFree,
        AllocFn::PageFault,
        AllocFn::PyArenaAlloc,
        AllocFn::PyArenaFree,
        AllocFn::PyDebugMalloc,
        AllocFn::PyDebugCalloc,
        AllocFn::PyDebugRealloc,
        AllocFn::PyDebugFree,
        AllocFn::UsdtAlloc,
    ];

    /// Decodes an attach cookie or a stored discriminant.
    #[inline(always)]
    pub fn from_u8(v: u8) -> Option<AllocFn> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The symbol this function is found under.
    pub fn symbol(self) -> &'static str {
        match self {
            AllocFn::Malloc => "malloc",
            AllocFn::Calloc => "calloc",
            AllocFn::Realloc => "realloc",
            AllocFn::Reallocarray => "reallocarray",
            AllocFn::PosixMemalign => "posix_memalign",
            AllocFn::AlignedAlloc => "aligned_alloc",
            AllocFn::Memalign => "memalign",
            AllocFn::Valloc => "valloc",
            AllocFn::Pvalloc => "pvalloc",
            AllocFn::Free => "free",
            AllocFn::PyObjectMallocImpl => "_PyObject_Malloc",
            AllocFn::PyObjectCallocImpl => "_PyObject_Calloc",
            AllocFn::PyObjectReallocImpl => "_PyObject_Realloc",
            AllocFn::PyObjectFreeImpl => "_PyObject_Free",
            AllocFn::PyObjectMalloc => "PyObject_Malloc",
            AllocFn::PyObjectCalloc => "PyObject_Calloc",
            AllocFn::PyObjectRealloc => "PyObject_Realloc",
            AllocFn::PyObjectFree => "PyObject_Free",
            AllocFn::PyMemMalloc => "PyMem_Malloc",
            AllocFn::PyMemCalloc => "PyMem_Calloc",
            AllocFn::PyMemRealloc => "PyMem_Realloc",
            AllocFn::PyMemFree => "PyMem_Free",
            AllocFn::PageFault => "page fault",
            AllocFn::PyArenaAlloc => "_PyObject_ArenaMmap",
            AllocFn::PyArenaFree => "_PyObject_ArenaMunmap",
            AllocFn::PyDebugMalloc => "_PyMem_DebugMalloc",
            AllocFn::PyDebugCalloc => "_PyMem_DebugCalloc",
            AllocFn::PyDebugRealloc => "_PyMem_DebugRealloc",
            AllocFn::PyDebugFree => "_PyMem_DebugFree",
            AllocFn::UsdtAlloc => "alloc",
        }
    }

    /// The name the function has in other CPython versions (3.12 renamed the arena functions).
    pub fn other_symbol(self) -> Option<&'static str> {
        match self {
            AllocFn::PyArenaAlloc => Some("_PyMem_ArenaAlloc"),
            AllocFn::PyArenaFree => Some("_PyMem_ArenaFree"),
            _ => None,
        }
    }

    /// The name reports give the allocator: its symbol, or what it stands for when the symbol
    /// differs between versions.
    pub fn label(self) -> &'static str {
        match self {
            AllocFn::PyArenaAlloc => "pymalloc arena",
            AllocFn::PyArenaFree => "pymalloc arena free",
            AllocFn::UsdtAlloc => "sampled in-process",
            _ => self.symbol(),
        }
    }

    /// The argument/return convention of the function.
    #[inline(always)]
    pub fn shape(self) -> Shape {
        match self {
            AllocFn::Malloc
            | AllocFn::Valloc
            | AllocFn::Pvalloc
            | AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectMalloc
            | AllocFn::PyMemMalloc
            | AllocFn::PyArenaAlloc
            | AllocFn::PyDebugMalloc
            | AllocFn::UsdtAlloc
            | AllocFn::PageFault => Shape::Malloc,
            AllocFn::Calloc
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectCalloc
            | AllocFn::PyMemCalloc
            | AllocFn::PyDebugCalloc => Shape::Calloc,
            AllocFn::Realloc
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectRealloc
            | AllocFn::PyMemRealloc
            | AllocFn::PyDebugRealloc => Shape::Realloc,
            AllocFn::Reallocarray => Shape::ReallocArray,
            AllocFn::AlignedAlloc | AllocFn::Memalign => Shape::Memalign,
            AllocFn::PosixMemalign => Shape::PosixMemalign,
            AllocFn::Free
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyObjectFree
            | AllocFn::PyMemFree
            | AllocFn::PyArenaFree
            | AllocFn::PyDebugFree => Shape::Free,
        }
    }

    /// The index of the first real argument: pymalloc's implementation functions take the
    /// allocator context first (`_PyObject_Malloc(void *ctx, size_t size)`).
    #[inline(always)]
    pub fn first_arg(self) -> usize {
        match self {
            AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyArenaAlloc
            | AllocFn::PyArenaFree
            | AllocFn::PyDebugMalloc
            | AllocFn::PyDebugCalloc
            | AllocFn::PyDebugRealloc
            | AllocFn::PyDebugFree => 1,
            _ => 0,
        }
    }

    /// Which allocator the function belongs to.
    pub fn family(self) -> Family {
        match self {
            AllocFn::Malloc
            | AllocFn::Calloc
            | AllocFn::Realloc
            | AllocFn::Reallocarray
            | AllocFn::PosixMemalign
            | AllocFn::AlignedAlloc
            | AllocFn::Memalign
            | AllocFn::Valloc
            | AllocFn::Pvalloc
            | AllocFn::UsdtAlloc
            | AllocFn::Free => Family::Libc,
            AllocFn::PyObjectMallocImpl
            | AllocFn::PyObjectCallocImpl
            | AllocFn::PyObjectReallocImpl
            | AllocFn::PyObjectFreeImpl
            | AllocFn::PyObjectMalloc
            | AllocFn::PyObjectCalloc
            | AllocFn::PyObjectRealloc
            | AllocFn::PyObjectFree
            | AllocFn::PyMemMalloc
            | AllocFn::PyMemCalloc
            | AllocFn::PyMemRealloc
            | AllocFn::PyMemFree
            | AllocFn::PyDebugMalloc
            | AllocFn::PyDebugCalloc
            | AllocFn::PyDebugRealloc
            | AllocFn::PyDebugFree => Family::Python,
            AllocFn::PageFault => Family::Pages,
            AllocFn::PyArenaAlloc | AllocFn::PyArenaFree => Family::Arena,
        }
    }

    /// Whether calls of this function with a NULL pointer do nothing, so a probe may sit after the
    /// function's own NULL check.
    pub fn null_is_noop(self) -> bool {
        self.shape() == Shape::Free
    }

    /// The argument index holding the pointer that a free releases or a realloc moves.
    #[inline(always)]
    pub fn ptr_arg(self) -> usize {
        self.first_arg()
    }
}
