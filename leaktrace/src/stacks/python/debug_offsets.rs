//! `_Py_DebugOffsets`: the table 3.13 and later publish at the start of `_PyRuntime`
//! (`Include/internal/pycore_debug_offsets.h` from 3.14, `pycore_runtime.h` on 3.13), read out
//! of the target and turned into a [`PyLayout`]. Each version orders the table its own way, so
//! each has a map of where the fields leaktrace uses lie in it.

use super::layout::{PyLayout, OWNER_INTERNAL_MIN};
use crate::error::{Error, Result};

/// The cookie `_Py_DebugOffsets` starts with.
pub const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

/// Bytes of `_Py_DebugOffsets` to read: enough for every section leaktrace uses, on 3.13 (584
/// bytes in all) and 3.14.
pub const DEBUG_OFFSETS_READ: usize = 1024;

/// Indices (in u64 words from the start of `_Py_DebugOffsets`) of the fields leaktrace uses.
/// Every field is a u64; each section starts with its own `size`.
struct DebugFieldMap {
    interpreters_head: usize,
    is_next: usize,
    is_threads_head: usize,
    is_gil_holder: usize,
    ts_next: usize,
    ts_current_frame: usize,
    ts_native_thread_id: usize,
    fr_previous: usize,
    fr_executable: usize,
    fr_instr_ptr: usize,
    fr_owner: usize,
    co_filename: usize,
    co_name: usize,
    co_qualname: usize,
    co_linetable: usize,
    co_firstlineno: usize,
    co_code_adaptive: usize,
    bytes_ob_size: usize,
    bytes_ob_sval: usize,
    unicode_state: usize,
    unicode_length: usize,
    unicode_asciiobject_size: usize,
    is_imports_modules: usize,
    fr_localsplus: usize,
    co_localsplusnames: usize,
}

/// Field positions of `_Py_DebugOffsets` in 3.13 (from `pycore_runtime.h` at v3.13.0; checked
/// with gdb on pyenv's 3.13.0): cookie, version, free_threaded, then the sections
/// runtime_state{size, finalizing, interpreters_head}, interpreter_state{size, id, next,
/// threads_head, gc, imports_modules, sysdict, builtins, ceval_gil, gil_runtime_state,
/// gil_runtime_state_enabled, gil_runtime_state_locked, gil_runtime_state_holder},
/// thread_state{size, prev, next, interp, current_frame, thread_id, native_thread_id,
/// datastack_chunk, status}, interpreter_frame{size, previous, executable, instr_ptr,
/// localsplus, owner}, code_object{size, filename, name, qualname, linetable, firstlineno,
/// argcount, localsplusnames, localspluskinds, co_code_adaptive}, pyobject{2}, type_object{4},
/// tuple_object{3}, list_object{3}, dict_object{3}, float_object{2}, long_object{3},
/// bytes_object{size, ob_size, ob_sval}, unicode_object{size, state, length, asciiobject_size}.
const FIELDS_313: DebugFieldMap = DebugFieldMap {
    interpreters_head: 5,
    is_next: 8,
    is_threads_head: 9,
    is_gil_holder: 18,
    ts_next: 21,
    ts_current_frame: 23,
    ts_native_thread_id: 25,
    fr_previous: 29,
    fr_executable: 30,
    fr_instr_ptr: 31,
    fr_owner: 33,
    co_filename: 35,
    co_name: 36,
    co_qualname: 37,
    co_linetable: 38,
    co_firstlineno: 39,
    co_code_adaptive: 43,
    bytes_ob_size: 65,
    bytes_ob_sval: 66,
    unicode_state: 68,
    unicode_length: 69,
    unicode_asciiobject_size: 70,
    is_imports_modules: 11,
    fr_localsplus: 32,
    co_localsplusnames: 41,
};

/// Field positions in 3.14 (`Include/internal/pycore_debug_offsets.h` at 3.14.x): 3.14 adds
/// `threads_main` after `threads_head`, `code_object_generation` and `tlbc_generation` at the end
/// of interpreter_state, `stackpointer` and `tlbc_index` to interpreter_frame, `co_tlbc` to
/// code_object, and a set_object section before dict_object; everything after moves.
const FIELDS_314: DebugFieldMap = DebugFieldMap {
    interpreters_head: 5,
    is_next: 8,
    is_threads_head: 9,
    is_gil_holder: 19,
    ts_next: 24,
    ts_current_frame: 26,
    ts_native_thread_id: 28,
    fr_previous: 32,
    fr_executable: 33,
    fr_instr_ptr: 34,
    fr_owner: 36,
    co_filename: 40,
    co_name: 41,
    co_qualname: 42,
    co_linetable: 43,
    co_firstlineno: 44,
    co_code_adaptive: 48,
    bytes_ob_size: 75,
    bytes_ob_sval: 76,
    unicode_state: 78,
    unicode_length: 79,
    unicode_asciiobject_size: 80,
    is_imports_modules: 12,
    fr_localsplus: 35,
    co_localsplusnames: 46,
};

/// Field positions in 3.15 (`Include/internal/pycore_debug_offsets.h` as Debian's 3.15.2 ships
/// it): 3.15 adds `base_frame`, `last_profiled_frame` and `last_profiled_frame_seq` after
/// `current_frame`, and `holds_gil`, `gil_requested`, `current_exception`, `exc_state` at the end
/// of thread_state, then an err_stackitem section; everything after moves.
const FIELDS_315: DebugFieldMap = DebugFieldMap {
    interpreters_head: 5,
    is_next: 8,
    is_threads_head: 9,
    is_gil_holder: 19,
    ts_next: 24,
    ts_current_frame: 26,
    ts_native_thread_id: 31,
    fr_previous: 40,
    fr_executable: 41,
    fr_instr_ptr: 42,
    fr_owner: 44,
    co_filename: 48,
    co_name: 49,
    co_qualname: 50,
    co_linetable: 51,
    co_firstlineno: 52,
    co_code_adaptive: 56,
    bytes_ob_size: 87,
    bytes_ob_sval: 88,
    unicode_state: 90,
    unicode_length: 91,
    unicode_asciiobject_size: 92,
    is_imports_modules: 12,
    fr_localsplus: 43,
    co_localsplusnames: 54,
};

/// 3.14's frames hold `f_executable` as a `_PyStackRef`: the low bits are tags
/// (`Py_TAG_BITS` = 3 on default builds).
const STACKREF_TAG_BITS: u64 = 3;

/// Parses `_Py_DebugOffsets` read from the start of a 3.13+ `_PyRuntime`.
pub fn from_debug_offsets(raw: &[u8]) -> Result<PyLayout> {
    let bad = |d: String| Error::PythonLayout(format!("unusable _Py_DebugOffsets: {d}"));
    if raw.len() < 24 || &raw[..8] != DEBUG_COOKIE {
        return Err(bad("no xdebugpy cookie at the start of _PyRuntime".into()));
    }
    let word = |i: usize| -> Result<u64> {
        raw.get(i * 8..i * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| bad(format!("table shorter than field {i}")))
    };
    let version = word(1)?;
    let (major, minor) = ((version >> 24) as u8, (version >> 16) as u8);
    if word(2)? != 0 {
        return Err(bad(format!(
            "free-threaded build of {major}.{minor} (no GIL, mimalloc allocator) is not supported"
        )));
    }
    let (f, code_mask) = match (major, minor) {
        (3, 13) => (FIELDS_313, !0),
        (3, 14) => (FIELDS_314, !STACKREF_TAG_BITS),
        (3, 15) => (FIELDS_315, !STACKREF_TAG_BITS),
        _ => {
            return Err(bad(format!(
                "Python {major}.{minor}: leaktrace knows _Py_DebugOffsets of 3.13 to 3.15"
            )))
        }
    };
    let w = |i| word(i);
    let layout = PyLayout {
        version: (major, minor),
        rt_interpreters_head: w(f.interpreters_head)?,
        rt_tstate_current: None,
        rt_main_interpreter: None,
        is_threads_head: w(f.is_threads_head)?,
        is_next: w(f.is_next)?,
        is_gil_holder: Some(w(f.is_gil_holder)?),
        ts_next: w(f.ts_next)?,
        ts_native_thread_id: w(f.ts_native_thread_id)?,
        ts_cframe: None,
        frame_ptr: w(f.ts_current_frame)?,
        fr_code: w(f.fr_executable)?,
        fr_previous: w(f.fr_previous)?,
        fr_instr: w(f.fr_instr_ptr)?,
        fr_owner: w(f.fr_owner)?,
        fr_is_entry: None,
        owner_skip_min: OWNER_INTERNAL_MIN,
        code_mask,
        co_filename: w(f.co_filename)?,
        co_name: w(f.co_name)?,
        co_qualname: w(f.co_qualname)?,
        co_linetable: w(f.co_linetable)?,
        co_firstlineno: w(f.co_firstlineno)?,
        co_code_adaptive: w(f.co_code_adaptive)?,
        unicode_ascii_size: w(f.unicode_asciiobject_size)?,
        unicode_compact_size: w(f.unicode_asciiobject_size)? + 16,
        unicode_state: w(f.unicode_state)?,
        unicode_length: w(f.unicode_length)?,
        bytes_size: w(f.bytes_ob_size)?,
        bytes_sval: w(f.bytes_ob_sval)?,
        is_modules: w(f.is_imports_modules)?,
        fr_localsplus: w(f.fr_localsplus)?,
        co_localsplusnames: w(f.co_localsplusnames)?,
    };
    layout.check()?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of pyenv 3.13.0's `_Py_DebugOffsets` as gdb shows them for its offsets table.
    fn debug_offsets_313() -> Vec<u8> {
        let mut w = vec![0u64; 73];
        w[1] = 0x030d00f0;
        let set = |w: &mut Vec<u64>, i: usize, v: u64| w[i] = v;
        for (i, v) in [
            (3, 24),
            (4, 0x2b8),
            (5, 0x278), // runtime_state
            (6, 0x2810),
            (7, 0x1c98),
            (8, 7264),
            (9, 0x1cb0),
            (11, 7656),
            (18, 0x1e50), // interpreter_state
            (19, 0x130),
            (20, 0x0),
            (21, 0x8),
            (22, 0x10),
            (23, 0x48),
            (25, 0xa0), // thread_state
            (28, 80),
            (29, 0x8),
            (30, 0x0),
            (31, 0x38),
            (32, 0x48),
            (33, 0x46), // interpreter_frame
            (34, 0xd0),
            (35, 0x70),
            (36, 0x78),
            (37, 0x80),
            (38, 0x88),
            (39, 0x44),
            (41, 0x60),
            (43, 0xc8), // code
            (64, 40),
            (65, 0x10),
            (66, 0x20), // bytes
            (67, 56),
            (68, 0x20),
            (69, 0x10),
            (70, 40), // unicode
        ] {
            set(&mut w, i, v);
        }
        let mut raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw[..8].copy_from_slice(DEBUG_COOKIE);
        raw
    }

    #[test]
    fn parses_313_debug_offsets() {
        let l = from_debug_offsets(&debug_offsets_313()).unwrap();
        assert_eq!(l.version, (3, 13));
        assert_eq!(l.frame_ptr, 0x48);
        assert_eq!(l.ts_cframe, None);
        assert_eq!(
            (l.fr_code, l.fr_previous, l.fr_instr, l.fr_owner),
            (0, 8, 0x38, 0x46)
        );
        assert_eq!(l.co_code_adaptive, 0xc8);
        assert_eq!(
            (l.is_modules, l.fr_localsplus, l.co_localsplusnames),
            (7656, 0x48, 0x60)
        );
        assert_eq!(l.is_gil_holder, Some(0x1e50));
        assert_eq!(l.unicode_ascii_size, 40);
        assert_eq!(l.owner_skip_min, 3);
    }

    /// The table as compiled into pyenv's 3.13.0: `_PyRuntime` is initialized data, so the file
    /// image holds the same bytes the running process starts with.
    #[test]
    fn parses_the_real_313_table() {
        let home = std::env::var("HOME").unwrap_or_default();
        let lib =
            std::path::Path::new(&home).join(".pyenv/versions/3.13.0/lib/libpython3.13.so.1.0");
        if !lib.exists() {
            eprintln!("skipping: {} not present", lib.display());
            return;
        }
        let elf = crate::process::elf::ElfFile::open(&lib).unwrap();
        let raw = elf
            .object_bytes("_PyRuntime", DEBUG_OFFSETS_READ as u64)
            .unwrap();
        let real = from_debug_offsets(&raw).unwrap();
        let synthetic = from_debug_offsets(&debug_offsets_313()).unwrap();
        assert_eq!(real, synthetic);
    }

    /// 3.14's table, with the values of Debian's 3.14.10 build (x86_64, default build) read from
    /// its headers and `.PyRuntime` section.
    fn debug_offsets_314() -> Vec<u8> {
        let mut w = vec![0u64; 95];
        w[1] = 0x030e00f0;
        for (i, v) in [
            (3, 316616),
            (4, 784),
            (5, 808),
            (6, 225864),
            (7, 7280),
            (8, 7272),
            (9, 7344),
            (10, 7360),
            (12, 7688),
            (15, 16),
            (16, 7784),
            (18, 7800),
            (19, 7792),
            (20, 7992),
            (22, 832),
            (23, 0),
            (24, 8),
            (25, 16),
            (26, 72),
            (27, 152),
            (28, 160),
            (29, 232),
            (30, 32),
            (31, 88),
            (32, 8),
            (33, 0),
            (34, 56),
            (35, 80),
            (36, 74),
            (37, 64),
            (39, 216),
            (40, 112),
            (41, 120),
            (42, 128),
            (43, 136),
            (44, 68),
            (45, 52),
            (46, 96),
            (48, 208),
            (74, 40),
            (75, 16),
            (76, 32),
            (77, 64),
            (78, 32),
            (79, 16),
            (80, 40),
        ] {
            w[i] = v;
        }
        let mut raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw[..8].copy_from_slice(DEBUG_COOKIE);
        raw
    }

    #[test]
    fn parses_314_debug_offsets() {
        let raw = debug_offsets_314();
        let l = from_debug_offsets(&raw).unwrap();
        assert_eq!(l.version, (3, 14));
        assert_eq!(l.rt_interpreters_head, 808);
        assert_eq!(
            (l.is_threads_head, l.is_next, l.is_gil_holder),
            (7344, 7272, Some(7792))
        );
        assert_eq!(
            (l.ts_next, l.frame_ptr, l.ts_native_thread_id),
            (8, 72, 160)
        );
        assert_eq!(
            (l.fr_code, l.fr_previous, l.fr_instr, l.fr_owner),
            (0, 8, 56, 74)
        );
        assert_eq!(l.code_mask, !3, "f_executable is a tagged _PyStackRef");
        assert_eq!(
            (l.co_filename, l.co_qualname, l.co_linetable),
            (112, 128, 136)
        );
        assert_eq!((l.co_firstlineno, l.co_code_adaptive), (68, 208));
        assert_eq!(
            (l.is_modules, l.fr_localsplus, l.co_localsplusnames),
            (7688, 80, 96)
        );
        assert_eq!((l.bytes_size, l.bytes_sval), (16, 32));
        assert_eq!(
            (l.unicode_state, l.unicode_length, l.unicode_ascii_size),
            (32, 16, 40)
        );
        // FRAME_OWNED_BY_INTERPRETER (3) and FRAME_OWNED_BY_CSTACK (4) are both skipped.
        assert_eq!(l.owner_skip_min, 3);
    }

    /// 3.15's table as compiled into Debian sid's 3.15.2 (stripped; `_PyRuntime` is exported),
    /// against the offsets gdb gives from the build's debug file.
    #[test]
    fn parses_the_real_315_table() {
        let py = crate::test_support::debian_python("3.15");
        let elf = crate::process::elf::ElfFile::open(&py).unwrap();
        let raw = elf
            .object_bytes("_PyRuntime", DEBUG_OFFSETS_READ as u64)
            .unwrap();
        let l = from_debug_offsets(&raw).unwrap();
        assert_eq!(l.version, (3, 15));
        assert_eq!(l.rt_interpreters_head, 0x3a8);
        assert_eq!(
            (l.is_threads_head, l.is_next, l.is_modules),
            (0x1ca8, 0x1c60, 0x1da8)
        );
        assert_eq!(
            (l.ts_next, l.frame_ptr, l.ts_native_thread_id),
            (8, 72, 184)
        );
        assert_eq!(
            (
                l.fr_code,
                l.fr_previous,
                l.fr_instr,
                l.fr_owner,
                l.fr_localsplus
            ),
            (0, 8, 56, 74, 80)
        );
        assert_eq!(l.code_mask, !3, "f_executable is a tagged _PyStackRef");
        assert_eq!(
            (l.co_filename, l.co_qualname, l.co_linetable),
            (112, 128, 136)
        );
        assert_eq!(
            (l.co_firstlineno, l.co_code_adaptive, l.co_localsplusnames),
            (68, 208, 96)
        );
        assert_eq!((l.bytes_size, l.bytes_sval), (16, 32));
        assert_eq!(l.owner_skip_min, 3);
    }

    #[test]
    fn rejects_bad_tables() {
        let mut raw = debug_offsets_313();
        raw[0] = b'X';
        assert!(from_debug_offsets(&raw).is_err(), "cookie");
        let mut raw = debug_offsets_313();
        raw[16] = 1;
        assert!(from_debug_offsets(&raw)
            .unwrap_err()
            .to_string()
            .contains("free-threaded"));
        let mut raw = debug_offsets_313();
        raw[8..16].copy_from_slice(&0x030a00f0u64.to_le_bytes());
        assert!(
            from_debug_offsets(&raw).is_err(),
            "3.10 has no debug offsets"
        );
        let mut raw = debug_offsets_313();
        raw[33 * 8..34 * 8].copy_from_slice(&500u64.to_le_bytes());
        assert!(
            from_debug_offsets(&raw).is_err(),
            "owner beyond the frame read"
        );
        assert!(from_debug_offsets(&raw[..20]).is_err());
    }
}
