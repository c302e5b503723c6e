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
    let started = std::time::Instant::now();
    let written = match inputs.config.mode {
        Mode::Iptables => apply_iptables(&inputs)?,
        Mode::Nftables => {
            crate::nftables::apply_once(&inputs)
                .map_err(|e| CliError::failed(format!("nftables apply: {e}")))?;
            let mut parts = Vec::new();
            for s in &inputs.families {
                let state = inputs.state.proxy_state(s.family, &inputs.node);
                reconcile_conntrack(&state);
                parts.push(format!(
                    "{} table {} ({} Service ports)",
                    crate::nftables::transaction::Family::of(s.family).as_str(),
                    crate::nftables::render::TABLE,
                    state.ports.len()
                ));
            }
            parts
        }
    };
    // One line on success: what was written, and how long it took.
    println!(
        "applied {} rules: {} in {} ms",
        inputs.config.mode.as_str(),
        written.join(", "),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Applies every family; returns one summary fragment per family.
fn apply_iptables(inputs: &Inputs) -> Result<Vec<String>, CliError> {
    let mut written = Vec::new();
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
        written.push(format!(
            "{} nat {} + filter {} ({} Service ports)",
            settings.family.label(),
            report.nat_rules_total,
            report.filter_rules,
            state.ports.len()
        ));
        reconcile_conntrack(&state);
    }
    Ok(written)
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
    let started = std::time::Instant::now();
    let mut problems = Vec::new();
    let mut cleaned = Vec::new();
    for mode in modes {
        for mut dp in cleanup_planes(mode) {
            match dp.cleanup() {
                Ok(()) => cleaned.push(format!("{} {}", dp.mode().as_str(), dp.family().label())),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    if problems.is_empty() {
        // One line on success: what was cleaned (rules that were not there count as
        // cleaned: cleanup is idempotent), and how long it took.
        println!(
            "removed kube-proxy's rules: {} in {} ms",
            if cleaned.is_empty() {
                "nothing to clean".to_string()
            } else {
                cleaned.join(", ")
            },
            started.elapsed().as_millis()
        );
        Ok(())
    } else {
        Err(CliError::failed(problems.join("; ")))
    }
}
