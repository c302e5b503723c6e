//! A packet tracer over a `kube-proxy` nftables table, read from any of: kproxy's
//! dry-run `add …` lines (`nft -f` syntax), the kernel's block listing (`nft list
//! table` / `nft list ruleset`), or `nft -j` JSON (see [`super::nft_json`]).
//!
//! It follows upstream kube-proxy's nftables test tracer: the base chains of the
//! packet's hooks run in priority order (`filter-prerouting-pre-dnat`, `nat-prerouting`,
//! then `filter-forward` and `filter-input`; or the output chains for traffic from the
//! node itself); every branch of a `numgen` vmap is followed with its probability;
//! `jump mark-for-masquerade` (or an inline `mark set mark or …`) means "masqueraded";
//! `ct state new` is true; `fib … type local` is decided by the node's addresses; the
//! first DNAT target becomes the destination for the chains that run after DNAT.
//! Statements it does not know make the rule an explicit "unknown, not taken" step;
//! loops and bad DNAT targets end the trace as unknown; malformed lines are errors.

use std::collections::HashMap;
use std::net::IpAddr;

use super::core::{destination_ip, Walk};
pub use super::core::{Packet, Step, Trace, TraceError};
use eval::{Flow, Tracer};
pub(crate) use parse::parse_elements;
use parse::{parse_add_lines, parse_blocks};

mod eval;
mod maps;
mod parse;
#[cfg(test)]
mod tests;

/// One set or map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    /// Canonical key text (`10.0.0.1 . tcp . 80`).
    pub(crate) key: String,
    /// The verdict of a map element (`goto chain`, `drop`).
    pub(crate) value: Option<String>,
    /// The element's comment (kube-proxy puts the Service port there).
    pub(crate) comment: Option<String>,
}

/// A base chain's place in the packet path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseChain {
    pub(crate) hook: String,
    pub(crate) priority: i32,
    pub(crate) policy_drop: bool,
}

/// A parsed table: chains with their rules, and set/map elements.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// `ip kube-proxy`.
    pub(crate) name: String,
    pub(crate) chains: HashMap<String, Vec<Rule>>,
    pub(crate) base: HashMap<String, BaseChain>,
    /// Set or map name -> elements.
    pub(crate) elements: HashMap<String, Vec<Element>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) text: String,
    /// Each token's byte range in `text`. A 10k-Service table has ~150k rules of ~15
    /// tokens: one allocation per token cost ~200 MB, ranges cost 8 bytes each.
    spans: Box<[(u32, u32)]>,
}

impl Rule {
    pub(crate) fn new(tokens: Vec<String>) -> Rule {
        let mut text = String::with_capacity(tokens.iter().map(|t| t.len() + 1).sum());
        let mut spans = Vec::with_capacity(tokens.len());
        for t in &tokens {
            if !text.is_empty() {
                text.push(' ');
            }
            let start = text.len();
            text.push_str(t);
            spans.push((start as u32, t.len() as u32));
        }
        Rule {
            text,
            spans: spans.into_boxed_slice(),
        }
    }

    /// The rule's tokens, as [`parse::tokenize`] gave them (owned: a trace evaluates
    /// few rules).
    pub(crate) fn tokens(&self) -> Vec<String> {
        self.spans
            .iter()
            .map(|&(start, len)| self.text[start as usize..(start + len) as usize].to_string())
            .collect()
    }
}

impl Table {
    /// Parses a table in any of the three forms (detected from the text).
    pub fn parse(text: &str) -> Result<Table, TraceError> {
        Self::parse_for(text, None)
    }

    /// Parses the `kube-proxy` table of one family (`ip`, `ip6`) out of a listing that
    /// may hold several tables; `None` takes the first kube-proxy table.
    pub fn parse_for(text: &str, family: Option<&str>) -> Result<Table, TraceError> {
        let trimmed = text.trim_start();
        let tables = if trimmed.starts_with('{') {
            super::nft_json::parse(text)?
        } else if trimmed
            .lines()
            .find(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
            .is_some_and(|l| l.trim_start().starts_with("table "))
        {
            parse_blocks(text)?
        } else {
            vec![parse_add_lines(text)?]
        };
        let wanted = |t: &&Table| {
            let mut parts = t.name.split_whitespace();
            let fam = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default();
            let of_family = family.is_none_or(|f| f == fam || fam == "inet");
            (name == "kube-proxy" || name == crate::nftables::maps::TABLE) && of_family
        };
        // Upstream's table first when a ruleset holds both layouts.
        let upstream = |t: &&Table| wanted(t) && t.name.ends_with(" kube-proxy");
        if let Some(t) = tables
            .iter()
            .find(upstream)
            .or_else(|| tables.iter().find(wanted))
        {
            return Ok(t.clone());
        }
        match tables.len() {
            1 => Ok(tables.into_iter().next().unwrap_or_default()),
            0 => Err(TraceError::parse(0, "no table in the ruleset")),
            _ => Err(TraceError::parse(
                0,
                "no kube-proxy table of this family in the ruleset",
            )),
        }
    }

    fn add_rule(&mut self, chain: String, rule: Rule, front: bool) {
        let c = self.chains.entry(chain).or_default();
        if front {
            c.insert(0, rule);
        } else {
            c.push(rule);
        }
    }

    /// The base chains a packet passes, in order.
    fn entry_chains(&self, from_node: bool) -> Vec<(String, String)> {
        if self.base.is_empty() {
            // No hook information (a partial dump): kube-proxy's fixed chains.
            let names: &[(&str, &str)] = if from_node {
                &[
                    ("output", "filter-output-pre-dnat"),
                    ("output", "nat-output"),
                    ("output", "filter-output"),
                ]
            } else {
                &[
                    ("prerouting", "filter-prerouting-pre-dnat"),
                    ("prerouting", "nat-prerouting"),
                    ("forward", "filter-forward"),
                    ("input", "filter-input"),
                ]
            };
            return names
                .iter()
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect();
        }
        let hooks: &[&str] = if from_node {
            &["output"]
        } else {
            &["prerouting", "forward", "input"]
        };
        let mut out = Vec::new();
        for hook in hooks {
            let mut chains: Vec<(&String, &BaseChain)> =
                self.base.iter().filter(|(_, b)| b.hook == *hook).collect();
            chains.sort_by(|a, b| a.1.priority.cmp(&b.1.priority).then(a.0.cmp(b.0)));
            out.extend(
                chains
                    .into_iter()
                    .map(|(c, _)| (hook.to_string(), c.clone())),
            );
        }
        out
    }

    /// Traces one packet; `local_ips` decide `fib … type local`.
    pub fn trace(&self, pkt: &Packet, local_ips: &[IpAddr]) -> Trace {
        let table_label = if self.name.is_empty() {
            "ip kube-proxy".to_string()
        } else {
            self.name.clone()
        };
        let mut tr = Tracer {
            t: self,
            local: local_ips,
            walk: Walk::new(),
            mark: 0,
            via: None,
            after_dnat: false,
        };
        let mut pkt = pkt.clone();
        let mut dnat_seen = false;
        for (hook, chain) in self.entry_chains(pkt.from_node) {
            if tr.walk.halted() {
                break;
            }
            if !dnat_seen {
                if let Some(first) = tr.walk.out.endpoints.first() {
                    dnat_seen = true;
                    if let Some(ip) = destination_ip(&first.destination) {
                        pkt.dst = ip;
                    }
                }
            }
            tr.walk.at(&hook, &table_label);
            let flow = tr.run(&chain, &pkt);
            if flow != Flow::Stop
                && self.base.get(&chain).is_some_and(|b| b.policy_drop)
                && tr.walk.out.endpoints.is_empty()
            {
                tr.walk.stop(
                    &chain,
                    "policy drop",
                    "DROP",
                    format!("policy of base chain {chain}"),
                );
            }
        }
        if self.is_maps() {
            self.postrouting(&mut tr, &pkt, &table_label);
        }
        tr.walk.finish()
    }

    /// Whether this is the maps layout's table (`ip kproxy`).
    fn is_maps(&self) -> bool {
        self.name.split_whitespace().nth(1) == Some(crate::nftables::maps::TABLE)
    }

    /// The maps layout decides hairpin masquerade after DNAT, in postrouting (upstream
    /// marks it in the endpoint chain): one pass per DNAT destination, with that
    /// destination and the mark prerouting left, weighted by its probability.
    ///
    /// A drop or reject after DNAT does not skip it: like upstream's tracer (which
    /// sees the hairpin mark before the filter chains), the tracer keeps the original
    /// port after DNAT, so a later filter verdict is the tracer's, not the kernel's.
    fn postrouting(&self, tr: &mut Tracer<'_>, pkt: &Packet, label: &str) {
        if tr.walk.aborted() || tr.walk.out.endpoints.is_empty() {
            return;
        }
        let stopped = tr.walk.out.stopped.take();
        let mut chains: Vec<(&String, &BaseChain)> = self
            .base
            .iter()
            .filter(|(_, b)| b.hook == "postrouting")
            .collect();
        chains.sort_by(|a, b| a.1.priority.cmp(&b.1.priority).then(a.0.cmp(b.0)));
        let mark = tr.mark;
        tr.after_dnat = true;
        for ep in tr.walk.out.endpoints.clone() {
            let Some(ip) = destination_ip(&ep.destination) else {
                continue;
            };
            let mut q = pkt.clone();
            q.dst = ip;
            tr.mark = mark;
            tr.walk.at("postrouting", label);
            let saved = tr.walk.scale(ep.probability);
            for (chain, _) in &chains {
                if tr.run(chain, &q) == Flow::Stop || tr.walk.halted() {
                    break;
                }
            }
            tr.walk.restore(saved);
        }
        tr.after_dnat = false;
        if stopped.is_some() {
            tr.walk.out.stopped = stopped;
        }
    }
}
