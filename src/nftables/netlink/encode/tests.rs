//! The encoder's bytes, decoded by a small independent netlink reader and printed
//! in libnftnl's debug notation, so each expectation reads as `nft --debug=netlink`
//! prints the same rule (expectations taken from nft 1.0 where it encodes alike).

use super::elem::key_bytes;
use super::set::{interval_elements, key_type};
use super::*;
use crate::model::Protocol;
use crate::nftables::transaction::{
    AddrMatch, BaseChain, ChainType, DataType, Expr, Family, Field, Hook, KeyValue, Rule,
};
use crate::sys::socket::frames;
use ipnet::IpNet;

/// The attributes of a netlink attribute stream: (type without flags, payload).
pub(super) fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        assert!(len >= 4 && len <= b.len(), "malformed attribute");
        out.push((ty, &b[4..len]));
        b = &b[len.div_ceil(4).min(b.len().div_ceil(4)) * 4..];
    }
    out
}

pub(super) fn attr(list: &[(u16, &[u8])], ty: u16) -> Option<Vec<u8>> {
    list.iter().find(|(t, _)| *t == ty).map(|(_, v)| v.to_vec())
}

pub(super) fn be32(list: &[(u16, &[u8])], ty: u16) -> Option<u32> {
    attr(list, ty).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

pub(super) fn string(list: &[(u16, &[u8])], ty: u16) -> String {
    let v = attr(list, ty).unwrap_or_default();
    let name = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default());
    // Anonymous set names carry a per-socket suffix.
    if name.starts_with("__") {
        "__anon".into()
    } else {
        name.into_owned()
    }
}

/// Data as nft prints it: host-order 32-bit words.
pub(super) fn words(v: &[u8]) -> String {
    v.chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            format!("0x{:08x}", u32::from_ne_bytes(w))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// NFTA_DATA_VALUE inside a data nest.
pub(super) fn value(list: &[(u16, &[u8])], ty: u16) -> String {
    let nest = attr(list, ty).unwrap_or_default();
    words(&attr(&attrs(&nest), 1).unwrap_or_default())
}

pub(super) fn verdict(data: &[u8]) -> String {
    let v = attrs(data);
    let inner = attrs(v.iter().find(|(t, _)| *t == 2).map(|(_, b)| *b).unwrap());
    let code = be32(&inner, 1).unwrap() as i32;
    let chain = string(&inner, 2);
    match code {
        0 => "drop".into(),
        1 => "accept".into(),
        -3 => format!("jump -> {chain}"),
        -4 => format!("goto -> {chain}"),
        -5 => "return".into(),
        c => format!("verdict {c}"),
    }
}

pub(super) fn expr(name: &str, a: &[(u16, &[u8])]) -> String {
    let reg = |ty| be32(a, ty).unwrap_or(0);
    match name {
        "payload" => {
            let base = ["link", "network", "transport"][reg(2) as usize];
            format!(
                "payload load {}b @ {base} header + {} => reg {}",
                reg(4),
                reg(3),
                reg(1)
            )
        }
        "cmp" => {
            let op = ["eq", "neq"][reg(2) as usize];
            format!("cmp {op} reg {} {}", reg(1), value(a, 3))
        }
        "lookup" => {
            let mut s = format!("lookup reg {} set {}", reg(2), string(a, 1));
            if attr(a, 3).is_some() {
                s += &format!(" dreg {}", reg(3));
            }
            if reg(5) != 0 {
                s += &format!(" 0x{:x}", reg(5));
            }
            s
        }
        "reject" => {
            let code = attr(a, 2).map_or(0, |v| v[0]);
            format!("reject type {} code {code}", reg(1))
        }
        "ct" => format!(
            "ct load {} => reg {}",
            ["state", "direction", "status"][reg(2) as usize],
            reg(1)
        ),
        "bitwise" => format!(
            "bitwise reg {} = ( reg {} & {} ) ^ {}",
            reg(2),
            reg(1),
            value(a, 4),
            value(a, 5)
        ),
        "fib" => {
            let what = if reg(3) & 1 != 0 { "saddr" } else { "daddr" };
            format!("fib {what} type => reg {}", reg(1))
        }
        "meta" => {
            let key = match reg(2) {
                3 => "mark",
                6 => "iifname",
                16 => "l4proto",
                k => panic!("meta key {k}"),
            };
            if attr(a, 3).is_some() {
                format!("meta set {key} with reg {}", reg(3))
            } else {
                format!("meta load {key} => reg {}", reg(1))
            }
        }
        "immediate" => {
            let data = attr(a, 2).unwrap();
            if reg(1) == 0 {
                format!("immediate reg 0 {}", verdict(&data))
            } else {
                format!("immediate reg {} {}", reg(1), value(a, 2))
            }
        }
        "nat" => {
            // As libnftnl prints it: only the registers that are set.
            let fam = if reg(2) == 10 { "ip6" } else { "ip" };
            let mut s = format!("nat dnat {fam}");
            for (ty, name) in [
                (3, "addr_min"),
                (4, "addr_max"),
                (5, "proto_min"),
                (6, "proto_max"),
            ] {
                if attr(a, ty).is_some() {
                    s += &format!(" {name} reg {}", reg(ty));
                }
            }
            if attr(a, 7).is_some() {
                s += &format!(" flags 0x{:x}", reg(7));
            }
            s
        }
        "numgen" => format!("numgen reg {} = random mod {}", reg(1), reg(2)),
        "dynset" => format!(
            "dynset update reg_key {} set {} timeout {}ms",
            reg(4),
            string(a, 1),
            attr(a, 6).map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap()))
        ),
        "masq" => format!("masq flags 0x{:x}", reg(1)),
        other => panic!("unexpected expression {other}"),
    }
}

/// The expressions of the one rule in `tx`, as nft's debug output prints them.
pub(super) fn rule_exprs(exprs: Vec<Expr>) -> Vec<String> {
    rule_exprs_in(Family::Ip, exprs)
}

/// As [`rule_exprs`], in a table of family `fam`.
pub(super) fn rule_exprs_in(fam: Family, exprs: Vec<Expr>) -> Vec<String> {
    let mut tx = Transaction::new(fam, "t");
    tx.push(Op::AddRule(Rule {
        chain: "c".into(),
        exprs,
        comment: None,
    }));
    let batch = encode(&tx, 1, &mut AnonNames::new(42)).unwrap();
    let rule = frames(&batch.bytes)
        .find(|f| f.ty == (10 << 8) | NFT_MSG_NEWRULE)
        .expect("a NEWRULE message");
    let top = attrs(&rule.payload[4..]);
    assert_eq!(string(&top, 1), "t");
    assert_eq!(string(&top, 2), "c");
    let list = attr(&top, 4).expect("expressions");
    attrs(&list)
        .iter()
        .map(|(_, elem)| {
            let e = attrs(elem);
            let data = attr(&e, 2).unwrap_or_default();
            expr(&string(&e, 1), &attrs(&data))
        })
        .collect()
}

pub(super) fn addr(field: Field, negate: bool, value: AddrMatch) -> Expr {
    Expr::Addr {
        field,
        negate,
        value,
    }
}

pub(super) fn jump(c: &str) -> Expr {
    Expr::Verdict(Verdict::Jump(c.into()))
}

#[test]
fn address_matches() {
    assert_eq!(
        rule_exprs(vec![
            addr(
                Field::Daddr,
                false,
                AddrMatch::Addr("10.0.0.1".parse().unwrap())
            ),
            addr(
                Field::Saddr,
                true,
                AddrMatch::Net("10.1.0.0/16".parse().unwrap())
            ),
            jump("c"),
        ]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "cmp eq reg 1 0x0100000a",
            "payload load 2b @ network header + 12 => reg 1",
            "cmp neq reg 1 0x0000010a",
            "immediate reg 0 jump -> c",
        ]
    );
    // A prefix that is not whole bytes is masked first.
    assert_eq!(
        rule_exprs(vec![addr(
            Field::Saddr,
            false,
            AddrMatch::Net("10.0.0.0/12".parse().unwrap())
        )]),
        [
            "payload load 4b @ network header + 12 => reg 1",
            "bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000",
            "cmp eq reg 1 0x0000000a",
        ]
    );
    assert_eq!(
        rule_exprs(vec![
            addr(Field::Daddr, false, AddrMatch::Set("s".into())),
            Expr::Reject,
        ]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "lookup reg 1 set s",
            "reject type 0 code 3",
        ]
    );
    let anon = AddrMatch::Anon(vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.168.0.0/16".parse().unwrap(),
    ]);
    assert_eq!(
        rule_exprs(vec![
            addr(Field::Saddr, true, anon),
            Expr::Verdict(Verdict::Drop)
        ]),
        [
            "payload load 4b @ network header + 12 => reg 1",
            "lookup reg 1 set __anon 0x1",
            "immediate reg 0 drop",
        ]
    );
}

#[test]
fn state_fib_protocol_and_interface_matches() {
    assert_eq!(
        rule_exprs(vec![Expr::CtStateNew, jump("c")]),
        [
            "ct load state => reg 1",
            "bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000",
            "cmp neq reg 1 0x00000000",
            "immediate reg 0 jump -> c",
        ]
    );
    assert_eq!(
        rule_exprs(vec![
            Expr::FibLocal {
                field: Field::Daddr
            },
            Expr::Verdict(Verdict::Goto("c".into())),
        ]),
        [
            "fib daddr type => reg 1",
            "cmp eq reg 1 0x00000002",
            "immediate reg 0 goto -> c",
        ]
    );
    assert_eq!(
        rule_exprs(vec![
            Expr::Iif {
                negate: true,
                name: "eth0".into(),
                wildcard: false,
            },
            Expr::Verdict(Verdict::Drop),
        ]),
        [
            "meta load iifname => reg 1",
            "cmp neq reg 1 0x30687465 0x00000000 0x00000000 0x00000000",
            "immediate reg 0 drop",
        ]
    );
    assert_eq!(
        rule_exprs(vec![
            Expr::Iif {
                negate: false,
                name: "veth".into(),
                wildcard: true,
            },
            Expr::Verdict(Verdict::Return),
        ]),
        [
            "meta load iifname => reg 1",
            "cmp eq reg 1 0x68746576",
            "immediate reg 0 return",
        ]
    );
}

#[test]
fn dnat_and_masquerade() {
    assert_eq!(
        rule_exprs(vec![
            Expr::L4Proto(Protocol::Tcp),
            Expr::Dnat {
                addr: "10.0.0.2".parse().unwrap(),
                port: 80,
            },
        ]),
        [
            "meta load l4proto => reg 1",
            "cmp eq reg 1 0x00000006",
            "immediate reg 1 0x0200000a",
            "immediate reg 2 0x00005000",
            // nft 1.0 sends addr_min and proto_min only (flags 0x2); both forms mean
            // one address and one port.
            "nat dnat ip addr_min reg 1 addr_max reg 1 proto_min reg 2 proto_max reg 2 flags 0x3",
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::Masquerade { fully_random: true }]),
        ["masq flags 0x10"]
    );
}

#[test]
fn maps_numgen_and_dynamic_sets() {
    assert_eq!(
        rule_exprs(vec![Expr::Vmap {
            key: vec![Field::Daddr, Field::L4Proto, Field::Dport],
            map: "m".into(),
        }]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "meta load l4proto => reg 9",
            "payload load 2b @ transport header + 2 => reg 10",
            "lookup reg 1 set m dreg 0",
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::NumgenVmap {
            targets: vec![Verdict::Goto("c".into()), Verdict::Goto("c".into())],
        }]),
        [
            "numgen reg 1 = random mod 2",
            "lookup reg 1 set __anon dreg 0"
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::UpdateSaddr { set: "aff".into() }]),
        [
            "payload load 4b @ network header + 12 => reg 1",
            "dynset update reg_key 1 set aff timeout 0ms",
        ]
    );
}

#[test]
fn marks() {
    assert_eq!(
        rule_exprs(vec![Expr::MarkOr(0x4000)]),
        [
            "meta load mark => reg 1",
            "bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000",
            "meta set mark with reg 1",
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::MarkXor(0x4000)]),
        [
            "meta load mark => reg 1",
            "bitwise reg 1 = ( reg 1 & 0xffffffff ) ^ 0x00004000",
            "meta set mark with reg 1",
        ]
    );
    assert_eq!(
        rule_exprs(vec![
            Expr::MarkAndIsZero(0x4000),
            Expr::Verdict(Verdict::Return)
        ]),
        [
            "meta load mark => reg 1",
            "bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000",
            "cmp eq reg 1 0x00000000",
            "immediate reg 0 return",
        ]
    );
}

#[test]
fn batch_is_framed_sequenced_and_maps_errors_to_operations() {
    let mut tx = Transaction::new(Family::Ip, "kube-proxy");
    tx.push(Op::AddTable {
        comment: Some("rules for kube-proxy".into()),
    });
    tx.push(Op::AddChain(Chain {
        name: "nat-output".into(),
        base: Some(BaseChain {
            kind: ChainType::Nat,
            hook: Hook::Output,
            priority: -100,
        }),
        comment: None,
    }));
    tx.push(Op::FlushChain("services".into()));
    let batch = encode(&tx, 100, &mut AnonNames::new(1)).unwrap();
    let msgs: Vec<_> = frames(&batch.bytes).collect();
    let types: Vec<u16> = msgs.iter().map(|f| f.ty).collect();
    // begin, NEWTABLE, NEWCHAIN, DELRULE (the flush), end.
    assert_eq!(types, [0x10, 0x0a00, 0x0a03, 0x0a08, 0x11]);
    assert_eq!(
        msgs.iter().map(|f| f.seq).collect::<Vec<_>>(),
        [100, 101, 102, 103, 104]
    );
    assert_eq!(batch.next_seq, 105);
    assert_eq!(batch.op_of(102), Some(1));
    assert_eq!(
        batch.op_of(100),
        None,
        "the batch header carries no operation"
    );
    let chain = attrs(&msgs[2].payload[4..]);
    let hook_nest = attr(&chain, 4).unwrap();
    let hook = attrs(&hook_nest);
    assert_eq!(be32(&hook, 1), Some(3), "output hook");
    assert_eq!(be32(&hook, 2), Some(-100i32 as u32), "priority");
    assert_eq!(string(&chain, 7), "nat");
    assert_eq!(batch.bytes.len() % 4, 0);
}

#[test]
fn anonymous_names_are_per_owner_and_avoid_taken_suffixes() {
    let mut a = AnonNames::new(7);
    let first = a.name('s');
    assert!(first.starts_with("__0s"));
    assert!(a.name('m').starts_with("__1m"));
    let taken = [first.clone()];
    let mut b = AnonNames::new(7);
    b.avoid(taken.iter().map(String::as_str));
    assert_ne!(
        b.name('s'),
        first,
        "a suffix found in the kernel is not reused"
    );
}

#[test]
fn interval_encoding_like_nft() {
    let list: Vec<IpNet> = vec![
        "203.0.113.0/25".parse().unwrap(),
        "1.2.3.4/32".parse().unwrap(),
    ];
    let e = interval_elements(&list, 4);
    assert_eq!(
        e,
        vec![
            (vec![0, 0, 0, 0], NFT_SET_ELEM_INTERVAL_END),
            (vec![1, 2, 3, 4], 0),
            (vec![1, 2, 3, 5], NFT_SET_ELEM_INTERVAL_END),
            (vec![203, 0, 113, 0], 0),
            (vec![203, 0, 113, 128], NFT_SET_ELEM_INTERVAL_END),
        ]
    );
}

#[test]
fn concat_key_types() {
    assert_eq!(
        key_type(&[
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService
        ]),
        ((((7 << 6) | 12) << 6) | 13, 12)
    );
    assert_eq!(key_type(&[DataType::Ipv6Addr]), (8, 16));
    assert_eq!(
        key_bytes(
            &[KeyValue::Proto(Protocol::Tcp), KeyValue::Port(3001)],
            false
        ),
        vec![6, 0, 0, 0, 0x0b, 0xb9, 0, 0]
    );
}
