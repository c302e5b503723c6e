//! `kproxy render`: the rules upstream kube-proxy would write, printed (dry run).

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::Mode;
use crate::config::NftablesLayout;
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::IpFamily;
use crate::nftables::maps::MapsRenderer;
use crate::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use crate::nftables::text::transaction_text;

/// `kproxy render` flags.
#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
}

/// Renders the full ruleset for every requested family as text.
pub fn render_text(inputs: &Inputs) -> Result<String, CliError> {
    let mut out = String::new();
    let several = inputs.families.len() > 1;
    for settings in &inputs.families {
        let state = inputs.state.proxy_state(settings.family, &inputs.node);
        if several {
            let tool = match (inputs.config.mode, settings.family) {
                (Mode::Iptables, IpFamily::V4) => "iptables-restore",
                (Mode::Iptables, IpFamily::V6) => "ip6tables-restore",
                (Mode::Nftables, _) => "nft -f",
            };
            out.push_str(&format!("# {} ({tool} input)\n", settings.family.label()));
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
                out.push_str(&rendered.payload);
            }
            Mode::Nftables if inputs.config.nftables_layout == NftablesLayout::Maps => {
                let r = MapsRenderer::new(settings.clone());
                out.push_str(&transaction_text(&r.render_full(&state)));
            }
            Mode::Nftables => {
                let r = NftRenderer::new(settings.clone());
                let rendered = r.render(&state, &NftRenderOptions::default());
                out.push_str(&transaction_text(&rendered.main));
            }
        }
    }
    Ok(out)
}

/// Runs `kproxy render`.
pub fn run(args: &RenderArgs) -> Result<(), CliError> {
    let inputs = Inputs::load(&args.inputs)?;
    let text = render_text(&inputs)?;
    print!("{text}");
    Ok(())
}
