//! The kernel's event and drop counters (`COUNTERS`): nothing is lost without one.

/// Indices into the `COUNTERS` per-CPU array. Drops are never silent: each has a counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocations recorded in `LIVE`.
    Allocs = 0,
    /// Frees that matched a live allocation.
    Frees = 1,
    /// Frees of addresses leaktrace never saw allocated (allocated before attach, or untraced).
    FreesUnknown = 2,
    /// Drop: the `LIVE` map was full; the allocation is not tracked.
    LiveFull = 3,
    /// Drop: the `SITES` map was full; the allocation is not tracked.
    SitesFull = 4,
    /// The ring buffer was full when a new site was announced; the next allocation from the
    /// site announces it again (its counters are kept meanwhile).
    RingbufFull = 5,
    /// Drop: the per-thread pending map was full; the allocation is not tracked.
    PendingFull = 6,
    /// A return probe never fired (longjmp, thread killed); the stale entry was reset.
    MissedReturn = 7,
    /// A return probe fired without a matching entry (attached mid-call).
    ReturnWithoutEntry = 8,
    /// An allocation landed on an address still marked live (its free was not seen).
    StaleReplaced = 9,
    /// Allocations skipped because they were smaller than `--min-size`.
    BelowMinSize = 10,
    /// Allocator calls that returned no memory.
    FailedAllocs = 11,
    /// Drop of detail: the site map was full, so the allocation was counted under its native
    /// caller without its Python stack.
    SitesCoarsened = 12,
    /// A new site's stack copy waited for room in the ring buffer; the site's next allocation
    /// sends it (until then its native stack is what the kernel walked).
    StackDeferred = 13,
    /// Allocations the sampler passed over (sampled and growth modes): not a loss, the
    /// sampled ones stand for them.
    Unsampled = 14,
    /// Drop: a forked child to follow could not be added or announced (map or ring buffer
    /// full); it runs untraced.
    ForksMissed = 15,
    /// Allocations the process sampled itself and announced on a heap-sampling USDT.
    UsdtSamples = 16,
    /// Drop: a heap-sampling USDT fired whose spec or arguments could not be read.
    UsdtBadArg = 17,
}

/// Number of counters in `COUNTERS`.
pub const NUM_COUNTERS: u32 = 18;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; NUM_COUNTERS as usize] = [
        Counter::Allocs,
        Counter::Frees,
        Counter::FreesUnknown,
        Counter::LiveFull,
        Counter::SitesFull,
        Counter::RingbufFull,
        Counter::PendingFull,
        Counter::MissedReturn,
        Counter::ReturnWithoutEntry,
        Counter::StaleReplaced,
        Counter::BelowMinSize,
        Counter::FailedAllocs,
        Counter::SitesCoarsened,
        Counter::StackDeferred,
        Counter::Unsampled,
        Counter::ForksMissed,
        Counter::UsdtSamples,
        Counter::UsdtBadArg,
    ];

    /// Whether the counter records lost data (as opposed to information).
    pub fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::LiveFull
                | Counter::SitesFull
                | Counter::PendingFull
                | Counter::MissedReturn
                | Counter::SitesCoarsened
                | Counter::ForksMissed
                | Counter::UsdtBadArg
        )
    }

    /// A short stable name, used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Allocs => "allocs",
            Counter::Frees => "frees",
            Counter::FreesUnknown => "frees_unknown",
            Counter::LiveFull => "live_map_full",
            Counter::SitesFull => "sites_map_full",
            Counter::RingbufFull => "ringbuf_full",
            Counter::PendingFull => "pending_map_full",
            Counter::MissedReturn => "missed_return",
            Counter::ReturnWithoutEntry => "return_without_entry",
            Counter::StaleReplaced => "stale_replaced",
            Counter::BelowMinSize => "below_min_size",
            Counter::FailedAllocs => "failed_allocs",
            Counter::SitesCoarsened => "sites_coarsened",
            Counter::StackDeferred => "stack_deferred",
            Counter::Unsampled => "unsampled",
            Counter::ForksMissed => "forks_missed",
            Counter::UsdtSamples => "usdt_samples",
            Counter::UsdtBadArg => "usdt_bad_arg",
        }
    }
}
