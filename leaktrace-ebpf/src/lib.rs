//! The ABI shared by leaktrace's BPF programs and its userspace loader.
//!
//! Everything the kernel side and userspace exchange — map keys and values, ring-buffer records,
//! the attach cookie that tells a generic probe which allocator function it sits on, and the
//! indices of the drop counters — is defined here once, `#[repr(C)]`, so both sides agree by
//! construction. The crate is `no_std` so the BPF programs (`src/main.rs`) can use it; with the
//! `user` feature it also implements `aya::Pod` for the host.
#![no_std]

// Each module is one job; the flat re-exports keep every item at `leaktrace_ebpf::Name`, the
// paths both sides were written against.
mod alloc_fn;
mod counters;
mod events;
mod names;
mod native;
mod py;
mod records;
mod sample;
mod site_id;
mod targets;
mod usdt;
pub use alloc_fn::*;
pub use counters::*;
pub use events::*;
pub use names::*;
pub use native::*;
pub use py::*;
pub use records::*;
pub use sample::*;
pub use site_id::*;
pub use targets::*;
pub use usdt::*;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `#[repr(C)]` and made only of integers and arrays of integers: any
    // bytes the kernel hands back are a valid value, laid out as the BPF side laid them out.
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for LiveKey {}
    unsafe impl aya::Pod for LiveAlloc {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for NewSiteEvent {}
    unsafe impl aya::Pod for LifecycleEvent {}
    unsafe impl aya::Pod for DeathInfo {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for PyOffsets {}
    unsafe impl aya::Pod for PyFrameRec {}
    unsafe impl aya::Pod for UnwindKey {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UsdtSpec {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn alloc_fn_roundtrips_through_cookie() {
        for f in AllocFn::ALL {
            assert_eq!(AllocFn::from_u8(f as u8), Some(f));
        }
        assert_eq!(AllocFn::from_u8(AllocFn::ALL.len() as u8), None);
    }

    #[test]
    fn usdt_args_keep_their_width_and_sign() {
        let arg = |size, signed| UsdtArg {
            kind: usdt_arg::REG,
            size,
            signed,
            ..UsdtArg::default()
        };
        assert_eq!(arg(4, 1).narrow(0xffff_ffff_ffff_fffe), u64::MAX - 1);
        assert_eq!(arg(4, 0).narrow(0x1234_5678_ffff_fffe), 0xffff_fffe);
        assert_eq!(arg(4, 1).narrow(0x1234_5678_0000_0005), 5);
        assert_eq!(arg(1, 1).narrow(0x80), (-128i64) as u64);
        assert_eq!(
            arg(8, 0).narrow(0xdead_beef_0000_0001),
            0xdead_beef_0000_0001
        );
    }

    #[test]
    fn counters_are_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn python_frames_change_the_site_id() {
        let base = site_id_add_pc(site_id_start(1, 0), 0x1000);
        let a = PyFrameRec {
            code: 0x10,
            instr: 0x20,
            check: 0,
        };
        let b = PyFrameRec {
            code: 0x10,
            instr: 0x22,
            check: 0,
        };
        // The check bytes are not part of the identity.
        let a_checked = PyFrameRec { check: 7, ..a };
        assert_eq!(
            site_id_add_frame(base, &a),
            site_id_add_frame(base, &a_checked)
        );
        assert_ne!(site_id_add_frame(base, &a), site_id_add_frame(base, &b));
        assert_ne!(site_id_add_frame(base, &a), base);
        let ab = site_id_add_frame(site_id_add_frame(base, &a), &b);
        let ba = site_id_add_frame(site_id_add_frame(base, &b), &a);
        assert_ne!(ab, ba, "frame order matters");
        assert_eq!(site_id_finish(0), 1);
    }

    #[test]
    fn site_ids_separate_processes_functions_and_callers() {
        let id = |tgid, func, pcs: &[u64]| {
            pcs.iter()
                .fold(site_id_start(tgid, func), |h, pc| site_id_add_pc(h, *pc))
        };
        let a = id(1, 0, &[0x1000, 0x2000]);
        assert_ne!(a, id(2, 0, &[0x1000, 0x2000]));
        assert_ne!(a, id(1, 1, &[0x1000, 0x2000]));
        assert_ne!(a, id(1, 0, &[0x1001, 0x2000]));
        assert_ne!(a, id(1, 0, &[0x1000, 0x2001]), "a different outer caller");
        assert_ne!(a, id(1, 0, &[0x2000, 0x1000]));
        assert_eq!(a, id(1, 0, &[0x1000, 0x2000]));
    }

    #[test]
    fn unwind_step_follows_sp_and_frame_pointer_rows() {
        // A stack at 0x1000: [0x1000] local, [0x1008] saved rbp, [0x1010] return address.
        let mem = |a: u64| match a {
            0x1008 => Some(0x2000),
            0x1010 => Some(0xdead),
            _ => None,
        };
        let r = FrameRegs {
            pc: 1,
            sp: 0x1000,
            bp: 0x7777,
        };
        // CFA = rsp + 24, rbp saved at CFA-16.
        let row = UnwindRow {
            cfa_off: 24,
            bp_off: -16,
            cfa_reg: CFA_SP,
            flags: 0,
        };
        let up = row.step(r, mem).unwrap();
        assert_eq!((up.pc, up.sp, up.bp), (0xdead, 0x1018, 0x2000));
        // The same frame through its frame pointer (rbp = 0x1008).
        let fp = UnwindRow::FRAME_POINTER
            .step(FrameRegs { bp: 0x1008, ..r }, mem)
            .unwrap();
        assert_eq!((fp.pc, fp.sp, fp.bp), (0xdead, 0x1018, 0x2000));
        // A row that would move the stack pointer down is refused, as is an unreadable slot.
        let back = UnwindRow { cfa_off: -8, ..row };
        assert!(back.step(r, mem).is_none());
        let far = UnwindRow {
            cfa_off: 64,
            bp_off: 0,
            ..row
        };
        assert!(far.step(r, mem).is_none());
    }

    #[test]
    fn pymalloc_impl_functions_take_ctx_first() {
        assert_eq!(AllocFn::PyObjectMallocImpl.first_arg(), 1);
        assert_eq!(AllocFn::PyObjectMalloc.first_arg(), 0);
        assert_eq!(AllocFn::PyObjectFreeImpl.family(), Family::Python);
        assert_eq!(AllocFn::Free.family(), Family::Libc);
        assert_eq!(AllocFn::PyArenaAlloc.first_arg(), 1);
        assert_eq!(AllocFn::PyArenaFree.ptr_arg(), 1);
        assert_eq!(AllocFn::PyArenaFree.family(), Family::Arena);
    }
}
