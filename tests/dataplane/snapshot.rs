//! Cluster snapshots for `kproxy apply`: v1 Services, discovery.k8s.io/v1 EndpointSlices
//! and this node's v1 Node, written as the YAML `kubectl get -o yaml` produces (a List).

use std::net::IpAddr;

use serde_json::{json, Value};

/// Namespace of every test Service.
pub(crate) const NAMESPACE: &str = "dataplane";

/// One endpoint of a Service (a pod address plus its conditions).
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Pod IP.
    pub(crate) ip: IpAddr,
    /// The node the pod runs on.
    pub(crate) node: String,
    /// conditions.ready
    pub(crate) ready: bool,
    /// conditions.serving
    pub(crate) serving: bool,
    /// conditions.terminating
    pub(crate) terminating: bool,
}

impl Endpoint {
    /// A ready endpoint.
    pub(crate) fn ready(ip: IpAddr, node: &str) -> Endpoint {
        Endpoint {
            ip,
            node: node.to_string(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// Marks the endpoint terminating (not ready) and sets whether it still serves.
    pub(crate) fn terminating(mut self, serving: bool) -> Endpoint {
        self.ready = false;
        self.serving = serving;
        self.terminating = true;
        self
    }
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// ClusterIP
    ClusterIp,
    /// NodePort
    NodePort,
    /// LoadBalancer
    LoadBalancer,
}

/// A Service with two ports, `tcp` (TCP) and `udp` (UDP), both on `port` and both
/// targeting the echo port, plus its endpoints (one EndpointSlice).
#[derive(Debug, Clone)]
pub(crate) struct Service {
    name: String,
    kind: Kind,
    cluster_ip: IpAddr,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    source_ranges: Vec<String>,
    etp_local: bool,
    itp_local: bool,
    affinity_timeout: Option<u32>,
    health_check_node_port: Option<u16>,
    endpoints: Vec<Endpoint>,
}

impl Service {
    /// A ClusterIP Service.
    pub(crate) fn new(name: &str, cluster_ip: IpAddr, port: u16, target_port: u16) -> Service {
        Service {
            name: name.to_string(),
            kind: Kind::ClusterIp,
            cluster_ip,
            port,
            target_port,
            node_port: None,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            source_ranges: Vec::new(),
            etp_local: false,
            itp_local: false,
            affinity_timeout: None,
            health_check_node_port: None,
            endpoints: Vec::new(),
        }
    }

    /// Type NodePort with this nodePort on both ports.
    pub(crate) fn node_port(mut self, node_port: u16) -> Service {
        if self.kind == Kind::ClusterIp {
            self.kind = Kind::NodePort;
        }
        self.node_port = Some(node_port);
        self
    }

    /// Type LoadBalancer with this nodePort and ingress IP (status.loadBalancer).
    pub(crate) fn load_balancer(mut self, node_port: u16, lb_ip: IpAddr) -> Service {
        self.kind = Kind::LoadBalancer;
        self.node_port = Some(node_port);
        self.lb_ips.push(lb_ip);
        self
    }

    /// Adds an externalIP.
    pub(crate) fn external_ip(mut self, ip: IpAddr) -> Service {
        self.external_ips.push(ip);
        self
    }

    /// Adds a loadBalancerSourceRanges entry.
    pub(crate) fn source_range(mut self, cidr: &str) -> Service {
        self.source_ranges.push(cidr.to_string());
        self
    }

    /// externalTrafficPolicy: Local.
    pub(crate) fn external_local(mut self) -> Service {
        self.etp_local = true;
        self
    }

    /// internalTrafficPolicy: Local.
    pub(crate) fn internal_local(mut self) -> Service {
        self.itp_local = true;
        self
    }

    /// sessionAffinity: ClientIP with this timeout.
    pub(crate) fn client_ip_affinity(mut self, seconds: u32) -> Service {
        self.affinity_timeout = Some(seconds);
        self
    }

    /// spec.healthCheckNodePort (meaningful for LoadBalancer + eTP=Local).
    pub(crate) fn health_check_node_port(mut self, port: u16) -> Service {
        self.health_check_node_port = Some(port);
        self
    }

    /// Sets the endpoints.
    pub(crate) fn endpoints(mut self, eps: Vec<Endpoint>) -> Service {
        self.endpoints = eps;
        self
    }

    fn family(&self) -> &'static str {
        if self.cluster_ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        }
    }

    fn service_object(&self) -> Value {
        let kind = match self.kind {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
        };
        let ports: Vec<Value> = [("tcp", "TCP"), ("udp", "UDP")]
            .iter()
            .map(|(name, proto)| {
                let mut p = json!({
                    "name": name,
                    "protocol": proto,
                    "port": self.port,
                    "targetPort": self.target_port,
                });
                if let Some(np) = self.node_port {
                    p["nodePort"] = json!(np);
                }
                p
            })
            .collect();
        let mut spec = json!({
            "type": kind,
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": [self.cluster_ip.to_string()],
            "ipFamilies": [self.family()],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports,
            "sessionAffinity": "None",
            "internalTrafficPolicy": if self.itp_local { "Local" } else { "Cluster" },
        });
        if self.kind != Kind::ClusterIp {
            spec["externalTrafficPolicy"] = json!(if self.etp_local { "Local" } else { "Cluster" });
        }
        if let Some(t) = self.affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|i| i.to_string()).collect();
            spec["externalIPs"] = json!(ips);
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if let Some(h) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(h);
        }
        let ingress: Vec<Value> = self
            .lb_ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": NAMESPACE},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress}},
        })
    }

    fn slice_object(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {
                        "ready": e.ready,
                        "serving": e.serving,
                        "terminating": e.terminating,
                    },
                    "nodeName": e.node,
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-abcde", self.name),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name},
            },
            "addressType": self.family(),
            "endpoints": endpoints,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": self.target_port},
                {"name": "udp", "protocol": "UDP", "port": self.target_port},
            ],
        })
    }
}

/// This node as the API server would show it.
#[derive(Debug, Clone)]
pub(crate) struct NodeObject {
    /// metadata.name
    pub(crate) name: String,
    /// topology.kubernetes.io/zone
    pub(crate) zone: String,
    /// InternalIP addresses.
    pub(crate) internal_ips: Vec<IpAddr>,
    /// spec.podCIDRs
    pub(crate) pod_cidrs: Vec<String>,
}

/// A whole snapshot: the node plus Services with their slices.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    node: NodeObject,
    services: Vec<Service>,
}

impl Snapshot {
    /// An empty cluster around `node`.
    pub(crate) fn new(node: NodeObject) -> Snapshot {
        Snapshot {
            node,
            services: Vec::new(),
        }
    }

    /// Adds a Service (and its EndpointSlice).
    pub(crate) fn service(mut self, svc: Service) -> Snapshot {
        self.services.push(svc);
        self
    }

    /// The snapshot as `kubectl get ... -o yaml` List YAML.
    pub(crate) fn to_yaml(&self) -> Result<String, String> {
        let mut addresses: Vec<Value> = self
            .node
            .internal_ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        addresses.push(json!({"type": "Hostname", "address": self.node.name}));
        let mut items = vec![json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node.name,
                "labels": {
                    "kubernetes.io/hostname": self.node.name,
                    "topology.kubernetes.io/zone": self.node.zone,
                },
            },
            "spec": {"podCIDR": self.node.pod_cidrs.first(), "podCIDRs": self.node.pod_cidrs},
            "status": {"addresses": addresses},
        })];
        for s in &self.services {
            items.push(s.service_object());
            items.push(s.slice_object());
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        serde_yaml_ng::to_string(&list).map_err(|e| format!("snapshot to YAML: {e}"))
    }
}
