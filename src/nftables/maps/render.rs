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
use crate::nftables::transaction::{Element, KeyValue, Op, Transaction};

/// An element's identity: its container and key.
pub(crate) type ElementKey = (String, Vec<KeyValue>);

/// What the maps layout holds for a cluster state: the endpoint counts in use (one
/// rule each), the ServiceCIDRs (one rule), and every element with its data value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub(crate) counts: Counts,
    pub(crate) service_cidrs: Vec<IpNet>,
    pub(crate) elements: BTreeMap<ElementKey, Vec<KeyValue>>,
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

fn element(set: &str, key: &[KeyValue], data: &[KeyValue]) -> Element {
    Element {
        set: set.to_string(),
        key: key.to_vec(),
        comment: None,
        value: None,
        data: data.to_vec(),
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
        tx.mark_cut();
        for ((set, key), data) in &d.elements {
            tx.push(Op::AddElement(element(set, key, data)));
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
            for (class, n) in new.counts.difference(&old.counts) {
                if let Some(s) = layout
                    .sets(&new.counts)
                    .into_iter()
                    .find(|s| s.name == class.gate(*n))
                {
                    tx.push(Op::AddSet(s));
                }
            }
        }
        // Deletions first: an element whose value changes is deleted, then re-added.
        for (k, data) in &old.elements {
            if new.elements.get(k) != Some(data) {
                tx.push(Op::DeleteElement(element(&k.0, &k.1, data)));
            }
        }
        for (k, data) in &new.elements {
            if old.elements.get(k) != Some(data) {
                tx.push(Op::AddElement(element(&k.0, &k.1, data)));
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

    /// Places `list` (endpoint indices) behind destination `dest` in `class`.
    fn balance(
        d: &mut Desired,
        class: LbClass,
        dest: &[KeyValue],
        port: &PortPlan,
        list: &[usize],
    ) {
        let Ok(n) = u32::try_from(list.len()) else {
            return;
        };
        if n == 0 {
            return;
        }
        d.counts.insert((class, n));
        d.add(&class.gate(n), dest.to_vec(), vec![]);
        for (i, &e) in list.iter().enumerate() {
            let Some(ep) = port.endpoints.get(e) else {
                continue;
            };
            let Ok(idx) = u32::try_from(i) else {
                continue;
            };
            let mut key = dest.to_vec();
            key.push(KeyValue::Index(idx));
            d.add(
                &class.backends(),
                key,
                vec![KeyValue::Ip(ep.ip), KeyValue::Port(ep.port)],
            );
        }
    }

    /// One service port's elements (upstream §4.3's chains, as data).
    fn port_elements(&self, port: &PortPlan, d: &mut Desired) {
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
        d.add(CLUSTER_IPS, vec![KeyValue::Ip(svc.cluster_ip)], vec![]);

        // ClusterIP: the internal policy's list.
        let cip = ipp(svc.cluster_ip);
        if flags.has_internal {
            let list = if svc.internal_policy_local {
                &sel.local
            } else {
                &sel.cluster
            };
            Self::balance(d, LbClass::Ips, &cip, port, list);
            if self.settings.masquerade_all {
                d.add(MASQ_IPS, cip.clone(), vec![]);
            } else if self.has_detector() {
                d.add(MASQ_NONLOCAL_IPS, cip.clone(), vec![]);
            }
        } else {
            d.add(no_ep(false), cip, vec![]);
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
                Self::balance(d, cluster_class, &dest, port, &sel.cluster);
                if svc.external_policy_local {
                    let etp = if nodeport {
                        ETP_LOCAL_NODEPORTS
                    } else {
                        ETP_LOCAL_IPS
                    };
                    d.add(etp, dest.clone(), vec![]);
                    if flags.has_external {
                        Self::balance(d, local_class, &dest, port, &sel.local);
                    } else {
                        let none = if nodeport {
                            EXT_LOCAL_NONE_NODEPORTS
                        } else {
                            EXT_LOCAL_NONE_IPS
                        };
                        d.add(none, dest.clone(), vec![]);
                    }
                } else {
                    let masq = if nodeport { MASQ_NODEPORTS } else { MASQ_IPS };
                    d.add(masq, dest.clone(), vec![]);
                }
            }
            if !flags.has_external {
                d.add(no_ep(nodeport), dest, vec![]);
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
                d.add(FIREWALL_IPS, dest.clone(), vec![]);
                for net in &allowed {
                    let mut key = dest.clone();
                    key.push(KeyValue::Net(net.trunc()));
                    d.add(FIREWALL_ALLOW, key, vec![]);
                }
            }
        }

        // Hairpin: an endpoint reaching itself through the Service is masqueraded.
        for ep in port.reachable_endpoints() {
            d.add(
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
