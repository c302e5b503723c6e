//! Read-back: the kernel's table as an [`Existing`] (chains, sets, and the elements of
//! the sets kproxy manages), and single-chain lookups.

use std::net::IpAddr;

use super::abi::*;
use super::{Netlink, NetlinkError};
use crate::model::Protocol;
use crate::nftables::existing::{Existing, MANAGED_SETS};
use crate::nftables::transaction::{Element, Family, KeyValue, Verdict};
use crate::sys::nftnl::{Chain as NlChain, ElemView, NlMsg, Set as NlSet};

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
