//! Command-line settings, parsed once into validated inputs (ripgrep-style), and the
//! one-shot commands built on them. `main.rs` only dispatches.

pub mod apply;
pub mod daemon;
pub mod diff;
pub mod explain;
pub mod inputs;
pub mod logging;
pub mod render;
pub mod trace;

use std::fmt;

/// A command-line failure: exit status 2 for bad arguments or unreadable input, 1 for
/// a failure while doing the work.
#[derive(Debug)]
pub struct CliError {
    /// Exit status.
    pub code: i32,
    /// One clear line.
    pub message: String,
}

impl CliError {
    /// Bad arguments or unreadable input (exit 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
        }
    }

    /// The work failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}
