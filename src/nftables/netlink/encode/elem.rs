//! Elements: keys (concatenations of 32-bit-aligned fields), the inclusive end of an
//! interval key in a concatenated (pipapo) set, data values and verdicts.

use std::net::IpAddr;

use super::{udata, verdict_code, Batch, ELEMENTS_PER_MESSAGE};
use crate::nftables::netlink::abi::*;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::transaction::{Element, KeyValue, Verdict};
use crate::sys::nftnl::SetElem;

/// One element to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ElemSpec {
    /// Key bytes (for an interval: its first key).
    pub(super) key: Vec<u8>,
    /// The last key of an interval in a concatenated interval set (nft sends every
    /// element of such a set with its inclusive end, a host prefix ending where it
    /// starts).
    pub(super) key_end: Option<Vec<u8>>,
    /// NFT_SET_ELEM_* flags (interval ends of anonymous one-field interval sets).
    pub(super) flags: u32,
    /// A verdict-map value.
    pub(super) verdict: Option<Verdict>,
    /// A data-map value.
    pub(super) data: Option<Vec<u8>>,
    /// Comment.
    pub(super) comment: Option<String>,
}

impl ElemSpec {
    /// A plain key with flags (the anonymous sets' elements).
    pub(super) fn key(key: Vec<u8>, flags: u32, verdict: Option<Verdict>) -> ElemSpec {
        ElemSpec {
            key,
            key_end: None,
            flags,
            verdict,
            data: None,
            comment: None,
        }
    }

    /// The encoding of a transaction's element; `None` for a prefix in a one-field
    /// key (an rbtree interval set, whose elements nft sends as start and end
    /// elements: no layout writes one as a named set).
    pub(super) fn of(e: &Element) -> Option<ElemSpec> {
        let interval = e.key.iter().any(|k| matches!(k, KeyValue::Net(_)));
        if interval && e.key.len() == 1 {
            return None;
        }
        Some(ElemSpec {
            key: key_bytes(&e.key, false),
            key_end: interval.then(|| key_bytes(&e.key, true)),
            flags: 0,
            verdict: e.value.clone(),
            data: (!e.data.is_empty()).then(|| key_bytes(&e.data, false)),
            comment: e.comment.clone(),
        })
    }
}

/// Key (or data) bytes: each component of a concatenation padded to 32 bits (the
/// registers it is loaded into); a prefix is its first address, or with `end` its last.
pub(in crate::nftables::netlink) fn key_bytes(key: &[KeyValue], end: bool) -> Vec<u8> {
    let concat = key.len() > 1;
    // Written in place (no buffer per component): a cold sync encodes a quarter of a
    // million keys.
    let mut out = Vec::with_capacity(key.len() * 16);
    for k in key {
        let start = out.len();
        match k {
            KeyValue::Ip(ip) => push_ip(&mut out, ip),
            KeyValue::Proto(p) => out.push(p.number()),
            KeyValue::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
            // numgen writes a host-endian integer.
            KeyValue::Index(i) => out.extend_from_slice(&i.to_ne_bytes()),
            KeyValue::Net(n) if end => push_ip(&mut out, &n.broadcast()),
            KeyValue::Net(n) => push_ip(&mut out, &n.network()),
        }
        if concat {
            let len = out.len() - start;
            out.resize(start + len.div_ceil(4) * 4, 0);
        }
    }
    out
}

fn push_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

impl Batch<'_> {
    /// Element messages, in chunks of [`ELEMENTS_PER_MESSAGE`].
    pub(super) fn elems_msg(
        &mut self,
        op: usize,
        ty: u16,
        set: &str,
        set_id: Option<u32>,
        elems: &[ElemSpec],
    ) -> Result<(), NetlinkError> {
        use nftnl_sys::*;
        for chunk in elems.chunks(ELEMENTS_PER_MESSAGE) {
            let flags = if ty == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
            let mut m = self.msg(op, ty, flags);
            let mut s = self.set_obj()?;
            match set_id {
                // A set created earlier in this batch is found by its id alone: the
                // kernel looks a name up by walking every set of the table (10k+ on a
                // large cluster), an id in the batch's list of new sets, newest first.
                Some(id) => s.u32(NFTNL_SET_ID, id),
                None => s.str(NFTNL_SET_NAME, set)?,
            };
            for spec in chunk {
                let mut e = SetElem::new()?;
                e.data(NFTNL_SET_ELEM_KEY, &spec.key)?;
                if let Some(end) = &spec.key_end {
                    e.data(NFTNL_SET_ELEM_KEY_END, end)?;
                }
                if spec.flags != 0 {
                    e.u32(NFTNL_SET_ELEM_FLAGS, spec.flags);
                }
                if ty == NFT_MSG_NEWSETELEM {
                    if let Some(v) = &spec.verdict {
                        e.u32(NFTNL_SET_ELEM_VERDICT, verdict_code(v) as u32);
                        if let Verdict::Jump(c) | Verdict::Goto(c) = v {
                            e.str(NFTNL_SET_ELEM_CHAIN, c)?;
                        }
                    }
                    if let Some(d) = &spec.data {
                        e.data(NFTNL_SET_ELEM_DATA, d)?;
                    }
                    if let Some(c) = &spec.comment {
                        e.data(NFTNL_SET_ELEM_USERDATA, &udata(UDATA_COMMENT, c))?;
                    }
                }
                s.add_elem(e);
            }
            s.build_elems(&mut m)?;
            self.push(m)?;
        }
        Ok(())
    }
}
