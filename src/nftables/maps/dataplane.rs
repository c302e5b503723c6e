//! Applies the maps layout over netlink (an [`NftInterface`]: the kernel, or the
//! in-memory fake in unit tests), never through `nft`. Every sync is a diff:
//!
//! - the desired table is kept port by port ([`Record`]): a sync re-derives only the
//!   Service ports whose plan changed;
//! - a partial sync writes only the elements that changed since the last successful
//!   sync (plus, for a new endpoint count, its gate set, data map and balance chain
//!   and a rewrite of the fixed chains whose rules change; for a ServiceCIDR change
//!   the one chain naming them; for session-affinity ports their own chains);
//! - a full sync (the first one, a periodic resync, the one after a failure) reads the
//!   table back ([`NftInterface::read_contents`]) and writes only the difference:
//!   missing sets and chains, chains whose rules differ (each chain's first rule
//!   carries a digest of the chain's rules, see [`stamp`]), changed elements, and
//!   the deletion of what no longer belongs (stale balance chains, affinity chains and
//!   sets, gate sets and data maps of endpoint counts no longer in use). Taking over a
//!   predecessor's table after a restart is the same diff; a cold start is the diff
//!   against nothing.
//!
//! A sync larger than the batch size goes in bounded batches, cut only between whole
//! units (a changed element's delete and re-add stay together; a chain's flush and
//! rules stay together): first the new objects and rewritten chains (for endpoint
//! counts old and new, so that nothing working stops matching), then the elements
//! added, ordered so that a Service is reachable only once it is complete — endpoint
//! maps first, then the per-destination sets, then the gate sets and affinity
//! verdicts that make the rules match, the ClusterIP set (whose rule rejects
//! unmatched ports) last — then the elements removed in the opposite order, and last
//! the rules for the new counts only and the deletion of stale objects. Every batch is
//! atomic; a failed one stops the sync with a typed error at a batch boundary (no
//! working rule is ever flushed without its replacement in the same batch) and the
//! next sync is full, which finishes the job from a read-back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::layout::{Counts, Layout, LbClass, CLUSTER_IPS, TABLE, TABLE_COMMENT};
use super::probe;
use super::record::{Changes, Map, Record};
use super::render::{affinity_set, chain, MapsRenderer};
use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::model::{IpFamily, ProxyState};
use crate::nftables::existing::TableContents;
use crate::nftables::interface::NftInterface;
use crate::nftables::netlink::LazyNetlink;
use crate::nftables::text::rule_body;
use crate::nftables::transaction::{
    AddrMatch, Chain, Element, Expr, Family, KeyValue, Op, Rule, Set, SetFlag, Transaction, Verdict,
};

/// A chain the layout always has; when it is gone, the table was deleted or flushed
/// behind our back.
const CANARY_CHAIN: &str = "services";

/// Consecutive failed full syncs after which the next one deletes the table and
/// builds it anew (a table whose sets cannot be updated in place, e.g. left by a
/// kproxy that declared them differently, would otherwise fail forever).
const REBUILD_AFTER_FAILURES: u32 = 2;

/// Operations per batch of a large maps-layout sync. Smaller than the upstream
/// layout's [`crate::nftables::SYNC_BATCH_OPS`]: these batches are almost all plain
/// elements, and a cold sync of 10k Services × 10 endpoints (254k elements) committed
/// ~10% faster in 5k-operation batches than in 20k ones on the benchmark machine (2k:
/// no better).
pub const MAPS_BATCH_OPS: usize = 5_000;

/// The prefix of the digest comment on each chain's first rule.
const STAMP: &str = "kproxy:";

/// Why a maps-layout sync failed.
#[derive(Debug, thiserror::Error)]
pub enum MapsSyncError<E: std::error::Error + 'static> {
    /// Reading the table back (for a full sync's diff) failed; nothing was written.
    #[error("reading back table {TABLE}")]
    Read(#[source] E),
    /// The kernel refused batch `batch` (1-based) of `of`; earlier batches are in.
    #[error("batch {batch} of {of} refused")]
    Apply {
        /// The refused batch.
        batch: usize,
        /// How many the sync had.
        of: usize,
        /// The kernel's (or fake's) answer.
        #[source]
        source: E,
    },
}

/// Where the last successful sync spent its time (benchmarks and debug logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapsSyncStats {
    /// Bringing the record up to date (re-deriving changed ports).
    pub derive: Duration,
    /// Reading the table back (full syncs).
    pub read: Duration,
    /// Building the transaction.
    pub plan: Duration,
    /// Encoding and committing it (all batches).
    pub apply: Duration,
    /// Service ports re-derived.
    pub ports: usize,
    /// Operations written.
    pub operations: usize,
    /// Batches committed.
    pub batches: usize,
    /// A full sync read the table back (else it was a partial sync, or a full one
    /// that found the kernel's generation unchanged since its own last commit).
    pub read_back: bool,
}

/// One family's maps-layout dataplane, over `I` (netlink by default).
pub struct MapsDataplane<I: NftInterface = LazyNetlink> {
    renderer: MapsRenderer,
    nft: I,
    /// What the table should hold (kept up to date port by port).
    record: Record,
    /// The last sync succeeded: the kernel holds `record` (else the next sync is full).
    applied: bool,
    batch_ops: usize,
    failed_full: u32,
    /// The kernel passed the feature probe ([`super::probe`]), run before the first
    /// sync.
    probed: bool,
    stats: MapsSyncStats,
    /// The kernel's generation right after our last commit, when that commit was
    /// provably the only one since the generation before it: while the kernel still
    /// reports it, nobody has changed any table, so a full sync need not read back.
    generation: Option<u32>,
}

impl MapsDataplane<LazyNetlink> {
    /// A dataplane over netlink in the current network namespace that has applied
    /// nothing yet (its first sync reads the table back and takes over whatever is
    /// there). The socket is opened on first use.
    pub fn new(settings: FamilySettings) -> Self {
        MapsDataplane::with_interface(settings, LazyNetlink::default())
    }
}

/// FNV-1a over the rules' text, as the stamp on a chain's first rule: a chain whose
/// stamp and rule count match what a sync would write is left alone. (Rules are not
/// decoded on read-back; the text form is what nft would print, so it covers every
/// expression.)
fn digest(family: Family, rules: &[Rule]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in rules {
        for b in rule_body(family, r).bytes().chain([b'\n']) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Puts the digest of `rules` on the first of them.
fn stamp(family: Family, mut rules: Vec<Rule>) -> Vec<Rule> {
    let d = digest(family, &rules);
    if let Some(first) = rules.first_mut() {
        first.comment = Some(format!("{STAMP}{d:016x}"));
    }
    rules
}

/// Whether the kernel's chain (its rules' comments) holds exactly `rules`.
fn holds(kernel: Option<&Vec<Option<String>>>, rules: &[Rule]) -> bool {
    kernel.is_some_and(|k| {
        k.len() == rules.len()
            && k.first().cloned().flatten() == rules.first().and_then(|r| r.comment.clone())
    })
}

/// The order elements of a container are added in (removed in reverse), so that a
/// Service becomes reachable only once it is complete (see the module comment).
fn rank(set: &str) -> u8 {
    if set.starts_with("backends-") {
        0
    } else if gate_of(set).is_some() || LbClass::ALL.iter().any(|c| c.affinity_map() == set) {
        2
    } else if set == CLUSTER_IPS {
        3
    } else {
        1
    }
}

/// The class and endpoint count of a gate set's name (`lb-ips-3`).
fn gate_of(name: &str) -> Option<(LbClass, u32)> {
    LbClass::ALL.into_iter().find_map(|class| {
        let zero = class.gate(0);
        let prefix = zero.strip_suffix('0')?;
        let n: u32 = name.strip_prefix(prefix)?.parse().ok()?;
        (n > 0 && class.gate(n) == name).then_some((class, n))
    })
}

/// An element's value: a data map's data or a verdict map's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value<'a> {
    Data(&'a [KeyValue]),
    Verdict(&'a Verdict),
}

fn element(set: &str, key: &[KeyValue], v: Value<'_>) -> Element {
    let (value, data) = match v {
        Value::Data(d) => (None, d.to_vec()),
        Value::Verdict(v) => (Some(v.clone()), Vec::new()),
    };
    Element {
        set: set.to_string(),
        key: key.to_vec(),
        comment: None,
        value,
        data,
    }
}

fn value_of(e: &Element) -> Value<'_> {
    match &e.value {
        Some(v) => Value::Verdict(v),
        None => Value::Data(&e.data),
    }
}

/// One element addition: (key, the value to delete first when it changes, value).
type Add<'a> = (&'a [KeyValue], Option<Value<'a>>, Value<'a>);

/// Element operations grouped by container, each a unit a batch never splits (an
/// addition, a deletion, or a changed value's deletion and re-addition); emitted by
/// rank and container so that consecutive operations share netlink messages. The
/// units borrow the keys and values (of the record, the changes or the read-back):
/// each element is copied once, into its operation, in the transaction's final order
/// (a cold sync's quarter-million units as operations first were ~70 MB to fill
/// and copy again).
#[derive(Default)]
struct Units<'a> {
    adds: Map<&'a str, Vec<Add<'a>>>,
    dels: Map<&'a str, Vec<(&'a [KeyValue], Value<'a>)>>,
}

impl<'a> Units<'a> {
    fn change(
        &mut self,
        set: &'a str,
        key: &'a [KeyValue],
        before: Option<Value<'a>>,
        after: Option<Value<'a>>,
    ) {
        match (before, after) {
            (Some(b), Some(a)) if b == a => {}
            (before, Some(a)) => self.adds.entry(set).or_default().push((key, before, a)),
            (Some(b), None) => self.dels.entry(set).or_default().push((key, b)),
            (None, None) => {}
        }
    }

    /// Appends the units to `tx`, a cut after each; elements of `dropped` containers
    /// (deleted whole later) are not deleted one by one.
    fn emit(mut self, tx: &mut Transaction, dropped: &BTreeSet<String>) {
        let mut add_sets: Vec<&str> = self.adds.keys().copied().collect();
        add_sets.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
        let mut del_sets: Vec<&str> = self
            .dels
            .keys()
            .copied()
            .filter(|s| !dropped.contains(*s))
            .collect();
        del_sets.sort_by(|a, b| (3 - rank(a), a).cmp(&(3 - rank(b), b)));
        let units = self.adds.values().map(Vec::len).sum::<usize>()
            + del_sets.iter().map(|s| self.dels[s].len()).sum::<usize>();
        let replaced: usize = self
            .adds
            .values()
            .flatten()
            .filter(|(_, b, _)| b.is_some())
            .count();
        tx.reserve(units + replaced, units);
        for set in add_sets {
            for (key, before, after) in self.adds.remove(set).unwrap_or_default() {
                if let Some(b) = before {
                    tx.push(Op::DeleteElement(element(set, key, b)));
                }
                tx.push(Op::AddElement(element(set, key, after)));
                tx.mark_cut();
            }
        }
        for set in del_sets {
            for (key, v) in self.dels.remove(set).unwrap_or_default() {
                tx.push(Op::DeleteElement(element(set, key, v)));
                tx.mark_cut();
            }
        }
    }
}

/// The sets an affinity chain's rules name.
fn named_sets(rules: &[Vec<Expr>]) -> impl Iterator<Item = &str> {
    rules.iter().flatten().filter_map(|e| match e {
        Expr::UpdateSaddr { set }
        | Expr::Addr {
            value: AddrMatch::Set(set),
            ..
        } => Some(set.as_str()),
        _ => None,
    })
}

impl<I: NftInterface> MapsDataplane<I> {
    /// A dataplane over any nftables implementation.
    pub fn with_interface(settings: FamilySettings, nft: I) -> Self {
        MapsDataplane {
            renderer: MapsRenderer::new(settings),
            nft,
            record: Record::default(),
            applied: false,
            batch_ops: MAPS_BATCH_OPS,
            failed_full: 0,
            probed: false,
            stats: MapsSyncStats::default(),
            generation: None,
        }
    }

    /// Splits syncs larger than `ops` operations into batches (default
    /// [`MAPS_BATCH_OPS`]).
    pub fn with_batch_ops(mut self, ops: usize) -> Self {
        self.batch_ops = ops.max(1);
        self
    }

    /// Where the last successful sync spent its time.
    pub fn last_stats(&self) -> MapsSyncStats {
        self.stats
    }

    /// The number of elements the table holds (without verdict-map elements).
    pub fn element_count(&self) -> usize {
        self.record.element_count()
    }

    fn family_label(&self) -> IpFamily {
        self.renderer.settings().family
    }

    fn nft_family(&self) -> Family {
        Family::of(self.family_label())
    }

    /// The fixed chains' rules for `counts` and `cidrs`, stamped, by chain (every
    /// fixed chain present, empty or not).
    fn fixed_rules(&self, counts: &Counts, cidrs: &[ipnet::IpNet]) -> BTreeMap<String, Vec<Rule>> {
        let layout = Layout::new(self.renderer.settings());
        let mut out: BTreeMap<String, Vec<Rule>> = layout
            .chains()
            .into_iter()
            .map(|c| (c.name, Vec::new()))
            .collect();
        for op in layout.rules(counts, cidrs) {
            if let Op::AddRule(r) = op {
                out.entry(r.chain.clone()).or_default().push(r);
            }
        }
        let family = layout.family();
        out.into_iter()
            .map(|(c, rules)| (c, stamp(family, rules)))
            .collect()
    }

    /// The balance chain of `class` and `n`, stamped.
    fn balance_rules(&self, class: LbClass, n: u32) -> Vec<Rule> {
        let layout = Layout::new(self.renderer.settings());
        let rules = match layout.balance_rule(class, n) {
            Op::AddRule(r) => vec![r],
            _ => Vec::new(),
        };
        stamp(layout.family(), rules)
    }

    /// An affinity chain's rules, stamped.
    fn affinity_rules(&self, name: &str, exprs: &[Vec<Expr>]) -> Vec<Rule> {
        let rules = exprs
            .iter()
            .map(|e| Rule {
                chain: name.to_string(),
                exprs: e.clone(),
                comment: None,
            })
            .collect();
        stamp(self.nft_family(), rules)
    }

    /// The containers whose elements a full sync reads back (and diffs): every set
    /// and map of the layout for `counts` except the dynamic ones the packet path
    /// fills.
    fn declared(&self, counts: &Counts) -> Map<String, Set> {
        Layout::new(self.renderer.settings())
            .sets(counts)
            .into_iter()
            .filter(|s| !s.flags.contains(&SetFlag::Dynamic))
            .map(|s| (s.name.clone(), s))
            .collect()
    }

    /// A full sync's transaction: the difference between the kernel's table
    /// (`kernel`, `None` when there is none) and the record.
    fn full_plan(&self, kernel: Option<&TableContents>, rebuild: bool) -> Transaction {
        let layout = Layout::new(self.renderer.settings());
        let family = layout.family();
        let mut tx = Transaction::new(family, TABLE);
        let empty = TableContents::default();
        if rebuild {
            tx.push(Op::AddTable { comment: None });
            tx.push(Op::DeleteTable);
        }
        let k = kernel.filter(|_| !rebuild).unwrap_or(&empty);
        let counts = self.record.counts();
        // Endpoint counts whose objects are all in the kernel: their rules stay until
        // the elements have moved (the union is written first).
        let kernel_counts: Counts = k
            .sets
            .iter()
            .filter_map(|s| gate_of(s))
            .filter(|(c, n)| {
                k.sets.contains(&c.backends(*n)) && k.chains.contains_key(&c.balance_chain(*n))
            })
            .collect();
        let union: Counts = counts.union(&kernel_counts).copied().collect();
        let cidrs = self.record.service_cidrs();

        tx.push(Op::AddTable {
            comment: Some(TABLE_COMMENT.into()),
        });
        for s in layout.sets(&union) {
            if !k.sets.contains(&s.name) {
                tx.push(Op::AddSet(s));
            }
        }
        let mut wanted_sets: BTreeSet<String> =
            layout.sets(&counts).into_iter().map(|s| s.name).collect();
        for (name, timeout) in self.record.affinity_sets.iter() {
            if !k.sets.contains(name) {
                tx.push(Op::AddSet(affinity_set(family, name, *timeout)));
            }
            wanted_sets.insert(name.clone());
        }
        // Chains: every fixed one, the balance chains of the union, the affinity ones.
        let mut wanted_chains: BTreeSet<String> = BTreeSet::new();
        let mut defs: Vec<Chain> = layout.chains();
        defs.extend(layout.balance_chains(&union));
        let mut affinity: Vec<(&String, &Vec<Vec<Expr>>)> = self.record.chains.iter().collect();
        affinity.sort_by(|a, b| a.0.cmp(b.0));
        defs.extend(affinity.iter().map(|(n, _)| chain(n)));
        for c in defs {
            if !k.chains.contains_key(&c.name) {
                tx.push(Op::AddChain(c.clone()));
            }
            wanted_chains.insert(c.name);
        }
        let mut contents: Vec<(String, Vec<Rule>)> =
            self.fixed_rules(&union, cidrs).into_iter().collect();
        for (class, n) in &union {
            contents.push((class.balance_chain(*n), self.balance_rules(*class, *n)));
        }
        for (name, exprs) in &affinity {
            contents.push(((*name).clone(), self.affinity_rules(name, exprs)));
        }
        for (name, rules) in contents {
            let present = k.chains.get(&name);
            if holds(present, &rules) {
                continue;
            }
            if present.is_some() {
                tx.push(Op::FlushChain(name.clone()));
            }
            tx.ops.extend(rules.into_iter().map(Op::AddRule));
        }
        for (class, n) in kernel_counts.difference(&counts) {
            wanted_chains.remove(&class.balance_chain(*n));
        }
        tx.mark_cut();

        // Elements: the kernel's (of the declared containers) against the record's.
        let declared = self.declared(&counts);
        // Keyed by borrowed parts, which hash as the record's keys do.
        let mut have: Map<(&str, &[KeyValue]), &Element> = Map::default();
        for e in &k.elements {
            if declared.contains_key(&e.set) {
                have.insert((e.set.as_str(), e.key.as_slice()), e);
            }
        }
        let mut units = Units::default();
        let fixed = self.record.fixed().iter().map(|(k, v)| (k, Value::Data(v)));
        // (No port claims a fixed element: they are the NodePort addresses.)
        let elements = self
            .record
            .elements
            .iter()
            .map(|(k, v)| (k, Value::Data(v)));
        let verdicts = self
            .record
            .verdicts
            .iter()
            .map(|(k, v)| (k, Value::Verdict(v)));
        for ((set, key), v) in fixed.chain(elements).chain(verdicts) {
            // (A cold start has nothing to look up.)
            let before = if have.is_empty() {
                None
            } else {
                have.remove(&(set.as_str(), key.as_slice())).map(value_of)
            };
            units.change(set, key, before, Some(v));
        }
        for ((set, key), e) in have {
            units.change(set, key, Some(value_of(e)), None);
        }
        let stale_sets: BTreeSet<String> = k
            .sets
            .iter()
            .filter(|s| !wanted_sets.contains(*s))
            .cloned()
            .collect();
        units.emit(&mut tx, &stale_sets);
        tx.mark_cut();

        // The rules for the new counts only, then what no longer belongs.
        if union != counts {
            let before = self.fixed_rules(&union, cidrs);
            for (name, rules) in self.fixed_rules(&counts, cidrs) {
                if before.get(&name) != Some(&rules) {
                    tx.push(Op::FlushChain(name));
                    tx.ops.extend(rules.into_iter().map(Op::AddRule));
                }
            }
        }
        let stale_chains: Vec<&String> = k
            .chains
            .keys()
            .filter(|c| !wanted_chains.contains(*c))
            .collect();
        for c in &stale_chains {
            tx.push(Op::FlushChain((*c).clone()));
        }
        // Affinity sets the kernel holds with another timeout (a table taken over
        // from a run with other Service settings): a set is not redefined in place,
        // so each is re-created, the chains naming it flushed before and refilled
        // after, in this one unit (packets never see the chains empty).
        let retimed: BTreeSet<&str> = self
            .record
            .affinity_sets
            .iter()
            .filter(|(name, t)| k.timeouts.get(*name).is_some_and(|kt| kt != *t))
            .map(|(name, _)| name.as_str())
            .collect();
        if !retimed.is_empty() {
            let users: Vec<&(&String, &Vec<Vec<Expr>>)> = affinity
                .iter()
                .filter(|(_, exprs)| named_sets(exprs).any(|s| retimed.contains(s)))
                .collect();
            for (name, _) in &users {
                tx.push(Op::FlushChain((*name).clone()));
            }
            for (name, timeout) in self.record.affinity_sets.iter() {
                if retimed.contains(name.as_str()) {
                    tx.push(Op::DeleteSet {
                        name: name.clone(),
                        is_map: false,
                    });
                    tx.push(Op::AddSet(affinity_set(family, name, *timeout)));
                }
            }
            for (name, exprs) in users {
                tx.ops.extend(
                    self.affinity_rules(name, exprs)
                        .into_iter()
                        .map(Op::AddRule),
                );
            }
        }
        for c in stale_chains {
            tx.push(Op::DeleteChain(c.clone()));
        }
        for s in stale_sets {
            let is_map = s.starts_with("backends-");
            tx.push(Op::DeleteSet { name: s, is_map });
        }
        tx
    }

    /// A partial sync's transaction from the record's changes.
    fn partial_plan(&self, ch: &Changes) -> Transaction {
        let layout = Layout::new(self.renderer.settings());
        let family = layout.family();
        let mut tx = Transaction::new(family, TABLE);
        let counts = self.record.counts();
        let cidrs = self.record.service_cidrs();
        let added: Counts = counts.difference(&ch.old_counts).copied().collect();
        let removed: Counts = ch.old_counts.difference(&counts).copied().collect();
        let union: Counts = counts.union(&ch.old_counts).copied().collect();

        // New endpoint counts: gate set, data map, balance chain with its rule (which
        // names only objects written here).
        for s in layout.sets(&added) {
            if added
                .iter()
                .any(|(c, n)| c.gate(*n) == s.name || c.backends(*n) == s.name)
            {
                tx.push(Op::AddSet(s));
            }
        }
        for (class, n) in &added {
            tx.push(Op::AddChain(chain(&class.balance_chain(*n))));
            tx.ops
                .extend(self.balance_rules(*class, *n).into_iter().map(Op::AddRule));
        }
        // Affinity sets and chains: new ones exist before anything names them; a set
        // whose timeout changed is re-created once every chain naming it is flushed.
        let retimed: BTreeSet<&str> = ch
            .affinity_sets
            .iter()
            .filter(|(_, b, a)| b.is_some() && a.is_some())
            .map(|(k, _, _)| k.as_str())
            .collect();
        for (name, before, after) in &ch.affinity_sets {
            if let (None, Some(t)) = (before, after) {
                tx.push(Op::AddSet(affinity_set(family, name, *t)));
            }
        }
        for (name, before, after) in &ch.chains {
            if before.is_none() && after.is_some() {
                tx.push(Op::AddChain(chain(name)));
            }
        }
        let mut rewrite: BTreeSet<&str> = ch
            .chains
            .iter()
            .filter(|(_, _, a)| a.is_some())
            .map(|(k, _, _)| k.as_str())
            .collect();
        if !retimed.is_empty() {
            for (name, exprs) in self.record.chains.iter() {
                if named_sets(exprs).any(|s| retimed.contains(s)) {
                    rewrite.insert(name.as_str());
                }
            }
        }
        let changed_before: BTreeSet<&str> = ch
            .chains
            .iter()
            .filter(|(_, b, _)| b.is_some())
            .map(|(k, _, _)| k.as_str())
            .collect();
        for name in &rewrite {
            // A chain created in this sync is empty already.
            let existed =
                changed_before.contains(name) || !ch.chains.iter().any(|(k, _, _)| k == name);
            if existed {
                tx.push(Op::FlushChain((*name).to_string()));
            }
        }
        for (name, _, after) in &ch.affinity_sets {
            if retimed.contains(name.as_str()) {
                if let Some(t) = after {
                    tx.push(Op::DeleteSet {
                        name: name.clone(),
                        is_map: false,
                    });
                    tx.push(Op::AddSet(affinity_set(family, name, *t)));
                }
            }
        }
        for name in &rewrite {
            if let Some(exprs) = self.record.chains.get(&(*name).to_string()) {
                tx.ops.extend(
                    self.affinity_rules(name, exprs)
                        .into_iter()
                        .map(Op::AddRule),
                );
            }
        }
        // The fixed chains for old and new counts (a new N's rule), new ServiceCIDRs.
        if !added.is_empty() || ch.old_cidrs != cidrs {
            let before = self.fixed_rules(&ch.old_counts, &ch.old_cidrs);
            for (name, rules) in self.fixed_rules(&union, cidrs) {
                if before.get(&name) != Some(&rules) {
                    tx.push(Op::FlushChain(name));
                    tx.ops.extend(rules.into_iter().map(Op::AddRule));
                }
            }
        }
        tx.mark_cut();

        let mut units = Units::default();
        for ((set, key), b, a) in &ch.elements {
            units.change(
                set,
                key,
                b.as_deref().map(Value::Data),
                a.as_deref().map(Value::Data),
            );
        }
        for ((set, key), b, a) in &ch.verdicts {
            units.change(
                set,
                key,
                b.as_ref().map(Value::Verdict),
                a.as_ref().map(Value::Verdict),
            );
        }
        let dropped: BTreeSet<String> = removed
            .iter()
            .flat_map(|(c, n)| [c.gate(*n), c.backends(*n)])
            .collect();
        units.emit(&mut tx, &dropped);
        tx.mark_cut();

        // The rules for the new counts only; then stale objects.
        if !removed.is_empty() {
            let before = self.fixed_rules(&union, cidrs);
            for (name, rules) in self.fixed_rules(&counts, cidrs) {
                if before.get(&name) != Some(&rules) {
                    tx.push(Op::FlushChain(name));
                    tx.ops.extend(rules.into_iter().map(Op::AddRule));
                }
            }
            for (class, n) in &removed {
                tx.push(Op::FlushChain(class.balance_chain(*n)));
                tx.push(Op::DeleteChain(class.balance_chain(*n)));
                tx.push(Op::DeleteSet {
                    name: class.backends(*n),
                    is_map: true,
                });
                tx.push(Op::DeleteSet {
                    name: class.gate(*n),
                    is_map: false,
                });
            }
        }
        let gone: Vec<&String> = ch
            .chains
            .iter()
            .filter(|(_, b, a)| b.is_some() && a.is_none())
            .map(|(k, _, _)| k)
            .collect();
        for c in &gone {
            tx.push(Op::FlushChain((*c).clone()));
        }
        for c in gone {
            tx.push(Op::DeleteChain(c.clone()));
        }
        for (name, before, after) in &ch.affinity_sets {
            if before.is_some() && after.is_none() {
                tx.push(Op::DeleteSet {
                    name: name.clone(),
                    is_map: false,
                });
            }
        }
        tx
    }

    /// Applies `tx` batch by batch.
    fn commit(&mut self, tx: Transaction) -> Result<usize, MapsSyncError<I::Error>> {
        if tx.is_empty() {
            return Ok(0);
        }
        // A batch of `add table` alone (a take-over that found nothing to change)
        // commits nothing, so the kernel does not count it.
        let counted = !matches!(tx.ops[..], [Op::AddTable { .. }]);
        // Taken one at a time: collecting them all first was a second copy of every
        // operation of a cold sync, in fresh memory.
        let batches = tx.into_batches(self.batch_ops);
        let of = batches.len();
        let before = self.nft.generation().ok().flatten();
        self.generation = None;
        for (i, part) in batches.into_iter().enumerate() {
            self.nft
                .apply(&part)
                .map_err(|source| MapsSyncError::Apply {
                    batch: i + 1,
                    of,
                    source,
                })?;
        }
        // Ours alone: exactly one generation per batch since the one before (the
        // generation only grows, so any other commit shows).
        let after = self.nft.generation().ok().flatten();
        let n = u32::try_from(of).ok().filter(|_| counted).or(Some(0));
        self.generation = match (before, after, n) {
            (Some(b), Some(a), Some(n)) if b.wrapping_add(n) == a => Some(a),
            _ => None,
        };
        Ok(of)
    }

    fn try_sync(
        &mut self,
        state: &ProxyState,
        full: bool,
    ) -> Result<SyncOutcome, MapsSyncError<I::Error>> {
        // A full sync of a table nobody touched since our last commit is the diff
        // against the record: a partial sync (the read-back costs seconds at 10k
        // Services, see docs/nftables-maps-layout.md).
        let untouched = self.applied
            && full
            && self.generation.is_some()
            && self.nft.generation().ok().flatten() == self.generation;
        let partial = self.applied && (!full || untouched);
        let t = Instant::now();
        // Brought up to date even when the sync then fails: a full sync (the next one
        // after a failure) diffs it against the kernel, not against what was applied.
        let changes = self.record.update(&self.renderer, state, partial);
        let mut stats = MapsSyncStats {
            derive: t.elapsed(),
            ports: changes.ports,
            ..MapsSyncStats::default()
        };
        let tx = if partial {
            let t = Instant::now();
            let tx = self.partial_plan(&changes);
            stats.plan = t.elapsed();
            tx
        } else {
            drop(changes);
            let t = Instant::now();
            let rebuild = self.failed_full >= REBUILD_AFTER_FAILURES;
            let kernel = if rebuild {
                None
            } else {
                let declared = self.declared(&self.record.counts());
                let spec = |name: &str| declared.get(name).cloned();
                self.nft
                    .read_contents(self.nft_family(), TABLE, &spec)
                    .map_err(MapsSyncError::Read)?
            };
            stats.read = t.elapsed();
            stats.read_back = !rebuild;
            if let (false, Some(k)) = (self.applied, &kernel) {
                tracing::info!(
                    table = TABLE,
                    elements = k.elements.len(),
                    "taking over the existing maps-layout table: writing only the difference"
                );
            }
            let t = Instant::now();
            let tx = self.full_plan(kernel.as_ref(), rebuild);
            stats.plan = t.elapsed();
            tx
        };
        stats.operations = tx.len();
        let t = Instant::now();
        stats.batches = self.commit(tx)?;
        stats.apply = t.elapsed();
        self.stats = stats;
        Ok(SyncOutcome {
            full: !partial || untouched,
            operations: stats.operations,
            ..SyncOutcome::default()
        })
    }
}

impl<I: NftInterface> Dataplane for MapsDataplane<I> {
    fn family(&self) -> IpFamily {
        self.family_label()
    }

    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn needs_full_sync(&self) -> bool {
        !self.applied
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        if !self.probed {
            // Once, before anything is written: refuse a kernel without what the
            // layout needs, naming the feature.
            let family = self.nft_family();
            probe::probe(&mut self.nft, family).map_err(|e| {
                DataplaneError::sync_failed(Mode::Nftables, self.family_label(), false, e)
            })?;
            self.probed = true;
        }
        let was_full = full || !self.applied;
        match self.try_sync(state, full) {
            Ok(outcome) => {
                self.applied = true;
                self.failed_full = 0;
                Ok(outcome)
            }
            Err(e) => {
                self.applied = false;
                if was_full {
                    self.failed_full += 1;
                }
                Err(DataplaneError::sync_failed(
                    Mode::Nftables,
                    self.family_label(),
                    !was_full,
                    e,
                ))
            }
        }
    }

    fn rules_flushed(&mut self) -> bool {
        if !self.applied {
            return false;
        }
        let family = self.nft_family();
        match self.nft.chain_exists(family, TABLE, CANARY_CHAIN) {
            Ok(exists) => !exists,
            Err(e) => {
                tracing::warn!(error = %e, "checking the nftables table failed");
                false
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.applied = false;
        let family = self.nft_family();
        self.nft
            .delete_table(family, TABLE)
            .map_err(|e| DataplaneError::cleanup_failed(Mode::Nftables, self.family_label(), e))
    }
}

#[cfg(test)]
mod tests;
