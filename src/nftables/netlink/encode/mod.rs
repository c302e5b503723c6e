//! The pure encoder: a [`Transaction`] becomes the bytes of one nftables netlink batch
//! (through libnftnl's serializers, wrapped in [`crate::sys::nftnl`]). No I/O: what it
//! produces is tested byte for byte.
//!
//! Encodings mirror what `nft` sends for the same rule text, so `nft list table` shows
//! the same ruleset whichever way it was loaded. By part: this module frames the batch
//! and writes tables, chains and rules; [`expr`] the expressions of a rule (registers,
//! concatenated keys, lookups, map-based DNAT, dynamic-set updates); [`set`] set and map
//! definitions (key and data types, concatenation field lengths, nft's `typeof` user
//! data) and anonymous sets; [`elem`] elements (concatenated keys, interval ends, data
//! values).

mod elem;
mod expr;
mod set;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_maps;
mod wire;

use std::net::IpAddr;

use super::abi::*;
use super::NetlinkError;
use crate::nftables::transaction::{
    Chain, ChainType, Element, Family, Op, Rule, Transaction, Verdict,
};
use crate::sys::nftnl::{
    Chain as NlChain, Expr as NlExpr, NlMsg, Rule as NlRule, Set as NlSet, Table,
};

pub(in crate::nftables::netlink) use elem::key_bytes;
use elem::ElemSpec;

/// Elements per NEWSETELEM message: keeps each message well under the 64 KiB that
/// netlink attributes can describe.
const ELEMENTS_PER_MESSAGE: usize = 200;

/// `NFNL_MSG_BATCH_BEGIN` / `_END`.
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;

/// Names for anonymous sets, unique for as long as their owner (one socket) lives.
///
/// nft sends `__set%d` and lets the kernel pick a free number, which scans every set of
/// the table with sscanf for each new one: quadratic on a cold sync of thousands of
/// Services. The kernel also finds a set by name by comparing against every set of the
/// table (length, then bytes), so names are short and differ early:
/// `__<counter><kind><suffix>`, the counter in hex first, then `m` (map) or `s` (set),
/// then a 24-bit suffix chosen per owner, so they never repeat a set another process
/// (or socket) left behind.
#[derive(Debug, Clone)]
pub(crate) struct AnonNames {
    next: u64,
    suffix: u32,
}

impl AnonNames {
    /// Names with a suffix derived from `seed` (a clock reading and the socket's port
    /// id: sockets open at the same time have different port ids).
    pub(crate) fn new(seed: u64) -> AnonNames {
        // Mix the seed so that owners started close together differ in every bit.
        let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        AnonNames {
            next: 0,
            suffix: (mixed as u32 & 0xff_ffff).max(1),
        }
    }

    fn name(&mut self, kind: char) -> String {
        let n = self.next;
        self.next += 1;
        format!("__{n:x}{kind}{:06x}", self.suffix)
    }

    /// Called with the anonymous set names found in the kernel (read-back before a full
    /// sync): if one of them carries our suffix (another owner's, by a 1-in-16M
    /// chance), pick another, so our next names cannot collide with it.
    pub(crate) fn avoid<'a>(&mut self, names: impl Iterator<Item = &'a str> + Clone) {
        loop {
            let tail = format!("{:06x}", self.suffix);
            if !names.clone().any(|n| n.ends_with(&tail)) {
                return;
            }
            self.suffix = (self.suffix.wrapping_mul(2_654_435_761) >> 8 & 0xff_ffff).max(1);
        }
    }
}

/// An encoded batch.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// The datagram.
    pub(crate) bytes: Vec<u8>,
    /// Sequence number -> index of the operation it carries.
    pub(crate) seq_to_op: Vec<(u32, usize)>,
    /// The first sequence number after the batch.
    pub(crate) next_seq: u32,
}

impl Encoded {
    /// The operation a sequence number carries.
    pub(crate) fn op_of(&self, seq: u32) -> Option<usize> {
        self.seq_to_op
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, i)| *i)
    }
}

/// nft stores comments as one TLV: type, length (with the NUL), text, NUL.
fn udata(kind: u8, text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let len = bytes.len().min(254);
    let mut out = vec![kind, (len + 1) as u8];
    out.extend_from_slice(&bytes[..len]);
    out.push(0);
    out
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn verdict_code(v: &Verdict) -> i32 {
    match v {
        Verdict::Jump(_) => NFT_JUMP,
        Verdict::Goto(_) => NFT_GOTO,
        Verdict::Drop => NF_DROP as i32,
        Verdict::Accept => NF_ACCEPT as i32,
        Verdict::Return => NFT_RETURN,
    }
}

/// What a batch is made of: message bytes and, per sequence number, the operation.
pub(super) struct Batch<'n> {
    bytes: Vec<u8>,
    seq_to_op: Vec<(u32, usize)>,
    next_seq: u32,
    next_set_id: u32,
    family: Family,
    table: String,
    names: &'n mut AnonNames,
}

impl<'n> Batch<'n> {
    fn new(
        tx: &Transaction,
        first_seq: u32,
        names: &'n mut AnonNames,
        mut bytes: Vec<u8>,
    ) -> Batch<'n> {
        bytes.clear();
        // Sized up front (a rule is ~200-400 bytes): growing a multi-megabyte buffer
        // by doubling costs copies and fresh zeroed pages on a cold sync.
        bytes.reserve(4096 + tx.ops.len() * 320);
        let mut b = Batch {
            bytes,
            seq_to_op: Vec::new(),
            next_seq: first_seq,
            next_set_id: 1,
            family: tx.family,
            table: tx.table.clone(),
            names,
        };
        b.control(BATCH_BEGIN);
        b
    }

    fn seq(&mut self, op: usize) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.seq_to_op.push((s, op));
        s
    }

    fn control(&mut self, ty: u16) {
        // Batch delimiters: a bare nfgenmsg whose res_id names the nftables subsystem.
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut m = [0u8; 20];
        m[0..4].copy_from_slice(&20u32.to_ne_bytes());
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m[6..8].copy_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16] = 0; // AF_UNSPEC
        m[17] = 0; // NFNETLINK_V0
        m[18..20].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        self.bytes.extend_from_slice(&m);
    }

    fn push(&mut self, msg: NlMsg) -> Result<(), NetlinkError> {
        // Netlink messages are 4-byte aligned (`append_to` pads).
        Ok(msg.append_to(&mut self.bytes)?)
    }

    fn fam(&self) -> u8 {
        self.family.nfproto()
    }

    fn msg(&mut self, op: usize, ty: u16, flags: u16) -> NlMsg {
        let seq = self.seq(op);
        NlMsg::new(ty, self.fam(), flags, seq)
    }

    fn table_msg(
        &mut self,
        op: usize,
        ty: u16,
        flags: u16,
        comment: Option<&str>,
    ) -> Result<(), NetlinkError> {
        let mut m = self.msg(op, ty, flags);
        let mut t = Table::new()?;
        t.str(nftnl_sys::NFTNL_TABLE_NAME, &self.table)?
            .u32(nftnl_sys::NFTNL_TABLE_FAMILY, u32::from(self.fam()));
        if let Some(c) = comment {
            t.data(nftnl_sys::NFTNL_TABLE_USERDATA, &udata(UDATA_COMMENT, c))?;
        }
        t.build(&mut m)?;
        self.push(m)
    }

    fn chain_obj(&self, name: &str) -> Result<NlChain, NetlinkError> {
        use nftnl_sys::*;
        let mut ch = NlChain::new()?;
        ch.str(NFTNL_CHAIN_TABLE, &self.table)?
            .str(NFTNL_CHAIN_NAME, name)?
            .u32(NFTNL_CHAIN_FAMILY, u32::from(self.fam()));
        Ok(ch)
    }

    fn chain_msg(&mut self, op: usize, c: &Chain) -> Result<(), NetlinkError> {
        use nftnl_sys::*;
        let mut m = self.msg(op, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        let mut ch = self.chain_obj(&c.name)?;
        if let Some(b) = &c.base {
            let kind = match b.kind {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
            };
            ch.u32(NFTNL_CHAIN_HOOKNUM, b.hook.number())
                .u32(NFTNL_CHAIN_PRIO, b.priority as u32)
                .str(NFTNL_CHAIN_TYPE, kind)?;
        }
        if let Some(cm) = &c.comment {
            ch.data(NFTNL_CHAIN_USERDATA, &udata(UDATA_COMMENT, cm))?;
        }
        ch.build(&mut m)?;
        self.push(m)
    }

    /// DELCHAIN; or DELRULE with a rule naming only the chain, which makes the kernel
    /// delete every rule of it (a flush).
    fn chain_name_msg(&mut self, op: usize, ty: u16, name: &str) -> Result<(), NetlinkError> {
        use nftnl_sys::*;
        let mut m = self.msg(op, ty, 0);
        if ty == NFT_MSG_DELRULE {
            let mut r = NlRule::new()?;
            r.str(NFTNL_RULE_TABLE, &self.table)?
                .str(NFTNL_RULE_CHAIN, name)?
                .u32(NFTNL_RULE_FAMILY, u32::from(self.fam()));
            r.build(&mut m)?;
        } else {
            self.chain_obj(name)?.build(&mut m)?;
        }
        self.push(m)
    }

    fn set_obj(&self) -> Result<NlSet, NetlinkError> {
        use nftnl_sys::*;
        let mut s = NlSet::new()?;
        s.str(NFTNL_SET_TABLE, &self.table)?
            .u32(NFTNL_SET_FAMILY, u32::from(self.fam()));
        Ok(s)
    }

    /// DELSET, or DELSETELEM with no elements (= flush the set).
    fn set_ref_msg(&mut self, op: usize, ty: u16, name: &str) -> Result<(), NetlinkError> {
        let mut m = self.msg(op, ty, 0);
        let mut s = self.set_obj()?;
        s.str(nftnl_sys::NFTNL_SET_NAME, name)?;
        if ty == NFT_MSG_DELSET {
            s.build(&mut m)?;
        } else {
            s.build_elems(&mut m)?;
        }
        self.push(m)
    }

    fn rule_msg(&mut self, op: usize, rule: &Rule) -> Result<(), NetlinkError> {
        use nftnl_sys::*;
        // Anonymous sets the rule uses go first, in the same batch.
        let mut exprs: Vec<NlExpr> = Vec::new();
        let fam = self.family;
        for e in &rule.exprs {
            self.encode_expr(op, fam, e, &mut exprs)?;
        }
        let mut m = self.msg(op, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        let mut r = NlRule::new()?;
        r.str(NFTNL_RULE_TABLE, &self.table)?
            .str(NFTNL_RULE_CHAIN, &rule.chain)?
            .u32(NFTNL_RULE_FAMILY, u32::from(self.fam()));
        for e in exprs {
            r.add_expr(e);
        }
        if let Some(c) = &rule.comment {
            r.data(NFTNL_RULE_USERDATA, &udata(UDATA_COMMENT, c))?;
        }
        r.build(&mut m)?;
        self.push(m)
    }

    fn finish(mut self) -> Encoded {
        self.control(BATCH_END);
        Encoded {
            bytes: self.bytes,
            seq_to_op: self.seq_to_op,
            next_seq: self.next_seq,
        }
    }
}

/// Encodes a transaction into one batch whose sequence numbers start at `first_seq`,
/// naming anonymous sets from `names`.
#[cfg(test)]
pub(crate) fn encode(
    tx: &Transaction,
    first_seq: u32,
    names: &mut AnonNames,
) -> Result<Encoded, NetlinkError> {
    encode_into(tx, first_seq, names, Vec::new())
}

/// [`encode`] into `buffer` (its contents replaced; its allocation kept), so that a
/// sender can reuse one buffer for every batch.
pub(crate) fn encode_into(
    tx: &Transaction,
    first_seq: u32,
    names: &mut AnonNames,
    buffer: Vec<u8>,
) -> Result<Encoded, NetlinkError> {
    let mut b = Batch::new(tx, first_seq, names, buffer);
    let mut i = 0;
    while i < tx.ops.len() {
        let op = &tx.ops[i];
        match op {
            Op::AddTable { comment } => {
                b.table_msg(i, NFT_MSG_NEWTABLE, NLM_F_CREATE, comment.as_deref())?
            }
            Op::DeleteTable => b.table_msg(i, NFT_MSG_DELTABLE, 0, None)?,
            Op::AddChain(c) => b.chain_msg(i, c)?,
            Op::FlushChain(n) => b.chain_name_msg(i, NFT_MSG_DELRULE, n)?,
            Op::DeleteChain(n) => b.chain_name_msg(i, NFT_MSG_DELCHAIN, n)?,
            Op::AddRule(r) => b.rule_msg(i, r)?,
            Op::AddSet(s) => b.add_set(i, s)?,
            Op::FlushSet { name, .. } => b.set_ref_msg(i, NFT_MSG_DELSETELEM, name)?,
            Op::DeleteSet { name, .. } => b.set_ref_msg(i, NFT_MSG_DELSET, name)?,
            Op::AddElement(e) | Op::DeleteElement(e) => {
                // Consecutive element operations of one kind on one set share messages
                // (an error then names the first operation of the group).
                let adding = matches!(op, Op::AddElement(_));
                let ty = if adding {
                    NFT_MSG_NEWSETELEM
                } else {
                    NFT_MSG_DELSETELEM
                };
                let mut group: Vec<&Element> = Vec::new();
                let mut j = i;
                while let Some(Op::AddElement(x) | Op::DeleteElement(x)) = tx.ops.get(j) {
                    if x.set != e.set || matches!(tx.ops[j], Op::AddElement(_)) != adding {
                        break;
                    }
                    if !ElemSpec::supported(x) {
                        return Err(NetlinkError::Unsupported {
                            index: j,
                            what: "an interval element of a one-field set",
                        });
                    }
                    group.push(x);
                    j += 1;
                }
                b.elems_msg(i, ty, &e.set, None, &group)?;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    Ok(b.finish())
}
