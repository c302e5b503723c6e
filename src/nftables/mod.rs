//! nftables mode: upstream's `kube-proxy` table as a transaction (plain data), its
//! `nft -f` text form, an in-memory fake, and the renderer.

#![deny(unsafe_code)]

pub mod dataplane;
pub mod existing;
pub mod fake;
pub mod interface;
pub mod maps;
pub mod names;
pub mod netlink;
pub mod render;
pub mod text;
pub mod transaction;

use crate::config::FamilySettings;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::ProxyState;
use dataplane::NftDataplane;

/// Operations per batch when a large sync (a cold start, taking over an existing table,
/// a full resync at scale) is split at the renderer's cut points: large enough to be
/// efficient, small enough to stay clear of the kernel's quadratic cost for huge
/// transactions (one 450k-operation resync at 10k Services took 217 s; split, seconds —
/// docs/benchmarks.md). Smaller syncs are one atomic batch.
pub const SYNC_BATCH_OPS: usize = 20_000;

/// Renders and applies each family's full ruleset once, over netlink, in the current
/// network namespace (`kproxy apply --mode nftables`): one [`NftDataplane`] sync per
/// family, after which the chains it emptied are deleted at once (a one-shot apply
/// has no later sync to do it).
pub(crate) fn apply_once(families: &[(FamilySettings, ProxyState)]) -> Result<(), DataplaneError> {
    for (settings, state) in families {
        let mut dp = NftDataplane::new(settings.clone());
        dp.sync(state, true)?;
        dp.delete_flushed_chains_now();
    }
    Ok(())
}
