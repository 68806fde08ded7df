//! The `leaktrace` command: thin glue over the library.

use clap::Parser;
use leaktrace::cli::{Cli, Command};
use leaktrace::report::table;
use leaktrace::session::{trace, TargetSpec};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
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
    };
    let verbose = match &cli.command {
        Command::Run { opts, .. } | Command::Attach { opts, .. } => opts.verbose,
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
            // Detach before exiting: the target keeps running, unharmed.
            drop(outcome.probes);
            std::process::exit(outcome.exit_code);
        }
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
