//! Native stacks unwound with DWARF CFI from the kernel's stack copy, merged with the Python
//! stack: a C extension built without frame pointers, two C callers of one helper, threads, a
//! library loaded after tracing began, and real numpy.

mod common;

use common::*;
use serde_json::Value;

/// The frames a report shows by default (hidden interpreter frames left out), outermost first,
/// as `py:function` or the native function name.
fn shown(site: &Value) -> Vec<String> {
    site["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["hidden"] != true)
        .map(|f| match f["kind"].as_str() {
            Some("python") => format!("py:{}", f["function"].as_str().unwrap()),
            _ => f["function"].as_str().unwrap_or("?").to_string(),
        })
        .collect()
}

/// Sites whose shown stack contains every name of `names`, in that order.
fn sites_through<'a>(run: &'a Run, names: &[&str]) -> Vec<&'a Value> {
    run.json.as_ref().expect("report JSON")["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let st = shown(s);
            let mut at = 0;
            names
                .iter()
                .all(|n| match st[at..].iter().position(|f| f == n) {
                    Some(i) => {
                        at += i + 1;
                        true
                    }
                    None => false,
                })
        })
        .collect()
}

fn total(sites: &[&Value], key: &str) -> u64 {
    sites.iter().map(|s| s[key].as_u64().unwrap()).sum()
}

#[test]
fn chain_of_c_functions_without_frame_pointers_under_the_python_line() {
    // One at a time: the kernel learns a path's frames from userspace within a pause that a
    // second traced test on the other core can stretch.
    let _g = serial();
    for py in pythons().into_iter().map(|p| p.path) {
        eprintln!("=== {}", py.display());
        chain_of_c_functions_without_frame_pointers_under_the_python_line_on(&py);
    }
}

fn chain_of_c_functions_without_frame_pointers_under_the_python_line_on(py: &std::path::Path) {
    let ext = ext_dir(py);
    let s = script(
        "import sys, time\nsys.path.insert(0, sys.argv[1])\nimport leakyext\n\
         time.sleep(1)\n\
         def work():\n    for _ in range(20):\n        leakyext.leak_chain(1000)\n\
         work()\n",
    );
    let run = run_python(&[], py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let found = sites_through(
        &run,
        &["py:work", "chain_level1", "chain_level2", "chain_level3"],
    );
    assert!(!found.is_empty(), "no merged chain stack:\n{}", run.stdout);
    assert_eq!(total(&found, "unfreed_count"), 20, "{}", run.stdout);
    assert_eq!(total(&found, "unfreed_bytes"), 20 * 1002);
    for s in &found {
        let st = shown(s);
        assert_eq!(st.last().unwrap(), "chain_level3", "{st:?}");
        // The extension's entry point sits between the Python line and the chain.
        let work = st.iter().position(|f| f == "py:work").unwrap();
        let l1 = st.iter().position(|f| f == "chain_level1").unwrap();
        assert!(st[work..l1].iter().any(|f| f == "leak_chain"), "{st:?}");
        let py_frame = s["stack"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"] == "work")
            .unwrap();
        assert_eq!(py_frame["line"], 7);
        assert_eq!(s["native_unwind"], "complete", "{st:?}");
    }
    // The table shows the chain too.
    assert!(run.stdout.contains("chain_level2"), "{}", run.stdout);
}

#[test]
fn two_c_callers_of_one_helper_are_two_sites() {
    let _g = serial();
    for py in pythons().into_iter().map(|p| p.path) {
        eprintln!("=== {}", py.display());
        two_c_callers_of_one_helper_are_two_sites_on(&py);
    }
}

fn two_c_callers_of_one_helper_are_two_sites_on(py: &std::path::Path) {
    let ext = ext_dir(py);
    // One call, a pause for userspace to teach the kernel the first path's frames, then 30 more.
    let s = script(
        "import sys, time\nsys.path.insert(0, sys.argv[1])\nimport leakyext\n\
         time.sleep(1)\n\
         leakyext.leak_two(500)\ntime.sleep(0.5)\n\
         for _ in range(30):\n    leakyext.leak_two(500)\n",
    );
    let run = run_python(&[], py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let a = sites_through(&run, &["via_a", "shared_alloc"]);
    let b = sites_through(&run, &["via_b", "shared_alloc"]);
    assert!(!a.is_empty() && !b.is_empty(), "{}", run.stdout);
    assert!(a.iter().all(|s| !shown(s).contains(&"via_b".to_string())));
    // Every block is counted once, and none under a path it did not take. The very first
    // call's two blocks came before the kernel knew how to tell the paths apart: they share a
    // site whose two stack copies took different paths, so it shows only the frame the kernel
    // knew, marked `unlearned`, instead of one path's stack (docs/native-stacks.md). Every
    // later call is told apart.
    let (na, nb) = (total(&a, "unfreed_count"), total(&b, "unfreed_count"));
    assert_eq!((na, nb), (30, 30), "{}", run.stdout);
    assert_eq!(total(&b, "unfreed_bytes"), 30 * 505);
    assert_eq!(total(&a, "unfreed_bytes"), 30 * 503);
    let early: Vec<&Value> = sites_through(&run, &["shared_alloc"])
        .into_iter()
        .filter(|s| !shown(s).iter().any(|f| f == "via_a" || f == "via_b"))
        .collect();
    assert_eq!(total(&early, "unfreed_bytes"), 503 + 505, "{}", run.stdout);
    assert!(
        early.iter().all(|s| s["native_unwind"] == "unlearned"),
        "{}",
        run.stdout
    );
}

/// At an interpreter's start-up, before leaktrace has read the first stack copies, the kernel's
/// walk of pymalloc's requests over 512 bytes stops at `_PyObject_Malloc`: dict keys tables,
/// heap types and code objects share one site id until the rows past it are learned. Shown under
/// its first copy's stack, that site put 3.13's start-up types and code objects on a
/// `new_keys_object` line (`holds: type ×87, code ×76`). A dict keys table holds no object: no
/// such line may show one, on any interpreter.
#[test]
fn start_up_blocks_of_several_paths_are_not_put_on_one() {
    let _g = serial();
    let s = script(
        "import asyncio, decimal, email.mime.text, http.client, json\n\
         tables = [{str(i) + '_' + str(j): j for j in range(40)} for i in range(300)]\n",
    );
    for py in pythons() {
        eprintln!("=== {}", py.path.display());
        let run = run_python(&[], &py.path, &s, &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let sites = run.json.as_ref().expect("report JSON")["sites"]
            .as_array()
            .unwrap();
        let keys_tables: Vec<&Value> = sites
            .iter()
            .filter(|s| {
                s["allocator"] != "pymalloc arena" && s["caller"]["function"] == "new_keys_object"
            })
            .collect();
        for t in &keys_tables {
            assert_eq!(t["types"], serde_json::json!([]), "{}", run.stdout);
        }
        eprintln!("{} dict keys table sites", keys_tables.len());
    }
}

/// In sampled mode the stack is walked from the heap-sampling USDT's site, an instruction, not a
/// return address. Walked as if it were one, the kernel never got past that first frame: every
/// sample from one Python call fell into one site, shown with whichever path came first
/// (Pillow's leaked `PyMem_New` buffer was reported under FreeType's `ft_alloc`).
#[test]
fn two_c_callers_of_one_helper_are_two_sites_when_sampled() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    // Until userspace has learned a path's frames from a sample's stack copy, the kernel cannot
    // tell the two paths apart (docs/native-stacks.md), and the measured loop runs in a tenth
    // of a second: so 30 calls from another Python function first (each path sampled in one
    // with p = 0.39), and a pause for the copies to be read. Then 150 calls of 2 × 256 KiB:
    // each path leaks 38.4 MB, about 73 samples at 512 KiB.
    let s = script(
        "import sys, time\nsys.path.insert(0, sys.argv[1])\nimport leakyext\n\
         def warm():\n    for _ in range(30):\n        leakyext.leak_two(262144)\n\
         def measured():\n    for _ in range(150):\n        leakyext.leak_two(262144)\n\
         time.sleep(1)\nwarm()\ntime.sleep(1.5)\nmeasured()\n",
    );
    let run = run_python(&["--mode", "sampled"], &py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let a = sites_through(&run, &["py:measured", "via_a", "shared_alloc"]);
    let b = sites_through(&run, &["py:measured", "via_b", "shared_alloc"]);
    assert!(!a.is_empty() && !b.is_empty(), "{}", run.stdout);
    assert!(a.iter().all(|s| !shown(s).contains(&"via_b".to_string())));
    let truth = 150.0 * 262_147.0;
    for (name, sites) in [("via_a", &a), ("via_b", &b)] {
        let est = total(sites, "unfreed_bytes") as f64;
        // Poisson sampling: about ±12 % at one standard deviation here.
        assert!(
            (est / truth - 1.0).abs() < 0.4,
            "{name}: {est} B estimated for {truth} B\n{}",
            run.stdout
        );
    }
}

#[test]
fn threads_unwind_their_own_stacks() {
    let _g = serial();
    let py = pyenv_python();
    let ext = ext_dir(&py);
    let s = script(
        "import sys, time, threading\nsys.path.insert(0, sys.argv[1])\nimport leakyext\n\
         time.sleep(1)\n\
         def left():\n    for _ in range(25):\n        leakyext.leak_chain(3000)\n\
         def right():\n    for _ in range(25):\n        leakyext.leak_malloc_nogil(7000)\n\
         ts = [threading.Thread(target=f) for f in (left, right)]\n\
         [t.start() for t in ts]\n[t.join() for t in ts]\n",
    );
    let run = run_python(&[], &py, &s, &[ext.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let l = sites_through(&run, &["py:left", "leak_chain", "chain_level3"]);
    assert_eq!(total(&l, "unfreed_count"), 25, "{}", run.stdout);
    let r = sites_through(&run, &["py:right", "leak_malloc_nogil"]);
    assert_eq!(total(&r, "unfreed_count"), 25, "{}", run.stdout);
    for s in l.iter().chain(&r) {
        // A thread's stack ends at its entry (clone3), not at the program's.
        assert_eq!(s["native_unwind"], "complete", "{}", shown(s).join(" > "));
        let all: Vec<&str> = s["stack"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["function"].as_str())
            .collect();
        assert!(
            all.iter()
                .any(|f| f.contains("start_thread") || f.contains("clone")),
            "{all:?}"
        );
    }
}

#[test]
fn library_loaded_after_tracing_began_unwinds_and_symbolizes() {
    let _g = serial();
    let py = pyenv_python();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("liblate.so");
    let src = dir.path().join("late.c");
    std::fs::write(
        &src,
        "#include <stdlib.h>\nvoid *volatile keep;\n\
         __attribute__((noinline)) void *late_inner(size_t n) { void *p = malloc(n); keep = p; return p; }\n\
         __attribute__((noinline)) void *late_outer(size_t n) { void *p = late_inner(n + 1); keep = p; return p; }\n",
    )
    .unwrap();
    succeed(
        std::process::Command::new("gcc")
            .args([
                "-shared",
                "-fPIC",
                "-O2",
                "-g",
                "-fomit-frame-pointer",
                "-o",
            ])
            .arg(&lib)
            .arg(&src),
    );
    let s = script(
        "import sys, time, ctypes\ntime.sleep(1.5)\n\
         lib = ctypes.CDLL(sys.argv[1])\nlib.late_outer.argtypes = [ctypes.c_size_t]\n\
         def use_late():\n    for _ in range(40):\n        lib.late_outer(4095)\n\
         use_late()\n",
    );
    let run = run_python(&[], &py, &s, &[lib.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let found = sites_through(&run, &["py:use_late", "late_outer", "late_inner"]);
    assert_eq!(total(&found, "unfreed_count"), 40, "{}", run.stdout);
    let caller = &found[0]["caller"];
    assert!(caller["module"].as_str().unwrap().ends_with("liblate.so"));
    assert!(
        caller["file"].as_str().unwrap().ends_with("late.c"),
        "{caller}"
    );
}

#[test]
fn numpy_growing_list_is_found_through_numpy_and_a_dropping_loop_is_not() {
    let _g = serial();
    let py = pyenv_python();
    let s = script(
        "import time\nimport numpy as np\ntime.sleep(1)\n\
         keep = []\n\
         def grow():\n    for _ in range(40):\n        keep.append(np.ones(50_000))\n\
         def churn():\n    for _ in range(200):\n        a = np.zeros(70_000)\n        del a\n\
         grow()\nchurn()\n",
    );
    // The top sites are what a user reads (and symbolizing every start-up site of numpy's import
    // is slow).
    let run = run_python(&["--top", "200"], &py, &s, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sites = run.json.as_ref().unwrap()["sites"].as_array().unwrap();
    let top = &sites[0];
    let st = shown(top);
    assert!(
        st.contains(&"py:grow".to_string()),
        "top site {st:?}\n{}",
        run.stdout
    );
    let through_numpy = top["native_stack"].as_array().unwrap().iter().any(|f| {
        f["module"]
            .as_str()
            .is_some_and(|m| m.contains("_multiarray_umath"))
    });
    assert!(through_numpy, "{}", run.stdout);
    assert!(top["unfreed_bytes"].as_u64().unwrap() >= 40 * 400_000);
    // The arrays created and dropped in `churn` left nothing (their 560 kB blocks least of all).
    let churned: u64 = sites
        .iter()
        .filter(|s| shown(s).contains(&"py:churn".to_string()))
        .map(|s| s["unfreed_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        churned < 70_000 * 8,
        "churn left {churned} bytes:\n{}",
        run.stdout
    );
    // How many numpy stacks reached the program's entry (for the record).
    let numpy_sites: Vec<&Value> = sites
        .iter()
        .filter(|s| {
            s["native_stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["module"].as_str().is_some_and(|m| m.contains("numpy")))
        })
        .collect();
    let complete = numpy_sites
        .iter()
        .filter(|s| s["native_unwind"] == "complete")
        .count();
    eprintln!(
        "numpy sites: {} reported, {} unwound to _start; top stack: {}",
        numpy_sites.len(),
        complete,
        st.join(" > ")
    );
    assert_eq!(top["native_unwind"], "complete");
}

#[test]
fn cpp_frames_are_demangled() {
    let _g = serial();
    let py = pyenv_python();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libcpp.so");
    let src = dir.path().join("leak.cpp");
    std::fs::write(
        &src,
        // Each function stores its result before returning, so no call is a tail call.
        "#include <cstddef>\nvoid *volatile sink;\nnamespace store {\nstruct Leaker {\n\
         __attribute__((noinline)) static char *grab(std::size_t n) {\n\
         char *p = new char[n]; sink = p; return p; }\n};\n}\n\
         extern \"C\" void *cpp_leak(std::size_t n) {\n\
         void *p = store::Leaker::grab(n); sink = p; return p; }\n",
    )
    .unwrap();
    let out = std::process::Command::new("g++")
        .args([
            "-shared",
            "-fPIC",
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-o",
        ])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = script(
        "import sys, time, ctypes\nlib = ctypes.CDLL(sys.argv[1])\n\
         lib.cpp_leak.argtypes = [ctypes.c_size_t]\ntime.sleep(1)\n\
         def keep():\n    for _ in range(10):\n        lib.cpp_leak(5000)\n\
         keep()\n",
    );
    let run = run_python(&["--top", "50"], &py, &s, &[lib.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let found = sites_through(
        &run,
        &[
            "py:keep",
            "cpp_leak",
            "store::Leaker::grab(unsigned long)",
            "operator new(unsigned long)",
        ],
    );
    assert_eq!(total(&found, "unfreed_count"), 10, "{}", run.stdout);
    assert!(run.stdout.contains("store::Leaker::grab(unsigned long)"));
}
