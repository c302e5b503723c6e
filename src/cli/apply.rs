//! `kproxy apply` (render and apply once to the current network namespace) and
//! `kproxy cleanup` (remove only kproxy's own rules).

use std::time::Instant;

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::{Mode, NftablesLayout};
use crate::host::Host;

/// `kproxy apply` flags.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
    /// Apply even a snapshot without Services (it removes every Service rule).
    #[arg(long)]
    pub(crate) allow_empty: bool,
}

/// `kproxy cleanup` flags.
#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Which mode's rules to remove (default: both).
    #[arg(long, value_name = "iptables|nftables")]
    pub mode: Option<String>,
}

/// Runs `kproxy apply`.
pub fn run_apply(args: &ApplyArgs) -> Result<(), CliError> {
    let inputs = Inputs::load(&args.inputs)?;
    crate::memory::log_phase("inputs loaded");
    if let (Some(why), false) = (&inputs.refuse_apply, args.allow_empty) {
        return Err(CliError::usage(why.clone()));
    }
    let start = Instant::now();
    let mut host = Host::with_addresses(Vec::new());
    // kproxy does not create nfacct counters; rules must not refer to them unless the
    // operator says they exist.
    host.nfacct = inputs.capabilities_given && inputs.families.iter().any(|s| s.nfacct_invalid);
    let mode = inputs.config.mode;
    // As the daemon does at start-up: the other mode's rules must not keep routing.
    host.remove_other_mode_leftovers(mode);
    host.remove_other_layout_leftovers(&inputs.config);
    let mut summary = Vec::new();
    match mode {
        Mode::Iptables => {
            let settings = inputs
                .families
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    s.nfacct_invalid &= host.nfacct;
                    s.nfacct_localhost &= host.nfacct;
                    s.tcp_be_liberal |= host.tcp_be_liberal;
                    s
                })
                .collect();
            for mut dp in host.dataplanes(&inputs.config, settings) {
                let family = dp.family();
                let state = inputs.state.proxy_state(family, &inputs.node);
                let outcome = dp
                    .sync(&state, true)
                    .map_err(|e| CliError::failed(e.to_string()))?;
                summary.push(format!(
                    "{}: {} restore lines, {} services",
                    family.label(),
                    outcome.operations,
                    outcome.services_written
                ));
                reconcile_conntrack(&state);
            }
        }
        Mode::Nftables if inputs.config.nftables_layout == NftablesLayout::Maps => {
            for mut dp in host.dataplanes(&inputs.config, inputs.families.clone()) {
                let family = dp.family();
                let state = inputs.state.proxy_state(family, &inputs.node);
                dp.sync(&state, true)
                    .map_err(|e| CliError::failed(format!("nftables apply: {e}")))?;
                summary.push(format!(
                    "{}: table {} {}",
                    family.label(),
                    match family {
                        crate::model::IpFamily::V4 => "ip",
                        crate::model::IpFamily::V6 => "ip6",
                    },
                    crate::nftables::maps::TABLE
                ));
                reconcile_conntrack(&state);
            }
        }
        Mode::Nftables => {
            let plan: Vec<_> = inputs
                .families
                .iter()
                .map(|s| (s.clone(), inputs.state.proxy_state(s.family, &inputs.node)))
                .collect();
            // The cluster objects are not needed past this point; the sync's peak
            // (the whole transaction) should not sit on top of them.
            drop(inputs);
            crate::memory::release_free_memory();
            crate::nftables::apply_once(&plan)
                .map_err(|e| CliError::failed(format!("nftables apply: {e}")))?;
            for (s, state) in &plan {
                summary.push(format!(
                    "{}: table {} kube-proxy",
                    s.family.label(),
                    match s.family {
                        crate::model::IpFamily::V4 => "ip",
                        crate::model::IpFamily::V6 => "ip6",
                    }
                ));
                reconcile_conntrack(state);
            }
        }
    }
    println!(
        "kproxy apply: {} rules written ({}) in {} ms",
        mode.as_str(),
        summary.join("; "),
        start.elapsed().as_millis()
    );
    Ok(())
}

/// Deletes UDP/SCTP conntrack entries that point at endpoints no longer serving; a
/// failure is logged, not fatal (the rules are already in place).
pub(crate) fn reconcile_conntrack(state: &crate::model::ProxyState) {
    match crate::conntrack::reconcile(state) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "removed stale conntrack entries"),
        Err(e) => tracing::warn!(error = %e, "conntrack cleanup failed"),
    }
}

/// Runs `kproxy cleanup`.
pub fn run_cleanup(args: &CleanupArgs) -> Result<(), CliError> {
    let modes: Vec<Mode> = match args.mode.as_deref() {
        None => vec![Mode::Iptables, Mode::Nftables],
        Some(m) => vec![Mode::parse(m)
            .ok_or_else(|| CliError::usage(format!("--mode {m:?} is not iptables or nftables")))?],
    };
    cleanup_modes(&modes)
}

/// Removes kube-proxy's rules of these modes (`kproxy cleanup`, `kproxy --cleanup`).
pub(crate) fn cleanup_modes(modes: &[Mode]) -> Result<(), CliError> {
    let start = Instant::now();
    let host = Host::with_addresses(Vec::new());
    let problems: Vec<String> = modes
        .iter()
        .flat_map(|m| host.cleanup(*m))
        .map(|e| e.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(CliError::failed(problems.join("; ")));
    }
    let names: Vec<&str> = modes.iter().map(|m| m.as_str()).collect();
    println!(
        "kproxy cleanup: removed kube-proxy's {} rules (both families) in {} ms",
        names.join(" and "),
        start.elapsed().as_millis()
    );
    Ok(())
}
