//! Where CPython keeps what a frame walk needs, per version (x86_64, default GIL builds).
//!
//! 3.11 and 3.12 come from built-in tables, taken from the CPython headers of those versions and
//! checked against pyenv's debug builds with `gdb ptype/o`:
//! - `Include/internal/pycore_runtime.h` (`_PyRuntimeState`: `interpreters`, `gilstate`,
//!   `_main_interpreter` on 3.12),
//! - `Include/internal/pycore_interp.h` (`PyInterpreterState`: `threads.head`, `_gil`),
//! - `Include/internal/pycore_gil.h` (`struct _gil_runtime_state`: `last_holder`),
//! - `Include/cpython/pystate.h` (`PyThreadState`: `cframe`, `native_thread_id`; `_PyCFrame`),
//! - `Include/internal/pycore_frame.h` (`_PyInterpreterFrame`),
//! - `Include/cpython/code.h` (`PyCodeObject`), `Include/cpython/unicodeobject.h`,
//!   `Include/cpython/bytesobject.h`.
//!
//! 3.13 and later publish their own offsets in `_Py_DebugOffsets` at the start of `_PyRuntime`:
//! leaktrace reads that table out of the target, checks its cookie and version, and uses it
//! (`debug_offsets.rs`), so a new patch release with moved fields needs no new table.

use crate::error::{Error, Result};

/// What leaktrace needs to know about one CPython version's memory layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyLayout {
    /// (major, minor).
    pub version: (u8, u8),
    /// `_PyRuntimeState.interpreters.head`.
    pub rt_interpreters_head: u64,
    /// `_PyRuntimeState.gilstate.tstate_current` (3.11 only).
    pub rt_tstate_current: Option<u64>,
    /// `_PyRuntimeState._main_interpreter`: the main interpreter lives inside `_PyRuntime` (3.12+,
    /// when known statically; otherwise read `interpreters.head` once it is set).
    pub rt_main_interpreter: Option<u64>,
    /// `PyInterpreterState.threads.head`.
    pub is_threads_head: u64,
    /// `PyInterpreterState.next`.
    pub is_next: u64,
    /// `PyInterpreterState._gil.last_holder` (3.12+).
    pub is_gil_holder: Option<u64>,
    /// `PyThreadState.next`.
    pub ts_next: u64,
    /// `PyThreadState.native_thread_id`.
    pub ts_native_thread_id: u64,
    /// `PyThreadState.cframe` (3.11, 3.12).
    pub ts_cframe: Option<u64>,
    /// `_PyCFrame.current_frame` when `ts_cframe` is set, else `PyThreadState.current_frame`.
    pub frame_ptr: u64,
    /// `_PyInterpreterFrame` fields.
    pub fr_code: u64,
    pub fr_previous: u64,
    pub fr_instr: u64,
    pub fr_owner: u64,
    /// `_PyInterpreterFrame.is_entry` (3.11 only).
    pub fr_is_entry: Option<u64>,
    /// Frames with an owner at least this are interpreter-internal (3.12+).
    pub owner_skip_min: u8,
    /// Tag bits to clear from the frame's code pointer.
    pub code_mask: u64,
    /// `PyCodeObject` fields.
    pub co_filename: u64,
    pub co_name: u64,
    pub co_qualname: u64,
    pub co_linetable: u64,
    pub co_firstlineno: u64,
    pub co_code_adaptive: u64,
    /// `sizeof(PyASCIIObject)`, `sizeof(PyCompactUnicodeObject)`, and `state`'s offset.
    pub unicode_ascii_size: u64,
    pub unicode_compact_size: u64,
    pub unicode_state: u64,
    pub unicode_length: u64,
    /// `PyBytesObject.ob_size` and `ob_sval`.
    pub bytes_size: u64,
    pub bytes_sval: u64,
    /// `PyInterpreterState`'s `sys.modules` (3.11 `modules`, 3.12+ `imports.modules`).
    pub is_modules: u64,
    /// `_PyInterpreterFrame.localsplus` and `PyCodeObject.co_localsplusnames`: a frame's locals
    /// and their names.
    pub fr_localsplus: u64,
    pub co_localsplusnames: u64,
}

/// `PyInterpreterState.modules` (3.11) and `.imports.modules` (3.12), checked with ctypes in
/// pyenv's 3.11.7 and 3.12.1.
const IS_MODULES_311: u64 = 888;
const IS_MODULES_312: u64 = 944;

/// `FRAME_OWNED_BY_CSTACK` on 3.12 and 3.13; on 3.14 `FRAME_OWNED_BY_INTERPRETER` is 3 and
/// CSTACK 4: skipping owners ≥ 3 is right for all three.
pub(super) const OWNER_INTERNAL_MIN: u8 = 3;

/// The built-in table for 3.11 or 3.12.
pub fn builtin(major: u8, minor: u8) -> Option<PyLayout> {
    let common = PyLayout {
        version: (major, minor),
        rt_interpreters_head: 0x28,
        rt_tstate_current: None,
        rt_main_interpreter: None,
        is_threads_head: 0,
        is_next: 0x0,
        is_gil_holder: None,
        ts_next: 0x8,
        ts_native_thread_id: 0,
        ts_cframe: Some(0x38),
        frame_ptr: 0,
        fr_code: 0,
        fr_previous: 0,
        fr_instr: 0x38,
        fr_owner: 0,
        fr_is_entry: None,
        owner_skip_min: u8::MAX,
        code_mask: !0,
        co_filename: 0x70,
        co_name: 0x78,
        co_qualname: 0x80,
        co_linetable: 0x88,
        co_firstlineno: 0,
        co_code_adaptive: 0,
        unicode_ascii_size: 40,
        unicode_compact_size: 56,
        unicode_state: 0x20,
        unicode_length: 0x10,
        bytes_size: 0x10,
        bytes_sval: 0x20,
        is_modules: 0,
        fr_localsplus: 0x48,
        co_localsplusnames: 0x60,
    };
    match (major, minor) {
        (3, 11) => Some(PyLayout {
            rt_tstate_current: Some(0x240),
            is_modules: IS_MODULES_311,
            is_threads_head: 0x10,
            ts_native_thread_id: 0xa0,
            frame_ptr: 0x8,
            fr_code: 0x20,
            fr_previous: 0x30,
            // 3.11 has no shim frames; entry frames are marked by `is_entry` (0x44) instead.
            fr_owner: 0x45,
            fr_is_entry: Some(0x44),
            owner_skip_min: u8::MAX,
            co_firstlineno: 0x48,
            co_code_adaptive: 0xb8,
            // 3.11's PyASCIIObject still has `wstr`.
            unicode_ascii_size: 48,
            unicode_compact_size: 72,
            ..common
        }),
        (3, 12) => Some(PyLayout {
            rt_main_interpreter: Some(0x12a68),
            is_modules: IS_MODULES_312,
            is_threads_head: 0x48,
            is_gil_holder: Some(0x418),
            ts_native_thread_id: 0x90,
            frame_ptr: 0x0,
            fr_code: 0x0,
            fr_previous: 0x8,
            fr_owner: 0x46,
            owner_skip_min: OWNER_INTERNAL_MIN,
            co_firstlineno: 0x44,
            co_code_adaptive: 0xc0,
            ..common
        }),
        _ => None,
    }
}

impl PyLayout {
    /// Rejects a table whose frame fields would fall outside the bytes the BPF walk reads per
    /// frame, or that is implausible.
    pub fn check(&self) -> Result<()> {
        let frame_max = leaktrace_ebpf::PY_FRAME_READ as u64;
        let ok = self.fr_code + 8 <= frame_max
            && self.fr_previous + 8 <= frame_max
            && self.fr_instr + 8 <= frame_max
            && self.fr_owner < frame_max
            && self.ts_native_thread_id < 0x1000
            && self.frame_ptr < 0x1000
            && self.co_code_adaptive < 0x400;
        if ok {
            Ok(())
        } else {
            Err(Error::PythonLayout(format!(
                "implausible Python {}.{} layout: {self:?}",
                self.version.0, self.version.1
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tables_cover_311_and_312_only() {
        assert!(builtin(3, 11).is_some());
        assert!(builtin(3, 12).is_some());
        assert!(builtin(3, 13).is_none());
        assert!(builtin(3, 10).is_none());
        for v in [11, 12] {
            builtin(3, v).unwrap().check().unwrap();
        }
    }
}
