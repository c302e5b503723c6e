//! nftables mode end to end for one family: render from state, apply through an
//! [`NftInterface`] (the kernel over netlink, or the in-memory fake in tests),
//! remember only what was accepted.

use std::time::{Duration, Instant};

use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::model::{IpFamily, ProxyState};

use super::interface::NftInterface;
use super::netlink::LazyNetlink;
use super::render::{NftRenderer, RenderOptions, STALE_CHAIN_DELAY_MS, TABLE};
use super::transaction::{Family, Op, Transaction};
use super::SYNC_BATCH_OPS;

/// A chain every kproxy (and upstream kube-proxy) table has; when it is gone, the
/// table was deleted or flushed behind our back.
const CANARY_CHAIN: &str = "services";

/// nftables for one family, over `I` (netlink by default).
pub struct NftDataplane<I: NftInterface = LazyNetlink> {
    renderer: NftRenderer,
    nft: I,
    clock: Instant,
    batch_ops: usize,
    /// No sync has succeeded yet (the first one may take over a predecessor's table).
    first: bool,
}

impl NftDataplane<LazyNetlink> {
    /// A dataplane over netlink in the current network namespace that has applied
    /// nothing yet (its first sync reads the table back and takes over whatever is
    /// there). The socket is opened on first use.
    pub fn new(settings: FamilySettings) -> Self {
        NftDataplane::with_interface(settings, LazyNetlink::default())
    }
}

impl<I: NftInterface> NftDataplane<I> {
    /// A dataplane over any nftables implementation.
    pub fn with_interface(settings: FamilySettings, nft: I) -> Self {
        NftDataplane {
            renderer: NftRenderer::new(settings),
            nft,
            clock: Instant::now(),
            batch_ops: SYNC_BATCH_OPS,
            first: true,
        }
    }

    /// Splits syncs larger than `ops` operations into batches (default
    /// [`SYNC_BATCH_OPS`]); for tests of the split path.
    #[cfg(test)]
    pub(crate) fn with_batch_ops(mut self, ops: usize) -> Self {
        self.batch_ops = ops.max(1);
        self
    }

    /// The nftables implementation (for tests that inspect the fake).
    pub fn interface(&self) -> &I {
        &self.nft
    }

    fn nft_family(&self) -> Family {
        Family::of(self.renderer.settings().family)
    }

    fn try_sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, I::Error> {
        let family = self.nft_family();
        let now_ms = self.clock.elapsed().as_millis() as u64;
        // Full syncs re-read the kernel's table, so drift (or a predecessor's table) is
        // corrected; partial syncs trust our record.
        let existing = if full {
            self.nft.read_table(family, TABLE)?
        } else {
            None
        };
        if let (true, Some(e)) = (self.first, &existing) {
            // A restart (or a crash) left rules behind: say so, since the first sync
            // now rewrites them rather than starting clean.
            tracing::info!(
                table = TABLE,
                chains = e.chains.len(),
                sets = e.sets.len(),
                "took over the existing nftables table left by a previous run"
            );
        }
        let rendered = self.renderer.render(
            state,
            &RenderOptions {
                full,
                now_ms,
                existing: existing.as_ref(),
            },
        );
        drop(existing);
        crate::memory::log_phase("nftables rendered");
        // Deleting chains flushed a while ago is its own transaction: if the kernel
        // still sees them referenced (kernels before 6.2 keep a flushed chain's
        // references until the next commit), the sync itself must still go through.
        let mut cleanup_failed = false;
        if let Some(c) = &rendered.cleanup {
            if let Err(e) = self.nft.apply(c) {
                tracing::warn!(error = %e, "deleting stale chains failed; a full sync will retry");
                cleanup_failed = true;
            }
        }
        let outcome = SyncOutcome {
            full: rendered.full,
            iptables_rules: Vec::new(),
            operations: rendered.main.len(),
            services_written: rendered.services_written,
            cleanup_failed,
        };
        // A large sync (cold start, take-over, full resync at scale) goes as bounded
        // batches cut where every prefix is a consistent table (each Service old or
        // entirely new); a failure stops at a batch boundary and the next sync is full.
        // Anything smaller is one atomic batch.
        for part in rendered.main.into_batches(self.batch_ops) {
            self.nft.apply(&part)?;
        }
        crate::memory::log_phase("nftables applied");
        self.renderer.commit(rendered.record);
        self.first = false;
        if cleanup_failed {
            // Our record now says those chains are gone; let a full sync (which reads
            // the table back) find them again.
            self.renderer.invalidate();
        }
        Ok(outcome)
    }

    /// Deletes the chains the last sync flushed, right away rather than a second
    /// later: for a one-shot apply, which has no later sync. Kernels before 6.2 may
    /// still see them referenced; then they stay, empty (logged, not an error).
    pub(crate) fn delete_flushed_chains_now(&mut self) {
        let stale = self.renderer.stale_chains();
        if stale.is_empty() {
            return;
        }
        let mut tx = Transaction::new(self.nft_family(), TABLE);
        for c in stale {
            tx.push(Op::DeleteChain(c));
        }
        if let Err(e) = self.nft.apply(&tx) {
            tracing::debug!(error = %e, "stale chains left for a later sync");
        }
    }
}

impl<I: NftInterface> Dataplane for NftDataplane<I> {
    fn family(&self) -> IpFamily {
        self.renderer.settings().family
    }

    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn needs_full_sync(&self) -> bool {
        self.renderer.needs_full_sync()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        let full = full || self.renderer.needs_full_sync();
        self.try_sync(state, full).map_err(|e| {
            self.renderer.invalidate();
            DataplaneError::sync_failed(Mode::Nftables, self.family(), !full, e)
        })
    }

    fn resync_after(&self) -> Option<Duration> {
        self.renderer
            .has_stale_chains()
            .then(|| Duration::from_millis(STALE_CHAIN_DELAY_MS + 100))
    }

    /// The table (or its `services` chain) vanished: someone ran `nft flush ruleset`
    /// or deleted the table; rewrite everything.
    fn rules_flushed(&mut self) -> bool {
        if self.renderer.needs_full_sync() {
            return false;
        }
        let family = self.nft_family();
        match self.nft.chain_exists(family, TABLE, CANARY_CHAIN) {
            Ok(exists) => !exists,
            Err(e) => {
                tracing::warn!(error = %e, "checking the nftables table failed");
                false
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let family = self.nft_family();
        let result = self.nft.delete_table(family, TABLE);
        self.renderer = NftRenderer::new(self.renderer.settings().clone());
        result.map_err(|e| DataplaneError::cleanup_failed(Mode::Nftables, self.family(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{synthetic, NodeContext};
    use crate::nftables::fake::{Fake, FakeNft};
    use crate::nftables::render::NftRenderer;
    use crate::nftables::text::normalize;

    fn settings() -> FamilySettings {
        Config::default().family_settings(IpFamily::V4, "node-1", None, &[])
    }

    fn state(services: usize) -> ProxyState {
        let node = NodeContext {
            name: "node-1".into(),
            zone: None,
            prefer_same_node: false,
        };
        synthetic::cluster(services, 2).proxy_state(IpFamily::V4, &node)
    }

    fn table(nft: &FakeNft) -> Fake {
        nft.table(Family::Ip, TABLE)
    }

    /// What a fresh full sync of `state` builds in an empty fake.
    fn fresh(state: &ProxyState) -> String {
        let mut fake = Fake::new();
        let r = NftRenderer::new(settings()).render(state, &RenderOptions::default());
        fake.apply(&r.main).unwrap();
        normalize(&fake.dump())
    }

    #[test]
    fn first_sync_is_full_and_builds_the_table() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone());
        assert!(dp.needs_full_sync());
        let st = state(5);
        let out = dp.sync(&st, false).unwrap();
        assert!(out.full);
        assert_eq!(out.services_written, 5);
        assert_eq!(out.operations, nft.applied()[0].len());
        assert!(!dp.needs_full_sync());
        assert_eq!(normalize(&table(&nft).dump()), fresh(&st));
        assert!(!dp.rules_flushed());
    }

    #[test]
    fn partial_sync_writes_only_the_change_and_converges() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(5), true).unwrap();
        let bigger = state(6);
        let out = dp.sync(&bigger, false).unwrap();
        assert!(!out.full);
        assert_eq!(out.services_written, 1);
        let last = nft.applied().pop().unwrap();
        assert!(
            !last.ops.iter().any(|op| matches!(op, Op::AddTable { .. })),
            "a partial sync does not rewrite the fixed part"
        );
        assert_eq!(normalize(&table(&nft).dump()), fresh(&bigger));
        // Nothing changed: nothing to write.
        let out = dp.sync(&bigger, false).unwrap();
        assert_eq!((out.full, out.services_written), (false, 0));
    }

    #[test]
    fn failed_batch_keeps_the_table_and_forces_a_full_sync() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone());
        let small = state(3);
        dp.sync(&small, true).unwrap();
        let before = table(&nft);
        nft.fail_next(1);
        let err = dp.sync(&state(4), false).unwrap_err();
        assert!(err.partial);
        assert_eq!(
            err.to_string(),
            "nftables IPv4 partial sync failed: injected failure"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
        assert_eq!(table(&nft), before, "a refused batch changes nothing");
        assert!(dp.needs_full_sync());
        let st = state(4);
        let out = dp.sync(&st, false).unwrap();
        assert!(out.full, "the sync after a failure is full");
        assert_eq!(normalize(&table(&nft).dump()), fresh(&st));
    }

    #[test]
    fn large_sync_is_split_into_consistent_batches() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone()).with_batch_ops(40);
        let st = state(20);
        let out = dp.sync(&st, true).unwrap();
        let batches = nft.applied();
        assert!(batches.len() > 1, "split into {} batches", batches.len());
        assert_eq!(
            batches.iter().map(Transaction::len).sum::<usize>(),
            out.operations
        );
        assert_eq!(normalize(&table(&nft).dump()), fresh(&st));
    }

    #[test]
    fn a_deleted_table_is_noticed_and_rewritten() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone());
        let st = state(3);
        dp.sync(&st, true).unwrap();
        nft.remove_table(Family::Ip, TABLE);
        assert!(dp.rules_flushed());
        let out = dp.sync(&st, true).unwrap();
        assert!(out.full);
        assert_eq!(normalize(&table(&nft).dump()), fresh(&st));
        dp.cleanup().unwrap();
        assert!(!table(&nft).exists());
        assert!(dp.needs_full_sync());
        dp.cleanup().unwrap();
    }

    #[test]
    fn stale_chains_are_flushed_then_deleted_by_a_later_sync() {
        let nft = FakeNft::new();
        let mut dp = NftDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(3), true).unwrap();
        let chains = table(&nft).chain_names().len();
        dp.sync(&state(2), false).unwrap();
        assert!(
            dp.resync_after().is_some(),
            "a follow-up sync deletes the flushed chains"
        );
        assert_eq!(
            table(&nft).chain_names().len(),
            chains,
            "flushed, not yet deleted"
        );
        dp.delete_flushed_chains_now();
        assert!(table(&nft).chain_names().len() < chains);
    }
}
