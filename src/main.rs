//! The `kproxy` command: parses flags and dispatches; the work lives in the library.
//! Without a subcommand (or when installed as `kube-proxy`) it is the node daemon with
//! kube-proxy's command line.

use clap::{Parser, Subcommand};
use kproxy::cli::{self, logging, CliError};
use kproxy::config::LogFormat;

// mimalloc hands freed pages back to the system promptly; with glibc's malloc the
// peak of a full sync (a 10k-Service transaction) stayed resident for good.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "kproxy",
    version = cli::daemon::KUBERNETES_VERSION,
    about = "A Rust replacement for kube-proxy",
    after_help = "Without a subcommand kproxy runs the node daemon with kube-proxy's flags (see `kproxy --help`)."
)]
struct Cli {
    /// Log verbosity, as upstream's -v (0 = warnings and errors only).
    #[arg(short = 'v', long = "v", global = true, default_value_t = 0)]
    verbosity: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the rules upstream kube-proxy would write for a cluster snapshot (dry run).
    Render(cli::render::RenderArgs),
    /// Render and apply the rules once to the current network namespace.
    Apply(cli::apply::ApplyArgs),
    /// Remove kproxy's own rules (both modes and families by default); safe to repeat.
    Cleanup(cli::apply::CleanupArgs),
    /// Explain where a packet goes through the rules (rendered, or a saved dump).
    Trace(cli::trace::TraceArgs),
    /// Explain a Service (or list every Service port): ways in, endpoints and why.
    Explain(cli::explain::ExplainArgs),
    /// Compare the rules kproxy would write with the live rules (exit 0 same, 1 different).
    Diff(cli::diff::DiffArgs),
    /// Print the version.
    Version,
}

/// Subcommands clap parses; anything else is the daemon's command line.
const SUBCOMMANDS: &[&str] = &[
    "render", "apply", "cleanup", "trace", "explain", "diff", "version", "help",
];

fn exit_with(result: Result<(), CliError>) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("kproxy: {e}");
            std::process::exit(e.code);
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let first = argv.get(1).map(String::as_str);
    if first == Some("run") {
        exit_with(cli::daemon::main(&argv[2..]));
    }
    if !first.is_some_and(|a| SUBCOMMANDS.contains(&a)) {
        // `kproxy --config=...`, `kube-proxy --config=...`, `kproxy --version`.
        exit_with(cli::daemon::main(argv.get(1..).unwrap_or_default()));
    }
    let args = match Cli::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    logging::init(args.verbosity, LogFormat::Text, logging::Audience::OneShot);
    exit_with(match &args.command {
        Command::Render(a) => cli::render::run(a),
        Command::Trace(a) => cli::trace::run(a),
        Command::Explain(a) => cli::explain::run(a),
        Command::Apply(a) => cli::apply::run_apply(a),
        Command::Cleanup(a) => cli::apply::run_cleanup(a),
        Command::Diff(a) => cli::diff::run(a),
        Command::Version => {
            println!("{}", cli::daemon::version_line());
            Ok(())
        }
    })
}
