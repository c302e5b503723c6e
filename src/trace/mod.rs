//! Packet tracers: explain where a packet goes through the rendered rules.

pub mod iptables;
pub mod nftables;
