//! The pure encoder: a [`Transaction`] becomes the bytes of one nftables netlink batch
//! (through libnftnl's serializers, wrapped in [`crate::sys::nftnl`]). No I/O: what it
//! produces is tested byte for byte.
//!
//! Encodings mirror what `nft` sends for the same rule text, so `nft list table` shows
//! the same ruleset whichever way it was loaded.

use std::net::IpAddr;

use ipnet::IpNet;

use super::abi::*;
use super::NetlinkError;
use crate::nftables::transaction::{
    AddrMatch, Chain, ChainType, DataType, Expr, Family, Field, KeyValue, Op, Rule, Set, SetFlag,
    Transaction, Verdict,
};
use crate::sys::nftnl::{
    Chain as NlChain, Expr as NlExpr, NlMsg, Rule as NlRule, Set as NlSet, SetElem, Table,
};

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

/// One element to encode: key bytes, element flags, verdict, comment.
type ElemSpec = (Vec<u8>, u32, Option<Verdict>, Option<String>);

/// What a batch is made of: message bytes and, per sequence number, the operation.
struct Batch<'n> {
    bytes: Vec<u8>,
    seq_to_op: Vec<(u32, usize)>,
    next_seq: u32,
    next_set_id: u32,
    family: Family,
    table: String,
    names: &'n mut AnonNames,
}

impl<'n> Batch<'n> {
    fn new(tx: &Transaction, first_seq: u32, names: &'n mut AnonNames) -> Batch<'n> {
        let mut b = Batch {
            // Sized up front (a rule is ~200-400 bytes): growing a multi-megabyte
            // buffer by doubling costs copies and fresh zeroed pages on a cold sync.
            bytes: Vec::with_capacity(4096 + tx.ops.len() * 320),
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

    /// Creates a set; returns the set id used.
    #[allow(clippy::too_many_arguments)]
    fn set_msg(
        &mut self,
        op: usize,
        name: &str,
        key_type: u32,
        key_len: u32,
        flags: u32,
        is_map: bool,
        timeout_ms: Option<u64>,
        size: Option<u32>,
        user: Option<Vec<u8>>,
    ) -> Result<u32, NetlinkError> {
        use nftnl_sys::*;
        let mut m = self.msg(op, NFT_MSG_NEWSET, NLM_F_CREATE);
        let id = self.next_set_id;
        self.next_set_id += 1;
        let mut s = self.set_obj()?;
        s.str(NFTNL_SET_NAME, name)?
            .u32(NFTNL_SET_ID, id)
            .u32(NFTNL_SET_KEY_TYPE, key_type)
            .u32(NFTNL_SET_KEY_LEN, key_len);
        let mut f = flags;
        if is_map {
            f |= NFT_SET_MAP;
            s.u32(NFTNL_SET_DATA_TYPE, NFT_DATA_VERDICT)
                .u32(NFTNL_SET_DATA_LEN, 16);
        }
        s.u32(NFTNL_SET_FLAGS, f);
        if let Some(t) = timeout_ms {
            s.u64(NFTNL_SET_TIMEOUT, t);
        }
        if let Some(sz) = size {
            s.u32(NFTNL_SET_DESC_SIZE, sz);
        }
        if let Some(u) = &user {
            s.data(NFTNL_SET_USERDATA, u)?;
        }
        s.build(&mut m)?;
        self.push(m)?;
        Ok(id)
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

    /// Element messages, in chunks of [`ELEMENTS_PER_MESSAGE`].
    fn elems_msg(
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
            for (key, eflags, verdict, comment) in chunk {
                let mut e = SetElem::new()?;
                e.data(NFTNL_SET_ELEM_KEY, key)?;
                if *eflags != 0 {
                    e.u32(NFTNL_SET_ELEM_FLAGS, *eflags);
                }
                if ty == NFT_MSG_NEWSETELEM {
                    if let Some(v) = verdict {
                        e.u32(NFTNL_SET_ELEM_VERDICT, verdict_code(v) as u32);
                        if let Verdict::Jump(c) | Verdict::Goto(c) = v {
                            e.str(NFTNL_SET_ELEM_CHAIN, c)?;
                        }
                    }
                    if let Some(c) = comment {
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

    fn encode_expr(
        &mut self,
        op: usize,
        fam: Family,
        e: &Expr,
        out: &mut Vec<NlExpr>,
    ) -> Result<(), NetlinkError> {
        use nftnl_sys::*;
        let addr_len = match fam {
            Family::Ip => 4u32,
            Family::Ip6 => 16u32,
        };
        let addr_off = |f: Field| match (fam, f) {
            (Family::Ip, Field::Saddr) => 12,
            (Family::Ip, _) => 16,
            (Family::Ip6, Field::Saddr) => 8,
            (Family::Ip6, _) => 24,
        };
        let payload = |base: u32, off: u32, len: u32, dreg: u32| -> Result<NlExpr, NetlinkError> {
            Ok(NlExpr::new("payload")?
                .u32(NFTNL_EXPR_PAYLOAD_DREG, dreg)
                .u32(NFTNL_EXPR_PAYLOAD_BASE, base)
                .u32(NFTNL_EXPR_PAYLOAD_OFFSET, off)
                .u32(NFTNL_EXPR_PAYLOAD_LEN, len))
        };
        let cmp = |op_: u32, data: &[u8]| -> Result<NlExpr, NetlinkError> {
            Ok(NlExpr::new("cmp")?
                .u32(NFTNL_EXPR_CMP_SREG, NFT_REG_1)
                .u32(NFTNL_EXPR_CMP_OP, op_)
                .data(NFTNL_EXPR_CMP_DATA, data)?)
        };
        let bitwise = |len: u32, mask: &[u8], xor: &[u8]| -> Result<NlExpr, NetlinkError> {
            Ok(NlExpr::new("bitwise")?
                .u32(NFTNL_EXPR_BITWISE_SREG, NFT_REG_1)
                .u32(NFTNL_EXPR_BITWISE_DREG, NFT_REG_1)
                .u32(NFTNL_EXPR_BITWISE_LEN, len)
                .data(NFTNL_EXPR_BITWISE_MASK, mask)?
                .data(NFTNL_EXPR_BITWISE_XOR, xor)?)
        };
        let meta_load = |key: u32, dreg: u32| -> Result<NlExpr, NetlinkError> {
            Ok(NlExpr::new("meta")?
                .u32(NFTNL_EXPR_META_KEY, key)
                .u32(NFTNL_EXPR_META_DREG, dreg))
        };
        let lookup = |set: &str,
                      id: Option<u32>,
                      dreg: Option<u32>,
                      inv: bool|
         -> Result<NlExpr, NetlinkError> {
            let mut l = NlExpr::new("lookup")?
                .u32(NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1)
                .str(NFTNL_EXPR_LOOKUP_SET, set)?;
            if let Some(id) = id {
                l = l.u32(NFTNL_EXPR_LOOKUP_SET_ID, id);
            }
            if let Some(d) = dreg {
                l = l.u32(NFTNL_EXPR_LOOKUP_DREG, d);
            }
            if inv {
                l = l.u32(NFTNL_EXPR_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
            }
            Ok(l)
        };
        let verdict = |v: &Verdict| -> Result<NlExpr, NetlinkError> {
            let (code, chain) = match v {
                Verdict::Jump(c) => (NFT_JUMP, Some(c)),
                Verdict::Goto(c) => (NFT_GOTO, Some(c)),
                Verdict::Drop => (NF_DROP as i32, None),
                Verdict::Accept => (NF_ACCEPT as i32, None),
                Verdict::Return => (NFT_RETURN, None),
            };
            let mut i = NlExpr::new("immediate")?
                .u32(NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT)
                .u32(NFTNL_EXPR_IMM_VERDICT, code as u32);
            if let Some(c) = chain {
                i = i.str(NFTNL_EXPR_IMM_CHAIN, c)?;
            }
            Ok(i)
        };
        match e {
            Expr::Addr {
                field,
                negate,
                value,
            } => {
                let op_ = if *negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
                let off = addr_off(*field);
                // A one-element anonymous set is a plain comparison, as nft optimizes it.
                let single = match value {
                    AddrMatch::Anon(list) if list.len() == 1 => Some(list[0]),
                    AddrMatch::Net(n) => Some(*n),
                    AddrMatch::Addr(a) => Some(IpNet::from(*a)),
                    _ => None,
                };
                if let Some(net) = single {
                    let plen = net.prefix_len() as u32;
                    let bytes = ip_bytes(&net.network());
                    if plen % 8 == 0 {
                        let n = plen / 8;
                        out.push(payload(NFT_PAYLOAD_NETWORK_HEADER, off, n, NFT_REG_1)?);
                        out.push(cmp(op_, &bytes[..n as usize])?);
                    } else {
                        out.push(payload(
                            NFT_PAYLOAD_NETWORK_HEADER,
                            off,
                            addr_len,
                            NFT_REG_1,
                        )?);
                        let mask = ip_bytes(&net.netmask());
                        out.push(bitwise(addr_len, &mask, &vec![0; addr_len as usize])?);
                        out.push(cmp(op_, &bytes)?);
                    }
                    return Ok(());
                }
                out.push(payload(
                    NFT_PAYLOAD_NETWORK_HEADER,
                    off,
                    addr_len,
                    NFT_REG_1,
                )?);
                match value {
                    AddrMatch::Set(s) => out.push(lookup(s, None, None, *negate)?),
                    AddrMatch::Anon(list) => {
                        let (name, id) = self.anon_interval_set(op, fam, list)?;
                        out.push(lookup(&name, Some(id), None, *negate)?);
                    }
                    _ => {}
                }
            }
            Expr::CtStateNew => {
                out.push(
                    NlExpr::new("ct")?
                        .u32(NFTNL_EXPR_CT_KEY, NFT_CT_STATE)
                        .u32(NFTNL_EXPR_CT_DREG, NFT_REG_1),
                );
                out.push(bitwise(4, &8u32.to_ne_bytes(), &[0; 4])?);
                out.push(cmp(NFT_CMP_NEQ, &[0; 4])?);
            }
            Expr::FibLocal { field } => {
                let flags = if *field == Field::Saddr {
                    NFTA_FIB_F_SADDR
                } else {
                    NFTA_FIB_F_DADDR
                };
                out.push(
                    NlExpr::new("fib")?
                        .u32(NFTNL_EXPR_FIB_FLAGS, flags)
                        .u32(NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE)
                        .u32(NFTNL_EXPR_FIB_DREG, NFT_REG_1),
                );
                out.push(cmp(NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes())?);
            }
            Expr::L4Proto(p) => {
                out.push(meta_load(NFT_META_L4PROTO, NFT_REG_1)?);
                out.push(cmp(NFT_CMP_EQ, &[p.number()])?);
            }
            Expr::Iif {
                negate,
                name,
                wildcard,
            } => {
                out.push(meta_load(NFT_META_IIFNAME, NFT_REG_1)?);
                let op_ = if *negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
                if *wildcard {
                    out.push(cmp(op_, name.as_bytes())?);
                } else {
                    let mut b = name.as_bytes().to_vec();
                    b.resize(16, 0);
                    out.push(cmp(op_, &b)?);
                }
            }
            Expr::Vmap { key, map } => {
                // Concatenations use consecutive 32-bit registers from NFT_REG_1.
                let mut word = 0u32;
                for f in key {
                    let reg = if word == 0 {
                        NFT_REG_1
                    } else {
                        NFT_REG32_00 + word
                    };
                    match f {
                        Field::Saddr | Field::Daddr => {
                            out.push(payload(
                                NFT_PAYLOAD_NETWORK_HEADER,
                                addr_off(*f),
                                addr_len,
                                reg,
                            )?);
                            word += addr_len / 4;
                        }
                        Field::L4Proto => {
                            out.push(meta_load(NFT_META_L4PROTO, reg)?);
                            word += 1;
                        }
                        Field::Dport => {
                            out.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg)?);
                            word += 1;
                        }
                    }
                }
                out.push(lookup(map, None, Some(NFT_REG_VERDICT), false)?);
            }
            Expr::NumgenVmap { targets } => {
                let (name, id) = self.anon_numgen_map(op, targets)?;
                out.push(
                    NlExpr::new("numgen")?
                        .u32(NFTNL_EXPR_NG_DREG, NFT_REG_1)
                        .u32(NFTNL_EXPR_NG_MODULUS, targets.len() as u32)
                        .u32(NFTNL_EXPR_NG_TYPE, NFT_NG_RANDOM)
                        .u32(NFTNL_EXPR_NG_OFFSET, 0),
                );
                out.push(lookup(&name, Some(id), Some(NFT_REG_VERDICT), false)?);
            }
            Expr::UpdateSaddr { set } => {
                out.push(payload(
                    NFT_PAYLOAD_NETWORK_HEADER,
                    addr_off(Field::Saddr),
                    addr_len,
                    NFT_REG_1,
                )?);
                out.push(
                    NlExpr::new("dynset")?
                        .u32(NFTNL_EXPR_DYNSET_SREG_KEY, NFT_REG_1)
                        .u32(NFTNL_EXPR_DYNSET_OP, NFT_DYNSET_OP_UPDATE)
                        .u64(NFTNL_EXPR_DYNSET_TIMEOUT, 0)
                        .str(NFTNL_EXPR_DYNSET_SET_NAME, set)?,
                );
            }
            Expr::MarkOr(m) | Expr::MarkXor(m) => {
                out.push(meta_load(NFT_META_MARK, NFT_REG_1)?);
                let (mask, xor) = match e {
                    Expr::MarkOr(_) => (!m, *m),
                    _ => (u32::MAX, *m),
                };
                out.push(bitwise(4, &mask.to_ne_bytes(), &xor.to_ne_bytes())?);
                out.push(
                    NlExpr::new("meta")?
                        .u32(NFTNL_EXPR_META_KEY, NFT_META_MARK)
                        .u32(NFTNL_EXPR_META_SREG, NFT_REG_1),
                );
            }
            Expr::MarkAndIsZero(m) => {
                out.push(meta_load(NFT_META_MARK, NFT_REG_1)?);
                out.push(bitwise(4, &m.to_ne_bytes(), &[0; 4])?);
                out.push(cmp(NFT_CMP_EQ, &[0; 4])?);
            }
            Expr::Masquerade { fully_random } => {
                let mut x = NlExpr::new("masq")?;
                if *fully_random {
                    x = x.u32(NFTNL_EXPR_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY);
                }
                out.push(x);
            }
            Expr::Dnat { addr, port } => {
                out.push(
                    NlExpr::new("immediate")?
                        .u32(NFTNL_EXPR_IMM_DREG, NFT_REG_1)
                        .data(NFTNL_EXPR_IMM_DATA, &ip_bytes(addr))?,
                );
                out.push(
                    NlExpr::new("immediate")?
                        .u32(NFTNL_EXPR_IMM_DREG, NFT_REG_2)
                        .data(NFTNL_EXPR_IMM_DATA, &port.to_be_bytes())?,
                );
                out.push(
                    NlExpr::new("nat")?
                        .u32(NFTNL_EXPR_NAT_TYPE, NFT_NAT_DNAT)
                        .u32(NFTNL_EXPR_NAT_FAMILY, fam.nfproto() as u32)
                        .u32(NFTNL_EXPR_NAT_REG_ADDR_MIN, NFT_REG_1)
                        .u32(NFTNL_EXPR_NAT_REG_ADDR_MAX, NFT_REG_1)
                        .u32(NFTNL_EXPR_NAT_REG_PROTO_MIN, NFT_REG_2)
                        .u32(NFTNL_EXPR_NAT_REG_PROTO_MAX, NFT_REG_2)
                        .u32(
                            NFTNL_EXPR_NAT_FLAGS,
                            NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED,
                        ),
                );
            }
            Expr::Reject => {
                let code = match fam {
                    Family::Ip => 3,  // ICMP_PORT_UNREACH
                    Family::Ip6 => 4, // ICMPV6_PORT_UNREACH
                };
                out.push(
                    NlExpr::new("reject")?
                        .u32(NFTNL_EXPR_REJECT_TYPE, NFT_REJECT_ICMP_UNREACH)
                        .u8(NFTNL_EXPR_REJECT_CODE, code),
                );
            }
            Expr::Verdict(v) => out.push(verdict(v)?),
            Expr::Lookup { .. }
            | Expr::DnatMap { .. }
            | Expr::FibNotLocal { .. }
            | Expr::CtStatusDnat => {
                return Err(NetlinkError::Unsupported {
                    index: op,
                    what: "the maps layout's expressions",
                })
            }
        }
        Ok(())
    }

    fn anon_numgen_map(
        &mut self,
        op: usize,
        targets: &[Verdict],
    ) -> Result<(String, u32), NetlinkError> {
        let name = self.names.name('m');
        // numgen writes a host-endian integer; nft records that byte order in the set's
        // user data (type 0, KEYBYTEORDER = 1, host) so listings show 0, 1, 2 …
        let mut user = vec![0u8, 4];
        user.extend_from_slice(&1u32.to_ne_bytes());
        let id = self.set_msg(
            op,
            &name,
            TYPE_INTEGER,
            4,
            NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
            true,
            None,
            None,
            Some(user),
        )?;
        let elems: Vec<ElemSpec> = targets
            .iter()
            .enumerate()
            .map(|(i, v)| ((i as u32).to_ne_bytes().to_vec(), 0, Some(v.clone()), None))
            .collect();
        self.elems_msg(op, NFT_MSG_NEWSETELEM, &name, Some(id), &elems)?;
        Ok((name, id))
    }

    fn anon_interval_set(
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
            &name,
            ty,
            len,
            NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL,
            false,
            None,
            None,
            None,
        )?;
        let elems: Vec<ElemSpec> = interval_elements(list, len as usize)
            .into_iter()
            .map(|(k, f)| (k, f, None, None))
            .collect();
        self.elems_msg(op, NFT_MSG_NEWSETELEM, &name, Some(id), &elems)?;
        Ok((name, id))
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

/// Interval-set elements for a list of prefixes, as nft encodes them: sorted, merged
/// ranges, each a start element and an end element (first address after the range,
/// flagged INTERVAL_END); a leading end element at zero when the first range does not
/// start there.
fn interval_elements(list: &[IpNet], len: usize) -> Vec<(Vec<u8>, u32)> {
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

fn key_type(key: &[DataType]) -> (u32, u32) {
    let mut ty = 0u32;
    let mut len = 0u32;
    for k in key {
        let (t, l): (u32, u32) = match k {
            DataType::Ipv4Addr => (TYPE_IPADDR, 4),
            DataType::Ipv6Addr => (TYPE_IP6ADDR, 16),
            DataType::InetProto => (TYPE_INET_PROTOCOL, 1),
            DataType::InetService => (TYPE_INET_SERVICE, 2),
            DataType::Verdict => (1, 4),
            DataType::Integer => (TYPE_INTEGER, 4),
            // Only written for sets without data values (checked by `unsupported`).
            DataType::AddrPort(_) => (TYPE_INTEGER, 4),
        };
        ty = (ty << 6) | t;
        // Components of a concatenation each take a whole 32-bit register.
        len += if key.len() > 1 { l.div_ceil(4) * 4 } else { l };
    }
    (ty, len)
}

fn key_bytes(key: &[KeyValue]) -> Vec<u8> {
    let concat = key.len() > 1;
    let mut out = Vec::new();
    for k in key {
        let mut b = match k {
            KeyValue::Ip(ip) => ip_bytes(ip),
            KeyValue::Proto(p) => vec![p.number()],
            KeyValue::Port(p) => p.to_be_bytes().to_vec(),
            // numgen writes a host-endian integer.
            KeyValue::Index(i) => i.to_ne_bytes().to_vec(),
            // Interval keys are refused earlier (`unsupported`); the start alone here.
            KeyValue::Net(n) => ip_bytes(&n.network()),
        };
        if concat {
            b.resize(b.len().div_ceil(4) * 4, 0);
        }
        out.extend_from_slice(&b);
    }
    out
}

/// Encodes a transaction into one batch whose sequence numbers start at `first_seq`,
/// naming anonymous sets from `names`.
pub(crate) fn encode(
    tx: &Transaction,
    first_seq: u32,
    names: &mut AnonNames,
) -> Result<Encoded, NetlinkError> {
    let mut b = Batch::new(tx, first_seq, names);
    let mut i = 0;
    while i < tx.ops.len() {
        let op = &tx.ops[i];
        if let Some(what) = unsupported(op) {
            return Err(NetlinkError::Unsupported { index: i, what });
        }
        match op {
            Op::AddTable { comment } => {
                b.table_msg(i, NFT_MSG_NEWTABLE, NLM_F_CREATE, comment.as_deref())?
            }
            Op::DeleteTable => b.table_msg(i, NFT_MSG_DELTABLE, 0, None)?,
            Op::AddChain(c) => b.chain_msg(i, c)?,
            Op::FlushChain(n) => b.chain_name_msg(i, NFT_MSG_DELRULE, n)?,
            Op::DeleteChain(n) => b.chain_name_msg(i, NFT_MSG_DELCHAIN, n)?,
            Op::AddRule(r) => b.rule_msg(i, r)?,
            Op::AddSet(s) => add_set(&mut b, i, s)?,
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
                let mut group = Vec::new();
                let mut j = i;
                while let Some(Op::AddElement(x) | Op::DeleteElement(x)) = tx.ops.get(j) {
                    if x.set != e.set || matches!(tx.ops[j], Op::AddElement(_)) != adding {
                        break;
                    }
                    group.push((key_bytes(&x.key), 0, x.value.clone(), x.comment.clone()));
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

/// What of an operation the encoder cannot write yet (the maps layout's objects).
fn unsupported(op: &Op) -> Option<&'static str> {
    match op {
        Op::AddSet(s)
            if s.key
                .iter()
                .chain(s.value.iter())
                .any(|t| matches!(t, DataType::Integer | DataType::AddrPort(_))) =>
        {
            Some("data maps and numgen keys")
        }
        Op::AddSet(s) if s.key.len() > 1 && s.flags.contains(&SetFlag::Interval) => {
            Some("concatenated interval sets")
        }
        Op::AddElement(e) | Op::DeleteElement(e)
            if !e.data.is_empty()
                || e.key
                    .iter()
                    .any(|k| matches!(k, KeyValue::Net(_) | KeyValue::Index(_))) =>
        {
            Some("data-map and interval elements")
        }
        _ => None,
    }
}

fn add_set(b: &mut Batch<'_>, op: usize, s: &Set) -> Result<(), NetlinkError> {
    let (ty, len) = key_type(&s.key);
    let mut flags = 0;
    for f in &s.flags {
        flags |= match f {
            SetFlag::Dynamic => NFT_SET_EVAL,
            SetFlag::Timeout => NFT_SET_TIMEOUT,
            SetFlag::Interval => NFT_SET_INTERVAL,
        };
    }
    // nft gives dynamic sets a default size of 65535; do the same so listings match.
    let size = s.flags.contains(&SetFlag::Dynamic).then_some(65535);
    b.set_msg(
        op,
        &s.name,
        ty,
        len,
        flags,
        s.is_map,
        s.timeout.map(|t| u64::from(t) * 1000),
        size,
        s.comment.as_deref().map(|c| udata(UDATA_SET_COMMENT, c)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The encoder's bytes, decoded by a small independent netlink reader and printed
    //! in libnftnl's debug notation, so each expectation reads as `nft --debug=netlink`
    //! prints the same rule (expectations taken from nft 1.0 where it encodes alike).

    use super::*;
    use crate::model::Protocol;
    use crate::nftables::transaction::BaseChain;
    use crate::nftables::transaction::Hook;
    use crate::sys::socket::frames;

    /// The attributes of a netlink attribute stream: (type without flags, payload).
    fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
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

    fn attr(list: &[(u16, &[u8])], ty: u16) -> Option<Vec<u8>> {
        list.iter().find(|(t, _)| *t == ty).map(|(_, v)| v.to_vec())
    }

    fn be32(list: &[(u16, &[u8])], ty: u16) -> Option<u32> {
        attr(list, ty).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    fn string(list: &[(u16, &[u8])], ty: u16) -> String {
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
    fn words(v: &[u8]) -> String {
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
    fn value(list: &[(u16, &[u8])], ty: u16) -> String {
        let nest = attr(list, ty).unwrap_or_default();
        words(&attr(&attrs(&nest), 1).unwrap_or_default())
    }

    fn verdict(data: &[u8]) -> String {
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

    fn expr(name: &str, a: &[(u16, &[u8])]) -> String {
        let reg = |ty| be32(a, ty).unwrap_or(0);
        match name {
            "payload" => {
                let base = ["link", "network", "transport"][reg(2) as usize];
                format!("payload load {}b @ {base} header + {} => reg {}", reg(4), reg(3), reg(1))
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
            "ct" => format!("ct load {} => reg {}", ["state"][reg(2) as usize], reg(1)),
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
            "nat" => format!(
                "nat dnat ip addr_min reg {} addr_max reg {} proto_min reg {} proto_max reg {} flags 0x{:x}",
                reg(3),
                reg(4),
                reg(5),
                reg(6),
                reg(7)
            ),
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
    fn rule_exprs(exprs: Vec<Expr>) -> Vec<String> {
        let mut tx = Transaction::new(Family::Ip, "t");
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

    fn addr(field: Field, negate: bool, value: AddrMatch) -> Expr {
        Expr::Addr {
            field,
            negate,
            value,
        }
    }

    fn jump(c: &str) -> Expr {
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
            key_bytes(&[KeyValue::Proto(Protocol::Tcp), KeyValue::Port(3001)]),
            vec![6, 0, 0, 0, 0x0b, 0xb9, 0, 0]
        );
    }
}
