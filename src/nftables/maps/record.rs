//! What the maps table should hold, kept up to date port by port, so that a sync
//! re-derives only the Service ports whose plan changed (the model shares unchanged
//! ports by pointer) and a one-endpoint change costs one port's elements, not a walk
//! of every element of the cluster.
//!
//! Several ports may claim one element (two Services on one NodePort or one external
//! IP is a cluster error, but it happens). [`MapsRenderer::desired`] lets the first
//! port in sorted order win; here every key remembers its claimants, and the winner is
//! re-chosen when one of them changes, so the record always equals a fresh full
//! derivation (checked by the property test below).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use ipnet::IpNet;

use super::layout::{Counts, LbClass};
#[cfg(test)]
use super::render::Desired;
use super::render::{ElementKey, MapsRenderer, Sink};
use crate::model::{PortChange, PortList, PortPlan, ProxyState};
use crate::nftables::transaction::{Expr, KeyValue, Verdict};

/// Hash maps with a fixed, fast hasher: iteration order (and so the order of a sync's
/// operations) is the same on every run, and nothing needs these keys sorted.
pub(crate) type Map<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// A multiply-rotate hasher over 64-bit words (the Firefox/rustc scheme, written
/// here): element keys are many small fields, for which SipHash's per-call cost was
/// most of a cold sync's record time. Not flooding-resistant; the keys are the
/// cluster's own Service and endpoint addresses, and a collision only costs time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One key's claimants and their values; the port first in port order gives the
/// value (as in the full derivation).
#[derive(Debug, Clone)]
enum Slot<V> {
    One(Arc<PortPlan>, V),
    Many(Vec<(Arc<PortPlan>, V)>),
}

impl<V> Slot<V> {
    fn value(&self) -> &V {
        match self {
            Slot::One(_, v) => v,
            Slot::Many(all) => all
                .iter()
                .min_by(|a, b| a.0.svc.name.cmp(&b.0.svc.name))
                .map(|(_, v)| v)
                .unwrap_or_else(|| unreachable!("a slot is removed when its last claimant goes")),
        }
    }

    /// Adds `p`'s claim, unless `p` claims the key already: within one port the
    /// first writer wins (the port is the same allocation throughout its claim).
    fn add(&mut self, p: &Arc<PortPlan>, v: V) {
        match self {
            Slot::One(q, _) if Arc::ptr_eq(q, p) => {}
            Slot::Many(all) if all.iter().any(|(q, _)| Arc::ptr_eq(q, p)) => {}
            Slot::One(..) => {
                let Slot::One(q, w) = std::mem::replace(self, Slot::Many(Vec::new())) else {
                    unreachable!()
                };
                *self = Slot::Many(vec![(q, w), (p.clone(), v)]);
            }
            Slot::Many(all) => all.push((p.clone(), v)),
        }
    }

    /// Removes `p`'s claim; `true` when no claimant is left. A claimant is known by
    /// its port name (one claim per name: a changed port's old plan is released
    /// before its new one claims), so the claim need not hold the allocation the
    /// state now shares.
    fn remove(&mut self, p: &Arc<PortPlan>) -> bool {
        let same = |q: &Arc<PortPlan>| Arc::ptr_eq(q, p) || q.svc.name == p.svc.name;
        match self {
            Slot::One(q, _) => same(q),
            Slot::Many(all) => {
                if let Some(i) = all.iter().position(|(q, _)| same(q)) {
                    all.remove(i);
                }
                if all.len() == 1 {
                    if let Some((q, v)) = all.pop() {
                        *self = Slot::One(q, v);
                    }
                }
                matches!(self, Slot::Many(all) if all.is_empty())
            }
        }
    }
}

/// An entry whose winning value changed: key, value before, value after (`None`:
/// absent).
pub(crate) type Change<K, V> = (K, Option<V>, Option<V>);

/// Claimed values by key, with the values before the current update of every key it
/// touched (when changes are tracked).
#[derive(Debug, Clone)]
pub(crate) struct Claims<K, V> {
    slots: Map<K, Slot<V>>,
    touched: Option<Map<K, Option<V>>>,
}

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Claims {
            slots: Map::default(),
            touched: None,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> Claims<K, V> {
    /// Every key and its winning value.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().map(|(k, s)| (k, s.value()))
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.slots.get(k).map(Slot::value)
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    fn reserve(&mut self, more: usize) {
        self.slots.reserve(more);
    }

    fn note(&mut self, k: &K) {
        if let Some(t) = &mut self.touched {
            if !t.contains_key(k) {
                let before = self.slots.get(k).map(|s| s.value().clone());
                t.insert(k.clone(), before);
            }
        }
    }

    fn claim(&mut self, k: K, p: &Arc<PortPlan>, v: V) {
        self.note(&k);
        match self.slots.entry(k) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(p, v),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Slot::One(p.clone(), v));
            }
        }
    }

    fn release(&mut self, k: &K, p: &Arc<PortPlan>) {
        self.note(k);
        if let Some(s) = self.slots.get_mut(k) {
            if s.remove(p) {
                self.slots.remove(k);
            }
        }
    }

    /// The keys whose winning value changed since [`Claims::track`].
    fn changes(&mut self) -> Vec<Change<K, V>> {
        let Some(touched) = self.touched.take() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, before) in touched {
            let after = self.get(&k).cloned();
            if before != after {
                out.push((k, before, after));
            }
        }
        out
    }

    fn track(&mut self, on: bool) {
        self.touched = on.then(Map::default);
    }
}

/// What changed in one [`Record::update`] (empty when changes were not tracked).
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) elements: Vec<Change<ElementKey, Vec<KeyValue>>>,
    pub(crate) verdicts: Vec<Change<ElementKey, Verdict>>,
    pub(crate) chains: Vec<Change<String, Vec<Vec<Expr>>>>,
    pub(crate) affinity_sets: Vec<Change<String, u32>>,
    /// The endpoint counts in use before the update.
    pub(crate) old_counts: Counts,
    /// The ServiceCIDRs before the update.
    pub(crate) old_cidrs: Vec<IpNet>,
    /// Ports re-derived (changed, added or removed).
    pub(crate) ports: usize,
}

/// The desired table, maintained port by port.
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    /// The ports of the last update (the state's list, shared).
    ports: PortList,
    pub(crate) elements: Claims<ElementKey, Vec<KeyValue>>,
    pub(crate) verdicts: Claims<ElementKey, Verdict>,
    pub(crate) chains: Claims<String, Vec<Vec<Expr>>>,
    pub(crate) affinity_sets: Claims<String, u32>,
    /// How many ports use each endpoint count (a count is in use while any does, as
    /// in the full derivation, even for a port that lost its destination).
    counts: Map<(LbClass, u32), usize>,
    service_cidrs: Vec<IpNet>,
    /// Elements every table has (the NodePort addresses), set on the first update.
    fixed: Option<Vec<(ElementKey, Vec<KeyValue>)>>,
}

/// One port's claims (or, with `claim` false, their release), made as the renderer
/// places each piece: a cold sync claims every element of the cluster, and collecting
/// each port into a sorted [`super::render::Desired`] first cost more than the claims.
struct PortClaim<'a> {
    rec: &'a mut Record,
    port: &'a Arc<PortPlan>,
    /// The endpoint counts the port uses, with repeats (a port counts each once).
    counts: Vec<(LbClass, u32)>,
    claim: bool,
}

impl PortClaim<'_> {
    fn distinct_counts(&mut self) -> Vec<(LbClass, u32)> {
        let mut c = std::mem::take(&mut self.counts);
        c.sort_unstable();
        c.dedup();
        c
    }

    fn put<K: Hash + Eq + Clone, V: Clone + PartialEq>(
        claims: &mut Claims<K, V>,
        claim: bool,
        port: &Arc<PortPlan>,
        k: K,
        v: V,
    ) {
        if claim {
            claims.claim(k, port, v);
        } else {
            // A key the port placed twice is released once: the second finds no
            // claim of the port's name left.
            claims.release(&k, port);
        }
    }
}

impl Sink for PortClaim<'_> {
    fn element(&mut self, set: &str, key: Vec<KeyValue>, data: Vec<KeyValue>) {
        let k = (set.to_string(), key);
        Self::put(&mut self.rec.elements, self.claim, self.port, k, data);
    }

    fn verdict(&mut self, map: &str, key: Vec<KeyValue>, verdict: Verdict) {
        let k = (map.to_string(), key);
        Self::put(&mut self.rec.verdicts, self.claim, self.port, k, verdict);
    }

    fn chain(&mut self, name: String, rules: Vec<Vec<Expr>>) {
        Self::put(&mut self.rec.chains, self.claim, self.port, name, rules);
    }

    fn affinity_set(&mut self, name: String, timeout: u32) {
        Self::put(
            &mut self.rec.affinity_sets,
            self.claim,
            self.port,
            name,
            timeout,
        );
    }

    fn count(&mut self, class: LbClass, n: u32) {
        self.counts.push((class, n));
    }
}

impl Record {
    /// The endpoint counts in use.
    pub(crate) fn counts(&self) -> Counts {
        self.counts.keys().copied().collect()
    }

    pub(crate) fn service_cidrs(&self) -> &[IpNet] {
        &self.service_cidrs
    }

    /// The fixed elements (the NodePort addresses).
    pub(crate) fn fixed(&self) -> &[(ElementKey, Vec<KeyValue>)] {
        self.fixed.as_deref().unwrap_or_default()
    }

    /// Number of elements (without verdict-map elements).
    pub(crate) fn element_count(&self) -> usize {
        self.elements.len() + self.fixed().len()
    }

    /// The whole record as a [`Desired`] (sorted; what the tests compare with a full
    /// derivation).
    #[cfg(test)]
    pub(crate) fn desired(&self) -> Desired {
        let mut d = Desired {
            counts: self.counts(),
            service_cidrs: self.service_cidrs.clone(),
            ..Desired::default()
        };
        for (k, v) in self.fixed() {
            d.elements.insert(k.clone(), v.clone());
        }
        for (k, v) in self.elements.iter() {
            d.elements.entry(k.clone()).or_insert_with(|| v.clone());
        }
        d.verdicts = self
            .verdicts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        d.chains = self
            .chains
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        d.affinity_sets = self
            .affinity_sets
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        d
    }

    fn release_port(&mut self, r: &MapsRenderer, p: &Arc<PortPlan>) {
        let mut release = PortClaim {
            rec: self,
            port: p,
            counts: Vec::new(),
            claim: false,
        };
        r.port_into(p, &mut release);
        for c in release.distinct_counts() {
            if let Some(n) = self.counts.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&c);
                }
            }
        }
    }

    fn claim_port(&mut self, r: &MapsRenderer, p: &Arc<PortPlan>) {
        let mut claim = PortClaim {
            rec: self,
            port: p,
            counts: Vec::new(),
            claim: true,
        };
        r.port_into(p, &mut claim);
        for c in claim.distinct_counts() {
            *self.counts.entry(c).or_insert(0) += 1;
        }
    }

    /// Brings the record to `state`. With `track`, returns what changed (for a
    /// partial sync); without, only the record is updated (a full sync diffs the
    /// whole record against the kernel anyway).
    pub(crate) fn update(&mut self, r: &MapsRenderer, state: &ProxyState, track: bool) -> Changes {
        if self.fixed.is_none() {
            let d = r.desired(&ProxyState {
                family: state.family,
                ports: PortList::new(),
                service_cidrs: Vec::new(),
            });
            self.fixed = Some(d.elements.into_iter().collect());
        }
        let mut changes = Changes {
            old_counts: self.counts(),
            old_cidrs: std::mem::replace(&mut self.service_cidrs, state.service_cidrs.clone()),
            ..Changes::default()
        };
        self.elements.track(track);
        self.verdicts.track(track);
        self.chains.track(track);
        self.affinity_sets.track(track);
        if self.elements.len() == 0 {
            // A cold start: room for about what the ports will claim (each port's
            // destinations and per-endpoint elements), instead of growing a map of a
            // quarter of a million entries by doubling, re-hashing each time.
            let estimate: usize = state.ports.iter().map(|p| 3 + 2 * p.endpoints.len()).sum();
            self.elements.reserve(estimate);
        }
        // Only the ports that differ: chunks shared with the last update are skipped.
        let old = std::mem::take(&mut self.ports);
        for change in state.ports.changes(&old) {
            match change {
                PortChange::Removed(a) => self.release_port(r, a),
                PortChange::Added(b) => self.claim_port(r, b),
                PortChange::Changed(a, b) => {
                    self.release_port(r, a);
                    self.claim_port(r, b);
                }
            }
            changes.ports += 1;
        }
        // The state's allocations, so that the next walk compares pointers.
        self.ports = state.ports.clone();
        changes.elements = self.elements.changes();
        changes.verdicts = self.verdicts.changes();
        changes.chains = self.chains.changes();
        changes.affinity_sets = self.affinity_sets.changes();
        changes
    }
}

// The integration tests' random-cluster generator (it names the crate `kproxy`).
#[cfg(test)]
#[allow(unreachable_pub)]
#[path = "../../../tests/support/cluster_gen.rs"]
pub(super) mod cluster_gen;

#[cfg(test)]
mod tests {
    use super::cluster_gen::{mutate, node, settings, Lcg};
    use super::*;
    use crate::model::{synthetic, ClusterState, IpFamily, NodeContext};

    /// After every random change the record equals a fresh full derivation, and the
    /// changes it reports turn the previous derivation into the new one.
    #[test]
    fn the_record_equals_a_full_derivation_after_any_sequence_of_changes() {
        for seed in 0..40u64 {
            let mut rng = Lcg(seed * 7919 + 1);
            let r = MapsRenderer::new(settings(IpFamily::V4));
            let mut state = ClusterState::new();
            let mut rec = Record::default();
            let mut prev = r.desired(&state.proxy_state(IpFamily::V4, &node()));
            for step in 0..30 {
                for _ in 0..1 + rng.next(3) {
                    mutate(&mut rng, &mut state);
                }
                let ps = state.proxy_state(IpFamily::V4, &node());
                let ch = rec.update(&r, &ps, true);
                let full = r.desired(&ps);
                assert_eq!(rec.desired(), full, "seed {seed} step {step}");
                // Applying the changes to the previous derivation gives the new one.
                for (k, _, after) in ch.elements {
                    match after {
                        Some(v) => prev.elements.insert(k, v),
                        None => prev.elements.remove(&k),
                    };
                }
                for (k, _, after) in ch.verdicts {
                    match after {
                        Some(v) => prev.verdicts.insert(k, v),
                        None => prev.verdicts.remove(&k),
                    };
                }
                for (k, _, after) in ch.chains {
                    match after {
                        Some(v) => prev.chains.insert(k, v),
                        None => prev.chains.remove(&k),
                    };
                }
                for (k, _, after) in ch.affinity_sets {
                    match after {
                        Some(v) => prev.affinity_sets.insert(k, v),
                        None => prev.affinity_sets.remove(&k),
                    };
                }
                prev.counts = rec.counts();
                prev.service_cidrs = ps.service_cidrs.clone();
                assert_eq!(prev, full, "seed {seed} step {step}: changes");
            }
        }
    }

    /// Two ports claiming one NodePort: the first in port order wins, the other takes
    /// over when it goes, in either direction.
    #[test]
    fn a_shared_element_passes_between_claimants_in_port_order() {
        let r = MapsRenderer::new(settings(IpFamily::V4));
        let node = NodeContext::default();
        let base = synthetic::cluster(6, 2).proxy_state(IpFamily::V4, &node);
        let np = base.ports[0].svc.node_port;
        assert_ne!(np, 0, "svc0 is a NodePort Service");
        let mut shared = base.clone();
        let last = shared.ports.len() - 1;
        let mut p = (*shared.ports[last]).clone();
        p.svc.node_port = np;
        shared.ports = shared.ports.replaced(last, Arc::new(p));
        let mut without_first = shared.clone();
        without_first.ports = shared
            .ports
            .iter()
            .skip(1)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        let mut rec = Record::default();
        for st in [
            &base,
            &shared,
            &without_first,
            &shared,
            &base,
            &without_first,
        ] {
            rec.update(&r, st, true);
            assert_eq!(rec.desired(), r.desired(st));
        }
    }

    /// An unchanged cluster re-derives nothing.
    #[test]
    fn unchanged_ports_are_not_re_derived() {
        let r = MapsRenderer::new(settings(IpFamily::V4));
        let st = synthetic::cluster(50, 3).proxy_state(IpFamily::V4, &NodeContext::default());
        let mut rec = Record::default();
        assert_eq!(rec.update(&r, &st, false).ports, st.ports.len());
        let again = rec.update(&r, &st.clone(), true);
        assert_eq!(again.ports, 0);
        assert!(again.elements.is_empty());
        // A copy of a port (same content, another allocation) is not a change either.
        let mut copy = st.clone();
        copy.ports = st.ports.replaced(3, Arc::new((*st.ports[3]).clone()));
        assert_eq!(rec.update(&r, &copy, true).ports, 0);
    }
}
