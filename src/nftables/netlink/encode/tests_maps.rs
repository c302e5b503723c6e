//! The maps layout's objects, byte for byte: its rules' expressions (printed in
//! libnftnl's debug notation, the expectations being what `nft --debug=netlink` 1.0.6
//! prints for the same rule text), its set and map definitions (compared attribute by
//! attribute with what `nft --debug=mnl` sends, user data included), and its elements.

use super::tests::{attr, attrs, be32, rule_exprs, rule_exprs_in, string};
use super::*;
use crate::model::Protocol;
use crate::nftables::transaction::{
    DataType, Element, Expr, Family, Field, KeyValue, Set, SetFlag,
};
use crate::sys::socket::frames;

fn ipp() -> Vec<Field> {
    vec![Field::Daddr, Field::L4Proto, Field::Dport]
}

#[test]
fn concatenated_lookups() {
    assert_eq!(
        rule_exprs(vec![
            Expr::Lookup {
                key: ipp(),
                set: "no-endpoint-reject".into(),
                negate: false,
            },
            Expr::Reject,
        ]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "meta load l4proto => reg 9",
            "payload load 2b @ transport header + 2 => reg 10",
            "lookup reg 1 set no-endpoint-reject",
            "reject type 0 code 3",
        ]
    );
    // `ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow`. nft also
    // emits `byteorder reg 9 = hton(reg 9, 2, 1)` for the one-byte protocol, which
    // swaps nothing (a length of 1 is below the swap size); it is left out.
    let mut key = ipp();
    key.push(Field::Saddr);
    assert_eq!(
        rule_exprs(vec![Expr::Lookup {
            key,
            set: "firewall-allow".into(),
            negate: true,
        }]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "meta load l4proto => reg 9",
            "payload load 2b @ transport header + 2 => reg 10",
            "payload load 4b @ network header + 12 => reg 11",
            "lookup reg 1 set firewall-allow 0x1",
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::Lookup {
            key: vec![Field::Saddr, Field::Daddr],
            set: "hairpin".into(),
            negate: false,
        }]),
        [
            "payload load 4b @ network header + 12 => reg 1",
            "payload load 4b @ network header + 16 => reg 9",
            "lookup reg 1 set hairpin",
        ]
    );
}

#[test]
fn dnat_through_a_data_map_with_numgen_in_the_key() {
    assert_eq!(
        rule_exprs(vec![Expr::DnatMap {
            key: ipp(),
            numgen_mod: Some(1),
            map: "backends-ips".into(),
        }]),
        [
            "payload load 4b @ network header + 16 => reg 1",
            "meta load l4proto => reg 9",
            "payload load 2b @ transport header + 2 => reg 10",
            "numgen reg 11 = random mod 1",
            "lookup reg 1 set backends-ips dreg 1",
            "nat dnat ip addr_min reg 1 proto_min reg 9",
        ]
    );
    assert_eq!(
        rule_exprs(vec![Expr::DnatMap {
            key: vec![Field::L4Proto, Field::Dport],
            numgen_mod: Some(7),
            map: "backends-nodeports".into(),
        }]),
        [
            "meta load l4proto => reg 1",
            "payload load 2b @ transport header + 2 => reg 9",
            "numgen reg 10 = random mod 7",
            "lookup reg 1 set backends-nodeports dreg 1",
            "nat dnat ip addr_min reg 1 proto_min reg 9",
        ]
    );
    // IPv6: the address takes four registers, the port follows it.
    assert_eq!(
        rule_exprs_in(
            Family::Ip6,
            vec![Expr::DnatMap {
                key: ipp(),
                numgen_mod: Some(3),
                map: "backends-ips".into(),
            }]
        ),
        [
            "payload load 16b @ network header + 24 => reg 1",
            "meta load l4proto => reg 12",
            "payload load 2b @ transport header + 2 => reg 13",
            "numgen reg 14 = random mod 3",
            "lookup reg 1 set backends-ips dreg 1",
            "nat dnat ip6 addr_min reg 1 proto_min reg 12",
        ]
    );
}

#[test]
fn fib_not_local_and_ct_status_dnat() {
    assert_eq!(
        rule_exprs(vec![
            Expr::FibNotLocal {
                field: Field::Saddr
            },
            Expr::CtStatusDnat,
        ]),
        [
            "fib saddr type => reg 1",
            "cmp neq reg 1 0x00000002",
            "ct load status => reg 1",
            "bitwise reg 1 = ( reg 1 & 0x00000020 ) ^ 0x00000000",
            "cmp neq reg 1 0x00000000",
        ]
    );
}

/// The attributes of the first message of type `ty` in the batch of `ops`.
fn message(fam: Family, ops: Vec<Op>, ty: u16) -> Vec<(u16, Vec<u8>)> {
    let mut tx = Transaction::new(fam, "kproxy");
    for op in ops {
        tx.push(op);
    }
    let batch = encode(&tx, 1, &mut AnonNames::new(3)).unwrap();
    let f = frames(&batch.bytes)
        .find(|f| f.ty == (10 << 8) | ty)
        .expect("the message");
    attrs(&f.payload[4..])
        .into_iter()
        .map(|(t, v)| (t, v.to_vec()))
        .collect()
}

fn borrowed(list: &[(u16, Vec<u8>)]) -> Vec<(u16, &[u8])> {
    list.iter().map(|(t, v)| (*t, v.as_slice())).collect()
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

/// Hex pairs to bytes.
fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn a_typeof_data_map_is_declared_as_nft_declares_it() {
    let a = DataType::Ipv4Addr;
    let mut s = set(
        "backends-ips",
        vec![
            a,
            DataType::InetProto,
            DataType::InetService,
            DataType::Integer,
        ],
        Some(DataType::AddrPort(Family::Ip)),
        vec![],
    );
    s.comment = Some("destination . index -> endpoint".into());
    let m = message(Family::Ip, vec![Op::AddSet(s)], NFT_MSG_NEWSET);
    let m = borrowed(&m);
    assert_eq!(string(&m, 2), "backends-ips");
    assert_eq!(be32(&m, 3), Some(NFT_SET_MAP), "flags");
    assert_eq!(be32(&m, 4), Some(0x001c_c344), "key type");
    assert_eq!(be32(&m, 5), Some(16), "key length");
    assert_eq!(be32(&m, 6), Some(0x1cd), "data type");
    assert_eq!(be32(&m, 7), Some(8), "data length");
    assert_eq!(attr(&m, 9), None, "no description");
    // What nft 1.0.6 sends for `typeof ip daddr . meta l4proto . th dport . numgen
    // random mod 1 : ip daddr . th dport ; comment "destination . index -> endpoint"`.
    let nft = hex(
        "00 04 00 00 00 00 01 04 00 00 00 00 03 60 00 04 0d 00 00 00 01 58 00 14 00 04 07 00
         00 00 01 0c 00 04 0c 00 00 00 01 04 0c 00 00 00 01 0e 00 04 09 00 00 00 01 06 00 04
         10 00 00 00 02 14 00 04 07 00 00 00 01 0c 00 04 0b 00 00 00 01 04 02 00 00 00 03 1a
         00 04 17 00 00 00 01 12 00 04 01 00 00 00 01 04 01 00 00 00 02 04 00 00 00 00 04 34
         00 04 0d 00 00 00 01 2c 00 14 00 04 07 00 00 00 01 0c 00 04 0c 00 00 00 01 04 0c 00
         00 00 01 14 00 04 07 00 00 00 01 0c 00 04 0b 00 00 00 01 04 02 00 00 00 06 04 00 00
         00 00 07 20 64 65 73 74 69 6e 61 74 69 6f 6e 20 2e 20 69 6e 64 65 78 20 2d 3e 20 65
         6e 64 70 6f 69 6e 74 00",
    );
    if cfg!(target_endian = "little") {
        assert_eq!(attr(&m, 13), Some(nft), "user data");
    }
}

#[test]
fn ipv6_typeof_and_typed_data_maps_carry_nfts_user_data() {
    let a = DataType::Ipv6Addr;
    let mut s = set(
        "backends-ips",
        vec![
            a,
            DataType::InetProto,
            DataType::InetService,
            DataType::Integer,
        ],
        Some(DataType::AddrPort(Family::Ip6)),
        vec![],
    );
    s.comment = Some("c".into());
    let m = message(Family::Ip6, vec![Op::AddSet(s)], NFT_MSG_NEWSET);
    let m = borrowed(&m);
    assert_eq!(be32(&m, 5), Some(28), "key length");
    assert_eq!(be32(&m, 6), Some(0x20d), "data type");
    assert_eq!(be32(&m, 7), Some(20), "data length");
    let nft = hex(
        "00 04 00 00 00 00 01 04 00 00 00 00 03 60 00 04 0d 00 00 00 01 58 00 14 00 04 07 00
         00 00 01 0c 00 04 0d 00 00 00 01 04 09 00 00 00 01 0e 00 04 09 00 00 00 01 06 00 04
         10 00 00 00 02 14 00 04 07 00 00 00 01 0c 00 04 0b 00 00 00 01 04 02 00 00 00 03 1a
         00 04 17 00 00 00 01 12 00 04 01 00 00 00 01 04 01 00 00 00 02 04 00 00 00 00 04 34
         00 04 0d 00 00 00 01 2c 00 14 00 04 07 00 00 00 01 0c 00 04 0d 00 00 00 01 04 09 00
         00 00 01 14 00 04 07 00 00 00 01 0c 00 04 0b 00 00 00 01 04 02 00 00 00 06 04 00 00
         00 00 07 02 63 00",
    );
    if cfg!(target_endian = "little") {
        assert_eq!(attr(&m, 13), Some(nft), "user data");
    }
    // `type ipv6_addr . ipv6_addr . inet_proto . inet_service : ipv6_addr .
    // inet_service ; flags dynamic,timeout ; timeout 3h ;` (a session-affinity map).
    let mut aff = set(
        "aff",
        vec![a, a, DataType::InetProto, DataType::InetService],
        Some(DataType::AddrPort(Family::Ip6)),
        vec![SetFlag::Dynamic, SetFlag::Timeout],
    );
    aff.timeout = Some(10800);
    let m = message(Family::Ip6, vec![Op::AddSet(aff)], NFT_MSG_NEWSET);
    let m = borrowed(&m);
    assert_eq!(
        be32(&m, 3),
        Some(NFT_SET_MAP | NFT_SET_TIMEOUT | NFT_SET_EVAL)
    );
    assert_eq!(be32(&m, 4), Some(0x0020_830d));
    assert_eq!(be32(&m, 5), Some(40));
    assert_eq!(
        attr(&m, 9),
        None,
        "nft sends no size for a dynamic data map"
    );
    assert_eq!(attr(&m, 11), Some(10_800_000u64.to_be_bytes().to_vec()));
    let nft = hex(
        "00 04 00 00 00 00 01 04 00 00 00 00 03 08 00 04 0d 00 00 00 01 00 04 08 00 04 0d 00
         00 00 01 00 06 04 00 00 00 00",
    );
    if cfg!(target_endian = "little") {
        assert_eq!(attr(&m, 13), Some(nft), "user data");
    }
}

#[test]
fn a_concatenated_interval_set_is_a_pipapo_set_with_field_lengths() {
    let a = DataType::Ipv4Addr;
    let s = set(
        "firewall-allow",
        vec![a, DataType::InetProto, DataType::InetService, a],
        None,
        vec![SetFlag::Interval],
    );
    let m = message(Family::Ip, vec![Op::AddSet(s)], NFT_MSG_NEWSET);
    let m = borrowed(&m);
    assert_eq!(be32(&m, 3), Some(NFT_SET_INTERVAL | NFT_SET_CONCAT));
    assert_eq!(be32(&m, 4), Some(0x001c_c347));
    assert_eq!(be32(&m, 5), Some(16));
    let desc = attr(&m, 9).expect("a description");
    let concat = attr(&attrs(&desc), 2).expect("field lengths");
    let lens: Vec<u32> = attrs(&concat)
        .iter()
        .map(|(_, field)| be32(&attrs(field), 1).unwrap())
        .collect();
    assert_eq!(lens, [4, 1, 2, 4]);
    // A plain concatenated set has neither.
    let s = set(
        "masq-ips",
        vec![a, DataType::InetProto, DataType::InetService],
        None,
        vec![],
    );
    let m = message(Family::Ip, vec![Op::AddSet(s)], NFT_MSG_NEWSET);
    let m = borrowed(&m);
    assert_eq!(be32(&m, 3), Some(0));
    assert_eq!(be32(&m, 4), Some(0x730d));
    assert_eq!(be32(&m, 5), Some(12));
    assert_eq!(attr(&m, 9), None);
}

/// The elements of the first element message: (key, key end, data) bytes.
type ElemBytes = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

fn elements(ops: Vec<Op>, ty: u16) -> Vec<ElemBytes> {
    let m = message(Family::Ip, ops, ty);
    let m = borrowed(&m);
    let list = attr(&m, 3).expect("elements");
    let value = |nest: Option<Vec<u8>>| nest.and_then(|n| attr(&attrs(&n), 1));
    attrs(&list)
        .iter()
        .map(|(_, e)| {
            let e = attrs(e);
            (
                value(attr(&e, 1)).expect("a key"),
                value(attr(&e, 10)),
                value(attr(&e, 2)),
            )
        })
        .collect()
}

fn element(set: &str, key: Vec<KeyValue>, data: Vec<KeyValue>) -> Element {
    Element {
        set: set.into(),
        key,
        comment: None,
        value: None,
        data,
    }
}

#[test]
fn data_map_and_interval_elements() {
    let ip = |s: &str| KeyValue::Ip(s.parse().unwrap());
    let backend = element(
        "backends-ips",
        vec![
            ip("10.96.90.90"),
            KeyValue::Proto(Protocol::Tcp),
            KeyValue::Port(443),
            KeyValue::Index(0),
        ],
        vec![ip("10.244.1.100"), KeyValue::Port(8443)],
    );
    // nft: `element 5a5a600a 00000006 0000bb01 00000000 : 6401f40a 0000fb20`.
    assert_eq!(
        elements(vec![Op::AddElement(backend.clone())], NFT_MSG_NEWSETELEM),
        [(
            hex("0a 60 5a 5a 06 00 00 00 01 bb 00 00 00 00 00 00"),
            None,
            Some(hex("0a f4 01 64 20 fb 00 00")),
        )]
    );
    // A deletion names the key only.
    assert_eq!(
        elements(vec![Op::DeleteElement(backend)], NFT_MSG_DELSETELEM),
        [(
            hex("0a 60 5a 5a 06 00 00 00 01 bb 00 00 00 00 00 00"),
            None,
            None
        )]
    );
    // nft: `element 147100cb 00000006 0000bb01 000012ac - 147100cb 00000006 0000bb01
    // ffff12ac`, and a host prefix ends where it starts.
    let allow = |net: &str| {
        element(
            "firewall-allow",
            vec![
                ip("203.0.113.20"),
                KeyValue::Proto(Protocol::Tcp),
                KeyValue::Port(443),
                KeyValue::Net(net.parse().unwrap()),
            ],
            vec![],
        )
    };
    assert_eq!(
        elements(
            vec![
                Op::AddElement(allow("172.18.0.0/16")),
                Op::AddElement(allow("203.0.113.21/32")),
            ],
            NFT_MSG_NEWSETELEM
        ),
        [
            (
                hex("cb 00 71 14 06 00 00 00 01 bb 00 00 ac 12 00 00"),
                Some(hex("cb 00 71 14 06 00 00 00 01 bb 00 00 ac 12 ff ff")),
                None
            ),
            (
                hex("cb 00 71 14 06 00 00 00 01 bb 00 00 cb 00 71 15"),
                Some(hex("cb 00 71 14 06 00 00 00 01 bb 00 00 cb 00 71 15")),
                None
            ),
        ]
    );
    // A prefix as a whole one-field key is not something the layouts write.
    let mut tx = Transaction::new(Family::Ip, "kproxy");
    tx.push(Op::AddElement(element(
        "s",
        vec![KeyValue::Net("10.0.0.0/8".parse().unwrap())],
        vec![],
    )));
    assert!(matches!(
        encode(&tx, 1, &mut AnonNames::new(1)),
        Err(NetlinkError::Unsupported { index: 0, .. })
    ));
}
