//! `/metrics` (OpenMetrics text via `prometheus-client`) with upstream kube-proxy's
//! metric names, help strings, labels and buckets; `/healthz` (`ok`) and `/proxyMode`
//! on the metrics address.
//!
//! Every metric is an atomic counter, gauge or histogram shared by `Arc`; recording
//! never takes a lock beyond the ones inside `prometheus-client` (a read lock on a
//! labelled family, a short write lock the first time a label set is seen, and a
//! histogram's own lock).

mod server;
#[cfg(test)]
mod tests;

pub use server::{serve, serve_with};

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::config::Mode;
use crate::model::IpFamily;

/// The `Content-Type` of `/metrics`: `prometheus-client` writes OpenMetrics text (counter
/// families are declared without `_total`, samples carry it, and the body ends `# EOF`).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upstream's latency buckets (`ExponentialBuckets(0.001, 2, 15)`): 1 ms … 16.384 s.
pub(crate) fn sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// Upstream's network-programming buckets. Upstream builds them with component-base's
/// `MergeBuckets`, which starts from a zero-filled one-element slice, so the exposed
/// layout begins with a `0` bucket: 0, 0.25, 0.5, 1…59 (step 1), 60…115 (step 5),
/// 120…300 (step 30).
pub(crate) fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((60..=115).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    ip_family: &'static str,
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    ip_family: &'static str,
    traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

fn fam(family: IpFamily) -> FamilyLabels {
    FamilyLabels {
        ip_family: family.label(),
    }
}

type HistogramFamily = Family<FamilyLabels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn sync_histograms() -> HistogramFamily {
    Family::new_with_constructor(|| Histogram::new(sync_buckets()))
}

/// One exposed metric: full name (without the `_total` counter suffix, which
/// `prometheus-client` appends), help text exactly as upstream, and the metric.
#[derive(Debug)]
struct Entry {
    name: &'static str,
    help: &'static str,
    metric: Box<dyn Metric>,
}

/// Encodes the entries with their help text verbatim (`Registry::register` would append
/// a full stop) and, like upstream's vectors, leaves out labelled families that have no
/// series yet.
#[derive(Debug)]
struct Exposition(Vec<Entry>);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for e in self.0.iter().filter(|e| !e.metric.is_empty()) {
            let m = encoder.encode_descriptor(e.name, e.help, None, e.metric.metric_type())?;
            e.metric.encode(m)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    sync_duration: HistogramFamily,
    sync_full_duration: HistogramFamily,
    sync_partial_duration: HistogramFamily,
    last_timestamp: Family<FamilyLabels, FloatGauge>,
    last_queued_timestamp: Family<FamilyLabels, FloatGauge>,
    network_programming: HistogramFamily,
    endpoint_changes_pending: Gauge,
    endpoint_changes: Counter,
    service_changes_pending: Gauge,
    service_changes: Counter,
    restore_failures: Family<FamilyLabels, Counter>,
    partial_restore_failures: Family<FamilyLabels, Counter>,
    iptables_total: Family<TableLabels, Gauge>,
    iptables_last: Family<TableLabels, Gauge>,
    nft_sync_failures: Family<FamilyLabels, Counter>,
    nft_cleanup_failures: Family<FamilyLabels, Counter>,
    no_local_endpoints: Family<PolicyLabels, Gauge>,
    healthz: Family<CodeLabels, Counter>,
    livez: Family<CodeLabels, Counter>,
    conntrack_duration: HistogramFamily,
    conntrack_deleted: Family<FamilyLabels, Counter>,
    skipped_objects: Family<SkipLabels, Counter>,
    shadow_differences: Family<ModeLabels, Gauge>,
    /// Shadow mode: the last comparison's report, served on `/debug/diff`.
    last_diff: std::sync::Mutex<Option<String>>,
    /// The effective configuration, served on `/configz`.
    configz: std::sync::Mutex<Option<String>>,
}

/// The daemon's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Every metric registered, at zero (labelled families appear once first used).
    pub fn new() -> Self {
        let mut m = Inner {
            registry: Registry::default(),
            sync_duration: sync_histograms(),
            sync_full_duration: sync_histograms(),
            sync_partial_duration: sync_histograms(),
            last_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            network_programming: Family::new_with_constructor(|| {
                Histogram::new(network_programming_buckets())
            }),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            restore_failures: Family::default(),
            partial_restore_failures: Family::default(),
            iptables_total: Family::default(),
            iptables_last: Family::default(),
            nft_sync_failures: Family::default(),
            nft_cleanup_failures: Family::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            conntrack_duration: sync_histograms(),
            conntrack_deleted: Family::default(),
            skipped_objects: Family::default(),
            shadow_differences: Family::default(),
            last_diff: std::sync::Mutex::new(None),
            configz: std::sync::Mutex::new(None),
        };
        fn e(name: &'static str, help: &'static str, metric: impl Metric) -> Entry {
            Entry {
                name,
                help,
                metric: Box::new(metric),
            }
        }
        let entries = vec![
            e(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                m.sync_duration.clone(),
            ),
            e(
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                m.sync_full_duration.clone(),
            ),
            e(
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                m.sync_partial_duration.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.last_timestamp.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                m.last_queued_timestamp.clone(),
            ),
            e(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                m.network_programming.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                m.endpoint_changes_pending.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                m.endpoint_changes.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                m.service_changes_pending.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                m.service_changes.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                "Cumulative proxy iptables restore failures",
                m.restore_failures.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
                "Cumulative proxy iptables partial restore failures",
                m.partial_restore_failures.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                m.iptables_total.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
                m.iptables_last.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                m.nft_sync_failures.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                "Cumulative proxy nftables cleanup failures",
                m.nft_cleanup_failures.clone(),
            ),
            e(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                m.no_local_endpoints.clone(),
            ),
            e(
                "kubeproxy_proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                m.healthz.clone(),
            ),
            e(
                "kubeproxy_proxy_livez",
                "Cumulative proxy livez HTTP status",
                m.livez.clone(),
            ),
            e(
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds",
                m.conntrack_duration.clone(),
            ),
            e(
                "kubeproxy_conntrack_reconciler_deleted_entries",
                "Cumulative conntrack flows deleted by conntrack reconciler",
                m.conntrack_deleted.clone(),
            ),
            e(
                "kproxy_skipped_objects",
                "Malformed objects skipped, by kind and reason",
                m.skipped_objects.clone(),
            ),
            e(
                "kproxy_shadow_differences",
                "Shadow mode: differences between the rules kproxy would write and the live rules at the last sync",
                m.shadow_differences.clone(),
            ),
        ];
        m.registry.register_collector(Box::new(Exposition(entries)));
        Metrics { inner: Arc::new(m) }
    }

    /// Every sync attempt (success or failure): sync_proxy_rules_duration_seconds, plus
    /// the full or partial histogram.
    pub(crate) fn sync_attempt(&self, family: IpFamily, full: bool, took: Duration) {
        let secs = took.as_secs_f64();
        let l = fam(family);
        self.inner.sync_duration.get_or_create(&l).observe(secs);
        let h = if full {
            &self.inner.sync_full_duration
        } else {
            &self.inner.sync_partial_duration
        };
        h.get_or_create(&l).observe(secs);
    }

    /// A successful sync: sync_proxy_rules_last_timestamp_seconds = now (unix seconds).
    pub(crate) fn sync_succeeded(&self, family: IpFamily) {
        self.inner
            .last_timestamp
            .get_or_create(&fam(family))
            .set(unix_now());
    }

    /// A sync was queued (a change arrived): sync_proxy_rules_last_queued_timestamp_seconds
    /// for every family given.
    pub fn queued(&self, families: &[IpFamily]) {
        let now = unix_now();
        for f in families {
            self.inner
                .last_queued_timestamp
                .get_or_create(&fam(*f))
                .set(now);
        }
    }

    /// A successful sync (attempt + success).
    pub fn synced(&self, family: IpFamily, full: bool, took: Duration) {
        self.sync_attempt(family, full, took);
        self.sync_succeeded(family);
    }

    /// A failed apply. iptables: iptables_restore_failures_total (`partial` = false) or
    /// iptables_partial_restore_failures_total (`partial` = true); nftables:
    /// nftables_sync_failures_total.
    pub(crate) fn apply_failed(&self, family: IpFamily, mode: Mode, partial: bool) {
        let c = match (mode, partial) {
            (Mode::Iptables, false) => &self.inner.restore_failures,
            (Mode::Iptables, true) => &self.inner.partial_restore_failures,
            (Mode::Nftables, _) => &self.inner.nft_sync_failures,
        };
        c.get_or_create(&fam(family)).inc();
    }

    /// A failed sync (a failed full apply).
    pub fn failed(&self, family: IpFamily, mode: Mode) {
        self.apply_failed(family, mode, false);
    }

    /// nftables stale-chain clean-up transaction failed:
    /// sync_proxy_rules_nftables_cleanup_failures_total.
    pub(crate) fn nft_cleanup_failed(&self, family: IpFamily) {
        self.inner
            .nft_cleanup_failures
            .get_or_create(&fam(family))
            .inc();
    }

    /// iptables rule counts after a successful sync: iptables_total{table,ip_family} and
    /// iptables_last{table,ip_family}.
    pub(crate) fn iptables_rules(&self, family: IpFamily, table: &str, total: usize, last: usize) {
        let l = TableLabels {
            ip_family: family.label(),
            table: table.to_string(),
        };
        self.inner
            .iptables_total
            .get_or_create(&l)
            .set(saturating_i64(total));
        self.inner
            .iptables_last
            .get_or_create(&l)
            .set(saturating_i64(last));
    }

    /// network_programming_duration_seconds.
    pub(crate) fn network_programming(&self, family: IpFamily, latency: Duration) {
        self.inner
            .network_programming
            .get_or_create(&fam(family))
            .observe(latency.as_secs_f64());
    }

    /// endpoint_changes_pending / service_changes_pending gauges.
    pub(crate) fn changes_pending(&self, services: usize, endpoints: usize) {
        self.inner
            .service_changes_pending
            .set(saturating_i64(services));
        self.inner
            .endpoint_changes_pending
            .set(saturating_i64(endpoints));
    }

    /// no_local_endpoints_total{traffic_policy, ip_family} gauges.
    pub(crate) fn no_local_endpoints(&self, family: IpFamily, internal: usize, external: usize) {
        for (policy, n) in [("internal", internal), ("external", external)] {
            self.inner
                .no_local_endpoints
                .get_or_create(&PolicyLabels {
                    ip_family: family.label(),
                    traffic_policy: policy,
                })
                .set(saturating_i64(n));
        }
    }

    /// proxy_healthz_total{code}.
    pub(crate) fn healthz_served(&self, code: u16) {
        self.inner
            .healthz
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// proxy_livez_total{code}.
    pub(crate) fn livez_served(&self, code: u16) {
        self.inner
            .livez
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// conntrack_reconciler_sync_duration_seconds and
    /// conntrack_reconciler_deleted_entries_total.
    pub(crate) fn conntrack_reconciled(&self, family: IpFamily, took: Duration, deleted: usize) {
        let l = fam(family);
        self.inner
            .conntrack_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        self.inner
            .conntrack_deleted
            .get_or_create(&l)
            .inc_by(deleted as u64);
    }

    /// A malformed object of `kind` was skipped for a reason of category `reason`.
    pub(crate) fn skipped_object(&self, kind: &'static str, reason: &'static str) {
        self.inner
            .skipped_objects
            .get_or_create(&SkipLabels { kind, reason })
            .inc();
    }

    /// A Service (or EndpointSlice) event arrived.
    pub fn change(&self, endpoints: bool) {
        if endpoints {
            self.inner.endpoint_changes.inc();
        } else {
            self.inner.service_changes.inc();
        }
    }

    /// Shadow mode: the last comparison found `n` differences (all families), and its
    /// report for `/debug/diff`.
    pub(crate) fn shadow_compared(&self, mode: Mode, n: usize, report: String) {
        self.inner
            .shadow_differences
            .get_or_create(&ModeLabels {
                mode: mode.as_str(),
            })
            .set(saturating_i64(n));
        *self
            .inner
            .last_diff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report);
    }

    /// Sets the `/configz` body (the effective configuration as JSON).
    pub(crate) fn set_configz(&self, body: String) {
        *self
            .inner
            .configz
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(body);
    }

    /// The last shadow comparison's report, if any.
    pub(crate) fn last_diff(&self) -> Option<String> {
        self.inner
            .last_diff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The exposition (OpenMetrics text, ending `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail, and our collector only forwards its errors.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}
