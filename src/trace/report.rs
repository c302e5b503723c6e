//! A trace as people read it (text) and as tools read it (JSON, schema
//! `docs/schema/trace.v1.json`). Pure formatting of a [`Trace`].

use serde::Serialize;

use super::core::{percent, Outcome, Packet, Step, StepKind, Trace};

/// The JSON schema identifier of [`TraceReport`].
pub const TRACE_SCHEMA: &str = "https://kproxy.dev/schema/trace.v1.json";

/// Where the traced rules came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RulesSource {
    /// Rendered from a cluster snapshot.
    Rendered,
    /// Read from a file.
    Ruleset,
    /// Read from the kernel of the current network namespace.
    Live,
}

/// A trace with its context, as printed by `kproxy trace -o json`.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport<'a> {
    /// Schema identifier (versioned).
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    /// `iptables` or `nftables`.
    pub mode: &'a str,
    /// Where the rules came from.
    pub source: RulesSource,
    /// The packet.
    pub packet: &'a Packet,
    /// The source port, when given (kube-proxy's rules never look at it).
    pub sport: Option<u16>,
    /// Every step, in order.
    pub steps: &'a [Step],
    /// How many rules could not be decided (assumed not taken).
    pub unknown_steps: usize,
    /// The final result.
    pub result: Outcome,
}

impl<'a> TraceReport<'a> {
    /// Wraps a trace.
    pub fn new(
        mode: &'a str,
        source: RulesSource,
        packet: &'a Packet,
        sport: Option<u16>,
        trace: &'a Trace,
    ) -> Self {
        TraceReport {
            schema: TRACE_SCHEMA,
            mode,
            source,
            packet,
            sport,
            steps: &trace.steps,
            unknown_steps: trace.unknown_steps().count(),
            result: trace.outcome(),
        }
    }

    /// Pretty JSON.
    pub fn json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The text form.
    pub fn text(&self) -> String {
        let p = self.packet;
        let sport = self.sport.map(|s| format!(":{s}")).unwrap_or_default();
        let mut out = format!(
            "packet: {} {}{sport} -> {} ({}), {} rules {}\n",
            p.proto,
            p.src,
            crate::model::join_host_port(&p.dst, p.dport),
            if p.from_node {
                "sent from the node"
            } else {
                "arriving at the node"
            },
            self.mode,
            match self.source {
                RulesSource::Rendered => "rendered from the snapshot",
                RulesSource::Ruleset => "read from the ruleset file",
                RulesSource::Live => "read from this network namespace",
            }
        );
        for s in self.steps {
            let indent = "  ".repeat(s.depth + 1);
            let prob = if s.probability < 0.999_999 {
                format!("({}) ", percent(s.probability))
            } else {
                String::new()
            };
            let marker = match s.kind {
                StepKind::Unknown => "? ",
                StepKind::Choice => "* ",
                StepKind::Note => "- ",
                StepKind::Rule => "",
            };
            out.push_str(&format!(
                "{indent}{marker}{prob}[{} {}] {}: {}\n{indent}    => {}\n",
                s.hook, s.table, s.chain, s.rule, s.verdict
            ));
        }
        match &self.result {
            Outcome::Delivered {
                endpoints,
                masquerade,
                masquerade_by,
            } => {
                if endpoints.len() == 1 {
                    out.push_str(&format!(
                        "result: delivered to {}\n",
                        endpoints[0].destination
                    ));
                } else {
                    out.push_str(&format!(
                        "result: delivered to one of {} endpoints (picked at random per connection):\n",
                        endpoints.len()
                    ));
                    for e in endpoints {
                        out.push_str(&format!(
                            "  {} {}\n",
                            e.destination,
                            percent(e.probability)
                        ));
                    }
                }
                match (masquerade, masquerade_by) {
                    (true, Some(by)) => out.push_str(&format!(
                        "masquerade: yes, marked by {}/{}: {} (the endpoint sees the node's address)\n",
                        by.table, by.chain, by.rule
                    )),
                    (true, None) => out.push_str(
                        "masquerade: yes (the endpoint sees the node's address)\n",
                    ),
                    (false, _) => out.push_str(&format!(
                        "masquerade: no, no rule on the path marked it (the endpoint sees {})\n",
                        p.src
                    )),
                }
            }
            Outcome::Accepted { rule } => {
                out.push_str(&format!("result: accepted on the node by {rule}\n"))
            }
            Outcome::Rejected { reason } => out.push_str(&format!("result: REJECT ({reason})\n")),
            Outcome::Dropped { reason } => out.push_str(&format!("result: DROP ({reason})\n")),
            Outcome::NotService => out.push_str(&format!(
                "result: not a service address: no {} rule changes the packet; it goes to {} as addressed\n",
                if self.mode == "nftables" { "kube-proxy table" } else { "kube-proxy" },
                crate::model::join_host_port(&p.dst, p.dport)
            )),
            Outcome::Unknown { reason } => {
                out.push_str(&format!("result: unknown ({reason})\n"))
            }
        }
        if self.unknown_steps > 0 {
            out.push_str(&format!(
                "note: {} rule(s) on the path could not be decided and were taken as not matching (marked ?)\n",
                self.unknown_steps
            ));
        }
        out
    }
}
