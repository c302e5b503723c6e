//! Which endpoints serve which traffic: upstream's `CategorizeEndpoints`.
//!
//! Cluster traffic uses ready endpoints (filtered by topology hints when every ready
//! endpoint carries them), falling back to serving-and-terminating ones when nothing is
//! ready. Local-policy traffic uses this node's ready endpoints, falling back to its
//! serving-and-terminating ones. The two lists are computed separately so that eTP and
//! iTP never leak into each other.

use super::{Endpoint, ServicePort};

/// The outcome of endpoint selection for one service port; lists hold indices into the
/// port's sorted endpoint list, in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Selection {
    /// Endpoints for cluster-policy traffic.
    pub cluster: Vec<usize>,
    /// Endpoints for local-policy traffic.
    pub local: Vec<usize>,
    /// Every endpoint some traffic can reach (endpoint chains are written for these).
    pub(crate) all_reachable: Vec<usize>,
    /// Whether any usable endpoint exists anywhere.
    pub(crate) has_any: bool,
}

/// Topology inputs: this node's name and zone, and the PreferSameTrafficDistribution gate.
#[derive(Debug, Clone, Default)]
pub(crate) struct Topology<'a> {
    /// This node's name.
    pub node_name: &'a str,
    /// This node's `topology.kubernetes.io/zone` label.
    pub zone: Option<&'a str>,
    /// Feature gate PreferSameTrafficDistribution (node hints).
    pub prefer_same_node: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[Endpoint], topo: &Topology<'_>) -> TopologyMode {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == topo.node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if topo
            .zone
            .is_some_and(|z| ep.zone_hints.iter().any(|h| h == z))
        {
            for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if topo.prefer_same_node && all_node_hints && for_node {
        return TopologyMode::SameNode;
    }
    if all_zone_hints && for_zone {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available(ep: &Endpoint, mode: TopologyMode, topo: &Topology<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.iter().any(|n| n == topo.node_name),
        TopologyMode::SameZone => topo
            .zone
            .is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)),
    }
}

fn indices(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| keep(e))
        .map(|(i, _)| i)
        .collect()
}

/// Selects endpoints for one service port. `endpoints` must be sorted by address string.
pub(crate) fn categorize(
    svc: &ServicePort,
    endpoints: &[Endpoint],
    topo: &Topology<'_>,
) -> Selection {
    let mut sel = Selection::default();
    if endpoints.is_empty() {
        return sel;
    }
    let mut mode = TopologyMode::None;
    if svc.uses_cluster_endpoints() {
        mode = topology_mode(endpoints, topo);
        sel.cluster = indices(endpoints, |e| e.ready && available(e, mode, topo));
        if sel.cluster.is_empty() {
            // Nothing ready anywhere: keep traffic flowing to pods that are shutting down
            // but still serving (KEP-1669), ignoring topology.
            sel.cluster = indices(endpoints, |e| e.serving && e.terminating);
        }
        sel.has_any = !sel.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        sel.all_reachable = sel.cluster.clone();
        return sel;
    }
    let mut local_ready = false;
    let mut local_terminating = false;
    for e in endpoints {
        if e.ready {
            sel.has_any = true;
            local_ready |= e.is_local;
        } else if e.serving && e.terminating {
            sel.has_any = true;
            local_terminating |= e.is_local;
        }
    }
    let mut used_terminating = false;
    if local_ready {
        sel.local = indices(endpoints, |e| e.is_local && e.ready);
    } else if local_terminating {
        used_terminating = true;
        sel.local = indices(endpoints, |e| e.is_local && e.serving && e.terminating);
    }
    if !svc.uses_cluster_endpoints() {
        sel.all_reachable = sel.local.clone();
        return sel;
    }
    if mode == TopologyMode::None && !used_terminating {
        // Local ready endpoints are then a subset of the cluster ones.
        sel.all_reachable = sel.cluster.clone();
        return sel;
    }
    let mut all: Vec<usize> = sel
        .cluster
        .iter()
        .chain(sel.local.iter())
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    sel.all_reachable = all;
    sel
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn svc(itp_local: bool, etp_local: bool, node_port: u16) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "svc".into(),
                port: "p".into(),
                protocol: Protocol::Tcp,
            },
            cluster_ip: "172.30.0.1".parse().unwrap(),
            port: 80,
            node_port,
            external_ips: vec![],
            lb_ips: vec![],
            source_ranges: vec![],
            external_policy_local: etp_local,
            internal_policy_local: itp_local,
            health_check_node_port: 0,
            affinity_timeout: None,
        }
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        Endpoint {
            ip: format!("10.0.0.{last}").parse().unwrap(),
            port: 80,
            ready,
            serving,
            terminating,
            is_local: local,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    const TOPO: Topology<'static> = Topology {
        node_name: "node",
        zone: Some("a"),
        prefer_same_node: true,
    };

    #[test]
    fn cluster_prefers_ready_then_terminating() {
        let eps = vec![
            ep(1, false, true, true, false),
            ep(2, true, true, false, false),
        ];
        let s = categorize(&svc(false, false, 0), &eps, &TOPO);
        assert_eq!(s.cluster, vec![1]);
        assert!(s.has_any);
        let eps = vec![
            ep(1, false, true, true, false),
            ep(2, false, false, true, false),
        ];
        let s = categorize(&svc(false, false, 0), &eps, &TOPO);
        assert_eq!(s.cluster, vec![0]);
        assert_eq!(s.all_reachable, vec![0]);
    }

    #[test]
    fn etp_local_uses_local_terminating_and_unions() {
        let eps = vec![
            ep(1, true, true, false, false),
            ep(2, false, true, true, true),
        ];
        let s = categorize(&svc(false, true, 30000), &eps, &TOPO);
        assert_eq!(s.cluster, vec![0]);
        assert_eq!(s.local, vec![1]);
        assert_eq!(s.all_reachable, vec![0, 1]);
    }

    #[test]
    fn itp_local_without_local_endpoints() {
        let eps = vec![ep(1, true, true, false, false)];
        let s = categorize(&svc(true, false, 0), &eps, &TOPO);
        assert!(s.cluster.is_empty());
        assert!(s.local.is_empty());
        assert!(s.has_any);
        assert!(s.all_reachable.is_empty());
    }

    #[test]
    fn zone_hints_filter_cluster_endpoints() {
        let mut a = ep(1, true, true, false, false);
        a.zone_hints = vec!["a".into()];
        let mut b = ep(2, true, true, false, false);
        b.zone_hints = vec!["b".into()];
        let s = categorize(&svc(false, false, 0), &[a.clone(), b.clone()], &TOPO);
        assert_eq!(s.cluster, vec![0]);
        // One endpoint without hints disables topology.
        let c = ep(3, true, true, false, false);
        let s = categorize(&svc(false, false, 0), &[a, b, c], &TOPO);
        assert_eq!(s.cluster, vec![0, 1, 2]);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let mut a = ep(1, true, true, false, false);
        a.zone_hints = vec!["a".into()];
        a.node_hints = vec!["other".into()];
        let mut b = ep(2, true, true, false, true);
        b.zone_hints = vec!["a".into()];
        b.node_hints = vec!["node".into()];
        let s = categorize(&svc(false, false, 0), &[a.clone(), b.clone()], &TOPO);
        assert_eq!(s.cluster, vec![1]);
        let no_gate = Topology {
            prefer_same_node: false,
            ..TOPO
        };
        let s = categorize(&svc(false, false, 0), &[a, b], &no_gate);
        assert_eq!(s.cluster, vec![0, 1]);
    }
}
