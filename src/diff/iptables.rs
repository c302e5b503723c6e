//! iptables mode: `iptables-save` output parsed into a [`Ruleset`] holding only what
//! kube-proxy owns (its chains, its canaries, and the jump rules into them from the
//! built-in chains), normalized as upstream's tests do.

use std::collections::BTreeMap;

use super::{service_in_comment, Attribution, ChainDump, Ruleset};
use crate::iptables::normalize::{self, rule_param};

/// Why a dump could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iptables-save output, line {line}: {what}: {text:?}")]
pub(crate) struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub what: &'static str,
    /// The line.
    pub text: String,
}

/// kube-proxy's fixed chains (both tables), its canary, and its per-Service prefixes.
const FIXED: [&str; 9] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-FIREWALL",
    "KUBE-PROXY-CANARY",
];
const PER_SERVICE: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether kube-proxy writes this chain (kubelet's `KUBE-KUBELET-CANARY`,
/// `KUBE-IPTABLES-HINT`, and other programs' chains are not compared).
pub fn owned(chain: &str) -> bool {
    FIXED.contains(&chain) || is_per_service(chain)
}

fn is_per_service(chain: &str) -> bool {
    PER_SERVICE.iter().any(|p| chain.starts_with(p))
}

fn target(rule: &str) -> Option<String> {
    rule_param(rule, "-j").or_else(|| rule_param(rule, "-g"))
}

/// Parses one family's `iptables-save` output (`label` is `IPv4` or `IPv6`).
pub(crate) fn parse_save(text: &str, label: &str) -> Result<Ruleset, ParseError> {
    let mut tables: Vec<normalize::Table> = Vec::new();
    let mut builtin_rules: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut current: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |what| ParseError {
            line: i + 1,
            what,
            text: line.to_string(),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push(normalize::Table {
                name: name.to_string(),
                chains: Vec::new(),
            });
            current = Some(tables.len() - 1);
            continue;
        }
        let table = current
            .and_then(|t| tables.get_mut(t))
            .ok_or_else(|| err("outside a table"))?;
        if line == "COMMIT" {
            current = None;
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if owned(name) {
                table.chains.push(normalize::Chain {
                    name: name.to_string(),
                    counters: String::new(),
                    rules: Vec::new(),
                    deleted: false,
                });
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if let Some(c) = table.chains.iter_mut().find(|c| c.name == chain) {
                c.rules.push(line.to_string());
            } else if BUILTIN.contains(&chain) && target(line).is_some_and(|t| owned(&t)) {
                builtin_rules
                    .entry((table.name.clone(), chain.to_string()))
                    .or_default()
                    .push(line.to_string());
            }
        } else {
            return Err(err("unexpected line"));
        }
    }
    normalize::normalize_tables(&mut tables);
    let mut out = Ruleset::default();
    for t in tables {
        let scope = format!("{label} {}", t.name);
        for mut c in t.chains {
            // Upstream writes these in Go map order too (its normalizer happens to
            // leave them alone because its tests have one Service in them).
            if c.name == "KUBE-EXTERNAL-SERVICES" || c.name == "KUBE-PROXY-FIREWALL" {
                c.rules.sort_by_key(|r| comment_service(r));
            }
            out.chains.insert(
                (scope.clone(), c.name),
                ChainDump {
                    header: Vec::new(),
                    rules: c.rules,
                    ordered: true,
                    builtin: false,
                },
            );
        }
    }
    for ((table, chain), rules) in builtin_rules {
        out.chains.insert(
            (format!("{label} {table}"), chain),
            // Jump rules are inserted at the top one by one, so their order is history.
            ChainDump {
                header: Vec::new(),
                rules,
                ordered: false,
                builtin: true,
            },
        );
    }
    Ok(out)
}

fn comment_service(rule: &str) -> Option<String> {
    rule_param(rule, "--comment").and_then(|c| service_in_comment(&c))
}

/// Which Service port each per-Service chain serves, learnt from both sides' comments
/// (a chain's own rules, or the rules jumping to it).
#[derive(Debug, Default)]
pub(crate) struct Owners {
    chains: BTreeMap<String, String>,
}

impl Owners {
    /// Learns from every ruleset given.
    pub(crate) fn learn(sets: &[&Ruleset]) -> Owners {
        let mut chains: BTreeMap<String, String> = BTreeMap::new();
        for rs in sets {
            for ((_, name), c) in &rs.chains {
                if !is_per_service(name) || chains.contains_key(name) {
                    continue;
                }
                if let Some(s) = c.rules.iter().find_map(|r| comment_service(r)) {
                    chains.insert(name.clone(), s);
                }
            }
        }
        // Chains whose own rules carry no Service comment (e.g. a KUBE-EXT- chain):
        // follow the jumps, twice to reach SVC -> SEP and FW -> EXT -> SVC.
        for _ in 0..2 {
            for rs in sets {
                for ((_, name), c) in &rs.chains {
                    for r in &c.rules {
                        let Some(t) = target(r) else { continue };
                        if !is_per_service(&t) || chains.contains_key(&t) {
                            continue;
                        }
                        let from = comment_service(r).or_else(|| chains.get(name).cloned());
                        if let Some(s) = from {
                            chains.insert(t, s);
                        }
                    }
                }
            }
        }
        Owners { chains }
    }
}

impl Attribution for Owners {
    fn chain(&self, _scope: &str, name: &str) -> Option<String> {
        self.chains.get(name).cloned()
    }

    fn rule(&self, _scope: &str, _chain: &str, rule: &str) -> Option<String> {
        comment_service(rule).or_else(|| target(rule).and_then(|t| self.chains.get(&t).cloned()))
    }

    fn element(&self, _scope: &str, _set: &str, _element: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-nft-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAA - [0:0]
:KUBE-SEP-BBBB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A KUBE-SERVICES -m comment --comment "ns2/b:p cluster IP" -j KUBE-SVC-CCCC
-A KUBE-SERVICES -m comment --comment "ns1/a:p cluster IP" -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAA
-A KUBE-SVC-AAAA -j KUBE-SEP-BBBB
-A KUBE-SEP-BBBB -p tcp -m tcp -j DNAT --to-destination 10.1.0.1:80
COMMIT
"#;

    #[test]
    fn only_kube_proxys_objects_are_kept_and_normalized() {
        let rs = parse_save(SAVE, "IPv4").unwrap();
        let names: Vec<String> = rs.chains.keys().map(|(s, n)| format!("{s} {n}")).collect();
        assert_eq!(
            names,
            [
                "IPv4 mangle KUBE-PROXY-CANARY",
                "IPv4 nat KUBE-SEP-BBBB",
                "IPv4 nat KUBE-SERVICES",
                "IPv4 nat KUBE-SVC-AAAA",
                "IPv4 nat PREROUTING"
            ]
        );
        let svc = &rs.chains[&("IPv4 nat".to_string(), "KUBE-SERVICES".to_string())];
        assert!(svc.rules[0].contains("ns1/a:p"), "{:?}", svc.rules);
        let pre = &rs.chains[&("IPv4 nat".to_string(), "PREROUTING".to_string())];
        assert_eq!(pre.rules.len(), 1);
        assert!(pre.builtin && !pre.ordered);
    }

    #[test]
    fn chains_are_attributed_through_jumps() {
        let rs = parse_save(SAVE, "IPv4").unwrap();
        let o = Owners::learn(&[&rs]);
        assert_eq!(o.chain("", "KUBE-SVC-AAAA").as_deref(), Some("ns1/a:p"));
        assert_eq!(o.chain("", "KUBE-SEP-BBBB").as_deref(), Some("ns1/a:p"));
        assert_eq!(o.chain("", "KUBE-SERVICES"), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_save("*nat\nbogus\n", "IPv4").is_err());
    }
}
