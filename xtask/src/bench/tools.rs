//! The configurations a workload runs under, and what each run measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// What runs the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// The workload alone.
    Untraced,
    /// `leaktrace run` with these flags.
    Leaktrace(&'static [&'static str]),
    /// `memray run --native` (PyPI), with these extra flags.
    Memray(&'static [&'static str]),
    /// `valgrind --leak-check=full` with `PYTHONMALLOC=malloc`.
    Valgrind,
    /// The workload alone with leaktrace's in-process sampler preloaded and no tracer attached:
    /// what a service deployed with `LD_PRELOAD=$(leaktrace preload)` pays while nobody looks.
    Preloaded,
}

/// One configuration of the tables.
pub struct Config {
    pub name: &'static str,
    pub tool: Tool,
}

pub const CONFIGS: &[Config] = &[
    Config {
        name: "untraced",
        tool: Tool::Untraced,
    },
    Config {
        name: "floor",
        tool: Tool::Leaktrace(&["--probe-floor"]),
    },
    Config {
        name: "exact",
        tool: Tool::Leaktrace(&["--mode", "exact"]),
    },
    Config {
        name: "sampled 512 KiB (in-process sampler)",
        tool: Tool::Leaktrace(&["--mode", "sampled"]),
    },
    Config {
        name: "growth",
        tool: Tool::Leaktrace(&["--mode", "growth"]),
    },
    // By default memray sees pymalloc only where it calls malloc for a new arena: every
    // Python allocation is seen only with --trace-python-allocators, as leaktrace sees them.
    Config {
        name: "memray --native",
        tool: Tool::Memray(&[]),
    },
    Config {
        name: "memray --native --trace-python-allocators",
        tool: Tool::Memray(&["--trace-python-allocators"]),
    },
    Config {
        name: "valgrind memcheck",
        tool: Tool::Valgrind,
    },
    Config {
        name: "sampled 512 KiB (kernel sampler)",
        tool: Tool::Leaktrace(&["--mode", "sampled", "--sampler", "kernel"]),
    },
    Config {
        name: "untraced, sampler preloaded (idle)",
        tool: Tool::Preloaded,
    },
];

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Measure {
    /// The workload's loop, as it timed itself.
    pub loop_s: f64,
    pub loop_cpu_s: f64,
    /// Peak RSS of the workload's process (for memray and Valgrind, their own memory is in it).
    pub target_rss: u64,
    /// The whole command: start-up, the loop, the report.
    pub wall_s: f64,
    /// leaktrace's own CPU and peak RSS, and the time it took to build its report.
    pub tracer_cpu_s: Option<f64>,
    pub tracer_rss: Option<u64>,
    pub report_s: Option<f64>,
    /// Where the tool's report went (leaktrace JSON, memray capture, memcheck XML).
    pub output: Option<PathBuf>,
}

/// `leaktrace preload`'s path (written once, then found).
fn preload_path(leaktrace: &Path) -> Result<String> {
    let out = Command::new(leaktrace).arg("preload").output()?;
    if !out.status.success() {
        bail!(
            "leaktrace preload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn field(out: &str, key: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// What every run uses: the leaktrace binary, the interpreter, the test extension's folder.
pub struct Env<'a> {
    pub leaktrace: &'a Path,
    pub python: &'a Path,
    pub ext: &'a Path,
}

/// Runs `script ext n` under `tool`; outputs go in `scratch`; `vars` are set for the workload.
pub fn run(
    tool: Tool,
    e: &Env<'_>,
    script: &Path,
    n: u64,
    scratch: &Path,
    vars: &[(&str, &str)],
) -> Result<Measure> {
    let (leaktrace, python, ext) = (e.leaktrace, e.python, e.ext);
    let (mut cmd, output) = match tool {
        Tool::Untraced => (Command::new(python), None),
        Tool::Preloaded => {
            let mut c = Command::new(python);
            c.env("LD_PRELOAD", preload_path(leaktrace)?);
            (c, None)
        }
        Tool::Leaktrace(flags) => {
            let json = scratch.join("leaktrace.json");
            let mut c = Command::new(leaktrace);
            c.arg("run")
                .args(flags)
                .arg("--json")
                .arg(&json)
                .arg("--")
                .arg(python);
            (c, Some(json))
        }
        Tool::Memray(flags) => {
            let bin = scratch.join("memray.bin");
            let mut c = Command::new(python);
            c.args(["-m", "memray", "run", "--native", "-q", "--force"])
                .args(flags)
                .arg("-o")
                .arg(&bin);
            (c, Some(bin))
        }
        Tool::Valgrind => {
            let xml = scratch.join("memcheck.xml");
            let mut c = Command::new("valgrind");
            c.args([
                "--tool=memcheck",
                "--leak-check=full",
                "--show-leak-kinds=all",
                "--xml=yes",
            ])
            .arg(format!("--xml-file={}", xml.display()))
            .arg(python)
            .env("PYTHONMALLOC", "malloc");
            (c, Some(xml))
        }
    };
    cmd.arg(script).arg(ext).arg(n.to_string());
    cmd.envs(vars.iter().copied());
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {tool:?} on {}", script.display()))?;
    let wall_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(loop_s) = field(&stdout, "LOOP_SECONDS=") else {
        bail!(
            "{tool:?} {}: no LOOP_SECONDS: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut m = Measure {
        loop_s,
        loop_cpu_s: field(&stdout, "CPU_SECONDS=").unwrap_or(0.0),
        target_rss: field(&stdout, "MAXRSS_KB=").unwrap_or(0.0) as u64 * 1024,
        wall_s,
        output,
        ..Measure::default()
    };
    if let (Tool::Leaktrace(_), Some(json)) = (tool, &m.output) {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
        let t = &v["tracer"];
        m.tracer_cpu_s = t["cpu_seconds"].as_f64();
        m.tracer_rss = t["peak_rss_bytes"].as_u64();
        m.report_s = t["report_seconds"].as_f64();
    }
    Ok(m)
}
