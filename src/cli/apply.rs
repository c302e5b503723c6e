//! `kproxy apply` (render and apply once to the current network namespace) and
//! `kproxy cleanup` (remove only kproxy's own rules).

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::Mode;
use crate::dataplane::Dataplane;
use crate::iptables::apply::{detect_backend, Binaries, Iptables, RealExec};
use crate::iptables::dataplane::IptablesDataplane;
use crate::model::IpFamily;
use crate::nftables::dataplane::NftDataplane;

/// `kproxy apply` flags.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
    /// Apply even a snapshot without Services (it removes every Service rule).
    #[arg(long)]
    pub allow_empty: bool,
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
    if let (Some(why), false) = (&inputs.refuse_apply, args.allow_empty) {
        return Err(CliError::usage(why.clone()));
    }
    match inputs.config.mode {
        Mode::Iptables => apply_iptables(&inputs),
        Mode::Nftables => {
            crate::nftables::apply_once(&inputs)
                .map_err(|e| CliError::failed(format!("nftables apply: {e}")))?;
            for s in &inputs.families {
                reconcile_conntrack(&inputs.state.proxy_state(s.family, &inputs.node));
            }
            Ok(())
        }
    }
}

fn apply_iptables(inputs: &Inputs) -> Result<(), CliError> {
    let backend = detect_backend(&RealExec);
    tracing::info!(?backend, "iptables backend");
    for settings in &inputs.families {
        if settings.family == IpFamily::V4 && settings.localhost_nodeports {
            crate::sysctl::ensure_or_warn("net/ipv4/conf/all/route_localnet", "1");
        }
        let mut s = settings.clone();
        if !inputs.capabilities_given {
            // kproxy does not create nfacct counters; rules must not refer to them
            // unless the operator says they exist.
            s.nfacct_invalid = false;
            s.nfacct_localhost = false;
        }
        if crate::sysctl::read_int("net/netfilter/nf_conntrack_tcp_be_liberal").unwrap_or(0) != 0 {
            s.tcp_be_liberal = true;
        }
        let state = inputs.state.proxy_state(s.family, &inputs.node);
        let bins = Binaries::new(s.family, backend);
        let mut dp = IptablesDataplane::new(s, Box::new(RealExec), bins, inputs.config.sync_period);
        let report = dp
            .sync(&state, true)
            .map_err(|e| CliError::failed(format!("{}: {e}", settings.family.label())))?;
        tracing::info!(family = settings.family.label(), ?report, "applied");
        reconcile_conntrack(&state);
    }
    Ok(())
}

/// Deletes UDP/SCTP conntrack entries that point at endpoints no longer serving; a
/// failure is logged, not fatal (the rules are already in place).
pub fn reconcile_conntrack(state: &crate::model::ProxyState) {
    match crate::conntrack::reconcile(state) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "removed stale conntrack entries"),
        Err(e) => tracing::warn!(error = %e, "conntrack cleanup failed"),
    }
}

/// Every family's dataplane of `mode` that can exist on this host (an iptables family
/// whose binary is missing has nothing to clean).
fn cleanup_planes(mode: Mode) -> Vec<Box<dyn Dataplane>> {
    let cfg = crate::config::Config::default();
    let backend = (mode == Mode::Iptables).then(|| detect_backend(&RealExec));
    let mut planes: Vec<Box<dyn Dataplane>> = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let settings = cfg.family_settings(family, "", None, &[]);
        match backend {
            Some(backend) => {
                let bins = Binaries::new(family, backend);
                if !Iptables::new(&RealExec, bins.clone()).available() {
                    continue;
                }
                planes.push(Box::new(IptablesDataplane::new(
                    settings,
                    Box::new(RealExec),
                    bins,
                    cfg.sync_period,
                )));
            }
            None => planes.push(Box::new(NftDataplane::new(settings))),
        }
    }
    planes
}

/// Runs `kproxy cleanup`.
pub fn run_cleanup(args: &CleanupArgs) -> Result<(), CliError> {
    let modes: Vec<Mode> = match args.mode.as_deref() {
        None => vec![Mode::Iptables, Mode::Nftables],
        Some(m) => vec![Mode::parse(m)
            .ok_or_else(|| CliError::usage(format!("--mode {m:?} is not iptables or nftables")))?],
    };
    let mut problems = Vec::new();
    for mode in modes {
        for mut dp in cleanup_planes(mode) {
            if let Err(e) = dp.cleanup() {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(problems.join("; ")))
    }
}
