//! Session affinity (`sessionAffinity: ClientIP`) in the maps layout: upstream's own
//! per-endpoint structure, kept for the affinity Service ports only.
//!
//! Why not a dynamic data map (`client . dest -> endpoint`): recording the endpoint a
//! load-balancing rule picked needs either the pick as update data (nft refuses a map
//! lookup as `update` data or inside a concatenation) or, after DNAT, the original
//! destination port (`ct original proto-dst` has no fixed type and nft 1.0.6 refuses it
//! in a concatenation). And upstream's affinity is per service port across all its
//! destinations (ClusterIP, NodePort, external IPs share one record) and only honours
//! endpoints that are still current — neither can be expressed by a key built from the
//! packet alone. So an affinity port gets upstream's chains inside the `kproxy` table:
//!
//! - `service-<base>` / `local-<base>`: `ip saddr @affinity-<ep> goto endpoint-<ep>`
//!   for each current endpoint (in upstream's order), then `numgen random mod N vmap`;
//! - `endpoint-<ep>`: `update @affinity-<ep> { ip saddr }`, `dnat to ep:port`;
//! - per endpoint a dynamic set `affinity-<ep>` with the Service's timeout.
//!
//! The destinations reach these chains through the verdict maps `affinity-<class>`
//! (element `dest : goto service-<base>`), looked up by one fixed rule per traffic
//! class just before its load-balancing rules; masquerade, firewall, ETP Local and
//! hairpin stay in the layout's sets. Changing an affinity port therefore writes rules
//! (the kernel validates the table, which holds the fixed chains plus the affinity
//! ports' chains); every other Service stays element-only.

use super::layout::LbClass;
use super::render::Sink;
use crate::model::PortPlan;
use crate::nftables::names::{endpoint_base, service_base};
use crate::nftables::transaction::{AddrMatch, Expr, Field, KeyValue, Verdict};

/// The policy chain for `list` (`local` picks upstream's `local-` prefix) with its
/// endpoint chains and affinity sets, and `dest : goto chain` in `class`'s map.
pub(crate) fn place(
    d: &mut impl Sink,
    class: LbClass,
    dest: &[KeyValue],
    port: &PortPlan,
    list: &[usize],
    local: bool,
    timeout: u32,
) {
    if list.is_empty() {
        return;
    }
    let svc = &port.svc;
    let prefix = if local { "local" } else { "service" };
    let chain = format!("{prefix}-{}", service_base(&svc.name));
    let mut rules = Vec::new();
    let mut targets = Vec::new();
    for &i in list {
        let Some(ep) = port.endpoints.get(i) else {
            continue;
        };
        let eb = endpoint_base(&svc.name, ep);
        let set = format!("affinity-{eb}");
        let ep_chain = format!("endpoint-{eb}");
        rules.push(vec![
            Expr::Addr {
                field: Field::Saddr,
                negate: false,
                value: AddrMatch::Set(set.clone()),
            },
            Expr::Verdict(Verdict::Goto(ep_chain.clone())),
        ]);
        targets.push(Verdict::Goto(ep_chain.clone()));
        d.affinity_set(set.clone(), timeout);
        d.chain(
            ep_chain,
            vec![
                vec![Expr::UpdateSaddr { set }],
                vec![
                    Expr::L4Proto(svc.name.protocol),
                    Expr::Dnat {
                        addr: ep.ip,
                        port: ep.port,
                    },
                ],
            ],
        );
    }
    if targets.is_empty() {
        return;
    }
    rules.push(vec![Expr::NumgenVmap { targets }]);
    d.chain(chain.clone(), rules);
    d.verdict(&class.affinity_map(), dest.to_vec(), Verdict::Goto(chain));
}

#[cfg(test)]
mod tests {
    use super::super::render::MapsRenderer;
    use crate::config::Config;
    use crate::model::{ClusterState, IpFamily, NodeContext, ProxyState};
    use crate::nftables::transaction::{KeyValue, Op, Verdict};

    fn state(affinity: bool, endpoints: &[&str]) -> ProxyState {
        let eps: String = endpoints
            .iter()
            .map(|ip| format!("  - addresses: [{ip}]\n"))
            .collect();
        let aff = if affinity {
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: k}}\nspec:\n  clusterIP: 10.96.0.10\n{aff}  ports: [{{name: http, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: k, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
        );
        let st: ClusterState = crate::snapshot::load_str(&yaml, "t").unwrap().state;
        st.proxy_state(IpFamily::V4, &NodeContext::default())
    }

    fn renderer() -> MapsRenderer {
        MapsRenderer::new(Config::default().family_settings(IpFamily::V4, "n", None, &[]))
    }

    #[test]
    fn affinity_ports_get_their_own_chains_not_load_balancing_elements() {
        let r = renderer();
        let d = r.desired(&state(true, &["10.244.1.1", "10.244.1.2"]));
        assert!(d.counts.is_empty(), "no gate set: {:?}", d.counts);
        assert!(!d.elements.keys().any(|(s, _)| s.starts_with("backends-")));
        let dest = vec![
            KeyValue::Ip("10.96.0.10".parse().unwrap()),
            KeyValue::Proto(crate::model::Protocol::Tcp),
            KeyValue::Port(80),
        ];
        let Some(Verdict::Goto(chain)) = d.verdicts.get(&("affinity-ips".to_string(), dest)) else {
            panic!("no affinity-ips element: {:?}", d.verdicts);
        };
        assert!(chain.starts_with("service-") && chain.ends_with("-k/web/tcp/http"));
        assert_eq!(d.chains.len(), 3, "service chain + 2 endpoint chains");
        assert_eq!(d.affinity_sets.len(), 2);
        assert!(d.affinity_sets.values().all(|t| *t == 600));

        let plain = r.desired(&state(false, &["10.244.1.1", "10.244.1.2"]));
        assert!(plain.chains.is_empty() && plain.verdicts.is_empty());
        assert_eq!(plain.counts.len(), 1);
    }

    #[test]
    fn removing_an_endpoint_removes_its_chain_and_set_after_the_flush() {
        let r = renderer();
        let old = r.desired(&state(true, &["10.244.1.1", "10.244.1.2"]));
        let new = r.desired(&state(true, &["10.244.1.1"]));
        let tx = r.render_diff(&old, &new);
        let pos = |f: &dyn Fn(&Op) -> bool| tx.ops.iter().position(f);
        let flush_svc = pos(&|o| matches!(o, Op::FlushChain(c) if c.starts_with("service-")));
        let del_ep = pos(
            &|o| matches!(o, Op::DeleteChain(c) if c.starts_with("endpoint-") && c.contains("10.244.1.2")),
        );
        let del_set = pos(
            &|o| matches!(o, Op::DeleteSet { name, .. } if name.starts_with("affinity-") && name.contains("10.244.1.2")),
        );
        let (Some(f), Some(c), Some(s)) = (flush_svc, del_ep, del_set) else {
            panic!("missing operations: {:#?}", tx.ops);
        };
        assert!(f < c && f < s, "flush before deletions: {:#?}", tx.ops);
        // The kept endpoint's set (and its clients) stays.
        assert!(!tx
            .ops
            .iter()
            .any(|o| matches!(o, Op::DeleteSet { name, .. } if name.contains("10.244.1.1"))));
    }
}
