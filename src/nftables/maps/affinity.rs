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
use super::render::Desired;
use crate::model::PortPlan;
use crate::nftables::names::{endpoint_base, service_base};
use crate::nftables::transaction::{AddrMatch, Expr, Field, KeyValue, Verdict};

/// The policy chain for `list` (`local` picks upstream's `local-` prefix) with its
/// endpoint chains and affinity sets, and `dest : goto chain` in `class`'s map.
pub(crate) fn place(
    d: &mut Desired,
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
        d.affinity_sets.entry(set.clone()).or_insert(timeout);
        d.chains.entry(ep_chain).or_insert_with(|| {
            vec![
                vec![Expr::UpdateSaddr { set }],
                vec![
                    Expr::L4Proto(svc.name.protocol),
                    Expr::Dnat {
                        addr: ep.ip,
                        port: ep.port,
                    },
                ],
            ]
        });
    }
    if targets.is_empty() {
        return;
    }
    rules.push(vec![Expr::NumgenVmap { targets }]);
    d.chains.entry(chain.clone()).or_insert(rules);
    d.verdicts
        .entry((class.affinity_map(), dest.to_vec()))
        .or_insert(Verdict::Goto(chain));
}
