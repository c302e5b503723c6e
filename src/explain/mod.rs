//! `explain`: for each Service port, every way in (ClusterIP, NodePorts, load-balancer
//! IPs with their ipMode, external IPs) for traffic from a pod, from the node and from
//! outside; which endpoints serve it and why, with node, zone and probability; session
//! affinity, masquerading, source ranges, the health-check node port, and the chains
//! and sets that implement it.
//!
//! Endpoint choices come from the model's own selection (`model::select`, the same
//! `PortPlan` the renderers use); this module only reads them and says why. The
//! masquerade and policy statements describe what the renderers write for the same
//! settings, and `tests/explain_cli.rs` cross-checks them against the tracer.

pub mod mermaid;
pub mod text;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{FamilySettings, LocalDetector, NodePortAddresses};
use crate::model::PortPlan;
use crate::model::{join_host_port, ClusterState, Endpoint, NodeContext, ProxyState};

/// The JSON schema identifier of [`Explanation`].
pub(crate) const EXPLAIN_SCHEMA: &str = "https://kproxy.dev/schema/explain.v1.json";

/// Every explained Service port of one family.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    /// Schema identifier (versioned).
    #[serde(rename = "$schema")]
    pub schema: String,
    /// This node.
    pub node: NodeView,
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// How pods are told apart from other sources.
    pub(crate) local_detector: String,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// One entry per Service port.
    pub ports: Vec<PortView>,
}

/// The node the rules are for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

/// Where a client sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    /// A pod (source inside the local-traffic detector).
    Pod,
    /// A process on this node.
    Node,
    /// Anything else (another node, the internet).
    Outside,
}

impl Client {
    /// Lower-case label.
    pub fn label(self) -> &'static str {
        match self {
            Client::Pod => "pod",
            Client::Node => "node",
            Client::Outside => "outside",
        }
    }
}

/// What happens to traffic from one kind of client at one frontend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathView {
    /// Who sends it.
    pub client: Client,
    /// Which endpoint list serves it: `cluster`, `local`, or `none` (rejected or
    /// dropped).
    pub endpoints: String,
    /// The verdict when no endpoint serves it (`REJECT`, `DROP`), else null.
    pub verdict: Option<String>,
    /// Whether the source is rewritten to the node's address.
    pub masquerade: bool,
    /// Why (or why not).
    pub why: String,
}

/// One way into a Service port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrontendView {
    /// `cluster_ip`, `node_port`, `load_balancer`, `external_ip`.
    pub kind: String,
    /// `IP:port` (`*:port` for a NodePort on every node address).
    pub address: String,
    /// `VIP` or `Proxy` for load-balancer IPs.
    pub(crate) ip_mode: Option<String>,
    /// Whether kproxy programs rules for it (ipMode Proxy ones are left to the LB).
    pub programmed: bool,
    /// Traffic from each kind of client.
    pub paths: Vec<PathView>,
}

/// One endpoint and why it is (not) used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    /// `IP:port`.
    pub address: String,
    /// Node it runs on.
    pub node: Option<String>,
    /// Its zone.
    pub zone: Option<String>,
    /// Conditions.
    pub ready: bool,
    /// Conditions.
    pub serving: bool,
    /// Conditions.
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    /// Chance a new cluster-policy connection picks it (0 when not used).
    pub cluster_probability: f64,
    /// Chance a new local-policy connection picks it (0 when not used, or when the
    /// port has no local policy).
    pub local_probability: f64,
    /// Why it is used or left out.
    pub why: String,
}

/// Rule objects that implement a Service port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleNames {
    /// iptables chains (KUBE-SVC/SVL/EXT/FW/SEP).
    pub iptables: Vec<String>,
    /// nftables chains, plus the maps that point at them.
    pub nftables: Vec<String>,
}

/// One Service port explained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortView {
    /// `namespace/name:port` (upstream's service port name).
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Port name ("" when unnamed).
    pub port_name: String,
    /// Port number.
    pub port: u16,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// `internalTrafficPolicy`.
    pub(crate) internal_traffic_policy: String,
    /// `externalTrafficPolicy` (externally reachable ports only).
    pub(crate) external_traffic_policy: Option<String>,
    /// Session affinity timeout in seconds (ClientIP affinity), if set.
    pub(crate) session_affinity_seconds: Option<u32>,
    /// loadBalancerSourceRanges.
    pub source_ranges: Vec<String>,
    /// healthCheckNodePort (ETP Local), if any.
    pub health_check_node_port: Option<u16>,
    /// Every way in.
    pub frontends: Vec<FrontendView>,
    /// Every endpoint the slices list.
    pub endpoints: Vec<EndpointView>,
    /// Short notes (topology mode, fallbacks).
    pub(crate) notes: Vec<String>,
    /// Rule objects.
    pub rules: RuleNames,
}

/// What `explain` needs: the cluster, the node, and the renderer settings.
pub struct ExplainInputs<'a> {
    /// The cluster (for endpoint nodes and zones, and ipMode Proxy IPs).
    pub state: &'a ClusterState,
    /// The per-family view the renderers use.
    pub proxy: &'a ProxyState,
    /// The renderer settings of this family.
    pub settings: &'a FamilySettings,
    /// The node.
    pub node: &'a NodeContext,
}

fn detector_text(d: &LocalDetector) -> String {
    match d {
        LocalDetector::None => "none (pods are not told apart)".into(),
        LocalDetector::Cidr(c) => format!("source in {c}"),
        LocalDetector::Bridge(b) => format!("arrives on bridge {b}"),
        LocalDetector::InterfacePrefix(p) => format!("arrives on an interface named {p}*"),
    }
}

/// Explains the ports selected by `filter` (all when None).
pub fn explain(inp: &ExplainInputs<'_>, filter: Option<&ServiceFilter>) -> Explanation {
    let ports = inp
        .proxy
        .ports
        .iter()
        .filter(|p| filter.is_none_or(|f| f.matches(p)))
        .map(|p| port_view(inp, p))
        .collect();
    Explanation {
        schema: EXPLAIN_SCHEMA.into(),
        node: NodeView {
            name: inp.node.name.clone(),
            zone: inp.node.zone.clone(),
        },
        family: inp.proxy.family.label().into(),
        local_detector: detector_text(&inp.settings.local_detector),
        masquerade_all: inp.settings.masquerade_all,
        ports,
    }
}

/// `NAMESPACE/NAME[:PORT]`: PORT is the port name or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFilter {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Port name or number.
    pub port: Option<String>,
}

impl ServiceFilter {
    /// Parses `NAMESPACE/NAME[:PORT]`.
    pub(crate) fn parse(s: &str) -> Option<ServiceFilter> {
        let (ns, rest) = s.split_once('/')?;
        let (name, port) = match rest.split_once(':') {
            Some((n, p)) => (n, Some(p.to_string())),
            None => (rest, None),
        };
        if ns.is_empty() || name.is_empty() || port.as_deref() == Some("") {
            return None;
        }
        Some(ServiceFilter {
            namespace: ns.into(),
            name: name.into(),
            port,
        })
    }

    fn matches(&self, p: &PortPlan) -> bool {
        let n = &p.svc.name;
        self.matches_parts(&n.namespace, &n.name, &n.port, p.svc.port)
    }

    /// Whether an explained port is the one asked for.
    pub(crate) fn matches_view(&self, p: &PortView) -> bool {
        self.matches_parts(&p.namespace, &p.name, &p.port_name, p.port)
    }

    fn matches_parts(&self, ns: &str, name: &str, port_name: &str, port: u16) -> bool {
        ns == self.namespace
            && name == self.name
            && self
                .port
                .as_ref()
                .is_none_or(|p| p == port_name || *p == port.to_string())
    }
}

fn endpoint_location(
    state: &ClusterState,
    p: &PortPlan,
    ep: &Endpoint,
) -> (Option<String>, Option<String>) {
    let key = p.service_key();
    for s in state.slices() {
        if s.key.namespace != key.namespace || s.service != key.name {
            continue;
        }
        if let Some(e) = s.endpoints.iter().find(|e| e.ip == ep.ip) {
            return (e.node_name.clone(), e.zone.clone());
        }
    }
    (None, None)
}

fn port_view(inp: &ExplainInputs<'_>, p: &PortPlan) -> PortView {
    let svc = &p.svc;
    let sel = &p.selection;
    let uses_local_internal = svc.internal_policy_local;
    let external = svc.externally_accessible();
    let uses_local_external = external && svc.external_policy_local;
    let mut notes = Vec::new();

    // Endpoints.
    let any_ready = p.endpoints.iter().any(|e| e.ready);
    let cluster_fallback =
        !sel.cluster.is_empty() && sel.cluster.iter().all(|i| !p.endpoints[*i].ready);
    if cluster_fallback {
        notes.push(
            "no endpoint is ready: serving-terminating endpoints are used (KEP-1669 fallback)"
                .into(),
        );
    }
    let local_fallback = !sel.local.is_empty() && sel.local.iter().all(|i| !p.endpoints[*i].ready);
    if local_fallback {
        notes.push(
            "no local endpoint is ready: local serving-terminating endpoints are used".into(),
        );
    }
    let ready_excluded_by_topology = any_ready
        && svc.uses_cluster_endpoints()
        && p.endpoints
            .iter()
            .enumerate()
            .any(|(i, e)| e.ready && !sel.cluster.contains(&i));
    if ready_excluded_by_topology {
        notes.push(format!(
            "topology-aware routing: ready endpoints whose hints exclude this node{} are left out for cluster-policy traffic",
            inp.node
                .zone
                .as_ref()
                .map(|z| format!(" (zone {z})"))
                .unwrap_or_default()
        ));
    }
    let nc = sel.cluster.len().max(1) as f64;
    let nl = sel.local.len().max(1) as f64;
    let endpoints: Vec<EndpointView> = p
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (node, zone) = endpoint_location(inp.state, p, e);
            let in_cluster = sel.cluster.contains(&i);
            let in_local = sel.local.contains(&i);
            let mut why = Vec::new();
            if in_cluster {
                why.push(if e.ready {
                    "ready".to_string()
                } else {
                    "serving and terminating (fallback: nothing ready)".to_string()
                });
            } else if svc.uses_cluster_endpoints() {
                why.push(if !(e.ready || e.serving && e.terminating) {
                    "excluded: not ready".to_string()
                } else if !e.ready {
                    "excluded: terminating while ready endpoints exist".to_string()
                } else if !e.node_hints.is_empty() && inp.node.prefer_same_node {
                    format!(
                        "excluded: node hint {} is not this node",
                        e.node_hints.join(",")
                    )
                } else {
                    format!(
                        "excluded: zone hint {} does not include this node's zone",
                        if e.zone_hints.is_empty() {
                            "(none)".into()
                        } else {
                            e.zone_hints.join(",")
                        }
                    )
                });
            }
            if svc.uses_local_endpoints() {
                if in_local {
                    why.push(if e.ready {
                        "local ready (Local policy)".to_string()
                    } else {
                        "local serving-terminating (Local policy fallback)".to_string()
                    });
                } else if !e.is_local {
                    why.push(format!(
                        "excluded for Local policy: runs on {}",
                        node.clone().unwrap_or_else(|| "another node".into())
                    ));
                } else {
                    why.push("excluded for Local policy: not ready".into());
                }
            }
            EndpointView {
                address: e.addr_string(),
                node,
                zone,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                local: e.is_local,
                cluster_probability: if in_cluster { 1.0 / nc } else { 0.0 },
                local_probability: if in_local { 1.0 / nl } else { 0.0 },
                why: why.join("; "),
            }
        })
        .collect();

    // Frontends.
    let detector = !matches!(inp.settings.local_detector, LocalDetector::None);
    let masq_all = inp.settings.masquerade_all;
    let has = |local: bool| {
        if local {
            !sel.local.is_empty()
        } else {
            !sel.cluster.is_empty()
        }
    };
    let no_endpoint_verdict = |local_external: bool| -> &'static str {
        if local_external && sel.has_any {
            "DROP"
        } else {
            "REJECT"
        }
    };
    let internal_path = |client: Client| -> PathView {
        let local = uses_local_internal;
        let list = if local { "local" } else { "cluster" };
        let (masquerade, why) = if masq_all {
            (true, "masqueradeAll".to_string())
        } else if !detector {
            (
                false,
                "no local-traffic detector: ClusterIP traffic is not masqueraded".to_string(),
            )
        } else if client == Client::Pod {
            (false, "source is a pod: its address is kept".to_string())
        } else {
            (
                true,
                "source is not a pod (outside the local-traffic detector)".to_string(),
            )
        };
        if !has(local) {
            return PathView {
                client,
                endpoints: "none".into(),
                verdict: Some(
                    if local && sel.has_any {
                        "DROP"
                    } else {
                        "REJECT"
                    }
                    .into(),
                ),
                masquerade: false,
                why: if local {
                    "internalTrafficPolicy: Local and no endpoint on this node".into()
                } else {
                    "no usable endpoint".into()
                },
            };
        }
        PathView {
            client,
            endpoints: list.into(),
            verdict: None,
            masquerade,
            why,
        }
    };
    let external_path = |client: Client| -> PathView {
        // Pods and the node itself reach external addresses through the cluster-wide
        // endpoints even under externalTrafficPolicy: Local (upstream's short cut).
        let short_cut =
            uses_local_external && (client == Client::Node || (client == Client::Pod && detector));
        let local = uses_local_external && !short_cut;
        if !has(local) {
            return PathView {
                client,
                endpoints: "none".into(),
                verdict: Some(no_endpoint_verdict(local).into()),
                masquerade: false,
                why: if local {
                    "externalTrafficPolicy: Local and no endpoint on this node".into()
                } else {
                    "no usable endpoint".into()
                },
            };
        }
        let (masquerade, why) = if masq_all {
            (true, "masqueradeAll".to_string())
        } else if !uses_local_external {
            (
                true,
                "externalTrafficPolicy: Cluster masquerades external traffic".to_string(),
            )
        } else if client == Client::Node {
            (
                true,
                "from the node: masqueraded and sent to any endpoint".to_string(),
            )
        } else if short_cut {
            (
                false,
                "from a pod: sent to any endpoint, source kept".to_string(),
            )
        } else {
            (
                false,
                "externalTrafficPolicy: Local keeps the client's address".to_string(),
            )
        };
        PathView {
            client,
            endpoints: if local { "local" } else { "cluster" }.into(),
            verdict: None,
            masquerade,
            why,
        }
    };
    let clients = [Client::Pod, Client::Node, Client::Outside];
    let mut frontends = vec![FrontendView {
        kind: "cluster_ip".into(),
        address: join_host_port(&svc.cluster_ip, svc.port),
        ip_mode: None,
        programmed: true,
        paths: clients.iter().map(|c| internal_path(*c)).collect(),
    }];
    if svc.node_port > 0 {
        let addrs: Vec<String> = match &inp.settings.nodeport_addresses {
            NodePortAddresses::All => vec![format!("*:{}", svc.node_port)],
            NodePortAddresses::Ips(ips) => ips
                .iter()
                .map(|ip| join_host_port(ip, svc.node_port))
                .collect(),
        };
        for a in addrs {
            frontends.push(FrontendView {
                kind: "node_port".into(),
                address: a,
                ip_mode: None,
                programmed: true,
                paths: clients.iter().map(|c| external_path(*c)).collect(),
            });
        }
    }
    let key = p.service_key();
    let proxy_ips: Vec<IpAddr> = inp
        .state
        .services()
        .find(|s| s.key == key)
        .map(|s| {
            s.lb_proxy_ips
                .iter()
                .filter(|ip| inp.proxy.family.contains(ip))
                .copied()
                .collect()
        })
        .unwrap_or_default();
    for ip in &svc.lb_ips {
        let mode = if proxy_ips.contains(ip) {
            "Proxy"
        } else {
            "VIP"
        };
        frontends.push(FrontendView {
            kind: "load_balancer".into(),
            address: join_host_port(ip, svc.port),
            ip_mode: Some(mode.into()),
            programmed: true,
            paths: clients.iter().map(|c| external_path(*c)).collect(),
        });
    }
    for ip in proxy_ips.iter().filter(|ip| !svc.lb_ips.contains(ip)) {
        frontends.push(FrontendView {
            kind: "load_balancer".into(),
            address: join_host_port(ip, svc.port),
            ip_mode: Some("Proxy".into()),
            programmed: false,
            paths: Vec::new(),
        });
        notes.push(format!(
            "{ip}: ipMode Proxy, so kproxy writes no rule for it; the load balancer forwards to a NodePort"
        ));
    }
    for ip in &svc.external_ips {
        frontends.push(FrontendView {
            kind: "external_ip".into(),
            address: join_host_port(ip, svc.port),
            ip_mode: None,
            programmed: true,
            paths: clients.iter().map(|c| external_path(*c)).collect(),
        });
    }
    if let Some(t) = svc.affinity_timeout {
        notes.push(format!(
            "session affinity ClientIP: a client returns to its endpoint for {t}s after its last connection"
        ));
    }
    if !svc.source_ranges.is_empty() {
        notes.push(format!(
            "loadBalancerSourceRanges: load-balancer traffic from other sources is dropped ({})",
            svc.source_ranges
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // Rule names.
    let ipt = crate::iptables::names::PortChains::new(&svc.name);
    let mut iptables = vec![ipt.svc.clone()];
    if svc.uses_local_endpoints() {
        iptables.push(ipt.svl.clone());
    }
    if external {
        iptables.push(ipt.ext.clone());
    }
    if !svc.source_ranges.is_empty() {
        iptables.push(ipt.fw.clone());
    }
    let base = crate::nftables::names::service_base(&svc.name);
    let mut nftables = vec![format!("service-{base}")];
    if svc.uses_local_endpoints() {
        nftables.push(format!("local-{base}"));
    }
    if external {
        nftables.push(format!("external-{base}"));
    }
    if !svc.source_ranges.is_empty() {
        nftables.push(format!("firewall-{base}"));
    }
    for i in &sel.all_reachable {
        let e = &p.endpoints[*i];
        iptables.push(crate::iptables::names::endpoint_chain(&svc.name, e));
        nftables.push(format!(
            "endpoint-{}",
            crate::nftables::names::endpoint_base(&svc.name, e)
        ));
    }
    nftables.push("@service-ips".into());
    if svc.node_port > 0 {
        nftables.push("@service-nodeports".into());
    }
    if !sel.has_any || (svc.uses_local_endpoints() && sel.local.is_empty()) {
        nftables.push("@no-endpoint-services".into());
    }

    PortView {
        service: svc.name.to_string(),
        namespace: svc.name.namespace.clone(),
        name: svc.name.name.clone(),
        port_name: svc.name.port.clone(),
        port: svc.port,
        protocol: svc.name.protocol.lower().into(),
        internal_traffic_policy: if svc.internal_policy_local {
            "Local"
        } else {
            "Cluster"
        }
        .into(),
        external_traffic_policy: external.then_some(
            if svc.external_policy_local {
                "Local"
            } else {
                "Cluster"
            }
            .into(),
        ),
        session_affinity_seconds: svc.affinity_timeout,
        source_ranges: svc.source_ranges.iter().map(|r| r.to_string()).collect(),
        health_check_node_port: (svc.health_check_node_port > 0)
            .then_some(svc.health_check_node_port),
        frontends,
        endpoints,
        notes,
        rules: RuleNames { iptables, nftables },
    }
}
