//! The sync loop: waits for the watchers' first lists, then turns changes into syncs of
//! every family's [`Dataplane`], rate-limited by minSyncPeriod (bursts coalesce into one
//! sync), with a periodic sync every syncPeriod, a full sync every hour, and retries
//! with backoff after a failure (the retry is always full). It knows nothing about
//! iptables or nftables, so it is tested with fake dataplanes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::health::ServiceHealth;
use super::Shared;
use crate::dataplane::Dataplane;
use crate::model::{ClusterState, IpFamily, NodeContext, ProxyState};

/// Upstream's FullSyncPeriod: even without failures, rewrite everything this often.
pub(crate) const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// First retry delay after a failed sync; doubles up to syncPeriod.
pub(crate) const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// Timing and identity of the loop.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// This node's name (for local endpoints and topology).
    pub node_name: String,
    /// The PreferSameTrafficDistribution feature gate.
    pub prefer_same_node: bool,
    /// Minimum time between the end of one sync and the start of the next.
    pub min_sync_period: Duration,
    /// Longest time between syncs; also the ceiling of the retry backoff.
    pub sync_period: Duration,
    /// How often a sync is full even when nothing failed.
    pub full_sync_period: Duration,
}

/// Cleans conntrack after a successful sync of one family; returns the flows deleted.
pub(crate) type ConntrackHook = Box<dyn FnMut(&ProxyState) -> Result<usize, String> + Send>;

/// What the loop drives.
pub(crate) struct Planes {
    /// One dataplane per IP family; the first is the primary family.
    pub dataplanes: Vec<Box<dyn Dataplane>>,
    /// Per-Service health-check node ports, fed from the primary family's state.
    pub(crate) service_health: Option<ServiceHealth>,
}

/// Builds the dataplanes once the watchers have listed (they need the Node's
/// addresses and labels).
pub(crate) type PlaneFactory = Box<dyn FnOnce(&ClusterState) -> Planes + Send>;

/// What one sync works from, taken under the shared lock.
struct Snapshot {
    /// One state per dataplane, in the same order.
    states: Vec<ProxyState>,
    /// This node may receive load-balancer traffic.
    eligible: bool,
    /// Trigger times of the changes in this sync.
    triggers: Vec<(IpFamily, SystemTime)>,
}

/// The loop and what it drives.
pub struct SyncLoop {
    settings: LoopSettings,
    planes: Vec<Box<dyn Dataplane>>,
    factory: Option<PlaneFactory>,
    conntrack: ConntrackHook,
    service_health: Option<ServiceHealth>,
}

impl SyncLoop {
    /// A loop over `planes` (one per IP family; the first is the primary family, whose
    /// state the health-check node ports report).
    pub fn new(settings: LoopSettings, planes: Vec<Box<dyn Dataplane>>) -> SyncLoop {
        SyncLoop {
            settings,
            planes,
            factory: None,
            conntrack: Box::new(|_| Ok(0)),
            service_health: None,
        }
    }

    /// A loop whose dataplanes are built by `factory` after the first lists.
    pub(crate) fn deferred(settings: LoopSettings, factory: PlaneFactory) -> SyncLoop {
        let mut l = SyncLoop::new(settings, Vec::new());
        l.factory = Some(factory);
        l
    }

    /// Runs `hook` after each successful sync of a family (conntrack clean-up).
    pub(crate) fn with_conntrack(mut self, hook: ConntrackHook) -> SyncLoop {
        self.conntrack = hook;
        self
    }

    /// Waits until every watcher has listed once (or `stop`); returns false on stop.
    /// Nothing is written before that: a restart must not replace working rules with
    /// a half-known cluster.
    fn wait_for_lists(shared: &Shared, stop: &AtomicBool) -> bool {
        let mut st = shared.lock();
        loop {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            if st.all_listed() {
                return true;
            }
            // Every change to the flags (and `stop`) is signalled under the lock.
            st = shared.wait(st);
        }
    }

    /// Waits until `until`, or until stopped, or (with `on_change`) until a change is
    /// flagged. Returns false when stopped. The change flag is left for the caller,
    /// which clears it right before reading the state, so nothing is lost between.
    fn wait(shared: &Shared, stop: &AtomicBool, until: Instant, on_change: bool) -> bool {
        let mut st = shared.lock();
        while !(stop.load(Ordering::SeqCst) || on_change && st.dirty()) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            st = shared.wait_timeout(st, until - now);
        }
        !stop.load(Ordering::SeqCst)
    }

    /// Takes every change so far and derives every family's state under the lock
    /// (cheap: per-Service plans are cached): the states, whether this node may receive
    /// load-balancer traffic, and the trigger times of the changes taken.
    fn snapshot(&self, shared: &Shared) -> Snapshot {
        let mut guard = shared.lock();
        let triggers = guard.take_changes();
        let st = &guard.cluster;
        let node = NodeContext {
            name: self.settings.node_name.clone(),
            zone: st.node().and_then(|n| n.zone.clone()),
            prefer_same_node: self.settings.prefer_same_node,
        };
        let eligible = st.node().is_some_and(|n| !n.being_deleted);
        let states = self
            .planes
            .iter()
            .map(|dp| st.proxy_state(dp.family(), &node))
            .collect();
        Snapshot {
            states,
            eligible,
            triggers,
        }
    }

    /// Runs until `stop` is set (then wakes via `shared.wake`). Rules stay in place on
    /// return.
    pub fn run(mut self, shared: &Shared, stop: &AtomicBool) {
        if !Self::wait_for_lists(shared, stop) {
            return;
        }
        if let Some(factory) = self.factory.take() {
            let planes = factory(&shared.lock().cluster);
            self.planes.extend(planes.dataplanes);
            if planes.service_health.is_some() {
                self.service_health = planes.service_health;
            }
        }
        for dp in &self.planes {
            // Upstream's SyncLoop starts with Updated(): the daemon is healthy until a
            // change has waited too long.
            shared.health.updated(dp.family());
        }
        let mut last_sync_end: Option<Instant> = None;
        let mut last_full = Instant::now();
        let mut force_full = true;
        let mut backoff = INITIAL_BACKOFF;
        let mut pending_work = true;
        loop {
            if !pending_work {
                let follow_up = self.planes.iter().filter_map(|dp| dp.resync_after()).min();
                let wait = if force_full {
                    backoff
                } else {
                    follow_up
                        .unwrap_or(self.settings.sync_period)
                        .min(self.settings.sync_period)
                };
                // A change, a retry or follow-up deadline, or the periodic sync.
                if !Self::wait(shared, stop, Instant::now() + wait, true) {
                    return;
                }
            }
            if let Some(end) = last_sync_end {
                let earliest = end + self.settings.min_sync_period;
                // Changes arriving meanwhile are folded into the coming sync.
                if !Self::wait(shared, stop, earliest, false) {
                    return;
                }
            }
            let mut full = force_full || last_full.elapsed() >= self.settings.full_sync_period;
            for dp in self.planes.iter_mut() {
                if dp.rules_flushed() {
                    tracing::warn!(
                        family = dp.family().label(),
                        mode = dp.mode().as_str(),
                        "kproxy's rules were removed from the kernel; resyncing fully"
                    );
                    full = true;
                }
            }
            // Everything that arrived up to now is in this sync.
            let Snapshot {
                states,
                eligible,
                triggers,
            } = self.snapshot(shared);
            shared.metrics.changes_pending(0, 0);
            shared.health.set_node_eligible(eligible);
            let mut ok = true;
            for (dp, state) in self.planes.iter_mut().zip(&states) {
                let family = dp.family();
                let started = Instant::now();
                let result = dp.sync(state, full);
                let took = started.elapsed();
                match result {
                    Ok(outcome) => {
                        shared.health.updated(family);
                        shared.metrics.synced(family, outcome.full, took);
                        for t in &outcome.iptables_rules {
                            shared
                                .metrics
                                .iptables_rules(family, t.table, t.total, t.written);
                        }
                        if outcome.cleanup_failed {
                            shared.metrics.nft_cleanup_failed(family);
                        }
                        let now = SystemTime::now();
                        for (f, t) in &triggers {
                            if *f == family {
                                if let Ok(latency) = now.duration_since(*t) {
                                    shared.metrics.network_programming(family, latency);
                                }
                            }
                        }
                        let (internal, external) = state.no_local_endpoints();
                        shared
                            .metrics
                            .no_local_endpoints(family, internal, external);
                        let ct_started = Instant::now();
                        match (self.conntrack)(state) {
                            Ok(deleted) => {
                                if deleted > 0 {
                                    tracing::info!(
                                        family = family.label(),
                                        deleted,
                                        "removed stale conntrack entries"
                                    );
                                }
                                shared.metrics.conntrack_reconciled(
                                    family,
                                    ct_started.elapsed(),
                                    deleted,
                                );
                            }
                            Err(e) => tracing::warn!(
                                family = family.label(),
                                error = %e,
                                "conntrack clean-up failed"
                            ),
                        }
                    }
                    Err(e) => {
                        ok = false;
                        shared.metrics.sync_attempt(family, full, took);
                        shared.metrics.apply_failed(family, dp.mode(), e.partial);
                        tracing::error!(error = %e, "sync failed; retrying with a full sync");
                    }
                }
            }
            if let (Some(hc), Some(state)) = (self.service_health.as_mut(), states.first()) {
                hc.update(state);
            }
            drop(states);
            last_sync_end = Some(Instant::now());
            if ok {
                if full {
                    last_full = Instant::now();
                    // A full sync builds the whole ruleset at once; give the peak back.
                    crate::memory::release_free_memory();
                }
                force_full = false;
                backoff = INITIAL_BACKOFF;
            } else {
                force_full = true;
                backoff = (backoff * 2).min(self.settings.sync_period.max(INITIAL_BACKOFF));
            }
            // A change that arrived while syncing is handled right away (after
            // minSyncPeriod), without waiting for another wake-up.
            pending_work = shared.lock().dirty();
        }
    }
}
