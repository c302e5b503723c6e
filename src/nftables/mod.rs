//! nftables mode: upstream's `kube-proxy` table as a transaction (plain data), its
//! `nft -f` text form, an in-memory fake, and the renderer.

pub mod fake;
pub mod names;
pub mod render;
pub mod text;
pub mod transaction;
