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
    pub(crate) fn nfproto(self) -> u8 {
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }

    /// NF_INET_* hook number.
    pub(crate) fn number(self) -> u32 {
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
    /// A 32-bit integer: the `numgen random mod N` component of a load-balancing key
    /// (nft has no named type for it, so such sets are written with `typeof`).
    Integer,
    /// `ipv4_addr . inet_service` / `ipv6_addr . inet_service`: an endpoint as a map
    /// value (the data of `dnat ip to … map @m`).
    AddrPort(Family),
}

impl DataType {
    /// nft spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Verdict => "verdict",
            DataType::Integer => "integer",
            DataType::AddrPort(Family::Ip) => "ipv4_addr . inet_service",
            DataType::AddrPort(Family::Ip6) => "ipv6_addr . inet_service",
        }
    }

    /// The address type of a family.
    pub(crate) fn addr(f: Family) -> DataType {
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
    pub(crate) is_map: bool,
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
    pub(crate) fn as_str(self) -> &'static str {
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
    /// An integer (the numgen index of a load-balancing key).
    Index(u32),
    /// A prefix (a component of an interval set's key).
    Net(IpNet),
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Ip(ip) => write!(f, "{ip}"),
            KeyValue::Proto(p) => f.write_str(p.lower()),
            KeyValue::Port(p) => write!(f, "{p}"),
            KeyValue::Index(i) => write!(f, "{i}"),
            // A host prefix is written as the bare address, as nft does.
            KeyValue::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            KeyValue::Net(n) => write!(f, "{n}"),
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
    /// Data-map value (concatenated, e.g. an endpoint's `addr . port`); empty for sets
    /// and verdict maps.
    pub data: Vec<KeyValue>,
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

    /// The data value as nft writes it (`10.0.0.1 . 8080`), if any.
    pub(crate) fn data_text(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| {
            self.data
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(" . ")
        })
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
    /// `KEY . KEY … [!=] @SET`: membership of a concatenated key in a named set.
    Lookup {
        /// Concatenated key.
        key: Vec<Field>,
        /// The set.
        set: String,
        /// `!=`: matches when the key is not in the set.
        negate: bool,
    },
    /// `dnat ip to KEY . KEY … [. numgen random mod N] map @MAP`: DNAT to the
    /// `addr . port` the data map holds for the packet's key (no match when absent).
    DnatMap {
        /// Concatenated key from the packet.
        key: Vec<Field>,
        /// A trailing `numgen random mod N` key component (load balancing over N).
        numgen_mod: Option<u32>,
        /// The data map (`… : addr . inet_service`).
        map: String,
    },
    /// `fib saddr|daddr type != local`.
    FibNotLocal {
        /// Saddr or Daddr.
        field: Field,
    },
    /// `ct status dnat`: the connection was destination-NATed.
    CtStatusDnat,
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

/// An ordered list of operations on one table, applied atomically, and the points
/// where it may be cut into several batches when it is too large for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Table family.
    pub family: Family,
    /// Table name.
    pub table: String,
    /// Operations, in order.
    pub ops: Vec<Op>,
    /// Indices of operations that may start a batch (see [`Transaction::split`]).
    cuts: Vec<usize>,
}

impl Transaction {
    /// An empty transaction on a table.
    pub fn new(family: Family, table: impl Into<String>) -> Self {
        Transaction {
            family,
            table: table.into(),
            ops: Vec::new(),
            cuts: Vec::new(),
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

    /// Makes room for `ops` more operations and `cuts` more cut points (a cold sync
    /// appends a quarter of a million of each).
    pub(crate) fn reserve(&mut self, ops: usize, cuts: usize) {
        self.ops.reserve(ops);
        self.cuts.reserve(cuts);
    }

    /// Marks the current end as a point where a batch may start: everything before it
    /// leaves the table consistent on its own.
    pub(crate) fn mark_cut(&mut self) {
        self.cuts.push(self.ops.len());
    }

    /// Splits a large transaction into consecutive transactions at its cut points,
    /// packing whole segments between cuts greedily into batches of at most `max_ops`
    /// operations (a longer segment goes alone). Used for huge syncs, whose single
    /// batch costs the kernel time quadratic in its size (see docs/benchmarks.md). The
    /// renderer places cuts so that every prefix is a consistent table (each Service
    /// old or completely new, dispatch maps only pointing at complete chains), and its
    /// trailing element operations — whose verdicts make the kernel re-validate every
    /// chain they reach — form one segment.
    pub fn split(self, max_ops: usize) -> Vec<Transaction> {
        self.into_batches(max_ops).collect()
    }

    /// [`Transaction::split`] one batch at a time: each batch's operations are moved
    /// out when it is taken, so applying batch by batch holds the transaction plus one
    /// batch, not two copies of it (75 MB at 10k Services for `kproxy apply`).
    pub fn into_batches(self, max_ops: usize) -> Batches {
        let len = self.ops.len();
        let mut bounds: Vec<usize> = self
            .cuts
            .iter()
            .copied()
            .filter(|&c| c > 0 && c < len)
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        bounds.push(len);
        // Greedy packing, done on the bounds alone: the batch sizes.
        let mut sizes = Vec::new();
        let (mut cur, mut start) = (0usize, 0usize);
        for end in bounds {
            let segment = end - start;
            if cur > 0 && cur + segment > max_ops {
                sizes.push(cur);
                cur = 0;
            }
            cur += segment;
            start = end;
        }
        if cur > 0 || sizes.is_empty() {
            sizes.push(cur);
        }
        Batches {
            family: self.family,
            table: self.table,
            ops: self.ops.into_iter(),
            sizes: sizes.into_iter(),
        }
    }
}

/// The batches of a split transaction, in order ([`Transaction::into_batches`]).
#[derive(Debug)]
pub struct Batches {
    family: Family,
    table: String,
    ops: std::vec::IntoIter<Op>,
    sizes: std::vec::IntoIter<usize>,
}

impl Iterator for Batches {
    type Item = Transaction;

    fn next(&mut self) -> Option<Transaction> {
        let size = self.sizes.next()?;
        let mut tx = Transaction::new(self.family, self.table.clone());
        tx.ops.extend(self.ops.by_ref().take(size));
        Some(tx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.sizes.size_hint()
    }
}

/// The number of batches is known before any is taken (an error names "batch i of
/// n" without collecting them all first).
impl ExactSizeIterator for Batches {}

#[cfg(test)]
mod split_tests {
    use super::*;

    fn chain(i: usize) -> Op {
        Op::FlushChain(format!("c{i}"))
    }

    /// A transaction of `n` flushes with cuts at `cuts`.
    fn with_cuts(n: usize, cuts: &[usize]) -> Transaction {
        let mut tx = Transaction::new(Family::Ip, "kube-proxy");
        for i in 0..n {
            if cuts.contains(&i) {
                tx.mark_cut();
            }
            tx.push(chain(i));
        }
        tx
    }

    #[test]
    fn split_packs_whole_segments_up_to_the_bound() {
        // Segments: 4, 4, 4, 3, 12 (a long one), 3.
        let tx = with_cuts(30, &[4, 8, 12, 15, 27]);
        let all = tx.ops.clone();
        let parts = tx.split(10);
        let sizes: Vec<usize> = parts.iter().map(|p| p.ops.len()).collect();
        assert_eq!(sizes, vec![8, 7, 12, 3]);
        let rejoined: Vec<Op> = parts.into_iter().flat_map(|p| p.ops).collect();
        assert_eq!(rejoined, all, "order is kept");
    }

    #[test]
    fn split_never_cuts_inside_a_segment() {
        let cuts = [20, 21, 45];
        let parts = with_cuts(50, &cuts).split(10);
        let mut at = 0;
        let mut starts = Vec::new();
        for p in &parts {
            starts.push(at);
            at += p.ops.len();
        }
        for s in &starts[1..] {
            assert!(cuts.contains(s), "batch starts at {s}, not a cut");
        }
        // A cut at the start or the end never makes an empty batch.
        let mut tx = Transaction::new(Family::Ip, "kube-proxy");
        tx.mark_cut();
        tx.push(chain(0));
        tx.mark_cut();
        assert_eq!(tx.split(1).len(), 1);
    }

    #[test]
    fn split_of_a_small_or_empty_transaction_is_itself() {
        let tx = with_cuts(3, &[1]);
        let parts = tx.clone().split(10);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].ops, tx.ops);
        let empty = Transaction::new(Family::Ip, "kube-proxy");
        assert_eq!(empty.clone().split(10), vec![empty]);
    }
}
