"""isal (python-isal) <= 1.5.1: refcount leak in isal_zlib_decompressobj_impl() (src/isal/isal_zlibmodule.c),
fixed in 1.5.2 (changelog: "Fix a memory leak that occurred when isal_zlib.decompressobj was given a wrong
wbits value."). The freshly created decompobject (PyObject_New, contains an inline ISA-L `struct inflate_state`)
is not Py_DECREF'd when wbits is invalid -> the whole object (plus its PyThread lock and unused_data ref) leaks.
usage: python isal_decompressobj_refcount.py [N]"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import isal, importlib.metadata
from isal import isal_zlib
N = n_from_argv(500)

def step(i):
    try:
        isal_zlib.decompressobj(wbits=99)   # <-- leaking line: invalid wbits -> ValueError, object leaked
    except ValueError:
        pass

COMP = isal_zlib.compress(bytes(range(256)) * 256)
def ballast():
    d = isal_zlib.decompressobj()      # valid wbits: created and freed normally
    d.decompress(COMP)

run("isal", importlib.metadata.version("isal"), N, step, warmup=5, tm_iters=50, ballast=ballast, ballast_default=120)
print("expected leak per iter (leaky): one decompobject (~87.4 KB requested via PyObject_Malloc->malloc; with BALLAST=0 only ~8 KB of it is ever touched, so RSS grows ~8.2 KB/iter; with ballast the reused heap pages are already resident and RSS grows ~87 KB/iter) "
      "+ a PyThread lock (sem_t via PyMem_RawMalloc, 32 B)")
