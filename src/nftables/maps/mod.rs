//! The opt-in `maps` nftables layout (`--nftables-layout=maps`, issue #14): a fixed,
//! small set of chains and rules in its own `kproxy` table, with every per-Service and
//! per-endpoint fact in named sets and *data* maps. Adding, removing or changing a
//! Service or an endpoint is then element operations only, which never make the
//! kernel re-validate the table (only rules with validated expressions and elements
//! with jump/goto verdicts do; see docs/nftables-maps-layout.md). A new endpoint
//! count N adds one gate set and one rule to a graph of a dozen chains.
//!
//! Load balancing: `daddr . proto . dport @lb-ips-N dnat ip to daddr . proto . dport .
//! numgen random mod N map @backends-ips`, one rule per N in use; the gate set keeps
//! a destination with M != N endpoints from matching rule N.

pub(crate) mod affinity;
pub mod dataplane;
pub mod layout;
pub mod probe;
pub(crate) mod record;
pub mod render;

pub use layout::TABLE;
pub use render::{Desired, MapsRenderer};
