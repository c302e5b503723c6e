//! The fixed part of upstream's table (§4.1–4.2): the base chains, the dispatch maps
//! and sets, masquerading, the reject and firewall plumbing, and the local-traffic
//! detectors both parts use. Written on every full sync.

use super::*;

impl NftRenderer {
    /// The fixed part of the table (upstream's setup), written on full syncs.
    pub(super) fn fixed(&self, tx: &mut Transaction, service_cidrs: &[IpNet]) {
        let addr = self.addr_type();
        tx.push(Op::AddTable {
            comment: Some(TABLE_COMMENT.into()),
        });
        let bases: [(&str, ChainType, Hook, i32); 8] = [
            (
                "filter-prerouting-pre-dnat",
                ChainType::Filter,
                Hook::Prerouting,
                -110,
            ),
            (
                "filter-output-pre-dnat",
                ChainType::Filter,
                Hook::Output,
                -110,
            ),
            ("filter-input", ChainType::Filter, Hook::Input, 0),
            ("filter-forward", ChainType::Filter, Hook::Forward, 0),
            ("filter-output", ChainType::Filter, Hook::Output, 0),
            ("nat-prerouting", ChainType::Nat, Hook::Prerouting, -100),
            ("nat-output", ChainType::Nat, Hook::Output, -100),
            ("nat-postrouting", ChainType::Nat, Hook::Postrouting, 100),
        ];
        for (name, kind, hook, priority) in bases {
            tx.push(Op::AddChain(Chain {
                name: name.into(),
                base: Some(BaseChain {
                    kind,
                    hook,
                    priority,
                }),
                comment: None,
            }));
            tx.push(Op::FlushChain(name.into()));
        }
        let mut ensured: HashSet<&str> = HashSet::new();
        let mut ensure = |tx: &mut Transaction, name: &'static str| {
            if ensured.insert(name) {
                tx.push(Op::AddChain(Self::chain(name)));
                tx.push(Op::FlushChain(name.into()));
            }
        };
        let jumps: [(&'static str, &str, bool); 11] = [
            ("nodeport-endpoints-check", "filter-input", true),
            ("service-endpoints-check", "filter-input", true),
            ("service-endpoints-check", "filter-forward", true),
            ("service-endpoints-check", "filter-output", true),
            ("firewall-check", "filter-prerouting-pre-dnat", true),
            ("firewall-check", "filter-output-pre-dnat", true),
            ("services", "nat-output", false),
            ("services", "nat-prerouting", false),
            ("masquerading", "nat-postrouting", false),
            ("cluster-ips-check", "filter-forward", true),
            ("cluster-ips-check", "filter-output", true),
        ];
        for (dst, src, new_only) in jumps {
            ensure(tx, dst);
            let mut exprs = Vec::new();
            if new_only {
                exprs.push(Expr::CtStateNew);
            }
            exprs.push(Expr::Verdict(Verdict::Jump(dst.into())));
            tx.push(Op::AddRule(Self::rule(src, exprs)));
        }
        for name in [
            "services",
            "cluster-ips-check",
            "masquerading",
            MARK_FOR_MASQUERADE,
        ] {
            ensure(tx, name);
        }
        let mark = self.settings.masquerade_mark;
        tx.push(Op::AddRule(Self::rule(
            MARK_FOR_MASQUERADE,
            vec![Expr::MarkOr(mark)],
        )));
        tx.push(Op::AddRule(Self::rule(
            "masquerading",
            vec![Expr::MarkAndIsZero(mark), Expr::Verdict(Verdict::Return)],
        )));
        tx.push(Op::AddRule(Self::rule(
            "masquerading",
            vec![Expr::MarkXor(mark)],
        )));
        tx.push(Op::AddRule(Self::rule(
            "masquerading",
            vec![Expr::Masquerade { fully_random: true }],
        )));
        tx.push(Op::AddSet(Set {
            name: CLUSTER_IPS.into(),
            is_map: false,
            key: vec![addr],
            value: None,
            flags: vec![],
            timeout: None,
            comment: Some("Active ClusterIPs".into()),
        }));
        self.cluster_ips_check_rules(tx, service_cidrs);
        tx.push(Op::AddSet(Set {
            name: NODEPORT_IPS.into(),
            is_map: false,
            key: vec![addr],
            value: None,
            flags: vec![],
            timeout: None,
            comment: Some("IPs that accept NodePort traffic".into()),
        }));
        let nodeport_ips = self.nodeport_ips();
        match &nodeport_ips {
            None => tx.push(Op::DeleteSet {
                name: NODEPORT_IPS.into(),
                is_map: false,
            }),
            Some(ips) => {
                tx.push(Op::FlushSet {
                    name: NODEPORT_IPS.into(),
                    is_map: false,
                });
                for ip in ips {
                    tx.push(Op::AddElement(Element {
                        set: NODEPORT_IPS.into(),
                        key: vec![KeyValue::Ip(*ip)],
                        comment: None,
                        value: None,
                        data: Vec::new(),
                    }));
                }
            }
        }
        let ipp = vec![addr, DataType::InetProto, DataType::InetService];
        let pp = vec![DataType::InetProto, DataType::InetService];
        tx.push(Op::AddSet(self.map(
            NO_ENDPOINT_SERVICES,
            ipp.clone(),
            "vmap to drop or reject packets to services with no endpoints",
        )));
        tx.push(Op::AddSet(self.map(
            NO_ENDPOINT_NODEPORTS,
            pp.clone(),
            "vmap to drop or reject packets to service nodeports with no endpoints",
        )));
        tx.push(Op::AddChain(Chain {
            name: REJECT_CHAIN.into(),
            base: None,
            comment: Some("helper for @no-endpoint-services / @no-endpoint-nodeports".into()),
        }));
        tx.push(Op::FlushChain(REJECT_CHAIN.into()));
        tx.push(Op::AddRule(Self::rule(REJECT_CHAIN, vec![Expr::Reject])));
        let full_key = vec![Field::Daddr, Field::L4Proto, Field::Dport];
        let port_key = vec![Field::L4Proto, Field::Dport];
        tx.push(Op::AddRule(Self::rule(
            "service-endpoints-check",
            vec![Expr::Vmap {
                key: full_key.clone(),
                map: NO_ENDPOINT_SERVICES.into(),
            }],
        )));
        let nodeport_dst = match &nodeport_ips {
            Some(_) => Expr::Addr {
                field: Field::Daddr,
                negate: false,
                value: AddrMatch::Set(NODEPORT_IPS.into()),
            },
            None => Expr::Addr {
                field: Field::Daddr,
                negate: true,
                value: AddrMatch::Net(self.localhost()),
            },
        };
        tx.push(Op::AddRule(Self::rule(
            "nodeport-endpoints-check",
            vec![
                nodeport_dst.clone(),
                Expr::Vmap {
                    key: port_key.clone(),
                    map: NO_ENDPOINT_NODEPORTS.into(),
                },
            ],
        )));
        tx.push(Op::AddSet(self.map(
            FIREWALL_IPS,
            ipp.clone(),
            "destinations that are subject to LoadBalancerSourceRanges",
        )));
        ensure(tx, "firewall-check");
        tx.push(Op::AddRule(Self::rule(
            "firewall-check",
            vec![Expr::Vmap {
                key: full_key.clone(),
                map: FIREWALL_IPS.into(),
            }],
        )));
        tx.push(Op::AddSet(self.map(
            SERVICE_IPS,
            ipp,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        )));
        tx.push(Op::AddSet(self.map(
            SERVICE_NODEPORTS,
            pp,
            "NodePort traffic",
        )));
        tx.push(Op::AddRule(Self::rule(
            "services",
            vec![Expr::Vmap {
                key: full_key,
                map: SERVICE_IPS.into(),
            }],
        )));
        let mut np = Vec::new();
        if nodeport_ips.is_none() {
            np.push(Expr::FibLocal {
                field: Field::Daddr,
            });
        }
        np.push(nodeport_dst);
        np.push(Expr::Vmap {
            key: port_key,
            map: SERVICE_NODEPORTS.into(),
        });
        tx.push(Op::AddRule(Self::rule("services", np)));
    }

    pub(super) fn cluster_ips_check_rules(&self, tx: &mut Transaction, service_cidrs: &[IpNet]) {
        tx.push(Op::AddRule(Self::rule_c(
            "cluster-ips-check",
            vec![
                Expr::Addr {
                    field: Field::Daddr,
                    negate: false,
                    value: AddrMatch::Set(CLUSTER_IPS.into()),
                },
                Expr::Reject,
            ],
            "Reject traffic to invalid ports of ClusterIPs",
        )));
        if !service_cidrs.is_empty() {
            tx.push(Op::AddRule(Self::rule_c(
                "cluster-ips-check",
                vec![
                    Expr::Addr {
                        field: Field::Daddr,
                        negate: false,
                        value: AddrMatch::Anon(service_cidrs.to_vec()),
                    },
                    Expr::Verdict(Verdict::Drop),
                ],
                "Drop traffic to unallocated ClusterIPs",
            )));
        }
    }

    pub(super) fn not_local(&self) -> Option<Expr> {
        match &self.settings.local_detector {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(Expr::Addr {
                field: Field::Saddr,
                negate: true,
                value: AddrMatch::Net(*c),
            }),
            LocalDetector::Bridge(b) => Some(Expr::Iif {
                negate: true,
                name: b.clone(),
                wildcard: false,
            }),
            LocalDetector::InterfacePrefix(p) => Some(Expr::Iif {
                negate: true,
                name: p.clone(),
                wildcard: true,
            }),
        }
    }

    pub(super) fn is_local(&self) -> Option<Expr> {
        self.not_local().map(|e| match e {
            Expr::Addr { field, value, .. } => Expr::Addr {
                field,
                negate: false,
                value,
            },
            Expr::Iif { name, wildcard, .. } => Expr::Iif {
                negate: false,
                name,
                wildcard,
            },
            other => other,
        })
    }
}
