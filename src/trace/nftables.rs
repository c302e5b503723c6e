//! A packet tracer over a `kube-proxy` nftables table in `nft -f` text form (kproxy's
//! dry-run output, or `add …` lines of any transaction dump).
//!
//! It follows upstream kube-proxy's nftables test tracer: the chains
//! `filter-prerouting-pre-dnat` and `nat-prerouting` (or `filter-output-pre-dnat` and
//! `nat-output` for traffic from the node itself) run first; every branch of a `numgen`
//! vmap is followed, so the output lists every endpoint a connection could reach; `jump
//! mark-for-masquerade` (or an inline `mark set mark or …`) means "masqueraded"; `ct state
//! new` is true; `fib … type local` is decided by the node's addresses; the first DNAT
//! target becomes the destination for the filter chains that run after DNAT.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::iptables::{Packet, Step, Trace, TraceError};
use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};

/// A parsed table: chains with their rules, and set/map elements.
#[derive(Debug, Clone, Default)]
pub struct Table {
    chains: HashMap<String, Vec<Rule>>,
    /// Set or map name -> elements (key text, verdict text for maps).
    elements: HashMap<String, Vec<(String, Option<String>)>>,
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    tokens: Vec<String>,
}

/// Splits nft text into tokens: quoted strings stay whole, braces and commas stand alone.
fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut q = String::from('"');
                for c in chars.by_ref() {
                    q.push(c);
                    if c == '"' {
                        break;
                    }
                }
                out.push(q);
            }
            '{' | '}' | ',' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Canonical text of one key component (IPs re-printed so `010.0.0.1` equals `10.0.0.1`).
fn canon(part: &str) -> String {
    match parse_ip_sloppy(part) {
        Some(ip) => ip.to_string(),
        None => part.to_string(),
    }
}

impl Table {
    /// Parses `nft -f` text (only the lines for one table are expected).
    pub fn parse(text: &str) -> Result<Table, TraceError> {
        let mut t = Table::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let toks = tokenize(line);
            let err = |what: &str| TraceError::Parse {
                line: n + 1,
                what: format!("{what}: {line:?}"),
            };
            // <verb> <object> <family> <table> <name> ...; a line too short for that
            // (found by fuzzing: `add rule ip` panicked) is a parse error.
            if toks.len() < 5 && !matches!(toks.get(1).map(String::as_str), Some("table")) {
                return Err(err("incomplete line"));
            }
            let (verb, object) = (toks[0].as_str(), toks.get(1).map(String::as_str));
            let name = toks.get(4).cloned().unwrap_or_default();
            match (verb, object) {
                ("add" | "create", Some("table")) | (_, Some("table")) => {}
                ("add" | "create", Some("chain")) => {
                    t.chains.entry(name).or_default();
                }
                ("add" | "insert", Some("rule")) => {
                    let rule_toks: Vec<String> = toks[5..].to_vec();
                    let rule = Rule {
                        text: rule_toks.join(" "),
                        tokens: rule_toks,
                    };
                    let chain = t.chains.entry(name).or_default();
                    if verb == "insert" {
                        chain.insert(0, rule);
                    } else {
                        chain.push(rule);
                    }
                }
                ("flush", Some("chain")) => {
                    t.chains.entry(name).or_default().clear();
                }
                ("delete", Some("chain")) => {
                    t.chains.remove(&name);
                }
                ("add" | "create", Some("set" | "map")) => {
                    t.elements.entry(name).or_default();
                }
                ("flush", Some("set" | "map")) => {
                    t.elements.entry(name).or_default().clear();
                }
                ("delete", Some("set" | "map")) => {
                    t.elements.remove(&name);
                }
                ("add" | "create" | "delete", Some("element")) => {
                    let elems = parse_elements(&toks[5..]).ok_or_else(|| err("bad element"))?;
                    let list = t.elements.entry(name).or_default();
                    for (k, v) in elems {
                        list.retain(|(key, _)| *key != k);
                        if verb != "delete" {
                            list.push((k, v));
                        }
                    }
                }
                _ => return Err(err("unsupported line")),
            }
        }
        Ok(t)
    }

    /// Traces one packet; `local_ips` decide `fib … type local`.
    pub fn trace(&self, pkt: &Packet, local_ips: &[IpAddr]) -> Trace {
        let mut tr = Tracer {
            t: self,
            local: local_ips,
            out: Trace::default(),
            halted: false,
            depth: 0,
        };
        let mut pkt = pkt.clone();
        let (pre, nat) = if pkt.from_node {
            ("filter-output-pre-dnat", "nat-output")
        } else {
            ("filter-prerouting-pre-dnat", "nat-prerouting")
        };
        tr.run(pre, &pkt);
        if !tr.halted {
            tr.run(nat, &pkt);
        }
        if let Some(first) = tr.out.outputs.first() {
            if let Some(ip) = dnat_ip(first) {
                pkt.dst = ip;
            }
        }
        let after: &[&str] = if pkt.from_node {
            &["filter-output"]
        } else {
            &["filter-forward", "filter-input"]
        };
        for chain in after {
            if tr.halted {
                break;
            }
            tr.run(chain, &pkt);
        }
        tr.out
    }
}

/// Parses `{ k1 . k2 [comment "c"] [: verdict] , … }` into (key, value) pairs.
fn parse_elements(toks: &[String]) -> Option<Vec<(String, Option<String>)>> {
    let inner = toks.iter().skip_while(|t| *t != "{").skip(1);
    let mut out = Vec::new();
    let mut key: Vec<String> = Vec::new();
    let mut value: Option<Vec<String>> = None;
    let mut skip_next = false;
    for t in inner {
        if skip_next {
            skip_next = false;
            continue;
        }
        match t.as_str() {
            "," | "}" => {
                if !key.is_empty() {
                    out.push((
                        key.iter().map(|k| canon(k)).collect::<Vec<_>>().join(" . "),
                        value.take().map(|v| v.join(" ")),
                    ));
                }
                key.clear();
                if t == "}" {
                    break;
                }
            }
            "comment" | "timeout" | "expires" => skip_next = true,
            "." => {}
            ":" => value = Some(Vec::new()),
            other => match value.as_mut() {
                Some(v) => v.push(other.to_string()),
                None => key.push(other.to_string()),
            },
        }
    }
    Some(out)
}

fn dnat_ip(target: &str) -> Option<IpAddr> {
    if let Some(rest) = target.strip_prefix('[') {
        return rest.split(']').next().and_then(|s| s.parse().ok());
    }
    target.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Evaluation goes on with the next rule.
    Continue,
    /// `return`, or the end of a chain reached by `goto`: back to the caller's caller.
    Return,
    /// A terminal verdict (DNAT, accept, drop, reject).
    Stop,
}

struct Tracer<'a> {
    t: &'a Table,
    local: &'a [IpAddr],
    out: Trace,
    /// drop or reject: the packet is gone.
    halted: bool,
    depth: usize,
}

impl Tracer<'_> {
    fn run(&mut self, chain: &str, p: &Packet) -> Flow {
        // Valid tables have no loops; the bound protects against hand-made input.
        if self.depth > 64 || self.halted {
            return Flow::Stop;
        }
        let Some(rules) = self.t.chains.get(chain) else {
            return Flow::Continue;
        };
        self.depth += 1;
        let mut result = Flow::Continue;
        for r in rules {
            match self.rule(chain, r, p) {
                Flow::Continue => {}
                Flow::Return => break,
                Flow::Stop => {
                    result = Flow::Stop;
                    break;
                }
            }
        }
        self.depth -= 1;
        result
    }

    fn selector_value(&self, toks: &[String], i: &mut usize, p: &Packet) -> Option<String> {
        let a = toks.get(*i)?.as_str();
        let b = toks.get(*i + 1).map(String::as_str);
        let v = match (a, b) {
            ("ip" | "ip6", Some("saddr")) => p.src.to_string(),
            ("ip" | "ip6", Some("daddr")) => p.dst.to_string(),
            ("meta", Some("l4proto")) => p.proto.clone(),
            ("th", Some("dport")) | ("tcp" | "udp" | "sctp", Some("dport")) => p.dport.to_string(),
            _ => return None,
        };
        *i += 2;
        Some(v)
    }

    /// Reads `sel [. sel]*` and returns the concatenated key, or None if not a selector.
    fn key(&self, toks: &[String], i: &mut usize, p: &Packet) -> Option<String> {
        let mut parts = vec![self.selector_value(toks, i, p)?];
        while toks.get(*i).map(String::as_str) == Some(".") {
            *i += 1;
            parts.push(self.selector_value(toks, i, p)?);
        }
        Some(parts.join(" . "))
    }

    fn set_contains(&self, name: &str, key: &str) -> bool {
        self.t
            .elements
            .get(name)
            .is_some_and(|els| els.iter().any(|(k, _)| k == key || value_matches(k, key)))
    }

    /// Compares a key with a literal, a CIDR, `@set` or `{ a , b }`; advances `i`.
    fn compare(&self, toks: &[String], i: &mut usize, key: &str) -> bool {
        match toks.get(*i).map(String::as_str) {
            Some("{") => {
                let mut any = false;
                *i += 1;
                while let Some(t) = toks.get(*i) {
                    *i += 1;
                    match t.as_str() {
                        "}" => break,
                        "," => {}
                        lit => any |= value_matches(lit, key),
                    }
                }
                any
            }
            Some(set) if set.starts_with('@') => {
                *i += 1;
                self.set_contains(&set[1..], key)
            }
            Some(lit) => {
                *i += 1;
                value_matches(lit, key)
            }
            None => false,
        }
    }

    fn verdict(&mut self, verdict: &[&str], p: &Packet) -> Flow {
        match verdict {
            ["goto", chain] => match self.run(chain, p) {
                Flow::Stop => Flow::Stop,
                _ => Flow::Return,
            },
            ["jump", chain] => self.jump(chain, p),
            ["drop"] => self.halt("DROP"),
            ["reject", ..] => self.halt("REJECT"),
            ["accept"] => Flow::Stop,
            ["return"] => Flow::Return,
            _ => Flow::Continue,
        }
    }

    fn jump(&mut self, chain: &str, p: &Packet) -> Flow {
        if chain == "mark-for-masquerade" {
            self.out.masquerade = true;
        }
        match self.run(chain, p) {
            Flow::Stop => Flow::Stop,
            _ => Flow::Continue,
        }
    }

    fn halt(&mut self, what: &str) -> Flow {
        self.out.outputs.push(what.to_string());
        self.halted = true;
        Flow::Stop
    }

    fn rule(&mut self, chain: &str, r: &Rule, p: &Packet) -> Flow {
        let toks = &r.tokens;
        let mut i = 0;
        let mut step_recorded = false;
        let mut record = |tr: &mut Tracer<'_>| {
            if !step_recorded {
                tr.out.steps.push(Step {
                    table: "kube-proxy".into(),
                    chain: chain.to_string(),
                    rule: r.text.clone(),
                });
                step_recorded = true;
            }
        };
        while i < toks.len() {
            let t = toks[i].as_str();
            match t {
                "comment" => i += 2,
                "counter" => i += 1,
                "ct" => {
                    // `ct state new`: a traced packet is always a new connection.
                    i += 3;
                }
                "fib" => {
                    // fib saddr|daddr type [!=] local
                    let addr = if toks.get(i + 1).map(String::as_str) == Some("saddr") {
                        p.src
                    } else {
                        p.dst
                    };
                    i += 3;
                    let neg = toks.get(i).map(String::as_str) == Some("!=");
                    if neg {
                        i += 1;
                    }
                    i += 1; // "local"
                    if self.local.contains(&addr) == neg {
                        return Flow::Continue;
                    }
                }
                "iif" | "iifname" | "oif" | "oifname" => {
                    // Interfaces are not part of a traced packet: such rules never match.
                    return Flow::Continue;
                }
                "mark" => {
                    // `mark set mark or M` marks for masquerade; `mark and M …` tests it,
                    // which happens only in postrouting (not traced).
                    if toks.get(i + 1).map(String::as_str) == Some("set") {
                        if toks.get(i + 3).map(String::as_str) == Some("or") {
                            self.out.masquerade = true;
                        }
                        record(self);
                        i += 5;
                    } else {
                        return Flow::Continue;
                    }
                }
                "numgen" => {
                    // numgen random mod N vmap { 0 : goto a , 1 : goto b }
                    record(self);
                    let mut j = i + 4;
                    if toks.get(j).map(String::as_str) != Some("vmap") {
                        return Flow::Continue;
                    }
                    j += 1;
                    let mut branches: Vec<Vec<String>> = Vec::new();
                    let mut cur: Option<Vec<String>> = None;
                    while let Some(tok) = toks.get(j) {
                        j += 1;
                        match tok.as_str() {
                            "{" => {}
                            "}" => {
                                if let Some(c) = cur.take() {
                                    branches.push(c);
                                }
                                break;
                            }
                            "," => {
                                if let Some(c) = cur.take() {
                                    branches.push(c);
                                }
                            }
                            ":" => cur = Some(Vec::new()),
                            other => {
                                if let Some(c) = cur.as_mut() {
                                    c.push(other.to_string());
                                }
                            }
                        }
                    }
                    // Every endpoint a random pick could reach is explored.
                    let mut all_stop = !branches.is_empty();
                    for b in &branches {
                        let v: Vec<&str> = b.iter().map(String::as_str).collect();
                        if self.verdict(&v, p) != Flow::Stop {
                            all_stop = false;
                        }
                        if self.halted {
                            return Flow::Stop;
                        }
                    }
                    return if all_stop { Flow::Stop } else { Flow::Continue };
                }
                "update" | "add" => {
                    // update @set { ip saddr }: affinity bookkeeping, no effect here.
                    record(self);
                    while i < toks.len() && toks[i] != "}" {
                        i += 1;
                    }
                    i += 1;
                }
                "jump" | "goto" => {
                    record(self);
                    let chain = toks.get(i + 1).cloned().unwrap_or_default();
                    match self.verdict(&[t, &chain], p) {
                        // A jump came back: later statements of the rule (if any) run.
                        Flow::Continue => i += 2,
                        other => return other,
                    }
                }
                "drop" | "reject" | "accept" | "return" => {
                    record(self);
                    return self.verdict(&[t], p);
                }
                "masquerade" | "snat" => {
                    record(self);
                    return Flow::Stop;
                }
                "dnat" => {
                    // dnat [ip|ip6] to ADDR:PORT
                    record(self);
                    let target = toks[i + 1..]
                        .iter()
                        .find(|t| *t != "to" && *t != "ip" && *t != "ip6")
                        .cloned()
                        .unwrap_or_default();
                    self.out.outputs.push(target);
                    return Flow::Stop;
                }
                _ => {
                    // A match: key [op] value, or key vmap @map / { … }.
                    let Some(key) = self.key(toks, &mut i, p) else {
                        // Unknown statement: be conservative, the rule does not match.
                        return Flow::Continue;
                    };
                    match toks.get(i).map(String::as_str) {
                        Some("vmap") => {
                            i += 1;
                            let verdict = self.vmap_lookup(toks, &mut i, &key);
                            let Some(v) = verdict else {
                                return Flow::Continue;
                            };
                            record(self);
                            let v: Vec<&str> = v.split_whitespace().collect();
                            return self.verdict(&v, p);
                        }
                        Some("!=") => {
                            i += 1;
                            if self.compare(toks, &mut i, &key) {
                                return Flow::Continue;
                            }
                        }
                        Some("==") => {
                            i += 1;
                            if !self.compare(toks, &mut i, &key) {
                                return Flow::Continue;
                            }
                        }
                        _ => {
                            if !self.compare(toks, &mut i, &key) {
                                return Flow::Continue;
                            }
                        }
                    }
                }
            }
        }
        Flow::Continue
    }

    fn vmap_lookup(&self, toks: &[String], i: &mut usize, key: &str) -> Option<String> {
        match toks.get(*i).map(String::as_str) {
            Some(m) if m.starts_with('@') => {
                *i += 1;
                self.t.elements.get(&m[1..]).and_then(|els| {
                    els.iter()
                        .find(|(k, _)| k == key || value_matches(k, key))
                        .and_then(|(_, v)| v.clone())
                })
            }
            _ => None,
        }
    }
}

/// Whether a literal (address, CIDR, protocol, port, or a concatenation of them with
/// ` . `) matches a packet's key.
fn value_matches(lit: &str, key: &str) -> bool {
    let lits: Vec<&str> = lit.split(" . ").collect();
    let keys: Vec<&str> = key.split(" . ").collect();
    if lits.len() != keys.len() {
        return false;
    }
    lits.iter().zip(keys).all(|(l, k)| {
        if l == &k {
            return true;
        }
        let Ok(ip) = k.parse::<IpAddr>() else {
            return false;
        };
        if let Some(net) = l.contains('/').then(|| parse_cidr_sloppy(l)).flatten() {
            return net.contains(&ip);
        }
        parse_ip_sloppy(l).is_some_and(|a| a == ip)
            || l.parse::<IpNet>().is_ok_and(|n| n.contains(&ip))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy services
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy service-X
add chain ip kube-proxy endpoint-A
add chain ip kube-proxy endpoint-B
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy service-X ip daddr 172.30.0.1 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-X numgen random mod 2 vmap { 0 : goto endpoint-A , 1 : goto endpoint-B }
add rule ip kube-proxy endpoint-A meta l4proto tcp dnat to 10.1.0.1:80
add rule ip kube-proxy endpoint-B meta l4proto tcp dnat to 10.1.0.2:80
add element ip kube-proxy service-ips { 172.30.0.1 . tcp . 80 : goto service-X }
"#;

    fn pkt(src: &str) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: "172.30.0.1".parse().unwrap(),
            dport: 80,
            proto: "tcp".into(),
            from_node: false,
        }
    }

    #[test]
    fn vmap_numgen_and_masquerade() {
        let t = Table::parse(TABLE).unwrap();
        let tr = t.trace(&pkt("10.0.0.9"), &[]);
        assert_eq!(tr.output(), "10.1.0.1:80, 10.1.0.2:80");
        assert!(!tr.masquerade);
        let tr = t.trace(&pkt("192.168.9.9"), &[]);
        assert!(tr.masquerade);
    }

    #[test]
    fn elements_parse_with_comments() {
        let e = parse_elements(&tokenize(
            r#"{ 172.30.0.046 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }"#,
        ))
        .unwrap();
        assert_eq!(
            e,
            vec![(
                "172.30.0.46 . tcp . 80".to_string(),
                Some("goto reject-chain".to_string())
            )]
        );
    }
}
