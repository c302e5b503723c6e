//! nftables mode: upstream's `kube-proxy` table as a transaction (plain data), its
//! `nft -f` text form, an in-memory fake, and the renderer.

pub mod dataplane;
pub mod fake;
pub mod names;
pub mod netlink;
pub mod render;
pub mod text;
pub mod transaction;

use std::time::Instant;

use crate::cli::inputs::Inputs;
use netlink::{Netlink, NetlinkError};
use render::{NftRenderer, RenderOptions, TABLE};
use transaction::Family;

/// Operations per batch when a large sync (a cold start, taking over an existing table,
/// a full resync at scale) is split at the renderer's cut points: large enough to be
/// efficient, small enough to stay clear of the kernel's quadratic cost for huge
/// transactions (one 450k-operation resync at 10k Services took 217 s; split, seconds —
/// docs/benchmarks.md). Smaller syncs are one atomic batch.
pub const SYNC_BATCH_OPS: usize = 20_000;

/// Renders and applies every family's full ruleset once, over netlink, in the current
/// network namespace (`kproxy apply --mode nftables`).
pub fn apply_once(inputs: &Inputs) -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    let start = Instant::now();
    for settings in &inputs.families {
        let family = Family::of(settings.family);
        let existing = nl.read_table(family, TABLE)?;
        let state = inputs.state.proxy_state(settings.family, &inputs.node);
        let mut renderer = NftRenderer::new(settings.clone());
        let rendered = renderer.render(
            &state,
            &RenderOptions {
                full: true,
                now_ms: start.elapsed().as_millis() as u64,
                existing: existing.as_ref(),
            },
        );
        if let Some(c) = &rendered.cleanup {
            nl.apply(c)?;
        }
        let (main, rendered) = rendered.take_main();
        for part in main.split_at(SYNC_BATCH_OPS, &rendered.cuts) {
            nl.apply(&part)?;
        }
        let stale = rendered.flushed_stale.clone();
        renderer.commit(rendered);
        // A one-shot apply has no later sync to delete the chains it just emptied; try
        // now (kernels before 6.2 may still see them referenced: then they stay, empty).
        if !stale.is_empty() {
            let mut tx = transaction::Transaction::new(family, TABLE);
            for c in stale {
                tx.push(transaction::Op::DeleteChain(c));
            }
            if let Err(e) = nl.apply(&tx) {
                tracing::debug!(error = %e, "stale chains left for a later sync");
            }
        }
    }
    Ok(())
}

/// Deletes kproxy's tables (`ip kube-proxy`, `ip6 kube-proxy`); safe to run twice.
pub fn cleanup() -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    for family in [Family::Ip, Family::Ip6] {
        nl.delete_table(family, TABLE)?;
    }
    Ok(())
}
