//! Kubernetes API objects -> model. Bad objects are refused with a reason that names the
//! field; the caller skips them with a warning and everything else keeps working.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;

use super::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use super::validate::{self, shown};
use super::{
    EndpointSlice, IpFamily, NodeInfo, ObjectKey, PortSpec, Protocol, Service, ServiceType,
    SliceEndpoint, SlicePort,
};

/// Label that hands a Service to another proxy; upstream never sees such Services.
pub(crate) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking EndpointSlices of headless Services.
pub(crate) const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label for the zone.
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// EndpointSlice annotation used for network-programming latency.
pub(crate) const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Why an object was not turned into model data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// The object is fine but the proxy has nothing to do with it (headless,
    /// ExternalName, another proxy's, FQDN slice). Not worth a warning.
    #[error("ignored: {0}")]
    Ignored(&'static str),
    /// The object is malformed.
    #[error("{0}")]
    Invalid(Invalid),
}

/// A malformed object: a short category for the metric's `reason` label and a message
/// naming the field and the offending value (escaped, cut to a readable length).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// Category: `name`, `namespace`, `port_name`, `port`, `ip`, `affinity_timeout`,
    /// `enum`, `duplicate_port`, `label`, `decode`.
    pub reason: &'static str,
    /// What is wrong, for the log line and the snapshot's skipped list.
    pub message: String,
}

impl SkipReason {
    /// A malformed object of category `reason`.
    pub(crate) fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        SkipReason::Invalid(Invalid {
            reason,
            message: message.into(),
        })
    }
}

fn invalid(reason: &'static str, msg: impl Into<String>) -> SkipReason {
    SkipReason::invalid(reason, msg)
}

fn check(reason: &'static str, r: Result<(), String>) -> Result<(), SkipReason> {
    r.map_err(|m| invalid(reason, m))
}

/// Namespace (DNS-1123 label) and name (`name_rule`) of an object, as the API server
/// validates them.
fn check_key(key: &ObjectKey, name_rule: fn(&str) -> Result<(), String>) -> Result<(), SkipReason> {
    if key.name.is_empty() {
        return Err(invalid("name", "metadata.name is empty"));
    }
    check(
        "namespace",
        validate::dns1123_label(&key.namespace).map_err(|m| format!("metadata.namespace {m}")),
    )?;
    check(
        "name",
        name_rule(&key.name).map_err(|m| format!("metadata.name {m}")),
    )
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn port_u16(v: i32, what: &str) -> Result<u16, SkipReason> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid("port", format!("{what} {v} is out of range 1-65535")))
}

fn opt_port_u16(v: Option<i32>, what: &str) -> Result<u16, SkipReason> {
    match v {
        None | Some(0) => Ok(0),
        Some(v) => port_u16(v, what),
    }
}

/// Converts a Service. Headless, ExternalName and other proxies' Services are `Ignored`.
pub(crate) fn service(svc: &core::Service) -> Result<Service, SkipReason> {
    let key = key_of(&svc.metadata);
    check_key(&key, validate::dns1035_label)?;
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return Err(SkipReason::Ignored("handled by another service proxy"));
    }
    let spec = svc.spec.as_ref().ok_or(SkipReason::Ignored("no spec"))?;
    let service_type = match spec.type_.as_deref() {
        None | Some("") => ServiceType::Unset,
        Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Err(SkipReason::Ignored("ExternalName service")),
        Some(other) => {
            return Err(invalid(
                "enum",
                format!("unknown spec.type {}", shown(other)),
            ))
        }
    };
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    if primary.is_empty() || primary == "None" {
        return Err(SkipReason::Ignored("headless service"));
    }
    let raw_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for raw in raw_ips {
        let ip = parse_ip_sloppy(raw).ok_or_else(|| {
            invalid(
                "ip",
                format!("spec.clusterIPs entry {} is not an IP", shown(raw)),
            )
        })?;
        if !cluster_ips
            .iter()
            .any(|c| IpFamily::of(c) == IpFamily::of(&ip))
        {
            cluster_ips.push(ip);
        }
    }

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.as_deref().unwrap_or_default() {
        let name = p.name.clone().unwrap_or_default();
        check(
            "port_name",
            validate::port_name(&name).map_err(|m| format!("spec.ports: {m}")),
        )?;
        let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
            invalid(
                "enum",
                format!(
                    "port {name:?}: unknown protocol {}",
                    shown(p.protocol.as_deref().unwrap_or_default())
                ),
            )
        })?;
        let port = port_u16(p.port, &format!("port {name:?}: port"))?;
        let node_port = opt_port_u16(p.node_port, &format!("port {name:?}: nodePort"))?;
        if !seen.insert((name.clone(), protocol)) {
            return Err(invalid(
                "duplicate_port",
                format!(
                    "duplicate port name {name:?} for protocol {}",
                    protocol.lower()
                ),
            ));
        }
        ports.push(PortSpec {
            name,
            protocol,
            port,
            node_port,
        });
    }

    // Invalid externalIPs, source ranges and ingress IPs are dropped one by one, as
    // upstream does; the rest of the Service still works.
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| parse_ip_sloppy(s.trim()))
        .collect();
    let source_ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| parse_cidr_sloppy(s))
        .collect();
    let mut lb_ips = Vec::new();
    let mut lb_proxy_ips = Vec::new();
    for ingress in svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
    {
        let Some(ip) = ingress
            .ip
            .as_deref()
            .and_then(|ip| parse_ip_sloppy(ip.trim()))
        else {
            continue;
        };
        check(
            "enum",
            validate::one_of(
                "status.loadBalancer.ingress.ipMode",
                ingress.ip_mode.as_deref(),
                &["VIP", "Proxy"],
            ),
        )?;
        if ingress.ip_mode.as_deref() == Some("Proxy") {
            lb_proxy_ips.push(ip);
        } else {
            lb_ips.push(ip);
        }
    }

    check_service_enums(spec)?;

    // Upstream compares the raw type here: a Service without a type is not "ClusterIP".
    let externally_accessible_by_type = matches!(
        service_type,
        ServiceType::LoadBalancer | ServiceType::NodePort
    ) || (service_type == ServiceType::ClusterIp
        && !spec.external_ips.as_deref().unwrap_or_default().is_empty());
    let external_policy_local =
        externally_accessible_by_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port =
        if service_type == ServiceType::LoadBalancer && external_policy_local {
            opt_port_u16(spec.health_check_node_port, "healthCheckNodePort")?
        } else {
            0
        };
    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(10800);
        Some(validate::affinity_timeout(t).map_err(|m| invalid("affinity_timeout", m))?)
    } else {
        None
    };

    Ok(Service {
        key,
        service_type,
        cluster_ips,
        external_ips,
        lb_ips,
        lb_proxy_ips,
        source_ranges,
        external_policy_local,
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
        affinity_timeout,
        traffic_distribution: spec.traffic_distribution.clone(),
        ports,
    })
}

/// The Service enums kproxy reads, against the values the API server accepts: an
/// unknown value is a Service the API server would never have stored, so it is skipped
/// rather than guessed at.
fn check_service_enums(spec: &core::ServiceSpec) -> Result<(), SkipReason> {
    let enums: [(&str, Option<&str>, &[&str]); 4] = [
        (
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
            &["Cluster", "Local"],
        ),
        (
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
            &["Cluster", "Local"],
        ),
        (
            "spec.sessionAffinity",
            spec.session_affinity.as_deref(),
            &["None", "ClientIP"],
        ),
        (
            "spec.trafficDistribution",
            spec.traffic_distribution.as_deref(),
            &["PreferClose", "PreferSameZone", "PreferSameNode"],
        ),
    ];
    for (field, value, allowed) in enums {
        check("enum", validate::one_of(field, value, allowed))?;
    }
    for f in spec.ip_families.as_deref().unwrap_or_default() {
        check(
            "enum",
            validate::one_of("spec.ipFamilies", Some(f), &["IPv4", "IPv6"]),
        )?;
    }
    Ok(())
}

/// Converts an EndpointSlice. FQDN and headless slices are `Ignored`.
pub(crate) fn endpoint_slice(
    slice: &discovery::EndpointSlice,
) -> Result<EndpointSlice, SkipReason> {
    let key = key_of(&slice.metadata);
    check_key(&key, validate::dns1123_subdomain)?;
    let labels = slice.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Err(SkipReason::Ignored("headless service slice"));
    }
    let service = labels
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .cloned()
        .ok_or_else(|| invalid("label", format!("no {SERVICE_NAME_LABEL} label")))?;
    check(
        "label",
        validate::label_value(&service).map_err(|m| format!("label {SERVICE_NAME_LABEL}: {m}")),
    )?;
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Err(SkipReason::Ignored("FQDN slice")),
        other => {
            return Err(invalid(
                "enum",
                format!("unknown addressType {}", shown(other)),
            ))
        }
    };
    let mut ports = Vec::new();
    for p in slice.ports.as_deref().unwrap_or_default() {
        // Upstream skips ports without a name or number instead of refusing the slice.
        let (Some(name), Some(num)) = (p.name.as_ref(), p.port) else {
            continue;
        };
        check(
            "port_name",
            validate::port_name(name).map_err(|m| format!("ports: {m}")),
        )?;
        let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
            invalid(
                "enum",
                format!(
                    "port {name:?}: unknown protocol {}",
                    shown(p.protocol.as_deref().unwrap_or_default())
                ),
            )
        })?;
        // Port 0 would silently make the Service look endpoint-less; the API server
        // refuses it, so the slice is refused loudly instead.
        ports.push(SlicePort {
            name: name.clone(),
            protocol,
            port: port_u16(num, &format!("port {name:?}"))?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = parse_ip_sloppy(addr.trim()).ok_or_else(|| {
            invalid(
                "ip",
                format!("endpoints[{i}]: address {} is not an IP", shown(addr)),
            )
        })?;
        if IpFamily::of(&ip) != family {
            return Err(invalid(
                "ip",
                format!("endpoints[{i}]: address {addr} is not {}", family.label()),
            ));
        }
        let cond = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
    }
    Ok(EndpointSlice {
        key,
        service,
        family,
        ports,
        endpoints,
    })
}

/// Converts a Node.
pub(crate) fn node(node: &core::Node) -> Result<NodeInfo, SkipReason> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("name", "metadata.name is empty"));
    }
    check(
        "name",
        validate::dns1123_subdomain(&name).map_err(|m| format!("metadata.name {m}")),
    )?;
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let mut internal_ips = Vec::new();
    let mut external_ips = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default()
    {
        let Some(ip) = parse_ip_sloppy(a.address.trim()) else {
            continue;
        };
        match a.type_.as_str() {
            "InternalIP" => internal_ips.push(ip),
            "ExternalIP" => external_ips.push(ip),
            _ => {}
        }
    }
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<_> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| c.iter().filter_map(|c| parse_cidr_sloppy(c)).collect())
        .unwrap_or_default();
    if pod_cidrs.is_empty() {
        if let Some(c) = spec
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(parse_cidr_sloppy)
        {
            pod_cidrs.push(c);
        }
    }
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    Ok(NodeInfo {
        name,
        zone,
        internal_ips,
        external_ips,
        pod_cidrs,
        being_deleted: tainted || node.metadata.deletion_timestamp.is_some(),
    })
}

/// Converts a ServiceCIDR into its CIDRs.
pub(crate) fn service_cidr(
    sc: &networking::ServiceCIDR,
) -> Result<(String, Vec<ipnet::IpNet>), SkipReason> {
    let name = sc.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("name", "metadata.name is empty"));
    }
    check(
        "name",
        validate::dns1123_subdomain(&name).map_err(|m| format!("metadata.name {m}")),
    )?;
    let mut cidrs = Vec::new();
    for c in sc
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.as_ref())
        .map(|v| v.as_slice())
        .unwrap_or_default()
    {
        cidrs.push(
            parse_cidr_sloppy(c)
                .ok_or_else(|| invalid("ip", format!("cidr {} is not a CIDR", shown(c))))?,
        );
    }
    Ok((name, cidrs))
}
