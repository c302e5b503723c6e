//! nftables mode: `nft -s list table <family> kube-proxy` output parsed into a
//! [`Ruleset`]. Only kube-proxy's own table is ever listed, so nothing of other programs
//! needs filtering; element order (kernel hash order) and counters are ignored.
//!
//! Why the `nft` listing rather than a netlink read: `nftables::netlink::read_table`
//! reads back chains, sets and the managed elements, not rule expressions, and the
//! listing is the form operators read anyway.

use std::collections::BTreeMap;

use super::{service_in_comment, Attribution, ChainDump, Ruleset, SetDump};

/// Why a listing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nft listing, line {line}: {what}: {text:?}")]
pub(crate) struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub what: &'static str,
    /// The line.
    pub text: String,
}

enum Block {
    None,
    Table(String),
    Chain(String, String),
    Set(String, String),
}

/// Splits `a, b, c` at top-level commas (not inside quotes or braces).
fn split_elements(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut depth) = (false, 0usize);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|e| clean_element(e.trim()))
        .filter(|e| !e.is_empty())
        .collect()
}

/// Drops what changes while rules stay the same (`expires` of dynamic elements).
fn clean_element(e: &str) -> String {
    let mut words: Vec<&str> = Vec::new();
    let mut it = e.split(' ').peekable();
    while let Some(w) = it.next() {
        if w == "expires" {
            it.next();
            continue;
        }
        words.push(w);
    }
    words.join(" ")
}

/// Whether a line opens a block (`... {`) outside quotes.
fn brace_balance(s: &str) -> i32 {
    let mut quoted = false;
    let mut n = 0;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => n += 1,
            '}' if !quoted => n -= 1,
            _ => {}
        }
    }
    n
}

/// Parses the listing of one or more tables.
pub(crate) fn parse_list(text: &str) -> Result<Ruleset, ParseError> {
    let mut out = Ruleset::default();
    let mut block = Block::None;
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let line = raw.trim();
        let err = |what| ParseError {
            line: i + 1,
            what,
            text: line.to_string(),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match &block {
            Block::None => {
                let rest = line
                    .strip_prefix("table ")
                    .and_then(|r| r.strip_suffix(" {"))
                    .ok_or_else(|| err("expected a table"))?;
                out.tables.insert(rest.to_string(), Vec::new());
                block = Block::Table(rest.to_string());
            }
            Block::Table(scope) => {
                let scope = scope.clone();
                if line == "}" {
                    block = Block::None;
                } else if let Some(name) = line
                    .strip_prefix("chain ")
                    .and_then(|r| r.strip_suffix(" {"))
                {
                    out.chains.insert(
                        (scope.clone(), name.to_string()),
                        ChainDump {
                            ordered: true,
                            ..ChainDump::default()
                        },
                    );
                    block = Block::Chain(scope, name.to_string());
                } else if let Some(name) = line
                    .strip_prefix("set ")
                    .or_else(|| line.strip_prefix("map "))
                    .and_then(|r| r.strip_suffix(" {"))
                {
                    let kind = if line.starts_with("map ") {
                        "map"
                    } else {
                        "set"
                    };
                    out.sets.insert(
                        (scope.clone(), name.to_string()),
                        SetDump {
                            header: vec![kind.to_string()],
                            ..SetDump::default()
                        },
                    );
                    block = Block::Set(scope, name.to_string());
                } else if brace_balance(line) == 0 {
                    if let Some(h) = out.tables.get_mut(&scope) {
                        h.push(line.to_string());
                    }
                } else {
                    return Err(err("unknown object"));
                }
            }
            Block::Chain(scope, name) => {
                let key = (scope.clone(), name.clone());
                if line == "}" {
                    block = Block::Table(scope.clone());
                    continue;
                }
                let Some(c) = out.chains.get_mut(&key) else {
                    return Err(err("chain vanished"));
                };
                // Base-chain properties and the chain comment come before any rule.
                let is_header = c.rules.is_empty()
                    && (line.starts_with("type ") || line.starts_with("comment \""));
                if is_header {
                    c.header.push(line.to_string());
                } else {
                    c.rules.push(strip_counters(line));
                }
            }
            Block::Set(scope, name) => {
                let key = (scope.clone(), name.clone());
                if line == "}" {
                    block = Block::Table(scope.clone());
                    continue;
                }
                let Some(s) = out.sets.get_mut(&key) else {
                    return Err(err("set vanished"));
                };
                if let Some(first) = line.strip_prefix("elements = {") {
                    let mut body = first.to_string();
                    let mut balance = 1 + brace_balance(first);
                    while balance > 0 {
                        let (_, more) = lines.next().ok_or_else(|| err("unterminated elements"))?;
                        body.push(' ');
                        body.push_str(more.trim());
                        balance += brace_balance(more);
                    }
                    let body = body.trim_end().strip_suffix('}').unwrap_or(&body);
                    s.elements.extend(split_elements(body));
                } else {
                    s.header.push(line.to_string());
                }
            }
        }
    }
    if !matches!(block, Block::None) {
        return Err(ParseError {
            line: text.lines().count(),
            what: "listing ends inside a block",
            text: String::new(),
        });
    }
    Ok(out)
}

/// `counter packets 12 bytes 800` -> `counter` (in case a listing was not stateless).
fn strip_counters(rule: &str) -> String {
    let words: Vec<&str> = rule.split(' ').collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "counter" && words.get(i + 1) == Some(&"packets") {
            out.push("counter");
            i += 5;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

/// The Service port in a per-Service chain's name:
/// `service-HASH-ns/name/proto/port[__ip/port]` -> `ns/name:port`.
pub fn service_of_chain(name: &str) -> Option<String> {
    let mut parts = name.splitn(3, '-');
    let (_prefix, hash, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if hash.len() != 8 {
        return None;
    }
    let base = rest.split("__").next()?;
    let mut f = base.split('/');
    let (ns, svc, _proto, port) = (f.next()?, f.next()?, f.next()?, f.next()?);
    Some(format!("{ns}/{svc}:{port}"))
}

fn quoted(s: &str) -> impl Iterator<Item = &str> {
    s.split('"').skip(1).step_by(2)
}

fn service_of_text(text: &str) -> Option<String> {
    quoted(text).find_map(service_in_comment).or_else(|| {
        text.split_whitespace()
            .filter(|w| w.contains('/'))
            .find_map(service_of_chain)
    })
}

/// Attribution for nftables: chain names carry their Service port; elements carry it in
/// their comment or verdict, else (plain ClusterIPs) through the Service IP maps.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    ips: BTreeMap<String, String>,
}

impl Owners {
    /// Learns which Service port each Service IP belongs to.
    pub(crate) fn learn(sets: &[&Ruleset]) -> Owners {
        let mut ips = BTreeMap::new();
        for rs in sets {
            for ((_, name), s) in &rs.sets {
                if name != "service-ips" && name != "no-endpoint-services" {
                    continue;
                }
                for e in &s.elements {
                    if let (Some(ip), Some(svc)) = (e.split(' ').next(), service_of_text(e)) {
                        ips.entry(ip.to_string()).or_insert(svc);
                    }
                }
            }
        }
        Owners { ips }
    }
}

impl Attribution for Owners {
    fn chain(&self, _scope: &str, name: &str) -> Option<String> {
        service_of_chain(name)
    }

    fn rule(&self, _scope: &str, _chain: &str, rule: &str) -> Option<String> {
        service_of_text(rule)
    }

    fn element(&self, _scope: &str, _set: &str, element: &str) -> Option<String> {
        service_of_text(element).or_else(|| {
            element
                .split(' ')
                .next()
                .and_then(|ip| self.ips.get(ip).cloned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"table ip kube-proxy {
	comment "rules for kube-proxy"
	set cluster-ips {
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 172.30.0.41, 172.30.0.42,
			     172.30.0.43 }
	}

	map no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop,
			     172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
	}

	chain filter-input {
		type filter hook input priority -110; policy accept;
		ct state new jump firewall-check
	}

	chain service-ULMVA6XW-ns1/svc1/tcp/p80 {
		ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 counter packets 3 bytes 180 jump mark-for-masquerade
		numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
	}
}
"#;

    #[test]
    fn listing_is_parsed_into_objects() {
        let rs = parse_list(LISTING).unwrap();
        let scope = "ip kube-proxy".to_string();
        assert_eq!(rs.tables[&scope], vec!["comment \"rules for kube-proxy\""]);
        let ips = &rs.sets[&(scope.clone(), "cluster-ips".into())];
        assert_eq!(ips.elements.len(), 3);
        assert!(ips.elements.contains("172.30.0.43"));
        let m = &rs.sets[&(scope.clone(), "no-endpoint-services".into())];
        assert_eq!(m.elements.len(), 2, "{:?}", m.elements);
        let input = &rs.chains[&(scope.clone(), "filter-input".into())];
        assert_eq!(input.header.len(), 1);
        assert_eq!(input.rules, vec!["ct state new jump firewall-check"]);
        let svc = &rs.chains[&(scope, "service-ULMVA6XW-ns1/svc1/tcp/p80".into())];
        assert!(svc.rules[0].contains(" counter jump"), "{:?}", svc.rules);
    }

    #[test]
    fn objects_are_attributed_to_service_ports() {
        let rs = parse_list(LISTING).unwrap();
        let o = Owners::learn(&[&rs]);
        assert_eq!(
            o.chain(
                "",
                "endpoint-5OJB2KTY-kube-system/kube-dns/udp/dns__10.180.0.1/53"
            )
            .as_deref(),
            Some("kube-system/kube-dns:dns")
        );
        assert_eq!(o.chain("", "filter-input"), None);
        assert_eq!(
            o.element("", "cluster-ips", "172.30.0.42").as_deref(),
            Some("ns2/svc2:p80")
        );
        assert_eq!(
            o.element(
                "",
                "x",
                "1.2.3.4 . tcp . 80 comment \"ns2/svc2:p80\" : drop"
            )
            .as_deref(),
            Some("ns2/svc2:p80")
        );
    }

    #[test]
    fn truncated_listing_is_an_error() {
        assert!(parse_list("table ip kube-proxy {\n\tchain x {\n").is_err());
    }
}
