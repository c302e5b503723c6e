//! Walking one packet through the parsed rules: matches, verdicts, marks, vmaps and
//! `numgen` choices (the maps layout's own expressions are in [`super::maps`]).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{parse_elements, Element, Rule, Table};
use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::trace::core::{Packet, Walk};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Evaluation goes on with the next rule.
    Continue,
    /// `return`, or the end of a chain reached by `goto`: back to the caller's caller.
    Return,
    /// A terminal verdict (DNAT, accept, drop, reject).
    Stop,
}

pub(super) struct Tracer<'a> {
    pub(super) t: &'a Table,
    pub(super) local: &'a [IpAddr],
    pub(super) walk: Walk,
    /// The packet mark as `mark set` statements leave it.
    pub(super) mark: u32,
    /// The last map element that sent the packet on (`@map`, element comment), for
    /// reasons.
    pub(super) via: Option<(String, Option<String>)>,
    /// The connection was DNATed (`ct status dnat`): the postrouting pass.
    pub(super) after_dnat: bool,
}

fn parse_num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Tracer<'_> {
    pub(super) fn run(&mut self, chain: &str, p: &Packet) -> Flow {
        if self.walk.halted() {
            return Flow::Stop;
        }
        let Some(rules) = self.t.chains.get(chain) else {
            return Flow::Continue;
        };
        if !self.walk.enter(chain) {
            return Flow::Stop;
        }
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
            if self.walk.aborted() {
                result = Flow::Stop;
                break;
            }
        }
        self.walk.leave();
        result
    }

    pub(super) fn selector_value(
        &self,
        toks: &[String],
        i: &mut usize,
        p: &Packet,
    ) -> Option<String> {
        let a = toks.get(*i)?.as_str();
        let b = toks.get(*i + 1).map(String::as_str);
        let v = match (a, b) {
            ("ip" | "ip6", Some("saddr")) => p.src.to_string(),
            ("ip" | "ip6", Some("daddr")) => p.dst.to_string(),
            ("meta", Some("l4proto")) | ("ip", Some("protocol")) | ("ip6", Some("nexthdr")) => {
                p.proto.clone()
            }
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

    pub(super) fn find_element(&self, set: &str, key: &str) -> Option<&Element> {
        self.t
            .elements
            .get(set)?
            .iter()
            .find(|e| e.key == key || value_matches(&e.key, key))
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
                self.find_element(&set[1..], key).is_some()
            }
            Some(lit) => {
                *i += 1;
                value_matches(lit, key)
            }
            None => false,
        }
    }

    /// Why a drop/reject happens, from the rule's comment or the map element that led
    /// there.
    fn reason(&self, chain: &str, r: &Rule) -> String {
        if let Some(c) = rule_comment(&r.tokens()) {
            return c;
        }
        match &self.via {
            Some((map, Some(svc))) if map.starts_with("no-endpoint") => {
                format!("{svc} has no usable endpoints (@{map})")
            }
            Some((map, Some(svc))) if map.starts_with("firewall") => {
                format!("{svc}: source not in loadBalancerSourceRanges (@{map})")
            }
            Some((map, _)) => format!("@{map} -> {chain}"),
            None => format!("chain {chain}"),
        }
    }

    fn verdict(&mut self, chain: &str, r: &Rule, verdict: &[&str], p: &Packet) -> Flow {
        match verdict {
            ["goto", target] => {
                self.walk.step(chain, &r.text, format!("goto {target}"));
                match self.run(target, p) {
                    Flow::Stop => Flow::Stop,
                    _ => Flow::Return,
                }
            }
            ["jump", target] => {
                if *target == "mark-for-masquerade" {
                    self.walk.masquerade(chain, &r.text);
                    self.walk.step(
                        chain,
                        &r.text,
                        "mark for masquerade (jump mark-for-masquerade)",
                    );
                } else {
                    self.walk.step(chain, &r.text, format!("jump {target}"));
                }
                match self.run(target, p) {
                    Flow::Stop => Flow::Stop,
                    _ => Flow::Continue,
                }
            }
            ["drop"] => {
                let why = self.reason(chain, r);
                self.walk.stop(chain, &r.text, "DROP", why);
                Flow::Stop
            }
            ["reject", ..] => {
                let why = self.reason(chain, r);
                self.walk.stop(chain, &r.text, "REJECT", why);
                Flow::Stop
            }
            ["accept"] => {
                self.walk.accept(chain, &r.text, false);
                Flow::Stop
            }
            ["return"] => {
                self.walk.step(chain, &r.text, "return");
                Flow::Return
            }
            ["continue"] => Flow::Continue,
            other => {
                self.walk.unknown(
                    chain,
                    &r.text,
                    &format!("verdict {:?} is not known to the tracer", other.join(" ")),
                );
                Flow::Continue
            }
        }
    }

    fn rule(&mut self, chain: &str, r: &Rule, p: &Packet) -> Flow {
        let toks = &r.tokens();
        let mut i = 0;
        while i < toks.len() {
            let t = toks[i].as_str();
            match t {
                "comment" => i += 2,
                "counter" => {
                    i += 1;
                    // `counter packets N bytes M` in listings.
                    while matches!(toks.get(i).map(String::as_str), Some("packets" | "bytes")) {
                        i += 2;
                    }
                }
                "ct" if toks.get(i + 1).map(String::as_str) == Some("status") => {
                    match self.ct_status(toks, &mut i) {
                        Some(true) => {}
                        Some(false) => return Flow::Continue,
                        None => {
                            self.walk
                                .unknown(chain, &r.text, "ct status other than dnat");
                            return Flow::Continue;
                        }
                    }
                }
                "ct" => {
                    // `ct state new` (a traced packet is always a new connection).
                    if toks.get(i + 1).map(String::as_str) != Some("state") {
                        self.walk
                            .unknown(chain, &r.text, "ct match other than state");
                        return Flow::Continue;
                    }
                    i += 2;
                    let neg = toks.get(i).map(String::as_str) == Some("!=");
                    if neg {
                        i += 1;
                    }
                    let mut states = Vec::new();
                    if toks.get(i).map(String::as_str) == Some("{") {
                        i += 1;
                        while let Some(s) = toks.get(i) {
                            i += 1;
                            match s.as_str() {
                                "}" => break,
                                "," => {}
                                s => states.push(s.to_string()),
                            }
                        }
                    } else if let Some(s) = toks.get(i) {
                        states.extend(s.split(',').map(str::to_string));
                        i += 1;
                    }
                    if states.iter().any(|s| s == "new") == neg {
                        return Flow::Continue;
                    }
                }
                "fib" => {
                    // fib saddr|daddr type [!=] local
                    let addr = match toks.get(i + 1).map(String::as_str) {
                        Some("saddr") => p.src,
                        Some("daddr") => p.dst,
                        _ => {
                            self.walk.unknown(chain, &r.text, "fib lookup form");
                            return Flow::Continue;
                        }
                    };
                    if toks.get(i + 2).map(String::as_str) != Some("type") {
                        self.walk.unknown(chain, &r.text, "fib lookup form");
                        return Flow::Continue;
                    }
                    i += 3;
                    let neg = toks.get(i).map(String::as_str) == Some("!=");
                    if neg {
                        i += 1;
                    }
                    if toks.get(i).map(String::as_str) != Some("local") {
                        self.walk
                            .unknown(chain, &r.text, "fib address type other than local");
                        return Flow::Continue;
                    }
                    i += 1;
                    if self.local.contains(&addr) == neg {
                        return Flow::Continue;
                    }
                }
                "iif" | "iifname" | "oif" | "oifname" => {
                    self.walk.unknown(
                        chain,
                        &r.text,
                        "interfaces are not part of the traced packet",
                    );
                    return Flow::Continue;
                }
                "meta" if toks.get(i + 1).map(String::as_str) == Some("mark") => {
                    i += 1;
                    match self.mark_statement(chain, r, toks, &mut i) {
                        Some(true) => {}
                        Some(false) => return Flow::Continue,
                        None => return Flow::Continue,
                    }
                }
                "mark" => match self.mark_statement(chain, r, toks, &mut i) {
                    Some(true) => {}
                    _ => return Flow::Continue,
                },
                "numgen" => return self.numgen(chain, r, toks, i, p),
                "update" | "add" => {
                    // update @set { ip saddr }: affinity bookkeeping, no effect here.
                    while i < toks.len() && toks[i] != "}" {
                        i += 1;
                    }
                    i += 1;
                }
                "jump" | "goto" => {
                    let Some(target) = toks.get(i + 1).cloned() else {
                        self.walk.unknown(chain, &r.text, "jump without a chain");
                        return Flow::Continue;
                    };
                    match self.verdict(chain, r, &[t, &target], p) {
                        // A jump came back: later statements of the rule (if any) run.
                        Flow::Continue => i += 2,
                        other => return other,
                    }
                }
                "drop" | "reject" | "accept" | "return" | "continue" => {
                    return self.verdict(chain, r, &[t], p);
                }
                "masquerade" | "snat" => {
                    self.walk.step(chain, &r.text, t);
                    return Flow::Stop;
                }
                "log" => {
                    i += 1;
                    while matches!(
                        toks.get(i).map(String::as_str),
                        Some("prefix" | "level" | "group" | "flags" | "snaplen")
                    ) {
                        i += 2;
                    }
                }
                "dnat" => {
                    if let Some(flow) = self.dnat_map(chain, r, toks, i, p) {
                        return flow;
                    }
                    // dnat [ip|ip6] to ADDR:PORT
                    let target = toks[i + 1..]
                        .iter()
                        .find(|t| *t != "to" && *t != "ip" && *t != "ip6")
                        .cloned()
                        .unwrap_or_default();
                    self.walk.dnat(chain, &r.text, &target);
                    return Flow::Stop;
                }
                _ => {
                    // A match: key [op] value, or key vmap @map / { … }.
                    let Some(key) = self.key(toks, &mut i, p) else {
                        self.walk.unknown(
                            chain,
                            &r.text,
                            &format!("statement {t:?} is not known to the tracer"),
                        );
                        return Flow::Continue;
                    };
                    match toks.get(i).map(String::as_str) {
                        Some("vmap") => {
                            i += 1;
                            let Some((v, map, comment)) = self.vmap_lookup(toks, &mut i, &key)
                            else {
                                return Flow::Continue;
                            };
                            self.via = map.map(|m| (m, comment));
                            let v: Vec<&str> = v.split_whitespace().collect();
                            return self.verdict(chain, r, &v, p);
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
                            let set = toks.get(i).cloned().unwrap_or_default();
                            if !self.compare(toks, &mut i, &key) {
                                if let Some(aff) = set.strip_prefix("@affinity-") {
                                    let target = toks[i..].join(" ");
                                    self.walk.note(
                                        chain,
                                        &r.text,
                                        format!("session affinity (@affinity-{aff}): a client seen recently takes `{target}`; not taken by a new client"),
                                    );
                                }
                                return Flow::Continue;
                            }
                        }
                    }
                }
            }
        }
        Flow::Continue
    }

    /// `mark set mark or M` / `meta mark set meta mark | M` (marks for masquerade),
    /// other `mark set` forms, and mark tests `mark and M == V`. `i` points at `mark`.
    /// Some(true): go on with the rule; Some(false)/None: the rule does not apply.
    fn mark_statement(
        &mut self,
        chain: &str,
        r: &Rule,
        toks: &[String],
        i: &mut usize,
    ) -> Option<bool> {
        let at = |k: usize| toks.get(*i + k).map(String::as_str);
        if at(1) == Some("set") {
            // mark set [meta] mark (or|'|'|xor|^|and|&) M   or   mark set M
            let mut j = *i + 2;
            if toks.get(j).map(String::as_str) == Some("meta") {
                j += 1;
            }
            if toks.get(j).map(String::as_str) == Some("mark") {
                let op = toks.get(j + 1).map(String::as_str);
                let val = toks.get(j + 2).and_then(|v| parse_num(v));
                let Some(val) = val else {
                    self.walk.unknown(chain, &r.text, "mark value");
                    return None;
                };
                self.mark = match op {
                    Some("or" | "|") => self.mark | val,
                    Some("xor" | "^") => self.mark ^ val,
                    Some("and" | "&") => self.mark & val,
                    _ => {
                        self.walk.unknown(chain, &r.text, "mark operation");
                        return None;
                    }
                };
                if matches!(op, Some("or" | "|")) {
                    self.walk.masquerade(chain, &r.text);
                    self.walk.step(chain, &r.text, "mark for masquerade");
                } else {
                    self.walk
                        .step(chain, &r.text, format!("mark now {:#x}", self.mark));
                }
                *i = j + 3;
            } else {
                let Some(val) = toks.get(j).and_then(|v| parse_num(v)) else {
                    self.walk.unknown(chain, &r.text, "mark value");
                    return None;
                };
                self.mark = val;
                self.walk.step(chain, &r.text, format!("mark now {val:#x}"));
                *i = j + 1;
            }
            return Some(true);
        }
        // mark (and|&) M (==|!=) V
        if matches!(at(1), Some("and" | "&")) {
            let m = at(2).and_then(parse_num);
            let (neg, v) = match at(3) {
                Some("==") => (false, at(4).and_then(parse_num)),
                Some("!=") => (true, at(4).and_then(parse_num)),
                _ => (false, at(3).and_then(parse_num)),
            };
            let (Some(m), Some(v)) = (m, v) else {
                self.walk.unknown(chain, &r.text, "mark test");
                return None;
            };
            *i += if matches!(at(3), Some("==" | "!=")) {
                5
            } else {
                4
            };
            return Some(((self.mark & m) == v) != neg);
        }
        self.walk.unknown(chain, &r.text, "mark statement form");
        None
    }

    /// `numgen random mod N vmap { 0 : goto a , 1 : goto b }`: every branch, 1/N each.
    fn numgen(&mut self, chain: &str, r: &Rule, toks: &[String], i: usize, p: &Packet) -> Flow {
        let bad = |w: &mut Walk, why: &str| {
            w.abort(format!("{why} in {chain}: {}", r.text));
            Flow::Stop
        };
        if toks.get(i + 1).map(String::as_str) != Some("random")
            || toks.get(i + 2).map(String::as_str) != Some("mod")
        {
            return bad(&mut self.walk, "numgen form not known to the tracer");
        }
        let Some(n) = toks
            .get(i + 3)
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
        else {
            return bad(&mut self.walk, "bad numgen modulus");
        };
        if toks.get(i + 4).map(String::as_str) != Some("vmap") {
            return bad(&mut self.walk, "numgen without a vmap");
        }
        let elems = match parse_elements(&toks[i + 5..]) {
            Ok(e) => e,
            Err(e) => return bad(&mut self.walk, &e),
        };
        let mut branches: Vec<(usize, Vec<String>)> = Vec::new();
        for e in elems {
            let Some(k) = e.key.parse::<usize>().ok().filter(|k| *k < n) else {
                return bad(
                    &mut self.walk,
                    &format!("numgen key {} out of 0..{n}", e.key),
                );
            };
            let Some(v) = e.value else {
                return bad(&mut self.walk, "numgen branch without a verdict");
            };
            branches.push((k, v.split_whitespace().map(str::to_string).collect()));
        }
        if branches.len() != n {
            return bad(
                &mut self.walk,
                &format!("numgen mod {n} with {} branches", branches.len()),
            );
        }
        let to_endpoints = branches
            .iter()
            .all(|(_, v)| v.get(1).is_some_and(|c| c.starts_with("endpoint-")));
        let noun = if to_endpoints {
            "endpoints"
        } else {
            "branches"
        };
        self.walk
            .choice(chain, &r.text, &vec![1.0 / n as f64; n], noun);
        // Every endpoint a random pick could reach is explored.
        let mut all_stop = true;
        for (_, b) in &branches {
            let v: Vec<&str> = b.iter().map(String::as_str).collect();
            let saved = self.walk.scale(1.0 / n as f64);
            let flow = self.verdict(chain, r, &v, p);
            self.walk.restore(saved);
            if flow != Flow::Stop {
                all_stop = false;
            }
            if self.walk.halted() {
                return Flow::Stop;
            }
        }
        if all_stop {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// The verdict a vmap gives `key`, with the map's name and the element's comment.
    fn vmap_lookup(
        &self,
        toks: &[String],
        i: &mut usize,
        key: &str,
    ) -> Option<(String, Option<String>, Option<String>)> {
        match toks.get(*i).map(String::as_str) {
            Some(m) if m.starts_with('@') => {
                *i += 1;
                let e = self.find_element(&m[1..], key)?;
                Some((
                    e.value.clone()?,
                    Some(m[1..].to_string()),
                    e.comment.clone(),
                ))
            }
            Some("{") => {
                let elems = parse_elements(&toks[*i..]).ok()?;
                let e = elems
                    .into_iter()
                    .find(|e| e.key == key || value_matches(&e.key, key))?;
                Some((e.value?, None, e.comment))
            }
            _ => None,
        }
    }
}

fn rule_comment(toks: &[String]) -> Option<String> {
    let i = toks.iter().position(|t| t == "comment")?;
    toks.get(i + 1).map(|c| c.trim_matches('"').to_string())
}

/// Whether a literal (address, CIDR, range, protocol, port, or a concatenation of them
/// with ` . `) matches a packet's key.
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
        if let (Some((a, b)), Ok(n)) = (l.split_once('-'), k.parse::<u32>()) {
            // A port range.
            if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                return (a..=b).contains(&n);
            }
        }
        let Ok(ip) = k.parse::<IpAddr>() else {
            return false;
        };
        if let Some(net) = l.contains('/').then(|| parse_cidr_sloppy(l)).flatten() {
            return net.contains(&ip);
        }
        if let Some((a, b)) = l.split_once('-') {
            if let (Some(a), Some(b)) = (parse_ip_sloppy(a), parse_ip_sloppy(b)) {
                return a <= ip && ip <= b;
            }
        }
        parse_ip_sloppy(l).is_some_and(|a| a == ip)
            || l.parse::<IpNet>().is_ok_and(|n| n.contains(&ip))
    })
}
