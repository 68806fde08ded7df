//! How much of the Python allocator a plan observes, as reports and captures name it.

use serde::Serialize;

/// How Python allocations are observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PythonCoverage {
    /// pymalloc's implementation functions, from `.symtab`: every PyObject_/PyMem_ call reaches them.
    PymallocImpl,
    /// Only the exported API (stripped interpreter): calls inlined by LTO are not seen.
    ExportedApiOnly,
    /// The process runs with `PYTHONMALLOC=malloc`: every Python allocation reaches libc's
    /// malloc, which is probed.
    RawMalloc,
    /// pymalloc's arenas (the default): objects over 512 B come from libc's malloc, probed
    /// call by call; smaller ones are seen as the 1 MiB arenas they fill.
    Arenas,
    /// Objects over 512 B through libc's malloc; pymalloc's arena functions were not found, so
    /// smaller objects are seen only in the type census.
    LargeObjectsOnly,
    /// A stripped interpreter under `attach --redirect-pymalloc`: its object and mem tables'
    /// malloc and calloc point at the raw allocator while attached, so every Python allocation
    /// reaches libc's malloc; pymalloc's own functions, found through the tables, are probed
    /// for the few direct calls.
    Redirected,
    /// The process samples CPython's object and mem domains itself (leaktrace's preload with
    /// `LEAKTRACE_SAMPLE_PYTHON=1`): every Python allocation may be sampled; no arena probe,
    /// which would count small objects a second time.
    SampledInProcess,
    /// No Python allocator probed.
    #[default]
    None,
}
