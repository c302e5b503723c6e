//! `kproxy diff` and shadow mode: compare the rules kproxy would write with the rules
//! live in a network namespace.
//!
//! Both sides arrive as kernel dumps (`iptables-save`, `nft -s list table`), the desired
//! side after being applied into a scratch network namespace ([`live::Scratch`]), so
//! formatting (`/32`, option order, `0.50000000000`, nft's listing syntax) never shows
//! up as a difference. Everything here except [`live`] is pure: two [`Ruleset`]s in,
//! [`Difference`]s out, grouped by Service port.

pub mod iptables;
pub mod live;
mod maps;
pub mod nftables;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};

/// One chain of a dump, in the comparison's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainDump {
    /// Lines describing the chain itself (nftables: type/hook/policy, comment).
    pub header: Vec<String>,
    /// Rules, as the kernel lists them.
    pub rules: Vec<String>,
    /// Whether rule order is significant (it is not in chains upstream writes in Go map
    /// order, or where jump rules are inserted in history order).
    pub(crate) ordered: bool,
    /// A built-in chain (iptables): only the jump rules into kube-proxy's chains are
    /// kept, and a side without any has it empty rather than missing.
    pub(crate) builtin: bool,
}

/// One set or map of a dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetDump {
    /// Lines describing the set (type, flags, comment).
    pub header: Vec<String>,
    /// Elements (order never matters).
    pub elements: BTreeSet<String>,
}

/// Where an object lives: `IPv4 nat`, `ip kube-proxy`, ...
pub type Scope = String;

/// A parsed, filtered dump: only the objects kube-proxy owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chains by (scope, name).
    pub chains: BTreeMap<(Scope, String), ChainDump>,
    /// Sets and maps by (scope, name).
    pub sets: BTreeMap<(Scope, String), SetDump>,
    /// Tables present, with their own header lines (nftables: the table comment).
    pub tables: BTreeMap<Scope, Vec<String>>,
}

impl Ruleset {
    /// Adds every object of `other` (another family or table).
    pub fn extend(&mut self, other: Ruleset) {
        self.chains.extend(other.chains);
        self.sets.extend(other.sets);
        self.tables.extend(other.tables);
    }

    /// Rules, chains and elements in all.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.chains.len(),
            self.chains.values().map(|c| c.rules.len()).sum(),
            self.sets.values().map(|s| s.elements.len()).sum(),
        )
    }
}

/// Whether kproxy would write something the node lacks, or the node has something
/// kproxy would not write, or both have it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// kproxy would write it; it is not live.
    Missing,
    /// Live, but kproxy would not write it.
    Extra,
    /// Both have it, differently (rule order, chain or set properties).
    Different,
}

impl Kind {
    /// The word in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Different => "different",
        }
    }
}

/// What differs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    /// A whole table (nftables).
    Table {
        /// `ip kube-proxy`.
        scope: Scope,
    },
    /// A whole chain (with this many rules), or its properties / rule order.
    Chain {
        /// Table.
        scope: Scope,
        /// Chain.
        name: String,
        /// Rules in it (on the side that has it).
        rules: usize,
        /// For `Different`: what differs.
        detail: String,
    },
    /// One rule of a chain both sides have.
    Rule {
        /// Table.
        scope: Scope,
        /// Chain.
        chain: String,
        /// The rule as listed.
        text: String,
    },
    /// A whole set or map, or its properties.
    Set {
        /// Table.
        scope: Scope,
        /// Set or map.
        name: String,
        /// Elements in it (on the side that has it).
        elements: usize,
        /// For `Different`: what differs.
        detail: String,
    },
    /// One element of a set both sides have.
    Element {
        /// Table.
        scope: Scope,
        /// Set or map.
        set: String,
        /// The element as listed.
        text: String,
    },
}

/// One difference, attributed to a Service port where it belongs to one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    /// `namespace/name:port`, or `None` for the shared chains.
    pub service: Option<String>,
    /// Missing, extra or different.
    pub kind: Kind,
    /// The object.
    pub object: Object,
}

/// Says which Service port an object belongs to (mode specific).
pub trait Attribution {
    /// The Service port of a chain, if it is a per-Service one.
    fn chain(&self, scope: &str, name: &str) -> Option<String>;
    /// The Service port of a rule in `chain`.
    fn rule(&self, scope: &str, chain: &str, rule: &str) -> Option<String>;
    /// The Service port of a set element.
    fn element(&self, scope: &str, set: &str, element: &str) -> Option<String>;
}

/// Both sides and what differs between them.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// What kproxy would write.
    pub desired: Ruleset,
    /// What is live.
    pub live: Ruleset,
    /// The differences.
    pub differences: Vec<Difference>,
}

impl Outcome {
    /// Compares two maps-layout rulesets (`kproxy` tables), attributing elements
    /// through the cluster `states` (one per family) the desired side came from.
    pub fn maps(states: &[&crate::model::ProxyState], desired: Ruleset, live: Ruleset) -> Outcome {
        let differences = compare(&desired, &live, &maps::MapsOwners::learn(states));
        Outcome {
            desired,
            live,
            differences,
        }
    }

    /// Compares two rulesets of `mode`, attributing with that mode's naming.
    pub fn new(mode: crate::config::Mode, desired: Ruleset, live: Ruleset) -> Outcome {
        let differences = match mode {
            crate::config::Mode::Iptables => compare(
                &desired,
                &live,
                &iptables::Owners::learn(&[&desired, &live]),
            ),
            crate::config::Mode::Nftables => compare(
                &desired,
                &live,
                &nftables::Owners::learn(&[&desired, &live]),
            ),
        };
        Outcome {
            desired,
            live,
            differences,
        }
    }

    /// Whether the two sides are the same.
    pub fn is_same(&self) -> bool {
        self.differences.is_empty()
    }

    /// The grouped report with its summary line.
    pub fn report(&self) -> String {
        report::render(&self.differences, &self.desired, &self.live)
    }
}

/// Whether any rule or element of `scope` names `chain`.
fn referenced(rs: &Ruleset, scope: &str, chain: &str) -> bool {
    let names = |text: &str| {
        text.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}' || c == '"')
            .any(|w| w == chain)
    };
    rs.chains
        .iter()
        .filter(|((s, _), _)| s == scope)
        .any(|(_, c)| c.rules.iter().any(|r| names(r)))
        || rs
            .sets
            .iter()
            .filter(|((s, _), _)| s == scope)
            .any(|(_, set)| set.elements.iter().any(|e| names(e)))
}

/// Multiset difference: items of `a` not matched in `b`, in `a`'s order.
fn minus<'a>(a: &'a [String], b: &[String]) -> Vec<&'a String> {
    let mut left: BTreeMap<&str, usize> = BTreeMap::new();
    for x in b {
        *left.entry(x.as_str()).or_default() += 1;
    }
    a.iter()
        .filter(|x| match left.get_mut(x.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .collect()
}

/// Compares the desired rules with the live ones.
pub fn compare(desired: &Ruleset, live: &Ruleset, who: &dyn Attribution) -> Vec<Difference> {
    let mut out = Vec::new();
    for (scope, header) in &desired.tables {
        match live.tables.get(scope) {
            None => out.push(Difference {
                service: None,
                kind: Kind::Missing,
                object: Object::Table {
                    scope: scope.clone(),
                },
            }),
            Some(h) if h != header => out.push(Difference {
                service: None,
                kind: Kind::Different,
                object: Object::Chain {
                    scope: scope.clone(),
                    name: "(table)".into(),
                    rules: 0,
                    detail: format!("{:?} instead of {:?}", h, header),
                },
            }),
            Some(_) => {}
        }
    }
    for scope in live.tables.keys() {
        if !desired.tables.contains_key(scope) {
            out.push(Difference {
                service: None,
                kind: Kind::Extra,
                object: Object::Table {
                    scope: scope.clone(),
                },
            });
        }
    }
    let chain_keys: BTreeSet<&(Scope, String)> =
        desired.chains.keys().chain(live.chains.keys()).collect();
    for key in chain_keys {
        let (scope, name) = key;
        let owner = who.chain(scope, name);
        let empty = ChainDump::default();
        let (d, l) = (desired.chains.get(key), live.chains.get(key));
        let (d, l) = match (d, l) {
            (Some(x), None) if x.builtin => (d, Some(&empty)),
            (None, Some(x)) if x.builtin => (Some(&empty), l),
            _ => (d, l),
        };
        match (d, l) {
            (Some(d), None) | (None, Some(d)) => {
                let kind = if live.chains.contains_key(key) {
                    Kind::Extra
                } else {
                    Kind::Missing
                };
                // A flushed per-Service chain nothing refers to is one waiting for its
                // delayed deletion (upstream and kproxy both delete stale chains a
                // little later, each on its own clock): no packet can reach it.
                let side = if kind == Kind::Extra { live } else { desired };
                if d.rules.is_empty() && owner.is_some() && !referenced(side, scope, name) {
                    continue;
                }
                // A chain's owner may only be visible from its rules.
                let service = owner
                    .clone()
                    .or_else(|| d.rules.iter().find_map(|r| who.rule(scope, name, r)));
                out.push(Difference {
                    service,
                    kind,
                    object: Object::Chain {
                        scope: scope.clone(),
                        name: name.clone(),
                        rules: d.rules.len(),
                        detail: String::new(),
                    },
                });
            }
            (Some(d), Some(l)) => {
                if d.header != l.header {
                    out.push(Difference {
                        service: owner.clone(),
                        kind: Kind::Different,
                        object: Object::Chain {
                            scope: scope.clone(),
                            name: name.clone(),
                            rules: l.rules.len(),
                            detail: format!(
                                "properties {:?} instead of {:?}",
                                l.header.join("; "),
                                d.header.join("; ")
                            ),
                        },
                    });
                }
                let missing = minus(&d.rules, &l.rules);
                let extra = minus(&l.rules, &d.rules);
                for (kind, rules) in [(Kind::Missing, &missing), (Kind::Extra, &extra)] {
                    for r in rules {
                        out.push(Difference {
                            service: owner.clone().or_else(|| who.rule(scope, name, r)),
                            kind,
                            object: Object::Rule {
                                scope: scope.clone(),
                                chain: name.clone(),
                                text: (*r).clone(),
                            },
                        });
                    }
                }
                if missing.is_empty() && extra.is_empty() && d.ordered && d.rules != l.rules {
                    out.push(Difference {
                        service: owner,
                        kind: Kind::Different,
                        object: Object::Chain {
                            scope: scope.clone(),
                            name: name.clone(),
                            rules: l.rules.len(),
                            detail: "same rules in a different order".into(),
                        },
                    });
                }
            }
            (None, None) => {}
        }
    }
    let set_keys: BTreeSet<&(Scope, String)> =
        desired.sets.keys().chain(live.sets.keys()).collect();
    for key in set_keys {
        let (scope, name) = key;
        match (desired.sets.get(key), live.sets.get(key)) {
            (Some(d), None) | (None, Some(d)) => {
                let kind = if live.sets.contains_key(key) {
                    Kind::Extra
                } else {
                    Kind::Missing
                };
                out.push(Difference {
                    service: None,
                    kind,
                    object: Object::Set {
                        scope: scope.clone(),
                        name: name.clone(),
                        elements: d.elements.len(),
                        detail: String::new(),
                    },
                });
            }
            (Some(d), Some(l)) => {
                if d.header != l.header {
                    out.push(Difference {
                        service: None,
                        kind: Kind::Different,
                        object: Object::Set {
                            scope: scope.clone(),
                            name: name.clone(),
                            elements: l.elements.len(),
                            detail: format!(
                                "properties {:?} instead of {:?}",
                                l.header.join("; "),
                                d.header.join("; ")
                            ),
                        },
                    });
                }
                for (kind, a, b) in [
                    (Kind::Missing, &d.elements, &l.elements),
                    (Kind::Extra, &l.elements, &d.elements),
                ] {
                    for e in a.difference(b) {
                        out.push(Difference {
                            service: who.element(scope, name, e),
                            kind,
                            object: Object::Element {
                                scope: scope.clone(),
                                set: name.clone(),
                                text: e.clone(),
                            },
                        });
                    }
                }
            }
            (None, None) => {}
        }
    }
    out
}

/// A Service port named at the start of an upstream comment or inside one
/// (`ns/name:port`, `ns/name:port cluster IP`, `masquerade traffic for ns/name:port ...`).
pub(crate) fn service_in_comment(comment: &str) -> Option<String> {
    comment
        .split_whitespace()
        .map(|w| w.trim_matches('"'))
        .find(|w| is_service_port_name(w))
        .map(str::to_string)
}

fn is_service_port_name(w: &str) -> bool {
    let (svc, port) = match w.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (w, None),
    };
    let Some((ns, name)) = svc.split_once('/') else {
        return false;
    };
    let dns = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    dns(ns)
        && dns(name)
        && port.is_none_or(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoOne;
    impl Attribution for NoOne {
        fn chain(&self, _: &str, name: &str) -> Option<String> {
            name.strip_prefix("SVC-").map(str::to_string)
        }
        fn rule(&self, _: &str, _: &str, rule: &str) -> Option<String> {
            service_in_comment(rule)
        }
        fn element(&self, _: &str, _: &str, e: &str) -> Option<String> {
            service_in_comment(e)
        }
    }

    fn chain(rules: &[&str], ordered: bool) -> ChainDump {
        ChainDump {
            header: vec![],
            rules: rules.iter().map(|r| r.to_string()).collect(),
            ordered,
            builtin: false,
        }
    }

    fn set(els: &[&str]) -> SetDump {
        SetDump {
            header: vec!["type ipv4_addr".into()],
            elements: els.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn key(n: &str) -> (Scope, String) {
        ("t".to_string(), n.to_string())
    }

    #[test]
    fn same_rulesets_have_no_differences() {
        let mut a = Ruleset::default();
        a.chains.insert(key("SVC-ns/a:p"), chain(&["x", "y"], true));
        a.sets.insert(key("s"), set(&["1", "2"]));
        assert!(compare(&a, &a.clone(), &NoOne).is_empty());
    }

    #[test]
    fn rule_changes_are_attributed_to_the_chain_owner_or_the_comment() {
        let mut d = Ruleset::default();
        d.chains
            .insert(key("SVC-ns/a:p"), chain(&["p 0.5", "p 1"], true));
        d.chains.insert(
            key("SERVICES"),
            chain(&["ns/a:p cluster IP", "ns/b:q cluster IP"], false),
        );
        let mut l = Ruleset::default();
        l.chains
            .insert(key("SVC-ns/a:p"), chain(&["p 0.3", "p 1"], true));
        l.chains.insert(
            key("SERVICES"),
            chain(&["ns/b:q cluster IP", "ns/a:p cluster IP"], false),
        );
        let diffs = compare(&d, &l, &NoOne);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(diffs.iter().all(|x| x.service.as_deref() == Some("ns/a:p")));
        assert_eq!(diffs[0].kind, Kind::Missing);
        assert_eq!(diffs[1].kind, Kind::Extra);
    }

    #[test]
    fn order_matters_only_in_ordered_chains() {
        let mut d = Ruleset::default();
        d.chains.insert(key("SVC-x"), chain(&["a", "b"], true));
        let mut l = Ruleset::default();
        l.chains.insert(key("SVC-x"), chain(&["b", "a"], true));
        let diffs = compare(&d, &l, &NoOne);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].kind, Kind::Different);
        d.chains.get_mut(&key("SVC-x")).unwrap().ordered = false;
        assert!(compare(&d, &l, &NoOne).is_empty());
    }

    #[test]
    fn stale_chains_and_elements_are_reported() {
        let mut d = Ruleset::default();
        d.sets.insert(key("s"), set(&["1 comment \"ns/a:p\""]));
        let mut l = Ruleset::default();
        l.sets.insert(key("s"), set(&[]));
        l.chains
            .insert(key("SEP-1"), chain(&["ns/z:q -> 1.2.3.4"], true));
        let diffs = compare(&d, &l, &NoOne);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert_eq!(diffs[0].kind, Kind::Extra);
        assert_eq!(diffs[0].service.as_deref(), Some("ns/z:q"));
        assert_eq!(diffs[1].kind, Kind::Missing);
        assert_eq!(diffs[1].service.as_deref(), Some("ns/a:p"));
    }

    #[test]
    fn service_names_are_found_in_comments() {
        assert_eq!(
            service_in_comment("masquerade traffic for ns1/svc1:p80 external destinations"),
            Some("ns1/svc1:p80".into())
        );
        assert_eq!(
            service_in_comment("\"ns1/svc1:p80 cluster IP\""),
            Some("ns1/svc1:p80".into())
        );
        assert_eq!(service_in_comment("kubernetes service portals"), None);
        assert_eq!(service_in_comment("-d fd00::/64"), None);
        assert_eq!(
            service_in_comment("kube-system/kube-dns"),
            Some("kube-system/kube-dns".into())
        );
    }
}
