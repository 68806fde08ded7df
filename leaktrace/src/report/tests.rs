//! The report's own unit tests: drops shown, sampled figures scaled, units.

use super::*;
use crate::stacks::symbolize::Symbolizer;
use leaktrace_ebpf::SiteStats;

/// A heap of one site, id 7, that the kernel announced only through its counters: `blocks`
/// live blocks of 1,000 bytes each, none freed.
fn one_site(blocks: u64) -> Heap {
    let mut heap = Heap::default();
    let stats = SiteStats {
        live_bytes: blocks * 1000,
        live_count: blocks,
        allocs: blocks,
        alloc_bytes: blocks * 1000,
        tgid: 4_194_400,
        caller: 0x1234,
        ..SiteStats::default()
    };
    heap.update(&mut Symbolizer::new(), vec![(7, stats)]);
    heap
}

/// A site whose record the full ring buffer swallowed keeps its bytes but has no stack:
/// that is a loss, counted in `dropped` and shown, never "drops: none".
#[test]
fn a_site_that_lost_its_stack_record_is_a_drop() {
    let heap = one_site(4);
    let mut sym = Symbolizer::new();
    let mut meta = ReportMeta::default();
    meta.counters.insert("ringbuf_full".into(), 3);
    let options = ReportOptions {
        top: 20,
        min_size: 0,
        all_native_frames: false,
    };
    let r = Report::build(&heap, &mut sym, meta, options);
    assert_eq!(r.sites_without_stack, 1);
    assert_eq!(r.dropped, 1);
    let text = table::render(&r, false, false);
    assert!(!text.contains("drops: none"), "{text}");
    assert!(text.contains("DROPS: 1 (1 sites with unfreed bytes lost their stack record: the ring buffer was full 3 times)"), "{text}");
}

/// A full table names the option that makes it larger: a sampled session's tables are sized
/// for its interval, and a heap past that must be told how to fit.
#[test]
fn a_full_table_names_its_option() {
    let heap = one_site(1);
    let mut meta = ReportMeta::default();
    meta.counters.insert("live_map_full".into(), 5);
    meta.counters.insert("sites_map_full".into(), 2);
    let options = ReportOptions {
        top: 20,
        min_size: 0,
        all_native_frames: false,
    };
    let r = Report::build(&heap, &mut Symbolizer::new(), meta, options);
    let text = table::render(&r, false, false);
    assert!(text.contains("live_map_full 5: raise --max-live"), "{text}");
    assert!(
        text.contains("sites_map_full 2: raise --max-sites"),
        "{text}"
    );
}

/// In sampled mode a site's objects come from its sampled blocks: each counts for its share
/// of the site's estimated blocks, and the table says the counts are estimates.
#[test]
fn a_sampled_sites_objects_are_scaled_to_its_estimate() {
    let heap = one_site(1000);
    let mut end = Census::default();
    end.by_site.insert(
        7,
        HashMap::from([("str".to_string(), 3), ("bytes".to_string(), 1)]),
    );
    end.blocks_by_site.insert(7, 5);
    let options = ReportOptions {
        top: 20,
        min_size: 0,
        all_native_frames: false,
    };
    let build = |mode| {
        let meta = ReportMeta {
            mode,
            census_end: Some(end.clone()),
            ..ReportMeta::default()
        };
        Report::build(&heap, &mut Symbolizer::new(), meta, options)
    };
    let r = build(ModeKind::Sampled);
    assert_eq!(
        r.sites[0].types,
        vec![("str".to_string(), 600), ("bytes".to_string(), 200)]
    );
    assert!(table::render(&r, false, false).contains("holds (estimated): str ×600, bytes ×200"));
    // Exact: the blocks are all there, counted as read.
    let r = build(ModeKind::Exact);
    assert_eq!(r.sites[0].types[0], ("str".to_string(), 3));
}

#[test]
fn human_units() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(999), "999 B");
    assert_eq!(human_bytes(4_096_000), "4.1 MB");
    assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
}

#[test]
fn a_sampler_frame_names_the_allocator_it_stands_in_for() {
    let of = sampler_hook_allocator;
    assert_eq!(of("malloc"), Some("malloc"));
    assert_eq!(of("leaktrace_preload::hooks::malloc_slow"), Some("malloc"));
    assert_eq!(of("leaktrace_preload::hooks::calloc_slow"), Some("calloc"));
    assert_eq!(
        of("leaktrace_preload::hooks::posix_memalign"),
        Some("posix_memalign")
    );
    assert_eq!(
        of("leaktrace_preload::python_direct::traced"),
        Some("PyObject_Malloc")
    );
    assert_eq!(
        of("leaktrace_preload::python_direct::calloc_decide"),
        Some("PyObject_Malloc")
    );
    assert_eq!(
        of("leaktrace_preload::python_hooks::alloc_traced"),
        Some("PyObject_Malloc")
    );
    assert_eq!(of("leaktrace_preload::hooks::aligned_sampled"), None);
    assert_eq!(of("dd_allocation_created_slow"), None);
}
