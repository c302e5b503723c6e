//! `kproxy trace`: where a new connection goes through the rules kproxy would write
//! (rendered from a snapshot), a saved ruleset (`iptables-save`, `nft list …`, `nft -j
//! list …`, or kproxy's dry-run text), or the live rules of this network namespace:
//! every rule it hits, the endpoints it can be DNATed to with their probabilities,
//! whether and why it is masqueraded, and whether it is dropped or rejected.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::{Mode, NftablesLayout};
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::IpFamily;
use crate::nftables::maps::MapsRenderer;
use crate::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use crate::trace::core::{Packet, Trace};
use crate::trace::iptables::Ruleset;
use crate::trace::nftables::Table as NftTable;
use crate::trace::report::{RulesSource, TraceReport};

/// `kproxy trace` flags.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    /// Cluster and node inputs (the rules are rendered from them).
    pub inputs: InputArgs,
    /// Trace through this saved ruleset instead of rendering: `iptables-save` output,
    /// `nft list table|ruleset` output, `nft -j` JSON, or kproxy's dry-run text.
    #[arg(long, value_name = "FILE", conflicts_with = "live")]
    pub ruleset: Option<PathBuf>,
    /// Trace through the rules of the current network namespace (the kube-proxy
    /// nftables table, or iptables-save of the legacy and nft backends).
    #[arg(long)]
    pub live: bool,
    /// Source address of the packet.
    #[arg(long)]
    pub src: IpAddr,
    /// Source port (shown; kube-proxy's rules do not look at it).
    #[arg(long)]
    pub(crate) sport: Option<u16>,
    /// Destination address of the packet.
    #[arg(long)]
    pub dst: IpAddr,
    /// Destination port.
    #[arg(long)]
    pub dport: u16,
    /// Protocol: tcp, udp or sctp.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp"])]
    pub proto: String,
    /// The packet is sent by a process on the node itself.
    #[arg(long)]
    pub from_node: bool,
    /// Output format: text or json.
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// What the rules are, once read.
enum Rules {
    Iptables(Ruleset),
    Nftables(NftTable),
}

fn read_file(path: &PathBuf) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::usage(format!("reading standard input: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("reading {}: {e}", path.display())))
}

/// Which mode a ruleset file is written for, from its first meaningful line.
fn detect_mode(text: &str) -> Mode {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    if first.starts_with('*') || first.starts_with(':') || first.starts_with("-A ") {
        Mode::Iptables
    } else {
        Mode::Nftables
    }
}

fn parse_rules(mode: Mode, text: &str, family: IpFamily) -> Result<Rules, CliError> {
    let err = |e: crate::trace::core::TraceError| CliError::usage(format!("ruleset: {e}"));
    Ok(match mode {
        Mode::Iptables => Rules::Iptables(Ruleset::parse(text).map_err(err)?),
        Mode::Nftables => {
            let fam = if family == IpFamily::V6 { "ip6" } else { "ip" };
            Rules::Nftables(NftTable::parse_for(text, Some(fam)).map_err(err)?)
        }
    })
}

fn run_tool(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rules of this network namespace: the kube-proxy nftables table when present
/// (or asked for), else the iptables rules of whichever backends hold kube-proxy's
/// chains (both merged when both do).
fn live_rules(mode: Option<Mode>, family: IpFamily) -> Result<(Mode, Rules), CliError> {
    let fam = if family == IpFamily::V6 { "ip6" } else { "ip" };
    let nft = || run_tool("nft", &["-j", "list", "table", fam, "kube-proxy"]);
    if mode != Some(Mode::Iptables) {
        if let Some(json) = nft() {
            let t = NftTable::parse_for(&json, Some(fam)).map_err(|e| {
                CliError::failed(format!("nft -j list table {fam} kube-proxy: {e}"))
            })?;
            return Ok((Mode::Nftables, Rules::Nftables(t)));
        }
        // The maps layout's table, as the kernel lists it (its data maps and
        // `numgen` keys are read from the text listing).
        let maps = crate::nftables::maps::TABLE;
        if let Some(text) = run_tool("nft", &["list", "table", fam, maps]) {
            let t = NftTable::parse_for(&text, Some(fam))
                .map_err(|e| CliError::failed(format!("nft list table {fam} {maps}: {e}")))?;
            return Ok((Mode::Nftables, Rules::Nftables(t)));
        }
        if mode == Some(Mode::Nftables) {
            return Err(CliError::failed(format!(
                "no nftables table {fam} kube-proxy or {fam} {maps} in this network namespace"
            )));
        }
    }
    let (legacy, nft_backend) = match family {
        IpFamily::V4 => ("iptables-legacy-save", "iptables-nft-save"),
        IpFamily::V6 => ("ip6tables-legacy-save", "ip6tables-nft-save"),
    };
    let mut merged: Option<Ruleset> = None;
    let mut found = Vec::new();
    for tool in [nft_backend, legacy] {
        let Some(text) = run_tool(tool, &[]) else {
            continue;
        };
        if !text.contains(":KUBE-") {
            continue;
        }
        let rs = Ruleset::parse(&text).map_err(|e| CliError::failed(format!("{tool}: {e}")))?;
        found.push(tool);
        match merged.as_mut() {
            Some(m) => m.merge(rs),
            None => merged = Some(rs),
        }
    }
    match merged {
        Some(rs) => {
            if found.len() > 1 {
                tracing::warn!(backends = ?found, "kube-proxy chains in both iptables backends; tracing both merged");
            }
            Ok((Mode::Iptables, Rules::Iptables(rs)))
        }
        None => Err(CliError::failed(
            "no kube-proxy rules in this network namespace (no nftables table, no KUBE- chains in iptables-save)",
        )),
    }
}

/// This network namespace's addresses (`addrtype LOCAL` / `fib … type local`).
fn live_local_ips() -> Vec<IpAddr> {
    run_tool("ip", &["-o", "addr", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(t) = w.next() {
                if t == "inet" || t == "inet6" {
                    return w.next()?.split('/').next()?.parse().ok();
                }
            }
            None
        })
        .collect()
}

/// Traces one packet through already-read rules (iptables' `addrtype LOCAL` includes
/// loopback).
fn trace_with(rules: &Rules, pkt: &Packet, local: &[IpAddr]) -> Trace {
    match rules {
        Rules::Nftables(t) => t.trace(pkt, local),
        Rules::Iptables(rs) => {
            let mut local = local.to_vec();
            local.push(IpAddr::from([127, 0, 0, 1]));
            local.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
            rs.trace(pkt, &local)
        }
    }
}

/// Runs `kproxy trace`.
pub fn run(args: &TraceArgs) -> Result<(), CliError> {
    let family = IpFamily::of(&args.dst);
    if IpFamily::of(&args.src) != family {
        return Err(CliError::usage(
            "--src and --dst are of different IP families",
        ));
    }
    let mode_flag =
        match &args.inputs.mode {
            Some(m) => Some(Mode::parse(m).ok_or_else(|| {
                CliError::usage(format!("--mode {m:?} is not iptables or nftables"))
            })?),
            None => None,
        };
    let mut local: Vec<IpAddr> = args
        .inputs
        .local_addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    let pkt = Packet {
        src: args.src,
        dst: args.dst,
        dport: args.dport,
        proto: args.proto.to_lowercase(),
        from_node: args.from_node,
    };
    let (mode, rules, source) = if args.live {
        local.extend(live_local_ips());
        let (mode, rules) = live_rules(mode_flag, family)?;
        (mode, rules, RulesSource::Live)
    } else if let Some(path) = &args.ruleset {
        let text = read_file(path)?;
        let mode = mode_flag.unwrap_or_else(|| detect_mode(&text));
        if args.inputs.snapshot.is_some() {
            let inputs = Inputs::load(&args.inputs)?;
            if let Some(n) = inputs.state.node() {
                local.extend(n.internal_ips.iter().chain(n.external_ips.iter()).copied());
            }
        }
        (
            mode,
            parse_rules(mode, &text, family)?,
            RulesSource::Ruleset,
        )
    } else {
        let inputs = Inputs::load(&args.inputs)?;
        let settings = inputs
            .families
            .iter()
            .find(|s| s.family == family)
            .cloned()
            .ok_or_else(|| {
                CliError::usage(format!(
                    "--ip-family excludes the {} destination",
                    family.label()
                ))
            })?;
        if let Some(n) = inputs.state.node() {
            local.extend(n.internal_ips.iter().chain(n.external_ips.iter()).copied());
        }
        crate::memory::log_phase("inputs loaded");
        let state = inputs.state.proxy_state(family, &inputs.node);
        let mode = inputs.config.mode;
        let layout = inputs.config.nftables_layout;
        // The peak is what is alive at once: the model and the proxy state while
        // rendering, the rendered form while it becomes text, the text while it is
        // parsed. So each is dropped as soon as the next exists (10k Services × 10
        // endpoints: 379 → see docs/benchmarks.md).
        drop(inputs);
        crate::memory::log_phase("proxy state");
        let text = match mode {
            Mode::Nftables if layout == NftablesLayout::Maps => {
                let tx = MapsRenderer::new(settings).render_full(&state);
                drop(state);
                crate::memory::release_free_memory();
                crate::nftables::text::transaction_into_text(tx)
            }
            Mode::Nftables => {
                let tx = NftRenderer::new(settings)
                    .render(&state, &NftRenderOptions::default())
                    .main;
                drop(state);
                crate::memory::release_free_memory();
                crate::nftables::text::transaction_into_text(tx)
            }
            Mode::Iptables => {
                let payload = Renderer::new(settings)
                    .render(
                        &state,
                        &RenderOptions {
                            full: true,
                            ..RenderOptions::default()
                        },
                    )
                    .payload;
                drop(state);
                // The jumps from the built-in chains that kube-proxy ensures outside its
                // restore payload, so that a dry run walks what a live node walks.
                with_builtin_jumps(&payload, pkt.from_node)
            }
        };
        crate::memory::release_free_memory();
        crate::memory::log_phase("rendered");
        (
            mode,
            parse_rules(mode, &text, family)?,
            RulesSource::Rendered,
        )
    };
    crate::memory::log_phase("parsed");
    let trace = trace_with(&rules, &pkt, &local);
    let report = TraceReport::new(mode.as_str(), source, &pkt, args.sport, &trace);
    if args.output == "json" {
        print!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// Adds kube-proxy's jump from nat PREROUTING/OUTPUT to KUBE-SERVICES (installed by
/// the applier, not part of the restore payload).
fn with_builtin_jumps(payload: &str, from_node: bool) -> String {
    let chain = if from_node { "OUTPUT" } else { "PREROUTING" };
    let mut out = String::with_capacity(payload.len() + 200);
    let mut in_nat = false;
    for line in payload.lines() {
        if line.starts_with('*') {
            in_nat = line == "*nat";
        }
        if in_nat && line == "COMMIT" {
            out.push_str(&format!(
                "-A {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
            ));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
