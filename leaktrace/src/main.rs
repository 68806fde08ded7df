//! The `leaktrace` command: thin glue over the library.

use clap::Parser;
use leaktrace::cli::{Cli, Command, CommonOpts};
use leaktrace::options::TargetSpec;
use leaktrace::report::gate::{self, Suppressions, EXIT_LEAKS_OVER_LIMIT};
use leaktrace::report::{diff, table};
use leaktrace::session::{trace_live, LiveView};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if std::env::args().nth(1).as_deref() == Some(leaktrace::probes::guardian::GUARDIAN_ARG) {
        // leaktrace's own guardian (probes/guardian.rs), not a user's command.
        if let Err(e) = leaktrace::probes::guardian::guardian_main() {
            eprintln!("leaktrace guardian: {e}");
            std::process::exit(1);
        }
        return;
    }
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
    if let Command::Preload { dir } = &cli.command {
        std::process::exit(match leaktrace::preload::install(dir.as_deref()) {
            Ok(path) => {
                println!("{}", path.display());
                0
            }
            Err(e) => {
                eprintln!("leaktrace: {e}");
                e.exit_code()
            }
        });
    }
    if let Command::Report(args) = &cli.command {
        std::process::exit(run_report(args));
    }
    if let Command::Snapshot(args) = &cli.command {
        std::process::exit(run_snapshot(args));
    }
    std::process::exit(run_trace(&cli));
}

/// `run`, `attach`, `top`: what to trace and the command's own options.
fn trace_request(cli: &Cli) -> (TargetSpec, &CommonOpts, Option<f64>) {
    match &cli.command {
        Command::Run {
            opts,
            command,
            pymalloc,
        } => (
            TargetSpec::Command {
                argv: command.clone(),
                pymalloc: *pymalloc,
            },
            opts,
            None,
        ),
        Command::Attach {
            pid,
            duration,
            opts,
        } => (TargetSpec::Pid(*pid), opts, *duration),
        Command::Top { pid, opts } => (TargetSpec::Pid(*pid), opts, None),
        Command::Diff { .. }
        | Command::Report(_)
        | Command::Snapshot(_)
        | Command::Preload { .. } => {
            unreachable!("handled in main")
        }
    }
}

/// `run`, `attach`, `top`: traces, prints the report, applies the CI gate; returns the exit
/// status.
fn run_trace(cli: &Cli) -> i32 {
    let (spec, common, duration) = trace_request(cli);
    let attach = !matches!(spec, TargetSpec::Command { .. });
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
                return 2;
            }
        },
        None => Suppressions::default(),
    };
    let opts = match common.trace_options(attach, duration) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("leaktrace: {e}");
            return e.exit_code();
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if common.control && !matches!(cli.command, Command::Attach { .. }) {
        // `run`'s program would share the client's pipes, and `top` draws on standard output.
        eprintln!(
            "leaktrace: --control is for `attach`: standard input and output are the client's"
        );
        return 2;
    }
    let (live, view) = match &cli.command {
        Command::Top { .. } => match top_view(common.top) {
            Some((live, view)) => (Some(live), Some(view)),
            None => return 2,
        },
        _ => (None, None),
    };
    let result = rt.block_on(trace_live(spec, &opts, live));
    // The session dropped the view's channel: it gives the terminal back and returns.
    if let Some(v) = view {
        let _ = v.join();
    }
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            return e.exit_code();
        }
    };
    let all = opts.report.all_native_frames;
    let rendered = table::render(&outcome.report, verbose, all);
    if opts.control {
        // Standard output carries the answers to the controlling client.
        eprint!("{rendered}");
    } else {
        print!("{rendered}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let mut code = outcome.exit_code;
    if let Some(limit) = common.fail_over {
        let g = gate::check(&outcome.report, limit, &suppressions);
        eprint!("{}", g.message);
        if g.failed {
            code = EXIT_LEAKS_OVER_LIMIT;
        }
    }
    // Every process leaves `TARGETS` now, so the programs return at once; the kernel's removal
    // of the breakpoints (a grace period per link, ≈2 s for a full set) finishes in a process of
    // its own, so the command ends when its report is out (docs/lifecycle.md, "Leaving").
    let phase = leaktrace::session::Phases::new(verbose);
    outcome.probes.detach_in_background();
    phase.done("detach");
    code
}

/// `top`: the view on its own thread, fed a report each interval; `None` (said why) when
/// standard output is no terminal to draw on.
fn top_view(top: usize) -> Option<(LiveView, std::thread::JoinHandle<()>)> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "leaktrace: top draws on a terminal and standard output is not one; use \
             `leaktrace attach` (with --prometheus or -o) instead"
        );
        return None;
    }
    let (reports, rx) = std::sync::mpsc::channel();
    let (quit_tx, quit) = tokio::sync::mpsc::unbounded_channel();
    let view = std::thread::spawn(move || leaktrace::report::top::run(rx, quit_tx));
    Some((LiveView { top, reports, quit }, view))
}

/// `leaktrace report`: renders a capture; returns the exit status.
fn run_report(args: &leaktrace::cli::ReportArgs) -> i32 {
    use std::io::{IsTerminal, Write};
    let o = args.render_options();
    if o.format.binary() && args.output.is_none() && std::io::stdout().is_terminal() {
        eprintln!("leaktrace: {:?} output is binary: give -o FILE", o.format);
        return 2;
    }
    let bytes = match leaktrace::capture::render::render(&args.capture, o) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            return e.exit_code();
        }
    };
    let written = match &args.output {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| format!("writing the report: {e}")),
    };
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("leaktrace: {e}");
            1
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
    use leaktrace::Error;
    let read = |p: &std::path::Path| -> Result<serde_json::Value, Error> {
        let bad = |detail: String| Error::BadInput {
            path: p.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(p).map_err(|e| bad(format!("cannot read: {e}")))?;
        serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON report: {e}")))
    };
    let result = read(old)
        .and_then(|o| read(new).map(|n| (o, n)))
        .and_then(|(o, n)| diff::diff(&o, &n));
    match result {
        Ok(d) => print_and_save(&diff::render(&d, top), &d, json),
        Err(e) => {
            eprintln!("leaktrace: {e}");
            e.exit_code()
        }
    }
}

/// `leaktrace snapshot`: prints the table (and writes the JSON); returns the exit status.
fn run_snapshot(args: &leaktrace::cli::SnapshotArgs) -> i32 {
    use leaktrace::analysis::snapshot;
    let interval = std::time::Duration::from_secs_f64(args.interval);
    let why = args.why.as_ref().map(|t| (t, args.why_samples));
    // An output that cannot be written is found before the walk, not after it.
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::File::create(path) {
            let e = leaktrace::Error::Write {
                path: path.clone(),
                detail: e.to_string(),
            };
            eprintln!("leaktrace: error: {e}");
            return e.exit_code();
        }
    }
    match snapshot::take(args.pid, args.count, interval, args.freeze, why) {
        Ok(s) => print_and_save(&snapshot::render(&s, args.top), &s, args.json.as_deref()),
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            e.exit_code()
        }
    }
}

/// Prints `table`, writes `value` as JSON to `json` if asked; the exit status (2, as for every
/// output that cannot be written: not written).
fn print_and_save(
    table: &str,
    value: &impl serde::Serialize,
    json: Option<&std::path::Path>,
) -> i32 {
    print!("{table}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(value).expect("reports serialize");
        if let Err(e) = std::fs::write(path, text) {
            let e = leaktrace::Error::Write {
                path: path.to_path_buf(),
                detail: e.to_string(),
            };
            eprintln!("leaktrace: error: {e}");
            return e.exit_code();
        }
    }
    0
}
