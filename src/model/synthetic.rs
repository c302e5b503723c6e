//! Synthetic clusters for benchmarks and scale tests: N Services × M endpoints, one TCP
//! port each, a quarter of them NodePorts, spread over 50 namespaces.

use super::{
    ClusterState, EndpointSlice, IpFamily, ObjectKey, PortSpec, Protocol, Service, ServiceType,
    SliceEndpoint, SlicePort,
};

/// The endpoint address of endpoint `j` of service `i`.
pub(crate) fn endpoint_ip(i: usize, j: usize, per: usize) -> std::net::IpAddr {
    let n = i * per + j;
    std::net::IpAddr::from([
        10,
        (128 + (n >> 16) % 64) as u8,
        ((n >> 8) & 255) as u8,
        (n & 255) as u8,
    ])
}

/// Builds the cluster.
pub fn cluster(services: usize, endpoints_per_service: usize) -> ClusterState {
    let mut st = ClusterState::new();
    for i in 0..services {
        let ns = format!("ns{}", i % 50);
        let name = format!("svc{i}");
        let nodeport = i % 4 == 0;
        st.insert_service(Service {
            key: ObjectKey::new(&ns, &name),
            service_type: if nodeport {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIp
            },
            cluster_ips: vec![std::net::IpAddr::from([
                172,
                30,
                (i >> 8) as u8,
                (i & 255) as u8,
            ])],
            external_ips: vec![],
            lb_ips: vec![],
            lb_proxy_ips: vec![],
            source_ranges: vec![],
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: 0,
            affinity_timeout: None,
            traffic_distribution: None,
            ports: vec![PortSpec {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: if nodeport {
                    30000 + (i / 4 % 2000) as u16
                } else {
                    0
                },
            }],
        });
        st.insert_slice(EndpointSlice {
            key: ObjectKey::new(&ns, format!("{name}-abcde")),
            service: name.clone(),
            family: IpFamily::V4,
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: (0..endpoints_per_service)
                .map(|j| SliceEndpoint {
                    ip: endpoint_ip(i, j, endpoints_per_service),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some(format!("node-{}", (i + j) % 100)),
                    zone: None,
                    zone_hints: vec![],
                    node_hints: vec![],
                })
                .collect(),
        });
    }
    st
}
