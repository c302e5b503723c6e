//! The start-up feature probe of the maps layout: before its first sync, each family's
//! dataplane builds the kinds of objects the layout needs in a throw-away table (a
//! unique name, deleted again whatever happens; no base chain, so no packet ever
//! passes through it), one feature per batch, so that a kernel without one is refused
//! with its name instead of failing a sync with a bare errno.

use std::net::IpAddr;

use crate::model::Protocol;
use crate::nftables::interface::NftInterface;
use crate::nftables::transaction::{
    Chain, DataType, Element, Expr, Family, Field, KeyValue, Op, Rule, Set, SetFlag, Transaction,
    Verdict,
};

/// A feature the maps layout needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// nf_tables itself (a table can be created).
    Nftables,
    /// Concatenated keys and data maps (`… : ip daddr . th dport`).
    ConcatDataMaps,
    /// `numgen random mod N` inside a concatenated lookup key, and `dnat ip to … map`.
    NumgenKeyDnatMap,
    /// Concatenated interval sets (pipapo), for source ranges.
    IntervalConcat,
    /// Dynamic sets with timeouts filled from the packet path (`update @set`).
    DynsetTimeout,
    /// `fib … type`, `ct status`.
    FibCtStatus,
}

impl Feature {
    /// All features, in probe order.
    pub const ALL: [Feature; 6] = [
        Feature::Nftables,
        Feature::ConcatDataMaps,
        Feature::NumgenKeyDnatMap,
        Feature::IntervalConcat,
        Feature::DynsetTimeout,
        Feature::FibCtStatus,
    ];

    /// What it is, for the error message.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Nftables => "nf_tables (creating a table)",
            Feature::ConcatDataMaps => {
                "concatenated data maps (NFT_SET_MAP with concatenated data)"
            }
            Feature::NumgenKeyDnatMap => {
                "numgen in a concatenated lookup key with `dnat ip to … map` (nft_numgen, nft_nat)"
            }
            Feature::IntervalConcat => "concatenated interval sets (nft_set_pipapo)",
            Feature::DynsetTimeout => "dynamic sets with timeouts (nft_dynset)",
            Feature::FibCtStatus => "fib and ct status expressions (nft_fib, nft_ct)",
        }
    }
}

/// The kernel lacks a feature the maps layout needs (or could not be asked).
#[derive(Debug, thiserror::Error)]
#[error(
    "the kernel refused {}, which --nftables-layout=maps needs; use the upstream layout \
     (--nftables-layout=upstream) on this node",
    feature.describe()
)]
pub struct ProbeError {
    /// The first feature that failed.
    pub feature: Feature,
    /// The kernel's (or the socket's) error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn set(name: &str, key: Vec<DataType>, value: Option<DataType>, flags: Vec<SetFlag>) -> Set {
    Set {
        name: name.into(),
        is_map: value.is_some(),
        key,
        value,
        flags,
        timeout: None,
        comment: None,
    }
}

fn rule(exprs: Vec<Expr>) -> Op {
    Op::AddRule(Rule {
        chain: "probe".into(),
        exprs,
        comment: None,
    })
}

/// The operations that exercise `feature` (after the table and its chain exist).
fn ops(family: Family, feature: Feature) -> Vec<Op> {
    let a = DataType::addr(family);
    let ip: IpAddr = match family {
        Family::Ip => [10, 0, 0, 1].into(),
        Family::Ip6 => IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]),
    };
    let ipp = vec![a, DataType::InetProto, DataType::InetService];
    let ipp_key = vec![Field::Daddr, Field::L4Proto, Field::Dport];
    let dest = vec![
        KeyValue::Ip(ip),
        KeyValue::Proto(Protocol::Tcp),
        KeyValue::Port(80),
    ];
    match feature {
        Feature::Nftables => vec![
            Op::AddTable { comment: None },
            Op::AddChain(Chain {
                name: "probe".into(),
                base: None,
                comment: None,
            }),
        ],
        Feature::ConcatDataMaps => {
            let mut key = ipp.clone();
            key.push(DataType::Integer);
            let mut elem_key = dest.clone();
            elem_key.push(KeyValue::Index(0));
            vec![
                Op::AddSet(set(
                    "backends",
                    key,
                    Some(DataType::AddrPort(family)),
                    vec![],
                )),
                Op::AddElement(Element {
                    set: "backends".into(),
                    key: elem_key,
                    comment: None,
                    value: None,
                    data: vec![KeyValue::Ip(ip), KeyValue::Port(8080)],
                }),
            ]
        }
        Feature::NumgenKeyDnatMap => vec![
            Op::AddSet(set("gate", ipp.clone(), None, vec![])),
            rule(vec![
                Expr::Lookup {
                    key: ipp_key.clone(),
                    set: "gate".into(),
                    negate: false,
                },
                Expr::DnatMap {
                    key: ipp_key.clone(),
                    numgen_mod: Some(2),
                    map: "backends".into(),
                },
            ]),
        ],
        Feature::IntervalConcat => {
            let mut key = ipp.clone();
            key.push(a);
            let mut lookup = ipp_key;
            lookup.push(Field::Saddr);
            let mut elem_key = dest;
            elem_key.push(KeyValue::Net(ipnet::IpNet::from(ip).trunc()));
            vec![
                Op::AddSet(set("ranges", key, None, vec![SetFlag::Interval])),
                Op::AddElement(Element {
                    set: "ranges".into(),
                    key: elem_key,
                    comment: None,
                    value: None,
                    data: Vec::new(),
                }),
                rule(vec![
                    Expr::Lookup {
                        key: lookup,
                        set: "ranges".into(),
                        negate: true,
                    },
                    Expr::Verdict(Verdict::Drop),
                ]),
            ]
        }
        Feature::DynsetTimeout => {
            let mut s = set(
                "recent",
                vec![a],
                None,
                vec![SetFlag::Dynamic, SetFlag::Timeout],
            );
            s.timeout = Some(10);
            vec![
                Op::AddSet(s),
                rule(vec![Expr::UpdateSaddr {
                    set: "recent".into(),
                }]),
            ]
        }
        Feature::FibCtStatus => vec![rule(vec![
            Expr::CtStatusDnat,
            Expr::FibNotLocal {
                field: Field::Saddr,
            },
            Expr::FibLocal {
                field: Field::Daddr,
            },
            Expr::Verdict(Verdict::Accept),
        ])],
    }
}

/// A table name no one else uses.
fn probe_table() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("kproxy-probe-{}-{nanos:x}", std::process::id())
}

/// Checks every [`Feature`] in a throw-away table of `family`, which is deleted
/// afterwards (also when a feature is missing).
pub fn probe<I: NftInterface>(nft: &mut I, family: Family) -> Result<(), ProbeError> {
    let table = probe_table();
    let mut result = Ok(());
    for feature in Feature::ALL {
        let mut tx = Transaction::new(family, table.clone());
        for op in ops(family, feature) {
            tx.push(op);
        }
        if let Err(e) = nft.apply(&tx) {
            result = Err(ProbeError {
                feature,
                source: Box::new(e),
            });
            break;
        }
    }
    if let Err(e) = nft.delete_table(family, &table) {
        tracing::warn!(table, error = %e, "deleting the feature-probe table failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::fake::FakeNft;

    #[test]
    fn a_complete_kernel_passes_and_the_probe_table_is_gone() {
        let mut nft = FakeNft::new();
        probe(&mut nft, Family::Ip).unwrap();
        probe(&mut nft, Family::Ip6).unwrap();
        let applied = nft.applied();
        // One batch per feature, then the deletion; nothing is left behind.
        assert_eq!(applied.len(), 2 * (Feature::ALL.len() + 1));
        for tx in &applied {
            assert!(!nft.table(tx.family, &tx.table).exists());
            assert!(tx.table.starts_with("kproxy-probe-"));
        }
    }

    /// A kernel without concatenated interval sets: refuses any batch creating one.
    struct NoPipapo(FakeNft);

    impl NftInterface for NoPipapo {
        type Error = crate::nftables::fake::FakeNftError;

        fn apply(&mut self, tx: &Transaction) -> Result<(), Self::Error> {
            let pipapo = tx.ops.iter().any(|op| {
                matches!(op, Op::AddSet(s) if s.key.len() > 1 && s.flags.contains(&SetFlag::Interval))
            });
            if pipapo {
                return Err(crate::nftables::fake::FakeNftError::Injected);
            }
            self.0.apply(tx)
        }

        fn read_table(
            &mut self,
            family: Family,
            table: &str,
        ) -> Result<Option<crate::nftables::existing::Existing>, Self::Error> {
            self.0.read_table(family, table)
        }

        fn read_contents(
            &mut self,
            family: Family,
            table: &str,
            declared: &dyn Fn(&str) -> Option<crate::nftables::transaction::Set>,
        ) -> Result<Option<crate::nftables::existing::TableContents>, Self::Error> {
            self.0.read_contents(family, table, declared)
        }

        fn chain_exists(
            &mut self,
            family: Family,
            table: &str,
            chain: &str,
        ) -> Result<bool, Self::Error> {
            self.0.chain_exists(family, table, chain)
        }

        fn is_not_found(e: &Self::Error) -> bool {
            FakeNft::is_not_found(e)
        }
    }

    #[test]
    fn a_missing_feature_is_named_and_the_table_still_removed() {
        let fake = FakeNft::new();
        let mut nft = NoPipapo(fake.clone());
        let err = probe(&mut nft, Family::Ip).unwrap_err();
        assert_eq!(err.feature, Feature::IntervalConcat);
        assert_eq!(
            err.to_string(),
            "the kernel refused concatenated interval sets (nft_set_pipapo), which \
             --nftables-layout=maps needs; use the upstream layout \
             (--nftables-layout=upstream) on this node"
        );
        assert!(std::error::Error::source(&err).is_some());
        assert!(fake
            .applied()
            .iter()
            .all(|tx| !fake.table(tx.family, &tx.table).exists()));
        // A socket that cannot even be used names the first feature.
        fake.fail_next(1);
        let err = probe(&mut fake.clone(), Family::Ip).unwrap_err();
        assert_eq!(err.feature, Feature::Nftables);
    }
}
