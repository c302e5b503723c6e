//! What both tracers share: the packet, the steps of a walk, the result, and the walk's
//! bookkeeping (call stack and loop detection, branch probabilities, DNAT destinations,
//! masquerade marking, terminal verdicts). The iptables and nftables tracers only parse
//! their syntax and decide single matches; everything they report goes through
//! [`Walk`], so both modes describe the same packet the same way.

use std::net::IpAddr;

use serde::Serialize;

use crate::model::ip::parse_ip_sloppy;

/// Why rules could not be traced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// The rules text does not parse.
    #[error("line {line}: {what}")]
    Parse {
        /// 1-based line (0: not from a file).
        line: usize,
        /// What is wrong.
        what: String,
    },
}

impl TraceError {
    pub(crate) fn parse(line: usize, what: impl Into<String>) -> TraceError {
        TraceError::Parse {
            line,
            what: what.into(),
        }
    }
}

/// A packet to trace: a new connection's first packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// `tcp`, `udp` or `sctp`.
    pub proto: String,
    /// Sent by a process on the node itself (nat OUTPUT instead of PREROUTING).
    pub from_node: bool,
}

/// What kind of step a walk recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A rule matched and its verdict was taken.
    Rule,
    /// A random choice between branches (each branch's steps follow, with their
    /// probability).
    Choice,
    /// A rule the tracer cannot decide (ipset, unknown statement, loop): not taken.
    Unknown,
    /// A rule that does not match this packet but matters for others (session
    /// affinity: a returning client).
    Note,
}

/// One rule a packet matched (or could not be decided).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The netfilter hook the walk runs in (`prerouting`, `output`, `input`, `forward`).
    pub hook: String,
    /// Table (`nat`, `filter`, or `ip kube-proxy`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The rule as text.
    pub rule: String,
    /// What the rule did: `jump X`, `DNAT to A:P`, `REJECT`, `mark for masquerade`, …
    pub verdict: String,
    /// The kind of step.
    pub kind: StepKind,
    /// The probability that a connection takes this step (1 outside random choices).
    pub probability: f64,
    /// Nesting: 0 for the hook's base chain, +1 per jump.
    pub depth: usize,
}

/// One destination a connection can be DNATed to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// `IP:port` (`[IPv6]:port`).
    pub destination: String,
    /// The chance that a new connection goes there.
    pub probability: f64,
}

/// Why a connection is masqueraded: the rule that marked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasqueradeReason {
    /// Table.
    pub table: String,
    /// Chain of the marking rule.
    pub chain: String,
    /// The rule.
    pub rule: String,
}

/// The final result of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// DNATed to one of these endpoints.
    Delivered {
        /// Every endpoint a new connection can reach, with its probability.
        endpoints: Vec<Delivery>,
        /// Whether the source is rewritten to the node's address.
        masquerade: bool,
        /// The rule that marked it for masquerade, if one did.
        masquerade_by: Option<MasqueradeReason>,
    },
    /// A rule accepted the packet without DNAT (e.g. a health-check node port).
    Accepted {
        /// The accepting rule.
        rule: String,
    },
    /// Rejected (ICMP error / TCP reset to the client).
    Rejected {
        /// Why, from the rule's comment or chain.
        reason: String,
    },
    /// Silently dropped.
    Dropped {
        /// Why, from the rule's comment or chain.
        reason: String,
    },
    /// No kube-proxy rule changes the packet: it is routed as addressed.
    NotService,
    /// The rules cannot be traced to an answer (a loop, an unknown statement on the
    /// path).
    Unknown {
        /// What stopped the trace.
        reason: String,
    },
}

/// What happened to a packet.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Trace {
    /// Verdicts and DNAT destinations, in order (upstream's tracer output).
    pub outputs: Vec<String>,
    /// Whether the packet was marked for masquerade.
    pub masquerade: bool,
    /// The first rule that marked it for masquerade.
    pub masquerade_by: Option<MasqueradeReason>,
    /// Every rule that matched, in order (random branches one after another).
    pub steps: Vec<Step>,
    /// DNAT destinations with their probabilities.
    pub endpoints: Vec<Delivery>,
    /// drop or reject, with its reason.
    pub stopped: Option<(String, String)>,
    /// An accepting rule without DNAT.
    pub accepted: Option<String>,
    /// What made the trace give up (loop, unknown statement, bad target).
    pub aborted: Option<String>,
}

impl Trace {
    /// Upstream's one-line form: outputs joined by `, `.
    pub fn output(&self) -> String {
        self.outputs.join(", ")
    }

    /// The final result.
    pub fn outcome(&self) -> Outcome {
        if let Some(reason) = &self.aborted {
            return Outcome::Unknown {
                reason: reason.clone(),
            };
        }
        if let Some((verdict, reason)) = &self.stopped {
            // A random choice may send some connections on and reject others; the
            // delivered endpoints are then listed, the reject noted as a step.
            if self.endpoints.is_empty() {
                return if verdict == "DROP" {
                    Outcome::Dropped {
                        reason: reason.clone(),
                    }
                } else {
                    Outcome::Rejected {
                        reason: reason.clone(),
                    }
                };
            }
        }
        if !self.endpoints.is_empty() {
            return Outcome::Delivered {
                endpoints: self
                    .endpoints
                    .iter()
                    .map(|d| Delivery {
                        destination: d.destination.clone(),
                        probability: round6(d.probability),
                    })
                    .collect(),
                masquerade: self.masquerade,
                masquerade_by: self.masquerade_by.clone(),
            };
        }
        if let Some(rule) = &self.accepted {
            return Outcome::Accepted { rule: rule.clone() };
        }
        Outcome::NotService
    }

    /// Rules that could not be decided (assumed not taken).
    pub fn unknown_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.kind == StepKind::Unknown)
    }
}

/// The IP of a DNAT target (`1.2.3.4:80`, `[fd00::1]:80`, `fd00::1`, `1.2.3.4`).
pub fn destination_ip(dest: &str) -> Option<IpAddr> {
    split_destination(dest).map(|(ip, _)| ip)
}

/// Splits and validates a DNAT target: a valid address and, when given, a port in
/// 1..=65535. `None` for anything else (`999.1.1.1:99999`).
pub fn split_destination(dest: &str) -> Option<(IpAddr, Option<u16>)> {
    let (ip, port) = if let Some(rest) = dest.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        match after {
            "" => (ip, None),
            p => (ip, Some(p.strip_prefix(':')?)),
        }
    } else if dest.matches(':').count() == 1 {
        let (ip, p) = dest.split_once(':')?;
        (ip, Some(p))
    } else {
        (dest, None)
    };
    let ip = parse_ip_sloppy(ip)?;
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return None,
        },
    };
    Some((ip, port))
}

/// A line for an error message: at most 120 characters (a one-line 40 KB JSON
/// document must not be repeated back).
pub(crate) fn excerpt(line: &str) -> String {
    if line.chars().count() <= 120 {
        return format!("{line:?}");
    }
    let cut: String = line.chars().take(120).collect();
    format!("{cut:?}…")
}

/// Probabilities to six decimals: iptables-save prints the kernel's 32-bit fraction
/// (0.33333333349) where the renderer wrote 0.3333333333; both are 33.3333%.
pub fn round6(p: f64) -> f64 {
    (p * 1e6).round() / 1e6
}

/// Formats a probability as a percentage with one decimal.
pub fn percent(p: f64) -> String {
    format!("{:.1}%", p * 100.0)
}

/// "3 endpoints, 33.3% each" or "2 branches: 25.0%, 75.0%".
pub fn describe_choice(probabilities: &[f64], noun: &str) -> String {
    let n = probabilities.len();
    let first = probabilities.first().copied().unwrap_or(0.0);
    let noun = if n == 1 {
        noun.strip_suffix('s').unwrap_or(noun)
    } else {
        noun
    };
    if n == 1 {
        format!("1 {noun}, {}", percent(first))
    } else if probabilities.iter().all(|p| (p - first).abs() < 1e-6) {
        format!("{n} {noun}, {} each", percent(first))
    } else {
        format!(
            "{n} {noun}: {}",
            probabilities
                .iter()
                .map(|p| percent(*p))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The deepest chain nesting a walk follows; real rulesets stay far below.
const MAX_DEPTH: usize = 64;

/// The bookkeeping of one walk through a ruleset.
pub(crate) struct Walk {
    pub(crate) out: Trace,
    hook: String,
    table: String,
    /// Chains being evaluated, outermost first (a jump into one of them is a loop).
    stack: Vec<String>,
    /// The probability of the branch being walked.
    weight: f64,
}

impl Walk {
    pub(crate) fn new() -> Walk {
        Walk {
            out: Trace::default(),
            hook: String::new(),
            table: String::new(),
            stack: Vec::new(),
            weight: 1.0,
        }
    }

    /// Starts (or continues in) a hook and table.
    pub(crate) fn at(&mut self, hook: &str, table: &str) {
        self.hook = hook.to_string();
        self.table = table.to_string();
    }

    /// Whether the walk has already ended the packet (drop, reject) or given up.
    pub(crate) fn halted(&self) -> bool {
        self.out.aborted.is_some() || self.out.stopped.is_some()
    }

    pub(crate) fn aborted(&self) -> bool {
        self.out.aborted.is_some()
    }

    /// Enters a chain; false (and the trace aborted) on a loop or runaway nesting.
    pub(crate) fn enter(&mut self, chain: &str) -> bool {
        if self.aborted() {
            return false;
        }
        if self.stack.iter().any(|c| c == chain) {
            let path = self
                .stack
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(chain))
                .collect::<Vec<_>>()
                .join(" -> ");
            self.abort(format!("jump loop: {path}"));
            return false;
        }
        if self.stack.len() >= MAX_DEPTH {
            self.abort(format!("chains nest deeper than {MAX_DEPTH} at {chain}"));
            return false;
        }
        self.stack.push(chain.to_string());
        true
    }

    pub(crate) fn leave(&mut self) {
        self.stack.pop();
    }

    /// Gives up: the answer would be a guess.
    pub(crate) fn abort(&mut self, reason: String) {
        if self.out.aborted.is_none() {
            self.push(
                self.stack.last().cloned().unwrap_or_default(),
                String::new(),
                format!("unknown: {reason}"),
                StepKind::Unknown,
            );
            self.out.aborted = Some(reason);
        }
    }

    fn push(&mut self, chain: String, rule: String, verdict: String, kind: StepKind) {
        self.out.steps.push(Step {
            hook: self.hook.clone(),
            table: self.table.clone(),
            chain,
            rule,
            verdict,
            kind,
            probability: round6(self.weight),
            depth: self.stack.len().saturating_sub(1),
        });
    }

    /// Records a matched rule.
    pub(crate) fn step(&mut self, chain: &str, rule: &str, verdict: impl Into<String>) {
        self.push(
            chain.to_string(),
            rule.to_string(),
            verdict.into(),
            StepKind::Rule,
        );
    }

    /// Records a rule that cannot be decided; it is treated as not taken.
    pub(crate) fn unknown(&mut self, chain: &str, rule: &str, why: &str) {
        self.push(
            chain.to_string(),
            rule.to_string(),
            format!("unknown, not taken: {why}"),
            StepKind::Unknown,
        );
    }

    /// Records a rule that is not taken by this packet but explains others.
    pub(crate) fn note(&mut self, chain: &str, rule: &str, what: String) {
        self.push(chain.to_string(), rule.to_string(), what, StepKind::Note);
    }

    /// Records a random choice between branches with these probabilities (relative
    /// to reaching the rule).
    pub(crate) fn choice(&mut self, chain: &str, rule: &str, probabilities: &[f64], noun: &str) {
        let abs: Vec<f64> = probabilities.iter().map(|p| p * self.weight).collect();
        self.push(
            chain.to_string(),
            rule.to_string(),
            format!("random choice: {}", describe_choice(&abs, noun)),
            StepKind::Choice,
        );
    }

    /// Multiplies the branch probability by `p`; returns what [`Walk::restore`] needs.
    pub(crate) fn scale(&mut self, p: f64) -> f64 {
        let saved = self.weight;
        self.weight *= p;
        saved
    }

    pub(crate) fn restore(&mut self, saved: f64) {
        self.weight = saved;
    }

    /// The packet is marked for masquerade by this rule.
    pub(crate) fn masquerade(&mut self, chain: &str, rule: &str) {
        self.out.masquerade = true;
        if self.out.masquerade_by.is_none() {
            self.out.masquerade_by = Some(MasqueradeReason {
                table: self.table.clone(),
                chain: chain.to_string(),
                rule: rule.to_string(),
            });
        }
    }

    /// A DNAT to `dest`; a target that is not `IP[:port]` aborts the trace.
    pub(crate) fn dnat(&mut self, chain: &str, rule: &str, dest: &str) -> bool {
        if split_destination(dest).is_none() {
            self.abort(format!("bad DNAT target {dest:?} in {chain}"));
            return false;
        }
        self.step(chain, rule, format!("DNAT to {dest}"));
        self.out.outputs.push(dest.to_string());
        if let Some(d) = self
            .out
            .endpoints
            .iter_mut()
            .find(|d| d.destination == dest)
        {
            d.probability += self.weight;
        } else {
            self.out.endpoints.push(Delivery {
                destination: dest.to_string(),
                probability: self.weight,
            });
        }
        true
    }

    /// drop or reject with a reason.
    pub(crate) fn stop(&mut self, chain: &str, rule: &str, verdict: &str, reason: String) {
        self.step(chain, rule, verdict);
        self.out.outputs.push(verdict.to_string());
        if self.out.stopped.is_none() {
            self.out.stopped = Some((verdict.to_string(), reason));
        }
    }

    /// accept without DNAT.
    pub(crate) fn accept(&mut self, chain: &str, rule: &str, upstream_output: bool) {
        self.step(chain, rule, "ACCEPT");
        if upstream_output {
            self.out.outputs.push("ACCEPT".to_string());
        }
        if self.out.accepted.is_none() && self.out.endpoints.is_empty() {
            self.out.accepted = Some(rule.to_string());
        }
    }

    pub(crate) fn finish(self) -> Trace {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            destination_ip("1.2.3.4:80"),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(
            destination_ip("[fd00::1]:80"),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(destination_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(split_destination("999.1.1.1:99"), None);
        assert_eq!(split_destination("1.1.1.1:99999"), None);
        assert_eq!(split_destination("1.1.1.1:0"), None);
        assert_eq!(split_destination("[fd00::1]80"), None);
    }

    #[test]
    fn choices() {
        assert_eq!(
            describe_choice(&[1.0 / 3.0; 3], "endpoints"),
            "3 endpoints, 33.3% each"
        );
        assert_eq!(
            describe_choice(&[0.25, 0.75], "branches"),
            "2 branches: 25.0%, 75.0%"
        );
        assert_eq!(describe_choice(&[1.0], "endpoints"), "1 endpoint, 100.0%");
    }

    #[test]
    fn loops_abort() {
        let mut w = Walk::new();
        assert!(w.enter("a"));
        assert!(w.enter("b"));
        assert!(!w.enter("a"));
        let t = w.finish();
        assert_eq!(
            t.outcome(),
            Outcome::Unknown {
                reason: "jump loop: a -> b -> a".into()
            }
        );
    }
}
