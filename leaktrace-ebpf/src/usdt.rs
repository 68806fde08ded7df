//! USDT probes of the heap-sampling contract: a process that samples its own allocations (a
//! thread-local byte countdown, no trap on the calls it passes over) fires `alloc(ptr, size,
//! weighted_bytes)` on a sampled allocation and `free(ptr)` when that block is freed. The
//! OpenTelemetry profiler's memory design names the provider `otel_memory`; Datadog's sampler
//! (`libdd-profiling-heap-sampler`, which leaktrace's preload library is built on) fires the same
//! probes, same arguments, as `ddheap`.

/// Providers whose `alloc`/`free` probes leaktrace consumes.
pub const USDT_PROVIDERS: [&str; 2] = ["otel_memory", "ddheap"];
/// The probe fired on a sampled allocation: `(ptr, size, weighted_bytes)`.
pub const USDT_ALLOC: &str = "alloc";
/// The probe fired when a sampled block is freed: `(ptr)`.
pub const USDT_FREE: &str = "free";

/// How many arguments a probe's spec keeps (`alloc` has three).
pub const USDT_MAX_ARGS: usize = 3;
/// Specs the kernel side can hold at once: one per probe site per traced process.
pub const USDT_SPEC_ENTRIES: u32 = 1024;

/// Where one USDT argument lives, as the note's `N@operand` says.
pub mod usdt_arg {
    /// The argument is absent (the probe has fewer).
    pub const NONE: u8 = 0;
    /// `N@$imm`: a constant.
    pub const CONST: u8 = 1;
    /// `N@%reg`: a register's value.
    pub const REG: u8 = 2;
    /// `N@off(%reg)`: memory at a register plus an offset.
    pub const REG_DEREF: u8 = 3;
}

/// One argument of a probe site: enough for the kernel to read it from the probe's registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    /// One of `usdt_arg::*`.
    pub kind: u8,
    /// Width in bytes (1, 2, 4 or 8).
    pub size: u8,
    /// Whether a narrower value is sign-extended (`-4@…`).
    pub signed: u8,
    pub _pad: u8,
    /// Offset of the register in the kernel's `struct pt_regs`.
    pub reg_off: u32,
    /// The constant (`CONST`) or the displacement (`REG_DEREF`).
    pub val: i64,
}

impl UsdtArg {
    /// Keeps the low `size` bytes of a value read as 8, sign-extended if the argument is signed.
    #[inline(always)]
    pub fn narrow(&self, raw: u64) -> u64 {
        if self.size >= 8 || self.size == 0 {
            return raw;
        }
        let shift = 64 - 8 * u32::from(self.size);
        if self.signed != 0 {
            (((raw << shift) as i64) >> shift) as u64
        } else {
            (raw << shift) >> shift
        }
    }
}

/// Which probe a spec is for: the program that fires there reads it to know its arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    /// `USDT_KIND_ALLOC` or `USDT_KIND_FREE`.
    pub kind: u32,
    pub _pad: u32,
    pub args: [UsdtArg; USDT_MAX_ARGS],
}

/// `UsdtSpec::kind` of an `alloc` probe.
pub const USDT_KIND_ALLOC: u32 = 1;
/// `UsdtSpec::kind` of a `free` probe.
pub const USDT_KIND_FREE: u32 = 2;

/// Offsets of x86-64's general registers in the kernel's `struct pt_regs`, by the names a USDT
/// operand uses (64-bit names; the narrower aliases map to the same slot).
pub const PT_REGS_X86_64: [(&str, u32); 17] = [
    ("r15", 0),
    ("r14", 8),
    ("r13", 16),
    ("r12", 24),
    ("rbp", 32),
    ("rbx", 40),
    ("r11", 48),
    ("r10", 56),
    ("r9", 64),
    ("r8", 72),
    ("rax", 80),
    ("rcx", 88),
    ("rdx", 96),
    ("rsi", 104),
    ("rdi", 112),
    ("rip", 128),
    ("rsp", 152),
];
