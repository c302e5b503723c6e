//! Read-back: the kernel's table as an [`Existing`] (chains, sets, and the elements of
//! the sets kproxy manages), and single-chain lookups.

use std::net::IpAddr;

use super::abi::*;
use super::{Netlink, NetlinkError};
use crate::model::Protocol;
use crate::nftables::existing::{Existing, TableContents, MANAGED_SETS};
use crate::nftables::transaction::{DataType, Element, Family, KeyValue, Set, SetFlag, Verdict};
use crate::sys::nftnl::{Chain as NlChain, ElemView, NlMsg, Rule as NlRule, Set as NlSet};

impl Netlink {
    /// Sends a request built by `build` and collects the whole messages of its reply;
    /// the kernel's errno when it refused.
    fn request(
        &mut self,
        ty: u16,
        family: Family,
        flags: u16,
        build: impl FnOnce(&mut NlMsg) -> Result<(), NetlinkError>,
    ) -> Result<Result<Vec<Vec<u8>>, i32>, NetlinkError> {
        let seq = self.sock.take_seqs(1);
        let mut m = NlMsg::new(ty, family.nfproto(), flags | NLM_F_ACK, seq);
        build(&mut m)?;
        let bytes = m.finish()?;
        self.sock.send(&bytes).map_err(|source| NetlinkError::Io {
            what: "send request",
            source,
        })?;
        let mut msgs = Vec::new();
        let result = self
            .sock
            .recv_reply(seq, |frame| msgs.push(frame.bytes.to_vec()))
            .map_err(|source| NetlinkError::Io {
                what: "receive",
                source,
            })?;
        Ok(result.map(|()| msgs))
    }

    /// A set object naming the table (and the set), for dump requests.
    fn set_request(table: &str, set: Option<&str>) -> Result<NlSet, NetlinkError> {
        let mut s = NlSet::new()?;
        s.str(nftnl_sys::NFTNL_SET_TABLE, table)?;
        if let Some(name) = set {
            s.str(nftnl_sys::NFTNL_SET_NAME, name)?;
        }
        Ok(s)
    }

    /// Reads back our table: chains, sets, and the elements of the maps and sets kproxy
    /// manages. `None` when the table does not exist.
    pub fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        let list_failed = |what, e| NetlinkError::Io {
            what,
            source: std::io::Error::from_raw_os_error(e),
        };
        let chains = match self.request(NFT_MSG_GETCHAIN, family, NLM_F_DUMP, |_| Ok(()))? {
            Ok(m) => m,
            Err(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(list_failed("list chains", e)),
        };
        let mut existing = Existing::default();
        let mut found_table = false;
        for (t, name) in chains
            .iter()
            .filter_map(|m| NlChain::parse(m)?.table_and_name())
        {
            if t == table {
                found_table = true;
                existing.chains.insert(name);
            }
        }
        let sets = match self.request(NFT_MSG_GETSET, family, NLM_F_DUMP, |m| {
            Ok(Self::set_request(table, None)?.build(m)?)
        })? {
            Ok(m) => m,
            Err(libc::ENOENT) => return Ok(found_table.then_some(existing)),
            Err(e) => return Err(list_failed("list sets", e)),
        };
        let mut anonymous = Vec::new();
        for name in sets.iter().filter_map(|m| NlSet::parse(m)?.name()) {
            if name.starts_with("__") {
                anonymous.push(name);
            } else {
                existing.sets.insert(name);
            }
        }
        self.names.avoid(anonymous.iter().map(String::as_str));
        if !found_table && existing.sets.is_empty() {
            return Ok(None);
        }
        for set in MANAGED_SETS.iter().filter(|s| existing.sets.contains(**s)) {
            let msgs = match self.request(NFT_MSG_GETSETELEM, family, NLM_F_DUMP, |m| {
                Ok(Self::set_request(table, Some(set))?.build_elems(m)?)
            })? {
                Ok(m) => m,
                Err(_) => continue,
            };
            for m in &msgs {
                if let Some(s) = NlSet::parse_elems(m) {
                    existing
                        .elements
                        .extend(s.elems().iter().filter_map(|e| element(e, set, family)));
                }
            }
        }
        Ok(Some(existing))
    }

    /// Reads back a whole table for a layout that diffs against it (see
    /// [`crate::nftables::NftInterface::read_contents`]). `None` when the table does not
    /// exist.
    pub fn read_contents(
        &mut self,
        family: Family,
        table: &str,
        declared: &dyn Fn(&str) -> Option<Set>,
    ) -> Result<Option<TableContents>, NetlinkError> {
        let list_failed = |what, e| NetlinkError::Io {
            what,
            source: std::io::Error::from_raw_os_error(e),
        };
        // The table itself first: a dump of chains in a missing table is not an error.
        let tables = match self.request(NFT_MSG_GETTABLE, family, 0, |m| {
            let mut t = crate::sys::nftnl::Table::new()?;
            t.str(nftnl_sys::NFTNL_TABLE_NAME, table)?;
            Ok(t.build(m)?)
        })? {
            Ok(m) => m,
            Err(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(list_failed("get table", e)),
        };
        if tables.is_empty() {
            return Ok(None);
        }
        let mut out = TableContents::default();
        let chains = match self.request(NFT_MSG_GETCHAIN, family, NLM_F_DUMP, |m| {
            let mut c = NlChain::new()?;
            c.str(nftnl_sys::NFTNL_CHAIN_TABLE, table)?;
            Ok(c.build(m)?)
        })? {
            Ok(m) => m,
            Err(e) => return Err(list_failed("list chains", e)),
        };
        for (t, name) in chains
            .iter()
            .filter_map(|m| NlChain::parse(m)?.table_and_name())
        {
            if t == table {
                out.chains.entry(name).or_default();
            }
        }
        let rules = match self.request(NFT_MSG_GETRULE, family, NLM_F_DUMP, |m| {
            let mut r = NlRule::new()?;
            r.str(nftnl_sys::NFTNL_RULE_TABLE, table)?;
            Ok(r.build(m)?)
        })? {
            Ok(m) => m,
            Err(e) => return Err(list_failed("list rules", e)),
        };
        // The dump lists each chain's rules in order.
        for r in rules.iter().filter_map(|m| NlRule::parse(m)) {
            let Some((t, chain)) = r.table_and_chain() else {
                continue;
            };
            if t != table {
                continue;
            }
            let comment = r.userdata().and_then(|u| comment(&u));
            out.chains.entry(chain).or_default().push(comment);
        }
        let sets = match self.request(NFT_MSG_GETSET, family, NLM_F_DUMP, |m| {
            Ok(Self::set_request(table, None)?.build(m)?)
        })? {
            Ok(m) => m,
            Err(e) => return Err(list_failed("list sets", e)),
        };
        let mut anonymous = Vec::new();
        for set in sets.iter().filter_map(|m| NlSet::parse(m)) {
            let Some(name) = set.name() else { continue };
            if name.starts_with("__") {
                anonymous.push(name);
            } else {
                if let Some(ms) = set.timeout_ms() {
                    let secs = u32::try_from(ms / 1000).unwrap_or(u32::MAX);
                    out.timeouts.insert(name.clone(), secs);
                }
                out.sets.insert(name);
            }
        }
        self.names.avoid(anonymous.iter().map(String::as_str));
        let names: Vec<String> = out.sets.iter().cloned().collect();
        for name in names {
            let Some(def) = declared(&name) else { continue };
            let msgs = match self.request(NFT_MSG_GETSETELEM, family, NLM_F_DUMP, |m| {
                Ok(Self::set_request(table, Some(&name))?.build_elems(m)?)
            })? {
                Ok(m) => m,
                Err(e) => return Err(list_failed("list elements", e)),
            };
            for m in &msgs {
                if let Some(s) = NlSet::parse_elems(m) {
                    out.elements
                        .extend(s.elems().iter().filter_map(|e| typed_element(e, &def)));
                }
            }
        }
        Ok(Some(out))
    }

    /// The nftables generation of this network namespace (`NFT_MSG_GETGEN`); `None`
    /// when the reply carries none.
    pub fn generation(&mut self) -> Result<Option<u32>, NetlinkError> {
        let msgs = match self.request(NFT_MSG_GETGEN, Family::Ip, 0, |_| Ok(()))? {
            Ok(m) => m,
            Err(e) => {
                return Err(NetlinkError::Io {
                    what: "get generation",
                    source: std::io::Error::from_raw_os_error(e),
                })
            }
        };
        Ok(msgs.iter().find_map(|m| gen_id(m)))
    }

    /// Whether one chain exists (a single GETCHAIN, no dump: cheap on big tables).
    pub fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        let reply = self.request(NFT_MSG_GETCHAIN, family, 0, |m| {
            let mut c = NlChain::new()?;
            c.str(nftnl_sys::NFTNL_CHAIN_TABLE, table)?
                .str(nftnl_sys::NFTNL_CHAIN_NAME, chain)?;
            Ok(c.build(m)?)
        })?;
        Ok(reply.is_ok_and(|msgs| !msgs.is_empty()))
    }

    /// Whether one element is in a set (a single GETSETELEM for its key, no dump:
    /// cheap however large the set is). For plain sets and maps with exact keys.
    pub fn element_exists(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        key: &[KeyValue],
    ) -> Result<bool, NetlinkError> {
        let reply = self.request(NFT_MSG_GETSETELEM, family, 0, |m| {
            let mut s = Self::set_request(table, Some(set))?;
            let mut e = crate::sys::nftnl::SetElem::new()?;
            e.data(
                nftnl_sys::NFTNL_SET_ELEM_KEY,
                &super::encode::key_bytes(key, false),
            )?;
            s.add_elem(e);
            Ok(s.build_elems(m)?)
        })?;
        Ok(reply.is_ok_and(|msgs| !msgs.is_empty()))
    }
}

/// Decodes one element of a managed container (`None` if it is not one kproxy
/// writes).
fn element(e: &ElemView, set: &str, family: Family) -> Option<Element> {
    let alen = match family {
        Family::Ip => 4,
        Family::Ip6 => 16,
    };
    let key = e.key.as_deref()?;
    let ip_at = |b: &[u8]| -> Option<IpAddr> {
        match alen {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.get(..4)?).ok()?)),
            _ => Some(IpAddr::from(<[u8; 16]>::try_from(b.get(..16)?).ok()?)),
        }
    };
    let proto_at = |b: u8| match b {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    };
    let port_at = |at: usize| Some(u16::from_be_bytes([*key.get(at)?, *key.get(at + 1)?]));
    let parts = match set {
        "cluster-ips" => vec![KeyValue::Ip(ip_at(key)?)],
        "service-nodeports" | "no-endpoint-nodeports" => vec![
            KeyValue::Proto(proto_at(*key.first()?)?),
            KeyValue::Port(port_at(4)?),
        ],
        _ => vec![
            KeyValue::Ip(ip_at(key)?),
            KeyValue::Proto(proto_at(*key.get(alen)?)?),
            KeyValue::Port(port_at(alen + 4)?),
        ],
    };
    let value = (set != "cluster-ips").then(|| {
        let chain = e.chain.clone().unwrap_or_default();
        match e.verdict.unwrap_or(NF_DROP as i32) {
            NFT_JUMP => Verdict::Jump(chain),
            NFT_GOTO => Verdict::Goto(chain),
            NFT_RETURN => Verdict::Return,
            c if c == NF_ACCEPT as i32 => Verdict::Accept,
            _ => Verdict::Drop,
        }
    });
    Some(Element {
        set: set.to_string(),
        key: parts,
        comment: None,
        value,
        data: Vec::new(),
    })
}

/// The comment in nft's user-data TLVs (type, length with the NUL, text, NUL).
fn comment(udata: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 2 <= udata.len() {
        let (kind, len) = (udata[at], usize::from(udata[at + 1]));
        let value = udata.get(at + 2..at + 2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += 2 + len;
    }
    None
}

/// Decodes one field of a key or data value of type `t` from `b` (`None` when the
/// bytes are not a value kproxy writes).
fn field(t: DataType, b: &[u8]) -> Option<Vec<KeyValue>> {
    let ip4 = |b: &[u8]| Some(IpAddr::from(<[u8; 4]>::try_from(b.get(..4)?).ok()?));
    let ip6 = |b: &[u8]| Some(IpAddr::from(<[u8; 16]>::try_from(b.get(..16)?).ok()?));
    let port = |b: &[u8]| Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    Some(match t {
        DataType::Ipv4Addr => vec![KeyValue::Ip(ip4(b)?)],
        DataType::Ipv6Addr => vec![KeyValue::Ip(ip6(b)?)],
        DataType::InetProto => vec![KeyValue::Proto(proto(*b.first()?)?)],
        DataType::InetService => vec![KeyValue::Port(port(b)?)],
        // numgen writes a host-endian integer (as the encoder does).
        DataType::Integer => vec![KeyValue::Index(u32::from_ne_bytes(
            b.get(..4)?.try_into().ok()?,
        ))],
        DataType::AddrPort(f) => {
            let alen = if f == Family::Ip { 4 } else { 16 };
            let addr = if f == Family::Ip { ip4(b)? } else { ip6(b)? };
            vec![KeyValue::Ip(addr), KeyValue::Port(port(b.get(alen..)?)?)]
        }
        DataType::Verdict => return None,
    })
}

fn proto(b: u8) -> Option<Protocol> {
    match b {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The bytes of one field of a value: in a concatenation each field fills whole
/// 32-bit registers.
fn field_len(t: DataType, concat: bool) -> usize {
    let raw: usize = match t {
        DataType::Ipv4Addr => 4,
        DataType::Ipv6Addr => 16,
        DataType::InetProto => 1,
        DataType::InetService => 2,
        DataType::Integer | DataType::Verdict => 4,
        DataType::AddrPort(Family::Ip) => return 8,
        DataType::AddrPort(Family::Ip6) => return 20,
    };
    if concat {
        raw.div_ceil(4) * 4
    } else {
        raw
    }
}

/// Decodes a value of the (concatenated) type `types` from `b`.
fn typed_value(types: &[DataType], b: &[u8]) -> Option<Vec<KeyValue>> {
    let concat = types.len() > 1;
    let mut at = 0;
    let mut out = Vec::new();
    for t in types {
        let len = field_len(*t, concat);
        out.extend(field(*t, b.get(at..at + len)?)?);
        at += len;
    }
    (at == b.len()).then_some(out)
}

/// The prefix from `start` to `end` (inclusive), if it is one.
fn prefix(start: IpAddr, end: IpAddr) -> Option<ipnet::IpNet> {
    let (s, e, bits) = match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => (u128::from(u32::from(s)), u128::from(u32::from(e)), 32),
        (IpAddr::V6(s), IpAddr::V6(e)) => (u128::from(s), u128::from(e), 128),
        _ => return None,
    };
    let host = s ^ e;
    let len = bits - u8::try_from(128 - host.leading_zeros()).ok()?;
    let net = ipnet::IpNet::new(start, len).ok()?;
    (net.network() == start && net.broadcast() == end).then_some(net)
}

/// Decodes one element of a set declared as `def`. In a concatenated interval set the
/// last address field of the key is a prefix from the key to the key's end (the one
/// such set kproxy writes: `firewall-allow`, destination . allowed source prefix).
fn typed_element(e: &ElemView, def: &Set) -> Option<Element> {
    let mut key = typed_value(&def.key, e.key.as_deref()?)?;
    if def.flags.contains(&SetFlag::Interval) {
        let end = typed_value(&def.key, e.key_end.as_deref().or(e.key.as_deref())?)?;
        let last = key.iter().rposition(|k| matches!(k, KeyValue::Ip(_)))?;
        let (KeyValue::Ip(s), Some(KeyValue::Ip(t))) = (&key[last], end.get(last)) else {
            return None;
        };
        key[last] = KeyValue::Net(prefix(*s, *t)?);
    }
    let (value, data) = match def.value {
        Some(DataType::Verdict) => (Some(verdict(e)?), Vec::new()),
        Some(t) => (None, typed_value(&[t], e.data.as_deref()?)?),
        None => (None, Vec::new()),
    };
    Some(Element {
        set: def.name.clone(),
        key,
        comment: None,
        value,
        data,
    })
}

/// A verdict-map element's verdict.
fn verdict(e: &ElemView) -> Option<Verdict> {
    let chain = || e.chain.clone();
    Some(match e.verdict? {
        NFT_JUMP => Verdict::Jump(chain()?),
        NFT_GOTO => Verdict::Goto(chain()?),
        NFT_RETURN => Verdict::Return,
        c if c == NF_ACCEPT as i32 => Verdict::Accept,
        c if c == NF_DROP as i32 => Verdict::Drop,
        _ => return None,
    })
}

/// `NFTA_GEN_ID` (big-endian u32) of a NEWGEN message: netlink header (16 bytes),
/// nfgenmsg (4), then attributes.
fn gen_id(msg: &[u8]) -> Option<u32> {
    let ty = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    if ty >> 8 != NFNL_SUBSYS_NFTABLES || ty & 0xff != NFT_MSG_NEWGEN {
        return None;
    }
    let mut at = 20;
    while at + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[at], msg[at + 1]]));
        let ty = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if len < 4 {
            return None;
        }
        if ty == NFTA_GEN_ID && len >= 8 {
            return Some(u32::from_be_bytes(
                msg.get(at + 4..at + 8)?.try_into().ok()?,
            ));
        }
        at += len.div_ceil(4) * 4;
    }
    None
}
