//! The heap-sampling USDTs (`otel_memory` / `ddheap` `alloc` and `free`): the process decided
//! in-process which allocation to sample, so every hit is recorded, with the weight it carries.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
    EbpfContext,
};
use leaktrace_ebpf::{
    sample_count, usdt_arg, AllocFn, Counter, FrameRegs, UsdtArg, UsdtSpec, USDT_KIND_ALLOC,
    USDT_KIND_FREE,
};

use crate::live::remove_live;
use crate::maps::USDT_SPECS;
use crate::record::record_alloc;
use crate::{bump, traced_tgid};

/// A sampled allocation or the free of a sampled block; the attach cookie keys its spec.
#[uprobe]
pub fn usdt_enter(ctx: ProbeContext) -> u32 {
    let Some((tgid, tid)) = traced_tgid() else {
        return 0;
    };
    // SAFETY: `ctx.as_ptr()` is this uprobe's own context, which is what the helper takes.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_attach_cookie(ctx.as_ptr()) };
    // SAFETY: the spec is copied out right away; userspace writes a site's spec only before
    // attaching its probe and removes it only after detaching.
    let Some(spec) = (unsafe { USDT_SPECS.get(&cookie) }).copied() else {
        bump(Counter::UsdtBadArg);
        return 0;
    };
    let (Ok(ptr), kind) = (arg(&ctx, &spec.args[0]), spec.kind) else {
        bump(Counter::UsdtBadArg);
        return 0;
    };
    if ptr == 0 {
        return 0;
    }
    if kind == USDT_KIND_FREE {
        remove_live(tgid, ptr);
        return 0;
    }
    if kind != USDT_KIND_ALLOC {
        return 0;
    }
    on_alloc(&ctx, &spec, tgid, tid, ptr);
    0
}

#[inline(always)]
fn on_alloc(ctx: &ProbeContext, spec: &UsdtSpec, tgid: u32, tid: u32, ptr: u64) {
    let (Ok(size), Ok(weight)) = (arg(ctx, &spec.args[1]), arg(ctx, &spec.args[2])) else {
        bump(Counter::UsdtBadArg);
        return;
    };
    // The producer's weight is its unbiased estimate of the bytes, kept as given (for blocks
    // larger than the interval it can be below the size). A live entry counts at least one
    // block, so for those the block estimate leans high.
    // SAFETY: a helper with no arguments that returns a random u32.
    let blocks = sample_count(weight, size, unsafe { bpf_get_prandom_u32() }).max(1);
    let regs = ctx.regs;
    // SAFETY: the probe's `pt_regs`; volatile keeps each load at its constant offset.
    let at = unsafe {
        FrameRegs {
            pc: core::ptr::read_volatile(&raw const (*regs).rip),
            sp: core::ptr::read_volatile(&raw const (*regs).rsp),
            bp: core::ptr::read_volatile(&raw const (*regs).rbp),
        }
    };
    bump(Counter::UsdtSamples);
    // Counted before recording: a full `LIVE` or `SITES` counts its own drop.
    record_alloc(
        tgid,
        tid,
        ptr,
        size,
        (weight, blocks),
        AllocFn::UsdtAlloc,
        at,
    );
}

/// Reads one argument as its spec says: a constant, a register, or memory at a register plus a
/// displacement.
///
/// A failure is `Err(0)`, never an `Option`'s `None`: LLVM may carry a `None`'s undefined payload
/// in a register a helper call clobbered, which the verifier refuses to read (it did, in
/// `usdt_enter`, once other code changed around it).
#[inline(always)]
fn arg(ctx: &ProbeContext, a: &UsdtArg) -> Result<u64, u64> {
    let raw = match a.kind {
        usdt_arg::CONST => a.val as u64,
        usdt_arg::REG | usdt_arg::REG_DEREF => {
            // The register's slot is chosen at run time, so it is read through a helper: the
            // verifier allows only constant offsets into the context itself.
            let slot = (ctx.regs as u64).wrapping_add(u64::from(a.reg_off & 0xff8));
            // SAFETY: a checked kernel read of 8 bytes near this probe's `pt_regs`: the offset is
            // one userspace took from its table of slots (masked to an aligned word within
            // 4 KiB); a fault is an error.
            let reg = unsafe { bpf_probe_read_kernel(slot as *const u64) }.map_err(|_| 0u64)?;
            if a.kind == usdt_arg::REG {
                reg
            } else {
                let at = reg.wrapping_add(a.val as u64);
                // SAFETY: a checked user read; a bad address is an error, any 8 bytes a u64.
                unsafe { bpf_probe_read_user(at as *const u64) }.map_err(|_| 0u64)?
            }
        }
        _ => return Err(0),
    };
    Ok(a.narrow(raw))
}
