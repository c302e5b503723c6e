//! The sorted Service ports of a [`super::ProxyState`], kept in shared chunks.
//!
//! A sync after one endpoint change must not cost a walk over every Service: at 30k
//! Services, copying a flat `Vec<Arc<PortPlan>>` (an atomic increment on each plan,
//! each a cache miss) and walking it again to find what changed took ~15 ms, ten times
//! the dataplane's own work. So the list is a vector of chunks, each shared by `Arc`:
//! cloning the list is one increment, replacing one Service copies one chunk and the
//! chunk index (tens of pointers per thousand Services), and [`PortList::changes`]
//! skips every chunk the two lists share by pointer.
//!
//! Invariants: chunks are non-empty, in order, and each holds whole Services (a
//! Service's ports never straddle two chunks), so grouping by Service works chunk by
//! chunk and a Service is found by one binary search over the chunks' first ports.

use std::cmp::Ordering;
use std::sync::Arc;

use super::{ObjectKey, PortPlan};

/// Ports per chunk aimed for; a chunk is split above twice this and merged with its
/// neighbour below a quarter of it.
const CHUNK_PORTS: usize = 64;

type Chunk = Arc<Vec<Arc<PortPlan>>>;

/// The ports of a [`PortList`] in order.
pub type Iter<'a> = std::iter::FlatMap<
    std::slice::Iter<'a, Chunk>,
    std::slice::Iter<'a, Arc<PortPlan>>,
    fn(&'a Chunk) -> std::slice::Iter<'a, Arc<PortPlan>>,
>;

/// One Service's ports before and after (see [`PortList::changed_services`]).
pub(crate) type ServiceChange<'a> = (Option<&'a [Arc<PortPlan>]>, Option<&'a [Arc<PortPlan>]>);

/// Service ports sorted by namespace, name, port name and protocol (see the module
/// comment for the representation).
#[derive(Clone, Default)]
pub struct PortList {
    chunks: Arc<Vec<Chunk>>,
    len: usize,
}

/// One port that differs between two lists (see [`PortList::changes`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum PortChange<'a> {
    /// In the older list only.
    Removed(&'a Arc<PortPlan>),
    /// In the newer list only.
    Added(&'a Arc<PortPlan>),
    /// In both, with different plans (older, newer).
    Changed(&'a Arc<PortPlan>, &'a Arc<PortPlan>),
}

/// Where a port's Service sorts relative to `(namespace, name)`.
fn cmp_service(p: &PortPlan, namespace: &str, name: &str) -> Ordering {
    let n = &p.svc.name;
    (n.namespace.as_str(), n.name.as_str()).cmp(&(namespace, name))
}

fn same_service(a: &PortPlan, b: &PortPlan) -> bool {
    a.svc.name.namespace == b.svc.name.namespace && a.svc.name.name == b.svc.name.name
}

/// The index of the first port of the Service at or after the middle of `ports`, or
/// of the Service after it when that is the first; `None` when `ports` is one Service.
fn service_boundary_near_middle(ports: &[Arc<PortPlan>]) -> Option<usize> {
    let mid = &ports[ports.len() / 2].svc.name;
    let start = ports.partition_point(|p| cmp_service(p, &mid.namespace, &mid.name).is_lt());
    if start > 0 {
        return Some(start);
    }
    let end = ports.partition_point(|p| cmp_service(p, &mid.namespace, &mid.name).is_le());
    (end < ports.len()).then_some(end)
}

impl PortList {
    /// An empty list.
    pub fn new() -> Self {
        PortList::default()
    }

    /// A list of `ports`, which must be sorted by port name (as
    /// [`super::ClusterState::proxy_state`] derives them).
    pub fn from_sorted(ports: Vec<Arc<PortPlan>>) -> Self {
        debug_assert!(ports.windows(2).all(|w| w[0].svc.name <= w[1].svc.name));
        let len = ports.len();
        let mut chunks = Vec::with_capacity(len / CHUNK_PORTS + 1);
        let mut current: Vec<Arc<PortPlan>> = Vec::with_capacity(CHUNK_PORTS);
        for p in ports {
            // Cut only between Services.
            if current.len() >= CHUNK_PORTS && current.last().is_some_and(|q| !same_service(q, &p))
            {
                chunks.push(Arc::new(std::mem::take(&mut current)));
                current.reserve(CHUNK_PORTS);
            }
            current.push(p);
        }
        if !current.is_empty() {
            chunks.push(Arc::new(current));
        }
        PortList {
            chunks: Arc::new(chunks),
            len,
        }
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ports in order.
    pub fn iter(&self) -> Iter<'_> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The `i`-th port (a walk over the chunks: for tests and one-off lookups).
    pub fn get(&self, mut i: usize) -> Option<&Arc<PortPlan>> {
        for c in self.chunks.iter() {
            if i < c.len() {
                return c.get(i);
            }
            i -= c.len();
        }
        None
    }

    /// The ports as a flat vector.
    pub fn to_vec(&self) -> Vec<Arc<PortPlan>> {
        self.iter().cloned().collect()
    }

    /// A copy with the `i`-th port replaced by `plan`, which must sort in its place
    /// (for tests and tools that edit a derived state; O(ports)).
    pub fn replaced(&self, i: usize, plan: Arc<PortPlan>) -> PortList {
        let mut v = self.to_vec();
        v[i] = plan;
        PortList::from_sorted(v)
    }

    /// The ports grouped by Service, in order.
    pub(crate) fn services(&self) -> impl Iterator<Item = &[Arc<PortPlan>]> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.chunk_by(|a, b| same_service(a, b)))
    }

    /// The ports of Service `(namespace, name)`, if it has any.
    pub(crate) fn service(&self, namespace: &str, name: &str) -> Option<&[Arc<PortPlan>]> {
        let ci = self
            .chunks
            .partition_point(|c| cmp_service(&c[0], namespace, name).is_le())
            .checked_sub(1)?;
        let chunk = &self.chunks[ci];
        let lo = chunk.partition_point(|p| cmp_service(p, namespace, name).is_lt());
        let hi = chunk.partition_point(|p| cmp_service(p, namespace, name).is_le());
        (lo < hi).then(|| &chunk[lo..hi])
    }

    /// The Services whose ports differ from `older`, in order: each as its ports in
    /// `older` and here (`None`: it has none there).
    pub(crate) fn changed_services<'a>(&'a self, older: &'a PortList) -> Vec<ServiceChange<'a>> {
        let mut out: Vec<ServiceChange<'a>> = Vec::new();
        let mut last: Option<&PortPlan> = None;
        for c in self.changes(older) {
            let p = match c {
                PortChange::Removed(p) | PortChange::Added(p) | PortChange::Changed(p, _) => p,
            };
            if last.is_some_and(|q| same_service(q, p)) {
                continue;
            }
            last = Some(p);
            let n = &p.svc.name;
            out.push((
                older.service(&n.namespace, &n.name),
                self.service(&n.namespace, &n.name),
            ));
        }
        out
    }

    /// Replaces the ports of Service `key` (none: removes it) with `ports`, which must
    /// be that Service's, sorted. Copies at most one chunk and the chunk index.
    pub(crate) fn replace_service(&mut self, key: &ObjectKey, ports: Vec<Arc<PortPlan>>) {
        debug_assert!(ports
            .iter()
            .all(|p| cmp_service(p, &key.namespace, &key.name).is_eq()));
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        // The chunk holding the Service, or where it would go: the last one starting
        // at or before it.
        let ci = self
            .chunks
            .partition_point(|c| cmp_service(&c[0], ns, name).is_le())
            .saturating_sub(1);
        let Some(chunk) = self.chunks.get(ci) else {
            if !ports.is_empty() {
                self.len = ports.len();
                self.chunks = Arc::new(vec![Arc::new(ports)]);
            }
            return;
        };
        let lo = chunk.partition_point(|p| cmp_service(p, ns, name).is_lt());
        let hi = chunk.partition_point(|p| cmp_service(p, ns, name).is_le());
        let current = &chunk[lo..hi];
        if current.len() == ports.len()
            && current.iter().zip(&ports).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return;
        }
        self.len = self.len - (hi - lo) + ports.len();
        let chunks = Arc::make_mut(&mut self.chunks);
        let chunk = Arc::make_mut(&mut chunks[ci]);
        chunk.splice(lo..hi, ports);
        if chunk.len() > 2 * CHUNK_PORTS {
            if let Some(at) = service_boundary_near_middle(chunk) {
                let tail = chunk.split_off(at);
                chunks.insert(ci + 1, Arc::new(tail));
            }
        } else if chunk.is_empty() {
            chunks.remove(ci);
        } else if chunk.len() < CHUNK_PORTS / 4 {
            // Merge with the smaller neighbour when the two fit in one chunk, so that
            // many removals do not leave many tiny chunks.
            let next = chunks.get(ci + 1).map(|c| c.len());
            let prev = ci.checked_sub(1).map(|p| chunks[p].len());
            let into = match (prev, next) {
                (Some(p), Some(n)) if n < p => Some(ci + 1),
                (Some(_), _) => Some(ci),
                (None, Some(_)) => Some(ci + 1),
                (None, None) => None,
            };
            if let Some(second) = into {
                let first = second - 1;
                if chunks[first].len() + chunks[second].len() <= 2 * CHUNK_PORTS {
                    let tail = chunks.remove(second);
                    Arc::make_mut(&mut chunks[first]).extend(tail.iter().cloned());
                }
            }
        }
    }

    /// The ports that differ from `older`, in order. Chunks both lists share are
    /// skipped without looking inside, so after a few Services changed this costs the
    /// chunk index and the changed chunks, not the cluster.
    pub(crate) fn changes<'a>(&'a self, older: &'a PortList) -> Vec<PortChange<'a>> {
        let mut out = Vec::new();
        if Arc::ptr_eq(&self.chunks, &older.chunks) {
            return out;
        }
        let (old, new) = (&older.chunks[..], &self.chunks[..]);
        // Cursors: (chunk, offset) in each list.
        let (mut oc, mut oi, mut nc, mut ni) = (0, 0, 0, 0);
        loop {
            if oi == 0 && ni == 0 {
                while oc < old.len() && nc < new.len() && Arc::ptr_eq(&old[oc], &new[nc]) {
                    oc += 1;
                    nc += 1;
                }
            }
            let a = old.get(oc).map(|c| &c[oi]);
            let b = new.get(nc).map(|c| &c[ni]);
            let (step_old, step_new) = match (a, b) {
                (None, None) => break,
                (Some(a), None) => {
                    out.push(PortChange::Removed(a));
                    (true, false)
                }
                (None, Some(b)) => {
                    out.push(PortChange::Added(b));
                    (false, true)
                }
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => (true, true),
                (Some(a), Some(b)) => match a.svc.name.cmp(&b.svc.name) {
                    Ordering::Less => {
                        out.push(PortChange::Removed(a));
                        (true, false)
                    }
                    Ordering::Greater => {
                        out.push(PortChange::Added(b));
                        (false, true)
                    }
                    Ordering::Equal => {
                        if **a != **b {
                            out.push(PortChange::Changed(a, b));
                        }
                        (true, true)
                    }
                },
            };
            if step_old {
                oi += 1;
                if oi == old[oc].len() {
                    (oc, oi) = (oc + 1, 0);
                }
            }
            if step_new {
                ni += 1;
                if ni == new[nc].len() {
                    (nc, ni) = (nc + 1, 0);
                }
            }
        }
        out
    }

    /// Number of chunks (for tests of the representation).
    #[cfg(test)]
    fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

impl std::ops::Index<usize> for PortList {
    type Output = Arc<PortPlan>;

    fn index(&self, i: usize) -> &Arc<PortPlan> {
        self.get(i)
            .unwrap_or_else(|| panic!("port {i} of a list of {}", self.len))
    }
}

impl PartialEq for PortList {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && (Arc::ptr_eq(&self.chunks, &other.chunks) || self.iter().eq(other.iter()))
    }
}

impl Eq for PortList {}

impl std::fmt::Debug for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<Vec<Arc<PortPlan>>> for PortList {
    fn from(ports: Vec<Arc<PortPlan>>) -> Self {
        PortList::from_sorted(ports)
    }
}

impl<'a> IntoIterator for &'a PortList {
    type Item = &'a Arc<PortPlan>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{synthetic, IpFamily, NodeContext};

    fn ports(services: usize, ports_each: usize) -> Vec<Arc<PortPlan>> {
        let st = synthetic::cluster(services, 1);
        let base = st.proxy_state(IpFamily::V4, &NodeContext::default());
        let mut out = Vec::new();
        for p in base.ports.iter() {
            for k in 0..ports_each {
                let mut q = (**p).clone();
                q.svc.name.port = format!("p{k:03}");
                out.push(Arc::new(q));
            }
        }
        out.sort_by(|a, b| a.svc.name.cmp(&b.svc.name));
        out
    }

    fn key_of(p: &PortPlan) -> ObjectKey {
        p.service_key()
    }

    /// Applies `changes` from `old` and checks it yields `new`.
    fn replay(old: &PortList, new: &PortList) -> Vec<Arc<PortPlan>> {
        let mut v = old.to_vec();
        for c in new.changes(old) {
            match c {
                PortChange::Removed(a) => v.retain(|p| !Arc::ptr_eq(p, a)),
                PortChange::Added(b) => v.push(b.clone()),
                PortChange::Changed(a, b) => {
                    let i = v.iter().position(|p| Arc::ptr_eq(p, a)).unwrap();
                    v[i] = b.clone();
                }
            }
        }
        v.sort_by(|a, b| a.svc.name.cmp(&b.svc.name));
        v
    }

    #[test]
    fn chunks_hold_whole_services_and_keep_order() {
        let all = ports(200, 3);
        let list = PortList::from_sorted(all.clone());
        assert_eq!(list.len(), 600);
        assert!(list.chunk_count() > 5);
        assert_eq!(list.to_vec(), all);
        let groups: Vec<&[Arc<PortPlan>]> = list.services().collect();
        assert_eq!(groups.len(), 200);
        assert!(groups.iter().all(|g| g.len() == 3));
        assert!(Arc::ptr_eq(&list[599], &all[599]));
        assert!(list.get(600).is_none());
    }

    #[test]
    fn replacing_a_service_copies_one_chunk_and_diffs_to_it() {
        let all = ports(300, 2);
        let old = PortList::from_sorted(all.clone());
        let mut new = old.clone();
        let target = key_of(&all[301]);
        let mut changed = (*all[301]).clone();
        changed.svc.port = 9999;
        let changed = Arc::new(changed);
        new.replace_service(&target, vec![all[300].clone(), changed.clone()]);
        let ch = new.changes(&old);
        assert_eq!(ch.len(), 1);
        assert!(
            matches!(ch[0], PortChange::Changed(a, b) if Arc::ptr_eq(a, &all[301]) && Arc::ptr_eq(b, &changed))
        );
        let shared = old
            .chunks
            .iter()
            .filter(|c| new.chunks.iter().any(|d| Arc::ptr_eq(c, d)))
            .count();
        assert_eq!(shared, old.chunk_count() - 1);
        // The older list is untouched.
        assert_eq!(old.to_vec(), all);
    }

    #[test]
    fn removing_and_adding_services_splits_and_merges_chunks() {
        let all = ports(400, 2);
        let full = PortList::from_sorted(all.clone());
        let mut list = PortList::new();
        // Insert in reverse order, one Service at a time (splits).
        for g in all.chunks(2).rev() {
            list.replace_service(&key_of(&g[0]), g.to_vec());
            assert!(list.chunks.iter().all(|c| c.len() <= 2 * CHUNK_PORTS));
        }
        assert_eq!(list.to_vec(), all);
        assert_eq!(list, full);
        assert_eq!(replay(&PortList::new(), &list), all);
        // Remove every other Service (merges).
        let mut thin = list.clone();
        for g in all.chunks(2).step_by(2) {
            thin.replace_service(&key_of(&g[0]), Vec::new());
        }
        let kept: Vec<Arc<PortPlan>> = all
            .chunks(2)
            .skip(1)
            .step_by(2)
            .flatten()
            .cloned()
            .collect();
        assert_eq!(thin.to_vec(), kept);
        assert_eq!(thin.len(), kept.len());
        assert_eq!(replay(&list, &thin), kept);
        assert_eq!(replay(&thin, &list), all);
        assert!(thin.chunks.iter().all(|c| !c.is_empty()));
        // Services never straddle chunks.
        for w in thin.chunks.windows(2) {
            assert!(!same_service(w[0].last().unwrap(), &w[1][0]));
        }
        // Removing what is not there changes nothing.
        let before = thin.clone();
        thin.replace_service(&key_of(&all[0]), Vec::new());
        assert!(Arc::ptr_eq(&before.chunks, &thin.chunks));
    }

    #[test]
    fn changes_against_an_unrelated_list_are_a_full_merge() {
        let a = ports(50, 1);
        let b: Vec<Arc<PortPlan>> = a.iter().map(|p| Arc::new((**p).clone())).collect();
        let (la, lb) = (PortList::from_sorted(a.clone()), PortList::from_sorted(b));
        // Equal plans in other allocations are not changes.
        assert!(lb.changes(&la).is_empty());
        assert_eq!(la, lb);
        let fewer = PortList::from_sorted(a[10..].to_vec());
        let ch = fewer.changes(&la);
        assert_eq!(ch.len(), 10);
        assert!(ch.iter().all(|c| matches!(c, PortChange::Removed(_))));
    }

    #[test]
    fn random_replacements_keep_the_list_sorted_and_diffable() {
        let pool = ports(120, 3);
        let services: Vec<&[Arc<PortPlan>]> = pool.chunks(3).collect();
        // A fixed linear congruential sequence: reproducible without a crate.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |m: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % m
        };
        let mut list = PortList::new();
        let mut model: std::collections::BTreeMap<ObjectKey, Vec<Arc<PortPlan>>> =
            Default::default();
        for _ in 0..2000 {
            let older = list.clone();
            for _ in 0..1 + next(4) {
                let g = services[next(services.len())];
                let key = key_of(&g[0]);
                let ports: Vec<Arc<PortPlan>> = match next(3) {
                    0 => Vec::new(),
                    1 => g.to_vec(),
                    _ => g[..1 + next(3)]
                        .iter()
                        .map(|p| {
                            let mut q = (**p).clone();
                            q.svc.port = next(65535) as u16;
                            Arc::new(q)
                        })
                        .collect(),
                };
                if ports.is_empty() {
                    model.remove(&key);
                } else {
                    model.insert(key.clone(), ports.clone());
                }
                list.replace_service(&key, ports);
            }
            let want: Vec<Arc<PortPlan>> = model.values().flatten().cloned().collect();
            assert_eq!(list.to_vec(), want);
            assert_eq!(list.len(), want.len());
            assert_eq!(replay(&older, &list), want);
            assert!(list
                .chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= 2 * CHUNK_PORTS + 3));
        }
    }
}
