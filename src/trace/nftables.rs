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

use ipnet::IpNet;

use super::core::{destination_ip, excerpt, Walk};
pub use super::core::{Packet, Step, Trace, TraceError};
use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};

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

    /// The rule's tokens, as [`tokenize`] gave them (owned: a trace evaluates few rules).
    pub(crate) fn tokens(&self) -> Vec<String> {
        self.spans
            .iter()
            .map(|&(start, len)| self.text[start as usize..(start + len) as usize].to_string())
            .collect()
    }
}

/// Splits nft text into tokens: quoted strings stay whole, braces, commas and
/// semicolons stand alone. An unterminated quote is an error.
pub(crate) fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut q = String::from('"');
                let mut closed = false;
                for c in chars.by_ref() {
                    q.push(c);
                    if c == '"' {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err("unterminated quote".into());
                }
                cur.push_str(&q);
            }
            '{' | '}' | ',' | ';' => {
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
    Ok(out)
}

/// Canonical text of one key component (IPs re-printed so `010.0.0.1` equals `10.0.0.1`).
fn canon(part: &str) -> String {
    match parse_ip_sloppy(part) {
        Some(ip) => ip.to_string(),
        None => part.to_string(),
    }
}

/// A priority: a number, a standard name, or `name + n` / `name - n`.
fn parse_priority(toks: &[String]) -> Option<i32> {
    let base = |s: &str| -> Option<i32> {
        Some(match s {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            n => n.parse().ok()?,
        })
    };
    let first = base(toks.first()?)?;
    match (toks.get(1).map(String::as_str), toks.get(2)) {
        (Some("+"), Some(n)) => Some(first + n.parse::<i32>().ok()?),
        (Some("-"), Some(n)) => Some(first - n.parse::<i32>().ok()?),
        _ => Some(first),
    }
}

/// Reads `type T hook H [device D] priority P ; [policy X ;]` out of chain-spec tokens.
fn parse_base_chain(toks: &[String]) -> Result<Option<BaseChain>, String> {
    let Some(h) = toks.iter().position(|t| t == "hook") else {
        return Ok(None);
    };
    let hook = toks
        .get(h + 1)
        .ok_or_else(|| "hook needs a name".to_string())?
        .clone();
    let p = toks
        .iter()
        .position(|t| t == "priority")
        .ok_or_else(|| "a base chain needs a priority".to_string())?;
    let end = toks[p + 1..]
        .iter()
        .position(|t| t == ";" || t == "}")
        .map_or(toks.len(), |e| p + 1 + e);
    let priority =
        parse_priority(&toks[p + 1..end]).ok_or_else(|| "bad chain priority".to_string())?;
    let policy_drop = toks
        .iter()
        .position(|t| t == "policy")
        .and_then(|i| toks.get(i + 1))
        .is_some_and(|p| p == "drop");
    Ok(Some(BaseChain {
        hook,
        priority,
        policy_drop,
    }))
}

/// Parses `{ k1 . k2 [comment "c"] [: verdict] , … }` into elements.
pub(crate) fn parse_elements(toks: &[String]) -> Result<Vec<Element>, String> {
    let start = toks
        .iter()
        .position(|t| t == "{")
        .ok_or_else(|| "elements need { … }".to_string())?;
    let mut out = Vec::new();
    let mut key: Vec<String> = Vec::new();
    let mut value: Option<Vec<String>> = None;
    let mut comment = None;
    let mut i = start + 1;
    let mut closed = false;
    while let Some(t) = toks.get(i) {
        i += 1;
        match t.as_str() {
            "," | "}" => {
                if !key.is_empty() {
                    out.push(Element {
                        key: key.iter().map(|k| canon(k)).collect::<Vec<_>>().join(" . "),
                        value: value.take().map(|v| v.join(" ")),
                        comment: comment.take(),
                    });
                } else if value.is_some() {
                    return Err("an element has a value but no key".into());
                }
                key.clear();
                if t == "}" {
                    closed = true;
                    break;
                }
            }
            "comment" => {
                comment = toks.get(i).map(|c| c.trim_matches('"').to_string());
                i += 1;
            }
            "timeout" | "expires" | "counter" => i += 1,
            "." => {}
            ":" => value = Some(Vec::new()),
            other => match value.as_mut() {
                Some(v) => v.push(other.to_string()),
                None => key.push(other.trim_end_matches(':').to_string()),
            },
        }
    }
    if !closed {
        return Err("elements are not closed with }".into());
    }
    Ok(out)
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
            name == "kube-proxy" && family.is_none_or(|f| f == fam || fam == "inet")
        };
        if let Some(t) = tables.iter().find(wanted) {
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
        tr.walk.finish()
    }
}

/// Parses `add …` lines (`nft -f` input; only the lines for one table are expected).
fn parse_add_lines(text: &str) -> Result<Table, TraceError> {
    let mut t = Table::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what: &str| TraceError::parse(n + 1, format!("{what}: {}", excerpt(line)));
        let toks = tokenize(line).map_err(|e| err(&e))?;
        // <verb> <object> <family> <table> <name> ...
        let verb = toks[0].as_str();
        let object = toks.get(1).map(String::as_str);
        if object == Some("table") {
            if toks.len() < 4 {
                return Err(err("a table needs a family and a name"));
            }
            t.name = format!("{} {}", toks[2], toks[3]);
            continue;
        }
        if toks.len() < 5 {
            return Err(err(
                "truncated line (needs <verb> <object> <family> <table> <name>)",
            ));
        }
        let name = toks[4].clone();
        let rest = &toks[5..];
        match (verb, object) {
            ("add" | "create", Some("chain")) => {
                t.chains.entry(name.clone()).or_default();
                if let Some(b) = parse_base_chain(rest).map_err(|e| err(&e))? {
                    t.base.insert(name, b);
                }
            }
            ("add" | "insert", Some("rule")) => {
                if rest.is_empty() {
                    return Err(err("a rule needs statements"));
                }
                t.add_rule(name, Rule::new(rest.to_vec()), verb == "insert");
            }
            ("flush", Some("chain")) => {
                t.chains.entry(name).or_default().clear();
            }
            ("delete", Some("chain")) => {
                t.chains.remove(&name);
                t.base.remove(&name);
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
                let elems = parse_elements(rest).map_err(|e| err(&e))?;
                let list = t.elements.entry(name).or_default();
                for e in elems {
                    list.retain(|old| old.key != e.key);
                    if verb != "delete" {
                        list.push(e);
                    }
                }
            }
            _ => return Err(err("unsupported line")),
        }
    }
    Ok(t)
}

/// Parses the kernel's block listing (`nft list table …` / `nft list ruleset`).
fn parse_blocks(text: &str) -> Result<Vec<Table>, TraceError> {
    #[derive(PartialEq)]
    enum In {
        Top,
        Table,
        Chain(String),
        Set(String),
        /// Blocks the tracer does not need (flowtables, named counters, …).
        Other(usize),
    }
    let mut tables = Vec::new();
    let mut cur: Option<Table> = None;
    let mut state = In::Top;
    // Elements may span lines: collect until their braces close.
    let mut pending: Option<(String, Vec<String>, usize)> = None;
    for (n, raw) in text.lines().enumerate() {
        // `nft -a` adds `# handle N`; a `#` inside a quoted comment is rare enough in
        // kube-proxy's tables that cutting at the first one outside quotes suffices.
        let line = strip_comment(raw).trim().to_string();
        if line.is_empty() {
            continue;
        }
        let err = |what: &str| TraceError::parse(n + 1, format!("{what}: {}", excerpt(raw.trim())));
        let toks = tokenize(&line).map_err(|e| err(&e))?;
        if let Some((set, mut acc, depth)) = pending.take() {
            let d = depth as isize + brace_delta(&toks);
            acc.extend(toks);
            if d <= 0 {
                finish_elements(cur.as_mut(), &set, &acc).map_err(|e| err(&e))?;
            } else {
                pending = Some((set, acc, d as usize));
            }
            continue;
        }
        match &mut state {
            In::Top => {
                if toks.first().map(String::as_str) != Some("table") || toks.len() < 4 {
                    return Err(err("expected `table FAMILY NAME {`"));
                }
                cur = Some(Table {
                    name: format!("{} {}", toks[1], toks[2]),
                    ..Table::default()
                });
                state = In::Table;
            }
            In::Table => {
                let Some(t) = cur.as_mut() else {
                    return Err(err("outside a table"));
                };
                match toks.first().map(String::as_str) {
                    Some("}") => {
                        tables.extend(cur.take());
                        state = In::Top;
                    }
                    Some("chain") => {
                        let name = toks.get(1).ok_or_else(|| err("a chain needs a name"))?;
                        let name = name.trim_matches('"').to_string();
                        t.chains.entry(name.clone()).or_default();
                        state = In::Chain(name);
                    }
                    Some("set" | "map") => {
                        let name = toks.get(1).ok_or_else(|| err("a set needs a name"))?;
                        let name = name.trim_matches('"').to_string();
                        t.elements.entry(name.clone()).or_default();
                        state = In::Set(name);
                    }
                    Some("comment" | "flags") => {}
                    Some(_) if toks.last().map(String::as_str) == Some("{") => {
                        state = In::Other(1);
                    }
                    _ => return Err(err("unexpected line in a table")),
                }
            }
            In::Chain(name) => {
                let Some(t) = cur.as_mut() else {
                    return Err(err("outside a table"));
                };
                match toks.first().map(String::as_str) {
                    Some("}") => state = In::Table,
                    Some("type") => {
                        if let Some(b) = parse_base_chain(&toks).map_err(|e| err(&e))? {
                            t.base.insert(name.clone(), b);
                        }
                    }
                    Some("comment") if toks.len() == 2 => {}
                    Some("policy") => {}
                    _ => t.add_rule(name.clone(), Rule::new(toks), false),
                }
            }
            In::Set(name) => match toks.first().map(String::as_str) {
                Some("}") => state = In::Table,
                Some("elements") => {
                    let d = brace_delta(&toks);
                    if d > 0 {
                        pending = Some((name.clone(), toks, d as usize));
                    } else {
                        finish_elements(cur.as_mut(), name, &toks).map_err(|e| err(&e))?;
                    }
                }
                _ => {}
            },
            In::Other(depth) => {
                let d = *depth as isize + brace_delta(&toks);
                if d <= 0 {
                    state = In::Table;
                } else {
                    *depth = d as usize;
                }
            }
        }
    }
    if pending.is_some() || state != In::Top {
        return Err(TraceError::parse(
            text.lines().count(),
            "the listing ends inside a block (truncated?)",
        ));
    }
    Ok(tables)
}

fn brace_delta(toks: &[String]) -> isize {
    toks.iter()
        .map(|t| match t.as_str() {
            "{" => 1,
            "}" => -1,
            _ => 0,
        })
        .sum()
}

fn finish_elements(t: Option<&mut Table>, set: &str, toks: &[String]) -> Result<(), String> {
    let t = t.ok_or_else(|| "elements outside a table".to_string())?;
    let elems = parse_elements(toks)?;
    t.elements.entry(set.to_string()).or_default().extend(elems);
    Ok(())
}

/// Cuts a `# …` comment that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
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
    walk: Walk,
    /// The packet mark as `mark set` statements leave it.
    mark: u32,
    /// The last map element that sent the packet on (`@map`, element comment), for
    /// reasons.
    via: Option<(String, Option<String>)>,
}

fn parse_num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Tracer<'_> {
    fn run(&mut self, chain: &str, p: &Packet) -> Flow {
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

    fn selector_value(&self, toks: &[String], i: &mut usize, p: &Packet) -> Option<String> {
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

    fn find_element(&self, set: &str, key: &str) -> Option<&Element> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::core::Outcome;

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
        assert_eq!(tr.endpoints[0].probability, 0.5);
        let tr = t.trace(&pkt("192.168.9.9"), &[]);
        assert!(tr.masquerade);
    }

    #[test]
    fn elements_parse_with_comments() {
        let e = parse_elements(
            &tokenize(r#"{ 172.30.0.046 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            e,
            vec![Element {
                key: "172.30.0.46 . tcp . 80".to_string(),
                value: Some("goto reject-chain".to_string()),
                comment: Some("ns6/svc6:p80".into()),
            }]
        );
    }

    fn with(extra: &str) -> String {
        format!("{TABLE}{extra}\n")
    }

    #[test]
    fn malformed_tables() {
        for (text, want) in [
            (with("add rule ip"), "truncated"),
            (with("add rule ip kube-proxy"), "truncated"),
            (with("add rule ip kube-proxy service-X"), "needs statements"),
            (
                with("add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto x"),
                "not closed",
            ),
            (
                with("add rule ip kube-proxy x comment \"open"),
                "unterminated quote",
            ),
            (
                "table ip kube-proxy {\n chain x {\n".to_string(),
                "truncated",
            ),
        ] {
            let e = Table::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn undecidable_paths_are_explicit() {
        // An unknown statement in an endpoint chain: an explicit unknown step.
        let t = Table::parse(&with(
            "insert rule ip kube-proxy endpoint-B frobnicate 7 dnat to 10.1.0.9:80",
        ))
        .unwrap();
        let tr = t.trace(&pkt("10.0.0.9"), &[]);
        assert_eq!(tr.unknown_steps().count(), 1);
        // A loop ends the trace as unknown.
        let t = Table::parse(&with("insert rule ip kube-proxy endpoint-A jump services")).unwrap();
        let tr = t.trace(&pkt("10.0.0.9"), &[]);
        assert!(matches!(tr.outcome(), Outcome::Unknown { reason } if reason.contains("loop")));
        // A bad DNAT target ends it as unknown, never as an endpoint.
        let t = Table::parse(&with(
            "insert rule ip kube-proxy endpoint-A dnat to 999.1.1.1:99999",
        ))
        .unwrap();
        let tr = t.trace(&pkt("10.0.0.9"), &[]);
        assert!(
            matches!(tr.outcome(), Outcome::Unknown { .. }),
            "{:?}",
            tr.outcome()
        );
        // numgen with fewer branches than its modulus.
        let t = Table::parse(&with(
            "insert rule ip kube-proxy service-X numgen random mod 3 vmap { 0 : goto endpoint-A }",
        ))
        .unwrap();
        let tr = t.trace(&pkt("10.0.0.9"), &[]);
        assert!(matches!(tr.outcome(), Outcome::Unknown { .. }));
    }
}
