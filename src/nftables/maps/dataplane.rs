//! Applies the maps layout over netlink (an [`NftInterface`]: the kernel, or the
//! in-memory fake in unit tests), never through `nft`: one atomic batch per sync. A
//! full sync rewrites the table's fixed part and refills its sets; a partial sync sends
//! only the element differences against what the last successful sync applied (and,
//! when the endpoint counts in use or the ServiceCIDRs change, the rules; affinity
//! ports' own chains when they change).

use super::render::{Desired, MapsRenderer};
use super::TABLE;
use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::model::{IpFamily, ProxyState};
use crate::nftables::interface::NftInterface;
use crate::nftables::netlink::LazyNetlink;
use crate::nftables::transaction::Family;

/// One family's maps-layout dataplane, over `I` (netlink by default).
pub struct MapsDataplane<I: NftInterface = LazyNetlink> {
    renderer: MapsRenderer,
    nft: I,
    /// What the last successful sync left in the kernel (`None`: the next sync is full).
    applied: Option<Desired>,
    /// The kernel passed the feature probe ([`super::probe`]), run before the first sync.
    probed: bool,
}

impl MapsDataplane<LazyNetlink> {
    /// A dataplane over netlink in the current network namespace that has applied
    /// nothing yet. The socket is opened on first use.
    pub fn new(settings: FamilySettings) -> Self {
        MapsDataplane::with_interface(settings, LazyNetlink::default())
    }
}

impl<I: NftInterface> MapsDataplane<I> {
    /// A dataplane over any nftables implementation.
    pub fn with_interface(settings: FamilySettings, nft: I) -> Self {
        MapsDataplane {
            renderer: MapsRenderer::new(settings),
            nft,
            applied: None,
            probed: false,
        }
    }

    fn family_label(&self) -> IpFamily {
        self.renderer.settings().family
    }
}

impl<I: NftInterface> Dataplane for MapsDataplane<I> {
    fn family(&self) -> IpFamily {
        self.family_label()
    }

    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn needs_full_sync(&self) -> bool {
        self.applied.is_none()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        if !self.probed {
            // Once, before anything is written: refuse a kernel without what the
            // layout needs, naming the feature.
            let family = Family::of(self.family_label());
            super::probe::probe(&mut self.nft, family).map_err(|e| {
                DataplaneError::sync_failed(Mode::Nftables, self.family_label(), false, e)
            })?;
            self.probed = true;
        }
        let desired = self.renderer.desired(state);
        let (tx, full) = match (&self.applied, full) {
            (Some(old), false) => (self.renderer.render_diff(old, &desired), false),
            _ => (self.renderer.full_transaction(&desired), true),
        };
        let operations = tx.len();
        if !tx.is_empty() {
            // One atomic batch, however large: the layout has no cut points where a
            // half-applied table would still route every Service correctly.
            if let Err(e) = self.nft.apply(&tx) {
                self.applied = None;
                return Err(DataplaneError::sync_failed(
                    Mode::Nftables,
                    self.family_label(),
                    !full,
                    e,
                ));
            }
        }
        self.applied = Some(desired);
        Ok(SyncOutcome {
            full,
            operations,
            ..SyncOutcome::default()
        })
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.applied = None;
        self.nft
            .delete_table(Family::of(self.family_label()), TABLE)
            .map_err(|e| DataplaneError::cleanup_failed(Mode::Nftables, self.family_label(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{synthetic, NodeContext};
    use crate::nftables::fake::{Fake, FakeNft};
    use crate::nftables::text::normalize;
    use crate::nftables::transaction::{Op, Transaction};

    fn settings() -> FamilySettings {
        Config::default().family_settings(IpFamily::V4, "node-1", None, &[])
    }

    fn state(services: usize, endpoints: usize) -> ProxyState {
        let node = NodeContext {
            name: "node-1".into(),
            zone: None,
            prefer_same_node: false,
        };
        synthetic::cluster(services, endpoints).proxy_state(IpFamily::V4, &node)
    }

    fn table(nft: &FakeNft) -> String {
        normalize(&nft.table(Family::Ip, TABLE).dump())
    }

    /// What a fresh full sync of `state` builds in an empty fake.
    fn fresh(state: &ProxyState) -> String {
        let mut fake = Fake::new();
        fake.apply(&MapsRenderer::new(settings()).render_full(state))
            .unwrap();
        normalize(&fake.dump())
    }

    fn only_elements(tx: &Transaction) -> bool {
        tx.ops
            .iter()
            .all(|op| matches!(op, Op::AddElement(_) | Op::DeleteElement(_)))
    }

    #[test]
    fn first_sync_is_full_then_changes_are_element_diffs() {
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
        assert!(dp.needs_full_sync());
        let st = state(5, 2);
        let out = dp.sync(&st, false).unwrap();
        assert!(out.full);
        // The feature probe's throw-away tables come first, then the one sync batch.
        let sent = nft.applied();
        assert!(sent.len() > 1, "the first sync probes the kernel");
        assert_eq!(out.operations, sent.last().unwrap().len());
        assert_eq!(table(&nft), fresh(&st));
        // One more Service with the same endpoint count: elements only.
        let bigger = state(6, 2);
        let out = dp.sync(&bigger, false).unwrap();
        assert!(!out.full);
        let last = nft.applied().pop().unwrap();
        assert!(
            only_elements(&last),
            "a Service added is elements only: {last:?}"
        );
        assert_eq!(table(&nft), fresh(&bigger));
        // Nothing changed: nothing is sent.
        let sent = nft.applied().len();
        let out = dp.sync(&bigger, false).unwrap();
        assert_eq!(out.operations, 0);
        assert_eq!(nft.applied().len(), sent);
    }

    #[test]
    fn a_new_endpoint_count_adds_its_objects_and_converges() {
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(4, 2), true).unwrap();
        let st = state(4, 3);
        let out = dp.sync(&st, false).unwrap();
        assert!(!out.full);
        assert!(!only_elements(&nft.applied().pop().unwrap()));
        assert_eq!(table(&nft), fresh(&st));
    }

    #[test]
    fn a_refused_batch_changes_nothing_and_the_next_sync_is_full() {
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(3, 2), true).unwrap();
        let before = table(&nft);
        nft.fail_next(1);
        let err = dp.sync(&state(4, 2), false).unwrap_err();
        assert!(err.partial);
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
        assert_eq!(table(&nft), before, "a refused batch changes nothing");
        assert!(dp.needs_full_sync());
        let st = state(4, 2);
        let out = dp.sync(&st, false).unwrap();
        assert!(out.full, "the sync after a failure is full");
        assert_eq!(table(&nft), fresh(&st));
    }

    #[test]
    fn the_kernel_is_probed_once() {
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(2, 2), true).unwrap();
        let after_first = nft.applied().len();
        dp.sync(&state(2, 2), true).unwrap();
        assert_eq!(nft.applied().len(), after_first + 1, "no second probe");
    }

    #[test]
    fn cleanup_removes_the_table_and_is_idempotent() {
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
        dp.sync(&state(2, 2), true).unwrap();
        assert!(nft.table(Family::Ip, TABLE).exists());
        dp.cleanup().unwrap();
        assert!(!nft.table(Family::Ip, TABLE).exists());
        dp.cleanup().unwrap();
        assert!(dp.needs_full_sync());
    }
}
