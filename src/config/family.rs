//! Per-family settings: what one family's renderer needs from the configuration and
//! the node's view of itself (its Node object and interface addresses).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Config, DetectLocalMode, LocalDetector, NodePortAddresses};
use crate::model::ip::parse_cidr_sloppy;
use crate::model::{IpFamily, NodeInfo};

impl Config {
    /// A feature gate's value: explicit setting, else the default of the Kubernetes
    /// release kproxy follows.
    pub(crate) fn feature_gate(&self, name: &str) -> bool {
        if let Some(v) = self.feature_gates.get(name) {
            return *v;
        }
        super::gates::default_of(name).unwrap_or(false)
    }

    /// The local-traffic detector for one family.
    pub(crate) fn local_detector(
        &self,
        family: IpFamily,
        node: Option<&NodeInfo>,
    ) -> LocalDetector {
        match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => self
                .cluster_cidrs
                .iter()
                .find(|c| IpFamily::of_net(c) == family)
                .map(|c| LocalDetector::Cidr(*c))
                .unwrap_or(LocalDetector::None),
            DetectLocalMode::NodeCidr => node
                .and_then(|n| n.pod_cidrs.iter().find(|c| IpFamily::of_net(c) == family))
                .map(|c| LocalDetector::Cidr(*c))
                .unwrap_or(LocalDetector::None),
            DetectLocalMode::BridgeInterface => {
                LocalDetector::Bridge(self.bridge_interface.clone())
            }
            DetectLocalMode::InterfaceNamePrefix => {
                LocalDetector::InterfacePrefix(self.interface_name_prefix.clone())
            }
        }
    }

    /// The fwmark value used for masquerade.
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }

    /// Builds one family's renderer settings from the config and the node's view of
    /// itself (its Node object, if known, and its interface addresses).
    pub fn family_settings(
        &self,
        family: IpFamily,
        node_name: &str,
        node: Option<&NodeInfo>,
        local_addresses: &[IpNet],
    ) -> FamilySettings {
        // bindAddress, when set to an address of this family, is the node IP
        // (upstream: "overrides kube-proxy's idea of what its node's primary IP is").
        let bound = self.bind_address.filter(|ip| family.contains(ip));
        let node_ip = bound
            .or_else(|| node.and_then(|n| n.primary_ip(family)))
            .or_else(|| {
                local_addresses
                    .iter()
                    .map(|n| n.addr())
                    .find(|ip| family.contains(ip) && !ip.is_loopback())
            });
        let cidrs: Vec<IpNet> = if self.nodeport_addresses.iter().any(|a| a == "primary") {
            node_ip.map(IpNet::from).into_iter().collect()
        } else {
            self.nodeport_addresses
                .iter()
                .filter_map(|a| parse_cidr_sloppy(a))
                .filter(|c| IpFamily::of_net(c) == family)
                .collect()
        };
        let match_all = cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0);
        let nodeport_addresses = if match_all {
            NodePortAddresses::All
        } else {
            let mut ips: Vec<IpAddr> = local_addresses
                .iter()
                .map(|n| n.addr())
                .filter(|ip| family.contains(ip) && cidrs.iter().any(|c| c.contains(ip)))
                .collect();
            ips.sort();
            ips.dedup();
            NodePortAddresses::Ips(ips)
        };
        // Upstream turns localhost NodePorts off unless the NodePort addresses include an
        // IPv4 loopback address, and always for IPv6 (there is no route_localnet there).
        let loopback_allowed = match &nodeport_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_loopback()),
        };
        let localhost_nodeports =
            self.localhost_nodeports && family == IpFamily::V4 && loopback_allowed;
        let mark = self.masquerade_mark();
        FamilySettings {
            family,
            node_name: node_name.to_string(),
            node_ip,
            local_detector: self.local_detector(family, node),
            masquerade_all: self.masquerade_all,
            masquerade_mark: mark,
            mark_text: format!("0x{mark:08x}"),
            nodeport_addresses,
            localhost_nodeports,
            nfacct_invalid: true,
            nfacct_localhost: true,
            tcp_be_liberal: self.conntrack.tcp_be_liberal,
            random_fully: true,
            large_cluster_threshold: 1000,
        }
    }
}

/// One family's proxier settings: everything the renderers need besides cluster state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySettings {
    /// The family.
    pub family: IpFamily,
    /// This node's name.
    pub node_name: String,
    /// This node's primary IP (used for LB source-range "allow from node").
    pub node_ip: Option<IpAddr>,
    /// Local-traffic detector.
    pub(crate) local_detector: LocalDetector,
    /// masqueradeAll.
    pub masquerade_all: bool,
    /// Masquerade mark value.
    pub masquerade_mark: u32,
    /// The mark as written in rules: `0x%08x` in production; upstream's tests use `0x4000`.
    pub mark_text: String,
    /// Where NodePorts are accepted.
    pub nodeport_addresses: NodePortAddresses,
    /// Localhost NodePorts in effect (iptables, IPv4 only).
    pub localhost_nodeports: bool,
    /// nfacct counter `ct_state_invalid_dropped_pkts` available (iptables).
    pub nfacct_invalid: bool,
    /// nfacct counter `localhost_nps_accepted_pkts` available (iptables).
    pub nfacct_localhost: bool,
    /// `nf_conntrack_tcp_be_liberal` was set at start (no INVALID drop rule).
    pub tcp_be_liberal: bool,
    /// iptables supports `--random-fully`.
    pub random_fully: bool,
    /// Endpoint count above which iptables rules lose their per-endpoint comments.
    pub(crate) large_cluster_threshold: usize,
}
