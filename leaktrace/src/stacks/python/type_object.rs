//! `PyTypeObject` as leaktrace reads it from outside: the same offsets and flag bits from
//! CPython 3.11 to 3.15 (x86-64, default builds; `Include/cpython/object.h`,
//! `Include/object.h`), one table for the block census and the reference reader.

/// `tp_name`, `tp_basicsize`, `tp_itemsize`, `tp_flags`.
pub const TP_NAME: u64 = 24;
pub const TP_BASICSIZE: u64 = 32;
pub const TP_ITEMSIZE: u64 = 40;
pub const TP_FLAGS: u64 = 168;
/// `tp_members`, `tp_base`, `tp_dict`, `tp_dictoffset`.
pub const TP_MEMBERS: u64 = 240;
pub const TP_BASE: u64 = 256;
pub const TP_DICT: u64 = 264;
pub const TP_DICTOFFSET: u64 = 288;

/// Flag bits of `tp_flags`.
pub const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
pub const TPFLAGS_MANAGED_WEAKREF: u64 = 1 << 3;
pub const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
pub const TPFLAGS_HEAPTYPE: u64 = 1 << 9;
pub const TPFLAGS_HAVE_GC: u64 = 1 << 14;
/// `Py_TPFLAGS_READY`: `PyType_Ready` has run, as on every type an object can have.
pub const TPFLAGS_READY: u64 = 1 << 12;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: instances are types (set on `type` and every metaclass).
pub const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;
