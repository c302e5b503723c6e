//! Upstream's comparison normalization of iptables-restore text (its tests' sort), so
//! that our deterministic output can be compared with upstream's expected dumps.
//!
//! Tables are sorted by name; chains `KUBE-NODEPORTS`, `KUBE-SERVICES`, other `KUBE-*`,
//! then the rest, each group alphabetical; rules are grouped per chain keeping their
//! order, except `KUBE-NODEPORTS` and `KUBE-SERVICES`, which are stable-sorted by the
//! service name in their comment (nat `KUBE-SERVICES` keeps the nodeports rule last).

/// Why a dump could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    /// A line that does not fit where it stands.
    #[error("line {line}: {what}: {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
        /// The line.
        text: String,
    },
    /// The dump ended inside a table.
    #[error("missing COMMIT at end of input")]
    MissingCommit,
}

/// One chain of a parsed dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: String,
    /// Declared counters.
    pub counters: String,
    /// `-A` lines, as written.
    pub rules: Vec<String>,
    /// Whether a `-X` line deletes it.
    pub deleted: bool,
}

/// One table of a parsed dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Table name.
    pub name: String,
    /// Chains in declaration order.
    pub chains: Vec<Chain>,
}

/// Parses restore text into tables.
pub fn parse(text: &str) -> Result<Vec<Table>, NormalizeError> {
    let mut tables: Vec<Table> = Vec::new();
    let mut in_table = false;
    let mut decls_done = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what| NormalizeError::Parse {
            line: i + 1,
            what,
            text: line.to_string(),
        };
        if !in_table {
            let name = line
                .strip_prefix('*')
                .ok_or_else(|| err("expected table declaration"))?;
            tables.push(Table {
                name: name.to_string(),
                chains: Vec::new(),
            });
            in_table = true;
            decls_done = false;
            continue;
        }
        let Some(table) = tables.last_mut() else {
            return Err(err("no table"));
        };
        if !decls_done {
            if let Some(rest) = line.strip_prefix(':') {
                let (name, counters) = rest
                    .split_once(" - ")
                    .ok_or_else(|| err("bad chain declaration"))?;
                table.chains.push(Chain {
                    name: name.to_string(),
                    counters: counters.to_string(),
                    rules: Vec::new(),
                    deleted: false,
                });
                continue;
            }
            decls_done = true;
        }
        if let Some(rest) = line.strip_prefix("-A ") {
            let name = rest.split(' ').next().unwrap_or_default();
            let chain = table
                .chains
                .iter_mut()
                .find(|c| c.name == name)
                .ok_or_else(|| err("rule for undeclared chain"))?;
            if chain.deleted {
                return Err(err("rule added to deleted chain"));
            }
            chain.rules.push(line.to_string());
        } else if let Some(name) = line.strip_prefix("-X ") {
            let chain = table
                .chains
                .iter_mut()
                .find(|c| c.name == name.trim())
                .ok_or_else(|| err("-X for undeclared chain"))?;
            if !chain.rules.is_empty() {
                return Err(err("-X after rules"));
            }
            chain.deleted = true;
        } else if line == "COMMIT" {
            in_table = false;
        } else {
            return Err(err("unparseable line"));
        }
    }
    if in_table {
        return Err(NormalizeError::MissingCommit);
    }
    Ok(tables)
}

/// Splits a rule into words, keeping double-quoted words whole (quotes removed).
pub fn words(rule: &str) -> Vec<String> {
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
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                w.push(c);
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
    out
}

/// The value following `param` in a rule, skipping `-m MODULE` pairs.
pub fn rule_param(rule: &str, param: &str) -> Option<String> {
    let w = words(rule);
    let mut i = 0;
    while i < w.len() {
        if w[i] == "-m" && i + 1 < w.len() {
            i += 2;
            continue;
        }
        if w[i] == param && i + 1 < w.len() {
            return Some(w[i + 1].clone());
        }
        i += 1;
    }
    None
}

fn service_name(rule: &str) -> Option<String> {
    let c = rule_param(rule, "--comment")?;
    Some(match c.find([' ', ':']) {
        Some(i) => c[..i].to_string(),
        None => c,
    })
}

fn is_last_rule(rule: &str) -> bool {
    rule_param(rule, "--comment").is_some_and(|c| c.contains("must be the last rule"))
}

/// Insertion sort: stable for any "less" relation, which upstream's comparator is not
/// quite (rules without a comment are never less), so this reproduces its result.
fn stable_sort(rules: &mut Vec<String>, less: impl Fn(&str, &str) -> bool) {
    let mut out: Vec<String> = Vec::with_capacity(rules.len());
    for r in rules.drain(..) {
        let mut i = out.len();
        while i > 0 && less(&r, &out[i - 1]) {
            i -= 1;
        }
        out.insert(i, r);
    }
    *rules = out;
}

fn by_service(a: &str, b: &str) -> bool {
    match (service_name(a), service_name(b)) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

fn chain_rank(name: &str) -> (u8, &str) {
    match name {
        "KUBE-NODEPORTS" => (0, name),
        "KUBE-SERVICES" => (1, name),
        n if n.starts_with("KUBE-") => (2, n),
        n => (3, n),
    }
}

/// Sorts parsed tables in place the way upstream's tests do.
pub(crate) fn normalize_tables(tables: &mut [Table]) {
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    for t in tables.iter_mut() {
        t.chains
            .sort_by(|a, b| chain_rank(&a.name).cmp(&chain_rank(&b.name)));
        let is_nat = t.name == "nat";
        let is_filter = t.name == "filter";
        for c in t.chains.iter_mut() {
            let by_name = (c.name == "KUBE-NODEPORTS" && (is_nat || is_filter))
                || (c.name == "KUBE-SERVICES" && is_filter);
            if by_name {
                stable_sort(&mut c.rules, by_service);
            } else if c.name == "KUBE-SERVICES" && is_nat {
                stable_sort(&mut c.rules, |a, b| {
                    if is_last_rule(a) {
                        false
                    } else if is_last_rule(b) {
                        true
                    } else {
                        by_service(a, b)
                    }
                });
            }
        }
    }
}

/// Writes tables back as restore text.
pub(crate) fn serialize(tables: &[Table]) -> String {
    let mut out = String::new();
    for t in tables {
        out.push('*');
        out.push_str(&t.name);
        out.push('\n');
        for c in &t.chains {
            out.push_str(&format!(":{} - {}\n", c.name, c.counters));
        }
        for c in &t.chains {
            for r in &c.rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        for c in t.chains.iter().filter(|c| c.deleted) {
            out.push_str(&format!("-X {}\n", c.name));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Parses, sorts and re-serializes restore text.
pub fn normalize(text: &str) -> Result<String, NormalizeError> {
    let mut tables = parse(text)?;
    normalize_tables(&mut tables);
    Ok(serialize(&tables))
}

/// The raw rule lines of one chain, in output order (upstream's single-chain check).
pub fn chain_rules(text: &str, table: &str, chain: &str) -> Result<Vec<String>, NormalizeError> {
    Ok(parse(text)?
        .into_iter()
        .filter(|t| t.name == table)
        .flat_map(|t| t.chains)
        .filter(|c| c.name == chain)
        .flat_map(|c| c.rules)
        .collect())
}
