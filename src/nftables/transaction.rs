//! An nftables transaction as plain data: tables, chains, rules (typed expressions),
//! sets, maps and elements, and the operations on them. The renderer produces it; the
//! text form (`nft -f`), the in-memory fake and the netlink encoder consume it.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{IpFamily, Protocol};

/// The address family of the table (`ip` or `ip6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `ip`.
    Ip,
    /// `ip6`.
    Ip6,
}

impl Family {
    /// The table family for an IP family.
    pub fn of(f: IpFamily) -> Family {
        match f {
            IpFamily::V4 => Family::Ip,
            IpFamily::V6 => Family::Ip6,
        }
    }

    /// `ip` / `ip6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }

    /// The NFPROTO number used on netlink.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ip => 2,   // NFPROTO_IPV4
            Family::Ip6 => 10, // NFPROTO_IPV6
        }
    }
}

/// A base chain's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
}

/// A netfilter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// prerouting.
    Prerouting,
    /// input.
    Input,
    /// forward.
    Forward,
    /// output.
    Output,
    /// postrouting.
    Postrouting,
}

impl Hook {
    /// nft spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }

    /// NF_INET_* hook number.
    pub fn number(self) -> u32 {
        match self {
            Hook::Prerouting => 0,
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        }
    }
}

/// Base-chain properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    /// Type.
    pub kind: ChainType,
    /// Hook.
    pub hook: Hook,
    /// Priority (numeric, as knftables writes it).
    pub priority: i32,
}

/// A chain definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// Set for base chains.
    pub base: Option<BaseChain>,
    /// Comment.
    pub comment: Option<String>,
}

/// A data type of a set key or map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `ipv4_addr`.
    Ipv4Addr,
    /// `ipv6_addr`.
    Ipv6Addr,
    /// `inet_proto`.
    InetProto,
    /// `inet_service`.
    InetService,
    /// `verdict`.
    Verdict,
}

impl DataType {
    /// nft spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Verdict => "verdict",
        }
    }

    /// The address type of a family.
    pub fn addr(f: Family) -> DataType {
        match f {
            Family::Ip => DataType::Ipv4Addr,
            Family::Ip6 => DataType::Ipv6Addr,
        }
    }
}

/// A set or map definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Set {
    /// Name.
    pub name: String,
    /// A map (has values) rather than a set.
    pub is_map: bool,
    /// Key type (a concatenation when longer than one).
    pub key: Vec<DataType>,
    /// Value type for maps.
    pub value: Option<DataType>,
    /// `dynamic`, `timeout`, `interval` …
    pub flags: Vec<SetFlag>,
    /// Default element timeout in seconds.
    pub timeout: Option<u32>,
    /// Comment.
    pub comment: Option<String>,
}

/// Set flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetFlag {
    /// `dynamic`: updated from the packet path.
    Dynamic,
    /// `timeout`: elements expire.
    Timeout,
    /// `interval`: elements are ranges/prefixes.
    Interval,
}

impl SetFlag {
    /// nft spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SetFlag::Dynamic => "dynamic",
            SetFlag::Timeout => "timeout",
            SetFlag::Interval => "interval",
        }
    }
}

/// One component of an element key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    /// An address.
    Ip(IpAddr),
    /// A protocol.
    Proto(Protocol),
    /// A port.
    Port(u16),
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Ip(ip) => write!(f, "{ip}"),
            KeyValue::Proto(p) => f.write_str(p.lower()),
            KeyValue::Port(p) => write!(f, "{p}"),
        }
    }
}

/// A verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `jump CHAIN`.
    Jump(String),
    /// `goto CHAIN`.
    Goto(String),
    /// `drop`.
    Drop,
    /// `accept`.
    Accept,
    /// `return`.
    Return,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Accept => f.write_str("accept"),
            Verdict::Return => f.write_str("return"),
        }
    }
}

/// A set or map element.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Element {
    /// The set or map.
    pub set: String,
    /// Key components (concatenated).
    pub key: Vec<KeyValue>,
    /// Comment (not part of identity).
    pub comment: Option<String>,
    /// Map value.
    pub value: Option<Verdict>,
}

impl Element {
    /// The key as nft writes it (`172.30.0.41 . tcp . 80`).
    pub fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(" . ")
    }
}

/// A packet field used in matches and lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `ip saddr` / `ip6 saddr`.
    Saddr,
    /// `ip daddr` / `ip6 daddr`.
    Daddr,
    /// `meta l4proto`.
    L4Proto,
    /// `th dport`.
    Dport,
}

/// What an address is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddrMatch {
    /// One address.
    Addr(IpAddr),
    /// A prefix.
    Net(IpNet),
    /// Membership in a named set.
    Set(String),
    /// Membership in an anonymous set of addresses/prefixes.
    Anon(Vec<IpNet>),
}

/// One expression (statement) of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `ip saddr|daddr [!=] VALUE`.
    Addr {
        /// Saddr or Daddr.
        field: Field,
        /// `!=`.
        negate: bool,
        /// Compared with.
        value: AddrMatch,
    },
    /// `ct state new`.
    CtStateNew,
    /// `fib saddr|daddr type local`.
    FibLocal {
        /// Saddr or Daddr.
        field: Field,
    },
    /// `meta l4proto PROTO`.
    L4Proto(Protocol),
    /// `iif [!=] NAME` (a trailing `*` matches a prefix).
    Iif {
        /// `!=`.
        negate: bool,
        /// Interface name or prefix.
        name: String,
        /// Prefix match.
        wildcard: bool,
    },
    /// `KEY . KEY … vmap @MAP`.
    Vmap {
        /// Concatenated key.
        key: Vec<Field>,
        /// The verdict map.
        map: String,
    },
    /// `numgen random mod N vmap { 0 : V0 , 1 : V1 … }`.
    NumgenVmap {
        /// Verdicts by index; N is their count.
        targets: Vec<Verdict>,
    },
    /// `update @SET { ip saddr }`.
    UpdateSaddr {
        /// The dynamic set.
        set: String,
    },
    /// `mark set mark or VALUE`.
    MarkOr(u32),
    /// `mark set mark xor VALUE`.
    MarkXor(u32),
    /// `mark and VALUE == 0` (the rule's verdict follows).
    MarkAndIsZero(u32),
    /// `masquerade [fully-random]`.
    Masquerade {
        /// Fully random source ports.
        fully_random: bool,
    },
    /// `dnat to ADDR:PORT`.
    Dnat {
        /// Address.
        addr: IpAddr,
        /// Port.
        port: u16,
    },
    /// `reject`.
    Reject,
    /// A verdict.
    Verdict(Verdict),
}

/// A rule: expressions in order, plus a comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Chain.
    pub chain: String,
    /// Expressions.
    pub exprs: Vec<Expr>,
    /// Comment.
    pub comment: Option<String>,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// `add table … { comment … }` (idempotent).
    AddTable {
        /// Comment.
        comment: Option<String>,
    },
    /// `delete table`.
    DeleteTable,
    /// `add chain` (idempotent; keeps rules).
    AddChain(Chain),
    /// `flush chain`: remove its rules.
    FlushChain(String),
    /// `delete chain`.
    DeleteChain(String),
    /// `add rule` (append).
    AddRule(Rule),
    /// `add set|map` (idempotent; keeps elements).
    AddSet(Set),
    /// `flush set|map`.
    FlushSet {
        /// Name.
        name: String,
        /// A map.
        is_map: bool,
    },
    /// `delete set|map`.
    DeleteSet {
        /// Name.
        name: String,
        /// A map.
        is_map: bool,
    },
    /// `add element` (create or update).
    AddElement(Element),
    /// `delete element` (by key).
    DeleteElement(Element),
}

/// An ordered list of operations on one table, applied atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Table family.
    pub family: Family,
    /// Table name.
    pub table: String,
    /// Operations, in order.
    pub ops: Vec<Op>,
}

impl Transaction {
    /// An empty transaction on a table.
    pub fn new(family: Family, table: impl Into<String>) -> Self {
        Transaction {
            family,
            table: table.into(),
            ops: Vec::new(),
        }
    }

    /// Number of operations (upstream's `NumOperations`).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends an operation.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Splits a large transaction into consecutive transactions of at most `max_ops`
    /// operations each, keeping order. Used for huge cold syncs, whose single batch
    /// costs the kernel time quadratic in its size (see docs/benchmarks.md); the
    /// renderer orders a full sync so that every prefix is safe to commit (per-service
    /// chains and their elements before the dispatch maps point at them).
    ///
    /// The trailing run of element operations (the dispatch maps, written last) stays
    /// one transaction whatever its size: each commit that adds verdict elements makes
    /// the kernel re-validate every chain those maps reach, so one commit is cheapest,
    /// and elements carry none of the per-batch costs that made huge batches slow.
    pub fn split(self, max_ops: usize) -> Vec<Transaction> {
        let max_ops = max_ops.max(1);
        let tail_start = self
            .ops
            .iter()
            .rposition(|op| !matches!(op, Op::AddElement(_) | Op::DeleteElement(_)))
            .map_or(0, |i| i + 1);
        let mut out = Vec::new();
        let mut cur = Transaction::new(self.family, self.table.clone());
        for (i, op) in self.ops.into_iter().enumerate() {
            if cur.ops.len() >= max_ops && (i <= tail_start) {
                let next = Transaction::new(self.family, self.table.clone());
                out.push(std::mem::replace(&mut cur, next));
            }
            cur.ops.push(op);
        }
        if !cur.ops.is_empty() || out.is_empty() {
            out.push(cur);
        }
        out
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    fn chain(i: usize) -> Op {
        Op::FlushChain(format!("c{i}"))
    }

    fn element(i: usize) -> Op {
        Op::AddElement(Element {
            set: "cluster-ips".into(),
            key: vec![KeyValue::Port(i as u16)],
            comment: None,
            value: None,
        })
    }

    #[test]
    fn split_bounds_batches_but_keeps_the_element_tail_whole() {
        let mut tx = Transaction::new(Family::Ip, "kube-proxy");
        for i in 0..25 {
            tx.push(chain(i));
        }
        // An element among the chains does not start the tail.
        tx.push(element(999));
        for i in 25..30 {
            tx.push(chain(i));
        }
        for i in 0..23 {
            tx.push(element(i));
        }
        let all: Vec<Op> = tx.ops.clone();
        let parts = tx.split(10);
        let sizes: Vec<usize> = parts.iter().map(|p| p.ops.len()).collect();
        assert_eq!(sizes, vec![10, 10, 10, 1 + 23]);
        let rejoined: Vec<Op> = parts.into_iter().flat_map(|p| p.ops).collect();
        assert_eq!(rejoined, all, "order is kept");
    }

    #[test]
    fn split_of_a_small_transaction_is_itself() {
        let mut tx = Transaction::new(Family::Ip, "kube-proxy");
        tx.push(chain(0));
        tx.push(element(0));
        assert_eq!(tx.clone().split(10), vec![tx]);
        let empty = Transaction::new(Family::Ip, "kube-proxy");
        assert_eq!(empty.clone().split(10), vec![empty]);
    }
}
