//! The differences as text: grouped by Service port, then a summary line.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Difference, Kind, Object, Ruleset};

/// Heading for differences that belong to no single Service port.
pub(crate) const SHARED: &str = "(shared rules)";

/// Counts by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// kproxy would write it; not live.
    pub missing: usize,
    /// Live only.
    pub extra: usize,
    /// Both, differently.
    pub different: usize,
    /// Service ports concerned (the shared rules count as one).
    pub services: usize,
}

impl Summary {
    /// Every difference.
    pub(crate) fn total(&self) -> usize {
        self.missing + self.extra + self.different
    }
}

/// Counts `diffs`.
pub(crate) fn summarize(diffs: &[Difference]) -> Summary {
    let mut s = Summary::default();
    let mut services = std::collections::BTreeSet::new();
    for d in diffs {
        match d.kind {
            Kind::Missing => s.missing += 1,
            Kind::Extra => s.extra += 1,
            Kind::Different => s.different += 1,
        }
        services.insert(d.service.clone());
    }
    s.services = services.len();
    s
}

fn describe(o: &Object) -> String {
    match o {
        Object::Table { scope } => format!("table {scope}"),
        Object::Chain {
            scope,
            name,
            rules,
            detail,
        } => {
            if detail.is_empty() {
                format!("chain {scope} {name} ({rules} rules)")
            } else {
                format!("chain {scope} {name}: {detail}")
            }
        }
        Object::Rule { scope, chain, text } => format!("rule in {scope} {chain}: {text}"),
        Object::Set {
            scope,
            name,
            elements,
            detail,
        } => {
            if detail.is_empty() {
                format!("set {scope} {name} ({elements} elements)")
            } else {
                format!("set {scope} {name}: {detail}")
            }
        }
        Object::Element { scope, set, text } => format!("element of {scope} {set}: {text}"),
    }
}

/// The report: one block per Service port (shared rules last), each difference on one
/// line (`missing` = kproxy would write it, `extra` = live only), then the summary.
pub fn render(diffs: &[Difference], desired: &Ruleset, live: &Ruleset) -> String {
    let mut groups: BTreeMap<(bool, String), Vec<&Difference>> = BTreeMap::new();
    for d in diffs {
        let key = match &d.service {
            Some(s) => (false, s.clone()),
            None => (true, SHARED.to_string()),
        };
        groups.entry(key).or_default().push(d);
    }
    let mut out = String::new();
    for ((_, name), mut list) in groups {
        list.sort_by(|a, b| (&a.object, a.kind).cmp(&(&b.object, b.kind)));
        let _ = writeln!(out, "{name}");
        for d in list {
            let _ = writeln!(out, "  {:<9} {}", d.kind.as_str(), describe(&d.object));
        }
    }
    out.push_str(&summary_line(diffs, desired, live));
    out.push('\n');
    out
}

/// `same: ...` or `different: ...`, one line.
pub(crate) fn summary_line(diffs: &[Difference], desired: &Ruleset, live: &Ruleset) -> String {
    let (chains, rules, elements) = desired.counts();
    let (lchains, lrules, lelements) = live.counts();
    if diffs.is_empty() {
        return format!("same: {chains} chains, {rules} rules, {elements} elements compared");
    }
    let s = summarize(diffs);
    format!(
        "different: {} differences in {} Service ports ({} missing, {} extra, {} different); \
         kproxy would write {chains} chains, {rules} rules, {elements} elements; \
         live: {lchains} chains, {lrules} rules, {lelements} elements",
        s.total(),
        s.services,
        s.missing,
        s.extra,
        s.different
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_groups_by_service_with_shared_rules_last() {
        let diffs = vec![
            Difference {
                service: None,
                kind: Kind::Extra,
                object: Object::Rule {
                    scope: "IPv4 nat".into(),
                    chain: "KUBE-POSTROUTING".into(),
                    text: "-A x".into(),
                },
            },
            Difference {
                service: Some("ns1/svc1:p80".into()),
                kind: Kind::Missing,
                object: Object::Chain {
                    scope: "IPv4 nat".into(),
                    name: "KUBE-SEP-X".into(),
                    rules: 2,
                    detail: String::new(),
                },
            },
        ];
        let text = render(&diffs, &Ruleset::default(), &Ruleset::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ns1/svc1:p80");
        assert_eq!(lines[1], "  missing   chain IPv4 nat KUBE-SEP-X (2 rules)");
        assert_eq!(lines[2], SHARED);
        assert!(lines[3].starts_with("  extra     rule in IPv4 nat KUBE-POSTROUTING"));
        assert!(lines[4].starts_with("different: 2 differences in 2 Service ports"));
    }
}
