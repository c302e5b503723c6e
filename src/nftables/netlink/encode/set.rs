//! Set and map definitions: key and data types (concatenations: 6 bits of nft type id
//! per field, each field a whole 32-bit register), the field lengths a concatenated
//! interval (pipapo) set needs, the user data nft writes so that `nft list` shows the
//! same declaration (`typeof …` for keys with a numgen field), and anonymous sets.

use ipnet::IpNet;

use super::elem::ElemSpec;
use super::{udata, Batch};
use crate::nftables::netlink::abi::*;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::transaction::{DataType, Family, Set, SetFlag, Verdict};
use std::net::IpAddr;

/// A set definition as sent.
#[derive(Debug, Default)]
pub(super) struct SetMsg<'a> {
    pub(super) name: &'a str,
    /// Key type id and length.
    pub(super) key: (u32, u32),
    /// Data type id and length (maps).
    pub(super) data: Option<(u32, u32)>,
    pub(super) flags: u32,
    pub(super) timeout_ms: Option<u64>,
    pub(super) size: Option<u32>,
    /// Field lengths of a concatenated interval key (NFTA_SET_DESC_CONCAT).
    pub(super) field_lens: Vec<u8>,
    pub(super) user: Option<Vec<u8>>,
}

/// The fields of a data type: (nft type id, length in bytes).
fn fields(t: DataType) -> Vec<(u32, u32)> {
    match t {
        DataType::Ipv4Addr => vec![(TYPE_IPADDR, 4)],
        DataType::Ipv6Addr => vec![(TYPE_IP6ADDR, 16)],
        DataType::InetProto => vec![(TYPE_INET_PROTOCOL, 1)],
        DataType::InetService => vec![(TYPE_INET_SERVICE, 2)],
        DataType::Verdict => vec![(1, 4)],
        DataType::Integer => vec![(TYPE_INTEGER, 4)],
        DataType::AddrPort(Family::Ip) => vec![(TYPE_IPADDR, 4), (TYPE_INET_SERVICE, 2)],
        DataType::AddrPort(Family::Ip6) => vec![(TYPE_IP6ADDR, 16), (TYPE_INET_SERVICE, 2)],
    }
}

/// Type id and length of a (possibly concatenated) key or data type.
pub(super) fn key_type(key: &[DataType]) -> (u32, u32) {
    let all: Vec<(u32, u32)> = key.iter().flat_map(|k| fields(*k)).collect();
    let concat = all.len() > 1;
    let mut ty = 0u32;
    let mut len = 0u32;
    for (t, l) in all {
        ty = (ty << 6) | t;
        // Components of a concatenation each take a whole 32-bit register.
        len += if concat { l.div_ceil(4) * 4 } else { l };
    }
    (ty, len)
}

/// One nft user-data TLV (type, length, value).
fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, value.len().min(255) as u8];
    out.extend_from_slice(&value[..value.len().min(255)]);
    out
}

fn tlv_u32(kind: u8, v: u32) -> Vec<u8> {
    tlv(kind, &v.to_ne_bytes())
}

// nft's expression type ids and protocol descriptions, as its `typeof` user data
// records them (nft's expression.h / proto.h numbering).
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
const PROTO_DESC_TH: u32 = 11;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_DADDR: u32 = 9;
const THDR_DPORT: u32 = 2;
// User-data tags of a set (libnftnl's udata_set_type).
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;

/// The expression nft's text form declares a type with (`typeof` in
/// [`crate::nftables::text`]): (expression type, its attributes).
fn typeof_items(fam: Family, t: DataType) -> Vec<(u32, Vec<u8>)> {
    let daddr = match fam {
        Family::Ip => [tlv_u32(0, PROTO_DESC_IP), tlv_u32(1, IPHDR_DADDR)].concat(),
        Family::Ip6 => [tlv_u32(0, PROTO_DESC_IP6), tlv_u32(1, IP6HDR_DADDR)].concat(),
    };
    let dport = [tlv_u32(0, PROTO_DESC_TH), tlv_u32(1, THDR_DPORT)].concat();
    match t {
        DataType::Ipv4Addr | DataType::Ipv6Addr => vec![(EXPR_PAYLOAD, daddr)],
        DataType::InetProto => vec![(EXPR_META, tlv_u32(0, NFT_META_L4PROTO))],
        DataType::InetService => vec![(EXPR_PAYLOAD, dport)],
        // numgen random mod 1 offset 0 (only the type matters for a declaration).
        DataType::Integer => vec![(
            EXPR_NUMGEN,
            [tlv_u32(0, NFT_NG_RANDOM), tlv_u32(1, 1), tlv_u32(2, 0)].concat(),
        )],
        DataType::AddrPort(_) => vec![(EXPR_PAYLOAD, daddr), (EXPR_PAYLOAD, dport)],
        DataType::Verdict => Vec::new(),
    }
}

/// A KEY_TYPEOF / DATA_TYPEOF value: a concatenation of expressions, or (for `type`
/// declarations) an empty concatenation.
fn typeof_concat(items: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (i, (etype, data)) in items.iter().enumerate() {
        list.extend(tlv(i as u8, &[tlv_u32(0, *etype), tlv(1, data)].concat()));
    }
    [tlv_u32(0, EXPR_CONCAT), tlv(1, &list)].concat()
}

/// The user data nft writes for a data map or a `typeof` set (the maps layout's):
/// byte orders, the key's (and data's) declaration, whether the data are intervals,
/// the comment. Other sets carry only their comment, as before.
pub(super) fn set_udata(fam: Family, s: &Set) -> Option<Vec<u8>> {
    let data_map = s.value.is_some_and(|v| v != DataType::Verdict);
    let typeof_key = s.key.contains(&DataType::Integer);
    let comment = s.comment.as_deref().map(|c| udata(UDATA_SET_COMMENT, c));
    if !data_map && !typeof_key {
        return comment;
    }
    let mut out = tlv_u32(UDATA_SET_KEYBYTEORDER, 0);
    if data_map {
        out.extend(tlv_u32(UDATA_SET_DATABYTEORDER, 0));
    }
    let key_items: Vec<(u32, Vec<u8>)> = if typeof_key {
        s.key.iter().flat_map(|k| typeof_items(fam, *k)).collect()
    } else {
        Vec::new()
    };
    if s.key.len() > 1 || typeof_key {
        out.extend(tlv(UDATA_SET_KEY_TYPEOF, &typeof_concat(&key_items)));
    }
    if let Some(v) = s.value.filter(|_| data_map) {
        let items = if typeof_key {
            typeof_items(fam, v)
        } else {
            Vec::new()
        };
        out.extend(tlv(UDATA_SET_DATA_TYPEOF, &typeof_concat(&items)));
        out.extend(tlv_u32(UDATA_SET_DATA_INTERVAL, 0));
    }
    if let Some(c) = comment {
        out.extend(c);
    }
    Some(out)
}

impl Batch<'_> {
    /// Creates a set; returns the set id used.
    pub(super) fn set_msg(&mut self, op: usize, d: &SetMsg<'_>) -> Result<u32, NetlinkError> {
        use nftnl_sys::*;
        let mut m = self.msg(op, NFT_MSG_NEWSET, NLM_F_CREATE);
        let id = self.next_set_id;
        self.next_set_id += 1;
        let mut s = self.set_obj()?;
        s.str(NFTNL_SET_NAME, d.name)?
            .u32(NFTNL_SET_ID, id)
            .u32(NFTNL_SET_KEY_TYPE, d.key.0)
            .u32(NFTNL_SET_KEY_LEN, d.key.1);
        let mut f = d.flags;
        if let Some((ty, len)) = d.data {
            f |= NFT_SET_MAP;
            s.u32(NFTNL_SET_DATA_TYPE, ty).u32(NFTNL_SET_DATA_LEN, len);
        }
        s.u32(NFTNL_SET_FLAGS, f);
        if let Some(t) = d.timeout_ms {
            s.u64(NFTNL_SET_TIMEOUT, t);
        }
        if let Some(sz) = d.size {
            s.u32(NFTNL_SET_DESC_SIZE, sz);
        }
        if !d.field_lens.is_empty() {
            s.data(NFTNL_SET_DESC_CONCAT, &d.field_lens)?;
        }
        if let Some(u) = &d.user {
            s.data(NFTNL_SET_USERDATA, u)?;
        }
        s.build(&mut m)?;
        self.push(m)?;
        Ok(id)
    }

    /// `add set|map`.
    pub(super) fn add_set(&mut self, op: usize, s: &Set) -> Result<(), NetlinkError> {
        let mut flags = 0;
        for f in &s.flags {
            flags |= match f {
                SetFlag::Dynamic => NFT_SET_EVAL,
                SetFlag::Timeout => NFT_SET_TIMEOUT,
                SetFlag::Interval => NFT_SET_INTERVAL,
            };
        }
        let key_fields: Vec<(u32, u32)> = s.key.iter().flat_map(|k| fields(*k)).collect();
        // A concatenated interval key is a pipapo set: the kernel needs each field's
        // length (unpadded) and the concat flag.
        let field_lens: Vec<u8> = if flags & NFT_SET_INTERVAL != 0 && key_fields.len() > 1 {
            flags |= NFT_SET_CONCAT;
            key_fields.iter().map(|(_, l)| *l as u8).collect()
        } else {
            Vec::new()
        };
        let data = match s.value {
            Some(DataType::Verdict) => Some((NFT_DATA_VERDICT, 16)),
            Some(v) => Some(key_type(&[v])),
            None if s.is_map => Some((NFT_DATA_VERDICT, 16)),
            None => None,
        };
        let data_map = data.is_some_and(|(t, _)| t != NFT_DATA_VERDICT);
        // nft gives dynamic sets a default size of 65535; do the same so listings
        // match (nft sends none for dynamic data maps).
        let size = (s.flags.contains(&SetFlag::Dynamic) && !data_map).then_some(65535);
        self.set_msg(
            op,
            &SetMsg {
                name: &s.name,
                key: key_type(&s.key),
                data,
                flags,
                timeout_ms: s.timeout.map(|t| u64::from(t) * 1000),
                size,
                field_lens,
                user: set_udata(self.family, s),
            },
        )?;
        Ok(())
    }

    pub(super) fn anon_numgen_map(
        &mut self,
        op: usize,
        targets: &[Verdict],
    ) -> Result<(String, u32), NetlinkError> {
        let name = self.names.name('m');
        // numgen writes a host-endian integer; nft records that byte order in the set's
        // user data (type 0, KEYBYTEORDER = 1, host) so listings show 0, 1, 2 …
        let user = tlv_u32(UDATA_SET_KEYBYTEORDER, 1);
        let id = self.set_msg(
            op,
            &SetMsg {
                name: &name,
                key: (TYPE_INTEGER, 4),
                data: Some((NFT_DATA_VERDICT, 16)),
                flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
                user: Some(user),
                ..SetMsg::default()
            },
        )?;
        let elems: Vec<ElemSpec> = targets
            .iter()
            .enumerate()
            .map(|(i, v)| ElemSpec::key((i as u32).to_ne_bytes().to_vec(), 0, Some(v.clone())))
            .collect();
        self.elems_msg_nftnl(op, NFT_MSG_NEWSETELEM, &name, Some(id), &elems)?;
        Ok((name, id))
    }

    pub(super) fn anon_interval_set(
        &mut self,
        op: usize,
        fam: Family,
        list: &[IpNet],
    ) -> Result<(String, u32), NetlinkError> {
        let name = self.names.name('s');
        let (ty, len) = match fam {
            Family::Ip => (TYPE_IPADDR, 4u32),
            Family::Ip6 => (TYPE_IP6ADDR, 16u32),
        };
        let id = self.set_msg(
            op,
            &SetMsg {
                name: &name,
                key: (ty, len),
                flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL,
                ..SetMsg::default()
            },
        )?;
        let elems: Vec<ElemSpec> = interval_elements(list, len as usize)
            .into_iter()
            .map(|(k, f)| ElemSpec::key(k, f, None))
            .collect();
        self.elems_msg_nftnl(op, NFT_MSG_NEWSETELEM, &name, Some(id), &elems)?;
        Ok((name, id))
    }
}

/// Interval-set elements for a list of prefixes, as nft encodes them: sorted, merged
/// ranges, each a start element and an end element (first address after the range,
/// flagged INTERVAL_END); a leading end element at zero when the first range does not
/// start there.
pub(super) fn interval_elements(list: &[IpNet], len: usize) -> Vec<(Vec<u8>, u32)> {
    let to_u128 = |ip: IpAddr| -> u128 {
        match ip {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        }
    };
    let bytes = |v: u128| -> Vec<u8> {
        if len == 4 {
            (v as u32).to_be_bytes().to_vec()
        } else {
            v.to_be_bytes().to_vec()
        }
    };
    let mut ranges: Vec<(u128, u128)> = list
        .iter()
        .map(|n| (to_u128(n.network()), to_u128(n.broadcast())))
        .collect();
    ranges.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let max = if len == 4 {
        u32::MAX as u128
    } else {
        u128::MAX
    };
    let mut out = Vec::new();
    if merged.first().is_some_and(|(s, _)| *s != 0) {
        out.push((bytes(0), NFT_SET_ELEM_INTERVAL_END));
    }
    for (s, e) in merged {
        out.push((bytes(s), 0));
        if e < max {
            out.push((bytes(e + 1), NFT_SET_ELEM_INTERVAL_END));
        }
    }
    out
}
