//! Cluster state -> nftables transaction for upstream's `kube-proxy` table, full and
//! incremental.
//!
//! Rendering is pure. The renderer remembers what the kernel holds after each
//! successful apply ([`NftRenderer::commit`]); an incremental sync rewrites the chains
//! of exactly the Services whose desired content differs from that record and diffs
//! map elements against it, so a sync costs O(changes). Stale per-service chains are
//! flushed at once and deleted by a separate, later transaction (upstream's rule: the
//! kernel may not yet have dropped the reference from a just-deleted map element).

mod fixed;
mod ports;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::existing::{Existing, MANAGED_SETS};
use super::names::{endpoint_base, is_service_chain, service_base};
use super::transaction::{
    AddrMatch, BaseChain, Chain, ChainType, DataType, Element, Expr, Family, Field, Hook, KeyValue,
    Op, Rule, Set, SetFlag, Transaction, Verdict,
};
use crate::config::{FamilySettings, LocalDetector, NodePortAddresses};
use crate::model::{IpFamily, PortFlags, PortList, PortPlan, ProxyState};

/// The table kproxy owns in each family (upstream's name, so it takes over in place).
pub const TABLE: &str = "kube-proxy";
const TABLE_COMMENT: &str = "rules for kube-proxy";

const CLUSTER_IPS: &str = "cluster-ips";
const NODEPORT_IPS: &str = "nodeport-ips";
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const FIREWALL_IPS: &str = "firewall-ips";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT_CHAIN: &str = "reject-chain";

/// The containers whose elements the renderer manages (affinity sets are filled by the
/// packet path and are not); the applier reads back the same ones.
const MANAGED: [&str; 6] = MANAGED_SETS;

/// How long a flushed stale chain waits before it is deleted.
pub(crate) const STALE_CHAIN_DELAY_MS: u64 = 1000;

/// Per-sync inputs besides the cluster state.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// Rewrite everything (forced anyway when nothing was applied yet or after a failure).
    pub full: bool,
    /// A monotonic clock in milliseconds, for stale-chain ageing.
    pub now_ms: u64,
    /// The kernel's table as read back, if the caller has it.
    pub existing: Option<&'a Existing>,
}

/// A rendered sync: an optional clean-up transaction (deleting aged stale chains) to
/// apply first, then the main transaction. Once the kernel has accepted both, hand
/// [`Rendered::record`] (or the whole value) to [`NftRenderer::commit`]; the main
/// transaction may be consumed first (e.g. split into batches).
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Deletes stale chains flushed at least a second ago.
    pub cleanup: Option<Transaction>,
    /// The sync itself. Its cut points (see [`Transaction::split`]) are after the
    /// fixed part, after each rewritten Service, and before the trailing element and
    /// clean-up operations: every such prefix is a consistent table (each Service
    /// either as before or completely rewritten, the dispatch maps only pointing at
    /// complete chains).
    pub main: Transaction,
    /// Whether this is a full sync.
    pub full: bool,
    /// Chains flushed and marked stale by this sync.
    pub flushed_stale: Vec<String>,
    /// Chains the clean-up transaction deletes.
    pub deleted_stale: Vec<String>,
    /// Services whose chains this sync rewrites.
    pub services_written: usize,
    /// How the renderer's record changes when this sync is committed.
    pub record: Record,
}

/// How the renderer's record of the kernel changes once a sync is committed (opaque:
/// only [`NftRenderer::commit`] reads it).
#[derive(Debug, Clone)]
pub struct Record(Update);

impl From<Rendered> for Record {
    fn from(r: Rendered) -> Record {
        r.record
    }
}

/// How the record of what the kernel holds changes once a sync is committed: a full
/// sync replaces it; a partial sync carries only its changes, so that committing (like
/// rendering) costs O(changes) rather than O(cluster).
#[derive(Debug, Clone)]
enum Update {
    Replace(Applied),
    Delta(Delta),
}

#[derive(Debug, Clone, Default)]
struct Delta {
    ports: PortList,
    mirror_set: Vec<(ElementId, ValueId)>,
    mirror_remove: Vec<ElementId>,
    stale: BTreeMap<String, u64>,
    service_cidrs: Vec<IpNet>,
}

/// A managed element's identity (container and key) as a 128-bit digest, and its
/// value's. 128 bits make a collision among a cluster's elements (~1e5) practically
/// impossible (~1e-28), and keep the record at 32 bytes per element.
type ElementId = u128;
type ValueId = u128;

fn digest128(f: impl Fn(&mut std::collections::hash_map::DefaultHasher)) -> u128 {
    use std::hash::Hasher;
    // Two independent 64-bit SipHash digests (fixed keys, so stable within a process;
    // the record never leaves it).
    let mut a = std::collections::hash_map::DefaultHasher::new();
    a.write_u8(0x5a);
    f(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    b.write_u8(0xa5);
    f(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

fn element_id(e: &Element) -> Option<ElementId> {
    use std::hash::Hash;
    let set = MANAGED.iter().position(|m| *m == e.set)?;
    let key = e.key_text();
    Some(digest128(|h| {
        set.hash(h);
        key.hash(h);
    }))
}

fn value_id(v: &Option<Verdict>) -> ValueId {
    use std::hash::Hash;
    digest128(|h| v.hash(h))
}

/// The record of what the kernel holds. It is kept small on purpose (at 10k Services
/// it is what the daemon holds besides the model): a Service's chain names, affinity
/// sets and elements are a pure function of its port plans, which are shared with the
/// model, so they are recomputed for the few Services a sync touches instead of stored.
#[derive(Debug, Clone, Default)]
struct Applied {
    /// The port plans in the kernel (the state's list, shared).
    ports: PortList,
    /// Elements of the managed containers and their values.
    mirror: HashMap<ElementId, ValueId>,
    /// Stale chains (flushed, not yet deleted) and when they were flushed.
    stale: BTreeMap<String, u64>,
    service_cidrs: Vec<IpNet>,
}

/// The names and elements of one Service's objects.
#[derive(Debug, Default)]
struct ServiceObjects {
    chains: Vec<String>,
    affinity_sets: Vec<String>,
    elements: Vec<Element>,
}

/// Renders one family's table and remembers what was last applied.
#[derive(Debug, Clone)]
pub struct NftRenderer {
    settings: FamilySettings,
    applied: Option<Applied>,
    force_full: bool,
}

/// The names of one service port's per-service chains.
struct PortChains {
    service: String,
    local: String,
    external: String,
    firewall: String,
}

impl PortChains {
    fn of(port: &PortPlan) -> PortChains {
        let base = service_base(&port.svc.name);
        PortChains {
            service: format!("service-{base}"),
            local: format!("local-{base}"),
            external: format!("external-{base}"),
            firewall: format!("firewall-{base}"),
        }
    }

    /// The chain internal (ClusterIP) traffic goes to.
    fn internal(&self, port: &PortPlan) -> &str {
        if port.svc.internal_policy_local {
            &self.local
        } else {
            &self.service
        }
    }
}

/// Everything one service port needs.
struct PortObjects {
    affinity_sets: Vec<Set>,
    /// Chains in creation order (endpoints first: the others refer to them).
    chains: Vec<(Chain, Vec<Rule>)>,
    elements: Vec<Element>,
}

impl NftRenderer {
    /// A renderer that has applied nothing yet.
    pub fn new(settings: FamilySettings) -> Self {
        NftRenderer {
            settings,
            applied: None,
            force_full: true,
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &FamilySettings {
        &self.settings
    }

    /// The table family.
    pub fn family(&self) -> Family {
        Family::of(self.settings.family)
    }

    /// Whether the next sync must be full.
    pub fn needs_full_sync(&self) -> bool {
        self.force_full || self.applied.is_none()
    }

    /// Call after a failed apply: the kernel still holds what was last committed (a
    /// transaction is all-or-nothing), but the next sync is full to be safe.
    pub fn invalidate(&mut self) {
        self.force_full = true;
    }

    /// Records that a rendered sync (clean-up and main) was accepted by the kernel;
    /// takes the [`Rendered`] or just its [`Rendered::record`].
    pub fn commit(&mut self, rendered: impl Into<Record>) {
        match rendered.into().0 {
            Update::Replace(a) => self.applied = Some(a),
            Update::Delta(d) => {
                let a = self.applied.get_or_insert_with(Applied::default);
                a.ports = d.ports;
                for (k, v) in d.mirror_set {
                    a.mirror.insert(k, v);
                }
                for k in d.mirror_remove {
                    a.mirror.remove(&k);
                }
                a.stale = d.stale;
                a.service_cidrs = d.service_cidrs;
            }
        }
        self.force_full = false;
    }

    /// Whether flushed chains are waiting for deletion.
    pub(crate) fn has_stale_chains(&self) -> bool {
        self.applied.as_ref().is_some_and(|a| !a.stale.is_empty())
    }

    /// Stale chains waiting for deletion.
    pub fn stale_chains(&self) -> Vec<String> {
        self.applied
            .iter()
            .flat_map(|a| a.stale.keys().cloned())
            .collect()
    }

    fn addr_type(&self) -> DataType {
        DataType::addr(self.family())
    }

    fn chain(name: &str) -> Chain {
        Chain {
            name: name.to_string(),
            base: None,
            comment: None,
        }
    }

    fn rule(chain: &str, exprs: Vec<Expr>) -> Rule {
        Rule {
            chain: chain.to_string(),
            exprs,
            comment: None,
        }
    }

    fn rule_c(chain: &str, exprs: Vec<Expr>, comment: &str) -> Rule {
        Rule {
            chain: chain.to_string(),
            exprs,
            comment: Some(comment.to_string()),
        }
    }

    fn map(&self, name: &str, key: Vec<DataType>, comment: &str) -> Set {
        Set {
            name: name.to_string(),
            is_map: true,
            key,
            value: Some(DataType::Verdict),
            flags: vec![],
            timeout: None,
            comment: Some(comment.to_string()),
        }
    }

    fn localhost(&self) -> IpNet {
        match self.settings.family {
            IpFamily::V4 => {
                IpNet::from(ipnet::Ipv4Net::new([127, 0, 0, 0].into(), 8).unwrap_or_default())
            }
            IpFamily::V6 => IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        }
    }

    fn nodeport_ips(&self) -> Option<Vec<IpAddr>> {
        match &self.settings.nodeport_addresses {
            NodePortAddresses::All => None,
            NodePortAddresses::Ips(ips) => Some(
                ips.iter()
                    .filter(|ip| self.settings.family.contains(ip) && !ip.is_loopback())
                    .copied()
                    .collect(),
            ),
        }
    }
}

impl NftRenderer {
    /// Writes one Service's affinity sets and chains into `tx`; returns their names and
    /// the elements it wants (element operations are the caller's: they are diffed
    /// against the mirror).
    fn rewrite_service(&self, group: &[Arc<PortPlan>], tx: &mut Transaction) -> ServiceObjects {
        let mut out = ServiceObjects::default();
        for port in group {
            let objs = self.port_objects(port);
            for s in objs.affinity_sets {
                out.affinity_sets.push(s.name.clone());
                tx.push(Op::AddSet(s));
            }
            for (c, rules) in objs.chains {
                out.chains.push(c.name.clone());
                let name = c.name.clone();
                // `add` (the chain may not exist yet), then `flush` (it may).
                tx.push(Op::AddChain(c));
                tx.push(Op::FlushChain(name));
                for r in rules {
                    tx.push(Op::AddRule(r));
                }
            }
            out.elements.extend(objs.elements);
        }
        out
    }

    /// The names and elements a Service's objects had when it was applied (recomputed
    /// from its port plans).
    fn describe(&self, group: &[Arc<PortPlan>]) -> ServiceObjects {
        let mut out = ServiceObjects::default();
        for port in group {
            let objs = self.port_objects(port);
            out.affinity_sets
                .extend(objs.affinity_sets.into_iter().map(|s| s.name));
            out.chains
                .extend(objs.chains.into_iter().map(|(c, _)| c.name));
            out.elements.extend(objs.elements);
        }
        out
    }

    /// Deletes (in a clean-up transaction of its own, applied first) the stale chains
    /// flushed at least [`STALE_CHAIN_DELAY_MS`] ago and forgets them. With `known`
    /// (what the table holds), only chains still there are deleted, they leave `known`,
    /// and stale entries the table no longer has are forgotten.
    fn age_stale_chains(
        &self,
        stale: &mut BTreeMap<String, u64>,
        now: u64,
        mut known: Option<&mut BTreeSet<String>>,
    ) -> (Option<Transaction>, Vec<String>) {
        let aged: Vec<String> = stale
            .iter()
            .filter(|(c, t)| {
                now.saturating_sub(**t) >= STALE_CHAIN_DELAY_MS
                    && known.as_ref().is_none_or(|k| k.contains(*c))
            })
            .map(|(c, _)| c.clone())
            .collect();
        let cleanup = (!aged.is_empty()).then(|| {
            let mut tx = Transaction::new(self.family(), TABLE);
            for c in &aged {
                tx.push(Op::DeleteChain(c.clone()));
                stale.remove(c);
                if let Some(k) = known.as_mut() {
                    k.remove(c);
                }
            }
            tx
        });
        if let Some(k) = known {
            stale.retain(|c, _| k.contains(c));
        }
        (cleanup, aged)
    }

    /// Adds (or replaces) the elements of `wanted` whose value differs from what the
    /// kernel holds (`held`, by element identity), and records them as held.
    fn upsert_elements<'e>(
        wanted: impl IntoIterator<Item = (ElementId, &'e Element)>,
        held: &mut impl ElementRecord,
        ops: &mut Vec<Op>,
    ) {
        for (k, e) in wanted {
            let v = value_id(&e.value);
            match held.value(k) {
                Some(cur) if cur == v => continue,
                // Replacing a map element's verdict takes a delete first.
                Some(_) => ops.push(Op::DeleteElement(e.clone())),
                None => {}
            }
            ops.push(Op::AddElement(e.clone()));
            held.set(k, v);
        }
    }

    /// An incremental sync against our own record: only Services whose desired
    /// content changed are rewritten, and only their elements and chains are diffed,
    /// so the cost follows the change, not the cluster.
    fn render_partial(&self, state: &ProxyState, now: u64, a: &Applied) -> Rendered {
        let mut stale = a.stale.clone();
        // 1. Stale chains flushed long enough ago go in their own transaction, first.
        let (cleanup, aged) = self.age_stale_chains(&mut stale, now, None);

        let mut tx = Transaction::new(self.family(), TABLE);
        if a.service_cidrs != state.service_cidrs {
            tx.push(Op::FlushChain("cluster-ips-check".into()));
            self.cluster_ips_check_rules(&mut tx, &state.service_cidrs);
        }
        tx.mark_cut();
        let mut delta = Delta {
            ports: state.ports.clone(),
            service_cidrs: state.service_cidrs.clone(),
            ..Delta::default()
        };
        let mut services_written = 0;
        // Old versions of Services that changed or went away, new versions of those
        // that changed or appeared.
        let mut old: Vec<ServiceObjects> = Vec::new();
        let mut new: Vec<ServiceObjects> = Vec::new();
        // Only the Services that differ: the lists' shared chunks are skipped.
        for change in state.ports.changed_services(&a.ports) {
            match change {
                (None, None) => {}
                (Some(was), None) => old.push(self.describe(was)),
                (was, Some(now)) => {
                    old.extend(was.map(|w| self.describe(w)));
                    services_written += 1;
                    new.push(self.rewrite_service(now, &mut tx));
                    tx.mark_cut();
                }
            }
        }

        // Elements: delete what only the old versions had, then add or update what the
        // new versions want.
        let mut wanted: BTreeMap<ElementId, &Element> = BTreeMap::new();
        for e in new.iter().flat_map(|s| s.elements.iter()) {
            if let Some(k) = element_id(e) {
                wanted.insert(k, e);
            }
        }
        let mut element_ops = Vec::new();
        let mut deleted: HashSet<ElementId> = HashSet::new();
        for e in old.iter().flat_map(|s| s.elements.iter()) {
            let Some(k) = element_id(e) else { continue };
            // Ports of one Service share its cluster IP: delete each key once.
            if !wanted.contains_key(&k) && a.mirror.contains_key(&k) && deleted.insert(k) {
                element_ops.push(Op::DeleteElement(e.clone()));
                delta.mirror_remove.push(k);
            }
        }
        let mut held = DeltaRecord {
            mirror: &a.mirror,
            set: &mut delta.mirror_set,
        };
        Self::upsert_elements(wanted, &mut held, &mut element_ops);
        tx.ops.extend(element_ops);

        // Chains the old versions had and the new ones do not: flushed now, deleted by
        // a later sync's clean-up. Rewritten chains are active again.
        let new_chains: HashSet<&str> = new
            .iter()
            .flat_map(|s| s.chains.iter().map(String::as_str))
            .collect();
        let mut flushed_stale = Vec::new();
        for c in old.iter().flat_map(|s| s.chains.iter()) {
            if new_chains.contains(c.as_str()) || stale.contains_key(c) || aged.contains(c) {
                continue;
            }
            tx.push(Op::FlushChain(c.clone()));
            stale.insert(c.clone(), now);
            flushed_stale.push(c.clone());
        }
        for c in &new_chains {
            stale.remove(*c);
        }
        let new_affinity: HashSet<&str> = new
            .iter()
            .flat_map(|s| s.affinity_sets.iter().map(String::as_str))
            .collect();
        let mut affinity_deleted: HashSet<&str> = HashSet::new();
        for s in old.iter().flat_map(|s| s.affinity_sets.iter()) {
            if !new_affinity.contains(s.as_str()) && affinity_deleted.insert(s.as_str()) {
                tx.push(Op::DeleteSet {
                    name: s.clone(),
                    is_map: false,
                });
            }
        }
        delta.stale = stale;
        Rendered {
            cleanup,
            main: tx,
            full: false,
            flushed_stale,
            deleted_stale: aged,
            services_written,
            record: Record(Update::Delta(delta)),
        }
    }

    /// What the kernel's table holds besides the fixed part: the per-service chains
    /// and affinity sets, in its own word when read back, else by our record.
    fn known_objects(
        &self,
        existing: Option<&Existing>,
        prior: Option<&Applied>,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        match (existing, prior) {
            (Some(e), _) => (
                e.chains
                    .iter()
                    .filter(|c| is_service_chain(c))
                    .cloned()
                    .collect(),
                e.sets
                    .iter()
                    .filter(|s| s.starts_with("affinity-"))
                    .cloned()
                    .collect(),
            ),
            (None, Some(a)) => {
                let mut chains: BTreeSet<String> = a.stale.keys().cloned().collect();
                let mut affinity = BTreeSet::new();
                for group in a.ports.services() {
                    let o = self.describe(group);
                    chains.extend(o.chains);
                    affinity.extend(o.affinity_sets);
                }
                (chains, affinity)
            }
            (None, None) => (BTreeSet::new(), BTreeSet::new()),
        }
    }

    /// Renders a sync.
    pub fn render(&self, state: &ProxyState, opts: &RenderOptions<'_>) -> Rendered {
        let full = opts.full || self.needs_full_sync();
        if let (false, None, Some(prev)) = (full, opts.existing, self.applied.as_ref()) {
            return self.render_partial(state, opts.now_ms, prev);
        }
        let now = opts.now_ms;
        let prior = self.applied.as_ref();
        let previous = prior.filter(|_| !full);

        let (mut known_chains, known_affinity) = self.known_objects(opts.existing, prior);
        let mut stale: BTreeMap<String, u64> = prior.map(|a| a.stale.clone()).unwrap_or_default();

        // 1. Stale chains flushed long enough ago go in their own transaction, first.
        let (cleanup, aged) = self.age_stale_chains(&mut stale, now, Some(&mut known_chains));

        // 2. The main transaction.
        let mut tx = Transaction::new(self.family(), TABLE);
        if full {
            self.fixed(&mut tx, &state.service_cidrs);
        } else if prior.is_some_and(|a| a.service_cidrs != state.service_cidrs) {
            tx.push(Op::FlushChain("cluster-ips-check".into()));
            self.cluster_ips_check_rules(&mut tx, &state.service_cidrs);
        }

        // The managed elements in the kernel, with the element itself where a deletion
        // may need it (read back) or only the value (our record).
        tx.mark_cut();
        // Element operations go last, after every chain they point at (see below).
        let mut element_ops: Vec<Op> = Vec::new();
        let mut in_kernel: HashMap<ElementId, (ValueId, Option<&Element>)> = match opts.existing {
            Some(e) => e
                .elements
                .iter()
                .filter_map(|el| element_id(el).map(|k| (k, (value_id(&el.value), Some(el)))))
                .collect(),
            None if full => {
                // Without a read-back, start the managed containers from empty — in the
                // element tail, so that the maps are emptied and refilled in one commit
                // even when the sync is applied in several batches.
                for name in MANAGED {
                    element_ops.push(Op::FlushSet {
                        name: name.into(),
                        is_map: name != CLUSTER_IPS,
                    });
                }
                HashMap::new()
            }
            None => prior
                .map(|a| a.mirror.iter().map(|(k, v)| (*k, (*v, None))).collect())
                .unwrap_or_default(),
        };
        let mut services_written = 0;
        let mut desired: HashMap<ElementId, ValueId> = HashMap::new();
        // Elements of Services that went away or changed (for deleting what only they
        // had when the kernel's own elements are not at hand).
        let mut old_elements: Vec<Element> = Vec::new();
        let mut active: HashSet<String> = HashSet::new();
        let mut active_affinity: HashSet<String> = HashSet::new();
        let none = PortList::new();
        let previous_ports = previous.map_or(&none, |p| &p.ports);
        for change in merge_services(previous_ports, state) {
            let objs = match change {
                ServiceChange::Gone(was) => {
                    old_elements.extend(self.describe(was).elements);
                    continue;
                }
                ServiceChange::Same(group) => self.describe(group),
                ServiceChange::Written { was, now } => {
                    if let Some(w) = was {
                        old_elements.extend(self.describe(w).elements);
                    }
                    services_written += 1;
                    let objs = self.rewrite_service(now, &mut tx);
                    tx.mark_cut();
                    // Elements of a rewritten Service: add or update what differs.
                    let wanted = objs
                        .elements
                        .iter()
                        .filter_map(|e| element_id(e).map(|k| (k, e)));
                    Self::upsert_elements(wanted, &mut in_kernel, &mut element_ops);
                    objs
                }
            };
            for e in &objs.elements {
                if let Some(k) = element_id(e) {
                    desired.insert(k, value_id(&e.value));
                }
            }
            active.extend(objs.chains);
            active_affinity.extend(objs.affinity_sets);
        }
        // Elements come after every chain they point at, so that a cold sync split into
        // bounded batches never lets a packet reach a half-built Service: the dispatch
        // maps only learn a Service once its chains are complete.
        tx.ops.extend(element_ops);

        // Elements nobody wants any more (in a stable order).
        let mut old_by_id: HashMap<ElementId, &Element> = HashMap::new();
        for e in &old_elements {
            if let Some(k) = element_id(e) {
                old_by_id.entry(k).or_insert(e);
            }
        }
        let mut unwanted: Vec<&Element> = in_kernel
            .iter()
            .filter(|(k, _)| !desired.contains_key(*k))
            .filter_map(|(k, (_, el))| el.or_else(|| old_by_id.get(k).copied()))
            .collect();
        unwanted.sort_by_cached_key(|e| (e.set.clone(), e.key_text()));
        for e in unwanted {
            tx.push(Op::DeleteElement(e.clone()));
        }

        // Chains no Service wants: flushed now, deleted by a later sync's clean-up.
        let mut flushed_stale = Vec::new();
        for c in &known_chains {
            if active.contains(c) {
                stale.remove(c);
            } else if !stale.contains_key(c) {
                tx.push(Op::FlushChain(c.clone()));
                stale.insert(c.clone(), now);
                flushed_stale.push(c.clone());
            }
        }
        for s in &known_affinity {
            if !active_affinity.contains(s) {
                tx.push(Op::DeleteSet {
                    name: s.clone(),
                    is_map: false,
                });
            }
        }
        let next = Applied {
            ports: state.ports.clone(),
            mirror: desired,
            stale,
            service_cidrs: state.service_cidrs.clone(),
        };

        Rendered {
            cleanup,
            main: tx,
            full,
            flushed_stale,
            deleted_stale: aged,
            services_written,
            record: Record(Update::Replace(next)),
        }
    }
}

/// The kernel's managed elements as a sync sees them: identity -> value.
trait ElementRecord {
    fn value(&self, k: ElementId) -> Option<ValueId>;
    fn set(&mut self, k: ElementId, v: ValueId);
}

/// A full sync's view: everything in the kernel (read back or recorded), updated as
/// elements are written.
impl ElementRecord for HashMap<ElementId, (ValueId, Option<&Element>)> {
    fn value(&self, k: ElementId) -> Option<ValueId> {
        self.get(&k).map(|(v, _)| *v)
    }

    fn set(&mut self, k: ElementId, v: ValueId) {
        self.insert(k, (v, None));
    }
}

/// A partial sync's view: the record of the last sync, plus this sync's writes (which
/// become its delta).
struct DeltaRecord<'a> {
    mirror: &'a HashMap<ElementId, ValueId>,
    set: &'a mut Vec<(ElementId, ValueId)>,
}

impl ElementRecord for DeltaRecord<'_> {
    fn value(&self, k: ElementId) -> Option<ValueId> {
        self.mirror.get(&k).copied()
    }

    fn set(&mut self, k: ElementId, v: ValueId) {
        self.set.push((k, v));
    }
}

/// One step of walking the Services last applied and the ones wanted, both sorted.
enum ServiceChange<'a> {
    /// Applied before, wanted no more.
    Gone(&'a [Arc<PortPlan>]),
    /// Wanted as applied.
    Same(&'a [Arc<PortPlan>]),
    /// Wanted and to be (re)written; `was` is the version applied before, if any.
    Written {
        was: Option<&'a [Arc<PortPlan>]>,
        now: &'a [Arc<PortPlan>],
    },
}

/// The merge walk both syncs share: every Service of `previous` and `state` once, in
/// order, as gone, unchanged or to be written.
fn merge_services<'a>(
    previous: &'a PortList,
    state: &'a ProxyState,
) -> impl Iterator<Item = ServiceChange<'a>> + 'a {
    let mut prev = previous.services().peekable();
    let mut next = state.service_groups();
    let mut pending: Option<&'a [Arc<PortPlan>]> = None;
    std::iter::from_fn(move || {
        let Some(now) = pending.take().or_else(|| next.next()) else {
            return prev.next().map(ServiceChange::Gone);
        };
        let this = service_of(now);
        if let Some(was) = prev.peek() {
            let that = service_of(was);
            if that < this {
                pending = Some(now);
                return prev.next().map(ServiceChange::Gone);
            }
            if that == this {
                let was = prev.next();
                return Some(match was {
                    Some(w) if w == now => ServiceChange::Same(now),
                    was => ServiceChange::Written { was, now },
                });
            }
        }
        Some(ServiceChange::Written { was: None, now })
    })
}

/// A group's Service, for walking two sorted lists of groups in step.
fn service_of(group: &[Arc<PortPlan>]) -> (&str, &str) {
    let n = &group[0].svc.name;
    (n.namespace.as_str(), n.name.as_str())
}
