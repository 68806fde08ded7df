"""Bytes Valgrind's memcheck reports as leaked (each kind) in records whose stack passes
through FUNCTION (a native function: Valgrind sees no Python frames).

Usage: valgrind_leaks.py MEMCHECK.xml FUNCTION — prints `DEFINITELY=<n> POSSIBLY=<n>
REACHABLE=<n>`."""
import sys
import xml.etree.ElementTree as ET

path, function = sys.argv[1], sys.argv[2]
kinds = {"Leak_DefinitelyLost": 0, "Leak_PossiblyLost": 0, "Leak_StillReachable": 0,
         "Leak_IndirectlyLost": 0}
for err in ET.parse(path).getroot().iter("error"):
    kind = err.findtext("kind") or ""
    if kind not in kinds:
        continue
    fns = [f.findtext("fn") or "" for f in err.iter("frame")]
    if any(function in fn for fn in fns):
        kinds[kind] += int(err.find("xwhat").findtext("leakedbytes"))
print(f"DEFINITELY={kinds['Leak_DefinitelyLost'] + kinds['Leak_IndirectlyLost']} "
      f"POSSIBLY={kinds['Leak_PossiblyLost']} REACHABLE={kinds['Leak_StillReachable']}")
