//! nftables mode end to end for one family: render from state, apply over netlink,
//! remember only what the kernel accepted.

use std::time::{Duration, Instant};

use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::model::{IpFamily, ProxyState};

use super::netlink::{Netlink, NetlinkError};
use super::render::{NftRenderer, RenderOptions, STALE_CHAIN_DELAY_MS, TABLE};
use super::transaction::Family;
use super::SYNC_BATCH_OPS;

/// A chain every kproxy (and upstream kube-proxy) table has; when it is gone, the
/// table was deleted or flushed behind our back.
const CANARY_CHAIN: &str = "services";

/// nftables over netlink for one family.
pub struct NftDataplane {
    renderer: NftRenderer,
    netlink: Option<Netlink>,
    clock: Instant,
    /// No sync has succeeded yet (the first one may take over a predecessor's table).
    first: bool,
}

impl NftDataplane {
    /// A dataplane that has applied nothing yet (its first sync reads the table back
    /// and takes over whatever is there).
    pub fn new(settings: FamilySettings) -> Self {
        NftDataplane {
            renderer: NftRenderer::new(settings),
            netlink: None,
            clock: Instant::now(),
            first: true,
        }
    }

    fn nft_family(&self) -> Family {
        Family::of(self.renderer.settings().family)
    }

    fn socket(&mut self) -> Result<&mut Netlink, NetlinkError> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::open()?);
        }
        Ok(self.netlink.as_mut().expect("opened above"))
    }

    fn error(&self, partial: bool, e: impl std::fmt::Display) -> DataplaneError {
        DataplaneError {
            mode: Mode::Nftables.as_str(),
            family: self.renderer.settings().family.label(),
            what: if partial { "partial sync" } else { "full sync" },
            partial,
            message: e.to_string(),
        }
    }

    fn try_sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, NetlinkError> {
        let family = self.nft_family();
        let now_ms = self.clock.elapsed().as_millis() as u64;
        // Full syncs re-read the kernel's table, so drift (or a predecessor's table) is
        // corrected; partial syncs trust our record.
        let existing = if full {
            self.socket()?.read_table(family, TABLE)?
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
        let nl = self.socket()?;
        // Deleting chains flushed a while ago is its own transaction: if the kernel
        // still sees them referenced (kernels before 6.2 keep a flushed chain's
        // references until the next commit), the sync itself must still go through.
        let mut cleanup_failed = false;
        if let Some(c) = &rendered.cleanup {
            if let Err(e) = nl.apply(c) {
                tracing::warn!(error = %e, "deleting stale chains failed; a full sync will retry");
                cleanup_failed = true;
            }
        }
        let operations = rendered.main.len();
        let full_sync = rendered.full;
        let services_written = rendered.services_written;
        let (main, rest) = rendered.take_main();
        // A large sync (cold start, take-over, full resync at scale) goes as bounded
        // batches cut where every prefix is a consistent table (each Service old or
        // entirely new); a failure stops at a batch boundary and the next sync is full.
        // Anything smaller is one atomic batch. `split_at` consumes the transaction, so
        // the peak holds one copy of it, not two.
        for part in main.split_at(SYNC_BATCH_OPS, &rest.cuts) {
            nl.apply(&part)?;
        }
        self.renderer.commit(rest);
        self.first = false;
        if cleanup_failed {
            // Our record now says those chains are gone; let a full sync (which reads
            // the table back) find them again.
            self.renderer.invalidate();
        }
        Ok(SyncOutcome {
            full: full_sync,
            iptables_rules: Vec::new(),
            operations,
            services_written,
            cleanup_failed,
        })
    }
}

impl Dataplane for NftDataplane {
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
        match self.try_sync(state, full) {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                self.renderer.invalidate();
                Err(self.error(!full, e))
            }
        }
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
        match self
            .socket()
            .and_then(|nl| nl.chain_exists(family, TABLE, CANARY_CHAIN))
        {
            Ok(exists) => !exists,
            Err(e) => {
                tracing::warn!(error = %e, "checking the nftables table failed");
                false
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let family = self.nft_family();
        let result = self.socket().and_then(|nl| nl.delete_table(family, TABLE));
        self.renderer = NftRenderer::new(self.renderer.settings().clone());
        result.map_err(|e| DataplaneError {
            what: "cleanup",
            ..self.error(false, e)
        })
    }
}
