//! The `kproxy` command: parses flags and dispatches; the work lives in the library.

use clap::{Parser, Subcommand};
use kproxy::cli::{self, CliError};

// mimalloc hands freed pages back to the system promptly; with glibc's malloc the
// peak of a full sync (a 10k-Service transaction) stayed resident for good.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "kproxy", version, about = "A Rust replacement for kube-proxy")]
struct Cli {
    /// Log verbosity, as upstream's -v (0 = warnings and errors only).
    #[arg(short = 'v', long = "v", global = true, default_value_t = 0)]
    verbosity: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the rules upstream kube-proxy would write for a cluster snapshot (dry run).
    Render(cli::render::RenderArgs),
    /// The node daemon: watch the API server and keep the rules in sync.
    Run(kproxy::daemon::RunArgs),
    /// Render and apply the rules once to the current network namespace.
    Apply(cli::apply::ApplyArgs),
    /// Remove kproxy's own rules (both modes and families by default); safe to repeat.
    Cleanup(cli::apply::CleanupArgs),
    /// Explain where a packet goes through the rules (rendered, or a saved dump).
    Trace(cli::trace::TraceArgs),
    /// Compare the rules kproxy would write with the live rules (exit 0 same, 1 different).
    Diff(cli::diff::DiffArgs),
    /// Print the version.
    Version,
}

fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 | 2 => "info",
        3 | 4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(args.verbosity);
    let result: Result<(), CliError> = match &args.command {
        Command::Render(a) => cli::render::run(a),
        Command::Trace(a) => cli::trace::run(a),
        Command::Apply(a) => cli::apply::run_apply(a),
        Command::Run(a) => kproxy::daemon::run(a).map_err(CliError::failed),
        Command::Cleanup(a) => cli::apply::run_cleanup(a),
        Command::Diff(a) => cli::diff::run(a),
        Command::Version => {
            println!("kproxy {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("kproxy: {e}");
        std::process::exit(e.code);
    }
}
