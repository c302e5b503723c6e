//! Log output for every command: `tracing` to stderr, colour only on a terminal,
//! text or JSON (`--logging-format`), verbosity as upstream's `-v`; `KPROXY_LOG`
//! (an EnvFilter directive) overrides the level.

use std::io::IsTerminal;

use crate::config::LogFormat;

/// Whose verbosity scale `-v` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The daemon: klog's, where level 0 already prints informational lines.
    Daemon,
    /// One-shot commands: quiet unless asked (0 = warnings and errors).
    OneShot,
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(verbosity: u32, format: LogFormat, audience: Audience) {
    let level = match (audience, verbosity) {
        (Audience::OneShot, 0) => "warn",
        (Audience::OneShot, 1..=2) | (Audience::Daemon, 0..=3) => "info",
        (Audience::OneShot, 3..=4) | (Audience::Daemon, 4..=5) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // `kubectl logs` shows escape codes verbatim: colour only for a person.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
