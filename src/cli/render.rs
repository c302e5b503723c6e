//! `kproxy render`: the rules upstream kube-proxy would write, printed (dry run).

use std::io::Write;

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::Mode;
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::IpFamily;
use crate::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use crate::nftables::text::op_line;

/// `kproxy render` flags.
#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
}

/// Renders the full ruleset for every requested family as text.
pub fn render_text(inputs: &Inputs) -> Result<String, CliError> {
    let mut out = Vec::new();
    write_rendered(inputs, &mut out)?;
    String::from_utf8(out).map_err(|e| CliError::failed(format!("rendered text: {e}")))
}

/// Writes the full ruleset for every requested family, one family at a time and (in
/// nftables mode) one operation at a time: a 10k-Service ruleset is tens of megabytes,
/// and holding it as one string beside the transaction was a good part of the peak.
pub fn write_rendered(inputs: &Inputs, w: &mut impl Write) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::failed(format!("writing the rules: {e}"));
    let several = inputs.families.len() > 1;
    for settings in &inputs.families {
        let state = inputs.state.proxy_state(settings.family, &inputs.node);
        if several {
            let tool = match (inputs.config.mode, settings.family) {
                (Mode::Iptables, IpFamily::V4) => "iptables-restore",
                (Mode::Iptables, IpFamily::V6) => "ip6tables-restore",
                (Mode::Nftables, _) => "nft -f",
            };
            writeln!(w, "# {} ({tool} input)", settings.family.label()).map_err(io)?;
        }
        match inputs.config.mode {
            Mode::Iptables => {
                let r = Renderer::new(settings.clone());
                let rendered = r.render(
                    &state,
                    &RenderOptions {
                        full: true,
                        ..RenderOptions::default()
                    },
                );
                w.write_all(rendered.payload.as_bytes()).map_err(io)?;
            }
            Mode::Nftables => {
                let r = NftRenderer::new(settings.clone());
                let rendered = r.render(&state, &NftRenderOptions::default());
                let tx = &rendered.main;
                for op in &tx.ops {
                    writeln!(w, "{}", op_line(tx.family, &tx.table, op)).map_err(io)?;
                }
            }
        }
    }
    Ok(())
}

/// Runs `kproxy render`.
pub fn run(args: &RenderArgs) -> Result<(), CliError> {
    let inputs = Inputs::load(&args.inputs)?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    write_rendered(&inputs, &mut w)?;
    w.flush()
        .map_err(|e| CliError::failed(format!("writing the rules: {e}")))
}
