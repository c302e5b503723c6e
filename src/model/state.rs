//! The cluster state kept in memory, and the per-family view derived from it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;

use super::from_k8s::{self, SkipReason};
use super::port_list::PortList;
use super::select::{categorize, Selection, Topology};
use super::{
    Endpoint, EndpointSlice, IpFamily, NodeInfo, ObjectKey, Service, ServicePort, ServicePortName,
};

/// Everything the proxy knows about the cluster: compact, keyed, no full objects.
#[derive(Debug, Default)]
pub struct ClusterState {
    services: BTreeMap<ObjectKey, Service>,
    /// Slices grouped by their Service (namespace/service name), then by slice name, so
    /// that endpoints merge in a stable order.
    slices: BTreeMap<ObjectKey, BTreeMap<String, EndpointSlice>>,
    /// Slice key -> owning service key, to find a slice again on delete or relabel.
    slice_owner: BTreeMap<ObjectKey, ObjectKey>,
    node: Option<NodeInfo>,
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
    /// Feature gate LoadBalancerIPMode turned off: `ipMode: Proxy` ingress IPs are VIPs too.
    ignore_lb_ip_mode: bool,
    /// The last derived ports per family and the Services changed since, so that a
    /// sync after a small change re-derives only the Services that changed. Invisible
    /// to callers: `proxy_state` stays a pure function of the state.
    derived: Mutex<DerivedCache>,
}

#[derive(Debug, Default)]
struct DerivedCache {
    node: Option<NodeContext>,
    /// Per family (IPv4, IPv6): the ports last derived and the Services changed since,
    /// so that a sync after a few changes re-derives and splices only those.
    families: [Option<FamilyCache>; 2],
}

#[derive(Debug)]
struct FamilyCache {
    ports: PortList,
    dirty: BTreeSet<ObjectKey>,
}

fn family_index(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

impl DerivedCache {
    fn clear(&mut self) {
        self.families = [None, None];
    }

    fn changed(&mut self, key: &ObjectKey) {
        for f in self.families.iter_mut().flatten() {
            if !f.dirty.contains(key) {
                f.dirty.insert(key.clone());
            }
        }
    }
}

impl Clone for ClusterState {
    fn clone(&self) -> Self {
        ClusterState {
            services: self.services.clone(),
            slices: self.slices.clone(),
            slice_owner: self.slice_owner.clone(),
            node: self.node.clone(),
            service_cidrs: self.service_cidrs.clone(),
            ignore_lb_ip_mode: self.ignore_lb_ip_mode,
            derived: Mutex::new(DerivedCache::default()),
        }
    }
}

/// The node-specific inputs of endpoint selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (endpoints with this nodeName are local).
    pub name: String,
    /// This node's zone label, for topology hints.
    pub zone: Option<String>,
    /// Feature gate PreferSameTrafficDistribution.
    pub prefer_same_node: bool,
}

/// One service port with its endpoints and their selection, for one family.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortPlan {
    /// The service port.
    pub svc: ServicePort,
    /// Its endpoints, sorted by address string (upstream's order).
    pub endpoints: Vec<Endpoint>,
    /// Which endpoints serve which traffic.
    pub(crate) selection: Selection,
}

impl PortPlan {
    /// The Service this port belongs to.
    pub(crate) fn service_key(&self) -> ObjectKey {
        ObjectKey::new(&self.svc.name.namespace, &self.svc.name.name)
    }

    /// Every endpoint some traffic can reach.
    pub(crate) fn reachable_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.selection
            .all_reachable
            .iter()
            .map(|&i| &self.endpoints[i])
    }
}

/// The per-family view the renderers consume: a pure function of [`ClusterState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyState {
    /// The family.
    pub family: IpFamily,
    /// Service ports sorted by namespace, name, port name and protocol. Shared with
    /// the state's cache (and with the renderers' record of what they applied), so an
    /// unchanged port compares equal by pointer and unchanged chunks are skipped.
    pub ports: PortList,
    /// ServiceCIDRs of this family, sorted.
    pub service_cidrs: Vec<IpNet>,
}

impl ProxyState {
    /// Sum of endpoint-list lengths over all service ports (upstream's large-cluster
    /// measure: every endpoint counts, ready or not).
    pub fn total_endpoints(&self) -> usize {
        self.ports.iter().map(|p| p.endpoints.len()).sum()
    }

    /// Service ports with a Local traffic policy whose endpoints are all on other
    /// nodes, as `(internal, external)` (upstream's `no_local_endpoints_total` gauges).
    pub(crate) fn no_local_endpoints(&self) -> (usize, usize) {
        let mut internal = 0;
        let mut external = 0;
        for p in &self.ports {
            if p.selection.all_reachable.is_empty() || !p.selection.local.is_empty() {
                continue;
            }
            internal += usize::from(p.svc.internal_policy_local);
            external += usize::from(p.svc.external_policy_local);
        }
        (internal, external)
    }

    /// The ports grouped by Service, in order (syncs rewrite whole Services).
    pub(crate) fn service_groups(&self) -> impl Iterator<Item = &[Arc<PortPlan>]> {
        self.ports.services()
    }
}

impl ClusterState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns the LoadBalancerIPMode feature gate off (on by default, GA since 1.32).
    pub fn set_lb_ip_mode_gate(&mut self, enabled: bool) {
        self.ignore_lb_ip_mode = !enabled;
        self.forget_all();
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DerivedCache> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way
        // that matters: entries are whole values, so keep using it.
        self.derived.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forget(&mut self, key: &ObjectKey) {
        let cache = self
            .derived
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        cache.changed(key);
    }

    fn forget_all(&mut self) {
        let cache = self
            .derived
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        cache.clear();
    }

    /// Adds or replaces a Service. A Service that is ignored or invalid is removed from
    /// the state (its old version no longer describes the cluster) and the reason returned.
    pub(crate) fn upsert_service(&mut self, svc: &core::Service) -> Result<(), SkipReason> {
        match from_k8s::service(svc) {
            Ok(s) => {
                self.insert_service(s);
                Ok(())
            }
            Err(e) => {
                let key = ObjectKey::new(
                    svc.metadata.namespace.clone().unwrap_or_default(),
                    svc.metadata.name.clone().unwrap_or_default(),
                );
                self.forget(&key);
                self.services.remove(&key);
                Err(e)
            }
        }
    }

    /// Inserts an already converted Service.
    pub fn insert_service(&mut self, svc: Service) {
        self.forget(&svc.key);
        self.services.insert(svc.key.clone(), svc);
    }

    /// Removes a Service.
    pub fn remove_service(&mut self, namespace: &str, name: &str) -> bool {
        let key = ObjectKey::new(namespace, name);
        self.forget(&key);
        self.services.remove(&key).is_some()
    }

    /// Adds or replaces an EndpointSlice.
    pub(crate) fn upsert_slice(
        &mut self,
        slice: &discovery::EndpointSlice,
    ) -> Result<(), SkipReason> {
        let key = ObjectKey::new(
            slice.metadata.namespace.clone().unwrap_or_default(),
            slice.metadata.name.clone().unwrap_or_default(),
        );
        match from_k8s::endpoint_slice(slice) {
            Ok(s) => {
                self.insert_slice(s);
                Ok(())
            }
            Err(e) => {
                self.remove_slice(&key.namespace, &key.name);
                Err(e)
            }
        }
    }

    /// Inserts an already converted EndpointSlice.
    pub fn insert_slice(&mut self, slice: EndpointSlice) {
        let key = slice.key.clone();
        self.remove_slice(&key.namespace, &key.name);
        let owner = ObjectKey::new(&key.namespace, &slice.service);
        self.forget(&owner);
        self.slice_owner.insert(key.clone(), owner.clone());
        self.slices
            .entry(owner)
            .or_default()
            .insert(key.name, slice);
    }

    /// Removes an EndpointSlice.
    pub fn remove_slice(&mut self, namespace: &str, name: &str) -> bool {
        let key = ObjectKey::new(namespace, name);
        let Some(owner) = self.slice_owner.remove(&key) else {
            return false;
        };
        self.forget(&owner);
        if let Some(group) = self.slices.get_mut(&owner) {
            group.remove(name);
            if group.is_empty() {
                self.slices.remove(&owner);
            }
        }
        true
    }

    /// Sets this node's Node object.
    pub fn set_node(&mut self, node: &core::Node) -> Result<(), SkipReason> {
        self.node = Some(from_k8s::node(node)?);
        Ok(())
    }

    /// Sets converted node information (or clears it).
    pub(crate) fn set_node_info(&mut self, node: Option<NodeInfo>) {
        self.node = node;
    }

    /// Forgets this node's Node object.
    pub(crate) fn clear_node(&mut self) {
        self.node = None;
    }

    /// This node's information, when its Node object is known.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    /// Adds or replaces a ServiceCIDR.
    pub(crate) fn upsert_service_cidr(
        &mut self,
        sc: &networking::ServiceCIDR,
    ) -> Result<(), SkipReason> {
        let (name, cidrs) = from_k8s::service_cidr(sc)?;
        self.service_cidrs.insert(name, cidrs);
        Ok(())
    }

    /// Removes a ServiceCIDR.
    pub(crate) fn remove_service_cidr(&mut self, name: &str) -> bool {
        self.service_cidrs.remove(name).is_some()
    }

    /// Replaces all Services with those of `listed` (a relist staged in its own,
    /// already converted state, so full API objects are never buffered).
    pub(crate) fn adopt_services(&mut self, listed: ClusterState) {
        self.services = listed.services;
        self.forget_all();
    }

    /// Replaces all EndpointSlices with those of `listed`.
    pub(crate) fn adopt_slices(&mut self, listed: ClusterState) {
        self.slices = listed.slices;
        self.slice_owner = listed.slice_owner;
        self.forget_all();
    }

    /// Replaces the Node with that of `listed` (none if it was not listed).
    pub(crate) fn adopt_node(&mut self, listed: ClusterState) {
        self.node = listed.node;
    }

    /// Replaces all ServiceCIDRs with those of `listed`.
    pub(crate) fn adopt_service_cidrs(&mut self, listed: ClusterState) {
        self.service_cidrs = listed.service_cidrs;
    }

    /// Known Services.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// Known EndpointSlices.
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values().flat_map(|g| g.values())
    }

    /// Number of Services and EndpointSlices held.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slice_owner.len())
    }

    /// The families the cluster's Services use.
    pub fn families(&self) -> Vec<IpFamily> {
        let mut fams: Vec<IpFamily> = self
            .services
            .values()
            .flat_map(|s| s.cluster_ips.iter().map(IpFamily::of))
            .collect();
        fams.sort();
        fams.dedup();
        fams
    }

    /// Derives the per-family view for one node.
    pub fn proxy_state(&self, family: IpFamily, node: &NodeContext) -> ProxyState {
        let topo = Topology {
            node_name: &node.name,
            zone: node.zone.as_deref(),
            prefer_same_node: node.prefer_same_node,
        };
        let mut cache = self.cache();
        if cache.node.as_ref() != Some(node) {
            // Locality and topology depend on the node: nothing cached still holds.
            cache.clear();
            cache.node = Some(node.clone());
        }
        let slot = &mut cache.families[family_index(family)];
        let ports = match slot {
            Some(f) => {
                for key in std::mem::take(&mut f.dirty) {
                    let plans = match self.services.get(&key) {
                        Some(svc) => self.derive_service(svc, family, node, &topo),
                        None => Vec::new(),
                    };
                    f.ports.replace_service(&key, plans);
                }
                f.ports.clone()
            }
            None => {
                let mut all = Vec::with_capacity(self.services.len());
                for svc in self.services.values() {
                    all.extend(self.derive_service(svc, family, node, &topo));
                }
                let ports = PortList::from_sorted(all);
                *slot = Some(FamilyCache {
                    ports: ports.clone(),
                    dirty: BTreeSet::new(),
                });
                ports
            }
        };
        let mut service_cidrs: Vec<IpNet> = self
            .service_cidrs
            .values()
            .flatten()
            .filter(|n| IpFamily::of_net(n) == family)
            .copied()
            .collect();
        service_cidrs.sort();
        service_cidrs.dedup();
        ProxyState {
            family,
            ports,
            service_cidrs,
        }
    }

    /// One Service's ports for a family, sorted by port name and protocol.
    fn derive_service(
        &self,
        svc: &Service,
        family: IpFamily,
        node: &NodeContext,
        topo: &Topology<'_>,
    ) -> Vec<Arc<PortPlan>> {
        let Some(cluster_ip) = svc.cluster_ips.iter().find(|ip| family.contains(ip)) else {
            return Vec::new();
        };
        if let Err(reason) = super::validate::renderable(svc) {
            // Cached like any derivation, so this is logged once per change of the Service.
            tracing::error!(service = %svc.key, %reason, "not rendering a Service that bypassed validation");
            return Vec::new();
        }
        let slices = self.slices.get(&svc.key);
        let mut ports = Vec::with_capacity(svc.ports.len());
        for p in &svc.ports {
            let sp = ServicePort {
                name: ServicePortName {
                    namespace: svc.key.namespace.clone(),
                    name: svc.key.name.clone(),
                    port: p.name.clone(),
                    protocol: p.protocol,
                },
                cluster_ip: *cluster_ip,
                port: p.port,
                node_port: p.node_port,
                external_ips: svc
                    .external_ips
                    .iter()
                    .filter(|ip| family.contains(ip))
                    .copied()
                    .collect(),
                lb_ips: svc
                    .lb_ips
                    .iter()
                    .chain(svc.lb_proxy_ips.iter().filter(|_| self.ignore_lb_ip_mode))
                    .filter(|ip| family.contains(ip))
                    .copied()
                    .collect(),
                source_ranges: svc
                    .source_ranges
                    .iter()
                    .filter(|n| IpFamily::of_net(n) == family)
                    .copied()
                    .collect(),
                external_policy_local: svc.external_policy_local,
                internal_policy_local: svc.internal_policy_local,
                health_check_node_port: svc.health_check_node_port,
                affinity_timeout: svc.affinity_timeout,
            };
            let endpoints = merge_endpoints(slices, family, &p.name, p.protocol, &node.name);
            let selection = categorize(&sp, &endpoints, topo);
            ports.push(Arc::new(PortPlan {
                svc: sp,
                endpoints,
                selection,
            }));
        }
        ports.sort_by(|a, b| a.svc.name.cmp(&b.svc.name));
        ports
    }
}

/// Merges the endpoints of one service port across its slices: de-duplicated by
/// address string (a non-terminating copy wins), sorted byte-wise by that string.
fn merge_endpoints(
    slices: Option<&BTreeMap<String, EndpointSlice>>,
    family: IpFamily,
    port_name: &str,
    protocol: super::Protocol,
    node_name: &str,
) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<String, Endpoint> = BTreeMap::new();
    for slice in slices.into_iter().flat_map(|s| s.values()) {
        if slice.family != family {
            continue;
        }
        let Some(sp) = slice
            .ports
            .iter()
            .find(|sp| sp.name == port_name && sp.protocol == protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let ep = Endpoint {
                ip: e.ip,
                port: sp.port,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                is_local: !node_name.is_empty() && e.node_name.as_deref() == Some(node_name),
                zone_hints: e.zone_hints.clone(),
                node_hints: e.node_hints.clone(),
            };
            let addr = ep.addr_string();
            if !by_addr.contains_key(&addr) || !ep.terminating {
                by_addr.insert(addr, ep);
            }
        }
    }
    // BTreeMap<String, _> iterates in byte-wise key order: upstream's endpoint order.
    by_addr.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic;

    /// After any sequence of changes, the incrementally kept ports equal a fresh
    /// derivation (a clone starts with an empty cache).
    #[test]
    fn incremental_derivation_equals_a_fresh_one() {
        let mut st = synthetic::cluster(300, 3);
        let services: Vec<Service> = st.services().cloned().collect();
        let slices: Vec<EndpointSlice> = st.slices().cloned().collect();
        let nodes = [
            NodeContext {
                name: "node-1".into(),
                ..NodeContext::default()
            },
            NodeContext {
                name: "node-2".into(),
                zone: Some("z".into()),
                prefer_same_node: true,
            },
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % m
        };
        let mut node = &nodes[0];
        let first = st.proxy_state(IpFamily::V4, node);
        assert_eq!(first.ports.len(), 300);
        for round in 0..300 {
            for _ in 0..1 + next(5) {
                let i = next(services.len());
                match next(7) {
                    0 => {
                        st.remove_service(&services[i].key.namespace, &services[i].key.name);
                    }
                    1 => st.insert_service(services[i].clone()),
                    2 => {
                        st.remove_slice(&slices[i].key.namespace, &slices[i].key.name);
                    }
                    3 => st.insert_slice(slices[i].clone()),
                    4 => {
                        let mut s = services[i].clone();
                        s.ports[0].port = 1 + next(1000) as u16;
                        st.insert_service(s);
                    }
                    5 if next(20) == 0 => node = &nodes[next(2)],
                    _ => {
                        let mut s = slices[i].clone();
                        s.endpoints.truncate(next(4));
                        if let Some(e) = s.endpoints.first_mut() {
                            e.node_name = Some(format!("node-{}", 1 + next(2)));
                        }
                        st.insert_slice(s);
                    }
                }
            }
            let kept = st.proxy_state(IpFamily::V4, node);
            let fresh = st.clone().proxy_state(IpFamily::V4, node);
            assert_eq!(kept, fresh, "round {round}");
            assert_eq!(kept.ports.to_vec(), fresh.ports.to_vec());
            // The other family is kept too (empty here).
            assert!(st.proxy_state(IpFamily::V6, node).ports.is_empty());
        }
    }
}
