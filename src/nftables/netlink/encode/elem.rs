//! Elements: keys (concatenations of 32-bit-aligned fields), the inclusive end of an
//! interval key in a concatenated (pipapo) set, data values and verdicts.

use std::net::IpAddr;

use super::{udata, verdict_code, Batch, ELEMENTS_PER_MESSAGE};
use crate::nftables::netlink::abi::*;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::transaction::{Element, KeyValue, Verdict};
use crate::sys::nftnl::SetElem;
use crate::sys::SysError;

use super::wire;

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

    /// Whether a transaction's element can be encoded: not a prefix in a one-field
    /// key (see [`ElemSpec::of`]).
    pub(super) fn supported(e: &Element) -> bool {
        let interval = e.key.iter().any(|k| matches!(k, KeyValue::Net(_)));
        !(interval && e.key.len() == 1)
    }

    /// The encoding of a transaction's element; `None` for a prefix in a one-field
    /// key (an rbtree interval set, whose elements nft sends as start and end
    /// elements: no layout writes one as a named set).
    #[cfg(test)]
    pub(super) fn of(e: &Element) -> Option<ElemSpec> {
        if !ElemSpec::supported(e) {
            return None;
        }
        let interval = e.key.iter().any(|k| matches!(k, KeyValue::Net(_)));
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
    let mut out = Vec::with_capacity(key.len() * 16);
    write_key(&mut out, key, end);
    out
}

/// [`key_bytes`] appended to `out` (no buffer per key or component: a cold sync
/// encodes a quarter of a million keys).
fn write_key(out: &mut Vec<u8>, key: &[KeyValue], end: bool) {
    let concat = key.len() > 1;
    for k in key {
        let start = out.len();
        match k {
            KeyValue::Ip(ip) => push_ip(out, ip),
            KeyValue::Proto(p) => out.push(p.number()),
            KeyValue::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
            // numgen writes a host-endian integer.
            KeyValue::Index(i) => out.extend_from_slice(&i.to_ne_bytes()),
            KeyValue::Net(n) if end => push_ip(out, &n.broadcast()),
            KeyValue::Net(n) => push_ip(out, &n.network()),
        }
        if concat {
            let len = out.len() - start;
            out.resize(start + len.div_ceil(4) * 4, 0);
        }
    }
}

fn push_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

// NFTA_SET_ELEM_LIST_*, NFTA_SET_ELEM_*, NFTA_DATA_* and NFTA_VERDICT_* attribute
// numbers (linux/netfilter/nf_tables.h).
const LIST_TABLE: u16 = 1;
const LIST_SET: u16 = 2;
const LIST_ELEMENTS: u16 = 3;
const LIST_SET_ID: u16 = 4;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
#[cfg(test)]
const ELEM_FLAGS: u16 = 3;
const ELEM_USERDATA: u16 = 6;
const ELEM_KEY_END: u16 = 10;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;

/// What an element message is written from: a transaction's element as it is (no
/// intermediate copy of its bytes; in tests also an [`ElemSpec`]).
pub(super) trait ElemSource {
    /// Writes the element's attributes (inside its list nest), in libnftnl's order:
    /// flags, key, key end, then for an addition verdict, data and comment.
    fn write(&self, out: &mut Vec<u8>, adding: bool) -> Result<(), SysError>;
}

fn put_value(out: &mut Vec<u8>, ty: u16, bytes: impl FnOnce(&mut Vec<u8>)) -> Result<(), SysError> {
    let n = wire::nest(out, ty);
    let v = wire::start(out, DATA_VALUE);
    bytes(out);
    wire::end(out, v)?;
    wire::end(out, n)
}

fn put_verdict(out: &mut Vec<u8>, v: &Verdict) -> Result<(), SysError> {
    let data = wire::nest(out, ELEM_DATA);
    let verdict = wire::nest(out, DATA_VERDICT);
    wire::put_be32(out, VERDICT_CODE, verdict_code(v) as u32)?;
    if let Verdict::Jump(c) | Verdict::Goto(c) = v {
        wire::put_strz(out, VERDICT_CHAIN, c)?;
    }
    wire::end(out, verdict)?;
    wire::end(out, data)
}

#[cfg(test)]
impl ElemSource for ElemSpec {
    fn write(&self, out: &mut Vec<u8>, adding: bool) -> Result<(), SysError> {
        if self.flags != 0 {
            wire::put_be32(out, ELEM_FLAGS, self.flags)?;
        }
        put_value(out, ELEM_KEY, |o| o.extend_from_slice(&self.key))?;
        if let Some(end) = &self.key_end {
            put_value(out, ELEM_KEY_END, |o| o.extend_from_slice(end))?;
        }
        if adding {
            if let Some(v) = &self.verdict {
                put_verdict(out, v)?;
            }
            if let Some(d) = &self.data {
                put_value(out, ELEM_DATA, |o| o.extend_from_slice(d))?;
            }
            if let Some(c) = &self.comment {
                wire::put(out, ELEM_USERDATA, &udata(UDATA_COMMENT, c))?;
            }
        }
        Ok(())
    }
}

impl ElemSource for &Element {
    fn write(&self, out: &mut Vec<u8>, adding: bool) -> Result<(), SysError> {
        // As [`ElemSpec::of`] (the caller has refused one-field intervals).
        put_value(out, ELEM_KEY, |o| write_key(o, &self.key, false))?;
        if self.key.iter().any(|k| matches!(k, KeyValue::Net(_))) {
            put_value(out, ELEM_KEY_END, |o| write_key(o, &self.key, true))?;
        }
        if adding {
            if let Some(v) = &self.value {
                put_verdict(out, v)?;
            }
            if !self.data.is_empty() {
                put_value(out, ELEM_DATA, |o| write_key(o, &self.data, false))?;
            }
            if let Some(c) = &self.comment {
                wire::put(out, ELEM_USERDATA, &udata(UDATA_COMMENT, c))?;
            }
        }
        Ok(())
    }
}

impl Batch<'_> {
    /// Element messages, in chunks of [`ELEMENTS_PER_MESSAGE`], written directly into
    /// the batch: through libnftnl each element was an allocation plus copies of its
    /// key and data, for a few dozen bytes each (a cold sync of 10k Services writes a
    /// quarter of a million). The bytes are libnftnl's (checked in the tests).
    pub(super) fn elems_msg<E: ElemSource>(
        &mut self,
        op: usize,
        ty: u16,
        set: &str,
        set_id: Option<u32>,
        elems: &[E],
    ) -> Result<(), NetlinkError> {
        let adding = ty == NFT_MSG_NEWSETELEM;
        let flags = if adding { NLM_F_CREATE } else { 0 };
        for chunk in elems.chunks(ELEMENTS_PER_MESSAGE) {
            let seq = self.seq(op);
            let family = self.fam();
            let out = &mut self.bytes;
            let msg = wire::msg_start(out, ty, family, flags, seq);
            match set_id {
                // A set created earlier in this batch is found by its id alone: the
                // kernel looks a name up by walking every set of the table (10k+ on a
                // large cluster), an id in the batch's list of new sets, newest first.
                Some(id) => wire::put_be32(out, LIST_SET_ID, id)?,
                None => wire::put_strz(out, LIST_SET, set)?,
            }
            wire::put_strz(out, LIST_TABLE, &self.table)?;
            let list = wire::nest(out, LIST_ELEMENTS);
            for (i, e) in chunk.iter().enumerate() {
                // libnftnl numbers the list's nests 1, 2, … (the kernel ignores it).
                let n = wire::nest(out, i as u16 + 1);
                e.write(out, adding)?;
                wire::end(out, n)?;
            }
            wire::end(out, list)?;
            wire::msg_end(out, msg)?;
        }
        Ok(())
    }
}

impl Batch<'_> {
    /// Element messages through libnftnl: the anonymous sets' (a rule's few
    /// elements, found by set id), and the reference [`Batch::elems_msg`]'s bytes
    /// are checked against.
    pub(super) fn elems_msg_nftnl(
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

#[cfg(test)]
mod tests {
    use super::super::{AnonNames, Batch};
    use super::*;
    use crate::model::Protocol;
    use crate::nftables::transaction::{Family, Transaction};

    fn elements(n: usize) -> Vec<Element> {
        let plain = |key: Vec<KeyValue>, data: Vec<KeyValue>| Element {
            set: "s".into(),
            key,
            comment: None,
            value: None,
            data,
        };
        (0..n)
            .map(|i| {
                let v4: IpAddr = format!("10.{}.{}.1", i / 256, i % 256).parse().unwrap();
                let v6: IpAddr = format!("fd00::{i:x}").parse().unwrap();
                let ipp = vec![
                    KeyValue::Ip(v4),
                    KeyValue::Proto(Protocol::Tcp),
                    KeyValue::Port(80),
                ];
                match i % 7 {
                    0 => plain(ipp, vec![]),
                    1 => {
                        let mut key = ipp;
                        key.push(KeyValue::Index(i as u32));
                        plain(key, vec![KeyValue::Ip(v4), KeyValue::Port(8080)])
                    }
                    2 => Element {
                        value: Some(Verdict::Goto(format!("service-{i}"))),
                        ..plain(ipp, vec![])
                    },
                    3 => Element {
                        value: Some(Verdict::Drop),
                        comment: Some(format!("comment {i}")),
                        ..plain(vec![KeyValue::Ip(v6)], vec![])
                    },
                    4 => {
                        let mut key = ipp;
                        key.push(KeyValue::Net("203.0.113.0/25".parse().unwrap()));
                        plain(key, vec![])
                    }
                    5 => plain(
                        vec![KeyValue::Proto(Protocol::Udp), KeyValue::Port(30000)],
                        vec![KeyValue::Ip(v6), KeyValue::Port(53)],
                    ),
                    _ => plain(vec![KeyValue::Ip(v4), KeyValue::Ip(v4)], vec![]),
                }
            })
            .collect()
    }

    /// Zeroes the padding after every attribute, nested ones included: libmnl leaves
    /// whatever its buffer held there (the kernel ignores it), this encoder zeros.
    fn zero_padding(b: &mut [u8]) {
        fn attrs(b: &mut [u8], mut at: usize, end: usize) {
            while at + 4 <= end {
                let len = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
                let ty = u16::from_ne_bytes([b[at + 2], b[at + 3]]);
                if len < 4 {
                    return;
                }
                if ty & 0x8000 != 0 {
                    attrs(b, at + 4, at + len);
                }
                let next = (at + len).next_multiple_of(4).min(end);
                b[at + len..next].fill(0);
                at = next;
            }
        }
        let mut at = 0;
        while at + 20 <= b.len() {
            let len = u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            attrs(b, at + 20, at + len);
            at += len.next_multiple_of(4);
        }
    }

    /// Equal but for padding, or a panic naming the first differing byte (whole
    /// batches are long).
    fn same(got: &[u8], want: &[u8], what: &str) {
        let (mut got, mut want) = (got.to_vec(), want.to_vec());
        zero_padding(&mut want);
        let unpadded = got.clone();
        zero_padding(&mut got);
        assert_eq!(got, unpadded, "{what}: this encoder's padding is zeros");
        let (got, want) = (&got, &want);
        if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
            let around = |b: &[u8]| b[i.saturating_sub(24)..(i + 24).min(b.len())].to_vec();
            panic!(
                "{what}: byte {i} of {} / {}:\n got {:?}\nwant {:?}",
                got.len(),
                want.len(),
                around(got),
                around(want)
            );
        }
    }

    fn bytes(f: impl FnOnce(&mut Batch<'_>)) -> Vec<u8> {
        let tx = Transaction::new(Family::Ip6, "kproxy");
        let mut names = AnonNames::new(7);
        let mut b = Batch::new(&tx, 40, &mut names, Vec::new());
        f(&mut b);
        b.finish().bytes
    }

    /// The element messages written here are libnftnl's, byte for byte: every kind
    /// of key, value and comment, additions and deletions, several messages.
    #[test]
    fn element_messages_are_what_libnftnl_writes() {
        let all = elements(450);
        let specs: Vec<ElemSpec> = all.iter().map(|e| ElemSpec::of(e).unwrap()).collect();
        let refs: Vec<&Element> = all.iter().collect();
        for ty in [NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM] {
            let want = bytes(|b| b.elems_msg_nftnl(3, ty, "s", None, &specs).unwrap());
            let got = bytes(|b| b.elems_msg(3, ty, "s", None, &refs).unwrap());
            same(&got, &want, &format!("type {ty}"));
            let from_specs = bytes(|b| b.elems_msg(3, ty, "s", None, &specs).unwrap());
            same(&from_specs, &want, &format!("type {ty}, from specs"));
        }
        // Anonymous sets' elements: flags, verdicts, found by set id.
        let anon = vec![
            ElemSpec::key(vec![1, 2, 3, 4], NFT_SET_ELEM_INTERVAL_END, None),
            ElemSpec::key(vec![0; 4], 0, Some(Verdict::Jump("c".into()))),
        ];
        let want = bytes(|b| {
            b.elems_msg_nftnl(0, NFT_MSG_NEWSETELEM, "__0s1", Some(9), &anon)
                .unwrap()
        });
        let got = bytes(|b| {
            b.elems_msg(0, NFT_MSG_NEWSETELEM, "__0s1", Some(9), &anon)
                .unwrap()
        });
        same(&got, &want, "anonymous");
    }

    #[test]
    fn a_name_with_a_nul_byte_is_refused() {
        let all = elements(1);
        let refs: Vec<&Element> = all.iter().collect();
        let tx = Transaction::new(Family::Ip, "kproxy");
        let mut names = AnonNames::new(7);
        let mut b = Batch::new(&tx, 1, &mut names, Vec::new());
        assert!(b
            .elems_msg(0, NFT_MSG_NEWSETELEM, "a\0b", None, &refs)
            .is_err());
    }
}
