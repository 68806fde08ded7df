//! The names in `leaktrace_ebpf::names` checked against the built BPF object: a map, program or
//! global renamed on one side only fails here, not at load time on a user's host.

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use leaktrace_ebpf::{
        global, map, program, DEATH_TRACEPOINTS, FORK_TRACEPOINTS, GROWTH_RAW_TRACEPOINTS,
        GROWTH_TRACEPOINTS,
    };
    use object::{Object, ObjectSection, ObjectSymbol};

    use crate::probes::loader::BPF_OBJECT;

    /// Symbol name → the section it is defined in.
    fn symbols() -> Vec<(String, String)> {
        let obj = object::File::parse(BPF_OBJECT).expect("the BPF object parses");
        obj.symbols()
            .filter_map(|s| {
                let section = obj.section_by_index(s.section_index()?).ok()?;
                Some((s.name().ok()?.to_string(), section.name().ok()?.to_string()))
            })
            .collect()
    }

    fn in_sections(names: &[&str], sections: &[&str]) {
        let all = symbols();
        for name in names {
            assert!(
                all.iter().any(|(n, s)| n == name
                    && sections.iter().any(|want| s == want || s.starts_with(want))),
                "{name} is not defined in {sections:?} of the BPF object"
            );
        }
    }

    #[test]
    fn maps_exist() {
        in_sections(
            &[
                map::TARGETS,
                map::CONTROL,
                map::LIVE,
                map::SITES,
                map::EVENTS,
                map::UNWIND,
                map::PYPROCS,
                map::THREADS,
                map::DEATHS,
                map::COUNTERS,
                map::SAMPLING,
                map::STACKBUF,
                map::BRKS,
            ],
            &["maps"],
        );
    }

    #[test]
    fn programs_exist() {
        in_sections(&program::UPROBES, &["uprobe", "uretprobe"]);
        let tracepoints: HashSet<&str> = DEATH_TRACEPOINTS
            .iter()
            .chain(&GROWTH_TRACEPOINTS)
            .chain(&FORK_TRACEPOINTS)
            .map(|(p, _, _)| *p)
            .collect();
        in_sections(
            &tracepoints.into_iter().collect::<Vec<_>>(),
            &["tracepoint"],
        );
        in_sections(&GROWTH_RAW_TRACEPOINTS, &["raw_tracepoint", "raw_tp"]);
    }

    #[test]
    fn globals_exist() {
        in_sections(
            &[
                global::MIN_SIZE,
                global::FLOOR_MODE,
                global::SITES_SOFT_LIMIT,
                global::STACK_COPY,
                global::NATIVE_DEPTH,
                global::PY_MAX_DEPTH,
                global::SAMPLE_RATE,
                global::TRACER_PIDNS_DEV,
                global::TRACER_PIDNS_INO,
                global::FORK_CHILD_PID_OFFSET,
            ],
            &[".rodata", ".data", ".bss"],
        );
    }
}
