//! The one interface both modes implement for the daemon: render one family's rules
//! from the proxy state, apply them, remember only what the kernel accepted, and
//! remove them again. The sync loop (`daemon::sync`) drives any `Dataplane`, so its
//! scheduling, retries and metrics are tested with a fake that needs no kernel.

#![deny(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use crate::config::Mode;
use crate::model::{IpFamily, ProxyState};

/// What one successful sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Whether it rewrote everything.
    pub full: bool,
    /// iptables: the rules of each table (empty in nftables mode).
    pub(crate) iptables_rules: Vec<TableRules>,
    /// Operations sent to the kernel (lines of `iptables-restore` input, or nftables
    /// netlink operations).
    pub operations: usize,
    /// Services whose rules this sync rewrote.
    pub services_written: usize,
    /// A clean-up step (deleting chains flushed earlier) failed; the sync itself held.
    pub(crate) cleanup_failed: bool,
}

/// How many rules one iptables table holds after a sync (upstream's
/// `sync_proxy_rules_iptables_total` and `…_last` metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableRules {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// Rules kproxy owns in the table in total.
    pub total: usize,
    /// Rules this sync wrote.
    pub written: usize,
}

/// The cause of a failed sync, shared so that the error stays cheap to clone (the
/// daemon logs it and keeps it for metrics).
pub(crate) type DataplaneCause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A failed sync. The kernel keeps what it had (both appliers are all-or-nothing);
/// the next sync is full.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{mode} {family} {what} failed: {source}")]
pub struct DataplaneError {
    /// `iptables` or `nftables`.
    pub mode: &'static str,
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    /// What failed: `full sync`, `partial sync` or `cleanup`.
    pub what: &'static str,
    /// Whether the failed sync was a partial one (upstream counts those separately).
    pub partial: bool,
    /// What went wrong, with the failing object where the kernel named one.
    #[source]
    pub source: DataplaneCause,
}

impl DataplaneError {
    /// A failed sync (`partial` or full) of `mode` for `family`.
    pub(crate) fn sync_failed(
        mode: Mode,
        family: IpFamily,
        partial: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> DataplaneError {
        DataplaneError {
            mode: mode.as_str(),
            family: family.label(),
            what: if partial { "partial sync" } else { "full sync" },
            partial,
            source: Arc::new(source),
        }
    }

    /// A failed clean-up of `mode` for `family`.
    pub(crate) fn cleanup_failed(
        mode: Mode,
        family: IpFamily,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> DataplaneError {
        DataplaneError {
            what: "cleanup",
            ..DataplaneError::sync_failed(mode, family, false, source)
        }
    }
}

/// One family's rules in one mode.
pub trait Dataplane: Send {
    /// The family this dataplane programs.
    fn family(&self) -> IpFamily;

    /// The mode.
    fn mode(&self) -> Mode;

    /// Whether the next sync will be full whatever the caller asks (nothing applied
    /// yet, or the last sync failed).
    fn needs_full_sync(&self) -> bool;

    /// Renders `state` and applies it: everything when `full`, else only what changed
    /// since the last successful sync. On failure nothing is recorded as applied.
    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError>;

    /// A follow-up sync this dataplane needs even without changes (e.g. to delete
    /// chains it flushed once the kernel has let go of them).
    fn resync_after(&self) -> Option<Duration> {
        None
    }

    /// Whether something outside kproxy removed its rules since the last sync (then
    /// the next sync must be full).
    fn rules_flushed(&mut self) -> bool {
        false
    }

    /// Removes this dataplane's rules from the kernel (safe to repeat).
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
}

pub mod fake {
    //! A dataplane that records what it was asked to do and can be told to fail, so
    //! the sync loop's scheduling is tested without a kernel.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Instant;

    use super::{Dataplane, DataplaneError, SyncOutcome};
    use crate::config::Mode;
    use crate::model::{IpFamily, ProxyState};

    /// One sync the fake saw.
    #[derive(Debug, Clone)]
    pub struct FakeSync {
        /// Whether the caller asked for a full sync.
        pub requested_full: bool,
        /// Whether it was full (asked, or forced by an earlier failure).
        pub full: bool,
        /// Service ports in the state it was given.
        pub ports: usize,
        /// Whether it succeeded.
        pub ok: bool,
        /// When it ran.
        pub at: Instant,
    }

    /// Handles shared between a test and its fake.
    #[derive(Debug, Clone, Default)]
    pub struct FakeControl {
        /// Every sync, in order.
        pub log: Arc<Mutex<Vec<FakeSync>>>,
        /// Fail this many of the next syncs.
        pub fail_next: Arc<AtomicUsize>,
        /// Pretend someone flushed the rules (reported once).
        pub flushed: Arc<AtomicBool>,
    }

    impl FakeControl {
        /// The syncs so far.
        pub fn syncs(&self) -> Vec<FakeSync> {
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    /// The failure a [`FakeControl::fail_next`] sync reports.
    #[derive(Debug, Clone, Copy, thiserror::Error)]
    #[error("injected failure")]
    pub(crate) struct InjectedFailure;

    /// The fake.
    #[derive(Debug)]
    pub struct FakeDataplane {
        family: IpFamily,
        control: FakeControl,
        applied: bool,
    }

    impl FakeDataplane {
        /// A fake for `family`, controlled through `control`.
        pub fn new(family: IpFamily, control: FakeControl) -> Self {
            FakeDataplane {
                family,
                control,
                applied: false,
            }
        }
    }

    impl Dataplane for FakeDataplane {
        fn family(&self) -> IpFamily {
            self.family
        }

        fn mode(&self) -> Mode {
            Mode::Nftables
        }

        fn needs_full_sync(&self) -> bool {
            !self.applied
        }

        fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
            let effective = full || !self.applied;
            let fail = self
                .control
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            self.control
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(FakeSync {
                    requested_full: full,
                    full: effective,
                    ports: state.ports.len(),
                    ok: !fail,
                    at: Instant::now(),
                });
            if fail {
                self.applied = false;
                return Err(DataplaneError::sync_failed(
                    Mode::Nftables,
                    self.family,
                    !effective,
                    InjectedFailure,
                ));
            }
            self.applied = true;
            Ok(SyncOutcome {
                full: effective,
                operations: state.ports.len(),
                ..SyncOutcome::default()
            })
        }

        fn rules_flushed(&mut self) -> bool {
            self.control.flushed.swap(false, Ordering::SeqCst)
        }

        fn cleanup(&mut self) -> Result<(), DataplaneError> {
            self.applied = false;
            Ok(())
        }
    }
}
