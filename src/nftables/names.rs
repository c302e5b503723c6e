//! Upstream's nftables chain and set names: `service-` / `endpoint-` + 8 base32
//! characters of sha256(base) + `-` + base, where base is `ns/name/proto/port`
//! (endpoints add `__ip/port`, with `:` of IPv6 addresses written as `.`).

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// Longest name knftables allows; prefixes are budgeted at 16 characters.
const MAX_BASE: usize = 240;

fn hashed(base: &str) -> String {
    let digest = Sha256::digest(base.as_bytes());
    let b32 = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &digest);
    let mut out = format!("{}-{base}", &b32[..8]);
    if out.len() > MAX_BASE {
        // Only IPv6 endpoints of long names get here; the hash keeps names unique.
        let mut cut = MAX_BASE - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The name base of a service port: shared by `service-`, `local-`, `external-`,
/// `firewall-`.
pub(crate) fn service_base(spn: &ServicePortName) -> String {
    hashed(&format!(
        "{}/{}/{}/{}",
        spn.namespace,
        spn.name,
        spn.protocol.lower(),
        spn.port
    ))
}

/// The name base of an endpoint: shared by `endpoint-` and `affinity-`.
pub fn endpoint_base(spn: &ServicePortName, ep: &Endpoint) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    hashed(&format!(
        "{}/{}/{}/{}__{ip}/{}",
        spn.namespace,
        spn.name,
        spn.protocol.lower(),
        spn.port,
        ep.port
    ))
}

/// Whether a chain is a per-service one (fixed chains never contain `/`).
pub(crate) fn is_service_chain(name: &str) -> bool {
    name.contains('/')
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
            service_base(&spn("ns1", "svc1", "p80")),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            endpoint_base(&spn("ns1", "svc1", "p80"), &ep("10.180.0.1", 80)),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            service_base(&spn("testing", "service", "http")),
            "P4ZYZVCF-testing/service/tcp/http"
        );
        // Longer than Kubernetes allows, to exercise the 240-character cap.
        let long = "x".repeat(100);
        let long = long.as_str();
        let b = endpoint_base(
            &spn(long, long, "p"),
            &ep("1234:5678:9abc:def0::abcd:1234", 80),
        );
        assert_eq!(b.len(), 240);
        assert!(b.ends_with("..."));
    }
}
