//! Cluster state -> the `maps` layout's elements, and whole or differential
//! transactions. Endpoint selection (policies, terminating fallback, topology) comes
//! from the model's [`PortPlan::selection`]; this module only places its results.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::layout::{
    Counts, Layout, LbClass, CLUSTER_IPS, ETP_LOCAL_IPS, ETP_LOCAL_NODEPORTS, EXT_LOCAL_NONE_IPS,
    EXT_LOCAL_NONE_NODEPORTS, FIREWALL_ALLOW, FIREWALL_IPS, HAIRPIN, MASQ_IPS, MASQ_NODEPORTS,
    MASQ_NONLOCAL_IPS, NODEPORT_IPS, NO_EP_DROP, NO_EP_NP_DROP, NO_EP_NP_REJECT, NO_EP_REJECT,
    TABLE,
};
use crate::config::{FamilySettings, LocalDetector};
use crate::model::{PortFlags, PortPlan, ProxyState};
use crate::nftables::transaction::{
    AddrMatch, Chain, DataType, Element, Expr, Family, KeyValue, Op, Rule, Set, SetFlag,
    Transaction, Verdict,
};

/// An element's identity: its container and key.
pub(crate) type ElementKey = (String, Vec<KeyValue>);

/// What the maps layout holds for a cluster state: the endpoint counts in use (one
/// rule each), the ServiceCIDRs (one rule), and every element with its data value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub(crate) counts: Counts,
    pub(crate) service_cidrs: Vec<IpNet>,
    pub(crate) elements: BTreeMap<ElementKey, Vec<KeyValue>>,
    /// Verdict-map elements (`affinity-<class>`: dest -> goto the port's chain).
    pub(crate) verdicts: BTreeMap<ElementKey, Verdict>,
    /// Session-affinity ports' own chains, by name: each rule's expressions.
    pub(crate) chains: BTreeMap<String, Vec<Vec<Expr>>>,
    /// Their dynamic `affinity-<endpoint>` sets: name -> timeout in seconds.
    pub(crate) affinity_sets: BTreeMap<String, u32>,
}

impl Desired {
    /// Number of elements.
    pub fn element_count(&self) -> usize {
        self.elements.len()
    }

    fn add(&mut self, set: &str, key: Vec<KeyValue>, data: Vec<KeyValue>) {
        // The first writer wins, as with upstream's maps (two Services claiming one
        // destination is a cluster error; the sorted port order makes it stable).
        self.elements.entry((set.to_string(), key)).or_insert(data);
    }
}

/// Where [`MapsRenderer`] places one port's share of the table, piece by piece: a
/// [`Desired`] (the whole-table derivation), or the dataplane's record, which claims
/// each piece as it comes instead of collecting the port into a sorted [`Desired`]
/// first (those per-port maps were most of a cold sync's record time). Within one
/// port the first writer of a key wins; a sink must ignore the later ones.
pub(crate) trait Sink {
    /// A set element (`data` empty) or data-map element.
    fn element(&mut self, set: &str, key: Vec<KeyValue>, data: Vec<KeyValue>);
    /// A verdict-map element.
    fn verdict(&mut self, map: &str, key: Vec<KeyValue>, verdict: Verdict);
    /// A session-affinity chain and its rules' expressions.
    fn chain(&mut self, name: String, rules: Vec<Vec<Expr>>);
    /// A dynamic affinity set and its timeout.
    fn affinity_set(&mut self, name: String, timeout: u32);
    /// An endpoint count in use.
    fn count(&mut self, class: LbClass, n: u32);
}

impl Sink for Desired {
    fn element(&mut self, set: &str, key: Vec<KeyValue>, data: Vec<KeyValue>) {
        self.add(set, key, data);
    }

    fn verdict(&mut self, map: &str, key: Vec<KeyValue>, verdict: Verdict) {
        self.verdicts
            .entry((map.to_string(), key))
            .or_insert(verdict);
    }

    fn chain(&mut self, name: String, rules: Vec<Vec<Expr>>) {
        self.chains.entry(name).or_insert(rules);
    }

    fn affinity_set(&mut self, name: String, timeout: u32) {
        self.affinity_sets.entry(name).or_insert(timeout);
    }

    fn count(&mut self, class: LbClass, n: u32) {
        self.counts.insert((class, n));
    }
}

fn element(set: &str, key: &[KeyValue], data: &[KeyValue]) -> Element {
    Element {
        set: set.to_string(),
        key: key.to_vec(),
        comment: None,
        value: None,
        data: data.to_vec(),
    }
}

fn verdict_element(set: &str, key: &[KeyValue], verdict: &Verdict) -> Element {
    Element {
        set: set.to_string(),
        key: key.to_vec(),
        comment: None,
        value: Some(verdict.clone()),
        data: Vec::new(),
    }
}

pub(crate) fn affinity_set(family: Family, name: &str, timeout: u32) -> Set {
    Set {
        name: name.to_string(),
        is_map: false,
        key: vec![DataType::addr(family)],
        value: None,
        flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
        timeout: Some(timeout),
        comment: None,
    }
}

pub(crate) fn chain(name: &str) -> Chain {
    Chain {
        name: name.to_string(),
        base: None,
        comment: None,
    }
}

fn chain_rules(tx: &mut Transaction, name: &str, rules: &[Vec<Expr>]) {
    for exprs in rules {
        tx.push(Op::AddRule(Rule {
            chain: name.to_string(),
            exprs: exprs.clone(),
            comment: None,
        }));
    }
}

/// Renders one family's maps-layout table.
#[derive(Debug, Clone)]
pub struct MapsRenderer {
    settings: FamilySettings,
}

impl MapsRenderer {
    /// A renderer for one family.
    pub fn new(settings: FamilySettings) -> Self {
        MapsRenderer { settings }
    }

    /// The settings in use.
    pub fn settings(&self) -> &FamilySettings {
        &self.settings
    }

    /// Everything the table should hold for `state`.
    pub fn desired(&self, state: &ProxyState) -> Desired {
        let layout = Layout::new(&self.settings);
        let mut d = Desired {
            service_cidrs: state.service_cidrs.clone(),
            ..Desired::default()
        };
        if let Some(ips) = layout.nodeport_ips() {
            for ip in ips {
                d.add(NODEPORT_IPS, vec![KeyValue::Ip(ip)], vec![]);
            }
        }
        for port in &state.ports {
            self.port_elements(port, &mut d);
        }
        d
    }

    /// Places one service port's share of [`MapsRenderer::desired`] (without the
    /// NodePort addresses every table has) in `sink`: the dataplane keeps the table
    /// port by port.
    pub(crate) fn port_into(&self, port: &PortPlan, sink: &mut impl Sink) {
        self.port_elements(port, sink);
    }

    /// A full sync: the fixed part rewritten, every set flushed and refilled.
    pub fn render_full(&self, state: &ProxyState) -> Transaction {
        let d = self.desired(state);
        self.full_transaction(&d)
    }

    /// The full transaction for an already computed [`Desired`].
    pub fn full_transaction(&self, d: &Desired) -> Transaction {
        let layout = Layout::new(&self.settings);
        let mut tx = Transaction::new(layout.family(), TABLE);
        layout.write(&mut tx, &d.counts, &d.service_cidrs);
        for s in layout.sets(&d.counts) {
            tx.push(Op::FlushSet {
                name: s.name,
                is_map: s.is_map,
            });
        }
        // Affinity ports' sets keep their clients across a full sync (as upstream's).
        for (name, timeout) in &d.affinity_sets {
            tx.push(Op::AddSet(affinity_set(layout.family(), name, *timeout)));
        }
        for name in d.chains.keys() {
            tx.push(Op::AddChain(chain(name)));
            tx.push(Op::FlushChain(name.clone()));
        }
        for (name, rules) in &d.chains {
            chain_rules(&mut tx, name, rules);
        }
        tx.mark_cut();
        for ((set, key), data) in &d.elements {
            tx.push(Op::AddElement(element(set, key, data)));
        }
        for ((set, key), verdict) in &d.verdicts {
            tx.push(Op::AddElement(verdict_element(set, key, verdict)));
        }
        tx
    }

    /// The operations that turn a table holding `old` into one holding `new`: element
    /// deletions and additions only (a changed value is deleted and re-added), plus a
    /// rewrite of the rules when the endpoint counts in use or the ServiceCIDRs change
    /// (a new N adds its gate set and its rule; a gate set that falls out of use is
    /// deleted after the rule that used it is gone).
    pub fn render_diff(&self, old: &Desired, new: &Desired) -> Transaction {
        let layout = Layout::new(&self.settings);
        let mut tx = Transaction::new(layout.family(), TABLE);
        let rules_change = old.counts != new.counts || old.service_cidrs != new.service_cidrs;
        if rules_change {
            // A new N: its gate set, data map and balance chain (whose rule names only
            // the map written here).
            // Leftovers of an earlier run with this N are emptied and re-created first.
            for (class, n) in new.counts.difference(&old.counts) {
                let chain = class.balance_chain(*n);
                tx.push(Op::AddChain(Chain {
                    name: chain.clone(),
                    base: None,
                    comment: None,
                }));
                tx.push(Op::FlushChain(chain));
                for s in layout
                    .sets(&new.counts)
                    .into_iter()
                    .filter(|s| s.name == class.gate(*n) || s.name == class.backends(*n))
                {
                    if s.is_map {
                        tx.push(Op::AddSet(s.clone()));
                        tx.push(Op::DeleteSet {
                            name: s.name.clone(),
                            is_map: true,
                        });
                    }
                    tx.push(Op::AddSet(s));
                }
                tx.push(layout.balance_rule(*class, *n));
            }
        }
        // An affinity set whose timeout changes is re-created (after the rules
        // naming it are flushed below); new ones exist before any rule names them.
        let set_changed =
            |name: &str, t: &u32| old.affinity_sets.get(name).is_some_and(|old_t| old_t != t);
        for (name, t) in &new.affinity_sets {
            if !old.affinity_sets.contains_key(name) {
                tx.push(Op::AddSet(affinity_set(layout.family(), name, *t)));
            }
        }
        // Deletions first: an element whose value changes is deleted, then re-added.
        for (k, data) in &old.elements {
            if new.elements.get(k) != Some(data) {
                tx.push(Op::DeleteElement(element(&k.0, &k.1, data)));
            }
        }
        for (k, v) in &old.verdicts {
            if new.verdicts.get(k) != Some(v) {
                tx.push(Op::DeleteElement(verdict_element(&k.0, &k.1, v)));
            }
        }
        // Affinity chains: every changed or removed one is flushed before any is
        // deleted (they name each other), then the new contents are written.
        let touched = |name: &String| {
            let rules = new.chains.get(name);
            rules != old.chains.get(name)
                || rules.is_some_and(|r| {
                    r.iter().flatten().any(|e| match e {
                        Expr::UpdateSaddr { set }
                        | Expr::Addr {
                            value: AddrMatch::Set(set),
                            ..
                        } => new
                            .affinity_sets
                            .get(set)
                            .is_some_and(|t| set_changed(set, t)),
                        _ => false,
                    })
                })
        };
        let flushed: Vec<&String> = old.chains.keys().filter(|n| touched(n)).collect();
        for name in &flushed {
            tx.push(Op::FlushChain((*name).clone()));
        }
        for name in old.chains.keys() {
            if !new.chains.contains_key(name) {
                tx.push(Op::DeleteChain(name.clone()));
            }
        }
        for (name, t) in &old.affinity_sets {
            let changed = new.affinity_sets.get(name).filter(|nt| *nt != t);
            if !new.affinity_sets.contains_key(name) || changed.is_some() {
                tx.push(Op::DeleteSet {
                    name: name.clone(),
                    is_map: false,
                });
            }
            if let Some(nt) = changed {
                tx.push(Op::AddSet(affinity_set(layout.family(), name, *nt)));
            }
        }
        for name in new.chains.keys() {
            if !old.chains.contains_key(name) {
                tx.push(Op::AddChain(chain(name)));
            }
        }
        for (name, rules) in &new.chains {
            if !old.chains.contains_key(name) || touched(name) {
                chain_rules(&mut tx, name, rules);
            }
        }
        for (k, data) in &new.elements {
            if old.elements.get(k) != Some(data) {
                tx.push(Op::AddElement(element(&k.0, &k.1, data)));
            }
        }
        for (k, v) in &new.verdicts {
            if old.verdicts.get(k) != Some(v) {
                tx.push(Op::AddElement(verdict_element(&k.0, &k.1, v)));
            }
        }
        if rules_change {
            for c in layout.chains() {
                tx.push(Op::FlushChain(c.name));
            }
            for r in layout.rules(&new.counts, &new.service_cidrs) {
                tx.push(r);
            }
            for (class, n) in old.counts.difference(&new.counts) {
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
        tx
    }

    fn has_detector(&self) -> bool {
        !matches!(self.settings.local_detector, LocalDetector::None)
    }

    /// Places `list` (endpoint indices) behind destination `dest` in `class`: in the
    /// load-balancing maps, or for a session-affinity port in its own chains (`local`:
    /// the list is the local-policy one).
    fn balance(
        d: &mut impl Sink,
        class: LbClass,
        dest: &[KeyValue],
        port: &PortPlan,
        list: &[usize],
        local: bool,
    ) {
        if let Some(timeout) = port.svc.affinity_timeout {
            super::affinity::place(d, class, dest, port, list, local, timeout);
            return;
        }
        let Ok(n) = u32::try_from(list.len()) else {
            return;
        };
        if n == 0 {
            return;
        }
        d.count(class, n);
        d.element(&class.gate(n), dest.to_vec(), vec![]);
        // Named once per destination, not per endpoint.
        let backends = class.backends(n);
        for (i, &e) in list.iter().enumerate() {
            let Some(ep) = port.endpoints.get(e) else {
                continue;
            };
            let Ok(idx) = u32::try_from(i) else {
                continue;
            };
            let mut key = Vec::with_capacity(dest.len() + 1);
            key.extend_from_slice(dest);
            key.push(KeyValue::Index(idx));
            d.element(
                &backends,
                key,
                vec![KeyValue::Ip(ep.ip), KeyValue::Port(ep.port)],
            );
        }
    }

    /// One service port's elements (upstream §4.3's chains, as data).
    fn port_elements(&self, port: &PortPlan, d: &mut impl Sink) {
        let flags = PortFlags::of(port);
        let svc = &port.svc;
        let sel = &port.selection;
        let proto = svc.name.protocol;
        let ipp = |ip: IpAddr| {
            vec![
                KeyValue::Ip(ip),
                KeyValue::Proto(proto),
                KeyValue::Port(svc.port),
            ]
        };
        let no_ep = |nodeport: bool| match (nodeport, flags.has_endpoints) {
            (false, true) => NO_EP_DROP,
            (false, false) => NO_EP_REJECT,
            (true, true) => NO_EP_NP_DROP,
            (true, false) => NO_EP_NP_REJECT,
        };
        d.element(CLUSTER_IPS, vec![KeyValue::Ip(svc.cluster_ip)], vec![]);

        // ClusterIP: the internal policy's list.
        let cip = ipp(svc.cluster_ip);
        if flags.has_internal {
            let list = if svc.internal_policy_local {
                &sel.local
            } else {
                &sel.cluster
            };
            Self::balance(d, LbClass::Ips, &cip, port, list, svc.internal_policy_local);
            if self.settings.masquerade_all {
                d.element(MASQ_IPS, cip.clone(), vec![]);
            } else if self.has_detector() {
                d.element(MASQ_NONLOCAL_IPS, cip.clone(), vec![]);
            }
        } else {
            d.element(no_ep(false), cip, vec![]);
        }

        // External destinations: external IPs, LB IPs, the NodePort.
        let mut externals: Vec<(bool, Vec<KeyValue>)> = svc
            .external_ips
            .iter()
            .chain(svc.lb_ips.iter())
            .map(|ip| (false, ipp(*ip)))
            .collect();
        if svc.node_port != 0 {
            externals.push((
                true,
                vec![KeyValue::Proto(proto), KeyValue::Port(svc.node_port)],
            ));
        }
        for (nodeport, dest) in externals {
            if flags.has_endpoints {
                let (cluster_class, local_class) = if nodeport {
                    (LbClass::NodePorts, LbClass::ExtLocalNodePorts)
                } else {
                    (LbClass::Ips, LbClass::ExtLocalIps)
                };
                // Pod and node-local sources always use the cluster list.
                Self::balance(d, cluster_class, &dest, port, &sel.cluster, false);
                if svc.external_policy_local {
                    let etp = if nodeport {
                        ETP_LOCAL_NODEPORTS
                    } else {
                        ETP_LOCAL_IPS
                    };
                    d.element(etp, dest.clone(), vec![]);
                    if flags.has_external {
                        Self::balance(d, local_class, &dest, port, &sel.local, true);
                    } else {
                        let none = if nodeport {
                            EXT_LOCAL_NONE_NODEPORTS
                        } else {
                            EXT_LOCAL_NONE_IPS
                        };
                        d.element(none, dest.clone(), vec![]);
                    }
                } else {
                    let masq = if nodeport { MASQ_NODEPORTS } else { MASQ_IPS };
                    d.element(masq, dest.clone(), vec![]);
                }
            }
            if !flags.has_external {
                d.element(no_ep(nodeport), dest, vec![]);
            }
        }

        // Source ranges on LB IPs (upstream nftables filters even without endpoints).
        if flags.uses_fw {
            let mut allowed: Vec<IpNet> = svc.source_ranges.clone();
            // A node that is itself allowed may reach the VIP after being SNATed to it.
            if self
                .settings
                .node_ip
                .is_some_and(|ip| svc.source_ranges.iter().any(|r| r.contains(&ip)))
            {
                allowed.extend(svc.lb_ips.iter().map(|ip| IpNet::from(*ip)));
            }
            for ip in &svc.lb_ips {
                let dest = ipp(*ip);
                d.element(FIREWALL_IPS, dest.clone(), vec![]);
                for net in &allowed {
                    let mut key = dest.clone();
                    key.push(KeyValue::Net(net.trunc()));
                    d.element(FIREWALL_ALLOW, key, vec![]);
                }
            }
        }

        // Hairpin: an endpoint reaching itself through the Service is masqueraded.
        for ep in port.reachable_endpoints() {
            d.element(
                HAIRPIN,
                vec![KeyValue::Ip(ep.ip), KeyValue::Ip(ep.ip)],
                vec![],
            );
        }
    }
}

/// Counts of elements per container, for reports and tests.
pub fn element_counts(d: &Desired) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (set, _) in d.elements.keys() {
        *out.entry(set.clone()).or_insert(0) += 1;
    }
    out
}
