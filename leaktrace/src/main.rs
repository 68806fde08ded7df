//! The `leaktrace` command: thin glue over the library.

use clap::Parser;
use leaktrace::analysis::gate::{self, Suppressions, EXIT_LEAKS_OVER_LIMIT};
use leaktrace::cli::{Cli, Command};
use leaktrace::report::{diff, table};
use leaktrace::session::{trace, TargetSpec};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Command::Diff {
        old,
        new,
        top,
        json,
    } = &cli.command
    {
        std::process::exit(run_diff(old, new, *top, json.as_deref()));
    }
    let (spec, opts) = match &cli.command {
        Command::Run {
            opts,
            command,
            pymalloc,
        } => (
            TargetSpec::Command {
                argv: command.clone(),
                pymalloc: *pymalloc,
            },
            opts.trace_options(false, None),
        ),
        Command::Attach {
            pid,
            duration,
            opts,
        } => (TargetSpec::Pid(*pid), opts.trace_options(true, *duration)),
        Command::Diff { .. } => unreachable!("handled above"),
    };
    let common = match &cli.command {
        Command::Run { opts, .. } | Command::Attach { opts, .. } => opts,
        Command::Diff { .. } => unreachable!("handled above"),
    };
    let verbose = common.verbose;
    // Read before tracing: a bad file is a usage error, not a lost trace.
    let suppressions = match &common.suppressions {
        Some(path) => match Suppressions::load(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "leaktrace: cannot read suppressions {}: {e}",
                    path.display()
                );
                std::process::exit(2);
            }
        },
        None => Suppressions::default(),
    };
    let opts = match opts {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("leaktrace: {msg}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(trace(spec, &opts)) {
        Ok(outcome) => {
            let all = opts.report.all_native_frames;
            print!("{}", table::render(&outcome.report, verbose, all));
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let mut code = outcome.exit_code;
            if let Some(limit) = common.fail_over {
                let g = gate::check(&outcome.report, limit, &suppressions);
                eprint!("{}", g.message);
                if g.failed {
                    code = EXIT_LEAKS_OVER_LIMIT;
                }
            }
            // Detach before exiting: the target keeps running, unharmed.
            drop(outcome.probes);
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}

/// `leaktrace diff`: prints the comparison; returns the exit status.
fn run_diff(
    old: &std::path::Path,
    new: &std::path::Path,
    top: usize,
    json: Option<&std::path::Path>,
) -> i32 {
    let read = |p: &std::path::Path| -> Result<serde_json::Value, String> {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a JSON report: {e}", p.display()))
    };
    let result = read(old)
        .and_then(|o| read(new).map(|n| (o, n)))
        .and_then(|(o, n)| diff::diff(&o, &n));
    match result {
        Ok(d) => {
            print!("{}", diff::render(&d, top));
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&d).expect("diff serializes");
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("leaktrace: cannot write {}: {e}", path.display());
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            eprintln!("leaktrace: {e}");
            2
        }
    }
}
