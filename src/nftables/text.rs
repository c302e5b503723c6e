//! A transaction in `nft -f` syntax, the form upstream's tests and dry-run use:
//! `add table ip kube-proxy { comment "rules for kube-proxy" ; }`, one line per operation.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::transaction::{
    AddrMatch, Chain, ChainType, DataType, Element, Expr, Family, Field, Op, Rule, Set, Transaction,
};

fn net_text(n: &IpNet) -> String {
    // A host prefix is written as the bare address, as nft and knftables do.
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn field(f: Family, fld: Field) -> &'static str {
    match (f, fld) {
        (Family::Ip, Field::Saddr) => "ip saddr",
        (Family::Ip, Field::Daddr) => "ip daddr",
        (Family::Ip6, Field::Saddr) => "ip6 saddr",
        (Family::Ip6, Field::Daddr) => "ip6 daddr",
        (_, Field::L4Proto) => "meta l4proto",
        (_, Field::Dport) => "th dport",
    }
}

/// One expression in nft syntax.
pub(crate) fn expr_text(f: Family, e: &Expr) -> String {
    match e {
        Expr::Addr {
            field: fld,
            negate,
            value,
        } => {
            let op = if *negate { "!= " } else { "" };
            let v = match value {
                AddrMatch::Addr(a) => a.to_string(),
                AddrMatch::Net(n) => net_text(n),
                AddrMatch::Set(s) => format!("@{s}"),
                AddrMatch::Anon(list) => format!(
                    "{{ {} }}",
                    list.iter().map(net_text).collect::<Vec<_>>().join(" , ")
                ),
            };
            format!("{} {op}{v}", field(f, *fld))
        }
        Expr::CtStateNew => "ct state new".into(),
        Expr::FibLocal { field: fld } => match fld {
            Field::Saddr => "fib saddr type local".into(),
            _ => "fib daddr type local".into(),
        },
        Expr::L4Proto(p) => format!("meta l4proto {}", p.lower()),
        Expr::Iif {
            negate,
            name,
            wildcard,
        } => format!(
            "iif {}{name}{}",
            if *negate { "!= " } else { "" },
            if *wildcard { "*" } else { "" }
        ),
        Expr::Vmap { key, map } => format!(
            "{} vmap @{map}",
            key.iter()
                .map(|k| field(f, *k))
                .collect::<Vec<_>>()
                .join(" . ")
        ),
        Expr::NumgenVmap { targets } => format!(
            "numgen random mod {} vmap {{ {} }}",
            targets.len(),
            targets
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{i} : {v}"))
                .collect::<Vec<_>>()
                .join(" , ")
        ),
        Expr::UpdateSaddr { set } => format!("update @{set} {{ {} }}", field(f, Field::Saddr)),
        Expr::MarkOr(m) => format!("mark set mark or {m:#x}"),
        Expr::MarkXor(m) => format!("mark set mark xor {m:#x}"),
        Expr::MarkAndIsZero(m) => format!("mark and {m:#x} == 0"),
        Expr::Masquerade { fully_random } => {
            if *fully_random {
                "masquerade fully-random".into()
            } else {
                "masquerade".into()
            }
        }
        Expr::Dnat { addr, port } => match addr {
            std::net::IpAddr::V4(a) => format!("dnat to {a}:{port}"),
            std::net::IpAddr::V6(a) => format!("dnat to [{a}]:{port}"),
        },
        Expr::Reject => "reject".into(),
        Expr::Verdict(v) => v.to_string(),
        Expr::Lookup { key, set, negate } => format!(
            "{} {}@{set}",
            key_text(f, key),
            if *negate { "!= " } else { "" }
        ),
        Expr::DnatMap {
            key,
            numgen_mod,
            map,
        } => {
            let mut k = key_text(f, key);
            if let Some(n) = numgen_mod {
                let _ = write!(k, " . numgen random mod {n}");
            }
            format!("dnat {} to {k} map @{map}", f.as_str())
        }
        Expr::FibNotLocal { field: fld } => match fld {
            Field::Saddr => "fib saddr type != local".into(),
            _ => "fib daddr type != local".into(),
        },
        Expr::CtStatusDnat => "ct status dnat".into(),
    }
}

fn key_text(f: Family, key: &[Field]) -> String {
    key.iter()
        .map(|k| field(f, *k))
        .collect::<Vec<_>>()
        .join(" . ")
}

/// An expression of a data type, for `typeof` declarations (nft has no type name for
/// the numgen component of a load-balancing key).
fn typeof_expr(f: Family, t: DataType) -> String {
    match t {
        DataType::Ipv4Addr | DataType::Ipv6Addr => field(f, Field::Daddr).into(),
        DataType::InetProto => "meta l4proto".into(),
        DataType::InetService => "th dport".into(),
        DataType::Integer => "numgen random mod 1".into(),
        // nft 1.0.6 cannot read `ip daddr . th dport` back from the kernel when a new
        // rule names the map ("conflicting protocols specified: ip vs. th"); `tcp
        // dport` would avoid that but makes nft add `meta l4proto tcp` to the rule.
        // The maps layout therefore writes rules naming a data map only together with
        // the map (see `maps::layout::LbClass::balance_chain`).
        DataType::AddrPort(_) => format!("{} . th dport", field(f, Field::Daddr)),
        DataType::Verdict => "verdict".into(),
    }
}

/// Longest comment `nft` accepts (NFTNL_UDATA_COMMENT_MAXLEN).
pub(crate) const COMMENT_MAX: usize = 128;

/// A comment as `nft -f` can read it back: at most 128 bytes, cut at a character
/// boundary, with `"` (which would end the string) and control characters replaced by
/// `_`. Comments of validated objects are printable ASCII without quotes, so only their
/// length can matter (63 + 63 + 15 bytes of names make 143).
pub(crate) fn comment(c: &str) -> std::borrow::Cow<'_, str> {
    let bad = |ch: char| ch == '"' || ch == '\\' || ch.is_control();
    if c.len() <= COMMENT_MAX && !c.chars().any(bad) {
        return std::borrow::Cow::Borrowed(c);
    }
    let mut out = String::with_capacity(COMMENT_MAX);
    for ch in c.chars() {
        let ch = if bad(ch) { '_' } else { ch };
        if out.len() + ch.len_utf8() > COMMENT_MAX {
            break;
        }
        out.push(ch);
    }
    std::borrow::Cow::Owned(out)
}

/// A rule's body (after the chain name).
pub fn rule_body(f: Family, r: &Rule) -> String {
    let mut s = r
        .exprs
        .iter()
        .map(|e| expr_text(f, e))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(c) = &r.comment {
        let _ = write!(s, " comment \"{}\"", comment(c));
    }
    s
}

fn chain_def(c: &Chain) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &c.base {
        let kind = match b.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        parts.push(format!(
            "type {kind} hook {} priority {} ;",
            b.hook.as_str(),
            b.priority
        ));
    }
    if let Some(cm) = &c.comment {
        parts.push(format!("comment \"{}\" ;", comment(cm)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" {{ {} }}", parts.join(" "))
    }
}

fn set_def(f: Family, s: &Set) -> String {
    let mut parts = Vec::new();
    if s.key.contains(&DataType::Integer) {
        let key = s
            .key
            .iter()
            .map(|k| typeof_expr(f, *k))
            .collect::<Vec<_>>()
            .join(" . ");
        match s.value {
            Some(v) => parts.push(format!("typeof {key} : {} ;", typeof_expr(f, v))),
            None => parts.push(format!("typeof {key} ;")),
        }
    } else {
        let key = s
            .key
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" . ");
        match s.value {
            Some(v) => parts.push(format!("type {key} : {} ;", v.as_str())),
            None => parts.push(format!("type {key} ;")),
        }
    }
    if !s.flags.is_empty() {
        parts.push(format!(
            "flags {} ;",
            s.flags
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if let Some(t) = s.timeout {
        parts.push(format!("timeout {t}s ;"));
    }
    if let Some(c) = &s.comment {
        parts.push(format!("comment \"{}\" ;", comment(c)));
    }
    format!(" {{ {} }}", parts.join(" "))
}

/// The `{ … }` part of an element operation.
pub(crate) fn element_body(e: &Element, with_value: bool) -> String {
    let mut s = format!("{{ {}", e.key_text());
    if with_value {
        if let Some(c) = &e.comment {
            let _ = write!(s, " comment \"{}\"", comment(c));
        }
        if let Some(v) = &e.value {
            let _ = write!(s, " : {v}");
        }
        if let Some(d) = e.data_text() {
            let _ = write!(s, " : {d}");
        }
    }
    s.push_str(" }");
    s
}

/// One operation as an `nft -f` line (no newline).
pub(crate) fn op_line(tx_family: Family, table: &str, op: &Op) -> String {
    let ft = format!("{} {table}", tx_family.as_str());
    match op {
        Op::AddTable { comment } => match comment {
            Some(c) => format!("add table {ft} {{ comment \"{}\" ; }}", self::comment(c)),
            None => format!("add table {ft}"),
        },
        Op::DeleteTable => format!("delete table {ft}"),
        Op::AddChain(c) => format!("add chain {ft} {}{}", c.name, chain_def(c)),
        Op::FlushChain(n) => format!("flush chain {ft} {n}"),
        Op::DeleteChain(n) => format!("delete chain {ft} {n}"),
        Op::AddRule(r) => format!("add rule {ft} {} {}", r.chain, rule_body(tx_family, r)),
        Op::AddSet(s) => format!(
            "add {} {ft} {}{}",
            if s.is_map { "map" } else { "set" },
            s.name,
            set_def(tx_family, s)
        ),
        Op::FlushSet { name, is_map } => {
            format!("flush {} {ft} {name}", if *is_map { "map" } else { "set" })
        }
        Op::DeleteSet { name, is_map } => {
            format!("delete {} {ft} {name}", if *is_map { "map" } else { "set" })
        }
        Op::AddElement(e) => format!("add element {ft} {} {}", e.set, element_body(e, true)),
        Op::DeleteElement(e) => format!("delete element {ft} {} {}", e.set, element_body(e, false)),
    }
}

/// [`transaction_text`] that consumes the transaction, freeing each operation once it
/// is written, so the peak is about the larger of the two forms rather than their sum
/// (`kproxy trace` of a 10k-Service cluster).
pub fn transaction_into_text(tx: Transaction) -> String {
    let mut out = String::new();
    let (family, table) = (tx.family, tx.table);
    for op in tx.ops {
        out.push_str(&op_line(family, &table, &op));
        out.push('\n');
    }
    out
}

/// The whole transaction as `nft -f` input.
pub fn transaction_text(tx: &Transaction) -> String {
    let mut out = String::new();
    for op in &tx.ops {
        out.push_str(&op_line(tx.family, &tx.table, op));
        out.push('\n');
    }
    out
}

/// Upstream's test normalization of a dump or transaction text: blank and `#` lines
/// dropped; lines stably sorted by object type (table, chain, rule, set, map, element),
/// then object name; rules keep their order within a chain; other lines of the same
/// type and name are ordered by their text.
pub fn normalize(text: &str) -> String {
    fn rank(line: &str) -> u8 {
        match line.split_whitespace().nth(1) {
            Some("table") => 0,
            Some("chain") => 1,
            Some("rule") => 2,
            Some("set") => 3,
            Some("map") => 4,
            Some("element") => 5,
            _ => 6,
        }
    }
    let mut lines: Vec<(usize, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .collect();
    lines.sort_by(|(ia, a), (ib, b)| {
        let (ra, rb) = (rank(a), rank(b));
        let na = a.split_whitespace().nth(4).unwrap_or_default();
        let nb = b.split_whitespace().nth(4).unwrap_or_default();
        ra.cmp(&rb).then_with(|| na.cmp(nb)).then_with(
            || {
                if ra == 2 {
                    ia.cmp(ib)
                } else {
                    a.cmp(b)
                }
            },
        )
    });
    let mut out = String::new();
    for (_, l) in lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod comment_tests {
    use super::{comment, COMMENT_MAX};

    #[test]
    fn comments_fit_nft_and_cannot_end_the_string() {
        assert_eq!(comment("ns/svc:http"), "ns/svc:http");
        let long = format!("{0}/{0}:{1}", "a".repeat(63), "p".repeat(15));
        assert_eq!(long.len(), 143);
        assert_eq!(comment(&long).len(), COMMENT_MAX);
        assert_eq!(comment("a\"b\nc\\"), "a_b_c_");
        // Cut at a character boundary, never inside one.
        let wide = "é".repeat(100);
        let c = comment(&wide);
        assert!(c.len() <= COMMENT_MAX && c.chars().all(|ch| ch == 'é'));
    }
}
