//! What one service port needs, decided once from its plan and shared by both
//! renderers (upstream computes the same booleans at the top of each proxier's
//! per-service loop).

use super::PortPlan;

/// Which chains and map entries a service port gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortFlags {
    /// Some endpoint can serve it (ready, or serving-terminating as a fallback).
    pub(crate) has_endpoints: bool,
    /// Internal (ClusterIP) traffic has an endpoint under internalTrafficPolicy.
    pub(crate) has_internal: bool,
    /// External traffic has an endpoint under externalTrafficPolicy.
    pub(crate) has_external: bool,
    /// The cluster-policy chain (service chain) is needed.
    pub(crate) uses_cluster_chain: bool,
    /// The local-policy chain is needed.
    pub(crate) uses_local_chain: bool,
    /// The external chain is needed (NodePort, external or load-balancer IPs).
    pub(crate) uses_ext: bool,
    /// The firewall chain is needed: load-balancer IPs with source ranges. This is
    /// upstream nftables' rule, which keeps filtering sources even while the Service
    /// has no endpoints; upstream iptables skips the chain then (see
    /// [`PortFlags::for_iptables`]). The two renderers differ here as upstream's do.
    pub(crate) uses_fw: bool,
}

impl PortFlags {
    /// The flags of one port plan (nftables' reading of `uses_fw`).
    pub(crate) fn of(port: &PortPlan) -> PortFlags {
        let svc = &port.svc;
        let sel = &port.selection;
        let has_endpoints = sel.has_any;
        let local_empty = sel.local.is_empty();
        PortFlags {
            has_endpoints,
            has_internal: has_endpoints && !(svc.internal_policy_local && local_empty),
            has_external: has_endpoints && !(svc.external_policy_local && local_empty),
            uses_cluster_chain: !sel.cluster.is_empty() && svc.uses_cluster_endpoints(),
            uses_local_chain: !local_empty && svc.uses_local_endpoints(),
            uses_ext: has_endpoints && svc.externally_accessible(),
            uses_fw: !svc.lb_ips.is_empty() && !svc.source_ranges.is_empty(),
        }
    }

    /// Upstream iptables' reading: a firewall chain only when there are endpoints
    /// (without them the no-endpoints REJECT in the filter table answers first).
    pub(crate) fn for_iptables(self) -> PortFlags {
        PortFlags {
            uses_fw: self.uses_fw && self.has_endpoints,
            ..self
        }
    }
}
