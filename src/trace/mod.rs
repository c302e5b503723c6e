//! Packet tracers: explain where a packet goes through the rules, rendered or read
//! back from a kernel, in either mode. `core` holds what both modes share.

pub mod core;
pub mod iptables;
pub(crate) mod nft_json;
pub mod nftables;
pub mod report;
