//! The expressions of a rule, as nft linearizes the same statements: registers (a
//! concatenated key in consecutive 32-bit registers from reg 1), comparisons, set and
//! map lookups, map-based DNAT with `numgen` in the key, fib, ct, marks, NAT.

use ipnet::IpNet;

use super::{ip_bytes, Batch};
use crate::nftables::netlink::abi::*;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::transaction::{AddrMatch, Expr, Family, Field, Verdict};
use crate::sys::nftnl::Expr as NlExpr;

/// The register of the 32-bit word `word` of a concatenation: NFT_REG_1 for the
/// first (nft's notation), then the 32-bit registers after it.
pub(super) fn key_reg(word: u32) -> u32 {
    if word == 0 {
        NFT_REG_1
    } else {
        NFT_REG32_00 + word
    }
}

impl Batch<'_> {
    pub(super) fn encode_expr(
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
        // A concatenated key goes into consecutive 32-bit registers from NFT_REG_1;
        // returns the number of 32-bit words it took.
        let load_key = |key: &[Field], out: &mut Vec<NlExpr>| -> Result<u32, NetlinkError> {
            let mut word = 0u32;
            for f in key {
                let reg = key_reg(word);
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
            Ok(word)
        };
        let numgen = |modulus: u32, dreg: u32| -> Result<NlExpr, NetlinkError> {
            Ok(NlExpr::new("numgen")?
                .u32(NFTNL_EXPR_NG_DREG, dreg)
                .u32(NFTNL_EXPR_NG_MODULUS, modulus)
                .u32(NFTNL_EXPR_NG_TYPE, NFT_NG_RANDOM)
                .u32(NFTNL_EXPR_NG_OFFSET, 0))
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
                load_key(key, out)?;
                out.push(lookup(map, None, Some(NFT_REG_VERDICT), false)?);
            }
            Expr::NumgenVmap { targets } => {
                let (name, id) = self.anon_numgen_map(op, targets)?;
                out.push(numgen(targets.len() as u32, NFT_REG_1)?);
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
            Expr::Lookup { key, set, negate } => {
                load_key(key, out)?;
                out.push(lookup(set, None, None, *negate)?);
            }
            Expr::DnatMap {
                key,
                numgen_mod,
                map,
            } => {
                // The key, then `numgen random mod N` in the register after it; the
                // map's `addr . port` comes back from reg 1 on, the port in the
                // 32-bit register after the address (as nft sends it: addr_min and
                // proto_min only, the kernel derives the range flags).
                let words = load_key(key, out)?;
                if let Some(n) = numgen_mod {
                    out.push(numgen(*n, key_reg(words))?);
                }
                out.push(lookup(map, None, Some(NFT_REG_1), false)?);
                out.push(
                    NlExpr::new("nat")?
                        .u32(NFTNL_EXPR_NAT_TYPE, NFT_NAT_DNAT)
                        .u32(NFTNL_EXPR_NAT_FAMILY, fam.nfproto() as u32)
                        .u32(NFTNL_EXPR_NAT_REG_ADDR_MIN, NFT_REG_1)
                        .u32(NFTNL_EXPR_NAT_REG_PROTO_MIN, key_reg(addr_len / 4)),
                );
            }
            Expr::FibNotLocal { field } => {
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
                out.push(cmp(NFT_CMP_NEQ, &RTN_LOCAL.to_ne_bytes())?);
            }
            Expr::CtStatusDnat => {
                out.push(
                    NlExpr::new("ct")?
                        .u32(NFTNL_EXPR_CT_KEY, NFT_CT_STATUS)
                        .u32(NFTNL_EXPR_CT_DREG, NFT_REG_1),
                );
                out.push(bitwise(4, &IPS_DST_NAT.to_ne_bytes(), &[0; 4])?);
                out.push(cmp(NFT_CMP_NEQ, &[0; 4])?);
            }
        }
        Ok(())
    }
}
