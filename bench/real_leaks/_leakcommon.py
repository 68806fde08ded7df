"""Shared harness of the real-leak reproducers (stdlib only): warm-up, N iterations of the
leaking call mixed with BALLAST non-leaking calls into the same library, and one RESULT line
with the RSS growth."""
import gc, os, sys, time, tracemalloc

def rss_kb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return -1

def n_from_argv(default):
    return int(sys.argv[1]) if len(sys.argv) > 1 else default

def run(name, version, n, step, warmup=50, tm_iters=0, extra=None, ballast=None, ballast_default=0):
    """step(i) (the leaking call) is called n times. Prints one 'RESULT' line + optional probes.
    ballast(): a NON-leaking call into the same library, done BALLAST times per iteration
    (env BALLAST, default ballast_default) so the loop runs ~1 s and the leaking allocations are
    mixed with many freed ones. BALLAST=0 -> only the leaking call.
    tm_iters>0 and env TRACEMALLOC=1: also measure tracemalloc traced growth."""
    nb = int(os.environ.get('BALLAST', ballast_default)) if ballast else 0
    if nb:
        inner = step
        def step(i, inner=inner):
            inner(i)
            for _ in range(nb):
                ballast()
    for i in range(warmup):
        step(i)
    gc.collect()
    r0 = rss_kb(); b0 = sys.getallocatedblocks(); t0 = time.perf_counter()
    for i in range(n):
        step(i)
    dt = time.perf_counter() - t0
    gc.collect()
    r1 = rss_kb(); b1 = sys.getallocatedblocks()
    growth = r1 - r0
    print(f"RESULT pkg={name} version={version} N={n} rss_before_kb={r0} rss_after_kb={r1} "
          f"rss_growth_kb={growth} rss_bytes_per_iter={growth*1024/n:.1f} "
          f"pymalloc_blocks_per_iter={(b1-b0)/n:.3f} ballast={nb} loop_time_s={dt:.2f}")
    if extra and os.environ.get('PROBES') == '1':
        extra()   # in-process evidence (refcounts, block counts): it leaks too, so only on request
    if tm_iters and os.environ.get('TRACEMALLOC') == '1':
        tracemalloc.start(5)
        gc.collect()
        s0 = tracemalloc.take_snapshot(); m0 = tracemalloc.get_traced_memory()[0]
        for i in range(tm_iters):
            step(i)
        gc.collect()
        m1 = tracemalloc.get_traced_memory()[0]; s1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        print(f"TRACEMALLOC iters={tm_iters} traced_growth_bytes={m1-m0} per_iter={(m1-m0)/tm_iters:.1f}")
        flt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        for st in s1.filter_traces(flt).compare_to(s0.filter_traces(flt), 'lineno')[:2]:
            print("  top:", st)
