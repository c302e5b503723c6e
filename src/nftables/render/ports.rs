//! One service port's objects (upstream §4.3), by chain kind: endpoint chains, the
//! service (and local-policy) chain, the external chain, the firewall chain, and the
//! port's map elements.

use super::*;

impl NftRenderer {
    /// Upstream §4.3: the chains, affinity sets and elements of one service port.
    pub(super) fn port_objects(&self, port: &PortPlan) -> PortObjects {
        let flags = PortFlags::of(port);
        let names = PortChains::of(port);
        let mut objs = PortObjects {
            affinity_sets: Vec::new(),
            chains: Vec::new(),
            elements: Vec::new(),
        };
        let ep_chains = self.endpoint_chains(port, &mut objs);
        let internal_masq = self.internal_masquerade(port, &flags);
        let svc = &port.svc;
        let sel = &port.selection;
        if flags.uses_cluster_chain {
            let masq = internal_masq.clone().filter(|_| !svc.internal_policy_local);
            let rules =
                Self::policy_chain_rules(&names.service, port, &sel.cluster, &ep_chains, masq);
            objs.chains.push((Self::chain(&names.service), rules));
        }
        if flags.uses_local_chain {
            let masq = internal_masq.filter(|_| svc.internal_policy_local);
            let rules = Self::policy_chain_rules(&names.local, port, &sel.local, &ep_chains, masq);
            objs.chains.push((Self::chain(&names.local), rules));
        }
        if flags.uses_ext {
            let rules = self.external_chain_rules(port, &names, &flags);
            objs.chains.push((Self::chain(&names.external), rules));
        }
        if flags.uses_fw {
            let rules = self.firewall_chain_rules(port, &names.firewall);
            objs.chains.push((Self::chain(&names.firewall), rules));
        }
        objs.elements = Self::port_elements(port, &names, &flags);
        objs
    }

    /// One chain (and, with session affinity, one affinity set) per reachable
    /// endpoint; returns each endpoint's chain name by endpoint index.
    fn endpoint_chains(&self, port: &PortPlan, objs: &mut PortObjects) -> Vec<Option<String>> {
        let svc = &port.svc;
        let mut chains: Vec<Option<String>> = vec![None; port.endpoints.len()];
        for &i in &port.selection.all_reachable {
            let ep = &port.endpoints[i];
            let eb = endpoint_base(&svc.name, ep);
            let chain = format!("endpoint-{eb}");
            let mut rules = vec![Self::rule(
                &chain,
                vec![
                    Expr::Addr {
                        field: Field::Saddr,
                        negate: false,
                        value: AddrMatch::Addr(ep.ip),
                    },
                    Expr::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
                ],
            )];
            if let Some(timeout) = svc.affinity_timeout {
                let set = format!("affinity-{eb}");
                objs.affinity_sets.push(Set {
                    name: set.clone(),
                    is_map: false,
                    key: vec![self.addr_type()],
                    value: None,
                    flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
                    timeout: Some(timeout),
                    comment: None,
                });
                rules.push(Self::rule(&chain, vec![Expr::UpdateSaddr { set }]));
            }
            rules.push(Self::rule(
                &chain,
                vec![
                    Expr::L4Proto(svc.name.protocol),
                    Expr::Dnat {
                        addr: ep.ip,
                        port: ep.port,
                    },
                ],
            ));
            objs.chains.push((Self::chain(&chain), rules));
            chains[i] = Some(eb);
        }
        chains
    }

    /// The masquerade rule of the internal-traffic chain (service or local), when the
    /// Service has internal endpoints: traffic to the ClusterIP from outside the
    /// cluster (or all of it, with masqueradeAll).
    fn internal_masquerade(&self, port: &PortPlan, flags: &PortFlags) -> Option<Vec<Expr>> {
        if !flags.has_internal {
            return None;
        }
        let dst = Expr::Addr {
            field: Field::Daddr,
            negate: false,
            value: AddrMatch::Addr(port.svc.cluster_ip),
        };
        let jump = Expr::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into()));
        if self.settings.masquerade_all {
            Some(vec![dst, jump])
        } else {
            self.not_local().map(|nl| vec![dst, nl, jump])
        }
    }

    /// A service (cluster policy) or local (local policy) chain: optional masquerade,
    /// affinity lookups, then a random pick among the endpoints `which`.
    fn policy_chain_rules(
        chain: &str,
        port: &PortPlan,
        which: &[usize],
        ep_chains: &[Option<String>],
        masq: Option<Vec<Expr>>,
    ) -> Vec<Rule> {
        let endpoint = |i: usize| ep_chains.get(i).cloned().flatten().unwrap_or_default();
        let mut rules = Vec::new();
        if let Some(m) = masq {
            rules.push(Self::rule(chain, m));
        }
        if port.svc.affinity_timeout.is_some() {
            for &i in which {
                let eb = endpoint(i);
                rules.push(Self::rule(
                    chain,
                    vec![
                        Expr::Addr {
                            field: Field::Saddr,
                            negate: false,
                            value: AddrMatch::Set(format!("affinity-{eb}")),
                        },
                        Expr::Verdict(Verdict::Goto(format!("endpoint-{eb}"))),
                    ],
                ));
            }
        }
        rules.push(Self::rule(
            chain,
            vec![Expr::NumgenVmap {
                targets: which
                    .iter()
                    .map(|&i| Verdict::Goto(format!("endpoint-{}", endpoint(i))))
                    .collect(),
            }],
        ));
        rules
    }

    /// The external chain (NodePort, external and load-balancer IPs): masquerade, then
    /// the service chain, or with externalTrafficPolicy Local the local chain, with
    /// pod and node traffic short-circuited to the service chain.
    fn external_chain_rules(
        &self,
        port: &PortPlan,
        names: &PortChains,
        flags: &PortFlags,
    ) -> Vec<Rule> {
        let ext = &names.external;
        let mut rules = Vec::new();
        let mark = Expr::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into()));
        let to_service = || Expr::Verdict(Verdict::Goto(names.service.clone()));
        if !port.svc.external_policy_local {
            rules.push(Self::rule(ext, vec![mark]));
            if flags.has_external {
                rules.push(Self::rule(ext, vec![to_service()]));
            }
            return rules;
        }
        if let Some(local) = self.is_local() {
            rules.push(Self::rule_c(
                ext,
                vec![local, to_service()],
                "short-circuit pod traffic",
            ));
        }
        let fib = Expr::FibLocal {
            field: Field::Saddr,
        };
        rules.push(Self::rule_c(
            ext,
            vec![fib.clone(), mark],
            "masquerade local traffic",
        ));
        rules.push(Self::rule_c(
            ext,
            vec![fib, to_service()],
            "short-circuit local traffic",
        ));
        if flags.has_external {
            rules.push(Self::rule(
                ext,
                vec![Expr::Verdict(Verdict::Goto(names.local.clone()))],
            ));
        }
        rules
    }

    /// The firewall chain (loadBalancerSourceRanges): drop sources outside the ranges.
    fn firewall_chain_rules(&self, port: &PortPlan, chain: &str) -> Vec<Rule> {
        let svc = &port.svc;
        let mut allowed: Vec<IpNet> = svc.source_ranges.clone();
        // A node that is itself allowed may reach the VIP after being SNATed to it.
        if self
            .settings
            .node_ip
            .is_some_and(|ip| svc.source_ranges.iter().any(|r| r.contains(&ip)))
        {
            allowed.extend(svc.lb_ips.iter().map(|ip| IpNet::from(*ip)));
        }
        vec![Self::rule(
            chain,
            vec![
                Expr::Addr {
                    field: Field::Saddr,
                    negate: true,
                    value: AddrMatch::Anon(allowed),
                },
                Expr::Verdict(Verdict::Drop),
            ],
        )]
    }

    /// The port's elements of the dispatch, firewall and no-endpoint maps and of the
    /// ClusterIP set.
    fn port_elements(port: &PortPlan, names: &PortChains, flags: &PortFlags) -> Vec<Element> {
        let svc = &port.svc;
        let spn = svc.name.to_string();
        let proto = svc.name.protocol;
        let no_ep_verdict = if flags.has_endpoints {
            Verdict::Drop
        } else {
            Verdict::Goto(REJECT_CHAIN.into())
        };
        let ipp = |ip: IpAddr| {
            vec![
                KeyValue::Ip(ip),
                KeyValue::Proto(proto),
                KeyValue::Port(svc.port),
            ]
        };
        let el = |set: &str, key: Vec<KeyValue>, comment: Option<&str>, value: Option<Verdict>| {
            Element {
                set: set.to_string(),
                key,
                // Cut here, not only when printed, so that the netlink batch, the
                // dry-run text and what `nft list` shows all agree.
                comment: comment.map(|c| crate::nftables::text::comment(c).into_owned()),
                value,
                data: Vec::new(),
            }
        };
        let to_ext = || Some(Verdict::Goto(names.external.clone()));
        let no_endpoints =
            |key: Vec<KeyValue>, set: &str| el(set, key, Some(&spn), Some(no_ep_verdict.clone()));
        let mut out = vec![el(
            CLUSTER_IPS,
            vec![KeyValue::Ip(svc.cluster_ip)],
            None,
            None,
        )];
        if flags.has_internal {
            out.push(el(
                SERVICE_IPS,
                ipp(svc.cluster_ip),
                None,
                Some(Verdict::Goto(names.internal(port).to_string())),
            ));
        } else {
            out.push(no_endpoints(ipp(svc.cluster_ip), NO_ENDPOINT_SERVICES));
        }
        for ip in &svc.external_ips {
            if flags.has_endpoints {
                out.push(el(SERVICE_IPS, ipp(*ip), None, to_ext()));
            }
            if !flags.has_external {
                out.push(no_endpoints(ipp(*ip), NO_ENDPOINT_SERVICES));
            }
        }
        for ip in &svc.lb_ips {
            if flags.has_endpoints {
                out.push(el(SERVICE_IPS, ipp(*ip), None, to_ext()));
            }
            if flags.uses_fw {
                out.push(el(
                    FIREWALL_IPS,
                    ipp(*ip),
                    None,
                    Some(Verdict::Goto(names.firewall.clone())),
                ));
            }
            if !flags.has_external {
                out.push(no_endpoints(ipp(*ip), NO_ENDPOINT_SERVICES));
            }
        }
        if svc.node_port != 0 {
            let key = vec![KeyValue::Proto(proto), KeyValue::Port(svc.node_port)];
            if flags.has_endpoints {
                out.push(el(SERVICE_NODEPORTS, key.clone(), None, to_ext()));
            }
            if !flags.has_external {
                out.push(no_endpoints(key, NO_ENDPOINT_NODEPORTS));
            }
        }
        out
    }
}
