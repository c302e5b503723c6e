//! A packet tracer over iptables rules (restore input or `iptables-save` output): which
//! rules a new connection hits, where it is DNATed to, whether it is masqueraded, and
//! whether the filter table rejects or drops it.
//!
//! It follows upstream kube-proxy's test tracer: nat PREROUTING (or OUTPUT for traffic
//! from the node itself) first; every endpoint a `statistic` rule could pick is
//! reported, in chain order; rules that depend on connection state (`recent --rcheck`,
//! `mark`, `ctstate`) never match; then filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
//! KUBE-NODEPORTS and KUBE-PROXY-FIREWALL see the (first) DNATed destination.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::iptables::normalize::words;
use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};

/// Why rules could not be traced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// The rules text does not parse.
    #[error("line {line}: {what}")]
    Parse {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        what: String,
    },
}

/// One rule, pre-split into the parts the tracer looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as written (`-A CHAIN …`).
    pub text: String,
    matches: Vec<Match>,
    target: Option<String>,
    to_destination: Option<String>,
    probabilistic: bool,
    never: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    Src(bool, IpNet),
    Dst(bool, IpNet),
    SrcLocal(bool),
    DstLocal(bool),
    Proto(bool, String),
    Dport(bool, u16),
}

/// Rules by table and chain.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    tables: HashMap<String, HashMap<String, Vec<Rule>>>,
}

/// A packet to trace: a new connection's first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One rule a packet matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The rule.
    pub rule: String,
}

/// What happened to a packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Verdicts and DNAT destinations, in order (upstream's tracer output).
    pub outputs: Vec<String>,
    /// Whether the packet was marked for masquerade.
    pub masquerade: bool,
    /// Every rule that matched, in order.
    pub steps: Vec<Step>,
}

impl Trace {
    /// Upstream's one-line form: outputs joined by `, `.
    pub fn output(&self) -> String {
        self.outputs.join(", ")
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        parse_cidr_sloppy(s)
    } else {
        parse_ip_sloppy(s).map(IpNet::from)
    }
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let w = words(text);
        let mut matches = Vec::new();
        let mut target = None;
        let mut to_destination = None;
        let mut probabilistic = false;
        let mut never = false;
        let mut negate = false;
        let mut i = 2; // skip "-A CHAIN"
        while i < w.len() {
            let word = w[i].as_str();
            let arg = w.get(i + 1).map(String::as_str);
            let mut take = |m: Option<Match>| -> Result<(), String> {
                match m {
                    Some(m) => {
                        matches.push(m);
                        Ok(())
                    }
                    None => Err(format!("bad argument for {word}: {arg:?}")),
                }
            };
            match word {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-s" | "--source" => take(arg.and_then(parse_net).map(|n| Match::Src(negate, n)))?,
                "-d" | "--destination" => {
                    take(arg.and_then(parse_net).map(|n| Match::Dst(negate, n)))?
                }
                "--src-type" => {
                    take(Some(Match::SrcLocal(negate)).filter(|_| arg == Some("LOCAL")))?
                }
                "--dst-type" => {
                    take(Some(Match::DstLocal(negate)).filter(|_| arg == Some("LOCAL")))?
                }
                "-p" | "--protocol" => take(arg.map(|p| Match::Proto(negate, p.to_lowercase())))?,
                "--dport" | "--destination-port" => take(
                    arg.and_then(|p| p.parse().ok())
                        .map(|p| Match::Dport(negate, p)),
                )?,
                "-j" | "--jump" | "-g" | "--goto" => target = arg.map(str::to_string),
                "--to-destination" => to_destination = arg.map(str::to_string),
                "--probability" => probabilistic = true,
                // Connection-state matches cannot be decided for a lone new packet.
                "--rcheck" | "--mark" | "--ctstate" => never = true,
                _ => {
                    negate = false;
                    i += 1;
                    continue;
                }
            }
            negate = false;
            i += 2;
        }
        Ok(Rule {
            text: text.to_string(),
            matches,
            target,
            to_destination,
            probabilistic,
            never,
        })
    }
}

impl Ruleset {
    /// Parses restore input or `iptables-save` output.
    pub fn parse(text: &str) -> Result<Ruleset, TraceError> {
        let mut rs = Ruleset::default();
        let mut table: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            }
            let err = |what: String| TraceError::Parse { line: n + 1, what };
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_string());
                rs.tables.entry(t.to_string()).or_default();
                continue;
            }
            let Some(t) = table.as_ref() else {
                return Err(err("rule outside a table".into()));
            };
            let chains = rs.tables.entry(t.clone()).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                chains.entry(name.to_string()).or_default();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or_default();
                let rule = Rule::parse(line).map_err(err)?;
                chains.entry(chain.to_string()).or_default().push(rule);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                chains.remove(chain.trim());
            } else {
                return Err(err(format!("unexpected line {line:?}")));
            }
        }
        Ok(rs)
    }

    /// Adds a rule to a chain (e.g. the jump from a built-in chain that kube-proxy
    /// installs outside the restore payload).
    pub fn append(&mut self, table: &str, chain: &str, rule_args: &str) -> Result<(), TraceError> {
        let text = format!("-A {chain} {rule_args}");
        let rule = Rule::parse(&text).map_err(|what| TraceError::Parse { line: 0, what })?;
        self.tables
            .entry(table.to_string())
            .or_default()
            .entry(chain.to_string())
            .or_default()
            .push(rule);
        Ok(())
    }

    fn has_rules(&self, table: &str, chain: &str) -> bool {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .is_some_and(|r| !r.is_empty())
    }

    /// Traces one packet. `local_ips` are the node's addresses (`addrtype LOCAL`).
    pub fn trace(&self, pkt: &Packet, local_ips: &[IpAddr]) -> Trace {
        let mut t = Tracer {
            rs: self,
            local: local_ips,
            out: Trace::default(),
            depth: 0,
        };
        let mut pkt = pkt.clone();
        let entry = if pkt.from_node {
            "OUTPUT"
        } else {
            "PREROUTING"
        };
        if self.has_rules("nat", entry) {
            t.run("nat", entry, &pkt);
        } else {
            // kube-proxy's jump from the built-in chain lives outside its payload.
            t.run("nat", "KUBE-SERVICES", &pkt);
        }
        // The filter chains see the DNATed destination. Upstream's tracer rewrites only
        // IPv4 destinations; its IPv6 expectations depend on that, so do the same.
        if let Some(first) = t.out.outputs.first() {
            if let Some(ip @ IpAddr::V4(_)) = destination_ip(first) {
                pkt.dst = ip;
            }
        }
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            t.run("filter", chain, &pkt);
        }
        t.out
    }
}

/// The IP of a `--to-destination` value (`1.2.3.4:80`, `[fd00::1]:80`).
fn destination_ip(dest: &str) -> Option<IpAddr> {
    if let Some(rest) = dest.strip_prefix('[') {
        return rest.split(']').next().and_then(|s| s.parse().ok());
    }
    dest.split(':').next().and_then(|s| s.parse().ok())
}

struct Tracer<'a> {
    rs: &'a Ruleset,
    local: &'a [IpAddr],
    out: Trace,
    depth: usize,
}

impl Tracer<'_> {
    fn matches(&self, r: &Rule, p: &Packet) -> bool {
        if r.never {
            return false;
        }
        r.matches.iter().all(|m| match m {
            Match::Src(neg, n) => n.contains(&p.src) != *neg,
            Match::Dst(neg, n) => n.contains(&p.dst) != *neg,
            Match::SrcLocal(neg) => self.local.contains(&p.src) != *neg,
            Match::DstLocal(neg) => self.local.contains(&p.dst) != *neg,
            Match::Proto(neg, proto) => (*proto == p.proto) != *neg,
            Match::Dport(neg, port) => (*port == p.dport) != *neg,
        })
    }

    /// Walks a chain; returns whether it ended in a terminal verdict.
    fn run(&mut self, table: &str, chain: &str, p: &Packet) -> bool {
        // Loops cannot happen in valid iptables rules; the bound guards hand-made input.
        if self.depth > 64 {
            return false;
        }
        let Some(rules) = self.rs.tables.get(table).and_then(|t| t.get(chain)) else {
            return false;
        };
        for r in rules {
            let Some(target) = r.target.as_deref() else {
                continue;
            };
            if !self.matches(r, p) {
                continue;
            }
            self.out.steps.push(Step {
                table: table.to_string(),
                chain: chain.to_string(),
                rule: r.text.clone(),
            });
            match target {
                "KUBE-MARK-MASQ" => self.out.masquerade = true,
                "ACCEPT" | "REJECT" | "DROP" => {
                    self.out.outputs.push(target.to_string());
                    return true;
                }
                "DNAT" => {
                    self.out
                        .outputs
                        .push(r.to_destination.clone().unwrap_or_default());
                    return true;
                }
                "RETURN" => return false,
                "MARK" | "MASQUERADE" | "SNAT" => {}
                next => {
                    self.depth += 1;
                    let ended = self.run(table, next, p);
                    self.depth -= 1;
                    // Every endpoint a random pick could reach is reported: only a
                    // certain jump ends the chain.
                    if ended && !r.probabilistic {
                        return true;
                    }
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
-A KUBE-SERVICES -m comment --comment \"a cluster IP\" -m tcp -p tcp -d 172.30.0.1 --dport 80 -j KUBE-SVC-A\n\
-A KUBE-SVC-A -m tcp -p tcp -d 172.30.0.1 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n\
-A KUBE-SVC-A -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-1\n\
-A KUBE-SVC-A -j KUBE-SEP-2\n\
-A KUBE-SEP-1 -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:8080\n\
-A KUBE-SEP-2 -m tcp -p tcp -j DNAT --to-destination 10.1.0.2:8080\n\
COMMIT\n";

    fn pkt(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dport,
            proto: "tcp".into(),
            from_node: false,
        }
    }

    #[test]
    fn spreads_and_masquerades() {
        let rs = Ruleset::parse(RULES).unwrap();
        let t = rs.trace(&pkt("10.0.0.5", "172.30.0.1", 80), &[]);
        assert_eq!(t.output(), "10.1.0.1:8080, 10.1.0.2:8080");
        assert!(!t.masquerade);
        let t = rs.trace(&pkt("192.168.5.5", "172.30.0.1", 80), &[]);
        assert!(t.masquerade);
        let t = rs.trace(&pkt("10.0.0.5", "172.30.0.1", 81), &[]);
        assert_eq!(t.output(), "");
        assert!(t.steps.is_empty());
    }

    #[test]
    fn destination_ips() {
        assert_eq!(
            destination_ip("1.2.3.4:80"),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(
            destination_ip("[fd00::1]:80"),
            Some("fd00::1".parse().unwrap())
        );
    }
}
