//! An in-memory nftables table that applies transactions with the kernel's semantics
//! (atomic, all-or-nothing, the same idempotency and error rules), for tests and for
//! checking that incremental syncs converge to what a full sync builds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::existing::{Existing, TableContents, MANAGED_SETS};
use super::interface::NftInterface;
use super::text::{element_body, op_line, rule_body};
use super::transaction::{Chain, Element, Expr, Family, Op, Rule, Set, Transaction, Verdict};

/// Why a transaction was refused (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("operation {index} ({op}): {reason}")]
pub struct FakeError {
    /// 0-based index of the failing operation.
    pub index: usize,
    /// The operation in nft syntax.
    pub op: String,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FakeChain {
    def: Option<Chain>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FakeSet {
    def: Set,
    elements: BTreeMap<String, Element>,
}

/// The state of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fake {
    family: Option<Family>,
    name: String,
    comment: Option<String>,
    exists: bool,
    chains: BTreeMap<String, FakeChain>,
    sets: BTreeMap<String, FakeSet>,
}

impl Fake {
    /// An empty (absent) table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the table exists.
    pub fn exists(&self) -> bool {
        self.exists
    }

    #[cfg(test)]
    /// Names of existing chains.
    pub(crate) fn chain_names(&self) -> Vec<String> {
        self.chains.keys().cloned().collect()
    }

    /// Elements of a set or map.
    pub fn elements(&self, set: &str) -> Vec<Element> {
        self.sets
            .get(set)
            .map(|s| s.elements.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Rules of a chain.
    pub fn rules(&self, chain: &str) -> Vec<Rule> {
        self.chains
            .get(chain)
            .map(|c| c.rules.clone())
            .unwrap_or_default()
    }

    /// The table as the kernel would report it on read-back (`None` when absent).
    pub fn existing(&self) -> Option<Existing> {
        if !self.exists {
            return None;
        }
        let elements = MANAGED_SETS
            .iter()
            .flat_map(|set| self.elements(set))
            .map(|e| Element { comment: None, ..e })
            .collect();
        Some(Existing {
            chains: self.chains.keys().cloned().collect(),
            sets: self.sets.keys().cloned().collect(),
            elements,
        })
    }

    /// The table as [`NftInterface::read_contents`] reports it: rules' comments per
    /// chain, set names, and the elements (without comments) of the sets `declared`.
    pub fn contents(&self, declared: &dyn Fn(&str) -> Option<Set>) -> Option<TableContents> {
        if !self.exists {
            return None;
        }
        let chains = self
            .chains
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    c.rules.iter().map(|r| r.comment.clone()).collect(),
                )
            })
            .collect();
        let elements = self
            .sets
            .iter()
            .filter(|(n, _)| declared(n).is_some())
            .flat_map(|(_, s)| s.elements.values())
            .map(|e| Element {
                comment: None,
                ..e.clone()
            })
            .collect();
        Some(TableContents {
            chains,
            sets: self.sets.keys().cloned().collect(),
            timeouts: self
                .sets
                .iter()
                .filter_map(|(n, s)| Some((n.clone(), s.def.timeout?)))
                .collect(),
            elements,
        })
    }

    /// Applies a transaction atomically.
    pub fn apply(&mut self, tx: &Transaction) -> Result<(), FakeError> {
        let mut next = self.clone();
        for (i, op) in tx.ops.iter().enumerate() {
            next.apply_op(tx, op).map_err(|reason| FakeError {
                index: i,
                op: op_line(tx.family, &tx.table, op),
                reason,
            })?;
        }
        *self = next;
        Ok(())
    }

    fn referenced_chains(r: &Rule) -> Vec<&str> {
        let mut out = Vec::new();
        for e in &r.exprs {
            match e {
                Expr::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) => out.push(c.as_str()),
                Expr::NumgenVmap { targets } => {
                    for t in targets {
                        if let Verdict::Jump(c) | Verdict::Goto(c) = t {
                            out.push(c.as_str());
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn referenced_sets(r: &Rule) -> Vec<&str> {
        let mut out = Vec::new();
        for e in &r.exprs {
            match e {
                Expr::Addr {
                    value: super::transaction::AddrMatch::Set(s),
                    ..
                } => out.push(s.as_str()),
                Expr::Vmap { map, .. } => out.push(map.as_str()),
                Expr::UpdateSaddr { set } => out.push(set.as_str()),
                _ => {}
            }
        }
        out
    }

    fn chain_in_use(&self, name: &str) -> bool {
        self.chains
            .values()
            .flat_map(|c| c.rules.iter())
            .any(|r| Self::referenced_chains(r).contains(&name))
            || self
                .sets
                .values()
                .flat_map(|s| s.elements.values())
                .any(|e| matches!(&e.value, Some(Verdict::Jump(c) | Verdict::Goto(c)) if c == name))
    }

    fn apply_op(&mut self, tx: &Transaction, op: &Op) -> Result<(), String> {
        if !self.exists && !matches!(op, Op::AddTable { .. }) {
            return Err("no such table".into());
        }
        match op {
            Op::AddTable { comment } => {
                if !self.exists {
                    self.exists = true;
                    self.family = Some(tx.family);
                    self.name = tx.table.clone();
                    self.comment = comment.clone();
                }
            }
            Op::DeleteTable => *self = Fake::default(),
            Op::AddChain(c) => {
                let entry = self.chains.entry(c.name.clone()).or_default();
                match &entry.def {
                    Some(old) if old.base != c.base => {
                        return Err("chain exists with other hook/priority".into())
                    }
                    _ => entry.def = Some(c.clone()),
                }
            }
            Op::FlushChain(n) => {
                self.chains.get_mut(n).ok_or("no such chain")?.rules.clear();
            }
            Op::DeleteChain(n) => {
                if !self.chains.contains_key(n) {
                    return Err("no such chain".into());
                }
                if self.chain_in_use(n) {
                    return Err("chain is still referenced".into());
                }
                self.chains.remove(n);
            }
            Op::AddRule(r) => {
                for c in Self::referenced_chains(r) {
                    if !self.chains.contains_key(c) {
                        return Err(format!("jump to missing chain {c}"));
                    }
                }
                for s in Self::referenced_sets(r) {
                    if !self.sets.contains_key(s) {
                        return Err(format!("missing set {s}"));
                    }
                }
                self.chains
                    .get_mut(&r.chain)
                    .ok_or("no such chain")?
                    .rules
                    .push(r.clone());
            }
            Op::AddSet(s) => {
                if let Some(old) = self.sets.get(&s.name) {
                    if old.def.key != s.key || old.def.value != s.value {
                        return Err("set exists with another type".into());
                    }
                } else {
                    self.sets.insert(
                        s.name.clone(),
                        FakeSet {
                            def: s.clone(),
                            elements: BTreeMap::new(),
                        },
                    );
                }
            }
            Op::FlushSet { name, .. } => {
                self.sets
                    .get_mut(name)
                    .ok_or("no such set")?
                    .elements
                    .clear();
            }
            Op::DeleteSet { name, .. } => {
                let in_use = self
                    .chains
                    .values()
                    .flat_map(|c| c.rules.iter())
                    .any(|r| Self::referenced_sets(r).contains(&name.as_str()));
                if in_use {
                    return Err("set is still referenced".into());
                }
                self.sets.remove(name).ok_or("no such set")?;
            }
            Op::AddElement(e) => {
                if let Some(Verdict::Jump(c) | Verdict::Goto(c)) = &e.value {
                    if !self.chains.contains_key(c) {
                        return Err(format!("element points at missing chain {c}"));
                    }
                }
                let set = self.sets.get_mut(&e.set).ok_or("no such set")?;
                // As the kernel: re-adding an element is fine, changing its data or
                // verdict is not (EBUSY); a change is a delete and an add.
                let id = e.key_text();
                if let Some(old) = set.elements.get(&id) {
                    if old.data != e.data || old.value != e.value {
                        return Err("element exists with other data".into());
                    }
                }
                set.elements.insert(id, e.clone());
            }
            Op::DeleteElement(e) => {
                let set = self.sets.get_mut(&e.set).ok_or("no such set")?;
                set.elements
                    .remove(&e.key_text())
                    .ok_or("no such element")?;
            }
        }
        Ok(())
    }

    /// The table's content as `add …` lines (table, chains, sets, maps, rules, elements).
    pub fn dump(&self) -> String {
        let Some(f) = self.family.filter(|_| self.exists) else {
            return String::new();
        };
        let ft = format!("{} {}", f.as_str(), self.name);
        let mut out = String::new();
        out.push_str(&op_line(
            f,
            &self.name,
            &Op::AddTable {
                comment: self.comment.clone(),
            },
        ));
        out.push('\n');
        for c in self.chains.values() {
            if let Some(def) = &c.def {
                out.push_str(&op_line(f, &self.name, &Op::AddChain(def.clone())));
                out.push('\n');
            }
        }
        for maps in [false, true] {
            for s in self.sets.values().filter(|s| s.def.is_map == maps) {
                out.push_str(&op_line(f, &self.name, &Op::AddSet(s.def.clone())));
                out.push('\n');
            }
        }
        for (name, c) in &self.chains {
            for r in &c.rules {
                out.push_str(&format!("add rule {ft} {name} {}\n", rule_body(f, r)));
            }
        }
        for (name, s) in &self.sets {
            for e in s.elements.values() {
                out.push_str(&format!(
                    "add element {ft} {name} {}\n",
                    element_body(e, true)
                ));
            }
        }
        out
    }
}

/// What a [`FakeNft`] holds: its tables, and failures to inject.
#[derive(Debug, Default)]
struct FakeNftState {
    tables: BTreeMap<(&'static str, String), Fake>,
    fail_next: usize,
    applied: Vec<Transaction>,
    /// Committed batches, as the kernel's generation counts them.
    generation: u32,
}

/// Why a [`FakeNft`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeNftError {
    /// The transaction was refused; nothing changed.
    #[error(transparent)]
    Refused(#[from] FakeError),
    /// A failure injected by [`FakeNft::fail_next`].
    #[error("injected failure")]
    Injected,
}

/// An in-memory nftables with any number of tables, implementing [`NftInterface`]
/// like the kernel does. Clones share the same tables, so a test keeps one handle
/// while a dataplane owns another.
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    state: Arc<Mutex<FakeNftState>>,
}

impl FakeNft {
    /// An nftables with no tables.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeNftState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes the next `n` applies fail (changing nothing).
    pub fn fail_next(&self, n: usize) {
        self.with(|s| s.fail_next = n);
    }

    /// A copy of one table (empty and absent when it does not exist).
    pub fn table(&self, family: Family, name: &str) -> Fake {
        self.with(|s| {
            s.tables
                .get(&(family.as_str(), name.to_string()))
                .cloned()
                .unwrap_or_default()
        })
    }

    /// Every transaction applied successfully so far, in order.
    pub fn applied(&self) -> Vec<Transaction> {
        self.with(|s| s.applied.clone())
    }

    #[cfg(test)]
    /// Deletes a table behind the dataplane's back (as `nft flush ruleset` would).
    pub(crate) fn remove_table(&self, family: Family, name: &str) {
        self.with(|s| {
            s.generation = s.generation.wrapping_add(1);
            s.tables.remove(&(family.as_str(), name.to_string()))
        });
    }
}

impl NftInterface for FakeNft {
    type Error = FakeNftError;

    fn apply(&mut self, tx: &Transaction) -> Result<(), FakeNftError> {
        self.with(|s| {
            if s.fail_next > 0 {
                s.fail_next -= 1;
                return Err(FakeNftError::Injected);
            }
            let key = (tx.family.as_str(), tx.table.clone());
            let table = s.tables.entry(key.clone()).or_default();
            let before = table.clone();
            let result = table.apply(tx);
            // As the kernel: a batch that changes nothing commits nothing.
            let changed = *table != before;
            if !table.exists() {
                s.tables.remove(&key);
            }
            result?;
            if changed {
                s.generation = s.generation.wrapping_add(1);
            }
            s.applied.push(tx.clone());
            Ok(())
        })
    }

    fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, FakeNftError> {
        Ok(self.table(family, table).existing())
    }

    fn generation(&mut self) -> Result<Option<u32>, FakeNftError> {
        Ok(Some(self.with(|s| s.generation)))
    }

    fn read_contents(
        &mut self,
        family: Family,
        table: &str,
        declared: &dyn Fn(&str) -> Option<Set>,
    ) -> Result<Option<TableContents>, FakeNftError> {
        Ok(self.with(|s| {
            s.tables
                .get(&(family.as_str(), table.to_string()))
                .and_then(|t| t.contents(declared))
        }))
    }

    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, FakeNftError> {
        Ok(self
            .table(family, table)
            .chains
            .get(chain)
            .is_some_and(|c| c.def.is_some()))
    }

    fn is_not_found(e: &FakeNftError) -> bool {
        matches!(e, FakeNftError::Refused(f) if f.reason.starts_with("no such"))
    }
}

#[cfg(test)]
mod fake_nft_tests {
    use super::*;

    fn add_table() -> Transaction {
        let mut tx = Transaction::new(Family::Ip, "t");
        tx.push(Op::AddTable { comment: None });
        tx.push(Op::AddChain(Chain {
            name: "c".into(),
            base: None,
            comment: None,
        }));
        tx
    }

    #[test]
    fn tables_are_shared_between_clones_and_read_back() {
        let nft = FakeNft::new();
        let mut handle = nft.clone();
        assert_eq!(handle.read_table(Family::Ip, "t"), Ok(None));
        handle.apply(&add_table()).unwrap();
        let existing = nft.clone().read_table(Family::Ip, "t").unwrap().unwrap();
        assert_eq!(existing.chains.iter().collect::<Vec<_>>(), vec!["c"]);
        assert!(handle.chain_exists(Family::Ip, "t", "c").unwrap());
        assert!(!handle.chain_exists(Family::Ip6, "t", "c").unwrap());
    }

    #[test]
    fn injected_failures_change_nothing_and_delete_is_idempotent() {
        let mut nft = FakeNft::new();
        nft.fail_next(1);
        assert_eq!(nft.apply(&add_table()), Err(FakeNftError::Injected));
        assert!(!nft.table(Family::Ip, "t").exists());
        nft.apply(&add_table()).unwrap();
        nft.delete_table(Family::Ip, "t").unwrap();
        assert!(!nft.table(Family::Ip, "t").exists());
        nft.delete_table(Family::Ip, "t").unwrap();
    }
}
