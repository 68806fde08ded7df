"""Stack copies and `unlearned` sites, this build against another, on the real-leak reproducers.

    LEAKTRACE_COMPARE=<another leaktrace binary> python3 bench/cut_sites.py [REPS]

Runs each case with both builds, alternating and 3 s apart, and prints one JSON line a run:
stack copies unwound, sites, sites marked `unlearned` and their bytes, and the bytes on the
leaking line (which must not change). The venvs are `cargo xtask setup`'s; the last case is a
CPython 3.13 script that builds 20,000 dicts.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HOME = os.path.expanduser("~/.cache/leaktrace/real-leaks")
DICTS = "keep = []\nfor i in range(20000):\n    keep.append({f'key{i}_{j}': j for j in range(12)})\n"
CASES = [
    ("cbor2", f"{HOME}/cbor2-5.8.0/bin/python",
     ["bench/real_leaks/cbor2_longstring_native.py", "100", "split"], ("cbor2_longstring_native.py", 26)),
    ("ujson", f"{HOME}/ujson-5.11.0/bin/python",
     ["bench/real_leaks/ujson_bigint_native.py", "2000"], ("ujson_bigint_native.py", 15)),
    ("isal", f"{HOME}/isal-1.5.1/bin/python",
     ["bench/real_leaks/isal_decompressobj_refcount.py", "100"], ("isal_decompressobj_refcount.py", 15)),
    ("dicts 3.13", "/root/.pyenv/versions/3.13.0/bin/python3", ["-c", DICTS], ("<string>", 3)),
]


def run(binary, py, args, where):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        t = time.time()
        subprocess.run([binary, "run", "--top", "1000000", "--json", out.name, "--", py] + args,
                       env=dict(os.environ, BALLAST="2"), capture_output=True, check=True)
        wall = time.time() - t
        r = json.load(open(out.name))
    script, line = where
    at = [s for s in r["sites"]
          if any(f["filename"].endswith(script) and f["line"] == line for f in s["python_stack"])]
    unlearned = [s for s in r["sites"] if s["native_unwind"] == "unlearned"]
    return dict(wall=round(wall, 2), copies=r["native_unwind"]["stacks"], sites=len(r["sites"]),
                unlearned=len(unlearned), unlearned_bytes=sum(s["unfreed_bytes"] for s in unlearned),
                at_line=sum(s["unfreed_bytes"] for s in at))


def main():
    builds = {"other": os.environ["LEAKTRACE_COMPARE"], "this": "target/release/leaktrace"}
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for rep in range(reps):
        for name, py, args, where in CASES:
            for which in (["other", "this"] if rep % 2 == 0 else ["this", "other"]):
                time.sleep(3)
                print(json.dumps(dict(case=name, build=which, **run(builds[which], py, args, where))),
                      flush=True)


if __name__ == "__main__":
    main()
