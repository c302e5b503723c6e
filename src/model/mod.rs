//! The compact cluster model: pure data, no I/O.
//!
//! Kubernetes objects are converted once (see [`from_k8s`]) into small validated structs
//! that keep only what the proxy needs. [`ClusterState`] holds them keyed by object name;
//! [`ClusterState::proxy_state`] derives the per-family view both renderers consume.

pub mod decode;
pub(crate) mod from_k8s;
pub mod ip;
mod port_flags;
mod port_list;
pub mod select;
mod state;
pub mod synthetic;
pub mod validate;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub(crate) use port_flags::PortFlags;
pub(crate) use port_list::PortChange;
pub use port_list::{Iter as PortIter, PortList};
pub(crate) use state::PortPlan;
pub use state::{ClusterState, NodeContext, ProxyState};

/// An IP family; each family gets its own proxier, as upstream's meta-proxier does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }

    /// Upstream's label value (`IPv4` / `IPv6`), used in metrics and health bodies.
    pub fn label(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self
    }
}

/// A Service or EndpointSlice port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); an absent protocol means TCP.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Lower-case name as used in rules and chain-name hashes.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// Namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace ("" for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key.
    pub(crate) fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Identifies one port of one Service: upstream's ServicePortName.
///
/// Its `Display` form (`ns/name:port`, or `ns/name` for an unnamed port) is the string
/// hashed into chain names and written in rule comments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port ("" when unnamed).
    pub port: String,
    /// Protocol of the port.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// `spec.type` of a Service. `Unset` is kept apart from `ClusterIP` because upstream
/// compares the raw field when deciding whether a ClusterIP service with externalIPs is
/// "externally accessible".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServiceType {
    /// No type field (only seen in hand-written input; the API server defaults it).
    Unset,
    /// ClusterIP.
    ClusterIp,
    /// NodePort.
    NodePort,
    /// LoadBalancer.
    LoadBalancer,
}

/// One port of a Service spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Port name ("" when unnamed).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Service port.
    pub port: u16,
    /// Node port, 0 when none.
    pub node_port: u16,
}

/// A Service as the proxy needs it: validated, family-independent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `spec.type`.
    pub(crate) service_type: ServiceType,
    /// Cluster IPs, at most one per family, in `spec.clusterIPs` order.
    pub(crate) cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` that parsed.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs, minus `ipMode: Proxy` entries.
    pub lb_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs with `ipMode: Proxy` (used only when the
    /// LoadBalancerIPMode gate is off).
    pub(crate) lb_proxy_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` that parsed, canonical.
    pub source_ranges: Vec<IpNet>,
    /// externalTrafficPolicy Local on an externally accessible service.
    pub(crate) external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub(crate) internal_policy_local: bool,
    /// Health-check node port (LoadBalancer with eTP=Local only), 0 when none.
    pub health_check_node_port: u16,
    /// ClientIP session affinity timeout in seconds, `None` without affinity.
    pub affinity_timeout: Option<u32>,
    /// `spec.trafficDistribution`, informational (selection uses the slices' hints).
    pub(crate) traffic_distribution: Option<String>,
    /// Ports, in spec order.
    pub ports: Vec<PortSpec>,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name ("" when unnamed).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Target port number.
    pub port: u16,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// First address, canonical.
    pub ip: IpAddr,
    /// `conditions.ready` (absent = true).
    pub ready: bool,
    /// `conditions.serving` (absent = true).
    pub serving: bool,
    /// `conditions.terminating` (absent = false).
    pub terminating: bool,
    /// `nodeName`.
    pub node_name: Option<String>,
    /// `zone`.
    pub zone: Option<String>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

/// An EndpointSlice as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace and name of the slice.
    pub key: ObjectKey,
    /// The owning Service's name (label `kubernetes.io/service-name`).
    pub service: String,
    /// Address family of the slice.
    pub family: IpFamily,
    /// Ports with a name and a non-zero port.
    pub ports: Vec<SlicePort>,
    /// Endpoints with a parsable first address.
    pub endpoints: Vec<SliceEndpoint>,
}

/// What the proxy needs from its own Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// status.addresses InternalIP entries, in order.
    pub internal_ips: Vec<IpAddr>,
    /// status.addresses ExternalIP entries, in order.
    pub external_ips: Vec<IpAddr>,
    /// spec.podCIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Being deleted, or tainted ToBeDeletedByClusterAutoscaler (health: not eligible).
    pub(crate) being_deleted: bool,
}

impl NodeInfo {
    /// The node's primary IP of a family, chosen as upstream does: first InternalIP,
    /// else first ExternalIP of that family.
    pub(crate) fn primary_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .chain(self.external_ips.iter())
            .find(|ip| family.contains(ip))
            .copied()
    }
}

/// One endpoint of one service port, for one family, after merging the slices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Endpoint IP.
    pub ip: IpAddr,
    /// Endpoint port.
    pub port: u16,
    /// Ready condition.
    pub ready: bool,
    /// Serving condition.
    pub serving: bool,
    /// Terminating condition.
    pub terminating: bool,
    /// On this node.
    pub is_local: bool,
    /// Zone hints.
    pub zone_hints: Vec<String>,
    /// Node hints.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// `ip:port`, or `[ip]:port` for IPv6: the string upstream hashes, sorts and prints.
    pub(crate) fn addr_string(&self) -> String {
        join_host_port(&self.ip, self.port)
    }
}

/// Go's `net.JoinHostPort` for an IP.
pub(crate) fn join_host_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// One service port for one family, with everything the renderers need.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// Its name.
    pub name: ServicePortName,
    /// Cluster IP of this family.
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Node port, 0 when none.
    pub node_port: u16,
    /// External IPs of this family.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer VIPs of this family.
    pub lb_ips: Vec<IpAddr>,
    /// Source ranges of this family.
    pub source_ranges: Vec<IpNet>,
    /// externalTrafficPolicy Local (and externally accessible by type).
    pub(crate) external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub(crate) internal_policy_local: bool,
    /// Health-check node port, 0 when none.
    pub health_check_node_port: u16,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
}

impl ServicePort {
    /// Reachable from outside the cluster network: NodePort, LB VIP or external IP.
    pub(crate) fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.lb_ips.is_empty() || !self.external_ips.is_empty()
    }

    /// Whether cluster-policy endpoints are needed.
    pub(crate) fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Whether local-policy endpoints are needed.
    pub(crate) fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
}
