//! Splitting a large `iptables-restore --noflush` input into several consecutive
//! restores.
//!
//! Why: `iptables-nft-restore --noflush` costs time quadratic in the size of its input
//! (1k Services × 10 endpoints: 3.6 s; 2k: 17.7 s; 10k: over 5 minutes, all in
//! userspace), while the same input in pieces costs about the sum of the pieces
//! (docs/benchmarks.md). A full sync at scale on the nft backend is therefore applied
//! in pieces, ordered so that every intermediate state is consistent:
//!
//! 1. The per-Service nat chains (`KUBE-SEP-`, then `KUBE-SVC-`/`KUBE-SVL-`, then
//!    `KUBE-EXT-`, then `KUBE-FW-`: every chain after the chains it jumps to), whole
//!    chains at a time, in restores of bounded size. The first also writes the helper
//!    chains they jump to (`KUBE-MARK-MASQ`). Nothing reaches a new chain yet, and a
//!    rewritten chain is replaced in one commit, so traffic sees old or new rules.
//! 2. One last restore with everything else, exactly as in the original input: the
//!    filter table, the dispatch chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, …) and the
//!    deletion of stale chains.
//!
//! The result equals applying the original input at once (checked against a model in
//! the unit tests, and in the kernel with iptables-nft by `tests/ipt_split_kernel.rs`).

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Prefixes of the per-Service chains, in the order they must be created.
const PER_SERVICE: [&str; 5] = [
    "KUBE-SEP-",
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
];

fn rank(chain: &str) -> Option<usize> {
    PER_SERVICE
        .iter()
        .position(|p| chain.starts_with(p))
        // SVC and SVL chains are peers: both only jump to SEP chains.
        .map(|i| if i == 2 { 1 } else { i })
}

/// The chain a `-A`/`-I` rule line belongs to.
fn rule_chain(line: &str) -> Option<&str> {
    let rest = line
        .strip_prefix("-A ")
        .or_else(|| line.strip_prefix("-I "))?;
    rest.split_whitespace().next()
}

/// Chains a rule jumps or goes to.
fn targets(line: &str) -> impl Iterator<Item = &str> {
    let mut words = line.split_whitespace();
    std::iter::from_fn(move || {
        for w in words.by_ref() {
            if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
                return words.next();
            }
        }
        None
    })
}

struct Table<'a> {
    name: &'a str,
    lines: Vec<&'a str>,
}

fn parse(payload: &str) -> Option<Vec<Table<'_>>> {
    let mut tables = Vec::new();
    let mut cur: Option<Table<'_>> = None;
    for line in payload.lines() {
        if let Some(name) = line.strip_prefix('*') {
            if cur.is_some() {
                return None;
            }
            cur = Some(Table {
                name,
                lines: Vec::new(),
            });
        } else if line == "COMMIT" {
            tables.push(cur.take()?);
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            cur.as_mut()?.lines.push(line);
        }
    }
    cur.is_none().then_some(tables)
}

fn block(name: &str, lines: &[&str]) -> String {
    let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 32);
    out.push('*');
    out.push_str(name);
    out.push('\n');
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// Splits `payload` into restores of about `max_rules` per-Service rule lines each,
/// followed by one restore with the rest. Returns the payload unchanged (one element)
/// when it is small, or when it has a shape this does not know (then it is applied at
/// once, as before).
pub fn split_restore(payload: &str, max_rules: usize) -> Vec<String> {
    let whole = || vec![payload.to_string()];
    let Some(tables) = parse(payload) else {
        return whole();
    };
    let Some(nat) = tables.iter().find(|t| t.name == "nat") else {
        return whole();
    };
    if nat.lines.len() <= max_rules {
        return whole();
    }
    // Chains deleted by this input stay in the last restore (declared, then deleted).
    let deleted: HashSet<&str> = nat
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("-X "))
        .map(str::trim)
        .collect();
    let movable = |chain: &str| rank(chain).is_some() && !deleted.contains(chain);
    // Per-Service chains: declaration and rules, in input order within each rank.
    let mut decl: BTreeMap<&str, &str> = BTreeMap::new();
    let mut rules: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for line in &nat.lines {
        if let Some(rest) = line.strip_prefix(':') {
            let Some(chain) = rest.split_whitespace().next() else {
                return whole();
            };
            if movable(chain) {
                decl.insert(chain, line);
                order.push(chain);
            }
        } else if let Some(chain) = rule_chain(line) {
            if movable(chain) {
                if !decl.contains_key(chain) {
                    // A rule for a chain the input does not declare: leave it alone.
                    return whole();
                }
                rules.entry(chain).or_default().push(line);
            }
        } else if !line.starts_with("-X ") {
            return whole();
        }
    }
    if order.is_empty() {
        return whole();
    }
    order.sort_by_key(|c| rank(c));
    // Helper chains the per-Service chains jump to (KUBE-MARK-MASQ …), written first.
    let builtin = |t: &str| !t.starts_with("KUBE-");
    let helpers: BTreeSet<&str> = rules
        .values()
        .flatten()
        .flat_map(|l| targets(l))
        .filter(|t| !builtin(t) && rank(t).is_none())
        .collect();
    // Their declarations, then their rules. A helper the input does not declare already
    // exists and is not written.
    let mut helper_lines: Vec<&str> = Vec::new();
    let mut helper_rules: Vec<&str> = Vec::new();
    for line in &nat.lines {
        let declared = line
            .strip_prefix(':')
            .and_then(|r| r.split_whitespace().next());
        if declared.is_some_and(|c| helpers.contains(c)) {
            helper_lines.push(line);
        } else if rule_chain(line).is_some_and(|c| helpers.contains(c)) {
            helper_rules.push(line);
        }
    }
    helper_rules.retain(|l| {
        let chain = rule_chain(l);
        helper_lines
            .iter()
            .any(|d| d[1..].split_whitespace().next() == chain)
    });
    if helper_rules
        .iter()
        .flat_map(|l| targets(l))
        .any(|t| !builtin(t))
    {
        // Helpers that jump elsewhere are beyond this simple ordering.
        return whole();
    }
    helper_lines.extend(helper_rules);

    let mut out = Vec::new();
    let mut lines: Vec<&str> = helper_lines;
    let mut count = 0;
    for chain in order {
        let own = rules.get(chain).map(Vec::as_slice).unwrap_or_default();
        if count > 0 && count + own.len() > max_rules {
            out.push(block("nat", &lines));
            lines = Vec::new();
            count = 0;
        }
        lines.push(decl[chain]);
        lines.extend_from_slice(own);
        count += own.len() + 1;
    }
    if !lines.is_empty() {
        out.push(block("nat", &lines));
    }
    // The rest, in input order.
    let mut last = String::new();
    for t in &tables {
        let kept: Vec<&str> = if t.name == "nat" {
            t.lines
                .iter()
                .filter(|l| {
                    let chain = l
                        .strip_prefix(':')
                        .and_then(|r| r.split_whitespace().next())
                        .or_else(|| rule_chain(l));
                    !chain.is_some_and(movable)
                })
                .copied()
                .collect()
        } else {
            t.lines.clone()
        };
        last.push_str(&block(t.name, &kept));
    }
    out.push(last);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A tiny model of `iptables-restore --noflush`: declaring a chain creates or
    /// flushes it, `-A` appends, `-X` deletes.
    fn apply(model: &mut BTreeMap<(String, String), Vec<String>>, payload: &str) {
        for t in parse(payload).expect("well formed") {
            for l in t.lines {
                if let Some(rest) = l.strip_prefix(':') {
                    let c = rest.split_whitespace().next().unwrap();
                    model.insert((t.name.into(), c.into()), Vec::new());
                } else if let Some(c) = l.strip_prefix("-X ") {
                    assert!(
                        model.remove(&(t.name.into(), c.trim().into())).is_some(),
                        "-X of a missing chain"
                    );
                } else {
                    let c = rule_chain(l).unwrap();
                    for target in targets(l).filter(|t| t.starts_with("KUBE-")) {
                        assert!(
                            model.contains_key(&(t.name.to_string(), target.to_string())),
                            "jump to missing chain {target}"
                        );
                    }
                    model
                        .get_mut(&(t.name.into(), c.into()))
                        .unwrap_or_else(|| panic!("rule for missing chain {c}"))
                        .push(l.to_string());
                }
            }
        }
    }

    fn sample(services: usize) -> String {
        let mut decls = String::new();
        let mut rules = String::new();
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
        ] {
            decls.push_str(&format!(":{c} - [0:0]\n"));
        }
        rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
        rules.push_str("-A KUBE-POSTROUTING -j MASQUERADE\n");
        for i in 0..services {
            for c in [
                format!("KUBE-SVC-{i}"),
                format!("KUBE-EXT-{i}"),
                format!("KUBE-SEP-{i}A"),
                format!("KUBE-SEP-{i}B"),
            ] {
                decls.push_str(&format!(":{c} - [0:0]\n"));
            }
            rules.push_str(&format!(
                "-A KUBE-SERVICES -d 10.0.0.{i} -j KUBE-SVC-{i}\n-A KUBE-NODEPORTS -p tcp --dport 3{i} -j KUBE-EXT-{i}\n-A KUBE-EXT-{i} -j KUBE-MARK-MASQ\n-A KUBE-EXT-{i} -j KUBE-SVC-{i}\n-A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i}A\n-A KUBE-SVC-{i} -j KUBE-SEP-{i}B\n-A KUBE-SEP-{i}A -s 10.1.0.{i} -j KUBE-MARK-MASQ\n-A KUBE-SEP-{i}A -p tcp -j DNAT --to-destination 10.1.0.{i}:80\n-A KUBE-SEP-{i}B -p tcp -j DNAT --to-destination 10.2.0.{i}:80\n"
            ));
        }
        decls.push_str(":KUBE-SEP-GONE - [0:0]\n");
        format!(
            "*filter\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -j ACCEPT\nCOMMIT\n*nat\n{decls}{rules}-X KUBE-SEP-GONE\n-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"
        )
    }

    #[test]
    fn pieces_applied_in_order_equal_the_whole_and_never_jump_to_missing_chains() {
        let payload = sample(40);
        let pieces = split_restore(&payload, 25);
        assert!(pieces.len() > 5, "{} pieces", pieces.len());
        let mut whole = BTreeMap::new();
        whole.insert(("nat".into(), "KUBE-SEP-GONE".into()), vec!["old".into()]);
        let mut split = whole.clone();
        apply(&mut whole, &payload);
        for p in &pieces {
            // Every intermediate state is checked by `apply`: no rule jumps to a chain
            // that does not exist yet.
            apply(&mut split, p);
        }
        assert_eq!(split, whole);
        // The dispatch chains are written only by the last piece.
        for p in &pieces[..pieces.len() - 1] {
            assert!(!p.contains("KUBE-SERVICES"), "{p}");
            assert!(!p.contains("*filter"));
        }
        // Bounded pieces (a chain is never split).
        for p in &pieces[..pieces.len() - 1] {
            assert!(p.lines().count() <= 25 + 8, "{}", p.lines().count());
        }
    }

    #[test]
    fn small_or_unusual_inputs_stay_whole() {
        let payload = sample(2);
        assert_eq!(split_restore(&payload, 1000), vec![payload.clone()]);
        let odd = "*nat\n:KUBE-SVC-1 - [0:0]\n-F KUBE-SVC-1\nCOMMIT\n".to_string();
        assert_eq!(split_restore(&odd, 0), vec![odd.clone()]);
        let unterminated = "*nat\n:KUBE-SVC-1 - [0:0]\n";
        assert_eq!(
            split_restore(unterminated, 0),
            vec![unterminated.to_string()]
        );
    }
}
