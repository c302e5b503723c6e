//! Attribution for the maps layout's `kproxy` table. Its elements carry no comments
//! (they are keyed by destination), so which Service port an element belongs to is
//! learned from the cluster state the desired side was rendered from: each port's
//! destinations (`ip . proto . port`, NodePorts `proto . port`), ClusterIPs and
//! endpoint addresses. Chains (only session-affinity ports have their own) carry the
//! port in their name, as in upstream's layout.

use std::collections::HashMap;
use std::net::IpAddr;

use super::nftables::service_of_chain;
use super::Attribution;
use crate::model::ProxyState;

/// Service port by element key prefix, learned from cluster states.
#[derive(Debug, Default)]
pub(crate) struct MapsOwners {
    by_key: HashMap<String, String>,
}

/// How `nft list` prints an address inside a concatenated element.
fn addr(ip: IpAddr) -> String {
    ip.to_string()
}

impl MapsOwners {
    /// Learns every port's destinations and endpoints from `states` (one per family).
    /// The first port claiming a key keeps it, as the renderer's first claimant does.
    pub(crate) fn learn(states: &[&ProxyState]) -> MapsOwners {
        let mut by_key: HashMap<String, String> = HashMap::new();
        for state in states {
            for plan in &state.ports {
                let svc = &plan.svc;
                let owner = svc.name.to_string();
                let proto = svc.name.protocol.lower();
                let mut claim = |key: String| {
                    by_key.entry(key).or_insert_with(|| owner.clone());
                };
                for ip in std::iter::once(&svc.cluster_ip)
                    .chain(&svc.external_ips)
                    .chain(&svc.lb_ips)
                {
                    claim(format!("{} . {proto} . {}", addr(*ip), svc.port));
                }
                if svc.node_port != 0 {
                    claim(format!("{proto} . {}", svc.node_port));
                }
                // Bare addresses last: a ClusterIP (`cluster-ips`) or an endpoint
                // (`hairpin` pairs) shared by several ports goes to the first.
                claim(addr(svc.cluster_ip));
                for ep in &plan.endpoints {
                    claim(addr(ep.ip));
                }
            }
        }
        MapsOwners { by_key }
    }
}

impl Attribution for MapsOwners {
    fn chain(&self, _scope: &str, name: &str) -> Option<String> {
        service_of_chain(name)
    }

    fn rule(&self, _scope: &str, _chain: &str, rule: &str) -> Option<String> {
        // Affinity chains' rules name their endpoint chains; the fixed chains' rules
        // belong to no Service.
        rule.split_whitespace().find_map(service_of_chain)
    }

    fn element(&self, _scope: &str, _set: &str, element: &str) -> Option<String> {
        // `key : data` for maps; the key's fields are joined by " . ".
        let key = element.split(" : ").next().unwrap_or(element);
        let fields: Vec<&str> = key.split(" . ").map(str::trim).collect();
        // The longest known prefix: destination . index, destination . source range,
        // NodePort . index, a bare ClusterIP or an endpoint pair's first address.
        (1..=fields.len().min(3))
            .rev()
            .find_map(|n| self.by_key.get(&fields[..n].join(" . ")).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{synthetic, IpFamily, NodeContext};

    #[test]
    fn elements_are_attributed_by_their_destination() {
        let node = NodeContext {
            name: "node-1".into(),
            zone: None,
            prefer_same_node: false,
        };
        let state = synthetic::cluster(3, 2).proxy_state(IpFamily::V4, &node);
        let owners = MapsOwners::learn(&[&state]);
        let p = &state.ports[1];
        let svc = &p.svc;
        let name = svc.name.to_string();
        let proto = svc.name.protocol.lower();
        let dest = format!("{} . {proto} . {}", svc.cluster_ip, svc.port);
        assert_eq!(
            owners.element(
                "ip kproxy",
                "backends-ips-2",
                &format!("{dest} . 1 : 10.1.1.1 . 80")
            ),
            Some(name.clone())
        );
        assert_eq!(
            owners.element("ip kproxy", "cluster-ips", &svc.cluster_ip.to_string()),
            Some(name.clone())
        );
        let ep = p.endpoints[0].ip;
        assert_eq!(
            owners.element("ip kproxy", "hairpin", &format!("{ep} . {ep}")),
            Some(name)
        );
        assert_eq!(
            owners.element("ip kproxy", "cluster-ips", "203.0.113.99"),
            None
        );
    }
}
