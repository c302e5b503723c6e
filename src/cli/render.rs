//! `kproxy render`: the rules upstream kube-proxy would write, printed (dry run).

use std::io::Write;

use clap::Args;
use serde::Serialize;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::Mode;
use crate::config::NftablesLayout;
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::IpFamily;
use crate::nftables::maps::MapsRenderer;
use crate::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use crate::nftables::text::op_line;

/// `kproxy render` flags.
#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
    /// Output format: text (restore / `nft -f` input) or json (the same, as data;
    /// schema docs/schema/render.v1.json).
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// The JSON schema identifier of `render -o json`.
pub(crate) const RENDER_SCHEMA: &str = "https://kproxy.dev/schema/render.v1.json";

/// `render -o json`: one entry per family.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RenderJson {
    /// Schema identifier (versioned).
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    /// `iptables` or `nftables`.
    pub mode: &'static str,
    /// One per family, IPv4 first.
    pub families: Vec<FamilyJson>,
}

/// One family's rules as data.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FamilyJson {
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    /// iptables: the restore input by table and chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<TableJson>>,
    /// nftables: the transaction's operations, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction: Option<TransactionJson>,
}

/// One iptables table of the restore input.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TableJson {
    /// `nat`, `filter`.
    pub table: String,
    /// Chains in declaration order, with their rules.
    pub chains: Vec<ChainJson>,
    /// `-X CHAIN` lines (chains deleted).
    pub deleted_chains: Vec<String>,
}

/// One iptables chain.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChainJson {
    /// Name.
    pub name: String,
    /// `-A` lines, in order.
    pub rules: Vec<String>,
}

/// An nftables transaction.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TransactionJson {
    /// `ip`, `ip6`.
    pub(crate) table_family: &'static str,
    /// Table name.
    pub table: String,
    /// Operations in order.
    pub ops: Vec<OpJson>,
}

/// One nftables operation.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct OpJson {
    /// `add`, `delete`, `flush`.
    pub verb: &'static str,
    /// `table`, `chain`, `rule`, `set`, `map`, `element`.
    pub object: &'static str,
    /// The chain, set or map it is about (the table for table ops).
    pub name: String,
    /// The operation in `nft -f` syntax.
    pub text: String,
}

fn restore_tables(payload: &str) -> Vec<TableJson> {
    let mut out: Vec<TableJson> = Vec::new();
    for line in payload.lines() {
        if let Some(t) = line.strip_prefix('*') {
            out.push(TableJson {
                table: t.to_string(),
                chains: Vec::new(),
                deleted_chains: Vec::new(),
            });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            if !t.chains.iter().any(|c| c.name == name) {
                t.chains.push(ChainJson {
                    name,
                    rules: Vec::new(),
                });
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            match t.chains.iter_mut().find(|c| c.name == name) {
                Some(c) => c.rules.push(line.to_string()),
                None => t.chains.push(ChainJson {
                    name: name.to_string(),
                    rules: vec![line.to_string()],
                }),
            }
        } else if let Some(name) = line.strip_prefix("-X ") {
            t.deleted_chains.push(name.trim().to_string());
        }
    }
    out
}

fn transaction_json(tx: &crate::nftables::transaction::Transaction) -> TransactionJson {
    use crate::nftables::transaction::Op;
    let ops = tx
        .ops
        .iter()
        .map(|op| {
            let (verb, object, name) = match op {
                Op::AddTable { .. } => ("add", "table", tx.table.clone()),
                Op::DeleteTable => ("delete", "table", tx.table.clone()),
                Op::AddChain(c) => ("add", "chain", c.name.clone()),
                Op::FlushChain(n) => ("flush", "chain", n.clone()),
                Op::DeleteChain(n) => ("delete", "chain", n.clone()),
                Op::AddRule(r) => ("add", "rule", r.chain.clone()),
                Op::AddSet(s) => ("add", if s.is_map { "map" } else { "set" }, s.name.clone()),
                Op::FlushSet { name, is_map } => {
                    ("flush", if *is_map { "map" } else { "set" }, name.clone())
                }
                Op::DeleteSet { name, is_map } => {
                    ("delete", if *is_map { "map" } else { "set" }, name.clone())
                }
                Op::AddElement(e) => ("add", "element", e.set.clone()),
                Op::DeleteElement(e) => ("delete", "element", e.set.clone()),
            };
            OpJson {
                verb,
                object,
                name,
                text: op_line(tx.family, &tx.table, op),
            }
        })
        .collect();
    TransactionJson {
        table_family: tx.family.as_str(),
        table: tx.table.clone(),
        ops,
    }
}

/// Renders the full ruleset for every requested family as data.
pub(crate) fn render_json(inputs: &Inputs) -> RenderJson {
    let families = inputs
        .families
        .iter()
        .map(|settings| {
            let state = inputs.state.proxy_state(settings.family, &inputs.node);
            match inputs.config.mode {
                Mode::Iptables => {
                    let rendered = Renderer::new(settings.clone()).render(
                        &state,
                        &RenderOptions {
                            full: true,
                            ..RenderOptions::default()
                        },
                    );
                    FamilyJson {
                        family: settings.family.label(),
                        tables: Some(restore_tables(&rendered.payload)),
                        transaction: None,
                    }
                }
                Mode::Nftables => {
                    let rendered = NftRenderer::new(settings.clone())
                        .render(&state, &NftRenderOptions::default());
                    FamilyJson {
                        family: settings.family.label(),
                        tables: None,
                        transaction: Some(transaction_json(&rendered.main)),
                    }
                }
            }
        })
        .collect();
    RenderJson {
        schema: RENDER_SCHEMA,
        mode: inputs.config.mode.as_str(),
        families,
    }
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
pub(crate) fn write_rendered(inputs: &Inputs, w: &mut impl Write) -> Result<(), CliError> {
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
            Mode::Nftables if inputs.config.nftables_layout == NftablesLayout::Maps => {
                let r = MapsRenderer::new(settings.clone());
                let tx = r.render_full(&state);
                for op in &tx.ops {
                    writeln!(w, "{}", op_line(tx.family, &tx.table, op)).map_err(io)?;
                }
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
    if args.output == "json" {
        let doc = serde_json::to_string_pretty(&render_json(&inputs))
            .map_err(|e| CliError::failed(e.to_string()))?;
        println!("{doc}");
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    write_rendered(&inputs, &mut w)?;
    w.flush()
        .map_err(|e| CliError::failed(format!("writing the rules: {e}")))
}
