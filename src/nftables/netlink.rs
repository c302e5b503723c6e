//! Applies a [`Transaction`] to the kernel as one nftables netlink batch (libnftnl builds
//! the messages, a netlink socket carries them), and reads our table back.
//!
//! Encodings mirror what `nft` sends for the same rule text, so `nft list table` shows
//! the same ruleset whichever way it was loaded. The batch is all-or-nothing: the kernel
//! commits it only if every message succeeds, and an error names the operation (by the
//! message's sequence number) that failed.
//!
//! Completion is detected without per-message ACKs (which would flood the socket on big
//! syncs): the kernel processes a batch synchronously inside `sendmsg`, so after it
//! returns we ask for the ruleset generation and read until its reply; every error of
//! the batch arrives before it.

use std::ffi::{CStr, CString};
use std::net::IpAddr;
use std::os::raw::{c_char, c_void};

use ipnet::IpNet;
use nftnl_sys as sys;

use super::existing::{Existing, MANAGED_SETS};
use super::interface::NftInterface;
use super::text::op_line;
use super::transaction::{
    AddrMatch, ChainType, DataType, Element, Expr, Family, Field, KeyValue, Op, Rule, Set, SetFlag,
    Transaction, Verdict,
};
use crate::model::Protocol;

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure.
    #[error("netlink {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel refused an operation; the whole batch was rolled back.
    #[error("kernel refused operation {index} `{op}`: {source}")]
    Refused {
        /// 0-based index of the operation in the transaction.
        index: usize,
        /// The operation in nft syntax.
        op: String,
        /// The errno.
        source: std::io::Error,
    },
    /// A name contained a NUL byte or an operation could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
}

// Kernel ABI constants (linux/netfilter/nf_tables.h, linux/netlink.h).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_REG32_00: u32 = 8;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const NFT_NG_RANDOM: u32 = 1;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFTA_FIB_F_SADDR: u32 = 1;
const NFTA_FIB_F_DADDR: u32 = 2;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 16;
/// nft's datatype ids, for set key types (concatenations: 6 bits per component).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// udata TLV types nft uses for comments.
const UDATA_COMMENT: u8 = 0;
const UDATA_SET_COMMENT: u8 = 7;
/// Elements per NEWSETELEM message: keeps each message well under the 64 KiB that
/// netlink attributes can describe.
const ELEMENTS_PER_MESSAGE: usize = 200;

fn cstring(s: &str) -> Result<CString, NetlinkError> {
    CString::new(s).map_err(|_| NetlinkError::Encode(format!("name with NUL byte: {s:?}")))
}

fn udata(kind: u8, text: &str) -> Vec<u8> {
    // nft stores comments as one TLV: type, length (with the NUL), text, NUL.
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

/// Owned libnftnl objects, freed on drop.
struct Expr_(*mut sys::nftnl_expr);

impl Expr_ {
    fn new(name: &str) -> Result<Expr_, NetlinkError> {
        let n = cstring(name)?;
        // SAFETY: `n` is a valid C string; libnftnl copies what it needs.
        let p = unsafe { sys::nftnl_expr_alloc(n.as_ptr()) };
        if p.is_null() {
            return Err(NetlinkError::Encode(format!(
                "libnftnl has no expression {name}"
            )));
        }
        Ok(Expr_(p))
    }

    fn u32(self, attr: u16, v: u32) -> Self {
        // SAFETY: self.0 is a live expression; attr is one of its u32 attributes.
        unsafe { sys::nftnl_expr_set_u32(self.0, attr, v) };
        self
    }

    fn u8(self, attr: u16, v: u8) -> Self {
        // SAFETY: as above, for a u8 attribute.
        unsafe { sys::nftnl_expr_set_u8(self.0, attr, v) };
        self
    }

    fn data(self, attr: u16, d: &[u8]) -> Self {
        // SAFETY: libnftnl copies `d.len()` bytes from the pointer.
        unsafe { sys::nftnl_expr_set(self.0, attr, d.as_ptr() as *const c_void, d.len() as u32) };
        self
    }

    fn str(self, attr: u16, s: &str) -> Result<Self, NetlinkError> {
        let c = cstring(s)?;
        // SAFETY: libnftnl duplicates the string.
        unsafe { sys::nftnl_expr_set_str(self.0, attr, c.as_ptr()) };
        Ok(self)
    }
}

/// One message under construction.
struct Msg {
    buf: Vec<u8>,
}

thread_local! {
    /// One scratch buffer per thread for building messages: libnftnl writes every byte
    /// of a message (headers, attributes, padding), so it need not be zeroed per
    /// message, which at 100k+ messages per sync is most of the encoding time.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Msg {
    fn new(size: usize) -> Msg {
        let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if buf.len() < size {
            buf.resize(size, 0);
        }
        Msg { buf }
    }

    fn hdr(&mut self, ty: u16, family: u8, flags: u16, seq: u32) -> *mut libc::nlmsghdr {
        // SAFETY: the buffer is larger than a netlink + nfgenmsg header; libnftnl
        // initializes the header bytes itself.
        unsafe {
            sys::nftnl_nlmsg_build_hdr(
                self.buf.as_mut_ptr() as *mut c_char,
                ty,
                family as u16,
                flags,
                seq,
            )
        }
    }

    fn finish(self, nlh: *mut libc::nlmsghdr) -> Vec<u8> {
        // SAFETY: nlh points into self.buf, written by libnftnl.
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        let out = self.buf[..len.min(self.buf.len())].to_vec();
        SCRATCH.with(|s| *s.borrow_mut() = self.buf);
        out
    }
}

/// What a batch is made of: message bytes and, per sequence number, the operation.
struct Batch {
    bytes: Vec<u8>,
    seq_to_op: Vec<(u32, usize)>,
    next_seq: u32,
    next_set_id: u32,
    family: Family,
    table: CString,
}

impl Batch {
    fn new(family: Family, table: &str, first_seq: u32, ops: usize) -> Result<Batch, NetlinkError> {
        let mut b = Batch {
            // Sized up front (a rule is ~200-400 bytes): growing a multi-megabyte
            // buffer by doubling costs copies and fresh zeroed pages on a cold sync.
            bytes: Vec::with_capacity(4096 + ops * 320),
            seq_to_op: Vec::new(),
            next_seq: first_seq,
            next_set_id: 1,
            family,
            table: cstring(table)?,
        };
        b.control(0x10); // NFNL_MSG_BATCH_BEGIN
        Ok(b)
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
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&20u32.to_ne_bytes());
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m[6..8].copy_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16] = 0; // AF_UNSPEC
        m[17] = 0; // NFNETLINK_V0
        m[18..20].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        self.bytes.extend_from_slice(&m);
    }

    fn push(&mut self, msg: Vec<u8>) {
        // Netlink messages are 4-byte aligned.
        self.bytes.extend_from_slice(&msg);
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    fn fam(&self) -> u8 {
        self.family.nfproto()
    }

    fn table_msg(&mut self, op: usize, ty: u16, flags: u16, comment: Option<&str>) {
        let seq = self.seq(op);
        let mut m = Msg::new(4096);
        let nlh = m.hdr(ty, self.fam(), flags, seq);
        // SAFETY: fresh libnftnl table, filled and serialized into m.buf, then freed.
        unsafe {
            let t = sys::nftnl_table_alloc();
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, self.table.as_ptr());
            sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, self.fam() as u32);
            if let Some(c) = comment {
                let u = udata(UDATA_COMMENT, c);
                sys::nftnl_table_set_data(
                    t,
                    sys::NFTNL_TABLE_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
            sys::nftnl_table_nlmsg_build_payload(nlh as *mut _, t);
            sys::nftnl_table_free(t);
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
    }

    fn chain_msg(
        &mut self,
        op: usize,
        ty: u16,
        flags: u16,
        c: &super::transaction::Chain,
    ) -> Result<(), NetlinkError> {
        let seq = self.seq(op);
        let name = cstring(&c.name)?;
        let mut m = Msg::new(4096);
        let nlh = m.hdr(ty, self.fam(), flags, seq);
        // SAFETY: fresh libnftnl chain, serialized then freed; strings outlive the calls.
        unsafe {
            let ch = sys::nftnl_chain_alloc();
            sys::nftnl_chain_set_str(ch, sys::NFTNL_CHAIN_TABLE as u16, self.table.as_ptr());
            sys::nftnl_chain_set_str(ch, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            sys::nftnl_chain_set_u32(ch, sys::NFTNL_CHAIN_FAMILY as u16, self.fam() as u32);
            if let Some(b) = &c.base {
                let kind = cstring(match b.kind {
                    ChainType::Filter => "filter",
                    ChainType::Nat => "nat",
                })?;
                sys::nftnl_chain_set_u32(ch, sys::NFTNL_CHAIN_HOOKNUM as u16, b.hook.number());
                sys::nftnl_chain_set_u32(ch, sys::NFTNL_CHAIN_PRIO as u16, b.priority as u32);
                sys::nftnl_chain_set_str(ch, sys::NFTNL_CHAIN_TYPE as u16, kind.as_ptr());
            }
            if let Some(cm) = &c.comment {
                let u = udata(UDATA_COMMENT, cm);
                sys::nftnl_chain_set_data(
                    ch,
                    sys::NFTNL_CHAIN_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
            sys::nftnl_chain_nlmsg_build_payload(nlh as *mut _, ch);
            sys::nftnl_chain_free(ch);
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
        Ok(())
    }

    fn chain_name_msg(&mut self, op: usize, ty: u16, name: &str) -> Result<(), NetlinkError> {
        let seq = self.seq(op);
        let name = cstring(name)?;
        let mut m = Msg::new(4096);
        let nlh = m.hdr(ty, self.fam(), 0, seq);
        // SAFETY: as in chain_msg. For DELRULE, a rule object naming only the chain makes
        // the kernel delete every rule of it (a flush).
        unsafe {
            if ty == NFT_MSG_DELRULE {
                let r = sys::nftnl_rule_alloc();
                sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
                sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, name.as_ptr());
                sys::nftnl_rule_set_u32(r, sys::NFTNL_RULE_FAMILY as u16, self.fam() as u32);
                sys::nftnl_rule_nlmsg_build_payload(nlh as *mut _, r);
                sys::nftnl_rule_free(r);
            } else {
                let ch = sys::nftnl_chain_alloc();
                sys::nftnl_chain_set_str(ch, sys::NFTNL_CHAIN_TABLE as u16, self.table.as_ptr());
                sys::nftnl_chain_set_str(ch, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
                sys::nftnl_chain_set_u32(ch, sys::NFTNL_CHAIN_FAMILY as u16, self.fam() as u32);
                sys::nftnl_chain_nlmsg_build_payload(nlh as *mut _, ch);
                sys::nftnl_chain_free(ch);
            }
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
        Ok(())
    }

    /// Creates a set message; returns the set id used.
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
        let seq = self.seq(op);
        let id = self.next_set_id;
        self.next_set_id += 1;
        let cname = cstring(name)?;
        let mut m = Msg::new(4096);
        let nlh = m.hdr(NFT_MSG_NEWSET, self.fam(), NLM_F_CREATE, seq);
        // SAFETY: fresh libnftnl set, serialized then freed.
        unsafe {
            let s = sys::nftnl_set_alloc();
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, cname.as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.fam() as u32);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, key_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, key_len);
            let mut f = flags;
            if is_map {
                f |= NFT_SET_MAP;
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, NFT_DATA_VERDICT);
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, 16);
            }
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, f);
            if let Some(t) = timeout_ms {
                sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, t);
            }
            if let Some(sz) = size {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, sz);
            }
            if let Some(u) = &user {
                sys::nftnl_set_set_data(
                    s,
                    sys::NFTNL_SET_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
            sys::nftnl_set_nlmsg_build_payload(nlh as *mut _, s);
            sys::nftnl_set_free(s);
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
        Ok(id)
    }

    fn set_ref_msg(&mut self, op: usize, ty: u16, name: &str) -> Result<(), NetlinkError> {
        // DELSET, or DELSETELEM with no elements (= flush the set).
        let seq = self.seq(op);
        let cname = cstring(name)?;
        let mut m = Msg::new(4096);
        let nlh = m.hdr(ty, self.fam(), 0, seq);
        // SAFETY: fresh libnftnl set, serialized then freed.
        unsafe {
            let s = sys::nftnl_set_alloc();
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, cname.as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.fam() as u32);
            if ty == NFT_MSG_DELSET {
                sys::nftnl_set_nlmsg_build_payload(nlh as *mut _, s);
            } else {
                sys::nftnl_set_elems_nlmsg_build_payload(nlh as *mut _, s);
            }
            sys::nftnl_set_free(s);
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
        Ok(())
    }

    /// Element messages: (key bytes, flags, verdict, comment) in chunks.
    #[allow(clippy::type_complexity)]
    fn elems_msg(
        &mut self,
        op: usize,
        ty: u16,
        set: &str,
        set_id: Option<u32>,
        elems: &[(Vec<u8>, u32, Option<Verdict>, Option<String>)],
    ) -> Result<(), NetlinkError> {
        let cname = cstring(set)?;
        for chunk in elems.chunks(ELEMENTS_PER_MESSAGE) {
            let seq = self.seq(op);
            let size = 4096 + chunk.len() * 600;
            let mut m = Msg::new(size);
            let flags = if ty == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
            let nlh = m.hdr(ty, self.fam(), flags, seq);
            let mut chains = Vec::new();
            for (_, _, v, _) in chunk {
                if let Some(Verdict::Jump(c) | Verdict::Goto(c)) = v {
                    chains.push(cstring(c)?);
                } else {
                    chains.push(CString::default());
                }
            }
            // SAFETY: fresh libnftnl set with fresh elements (owned by the set), serialized
            // into a buffer sized for 600 bytes per element, then freed.
            unsafe {
                let s = sys::nftnl_set_alloc();
                sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.fam() as u32);
                match set_id {
                    // A set created earlier in this batch is found by its id alone: the
                    // kernel looks a name up by walking every set of the table (10k+ on
                    // a large cluster), an id in the batch's list of new sets, newest
                    // first.
                    Some(id) => {
                        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
                    }
                    None => {
                        sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, cname.as_ptr());
                    }
                }
                for ((key, eflags, verdict, comment), chain) in chunk.iter().zip(&chains) {
                    let e = sys::nftnl_set_elem_alloc();
                    sys::nftnl_set_elem_set(
                        e,
                        sys::NFTNL_SET_ELEM_KEY as u16,
                        key.as_ptr() as *const c_void,
                        key.len() as u32,
                    );
                    if *eflags != 0 {
                        sys::nftnl_set_elem_set_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16, *eflags);
                    }
                    if ty == NFT_MSG_NEWSETELEM {
                        if let Some(v) = verdict {
                            let code: i32 = match v {
                                Verdict::Jump(_) => NFT_JUMP,
                                Verdict::Goto(_) => NFT_GOTO,
                                Verdict::Drop => NF_DROP as i32,
                                Verdict::Accept => NF_ACCEPT as i32,
                                Verdict::Return => NFT_RETURN,
                            };
                            sys::nftnl_set_elem_set_u32(
                                e,
                                sys::NFTNL_SET_ELEM_VERDICT as u16,
                                code as u32,
                            );
                            if matches!(v, Verdict::Jump(_) | Verdict::Goto(_)) {
                                sys::nftnl_set_elem_set_str(
                                    e,
                                    sys::NFTNL_SET_ELEM_CHAIN as u16,
                                    chain.as_ptr(),
                                );
                            }
                        }
                        if let Some(c) = comment {
                            let u = udata(UDATA_COMMENT, c);
                            sys::nftnl_set_elem_set(
                                e,
                                sys::NFTNL_SET_ELEM_USERDATA as u16,
                                u.as_ptr() as *const c_void,
                                u.len() as u32,
                            );
                        }
                    }
                    sys::nftnl_set_elem_add(s, e);
                }
                sys::nftnl_set_elems_nlmsg_build_payload(nlh as *mut _, s);
                sys::nftnl_set_free(s);
            }
            let bytes = m.finish(nlh);
            self.push(bytes);
        }
        Ok(())
    }

    fn rule_msg(&mut self, op: usize, rule: &Rule) -> Result<(), NetlinkError> {
        // Anonymous sets the rule uses go first, in the same batch.
        let mut exprs: Vec<Expr_> = Vec::new();
        let fam = self.family;
        for e in &rule.exprs {
            self.encode_expr(op, fam, e, &mut exprs)?;
        }
        let seq = self.seq(op);
        let chain = cstring(&rule.chain)?;
        let mut m = Msg::new(65536);
        let nlh = m.hdr(
            NFT_MSG_NEWRULE,
            self.fam(),
            NLM_F_CREATE | NLM_F_APPEND,
            seq,
        );
        // SAFETY: the rule takes ownership of each expression (nftnl_rule_add_expr), so
        // they are not freed separately; the rule is serialized then freed.
        unsafe {
            let r = sys::nftnl_rule_alloc();
            sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
            sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            sys::nftnl_rule_set_u32(r, sys::NFTNL_RULE_FAMILY as u16, self.fam() as u32);
            for e in exprs.drain(..) {
                let raw = e.0;
                // Ownership moves to the rule: do not run Expr_'s destructor.
                std::mem::forget(e);
                sys::nftnl_rule_add_expr(r, raw);
            }
            if let Some(c) = &rule.comment {
                let u = udata(UDATA_COMMENT, c);
                sys::nftnl_rule_set_data(
                    r,
                    sys::NFTNL_RULE_USERDATA as u16,
                    u.as_ptr() as *const c_void,
                    u.len() as u32,
                );
            }
            sys::nftnl_rule_nlmsg_build_payload(nlh as *mut _, r);
            sys::nftnl_rule_free(r);
        }
        let bytes = m.finish(nlh);
        self.push(bytes);
        Ok(())
    }

    fn encode_expr(
        &mut self,
        op: usize,
        fam: Family,
        e: &Expr,
        out: &mut Vec<Expr_>,
    ) -> Result<(), NetlinkError> {
        use sys::*;
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
        let payload = |base: u32, off: u32, len: u32, dreg: u32| -> Result<Expr_, NetlinkError> {
            Ok(Expr_::new("payload")?
                .u32(NFTNL_EXPR_PAYLOAD_DREG as u16, dreg)
                .u32(NFTNL_EXPR_PAYLOAD_BASE as u16, base)
                .u32(NFTNL_EXPR_PAYLOAD_OFFSET as u16, off)
                .u32(NFTNL_EXPR_PAYLOAD_LEN as u16, len))
        };
        let cmp = |op_: u32, data: &[u8]| -> Result<Expr_, NetlinkError> {
            Ok(Expr_::new("cmp")?
                .u32(NFTNL_EXPR_CMP_SREG as u16, NFT_REG_1)
                .u32(NFTNL_EXPR_CMP_OP as u16, op_)
                .data(NFTNL_EXPR_CMP_DATA as u16, data))
        };
        let bitwise = |len: u32, mask: &[u8], xor: &[u8]| -> Result<Expr_, NetlinkError> {
            Ok(Expr_::new("bitwise")?
                .u32(NFTNL_EXPR_BITWISE_SREG as u16, NFT_REG_1)
                .u32(NFTNL_EXPR_BITWISE_DREG as u16, NFT_REG_1)
                .u32(NFTNL_EXPR_BITWISE_LEN as u16, len)
                .data(NFTNL_EXPR_BITWISE_MASK as u16, mask)
                .data(NFTNL_EXPR_BITWISE_XOR as u16, xor))
        };
        let meta_load = |key: u32, dreg: u32| -> Result<Expr_, NetlinkError> {
            Ok(Expr_::new("meta")?
                .u32(NFTNL_EXPR_META_KEY as u16, key)
                .u32(NFTNL_EXPR_META_DREG as u16, dreg))
        };
        let lookup = |set: &str,
                      id: Option<u32>,
                      dreg: Option<u32>,
                      inv: bool|
         -> Result<Expr_, NetlinkError> {
            let mut l = Expr_::new("lookup")?
                .u32(NFTNL_EXPR_LOOKUP_SREG as u16, NFT_REG_1)
                .str(NFTNL_EXPR_LOOKUP_SET as u16, set)?;
            if let Some(id) = id {
                l = l.u32(NFTNL_EXPR_LOOKUP_SET_ID as u16, id);
            }
            if let Some(d) = dreg {
                l = l.u32(NFTNL_EXPR_LOOKUP_DREG as u16, d);
            }
            if inv {
                l = l.u32(NFTNL_EXPR_LOOKUP_FLAGS as u16, NFT_LOOKUP_F_INV);
            }
            Ok(l)
        };
        let verdict = |v: &Verdict| -> Result<Expr_, NetlinkError> {
            let (code, chain) = match v {
                Verdict::Jump(c) => (NFT_JUMP, Some(c)),
                Verdict::Goto(c) => (NFT_GOTO, Some(c)),
                Verdict::Drop => (NF_DROP as i32, None),
                Verdict::Accept => (NF_ACCEPT as i32, None),
                Verdict::Return => (NFT_RETURN, None),
            };
            let mut i = Expr_::new("immediate")?
                .u32(NFTNL_EXPR_IMM_DREG as u16, NFT_REG_VERDICT)
                .u32(NFTNL_EXPR_IMM_VERDICT as u16, code as u32);
            if let Some(c) = chain {
                i = i.str(NFTNL_EXPR_IMM_CHAIN as u16, c)?;
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
                    Expr_::new("ct")?
                        .u32(NFTNL_EXPR_CT_KEY as u16, NFT_CT_STATE)
                        .u32(NFTNL_EXPR_CT_DREG as u16, NFT_REG_1),
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
                    Expr_::new("fib")?
                        .u32(NFTNL_EXPR_FIB_FLAGS as u16, flags)
                        .u32(NFTNL_EXPR_FIB_RESULT as u16, NFT_FIB_RESULT_ADDRTYPE)
                        .u32(NFTNL_EXPR_FIB_DREG as u16, NFT_REG_1),
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
                    Expr_::new("numgen")?
                        .u32(NFTNL_EXPR_NG_DREG as u16, NFT_REG_1)
                        .u32(NFTNL_EXPR_NG_MODULUS as u16, targets.len() as u32)
                        .u32(NFTNL_EXPR_NG_TYPE as u16, NFT_NG_RANDOM)
                        .u32(NFTNL_EXPR_NG_OFFSET as u16, 0),
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
                    Expr_::new("dynset")?
                        .u32(NFTNL_EXPR_DYNSET_SREG_KEY as u16, NFT_REG_1)
                        .u32(NFTNL_EXPR_DYNSET_OP as u16, NFT_DYNSET_OP_UPDATE)
                        .u64_(NFTNL_EXPR_DYNSET_TIMEOUT as u16, 0)
                        .str(NFTNL_EXPR_DYNSET_SET_NAME as u16, set)?,
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
                    Expr_::new("meta")?
                        .u32(NFTNL_EXPR_META_KEY as u16, NFT_META_MARK)
                        .u32(NFTNL_EXPR_META_SREG as u16, NFT_REG_1),
                );
            }
            Expr::MarkAndIsZero(m) => {
                out.push(meta_load(NFT_META_MARK, NFT_REG_1)?);
                out.push(bitwise(4, &m.to_ne_bytes(), &[0; 4])?);
                out.push(cmp(NFT_CMP_EQ, &[0; 4])?);
            }
            Expr::Masquerade { fully_random } => {
                let mut x = Expr_::new("masq")?;
                if *fully_random {
                    x = x.u32(
                        NFTNL_EXPR_MASQ_FLAGS as u16,
                        NF_NAT_RANGE_PROTO_RANDOM_FULLY,
                    );
                }
                out.push(x);
            }
            Expr::Dnat { addr, port } => {
                out.push(
                    Expr_::new("immediate")?
                        .u32(NFTNL_EXPR_IMM_DREG as u16, NFT_REG_1)
                        .data(NFTNL_EXPR_IMM_DATA as u16, &ip_bytes(addr)),
                );
                out.push(
                    Expr_::new("immediate")?
                        .u32(NFTNL_EXPR_IMM_DREG as u16, NFT_REG_2)
                        .data(NFTNL_EXPR_IMM_DATA as u16, &port.to_be_bytes()),
                );
                out.push(
                    Expr_::new("nat")?
                        .u32(NFTNL_EXPR_NAT_TYPE as u16, NFT_NAT_DNAT)
                        .u32(NFTNL_EXPR_NAT_FAMILY as u16, fam.nfproto() as u32)
                        .u32(NFTNL_EXPR_NAT_REG_ADDR_MIN as u16, NFT_REG_1)
                        .u32(NFTNL_EXPR_NAT_REG_ADDR_MAX as u16, NFT_REG_1)
                        .u32(NFTNL_EXPR_NAT_REG_PROTO_MIN as u16, NFT_REG_2)
                        .u32(NFTNL_EXPR_NAT_REG_PROTO_MAX as u16, NFT_REG_2)
                        .u32(
                            NFTNL_EXPR_NAT_FLAGS as u16,
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
                    Expr_::new("reject")?
                        .u32(NFTNL_EXPR_REJECT_TYPE as u16, NFT_REJECT_ICMP_UNREACH)
                        .u8(NFTNL_EXPR_REJECT_CODE as u16, code),
                );
            }
            Expr::Verdict(v) => out.push(verdict(v)?),
        }
        Ok(())
    }

    fn anon_numgen_map(
        &mut self,
        op: usize,
        targets: &[Verdict],
    ) -> Result<(String, u32), NetlinkError> {
        let name = self.anon_name('m');
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
        let elems: Vec<_> = targets
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
        let name = self.anon_name('s');
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
        let elems: Vec<_> = interval_elements(list, len as usize)
            .into_iter()
            .map(|(k, f)| (k, f, None, None))
            .collect();
        self.elems_msg(op, NFT_MSG_NEWSETELEM, &name, Some(id), &elems)?;
        Ok((name, id))
    }

    /// A concrete, unique name for an anonymous set. nft sends `__set%d` and lets the
    /// kernel pick a free number, which scans every set of the table with sscanf for
    /// each new one: quadratic on a cold sync of thousands of Services. The kernel also
    /// finds a set by name by comparing against every set of the table (length, then
    /// bytes), so names are short and differ early: `__<counter><kind><suffix>`, the
    /// counter in hex first, then `m` (map) or `s` (set), then this process's suffix
    /// (see [`anon_suffix`]) so they never repeat a set another process left behind.
    fn anon_name(&self, kind: char) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        format!(
            "__{:x}{kind}{:06x}",
            NEXT.fetch_add(1, Ordering::Relaxed),
            anon_suffix()
        )
    }

    fn finish(mut self) -> Encoded {
        self.control(0x11); // NFNL_MSG_BATCH_END
        (self.bytes, self.seq_to_op, self.next_seq)
    }
}

impl Expr_ {
    fn u64_(self, attr: u16, v: u64) -> Self {
        // SAFETY: self.0 is a live expression; attr is one of its u64 attributes.
        unsafe { sys::nftnl_expr_set_u64(self.0, attr, v) };
        self
    }
}

impl Drop for Expr_ {
    fn drop(&mut self) {
        // SAFETY: only expressions not handed to a rule are still owned here.
        unsafe { sys::nftnl_expr_free(self.0) };
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
        };
        if concat {
            b.resize(b.len().div_ceil(4) * 4, 0);
        }
        out.extend_from_slice(&b);
    }
    out
}

/// Encodes a transaction into one batch. Returns the bytes, the sequence -> operation
/// index map, and the next free sequence number.
/// An encoded batch: its bytes, sequence -> operation index, next free sequence number.
type Encoded = (Vec<u8>, Vec<(u32, usize)>, u32);

fn encode(tx: &Transaction, first_seq: u32) -> Result<Encoded, NetlinkError> {
    let mut b = Batch::new(tx.family, &tx.table, first_seq, tx.ops.len())?;
    let mut i = 0;
    while i < tx.ops.len() {
        let op = &tx.ops[i];
        match op {
            Op::AddTable { comment } => {
                b.table_msg(i, NFT_MSG_NEWTABLE, NLM_F_CREATE, comment.as_deref())
            }
            Op::DeleteTable => b.table_msg(i, NFT_MSG_DELTABLE, 0, None),
            Op::AddChain(c) => b.chain_msg(i, NFT_MSG_NEWCHAIN, NLM_F_CREATE, c)?,
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

fn add_set(b: &mut Batch, op: usize, s: &Set) -> Result<(), NetlinkError> {
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
        s.timeout.map(|t| t as u64 * 1000),
        size,
        s.comment.as_deref().map(|c| udata(UDATA_SET_COMMENT, c)),
    )?;
    Ok(())
}

/// A netlink socket to the current network namespace's nftables.
pub struct Netlink {
    sock: mnl::Socket,
    seq: u32,
}

/// This process's 24-bit suffix for anonymous set names (0 = not chosen yet).
static ANON_SUFFIX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The suffix of this process's anonymous set names, chosen from the clock at first use.
fn anon_suffix() -> u32 {
    use std::sync::atomic::Ordering;
    let s = ANON_SUFFIX.load(Ordering::Relaxed);
    if s != 0 {
        return s;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    // Mix the clock so that processes started close together differ in every bit.
    let mixed = nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    let fresh = (mixed as u32 & 0xff_ffff).max(1);
    match ANON_SUFFIX.compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => fresh,
        Err(current) => current,
    }
}

/// Called with the anonymous set names found in the kernel (read-back before a full
/// sync): if one of them carries our suffix (another process's, by a 1-in-16M
/// chance), pick another, so our next names cannot collide with it.
fn avoid_anon_suffix<'a>(names: impl Iterator<Item = &'a str> + Clone) {
    use std::sync::atomic::Ordering;
    loop {
        let tail = format!("{:06x}", anon_suffix());
        if !names.clone().any(|n| n.ends_with(&tail)) {
            return;
        }
        let next = (anon_suffix().wrapping_mul(2_654_435_761) >> 8 & 0xff_ffff).max(1);
        ANON_SUFFIX.store(next, Ordering::Relaxed);
    }
}

// SAFETY: the socket is owned exclusively by this value (no aliasing pointers are
// kept) and a netlink socket may be used from any thread; `&mut self` on every call
// rules out concurrent use.
unsafe impl Send for Netlink {}

impl Netlink {
    /// Opens a socket.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|source| NetlinkError::Io {
            what: "open socket",
            source,
        })?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(Netlink { sock, seq })
    }

    fn fd(&self) -> i32 {
        // SAFETY: the mnl socket is live for self's lifetime.
        unsafe { mnl::mnl_sys::mnl_socket_get_fd(self.sock.as_raw_socket()) }
    }

    fn grow_sndbuf(&self, len: usize) {
        let size: i32 = (len.saturating_mul(2)).min(i32::MAX as usize / 2) as i32;
        // SAFETY: plain setsockopt on our fd with an int option.
        unsafe {
            libc::setsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &size as *const i32 as *const c_void,
                std::mem::size_of::<i32>() as u32,
            );
        }
    }

    /// Applies a transaction as one atomic batch.
    pub fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        if tx.is_empty() {
            return Ok(());
        }
        let (bytes, seqs, next) = encode(tx, self.seq)?;
        self.seq = next;
        if bytes.len() > 200_000 {
            self.grow_sndbuf(bytes.len());
        }
        self.sock.send(&bytes).map_err(|source| NetlinkError::Io {
            what: "send batch",
            source,
        })?;
        // The batch ran inside sendmsg; its errors are queued before this reply.
        let gen_seq = self.send_getgen()?;
        let mut first_err: Option<(u32, i32)> = None;
        self.read_until(gen_seq, |ty, seq, payload| {
            if ty == NLMSG_ERROR && payload.len() >= 4 {
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 && first_err.is_none() {
                    first_err = Some((seq, -code));
                }
            }
        })?;
        if let Some((seq, errno)) = first_err {
            let index = seqs
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, i)| *i)
                .unwrap_or(0);
            return Err(NetlinkError::Refused {
                index,
                op: tx
                    .ops
                    .get(index)
                    .map(|o| op_line(tx.family, &tx.table, o))
                    .unwrap_or_default(),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(())
    }

    fn send_getgen(&mut self) -> Result<u32, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut m = Msg::new(64);
        let nlh = m.hdr(NFT_MSG_GETGEN, 0, NLM_F_ACK, seq);
        let bytes = m.finish(nlh);
        self.sock.send(&bytes).map_err(|source| NetlinkError::Io {
            what: "send getgen",
            source,
        })?;
        Ok(seq)
    }

    /// Reads messages, handing (type, seq, payload) to `f`, until the reply to `seq`
    /// (its NEWGEN, DONE, or ACK) arrives.
    fn read_until(
        &mut self,
        seq: u32,
        mut f: impl FnMut(u16, u32, &[u8]),
    ) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = self
                .sock
                .recv_raw(&mut buf)
                .map_err(|source| NetlinkError::Io {
                    what: "receive",
                    source,
                })?;
            let mut off = 0;
            let mut done = false;
            while off + 16 <= n {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                    as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let mseq =
                    u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
                let payload = &buf[off + 16..off + len];
                f(ty, mseq, payload);
                let msg_type = ty & 0xff;
                if mseq == seq
                    && (ty == NLMSG_DONE
                        || ty == NLMSG_ERROR
                        || (ty >> 8 == NFNL_SUBSYS_NFTABLES && msg_type == NFT_MSG_NEWGEN))
                {
                    done = true;
                }
                off += len.div_ceil(4) * 4;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Dumps objects of one kind; returns the raw messages.
    fn dump(
        &mut self,
        ty: u16,
        family: Family,
        build: impl FnOnce(*mut libc::nlmsghdr),
    ) -> Result<Result<Vec<Vec<u8>>, i32>, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut m = Msg::new(4096);
        let nlh = m.hdr(ty, family.nfproto(), NLM_F_DUMP | NLM_F_ACK, seq);
        build(nlh);
        let bytes = m.finish(nlh);
        self.sock.send(&bytes).map_err(|source| NetlinkError::Io {
            what: "send dump request",
            source,
        })?;
        let mut msgs = Vec::new();
        let mut err = 0;
        self.read_until(seq, |t, s, payload| {
            if s != seq {
                return;
            }
            if t == NLMSG_ERROR && payload.len() >= 4 {
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 {
                    err = -code;
                }
            } else if t != NLMSG_DONE {
                let mut full = Vec::with_capacity(payload.len() + 16);
                let len = (payload.len() + 16) as u32;
                full.extend_from_slice(&len.to_ne_bytes());
                full.extend_from_slice(&t.to_ne_bytes());
                full.extend_from_slice(&[0; 2]);
                full.extend_from_slice(&s.to_ne_bytes());
                full.extend_from_slice(&[0; 4]);
                full.extend_from_slice(payload);
                msgs.push(full);
            }
        })?;
        Ok(if err != 0 { Err(err) } else { Ok(msgs) })
    }

    /// Reads back our table: chains, sets, and the elements of the maps and sets kproxy
    /// manages. `None` when the table does not exist.
    pub fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        let ctable = cstring(table)?;
        let chains = match self.dump(NFT_MSG_GETCHAIN, family, |_| {})? {
            Ok(m) => m,
            Err(libc::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(NetlinkError::Io {
                    what: "list chains",
                    source: std::io::Error::from_raw_os_error(e),
                })
            }
        };
        let mut existing = Existing::default();
        let mut found_table = false;
        for m in &chains {
            // SAFETY: m is a complete netlink message from the kernel; the chain object
            // is parsed, read, and freed here.
            unsafe {
                let c = sys::nftnl_chain_alloc();
                if sys::nftnl_chain_nlmsg_parse(m.as_ptr() as *const _, c) >= 0 {
                    let t =
                        CStr::from_ptr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16));
                    if t.to_bytes() == table.as_bytes() {
                        found_table = true;
                        let n = CStr::from_ptr(sys::nftnl_chain_get_str(
                            c,
                            sys::NFTNL_CHAIN_NAME as u16,
                        ));
                        existing.chains.insert(n.to_string_lossy().into_owned());
                    }
                }
                sys::nftnl_chain_free(c);
            }
        }
        let sets = match self.dump(NFT_MSG_GETSET, family, |nlh| {
            // SAFETY: a set object naming only the table, serialized into the request.
            unsafe {
                let s = sys::nftnl_set_alloc();
                sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, ctable.as_ptr());
                sys::nftnl_set_nlmsg_build_payload(nlh as *mut _, s);
                sys::nftnl_set_free(s);
            }
        })? {
            Ok(m) => m,
            Err(libc::ENOENT) => return Ok(if found_table { Some(existing) } else { None }),
            Err(e) => {
                return Err(NetlinkError::Io {
                    what: "list sets",
                    source: std::io::Error::from_raw_os_error(e),
                })
            }
        };
        let mut anonymous = Vec::new();
        for m in &sets {
            // SAFETY: as for chains.
            unsafe {
                let s = sys::nftnl_set_alloc();
                if sys::nftnl_set_nlmsg_parse(m.as_ptr() as *const _, s) >= 0 {
                    let n = CStr::from_ptr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16));
                    let name = n.to_string_lossy().into_owned();
                    if name.starts_with("__") {
                        anonymous.push(name);
                    } else {
                        existing.sets.insert(name);
                    }
                }
                sys::nftnl_set_free(s);
            }
        }
        avoid_anon_suffix(anonymous.iter().map(String::as_str));
        if !found_table && existing.sets.is_empty() {
            return Ok(None);
        }
        for set in MANAGED_SETS.iter().filter(|s| existing.sets.contains(**s)) {
            let cset = cstring(set)?;
            let msgs = match self.dump(NFT_MSG_GETSETELEM, family, |nlh| {
                // SAFETY: a set object naming the table and set, serialized as an
                // element-dump request.
                unsafe {
                    let s = sys::nftnl_set_alloc();
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, ctable.as_ptr());
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, cset.as_ptr());
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh as *mut _, s);
                    sys::nftnl_set_free(s);
                }
            })? {
                Ok(m) => m,
                Err(_) => continue,
            };
            for m in &msgs {
                existing.elements.extend(parse_elements(m, set, family));
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
        let ctable = cstring(table)?;
        let cchain = cstring(chain)?;
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut m = Msg::new(4096);
        let nlh = m.hdr(NFT_MSG_GETCHAIN, family.nfproto(), NLM_F_ACK, seq);
        // SAFETY: a chain object naming the table and chain, serialized into the request.
        unsafe {
            let c = sys::nftnl_chain_alloc();
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, ctable.as_ptr());
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, cchain.as_ptr());
            sys::nftnl_chain_nlmsg_build_payload(nlh as *mut _, c);
            sys::nftnl_chain_free(c);
        }
        let bytes = m.finish(nlh);
        self.sock.send(&bytes).map_err(|source| NetlinkError::Io {
            what: "send getchain",
            source,
        })?;
        let mut found = false;
        let mut err = 0;
        self.read_until(seq, |t, s, payload| {
            if s != seq {
                return;
            }
            if t == NLMSG_ERROR && payload.len() >= 4 {
                err = -i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
            } else if t != NLMSG_DONE {
                found = true;
            }
        })?;
        Ok(found && err == 0)
    }

    /// Deletes our table of a family; a missing table is fine.
    pub fn delete_table(&mut self, family: Family, table: &str) -> Result<(), NetlinkError> {
        let mut tx = Transaction::new(family, table);
        tx.push(Op::DeleteTable);
        match self.apply(&tx) {
            Err(NetlinkError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

impl NftInterface for Netlink {
    type Error = NetlinkError;

    fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        Netlink::apply(self, tx)
    }

    fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        Netlink::read_table(self, family, table)
    }

    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        Netlink::chain_exists(self, family, table, chain)
    }

    fn is_not_found(e: &NetlinkError) -> bool {
        matches!(e, NetlinkError::Refused { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
    }

    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), NetlinkError> {
        Netlink::delete_table(self, family, table)
    }
}

/// A netlink connection opened on first use, so that building a dataplane cannot fail
/// and costs nothing until it syncs.
#[derive(Default)]
pub struct LazyNetlink {
    socket: Option<Netlink>,
}

impl LazyNetlink {
    fn socket(&mut self) -> Result<&mut Netlink, NetlinkError> {
        match &mut self.socket {
            Some(s) => Ok(s),
            none => Ok(none.insert(Netlink::open()?)),
        }
    }
}

impl NftInterface for LazyNetlink {
    type Error = NetlinkError;

    fn apply(&mut self, tx: &Transaction) -> Result<(), NetlinkError> {
        self.socket()?.apply(tx)
    }

    fn read_table(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Option<Existing>, NetlinkError> {
        self.socket()?.read_table(family, table)
    }

    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        self.socket()?.chain_exists(family, table, chain)
    }

    fn is_not_found(e: &NetlinkError) -> bool {
        <Netlink as NftInterface>::is_not_found(e)
    }

    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), NetlinkError> {
        self.socket()?.delete_table(family, table)
    }
}

/// Decodes the elements of one managed container from a GETSETELEM reply.
fn parse_elements(msg: &[u8], set: &str, family: Family) -> Vec<Element> {
    let alen = match family {
        Family::Ip => 4,
        Family::Ip6 => 16,
    };
    let mut out = Vec::new();
    // SAFETY: msg is a complete kernel message; libnftnl parses it into a set we own,
    // whose elements we read through an iterator and then free with the set.
    unsafe {
        let s = sys::nftnl_set_alloc();
        if sys::nftnl_set_elems_nlmsg_parse(msg.as_ptr() as *const _, s) < 0 {
            sys::nftnl_set_free(s);
            return out;
        }
        let it = sys::nftnl_set_elems_iter_create(s);
        loop {
            let e = sys::nftnl_set_elems_iter_next(it);
            if e.is_null() {
                break;
            }
            let mut len = 0u32;
            let kp =
                sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len) as *const u8;
            if kp.is_null() {
                continue;
            }
            let key = std::slice::from_raw_parts(kp, len as usize).to_vec();
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
            let parts: Option<Vec<KeyValue>> = match set {
                "cluster-ips" => ip_at(&key).map(|ip| vec![KeyValue::Ip(ip)]),
                "service-nodeports" | "no-endpoint-nodeports" => (|| {
                    Some(vec![
                        KeyValue::Proto(proto_at(*key.first()?)?),
                        KeyValue::Port(u16::from_be_bytes([*key.get(4)?, *key.get(5)?])),
                    ])
                })(),
                _ => (|| {
                    Some(vec![
                        KeyValue::Ip(ip_at(&key)?),
                        KeyValue::Proto(proto_at(*key.get(alen)?)?),
                        KeyValue::Port(u16::from_be_bytes([
                            *key.get(alen + 4)?,
                            *key.get(alen + 5)?,
                        ])),
                    ])
                })(),
            };
            let Some(parts) = parts else { continue };
            let value = if set == "cluster-ips" {
                None
            } else {
                let code =
                    sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16) as i32;
                let chain_p = sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16);
                let chain = if chain_p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(chain_p).to_string_lossy().into_owned()
                };
                Some(match code {
                    NFT_JUMP => Verdict::Jump(chain),
                    NFT_GOTO => Verdict::Goto(chain),
                    NFT_RETURN => Verdict::Return,
                    c if c == NF_ACCEPT as i32 => Verdict::Accept,
                    _ => Verdict::Drop,
                })
            };
            out.push(Element {
                set: set.to_string(),
                key: parts,
                comment: None,
                value,
            });
        }
        sys::nftnl_set_elems_iter_destroy(it);
        sys::nftnl_set_free(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn batch_is_framed_and_sequenced() {
        let mut tx = Transaction::new(Family::Ip, "kube-proxy");
        tx.push(Op::AddTable {
            comment: Some("rules for kube-proxy".into()),
        });
        tx.push(Op::FlushChain("services".into()));
        let (bytes, seqs, next) = encode(&tx, 100).unwrap();
        // begin + 2 messages + end
        assert_eq!(seqs, vec![(101, 0), (102, 1)]);
        assert_eq!(next, 104);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x10);
        assert_eq!(bytes.len() % 4, 0);
    }
}
