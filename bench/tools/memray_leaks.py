"""Unfreed bytes in a memray capture whose stack passes through FUNCTION (a Python or native
function name), and whether NATIVE (a native function name, or '') appears in those stacks.

Usage: memray_leaks.py CAPTURE.bin FUNCTION NATIVE — prints `BYTES=<n> NATIVE_NAMED=<0|1>`."""
import sys

from memray import FileReader

path, function, native = sys.argv[1], sys.argv[2], sys.argv[3]
total = 0
named = False
reader = FileReader(path)
for rec in reader.get_leaked_allocation_records(merge_threads=True):
    try:
        stack = rec.hybrid_stack_trace()
    except NotImplementedError:
        stack = rec.stack_trace()
    names = [frame[0] for frame in stack]
    if function in names:
        total += rec.size
        named = named or (bool(native) and any(native in n for n in names))
print(f"BYTES={total} NATIVE_NAMED={int(named)}")
