//! A packet tracer over iptables rules (restore input or the `iptables-save` output of a
//! real host, other programs' chains included): which rules a new connection hits,
//! where it is DNATed to and with what probability, whether it is masqueraded and by
//! which rule, and whether the filter table rejects or drops it.
//!
//! It follows upstream kube-proxy's test tracer: nat PREROUTING (or OUTPUT for traffic
//! from the node itself) first; every endpoint a `statistic` rule could pick is
//! reported, in chain order, with its probability; affinity checks (`recent --rcheck`)
//! never match (a new client); then filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
//! KUBE-NODEPORTS and KUBE-PROXY-FIREWALL see the (first) DNATed destination.
//! Matches it cannot decide for a lone packet (ipset, interfaces, owner, …) make the
//! rule an explicit "unknown, not taken" step; bad numbers and unterminated quotes are
//! parse errors.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::core::{destination_ip, excerpt, split_destination, Walk};
pub use super::core::{Packet, Step, Trace, TraceError};
use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};

/// One rule, pre-split into the parts the tracer looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule as written (`-A CHAIN …`).
    pub text: String,
    matches: Vec<Match>,
    target: Option<Target>,
    /// `--probability` of a `statistic --mode random` match.
    probability: Option<f64>,
    /// Why this rule cannot be decided (it is then never taken).
    unknown: Option<String>,
    /// `recent --rcheck` (session affinity), with its `--seconds`.
    affinity: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    /// Jump (`-j`) or goto (`-g`) a chain, or a built-in target without options.
    Chain {
        name: String,
        goto: bool,
    },
    Dnat(String),
    Mark {
        value: u32,
        mask: u32,
        op: MarkOp,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkOp {
    /// `(mark & !mask) ^ value`
    Xset,
    Or,
    And,
    Xor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AddrType {
    Local,
    Unicast,
    Broadcast,
    Multicast,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    Src(bool, IpNet),
    Dst(bool, IpNet),
    SrcType(bool, Vec<AddrType>),
    DstType(bool, Vec<AddrType>),
    Proto(bool, String),
    Dport(bool, Vec<(u16, u16)>),
    CtState(bool, Vec<String>),
    Mark(bool, u32, u32),
    /// A match a traced packet never satisfies (affinity history, ICMP types).
    Never,
}

/// Rules by table and chain.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    tables: HashMap<String, HashMap<String, Vec<Rule>>>,
}

/// Splits a rule into words: quoted strings are one word (with `\"` escapes); an
/// unterminated quote is an error.
fn words(rule: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = rule.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            w.push(n);
                        }
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => w.push(c),
                }
            }
            if !closed {
                return Err("unterminated quote".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        parse_cidr_sloppy(s)
    } else {
        parse_ip_sloppy(s).map(IpNet::from)
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `value[/mask]` of mark matches and targets.
fn parse_mark(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((parse_u32(v)?, parse_u32(m)?)),
        None => Some((parse_u32(s)?, u32::MAX)),
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok()
}

/// `80`, `80:90`, or a multiport list `80,443,8000:8080`.
fn parse_ports(s: &str) -> Option<Vec<(u16, u16)>> {
    s.split(',')
        .map(|p| match p.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (parse_port(a)?, parse_port(b)?);
                (a <= b).then_some((a, b))
            }
            None => parse_port(p).map(|n| (n, n)),
        })
        .collect()
}

fn parse_addr_types(s: &str) -> Result<Vec<AddrType>, Option<String>> {
    let mut out = Vec::new();
    for t in s.split(',') {
        out.push(match t {
            "LOCAL" => AddrType::Local,
            "UNICAST" => AddrType::Unicast,
            "BROADCAST" => AddrType::Broadcast,
            "MULTICAST" => AddrType::Multicast,
            // Types that depend on the routing table, which a trace does not know.
            "ANYCAST" | "BLACKHOLE" | "UNREACHABLE" | "PROHIBIT" | "THROW" | "NAT" | "XRESOLVE"
            | "UNSPEC" => return Err(Some(format!("address type {t} depends on the routes"))),
            _ => return Err(None),
        });
    }
    Ok(out)
}

fn proto_name(p: &str) -> String {
    match p {
        "6" => "tcp".into(),
        "17" => "udp".into(),
        "132" => "sctp".into(),
        "1" => "icmp".into(),
        "58" => "ipv6-icmp".into(),
        p => p.to_lowercase(),
    }
}

/// Options that take one argument and do not change whether a rule matches a new
/// packet, or belong to a target whose effect the tracer does not need.
const IGNORED_WITH_ARG: &[&str] = &[
    "--comment",
    "--mode",
    "--name",
    "--mask",
    "--hitcount",
    "--log-prefix",
    "--log-level",
    "--reject-with",
    "--to-ports",
    "--to-source",
    "--nfacct-name",
    "--set-counters",
    "--limit",
    "--limit-burst",
    "--clamp-mss-to-pmtu",
    "--set-mss",
    "--ulog-prefix",
    "--nflog-group",
    "--nflog-prefix",
    "--queue-num",
];

/// Flags without an argument that do not change whether a rule matches a new packet.
const IGNORED_FLAGS: &[&str] = &[
    "--random-fully",
    "--random",
    "--persistent",
    "--rsource",
    "--rdest",
    "--set",
    "--reap",
    "--log-uid",
    "--log-ip-options",
    "--log-tcp-options",
    "--log-tcp-sequence",
    "--syn",
    "--clamp-mss-to-pmtu",
];

impl Rule {
    /// Parses `-A CHAIN …`.
    fn parse(text: &str) -> Result<Rule, String> {
        let w = words(text)?;
        if w.len() < 2 {
            return Err("a rule needs a chain".into());
        }
        let mut rule = Rule {
            text: text.to_string(),
            matches: Vec::new(),
            target: None,
            probability: None,
            unknown: None,
            affinity: None,
        };
        let mut negate = false;
        let mut i = 2; // skip "-A CHAIN"
        let mut target_name: Option<(String, bool)> = None;
        let mut dnat: Option<String> = None;
        let mut mark: Option<(u32, u32, MarkOp)> = None;
        while i < w.len() {
            let word = w[i].as_str();
            if word == "!" {
                negate = true;
                i += 1;
                continue;
            }
            let arg = w.get(i + 1).map(String::as_str);
            let need = || arg.ok_or_else(|| format!("{word} needs an argument"));
            let bad = |what: &str| format!("bad argument for {word}: {what:?}");
            let neg = std::mem::take(&mut negate);
            let mut consumed = 2;
            match word {
                "-m" | "--match" => {
                    // The options that follow say what the module matches.
                    need()?;
                }
                "-s" | "--source" | "-d" | "--destination" => {
                    let a = need()?;
                    let n = parse_net(a).ok_or_else(|| bad(a))?;
                    rule.matches
                        .push(if word.starts_with("-s") || word == "--source" {
                            Match::Src(neg, n)
                        } else {
                            Match::Dst(neg, n)
                        });
                }
                "--src-type" | "--dst-type" => {
                    let a = need()?;
                    match parse_addr_types(a) {
                        Ok(types) => rule.matches.push(if word == "--src-type" {
                            Match::SrcType(neg, types)
                        } else {
                            Match::DstType(neg, types)
                        }),
                        Err(Some(why)) => {
                            rule.unknown.get_or_insert(why);
                        }
                        Err(None) => return Err(bad(a)),
                    }
                }
                "--limit-iface-in" | "--limit-iface-out" => consumed = 1,
                "-p" | "--protocol" => {
                    let p = proto_name(need()?);
                    if p != "all" && p != "0" {
                        rule.matches.push(Match::Proto(neg, p));
                    }
                }
                "--dport" | "--destination-port" | "--dports" | "--destination-ports" => {
                    let a = need()?;
                    let ports = parse_ports(a).ok_or_else(|| bad(a))?;
                    rule.matches.push(Match::Dport(neg, ports));
                }
                "--sport" | "--source-port" | "--sports" | "--source-ports" | "--ports" => {
                    let a = need()?;
                    parse_ports(a).ok_or_else(|| bad(a))?;
                    rule.unknown
                        .get_or_insert(format!("{word} {a}: the source port is not traced"));
                }
                "--ctstate" | "--state" => {
                    let a = need()?;
                    let states: Vec<String> = a.split(',').map(str::to_uppercase).collect();
                    rule.matches.push(Match::CtState(neg, states));
                }
                "--mark" => {
                    let a = need()?;
                    let (v, m) = parse_mark(a).ok_or_else(|| bad(a))?;
                    rule.matches.push(Match::Mark(neg, v, m));
                }
                "--probability" => {
                    let a = need()?;
                    let p: f64 = a.parse().map_err(|_| bad(a))?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(bad(a));
                    }
                    rule.probability = Some(p);
                }
                "--every" | "--packet" => {
                    need()?;
                    rule.unknown
                        .get_or_insert("statistic --mode nth depends on packet counts".into());
                }
                // A new client has no affinity history.
                "--rcheck" | "--update" => {
                    rule.matches.push(Match::Never);
                    rule.affinity.get_or_insert_with(String::new);
                    consumed = 1;
                }
                "--seconds" => {
                    let a = need()?;
                    a.parse::<u32>().map_err(|_| bad(a))?;
                    rule.affinity = Some(a.to_string());
                }
                "--remove" => consumed = 1,
                "--icmp-type" | "--icmpv6-type" => {
                    need()?;
                    rule.matches.push(Match::Never);
                }
                "--tcp-flags" => {
                    need()?;
                    w.get(i + 2)
                        .ok_or_else(|| "--tcp-flags needs two arguments".to_string())?;
                    consumed = 3;
                }
                "-i" | "--in-interface" | "-o" | "--out-interface" => {
                    let a = need()?;
                    rule.unknown.get_or_insert(format!(
                        "{}{word} {a}: interfaces are not part of the traced packet",
                        if neg { "! " } else { "" }
                    ));
                }
                "--match-set" => {
                    let a = need()?;
                    rule.unknown
                        .get_or_insert(format!("ipset {a}: set contents are not known"));
                    consumed = 3;
                }
                "-j" | "--jump" | "-g" | "--goto" => {
                    target_name = Some((
                        need()?.to_string(),
                        word.starts_with("-g") || word == "--goto",
                    ));
                }
                "--to-destination" => {
                    let a = need()?;
                    if split_destination(a).is_none() {
                        return Err(bad(a));
                    }
                    dnat = Some(a.to_string());
                }
                "--set-xmark" | "--set-mark" => {
                    let a = need()?;
                    let (v, m) = parse_mark(a).ok_or_else(|| bad(a))?;
                    mark = Some((v, m, MarkOp::Xset));
                }
                "--or-mark" | "--and-mark" | "--xor-mark" => {
                    let a = need()?;
                    let v = parse_u32(a).ok_or_else(|| bad(a))?;
                    let op = match word {
                        "--or-mark" => MarkOp::Or,
                        "--and-mark" => MarkOp::And,
                        _ => MarkOp::Xor,
                    };
                    mark = Some((v, u32::MAX, op));
                }
                w if IGNORED_WITH_ARG.contains(&w) => {
                    need()?;
                }
                w if IGNORED_FLAGS.contains(&w) => consumed = 1,
                other => {
                    rule.unknown
                        .get_or_insert(format!("option {other} is not known to the tracer"));
                    // Skip its arguments: everything up to the next option.
                    consumed = 1;
                    while w
                        .get(i + consumed)
                        .is_some_and(|a| !a.starts_with('-') && a != "!")
                    {
                        consumed += 1;
                    }
                }
            }
            i += consumed;
        }
        rule.target = match target_name {
            None => None,
            Some((name, _)) if name == "DNAT" => {
                Some(Target::Dnat(dnat.ok_or_else(|| {
                    "DNAT without --to-destination".to_string()
                })?))
            }
            Some((name, _)) if name == "MARK" => {
                let (value, mask, op) = mark.ok_or_else(|| "MARK without a mark".to_string())?;
                Some(Target::Mark { value, mask, op })
            }
            Some((name, goto)) => Some(Target::Chain { name, goto }),
        };
        Ok(rule)
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
            let err = |what: String| TraceError::parse(n + 1, what);
            if let Some(t) = line.strip_prefix('*') {
                if t.is_empty() {
                    return Err(err("a table line needs a name".into()));
                }
                table = Some(t.to_string());
                rs.tables.entry(t.to_string()).or_default();
                continue;
            }
            let Some(t) = table.as_ref() else {
                return Err(err(format!("{} outside a table", excerpt(line))));
            };
            let chains = rs.tables.entry(t.clone()).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if name.is_empty() {
                    return Err(err("a chain line needs a name".into()));
                }
                chains.entry(name.to_string()).or_default();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or_default();
                let rule =
                    Rule::parse(line).map_err(|e| err(format!("{e} in {}", excerpt(line))))?;
                chains.entry(chain.to_string()).or_default().push(rule);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                chains.remove(chain.trim());
            } else if let Some(chain) = line.strip_prefix("-F ") {
                if let Some(c) = chains.get_mut(chain.trim()) {
                    c.clear();
                }
            } else {
                return Err(err(format!("unexpected line {}", excerpt(line))));
            }
        }
        Ok(rs)
    }

    /// Adds a rule to a chain (e.g. the jump from a built-in chain that kube-proxy
    /// installs outside the restore payload).
    pub fn append(&mut self, table: &str, chain: &str, rule_args: &str) -> Result<(), TraceError> {
        let text = format!("-A {chain} {rule_args}");
        let rule = Rule::parse(&text).map_err(|what| TraceError::parse(0, what))?;
        self.tables
            .entry(table.to_string())
            .or_default()
            .entry(chain.to_string())
            .or_default()
            .push(rule);
        Ok(())
    }

    /// Merges another ruleset (e.g. the legacy and nft backends of one host).
    pub fn merge(&mut self, other: Ruleset) {
        for (t, chains) in other.tables {
            let mine = self.tables.entry(t).or_default();
            for (c, rules) in chains {
                mine.entry(c).or_default().extend(rules);
            }
        }
    }

    /// Whether the ruleset holds no rules at all.
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(|t| t.values().all(Vec::is_empty))
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
            walk: Walk::new(),
            mark: 0,
            dnat_done: false,
        };
        let mut pkt = pkt.clone();
        let (hook, entry) = if pkt.from_node {
            ("output", "OUTPUT")
        } else {
            ("prerouting", "PREROUTING")
        };
        t.walk.at(hook, "nat");
        if self.has_rules("nat", entry) {
            t.run("nat", entry, &pkt);
        } else {
            // kube-proxy's jump from the built-in chain lives outside its payload.
            t.run("nat", "KUBE-SERVICES", &pkt);
        }
        // The filter chains see the DNATed destination. Upstream's tracer rewrites only
        // IPv4 destinations; its IPv6 expectations depend on that, so do the same.
        if let Some(first) = t.walk.out.endpoints.first() {
            t.dnat_done = true;
            if let Some(ip @ IpAddr::V4(_)) = destination_ip(&first.destination) {
                pkt.dst = ip;
            }
        }
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            if t.walk.halted() {
                break;
            }
            let hook = match (pkt.from_node, chain) {
                (true, _) => "output",
                (false, "KUBE-NODEPORTS") => "input",
                (false, _) => "forward",
            };
            t.walk.at(hook, "filter");
            t.run("filter", chain, &pkt);
        }
        t.walk.finish()
    }
}

struct Tracer<'a> {
    rs: &'a Ruleset,
    local: &'a [IpAddr],
    walk: Walk,
    /// The packet mark (nfmark) as MARK targets leave it.
    mark: u32,
    dnat_done: bool,
}

/// How a rule (or a chain walk) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Go on with the next rule.
    Next,
    /// Fell off the end, RETURN, or the end of a goto: back to the caller.
    Return,
    /// A terminal verdict (DNAT, ACCEPT, DROP, REJECT) or an abort.
    Stop,
}

/// Built-in targets that do not end the walk (and need nothing from the tracer).
const NON_TERMINATING: &[&str] = &[
    "MASQUERADE",
    "SNAT",
    "LOG",
    "NFLOG",
    "ULOG",
    "CT",
    "NOTRACK",
    "TCPMSS",
    "CONNMARK",
    "CHECKSUM",
    "TRACE",
    "AUDIT",
];

fn addr_type_matches(types: &[AddrType], ip: &IpAddr, local: &[IpAddr]) -> bool {
    let is_local = local.contains(ip);
    let multicast = ip.is_multicast();
    let broadcast = *ip == IpAddr::from([255, 255, 255, 255]);
    types.iter().any(|t| match t {
        AddrType::Local => is_local,
        AddrType::Multicast => multicast,
        AddrType::Broadcast => broadcast,
        AddrType::Unicast => !is_local && !multicast && !broadcast,
    })
}

impl Tracer<'_> {
    fn matches(&self, r: &Rule, p: &Packet) -> bool {
        self.matches_but(r, p, false)
    }

    /// Whether every match holds; `ignore_never` leaves out those a new packet never
    /// satisfies (to tell whether an affinity rule concerns this packet's flow).
    fn matches_but(&self, r: &Rule, p: &Packet, ignore_never: bool) -> bool {
        r.matches.iter().all(|m| match m {
            Match::Src(neg, n) => n.contains(&p.src) != *neg,
            Match::Dst(neg, n) => n.contains(&p.dst) != *neg,
            Match::SrcType(neg, t) => addr_type_matches(t, &p.src, self.local) != *neg,
            Match::DstType(neg, t) => addr_type_matches(t, &p.dst, self.local) != *neg,
            Match::Proto(neg, proto) => (*proto == p.proto) != *neg,
            Match::Dport(neg, ports) => {
                ports.iter().any(|(a, b)| (*a..=*b).contains(&p.dport)) != *neg
            }
            Match::CtState(neg, states) => {
                let any = states.iter().any(|s| match s.as_str() {
                    "NEW" => true,
                    "DNAT" => self.dnat_done,
                    _ => false,
                });
                any != *neg
            }
            Match::Mark(neg, v, m) => (self.mark & m == *v) != *neg,
            Match::Never => ignore_never,
        })
    }

    /// Walks a chain.
    fn run(&mut self, table: &str, chain: &str, p: &Packet) -> Flow {
        let Some(rules) = self.rs.tables.get(table).and_then(|t| t.get(chain)) else {
            return Flow::Return;
        };
        if !self.walk.enter(chain) {
            return Flow::Stop;
        }
        let flow = self.run_rules(table, chain, rules, p);
        self.walk.leave();
        flow
    }

    fn run_rules(&mut self, table: &str, chain: &str, rules: &[Rule], p: &Packet) -> Flow {
        // The chance that a connection is still walking this chain (random picks
        // before took the others).
        let mut remaining = 1.0_f64;
        let mut in_choice = false;
        for (idx, r) in rules.iter().enumerate() {
            if self.walk.aborted() {
                return Flow::Stop;
            }
            if !self.matches(r, p) {
                if let (Some(secs), Some(Target::Chain { name, .. })) = (&r.affinity, &r.target) {
                    if r.unknown.is_none() && self.matches_but(r, p, true) {
                        let within = if secs.is_empty() {
                            String::new()
                        } else {
                            format!(" within {secs}s")
                        };
                        self.walk.note(
                            chain,
                            &r.text,
                            format!("session affinity: a client seen{within} returns to {name}; not taken by a new client"),
                        );
                    }
                }
                continue;
            }
            if let Some(why) = &r.unknown {
                self.walk.unknown(chain, &r.text, why);
                continue;
            }
            let Some(target) = &r.target else {
                continue;
            };
            let p_rel = match r.probability {
                Some(prob) => {
                    if !in_choice {
                        in_choice = true;
                        let (branches, all_endpoints) = self.choice_branches(&rules[idx..], p);
                        let noun = if all_endpoints {
                            "endpoints"
                        } else {
                            "branches"
                        };
                        let saved = self.walk.scale(remaining);
                        self.walk.choice(chain, &r.text, &branches, noun);
                        self.walk.restore(saved);
                    }
                    remaining * prob
                }
                None => remaining,
            };
            let saved = self.walk.scale(p_rel);
            let flow = self.take(table, chain, r, target, p);
            self.walk.restore(saved);
            if let Some(prob) = r.probability {
                // Every endpoint a random pick could reach is reported: only a
                // certain verdict ends the chain.
                remaining *= 1.0 - prob;
                continue;
            }
            match flow {
                Flow::Next => {}
                other => return other,
            }
        }
        Flow::Return
    }

    /// The within-chain probabilities of a run of `statistic` rules and of the rule
    /// that catches the rest.
    /// Also says whether every branch jumps to an endpoint (KUBE-SEP-) chain.
    fn choice_branches(&self, rules: &[Rule], p: &Packet) -> (Vec<f64>, bool) {
        let mut out = Vec::new();
        let mut remaining = 1.0;
        let mut endpoints = true;
        for r in rules {
            if r.target.is_none() || r.unknown.is_some() || !self.matches(r, p) {
                continue;
            }
            endpoints &= matches!(&r.target, Some(Target::Chain { name, .. }) if name.starts_with("KUBE-SEP-"));
            match r.probability {
                Some(prob) => {
                    out.push(remaining * prob);
                    remaining *= 1.0 - prob;
                }
                None => {
                    out.push(remaining);
                    break;
                }
            }
        }
        (out, endpoints)
    }

    fn take(&mut self, table: &str, chain: &str, r: &Rule, target: &Target, p: &Packet) -> Flow {
        let (name, goto) = match target {
            Target::Dnat(dest) => {
                self.walk.dnat(chain, &r.text, dest);
                return Flow::Stop;
            }
            Target::Mark { value, mask, op } => {
                self.mark = match op {
                    MarkOp::Xset => (self.mark & !mask) ^ value,
                    MarkOp::Or => self.mark | value,
                    MarkOp::And => self.mark & value,
                    MarkOp::Xor => self.mark ^ value,
                };
                self.walk
                    .step(chain, &r.text, format!("MARK (mark now {:#x})", self.mark));
                return Flow::Next;
            }
            Target::Chain { name, goto } => (name.as_str(), *goto),
        };
        match name {
            "ACCEPT" => {
                self.walk.accept(chain, &r.text, true);
                return Flow::Stop;
            }
            "REJECT" | "DROP" => {
                let reason = comment_of(&r.text).unwrap_or_else(|| format!("{table}/{chain}"));
                self.walk.stop(chain, &r.text, name, reason);
                return Flow::Stop;
            }
            "RETURN" => {
                self.walk.step(chain, &r.text, "RETURN");
                return Flow::Return;
            }
            n if NON_TERMINATING.contains(&n) => {
                self.walk.step(chain, &r.text, n);
                return Flow::Next;
            }
            _ => {}
        }
        if name == "KUBE-MARK-MASQ" {
            self.walk.masquerade(chain, &r.text);
            self.walk
                .step(chain, &r.text, "mark for masquerade (jump KUBE-MARK-MASQ)");
        } else {
            let verb = if goto { "goto" } else { "jump" };
            self.walk.step(chain, &r.text, format!("{verb} {name}"));
        }
        if !self
            .rs
            .tables
            .get(table)
            .is_some_and(|t| t.contains_key(name))
        {
            if name != "KUBE-MARK-MASQ" {
                self.walk.unknown(
                    chain,
                    &r.text,
                    &format!("target {name} is neither a chain of table {table} nor known"),
                );
            }
            return Flow::Next;
        }
        match (self.run(table, name, p), goto) {
            (Flow::Stop, _) => Flow::Stop,
            (_, true) => Flow::Return,
            (_, false) => Flow::Next,
        }
    }
}

/// The `--comment` of a rule, for reasons.
fn comment_of(rule: &str) -> Option<String> {
    let w = words(rule).ok()?;
    let i = w.iter().position(|x| x == "--comment")?;
    w.get(i + 1).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::core::Outcome;

    const RULES: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
-A KUBE-SERVICES -m comment --comment \"a cluster IP\" -m tcp -p tcp -d 172.30.0.1 --dport 80 -j KUBE-SVC-A\n\
-A KUBE-SVC-A -m tcp -p tcp -d 172.30.0.1 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n\
-A KUBE-SVC-A -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-1\n\
-A KUBE-SVC-A -j KUBE-SEP-2\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
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
        assert_eq!(t.endpoints[0].probability, 0.5);
        assert_eq!(t.endpoints[1].probability, 0.5);
        let t = rs.trace(&pkt("192.168.5.5", "172.30.0.1", 80), &[]);
        assert!(t.masquerade);
        assert_eq!(t.masquerade_by.unwrap().chain, "KUBE-SVC-A");
        let t = rs.trace(&pkt("10.0.0.5", "172.30.0.1", 81), &[]);
        assert_eq!(t.output(), "");
        assert!(t.steps.is_empty());
        assert_eq!(t.outcome(), Outcome::NotService);
    }

    fn parse_err(rule: &str) -> String {
        let text = format!("*nat\n:X - [0:0]\n{rule}\nCOMMIT\n");
        Ruleset::parse(&text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_rules_are_errors() {
        for (rule, want) in [
            (
                "-A X -m statistic --mode random --probability NaN -j Y",
                "--probability",
            ),
            (
                "-A X -m statistic --mode random --probability -7 -j Y",
                "--probability",
            ),
            (
                "-A X -j DNAT --to-destination 999.1.1.1:99999",
                "--to-destination",
            ),
            (
                "-A X -j DNAT --to-destination 10.0.0.1:99999",
                "--to-destination",
            ),
            (
                "-A X -m comment --comment \"unterminated -j Y",
                "unterminated quote",
            ),
            ("-A X -p tcp --dport 70000 -j Y", "--dport"),
            ("-A X -m addrtype --dst-type NOSUCH -j Y", "--dst-type"),
            ("-A X -d", "needs an argument"),
            ("-A X -j DNAT", "DNAT without"),
        ] {
            let e = parse_err(rule);
            assert!(e.contains(want), "{rule}: {e}");
            assert!(!e.contains("Some("), "{e}");
        }
    }

    #[test]
    fn host_firewall_matches() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n\
-A PREROUTING -m addrtype --dst-type MULTICAST -j RETURN\n\
-A PREROUTING -m set --match-set blocked src -j DROP\n\
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
-A DOCKER -i docker0 -j RETURN\n\
-A DOCKER -p tcp -m multiport --dports 8000:8100,9000 -m conntrack --ctstate NEW -j DNAT --to-destination 172.17.0.2:80\n\
COMMIT\n";
        let rs = Ruleset::parse(text).unwrap();
        let local: Vec<IpAddr> = vec!["192.168.1.2".parse().unwrap()];
        let t = rs.trace(&pkt("1.2.3.4", "192.168.1.2", 9000), &local);
        assert_eq!(t.output(), "172.17.0.2:80");
        let unknown: Vec<_> = t.unknown_steps().map(|s| s.verdict.clone()).collect();
        assert_eq!(unknown.len(), 2, "{unknown:?}");
        assert!(unknown[0].contains("ipset blocked"));
        assert!(unknown[1].contains("interfaces"));
        let t = rs.trace(&pkt("1.2.3.4", "224.0.0.1", 9000), &local);
        assert_eq!(t.outcome(), Outcome::NotService);
    }

    #[test]
    fn loops_are_unknown() {
        let text = "*nat\n:KUBE-SERVICES - [0:0]\n:A - [0:0]\n-A KUBE-SERVICES -j A\n-A A -j KUBE-SERVICES\nCOMMIT\n";
        let t = Ruleset::parse(text)
            .unwrap()
            .trace(&pkt("1.1.1.1", "2.2.2.2", 1), &[]);
        assert!(matches!(t.outcome(), Outcome::Unknown { reason } if reason.contains("loop")));
    }
}
