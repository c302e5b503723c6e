//! The three text forms of a table: `add …` lines, the kernel's block listing, and
//! the element syntax both share.

use super::{BaseChain, Element, Rule, Table};
use crate::model::ip::parse_ip_sloppy;
use crate::trace::core::{excerpt, TraceError};

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

/// Parses `add …` lines (`nft -f` input; only the lines for one table are expected).
pub(super) fn parse_add_lines(text: &str) -> Result<Table, TraceError> {
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
pub(super) fn parse_blocks(text: &str) -> Result<Vec<Table>, TraceError> {
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
