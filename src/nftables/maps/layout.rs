//! The fixed part of the `maps` layout: its table, base chains, the handful of regular
//! chains and every rule. Rules depend only on the settings and on which endpoint
//! counts N are in use (one load-balancing rule per N and traffic class), never on a
//! Service, so per-Service and per-endpoint changes are element operations.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{FamilySettings, LocalDetector, NodePortAddresses};
use crate::model::IpFamily;
use crate::nftables::transaction::{
    AddrMatch, BaseChain, Chain, ChainType, DataType, Expr, Family, Field, Hook, Op, Rule, Set,
    SetFlag, Transaction, Verdict,
};

/// The table the maps layout owns in each family (never upstream's `kube-proxy`, so
/// the two layouts cannot mix).
pub const TABLE: &str = "kproxy";
pub(crate) const TABLE_COMMENT: &str = "rules for kproxy (maps layout)";

/// Active ClusterIPs (invalid ports are rejected).
pub(crate) const CLUSTER_IPS: &str = "cluster-ips";
/// IPs that accept NodePort traffic (absent with `nodePortAddresses` all).
pub(crate) const NODEPORT_IPS: &str = "nodeport-ips";
/// Destinations (`addr . proto . port`) without usable endpoints: REJECT.
pub(crate) const NO_EP_REJECT: &str = "no-endpoint-reject";
/// Destinations with endpoints, none for this traffic (ETP/ITP Local): DROP.
pub(crate) const NO_EP_DROP: &str = "no-endpoint-drop";
/// NodePorts (`proto . port`) without usable endpoints: REJECT.
pub(crate) const NO_EP_NP_REJECT: &str = "no-endpoint-nodeports-reject";
/// NodePorts with endpoints, none local (ETP Local): DROP.
pub(crate) const NO_EP_NP_DROP: &str = "no-endpoint-nodeports-drop";
/// Load-balancer destinations with source ranges.
pub(crate) const FIREWALL_IPS: &str = "firewall-ips";
/// `dest . allowed source prefix` for those destinations (an interval set).
pub(crate) const FIREWALL_ALLOW: &str = "firewall-allow";
/// Destinations whose traffic is always masqueraded (external with ETP Cluster,
/// ClusterIPs with masqueradeAll).
pub(crate) const MASQ_IPS: &str = "masq-ips";
/// NodePorts whose traffic is always masqueraded (ETP Cluster).
pub(crate) const MASQ_NODEPORTS: &str = "masq-nodeports";
/// ClusterIP destinations masqueraded for sources outside the cluster.
pub(crate) const MASQ_NONLOCAL_IPS: &str = "masq-nonlocal-ips";
/// External destinations with ETP Local (node-local sources masqueraded, outside
/// sources to local endpoints only).
pub(crate) const ETP_LOCAL_IPS: &str = "etp-local-ips";
/// NodePorts with ETP Local.
pub(crate) const ETP_LOCAL_NODEPORTS: &str = "etp-local-nodeports";
/// ETP Local destinations without local endpoints: outside traffic is not DNATed
/// (the filter DROP answers it).
pub(crate) const EXT_LOCAL_NONE_IPS: &str = "ext-local-none-ips";
/// NodePorts likewise.
pub(crate) const EXT_LOCAL_NONE_NODEPORTS: &str = "ext-local-none-nodeports";
/// `endpoint . endpoint` address pairs: a DNATed connection from an endpoint to
/// itself is masqueraded (hairpin).
pub(crate) const HAIRPIN: &str = "hairpin";

/// One traffic class's load balancing: which destinations it matches and where its
/// endpoints are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum LbClass {
    /// ClusterIP, external and LB IPs (cluster or local list as the policy says).
    Ips,
    /// NodePorts.
    NodePorts,
    /// External and LB IPs with ETP Local, from outside the node and cluster.
    ExtLocalIps,
    /// NodePorts with ETP Local, from outside.
    ExtLocalNodePorts,
}

impl LbClass {
    /// All classes, in rule order within their section.
    pub(crate) const ALL: [LbClass; 4] = [
        LbClass::ExtLocalIps,
        LbClass::Ips,
        LbClass::ExtLocalNodePorts,
        LbClass::NodePorts,
    ];

    fn stem(self) -> &'static str {
        match self {
            LbClass::Ips => "ips",
            LbClass::NodePorts => "nodeports",
            LbClass::ExtLocalIps => "ext-local-ips",
            LbClass::ExtLocalNodePorts => "ext-local-nodeports",
        }
    }

    /// Whether the destination key is `proto . port` (else `addr . proto . port`).
    pub(crate) fn is_nodeport(self) -> bool {
        matches!(self, LbClass::NodePorts | LbClass::ExtLocalNodePorts)
    }

    /// The gate set of destinations with exactly `n` endpoints.
    pub(crate) fn gate(self, n: u32) -> String {
        format!("lb-{}-{n}", self.stem())
    }

    /// The data map `dest . index -> endpoint addr . port` of destinations with `n`
    /// endpoints.
    pub(crate) fn backends(self, n: u32) -> String {
        format!("backends-{}-{n}", self.stem())
    }

    /// The chain holding the one DNAT rule for destinations with `n` endpoints. Each N
    /// has its own chain and map so that a new N adds objects that reference only new
    /// objects: nft 1.0.6 cannot add a rule that names a `typeof … th dport` data map
    /// already in the kernel (it fails reading the map's description back), so rules
    /// naming a data map are only ever written together with that map.
    pub(crate) fn balance_chain(self, n: u32) -> String {
        format!("balance-{}-{n}", self.stem())
    }

    /// The verdict map `dest : goto service-…` of session-affinity ports
    /// (see [`super::affinity`]).
    pub(crate) fn affinity_map(self) -> String {
        format!("affinity-{}", self.stem())
    }
}

/// The endpoint counts in use, per class: one rule each.
pub(crate) type Counts = BTreeSet<(LbClass, u32)>;

fn ipp_key() -> Vec<Field> {
    vec![Field::Daddr, Field::L4Proto, Field::Dport]
}

fn pp_key() -> Vec<Field> {
    vec![Field::L4Proto, Field::Dport]
}

fn rule(chain: &str, exprs: Vec<Expr>) -> Op {
    Op::AddRule(Rule {
        chain: chain.into(),
        exprs,
        comment: None,
    })
}

fn lookup(key: Vec<Field>, set: &str) -> Expr {
    Expr::Lookup {
        key,
        set: set.into(),
        negate: false,
    }
}

fn set(name: &str, key: Vec<DataType>, flags: Vec<SetFlag>, comment: &str) -> Set {
    Set {
        name: name.into(),
        is_map: false,
        key,
        value: None,
        flags,
        timeout: None,
        comment: Some(comment.into()),
    }
}

/// The fixed part, from the settings.
pub(crate) struct Layout<'a> {
    settings: &'a FamilySettings,
}

impl<'a> Layout<'a> {
    pub(crate) fn new(settings: &'a FamilySettings) -> Self {
        Layout { settings }
    }

    pub(crate) fn family(&self) -> Family {
        Family::of(self.settings.family)
    }

    fn addr(&self) -> DataType {
        DataType::addr(self.family())
    }

    /// NodePort addresses, or `None` for all local addresses.
    pub(crate) fn nodeport_ips(&self) -> Option<Vec<IpAddr>> {
        match &self.settings.nodeport_addresses {
            NodePortAddresses::All => None,
            NodePortAddresses::Ips(ips) => Some(
                ips.iter()
                    .filter(|ip| self.settings.family.contains(ip) && !ip.is_loopback())
                    .copied()
                    .collect(),
            ),
        }
    }

    fn localhost(&self) -> Option<IpNet> {
        match self.settings.family {
            IpFamily::V4 => ipnet::Ipv4Net::new([127, 0, 0, 0].into(), 8)
                .ok()
                .map(IpNet::from),
            IpFamily::V6 => Some(IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))),
        }
    }

    /// "Not from a pod on this node's cluster network" (upstream's local detector,
    /// negated), or nothing without a detector.
    pub(crate) fn not_local(&self) -> Option<Expr> {
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

    /// The destination matches of NodePort rules.
    fn nodeport_dst(&self) -> Vec<Expr> {
        match self.nodeport_ips() {
            Some(_) => vec![Expr::Addr {
                field: Field::Daddr,
                negate: false,
                value: AddrMatch::Set(NODEPORT_IPS.into()),
            }],
            None => {
                let mut v = Vec::new();
                if let Some(lo) = self.localhost() {
                    v.push(Expr::Addr {
                        field: Field::Daddr,
                        negate: true,
                        value: AddrMatch::Net(lo),
                    });
                }
                v
            }
        }
    }

    /// Every set and map of the layout, for the endpoint counts in `counts`.
    pub(crate) fn sets(&self, counts: &Counts) -> Vec<Set> {
        let a = self.addr();
        let ipp = vec![a, DataType::InetProto, DataType::InetService];
        let pp = vec![DataType::InetProto, DataType::InetService];
        let mut out = vec![
            set(CLUSTER_IPS, vec![a], vec![], "Active ClusterIPs"),
            set(
                NO_EP_REJECT,
                ipp.clone(),
                vec![],
                "services without endpoints",
            ),
            set(
                NO_EP_DROP,
                ipp.clone(),
                vec![],
                "services without endpoints for this traffic",
            ),
            set(
                NO_EP_NP_REJECT,
                pp.clone(),
                vec![],
                "nodeports without endpoints",
            ),
            set(
                NO_EP_NP_DROP,
                pp.clone(),
                vec![],
                "nodeports without local endpoints",
            ),
            set(
                FIREWALL_IPS,
                ipp.clone(),
                vec![],
                "destinations subject to LoadBalancerSourceRanges",
            ),
            set(
                FIREWALL_ALLOW,
                vec![a, DataType::InetProto, DataType::InetService, a],
                vec![SetFlag::Interval],
                "allowed sources per firewalled destination",
            ),
            set(MASQ_IPS, ipp.clone(), vec![], "always masqueraded"),
            set(MASQ_NODEPORTS, pp.clone(), vec![], "always masqueraded"),
            set(
                MASQ_NONLOCAL_IPS,
                ipp.clone(),
                vec![],
                "masqueraded from outside the cluster",
            ),
            set(
                ETP_LOCAL_IPS,
                ipp.clone(),
                vec![],
                "externalTrafficPolicy Local",
            ),
            set(
                ETP_LOCAL_NODEPORTS,
                pp.clone(),
                vec![],
                "externalTrafficPolicy Local",
            ),
            set(
                EXT_LOCAL_NONE_IPS,
                ipp.clone(),
                vec![],
                "externalTrafficPolicy Local without local endpoints",
            ),
            set(
                EXT_LOCAL_NONE_NODEPORTS,
                pp.clone(),
                vec![],
                "externalTrafficPolicy Local without local endpoints",
            ),
            set(
                HAIRPIN,
                vec![a, a],
                vec![],
                "endpoint . endpoint: hairpin masquerade",
            ),
        ];
        if self.nodeport_ips().is_some() {
            out.push(set(
                NODEPORT_IPS,
                vec![a],
                vec![],
                "IPs that accept NodePort traffic",
            ));
        }
        for class in LbClass::ALL {
            let key = if class.is_nodeport() {
                pp.clone()
            } else {
                ipp.clone()
            };
            out.push(Set {
                name: class.affinity_map(),
                is_map: true,
                key,
                value: Some(DataType::Verdict),
                flags: vec![],
                timeout: None,
                comment: Some("session-affinity destinations".into()),
            });
        }
        for (class, n) in counts {
            let key = if class.is_nodeport() {
                pp.clone()
            } else {
                ipp.clone()
            };
            out.push(set(
                &class.gate(*n),
                key.clone(),
                vec![],
                "destinations with N endpoints",
            ));
            out.push(self.backends_map(*class, *n, key));
        }
        out
    }

    /// The data map of `class` and `n`, keyed `dest` + index.
    fn backends_map(&self, class: LbClass, n: u32, mut key: Vec<DataType>) -> Set {
        key.push(DataType::Integer);
        Set {
            name: class.backends(n),
            is_map: true,
            key,
            value: Some(DataType::AddrPort(self.family())),
            flags: vec![],
            timeout: None,
            comment: Some("destination . index -> endpoint".into()),
        }
    }

    /// The data maps in use (re-created by a full sync, see [`LbClass::balance_chain`]).
    pub(crate) fn backends_maps(&self, counts: &Counts) -> Vec<Set> {
        let ipp = vec![self.addr(), DataType::InetProto, DataType::InetService];
        let pp = vec![DataType::InetProto, DataType::InetService];
        counts
            .iter()
            .map(|(class, n)| {
                let key = if class.is_nodeport() {
                    pp.clone()
                } else {
                    ipp.clone()
                };
                self.backends_map(*class, *n, key)
            })
            .collect()
    }

    /// The balance chains in use.
    pub(crate) fn balance_chains(&self, counts: &Counts) -> Vec<Chain> {
        counts
            .iter()
            .map(|(class, n)| Chain {
                name: class.balance_chain(*n),
                base: None,
                comment: None,
            })
            .collect()
    }

    /// The one rule of a balance chain: DNAT to index `numgen random mod N`.
    pub(crate) fn balance_rule(&self, class: LbClass, n: u32) -> Op {
        let key = if class.is_nodeport() {
            pp_key()
        } else {
            ipp_key()
        };
        rule(
            &class.balance_chain(n),
            vec![Expr::DnatMap {
                key,
                numgen_mod: Some(n),
                map: class.backends(n),
            }],
        )
    }

    /// Base chains and regular chains, in creation order.
    pub(crate) fn chains(&self) -> Vec<Chain> {
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
        let mut out: Vec<Chain> = bases
            .iter()
            .map(|(name, kind, hook, priority)| Chain {
                name: (*name).into(),
                base: Some(BaseChain {
                    kind: *kind,
                    hook: *hook,
                    priority: *priority,
                }),
                comment: None,
            })
            .collect();
        for name in [
            "firewall-check",
            "service-endpoints-check",
            "nodeport-endpoints-check",
            "cluster-ips-check",
            "services",
            "masquerading",
        ] {
            out.push(Chain {
                name: name.into(),
                base: None,
                comment: None,
            });
        }
        out
    }

    /// Every rule of the fixed chains (not the balance chains), for the endpoint
    /// counts in use and the ServiceCIDRs.
    pub(crate) fn rules(&self, counts: &Counts, service_cidrs: &[IpNet]) -> Vec<Op> {
        let mark = Expr::MarkOr(self.settings.masquerade_mark);
        let mut out = Vec::new();
        let jumps: [(&str, &str, bool); 11] = [
            ("filter-prerouting-pre-dnat", "firewall-check", true),
            ("filter-output-pre-dnat", "firewall-check", true),
            ("filter-input", "nodeport-endpoints-check", true),
            ("filter-input", "service-endpoints-check", true),
            ("filter-forward", "service-endpoints-check", true),
            ("filter-forward", "cluster-ips-check", true),
            ("filter-output", "service-endpoints-check", true),
            ("filter-output", "cluster-ips-check", true),
            ("nat-prerouting", "services", false),
            ("nat-output", "services", false),
            ("nat-postrouting", "masquerading", false),
        ];
        for (src, dst, new_only) in jumps {
            let mut exprs = Vec::new();
            if new_only {
                exprs.push(Expr::CtStateNew);
            }
            exprs.push(Expr::Verdict(Verdict::Jump(dst.into())));
            out.push(rule(src, exprs));
        }
        // Source ranges: a firewalled destination drops sources outside its prefixes.
        let mut fw_key = ipp_key();
        fw_key.push(Field::Saddr);
        out.push(rule(
            "firewall-check",
            vec![
                lookup(ipp_key(), FIREWALL_IPS),
                Expr::Lookup {
                    key: fw_key,
                    set: FIREWALL_ALLOW.into(),
                    negate: true,
                },
                Expr::Verdict(Verdict::Drop),
            ],
        ));
        out.push(rule(
            "service-endpoints-check",
            vec![lookup(ipp_key(), NO_EP_DROP), Expr::Verdict(Verdict::Drop)],
        ));
        out.push(rule(
            "service-endpoints-check",
            vec![lookup(ipp_key(), NO_EP_REJECT), Expr::Reject],
        ));
        let np = self.nodeport_dst();
        let np_rule = |chain: &str, tail: Vec<Expr>| {
            let mut e = np.clone();
            e.extend(tail);
            rule(chain, e)
        };
        out.push(np_rule(
            "nodeport-endpoints-check",
            vec![
                lookup(pp_key(), NO_EP_NP_DROP),
                Expr::Verdict(Verdict::Drop),
            ],
        ));
        out.push(np_rule(
            "nodeport-endpoints-check",
            vec![lookup(pp_key(), NO_EP_NP_REJECT), Expr::Reject],
        ));
        out.push(rule(
            "cluster-ips-check",
            vec![
                Expr::Addr {
                    field: Field::Daddr,
                    negate: false,
                    value: AddrMatch::Set(CLUSTER_IPS.into()),
                },
                Expr::Reject,
            ],
        ));
        if !service_cidrs.is_empty() {
            out.push(rule(
                "cluster-ips-check",
                vec![
                    Expr::Addr {
                        field: Field::Daddr,
                        negate: false,
                        value: AddrMatch::Anon(service_cidrs.to_vec()),
                    },
                    Expr::Verdict(Verdict::Drop),
                ],
            ));
        }
        // NAT: the Service-IP section, then the NodePort section (upstream's order:
        // a destination that is both is a Service IP first).
        for nodeport in [false, true] {
            let (key, prefix) = if nodeport {
                let mut p = Vec::new();
                if self.nodeport_ips().is_none() {
                    p.push(Expr::FibLocal {
                        field: Field::Daddr,
                    });
                }
                p.extend(np.iter().cloned());
                (pp_key(), p)
            } else {
                (ipp_key(), Vec::new())
            };
            let (masq, etp_local, ext_none) = if nodeport {
                (
                    MASQ_NODEPORTS,
                    ETP_LOCAL_NODEPORTS,
                    EXT_LOCAL_NONE_NODEPORTS,
                )
            } else {
                (MASQ_IPS, ETP_LOCAL_IPS, EXT_LOCAL_NONE_IPS)
            };
            let r = |tail: Vec<Expr>| {
                let mut e = prefix.clone();
                e.extend(tail);
                rule("services", e)
            };
            let not_local = self.not_local();
            let outside = || {
                let mut v: Vec<Expr> = not_local.iter().cloned().collect();
                v.push(Expr::FibNotLocal {
                    field: Field::Saddr,
                });
                v
            };
            out.push(r(vec![lookup(key.clone(), masq), mark.clone()]));
            if !nodeport && !self.settings.masquerade_all {
                if let Some(nl) = &not_local {
                    out.push(r(vec![
                        lookup(key.clone(), MASQ_NONLOCAL_IPS),
                        nl.clone(),
                        mark.clone(),
                    ]));
                }
            }
            // ETP Local: node-local sources (not pods) are masqueraded and use the
            // cluster list, outside sources the local list (or no DNAT at all).
            let mut e = vec![lookup(key.clone(), etp_local)];
            e.extend(not_local.iter().cloned());
            e.push(Expr::FibLocal {
                field: Field::Saddr,
            });
            e.push(mark.clone());
            out.push(r(e));
            let mut e = vec![lookup(key.clone(), ext_none)];
            e.extend(outside());
            e.push(Expr::Verdict(Verdict::Accept));
            out.push(r(e));
            let classes = if nodeport {
                [LbClass::ExtLocalNodePorts, LbClass::NodePorts]
            } else {
                [LbClass::ExtLocalIps, LbClass::Ips]
            };
            for class in classes {
                let ext_local = matches!(class, LbClass::ExtLocalIps | LbClass::ExtLocalNodePorts);
                // Session-affinity ports first: their own chains (never in a gate set).
                let mut e = Vec::new();
                if ext_local {
                    e.extend(outside());
                }
                e.push(Expr::Vmap {
                    key: key.clone(),
                    map: class.affinity_map(),
                });
                out.push(r(e));
                for (_, n) in counts.iter().filter(|(c, _)| *c == class) {
                    let mut e = vec![lookup(key.clone(), &class.gate(*n))];
                    if ext_local {
                        e.extend(outside());
                    }
                    e.push(Expr::Verdict(Verdict::Jump(class.balance_chain(*n))));
                    out.push(r(e));
                }
            }
        }
        // Postrouting: hairpin connections get the mark, marked ones are masqueraded.
        let m = self.settings.masquerade_mark;
        out.push(rule(
            "masquerading",
            vec![
                Expr::CtStatusDnat,
                lookup(vec![Field::Saddr, Field::Daddr], HAIRPIN),
                mark,
            ],
        ));
        out.push(rule(
            "masquerading",
            vec![Expr::MarkAndIsZero(m), Expr::Verdict(Verdict::Return)],
        ));
        out.push(rule("masquerading", vec![Expr::MarkXor(m)]));
        out.push(rule(
            "masquerading",
            vec![Expr::Masquerade { fully_random: true }],
        ));
        out
    }

    /// The whole fixed part as operations: table, sets, chains (flushed), rules.
    pub(crate) fn write(&self, tx: &mut Transaction, counts: &Counts, service_cidrs: &[IpNet]) {
        tx.push(Op::AddTable {
            comment: Some(TABLE_COMMENT.into()),
        });
        for s in self.sets(counts) {
            tx.push(Op::AddSet(s));
        }
        for c in self.chains().into_iter().chain(self.balance_chains(counts)) {
            let name = c.name.clone();
            tx.push(Op::AddChain(c));
            tx.push(Op::FlushChain(name));
        }
        // Nothing names the data maps now: re-create them, so that the rules below
        // name maps written in this transaction (their elements are re-added anyway).
        for m in self.backends_maps(counts) {
            tx.push(Op::DeleteSet {
                name: m.name.clone(),
                is_map: true,
            });
            tx.push(Op::AddSet(m));
        }
        for r in self.rules(counts, service_cidrs) {
            tx.push(r);
        }
        for (class, n) in counts {
            tx.push(self.balance_rule(*class, *n));
        }
        if self.nodeport_ips().is_none() {
            // After a switch from listed addresses to all the set must go; the rules
            // that used it were flushed above. (`add` first: it may not exist.)
            tx.push(Op::AddSet(set(
                NODEPORT_IPS,
                vec![self.addr()],
                vec![],
                "IPs that accept NodePort traffic",
            )));
            tx.push(Op::DeleteSet {
                name: NODEPORT_IPS.into(),
                is_map: false,
            });
        }
    }
}
