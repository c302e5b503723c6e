//! `kproxy explain [NAMESPACE/NAME[:PORT]]`: every way into a Service port, which
//! endpoints serve each and why, masquerading, affinity, source ranges and the rule
//! names, from a snapshot or from a running daemon (`--live`, its `/debug/state`).
//! Without a Service: one overview table of every Service port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::explain::{explain, mermaid, text, ExplainInputs, Explanation, ServiceFilter};

/// `kproxy explain` flags.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The Service (port) to explain: NAMESPACE/NAME or NAMESPACE/NAME:PORT (port name
    /// or number). Without it, every Service port in one table.
    pub service: Option<String>,
    #[command(flatten)]
    /// Cluster and node inputs.
    pub inputs: InputArgs,
    /// Ask the running daemon (its `/debug/state` on the metrics address) instead of
    /// reading a snapshot.
    #[arg(long)]
    pub live: bool,
    /// The daemon's metrics address, for `--live`.
    #[arg(long, default_value = "127.0.0.1:10249", value_name = "IP:PORT")]
    pub(crate) metrics_address: SocketAddr,
    /// Output format: text, json or mermaid.
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json", "mermaid"])]
    pub output: String,
}

/// One plain HTTP GET (the daemon's debug endpoint is HTTP/1.1 with Content-Length).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: no status code"))?;
    Ok((code, body.to_string()))
}

/// The daemon's explanation of every Service port (one per family).
fn live(addr: SocketAddr) -> Result<Vec<Explanation>, CliError> {
    let (code, body) = http_get(addr, "/debug/state").map_err(CliError::failed)?;
    match code {
        200 => {}
        404 => {
            return Err(CliError::failed(format!(
            "{addr}/debug/state: not found (is the daemon running with --debug-endpoints=false?)"
        )))
        }
        c => return Err(CliError::failed(format!("{addr}/debug/state: HTTP {c}"))),
    }
    #[derive(serde::Deserialize)]
    struct State {
        families: Vec<Explanation>,
    }
    let s: State = serde_json::from_str(&body)
        .map_err(|e| CliError::failed(format!("{addr}/debug/state: {e}")))?;
    Ok(s.families)
}

/// Explains every family of a snapshot.
pub(crate) fn from_inputs(inputs: &Inputs, filter: Option<&ServiceFilter>) -> Vec<Explanation> {
    inputs
        .families
        .iter()
        .map(|settings| {
            let proxy = inputs.state.proxy_state(settings.family, &inputs.node);
            explain(
                &ExplainInputs {
                    state: &inputs.state,
                    proxy: &proxy,
                    settings,
                    node: &inputs.node,
                },
                filter,
            )
        })
        .collect()
}

/// Runs `kproxy explain`.
pub fn run(args: &ExplainArgs) -> Result<(), CliError> {
    let filter = match &args.service {
        Some(s) => Some(ServiceFilter::parse(s).ok_or_else(|| {
            CliError::usage(format!(
                "{s:?} is not NAMESPACE/NAME or NAMESPACE/NAME:PORT"
            ))
        })?),
        None => None,
    };
    let mut all = if args.live {
        live(args.metrics_address)?
    } else {
        from_inputs(&Inputs::load(&args.inputs)?, None)
    };
    if let Some(f) = &filter {
        for e in &mut all {
            e.ports.retain(|p| f.matches_view(p));
        }
        if all.iter().all(|e| e.ports.is_empty()) {
            return Err(CliError::usage(format!(
                "no Service port {} in the {}",
                args.service.as_deref().unwrap_or_default(),
                if args.live {
                    "daemon's state"
                } else {
                    "snapshot"
                }
            )));
        }
        all.retain(|e| !e.ports.is_empty());
    }
    let out = match args.output.as_str() {
        "json" => {
            // One document: a single family as itself, several as a list.
            let v = if all.len() == 1 {
                serde_json::to_string_pretty(&all[0])
            } else {
                serde_json::to_string_pretty(&all)
            };
            v.map_err(|e| CliError::failed(e.to_string()))? + "\n"
        }
        "mermaid" => all
            .iter()
            .map(mermaid::flowchart)
            .collect::<Vec<_>>()
            .join("\n"),
        _ if filter.is_some() => all
            .iter()
            .map(text::detailed)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => all.iter().map(text::table).collect::<Vec<_>>().join("\n"),
    };
    print!("{out}");
    Ok(())
}
