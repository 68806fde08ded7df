"""leaktrace: find memory leaks in running Python processes from outside, with eBPF."""
