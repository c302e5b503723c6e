//! `kproxy trace`: explain where a new connection goes through the rules kproxy would
//! write (or through a saved `iptables-save` dump): every rule it hits, the endpoints it
//! can be DNATed to, whether it is masqueraded, and whether it is dropped or rejected.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::Mode;
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::IpFamily;
use crate::trace::iptables::{Packet, Ruleset, Trace};

/// `kproxy trace` flags.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    /// Cluster and node inputs (the rules are rendered from them).
    pub inputs: InputArgs,
    /// Trace through this saved ruleset (`iptables-save` output) instead of rendering.
    #[arg(long, value_name = "FILE")]
    pub ruleset: Option<PathBuf>,
    /// Source address of the packet.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination address of the packet.
    #[arg(long)]
    pub dst: IpAddr,
    /// Destination port.
    #[arg(long)]
    pub dport: u16,
    /// Protocol: tcp, udp or sctp.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// The packet is sent by a process on the node itself.
    #[arg(long)]
    pub from_node: bool,
}

/// Formats a trace for people.
pub fn explain(pkt: &Packet, t: &Trace) -> String {
    let mut out = format!(
        "packet: {} {} -> {}:{} ({})\n",
        pkt.proto,
        pkt.src,
        pkt.dst,
        pkt.dport,
        if pkt.from_node {
            "sent from the node"
        } else {
            "arriving at the node"
        }
    );
    if t.steps.is_empty() {
        out.push_str("no kube-proxy rule matches: the packet is not a service packet\n");
        return out;
    }
    for s in &t.steps {
        out.push_str(&format!("  {}/{}: {}\n", s.table, s.chain, s.rule));
    }
    let dnat: Vec<&String> = t
        .outputs
        .iter()
        .filter(|o| !matches!(o.as_str(), "ACCEPT" | "DROP" | "REJECT"))
        .collect();
    let verdict = t
        .outputs
        .iter()
        .find(|o| matches!(o.as_str(), "ACCEPT" | "DROP" | "REJECT"));
    match dnat.len() {
        0 => {}
        1 => out.push_str(&format!("DNAT to {}\n", dnat[0])),
        n => out.push_str(&format!(
            "DNAT to one of {n} endpoints (picked at random per connection): {}\n",
            dnat.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    match verdict.map(String::as_str) {
        Some("REJECT") => out.push_str("filter: REJECT (the service has no usable endpoints)\n"),
        Some("DROP") => out.push_str("filter: DROP\n"),
        Some(v) => out.push_str(&format!("filter: {v}\n")),
        None => {}
    }
    out.push_str(if t.masquerade {
        "masquerade: yes (source NATed to the node's address on the way out)\n"
    } else {
        "masquerade: no (the endpoint sees the client's address)\n"
    });
    out
}

/// Runs `kproxy trace`.
pub fn run(args: &TraceArgs) -> Result<(), CliError> {
    let inputs = Inputs::load(&args.inputs)?;
    let family = IpFamily::of(&args.dst);
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
    if inputs.config.mode != Mode::Iptables {
        return Err(CliError::usage(
            "kproxy trace explains iptables rules; use --mode iptables",
        ));
    }
    let text = match &args.ruleset {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("reading {}: {e}", path.display())))?,
        None => {
            let state = inputs.state.proxy_state(family, &inputs.node);
            Renderer::new(settings.clone())
                .render(
                    &state,
                    &RenderOptions {
                        full: true,
                        ..RenderOptions::default()
                    },
                )
                .payload
        }
    };
    let rs = Ruleset::parse(&text).map_err(|e| CliError::usage(format!("ruleset: {e}")))?;
    let mut local: Vec<IpAddr> = args
        .inputs
        .local_addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    if let Some(n) = inputs.state.node() {
        local.extend(n.internal_ips.iter().chain(n.external_ips.iter()).copied());
    }
    local.push(IpAddr::from([127, 0, 0, 1]));
    local.push("::1".parse().map_err(|_| CliError::failed("::1"))?);
    let pkt = Packet {
        src: args.src,
        dst: args.dst,
        dport: args.dport,
        proto: args.proto.to_lowercase(),
        from_node: args.from_node,
    };
    print!("{}", explain(&pkt, &rs.trace(&pkt, &local)));
    Ok(())
}
