//! Upstream's hashed chain names: `KUBE-SVC-` + 16 characters of base32(sha256(...)).

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// Prefixes of per-service chains; a chain with one of these is ours to delete when stale.
pub(crate) const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
];

/// Whether `chain` is one of kproxy's (and upstream's) per-service chains.
pub(crate) fn is_service_chain(chain: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// First 16 characters of the standard base32 encoding of sha256(input).
pub(crate) fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &digest);
    s.truncate(16);
    s
}

/// The per-service-port chain names, which share one hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortChains {
    /// Cluster-policy chain.
    pub svc: String,
    /// Local-policy chain.
    pub(crate) svl: String,
    /// External-destination chain.
    pub ext: String,
    /// Source-range firewall chain.
    pub fw: String,
}

impl PortChains {
    /// Names for a service port.
    pub(crate) fn new(spn: &ServicePortName) -> Self {
        let h = hash16(&format!("{spn}{}", spn.protocol.lower()));
        PortChains {
            svc: format!("KUBE-SVC-{h}"),
            svl: format!("KUBE-SVL-{h}"),
            ext: format!("KUBE-EXT-{h}"),
            fw: format!("KUBE-FW-{h}"),
        }
    }
}

/// The endpoint chain name of one endpoint of a service port.
pub fn endpoint_chain(spn: &ServicePortName, ep: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!(
            "{spn}{}{}",
            spn.protocol.lower(),
            ep.addr_string()
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    #[test]
    fn upstream_examples() {
        assert_eq!(
            PortChains::new(&spn("ns1", "svc1", "p80")).svc,
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            PortChains::new(&spn("ns5", "svc5", "p80")).fw,
            "KUBE-FW-NUKIZ6OKUXPJNT4C"
        );
        assert_eq!(
            PortChains::new(&spn("ns1", "svc1", "")).svc,
            "KUBE-SVC-AQI2S6QIMU7PVVRP"
        );
        assert_eq!(
            endpoint_chain(&spn("ns1", "svc1", "p80"), &ep("10.180.0.1", 80)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            endpoint_chain(&spn("ns1", "svc1", "p80"), &ep("fd00:10:180::1", 80)),
            "KUBE-SEP-OGYCNMB4EMRUSJ6N"
        );
        assert!(is_service_chain("KUBE-FW-X") && !is_service_chain("KUBE-SERVICES"));
    }
}
