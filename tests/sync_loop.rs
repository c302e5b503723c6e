//! The daemon's sync loop driven with fake dataplanes (no kernel, no root): the first
//! sync waits for every watch to list, bursts coalesce under minSyncPeriod, failures are
//! retried as full syncs with backoff and counted, flushed rules force a full sync, and
//! the periodic sync runs without changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kproxy::daemon::health::Health;
use kproxy::daemon::metrics::Metrics;
use kproxy::daemon::sync::{LoopSettings, SyncLoop};
use kproxy::daemon::Shared;
use kproxy::dataplane::fake::{FakeControl, FakeDataplane, FakeSync};
use kproxy::dataplane::Dataplane;
use kproxy::model::{synthetic, IpFamily};

struct Harness {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    control: FakeControl,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    fn start(min_sync: Duration, sync_period: Duration, listed: bool) -> Harness {
        let shared = Arc::new(Shared::new(
            &[IpFamily::V4],
            Health::new(&[IpFamily::V4], Duration::from_secs(30)),
            Metrics::new(),
        ));
        *shared.state.lock().unwrap() = synthetic::cluster(3, 2);
        if listed {
            shared.mark_listed();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let control = FakeControl::default();
        let settings = LoopSettings {
            node_name: "node-1".into(),
            prefer_same_node: false,
            min_sync_period: min_sync,
            sync_period,
            full_sync_period: Duration::from_secs(3600),
        };
        let planes: Vec<Box<dyn Dataplane>> =
            vec![Box::new(FakeDataplane::new(IpFamily::V4, control.clone()))];
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || SyncLoop::new(settings, planes).run(&shared, &stop))
        };
        Harness {
            shared,
            stop,
            control,
            thread: Some(thread),
        }
    }

    /// Replaces the cluster with `n` Services and signals a change.
    fn set_services(&self, n: usize) {
        *self.shared.state.lock().unwrap() = synthetic::cluster(n, 2);
        self.shared.changed();
    }

    fn wait_for(&self, what: &str, limit: Duration, f: impl Fn(&[FakeSync]) -> bool) {
        let t = Instant::now();
        loop {
            if f(&self.control.syncs()) {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "timed out waiting for {what}; syncs: {:#?}",
                self.control.syncs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn first_sync_waits_until_every_watch_has_listed() {
    let h = Harness::start(Duration::ZERO, Duration::from_secs(30), false);
    h.set_services(4);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        h.control.syncs().is_empty(),
        "synced before the watches listed"
    );
    // Three of four kinds listed: still nothing.
    {
        let mut s = h.shared.synced.lock().unwrap();
        s[0] = true;
        s[1] = true;
        s[2] = true;
    }
    h.shared.wake.notify_all();
    std::thread::sleep(Duration::from_millis(200));
    assert!(h.control.syncs().is_empty());
    h.shared.mark_listed();
    h.wait_for("the first sync", Duration::from_secs(5), |s| !s.is_empty());
    let first = &h.control.syncs()[0];
    assert!(first.full && first.requested_full && first.ok);
    // 4 Services, one port each.
    assert_eq!(first.ports, 4);
}

#[test]
fn bursts_coalesce_under_min_sync_period() {
    let min = Duration::from_millis(400);
    let h = Harness::start(min, Duration::from_secs(30), true);
    h.wait_for("the first sync", Duration::from_secs(5), |s| s.len() == 1);
    for n in 4..24 {
        h.set_services(n);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.wait_for("the burst to be synced", Duration::from_secs(5), |s| {
        s.last().is_some_and(|l| l.ports == 23)
    });
    std::thread::sleep(min * 2);
    let syncs = h.control.syncs();
    // The first change is synced once minSyncPeriod has passed since the first sync;
    // everything after it lands in at most one more.
    assert!(
        syncs.len() <= 3,
        "20 changes in 100 ms became {} syncs",
        syncs.len()
    );
    for pair in syncs.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= min - Duration::from_millis(20),
            "syncs closer than minSyncPeriod"
        );
    }
    assert!(
        syncs[1..].iter().all(|s| !s.full),
        "changes after a good sync are partial"
    );
}

#[test]
fn a_failed_sync_is_retried_fully_with_backoff_and_counted() {
    let h = Harness::start(Duration::ZERO, Duration::from_secs(30), true);
    h.wait_for("the first sync", Duration::from_secs(5), |s| s.len() == 1);
    h.control.fail_next.store(2, Ordering::SeqCst);
    h.set_services(5);
    // Two failures, then a success — with no further change from the API server.
    h.wait_for("the retries", Duration::from_secs(10), |s| {
        s.len() >= 4 && s[3].ok
    });
    let syncs = h.control.syncs();
    assert!(
        !syncs[1].ok && !syncs[1].requested_full,
        "the change was a partial sync"
    );
    assert!(!syncs[2].ok && syncs[2].requested_full, "a retry is full");
    assert!(syncs[3].ok && syncs[3].requested_full, "a retry is full");
    assert_eq!(syncs[3].ports, 5);
    // Backoff: the second retry waits longer than the first.
    let first_gap = syncs[2].at.duration_since(syncs[1].at);
    let second_gap = syncs[3].at.duration_since(syncs[2].at);
    assert!(first_gap >= Duration::from_millis(400), "{first_gap:?}");
    assert!(second_gap > first_gap, "{first_gap:?} then {second_gap:?}");
    let text = h.shared.metrics.render();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
                && l.contains("IPv4")
        })
        .unwrap_or_else(|| panic!("no failure counter in\n{text}"));
    assert!(line.ends_with(" 2"), "{line}");
}

#[test]
fn flushed_rules_force_a_full_sync() {
    let h = Harness::start(Duration::ZERO, Duration::from_millis(300), true);
    h.wait_for("the first sync", Duration::from_secs(5), |s| s.len() == 1);
    h.set_services(6);
    h.wait_for("a partial sync", Duration::from_secs(5), |s| {
        s.len() == 2 && !s[1].full
    });
    h.control.flushed.store(true, Ordering::SeqCst);
    // No change: the periodic check notices the flush.
    h.wait_for("a full resync", Duration::from_secs(5), |s| {
        s.len() >= 3 && s[2].requested_full
    });
}

#[test]
fn periodic_syncs_run_without_changes() {
    let h = Harness::start(Duration::ZERO, Duration::from_millis(200), true);
    h.wait_for("three syncs", Duration::from_secs(5), |s| s.len() >= 3);
    let syncs = h.control.syncs();
    assert!(syncs[1..].iter().all(|s| s.ok && !s.requested_full));
    assert!(syncs[2].at.duration_since(syncs[1].at) >= Duration::from_millis(150));
}

#[test]
fn stop_ends_the_loop_promptly() {
    let mut h = Harness::start(Duration::ZERO, Duration::from_secs(30), true);
    h.wait_for("the first sync", Duration::from_secs(5), |s| s.len() == 1);
    let t = Instant::now();
    h.stop.store(true, Ordering::SeqCst);
    h.shared.wake.notify_all();
    h.thread.take().unwrap().join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// The loop driving the real nftables dataplane over the in-memory nftables: the first
/// sync builds the table, a change is a partial sync, a refused batch is retried as a
/// full sync, and the table always ends as a fresh full sync would build it.
#[test]
fn the_loop_drives_the_nftables_dataplane_over_the_fake() {
    use kproxy::config::Config;
    use kproxy::model::NodeContext;
    use kproxy::nftables::dataplane::NftDataplane;
    use kproxy::nftables::fake::{Fake, FakeNft};
    use kproxy::nftables::render::{NftRenderer, RenderOptions, TABLE};
    use kproxy::nftables::text::normalize;
    use kproxy::nftables::transaction::{Family, Op};

    let shared = Arc::new(Shared::new(
        &[IpFamily::V4],
        Health::new(&[IpFamily::V4], Duration::from_secs(30)),
        Metrics::new(),
    ));
    *shared.state.lock().unwrap() = synthetic::cluster(3, 2);
    shared.mark_listed();
    let settings = Config::default().family_settings(IpFamily::V4, "node-1", None, &[]);
    let nft = FakeNft::new();
    let planes: Vec<Box<dyn Dataplane>> = vec![Box::new(NftDataplane::with_interface(
        settings.clone(),
        nft.clone(),
    ))];
    let loop_settings = LoopSettings {
        node_name: "node-1".into(),
        prefer_same_node: false,
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_secs(30),
        full_sync_period: Duration::from_secs(3600),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || SyncLoop::new(loop_settings, planes).run(&shared, &stop))
    };
    let fresh = |services: usize| {
        let node = NodeContext {
            name: "node-1".into(),
            zone: None,
            prefer_same_node: false,
        };
        let ps = synthetic::cluster(services, 2).proxy_state(IpFamily::V4, &node);
        let mut fake = Fake::new();
        let r = NftRenderer::new(settings.clone()).render(&ps, &RenderOptions::default());
        fake.apply(&r.main).unwrap();
        normalize(&fake.dump())
    };
    let table = || normalize(&nft.table(Family::Ip, TABLE).dump());
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let full = |tx: &kproxy::nftables::transaction::Transaction| {
        tx.ops.iter().any(|op| matches!(op, Op::AddTable { .. }))
    };

    wait_for("the first sync", &|| table() == fresh(3));
    assert!(full(&nft.applied()[0]), "the first sync is full");

    *shared.state.lock().unwrap() = synthetic::cluster(4, 2);
    shared.changed();
    wait_for("a partial sync", &|| table() == fresh(4));
    assert!(
        !full(nft.applied().last().unwrap()),
        "a change is a partial sync"
    );

    nft.fail_next(1);
    *shared.state.lock().unwrap() = synthetic::cluster(5, 2);
    shared.changed();
    wait_for("the retry", &|| table() == fresh(5));
    assert!(full(nft.applied().last().unwrap()), "the retry is full");

    stop.store(true, Ordering::SeqCst);
    shared.wake.notify_all();
    thread.join().unwrap();
}
