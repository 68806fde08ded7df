"""What every bench workload reports about its loop: wall and CPU seconds of the loop alone, and
the process's peak RSS. With BENCH_TRACEMALLOC=FILE, tracemalloc's unfreed bytes per line at the
end go to FILE as JSON (the bench compares leaktrace's per-line figures with them)."""
import json
import os
import resource
import time

_cpu = 0.0
if os.environ.get("BENCH_TRACEMALLOC"):
    import tracemalloc

    tracemalloc.start(1)


def start():
    """Marks the loop's start; returns the wall clock."""
    global _cpu
    _cpu = time.process_time()
    return time.perf_counter()


def done(loop_seconds):
    cpu = time.process_time() - _cpu
    # VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark from before exec, which under
    # a tracer that forked this process is the tracer's own.
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                rss_kb = int(line.split()[1])
    print(f"LOOP_SECONDS={loop_seconds:.6f}", flush=True)
    print(f"CPU_SECONDS={cpu:.6f}", flush=True)
    print(f"MAXRSS_KB={rss_kb}", flush=True)
    path = os.environ.get("BENCH_TRACEMALLOC")
    if path:
        snap = tracemalloc.take_snapshot()
        lines = {}
        for s in snap.statistics("lineno"):
            f = s.traceback[0]
            lines[f"{f.filename}:{f.lineno}"] = s.size
        with open(path, "w") as out:
            json.dump(lines, out)
