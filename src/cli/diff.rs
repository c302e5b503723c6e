//! `kproxy diff`: compares the rules kproxy would write for a cluster with the rules
//! live in the current network namespace. Exit 0 same, 1 different, 2 error.

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::{FamilySettings, Mode};
use crate::diff::live::{self, Scratch};
use crate::diff::{Outcome, Ruleset};
use crate::iptables::apply::{detect_backend, Backend, RealExec};

/// `kproxy diff` flags.
#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    /// Cluster and node inputs (as for `render` and `apply`).
    pub inputs: InputArgs,
}

/// The settings `kproxy apply` would use on this host (so that "same" means an apply
/// would change nothing).
fn as_apply_would(inputs: &Inputs, settings: &FamilySettings) -> FamilySettings {
    let mut s = settings.clone();
    if !inputs.capabilities_given {
        s.nfacct_invalid = false;
        s.nfacct_localhost = false;
    }
    if inputs.config.mode == Mode::Iptables
        && crate::sysctl::read_int("net/netfilter/nf_conntrack_tcp_be_liberal").unwrap_or(0) != 0
    {
        s.tcp_be_liberal = true;
    }
    s
}

/// Compares every family of `inputs` with the live rules.
pub fn compare(inputs: &Inputs) -> Result<Outcome, CliError> {
    let mode = inputs.config.mode;
    let backend = match mode {
        Mode::Iptables => detect_backend(&RealExec),
        Mode::Nftables => Backend::Default,
    };
    let err = |e: live::LiveError| CliError::usage(e.to_string());
    let scratch = Scratch::new().map_err(err)?;
    let (mut desired, mut current) = (Ruleset::default(), Ruleset::default());
    for settings in &inputs.families {
        let s = as_apply_would(inputs, settings);
        let label = s.family.label();
        let state = inputs.state.proxy_state(s.family, &inputs.node);
        let want = live::desired(&scratch, mode, &s, &state, backend).map_err(err)?;
        let have = live::read(mode, s.family, backend).map_err(err)?;
        desired.extend(
            live::parse(mode, label, &want)
                .map_err(|e| CliError::usage(format!("desired rules: {e}")))?,
        );
        current.extend(
            live::parse(mode, label, &have)
                .map_err(|e| CliError::usage(format!("live rules: {e}")))?,
        );
    }
    Ok(Outcome::new(mode, desired, current))
}

/// Runs `kproxy diff`.
pub fn run(args: &DiffArgs) -> Result<(), CliError> {
    let inputs = Inputs::load(&args.inputs)?;
    let outcome = compare(&inputs)?;
    print!("{}", outcome.report());
    if outcome.is_same() {
        Ok(())
    } else {
        Err(CliError::failed(
            "the live rules differ from the rules kproxy would write",
        ))
    }
}
