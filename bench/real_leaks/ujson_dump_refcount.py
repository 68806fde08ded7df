"""ujson <= 5.12.0: refcount leak in objToJSONFile() (python/objToJSON.c), CVE-2026-44660, fixed in 5.12.1.
ujson.dump(obj, fp) serialises obj to a str, then calls fp.write(str); if write() raises, the
error path returns NULL without Py_DECREF(string) -> the whole serialised document leaks.
usage: python ujson_dump_refcount.py [N] [PAYLOAD_CHARS]"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import ujson
N = n_from_argv(10000)
PAYLOAD = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
DOC = {"data": "a" * PAYLOAD, "n": list(range(20))}

class FailingWriter:
    def write(self, s):
        raise OSError("disk full")
FP = FailingWriter()

def step(i):
    try:
        ujson.dump(DOC, FP)          # <-- leaking line: serialised str leaked when write() raises
    except OSError:
        pass

def refcount_probe():
    kept = []
    class Capture:
        def write(self, s):
            kept.append(s)
            raise OSError("fail")
    cap = Capture()
    for _ in range(100):
        try:
            ujson.dump(DOC, cap)
        except OSError:
            pass
    rc = [sys.getrefcount(s) for s in kept]
    print(f"REFCOUNT probe: refcount of the str passed to write() after dump() returned: min={min(rc)} max={max(rc)} "
          f"(3 = list + loop variable + getrefcount arg -> no leak; 4 = one leaked reference)")

import io
def ballast():
    ujson.dump(DOC, io.StringIO())     # non-leaking: write() succeeds

run("ujson", ujson.__version__, N, step, tm_iters=200, extra=refcount_probe, ballast=ballast, ballast_default=40)
sz = len(ujson.dumps(DOC))
print(f"expected leak per iter (leaky): one ASCII str of {sz} chars = {sz+49} B")
