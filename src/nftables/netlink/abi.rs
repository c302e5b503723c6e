//! Kernel ABI numbers the encoder and read-back use (linux/netfilter/nf_tables.h,
//! linux/netlink.h, nft's data types and user-data tags).

pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_DELTABLE: u16 = 2;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_GETTABLE: u16 = 1;
pub(super) const NFT_MSG_GETCHAIN: u16 = 4;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_DELCHAIN: u16 = 5;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_DELRULE: u16 = 8;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_GETSET: u16 = 10;
pub(super) const NFT_MSG_DELSET: u16 = 11;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_GETSETELEM: u16 = 13;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NFT_MSG_NEWGEN: u16 = 15;
pub(super) const NFT_MSG_GETGEN: u16 = 16;
/// The generation id attribute of a NEWGEN message.
pub(super) const NFTA_GEN_ID: u16 = 1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_APPEND: u16 = 0x800;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;

pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFT_REG_1: u32 = 1;
pub(super) const NFT_REG_2: u32 = 2;
pub(super) const NFT_REG32_00: u32 = 8;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(super) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub(super) const NFT_CMP_EQ: u32 = 0;
pub(super) const NFT_CMP_NEQ: u32 = 1;
pub(super) const NFT_META_MARK: u32 = 3;
pub(super) const NFT_META_IIFNAME: u32 = 6;
pub(super) const NFT_META_L4PROTO: u32 = 16;
pub(super) const NFT_CT_STATE: u32 = 0;
pub(super) const NFT_LOOKUP_F_INV: u32 = 1;
pub(super) const NFT_DYNSET_OP_UPDATE: u32 = 1;
pub(super) const NFT_NAT_DNAT: u32 = 1;
pub(super) const NFT_NG_RANDOM: u32 = 1;
pub(super) const NFT_REJECT_ICMP_UNREACH: u32 = 0;
pub(super) const NFTA_FIB_F_SADDR: u32 = 1;
pub(super) const NFTA_FIB_F_DADDR: u32 = 2;
pub(super) const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub(super) const RTN_LOCAL: u32 = 2;
pub(super) const NF_DROP: u32 = 0;
pub(super) const NF_ACCEPT: u32 = 1;
pub(super) const NFT_JUMP: i32 = -3;
pub(super) const NFT_GOTO: i32 = -4;
pub(super) const NFT_RETURN: i32 = -5;
pub(super) const NFT_SET_ANONYMOUS: u32 = 0x1;
pub(super) const NFT_SET_CONSTANT: u32 = 0x2;
pub(super) const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_MAP: u32 = 0x8;
pub(super) const NFT_SET_TIMEOUT: u32 = 0x10;
pub(super) const NFT_SET_EVAL: u32 = 0x20;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
pub(super) const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
pub(super) const NF_NAT_RANGE_MAP_IPS: u32 = 1;
pub(super) const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
pub(super) const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 16;
/// nft's datatype ids, for set key types (concatenations: 6 bits per component).
pub(super) const TYPE_INTEGER: u32 = 4;
pub(super) const TYPE_IPADDR: u32 = 7;
pub(super) const TYPE_IP6ADDR: u32 = 8;
pub(super) const TYPE_INET_PROTOCOL: u32 = 12;
pub(super) const TYPE_INET_SERVICE: u32 = 13;
/// udata TLV types nft uses for comments.
pub(super) const UDATA_COMMENT: u8 = 0;
pub(super) const UDATA_SET_COMMENT: u8 = 7;
pub(super) const NFT_CT_STATUS: u32 = 2;
/// `IPS_DST_NAT`: the connection's destination was NATed (`ct status dnat`).
pub(super) const IPS_DST_NAT: u32 = 0x20;
pub(super) const NFT_SET_CONCAT: u32 = 0x80;
