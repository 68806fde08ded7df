"""cbor2 5.8.0: leaks in decode_definite_long_string() (source/decoder.c), used for text strings > 65536 bytes.
Fixed in 5.9.0 ("Fixed two reference/memory leaks in the C extension's long string decoder", PR #290).
  (a) native buffer: when a 64 KiB read chunk ends in the middle of a multi-byte UTF-8 sequence the leftover
      bytes are kept in `buffer` (PyMem_Malloc, then PyMem_Realloc'd up to 65536 B); the success path
      returns without PyMem_Free(buffer)  -> ~64 KiB malloc'd buffer leaked per decode ("split" mode).
  (b) refcount: `ret = PyUnicode_Concat(ret, string)` drops the old `ret` without Py_DECREF -> every
      partial str except the last leaks (happens for every long string, also in "ascii" mode).
MODE=ascii : 131071-byte ASCII string      -> leak (b) only  (~64 KiB str per call)
MODE=split : same length, 2-byte char straddling the 64 KiB boundary -> (a)+(b) (~128 KiB per call)
usage: python cbor2_longstring_native.py [N] [ascii|split]"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import cbor2, _cbor2, importlib.metadata
N = n_from_argv(200)
MODE = sys.argv[2] if len(sys.argv) > 2 else "split"
TOTAL = 65536 + 65535
if MODE == "split":
    text = "a" * 65535 + "\u00e9" + "b" * (TOTAL - 65535 - 2)   # 'é' = C3 A9 occupies bytes 65535..65536
else:
    text = "a" * TOTAL
enc = cbor2.dumps(text)
assert len(text.encode()) == TOTAL and cbor2.loads(enc) == text

def step(i):
    v = _cbor2.loads(enc)             # <-- leaking line (C decoder -> decode_definite_long_string)
    return v

SHORT = cbor2.dumps({"name": "x" * 2000, "vals": list(range(100)), "s": "\u00e9" * 500})
def ballast():
    _cbor2.loads(SHORT)                # non-leaking (strings <= 65536 bytes use the short path)

run("cbor2", importlib.metadata.version("cbor2") + f" mode={MODE}", N, step, warmup=5, tm_iters=50, ballast=ballast, ballast_default=1000)
print("expected leak per iter (leaky): ascii: 1 str of 65536 chars (65585 B); "
      "split: that str (65535 chars, 65584 B) + 65536 B PyMem buffer = ~131 KB")
